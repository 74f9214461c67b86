"""The one fine-tuning engine: train a task model for one hyperparameter config and seed, score it, predict with it.

Driven entirely by the :class:`~brainiac.models.tasks.spec.TaskSpec`: the spec decides the head (linear or UNETR),
the loss, how targets are scaled and which metrics are computed. :func:`train_trial` is what every Ray Train worker of
a Tune trial runs; :func:`predict` and :func:`score` are shared with ``brainiac evaluate``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainiac.models.config import AugmentConfig, BackboneConfig
from brainiac.models.tasks.model import build_task_model, parameter_groups
from brainiac.models.tasks.spec import TaskSpec

__all__ = ["FitResult", "TargetScale", "predict", "score", "survival_pairs", "train_trial"]


@dataclass(frozen=True)
class TargetScale:
    """Regression targets are trained standardised (train-split mean and std) and predicted back in the spec's units."""

    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, spec: TaskSpec, targets: np.ndarray) -> TargetScale:
        if spec.kind != "regression" or len(targets) == 0:
            return cls()
        std = float(np.std(targets))
        return cls(float(np.mean(targets)), std if std > 1e-6 else 1.0)


def finetune_augment() -> AugmentConfig:
    """BrainIAC's fine-tuning augmentation: affine, flip, smoothing, noise, contrast (no bias field, Gibbs or dropout)."""
    return AugmentConfig(
        affine_p=0.5, rotate_deg=10.0, scale=0.1, flip_p=0.5, gamma_p=0.3, contrast_p=0.3, smooth_p=0.2, noise_p=0.3,
        bias_field_p=0.0, gibbs_p=0.0, dropout_p=0.0,
    )  # fmt: skip


def _augment_segmentation(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips applied to image and mask alike (a mask is only ever moved by whole voxels: nearest-neighbour), then
    intensity changes (contrast, noise) on the image alone."""
    for axis in (2, 3, 4):  # spatial axes of the image (b, C, D, H, W); the mask (b, D, H, W) has them one lower
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        if flip.any():
            x[flip] = x[flip].flip(axis)
            y[flip] = y[flip].flip(axis - 1)
    scale = 1 + 0.2 * (torch.rand(x.shape[0], 1, 1, 1, 1, generator=g) - 0.5)
    return x * scale + 0.05 * torch.randn(x.shape, generator=g), y


def survival_pairs(raw: np.ndarray | torch.Tensor) -> tuple[Any, Any]:
    """(time, event) columns of a survival task's ``raw`` (n, 2), as :class:`~brainiac.jobs.finetune.data.TaskData`
    holds it. A 1-D ``raw`` is refused: it carries no censoring, and reading every case as an event would bias both the
    Cox loss and the C-index towards the patients who died.

    Raises:
        ValueError: ``raw`` is not (n, 2).
    """
    if raw.ndim != 2 or raw.shape[1] != 2:
        raise ValueError(f"survival raw must be (n, 2) of (time, event), got shape {tuple(raw.shape)}")
    return raw[:, 0], raw[:, 1]


def _loss_fn(spec: TaskSpec) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if spec.loss == "ce":
        return lambda out, y, raw: F.cross_entropy(out, y.long())
    if spec.loss == "bce":
        return lambda out, y, raw: F.binary_cross_entropy_with_logits(out.squeeze(1), y.float())
    if spec.loss == "l1":
        return lambda out, y, raw: F.l1_loss(out.squeeze(1), y.float())
    if spec.loss == "mse":
        return lambda out, y, raw: F.mse_loss(out.squeeze(1), y.float())
    if spec.loss == "cox":
        from brainiac.models.tasks.losses import cox_partial_likelihood_loss

        def cox(out: torch.Tensor, y: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
            time, event = survival_pairs(raw)
            return cox_partial_likelihood_loss(out.squeeze(1), torch.as_tensor(time), torch.as_tensor(event))

        return cox
    if spec.loss == "dice_bce":
        from monai.losses import DiceCELoss

        dice_ce = DiceCELoss(sigmoid=True)
        return lambda out, y, raw: dice_ce(out, y.unsqueeze(1).float())
    raise ValueError(f"unknown loss {spec.loss!r}")


@torch.no_grad()
def predict(
    model: nn.Module, spec: TaskSpec, inputs: np.ndarray, scale: TargetScale, batch_size: int = 8
) -> np.ndarray:
    """Predictions in the spec's terms: class probabilities (n, k), P(positive) (n,), values in ``spec.units`` (n,),
    or foreground probabilities (n, D, H, W).

    A Cox model's output is a log hazard ratio (higher = shorter survival), while the survival task's positive class
    is *long* survival: its prediction is ``sigmoid(-risk)``, a score ordered like P(survival > threshold) (not a
    calibrated probability: the baseline hazard is not modelled). Every survival model thus predicts in one direction,
    and AUC, C-index, Tune's selection and promotion read them alike."""
    model.eval()
    outs = []
    for start in range(0, len(inputs), batch_size):
        x = torch.as_tensor(inputs[start : start + batch_size]).float()
        out = model(x)
        if spec.kind == "multiclass":
            outs.append(out.softmax(dim=1))
        elif spec.kind == "binary":
            outs.append((-out.squeeze(1) if spec.loss == "cox" else out.squeeze(1)).sigmoid())
        elif spec.kind == "regression":
            outs.append(out.squeeze(1) * scale.std + scale.mean)
        else:
            outs.append(out.squeeze(1).sigmoid())
    return torch.cat(outs).numpy() if outs else np.zeros((0,))


def score(spec: TaskSpec, predictions: np.ndarray, targets: np.ndarray, raw: np.ndarray) -> dict[str, float]:
    """The spec's metrics for predictions against targets (NaN where a metric is undefined, e.g. AUC of one class).

    Survival: ``predictions`` score long survival (see :func:`predict`), so the risk of Harrell's C-index is their
    negation, and ``raw`` (n, 2) gives each case's time and whether the death was observed: censored cases count only
    in pairs where they outlived an observed death. AUC and F1 use the cases with a class (those censored before the
    threshold, NaN targets, have none).
    """
    from brainiac.models.tasks import metrics as M

    out: dict[str, float] = {}
    if len(targets) == 0:
        return {m: math.nan for m in spec.metrics}
    binary_t, binary_p = targets, predictions
    if spec.kind == "binary":  # the C-index below keeps every case
        known = np.isfinite(targets)
        binary_t, binary_p = targets[known], predictions[known]
    for name in spec.metrics:
        if name == "balanced_accuracy":
            out[name] = M.balanced_accuracy(targets, predictions.argmax(axis=1))
        elif name == "macro_auc":
            out[name] = M.macro_auc(targets, predictions)
        elif name == "auc":
            out[name] = M.auc(binary_t, binary_p)
        elif name == "f1":
            out[name] = M.f1(binary_t, (binary_p > 0.5).astype(int))
        elif name == "c_index":  # risk = -score of long survival: higher risk, shorter time
            time, event = survival_pairs(np.asarray(raw, dtype=np.float64))
            out[name] = M.concordance_index(time, event, -np.asarray(predictions, dtype=np.float64))
        elif name == "mae":
            out[name] = M.mae(targets, predictions)
        elif name == "dice":
            out[name] = float(np.mean([M.dice(p > 0.5, t > 0) for p, t in zip(predictions, targets, strict=True)]))
        elif name == "hd95":
            values = [M.hd95(p > 0.5, t > 0) for p, t in zip(predictions, targets, strict=True)]
            finite = [v for v in values if np.isfinite(v)]
            out[name] = float(np.mean(finite)) if finite else math.nan
    return {k: float(v) for k, v in out.items()}


@dataclass
class FitResult:
    """A trained model with its history."""

    model: nn.Module
    scale: TargetScale
    history: list[dict[str, float]]


def train_trial(
    spec: TaskSpec,
    backbone: BackboneConfig,
    encoder_state: dict[str, torch.Tensor] | None,
    hp: dict[str, Any],
    data: dict[str, np.ndarray],
    *,
    strategy: str,
    max_epochs: int,
    batch_size: int,
    augment: bool,
    report: Callable[[dict[str, float], nn.Module, TargetScale], None] | None = None,
) -> FitResult:
    """Train one config on ``data`` (``train_x``, ``train_y``, ``train_raw``, ``val_x``, ``val_y``, ``val_raw``; a
    survival task's raw is (n, 2) of time and event, which the Cox loss reads).

    ``encoder_state`` holds the pretrained encoder's weights (``None`` for scratch); ``hp`` has ``lr``,
    ``weight_decay``, ``dropout``, ``encoder_lr_mult``, ``freeze_depth`` and ``seed``. ``report`` is called after
    every epoch with the epoch's metrics (``val_<metric>`` for each of the spec's metrics).
    """
    from brainiac.models.augment import BatchedViewAugment
    from brainiac.models.backbones import build_backbone

    seed = int(hp["seed"])
    torch.manual_seed(seed)
    encoder = None
    if strategy != "scratch":
        encoder = build_backbone(backbone)
        encoder.load_state_dict(encoder_state, strict=True)
    model = build_task_model(
        spec, backbone, encoder, strategy, dropout=float(hp["dropout"]), freeze_depth=int(hp["freeze_depth"])
    )
    groups = parameter_groups(model, float(hp["lr"]), float(hp["weight_decay"]), float(hp["encoder_lr_mult"]), strategy)
    optimizer = torch.optim.AdamW(groups)
    loss_fn = _loss_fn(spec)
    scale = TargetScale.fit(spec, data["train_y"])
    train_x = torch.as_tensor(data["train_x"])
    train_y = torch.as_tensor(data["train_y"])
    train_raw = torch.as_tensor(data["train_raw"]).float()
    if spec.kind == "regression":
        train_y = (train_y.float() - scale.mean) / scale.std
    generator = torch.Generator().manual_seed(seed)
    augmenter = BatchedViewAugment(finetune_augment()) if augment and spec.kind != "segmentation" else None
    history: list[dict[str, float]] = []
    n = len(train_x)
    for epoch in range(1, max_epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        losses = []
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if spec.kind != "segmentation" and len(idx) < 2 and n >= 2:
                continue  # BatchNorm-free heads tolerate 1, but a 1-case step is mostly noise
            x, y, raw = train_x[idx].float(), train_y[idx], train_raw[idx]
            if augmenter is not None:
                x = augmenter(x, generator=generator)
            elif augment and spec.kind == "segmentation":
                x, y = _augment_segmentation(x, y.clone(), generator)
            loss = loss_fn(model(x), y, raw)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        predictions = predict(model, spec, data["val_x"], scale, batch_size)
        val = score(spec, predictions, data["val_y"], data["val_raw"])
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else math.nan,
                   "epoch_s": time.perf_counter() - started, **{f"val_{k}": v for k, v in val.items()}}  # fmt: skip
        history.append(metrics)
        if report is not None:
            report(metrics, model, scale)
    return FitResult(model, scale, history)
