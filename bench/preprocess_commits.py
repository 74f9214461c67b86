"""Commit cost of preprocess writes as ``volumes`` grows (issue 17, point 3): the part-file append path the job uses
(:mod:`brainiac.ingestion.volume_writes`) at 49k rows, against the per-batch MERGE it replaced, measured in the same run
at a smaller N (the MERGE's cost grows with the table, so a full-size run of it takes hours).

    .venv/bin/python bench/preprocess_commits.py                    # ~49k rows new path, 3.2k rows MERGE; a few min
    .venv/bin/python bench/preprocess_commits.py --rows 4096 --merge-rows 800   # quick look

For each commit it records wall seconds and the bytes the process read meanwhile (``rchar`` of ``/proc/self/io``:
every read syscall, so the Delta log, checkpoints and data files, whoever reads them, delta-rs' Rust threads included),
then prints per-commit figures for the first and the last 10 % of commits and their ratio (target <= 1.5x for the new
path). Arrays are small (the commit path never touches them in the new design, and their size only scales the MERGE's
reads); the part files of a batch are written before its commit is timed, as workers would have written them.

Import :func:`measure_appends` and :func:`measure_merges` from a scale harness to get the same figures as dicts.

Measured here (2 shared cores, load ~15): MERGE at 3.2k rows read 7.6 MB per commit in its first 10 % and 139 MB in its
last (it re-reads the partition); the append path read ~35 KB per commit throughout 49k rows, but its commit time still
rose 19 -> 83 ms: delta-rs rebuilds its in-memory snapshot (every file of the table) when it commits and when it
refreshes, CPU that grows with the file count, not bytes. Fewer, larger part files (``--scans-per-file``) shrink it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from brainiac.ingestion.volume_writes import VolumeCommitter, write_part_file
from brainiac.ingestion.volumes import encode_array
from brainiac.platform.catalog import VOLUMES_SCHEMA, Catalog, merge_with_retry, sql_in, sql_literal

VERSION = "benchversion"


def read_bytes() -> int:
    """Bytes this process has read so far (``rchar``), or -1 where ``/proc/self/io`` is missing."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def fake_row(i: int, array_bytes: int, rng: np.random.Generator) -> dict[str, Any]:
    """A ``volumes`` row whose ``whole`` blob is about ``array_bytes`` of incompressible data."""
    side = max(2, round((array_bytes / 2) ** (1 / 3)))
    noise = rng.standard_normal((side, side, side)).astype(np.float16)
    small = np.zeros((4, 4, 4), np.float16)
    return {
        "scan_id": f"{i:064x}",
        "preprocess_version": VERSION,
        "dataset": f"ds{i % 5}",
        "subject_id": f"sub-{i:06d}",
        "sequence": "T1w",
        "whole": encode_array(noise),
        "whole_shape": [side] * 3,
        "whole_spacing_mm": [1.0] * 3,
        "whole_affine": list(np.eye(4).reshape(-1)),
        "fixed": encode_array(small),
        "fixed_shape": [4, 4, 4],
        "fixed_affine": list(np.eye(4).reshape(-1)),
        "mask": encode_array(np.ones((4, 4, 4), np.uint8)),
        "labels_whole": None,
        "labels_fixed": None,
        "label_name": None,
        "dtype": "float16",
        "transform": list(np.eye(4).reshape(-1)),
        "registration_metric": -0.5,
        "brain_volume_ml": 1200.0,
        "snr": 20.0,
        "clipped_fraction": 0.0,
        "qc_pass": True,
        "qc_reason": None,
        "seconds": 1.0,
    }


def summarize(seconds: list[float], reads: list[int], rows_per_commit: int, total_rows: int) -> dict[str, Any]:
    """Per-commit figures for the first and last 10 % of commits (median and mean) and their ratio."""
    k = max(1, len(seconds) // 10)
    first, last = seconds[:k], seconds[-k:]
    out = {
        "rows": total_rows,
        "rows_per_commit": rows_per_commit,
        "commits": len(seconds),
        "first10_median_s": statistics.median(first),
        "last10_median_s": statistics.median(last),
        "first10_mean_s": statistics.fmean(first),
        "last10_mean_s": statistics.fmean(last),
        "first10_read_bytes": statistics.fmean(reads[:k]),
        "last10_read_bytes": statistics.fmean(reads[-k:]),
        "total_commit_s": sum(seconds),
        "max_commit_s": max(seconds),
    }
    out["ratio_median"] = out["last10_median_s"] / out["first10_median_s"]
    out["ratio_mean"] = out["last10_mean_s"] / out["first10_mean_s"]
    return out


def measure_appends(
    root: Path,
    rows: int = 49_152,
    rows_per_commit: int = 256,
    scans_per_file: int = 16,
    array_bytes: int = 1024,
    *,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The job's path: part files written into the partition, then one file-action append per batch (timed)."""
    catalog = Catalog.open(root / "append-catalog")
    rng = np.random.default_rng(0)
    now = dt.datetime.now(dt.UTC)
    t, before = time.perf_counter(), read_bytes()
    committer = VolumeCommitter.open(catalog, VERSION)
    open_s, open_read = time.perf_counter() - t, read_bytes() - before
    loc = catalog.table_location("volumes")
    seconds: list[float] = []
    reads: list[int] = []
    write_s = 0.0
    for start in range(0, rows, rows_per_commit):
        t = time.perf_counter()
        ids = range(start, min(rows, start + rows_per_commit))
        for k in range(ids.start, ids.stop, scans_per_file):
            batch = [fake_row(i, array_bytes, rng) for i in range(k, min(ids.stop, k + scans_per_file))]
            committer.add(write_part_file(loc, VERSION, batch, now))
        write_s += time.perf_counter() - t
        t, before = time.perf_counter(), read_bytes()
        assert committer.commit() == len(ids)
        seconds.append(time.perf_counter() - t)
        reads.append(read_bytes() - before)
        if len(seconds) % 50 == 0:
            echo(f"  append: {start + len(ids)} rows, last commit {seconds[-1] * 1000:.1f} ms, read {reads[-1]} B")
    out = summarize(seconds, reads, rows_per_commit, rows)
    out.update(open_s=open_s, open_read_bytes=open_read, write_parts_s=write_s)
    t, before = time.perf_counter(), read_bytes()
    rerun = VolumeCommitter.open(catalog, VERSION)
    out.update(rerun_open_s=time.perf_counter() - t, rerun_open_read_bytes=read_bytes() - before)
    assert len(rerun.done) == rows, "every row committed exactly once"
    return out


def _merge_batch(catalog: Catalog, rows: list[dict[str, Any]], now: dt.datetime) -> int:
    """The old ``ingestion/prepare.py::_write_rows`` (before issue 17), kept verbatim here only to measure it: read the
    batch's ids back, then MERGE the batch on (version, scan_id). Not for production use."""

    def attempt() -> int:
        dt_ = catalog.create_if_missing("volumes")
        version = rows[0]["preprocess_version"]
        have = catalog.select(
            "volumes",
            f"preprocess_version = {sql_literal(version)} AND {sql_in('scan_id', [r['scan_id'] for r in rows])}",
            ["scan_id"],
        )
        seen = set(have["scan_id"].to_pylist())
        new = [{**r, "preprocessed_at": now} for r in rows if r["scan_id"] not in seen]
        if not new:
            return 0
        source = pa.Table.from_pylist(new, schema=VOLUMES_SCHEMA)
        (
            dt_.merge(source, predicate="t.preprocess_version = s.preprocess_version AND t.scan_id = s.scan_id",
                      source_alias="s", target_alias="t")
            .when_not_matched_insert_all()
            .execute()
        )  # fmt: skip
        return len(new)

    return merge_with_retry(attempt, what="volumes")


def measure_merges(
    root: Path,
    rows: int = 3200,
    rows_per_commit: int = 16,
    array_bytes: int = 50_000,
    *,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The old path: one MERGE per batch of ``rows_per_commit`` rows (timed, with the rows it was given)."""
    catalog = Catalog.open(root / "merge-catalog")
    rng = np.random.default_rng(0)
    now = dt.datetime.now(dt.UTC)
    seconds: list[float] = []
    reads: list[int] = []
    for start in range(0, rows, rows_per_commit):
        batch = [fake_row(i, array_bytes, rng) for i in range(start, min(rows, start + rows_per_commit))]
        t, before = time.perf_counter(), read_bytes()
        assert _merge_batch(catalog, batch, now) == len(batch)
        seconds.append(time.perf_counter() - t)
        reads.append(read_bytes() - before)
        if len(seconds) % 25 == 0:
            echo(f"  merge: {start + len(batch)} rows, last commit {seconds[-1] * 1000:.0f} ms, read {reads[-1]} B")
    return summarize(seconds, reads, rows_per_commit, rows)


def _line(name: str, r: dict[str, Any]) -> str:
    return (
        f"{name:<7} {r['rows']:>6} rows, {r['commits']:>4} commits of {r['rows_per_commit']:>3} rows: "
        f"per commit first 10% {r['first10_median_s'] * 1000:8.1f} ms (mean {r['first10_mean_s'] * 1000:.1f}), "
        f"last 10% {r['last10_median_s'] * 1000:8.1f} ms (mean {r['last10_mean_s'] * 1000:.1f}), "
        f"ratio {r['ratio_median']:.2f}x (mean {r['ratio_mean']:.2f}x); "
        f"read/commit first {r['first10_read_bytes'] / 1e6:.3f} MB, last {r['last10_read_bytes'] / 1e6:.3f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=49_152, help="rows for the new append path")
    ap.add_argument("--rows-per-commit", type=int, default=256, help="new path: ~1 GB at 3.6 MB per volume is ~280")
    ap.add_argument("--scans-per-file", type=int, default=16, help="as preprocess(): rows per part file")
    ap.add_argument("--array-bytes", type=int, default=1024, help="new path: size of each row's array blob")
    ap.add_argument("--merge-rows", type=int, default=3200, help="rows for the old MERGE path (0: skip it)")
    ap.add_argument("--merge-rows-per-commit", type=int, default=16)
    ap.add_argument("--merge-array-bytes", type=int, default=50_000)
    ap.add_argument("--out", type=Path, default=None, help="folder for the catalogs (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="preprocess-commits-") as tmp:
        root = args.out or Path(tmp)
        results: dict[str, Any] = {}
        if args.merge_rows:
            print(f"old MERGE path, {args.merge_rows} rows of ~{args.merge_array_bytes} B arrays ...", flush=True)
            results["merge"] = measure_merges(root, args.merge_rows, args.merge_rows_per_commit, args.merge_array_bytes)
        print(f"new append path, {args.rows} rows of ~{args.array_bytes} B arrays ...", flush=True)
        results["append"] = measure_appends(
            root, args.rows, args.rows_per_commit, args.scans_per_file, args.array_bytes
        )
    print()
    if "merge" in results:
        print(_line("MERGE", results["merge"]))
    print(_line("append", results["append"]))
    a = results["append"]
    print(
        f"append: opening the committer (the run's one narrow read) {a['open_s'] * 1000:.0f} ms on the empty table; "
        f"again on the full table {a['rerun_open_s']:.2f} s, read {a['rerun_open_read_bytes'] / 1e6:.1f} MB; "
        f"writing the part files took {a['write_parts_s']:.1f} s in all"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if a["ratio_median"] <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
