"""ViT-B 96³ SimCLR on one GPU: samples/s, model FLOP utilisation and data-wait fraction of the real training step.

What is timed is :class:`brainiac.models.simclr.SimCLRStep` as the Ray Train loop drives it: the batch goes to the GPU,
is augmented there, batched (``augment.device == "worker"``), both views run through encoder + projection head under bf16
autocast, NT-Xent, backward, optimiser step. Phases, each printed as it finishes:

1. **throughput**: GPU-resident float16 crops (no loader) at per-GPU batch 32 and 64 (``--batches``), after warm-up,
   timed with ``torch.cuda.synchronize``; the best batch that fits is reported;
2. **FLOPs**: one forward+backward of both views of the model (not the augmentation) under
   ``torch.utils.flop_counter.FlopCounterMode``; MFU = FLOPs per step / step time / peak (989 TFLOP/s, the H100/H200
   SXM dense bf16 spec, unless ``--peak-tflops`` says otherwise);
3. **data wait**: a torch ``DataLoader`` (``min(16, cpus) - 1`` workers, pinned memory, persistent workers) whose dataset
   decodes zstd float16 volumes (synthetic ~120×140×120 brains with an ellipsoid mask, encoded once at start-up with
   ``brainiac.ingestion.volumes.encode_array``) and cuts pairs with ``brainiac.models.patches.view_pairs``; so the CPUs
   only decode and crop. Data-wait fraction = time blocked in ``next(loader)`` / total step time;
4. **torch.compile** (``pretrain.compile``), in a child process with its own deadline, only if time is left.

Runs from a bare checkout: the ``brainiac.*`` names are mapped onto the repository folders here (as the
``package-dir`` of pyproject.toml does), and nothing that needs Ray, deltalake or MLflow is imported.

    bash bench/gpu.sh                                   # on the GPU machine (installs the carried MONAI wheel)
    .venv/bin/python bench/gpu_pretrain.py --tiny --steps 3   # CPU check: tiny config, fp32

Lines are also written to ``$OUT/gpu.txt`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.machinery
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_PACKAGES = {"platform": "platform", "ingestion": "ingestion", "models": "models", "jobs": "jobs"}
"""``brainiac.<name>`` → repository folder, as ``[tool.setuptools] package-dir`` installs them."""


class _BrainiacFinder:
    """Meta-path finder for ``brainiac`` and its four top-level packages; deeper modules are then found by the normal
    path finder through the parents' ``__path__``. ``platform/`` has no ``__init__.py``: it becomes a namespace package
    under ``brainiac`` only, so the standard library's ``platform`` is never shadowed."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "brainiac":
            spec = importlib.machinery.ModuleSpec("brainiac", None, is_package=True)
            spec.submodule_search_locations = []
            return spec
        head, _, name = fullname.partition(".")
        if head != "brainiac" or name not in _PACKAGES:
            return None
        folder = REPO / _PACKAGES[name]
        init = folder / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(folder)])
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec


def install_brainiac_shim() -> None:
    """Import ``brainiac.*`` from this checkout, installed or not (ahead of any editable-install finder)."""
    if "brainiac" not in sys.modules and _BrainiacFinder not in sys.meta_path:
        sys.meta_path.insert(0, _BrainiacFinder)


install_brainiac_shim()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from brainiac.ingestion.volumes import decode_array, encode_array  # noqa: E402
from brainiac.models.patches import view_pairs  # noqa: E402
from brainiac.models.simclr import SimCLRModel, SimCLRStep  # noqa: E402
from brainiac.platform.config import load_config  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0
"""NVIDIA's dense (no sparsity) bf16 tensor-core peak of H100/H200 SXM, in TFLOP/s."""


# -- output ------------------------------------------------------------------------------------------------------------


class Report:
    """Print a line and append it to ``$OUT/gpu.txt`` (flushed per line, so a killed run keeps what it measured)."""

    def __init__(self) -> None:
        out = os.environ.get("OUT")
        self.path = Path(out) / "gpu.txt" if out else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(line + "\n")


# -- synthetic catalog volumes and the CPU loader ---------------------------------------------------------------------


def synth_volume(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like float16 volume (smooth tissue pattern + noise inside a random ellipsoid) and its uint8 mask."""
    axes = [np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    radii = rng.uniform(0.7, 0.9, 3).astype(np.float32)
    centre = rng.uniform(-0.05, 0.05, 3).astype(np.float32)
    r = np.sqrt(
        ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
    )
    mask = (r <= 1.0).astype(np.uint8)
    freq = rng.uniform(2.0, 6.0, 3).astype(np.float32)
    tissue = 0.6 + 0.25 * np.sin(freq[0] * np.pi * z) * np.cos(freq[1] * np.pi * y) * np.sin(freq[2] * np.pi * x)
    tissue = tissue - 0.2 * (r < 0.35)  # ventricle-ish dark core
    noise = rng.standard_normal(shape, dtype=np.float32) * 0.05
    volume = ((tissue + noise) * mask).astype(np.float16)
    return volume, mask


class EncodedVolumes(torch.utils.data.Dataset):
    """Item ``i``: all ``patches_per_volume`` view pairs of volume ``i mod n``, decoded from zstd float16 and cropped.

    Holds only the compressed bytes (as a catalog row would), so the loader workers do what a data CPU does in
    production: decode and crop, no augmentation.
    """

    def __init__(self, blobs: list[tuple[bytes, bytes, tuple[int, ...]]], size: int, patch_cfg, length: int) -> None:
        self.blobs, self.size, self.patch_cfg, self.length = blobs, size, patch_cfg, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        vol_blob, mask_blob, shape = self.blobs[i % len(self.blobs)]
        volume = decode_array(vol_blob, shape, "float16")
        mask = decode_array(mask_blob, shape, "uint8")
        first, second, _ = view_pairs(volume, mask, self.size, self.patch_cfg, np.random.default_rng(i))
        return torch.from_numpy(first), torch.from_numpy(second)


def cat_pairs(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([a for a, _ in items]), torch.cat([b for _, b in items])


def _loader_worker_init(_: int) -> None:
    torch.set_num_threads(1)


def encode_volumes(count: int, shape: tuple[int, int, int], seed: int) -> list[tuple[bytes, bytes, tuple[int, ...]]]:
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(count):
        volume, mask = synth_volume(shape, rng)
        blobs.append((encode_array(volume), encode_array(mask), tuple(volume.shape)))
    return blobs


def shm_free_bytes() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


# -- measurements ------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_engine(cfg, device: torch.device, compile_model: bool = False) -> tuple[SimCLRModel, SimCLRStep]:
    torch.manual_seed(cfg.seed)
    model = SimCLRModel(cfg.model, cfg.projection).to(device)
    wrapped = torch.compile(model) if compile_model else model
    engine = SimCLRStep(
        wrapped, cfg.ssl, cfg.optim, cfg.augment, cfg.pretrain.max_steps, device, cfg.pretrain.precision, 1,
        global_batch=cfg.pretrain.batch_size,  # one GPU: the per-256 rate scales by this batch
    )  # fmt: skip
    engine.generator.manual_seed(cfg.seed)
    return model, engine


def resident_batch(batch: int, size: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (B, 1, s, s, s) float16 crop batches already on the device (what the loader would deliver, minus the copy)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, 1, size, size, size)
    return tuple(torch.rand(shape, generator=g, device=device).to(torch.float16) for _ in range(2))  # type: ignore[return-value]


def time_steps(engine: SimCLRStep, views, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Median and mean seconds per optimiser step of ``engine.micro_step`` on fixed inputs."""
    for _ in range(warmup):
        engine.micro_step(*views)
    sync(device)
    times = []
    started = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.micro_step(*views)
        sync(device)
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    return {"median_s": statistics.median(times), "mean_s": total / steps}


def time_augment(engine: SimCLRStep, views, device: torch.device, reps: int) -> float | None:
    """Seconds per step spent in the worker-side batched augmentation of both views."""
    if engine.augment is None:
        return None
    first, second = (v.float() for v in views)
    engine.augment.pair(first, second, generator=engine.generator)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        engine.augment.pair(first, second, generator=engine.generator)
    sync(device)
    return (time.perf_counter() - t0) / reps


def count_model_flops(model: torch.nn.Module, engine: SimCLRStep, views, device: torch.device) -> int:
    """FLOPs of forward+backward of both views through encoder + head + NT-Xent, as the step runs them (bf16 autocast
    where the step uses it). Augmentation and the optimiser update are not counted (they are not model FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.cat([v.float() for v in views]).to(device)
    model.train()
    model.zero_grad(set_to_none=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if engine.autocast else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter:
        with amp:
            z = model(x)
        z1, z2 = z.float().chunk(2)
        engine.loss_fn(z1, z2).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def loader_phase(
    cfg, engine: SimCLRStep, device: torch.device, batch: int, blobs, workers: int, warmup: int, steps: int, say
) -> dict[str, float]:
    """Steps fed by a real CPU DataLoader; returns wait fraction, samples/s and the loader settings used."""
    size = cfg.model.img_size
    per_volume = math.gcd(cfg.patches.patches_per_volume, batch)
    patch_cfg = dataclasses.replace(cfg.patches, patches_per_volume=per_volume)
    batch_bytes = 2 * batch * size**3 * 2  # two float16 views
    prefetch = 2
    shm = shm_free_bytes()
    if shm is not None and workers:
        # Worker batches travel through /dev/shm; keep what is in flight under half of it (containers often have little).
        prefetch = max(1, min(2, int(0.5 * shm / max(1, batch_bytes * workers))))
        if 0.5 * shm < batch_bytes * workers:
            workers = max(1, int(0.5 * shm // batch_bytes))
            say(f"  /dev/shm has {shm / 2**30:.1f} GiB free: loader cut to {workers} workers")
    ds = EncodedVolumes(blobs, size, patch_cfg, length=10**7)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch // per_volume,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers > 0 else None,
        collate_fn=cat_pairs,
        worker_init_fn=_loader_worker_init,
        drop_last=True,
    )
    say(
        f"  loader: {workers} workers, {batch // per_volume} volumes x {per_volume} pairs per batch, prefetch {prefetch},"
        f" {batch_bytes / 2**20:.0f} MiB per batch, shm free {'?' if shm is None else f'{shm / 2**30:.1f} GiB'}"
    )
    it = iter(loader)
    waits, totals = [], []
    try:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            first, second = next(it)
            t1 = time.perf_counter()
            engine.micro_step(first, second)
            sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                waits.append(t1 - t0)
                totals.append(t2 - t0)
    finally:
        del it, loader
        gc.collect()
    wait, total = sum(waits), sum(totals)
    half = len(waits) // 2
    return {
        "wait_fraction": wait / total,
        # The prefetch queue filled during warm-up can hide a slow loader early on; the second half is steady state.
        "wait_fraction_late": sum(waits[half:]) / max(sum(totals[half:]), 1e-9),
        "samples_per_s": steps * batch / total,
        "step_s": total / steps,
        "wait_ms": 1e3 * wait / steps,
        "workers": workers,
    }


def run_child(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group with output in a file; on timeout kill the whole group (inductor's compile
    workers included, which would otherwise hold a pipe open). Returns (exit code or None on timeout, output)."""
    import signal
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        with contextlib.suppress(ProcessLookupError):  # the group: the child and anything it started
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.seek(0)
        return rc, out.read()


def compile_child(args: argparse.Namespace) -> None:
    """``--compile-child``: time ``torch.compile``d steps at one batch; prints one ``COMPILE_RESULT`` line."""
    cfg, device = setup(args)
    _, engine = build_engine(cfg, device, compile_model=True)
    views = resident_batch(args.batch, cfg.model.img_size, device, cfg.seed)
    t0 = time.perf_counter()
    engine.micro_step(*views)
    sync(device)
    first_s = time.perf_counter() - t0
    timing = time_steps(engine, views, device, args.warmup, args.steps)
    print(f"COMPILE_RESULT first_step_s={first_s:.3f} step_s={timing['median_s']:.6f}", flush=True)


def setup(args: argparse.Namespace):
    cfg = load_config("pretrain/tiny" if args.tiny else "pretrain/vit-b")
    if cfg.augment.device != "worker":
        cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, device="worker"))
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    return cfg, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU check: pretrain/tiny config, fp32, on CPU")
    parser.add_argument("--batches", default=None, help="per-GPU batches to try, comma-separated (default 32,64)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per phase (default 5, tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps of the throughput phase (default 20)")
    parser.add_argument("--loader-steps", type=int, default=None, help="timed steps of the loader phase (default 100)")
    parser.add_argument("--volumes", type=int, default=32, help="synthetic encoded volumes in the loader's dataset")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default min(16, cpus) - 1)")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="peak for MFU")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; phases that would overrun are skipped")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile phase")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (tiny mode)")
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--compile-on-cpu", action="store_true", help="tiny mode: run the compile phase anyway (a check)"
    )
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.steps = args.steps if args.steps is not None else 20
    if args.compile_child:
        compile_child(args)
        return

    started = time.perf_counter()
    deadline = started + args.budget
    say = Report()
    cfg, device = setup(args)
    size = cfg.model.img_size
    batches = [int(b) for b in (args.batches or ("16" if args.tiny else "32,64")).split(",")]
    loader_steps = args.loader_steps if args.loader_steps is not None else (args.steps if args.tiny else 100)
    cpus = os.cpu_count() or 1
    workers = args.workers if args.workers is not None else max(0, min(16, cpus) - 1)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = cfg.pretrain.precision if device.type == "cuda" else "fp32"
    label = "tiny 32³ ViT" if args.tiny else "ViT-B 96³"
    say(f"== SimCLR step benchmark: {label}, {precision}, augment on the worker ({device.type}), {gpu_name} ==")
    say(f"   torch {torch.__version__}, python {sys.version.split()[0]}, {cpus} CPUs, budget {args.budget:.0f} s")

    # Volumes are encoded at start-up, as the catalog stores them (zstd float16); only their bytes reach the loader.
    t0 = time.perf_counter()
    vol_shape = (56, 64, 56) if args.tiny else (120, 140, 120)
    blobs = encode_volumes(args.volumes, vol_shape, cfg.seed)
    stored = sum(len(v) + len(m) for v, m, _ in blobs)
    say(
        f"   {args.volumes} synthetic volumes {vol_shape} encoded ({stored / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s"
    )

    model, engine = build_engine(cfg, device)
    params = sum(p.numel() for p in model.parameters())
    say(f"   model: {params / 1e6:.1f} M parameters (encoder + projection head), optimiser {cfg.optim.name}")

    # 1. throughput on device-resident crops
    results: dict[int, dict[str, float]] = {}
    for batch in batches:
        if time.perf_counter() > deadline - 60:
            say(f"[throughput] B={batch}: skipped (time budget)")
            continue
        try:
            views = resident_batch(batch, size, device, cfg.seed)
            timing = time_steps(engine, views, device, args.warmup, args.steps)
            aug_s = time_augment(engine, views, device, reps=1 if device.type == "cpu" else 5)
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        except torch.OutOfMemoryError:
            engine.optimizer.zero_grad(set_to_none=True)
            engine._micro, engine._acc = 0, []
            views = None
            gc.collect()
            torch.cuda.empty_cache()
            say(f"[throughput] B={batch}: out of memory")
            continue
        results[batch] = {**timing, "aug_s": aug_s or 0.0, "mem_gib": mem}
        say(
            f"[throughput] B={batch}: {batch / timing['median_s']:8.1f} pairs/s  step {1e3 * timing['median_s']:.1f} ms"
            f" (mean {1e3 * timing['mean_s']:.1f})  augment {1e3 * (aug_s or 0):.1f} ms/step  peak mem {mem:.1f} GiB"
        )
        del views
    if not results:
        say("no batch size fitted; nothing measured")
        sys.exit(1)
    best = max(results, key=lambda b: b / results[b]["median_s"])
    step_s = results[best]["median_s"]

    # 2. FLOPs of the model's forward+backward (both views) and MFU
    views = resident_batch(best, size, device, cfg.seed)
    if engine.augment is not None:
        views = engine.augment.pair(views[0].float(), views[1].float(), generator=engine.generator)
    flops = count_model_flops(model, engine, views, device)
    del views
    mfu = flops / step_s / 1e12 / args.peak_tflops if device.type == "cuda" else None
    say(
        f"[flops] B={best}: {_flops(flops)} per step (model fwd+bwd, both views; augmentation not counted),"
        f" {_flops(flops / step_s)}/s achieved, peak assumed {args.peak_tflops:.0f} TFLOP/s dense bf16"
    )

    # 3. data wait with the CPU loader
    loader = None
    if time.perf_counter() < deadline - 45:
        loader = loader_phase(cfg, engine, device, best, blobs, workers, args.warmup, loader_steps, say)
        say(
            f"[loader] B={best}: {loader['samples_per_s']:.1f} pairs/s, step {1e3 * loader['step_s']:.1f} ms,"
            f" waiting {loader['wait_ms']:.1f} ms/step, data-wait fraction {100 * loader['wait_fraction']:.1f}%"
            f" (second half of the steps {100 * loader['wait_fraction_late']:.1f}%)"
        )
    else:
        say("[loader] skipped (time budget)")

    # 4. torch.compile on/off, in a child process with its own deadline
    compiled = None
    left = deadline - time.perf_counter()
    if args.no_compile or (args.tiny and not args.compile_on_cpu):
        compile_note = "not run (--no-compile)" if args.no_compile else "not run (tiny/CPU mode: compile is GPU-only)"
    elif left < 90:
        compile_note = f"skipped ({left:.0f} s left of the budget)"
    else:
        del engine, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-child", "--batch", str(best)]
        cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
        say(f"[compile] torch.compile at B={best}, child process, at most {left - 15:.0f} s")
        rc, stdout = run_child(cmd, timeout=left - 15)
        line = next((ln for ln in stdout.splitlines() if ln.startswith("COMPILE_RESULT")), None)
        if rc is None:
            compile_note = "did not finish within the budget"
        elif line is None:
            tail = [ln for ln in stdout.strip().splitlines() if ln.strip()][-3:]
            compile_note = f"failed (rc {rc}): {' | '.join(tail)}"
        else:
            compiled = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
            compile_note = ""
    if compiled:
        eager_rate, comp_rate = best / step_s, best / compiled["step_s"]
        compile_note = (
            f"on {comp_rate:.1f} pairs/s vs off {eager_rate:.1f} pairs/s ({comp_rate / eager_rate:.2f}x),"
            f" first compiled step {compiled['first_step_s']:.0f} s"
        )
    say(f"[compile] {compile_note}")

    def row(name: str, value: str) -> None:
        say(f"{name:<52}: {value}")

    say()
    say(f"==== SUMMARY: {label}, {precision}, batched augmentation on {device.type}, {gpu_name} ====")
    row(f"samples/s (view pairs/s, best B={best}, input on device)", f"{best / step_s:.1f}")
    row(f"step time (B={best}, median of {args.steps})", f"{1e3 * step_s:.1f} ms")
    for b, r in sorted(results.items()):
        row(f"samples/s at B={b}", f"{b / r['median_s']:.1f}  (augment {1e3 * r['aug_s']:.1f} ms/step)")
    row("model FLOPs per step (fwd+bwd, both views)", _flops(flops))
    row("achieved model FLOP/s", _flops(flops / step_s) + "/s")
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a on CPU"
    row(f"MFU (vs {args.peak_tflops:.0f} TFLOP/s dense bf16 peak)", mfu_text)
    if loader:
        row(f"samples/s with CPU loader ({loader['workers']} workers)", f"{loader['samples_per_s']:.1f}")
        row(
            f"data-wait fraction (CPU loader, {loader_steps} steps)",
            f"{100 * loader['wait_fraction']:.1f}%  (last {loader_steps - loader_steps // 2}: "
            f"{100 * loader['wait_fraction_late']:.1f}%)",
        )
    else:
        row("data-wait fraction", "not measured (time budget)")
    row("torch.compile", compile_note)
    row("wall time", f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
