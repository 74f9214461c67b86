"""Finding the same image stored as other bytes: across datasets, re-saved with another header, container,
orientation or a small crop (BraTS 2021 contains UPENN-GBM and UCSF-PDGM cases).

Two stages keep it cheap at pool scale:
1. **Candidates from headers only.** Scans of the same sequence and voxel size whose field of view, measured along the
   RAS axes, agrees within a few voxels are candidates; nothing is decoded.
2. **Voxel comparison, for candidates only.** Each candidate is decoded once and reoriented to RAS; a pair's
   whole-voxel shift (what a crop causes, up to ``max_shift``) is estimated from slice-mean profiles, and the aligned
   block means (≈48³) must correlate at ``threshold`` (0.99) or more.
   A crop, even into the brain, is a whole-voxel shift, so a cropped copy matches exactly at one shift; another
   acquisition of the same person (another session) never correlates that closely, because noise and pose differ.
Copies form groups (connected components) recorded in the ``duplicates`` table, so that splits can keep every
subject of a group on one side.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from brainiac.ingestion.graph import connected_components
from brainiac.ingestion.headers import load_nifti
from brainiac.platform.catalog import DUPLICATES_SCHEMA, Catalog, merge_with_retry, sql_in

__all__ = [
    "DuplicateGroup",
    "VolumeFeatures",
    "aligned_correlation",
    "candidate_pairs",
    "find_duplicates",
    "record_duplicates",
    "volume_features",
]


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
    rows: Sequence[dict[str, Any]], voxels: float = 8.0, within_dataset: bool = False
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
    import nibabel as nib

    img = load_nifti(uri, options)
    return np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a.astype(np.float32)
    shape = [(n // f) * f for n in a.shape]
    a = a[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    return a.reshape(shape[0] // f, f, shape[1] // f, f, shape[2] // f, f).mean(axis=(1, 3, 5))


def _overlap_corr(
    a: np.ndarray, b: np.ndarray, offset: Sequence[int], min_overlap: float, floors: tuple[float, float] | None = None
) -> float:
    """Pearson correlation of ``a`` and ``b`` where ``b`` is shifted by ``offset`` voxels (b[i] ~ a[i + offset])."""
    sa, sb = [], []
    for n_a, n_b, d in zip(a.shape, b.shape, offset, strict=True):
        lo, hi = max(0, d), min(n_a, n_b + d)
        if hi - lo < 2:
            return -1.0
        sa.append(slice(lo, hi))
        sb.append(slice(lo - d, hi - d))
    x, y = a[tuple(sa)].ravel(), b[tuple(sb)].ravel()
    if x.size < min_overlap * min(a.size, b.size):
        return -1.0
    # Correlate inside the shared foreground only: skull-stripped scans registered to one atlas share their outline,
    # which alone would make any two brains correlate; the texture inside is what identifies an image.
    fa, fb = floors if floors is not None else (0.1 * np.percentile(x, 99), 0.1 * np.percentile(y, 99))
    inside = (x > fa) & (y > fb)
    if inside.sum() < max(64, 0.05 * x.size):
        return -1.0
    x, y = x[inside], y[inside]
    x = x - x.mean()
    y = y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else -1.0


@dataclass(frozen=True)
class VolumeFeatures:
    """What the pairwise comparison needs of one decoded, canonically oriented scan (decoded once per scan)."""

    shape: tuple[int, int, int]
    profiles: tuple[np.ndarray, np.ndarray, np.ndarray]
    """Mean intensity of each slice along each axis, z-scored: a crop shifts them, nothing else does."""
    coarse: np.ndarray
    factor: int


def volume_features(a: np.ndarray) -> VolumeFeatures:
    a = np.nan_to_num(a.astype(np.float32))
    profiles = []
    for axis in range(3):
        p = a.mean(axis=tuple(i for i in range(3) if i != axis))
        profiles.append((p - p.mean()) / (p.std() + 1e-8))
    from scipy import ndimage

    f = max(1, int(np.ceil(max(a.shape) / 48)))
    # Smoothed before subsampling, so that two grids offset by a fraction of a coarse voxel still sample one signal.
    coarse = ndimage.gaussian_filter(a, sigma=f, mode="constant")[::f, ::f, ::f] if f > 1 else a
    return VolumeFeatures(tuple(a.shape), tuple(profiles), coarse, f)  # type: ignore[arg-type]


def _profile_shift(p: np.ndarray, q: np.ndarray, max_shift: int) -> int:
    """Shift d maximising the correlation of q[i] with p[i + d]."""
    best, best_d = -np.inf, 0
    for d in range(-max_shift, max_shift + 1):
        lo, hi = max(0, d), min(len(p), len(q) + d)
        if hi - lo < 4:
            continue
        x, y = p[lo:hi], q[lo - d : hi - d]
        x, y = x - x.mean(), y - y.mean()
        r = float((x * y).sum() / (np.sqrt((x * x).sum() * (y * y).sum()) + 1e-12))
        if r > best:
            best, best_d = r, d
    return best_d


def aligned_correlation(fa: VolumeFeatures, fb: VolumeFeatures, max_shift: int = 8, min_overlap: float = 0.7) -> float:
    """Correlation of two scans after aligning them by the whole-voxel shift a crop would cause.

    The shift is estimated per axis from the slice-mean profiles, refined by ±1 coarse voxel, and scored on block
    means (a crop, even into the brain, is a whole-voxel shift, so a cropped copy lines up exactly). Cheap: no voxel
    is decoded twice and no 3-D search over all shifts is needed.
    """
    if fa.factor != fb.factor:
        return -1.0
    shift = [_profile_shift(p, q, max_shift) for p, q in zip(fa.profiles, fb.profiles, strict=True)]
    f = fa.factor
    best = -1.0
    for ex in (-1, 0, 1):
        for ey in (-1, 0, 1):
            for ez in (-1, 0, 1):
                d = (
                    int(np.floor(shift[0] / f)) + ex,
                    int(np.floor(shift[1] / f)) + ey,
                    int(np.floor(shift[2] / f)) + ez,
                )
                best = max(best, _overlap_corr(fa.coarse, fb.coarse, d, min_overlap))
    return best


@dataclass(frozen=True)
class DuplicateGroup:
    group_id: str
    scan_ids: tuple[str, ...]


def _features_or_none(uri: str, options: dict[str, str] | None) -> VolumeFeatures | None:
    """A scan that vanished or no longer decodes since it was catalogued simply takes no part in the search."""
    try:
        return volume_features(_load_canonical(uri, options))
    except (OSError, ValueError, EOFError):
        return None


def _features(uris: list[str], options: dict[str, str] | None) -> list[VolumeFeatures | None]:
    return [_features_or_none(u, options) for u in uris]


def _parallel_features(uris: list[str], options: dict[str, str] | None) -> list[VolumeFeatures | None]:
    """Features computed in Ray tasks when Ray is up (decoding dominates), else in this process."""
    import ray

    if not ray.is_initialized() or len(uris) < 8:
        return _features(uris, options)
    remote = ray.remote(num_cpus=1)(_features)
    size = max(1, len(uris) // (4 * max(1, int(ray.available_resources().get("CPU", 1)))))
    refs = [remote.remote(uris[i : i + size], options) for i in range(0, len(uris), size)]
    return [x for chunk in ray.get(refs) for x in chunk]


def find_duplicates(
    rows: Sequence[dict[str, Any]],
    options: dict[str, str] | None = None,
    threshold: float = 0.99,
    prefilter: float = 0.85,
    max_shift: int = 8,
    involving: set[str] | None = None,
) -> list[DuplicateGroup]:
    """Groups of scans that are one image stored as other bytes (see module docstring).

    ``involving`` restricts the search to pairs with at least one of these scan ids (the scans a run just added).
    """
    pairs = candidate_pairs(rows, voxels=max_shift)
    if involving is not None:
        pairs = [(i, j) for i, j in pairs if rows[i]["scan_id"] in involving or rows[j]["scan_id"] in involving]
    if not pairs:
        return []
    needed = sorted({i for p in pairs for i in p})
    feats = dict(zip(needed, _parallel_features([rows[i]["image_uri"] for i in needed], options), strict=True))
    coarse = [
        -1.0 if feats[i] is None or feats[j] is None else aligned_correlation(feats[i], feats[j], max_shift)
        for i, j in pairs
    ]
    # Block means blur a shift that is not a multiple of the block size, so the coarse score only shortlists; the
    # verdict is the full-resolution correlation at the exact shift (few pairs get here).
    scores = [-1.0] * len(pairs)
    cache: dict[int, np.ndarray | None] = {}
    floor: dict[int, float] = {}
    for k, ((i, j), c) in enumerate(zip(pairs, coarse, strict=True)):
        if c < prefilter:
            continue
        for n in (i, j):
            if n not in cache:
                try:
                    cache[n] = _load_canonical(rows[n]["image_uri"], options)
                    floor[n] = 0.1 * float(np.percentile(cache[n][::2, ::2, ::2], 99))
                except (OSError, ValueError, EOFError):
                    cache[n] = None
        if cache[i] is None or cache[j] is None:
            continue
        shift = [_profile_shift(p, q, max_shift) for p, q in zip(feats[i].profiles, feats[j].profiles, strict=True)]
        floors = (floor[i], floor[j])
        score = _overlap_corr(cache[i], cache[j], shift, 0.7, floors)
        if 0.8 <= score < threshold:  # a profile shift off by one voxel: look next door
            score = max(
                score,
                *(_overlap_corr(cache[i], cache[j], (shift[0] + ex, shift[1] + ey, shift[2] + ez), 0.7, floors)
                  for ex in (-1, 0, 1) for ey in (-1, 0, 1) for ez in (-1, 0, 1)),
            )  # fmt: skip
        scores[k] = score
    component = connected_components(
        [], [(i, j) for (i, j), score in zip(pairs, scores, strict=True) if score >= threshold]
    )
    groups: dict[int, list[str]] = {}
    for i, root in component.items():
        groups.setdefault(root, []).append(rows[i]["scan_id"])
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
