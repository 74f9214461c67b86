"""The promotion gates, as pure functions of metrics and tags: absolute thresholds, a paired-bootstrap improvement over
the champion (or, for a first promotion, over the task's trivial baseline), no robustness regression, and matching
lineage.

Each gate returns a :class:`GateCheck` (name, passed, one-line detail), so the decision table, the version tags and the
model card all show the same reasons. Nothing here touches MLflow or the catalog.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from brainiac.models.tasks.spec import HIGHER_IS_BETTER, TaskSpec
from brainiac.platform.errors import UserError

__all__ = [
    "GateCheck",
    "absolute_gates",
    "access_gate",
    "baseline_gate",
    "baseline_predictions",
    "improvement_gate",
    "lineage_gate",
    "paired_improvement",
    "parse_gate",
    "robustness_gate",
]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_GATE = re.compile(r"^\s*([a-z_0-9]+)\s*(>=|<=|>|<)\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class GateCheck:
    """One gate's verdict."""

    name: str
    passed: bool
    detail: str


def parse_gate(text: str, spec: TaskSpec) -> tuple[str, str, float]:
    """``"auc>=0.7"`` → ``("auc", ">=", 0.7)``, checking that the task reports that metric.

    Raises:
        UserError: malformed text or a metric the task does not have.
    """
    m = _GATE.match(text)
    if m is None:
        raise UserError(f"gate '{text}' is not METRIC>=VALUE (or <=, >, <), e.g. '{spec.select_metric}>=0.7'")
    metric, op, value = m.group(1), m.group(2), float(m.group(3))
    if metric not in spec.metrics:
        raise UserError(f"gate '{text}': task {spec.name} reports {', '.join(spec.metrics)}, not {metric}")
    return metric, op, value


def absolute_gates(gates: Sequence[str], spec: TaskSpec, metrics: Mapping[str, Mapping[str, float]]) -> list[GateCheck]:
    """The candidate's point estimates against each ``METRIC OP VALUE`` gate (a NaN metric fails)."""
    checks = []
    for text in gates:
        metric, op, threshold = parse_gate(text, spec)
        value = metrics[metric]["value"]
        ok = bool(np.isfinite(value) and _OPS[op](value, threshold))
        checks.append(GateCheck(f"gate {metric}{op}{threshold:g}", ok, f"{metric} = {value:.4g}"))
    return checks


def paired_improvement(
    spec: TaskSpec,
    metric: str,
    candidate: np.ndarray,
    champion: np.ndarray,
    targets: np.ndarray,
    raw: np.ndarray,
    *,
    n_boot: int,
    confidence: float,
    seed: int = 0,
    groups: Sequence[str] | np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> dict[str, float]:
    """Improvement of the candidate over a reference (the champion, or the trivial baseline of a first promotion) on
    ``metric`` (positive = better, whatever the metric's direction), with a paired percentile-bootstrap interval.

    Both models are scored on the same resampled cases, so the shared difficulty of the test cases cancels and the
    interval is far tighter than comparing two separate CIs. Whole subjects are resampled (``groups``: the subject of
    each case; ``None`` = each case its own) within each class (``strata``; ``None`` = the task's class,
    :func:`~brainiac.jobs.finetune.evaluate.case_strata`): scans of one subject are not independent evidence, and every
    resample keeps every class. More than 10 % undefined resamples give NaN bounds, which fail the gate.
    """
    from brainiac.jobs.finetune.evaluate import CaseScorer, case_strata
    from brainiac.models.tasks.metrics import Resampler, percentile_interval

    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    cand, ref = CaseScorer(spec, candidate, targets, raw), CaseScorer(spec, champion, targets, raw)

    def delta(idx: np.ndarray | None = None) -> float:
        return sign * (cand(idx)[metric] - ref(idx)[metric])

    value = float(delta())
    if len(targets) < 2:
        return {"value": value, "low": math.nan, "high": math.nan}
    design = Resampler.build(len(targets), groups, case_strata(spec, targets) if strata is None else strata)
    values = np.array([delta(idx) for idx in design.indices(n_boot, seed)], dtype=np.float64)
    low, high = percentile_interval(values, alpha=1.0 - confidence)
    return {"value": value, "low": low, "high": high}


def baseline_predictions(spec: TaskSpec, train_targets: np.ndarray, test_targets: np.ndarray) -> tuple[np.ndarray, str]:
    """The task's trivial baseline on the test cases, and a phrase naming it: what a model that ignores the image would
    predict, knowing only the training labels.

    Multiclass: the training-class prior for every case (its argmax is the majority class: balanced accuracy 1/k,
    macro AUC 0.5). Binary and survival: the training prior P(positive) for every case (AUC and C-index 0.5).
    Regression: the training mean (its MAE is what "predict the average" costs). Segmentation: an empty mask (Dice 0
    wherever there is a tumour). Predicted on the same test cases as the candidate, so the paired bootstrap applies.
    """
    n = len(test_targets)
    train = np.asarray(train_targets)
    if spec.kind == "multiclass":
        k = len(spec.classes)
        counts = np.bincount(train.astype(np.int64), minlength=k)[:k].astype(np.float64) if len(train) else np.ones(k)
        prior = counts / counts.sum()
        return np.tile(
            prior.astype(np.float32), (n, 1)
        ), f"constant training-class prior (majority {spec.classes[int(prior.argmax())]})"
    if spec.kind == "binary":
        known = train[np.isfinite(train.astype(np.float64))] if len(train) else train
        prior = float(np.mean(known)) if len(known) else 0.5
        return np.full(n, prior, dtype=np.float32), f"constant training prior P(positive) = {prior:.3g}"
    if spec.kind == "regression":
        mean = float(np.mean(train)) if len(train) else 0.0
        return np.full(n, mean, dtype=np.float32), f"training mean {mean:.4g} {spec.units}".rstrip()
    return np.zeros(np.shape(test_targets), dtype=np.float32), "empty mask"


def baseline_gate(metric: str, improvement: Mapping[str, float], confidence: float, baseline: str) -> GateCheck:
    """Passes when the lower bound of the candidate's paired improvement over the trivial baseline is above 0: a first
    champion must be shown to do better than ignoring the image (a model at chance must never become champion)."""
    low = improvement["low"]
    ok = bool(np.isfinite(low) and low > 0)
    detail = (
        f"{metric} beats the baseline ({baseline}) by {improvement['value']:+.4g}, {confidence:.0%} CI "
        f"[{low:+.4g}, {improvement['high']:+.4g}] (needs lower bound > 0)"
    )
    return GateCheck("beats trivial baseline", ok, detail)


def improvement_gate(metric: str, improvement: Mapping[str, float], min_delta: float, confidence: float) -> GateCheck:
    """Passes when the lower bound of the improvement's interval reaches ``min_delta``."""
    low = improvement["low"]
    ok = bool(np.isfinite(low) and low >= min_delta)
    detail = (
        f"{metric} improves by {improvement['value']:+.4g}, {confidence:.0%} CI [{low:+.4g}, {improvement['high']:+.4g}]"
        f" (needs lower bound >= {min_delta:g})"
    )
    return GateCheck(f"improvement in {metric}", ok, detail)


def _artifact_means(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, float]:
    """Mean of ``metric`` over each artifact's non-zero strengths (strength 0 is the clean score)."""
    by: dict[str, list[float]] = {}
    for row in rows:
        value = row.get(metric)
        if row["strength"] and value is not None and np.isfinite(value):
            by.setdefault(str(row["artifact"]), []).append(float(value))
    return {a: float(np.mean(v)) for a, v in by.items()}


def robustness_gate(
    metric: str,
    candidate_rows: Sequence[Mapping[str, Any]],
    champion_rows: Sequence[Mapping[str, Any]],
    tolerance: float,
) -> tuple[list[GateCheck], dict[str, dict[str, float]]]:
    """One check per artifact: the candidate's mean ``metric`` under it may be at most ``tolerance`` worse than the
    champion's. Returns the checks and ``{artifact: {candidate, champion, change}}`` (change > 0 = better)."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    cand, champ = _artifact_means(candidate_rows, metric), _artifact_means(champion_rows, metric)
    checks, table = [], {}
    for artifact in sorted(set(cand) & set(champ)):
        change = sign * (cand[artifact] - champ[artifact])
        table[artifact] = {"candidate": cand[artifact], "champion": champ[artifact], "change": change}
        checks.append(
            GateCheck(
                f"robustness {artifact}",
                change >= -tolerance,
                f"{metric} {cand[artifact]:.4g} vs champion {champ[artifact]:.4g} ({change:+.4g}; tolerance {tolerance:g})",
            )
        )
    return checks, table


def lineage_gate(
    spec: TaskSpec, spec_hash: str, candidate: Mapping[str, str], champion: Mapping[str, str] | None
) -> GateCheck:
    """Same task and task spec, and a compatible (identical) ``preprocess_version``: a model fed differently
    preprocessed volumes than its champion was trained on would be compared, and served, on the wrong inputs."""
    problems = []
    if candidate.get("task") != spec.name:
        problems.append(f"candidate task tag is {candidate.get('task')!r}, not {spec.name!r}")
    if candidate.get("task_spec") and candidate["task_spec"] != spec_hash:
        problems.append(f"candidate was trained on task spec {candidate['task_spec']}, this release has {spec_hash}")
    if not candidate.get("preprocess_version"):
        problems.append("candidate records no preprocess_version")
    if champion is not None:
        if champion.get("task") != candidate.get("task"):
            problems.append(f"champion task {champion.get('task')!r} differs")
        if champion.get("task_spec") and candidate.get("task_spec") and champion["task_spec"] != candidate["task_spec"]:
            problems.append(f"task spec {candidate['task_spec']} differs from the champion's {champion['task_spec']}")
        if champion.get("preprocess_version") != candidate.get("preprocess_version"):
            problems.append(
                f"preprocess_version {candidate.get('preprocess_version')} differs from the champion's "
                f"{champion.get('preprocess_version')}"
            )
    detail = "; ".join(problems) or f"task {spec.name}, preprocess {candidate.get('preprocess_version')}"
    return GateCheck("lineage", not problems, detail)


def access_gate(candidate: Mapping[str, str], allowed: Sequence[str]) -> GateCheck:
    """The data access levels the candidate was trained on must all be allowed for this registry's deployments
    (``catalog.allowed_access``): a model trained on DUA-restricted data must not be promoted where that data may not go."""
    levels = [a for a in (candidate.get("access") or "").split(",") if a]
    beyond = sorted(set(levels) - set(allowed))
    detail = f"trained on {', '.join(levels) or 'unrecorded'} data; allowed {', '.join(allowed)}"
    return GateCheck("access", bool(levels) and not beyond, detail)
