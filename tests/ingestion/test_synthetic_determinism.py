"""Same seed, same bytes: every file of the cohort, the truth included, is reproducible; another seed differs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from brainiac.ingestion.synthetic import generate_cohort
from brainiac.platform.errors import UserError


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes(tmp_path):
    kwargs = dict(subjects=4, seed=5, cohorts=("brats", "dicom", "adni", "stroke"))  # includes a duplicate
    a = generate_cohort(tmp_path / "a", **kwargs)
    b = generate_cohort(tmp_path / "b", **kwargs)
    da, db = _digest(a.out_dir), _digest(b.out_dir)
    assert da.keys() == db.keys()
    assert [k for k in da if da[k] != db[k]] == []
    assert any(k.startswith("_truth/") for k in da) and any(k.endswith(".dcm") for k in da)
    assert any(k.endswith(".nii.gz") for k in da) and any(k.endswith(".nii") for k in da)
    c = generate_cohort(tmp_path / "c", subjects=1, seed=6, cohorts=("adni",))
    d = generate_cohort(tmp_path / "d", subjects=1, seed=5, cohorts=("adni",))
    assert _digest(c.out_dir) != _digest(d.out_dir)


def test_subject_draws_do_not_depend_on_cohort_size(tmp_path):
    """Subject i of a cohort is the same person whatever the number of subjects (per-subject random streams)."""
    import pandas as pd

    small = generate_cohort(tmp_path / "s", subjects=1, seed=3, cohorts=("adni",))
    large = generate_cohort(tmp_path / "l", subjects=2, seed=3, cohorts=("adni",))
    ts, tl = pd.read_csv(small.truth), pd.read_csv(large.truth)
    first = tl[tl.subject_uid == ts.subject_uid.iloc[0]]
    assert first.age_years.tolist() == ts.age_years.tolist()
    assert first.diagnosis.tolist() == ts.diagnosis.tolist()


def test_output_folder_rules(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a previous 'brainiac synth' output"):
        generate_cohort(foreign, subjects=1, seed=0, cohorts=("adni",))
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="unknown synth preset"):
        generate_cohort(tmp_path / "x", subjects=1, seed=0, preset="huge")
    with pytest.raises(UserError, match="unknown cohort"):
        generate_cohort(tmp_path / "x", subjects=1, seed=0, cohorts=("oasis",))
    with pytest.raises(UserError, match="at least 5"):
        generate_cohort(tmp_path / "x", subjects=2, seed=0)
    # a previous synth output is replaced, and only what synth wrote is removed
    out = tmp_path / "again"
    generate_cohort(out, subjects=1, seed=0, cohorts=("adni",))
    (out / "keep.txt").write_text("user file")
    again = generate_cohort(out, subjects=1, seed=1, cohorts=("stroke",))
    assert sorted(p.name for p in out.iterdir()) == ["_truth", "keep.txt", "synth-stroke-bids"]
    assert again.cohorts == {"stroke": "synth-stroke-bids"}
