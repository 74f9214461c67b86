"""The pure parts of ``bench/fewshot.py``: heads fitted on cached features for many draws at once, metrics vectorised
over draws, and the paired, subject-clustered bootstrap of the mean over draws.

Everything here works on arrays (no catalog, no Ray), so ``tests/test_bench_fewshot.py`` checks it directly.

Heads (one per task kind), each with an L2 penalty ``lam`` chosen per draw by grouped (subject) cross-validation inside
the training draw, from :data:`LAMBDAS`:

* ``ridge`` (regression): closed form, intercept unpenalised; CV score = held-out MAE;
* ``logistic`` (binary; multiclass one-vs-rest): logistic regression by damped Newton (IRLS) with a step search,
  converged, not a few Adam steps; CV score = held-out cross-entropy;
* ``cox`` (survival): Cox partial likelihood (Breslow ties) by damped Newton; CV score = the cross-validated partial
  likelihood of Verweij & van Houwelingen (1993).

Many problems (draws × folds × penalties) are solved as one padded batch: each problem is a set of rows of the training
matrix with a 0/1 weight, so a few hundred draws cost a few batched linear solves, not thousands of optimiser runs.

The estimand of one (task, regime, encoder) cell is the mean over draws of the test metric. Its interval resamples
scored subjects (clustered by subject, stratified by class) and recomputes that mean on each resample; the difference
of two encoders is computed on the same resamples (:func:`compare`). The bootstrap itself is
:func:`brainiac.models.tasks.metrics.bootstrap_ci` / ``paired_bootstrap`` when the installed version takes ``groups``
and ``strata``; a local equivalent otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "LAMBDAS",
    "auc_cols",
    "balanced_accuracy_cols",
    "cindex",
    "compare",
    "fit_predict",
    "grouped_folds",
    "mae_cols",
    "mean_metric",
]

LAMBDAS = tuple(float(x) for x in np.logspace(-3, 1, 5))
"""Candidate L2 penalties (on standardised features; the loss is a mean over training cases)."""

DEFAULT_LAMBDA = 1.0
"""The penalty of a draw too small to cross-validate (e.g. K = 1: one case per class, no fold can hold out a class)."""

NEWTON_STEPS = 12
STEP_SIZES = (1.0, 0.5, 0.1)
MAX_FOLDS = 3
CHUNK = 256
"""Problems per batched solve (bounds the (B, P, P) Hessians in memory)."""


# ----------------------------------------------------------------------------------------------------------------------
# Folds


def grouped_folds(y: np.ndarray, subjects: Sequence[str], n_folds: int, seed: int, stratify: bool) -> np.ndarray:
    """Fold index per case: whole subjects per fold, spread round-robin over folds within each class (``stratify``)
    in a seeded order. Cases without a class (NaN) form their own stratum."""
    rng = np.random.default_rng(seed)
    subjects = np.asarray(subjects, dtype=object)
    uniq = list(dict.fromkeys(subjects.tolist()))
    if stratify:
        key = {}
        for s, v in zip(subjects.tolist(), np.asarray(y, dtype=float).tolist(), strict=True):
            key.setdefault(s, "nan" if not np.isfinite(v) else v)
    else:
        key = dict.fromkeys(uniq, 0)
    fold_of: dict[str, int] = {}
    offset = 0
    for stratum in sorted(set(map(str, key.values()))):
        members = [s for s in uniq if str(key[s]) == stratum]
        members = [members[i] for i in rng.permutation(len(members))]
        for j, s in enumerate(members):
            fold_of[s] = (offset + j) % n_folds
        offset += len(members)
    return np.array([fold_of[s] for s in subjects.tolist()], dtype=np.int64)


def n_folds_for(kind: str, y: np.ndarray, subjects: Sequence[str]) -> int:
    """Folds a draw supports: up to :data:`MAX_FOLDS`, at most the subjects of its smallest class (classification); below 2, none."""
    subjects = np.asarray(subjects, dtype=object)
    if kind in ("ridge", "cox"):
        n = len(set(subjects.tolist()))
        return min(MAX_FOLDS, n // 2) if n >= 4 else 0
    counts = [len(set(subjects[y == c].tolist())) for c in np.unique(y[np.isfinite(y)])]
    return min(MAX_FOLDS, min(counts)) if counts and min(counts) >= 2 else 0


# ----------------------------------------------------------------------------------------------------------------------
# Batched solvers. X: (B, m, d) float64 with a leading column of ones; w: (B, m) 0/1 weights.


def _ridge(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(B, d) coefficients (first = intercept, unpenalised) of mean-squared error + lam·||coef||²."""
    n = w.sum(1).clamp_min(1.0)
    Xw = X * w[..., None]
    A = Xw.transpose(1, 2) @ X / n[:, None, None]
    pen = torch.ones(X.shape[2], dtype=X.dtype)
    pen[0] = 1e-8
    A = A + lam[:, None, None] * torch.diag_embed(pen.expand(X.shape[0], -1))
    b = (Xw.transpose(1, 2) @ y[..., None])[..., 0] / n[:, None]
    return torch.linalg.solve(A, b)


def _binary_loss(w_: torch.Tensor, X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, pr: torch.Tensor):
    """Mean binary cross-entropy + sum of pr·coef² (pr: per-coefficient penalty, the intercept's ~0)."""
    z = (X @ w_[..., None])[..., 0]
    ce = torch.nn.functional.softplus(z) - y * z
    return (ce * w).sum(1) / w.sum(1).clamp_min(1.0) + (pr * w_**2).sum(1)


def _logistic(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(B, d, C') logistic weights by damped Newton (IRLS) with a per-problem step search: one binary problem for
    two classes (C' = 1, the positive class), one-vs-rest binary problems for more (C' = C). One-vs-rest keeps each
    Newton system d × d instead of (d·C) × (d·C), which is what makes hundreds of draws affordable on a CPU."""
    B, _, d = X.shape
    C = Y.shape[2]
    columns = [1] if C == 2 else list(range(C))
    n = w.sum(1).clamp_min(1.0)
    pr = lam[:, None].expand(B, d).clone()  # per coefficient: lam, the intercept almost free
    pr[:, 0] = 1e-6
    out = []
    for c in columns:
        y = Y[..., c]
        beta = torch.zeros(B, d, dtype=X.dtype)
        for _ in range(NEWTON_STEPS):
            p = torch.sigmoid((X @ beta[..., None])[..., 0])
            grad = ((p - y) * w)[:, None, :] @ X
            grad = grad[:, 0] / n[:, None] + 2 * pr * beta
            H = (X * (w * p * (1 - p) / n[:, None])[..., None]).transpose(1, 2) @ X
            H = H + torch.diag_embed(2 * pr + 1e-9)
            step = torch.linalg.solve(H, grad)
            beta = _line_search(lambda v, y=y: _binary_loss(v, X, y, w, pr), beta, step)
        out.append(beta)
    return torch.stack(out, -1)


def _cox_terms(beta: torch.Tensor, X: torch.Tensor, t: torch.Tensor, e: torch.Tensor, w: torch.Tensor):
    """Log partial likelihood (Breslow) per problem, and the risk-set weights, for rows with weight 1."""
    eta = (X @ beta[..., None])[..., 0]
    R = (t[:, None, :] >= t[:, :, None]) & (w[:, None, :] > 0)  # R[b, i, j]: j is at risk at i's time
    logits = torch.where(R, eta[:, None, :], torch.full_like(R, -torch.inf, dtype=eta.dtype))
    lse = torch.logsumexp(logits, -1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    de = e * w
    return ((eta - lse) * de).sum(1), torch.softmax(logits, -1).nan_to_num(0.0), de


def _cox_loss(beta, X, t, e, w, lam):
    pl, _, de = _cox_terms(beta, X, t, e, w)
    return -pl / de.sum(1).clamp_min(1.0) + lam * (beta**2).sum(1)


def _cox(X: torch.Tensor, t: torch.Tensor, e: torch.Tensor, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(B, d) Cox coefficients (no intercept) of mean negative log partial likelihood + lam·||beta||²."""
    B, _, d = X.shape
    beta = torch.zeros(B, d, dtype=X.dtype)
    for _ in range(NEWTON_STEPS):
        _, Wr, de = _cox_terms(beta, X, t, e, w)
        nd = de.sum(1).clamp_min(1.0)
        xbar = Wr @ X  # (B, m, d): risk-set mean of x at each row's time
        grad = -((X - xbar) * de[..., None]).sum(1) / nd[:, None] + 2 * lam[:, None] * beta
        a = (Wr * de[..., None]).sum(1)  # (B, m): sum_i e_i w_ij
        H = (X * a[..., None]).transpose(1, 2) @ X - (xbar * de[..., None]).transpose(1, 2) @ xbar
        H = H / nd[:, None, None] + torch.diag_embed((2 * lam[:, None] + 1e-9).expand(B, d))
        step = torch.linalg.solve(H, grad)
        beta = _line_search(lambda V: _cox_loss(V, X, t, e, w, lam), beta, step)
    return beta


def _line_search(loss: Callable[[torch.Tensor], torch.Tensor], W: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Per problem, the best of W - s·step over :data:`STEP_SIZES` (or W itself when none lowers the loss)."""
    best, best_loss = W, loss(W)
    for s in STEP_SIZES:
        cand = W - s * step
        cl = loss(cand)
        better = torch.isfinite(cl) & (cl < best_loss)
        shape = (-1,) + (1,) * (W.dim() - 1)
        best = torch.where(better.reshape(shape), cand, best)
        best_loss = torch.where(better, cl, best_loss)
    return best


# ----------------------------------------------------------------------------------------------------------------------
# Draws × folds × penalties as one padded batch


def _pad(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(B, m) row indices (0 where padded) and (B, m) 0/1 mask of a list of index arrays."""
    m = max(1, max(len(r) for r in rows))
    idx = np.zeros((len(rows), m), dtype=np.int64)
    mask = np.zeros((len(rows), m))
    for i, r in enumerate(rows):
        idx[i, : len(r)] = r
        mask[i, : len(r)] = 1.0
    return idx, mask


def _solve(kind: str, X: np.ndarray, target: np.ndarray, idx: np.ndarray, mask: np.ndarray, lam: np.ndarray,
           n_classes: int) -> torch.Tensor:  # fmt: skip
    """Fit one problem per row of ``idx``/``mask``/``lam`` (in chunks); returns the stacked parameters."""
    out = []
    target = np.nan_to_num(target, nan=0.0)  # padded rows carry weight 0; a NaN there would still poison X^T W y
    Xt = torch.from_numpy(np.concatenate([np.ones((len(X), 1)), X], 1))
    for lo in range(0, len(idx), CHUNK):
        sl = slice(lo, lo + CHUNK)
        ii = torch.from_numpy(idx[sl])
        Xb, w, lb = Xt[ii], torch.from_numpy(mask[sl]), torch.from_numpy(lam[sl])
        if kind == "ridge":
            out.append(_ridge(Xb, torch.from_numpy(target[:, 0])[ii], w, lb))
        elif kind == "logistic":
            y = torch.from_numpy(target[:, 0]).long()[ii]
            Y = torch.nn.functional.one_hot(y.clamp_min(0), n_classes).double()
            out.append(_logistic(Xb, Y, w, lb))
        else:  # cox: no intercept column
            tt, ee = torch.from_numpy(target[:, 0])[ii], torch.from_numpy(target[:, 1])[ii]
            out.append(_cox(Xb[..., 1:], tt, ee, w, lb))
    return torch.cat(out)


def _scores(kind: str, X: np.ndarray, params: torch.Tensor) -> np.ndarray:
    """Predictions of every problem on rows ``X``: (n, B) values (ridge), (n, B) risks (cox), (n, B, C) probabilities."""
    Xt = torch.from_numpy(np.concatenate([np.ones((len(X), 1)), X], 1))
    if kind == "ridge":
        return (Xt @ params.T).numpy()
    if kind == "cox":
        return (Xt[:, 1:] @ params.T).numpy()
    S = torch.sigmoid(torch.einsum("nd,bdc->nbc", Xt, params))
    if S.shape[2] == 1:
        return torch.cat([1 - S, S], -1).numpy()
    return (S / S.sum(-1, keepdim=True).clamp_min(1e-12)).numpy()


def _cv_loss(kind: str, X: np.ndarray, target: np.ndarray, train: np.ndarray, folds: np.ndarray, params: torch.Tensor,
             fold: int) -> float:  # fmt: skip
    """Held-out loss of one problem (fitted without ``fold``) on that fold: MAE, cross-entropy, or minus the
    cross-validated partial likelihood (full-draw log PL minus training-rows log PL, at the fold's coefficients)."""
    held = train[folds == fold]
    if kind == "ridge":
        return float(np.abs(_scores(kind, X[held], params[None])[:, 0] - target[held, 0]).mean())
    if kind == "logistic":
        p = _scores(kind, X[held], params[None])[:, 0]
        y = target[held, 0].astype(np.int64)
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
    Xt = torch.from_numpy(X[train])[None]
    t = torch.from_numpy(target[train, 0])[None]
    e = torch.from_numpy(target[train, 1])[None]
    full, _, _ = _cox_terms(params[None], Xt, t, e, torch.ones_like(t))
    rest, _, _ = _cox_terms(params[None], Xt, t, e, torch.from_numpy((folds != fold).astype(float))[None])
    return float(-(full - rest)[0])


def fit_predict(kind: str, X_train: np.ndarray, target: np.ndarray, subjects: Sequence[str], draws: list[np.ndarray],
                X_score: np.ndarray, n_classes: int = 2, seed: int = 0,
                lambdas: Sequence[float] = LAMBDAS) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Fit one head per draw (rows of ``X_train``), its penalty chosen by grouped CV inside the draw, and predict
    ``X_score``.

    ``target``: (n, 1) values (ridge), (n, 1) class indices (logistic; NaN = no class, never drawn for a logistic
    head), or (n, 2) (time, event) (cox). Returns the predictions, (n_score, D) or (n_score, D, C) for logistic, and the
    chosen penalty per draw (``DEFAULT_LAMBDA`` where a draw is too small to cross-validate).
    """
    subjects = np.asarray(subjects, dtype=object)
    target = np.asarray(target, dtype=np.float64).reshape(len(X_train), -1)
    cls = target[:, 0] if kind == "logistic" else (np.full(len(X_train), np.nan) if kind == "ridge" else None)
    if kind == "cox":  # stratify folds by event status
        cls = target[:, 1]
    rows, lam, owner, fold_of = [], [], [], []
    plans = []
    for d, draw in enumerate(draws):
        nf = n_folds_for(kind, cls[draw] if kind != "ridge" else target[draw, 0], subjects[draw])
        folds = grouped_folds(cls[draw] if kind != "ridge" else np.zeros(len(draw)), subjects[draw], max(nf, 1),
                              seed + d, stratify=kind != "ridge")  # fmt: skip
        plans.append((nf, folds))
        if nf < 2:
            continue
        for f in range(nf):
            for lv in lambdas:
                rows.append(draw[folds != f])
                lam.append(lv)
                owner.append(d)
                fold_of.append(f)
    chosen = np.full(len(draws), DEFAULT_LAMBDA)
    if rows:
        idx, mask = _pad(rows)
        params = _solve(kind, X_train, target, idx, mask, np.asarray(lam), n_classes)
        losses: dict[tuple[int, float], float] = {}
        for p, d, f, lv in zip(params, owner, fold_of, lam, strict=True):
            losses[(d, lv)] = losses.get((d, lv), 0.0) + _cv_loss(kind, X_train, target, draws[d], plans[d][1], p, f)
        for d in set(owner):
            chosen[d] = min(lambdas, key=lambda lv, d=d: (losses[(d, lv)], -lv))  # ties: the stronger penalty
    idx, mask = _pad(list(draws))
    params = _solve(kind, X_train, target, idx, mask, chosen, n_classes)
    return _scores(kind, X_score, params), chosen


# ----------------------------------------------------------------------------------------------------------------------
# Metrics vectorised over draws: y (n,), predictions (n, D) (or (n, D, C) probabilities); each returns (D,)


def _avg_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank) of each column of (n, D) ``x``."""
    n = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, 0)
    pos = np.arange(n)[:, None].repeat(x.shape[1], 1)
    new = np.ones_like(xs, dtype=bool)
    new[1:] = xs[1:] != xs[:-1]
    start = np.maximum.accumulate(np.where(new, pos, 0), axis=0)
    end_new = np.ones_like(xs, dtype=bool)
    end_new[:-1] = xs[1:] != xs[:-1]
    end = np.minimum.accumulate(np.where(end_new, pos, n - 1)[::-1], axis=0)[::-1]
    ranks = np.empty_like(xs, dtype=np.float64)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, 0)
    return ranks


def auc_cols(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Binary AUC (ties count half) of each column of ``score`` for 0/1 ``y``; cases with NaN ``y`` are ignored."""
    keep = np.isfinite(y)
    y, score = y[keep].astype(bool), score[keep]
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return np.full(score.shape[1], np.nan)
    r = _avg_ranks(score)
    return (r[y].sum(0) - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def balanced_accuracy_cols(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Mean per-class recall of each column of class predictions (n, D), over the classes present in ``y``."""
    y = y.astype(np.int64)
    return np.mean([(pred[y == c] == c).mean(0) for c in np.unique(y)], axis=0)


def mae_cols(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return np.abs(pred - y[:, None]).mean(0)


def cindex(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> np.ndarray:
    """Harrell's C of each column of ``risk`` (higher risk = earlier event); ties in risk count half."""
    comparable = (time[:, None] < time[None, :]) & (event[:, None] > 0)  # i had the event before j's time
    if not comparable.any():
        return np.full(risk.shape[1], np.nan)
    i, j = np.nonzero(comparable)
    ri, rj = risk[i], risk[j]
    return ((ri > rj).sum(0) + 0.5 * (ri == rj).sum(0)) / len(i)


def mean_metric(name: str) -> Callable[..., float]:
    """``f(predictions, y) -> mean over draws`` of metric ``name``: the per-resample estimand of a cell.

    predictions: (n, D) for mae / auc (the positive-class score) / balanced_accuracy (class indices)."""
    fn = {"mae": mae_cols, "auc": auc_cols, "balanced_accuracy": balanced_accuracy_cols}[name]
    if name == "mae":
        return lambda pred, y: float(np.mean(fn(y, pred)))

    def f(pred: np.ndarray, y: np.ndarray) -> float:
        v = fn(y, pred)
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    return f


# ----------------------------------------------------------------------------------------------------------------------
# Bootstrap


def _local_bootstrap(metric, *arrays, groups=None, strata=None, n_boot=1000, seed=0, alpha=0.05):
    """Subject-clustered, stratified percentile bootstrap (same contract as ``metrics.bootstrap_ci``)."""
    arrs = [np.asarray(a) for a in arrays]
    n = len(arrs[0])
    g = np.asarray(groups if groups is not None else np.arange(n), dtype=object)
    s = np.asarray(strata if strata is not None else np.zeros(n), dtype=object)
    s = np.array(["nan" if isinstance(v, float) and np.isnan(v) else str(v) for v in s], dtype=object)
    subj = list(dict.fromkeys(g.tolist()))
    rows = {k: np.flatnonzero(g == k) for k in subj}
    stratum = {k: s[rows[k][0]] for k in subj}
    by = [np.array([k for k in subj if stratum[k] == v], dtype=object) for v in sorted(set(stratum.values()))]
    rng = np.random.default_rng(seed)
    est = float(metric(*arrs))
    vals = []
    for _ in range(n_boot):
        take = np.concatenate([rows[k] for ids in by for k in ids[rng.integers(0, len(ids), len(ids))]])
        vals.append(metric(*(a[take] for a in arrs)))
    vals = np.asarray(vals, dtype=float)
    finite = vals[np.isfinite(vals)]
    if len(finite) < 0.9 * len(vals) or not len(finite):
        return est, float("nan"), float("nan")
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return est, float(lo), float(hi)


def _bootstrap_fn() -> tuple[Callable[..., Any], str]:
    """The platform's clustered, stratified ``bootstrap_ci`` when installed, else the local one."""
    try:
        from brainiac.models.tasks.metrics import bootstrap_ci

        params = inspect.signature(bootstrap_ci).parameters
        if "groups" in params and "strata" in params:
            return bootstrap_ci, "brainiac.models.tasks.metrics.bootstrap_ci"
    except ImportError:  # pragma: no cover
        pass
    return _local_bootstrap, "bench/fewshot_stats._local_bootstrap"


def compare(metric: str, y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, groups: Sequence[str],
            strata: np.ndarray | None, n_boot: int = 1000, seed: int = 0,
            alpha: float = 0.05) -> dict[str, tuple[float, float, float]]:  # fmt: skip
    """Mean over draws of ``metric`` for encoders a and b and their difference a − b, each (estimate, low, high).

    All three use the same ``seed``, hence the same resamples of subjects: the difference is paired.
    """
    boot, _ = _bootstrap_fn()
    f = mean_metric(metric)
    kw = dict(groups=np.asarray(groups, dtype=object), strata=strata, n_boot=n_boot, seed=seed, alpha=alpha)
    a = boot(f, pred_a, y, **kw)
    b = boot(f, pred_b, y, **kw)
    k = pred_a.shape[1]
    both = np.concatenate([pred_a, pred_b], 1)
    diff = boot(lambda p, yy: f(p[:, :k], yy) - f(p[:, k:], yy), both, y, **kw)
    return {"a": tuple(map(float, a)), "b": tuple(map(float, b)), "diff": tuple(map(float, diff))}


def bootstrap_source() -> str:
    return _bootstrap_fn()[1]
