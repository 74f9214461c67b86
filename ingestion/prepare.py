"""The preprocess job: catalogued raw scans → the model-ready ``volumes`` table (one version per config), on Ray, resumable,
plus the subject-level ``splits``.

- Only scans without a row for the current ``preprocess_version`` are processed, so a second run does nothing and an
  interrupted run continues where it stopped (results are committed in batches as they arrive).
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
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from brainiac.ingestion.adapters.base import Problem
from brainiac.ingestion.headers import load_nifti
from brainiac.ingestion.ingest import write_quarantine
from brainiac.ingestion.splits import SplitConfig, write_splits
from brainiac.ingestion.volumes import decode_array, encode_array
from brainiac.platform.catalog import (
    PREPROCESS_CONFIGS_SCHEMA,
    VOLUMES_SCHEMA,
    Catalog,
    merge_with_retry,
    sql_in,
    sql_literal,
)
from brainiac.platform.config import Config

if TYPE_CHECKING:
    from brainiac.ingestion.preprocess.config import PreprocessConfig

__all__ = ["PreprocessSummary", "preprocess", "preprocess_config_of", "record_preprocess_config"]

log = logging.getLogger(__name__)

VOXEL_REASONS = ("nonfinite_voxels", "all_zero", "constant", "truncated", "not_nifti", "not_3d")
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
        result = preprocess_scan(np.asarray(data), affine, cfg, labels or None)
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


def _write_rows(catalog: Catalog, rows: list[dict[str, Any]], now: dt.datetime) -> int:
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
        metrics = (
            table.merge(source, predicate="t.preprocess_version = s.preprocess_version", source_alias="s",
                        target_alias="t")
            .when_not_matched_insert_all()
            .execute()
        )  # fmt: skip
        return bool(metrics.get("num_target_rows_inserted", 0))

    return merge_with_retry(attempt, what="preprocess_configs")


def preprocess_config_of(catalog: Catalog, version: str) -> PreprocessConfig | None:
    """The :class:`PreprocessConfig` recorded for ``version`` in ``preprocess_configs``, or ``None`` when the catalog
    has no record of it (volumes written before the table existed)."""
    from brainiac.ingestion.preprocess.config import PreprocessConfig
    from brainiac.platform.config import from_dict

    rows = catalog.select("preprocess_configs", f"preprocess_version = {sql_literal(version)}", ["config"]).to_pylist()
    if not rows:
        return None
    return from_dict(PreprocessConfig, json.loads(rows[0]["config"]), prefix="preprocess")


def preprocess(
    cfg: Config, *, progress: bool = True, batch_size: int = 16, limit: int | None = None
) -> PreprocessSummary:
    """Preprocess every current, readable scan of the catalog that has no volume for this config's version.

    Args:
        cfg: the run config (``preprocess`` and ``splits`` sections, catalog, Ray).
        batch_size: results committed per Delta MERGE (an interruption loses at most one batch of work).
        limit: process at most this many scans (useful for a first look at a big catalog).
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
    query = catalog.scans(allowed_access=cfg.catalog.allowed_access)
    scans = [r for r in query.to_arrow(columns=SCAN_COLUMNS).to_pylist() if r["sequence"] != "other"]
    summary.selected = len(scans)
    done = set(
        catalog.select("volumes", f"preprocess_version = {sql_literal(version)}", ["scan_id"])["scan_id"].to_pylist()
    )
    bad = catalog.select("quarantine", sql_in("reason", list(VOXEL_REASONS)), ["source_uri"])
    bad_sources = set(bad["source_uri"].to_pylist())
    todo = [s for s in scans if s["scan_id"] not in done and s["source_uri"] not in bad_sources]
    summary.already_done = len(scans) - len(todo)
    if limit is not None:
        todo = todo[:limit]

    now = dt.datetime.now(dt.UTC)
    record_preprocess_config(catalog, cfg.preprocess, now)
    problems: list[Problem] = []
    qc_failed: Counter[str] = Counter()
    if todo:
        init_ray(cfg.cluster)
        remote = ray.remote(num_cpus=1)(_process_one)
        cfg_dict = asdict(cfg.preprocess)
        pending = [remote.remote(s, cfg_dict, version, options) for s in todo]
        buffer: list[dict[str, Any]] = []
        bar = tqdm(total=len(todo), desc="preprocess", unit="scan", disable=not progress)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            out = ray.get(ready[0])
            bar.update(1)
            if "problem" in out:
                problems.append(Problem(**out["problem"]))
                continue
            buffer.append(out["row"])
            if not out["row"]["qc_pass"]:
                qc_failed[out["row"]["qc_reason"] or "unspecified"] += 1
            if len(buffer) >= batch_size or not pending:
                summary.processed += _write_rows(catalog, buffer, now)
                buffer = []
        if buffer:
            summary.processed += _write_rows(catalog, buffer, now)
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
