"""SimCLR pieces (Chen et al. 2020): projection head, NT-Xent with cross-rank negatives, and retrieval accuracy.

The training step the pretraining job runs is::

    h1, h2 = encoder(view1), encoder(view2)            # (B, D) features, kept for downstream tasks
    z1, z2 = head(h1), head(h2)                        # (B, out_dim), used only by the loss
    loss = NTXentLoss(temperature, gather_distributed=True)(z1, z2)

With ``gather_distributed`` every rank contrasts its 2B anchors against the 2·world·B embeddings of all ranks. The
gather's backward sums gradients across ranks, so when each rank's loss is its local mean and DDP averages parameter
gradients, the update equals single-process training on the concatenated global batch (proved by
``tests/models/test_ssl_distributed.py``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from brainiac.models.config import ProjectionConfig, SSLConfig

__all__ = [
    "NTXentLoss",
    "ProjectionHead",
    "gather_with_grad",
    "positive_pair_top1",
    "world_info",
]


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ProjectionHead(nn.Module):
    """SimCLR's projection head g(·): Linear → BN → ReLU (× num_layers − 1) → Linear (Chen et al. 2020, v2 for 3 layers).

    Its output feeds only the contrastive loss; downstream tasks use the encoder's features before the head.

    Args:
        in_dim: width of the encoder features.
        cfg: hidden width, output width, number of layers, whether to use BatchNorm.

    Raises:
        ValueError: ``in_dim`` < 1 or ``cfg.num_layers`` not 2 or 3.
    """

    def __init__(self, in_dim: int, cfg: ProjectionConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ProjectionConfig()
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {in_dim}")
        if cfg.num_layers not in (2, 3):
            raise ValueError(f"the projection head has 2 or 3 layers, got num_layers={cfg.num_layers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(cfg.num_layers - 1):
            layers.append(nn.Linear(width, cfg.hidden_dim, bias=not cfg.batch_norm))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm1d(cfg.hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = cfg.hidden_dim
        layers.append(nn.Linear(width, cfg.out_dim))
        self.mlp = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = cfg.out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) → (B, out_dim)."""
        if h.ndim != 2 or h.shape[1] != self.in_dim:
            raise ValueError(f"ProjectionHead expects input of shape (B, {self.in_dim}), got {tuple(h.shape)}")
        return self.mlp(h)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces (sums) the incoming gradients and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rank, world = dist.get_rank(), dist.get_world_size()
        return grad.chunk(world, dim=0)[rank]


def _check_equal_batches(x: torch.Tensor) -> None:
    """All ranks must gather the same shape; a mismatch would otherwise hang or silently misalign the positives."""
    shape = torch.tensor(list(x.shape), device=x.device, dtype=torch.long)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(
            f"gather_with_grad needs the same shape on every rank (drop the last incomplete batch); got "
            f"{[tuple(s.tolist()) for s in shapes]}"
        )


def gather_with_grad(tensor: torch.Tensor, check_shapes: bool = True) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping gradients exact across ranks.

    ::

        forward  (all_gather)                     backward (all_reduce SUM, keep own slice)

        rank 0:  x0 ─┐                            rank 0:  g0 = [g0|0 g0|1]  ─┐
                     ├─► [x0 ; x1] on every rank                              ├─► Σ = [g0|0+g1|0 ; g0|1+g1|1]
        rank 1:  x1 ─┘                            rank 1:  g1 = [g1|0 g1|1]  ─┘
                                                  rank 0 returns g0|0 + g1|0, rank 1 returns g0|1 + g1|1

    ``gr|s`` is the gradient that rank r's loss sends to rank s's block. Every rank's loss depends on every block, so
    the gradient of x_s is the sum over all ranks' losses (lightly, solo-learn and VISSL do the same). Plain
    ``dist.all_gather`` has no backward and would drop the terms from the other ranks.

    Args:
        tensor: (B, ...) the local block; B must be the same on every rank.
        check_shapes: first gather the shapes and fail clearly if they differ (one tiny extra collective).

    Returns:
        (world·B, ...) the blocks of ranks 0..world−1 in order; ``tensor`` itself when torch.distributed is not
        initialised or the world has one rank.

    Raises:
        ValueError: the ranks hold different shapes.
    """
    _, world = world_info()
    if world == 1:
        return tensor
    if check_shapes:
        _check_equal_batches(tensor)
    return _GatherWithGrad.apply(tensor.contiguous())


class NTXentLoss(nn.Module):
    """Normalized temperature-scaled cross-entropy loss of SimCLR (Chen et al. 2020, "A Simple Framework for
    Contrastive Learning of Visual Representations", eq. 1), with negatives from all ranks.

    For 2B local anchors (both views of B samples) and N = world·B samples overall, the logits are the
    2B × 2N cosine similarities / τ against ``[z1 of all ranks ; z2 of all ranks]``. Anchor i of view 1 on rank r has
    its positive at column N + r·B + i and itself (masked out) at column r·B + i; view 2 mirrors this. Each anchor thus
    sees 1 positive and 2N − 2 negatives.

    Args:
        temperature: τ > 0 (SimCLR: 0.1 for large batches, 0.5 for small ones).
        gather_distributed: contrast against the embeddings of every rank (identity when torch.distributed is not
            initialised). The per-rank loss is the mean over local anchors; average it across ranks (DDP does so for
            the gradients) to get the global-batch loss.
        reduction: ``mean`` over the 2B local anchors, ``sum``, or ``none`` (a (2B,) tensor: view-1 anchors first).

    Raises:
        ValueError: temperature not a finite number > 0, an unknown reduction, or ``gather_distributed`` without
            torch.distributed support.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        gather_distributed: bool = False,
        reduction: Literal["mean", "sum", "none"] = "mean",
    ) -> None:
        super().__init__()
        if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this torch build lacks")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed
        self.reduction = reduction

    @classmethod
    def from_config(cls, cfg: SSLConfig) -> NTXentLoss:
        """The loss an :class:`SSLConfig` describes."""
        return cls(temperature=cfg.temperature, gather_distributed=cfg.gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Loss for the embeddings of view 1 and view 2 of the same B samples.

        Args:
            z1: (B, D) embeddings of the first views.
            z2: (B, D) embeddings of the second views; row i is the positive of ``z1[i]``.

        Raises:
            ValueError: ``z1``/``z2`` not 2-D, of different shapes, or empty.
        """
        if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
            raise ValueError(
                f"NTXentLoss expects z1 and z2 of the same shape (B, D) with B >= 1, got {tuple(z1.shape)} and "
                f"{tuple(z2.shape)}"
            )
        if z1.dtype in (torch.float16, torch.bfloat16):  # the softmax over 2N columns wants fp32 under autocast
            z1, z2 = z1.float(), z2.float()
        z1 = F.normalize(z1, dim=1)
        z2 = F.normalize(z2, dim=1)
        batch = z1.shape[0]
        rank = 0
        all1, all2 = z1, z2
        if self.gather_distributed:
            rank, world = world_info()
            if world > 1:  # one gather for both views: (B, 2D) per rank → (N, 2D)
                both = gather_with_grad(torch.cat([z1, z2], dim=1))
                all1, all2 = both.split(z1.shape[1], dim=1)
        n = all1.shape[0]

        anchors = torch.cat([z1, z2], dim=0)  # (2B, D)
        candidates = torch.cat([all1, all2], dim=0)  # (2N, D)
        logits = anchors @ candidates.T / self.temperature  # (2B, 2N)

        local = torch.arange(batch, device=z1.device) + rank * batch  # this rank's samples among the N
        self_cols = torch.cat([local, local + n])
        pos_cols = torch.cat([local + n, local])
        rows = torch.arange(2 * batch, device=z1.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, self_cols] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        return F.cross_entropy(logits, pos_cols, reduction=self.reduction)


@torch.no_grad()
def positive_pair_top1(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Fraction of rows i whose nearest neighbour (cosine) among the rows of ``z2`` is ``z2[i]``, its own pair.

    The learning signal of contrastive pretraining: chance level is 1/B, a trained encoder approaches 1. Computed on the
    tensors given (gather them first for a global figure); works for encoder features and projections alike.

    Args:
        z1: (B, D) embeddings of the first views.
        z2: (B, D) embeddings of the second views.

    Returns:
        A 0-d float tensor in [0, 1].

    Raises:
        ValueError: the shapes are not equal (B, D) with B >= 1.
    """
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
        raise ValueError(
            f"positive_pair_top1 expects z1 and z2 of the same shape (B, D) with B >= 1, got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}"
        )
    sim = F.normalize(z1.float(), dim=1) @ F.normalize(z2.float(), dim=1).T
    target = torch.arange(z1.shape[0], device=z1.device)
    return (sim.argmax(dim=1) == target).float().mean()
