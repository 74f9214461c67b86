"""The scale harness (``bench/scale.py``) end to end at its smoke size: a ~200-scan pool of 34 datasets in four
layouts with planted cross-dataset copies, ingested twice; counts and duplicate groups must match the pool's truth."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def test_pool_plan_matches_the_real_pool_shape(tmp_path):
    pool = _load("scale_pool")
    pool.check_grids()  # small grids are duplicate candidates exactly when the real ones are
    assert pool.full_scans() == pool.REAL_TOTAL and len(pool.POOL) == 34
    assert {d.layout for d in pool.POOL} == {"bids", "brats", "manifest", "dicom"}
    plan = pool.plan_pool(tmp_path / "pool", 1000)
    assert abs(sum(plan.expected.values()) - 1000) < 150
    kinds = {t.transform for t in plan.tasks if t.transform}
    assert kinds == {"float", "crop", "flip", "nii"}
    # every planted group pairs an original with copies in other datasets
    for group in plan.groups:
        datasets = {Path(p).relative_to(tmp_path / "pool").parts[0] for p in group}
        assert len(datasets) == len(group) >= 2


@pytest.mark.timeout(240)
def test_smoke_run_finds_every_planted_copy_and_counts_match(ray_session, pseudonym_key, tmp_path):
    scale = _load("scale")
    lines: list[str] = []
    out = scale.run_size(200, tmp_path, echo=lines.append)
    truth_scans = out["scans"]
    assert out["datasets"] == 34 and 150 <= truth_scans <= 300
    ingest = out["ingest"]
    assert ingest["discovered"] == ingest["inserted"] == truth_scans and not ingest["quarantined"], ingest
    assert out["duplicates"] == {
        "planted": out["planted_groups"],
        "found": out["planted_groups"],
        "missed": 0,
        "false": 0,
        "ok": True,
    }
    assert out["planted_groups"] >= 4
    assert out["noop"]["inserted"] == 0 and out["noop"]["unchanged"] == truth_scans
    for phase in scale.PHASES:
        assert ingest["phases"][phase]["s"] is not None
    table = scale.markdown({"sizes": [out]})
    assert "| ingest: duplicates |" in table and "false groups 0" in table
