"""One rank of the 2-process NT-Xent gradient-equality test (imported by name in spawned children, so not a test file).

Each rank builds the same global batch from a fixed seed, keeps its half, runs a DDP-wrapped linear layer and the
gathered NT-Xent loss, and saves its loss and gradients for the parent test to compare against one process.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from brainiac.models.ssl import NTXentLoss, gather_with_grad, world_info

GLOBAL_BATCH = 8
IN_DIM = 12
OUT_DIM = 6
TEMPERATURE = 0.2


def make_problem() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """The global batch (two correlated views) and the initial linear layer, identical in every process."""
    gen = torch.Generator().manual_seed(1234)
    x1 = torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)
    x2 = x1 + 0.5 * torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)
    torch.manual_seed(99)
    layer = torch.nn.Linear(IN_DIM, OUT_DIM)
    return x1, x2, layer


def _naive_gather(z: torch.Tensor) -> torch.Tensor:
    """The common mistake: all_gather without backward; only the local block keeps its gradient."""
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.detach())
    parts[dist.get_rank()] = z
    return torch.cat(parts)


def _naive_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """NT-Xent over naively gathered candidates (same layout as NTXentLoss), for the negative control."""
    z1 = torch.nn.functional.normalize(z1, dim=1)
    z2 = torch.nn.functional.normalize(z2, dim=1)
    rank, _ = world_info()
    b = z1.shape[0]
    all1, all2 = _naive_gather(z1), _naive_gather(z2)
    n = all1.shape[0]
    logits = torch.cat([z1, z2]) @ torch.cat([all1, all2]).T / TEMPERATURE
    local = torch.arange(b) + rank * b
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[torch.arange(2 * b), torch.cat([local, local + n])] = True
    return torch.nn.functional.cross_entropy(logits.masked_fill(mask, float("-inf")), torch.cat([local + n, local]))


def _step(x1: torch.Tensor, x2: torch.Tensor, layer: torch.nn.Linear, loss_fn) -> dict[str, torch.Tensor]:
    x1 = x1.clone().requires_grad_(True)
    x2 = x2.clone().requires_grad_(True)
    model = DistributedDataParallel(layer)  # averages parameter gradients across ranks in backward
    z = model(torch.cat([x1, x2]))
    z1, z2 = z.chunk(2)
    loss = loss_fn(z1, z2)
    loss.backward()
    return {
        "loss": loss.detach(),
        "x1_grad": x1.grad.clone(),
        "x2_grad": x2.grad.clone(),
        "weight_grad": layer.weight.grad.clone(),
        "bias_grad": layer.bias.grad.clone(),
    }


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    """Entry point for ``torch.multiprocessing.spawn``: one rank's half of the batch, results to ``out_dir``."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x1, x2, layer = make_problem()
        b = GLOBAL_BATCH // world
        local = slice(rank * b, (rank + 1) * b)
        exact = _step(x1[local], x2[local], layer, NTXentLoss(TEMPERATURE, gather_distributed=True))
        _, _, layer = make_problem()
        naive = _step(x1[local], x2[local], layer, _naive_loss)
        try:  # ranks holding different batch sizes must fail clearly, on every rank, instead of hanging
            gather_with_grad(torch.zeros(2 + rank, OUT_DIM))
            mismatch = ""
        except ValueError as exc:
            mismatch = str(exc)
        torch.save({"exact": exact, "naive": naive, "mismatch": mismatch}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
