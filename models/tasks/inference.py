"""A task model's predictions and scores in its spec's terms, shared by training, evaluation, promotion and predict.

Regression targets are standardised for training (:class:`TargetScale`) and predicted back in ``spec.units``; a Cox
model's log hazard ratio becomes a score of long survival, so every survival model predicts in one direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from brainiac.models.tasks.spec import TaskSpec

__all__ = ["TargetScale", "predict", "score", "survival_pairs"]


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


def survival_pairs(raw: np.ndarray | torch.Tensor) -> tuple[Any, Any]:
    """(time, event) columns of a survival task's ``raw`` (n, 2), as the fine-tuning job's ``TaskData``
    holds it. A 1-D ``raw`` is refused: it carries no censoring, and reading every case as an event would bias both the
    Cox loss and the C-index towards the patients who died.

    Raises:
        ValueError: ``raw`` is not (n, 2).
    """
    if raw.ndim != 2 or raw.shape[1] != 2:
        raise ValueError(f"survival raw must be (n, 2) of (time, event), got shape {tuple(raw.shape)}")
    return raw[:, 0], raw[:, 1]


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
