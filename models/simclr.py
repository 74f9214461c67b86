"""The SimCLR training step, independent of how it is launched: encoder + projection head, optimiser, schedule, step.

One :class:`SimCLRStep` is used by the Ray Train loop, the plain DDP baseline of ``bench/train_overhead.py`` and the GPU
benchmark, so what is measured is what trains. It takes two batches of crops (B, 1, D, H, W), augments them on the
worker's device when ``augment.device == "worker"`` (so CPUs only decode and crop), runs both views through the model
under bf16 autocast on GPU, and steps the optimiser every ``grad_accum_steps`` micro-steps (DDP gradient sync only on
the last one).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from brainiac.models.augment import BatchedViewAugment
from brainiac.models.backbones import Encoder, build_backbone
from brainiac.models.config import AugmentConfig, BackboneConfig, ProjectionConfig, SSLConfig
from brainiac.models.ssl import NTXentLoss, ProjectionHead, positive_pair_top1
from brainiac.models.train_config import OptimConfig

__all__ = ["LARS", "PreparedViews", "SimCLRModel", "SimCLRStep", "StepResult", "build_optimizer", "warmup_cosine"]


class SimCLRModel(nn.Module):
    """Encoder f(·) and projection head g(·); ``forward`` returns g(f(x)), ``encoder`` is what downstream tasks use."""

    def __init__(self, backbone: BackboneConfig, projection: ProjectionConfig) -> None:
        super().__init__()
        self.encoder: Encoder = build_backbone(backbone)
        self.head = ProjectionHead(self.encoder.feature_dim, projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: matrices and kernels decay; biases, norm weights, tokens and embeddings do not."""
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if p.ndim <= 1 or "token" in name or "position" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": plain, "weight_decay": 0.0, "lars_adapt": False},
    ]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) over SGD with momentum, as SimCLR trains with large batches.

    Each adapted parameter's step is scaled by ``trust_coefficient · ‖w‖ / (‖g‖ + wd·‖w‖)``; groups with
    ``lars_adapt=False`` (biases, norm weights) take plain SGD steps without weight decay.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
        }
        defaults["lars_adapt"] = True
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["lars_adapt"]:
                    w_norm, g_norm = torch.norm(p), torch.norm(grad)
                    if group["weight_decay"]:
                        grad = grad.add(p, alpha=group["weight_decay"])
                    denom = g_norm + group["weight_decay"] * w_norm
                    trust = torch.where(
                        (w_norm > 0) & (denom > 0), group["trust_coefficient"] * w_norm / denom, torch.ones_like(w_norm)
                    )
                    grad = grad.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, global_batch: int | None = None, fused: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW or LARS over ``model``'s trainable parameters, without weight decay on biases and norms, at peak rate
    ``cfg.peak_lr(global_batch)`` (``global_batch`` is needed when the config gives a per-256 rate).

    ``fused``: AdamW's single-kernel CUDA implementation (one launch for all parameters instead of a few per tensor);
    ``None`` = when every trainable parameter is on a CUDA device. Same update as the default implementation.
    """
    groups = _decay_groups(model, cfg.weight_decay)
    lr = cfg.peak_lr(global_batch)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    for g in groups:
        g.pop("lars_adapt")
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_cuda for p in params)
    beta1, beta2 = cfg.betas
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), **({"fused": True} if fused else {}))


def warmup_cosine(cfg: OptimConfig, total_steps: int):
    """LR multiplier for step s: linear 0→1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class StepResult:
    """What one optimiser step reports (means over its micro-steps).

    ``loss`` and ``top1`` are floats, or 0-d tensors on the device when the step ran with ``sync=False`` (call
    ``float()`` on them when the numbers are needed: that waits for the device once).
    """

    loss: float | torch.Tensor
    top1: float | torch.Tensor
    lr: float
    samples: int
    compute_s: float


@dataclass
class PreparedViews:
    """Both views of one micro-batch on the device, augmented and concatenated: ``x`` is (2B, C, D, H, W), view 1
    first. ``ready`` is the side stream's event the training stream waits on (``None`` off CUDA)."""

    x: torch.Tensor
    pairs: int
    ready: torch.cuda.Event | None = None


class SimCLRStep:
    """One optimiser step of SimCLR: worker-side augmentation, forward of both views, NT-Xent, accumulation, update.

    On CUDA the step avoids waiting for the device: the augmentation never synchronises, the losses stay on the device
    unless ``sync=True`` asks for them, AdamW is fused and the model runs under
    ``torch.compile``. :meth:`prepare` copies and augments a batch on a side CUDA stream, so the next batch's
    augmentation overlaps the current step's compute when the caller prepares it before stepping.

    Args:
        model: the :class:`SimCLRModel`, possibly wrapped in DDP (``no_sync`` is used between micro-steps).
        ssl: temperature and cross-rank gathering of negatives.
        optim: optimiser and schedule.
        augment: per-view augmentation; applied here only when ``augment.device == "worker"``.
        total_steps: length of the schedule.
        device: where the batch and model live.
        precision: ``bf16`` autocast on CUDA, fp32 elsewhere.
        grad_accum_steps: micro-steps per optimiser step.
        global_batch: pairs per optimiser step over all workers; scales ``optim.base_lr_per_256`` (needed then).
        compile: ``torch.compile`` the model's forward (and so its backward); ``None`` = on CUDA only.
        compile_backend: the ``torch.compile`` backend (``inductor``; ``aot_eager`` checks the tracing cheaply).
        compile_mode: the ``torch.compile`` mode (``None`` = default; ``max-autotune-no-cudagraphs`` searches GEMMs).
    """

    def __init__(
        self,
        model: nn.Module,
        ssl: SSLConfig,
        optim: OptimConfig,
        augment: AugmentConfig,
        total_steps: int,
        device: torch.device,
        precision: str = "fp32",
        grad_accum_steps: int = 1,
        global_batch: int | None = None,
        compile: bool | None = None,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
    ) -> None:
        self.model, self.device = model, device
        cuda = device.type == "cuda"
        self.loss_fn = NTXentLoss.from_config(ssl)
        self.optimizer = build_optimizer(model, optim, global_batch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(optim, total_steps))
        self.augment = BatchedViewAugment(augment) if augment.device == "worker" else None
        self.autocast = cuda and precision == "bf16"
        self.grad_accum_steps = grad_accum_steps
        self.grad_clip = optim.grad_clip
        self.generator = torch.Generator(device=device)
        self.compiled = cuda if compile is None else bool(compile)
        self.run_model = (
            torch.compile(model, dynamic=False, backend=compile_backend, mode=compile_mode) if self.compiled else model
        )
        self._side = torch.cuda.Stream(device) if cuda else None
        self._micro = 0
        self._acc: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def _views(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Both views on the device, augmented, as one (2B, ...) batch in the dtype the model consumes."""
        with record_function("simclr.augment"):
            return self._augmented(first, second)

    def _augmented(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        first = first.to(self.device, non_blocking=True).float()
        second = second.to(self.device, non_blocking=True).float()
        if self.augment is not None:
            first, second = self.augment.pair(first, second, generator=self.generator)
        # Under bf16 autocast the first matmul would cast the input anyway; casting here halves the concatenation.
        return torch.cat([first, second]).to(torch.bfloat16 if self.autocast else torch.float32)

    def prepare(self, first: torch.Tensor, second: torch.Tensor) -> PreparedViews:
        """Copy a micro-batch's two crop batches (B, C, D, H, W) to the device and augment them.

        On CUDA the work is queued on a side stream and nothing waits for it here: called for the next batch before
        :meth:`micro_step` of the current one returns to the device, its copy and augmentation run beside the current
        step. Pass host tensors in pinned memory for asynchronous copies. Elsewhere it runs inline.
        """
        if self._side is None:
            return PreparedViews(self._views(first, second), len(first))
        main = torch.cuda.current_stream(self.device)
        if first.device.type == "cuda" or second.device.type == "cuda":
            self._side.wait_stream(main)  # inputs already on the device may still be written by queued work
        with torch.cuda.stream(self._side):
            x = self._views(first, second)
            ready = torch.cuda.Event()
            ready.record(self._side)
        return PreparedViews(x, len(first), ready)

    def _take(self, views: PreparedViews) -> torch.Tensor:
        if views.ready is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(views.ready)
            views.x.record_stream(main)  # allocated on the side stream, used (and freed) on this one
        return views.x

    def micro_step(
        self, first: torch.Tensor | PreparedViews, second: torch.Tensor | None = None, *, sync: bool = True
    ) -> StepResult | None:
        """Forward and backward one micro-batch; returns a :class:`StepResult` when it completed an optimiser step.

        Args:
            first: the first views' crops (B, C, D, H, W), or a :class:`PreparedViews` from :meth:`prepare` (then
                ``second`` is not given).
            second: the second views' crops.
            sync: report the step's loss and top-1 as floats (one wait for the device per optimiser step). With
                ``False`` they stay 0-d device tensors and the host runs ahead of the device: pass ``True`` only on
                the steps whose numbers are logged.
        """
        start = time.perf_counter()
        self.model.train()
        if not isinstance(first, PreparedViews):
            if second is None:
                raise ValueError("micro_step needs both views' crops, or one PreparedViews")
            first = self.prepare(first, second)
        x, pairs = self._take(first), first.pairs
        last = self._micro + 1 == self.grad_accum_steps
        model_no_sync = getattr(self.model, "no_sync", None)  # DistributedDataParallel's
        no_sync = nullcontext() if last or model_no_sync is None else model_no_sync()
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()
        with no_sync:
            with record_function("simclr.forward"):
                with amp:
                    z = self.run_model(x)
                z1, z2 = z.float().chunk(2)  # NT-Xent in fp32, outside autocast
                loss = self.loss_fn(z1, z2)
            with record_function("simclr.backward"):
                (loss / self.grad_accum_steps).backward()
        # Kept on the device: a float() here would make the host wait for the device every micro-step.
        self._acc.append((loss.detach(), positive_pair_top1(z1.detach(), z2.detach()), pairs))
        self._micro += 1
        if not last:
            return None
        lr = self.optimizer.param_groups[0]["lr"]
        with record_function("simclr.optimizer"):
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        losses, tops, sizes = zip(*self._acc, strict=True)
        self._micro, self._acc = 0, []
        n = sum(sizes)
        means = torch.stack([sum(v * (s / n) for v, s in zip(vals, sizes, strict=True)) for vals in (losses, tops)])
        if sync:
            loss_mean, top1_mean = means.tolist()  # the one wait for the device
        else:
            loss_mean, top1_mean = means[0], means[1]
        return StepResult(loss=loss_mean, top1=top1_mean, lr=lr, samples=n, compute_s=time.perf_counter() - start)

    def state_dict(self) -> dict:
        """Optimiser, scheduler and augmentation-generator state (the model's weights are saved by the caller)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
