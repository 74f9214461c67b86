"""Linear probes fitted to convergence on cached features: ridge, logistic (binary or multinomial) and Cox.

The ``linear`` strategy freezes the encoder, so its features never change: training the head with a few dozen noisy
Adam steps on augmented volumes (what the engine used to do) left it far from the optimum of its own objective (the
idh probe scored AUC 0.22, below chance). Here the features are computed once, standardised, and the penalised
objective is solved exactly (ridge, closed form) or by L-BFGS to convergence (logistic, Cox), with the L2 penalty
chosen by K-fold cross-validation on the training draw (folds by group when groups are given, class-stratified) --
the probe protocol of foundation-model evaluations. The result is folded back into one ``(weight, bias)`` pair on the
raw features, so it loads into the task model's ``nn.Linear`` head unchanged.

Objectives (``z`` the standardised features, ``n`` cases, ``w_i`` class-balancing weights that average 1):

- ridge: ``mean_i (y_i - z_i·β - b)² + λ‖β‖²``
- logistic: ``Σ_i w_i·CE_i / Σ_i w_i + λ/2 ‖W‖²`` (the bias is not penalised)
- Cox: negative partial log-likelihood per event (Breslow) ``+ λ/2 ‖β‖²`` (no bias: the likelihood ignores it)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LAMBDAS", "ProbeFit", "fit_probe", "fold_ids"]

LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Penalties tried by the inner cross-validation (features are standardised, losses are means, so one grid fits all
feature widths)."""

FALLBACK_LAMBDA = 1.0
"""Penalty when the training draw is too small to cross-validate (e.g. one case per class). A strong penalty: with a
handful of cases the direction of the fit is what matters, and a large one cannot be told from noise."""

Kind = Literal["ridge", "logistic", "cox"]


@dataclass
class ProbeFit:
    """A fitted probe on the *raw* features: ``logits = features @ weight.T + bias``.

    Attributes:
        weight: (outputs, F) float32.
        bias: (outputs,) float32.
        penalty: the λ used.
        cv_scores: held-out loss of every λ tried (empty when the draw was too small to cross-validate).
        loss: the unpenalised training objective at the solution.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    penalty: float
    cv_scores: dict[float, float]
    loss: float


def _standardise(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = f.mean(dim=0)
    std = f.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return (f - mean) / std, mean, std


def _fit_ridge(z: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed form on centred data; the dual (n × n) system when there are more features than cases."""
    n, d = z.shape
    zm, ym = z.mean(dim=0), y.mean()
    zc, yc = z - zm, y - ym
    reg = n * max(lam, 1e-12)
    if d <= n:
        beta = torch.linalg.solve(zc.T @ zc + reg * torch.eye(d, dtype=z.dtype), zc.T @ yc)
    else:
        beta = zc.T @ torch.linalg.solve(zc @ zc.T + reg * torch.eye(n, dtype=z.dtype), yc)
    return beta.reshape(1, d), (ym - zm @ beta).reshape(1)


def _logistic_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, outputs: int) -> torch.Tensor:
    if outputs == 1:
        per_case = F.binary_cross_entropy_with_logits(logits[:, 0], y, reduction="none")
    else:
        per_case = F.cross_entropy(logits, y.long(), reduction="none")
    return (weights * per_case).sum() / weights.sum()


def _cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    from brainiac.models.tasks.losses import cox_partial_likelihood_loss

    return cox_partial_likelihood_loss(risk, time, event)


def _lbfgs(params: list[torch.Tensor], objective, max_iter: int) -> None:
    """Minimise ``objective()`` over ``params`` with L-BFGS (strong Wolfe line search) until the gradient vanishes
    (max-norm ≤ 1e-7) or ``max_iter`` iterations have passed."""
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-12, history_size=20,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)


def _fit(
    kind: Kind, z: torch.Tensor, y: torch.Tensor, raw: torch.Tensor, weights: torch.Tensor, outputs: int, lam: float,
    max_iter: int, start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(weight (outputs, F), bias (outputs,)) on standardised features ``z``, float64; ``start`` warm-starts L-BFGS
    (the solution at a stronger penalty: the regularisation path is cheap to follow downwards)."""
    if kind == "ridge":
        return _fit_ridge(z, y, lam)
    d = z.shape[1]
    weight = (start[0].clone() if start else torch.zeros(outputs, d, dtype=z.dtype)).requires_grad_(True)
    bias = (start[1].clone() if start else torch.zeros(outputs, dtype=z.dtype)).requires_grad_(kind == "logistic")
    if kind == "logistic":

        def objective() -> torch.Tensor:
            logits = z @ weight.T + bias
            # A vanishing penalty on the bias keeps a class absent from the draw at a finite logit.
            penalty = 0.5 * lam * (weight**2).sum() + 0.5e-6 * (bias**2).sum()
            return _logistic_loss(logits, y, weights, outputs) + penalty

        _lbfgs([weight, bias], objective, max_iter)
    else:
        time, event = raw[:, 0], raw[:, 1]

        def objective() -> torch.Tensor:
            return _cox_loss(z @ weight[0], time, event) + 0.5 * lam * (weight**2).sum()

        _lbfgs([weight], objective, max_iter)
    return weight.detach(), bias.detach()


def _held_out_loss(
    kind: Kind, weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor, y: torch.Tensor, raw: torch.Tensor,
    weights: torch.Tensor, outputs: int,
) -> float:  # fmt: skip
    logits = z @ weight.T + bias
    if kind == "ridge":
        return float(((logits[:, 0] - y) ** 2).mean())
    if kind == "logistic":
        return float(_logistic_loss(logits, y, weights, outputs))
    if raw[:, 1].sum() == 0:
        return math.nan
    return float(_cox_loss(logits[:, 0], raw[:, 0], raw[:, 1]))


def fold_ids(strata: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> np.ndarray:
    """Fold of every case for K-fold CV: whole groups (subjects) go to one fold, spread round-robin within each stratum
    (a group's stratum is that of its first case) after a seeded shuffle, so every fold sees every class."""
    groups = np.arange(len(strata)) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    unique, first = np.unique(groups, return_index=True)
    order = rng.permutation(len(unique))
    group_fold: dict = {}
    next_fold: dict = {}
    for g_index in order:
        stratum = strata[first[g_index]]
        k = next_fold.get(stratum, int(rng.integers(folds)))
        group_fold[unique[g_index]] = k % folds
        next_fold[stratum] = k + 1
    return np.array([group_fold[g] for g in groups], dtype=np.int64)


def fit_probe(
    kind: Kind,
    features: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    *,
    outputs: int = 1,
    raw: np.ndarray | torch.Tensor | None = None,
    sample_weights: np.ndarray | torch.Tensor | None = None,
    groups: np.ndarray | None = None,
    penalty: float | None = None,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 200,
) -> ProbeFit:
    """Fit a linear probe on ``features`` (n, F) to convergence, the penalty chosen by inner CV unless given.

    Args:
        kind: ``ridge`` (regression, targets already in training units), ``logistic`` (``outputs`` = 1: binary
            targets 0/1; otherwise class indices) or ``cox`` (``raw`` (n, 2) of time and event; targets unused).
        sample_weights: per-case weights of the logistic loss (class balancing); ignored by ridge and Cox.
        groups: per-case group (subject) ids: CV folds never split a group.
        penalty: a fixed λ; ``None`` = the :data:`LAMBDAS` value with the lowest mean held-out loss over ``folds``
            folds (class-stratified; for Cox stratified by event), or :data:`FALLBACK_LAMBDA` when some class (or
            the events) has fewer than 2 cases, or there are fewer than 4 cases.
    """
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    threads = torch.get_num_threads()
    if f.numel() * outputs < 1_000_000:  # tiny matrices: thread hand-offs cost more than the arithmetic (10-30×)
        torch.set_num_threads(1)
    try:
        return _fit_probe(kind, f, targets, outputs, raw, sample_weights, groups, penalty, folds, seed, max_iter)
    finally:
        torch.set_num_threads(threads)


def _fit_probe(
    kind: Kind, f: torch.Tensor, targets, outputs: int, raw, sample_weights, groups, penalty: float | None, folds: int,
    seed: int, max_iter: int,
) -> ProbeFit:  # fmt: skip
    y = torch.as_tensor(np.asarray(targets, dtype=np.float64))
    raw_t = torch.as_tensor(np.asarray(raw, dtype=np.float64)) if raw is not None else torch.zeros(len(f), 2)
    w = (
        torch.as_tensor(np.asarray(sample_weights, dtype=np.float64))
        if sample_weights is not None
        else torch.ones(len(f), dtype=torch.float64)
    )
    z, mean, std = _standardise(f)
    cv_scores: dict[float, float] = {}
    if penalty is None:
        if kind == "logistic":
            strata = y.numpy().astype(np.int64)
        elif kind == "cox":
            strata = raw_t[:, 1].numpy().astype(np.int64)
        else:
            strata = np.zeros(len(f), dtype=np.int64)
        counts = np.unique(strata, return_counts=True)[1]
        n_groups = len(np.unique(groups)) if groups is not None else len(f)
        k = int(min(folds, counts.min(), n_groups))
        needs_two = kind in ("logistic",) and len(counts) < 2
        if k >= 2 and len(f) >= 4 and not needs_two:
            ids = fold_ids(strata, groups, k, seed)
            held_out: dict[float, list[float]] = {lam: [] for lam in LAMBDAS}
            for fold in range(k):
                tr, te = ids != fold, ids == fold
                if tr.sum() == 0 or te.sum() == 0:
                    continue
                ztr, mtr, str_ = _standardise(f[tr])
                zte = (f[te] - mtr) / str_
                start = None
                for lam in sorted(LAMBDAS, reverse=True):  # strongest first, each warm-starting the next
                    start = _fit(kind, ztr, y[tr], raw_t[tr], w[tr], outputs, lam, max_iter, start)
                    held_out[lam].append(_held_out_loss(kind, *start, zte, y[te], raw_t[te], w[te], outputs))
            for lam, losses in held_out.items():
                finite = [v for v in losses if math.isfinite(v)]
                cv_scores[lam] = float(np.mean(finite)) if finite else math.inf
            penalty = min(LAMBDAS, key=lambda lam: (cv_scores[lam], -lam))  # ties: the stronger penalty
        else:
            penalty = FALLBACK_LAMBDA
    weight, bias = _fit(kind, z, y, raw_t, w, outputs, float(penalty), max_iter)
    loss = _held_out_loss(kind, weight, bias, z, y, raw_t, w, outputs)
    # Fold the standardisation into the head: z·W + b = f·(W/σ) + (b - (μ/σ)·W).
    raw_weight = weight / std
    raw_bias = bias - raw_weight @ mean
    return ProbeFit(raw_weight.float(), raw_bias.float(), float(penalty), cv_scores, loss)
