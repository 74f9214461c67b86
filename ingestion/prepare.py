"""The preprocess job: catalogued raw scans → the model-ready ``volumes`` table (one version per config), on Ray, resumable,
plus the subject-level ``splits``.

- Only scans without a row for the current ``preprocess_version`` are processed, so a second run does nothing and an
  interrupted run continues where it stopped. Workers write Parquet part files into the version's partition and the
  driver commits file actions about every GB (:mod:`brainiac.ingestion.volume_writes`): no commit reads the table, so
  writing stays linear in the data, and no row is ever written twice.
- A new preprocessing config gets a new version, written beside the old one (the table is partitioned by version).
- Each version's settings are recorded in ``preprocess_configs`` (MERGE on the version, so re-runs add nothing): a model
  trained on a version can rebuild its inputs from a single new scan (``brainiac predict``) without the catalog.
- Voxel-level defects that only decoding reveals (NaN/Inf, all-zero, truncated payload) go to ``quarantine`` and are not
  retried; a failed registration is written with ``qc_pass = false`` and a reason, never as good data.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import pyarrow as pa

from brainiac.ingestion.adapters.base import Problem
from brainiac.ingestion.headers import load_nifti
from brainiac.ingestion.ingest import write_quarantine
from brainiac.ingestion.splits import SplitConfig, write_splits
from brainiac.ingestion.volume_writes import (
    DEFAULT_COMMIT_BYTES,
    DEFAULT_COMMIT_FILES,
    DEFAULT_COMMIT_SECONDS,
    VolumeCommitter,
    run_tasks,
    write_part_file,
)
from brainiac.ingestion.volumes import decode_array, encode_array
from brainiac.platform.catalog import (
    PREPROCESS_CONFIGS_SCHEMA,
    Catalog,
    insert_missing,
    merge_with_retry,
    sql_in,
    sql_literal,
)

if TYPE_CHECKING:
    from brainiac.ingestion.preprocess.config import PreprocessConfig
    from brainiac.jobs.config import Config  # the job's root config (annotation only: jobs sit above ingestion)
    from brainiac.platform.storage import StorageLocation

__all__ = ["PreprocessSummary", "preprocess", "preprocess_config_of", "record_preprocess_config", "task_resources"]

log = logging.getLogger(__name__)

VOXEL_REASONS = (
    "nonfinite_voxels", "all_zero", "constant", "truncated", "not_nifti", "not_3d",
    "preprocess_failed", "preprocess_task_failed",
)  # fmt: skip
"""Quarantine reasons that make a re-run skip the scan (it failed for what it is, and would fail again; delete its
quarantine row to try it again)."""
SCAN_COLUMNS = ["scan_id", "dataset", "subject_id", "sequence", "image_uri", "source_uri", "labels"]


@dataclass
class PreprocessSummary:
    """What one preprocess run did."""

    catalog: str
    preprocess_version: str
    selected: int = 0
    already_done: int = 0
    processed: int = 0
    qc_failed: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    volumes_version: int | None = None
    splits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    seconds_per_scan: float | None = None
    decode_ms_per_volume: float | None = None
    left_out: str | None = None
    """What ``catalog.allowed_access`` left out (datasets, scans, levels), or ``None``."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_image(uri: str, options: dict[str, str] | None) -> tuple[np.ndarray, np.ndarray]:
    img = load_nifti(uri, options)
    data = np.asanyarray(img.dataobj)
    return np.squeeze(data) if data.ndim == 4 and data.shape[-1] == 1 else data, img.affine


def _process_one(
    scan: dict[str, Any], cfg_dict: dict[str, Any], version: str, options: dict[str, str]
) -> dict[str, Any]:
    """Runs in a Ray task: one scan → one ``volumes`` row, or a quarantine problem."""
    from brainiac.ingestion.preprocess import PreprocessConfig, VoxelDefect, preload, preprocess_scan
    from brainiac.platform.config import from_dict

    started = time.perf_counter()
    cfg = from_dict(PreprocessConfig, cfg_dict)
    preload(cfg)  # template caches, once per worker process
    try:
        data, affine = _read_image(scan["image_uri"], options)
    except (OSError, EOFError, ValueError) as exc:
        return {
            "problem": {
                "dataset": scan["dataset"],
                "source_uri": scan["source_uri"],
                "reason": "truncated",
                "detail": f"decode failed: {exc}",
            }
        }
    labels_json = json.loads(scan.get("labels") or "{}")
    labels = {}
    for key, uri in sorted(labels_json.items()):
        if key.endswith("_uri") and isinstance(uri, str):
            try:
                labels[key[: -len("_uri")]] = _read_image(uri, options)
            except (OSError, EOFError, ValueError):
                log.warning("label map %s of scan %s could not be read; continuing without it", key, scan["scan_id"])
    try:
        result = preprocess_scan(np.asarray(data), affine, cfg.for_sequence(scan.get("sequence")), labels or None)
    except VoxelDefect as exc:
        return {
            "problem": {
                "dataset": scan["dataset"],
                "source_uri": scan["source_uri"],
                "reason": exc.reason,
                "detail": exc.detail,
            }
        }
    label_name = next(iter(result.labels_whole), None) if result.labels_whole else None
    qc = result.qc
    row = {
        "scan_id": scan["scan_id"],
        "preprocess_version": version,
        "dataset": scan["dataset"],
        "subject_id": scan["subject_id"],
        "sequence": scan["sequence"],
        "whole": encode_array(result.whole.astype(np.float16)),
        "whole_shape": list(result.whole.shape),
        "whole_spacing_mm": [float(v) for v in np.sqrt((np.asarray(result.whole_affine)[:3, :3] ** 2).sum(axis=0))],
        "whole_affine": [float(v) for v in np.asarray(result.whole_affine).reshape(-1)],
        "fixed": encode_array(result.fixed.astype(np.float16)),
        "fixed_shape": list(result.fixed.shape),
        "fixed_affine": [float(v) for v in np.asarray(result.fixed_affine).reshape(-1)],
        "mask": encode_array(result.mask.astype(np.uint8)),
        "labels_whole": encode_array(result.labels_whole[label_name].astype(np.uint8)) if label_name else None,
        "labels_fixed": encode_array(result.labels_fixed[label_name].astype(np.uint8)) if label_name else None,
        "label_name": label_name,
        "dtype": "float16",
        "transform": [float(v) for v in result.transform["matrix"]],
        "registration_metric": float(qc["registration_metric"]) if qc.get("registration_metric") is not None else None,
        "brain_volume_ml": float(qc["brain_volume_ml"]),
        "snr": float(qc["snr"]) if qc.get("snr") is not None else None,
        "clipped_fraction": float(qc["clipped_fraction"]),
        "qc_pass": bool(qc["qc_pass"]),
        "qc_reason": qc.get("qc_reason") or None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return {"row": row}


def record_preprocess_config(catalog: Catalog, cfg: PreprocessConfig, now: dt.datetime | None = None) -> bool:
    """Record ``cfg`` under its version in ``preprocess_configs`` (MERGE on the version: a version already recorded keeps
    its row and first ``created_at``). Returns whether a row was added."""
    version = cfg.version()
    row = {
        "preprocess_version": version,
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "created_at": now or dt.datetime.now(dt.UTC),
    }

    def attempt() -> bool:
        table = catalog.create_if_missing("preprocess_configs")
        source = pa.Table.from_pylist([row], schema=PREPROCESS_CONFIGS_SCHEMA)
        return bool(insert_missing(table, source, ["preprocess_version"]))

    return merge_with_retry(attempt, what="preprocess_configs")


def preprocess_config_of(catalog: Catalog, version: str) -> PreprocessConfig | None:
    """The :class:`PreprocessConfig` recorded for ``version`` in ``preprocess_configs``, or ``None`` when the catalog
    has no record of it (volumes written before the table existed)."""
    from brainiac.ingestion.preprocess.config import PreprocessConfig

    rows = catalog.select("preprocess_configs", f"preprocess_version = {sql_literal(version)}", ["config"]).to_pylist()
    if not rows:
        return None
    return PreprocessConfig.from_record(json.loads(rows[0]["config"]))


def _process_chunk(
    scans: list[dict[str, Any]],
    cfg_dict: dict[str, Any],
    version: str,
    options: dict[str, str],
    table: StorageLocation,
    now: dt.datetime,
    rows_per_row_group: int,
) -> dict[str, Any]:
    """Runs in a Ray task: a few scans → one Parquet part file in the version's partition of ``volumes``.

    Only the file's metadata (a :class:`PartFile`), quarantine problems and QC reasons go back to the driver, never the
    arrays. The file is invisible to readers until the driver commits it.
    """
    rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for scan in scans:
        try:
            out = _process_one(scan, cfg_dict, version, options)
        except Exception as exc:  # one scan's unexpected failure must not cost the chunk or recur on every run
            out = {"problem": _failed(scan, "preprocess_failed", exc)}
        if "problem" in out:
            problems.append(out["problem"])
        else:
            rows.append(out["row"])
    part = write_part_file(table, version, rows, now, rows_per_row_group=rows_per_row_group) if rows else None
    qc_failed = [r["qc_reason"] or "unspecified" for r in rows if not r["qc_pass"]]
    return {"part": part, "problems": problems, "qc_failed": qc_failed}


class TaskResources(TypedDict):
    """Keyword arguments of ``ray.remote`` for one preprocess task."""

    num_cpus: float
    num_gpus: float


def task_resources(cfg: PreprocessConfig, cluster: dict[str, float]) -> TaskResources:
    """Ray resources of one preprocess task: one CPU, plus ``cfg.brain_mask_gpus`` of a GPU when a learned mask may
    run on CUDA (``brain_mask_device`` not ``cpu``) and ``cluster`` (``ray.cluster_resources()``) has GPUs; Ray then
    shows the task its GPU and ``brain_mask_device: auto`` takes it.

    Raises:
        ConfigError: ``brain_mask_device`` is ``cuda`` but the cluster has no GPU, or asks for none
            (``brain_mask_gpus: 0``), so every task would fail on its first scan.
    """
    learned = cfg.mask_methods() != {"atlas"}
    has_gpu = float(cluster.get("GPU", 0.0)) > 0
    if learned and cfg.brain_mask_device == "cuda" and not (has_gpu and cfg.brain_mask_gpus > 0):
        from brainiac.platform.errors import ConfigError

        why = "the cluster has no GPU" if not has_gpu else "preprocess.brain_mask_gpus is 0"
        raise ConfigError(f"preprocess.brain_mask_device is 'cuda' but {why}; use 'auto' or 'cpu'")
    gpus = cfg.brain_mask_gpus if learned and cfg.brain_mask_device != "cpu" and has_gpu else 0.0
    return {"num_cpus": 1, "num_gpus": gpus}


def _failed(scan: dict[str, Any], reason: str, exc: BaseException) -> dict[str, Any]:
    """A quarantine problem for a scan whose preprocessing failed unexpectedly (the error's type and first line)."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return {"dataset": scan["dataset"], "source_uri": scan["source_uri"], "reason": reason,
            "detail": f"{type(exc).__name__}: {first}" if first else type(exc).__name__}  # fmt: skip


TASKS_PER_CPU = 4
"""Preprocess tasks per Ray CPU at least (a run smaller than ``scans_per_file`` x CPUs gets smaller tasks)."""


def preprocess(
    cfg: Config,
    *,
    progress: bool = True,
    limit: int | None = None,
    scans_per_file: int = 32,
    rows_per_row_group: int = 1,
    commit_bytes: int = DEFAULT_COMMIT_BYTES,
    commit_seconds: float = DEFAULT_COMMIT_SECONDS,
    commit_files: int = DEFAULT_COMMIT_FILES,
    in_flight_per_cpu: int = 3,
) -> PreprocessSummary:
    """Preprocess every current scan of the catalog that has no volume for this config's version, of the datasets
    ``catalog.datasets`` names (default: all) that ``catalog.allowed_access`` allows.

    Which scans to skip is decided once, up front, from one narrow read (the ``scan_id`` column of this version's
    partition). Ray tasks of ``scans_per_file`` scans each write their rows straight into the table's partition folder
    as one Parquet file; at most ``in_flight_per_cpu`` tasks per Ray CPU are in flight, and the driver commits the
    finished files as Delta appends of file actions (no read of the table per commit). Re-runs, crashes and concurrent
    runs never duplicate a row: see :mod:`brainiac.ingestion.volume_writes`.

    Args:
        cfg: the run config (``preprocess`` and ``splits`` sections, catalog, Ray).
        limit: process at most this many scans (useful for a first look at a big catalog).
        scans_per_file: scans per Ray task and part file at most (~115 MB files at production size: delta-rs' commit
            and refresh cost grows with the table's file count); smaller when the run has under ``TASKS_PER_CPU``
            tasks per CPU at that size.
        rows_per_row_group: volumes per Parquet row group, so a reader of one volume reads about one volume.
        commit_bytes, commit_seconds, commit_files: commit when this much data, time since the last commit, or this
            many files have gathered (an interruption loses at most that much finished work).
        in_flight_per_cpu: tasks submitted ahead per Ray CPU (bounds what the driver tracks and holds).
    """
    import ray
    from tqdm.auto import tqdm

    from brainiac.platform.cluster import init_ray

    started = time.perf_counter()
    options = dict(cfg.catalog.storage_options)
    catalog = Catalog.open(cfg.catalog.uri, options or None)
    version = cfg.preprocess.version()
    summary = PreprocessSummary(catalog=catalog.uri, preprocess_version=version)
    if catalog.table("scans") is None:
        from brainiac.platform.errors import UserError

        raise UserError(
            f"catalog {catalog.uri} has no scans table; run `brainiac ingest SOURCE --catalog {catalog.uri}` first"
        )
    # The datasets it may read (all, or the named ones: naming a forbidden or unknown one is an error); the rest is
    # left out and said so, instead of refusing a catalog that also holds data this job may not read.
    reader = catalog.restricted(cfg.catalog.allowed_access)
    summary.left_out = reader.access_report(cfg.catalog.datasets).line
    if summary.left_out:
        log.info("preprocess %s", summary.left_out)
    query = reader.scans(dataset=cfg.catalog.datasets or None)
    scans = [r for r in query.to_arrow(columns=SCAN_COLUMNS).to_pylist() if r["sequence"] != "other"]
    summary.selected = len(scans)
    committer = VolumeCommitter.open(
        catalog,
        version,
        commit_bytes=commit_bytes,
        commit_seconds=commit_seconds,
        commit_files=commit_files,
        rows_per_row_group=rows_per_row_group,
    )
    bad = catalog.select("quarantine", sql_in("reason", list(VOXEL_REASONS)), ["source_uri"])  # fixed vocabulary
    bad_sources = set(bad["source_uri"].to_pylist())
    todo = [s for s in scans if s["scan_id"] not in committer.done and s["source_uri"] not in bad_sources]
    summary.already_done = len(scans) - len(todo)
    if limit is not None:
        todo = todo[:limit]

    now = dt.datetime.now(dt.UTC)
    record_preprocess_config(catalog, cfg.preprocess, now)
    problems: list[Problem] = []
    qc_failed: Counter[str] = Counter()
    if todo:
        init_ray(cfg.cluster)
        cluster = ray.cluster_resources()
        remote = ray.remote(**task_resources(cfg.preprocess, cluster))(_process_chunk)
        cfg_dict = asdict(cfg.preprocess)
        table_loc = committer.location
        cpus = max(1, int(cluster.get("CPU", 1)))
        # Up to scans_per_file per task and file (fewer, larger files: delta-rs' commit and refresh cost grows with the
        # table's file count), but at least TASKS_PER_CPU tasks per CPU so a small run still spreads over the CPUs.
        step = max(1, min(scans_per_file, math.ceil(len(todo) / (TASKS_PER_CPU * cpus))))
        chunks = (todo[i : i + step] for i in range(0, len(todo), step))
        window = max(2, in_flight_per_cpu * cpus)
        bar = tqdm(total=len(todo), desc="preprocess", unit="scan", disable=not progress)

        def collect(out: dict[str, Any]) -> None:
            problems.extend(Problem(**p) for p in out["problems"])
            qc_failed.update(out["qc_failed"])

        summary.processed = run_tasks(
            committer,
            chunks,
            lambda chunk: remote.remote(chunk, cfg_dict, version, options, table_loc, now, rows_per_row_group),
            window=window,
            on_result=collect,
            on_done=bar.update,
            on_failure=lambda chunk, exc: problems.extend(
                Problem(**_failed(scan, "preprocess_task_failed", exc)) for scan in chunk
            ),
        )
        bar.close()
        write_quarantine(catalog, problems, now)
    summary.qc_failed = dict(qc_failed)
    summary.quarantined = dict(Counter(p.reason for p in problems))
    summary.volumes_version = catalog.version("volumes")

    subjects = sorted({s["subject_id"] for s in scans})
    if subjects:
        split_cfg: SplitConfig = cfg.splits
        datasets = {s["subject_id"]: s["dataset"] for s in scans}
        summary.splits = write_splits(catalog, subjects, split_cfg, datasets).counts
    summary.seconds = round(time.perf_counter() - started, 2)
    if summary.processed:
        summary.seconds_per_scan = round(summary.seconds / summary.processed, 3)
        summary.decode_ms_per_volume = _decode_ms(catalog, version)
    return summary


def _decode_ms(catalog: Catalog, version: str, n: int = 8) -> float | None:
    """Milliseconds to decode one stored 'fixed' volume (measured on up to ``n`` rows)."""
    where = f"preprocess_version = {sql_literal(version)}"
    rows = catalog.select("volumes", where, ["fixed", "fixed_shape", "dtype"], limit=n).to_pylist()
    if not rows:
        return None
    t = time.perf_counter()
    for r in rows:
        decode_array(r["fixed"], r["fixed_shape"], r["dtype"])
    return round((time.perf_counter() - t) * 1000 / len(rows), 3)
