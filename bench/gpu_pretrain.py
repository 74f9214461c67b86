"""ViT-B 96³ SimCLR on one GPU: pairs/s, MFU, a step-time breakdown and the data-wait fraction, eager and compiled.

What is timed is :class:`brainiac.models.simclr.SimCLRStep` as the Ray Train loop drives it: pinned host float16 crops
are copied and augmented on a side CUDA stream (``SimCLRStep.prepare``, batched augmentation without host syncs), both
views run through encoder + projection head under bf16 autocast, NT-Xent, backward, fused AdamW, and the loss is read
back only at the end of the timed steps (``sync=False``, as between two log steps). Phases, each printed as it finishes:

1. **eager**: pairs/s at per-GPU batch 64, 128 and 256 (``--batches``), after warm-up; the best batch is used below;
2. **FLOPs / MFU**: one forward+backward of both views under ``torch.utils.flop_counter.FlopCounterMode``; MFU = FLOPs
   per step / step time / the card's dense bf16 peak (H100 and H200 SXM: 989 TFLOP/s; ``--peak-tflops`` overrides);
3. **profile**: ``torch.profiler`` over 3 steps: device ms per step in augmentation (with the copy), forward (with the
   loss), backward and optimiser (the ``simclr.*`` ranges of SimCLRStep);
4. **data wait**: a torch ``DataLoader`` (``min(16, cpus) - 1`` workers, pinned memory) decoding zstd float16 synthetic
   volumes and cutting pairs with ``brainiac.models.patches.view_pairs``; and, with ``--catalog URI``, the real Ray Data
   stream of the pretraining job (``pair_dataset`` → ``iter_torch_batches(device="cpu", pin_memory=True)``).
   Data-wait fraction = host time blocked on the next batch / wall time;
5. **compiled**: the same step under ``torch.compile`` (``SimCLRStep(compile=True)``) in a child process with its own
   deadline: pairs/s, MFU and the profile breakdown.

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
from brainiac.jobs.config import load_config  # noqa: E402
from brainiac.models.patches import view_pairs  # noqa: E402
from brainiac.models.simclr import SimCLRModel, SimCLRStep  # noqa: E402

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


PEAKS_BF16_DENSE = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peaks in TFLOP/s by card family (NVIDIA's SXM specs, no sparsity)."""


def card_peak(device: torch.device, override: float | None) -> tuple[str, float | None, str]:
    """(card name, dense bf16 peak in TFLOP/s, where the peak comes from)."""
    if device.type != "cuda":
        return "cpu", override, "given" if override else "n/a"
    name = torch.cuda.get_device_name(device)
    if override:
        return name, override, "--peak-tflops"
    for family, peak in PEAKS_BF16_DENSE.items():
        if family in name:
            return name, peak, f"{family} SXM dense bf16 spec"
    return name, H200_BF16_DENSE_TFLOPS, "unknown card: H100/H200 figure assumed"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_engine(cfg, device: torch.device, compile_model: bool = False) -> tuple[SimCLRModel, SimCLRStep]:
    torch.manual_seed(cfg.seed)
    model = SimCLRModel(cfg.model, cfg.projection).to(device)
    engine = SimCLRStep(
        model, cfg.ssl, cfg.optim, cfg.augment, cfg.pretrain.max_steps, device, cfg.pretrain.precision, 1,
        global_batch=cfg.pretrain.batch_size,  # one GPU: the per-256 rate scales by this batch
        compile=compile_model,
    )  # fmt: skip
    engine.generator.manual_seed(cfg.seed)
    return model, engine


def host_batch(batch: int, size: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (B, 1, s, s, s) float16 crop batches in host memory, pinned on a CUDA machine: what the loader and the Ray
    Data stream (``pin_memory=True``) deliver. Every step copies them to the device (asynchronously, on the side
    stream), as training does."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, size, size, size)
    views = [torch.rand(shape, generator=g).to(torch.float16) for _ in range(2)]
    if device.type == "cuda":
        views = [v.pin_memory() for v in views]
    return views[0], views[1]


def run_steps(engine: SimCLRStep, views, steps: int) -> None:
    """``steps`` optimiser steps as the training loop runs them: prepare (copy + augment on the side stream), step,
    read nothing back (``sync=False``)."""
    for _ in range(steps):
        engine.micro_step(engine.prepare(*views), sync=False)


def time_steps(engine: SimCLRStep, views, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Seconds per optimiser step over ``steps`` back-to-back steps (one device sync at the end, as between two log
    steps of training), after ``warmup`` steps."""
    run_steps(engine, views, warmup)
    sync(device)
    started = time.perf_counter()
    run_steps(engine, views, steps)
    sync(device)
    return {"step_s": (time.perf_counter() - started) / steps}


PHASES = ("simclr.augment", "simclr.forward", "simclr.backward", "simclr.optimizer")


def profile_breakdown(engine: SimCLRStep, views, device: torch.device, steps: int) -> dict[str, float]:
    """Per-step milliseconds of augmentation (copy included), forward (+ loss), backward and optimiser from
    ``torch.profiler``: on CUDA the device (kernel) time launched inside each range of :class:`SimCLRStep`; the
    backward's kernels are launched by autograd's device thread, outside the range, so backward is the device time
    not inside the other three ranges. On CPU, the ranges' CPU time. ``wall`` is the step time while profiling."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    run_steps(engine, views, 1)
    sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        run_steps(engine, views, steps)
        sync(device)
        wall = time.perf_counter() - started
    events = prof.key_averages()

    def dev(e) -> float:
        return float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)))

    def self_dev(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    by_key = {e.key: e for e in events}
    out = {"wall": 1e3 * wall / steps}
    if cuda:
        total = sum(self_dev(e) for e in events) / 1e3 / steps
        for name in PHASES[:2] + PHASES[3:]:
            out[name.split(".")[1]] = dev(by_key[name]) / 1e3 / steps if name in by_key else 0.0
        out["backward"] = max(0.0, total - out["augment"] - out["forward"] - out["optimizer"])
        out["device_busy"] = total
    else:
        for name in PHASES:
            out[name.split(".")[1]] = by_key[name].cpu_time_total / 1e3 / steps if name in by_key else 0.0
    return out


def breakdown_line(b: dict[str, float]) -> str:
    parts = [f"{k} {b[k]:.1f}" for k in ("augment", "forward", "backward", "optimizer") if k in b]
    busy = f", device busy {b['device_busy']:.1f}" if "device_busy" in b else ""
    return f"{', '.join(parts)} ms/step{busy} (wall {b['wall']:.1f} ms/step)"


def count_model_flops(model: torch.nn.Module, engine: SimCLRStep, views, device: torch.device) -> int:
    """FLOPs of forward+backward of both views through encoder + head + NT-Xent, as the step runs them (bf16 autocast
    where the step uses it). Augmentation and the optimiser update are not counted (they are not model FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = engine._take(engine.prepare(*views))
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
    """Steps fed by a real CPU DataLoader (pinned batches); returns wait fraction, samples/s and the loader settings."""
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
    try:
        return fed_steps(engine, iter(loader), device, warmup, steps)
    finally:
        del loader
        gc.collect()


def fed_steps(engine: SimCLRStep, batches, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Steps fed by an iterator of (first, second) host batches, run as the training loop runs them; data wait = host
    time blocked in ``next``. Returns the wait fraction (all steps and the second half), pairs/s and step time."""
    waits: list[float] = []
    pairs = 0
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            started = time.perf_counter()
            half_started = None
        if i == warmup + steps // 2:
            sync(device)
            half_started = time.perf_counter()
        t0 = time.perf_counter()
        first, second = next(batches)
        if i >= warmup:
            waits.append(time.perf_counter() - t0)
            pairs += len(first)
        engine.micro_step(engine.prepare(first, second), sync=False)
    sync(device)
    ended = time.perf_counter()
    total = ended - started
    late = ended - half_started
    return {
        "wait_fraction": sum(waits) / total,
        # The prefetch queue filled during warm-up can hide a slow loader early on; the second half is steady state.
        "wait_fraction_late": sum(waits[steps // 2 :]) / max(late, 1e-9),
        "samples_per_s": pairs / total,
        "step_s": total / steps,
        "wait_ms": 1e3 * sum(waits) / steps,
    }


def ray_phase(args, cfg, engine: SimCLRStep, device: torch.device, batch: int, say) -> dict[str, float] | None:
    """The same steps fed by the real Ray Data stream of the pretraining job (``pair_dataset`` over the catalog's
    ``volumes`` table, ``iter_torch_batches(device="cpu", pin_memory=True)``, as jobs/pretrain/loop.py reads it)."""
    if not args.catalog:
        say("[ray] not run: pass --catalog URI (a catalog with preprocessed volumes of the model's size)")
        return None
    try:
        import ray

        from brainiac.jobs.pretrain.stream import pair_dataset, select_volumes
        from brainiac.platform.catalog import Catalog
    except ImportError as exc:
        say(f"[ray] not run: {exc}")
        return None
    rcfg = load_config("pretrain/tiny" if args.tiny else "pretrain/vit-b", [f"catalog.uri={args.catalog}"])
    catalog = Catalog.open(rcfg.catalog.uri, rcfg.catalog.storage_options)
    selection = select_volumes(catalog, rcfg)
    ray.init(num_cpus=max(1, (os.cpu_count() or 2) - 1), include_dashboard=False, ignore_reinit_error=True)
    try:
        dataset = pair_dataset(catalog, rcfg, selection, selection.train_ids)
        torch_batches = dataset.iter_torch_batches(
            batch_size=batch, drop_last=True, device="cpu", pin_memory=device.type == "cuda", prefetch_batches=2
        )
        pairs = ((b["view1"], b["view2"]) for b in torch_batches)
        steps = args.loader_steps if args.loader_steps is not None else (args.steps if args.tiny else 100)
        say(f"  ray data: {len(selection.train_ids)} train volumes from {args.catalog}, batch {batch}, {steps} steps")
        return fed_steps(engine, pairs, device, args.warmup, steps)
    finally:
        ray.shutdown()


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
    """``--compile-child``: the compiled step at one batch: first-step (compile) time, step time and the profiler
    breakdown; prints one ``COMPILE_RESULT`` JSON line."""
    import json

    cfg, device = setup(args)
    _, engine = build_engine(cfg, device, compile_model=True)
    views = host_batch(args.batch, cfg.model.img_size, device, cfg.seed)
    t0 = time.perf_counter()
    run_steps(engine, views, 1)
    sync(device)
    first_s = time.perf_counter() - t0
    timing = time_steps(engine, views, device, args.warmup, args.steps)
    breakdown = profile_breakdown(engine, views, device, steps=min(3, args.steps))
    print("COMPILE_RESULT " + json.dumps({"first_step_s": first_s, **timing, "breakdown": breakdown}), flush=True)


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
    parser.add_argument("--batches", default=None, help="per-GPU batches to try, comma-separated (default 64,128,256)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per phase (default 5, tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps of the throughput phase (default 20)")
    parser.add_argument("--loader-steps", type=int, default=None, help="timed steps of the loader phases (default 100)")
    parser.add_argument("--volumes", type=int, default=32, help="synthetic encoded volumes in the loader's dataset")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default min(16, cpus) - 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: by card)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; phases that would overrun are skipped")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile phase")
    parser.add_argument("--catalog", default=None, help="catalog URI for the Ray Data phase (skipped without one)")
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
    batches = [int(b) for b in (args.batches or ("16" if args.tiny else "64,128,256")).split(",")]
    loader_steps = args.loader_steps if args.loader_steps is not None else (args.steps if args.tiny else 100)
    cpus = os.cpu_count() or 1
    workers = args.workers if args.workers is not None else max(0, min(16, cpus) - 1)
    gpu_name, peak, peak_from = card_peak(device, args.peak_tflops)
    precision = cfg.pretrain.precision if device.type == "cuda" else "fp32"
    label = "tiny 32³ ViT" if args.tiny else "ViT-B 96³"
    say(f"== SimCLR step benchmark: {label}, {precision}, augment on the worker ({device.type}), card: {gpu_name} ==")
    peak_text = f"{peak:.0f} TFLOP/s ({peak_from})" if peak else "n/a"
    say(f"   torch {torch.__version__}, python {sys.version.split()[0]}, {cpus} CPUs, budget {args.budget:.0f} s,"
        f" MFU peak {peak_text}")  # fmt: skip

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
    fused = bool(engine.optimizer.defaults.get("fused"))
    say(f"   model: {params / 1e6:.1f} M parameters (encoder + projection head), optimiser {cfg.optim.name}"
        f"{' (fused)' if fused else ''}; input: pinned host float16 crops copied every step")  # fmt: skip

    # 1. eager throughput: host crops → side-stream copy + augmentation → step, no per-step sync
    results: dict[int, dict[str, float]] = {}
    for batch in batches:
        if time.perf_counter() > deadline - 60:
            say(f"[eager] B={batch}: skipped (time budget)")
            continue
        try:
            views = host_batch(batch, size, device, cfg.seed)
            timing = time_steps(engine, views, device, args.warmup, args.steps)
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        except torch.OutOfMemoryError:
            engine.optimizer.zero_grad(set_to_none=True)
            engine._micro, engine._acc = 0, []
            views = None
            gc.collect()
            torch.cuda.empty_cache()
            say(f"[eager] B={batch}: out of memory")
            continue
        results[batch] = {**timing, "mem_gib": mem}
        say(f"[eager] B={batch}: {batch / timing['step_s']:8.1f} pairs/s  step {1e3 * timing['step_s']:.1f} ms"
            f"  peak mem {mem:.1f} GiB")  # fmt: skip
        del views
    if not results:
        say("no batch size fitted; nothing measured")
        sys.exit(1)
    best = max(results, key=lambda b: b / results[b]["step_s"])
    step_s = results[best]["step_s"]

    # 2. FLOPs of the model's forward+backward (both views) and MFU
    views = host_batch(best, size, device, cfg.seed)
    flops = count_model_flops(model, engine, views, device)

    def mfu(seconds: float) -> float | None:
        return flops / seconds / 1e12 / peak if peak and device.type == "cuda" else None

    say(f"[flops] B={best}: {_flops(flops)} per step (model fwd+bwd, both views; augmentation not counted),"
        f" eager {_flops(flops / step_s)}/s")  # fmt: skip

    # 3. where an eager step's time goes
    eager_breakdown = profile_breakdown(engine, views, device, steps=min(3, args.steps))
    say(f"[profile eager] B={best}: {breakdown_line(eager_breakdown)}")
    del views

    # 4. data wait with the CPU loader, then with the Ray Data stream
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
    ray_result = None
    if time.perf_counter() < deadline - 60:
        ray_result = ray_phase(args, cfg, engine, device, best, say)
        if ray_result:
            say(f"[ray] B={best}: {ray_result['samples_per_s']:.1f} pairs/s, step {1e3 * ray_result['step_s']:.1f} ms,"
                f" data-wait fraction {100 * ray_result['wait_fraction']:.1f}%"
                f" (second half {100 * ray_result['wait_fraction_late']:.1f}%)")  # fmt: skip
    else:
        say("[ray] skipped (time budget)")

    # 5. torch.compile, in a child process with its own deadline
    compiled = None
    left = deadline - time.perf_counter()
    if args.no_compile or (args.tiny and not args.compile_on_cpu):
        compile_note = (
            "not run (--no-compile)" if args.no_compile else "not run (tiny/CPU mode: --compile-on-cpu runs it)"
        )
    elif left < 90:
        compile_note = f"skipped ({left:.0f} s left of the budget)"
    else:
        import json

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
            compiled = json.loads(line.split(" ", 1)[1])
            compile_note = ""
            say(f"[compiled] B={best}: {best / compiled['step_s']:8.1f} pairs/s  step {1e3 * compiled['step_s']:.1f} ms"
                f"  first step (compile) {compiled['first_step_s']:.0f} s")  # fmt: skip
            say(f"[profile compiled] B={best}: {breakdown_line(compiled['breakdown'])}")
    if compiled:
        eager_rate, comp_rate = best / step_s, best / compiled["step_s"]
        compile_note = f"{comp_rate / eager_rate:.2f}x eager, first compiled step {compiled['first_step_s']:.0f} s"
    say(f"[compile] {compile_note}")

    def row(name: str, value: str) -> None:
        say(f"{name:<52}: {value}")

    def pct(x: float | None) -> str:
        return f"{100 * x:.1f}%" if x is not None else "n/a (CPU)"

    say()
    say(f"==== SUMMARY: {label}, {precision}, batched augmentation on {device.type}, {gpu_name} ====")
    row("card / MFU peak", f"{gpu_name} / {peak_text}")
    for b, r in sorted(results.items()):
        row(
            f"eager pairs/s at B={b}",
            f"{b / r['step_s']:.1f}  (step {1e3 * r['step_s']:.1f} ms, MFU {pct(mfu(r['step_s']))})",
        )
    row("model FLOPs per step (fwd+bwd, both views)", f"{_flops(flops)} at B={best} ({_flops(flops / best)} per pair)")
    row(f"eager: pairs/s, MFU (B={best})", f"{best / step_s:.1f}, {pct(mfu(step_s))}")
    row("eager step breakdown", breakdown_line(eager_breakdown))
    if compiled:
        row(f"compiled: pairs/s, MFU (B={best})", f"{best / compiled['step_s']:.1f}, {pct(mfu(compiled['step_s']))}")
        row("compiled step breakdown", breakdown_line(compiled["breakdown"]))
    row("torch.compile", compile_note or "see above")
    if loader:
        row(f"CPU DataLoader ({workers} workers): pairs/s", f"{loader['samples_per_s']:.1f}")
        row(f"CPU DataLoader data-wait fraction ({loader_steps} steps)",
            f"{100 * loader['wait_fraction']:.1f}%  (second half {100 * loader['wait_fraction_late']:.1f}%)")  # fmt: skip
    if ray_result:
        row("Ray Data stream: pairs/s", f"{ray_result['samples_per_s']:.1f}")
        row("Ray Data stream: data-wait fraction",
            f"{100 * ray_result['wait_fraction']:.1f}%  (second half {100 * ray_result['wait_fraction_late']:.1f}%)")  # fmt: skip
    else:
        row("Ray Data stream", "not measured (see [ray] above)")
    row("wall time", f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
