"""Harvesting scans in Ray tasks: content id and geometry of each discovered scan (DICOM series are converted first).

Kept apart from :mod:`brainiac.ingestion.ingest` so that a Ray worker imports only what harvesting needs (nibabel,
hashlib, fsspec), not pandas, deltalake and the adapters: worker start-up is a fixed cost of every ingest run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from brainiac.ingestion.adapters.base import Problem, SourceScan
from brainiac.ingestion.adapters.listing import readable_inside, split
from brainiac.ingestion.headers import HarvestError, harvest_nifti
from brainiac.ingestion.staging import stage_image
from brainiac.platform.storage import StorageLocation

__all__ = ["Known", "harvest_all", "harvest_stream"]


def _harvest_one(
    scan: SourceScan, options: dict[str, str], raw_area_uri: str, out_name: str, known: Known | None = None
) -> dict[str, Any]:
    """One scan's facts and signature; ``known`` (a file whose size or time changed) is only compared by content."""
    if scan.format == "dicom":
        from brainiac.ingestion.dicom_convert import convert_series

        raw_area = StorageLocation.resolve(raw_area_uri, options or None)
        root_uri = scan.source_uri.split("#", 1)[0]
        if scan.relative_path:
            root_uri = root_uri[: len(root_uri) - len(scan.relative_path.split("#", 1)[0])].rstrip("/") or root_uri
        converted = convert_series(scan, raw_area, out_name, source=StorageLocation.resolve(root_uri, options or None))
        if isinstance(converted, Problem):
            return {"problem": asdict(converted)}
        series = asdict(converted)
        series["image_uri"] = series.pop("nifti_uri")
        series.setdefault("qform_code", 1)
        series.setdefault("sform_code", 1)
        return {"facts": series, "signature": _signature(series["image_uri"], options)}
    location = StorageLocation.resolve(scan.source_uri, options or None)
    if not location.is_remote:  # the file may have become a link out of the root since it was listed
        root = scan.source_uri[: len(scan.source_uri) - len(scan.relative_path)].rstrip("/")
        if not readable_inside(location.path, os.path.realpath(root)):
            return {"problem": {"dataset": scan.dataset, "source_uri": scan.source_uri, "reason": "symlink_outside_root",
                                "detail": "the file is no longer a regular file inside the dataset root; not read"}}  # fmt: skip
    try:
        facts = harvest_nifti(location)
    except HarvestError as exc:
        return {
            "problem": {
                "dataset": scan.dataset,
                "source_uri": scan.source_uri,
                "reason": exc.reason,
                "detail": exc.detail,
            }
        }
    if known is not None and known.scan_id == facts.scan_id:
        return {"unchanged": known.scan_id, "read": True}  # touched, same content: nothing to decode or write
    raw_area = StorageLocation.resolve(raw_area_uri, options or None)
    out = asdict(facts)
    out["image_uri"] = stage_image(location, raw_area, scan.dataset, facts.scan_id)
    masks, mask_problems = {}, []
    for key, relative in scan.labels.items():
        if key.endswith("_relative_path"):  # a label mask: staged like the image, by its own content id
            root = scan.source_uri[: len(scan.source_uri) - len(scan.relative_path)].rstrip("/")
            mask = StorageLocation.resolve(f"{root}/{relative}", options or None)
            try:
                masks[key[: -len("_relative_path")]] = stage_image(mask, raw_area, scan.dataset, kind="masks")
            except (OSError, ValueError) as exc:  # the scan goes in without this label; the mask is quarantined
                mask_problems.append(
                    {"dataset": scan.dataset, "source_uri": mask.uri, "reason": "missing_file",
                     "detail": f"label mask unreadable ({type(exc).__name__})"}
                )  # fmt: skip
    result = {"facts": out, "masks": masks, "signature": _signature(out["image_uri"], options)}
    return {**result, "mask_problems": mask_problems} if mask_problems else result


@dataclass(frozen=True)
class Known:
    """What the catalog holds for a source already ingested by this ``ingest_version``: a file of the same size, last
    modified before that row was written, is the same file, and is neither read nor hashed again."""

    scan_id: str
    bytes: int
    ingested_at: float
    """POSIX seconds."""


MTIME_MARGIN_S = 2.0
"""A file modified less than this before its row was written is read again (coarse file-system clocks)."""


def _unchanged(uri: str, options: dict[str, str], known: Known) -> bool:
    """Whether the file at ``uri`` is, by its size and modification time, the one the catalog already holds (a local
    ``stat``, or one metadata request on an object store)."""
    try:
        if "://" not in uri or uri.startswith("file://"):
            st = os.stat(uri.removeprefix("file://"))
            size, modified = st.st_size, st.st_mtime
        else:
            location = StorageLocation.resolve(uri, options or None)
            info = location.fsspec().info(location.path)
            size = info.get("size")
            modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
            if hasattr(modified, "timestamp"):
                modified = modified.timestamp()
    except (OSError, ValueError):
        return False
    if modified is None or size != known.bytes:
        return False
    return float(modified) < known.ingested_at - MTIME_MARGIN_S


def _signature(uri: str, options: dict[str, str]) -> dict[str, Any] | None:
    """The duplicate-search signature of a scan entering the catalog (every scan is decoded once, here, in parallel),
    or ``None`` when it does not decode (the search computes it later)."""
    from brainiac.ingestion.signatures import signature_of_uri

    decoded, signature = signature_of_uri(uri, options or None)
    if not decoded:
        return None
    if signature is None:
        return {"signature": None, "bucket_keys": []}
    return {"signature": signature.to_bytes(), "bucket_keys": list(signature.buckets)}


def _harvest_chunk(
    items: list[tuple[SourceScan, str, Known | None]], options: dict[str, str], raw_area_uri: str
) -> list[dict[str, Any]]:
    """Harvest a chunk of scans. Those the catalog may hold are first checked by size and modification time, side by
    side (on an object store each check is one request), and an unchanged one is not read at all. An unexpected error
    quarantines its scan (with the error's type, never its text, which may quote header values) instead of failing the
    chunk and the run."""
    held = {i: known for i, (_, _, known) in enumerate(items) if known is not None}
    same: dict[int, bool] = {}
    if held:
        with ThreadPoolExecutor(max_workers=STAT_THREADS) as pool:
            flags = pool.map(lambda i: _unchanged(items[i][0].source_uri, options, held[i]), held)
            same = dict(zip(held, flags, strict=True))
    out: list[dict[str, Any]] = []
    for i, (scan, name, known) in enumerate(items):
        if same.get(i):
            out.append({"unchanged": held[i].scan_id})
            continue
        try:
            out.append(_harvest_one(scan, options, raw_area_uri, name, known))
        except Exception as exc:  # anything a corrupt or exotic file can raise in a reader
            out.append({"problem": _failed(scan, f"unexpected {type(exc).__name__} while reading")})
    return out


CHUNKS_PER_CPU = 8
"""Harvest chunks per Ray CPU, at least: equal chunks in a multiple of the CPUs end together, and several per CPU
absorb uneven workers (a noisy neighbour, a slow disk)."""
MAX_CHUNK = 64
"""Scans per harvest task, at most (about half a second of work for a 7 MB ``.nii.gz``)."""

STAT_THREADS = 16
"""Concurrent size and modification-time checks per harvest task (one request each on an object store)."""

KNOWN_CHUNK = 2048
"""Scans per harvest task among those the catalog already holds (a stat each when unchanged)."""

IN_FLIGHT_PER_CPU = 2
"""Harvest chunks pending per Ray CPU: one running, one queued behind it."""

_REMOTE: list[Any] = []


def harvest_chunks(n: int, cpus: int) -> int:
    """How many near-equal chunks ``n`` scans are cut into for ``cpus`` Ray CPUs."""
    per_cpu = max(CHUNKS_PER_CPU, math.ceil(n / (cpus * MAX_CHUNK)))
    return min(n, cpus * per_cpu)


def harvest_stream(
    scans: Sequence[SourceScan],
    names: Sequence[str],
    options: dict[str, str],
    raw_area_uri: str,
    *,
    progress: bool,
    known: Sequence[Known | None] | None = None,
    in_flight_per_cpu: int = IN_FLIGHT_PER_CPU,
) -> Generator[tuple[int, dict[str, Any]], None, None]:
    """Harvest every scan on Ray, in chunks, yielding ``(index into scans, result)`` as each chunk completes.

    A result is ``{"facts": ..., "signature": ...}``, ``{"problem": ...}``, or ``{"unchanged": scan_id}`` for a
    scan whose ``known`` entry says the catalog already holds this file (same size, not modified since).

    At most ``in_flight_per_cpu`` chunks per CPU are pending at a time, so the driver holds a bounded number of
    references and results however large the pool (``ray.wait`` over tens of thousands of pending refs costs ~0.2 s a
    call). A chunk whose task fails for good (after Ray's retries) yields a ``harvest_failed`` problem for each of its
    scans instead of aborting the run.
    """
    import ray

    if not scans:
        return
    if not _REMOTE:
        _REMOTE.append(ray.remote(num_cpus=1)(_harvest_chunk).options(name="brainiac.harvest"))
    remote = _REMOTE[0]
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Scans the catalog may already hold cost a stat each (unless changed): they go in a few large chunks, so a re-ingest
    # of an unchanged pool is a handful of tasks; the rest in chunks sized for reading and hashing.
    held = [i for i in range(len(scans)) if known is not None and known[i] is not None]
    fresh = [i for i in range(len(scans)) if known is None or known[i] is None]
    chunks = split(fresh, harvest_chunks(len(fresh), cpus)) + split(held, -(-len(held) // KNOWN_CHUNK))
    window = max(1, cpus * in_flight_per_cpu)
    bar = _progress(len(scans), "harvest", progress)
    pending: dict[Any, list[int]] = {}
    queue = iter(chunks)
    try:
        while True:
            while len(pending) < window and (chunk := next(queue, None)) is not None:
                items = [(scans[i], names[i], known[i] if known is not None else None) for i in chunk]
                ref = remote.remote(items, options, raw_area_uri)
                pending[ref] = chunk
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                chunk = pending.pop(ref)
                try:
                    results = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    detail = f"harvest task failed: {type(exc).__name__}"
                    results = [{"problem": _failed(scans[i], detail)} for i in chunk]
                yield from zip(chunk, results, strict=True)
                bar.update(len(chunk))
    finally:
        bar.close()
        if ray.is_initialized():  # at interpreter exit Ray may be shut down already: cancelling would start a new one
            for ref in pending:
                ray.cancel(ref)


def harvest_all(
    scans: Sequence[SourceScan], names: Sequence[str], options: dict[str, str], raw_area_uri: str, *, progress: bool
) -> list[dict[str, Any]]:
    """Harvest every scan on Ray, keeping input order (all results in memory: for small runs and tests)."""
    results: list[dict[str, Any] | None] = [None] * len(scans)
    for i, result in harvest_stream(scans, names, options, raw_area_uri, progress=progress):
        results[i] = result
    return [r for r in results if r is not None]


def _failed(scan: SourceScan, detail: str) -> dict[str, Any]:
    return {"dataset": scan.dataset, "source_uri": scan.source_uri, "reason": "harvest_failed", "detail": detail}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="scan", disable=not enabled, leave=False)
