"""Evaluation metrics of the fine-tuning engine, as plain functions over numpy arrays.

Every metric takes whole arrays of one split (one row per case) and returns a Python float, so that the engine can log it
to MLflow directly and :func:`bootstrap_ci` can resample subjects. A metric that is undefined on its input (an AUC with
only one class, a C-index without comparable pairs, an HD95 with an empty mask) returns NaN rather than raising; the
bootstrap stratifies by class so that this rarely happens, and counts the resamples where it still does.

Only numpy (and MONAI for the surface distance) is used: scikit-learn is deliberately not a dependency.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike

__all__ = [
    "MAX_NAN_FRACTION",
    "METRICS",
    "Resampler",
    "auc",
    "balanced_accuracy",
    "bootstrap_ci",
    "concordance_index",
    "dice",
    "f1",
    "hd95",
    "macro_auc",
    "mae",
    "paired_bootstrap",
    "percentile_interval",
]

MAX_NAN_FRACTION = 0.1
"""Largest fraction of bootstrap resamples on which a metric may be NaN before its interval is reported as NaN."""

_PAIR_BLOCK = 4_000_000
"""Largest number of (event, case) pairs the C-index compares at once, bounding its memory to a few tens of MB."""


def _vector(x: ArrayLike, name: str, dtype: type | None = None) -> np.ndarray:
    """``x`` as a 1-D array (a column vector or a scalar-per-case array of shape (n, 1) is flattened)."""
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    """Raise if the named arrays do not all have the same number of cases."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have the same length, got {lengths}")


def _binary(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as a 1-D boolean array, refusing values other than 0/1 (or False/True)."""
    arr = _vector(x, name)
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must contain only 0 and 1")
        arr = arr.astype(bool)
    return arr


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing the mean of their ranks (the 'average' tie method)."""
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], n]
    group_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = group_rank[np.cumsum(new_group) - 1]
    return ranks


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean per-class recall over the classes present in ``y_true``.

    Plain accuracy rewards predicting the majority class on imbalanced splits (e.g. the sequence task, where T1w dominates);
    averaging the recall of each true class weighs every class equally. Classes that are only predicted, never true, do
    not enter the mean (same convention as scikit-learn). NaN on empty input.
    """
    t = _vector(y_true, "y_true")
    p = _vector(y_pred, "y_pred")
    _same_length(y_true=t, y_pred=p)
    if len(t) == 0:
        return float("nan")
    recalls = [np.mean(p[t == c] == c) for c in np.unique(t)]
    return float(np.mean(recalls))


def auc(y_true: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve of a binary problem, via the Mann–Whitney U statistic.

    AUC is the probability that a random positive case scores higher than a random negative one, with ties counting one
    half. With average ranks over all scores, ``U = sum(ranks of positives) - n1 (n1 + 1) / 2`` counts exactly those pairs
    in O(n log n), so no threshold sweep is needed. NaN when ``y_true`` holds only one class (AUC undefined).
    """
    t = _binary(y_true, "y_true")
    s = _vector(score, "score", dtype=np.float64)
    _same_length(y_true=t, score=s)
    if np.isnan(s).any():
        raise ValueError("score contains NaN")
    n_pos = int(t.sum())
    n_neg = len(t) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def macro_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """One-vs-rest ROC AUC averaged over classes, for a multi-class problem.

    ``y_true`` holds class indices 0..k-1 and ``scores`` is (n, k) (logits or probabilities: AUC only uses their order).
    Class ``c``'s AUC ranks ``scores[:, c]`` of its cases against those of every other case. Only classes with both
    positives and negatives in ``y_true`` are averaged (the others have no AUC); NaN when no class qualifies. Unweighted
    macro averaging keeps rare classes as important as frequent ones, like :func:`balanced_accuracy`.
    """
    t = _vector(y_true, "y_true")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (n, k), got shape {s.shape}")
    _same_length(y_true=t, scores=s)
    k = s.shape[1]
    if len(t) and (t.min() < 0 or t.max() >= k or not np.array_equal(t, t.astype(np.int64))):
        raise ValueError(f"y_true must hold class indices in [0, {k})")
    per_class = [auc(t == c, s[:, c]) for c in range(k)]
    defined = [a for a in per_class if not np.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


def f1(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """F1 score of the positive class, ``2 TP / (2 TP + FP + FN)``.

    The harmonic mean of precision and recall, reported next to AUC for binary tasks (idh) because it judges the actual
    thresholded decisions. NaN when there are neither true nor predicted positives (F1 undefined; scikit-learn would
    return 0 with a warning), so that such bootstrap resamples are skipped.
    """
    t = _binary(y_true, "y_true")
    p = _binary(y_pred, "y_pred")
    _same_length(y_true=t, y_pred=p)
    tp = int(np.sum(t & p))
    fp = int(np.sum(~t & p))
    fn = int(np.sum(t & ~p))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else float("nan")


def mae(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean absolute error, in the label's unit (years for brain_age, days for stroke_onset).

    Robust to a few outliers and directly interpretable, which is why BrainIAC reports it for regression tasks.
    NaN on empty input.
    """
    t = _vector(y_true, "y_true", dtype=np.float64)
    p = _vector(y_pred, "y_pred", dtype=np.float64)
    _same_length(y_true=t, y_pred=p)
    if len(t) == 0:
        return float("nan")
    return float(np.mean(np.abs(t - p)))


def concordance_index(time: ArrayLike, event: ArrayLike, risk: ArrayLike) -> float:
    """Harrell's concordance index of a risk score against right-censored survival times.

    A pair (i, j) is comparable when case i had the event (``event[i] == 1``) strictly before j's time (event or
    censoring): ``time[i] < time[j]``. It is concordant when the model gives i the higher risk (higher risk means
    shorter survival), and a tie in risk counts one half. Pairs with equal times are not comparable. C is the
    concordant fraction of comparable pairs: 0.5 is chance, 1 is a perfect ranking. NaN when no pair is comparable.

    This is the metric of the Cox variant of the survival task: it scores the ranking, which is all a partial
    likelihood model learns. Pairs are compared in blocks of events, O(n^2) time but bounded memory.
    """
    t = _vector(time, "time", dtype=np.float64)
    e = _binary(event, "event")
    r = _vector(risk, "risk", dtype=np.float64)
    _same_length(time=t, event=e, risk=r)
    if np.isnan(t).any() or np.isnan(r).any():
        raise ValueError("time and risk must not contain NaN")
    events = np.flatnonzero(e)
    block = max(1, _PAIR_BLOCK // max(len(t), 1))
    concordant = 0.0
    comparable = 0
    for start in range(0, len(events), block):
        idx = events[start : start + block]
        comp = t[None, :] > t[idx, None]
        r_i = r[idx, None]
        concordant += np.sum(comp & (r_i > r[None, :])) + 0.5 * np.sum(comp & (r_i == r[None, :]))
        comparable += int(np.sum(comp))
    return float(concordant / comparable) if comparable else float("nan")


def _mask(x: ArrayLike) -> np.ndarray:
    """``x`` as a boolean mask (nonzero is foreground)."""
    arr = np.asarray(x)
    return arr if arr.dtype == bool else arr != 0


def dice(pred: ArrayLike, target: ArrayLike) -> float:
    """Dice overlap ``2 |P ∩ T| / (|P| + |T|)`` of two binary masks of the same shape.

    The standard volumetric overlap of the segmentation task. 1.0 when both masks are empty (the model correctly found
    nothing), 0.0 when exactly one is empty.
    """
    p = _mask(pred)
    t = _mask(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return float(2.0 * np.sum(p & t) / denom)


def hd95(pred: ArrayLike, target: ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance between two binary masks, in mm.

    Dice barely notices a thin false-positive blob far from the tumour; a boundary distance does, and the 95th percentile
    instead of the maximum keeps one stray voxel from dominating. Computed by MONAI's
    ``compute_hausdorff_distance(percentile=95)``: the surface (edge) voxels of each mask are extracted, the Euclidean
    distance (scaled by ``spacing``, one entry per axis, in mm) from every surface voxel of one mask to the nearest of
    the other is taken in both directions, and the result is the larger of the two directed 95th percentiles
    (``torch.quantile`` with linear interpolation).

    Returns NaN when either mask is empty, including both (the distance is undefined or infinite; MONAI itself warns
    and returns NaN there). Callers average over cases with ``np.nanmean`` and should report how many were NaN; when both
    masks are empty :func:`dice` is 1.0.
    """
    from monai.metrics import compute_hausdorff_distance

    p = _mask(pred)
    t = _mask(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing needs one entry per axis ({p.ndim}), got {spacing}")
    if not p.any() or not t.any():
        return float("nan")
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated `always_return_as_numpy` argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_hausdorff_distance(
            torch.from_numpy(np.ascontiguousarray(p))[None, None],
            torch.from_numpy(np.ascontiguousarray(t))[None, None],
            include_background=True,
            percentile=95,
            spacing=spacing,
        )
    return float(value.reshape(-1)[0])


def _stratum_key(label: object) -> object:
    """A hashable stratum key for one case's label; NaN and ``None`` share one key (cases without a class)."""
    if label is None:
        return _MISSING
    if isinstance(label, float | np.floating) and np.isnan(label):
        return _MISSING
    return label.item() if isinstance(label, np.generic) else label


_MISSING = ("<no stratum>",)
"""Stratum key of cases whose label is NaN or ``None`` (e.g. survival cases censored before the class threshold)."""


@dataclass(frozen=True)
class Resampler:
    """A subject-clustered, stratified bootstrap design over ``n`` cases, precomputed once.

    ``groups`` gives each case its subject: a resample draws whole subjects with replacement and takes all their cases,
    so cases that are not independent (several scans or sessions of one subject) are not counted as independent
    evidence, which would make intervals too narrow. ``strata`` gives each case its class: subjects are drawn within
    each stratum, keeping that stratum's number of subjects, so every resample holds every class and AUC-type metrics
    stay defined. A subject whose cases carry different labels is put in the stratum of its most frequent label
    (the first seen on a tie). NaN/``None`` labels form one stratum of their own.
    """

    n: int
    """Number of cases."""
    strata_groups: tuple[np.ndarray, ...]
    """Per stratum, the indices of its groups (subjects)."""
    starts: np.ndarray
    """Per group, where its cases start in :attr:`order`."""
    lengths: np.ndarray
    """Per group, how many cases it has."""
    order: np.ndarray
    """Case indices sorted by group."""

    @classmethod
    def build(cls, n: int, groups: ArrayLike | None = None, strata: ArrayLike | None = None) -> Resampler:
        """The design for ``n`` cases (``groups``/``strata``: one entry per case, or ``None``: each case its own group,
        one stratum)."""
        if groups is None:
            codes = np.arange(n, dtype=np.int64)
        else:
            g = list(np.asarray(groups, dtype=object).reshape(-1))
            if len(g) != n:
                raise ValueError(f"groups must have one entry per case ({n}), got {len(g)}")
            first: dict[object, int] = {}
            codes = np.fromiter((first.setdefault(x, len(first)) for x in g), dtype=np.int64, count=n)
        n_groups = int(codes.max()) + 1 if n else 0
        order = np.argsort(codes, kind="stable")
        lengths = np.bincount(codes, minlength=n_groups).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if n_groups else lengths
        if strata is None:
            strata_groups: tuple[np.ndarray, ...] = (np.arange(n_groups, dtype=np.int64),)
        else:
            s = list(np.asarray(strata, dtype=object).reshape(-1))
            if len(s) != n:
                raise ValueError(f"strata must have one entry per case ({n}), got {len(s)}")
            votes: list[Counter] = [Counter() for _ in range(n_groups)]
            for code, label in zip(codes, s, strict=True):
                votes[code][_stratum_key(label)] += 1
            by: dict[object, list[int]] = {}
            for gi, v in enumerate(votes):
                by.setdefault(v.most_common(1)[0][0], []).append(gi)  # most_common keeps first-seen order on ties
            strata_groups = tuple(np.asarray(ids, dtype=np.int64) for ids in by.values())
        return cls(n, strata_groups, starts, lengths, order)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Case indices of one resample: whole subjects drawn with replacement within each stratum."""
        chosen = np.concatenate(
            [ids[rng.integers(0, len(ids), size=len(ids))] for ids in self.strata_groups if len(ids)]
        )
        lengths = self.lengths[chosen]
        # all of each chosen group's cases: order[starts[g] : starts[g] + lengths[g]], concatenated without a loop
        offsets = np.repeat(self.starts[chosen] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return self.order[offsets + np.arange(int(lengths.sum()))]

    def indices(self, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
        """``n_boot`` resamples' case indices, deterministic for ``seed``."""
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            yield self.draw(rng)


def percentile_interval(
    values: np.ndarray, alpha: float = 0.05, max_nan_fraction: float = MAX_NAN_FRACTION
) -> tuple[float, float]:
    """Percentile interval of the resampled ``values``; (NaN, NaN) when more than ``max_nan_fraction`` of them are NaN
    (dropping them would leave an interval conditioned on the easy resamples, i.e. silently too narrow)."""
    finite = values[~np.isnan(values)]
    if len(finite) == 0 or (len(values) - len(finite)) > max_nan_fraction * len(values):
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _check(arrays: Sequence[ArrayLike], alpha: float) -> list[np.ndarray]:
    """The arrays as numpy arrays of one common length, refusing an empty list or an ``alpha`` outside (0, 1)."""
    if not arrays:
        raise ValueError("the bootstrap needs at least one array")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    arrs = [np.asarray(a) for a in arrays]
    if any(len(a) != len(arrs[0]) for a in arrs):
        raise ValueError(f"arrays must have the same length, got {[len(a) for a in arrs]}")
    return arrs


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays: ArrayLike,
    groups: ArrayLike | None = None,
    strata: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    max_nan_fraction: float = MAX_NAN_FRACTION,
) -> tuple[float, float, float]:
    """Point estimate of ``metric(*arrays)`` and its subject-clustered, stratified percentile bootstrap interval.

    Each of the ``n_boot`` resamples draws whole subjects (``groups``, one id per case; default: each case its own
    subject) with replacement within each stratum (``strata``, one class label per case; default: one stratum), takes
    all their cases, and applies the same indices to every array (so labels stay paired with predictions); see
    :class:`Resampler`. The ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled metric form the interval (95 %
    by default). Clustering by subject keeps repeated scans of one subject from counting as independent evidence;
    stratifying by class keeps every class in every resample, so AUC and balanced accuracy stay defined.

    Resamples on which the metric is still NaN are counted: up to ``max_nan_fraction`` of them (10 %) are left out,
    beyond that the interval is (NaN, NaN) — quoting the quantiles of only the well-behaved resamples would be a
    silently narrowed interval. For per-image metrics (Dice, HD95) pass the per-case values and ``np.nanmean`` as the
    metric. Deterministic for a given ``seed``.

    Returns ``(estimate, low, high)``.
    """
    arrs = _check(arrays, alpha)
    n = len(arrs[0])
    estimate = float(metric(*arrs))
    if n == 0:
        return estimate, float("nan"), float("nan")
    design = Resampler.build(n, groups, strata)
    values = np.array([metric(*(a[idx] for a in arrs)) for idx in design.indices(n_boot, seed)], dtype=np.float64)
    return (estimate, *percentile_interval(values, alpha, max_nan_fraction))


def paired_bootstrap(
    metric: Callable[..., float],
    a_arrays: Sequence[ArrayLike],
    b_arrays: Sequence[ArrayLike],
    *,
    groups: ArrayLike | None = None,
    strata: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    max_nan_fraction: float = MAX_NAN_FRACTION,
) -> tuple[float, float, float]:
    """``metric(*a_arrays) - metric(*b_arrays)`` with a paired bootstrap interval over the same resampled subjects.

    ``a_arrays`` and ``b_arrays`` describe the same cases (e.g. ``(candidate_predictions, targets)`` and
    ``(reference_predictions, targets)``); each resample (see :func:`bootstrap_ci` for ``groups``, ``strata`` and the
    NaN rule) scores both on the same cases, so the difficulty the two share cancels and the interval of the difference
    is far tighter than comparing two separate intervals. Positive means ``a`` scores higher; flip the sign for a
    lower-is-better metric. Returns ``(estimate, low, high)``.
    """
    arrs = _check([*a_arrays, *b_arrays], alpha)
    k = len(a_arrays)
    if k == 0 or k == len(arrs):
        raise ValueError("paired_bootstrap needs at least one array on each side")

    def delta(*xs: np.ndarray) -> float:
        return float(metric(*xs[:k])) - float(metric(*xs[k:]))

    return bootstrap_ci(delta, *arrs, groups=groups, strata=strata, n_boot=n_boot, seed=seed, alpha=alpha,
                        max_nan_fraction=max_nan_fraction)  # fmt: skip


METRICS: dict[str, Callable[..., float]] = {
    "balanced_accuracy": balanced_accuracy,
    "macro_auc": macro_auc,
    "auc": auc,
    "f1": f1,
    "mae": mae,
    "c_index": concordance_index,
    "dice": dice,
    "hd95": hd95,
}
"""Metrics by the names task specs use."""
