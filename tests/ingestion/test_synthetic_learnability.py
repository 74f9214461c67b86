"""Labels are learnable from voxels and only from voxels: the bench study at a fixed seed (bench/synth_learnability.py).

30 labelled cases per task; permutation tests with 149 permutations (smallest possible p = 1/150 < 0.01).
"""

from __future__ import annotations

import pytest


@pytest.mark.timeout(400)
def test_labels_learnable_and_not_leaked(synth_study, learnability):
    res = learnability.run_study(synth_study.out_dir, n_perm=149, n_shuffle=49, seed=0)
    report = "\n".join(r.line() for group in res.values() for r in group)
    learn = {r.task: r for r in res["learnable"]}
    assert set(learn) == {"sequence", "age", "mci", "idh", "stroke_onset"}
    for r in learn.values():
        assert r.n >= 30, report
        assert r.p < 0.01 and r.score > r.chance, report
    # Leakage family: header-only and header-shuffle per label, nuisance-only per cohort and label; Bonferroni.
    # The sequence label lives in file names by convention (BIDS suffix, BraTS t1/t2/...), so it is exempt there.
    family = [r for r in res["header_only"] + res["header_shuffle"] if not r.task.endswith(":sequence")]
    family += res["nuisance"]
    alpha = 0.01 / len(family)
    leaks = [r.line() for r in family if r.p < alpha]
    assert not leaks, report
    assert {r.cohort for r in res["nuisance"]} == {"bids", "adni", "brats", "stroke"}
