"""Tests never write to a shared session fixture: the guard in ``tests/conftest.py`` fails a test that changes the
``pipeline`` folder (a Delta commit, an MLflow row, any file) or a shared cohort's, names the test and what changed, and
blames the next test only for its own changes; a fork of the pipeline is writable. Run as an inner pytest session on the
real conftest, with cheap stand-ins for ``pipeline`` and ``synth_small`` (no Ray, no generated cohort)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

STAND_IN = '''

@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """Stands in for the Ray-built pipeline: one Delta table and an MLflow-like sqlite store in its folder."""
    import sqlite3

    import pyarrow as pa
    from deltalake import write_deltalake

    root = tmp_path_factory.mktemp("shared")
    write_deltalake(str(root / "catalog" / "volumes"), pa.table({"x": [1]}))
    con = sqlite3.connect(root / "mlflow.db")
    con.execute("CREATE TABLE experiments (name TEXT, artifact_location VARCHAR(256))")
    con.execute("INSERT INTO experiments VALUES ('tiny', ?)", ((root / "mlartifacts" / "tiny").as_uri(),))
    con.execute("CREATE TABLE runs (run_uuid VARCHAR(32))")
    con.commit()
    con.close()
    shared = TinyPipeline(root)  # its guard takes this state as the expected one
    yield shared
    shared.guard.verify("a fixture's teardown at the end of the session")


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """Stands in for the shared generated cohort: a folder with one image."""
    import types

    out = tmp_path_factory.mktemp("cohort")
    (out / "sub-01_T1w.nii").write_bytes(b"voxels")
    return types.SimpleNamespace(out_dir=out)
'''

INNER_TESTS = """
import sqlite3

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

pytestmark = pytest.mark.timeout(60)


def _append(root):
    write_deltalake(str(root / "catalog" / "volumes"), pa.table({"x": [2]}), mode="append")


def _log_run(db):
    con = sqlite3.connect(db)
    con.execute("INSERT INTO runs VALUES ('r1')")
    con.commit()
    con.close()


def test_a_reader_passes(pipeline):
    assert DeltaTable(str(pipeline.root / "catalog" / "volumes")).to_pyarrow_table().num_rows == 1


def test_a_delta_commit_fails(pipeline):
    _append(pipeline.root)


def test_an_mlflow_run_fails(pipeline):
    _log_run(pipeline.root / "mlflow.db")


def test_a_stray_file_fails(pipeline):
    (pipeline.root / "catalog" / "notes.txt").write_text("written by a test")


def test_the_next_reader_is_not_blamed_for_earlier_writes(pipeline):
    assert DeltaTable(str(pipeline.root / "catalog" / "volumes")).to_pyarrow_table().num_rows == 2


def test_a_write_before_a_stage_is_built_fails_the_build(pipeline):
    _append(pipeline.root)
    pipeline._build("volumes", lambda: None)  # a stage built after the write would take the write as its own


@pytest.fixture(scope="module")
def writing_fixture(pipeline):
    _append(pipeline.root)


def test_a_module_fixture_that_writes_fails_its_first_test(writing_fixture):
    pass


def test_a_cohort_reader_passes(synth_small):
    assert (synth_small.out_dir / "sub-01_T1w.nii").read_bytes() == b"voxels"


def test_a_cohort_writer_fails(synth_small):
    (synth_small.out_dir / "sub-01_T1w.nii").write_bytes(b"other voxels")


@pytest.fixture(scope="module")
def own(fork_pipeline):
    return fork_pipeline("own")


def test_a_fork_is_writable_and_its_store_names_its_own_artifacts(pipeline, own):
    _append(own.root)
    _log_run(own.tracking_db)
    assert DeltaTable(str(own.catalog_dir / "volumes")).version() == DeltaTable(str(pipeline.catalog_dir / "volumes")).version() + 1
    con = sqlite3.connect(own.tracking_db)
    [(location,)] = con.execute("SELECT artifact_location FROM experiments").fetchall()
    con.close()
    assert location == (own.root / "mlartifacts" / "tiny").as_uri()
"""


@pytest.mark.timeout(180)
def test_the_guard_fails_exactly_the_tests_that_change_the_shared_pipeline(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text() + STAND_IN)
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--import-mode=importlib", "-o",
         "addopts=", str(tmp_path / "test_inner.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    outcomes = {(line.split(" ")[0], line.split(" ")[1].split("::")[-1]) for line in text.splitlines()
                if line.startswith(("PASSED ", "ERROR ", "FAILED "))}  # fmt: skip
    by_outcome = {
        kind: {test for outcome, test in outcomes if outcome == kind} for kind in ("PASSED", "ERROR", "FAILED")
    }
    # A test that changed the folder errs at its teardown (its body passed); a write before a stage build fails there.
    assert by_outcome["ERROR"] == {
        "test_a_delta_commit_fails",
        "test_an_mlflow_run_fails",
        "test_a_stray_file_fails",
        "test_a_module_fixture_that_writes_fails_its_first_test",
        "test_a_cohort_writer_fails",
    }, text
    assert by_outcome["FAILED"] == {"test_a_write_before_a_stage_is_built_fails_the_build"}, text
    assert by_outcome["PASSED"] - by_outcome["ERROR"] == {
        "test_a_reader_passes",
        "test_the_next_reader_is_not_blamed_for_earlier_writes",
        "test_a_fork_is_writable_and_its_store_names_its_own_artifacts",
        "test_a_cohort_reader_passes",
    }, text
    for test, change in (
        ("test_a_delta_commit_fails", "Delta table catalog/volumes: version 0 -> 1"),
        ("test_an_mlflow_run_fails", "sqlite mlflow.db:runs: 0 -> 1 rows"),
        ("test_a_stray_file_fails", "files added: catalog/notes.txt"),
        ("test_a_write_before_a_stage_is_built_fails_the_build", "Delta table catalog/volumes: version 1 -> 2"),
        ("test_a_module_fixture_that_writes_fails_its_first_test", "Delta table catalog/volumes: version 2 -> 3"),
    ):
        message = next(
            (line for line in text.splitlines() if f"test_inner.py::{test}" in line and "changed" in line), ""
        )
        assert "shared session fixture `pipeline`" in message and change in message, (test, text)
    message = next(line for line in text.splitlines() if "test_inner.py::test_a_cohort_writer_fails changed" in line)
    assert "shared session fixture `synth_small`" in message and "files modified: sub-01_T1w.nii" in message, text
