"""Finding the same image stored as other bytes: across datasets, re-saved with another header, container,
orientation or a small crop (BraTS 2021 contains UPENN-GBM and UCSF-PDGM cases).

The search is incremental: only pairs that involve a scan a run just added are ever enumerated, and it narrows in
stages so that the expensive one sees few pairs even when every scan of the pool shares one grid (all of BraTS and
its sources are 240×240×155):

0. **Byte-identical copies** (one ``scan_id``, the sha256 of the bytes, catalogued under two datasets) are grouped
   from the ids alone; nothing is decoded.
1. **Header candidates.** Scans of the same sequence and voxel size (the *grid key*) whose field of view, measured
   along the RAS axes, agrees within ``max_shift`` voxels, in another dataset. Vectorised, never a pair list.
2. **Signature buckets.** Every candidate has a content signature (:mod:`brainiac.ingestion.signatures`: a coarse
   canonical thumbnail of the brain and 40 SimHash band keys), computed once per scan and stored in the
   ``scan_signatures`` table, so a re-ingest decodes only the scans it adds. A new scan's shortlist is the candidates
   sharing a band key with it (a sorted-array lookup) whose signature correlates at ``min_similarity`` or more.
3. **Voxel verification, for the shortlist only,** in Ray tasks when Ray is up (batches of pairs of one new scan, so
   each task decodes the new scan once and holds at most two volumes). Each pair's whole-voxel shift (what a crop
   causes, up to ``max_shift``) is estimated from slice-mean profiles; block means (≈48³) must correlate at
   ``prefilter`` and the full-resolution voxels at the exact shift at ``threshold`` (0.99). A crop, even into the
   brain, is a whole-voxel shift, so a cropped copy matches exactly at one shift; another acquisition of the same
   person (another session) never correlates that closely, because noise and pose differ.

Copies form groups (connected components of (scan_id, dataset) nodes) recorded in the ``duplicates`` table, so that
splits can keep every subject of a group on one side.

**Crash safety.** A search is owed for every (scan_id, dataset) a run adds, and a kill between the ``scans`` commit
and the ``duplicates`` commit used to lose it for good: the next run sees those scans as unchanged and searches only
what it adds itself, so the copies stayed unlinked and splits put them on both sides. So ingest writes each owed search
to the small ``duplicate_queue`` table *before* it commits the scans (:func:`queue_searches`), a search removes the
nodes it covered only *after* its ``duplicates`` commit, and every ingest starts by searching whatever a crashed run
left in the queue (:func:`repair_unsearched`). The queue holds only the searches in flight, so an empty queue costs one
read of its Delta log, whatever the size of the catalog.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from brainiac.ingestion.graph import connected_components
from brainiac.ingestion.signatures import (
    SIGNATURE_VERSION,
    Signature,
    grid_key,
    signature_from_bytes,
    signature_of_uri,
)
from brainiac.platform.catalog import DUPLICATE_QUEUE_SCHEMA, SCAN_SIGNATURES_SCHEMA
from brainiac.platform.faults import maybe_crash

if TYPE_CHECKING:
    from brainiac.platform.catalog import Catalog

__all__ = [
    "DUPLICATE_QUEUE_SCHEMA",
    "QUEUE_TABLE",
    "SCAN_SIGNATURES_SCHEMA",
    "DuplicateGroup",
    "SearchStats",
    "VolumeFeatures",
    "aligned_correlation",
    "append_harvest_signatures",
    "candidate_pairs",
    "find_duplicates",
    "link_new_scans",
    "queue_searches",
    "record_duplicates",
    "repair_unsearched",
    "search_new_scans",
    "shortlist_pairs",
    "volume_features",
]

log = logging.getLogger(__name__)


QUEUE_TABLE = "duplicate_queue"

STALE_QUEUE_AFTER = dt.timedelta(hours=1)
"""A queued node that is still not a current scan this long after it was queued never will be (its run crashed before
its ``scans`` commit and the file is gone, or newer bytes superseded it): the repair drops it. Younger ones may belong
to a run still in flight, between its queue write and its ``scans`` commit (seconds)."""

HEADER_COLUMNS = ["scan_id", "dataset", "sequence", "shape", "affine"]
"""The narrow ``scans`` columns the header stage reads for the pool (no identifiers beyond the key, no wide JSON)."""

_MIN_SIMILARITY = 0.9
"""Signature correlation a shortlisted pair needs: copies measure ≥ 0.998, distinct subjects 0.6 on average."""
_PAIRS_PER_TASK = 16
_URIS_PER_TASK = 8


# ---------------------------------------------------------------------------------------------------------------------
# header geometry


def _ras_geometry(affines: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Field of view (mm) and voxel size along R, A, S for many scans at once ((n, 16) affines, (n, 3) shapes).

    Each stored axis goes to the world axis it points along most; the rare oblique affine where that is not a
    permutation takes nibabel's exact orientation.
    """
    n = len(affines)
    extent, spacing = np.zeros((n, 3)), np.zeros((n, 3))
    if n == 0:
        return extent, spacing
    rot = affines.reshape(n, 4, 4)[:, :3, :3]
    zooms = np.sqrt((rot**2).sum(axis=1))
    ras = np.abs(rot).argmax(axis=1)  # (n, 3): the world axis each stored axis points along most
    perm = (np.sort(ras, axis=1) == np.arange(3)).all(axis=1)
    rows = np.flatnonzero(perm)[:, None]
    extent[rows, ras[perm]] = shapes[perm] * zooms[perm]
    spacing[rows, ras[perm]] = zooms[perm]
    if not perm.all():
        from brainiac.ingestion.signatures import ras_extent

        for i in np.flatnonzero(~perm).tolist():
            extent[i], spacing[i] = ras_extent(affines[i].reshape(4, 4), shapes[i])
    return extent, spacing


@dataclass
class _Headers:
    """Header geometry of a list of scans, as arrays: what every stage indexes by row number."""

    scan_ids: list[str]
    datasets: np.ndarray  # int codes
    subjects: list[str | None]
    grids: list[str]
    extent: np.ndarray
    spacing: np.ndarray

    @classmethod
    def of(cls, rows: Sequence[dict[str, Any]]) -> _Headers:
        n = len(rows)
        affines = np.array([r["affine"] for r in rows], dtype=np.float64).reshape(n, 16)
        shapes = np.array([list(r["shape"])[:3] for r in rows], dtype=np.float64).reshape(n, 3)
        extent, spacing = _ras_geometry(affines, shapes)
        codes: dict[str, int] = {}
        datasets = np.array([codes.setdefault(r["dataset"], len(codes)) for r in rows], dtype=np.int64)
        grids = [grid_key(r["sequence"], np.round(s, 1)) for r, s in zip(rows, spacing, strict=True)]
        return cls([r["scan_id"] for r in rows], datasets, [r.get("subject_id") for r in rows], grids, extent, spacing)

    def by_grid(self, among: Iterable[int] | None = None) -> dict[str, np.ndarray]:
        """Row numbers per grid key (of ``among``, or of every row)."""
        out: dict[str, list[int]] = {}
        for i in range(len(self.grids)) if among is None else among:
            out.setdefault(self.grids[i], []).append(int(i))
        return {g: np.array(v, dtype=np.int64) for g, v in out.items()}

    def compatible(self, a: int, others: np.ndarray, voxels: float, within_dataset: bool = False) -> np.ndarray:
        """Which of ``others`` (same grid key as ``a``) could be a copy of ``a``: another dataset (or another subject
        of the same one, if ``within_dataset``) and a field of view within ``voxels`` voxels per RAS axis."""
        other = self.datasets[others] != self.datasets[a]
        if within_dataset:
            subj = np.array([self.subjects[j] != self.subjects[a] for j in others.tolist()], dtype=bool)
            other |= subj
        close = np.all(np.abs(self.extent[others] - self.extent[a]) <= voxels * self.spacing[a] + 1e-6, axis=1)
        return other & close & (others != a)


def _anchor_rows(scan_ids: Sequence[str], involving: set[str] | None) -> np.ndarray:
    return np.array(
        [i for i, s in enumerate(scan_ids) if involving is None or s in involving], dtype=np.int64
    )  # fmt: skip


def _header_candidates(
    heads: _Headers, anchors: np.ndarray, voxels: float, within_dataset: bool = False
) -> tuple[np.ndarray, int]:
    """Rows that are a header candidate of some anchor (the anchors included) and the number of (anchor, candidate)
    pairs a header-only search would verify. Memory grows with the rows, never with the pairs."""
    need = np.zeros(len(heads.scan_ids), dtype=bool)
    pairs = 0
    groups = heads.by_grid()
    is_anchor = np.zeros(len(heads.scan_ids), dtype=bool)
    is_anchor[anchors] = True
    for a in anchors.tolist():
        members = groups[heads.grids[a]]
        hit = heads.compatible(a, members, voxels, within_dataset)
        hit &= ~is_anchor[members] | (members > a)  # a pair of two anchors counts once
        if hit.any():
            need[members[hit]] = True
            need[a] = True
            pairs += int(hit.sum())
    return need, pairs


def candidate_pairs(
    rows: Sequence[dict[str, Any]],
    voxels: float = 8.0,
    within_dataset: bool = False,
    involving: set[str] | None = None,
) -> list[tuple[int, int]]:
    """Index pairs (i < j) of rows that could be the same image by their headers alone: same sequence and voxel size,
    field of view within ``voxels`` voxels per RAS axis, in two datasets (or two subjects of one dataset if
    ``within_dataset``: within one dataset every scan of a common grid would be a candidate, so that is opt-in).

    ``involving`` (scan ids) keeps the pairs with at least one of them, enumerated from those scans only: the cost is
    (involved scans × scans of their grids), not the square of the pool. Without it every pair of the pool is listed,
    which on a shared grid is quadratic by nature; the duplicate search never does that (it goes through signature
    buckets, :func:`shortlist_pairs`).
    """
    heads = _Headers.of(rows)
    anchors = _anchor_rows(heads.scan_ids, involving)
    is_anchor = np.zeros(len(rows), dtype=bool)
    is_anchor[anchors] = True
    groups = heads.by_grid()
    pairs: set[tuple[int, int]] = set()
    for a in anchors.tolist():
        members = groups[heads.grids[a]]
        hit = members[heads.compatible(a, members, voxels, within_dataset)]
        pairs.update((min(a, b), max(a, b)) for b in hit.tolist())
    return sorted(pairs)


# ---------------------------------------------------------------------------------------------------------------------
# signatures and the bucket shortlist


class _BucketIndex:
    """Rows by bucket key, as one sorted array: a lookup costs log(n) plus the size of the buckets it returns."""

    def __init__(self, rows: np.ndarray, keys: Sequence[Sequence[int]]) -> None:
        lens = np.array([len(k) for k in keys], dtype=np.int64)
        flat = np.fromiter((x for k in keys for x in k), dtype=np.int64, count=int(lens.sum()))
        owner = np.repeat(rows, lens)
        order = np.argsort(flat, kind="stable")
        self.keys, self.owner = flat[order], owner[order]

    def lookup(self, keys: Sequence[int]) -> np.ndarray:
        q = np.asarray(keys, dtype=np.int64)
        lo, hi = np.searchsorted(self.keys, q, "left"), np.searchsorted(self.keys, q, "right")
        parts = [self.owner[a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True) if b > a]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class SearchStats:
    """What one search did at each stage (logged by ingest, asserted by tests, quoted by benchmarks)."""

    new_scans: int = 0
    header_pairs: int = 0
    """(new scan, candidate) pairs a header-only search would have verified by decoding."""
    bucket_pairs: int = 0
    """(new scan, row) pairs enumerated from shared bucket keys: the only pairs the search ever lists."""
    shortlisted: int = 0
    """Pairs whose signatures correlate at ``min_similarity``: verified by decoding."""
    verified: int = 0
    """Shortlisted pairs confirmed as copies."""
    identical: int = 0
    """Cross-dataset pairs of one scan_id (byte-identical), grouped without decoding."""
    signatures_computed: int = 0
    signatures_reused: int = 0
    groups: int = 0


def shortlist_pairs(
    rows: Sequence[dict[str, Any]],
    signatures: dict[str, Signature | None],
    involving: set[str] | None = None,
    voxels: float = 8.0,
    min_similarity: float = _MIN_SIMILARITY,
    stats: SearchStats | None = None,
) -> list[tuple[int, int]]:
    """Index pairs (i < j) worth a voxel comparison: header candidates (see :func:`candidate_pairs`) that share a
    signature bucket and whose signatures correlate at ``min_similarity`` or more. ``signatures`` maps scan_id to its
    signature (a row without one takes no part). Only the buckets of the ``involving`` scans are looked up."""
    stats = stats if stats is not None else SearchStats()
    heads = _Headers.of(rows)
    anchors = _anchor_rows(heads.scan_ids, involving)
    is_anchor = np.zeros(len(rows), dtype=bool)
    is_anchor[anchors] = True
    present = {s: sig for s in heads.scan_ids if (sig := signatures.get(s)) is not None}
    with_sig = [i for i, s in enumerate(heads.scan_ids) if s in present]
    indexes = {
        g: _BucketIndex(members, [present[heads.scan_ids[i]].buckets for i in members.tolist()])
        for g, members in heads.by_grid(with_sig).items()
    }
    pairs: set[tuple[int, int]] = set()
    for a in anchors.tolist():
        sig_a = present.get(heads.scan_ids[a])
        if sig_a is None or heads.grids[a] not in indexes:
            continue
        found = indexes[heads.grids[a]].lookup(sig_a.buckets)
        found = found[found != a]
        stats.bucket_pairs += len(found)
        ok = heads.compatible(a, found, voxels)
        ok &= ~is_anchor[found] | (found > a)
        for b in found[ok].tolist():
            sig_b = present[heads.scan_ids[b]]
            if float(sig_a.vector @ sig_b.vector) >= min_similarity:
                pairs.add((min(a, b), max(a, b)))
    stats.shortlisted += len(pairs)
    return sorted(pairs)


def _load_canonical(uri: str, options: dict[str, str] | None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A scan decoded to float32 in the closest canonical (RAS) orientation, with its voxel size."""
    import nibabel as nib

    from brainiac.ingestion.headers import load_nifti

    img = nib.as_closest_canonical(load_nifti(uri, options))
    zooms = img.header.get_zooms()
    return np.asarray(img.dataobj, dtype=np.float32), (float(zooms[0]), float(zooms[1]), float(zooms[2]))


_UNREADABLE = (OSError, ValueError, EOFError)
"""A scan that vanished or no longer decodes since it was catalogued simply takes no part in the search."""


def _signature_batch(uris: list[str], options: dict[str, str] | None) -> list[tuple[bool, Signature | None]]:
    """(decoded, signature) per uri: ``(False, None)`` for an unreadable scan (retried next time), ``(True, None)``
    for an image without foreground (stored, never recomputed)."""
    out = []
    for uri in uris:
        decoded, signature = signature_of_uri(uri, options)
        if not decoded:
            log.warning("duplicate search: cannot decode a catalogued scan; it takes no part")
        out.append((decoded, signature))
    return out


def _ray_up() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized())


def _map_batches(fn: Callable[..., list], batches: list[list], *args: Any, min_batches: int = 2) -> list:
    """``fn(batch, *args)`` for every batch, in Ray tasks (one CPU each) when Ray is up and there is more than one
    batch, else here; the concatenated results in batch order."""
    if not batches:
        return []
    if not _ray_up() or len(batches) < min_batches:
        return [x for b in batches for x in fn(b, *args)]
    import ray

    remote = ray.remote(num_cpus=1)(fn)
    refs = [remote.remote(b, *args) for b in batches]
    return [x for chunk in ray.get(refs) for x in chunk]


def _compute_signatures(uris: list[str], options: dict[str, str] | None) -> list[tuple[bool, Signature | None]]:
    batches = [uris[i : i + _URIS_PER_TASK] for i in range(0, len(uris), _URIS_PER_TASK)]
    return _map_batches(_signature_batch, batches, options)


# ---------------------------------------------------------------------------------------------------------------------
# voxel verification


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
    """What the pairwise comparison needs of one decoded, canonically oriented scan."""

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
    return VolumeFeatures(tuple(a.shape), tuple(profiles), coarse, f)


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


@dataclass
class _Decoded:
    array: np.ndarray
    features: VolumeFeatures
    floor: float


def _decode(uri: str, options: dict[str, str] | None) -> _Decoded | None:
    try:
        a, _ = _load_canonical(uri, options)
    except _UNREADABLE as exc:
        log.warning("duplicate search: cannot decode %s (%s); it takes no part", uri, exc)
        return None
    return _Decoded(a, volume_features(a), 0.1 * float(np.percentile(a[::2, ::2, ::2], 99)))


def _pair_score(da: _Decoded, db: _Decoded, threshold: float, prefilter: float, max_shift: int) -> float:
    """The verdict on one pair: block means shortlist (they blur a shift that is not a multiple of the block size),
    the full-resolution correlation at the exact shift decides."""
    if aligned_correlation(da.features, db.features, max_shift) < prefilter:
        return -1.0
    shift = [_profile_shift(p, q, max_shift) for p, q in zip(da.features.profiles, db.features.profiles, strict=True)]
    floors = (da.floor, db.floor)
    score = _overlap_corr(da.array, db.array, shift, 0.7, floors)
    if 0.8 <= score < threshold:  # a profile shift off by one voxel: look next door
        score = max(
            score,
            *(_overlap_corr(da.array, db.array, (shift[0] + ex, shift[1] + ey, shift[2] + ez), 0.7, floors)
              for ex in (-1, 0, 1) for ey in (-1, 0, 1) for ez in (-1, 0, 1)),
        )  # fmt: skip
    return score


def _verify_batch(
    pairs: list[tuple[str, str]], options: dict[str, str] | None, threshold: float, prefilter: float, max_shift: int
) -> list[float]:
    """Scores of (uri, uri) pairs. Pairs come grouped by their first scan, so it is decoded once per batch; at most
    two decoded volumes are held at any time (bounded memory, whatever the batch size)."""
    held: dict[str, _Decoded | None] = {}
    scores = []
    for ua, ub in pairs:
        for u in (ua, ub):
            if u not in held:
                for old in [k for k in held if k not in (ua, ub)]:
                    del held[old]
                held[u] = _decode(u, options)
        da, db = held[ua], held[ub]
        scores.append(-1.0 if da is None or db is None else _pair_score(da, db, threshold, prefilter, max_shift))
    return scores


def _verify(
    pairs: list[tuple[int, int]],
    uris: Sequence[str],
    options: dict[str, str] | None,
    threshold: float,
    prefilter: float,
    max_shift: int,
) -> list[float]:
    """Scores of index pairs, in Ray tasks of up to ``_PAIRS_PER_TASK`` pairs of one first scan when Ray is up."""
    by_first: dict[int, list[int]] = {}
    for k, (i, _) in enumerate(pairs):
        by_first.setdefault(i, []).append(k)
    order = [k for ks in by_first.values() for k in ks]
    batches: list[list[tuple[str, str]]] = []
    for ks in by_first.values():
        for s in range(0, len(ks), _PAIRS_PER_TASK):
            batches.append([(uris[pairs[k][0]], uris[pairs[k][1]]) for k in ks[s : s + _PAIRS_PER_TASK]])
    flat = _map_batches(_verify_batch, batches, options, threshold, prefilter, max_shift)
    scores = [-1.0] * len(pairs)
    for k, s in zip(order, flat, strict=True):
        scores[k] = s
    return scores


# ---------------------------------------------------------------------------------------------------------------------
# groups


@dataclass(frozen=True)
class DuplicateGroup:
    """Scans that hold one image. ``members`` are (scan_id, dataset): a byte-identical copy is one scan_id in two
    datasets. ``method``: ``identical-bytes`` when every member has one scan_id, else ``voxel-signature``."""

    group_id: str
    scan_ids: tuple[str, ...]
    members: tuple[tuple[str, str], ...] = ()
    method: str = "voxel-signature"


def _groups(edges: Iterable[tuple[tuple[str, str], tuple[str, str]]]) -> list[DuplicateGroup]:
    component = connected_components([], edges)
    members: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for node, root in component.items():
        members.setdefault(root, []).append(node)
    out = []
    for nodes in members.values():
        if len(nodes) < 2:
            continue
        nodes = sorted(nodes)
        ids = tuple(sorted({s for s, _ in nodes}))
        # A group of distinct scan ids keeps the id it always had; one with repeated ids names the datasets too.
        text = "\n".join(ids) if len(ids) == len(nodes) else "\n".join(f"{s}/{d}" for s, d in nodes)
        method = "identical-bytes" if len(ids) == 1 else "voxel-signature"
        out.append(DuplicateGroup(hashlib.sha256(text.encode()).hexdigest()[:24], ids, tuple(nodes), method))
    return sorted(out, key=lambda g: g.group_id)


def _identical_edges(
    scan_ids: Sequence[str], datasets: Sequence[str], involving: set[str] | None
) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Edges between the datasets that catalogue one scan_id (the same bytes), for the involved ids."""
    where: dict[str, list[str]] = {}
    for s, d in zip(scan_ids, datasets, strict=True):
        if involving is None or s in involving:
            where.setdefault(s, [])
            if d not in where[s]:
                where[s].append(d)
    return [((s, ds[0]), (s, d)) for s, ds in where.items() for d in ds[1:]]


def find_duplicates(
    rows: Sequence[dict[str, Any]],
    options: dict[str, str] | None = None,
    threshold: float = 0.99,
    prefilter: float = 0.85,
    max_shift: int = 8,
    involving: set[str] | None = None,
    *,
    signatures: dict[str, Signature | None] | None = None,
    min_similarity: float = _MIN_SIMILARITY,
    stats: SearchStats | None = None,
) -> list[DuplicateGroup]:
    """Groups of scans that are one image stored as other bytes (see module docstring), from rows in memory
    (``scan_id``, ``dataset``, ``sequence``, ``shape``, ``affine``, ``image_uri``; ``subject_id`` optional).

    ``involving`` restricts the search to pairs with at least one of these scan ids (the scans a run just added): only
    their pairs are enumerated. ``signatures`` (scan_id → signature) are used where given and computed (and added to
    the dict) for the other candidates that need one. :func:`link_new_scans` is the same search against a catalog,
    with stored signatures.
    """
    stats = stats if stats is not None else SearchStats()
    signatures = signatures if signatures is not None else {}
    heads = _Headers.of(rows)
    anchors = _anchor_rows(heads.scan_ids, involving)
    stats.new_scans += len(anchors)
    edges = _identical_edges(heads.scan_ids, [r["dataset"] for r in rows], involving)
    stats.identical += len(edges)
    need, stats.header_pairs = _header_candidates(heads, anchors, max_shift)
    missing: dict[str, str] = {}
    for i in np.flatnonzero(need).tolist():
        if heads.scan_ids[i] not in signatures:
            missing.setdefault(heads.scan_ids[i], rows[i]["image_uri"])
    computed = _compute_signatures(list(missing.values()), options)
    for sid, (_, sig) in zip(missing, computed, strict=True):
        signatures[sid] = sig
    stats.signatures_computed += len(missing)
    stats.signatures_reused += int(need.sum()) - len(missing)
    pairs = shortlist_pairs(rows, signatures, involving, max_shift, min_similarity, stats)
    pairs = [(i, j) for i, j in pairs if heads.scan_ids[i] != heads.scan_ids[j]]  # identical bytes: grouped above
    scores = _verify(pairs, [r["image_uri"] for r in rows], options, threshold, prefilter, max_shift)
    for (i, j), score in zip(pairs, scores, strict=True):
        if score >= threshold:
            stats.verified += 1
            edges.append(((rows[i]["scan_id"], rows[i]["dataset"]), (rows[j]["scan_id"], rows[j]["dataset"])))
    groups = _groups(edges)
    stats.groups = len(groups)
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# the catalog


def _select_ids(
    catalog: Catalog, name: str, ids: Iterable[str], columns: Sequence[str], where: str | None = None
) -> pa.Table:
    """Rows of ``name`` whose scan_id is one of ``ids``: a semi-join on a key array, never a SQL literal list."""
    keys = pa.array(sorted(set(ids)), pa.string())
    if len(keys) == 0:
        from brainiac.platform.catalog import SCHEMAS

        return SCHEMAS[name].empty_table().select(list(columns))
    return catalog.select_keys(name, "scan_id", keys, columns=list(columns), where=where)


def _stored_signatures(catalog: Catalog, ids: Iterable[str]) -> dict[str, Signature | None]:
    table = _select_ids(
        catalog, "scan_signatures", ids, ["scan_id", "signature", "bucket_keys"],
        where=f"signature_version = '{SIGNATURE_VERSION}'",
    )  # fmt: skip
    out: dict[str, Signature | None] = {}
    for sid, data, keys in zip(
        table["scan_id"].to_pylist(), table["signature"].to_pylist(), table["bucket_keys"].to_pylist(), strict=True
    ):
        out[sid] = None if data is None else Signature(signature_from_bytes(data), tuple(keys or ()))
    return out


def _store_signatures(catalog: Catalog, rows: list[dict[str, Any]]) -> int:
    """MERGE signature rows (idempotent on scan_id, dataset and scheme: a row already stored is left alone); returns
    the number of rows offered."""
    from brainiac.platform.catalog import insert_missing, merge_with_retry

    if not rows:
        return 0
    source = pa.Table.from_pylist(rows, schema=SCAN_SIGNATURES_SCHEMA)

    def attempt() -> int:
        table = catalog.create_if_missing("scan_signatures")
        insert_missing(table, source, ["scan_id", "dataset", "signature_version"])
        return len(rows)

    return merge_with_retry(attempt, what="scan_signatures")


def append_harvest_signatures(
    catalog: Catalog, rows: Sequence[dict[str, Any]], signatures: Sequence[dict[str, Any] | None]
) -> int:
    """Store the signatures ingest computed in its harvest tasks for scans it just inserted (``rows``: their catalog
    rows; ``signatures``: ``{"signature", "bucket_keys"}`` or ``None`` where the scan did not decode, left for the
    search to compute). A plain append: the rows are new scans, so no MERGE has to read the table. Returns the rows
    written."""
    from deltalake import write_deltalake

    keep = [(r, g) for r, g in zip(rows, signatures, strict=True) if g is not None]
    if not keep:
        return 0
    heads = _Headers.of([r for r, _ in keep])
    now = dt.datetime.now(dt.UTC)
    table = pa.Table.from_pylist(
        [
            {"scan_id": r["scan_id"], "dataset": r["dataset"], "subject_id": r["subject_id"],
             "sequence": r["sequence"], "grid_key": grid, "signature_version": SIGNATURE_VERSION,
             "signature": g["signature"], "bucket_keys": g["bucket_keys"], "computed_at": now}
            for (r, g), grid in zip(keep, heads.grids, strict=True)
        ],
        schema=SCAN_SIGNATURES_SCHEMA,
    )  # fmt: skip
    catalog.create_if_missing("scan_signatures")
    location = catalog.table_location("scan_signatures")
    write_deltalake(location.uri, table, mode="append", storage_options=location.delta_storage_options())
    maybe_crash("signatures.appended")
    return table.num_rows


def search_new_scans(
    catalog: Catalog,
    new_scan_ids: set[str],
    options: dict[str, str] | None = None,
    *,
    threshold: float = 0.99,
    prefilter: float = 0.85,
    max_shift: int = 8,
    min_similarity: float = _MIN_SIMILARITY,
) -> tuple[list[DuplicateGroup], SearchStats]:
    """The groups that the current scans ``new_scan_ids`` form with the rest of the catalog, recorded in
    ``duplicates``, and what each stage did.

    Reads: the narrow header columns (:data:`HEADER_COLUMNS`) of the new scans and of the current scans of their
    sequences; stored signatures of the header candidates; ``subject_id``/``image_uri`` of the few scans that must be
    decoded or recorded. Signatures it computes are stored, so the next run decodes only its own new scans.
    """
    stats = SearchStats()
    new = set(new_scan_ids)
    if not new:
        return [], stats
    fresh = _select_ids(catalog, "scans", new, HEADER_COLUMNS, where="status = 'current'")
    if fresh.num_rows == 0:
        return [], stats
    sequences = sorted({s for s in fresh["sequence"].to_pylist() if s is not None})
    if len(sequences) == len(set(fresh["sequence"].to_pylist())):
        pool = catalog.scans(sequence=sequences).to_arrow(columns=HEADER_COLUMNS)
    else:  # a scan without a sequence: SQL cannot select NULL by IN
        pool = catalog.scans().to_arrow(columns=HEADER_COLUMNS)
    rows = pool.to_pylist()
    heads = _Headers.of(rows)
    anchors = _anchor_rows(heads.scan_ids, new)
    stats.new_scans = len({heads.scan_ids[i] for i in anchors.tolist()})
    edges = _identical_edges(heads.scan_ids, [r["dataset"] for r in rows], new)
    stats.identical = len(edges)
    need, stats.header_pairs = _header_candidates(heads, anchors, max_shift)
    need_rows = np.flatnonzero(need).tolist()
    need_ids = {heads.scan_ids[i] for i in need_rows}
    signatures = _stored_signatures(catalog, need_ids)
    stats.signatures_reused = len(signatures)
    missing = sorted(need_ids - set(signatures))
    extra: dict[tuple[str, str], dict[str, Any]] = {}

    def details(ids: Iterable[str]) -> None:
        want = set(ids) - {s for s, _ in extra}
        table = _select_ids(
            catalog, "scans", want, ["scan_id", "dataset", "subject_id", "image_uri"], where="status = 'current'"
        )
        for r in table.to_pylist():
            extra.setdefault((r["scan_id"], r["dataset"]), r)

    if missing:
        details(missing)
        uri_of = {s: r["image_uri"] for (s, _), r in extra.items()}
        todo = [s for s in missing if s in uri_of]
        computed = _compute_signatures([uri_of[s] for s in todo], options)
        now = dt.datetime.now(dt.UTC)
        rows_of: dict[str, list[int]] = {}
        for i in need_rows:
            rows_of.setdefault(heads.scan_ids[i], []).append(i)
        store = []
        for sid, (decoded, sig) in zip(todo, computed, strict=True):
            signatures[sid] = sig
            if not decoded:
                continue  # unreadable now: not stored, tried again next time
            stats.signatures_computed += 1
            for i in rows_of[sid]:
                r, d = rows[i], extra.get((sid, rows[i]["dataset"]), {})
                store.append({
                    "scan_id": sid, "dataset": r["dataset"], "subject_id": d.get("subject_id"),
                    "sequence": r["sequence"], "grid_key": heads.grids[i], "signature_version": SIGNATURE_VERSION,
                    "signature": None if sig is None else sig.to_bytes(),
                    "bucket_keys": [] if sig is None else list(sig.buckets), "computed_at": now,
                })  # fmt: skip
        _store_signatures(catalog, store)
    pairs = shortlist_pairs(rows, signatures, new, max_shift, min_similarity, stats)
    pairs = [(i, j) for i, j in pairs if heads.scan_ids[i] != heads.scan_ids[j]]
    if pairs:
        details({heads.scan_ids[k] for p in pairs for k in p})
        uris = [
            extra.get((s, r["dataset"]), {}).get("image_uri", "") for s, r in zip(heads.scan_ids, rows, strict=True)
        ]
        scores = _verify(pairs, uris, options, threshold, prefilter, max_shift)
        for (i, j), score in zip(pairs, scores, strict=True):
            if score >= threshold:
                stats.verified += 1
                edges.append(((heads.scan_ids[i], rows[i]["dataset"]), (heads.scan_ids[j], rows[j]["dataset"])))
    groups = _groups(edges)
    stats.groups = len(groups)
    maybe_crash("duplicates.searched")
    if groups:
        details({s for g in groups for s in g.scan_ids})
        record_duplicates(catalog, list(extra.values()), groups)
        maybe_crash("duplicates.committed")
    # Only now is the search of these nodes on storage: a crash before this point leaves them queued for the repair.
    _dequeue(catalog, fresh.select(["scan_id", "dataset"]))
    log.info("duplicate search: %s", stats)
    return groups, stats


def link_new_scans(catalog: Catalog, new_scan_ids: set[str], options: dict[str, str] | None = None) -> int:
    """Find and record the copies that the scans a run just added form with the catalog; returns the number of groups.

    Incremental: only pairs involving ``new_scan_ids`` are enumerated, through stored signature buckets, and only the
    shortlist is decoded (see :func:`search_new_scans`).
    """
    groups, _ = search_new_scans(catalog, new_scan_ids, options or None)
    return len(groups)


# ---------------------------------------------------------------------------------------------------------------------
# the queue of owed searches (crash safety, see the module docstring)


def _create_queue(catalog: Catalog) -> None:
    """Create the empty ``duplicate_queue`` table (no deletion vectors, like every catalog table) unless it exists."""
    from deltalake import write_deltalake

    from brainiac.platform.catalog import TABLE_CONFIGURATION

    if catalog.table(QUEUE_TABLE) is not None:
        return
    location = catalog.table_location(QUEUE_TABLE)
    try:
        write_deltalake(
            location.uri,
            DUPLICATE_QUEUE_SCHEMA.empty_table(),
            mode="ignore",
            configuration=TABLE_CONFIGURATION,
            storage_options=location.delta_storage_options(),
            name=QUEUE_TABLE,
        )
    except Exception as exc:  # another writer created it between the check and the write
        if catalog.table(QUEUE_TABLE) is None:
            raise RuntimeError(f"could not create {QUEUE_TABLE} in {catalog.uri}") from exc


def _queued(catalog: Catalog) -> pa.Table:
    """Every queued node (``scan_id``, ``dataset``, ``queued_at``): the queue holds only searches in flight, so this is
    a read of its log and of a few small files, and of the log alone when it is empty."""
    table = catalog.table(QUEUE_TABLE)
    if table is None or not table.file_uris():
        return DUPLICATE_QUEUE_SCHEMA.empty_table()
    return table.to_pyarrow_dataset().to_table(columns=DUPLICATE_QUEUE_SCHEMA.names).cast(DUPLICATE_QUEUE_SCHEMA)


def queue_searches(catalog: Catalog, rows: Sequence[dict[str, Any]], now: dt.datetime | None = None) -> int:
    """Record that the (scan_id, dataset) nodes of ``rows`` (harvested ``scans`` rows about to be committed) are owed a
    duplicate search, for the nodes that are not current scans yet; returns how many were queued.

    Ingest calls it just before each ``scans`` commit: if the run dies after that commit and before its search has
    committed ``duplicates``, the next ingest finds the nodes here (:func:`repair_unsearched`) instead of treating those
    scans as already linked. One narrow read of ``scans`` (the current nodes among these ids) and one append.
    """
    from deltalake import write_deltalake

    from brainiac.platform.catalog import SQL_IN_MAX_VALUES, sql_in

    nodes = sorted({(r["scan_id"], r["dataset"]) for r in rows})
    if nodes and catalog.table("scans") is not None:
        datasets = sorted({d for _, d in nodes})
        where = "status = 'current'"
        if len(datasets) <= SQL_IN_MAX_VALUES:
            where = f"{sql_in('dataset', datasets)} AND {where}"
        held = catalog.select_keys("scans", "scan_id", [s for s, _ in nodes], ["scan_id", "dataset"], where=where)
        have = set(zip(held["scan_id"].to_pylist(), held["dataset"].to_pylist(), strict=True))
        nodes = [n for n in nodes if n not in have]
    if nodes:
        when = now or dt.datetime.now(dt.UTC)
        table = pa.Table.from_pylist(
            [{"scan_id": s, "dataset": d, "queued_at": when} for s, d in nodes], schema=DUPLICATE_QUEUE_SCHEMA
        )
        _create_queue(catalog)
        location = catalog.table_location(QUEUE_TABLE)
        write_deltalake(location.uri, table, mode="append", storage_options=location.delta_storage_options())
    maybe_crash("queue.staged")
    return len(nodes)


def _dequeue(catalog: Catalog, nodes: pa.Table) -> int:
    """Remove the queued entries of ``nodes`` (``scan_id``, ``dataset``), in one MERGE, only if any is queued (no
    commit otherwise); returns the entries removed."""
    from brainiac.platform.catalog import merge_with_retry

    if nodes.num_rows == 0:
        return 0
    queued = _queued(catalog)
    wanted = set(zip(nodes["scan_id"].to_pylist(), nodes["dataset"].to_pylist(), strict=True))
    hits = {n for n in zip(queued["scan_id"].to_pylist(), queued["dataset"].to_pylist(), strict=True) if n in wanted}
    if not hits:
        return 0
    source = pa.Table.from_pylist(
        [{"scan_id": s, "dataset": d} for s, d in sorted(hits)],
        schema=pa.schema([("scan_id", pa.string()), ("dataset", pa.string())]),
    )

    def attempt() -> int:
        table = catalog.table(QUEUE_TABLE)
        if table is None:
            raise RuntimeError(f"the {QUEUE_TABLE} table vanished while its entries were being cleared")
        metrics = (
            table.merge(source, predicate="t.scan_id = s.scan_id AND t.dataset = s.dataset", source_alias="s",
                        target_alias="t")
            .when_matched_delete()
            .execute()
        )  # fmt: skip
        return int(metrics.get("num_target_rows_deleted", 0))

    removed = merge_with_retry(attempt, what=QUEUE_TABLE)
    maybe_crash("queue.cleared")
    return removed


def repair_unsearched(catalog: Catalog, options: dict[str, str] | None = None, now: dt.datetime | None = None) -> int:
    """Run the duplicate searches that a crashed ingest owed (the nodes left in ``duplicate_queue``); returns the
    number of groups they involve. Ingest calls it at its start, once Ray is up.

    Costs a read of the queue's log when nothing is owed. Otherwise it is :func:`search_new_scans` for the queued scan
    ids, which removes the nodes it searched; a node still not current :data:`STALE_QUEUE_AFTER` after it was queued is
    dropped (its scans commit never happened, or it was superseded), a younger one is left to the run that queued it.
    """
    queued = _queued(catalog)
    if queued.num_rows == 0:
        return 0
    ids = set(queued["scan_id"].to_pylist())
    log.info("duplicate search: %d scan(s) left unsearched by an interrupted ingest; searching them now", len(ids))
    groups, _ = search_new_scans(catalog, ids, options or None)
    cutoff = (now or dt.datetime.now(dt.UTC)) - STALE_QUEUE_AFTER
    old = queued.filter(pc.less(queued["queued_at"], pa.scalar(cutoff, DUPLICATE_QUEUE_SCHEMA.field("queued_at").type)))
    if old.num_rows:
        _dequeue(catalog, old.select(["scan_id", "dataset"]))
    return len(groups)


def record_duplicates(catalog: Catalog, rows: Sequence[dict[str, Any]], groups: Sequence[DuplicateGroup]) -> int:
    """MERGE groups into the ``duplicates`` table (idempotent); returns the number of new rows.

    ``rows`` give each member's ``dataset`` and ``subject_id`` (by scan_id and dataset; a group built without members
    takes the first row of each scan_id).
    """
    from brainiac.platform.catalog import DUPLICATES_SCHEMA, insert_missing, merge_with_retry

    by_key = {(r["scan_id"], r["dataset"]): r for r in rows}
    by_id: dict[str, dict[str, Any]] = {}
    for r in rows:
        by_id.setdefault(r["scan_id"], r)
    now = dt.datetime.now(dt.UTC)
    table_rows: list[dict[str, Any]] = []
    for g in groups:
        members = g.members or tuple((s, by_id[s]["dataset"]) for s in g.scan_ids)
        for s, d in members:
            r = by_key.get((s, d), by_id.get(s, {}))
            table_rows.append({"group_id": g.group_id, "scan_id": s, "dataset": d, "subject_id": r.get("subject_id"),
                               "method": g.method, "found_at": now})  # fmt: skip
    if not table_rows:
        return 0

    def attempt() -> int:
        dt_ = catalog.create_if_missing("duplicates")
        have = _select_ids(
            catalog, "duplicates", {r["scan_id"] for r in table_rows}, ["group_id", "scan_id", "dataset"]
        )
        seen = set(
            zip(have["group_id"].to_pylist(), have["scan_id"].to_pylist(), have["dataset"].to_pylist(), strict=True)
        )
        new = [r for r in table_rows if (r["group_id"], r["scan_id"], r["dataset"]) not in seen]
        if not new:
            return 0
        insert_missing(dt_, pa.Table.from_pylist(new, schema=DUPLICATES_SCHEMA), ["group_id", "scan_id", "dataset"])
        return len(new)

    return merge_with_retry(attempt, what="duplicates")
