"""Test-metric intervals of ``brainiac evaluate`` and the fine-tuning report: subject-clustered, class-stratified
bootstrap (#19 defect 5) and one estimand with its own interval for the mean over seeds (#19 defect 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brainiac.jobs.finetune.engine import score
from brainiac.jobs.finetune.evaluate import CaseScorer, case_strata, metric_cis, seed_mean_cis
from brainiac.models.tasks.spec import task_spec


def _idh(n: int = 40, positives: int = 3, seed: int = 0):
    """A binary test split with few positives: an unstratified bootstrap often loses all of them."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=np.float32)
    y[:positives] = 1
    p = np.clip(0.3 + 0.3 * y + 0.2 * rng.normal(size=n), 0.01, 0.99).astype(np.float32)
    return task_spec("idh"), p, y, y.copy()


def test_metric_cis_stratifies_by_class_so_a_rare_class_keeps_its_auc_interval() -> None:
    spec, p, y, raw = _idh()
    out = metric_cis(spec, p, y, raw, n_boot=300)
    assert out["auc"]["value"] == score(spec, p, y, raw)["auc"]
    assert np.isfinite([out["auc"]["low"], out["auc"]["high"]]).all()
    assert out["auc"]["low"] <= out["auc"]["value"] <= out["auc"]["high"]
    # Without strata ~8 % of resamples have no positive: more than 10 % of them undefined would be refused, not hidden.
    spec, p, y, raw = _idh(n=30, positives=1)
    unstratified = metric_cis(spec, p, y, raw, n_boot=300, strata=np.zeros(30))
    assert math.isnan(unstratified["auc"]["low"]) and math.isnan(unstratified["auc"]["high"])
    assert np.isfinite(metric_cis(spec, p, y, raw, n_boot=300)["auc"]["low"])


def test_metric_cis_resamples_subjects_not_scans() -> None:
    # Four identical scans per subject: one subject's evidence, so the interval is as wide as with one scan each.
    spec = task_spec("brain_age")
    rng = np.random.default_rng(0)
    y = rng.uniform(20, 80, size=25).astype(np.float32)
    p = (y + rng.normal(scale=8, size=25)).astype(np.float32)
    subjects = np.repeat([f"sub-{i}" for i in range(25)], 4)
    width = lambda r: r["mae"]["high"] - r["mae"]["low"]  # noqa: E731
    single = metric_cis(spec, p, y, y, n_boot=600)
    per_case = metric_cis(spec, np.repeat(p, 4), np.repeat(y, 4), np.repeat(y, 4), n_boot=600)
    per_subject = metric_cis(spec, np.repeat(p, 4), np.repeat(y, 4), np.repeat(y, 4), n_boot=600, groups=subjects)
    assert width(per_case) < 0.7 * width(single)
    assert width(per_subject) == pytest.approx(width(single), rel=0.2)


def test_case_strata_follow_the_task_kind() -> None:
    y = np.array([0.0, 1.0, np.nan])
    assert case_strata(task_spec("survival"), y) is not None
    assert case_strata(task_spec("sequence"), np.array([0, 3, 2])).tolist() == [0, 3, 2]
    assert case_strata(task_spec("brain_age"), y) is None
    assert case_strata(task_spec("segmentation"), y) is None


def test_seed_mean_cis_reports_the_mean_of_seed_scores_inside_its_own_interval() -> None:
    # Three seeds of a weak multiclass model: the seed-averaged prediction (an ensemble) scores higher than the mean of
    # the seeds' scores; the reported value is the latter, and the interval is the bootstrap of that same quantity.
    spec = task_spec("sequence")
    rng = np.random.default_rng(4)
    n = 60
    y = np.repeat(np.arange(4), n // 4)
    seeds = []
    for _ in range(3):
        logits = rng.normal(size=(n, 4))
        logits[np.arange(n), y] += 0.6
        seeds.append(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    subjects = [f"sub-{i // 2}" for i in range(n)]
    out = seed_mean_cis(spec, seeds, y, y, subjects, n_boot=300, seed=1)
    for metric in spec.metrics:
        per_seed = [score(spec, s, y, y)[metric] for s in seeds]
        r = out[metric]
        assert r["seeds"] == pytest.approx(per_seed)
        assert r["mean"] == pytest.approx(np.mean(per_seed))
        assert r["low"] <= r["mean"] <= r["high"]
    assert out == seed_mean_cis(spec, seeds, y, y, subjects, n_boot=300, seed=1)
    one = seed_mean_cis(spec, seeds[:1], y, y, subjects, n_boot=300, seed=1)["balanced_accuracy"]
    single = metric_cis(spec, seeds[0], y, y, n_boot=300, seed=1, groups=subjects)["balanced_accuracy"]
    assert (one["mean"], one["low"], one["high"]) == (single["value"], single["low"], single["high"])


def test_case_scorer_matches_score_for_segmentation_on_a_resample() -> None:
    spec = task_spec("segmentation")
    rng = np.random.default_rng(0)
    targets = np.zeros((5, 8, 8, 8), dtype=np.uint8)
    targets[:, 2:5, 2:5, 2:5] = 1
    targets[4] = 0  # an empty target: HD95 undefined for that case
    predictions = rng.uniform(size=(5, 8, 8, 8)).astype(np.float32) * targets * 0.9 + 0.3 * rng.uniform(
        size=(5, 8, 8, 8)
    )
    idx = np.array([0, 0, 3, 4, 1])
    scorer = CaseScorer(spec, predictions, targets, np.zeros(5))
    assert scorer(idx) == pytest.approx(score(spec, predictions[idx], targets[idx], np.zeros(5)))
    assert scorer() == pytest.approx(score(spec, predictions, targets, np.zeros(5)))
