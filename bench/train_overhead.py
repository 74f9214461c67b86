"""Step time of the Ray Train loop (2 CPU workers) next to a plain torch.distributed DDP gloo loop, as a ratio.

Both sides run the same thing per worker: the tiny config's :class:`~brainiac.models.simclr.SimCLRModel` wrapped in
DDP (by ``ray.train.torch.prepare_model`` on the Ray side, by ``DistributedDataParallel`` on the other), the same
:class:`~brainiac.models.simclr.SimCLRStep` (worker-side augmentation, NT-Xent with negatives gathered across ranks,
AdamW), the same per-worker batch of in-memory random float16 crops, ``torch.set_num_threads(1)``. No data pipeline on
either side, so only the training loop and its launcher are compared. Each side times every optimiser step on rank 0
after warm-up; the figure is the median. Target: Ray / DDP <= 1.15x.

    .venv/bin/python bench/train_overhead.py [--batch 8] [--steps 30] [--warmup 5] [--rounds 1]

With ``--rounds N`` the two sides alternate N times (DDP, Ray, DDP, Ray, ...) and each side's best median is kept,
since a neighbour's load on a shared machine only ever makes a round slower.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

for _key, _value in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_V2_ENABLED": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from brainiac.jobs.config import Config, load_config  # noqa: E402
from brainiac.models.simclr import SimCLRModel, SimCLRStep  # noqa: E402
from brainiac.platform.config import config_to_dict, from_dict  # noqa: E402

WORKERS = 2


def timed_steps(engine: SimCLRStep, batch: int, size: int, warmup: int, steps: int, seed: int) -> list[float]:
    """Seconds of each optimiser step after ``warmup`` steps, on one fixed in-memory batch of float16 crop pairs."""
    g = torch.Generator().manual_seed(seed)
    first = torch.rand(batch, 1, size, size, size, generator=g).to(torch.float16)
    second = torch.rand(batch, 1, size, size, size, generator=g).to(torch.float16)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        engine.micro_step(first, second)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def build_engine(cfg: Config, wrap, rank: int) -> SimCLRStep:
    """The model as every rank builds it (same seed), wrapped by ``wrap`` (DDP one way or the other), and its step."""
    torch.manual_seed(cfg.seed)
    model = SimCLRModel(cfg.model, cfg.projection)
    engine = SimCLRStep(
        wrap(model), cfg.ssl, cfg.optim, cfg.augment, cfg.pretrain.max_steps, torch.device("cpu"), "fp32", 1
    )
    engine.generator.manual_seed(cfg.seed * 7919 + rank)
    return engine


# -- plain DDP ---------------------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, port: int, params: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    try:
        cfg = from_dict(Config, params["config"])
        engine = build_engine(cfg, DistributedDataParallel, rank)
        times = timed_steps(engine, params["batch"], cfg.model.img_size, params["warmup"], params["steps"], rank)
        if rank == 0:
            Path(out).write_text(json.dumps(times))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(params: dict) -> list[float]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        mp.spawn(_ddp_worker, args=(_free_port(), params, out), nprocs=WORKERS, join=True)
        return json.loads(Path(out).read_text())


# -- Ray Train ---------------------------------------------------------------------------------------------------------


def _ray_worker(params: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    cfg = from_dict(Config, params["config"])
    engine = build_engine(cfg, ray.train.torch.prepare_model, rank)
    times = timed_steps(engine, params["batch"], cfg.model.img_size, params["warmup"], params["steps"], rank)
    if rank == 0:  # Train v2 keeps reported metrics only with checkpoints; a file on this one machine is simpler
        Path(params["out"]).write_text(json.dumps(times))
    ray.train.report({"rank": rank, "steps": len(times)})


def run_ray(params: dict, storage: str, name: str) -> list[float]:
    import ray.train
    from ray.train.torch import TorchTrainer

    out = Path(storage) / f"{name}.json"
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={**params, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=WORKERS, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, logging_config=ray.train.LoggingConfig(log_level="WARNING")
        ),
    )
    trainer.fit()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="view pairs per worker per step (both sides)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="alternating DDP/Ray rounds; best median per side kept")
    args = parser.parse_args()

    cfg = load_config("pretrain/tiny")
    params = {
        "config": config_to_dict(cfg, redact=False),
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    m = cfg.model
    print(
        f"SimCLR step, {m.kind} {m.img_size}³ hidden {m.hidden_size} x{m.num_layers} (pretrain/tiny), {WORKERS} CPU"
        f" workers x 1 thread, batch {args.batch} pairs/worker, augment on {cfg.augment.device},"
        f" median of {args.steps} steps after {args.warmup} warm-up",
        flush=True,
    )

    import ray

    started = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ddp_medians, ray_medians, ddp_mins, ray_mins = [], [], [], []
    try:
        with tempfile.TemporaryDirectory() as storage:
            for r in range(args.rounds):
                t0 = time.perf_counter()
                ddp_times = run_ddp(params)
                ddp, ddp_mins_r = statistics.median(ddp_times), min(ddp_times)
                t1 = time.perf_counter()
                print(f"  round {r + 1}: DDP {1e3 * ddp:.1f} ms/step ({t1 - t0:.0f} s incl. start)", flush=True)
                ray_times = run_ray(params, storage, f"train-overhead-{r}")
                ray_, ray_mins_r = statistics.median(ray_times), min(ray_times)
                t2 = time.perf_counter()
                ddp_medians.append(ddp)
                ray_medians.append(ray_)
                ddp_mins.append(ddp_mins_r)
                ray_mins.append(ray_mins_r)
                print(
                    f"  round {r + 1}: Ray Train {1e3 * ray_:.1f} ms/step ({t2 - t1:.0f} s incl. start),"
                    f" ratio {ray_ / ddp:.3f}x",
                    flush=True,
                )
    finally:
        ray.shutdown()
    ddp, ray_ = min(ddp_medians), min(ray_medians)
    ratio = ray_ / ddp
    verdict = "within" if ratio <= 1.15 else "ABOVE"
    rows = [
        (f"plain DDP gloo (torch.multiprocessing, {WORKERS} procs), median", f"{1e3 * ddp:8.1f} ms/step"),
        (f"Ray Train TorchTrainer ({WORKERS} CPU workers), median", f"{1e3 * ray_:8.1f} ms/step"),
        ("ratio Ray / DDP (medians)", f"{ratio:8.3f}x  ({verdict} the 1.15x target)"),
        (
            "fastest step: DDP / Ray Train / ratio",
            f"{1e3 * min(ddp_mins):8.1f} / {1e3 * min(ray_mins):.1f} ms / {min(ray_mins) / min(ddp_mins):.3f}x"
            "  (less sensitive to a neighbour's load)",
        ),
        ("wall time", f"{time.perf_counter() - started:8.0f} s"),
    ]
    print()
    for name, value in rows:
        print(f"{name:<58}: {value}")


if __name__ == "__main__":
    main()
