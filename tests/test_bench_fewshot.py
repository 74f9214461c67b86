"""The pure parts of the few-shot bench (bench/fewshot_stats.py, bench/fewshot.py): draws, heads, metrics, bootstrap.

Fast and Ray-free: the bench's statistics are only trustworthy if these hold. The end-to-end ``--preset smoke`` run
(synth → ingest → preprocess → pretrain → embed → heads, ~5 min on 2 cores; its own Ray in a subprocess) is
``test_smoke_preset`` below.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


stats = _load("fewshot_stats")
fewshot = _load("fewshot")


def _task_data(kind: str = "binary", per_scan: bool = False, n_subjects: int = 60, scans: int = 3):
    """A TaskData without volumes: subjects with ``scans`` cases each, labels by subject, splits by subject."""
    from dataclasses import replace

    from brainiac.jobs.finetune.data import TaskData
    from brainiac.models.tasks.spec import load_specs

    spec = load_specs()["sequence" if kind == "multiclass" else "idh"]
    spec = replace(spec, per_scan=per_scan)
    rng = np.random.default_rng(0)
    case_ids, subjects, split, targets = [], [], [], []
    for s in range(n_subjects):
        sub = f"sub{s:03d}"
        sp = ["train", "train", "val", "test"][s % 4]
        for j in range(scans):
            case_ids.append(f"{sub}/{j}")
            subjects.append(sub)
            split.append(sp)
            targets.append(int(rng.integers(0, 4)) if kind == "multiclass" else float(s % 2))
    n = len(case_ids)
    dtype = np.int64 if kind == "multiclass" else np.float32
    return TaskData(spec=spec, case_ids=case_ids, scan_ids=case_ids, subjects=subjects, datasets=["d"] * n,
                    split=split, inputs=np.zeros((n, 1, 1, 1, 1), np.float16), targets=np.asarray(targets, dtype),
                    raw=np.asarray(targets, float), preprocess_version="v", volumes_version=0)  # fmt: skip


@pytest.mark.parametrize("kind,k", [("binary", 1), ("binary", 5), ("multiclass", 5)])
def test_draws_have_exactly_k_cases_per_class_and_never_a_scored_subject(kind, k):
    data = _task_data(kind, per_scan=kind == "multiclass")
    scored = fewshot.scored_indices(data)
    scored_subjects = {data.subjects[i] for i in scored}
    draws = fewshot.regime_draws(data, f"shots={k}", n_draws=20, seed=0)
    assert len(draws) == 20
    assert len({tuple(d) for d in draws}) > 1  # seeded draws differ
    for d in draws:
        labels = data.targets[d]
        for c in np.unique(data.targets[data.indices("train")]):
            assert int((labels == c).sum()) == k
        assert not {data.subjects[i] for i in d} & scored_subjects
        assert all(data.split[i] == "train" for i in d)
    assert {data.split[i] for i in scored} == {"val", "test"}
    full = fewshot.regime_draws(data, "full", n_draws=20, seed=0)
    assert len(full) == 1 and len(full[0]) == len(data.indices("train"))
    frac = fewshot.regime_draws(data, "fraction=0.1", n_draws=5, seed=0)
    assert all(set(data.split[i] for i in d) == {"train"} for d in frac)


def test_paired_bootstrap_difference_is_zero_for_identical_predictions():
    rng = np.random.default_rng(1)
    n, draws = 80, 30
    y = np.repeat([0.0, 1.0], n // 2)
    groups = [f"s{i // 2}" for i in range(n)]  # two cases per subject (same class)
    pred = rng.normal(size=(n, draws)) + y[:, None]
    out = stats.compare("auc", y, pred, pred.copy(), groups, strata=y, n_boot=200, seed=0)
    assert out["diff"] == (0.0, 0.0, 0.0)
    est, low, high = out["a"]
    assert low < est < high and 0.6 < est < 1.0
    better = pred + 2.0 * y[:, None]  # a clearly better encoder: interval of the difference above 0
    out = stats.compare("auc", y, better, pred, groups, strata=y, n_boot=200, seed=0)
    assert out["diff"][1] > 0


def test_bootstrap_resamples_whole_subjects_within_class():
    y = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    groups = ["a", "a", "b", "c", "c"]
    seen = []

    def metric(pred, yy):
        seen.append((len(yy), int(yy.sum())))
        return 0.0

    stats._local_bootstrap(metric, np.zeros((5, 1)), y, groups=groups, strata=y, n_boot=50, seed=0)
    # subject a (class 0) is drawn once per resample with both its cases; class 1 keeps two subjects
    assert all(n0 == 2 for n0 in (n - pos for n, pos in seen[1:]))
    assert all(pos in (2, 3, 4) for _, pos in seen[1:])


def test_ridge_probe_recovers_a_linear_signal():
    rng = np.random.default_rng(2)
    n, d = 300, 10
    X = rng.normal(size=(n, d))
    beta = rng.normal(size=d)
    y = X @ beta + 3.0 + 0.1 * rng.normal(size=n)
    subjects = [f"s{i}" for i in range(n)]
    train, test = np.arange(200), np.arange(200, 300)
    draws = [train[rng.permutation(200)[:60]] for _ in range(4)]
    pred, lam = stats.fit_predict("ridge", X[:200], y[:200, None], subjects[:200], draws, X[test])
    assert pred.shape == (100, 4)
    assert np.all(stats.mae_cols(y[test], pred) < 0.3)  # noise 0.1; the label's spread is ~3
    assert np.all(lam <= 0.1)  # CV picks a weak penalty for a clean linear signal


def test_logistic_and_cox_heads_rank_the_right_way():
    rng = np.random.default_rng(3)
    n, d = 240, 6
    X = rng.normal(size=(n, d))
    z = X[:, 0] - 0.5 * X[:, 1]
    subjects = [f"s{i}" for i in range(n)]
    y3 = np.digitize(z, np.quantile(z, [1 / 3, 2 / 3])).astype(float)
    tr, te = np.arange(160), np.arange(160, n)
    draws = [np.concatenate([np.flatnonzero(y3[tr] == c)[:10] for c in range(3)]) for _ in range(2)]
    probs, _ = stats.fit_predict("logistic", X[tr], y3[tr, None], subjects[:160], draws, X[te], n_classes=3)
    assert probs.shape == (80, 2, 3)
    acc = stats.balanced_accuracy_cols(y3[te], probs.argmax(-1))
    assert np.all(acc > 0.6)
    time = np.exp(-z + 0.3 * rng.normal(size=n)) * 500  # higher z: earlier event
    event = (rng.random(n) < 0.8).astype(float)
    target = np.stack([time, event], 1)
    risk, _ = stats.fit_predict("cox", X[tr], target[tr], subjects[:160], [np.arange(160)], X[te])
    assert stats.cindex(time[te], event[te], risk)[0] > 0.75  # positive risk = earlier event: the sign is right


def test_vectorised_metrics_match_brute_force():
    from brainiac.models.tasks import metrics

    rng = np.random.default_rng(4)
    y = (rng.random(50) < 0.4).astype(float)
    s = np.round(rng.normal(size=(50, 3)), 1)  # ties
    for j in range(3):
        assert stats.auc_cols(y, s)[j] == pytest.approx(metrics.auc(y, s[:, j]))
    yc = rng.integers(0, 3, 50)
    pc = rng.integers(0, 3, (50, 3))
    for j in range(3):
        assert stats.balanced_accuracy_cols(yc, pc)[j] == pytest.approx(metrics.balanced_accuracy(yc, pc[:, j]))
    t, e = rng.exponential(size=50), (rng.random(50) < 0.7).astype(float)
    for j in range(3):
        assert stats.cindex(t, e, s)[:, None][j, 0] == pytest.approx(metrics.concordance_index(t, e, s[:, j]))


@pytest.mark.timeout(900)
def test_smoke_preset(tmp_path):
    """The whole bench at its smoke preset: a table with every task, the segmentation row marked out of protocol."""
    subprocess.run([sys.executable, str(BENCH / "fewshot.py"), "--preset", "smoke", "--work", str(tmp_path),
                    "--out", str(tmp_path / "out")], check=True, timeout=880)  # fmt: skip
    md = (tmp_path / "out" / "fewshot.md").read_text()
    assert "| segmentation |" in md and "out of this protocol" in md
    assert (tmp_path / "out" / "fewshot.json").is_file()
