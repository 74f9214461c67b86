"""Crash safety (issue #18): ``brainiac ingest`` and ``brainiac preprocess`` killed with SIGKILL at deterministic points
(just before and after each commit, during the harvest, mid-preprocess) leave a catalog whose every Delta table opens
and reads, and a plain rerun converges to exactly the catalog of an uninterrupted run.

How: the job runs as a child process (the ``brainiac`` command, connected to the session's Ray, as a job on a live
cluster) with ``BRAINIAC_FAULT_POINT=<point>:<n>``; :func:`brainiac.platform.faults.maybe_crash` kills it with SIGKILL
on the n-th time it reaches ``<point>``. The rerun is the same job run in this process. Catalogs are compared by the key
columns of every row (tests/reliability/_faults.py), ignoring timestamps and versions.

One cohort (BIDS + BraTS, 3 subjects at 3 mm: 14 scans, 4 of them BraTS images re-saved into the BIDS dataset, so
4 duplicate groups; plus one unreadable file for quarantine) is shared read-only by every run; each run gets its own
catalog. ``ingest.commit_scans=4`` gives four harvest commits, so the kills land before, between and after them.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from brainiac.ingestion.duplicates import QUEUE_TABLE
from brainiac.jobs.config import Config, load_config
from brainiac.platform.catalog import Catalog

faults = sys.modules["reliability_faults_helpers"]  # loaded by this folder's conftest.py

COMMIT_SCANS = 4
INGEST_TABLES = ["scans", "quarantine", "duplicates", QUEUE_TABLE]
PREPROCESS_TABLES = ["volumes", "splits", "preprocess_configs", "quarantine"]


def config(catalog: Path) -> Config:
    return load_config("tiny", [f"catalog.uri={catalog}", f"ingest.commit_scans={COMMIT_SCANS}"])


@dataclass
class Reference:
    """The cohort and what uninterrupted runs make of it."""

    root: Path
    sources: list[str]
    ingested: dict
    """Key snapshot of the ingest tables after one uninterrupted ingest."""
    signatures: object
    ingested_catalog: Path
    """That catalog, kept pristine: preprocess kill runs start from copies of it."""

    def ingest_args(self, catalog: Path) -> list[str]:
        return ["ingest", *self.sources, "--catalog", str(catalog), "--config", "tiny",
                "--set", f"ingest.commit_scans={COMMIT_SCANS}", "-q"]  # fmt: skip

    def fresh_ingested_copy(self, into: Path) -> Path:
        """A copy of the ingested catalog (and its identified zone, if the job keeps one beside it)."""
        target = into / "catalog"
        shutil.copytree(self.ingested_catalog, target)
        zone = Path(f"{self.ingested_catalog}-identified")
        if zone.exists():
            shutil.copytree(zone, Path(f"{target}-identified"))
        return target


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, ray_session, pseudonym_key) -> Reference:
    from brainiac.ingestion.ingest import ingest
    from brainiac.ingestion.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("crash")
    cohort = generate_cohort(root / "cohort", subjects=3, seed=7, preset="tiny", cohorts=("bids", "brats"))
    bids = cohort.out_dir / cohort.cohorts["bids"]
    # One file that is not NIfTI at all: quarantined, so the quarantine commits are on the path too.
    (bids / "sub-001" / "ses-01" / "anat" / "sub-001_ses-01_PD.nii.gz").write_bytes(b"not a nifti file")
    sources = [str(cohort.out_dir / cohort.cohorts["brats"]), str(bids)]
    catalog_dir = root / "reference" / "catalog"
    summary = ingest(config(catalog_dir), sources, progress=False)
    assert summary.inserted == 14 and summary.duplicate_groups == 4, summary
    catalog = Catalog.open(str(catalog_dir))
    snap = faults.snapshot(catalog, INGEST_TABLES)
    assert not snap[QUEUE_TABLE], "an uninterrupted ingest leaves no search owed"
    assert len({k[0] for k in snap["duplicates"]}) == 4
    return Reference(root, sources, snap, faults.signature_keys(catalog), catalog_dir)


@pytest.fixture(scope="module")
def preprocessed(reference: Reference) -> dict:
    """Key snapshot of the preprocess tables after one uninterrupted preprocess of a copy of the reference catalog."""
    from brainiac.ingestion.prepare import preprocess

    catalog_dir = reference.fresh_ingested_copy(reference.root / "reference-preprocessed")
    summary = preprocess(config(catalog_dir), progress=False)
    assert summary.processed == 14, summary
    return faults.snapshot(Catalog.open(str(catalog_dir)), PREPROCESS_TABLES)


def _rerun_ingest(reference: Reference, catalog_dir: Path):
    from brainiac.ingestion.ingest import ingest

    return ingest(config(catalog_dir), reference.sources, progress=False)


def _assert_converged(reference: Reference, catalog: Catalog) -> None:
    got = faults.snapshot(catalog, INGEST_TABLES)
    assert faults.diff(got, reference.ingested) == {}
    # Signatures are a cache of the duplicate search: never twice, never one the uninterrupted run lacks (a scan whose
    # harvest signature was lost with the kill gets one when a search first needs it).
    sigs = faults.signature_keys(catalog)
    assert max(sigs.values(), default=1) == 1
    assert not sigs - reference.signatures


# (fault point, what is on storage when it fires)
INGEST_KILLS = [
    ("ingest.harvest:2", "harvest under way, nothing committed yet"),
    ("ingest.harvest:7", "harvest under way, one batch committed"),
    ("queue.staged:1", "owed searches queued, their scans not committed"),
    ("ingest.scans.committed:1", "scans committed; signatures, quarantine and duplicates not"),
    ("signatures.appended:2", "second batch: scans and signatures committed, quarantine not"),
    ("ingest.quarantine.committed:3", "three batches fully committed, the rest not harvested"),
    ("duplicates.searched:1", "every scan committed, copies verified, duplicates not committed (the old defect)"),
    ("duplicates.committed:1", "duplicates committed, the queue not cleared"),
    ("queue.cleared:1", "everything committed, only the summary left"),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("point", [p for p, _ in INGEST_KILLS], ids=[p for p, _ in INGEST_KILLS])
def test_ingest_killed_then_rerun_converges(point: str, reference: Reference, tmp_path: Path) -> None:
    catalog_dir = tmp_path / "catalog"
    run = faults.run_cli(reference.ingest_args(catalog_dir), fault=point, env=faults.session_ray_env())
    assert run.killed and f"fault point {point} reached" in run.stderr, run.tail()
    catalog = Catalog.open(str(catalog_dir))
    faults.open_every_table(catalog)
    if point == "duplicates.searched:1":
        # The state that used to lose the copies for good: all scans current, no group recorded, the search owed.
        after_kill = faults.snapshot(catalog, INGEST_TABLES)
        assert after_kill["scans"] == reference.ingested["scans"]
        assert not after_kill["duplicates"] and after_kill[QUEUE_TABLE]
    summary = _rerun_ingest(reference, catalog_dir)
    assert summary.inserted + summary.unchanged == 14
    _assert_converged(reference, catalog)


@pytest.mark.timeout(240)
def test_ingest_killed_again_during_the_repair(reference: Reference, tmp_path: Path) -> None:
    """A kill in the repair itself (the search owed by an earlier kill, before its duplicates commit) loses nothing
    either: two kills in a row, then one rerun converges."""
    catalog_dir = tmp_path / "catalog"
    env = faults.session_ray_env()
    first = faults.run_cli(reference.ingest_args(catalog_dir), fault="duplicates.searched:1", env=env)
    assert first.killed, first.tail()
    # The second run has nothing new to harvest: its first search is the repair of the owed one.
    second = faults.run_cli(reference.ingest_args(catalog_dir), fault="duplicates.searched:1", env=env)
    assert second.killed, second.tail()
    catalog = Catalog.open(str(catalog_dir))
    faults.open_every_table(catalog)
    assert faults.snapshot(catalog, [QUEUE_TABLE])[QUEUE_TABLE], "the owed searches are still queued"
    _rerun_ingest(reference, catalog_dir)
    _assert_converged(reference, catalog)


PREPROCESS_KILLS = [
    ("preprocess.task:3", "three part files written by workers, none committed (orphans)"),
    ("volumes.committed:1", "volumes committed; quarantine and splits not"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", [p for p, _ in PREPROCESS_KILLS], ids=[p for p, _ in PREPROCESS_KILLS])
def test_preprocess_killed_then_rerun_converges(
    point: str, reference: Reference, preprocessed: dict, tmp_path: Path
) -> None:
    from brainiac.ingestion.prepare import preprocess

    catalog_dir = reference.fresh_ingested_copy(tmp_path)
    args = ["preprocess", "--catalog", str(catalog_dir), "--config", "tiny", "-q"]
    run = faults.run_cli(args, fault=point, env=faults.session_ray_env())
    assert run.killed and f"fault point {point} reached" in run.stderr, run.tail()
    catalog = Catalog.open(str(catalog_dir))
    faults.open_every_table(catalog)
    orphans = faults.orphan_files(catalog, "volumes")
    committed = faults.snapshot(catalog, ["volumes"])["volumes"]
    if point.startswith("preprocess.task"):
        assert orphans and not committed, "killed before the first commit: part files on disk, no row visible"
    summary = preprocess(config(catalog_dir), progress=False)
    assert summary.already_done == sum(committed.values())
    assert summary.processed == 14 - summary.already_done
    assert faults.diff(faults.snapshot(catalog, PREPROCESS_TABLES), preprocessed) == {}
    # The orphans are still on disk, and no reader sees them: the table holds one row per scan.
    assert set(orphans) <= set(faults.orphan_files(catalog, "volumes"))
    assert catalog.read("volumes", columns=["scan_id"]).num_rows == 14
    assert (
        catalog.select_keys("volumes", "scan_id", [k[0] for k in preprocessed["volumes"]], ["scan_id"]).num_rows == 14
    )


@pytest.mark.timeout(120)
def test_repair_reads_only_the_queue_log_when_nothing_is_owed(
    reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What every ingest pays for the repair when no run crashed: the queue table is opened (its log), no other table,
    no data file, and nothing is committed."""
    from brainiac.ingestion.duplicates import repair_unsearched

    catalog = Catalog.open(str(reference.fresh_ingested_copy(tmp_path)))
    versions = {name: catalog.version(name) for name in faults.table_names(catalog)}
    opened: list[str] = []
    real_table = Catalog.table
    monkeypatch.setattr(
        Catalog, "table", lambda self, name, version=None: opened.append(name) or real_table(self, name, version)
    )
    assert repair_unsearched(catalog) == 0
    assert opened == [QUEUE_TABLE]
    monkeypatch.undo()
    assert {name: catalog.version(name) for name in versions} == versions


@pytest.mark.timeout(120)
def test_repair_drops_only_stale_entries_of_scans_never_committed(reference: Reference, tmp_path: Path) -> None:
    """A queued node that is not a current scan is left alone while its run may still be committing it, and dropped
    once it is older than STALE_QUEUE_AFTER (its run died before the scans commit and the file never came back)."""
    import datetime as dt

    from brainiac.ingestion.duplicates import STALE_QUEUE_AFTER, queue_searches, repair_unsearched

    catalog = Catalog.open(str(reference.fresh_ingested_copy(tmp_path)))
    now = dt.datetime.now(dt.UTC)
    old = {"scan_id": "0" * 64, "dataset": "synth-brats"}
    young = {"scan_id": "1" * 64, "dataset": "synth-brats"}
    assert queue_searches(catalog, [old], now=now - STALE_QUEUE_AFTER - dt.timedelta(minutes=1)) == 1
    assert queue_searches(catalog, [young], now=now) == 1
    # A node that is already a current scan is never queued (nothing is owed for it).
    held = catalog.select("scans", "status = 'current'", ["scan_id", "dataset"], limit=1).to_pylist()
    assert queue_searches(catalog, held) == 0
    assert repair_unsearched(catalog) == 0
    assert faults.snapshot(catalog, [QUEUE_TABLE])[QUEUE_TABLE] == {(young["scan_id"], "synth-brats"): 1}


def test_fault_point_parsing_and_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """``<point>:<n>`` and ``<point>`` parse; a malformed value is refused; unset, or naming another point, the hook
    does nothing (the test process is still alive to assert it)."""
    from brainiac.platform import faults as hooks

    assert hooks.parse("ingest.harvest:7") == ("ingest.harvest", 7)
    assert hooks.parse("queue.cleared") == ("queue.cleared", 1)
    for bad in ("", ":3", "ingest.harvest:0", "ingest.harvest:x"):
        with pytest.raises(ValueError, match="BRAINIAC_FAULT_POINT"):
            hooks.parse(bad)
    monkeypatch.delenv(hooks.ENV, raising=False)
    hooks.maybe_crash("ingest.harvest")
    monkeypatch.setenv(hooks.ENV, "some.other.point:1")
    for _ in range(3):
        hooks.maybe_crash("ingest.harvest")
    assert hooks._hits["ingest.harvest"] == 0
