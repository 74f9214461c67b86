"""Views/s of the MONAI per-sample augmentation chain vs the batched torch path, measured in the same run.

Both paths apply the same steps with the same probabilities (``brainiac.models.config.AugmentConfig``) to 96³ float32
patches. The MONAI chain runs one view at a time, as it would inside a Ray Data ``map``; the batched path runs a
(B, 1, D, H, W) tensor at once, as it would on a training worker. On a machine with CUDA the batched path is also timed
on the GPU.

    .venv/bin/python bench/augment_throughput.py [--size 96] [--views 16] [--batch 8] [--threads 1] [--all-on]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from brainiac.models.augment import BatchedViewAugment, ViewAugment
from brainiac.models.config import AugmentConfig


def _config(all_on: bool) -> AugmentConfig:
    cfg = AugmentConfig()
    if not all_on:
        return cfg
    probs = {f.name: 1.0 for f in dataclasses.fields(cfg) if f.name.endswith("_p")}
    return dataclasses.replace(cfg, **probs)


def monai_views_per_s(cfg: AugmentConfig, size: int, views: int) -> float:
    rng = np.random.default_rng(0)
    patch = rng.standard_normal((1, size, size, size), dtype=np.float32)
    aug = ViewAugment(cfg, seed=0)
    aug(patch)  # build the chain, warm caches
    start = time.perf_counter()
    for _ in range(views):
        aug(patch)
    return views / (time.perf_counter() - start)


def batched_views_per_s(cfg: AugmentConfig, size: int, views: int, batch: int, device: str) -> float:
    x = torch.randn(batch, 1, size, size, size, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    aug = BatchedViewAugment(cfg)
    aug(x, gen)  # warm-up (kernels, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
    rounds = max(1, views // batch)
    start = time.perf_counter()
    for _ in range(rounds):
        aug(x, gen)
    if device == "cuda":
        torch.cuda.synchronize()
    return rounds * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="patch edge in voxels")
    parser.add_argument("--views", type=int, default=16, help="views timed per path")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the batched path")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both CPU paths")
    parser.add_argument("--all-on", action="store_true", help="every step with probability 1 (worst case)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = _config(args.all_on)
    label = "all steps" if args.all_on else "default probabilities"
    print(f"augmentation of {args.size}³ float32 views, {label}, {args.threads} CPU thread(s)")
    monai = monai_views_per_s(cfg, args.size, args.views)
    batched = batched_views_per_s(cfg, args.size, args.views, args.batch, "cpu")
    print(f"  MONAI per-sample chain (CPU)      {monai:8.1f} views/s")
    print(f"  batched torch, B={args.batch} (CPU)       {batched:8.1f} views/s   ratio {batched / monai:5.2f}×")
    if torch.cuda.is_available():
        gpu = batched_views_per_s(cfg, args.size, max(args.views, 64 * args.batch), 64, "cuda")
        print(f"  batched torch, B=64 ({torch.cuda.get_device_name()}) {gpu:8.1f} views/s   ratio {gpu / monai:5.1f}×")


if __name__ == "__main__":
    main()
