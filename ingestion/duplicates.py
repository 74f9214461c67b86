"""Finding the same image stored as other bytes: across datasets, re-saved with another header, container,
orientation or a small crop (BraTS 2021 contains UPENN-GBM and UCSF-PDGM cases).

Two stages keep it cheap at pool scale:
1. **Candidates from headers only.** Scans of the same sequence and voxel size whose field of view, measured along the
   RAS axes, agrees within a few voxels are candidates; nothing is decoded.
2. **Voxel signature, for candidates only.** Each candidate is decoded, reoriented to RAS, cropped to its foreground
   box and block-averaged to a 16³ z-scored signature. Two scans are copies when their signatures correlate above
   ``threshold`` (0.98) and their foreground boxes agree within ``box_tolerance`` voxels. A different acquisition of the
   same person (another session) never correlates that closely, because noise and pose differ.
Copies form groups (connected components) recorded in the ``duplicates`` table, so that splits can keep every
subject of a group on one side.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from brainiac.platform.catalog import DUPLICATES_SCHEMA, Catalog, merge_with_retry, sql_in
from brainiac.platform.storage import StorageLocation

__all__ = ["DuplicateGroup", "candidate_pairs", "find_duplicates", "voxel_signature"]

SIGNATURE_SIZE = 16


def _ras_extent(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Field of view (mm) and voxel size along R, A, S, whatever the stored axis order."""
    import nibabel as nib

    ornt = nib.io_orientation(affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    extent, spacing = np.zeros(3), np.zeros(3)
    for axis, (ras_axis, _) in enumerate(ornt):
        extent[int(ras_axis)] = shape[axis] * zooms[axis]
        spacing[int(ras_axis)] = zooms[axis]
    return extent, spacing


def candidate_pairs(
    rows: Sequence[dict[str, Any]], voxels: float = 4.0, within_dataset: bool = False
) -> list[tuple[int, int]]:
    """Index pairs of rows that could be the same image (same sequence and voxel size, field of view within
    ``voxels`` voxels per RAS axis, in two datasets — or two subjects of one dataset if ``within_dataset``).
    Header data only. Within one dataset every scan of a common grid would be a candidate (all of BraTS is
    240×240×155), so that search is opt-in."""
    keyed: dict[tuple, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for i, r in enumerate(rows):
        extent, spacing = _ras_extent(np.array(r["affine"]).reshape(4, 4), r["shape"])
        key = (r["sequence"], *np.round(spacing, 1))
        keyed.setdefault(key, []).append((i, extent, spacing))
    pairs = []
    for members in keyed.values():
        members.sort(key=lambda m: m[1][0])
        for a in range(len(members)):
            i, ext_i, sp = members[a]
            for b in range(a + 1, len(members)):
                j, ext_j, _ = members[b]
                if ext_j[0] - ext_i[0] > voxels * sp[0]:
                    break
                other = rows[i]["dataset"] != rows[j]["dataset"] or (
                    within_dataset and rows[i]["subject_id"] != rows[j]["subject_id"]
                )
                if other and np.all(np.abs(ext_i - ext_j) <= voxels * sp + 1e-6):
                    pairs.append((i, j))
    return pairs


def _load_canonical(uri: str, options: dict[str, str] | None) -> np.ndarray:
    import io

    import nibabel as nib

    loc = StorageLocation.resolve(uri, options or None)
    with loc.fsspec().open(loc.path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    img = nib.Nifti1Image.from_file_map(
        {"header": nib.FileHolder(fileobj=io.BytesIO(raw)), "image": nib.FileHolder(fileobj=io.BytesIO(raw))}
    )
    return np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)


def voxel_signature(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z-scored 16³ block-mean signature of the foreground box, foreground box size in voxels)."""
    from scipy import ndimage

    finite = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    hi = np.percentile(finite, 99.5)
    mask = finite > 0.05 * hi if hi > 0 else finite != 0
    if not mask.any():
        return np.zeros(SIGNATURE_SIZE**3, np.float32), np.zeros(3, int)
    idx = np.argwhere(mask)
    lo, up = idx.min(axis=0), idx.max(axis=0) + 1
    box = finite[lo[0] : up[0], lo[1] : up[1], lo[2] : up[2]]
    small = ndimage.zoom(box, [SIGNATURE_SIZE / s for s in box.shape], order=1, grid_mode=True, mode="nearest")
    small = small[:SIGNATURE_SIZE, :SIGNATURE_SIZE, :SIGNATURE_SIZE].astype(np.float64).ravel()
    small = (small - small.mean()) / (small.std() + 1e-8)
    return small.astype(np.float32), (up - lo)


@dataclass(frozen=True)
class DuplicateGroup:
    group_id: str
    scan_ids: tuple[str, ...]


def _signature_or_none(uri: str, options: dict[str, str] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A scan that vanished or no longer decodes since it was catalogued simply takes no part in the search."""
    try:
        return voxel_signature(_load_canonical(uri, options))
    except (OSError, ValueError, EOFError):
        return None


def _signatures(uris: list[str], options: dict[str, str] | None) -> list[tuple[np.ndarray, np.ndarray] | None]:
    return [_signature_or_none(u, options) for u in uris]


def _parallel_signatures(uris: list[str], options: dict[str, str] | None) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Signatures computed in Ray tasks when Ray is up (decoding dominates), else in this process."""
    import ray

    if not ray.is_initialized() or len(uris) < 8:
        return _signatures(uris, options)
    remote = ray.remote(num_cpus=1)(_signatures)
    size = max(1, len(uris) // (4 * max(1, int(ray.available_resources().get("CPU", 1)))))
    refs = [remote.remote(uris[i : i + size], options) for i in range(0, len(uris), size)]
    return [sig for chunk in ray.get(refs) for sig in chunk]


def find_duplicates(
    rows: Sequence[dict[str, Any]],
    options: dict[str, str] | None = None,
    threshold: float = 0.98,
    box_tolerance: int = 2,
    involving: set[str] | None = None,
) -> list[DuplicateGroup]:
    """Groups of scans that are one image stored as other bytes (see module docstring).

    ``involving`` restricts the search to pairs with at least one of these scan ids (the scans a run just added).
    """
    pairs = candidate_pairs(rows)
    if involving is not None:
        pairs = [(i, j) for i, j in pairs if rows[i]["scan_id"] in involving or rows[j]["scan_id"] in involving]
    if not pairs:
        return []
    needed = sorted({i for p in pairs for i in p})
    sigs = dict(zip(needed, _parallel_signatures([rows[i]["image_uri"] for i in needed], options), strict=True))
    parent = {i: i for i in needed}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        if sigs[i] is None or sigs[j] is None:
            continue
        (si, bi), (sj, bj) = sigs[i], sigs[j]
        corr = float(np.dot(si, sj) / len(si))
        if corr >= threshold and np.all(np.abs(bi - bj) <= box_tolerance):
            parent[find(i)] = find(j)
    groups: dict[int, list[str]] = {}
    for i in needed:
        groups.setdefault(find(i), []).append(rows[i]["scan_id"])
    out = []
    for members in groups.values():
        if len(members) > 1:
            ids = tuple(sorted(members))
            out.append(DuplicateGroup(hashlib.sha256("\n".join(ids).encode()).hexdigest()[:24], ids))
    return out


def record_duplicates(catalog: Catalog, rows: Sequence[dict[str, Any]], groups: Sequence[DuplicateGroup]) -> int:
    """MERGE groups into the ``duplicates`` table (idempotent); returns the number of new rows."""
    by_id = {r["scan_id"]: r for r in rows}
    now = dt.datetime.now(dt.UTC)
    table_rows = [
        {"group_id": g.group_id, "scan_id": s, "dataset": by_id[s]["dataset"], "subject_id": by_id[s]["subject_id"],
         "method": "voxel-signature", "found_at": now}
        for g in groups for s in g.scan_ids
    ]  # fmt: skip
    if not table_rows:
        return 0

    def attempt() -> int:
        dt_ = catalog.create_if_missing("duplicates")
        have = catalog.select(
            "duplicates", sql_in("scan_id", sorted({r["scan_id"] for r in table_rows})), ["group_id", "scan_id"]
        )
        seen = set(zip(have["group_id"].to_pylist(), have["scan_id"].to_pylist(), strict=True))
        new = [r for r in table_rows if (r["group_id"], r["scan_id"]) not in seen]
        if not new:
            return 0
        (
            dt_.merge(pa.Table.from_pylist(new, schema=DUPLICATES_SCHEMA), predicate="t.group_id = s.group_id AND t.scan_id = s.scan_id", source_alias="s", target_alias="t")
            .when_not_matched_insert_all()
            .execute()
        )  # fmt: skip
        return len(new)

    return merge_with_retry(attempt, what="duplicates")
