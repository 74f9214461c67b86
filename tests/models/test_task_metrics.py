"""Task metrics and the Cox loss against brute-force definitions and hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brainiac.models.tasks.losses import cox_partial_likelihood_loss
from brainiac.models.tasks.metrics import (
    METRICS,
    Resampler,
    auc,
    balanced_accuracy,
    bootstrap_ci,
    concordance_index,
    dice,
    f1,
    hd95,
    macro_auc,
    mae,
    paired_bootstrap,
)


def pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC by its definition: P(score of a positive > score of a negative), ties counting one half."""
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def brute_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C with two explicit loops."""
    conc = comp = 0.0
    for i in range(len(time)):
        if not event[i]:
            continue
        for j in range(len(time)):
            if time[i] < time[j]:
                comp += 1
                if risk[i] > risk[j]:
                    conc += 1
                elif risk[i] == risk[j]:
                    conc += 0.5
    return conc / comp


def brute_cox(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Negative Breslow partial log-likelihood averaged over events, one risk set at a time."""
    terms = [risk[i] - math.log(np.exp(risk[time >= time[i]]).sum()) for i in range(len(time)) if event[i]]
    return -float(np.mean(terms))


def cube(shape: tuple[int, int, int], lo: tuple[int, int, int], size: int) -> np.ndarray:
    """A boolean volume holding one ``size``-voxel cube with its corner at ``lo``."""
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = True
    return m


# --- AUC ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    y = rng.integers(0, 2, size=n)
    # Few distinct integer scores, shifted up by 1 for a random half of the positives: some signal, and many ties
    # within and across classes.
    s = (rng.integers(0, 8, size=n) + y * rng.integers(0, 2, size=n)).astype(float)
    assert np.isin(s[y == 1], s[y == 0]).mean() > 0.5  # cross-class ties really occur
    assert auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)


def test_auc_extremes_and_undefined() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError):
        auc([0, 2, 1], [0.1, 0.2, 0.3])


def test_macro_auc_perfect_and_reversed() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=60)
    onehot = np.eye(4)[y]
    assert macro_auc(y, onehot + 0.01 * rng.random((60, 4))) == pytest.approx(1.0)
    assert macro_auc(y, -onehot) == pytest.approx(0.0)


def test_macro_auc_is_mean_of_one_vs_rest_over_present_classes() -> None:
    rng = np.random.default_rng(1)
    y = rng.choice([0, 1, 3], size=80)  # class 2 absent: no AUC, not averaged
    scores = rng.normal(size=(80, 4))
    expected = np.mean([pairwise_auc((y == c).astype(int), scores[:, c]) for c in (0, 1, 3)])
    assert macro_auc(y, scores) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(macro_auc(np.zeros(5, dtype=int), scores[:5]))  # only one class: every AUC undefined


# --- Classification and regression --------------------------------------------------------------------------------------


def test_balanced_accuracy_by_hand() -> None:
    # 8 of class 0 (6 right), 2 of class 1 (1 right), 2 of class 2 (0 right); class 3 only predicted.
    y_true = np.array([0] * 8 + [1] * 2 + [2] * 2)
    y_pred = np.array([0] * 6 + [1, 3] + [1, 0] + [0, 3])
    # recalls 6/8, 1/2, 0/2 -> mean 0.4166..., whereas plain accuracy is 7/12.
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert balanced_accuracy(y_true, y_true) == 1.0


def test_f1_and_mae_by_hand() -> None:
    y = np.array([1, 1, 1, 0, 0, 0])
    p = np.array([1, 1, 0, 1, 0, 0])  # TP 2, FN 1, FP 1 -> 4 / 6
    assert f1(y, p) == pytest.approx(2 / 3)
    assert math.isnan(f1([0, 0], [0, 0]))
    assert mae([30.0, 40.0, 50.0], [32.0, 37.0, 50.0]) == pytest.approx(5 / 3)


# --- Survival --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_c_index_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 120
    time = rng.integers(1, 40, size=n).astype(float)  # tied times
    event = rng.random(n) < 0.6  # ~40 % censored
    risk = np.round(-time / 10 + rng.normal(size=n), 1)  # tied risks, informative
    c = concordance_index(time, event, risk)
    assert c == pytest.approx(brute_c_index(time, event, risk), abs=1e-12)
    assert c > 0.6


def test_c_index_perfect_reversed_and_undefined() -> None:
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 0, 1])
    assert concordance_index(time, event, -time) == 1.0
    assert concordance_index(time, event, time) == 0.0
    assert math.isnan(concordance_index(time, np.zeros(4), -time))


def test_cox_loss_matches_brute_force_with_ties_and_censoring() -> None:
    rng = np.random.default_rng(0)
    n = 50
    time = rng.integers(1, 15, size=n).astype(float)
    event = (rng.random(n) < 0.7).astype(float)
    risk = rng.normal(size=n)
    loss = cox_partial_likelihood_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event))
    assert loss.item() == pytest.approx(brute_cox(risk, time, event), rel=1e-10)


def test_cox_loss_prefers_risk_ordered_like_survival() -> None:
    time = torch.arange(1.0, 21.0)
    event = torch.ones(20)
    event[::3] = 0
    good = cox_partial_likelihood_loss(-time / 2, time, event)  # shorter survival -> higher risk
    flat = cox_partial_likelihood_loss(torch.zeros(20), time, event)
    bad = cox_partial_likelihood_loss(time / 2, time, event)
    assert good < flat < bad


def test_cox_loss_gradient_matches_finite_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    risk = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True)
    time = torch.tensor([5, 3, 3, 8, 1, 9, 9, 9, 2, 7, 4, 6], dtype=torch.float64)  # with ties
    event = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda r: cox_partial_likelihood_loss(r, time, event), (risk,))


def test_cox_loss_without_events_is_zero_with_grad() -> None:
    risk = torch.randn(5, requires_grad=True)
    loss = cox_partial_likelihood_loss(risk, torch.arange(5.0), torch.zeros(5))
    assert loss.item() == 0.0
    loss.backward()
    assert risk.grad is not None and torch.all(risk.grad == 0)


# --- Segmentation -----------------------------------------------------------------------------------------------------


def test_dice_and_hd95_on_shifted_cubes() -> None:
    target = cube((24, 24, 24), (6, 6, 6), 10)
    pred = cube((24, 24, 24), (8, 6, 6), 10)  # shifted by 2 voxels along axis 0
    assert dice(pred, target) == pytest.approx(2 * 800 / 2000)  # overlap 8x10x10 of two 1000-voxel cubes
    assert hd95(pred, target) == pytest.approx(2.0)
    assert hd95(pred, target, spacing=(2.0, 2.0, 2.0)) == pytest.approx(4.0)
    assert hd95(pred, target, spacing=(2.0, 1.0, 1.0)) == pytest.approx(4.0)  # only the shifted axis's spacing counts
    assert hd95(pred, target, spacing=(1.0, 3.0, 3.0)) == pytest.approx(2.0)


def test_dice_and_hd95_identical_and_empty_masks() -> None:
    target = cube((16, 16, 16), (4, 4, 4), 6)
    empty = np.zeros_like(target)
    assert dice(target, target) == 1.0
    assert hd95(target, target) == 0.0
    assert dice(empty, empty) == 1.0
    assert dice(empty, target) == 0.0
    assert math.isnan(hd95(empty, target))
    assert math.isnan(hd95(target, empty))
    assert math.isnan(hd95(empty, empty))


# --- Bootstrap --------------------------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_estimate_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=100)
    s = y + rng.normal(size=100)
    est, low, high = bootstrap_ci(auc, y, s, n_boot=300, seed=3)
    assert est == auc(y, s)
    assert low < est < high
    assert bootstrap_ci(auc, y, s, n_boot=300, seed=3) == (est, low, high)
    assert bootstrap_ci(auc, y, s, n_boot=300, seed=4) != (est, low, high)


def test_bootstrap_ci_narrows_with_more_data() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 1000):
        y = rng.normal(size=n)
        p = y + rng.normal(size=n)
        _, low, high = bootstrap_ci(mae, y, p, n_boot=300)
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # ~sqrt(1000 / 40) = 5 times narrower


def test_bootstrap_ci_refuses_an_interval_narrowed_by_dropped_nan_resamples() -> None:
    # One positive in 30: a case bootstrap loses it in ~36 % of resamples. Dropping those would quote the interval of the
    # lucky resamples only; the interval is (NaN, NaN) instead. Stratified by class, every resample keeps the positive.
    y = np.zeros(30, dtype=int)
    y[0] = 1
    s = np.linspace(0, 1, 30)[::-1].copy()
    est, low, high = bootstrap_ci(auc, y, s, n_boot=200)
    assert est == 1.0 and math.isnan(low) and math.isnan(high)
    assert bootstrap_ci(auc, y, s, strata=y, n_boot=200) == (1.0, 1.0, 1.0)


def test_stratified_bootstrap_never_loses_a_class() -> None:
    # 3 positives among 40: an unstratified resample loses all of them ~8 % of the time (and ~1/3 keep only one).
    rng = np.random.default_rng(1)
    y = np.zeros(40, dtype=int)
    y[:3] = 1
    s = y * 0.5 + rng.normal(size=40)
    design = Resampler.build(40, strata=y)
    for idx in design.indices(500, seed=0):
        assert len(idx) == 40 and y[idx].sum() == 3
        assert not math.isnan(auc(y[idx], s[idx]))
    est, low, high = bootstrap_ci(auc, y, s, strata=y, n_boot=500)
    assert np.isfinite([low, high]).all() and low <= est <= high


def test_cluster_bootstrap_counts_copies_of_a_subject_once() -> None:
    # Every subject's case copied 4 times: a case bootstrap sees 4x the data and narrows the interval ~2x; resampling
    # subjects gives the interval of the 30 distinct subjects, as wide as on the undup'd data.
    rng = np.random.default_rng(0)
    y = rng.normal(size=30)
    p = y + rng.normal(size=30)
    subjects = np.repeat(np.arange(30), 4)
    yd, pd = np.repeat(y, 4), np.repeat(p, 4)
    _, lo1, hi1 = bootstrap_ci(mae, y, p, n_boot=800)
    _, loc, hic = bootstrap_ci(mae, yd, pd, n_boot=800)
    _, log, hig = bootstrap_ci(mae, yd, pd, groups=subjects, n_boot=800)
    assert (hic - loc) < 0.7 * (hi1 - lo1)
    assert (hig - log) > 1.4 * (hic - loc)
    assert abs((hig - log) - (hi1 - lo1)) < 0.2 * (hi1 - lo1)


def test_cluster_bootstrap_takes_all_cases_of_a_drawn_subject_and_strata_by_subject() -> None:
    subjects = np.array(["a", "a", "b", "c", "c", "c", "d"])
    labels = np.array([1, 1, 0, 1, 1, 0, 0])  # c's majority label is 1
    design = Resampler.build(7, subjects, labels)
    assert sorted(len(g) for g in design.strata_groups) == [2, 2]
    for idx in design.indices(50, seed=2):
        drawn = subjects[idx]
        for sub in set(drawn):
            assert (drawn == sub).sum() % (subjects == sub).sum() == 0
        assert len({s for s in drawn if s in "ac"}) >= 1 and len({s for s in drawn if s in "bd"}) >= 1


def test_bootstrap_nan_strata_form_their_own_stratum_and_seed_determines() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0.0, 1.0, np.nan] * 10)
    s = rng.normal(size=30)
    groups = np.arange(30) // 2

    def known_auc(t, x):
        keep = np.isfinite(t)
        return auc(t[keep].astype(int), x[keep])

    a = bootstrap_ci(known_auc, y, s, groups=np.arange(30), strata=y, n_boot=200, seed=5)
    assert np.isfinite(a).all()
    assert a == bootstrap_ci(known_auc, y, s, groups=np.arange(30), strata=y, n_boot=200, seed=5)
    assert a != bootstrap_ci(known_auc, y, s, groups=np.arange(30), strata=y, n_boot=200, seed=6)
    # subjects of mixed labels (pairs of cases): still resampled whole; determinism holds too
    b = bootstrap_ci(known_auc, y, s, groups=groups, strata=y, n_boot=200, seed=5)
    assert b == bootstrap_ci(known_auc, y, s, groups=groups, strata=y, n_boot=200, seed=5)


def test_paired_bootstrap_detects_a_consistent_difference() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=60)
    noise = rng.normal(size=60)
    good, bad = y * 1.5 + noise, y * 0.2 + noise
    est, low, high = paired_bootstrap(auc, (y, good), (y, bad), strata=y, n_boot=400)
    assert est == auc(y, good) - auc(y, bad)
    assert 0 < low <= est <= high
    # the same model against itself: exactly zero on every resample
    assert paired_bootstrap(auc, (y, good), (y, good), n_boot=50) == (0.0, 0.0, 0.0)


def test_registry_names() -> None:
    assert set(METRICS) == {"balanced_accuracy", "macro_auc", "auc", "f1", "mae", "c_index", "dice", "hd95"}
    assert METRICS["c_index"] is concordance_index
