"""The one fine-tuning engine: train a task model for one hyperparameter config and seed, score it, predict with it.

Driven entirely by the :class:`~brainiac.models.tasks.spec.TaskSpec`: the spec decides the head (linear or UNETR),
the loss, how targets are scaled and which metrics are computed. :func:`train_trial` is what every Ray Train worker of
a Tune trial runs; it predicts and scores with :mod:`brainiac.models.tasks.inference`, as ``brainiac evaluate``,
``promote`` and ``predict`` do.

The strategies are trained on equal terms (#19, defect 7): every gradient-trained one follows the same warmup + cosine
schedule per optimiser step (:func:`lr_schedule`) from the same ``lr``; ``full`` adds layer-wise learning-rate decay
over the pretrained encoder (:func:`~brainiac.models.tasks.model.parameter_groups`); ``linear`` -- a frozen encoder --
is a probe solved to convergence on features computed once (:mod:`brainiac.models.tasks.probe`), not a head nudged by
a few dozen noisy steps. Class imbalance (defect 10): classification losses weight each class by its inverse frequency
in the training draw, and a binary task scored by F1 gets its decision threshold from validation (:func:`f1_threshold`),
folded into the head's bias so that every reader of the model (evaluate, promote, predict) thresholds at 0.5.
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
from brainiac.models.tasks.inference import TargetScale, predict, score, survival_pairs
from brainiac.models.tasks.model import TaskModel, build_task_model, parameter_groups
from brainiac.models.tasks.spec import TaskSpec

__all__ = [
    "FitResult", "TargetScale", "class_weights", "f1_threshold", "lr_schedule", "predict", "score", "survival_pairs",
    "train_trial",
]  # fmt: skip


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


def class_weights(spec: TaskSpec, targets: np.ndarray) -> np.ndarray | None:
    """Per-class loss weights ``n / (k · n_c)`` of the training draw (the "balanced" weights of King & Zeng 2001, as
    scikit-learn names them): every class then carries the same total weight, so a minority class is not traded away
    for a majority one, and the weights average 1 over the draw. ``None`` for tasks without classes (regression, Cox,
    segmentation). Classes absent from the draw get 0; a draw holding one class gets all ones (nothing to balance).
    Cases without a class (NaN targets) are not counted."""
    if spec.loss not in ("ce", "bce"):
        return None
    k = spec.num_outputs if spec.kind == "multiclass" else 2
    y = np.asarray(targets, dtype=np.float64)
    y = y[np.isfinite(y)].astype(np.int64)
    counts = np.bincount(y, minlength=k)[:k].astype(np.float64)
    present = counts > 0
    if present.sum() < 2:
        return np.ones(k)
    weights = np.zeros(k)
    weights[present] = len(y) / (present.sum() * counts[present])
    return weights


def _loss_fn(
    spec: TaskSpec, weights: np.ndarray | None = None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The spec's loss; ``weights`` (per class, :func:`class_weights`) weight CE and BCE, each batch averaged over
    the weights it holds (what ``F.cross_entropy(weight=...)`` does)."""
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if spec.loss == "ce":
        return lambda out, y, raw: F.cross_entropy(out, y.long(), weight=w)
    if spec.loss == "bce":

        def bce(out: torch.Tensor, y: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
            per_case = F.binary_cross_entropy_with_logits(out.squeeze(1), y.float(), reduction="none")
            if w is None:
                return per_case.mean()
            case_w = w[y.long()]
            return (case_w * per_case).sum() / case_w.sum().clamp_min(1e-12)

        return bce
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


def lr_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay, stepped once per optimiser step (call ``.step()`` after each).

    Step ``s`` (0-based) of ``total_steps`` trains every group at its own base lr times: ``(s + 1) / W`` during the
    ``W = round(warmup_fraction · total_steps)`` warmup steps (at least 1 when the fraction is positive), then
    ``min_lr_ratio + (1 - min_lr_ratio) · (1 + cos(π · (s - W) / (total_steps - W))) / 2``. The ratios of the groups
    (layer-wise decay) are kept. Warmup spares a freshly initialised head from wrecking pretrained features with its
    first, large gradients; the cosine lets every strategy end at a small step instead of a noisy constant one.
    """
    total = max(1, int(total_steps))
    warmup = min(total - 1, max(1, round(warmup_fraction * total))) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def f1_threshold(predictions: np.ndarray, targets: np.ndarray) -> float:
    """The decision threshold on P(positive) that maximises F1 on (``predictions``, ``targets``), or 0.5 when they do
    not hold both classes.

    Candidates are the midpoints (in logit space) between consecutive distinct scores, plus one below the lowest; a tie
    in F1 goes to the candidate nearest 0.5, the balanced operating point of a class-weighted model. Choose it on data
    the model was not fitted to (validation): on the training draw it is optimistic.
    """
    y = np.asarray(targets, dtype=np.float64)
    known = np.isfinite(y)
    p = np.clip(np.asarray(predictions, dtype=np.float64)[known], 1e-7, 1 - 1e-7)
    positive = y[known] > 0.5
    if positive.all() or not positive.any():
        return 0.5
    logits = np.unique(np.log(p / (1 - p)))
    cuts = np.concatenate([[logits[0] - 1.0], (logits[:-1] + logits[1:]) / 2])
    best, best_t = -1.0, 0.5
    for cut in cuts:
        t = 1 / (1 + math.exp(-cut))
        predicted = p > t
        tp = float(np.sum(predicted & positive))
        f1 = 2 * tp / (predicted.sum() + positive.sum())
        if f1 > best + 1e-12 or (abs(f1 - best) <= 1e-12 and abs(t - 0.5) < abs(best_t - 0.5)):
            best, best_t = f1, t
    return float(best_t)


def _set_operating_point(model: TaskModel, spec: TaskSpec, threshold: float) -> None:
    """Shift a binary head's bias so that P(positive) > 0.5 exactly where it was > ``threshold``: the chosen operating
    point travels inside the weights (same state-dict keys), and ranking metrics (AUC, C-index) are unchanged."""
    shift = math.log(threshold / (1 - threshold))
    with torch.no_grad():  # predict: sigmoid(out) for BCE, sigmoid(-out) for Cox
        model.head.bias.add_(shift if spec.loss == "cox" else -shift)


@dataclass
class FitResult:
    """A trained model with its history."""

    model: nn.Module
    scale: TargetScale
    history: list[dict[str, float]]


def _hp_default(name: str) -> float:
    """A hyperparameter's default from :class:`~brainiac.models.finetune_config.FinetuneConfig` (for ``hp`` dicts of
    drivers that predate it)."""
    from brainiac.models.finetune_config import FinetuneConfig

    return float(getattr(FinetuneConfig, name))


@torch.no_grad()
def _features(model: TaskModel, inputs: np.ndarray, batch_size: int) -> torch.Tensor:
    """The head's input for every case (no augmentation, eval mode), float64."""
    model.eval()
    out = [
        model.features(torch.as_tensor(inputs[i : i + batch_size]).float()) for i in range(0, len(inputs), batch_size)
    ]
    return torch.cat(out).double() if out else torch.zeros(0, model.head.in_features, dtype=torch.float64)


def _choose_operating_point(
    model: nn.Module, spec: TaskSpec, data: dict[str, np.ndarray], scale: TargetScale, batch_size: int
) -> float | None:
    """Binary tasks scored by F1: pick the F1 threshold on validation (on the training draw when validation lacks a
    class) and fold it into the head's bias. Returns the threshold, or ``None`` when the task has no F1."""
    if spec.kind != "binary" or "f1" not in spec.metrics or not isinstance(model, TaskModel):
        return None
    val_y = np.asarray(data["val_y"], dtype=np.float64)
    known = val_y[np.isfinite(val_y)]
    if len(known) and 0 < known.sum() < len(known):
        threshold = f1_threshold(predict(model, spec, data["val_x"], scale, batch_size), val_y)
    else:
        threshold = f1_threshold(predict(model, spec, data["train_x"], scale, batch_size), data["train_y"])
    _set_operating_point(model, spec, threshold)
    return threshold


def _validate(
    model: nn.Module, spec: TaskSpec, data: dict[str, np.ndarray], scale: TargetScale, batch_size: int
) -> dict[str, float]:
    predictions = predict(model, spec, data["val_x"], scale, batch_size)
    return {f"val_{k}": v for k, v in score(spec, predictions, data["val_y"], data["val_raw"]).items()}


def _fit_probe(
    model: TaskModel, spec: TaskSpec, data: dict[str, np.ndarray], scale: TargetScale, seed: int, batch_size: int
) -> dict[str, float]:
    """``linear``: fit the head of ``model`` (its encoder frozen) to convergence on features computed once, the
    penalty chosen by inner CV on the training draw (:func:`~brainiac.models.tasks.probe.fit_probe`); returns the
    probe's training loss and penalty. Groups for the CV folds come from ``data["train_groups"]`` when given."""
    from brainiac.models.tasks.probe import fit_probe

    features = _features(model, data["train_x"], batch_size)
    y = np.asarray(data["train_y"], dtype=np.float64)
    groups = data.get("train_groups")
    if spec.kind == "regression":
        fit = fit_probe("ridge", features, (y - scale.mean) / scale.std, groups=groups, seed=seed)
    elif spec.loss == "cox":
        fit = fit_probe("cox", features, y, raw=np.asarray(data["train_raw"], np.float64), groups=groups, seed=seed)
    else:
        weights = class_weights(spec, y)
        if weights is None:
            raise ValueError(f"task {spec.name}: a {spec.kind} probe needs a ce or bce loss, got {spec.loss!r}")
        fit = fit_probe("logistic", features, y, outputs=spec.num_outputs, sample_weights=weights[y.astype(np.int64)],
                        groups=groups, seed=seed)  # fmt: skip
    with torch.no_grad():
        model.head.weight.copy_(fit.weight)
        model.head.bias.copy_(fit.bias)
    return {"train_loss": fit.loss, "probe_penalty": fit.penalty}


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
    survival task's raw is (n, 2) of time and event, which the Cox loss reads; optionally ``train_groups``, the
    subject of each training case, which the linear probe's inner CV keeps within one fold).

    ``encoder_state`` holds the pretrained encoder's weights (``None`` for scratch); ``hp`` has ``lr``,
    ``weight_decay``, ``dropout``, ``encoder_lr_mult``, ``freeze_depth`` and ``seed``, and optionally
    ``layer_decay`` and ``warmup_fraction`` (defaults from :class:`~brainiac.models.finetune_config.FinetuneConfig`).
    ``report`` is called after every epoch with the epoch's metrics (``val_<metric>`` for each of the spec's metrics);
    the last call (``epoch == max_epochs``) carries the final model.

    ``linear`` on a classification/regression task fits its probe once (:func:`_fit_probe`) and reports the same
    metrics ``max_epochs`` times, so a driver that waits for the last epoch works unchanged; ``lr``, ``dropout`` and
    ``weight_decay`` do not apply to it. A binary task scored by F1 has its decision threshold chosen before the last
    report (:func:`_choose_operating_point`), so its ``val_f1`` there is optimistic (chosen on the same cases).
    """
    from brainiac.models.augment import BatchedViewAugment
    from brainiac.models.backbones import build_backbone

    seed = int(hp["seed"])
    torch.manual_seed(seed)
    encoder = None
    if strategy != "scratch":
        if encoder_state is None:
            raise ValueError(f"strategy {strategy!r} starts from a pretrained encoder; no encoder_state was given")
        encoder = build_backbone(backbone)
        encoder.load_state_dict(encoder_state, strict=True)
    model = build_task_model(
        spec, backbone, encoder, strategy, dropout=float(hp["dropout"]), freeze_depth=int(hp["freeze_depth"])
    )
    scale = TargetScale.fit(spec, data["train_y"])
    history: list[dict[str, float]] = []

    if strategy == "linear" and isinstance(model, TaskModel):
        started = time.perf_counter()
        fitted = _fit_probe(model, spec, data, scale, seed, batch_size)
        threshold = _choose_operating_point(model, spec, data, scale, batch_size)
        extra = {} if threshold is None else {"decision_threshold": threshold}
        val = _validate(model, spec, data, scale, batch_size)
        elapsed = (time.perf_counter() - started) / max_epochs
        for epoch in range(1, max_epochs + 1):  # one fit, reported per "epoch" for the driver's schedulers
            history.append({"epoch": epoch, **fitted, "epoch_s": elapsed, **extra, **val})
            if report is not None:
                report(history[-1], model, scale)
        return FitResult(model, scale, history)

    layer_decay = float(hp.get("layer_decay", _hp_default("layer_decay")))
    groups = parameter_groups(
        model, float(hp["lr"]), float(hp["weight_decay"]), float(hp["encoder_lr_mult"]), strategy, layer_decay
    )
    optimizer = torch.optim.AdamW(groups)
    weights = class_weights(spec, data["train_y"])
    loss_fn = _loss_fn(spec, weights)
    train_x = torch.as_tensor(data["train_x"])
    train_y = torch.as_tensor(data["train_y"])
    train_raw = torch.as_tensor(data["train_raw"]).float()
    if spec.kind == "regression":
        train_y = (train_y.float() - scale.mean) / scale.std
    generator = torch.Generator().manual_seed(seed)
    augmenter = BatchedViewAugment(finetune_augment()) if augment and spec.kind != "segmentation" else None
    n = len(train_x)

    def batches(order: torch.Tensor) -> list[torch.Tensor]:
        out = [order[start : start + batch_size] for start in range(0, n, batch_size)]
        # BatchNorm-free heads tolerate 1, but a 1-case step is mostly noise
        return [idx for idx in out if spec.kind == "segmentation" or len(idx) >= 2 or n < 2]

    steps_per_epoch = len(batches(torch.arange(n)))
    warmup = float(hp.get("warmup_fraction", _hp_default("warmup_fraction")))
    scheduler = lr_schedule(optimizer, steps_per_epoch * max_epochs, warmup)
    for epoch in range(1, max_epochs + 1):
        started = time.perf_counter()
        model.train()
        losses = []
        for idx in batches(torch.randperm(n, generator=generator)):
            x, y, raw = train_x[idx].float(), train_y[idx], train_raw[idx]
            if augmenter is not None:
                x = augmenter(x, generator=generator)
            elif augment and spec.kind == "segmentation":
                x, y = _augment_segmentation(x, y.clone(), generator)
            loss = loss_fn(model(x), y, raw)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        extra = {}
        if epoch == max_epochs:
            threshold = _choose_operating_point(model, spec, data, scale, batch_size)
            extra = {} if threshold is None else {"decision_threshold": threshold}
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else math.nan,
                   "epoch_s": time.perf_counter() - started, "lr": float(optimizer.param_groups[0]["lr"]), **extra,
                   **_validate(model, spec, data, scale, batch_size)}  # fmt: skip
        history.append(metrics)
        if report is not None:
            report(metrics, model, scale)
    return FitResult(model, scale, history)
