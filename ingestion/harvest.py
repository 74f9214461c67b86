"""Harvesting scans in Ray tasks: content id and geometry of each discovered scan (DICOM series are converted first).

Kept apart from :mod:`brainiac.ingestion.ingest` so that a Ray worker imports only what harvesting needs (nibabel,
hashlib, fsspec), not pandas, deltalake and the adapters: worker start-up is a fixed cost of every ingest run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from brainiac.ingestion.adapters.base import Problem, SourceScan
from brainiac.ingestion.adapters.listing import split
from brainiac.ingestion.headers import HarvestError, harvest_nifti
from brainiac.platform.storage import StorageLocation

__all__ = ["harvest_all"]


def _harvest_one(scan: SourceScan, options: dict[str, str], raw_area_uri: str, out_name: str) -> dict[str, Any]:
    if scan.format == "dicom":
        from brainiac.ingestion.dicom_convert import convert_series

        raw_area = StorageLocation.resolve(raw_area_uri, options or None)
        root_uri = scan.source_uri.split("#", 1)[0]
        if scan.relative_path:
            root_uri = root_uri[: len(root_uri) - len(scan.relative_path.split("#", 1)[0])].rstrip("/") or root_uri
        result = convert_series(scan, raw_area, out_name, source=StorageLocation.resolve(root_uri, options or None))
        if isinstance(result, Problem):
            return {"problem": asdict(result)}
        facts = asdict(result)
        facts["image_uri"] = facts.pop("nifti_uri")
        facts.setdefault("qform_code", 1)
        facts.setdefault("sform_code", 1)
        return {"facts": facts}
    try:
        facts = harvest_nifti(StorageLocation.resolve(scan.source_uri, options or None))
    except HarvestError as exc:
        return {
            "problem": {
                "dataset": scan.dataset,
                "source_uri": scan.source_uri,
                "reason": exc.reason,
                "detail": exc.detail,
            }
        }
    return {"facts": asdict(facts)}


def _harvest_chunk(
    items: list[tuple[SourceScan, str]], options: dict[str, str], raw_area_uri: str
) -> list[dict[str, Any]]:
    return [_harvest_one(scan, options, raw_area_uri, name) for scan, name in items]


CHUNKS_PER_CPU = 8
"""Harvest chunks per Ray CPU, at least: equal chunks in a multiple of the CPUs end together, and several per CPU
absorb uneven workers (a noisy neighbour, a slow disk)."""
MAX_CHUNK = 64
"""Scans per harvest task, at most (about half a second of work for a 7 MB ``.nii.gz``)."""

_REMOTE: list[Any] = []


def harvest_chunks(n: int, cpus: int) -> int:
    """How many near-equal chunks ``n`` scans are cut into for ``cpus`` Ray CPUs."""
    per_cpu = max(CHUNKS_PER_CPU, math.ceil(n / (cpus * MAX_CHUNK)))
    return min(n, cpus * per_cpu)


def harvest_all(
    scans: Sequence[SourceScan], names: Sequence[str], options: dict[str, str], raw_area_uri: str, *, progress: bool
) -> list[dict[str, Any]]:
    """Harvest every scan on Ray, in chunks, keeping input order."""
    import ray

    if not scans:
        return []
    if not _REMOTE:
        _REMOTE.append(ray.remote(num_cpus=1)(_harvest_chunk).options(name="brainiac.harvest"))
    remote = _REMOTE[0]
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunks = split(list(zip(scans, names, strict=True)), harvest_chunks(len(scans), cpus))
    refs = [remote.remote(chunk, options, raw_area_uri) for chunk in chunks]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[list[dict[str, Any]] | None] = [None] * len(refs)
    bar = _progress(len(scans), "harvest", progress)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            results[index[ref]] = ray.get(ref)
            bar.update(len(chunks[index[ref]]))
    bar.close()
    return [r for chunk in results for r in (chunk or [])]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="scan", disable=not enabled, leave=False)
