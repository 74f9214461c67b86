"""Writes to ``volumes`` that scale: a commit reads no existing data file, a re-run writes nothing, a crash keeps the
committed batches and the re-run completes without duplicates, concurrent writers of one version never commit a scan
twice, and a part file holds one volume per row group. Rows carry tiny arrays so every test runs in seconds."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brainiac.ingestion.volume_writes import VolumeCommitter, partition_dir, run_tasks, write_part_file
from brainiac.ingestion.volumes import encode_array, read_volumes, row_arrays
from brainiac.platform.catalog import Catalog

VERSION = "test0version"
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


def fake_row(i: int, version: str = VERSION) -> dict:
    """A ``volumes`` row with 8³ arrays whose values encode ``i`` (so a read can check it got the right volume)."""
    fixed = np.full((8, 8, 8), i % 1000, dtype=np.float16)
    return {
        "scan_id": hashlib.sha256(str(i).encode()).hexdigest(),
        "preprocess_version": version,
        "dataset": f"ds{i % 3}",
        "subject_id": f"sub-{i:05d}",
        "sequence": "T1w",
        "whole": encode_array(fixed),
        "whole_shape": [8, 8, 8],
        "whole_spacing_mm": [3.0, 3.0, 3.0],
        "whole_affine": list(np.eye(4).reshape(-1)),
        "fixed": encode_array(fixed),
        "fixed_shape": [8, 8, 8],
        "fixed_affine": list(np.eye(4).reshape(-1)),
        "mask": encode_array(np.ones((8, 8, 8), np.uint8)),
        "labels_whole": None,
        "labels_fixed": None,
        "label_name": None,
        "dtype": "float16",
        "transform": list(np.eye(4).reshape(-1)),
        "registration_metric": -0.5,
        "brain_volume_ml": 1200.0 + i,
        "snr": None,
        "clipped_fraction": 0.0,
        "qc_pass": i % 7 != 0,
        "qc_reason": None if i % 7 else "registration",
        "seconds": 0.01,
    }


def write_rows(catalog: Catalog, ids: range | list[int], per_file: int = 4) -> list:
    ids = list(ids)
    loc = catalog.table_location("volumes")
    return [
        write_part_file(loc, VERSION, [fake_row(i) for i in ids[k : k + per_file]], NOW)
        for k in range(0, len(ids), per_file)
    ]


def committed_ids(catalog: Catalog) -> list[str]:
    return catalog.select("volumes", f"preprocess_version = '{VERSION}'", ["scan_id"])["scan_id"].to_pylist()


def test_a_commit_reads_no_existing_data_file(tmp_path: Path):
    catalog = Catalog.open(tmp_path / "catalog")
    committer = VolumeCommitter.open(catalog, VERSION)
    for batch in range(3):
        for part in write_rows(catalog, range(batch * 8, batch * 8 + 8)):
            committer.add(part)
        assert committer.commit() == 8
    # Garble every committed data file: a commit path that reads the table (the old MERGE did) now fails.
    folder = tmp_path / "catalog" / "volumes" / partition_dir(VERSION)
    committed = sorted(folder.glob("*.parquet"))
    assert len(committed) == 6
    originals = {p: p.read_bytes() for p in committed}
    for p in committed:
        p.write_bytes(b"\0" * p.stat().st_size)
    for part in write_rows(catalog, range(24, 32)):
        committer.add(part)
    assert committer.commit() == 8
    for p, data in originals.items():
        p.write_bytes(data)
    ids = committed_ids(catalog)
    assert len(ids) == 32 == len(set(ids)) and committer.commits == 4 and committer.rows_committed == 32


def test_rows_round_trip_with_one_volume_per_row_group(tmp_path: Path):
    catalog = Catalog.open(tmp_path / "catalog")
    committer = VolumeCommitter.open(catalog, VERSION)
    parts = write_rows(catalog, range(10), per_file=5)
    for part in parts:
        committer.add(part)
    committer.commit()
    meta = pq.ParquetFile(tmp_path / "catalog" / "volumes" / parts[0].path).metadata
    assert meta.num_rows == 5 and meta.num_row_groups == 5
    assert "preprocess_version" not in meta.schema.names  # Delta keeps the partition value in the log
    table = read_volumes(catalog, VERSION, qc_pass_only=False)
    assert table.num_rows == 10 and set(table["preprocess_version"].to_pylist()) == {VERSION}
    assert table["preprocessed_at"][0].as_py() == NOW
    row = read_volumes(catalog, VERSION, scan_ids=[fake_row(3)["scan_id"]]).to_pylist()
    assert len(row) == 1 and float(row_arrays(row[0])["fixed"][0, 0, 0]) == 3.0
    # The log holds row counts; per-volume pruning comes from the row-group statistics inside the file.
    add = pa.table(catalog.table("volumes").get_add_actions(flatten=True)).to_pydict()
    assert add["num_records"] == [5, 5]
    stats = meta.row_group(2).column(meta.schema.names.index("scan_id")).statistics
    assert stats.has_min_max and stats.min == stats.max == fake_row(2)["scan_id"]


def test_rerun_writes_nothing_and_concurrent_writers_commit_each_scan_once(tmp_path: Path):
    catalog = Catalog.open(tmp_path / "catalog")
    first, second = VolumeCommitter.open(catalog, VERSION), VolumeCommitter.open(catalog, VERSION)
    for part in write_rows(catalog, range(0, 12)):
        first.add(part)
    # The second writer started from the same snapshot and computed an overlapping set (8..19): files 8-11 and
    # 12-15 / 16-19 -> one file wholly duplicate, the others new.
    for part in write_rows(catalog, range(8, 20)):
        second.add(part)
    assert first.commit() == 12
    assert second.commit() == 8  # lost the race on the version's txn, refreshed, dropped scans 8-11, retried
    assert second.duplicates_dropped == 4
    ids = committed_ids(catalog)
    assert len(ids) == 20 == len(set(ids))
    version = catalog.version("volumes")
    rerun = VolumeCommitter.open(catalog, VERSION)
    assert len(rerun.done) == 20
    assert rerun.commit() == 0 and catalog.version("volumes") == version


def test_mixed_file_is_rewritten_without_the_duplicates(tmp_path: Path):
    catalog = Catalog.open(tmp_path / "catalog")
    first, second = VolumeCommitter.open(catalog, VERSION), VolumeCommitter.open(catalog, VERSION)
    for part in write_rows(catalog, range(0, 6), per_file=6):
        first.add(part)
    for part in write_rows(catalog, range(4, 10), per_file=6):  # one file: 4, 5 duplicate; 6..9 new
        second.add(part)
    first.commit()
    assert second.commit() == 4
    ids = committed_ids(catalog)
    assert sorted(ids) == sorted(fake_row(i)["scan_id"] for i in range(10))


@pytest.mark.timeout(120)
def test_crash_keeps_committed_batches_and_rerun_completes_without_duplicates(tmp_path: Path, ray_session, monkeypatch):
    import ray

    catalog = Catalog.open(tmp_path / "catalog")
    loc = catalog.table_location("volumes")

    @ray.remote(num_cpus=1)
    def task(ids: list[int]) -> dict:
        return {"part": write_part_file(loc, VERSION, [fake_row(i) for i in ids], NOW)}

    chunks = [list(range(k, k + 3)) for k in range(0, 30, 3)]  # 10 tasks, 30 scans
    committer = VolumeCommitter.open(catalog, VERSION, commit_files=2)
    real_commit = VolumeCommitter.commit
    calls = {"n": 0}

    def crashing_commit(self: VolumeCommitter) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash of the driver during its third commit")
        return real_commit(self)

    monkeypatch.setattr(VolumeCommitter, "commit", crashing_commit)
    with pytest.raises(KeyboardInterrupt):
        run_tasks(committer, chunks, task.remote, window=3)
    monkeypatch.setattr(VolumeCommitter, "commit", real_commit)
    kept = committed_ids(catalog)
    assert len(kept) == committer.rows_committed == 12 == len(set(kept))  # two commits of two 3-scan files each
    folder = tmp_path / "catalog" / "volumes" / partition_dir(VERSION)
    assert len(list(folder.glob("*.parquet"))) > 4  # uncommitted files exist but no reader sees them

    rerun = VolumeCommitter.open(catalog, VERSION, commit_files=2)
    todo = [[i for i in chunk if fake_row(i)["scan_id"] not in rerun.done] for chunk in chunks]
    todo = [chunk for chunk in todo if chunk]
    assert sum(map(len, todo)) == 18
    seen: list[int] = []
    assert run_tasks(rerun, todo, task.remote, window=3, on_done=seen.append) == 18
    assert sum(seen) == 18
    ids = committed_ids(catalog)
    assert len(ids) == 30 == len(set(ids))
    again = VolumeCommitter.open(catalog, VERSION)
    assert again.done == set(ids) and run_tasks(again, [], task.remote, window=3) == 0


@pytest.mark.timeout(120)
def test_ray_read_delta_reads_the_committed_files(tmp_path: Path, ray_session):
    import ray

    catalog = Catalog.open(tmp_path / "catalog")
    committer = VolumeCommitter.open(catalog, VERSION)
    for part in write_rows(catalog, range(6), per_file=3):
        committer.add(part)
    committer.commit()
    ds = ray.data.read_delta(catalog.table_location("volumes").uri, columns=["scan_id", "preprocess_version", "fixed"])
    rows = ds.take_all()
    assert len(rows) == 6 and {r["preprocess_version"] for r in rows} == {VERSION}


def test_an_unexpected_error_quarantines_one_scan_and_the_chunk_goes_on(tmp_path, monkeypatch):
    """One scan's unexpected exception used to fail its task and abort the run (and recur on every run); now that scan
    becomes a `preprocess_failed` problem and the rest of the chunk is written."""
    import brainiac.ingestion.prepare as prepare

    def process(scan, *args):
        if scan["scan_id"] == "bad":
            raise RuntimeError("SimpleITK exploded\nsecond line")
        return {"row": {"scan_id": scan["scan_id"], "qc_pass": True, "qc_reason": None}}

    written = []
    monkeypatch.setattr(prepare, "_process_one", process)
    monkeypatch.setattr(prepare, "write_part_file", lambda table, version, rows, now, **kw: written.extend(rows) or "p")
    scans = [{"scan_id": s, "dataset": "ds", "source_uri": f"/data/{s}.nii.gz"} for s in ("a", "bad", "b")]
    out = prepare._process_chunk(scans, {}, "v1", {}, None, None, 1)
    assert [r["scan_id"] for r in written] == ["a", "b"] and out["part"] == "p"
    (problem,) = out["problems"]
    assert problem["reason"] == "preprocess_failed" and problem["detail"] == "RuntimeError: SimpleITK exploded"
    assert "preprocess_failed" in prepare.VOXEL_REASONS  # a re-run skips it instead of failing again


@pytest.mark.timeout(120)
def test_a_failed_task_is_split_and_only_its_culprit_is_reported(tmp_path, ray_session):
    """A task that fails for good (a worker killed for memory, an uncaught error) is rerun one item per task; only the
    item that fails alone reaches on_failure, and the run goes on."""
    import ray

    from brainiac.ingestion.volume_writes import VolumeCommitter, run_tasks
    from brainiac.platform.catalog import Catalog

    @ray.remote(max_retries=0)
    def task(chunk):
        if "bad" in chunk:
            raise MemoryError("killed")
        return {"part": None, "items": chunk}

    committer = VolumeCommitter.open(Catalog.open(str(tmp_path / "catalog")), "v1")
    results, failed, done = [], [], []
    run_tasks(
        committer, [["a", "b"], ["c", "bad", "d"], ["e"]], task.remote, window=2,
        on_result=lambda out: results.extend(out["items"]), on_done=done.append,
        on_failure=lambda chunk, exc: failed.append(chunk),
    )  # fmt: skip
    assert sorted(results) == ["a", "b", "c", "d", "e"] and failed == [["bad"]] and sum(done) == 6
