"""View pairs for contrastive pretraining: two crops around the same brain location, each at its own random scale.

SimCLR on whole images pulls two augmentations of one image together; on 3-D brains that image is a patch, so the two
views must show the **same place** (Tak et al.: same location, different augmentation). The pair is cut from a decoded
``whole`` volume of the catalog: the first crop is centred on a random brain voxel (so it holds brain, not background),
the second is centred a random jitter of at most ``jitter_frac`` of the smaller crop's edge away, and the two share at
least ``min_overlap`` of the smaller crop's volume.

Random resized crops (``crop_scale``, on by default): each view draws its **own** scale s in ``crop_scale``, cuts a cube
of edge s·L (L = the volume's longest edge; crops are cubes, voxels stay isotropic) and resizes it to the model's size by
trilinear interpolation. At s = 1 the crop is the whole volume, fitted into the cube as the ``fixed`` cube fine-tuning
sees it; at s = 0.4 it shows 0.4 of the volume per axis in finer detail. Two views of one place at different scales
teach the encoder features that hold from the whole brain down to its parts, the scales fine-tuning feeds it.
With ``crop_scale: null`` the views are plain ``size``³ crops of the ``whole`` grid, one shared size (0.5-0.6 of the
volume per axis at 1 mm and 96³).

Pure numpy, used inside the Ray Data stream and by the benchmarks.
"""

from __future__ import annotations

import numpy as np

from brainiac.models.train_config import PatchConfig

__all__ = [
    "box_overlap",
    "crop_box",
    "resize_cube",
    "sample_pair_corners",
    "sample_scaled_pairs",
    "view_pairs",
]


def box_overlap(first: np.ndarray, second: np.ndarray, size: int, second_size: int | None = None) -> float:
    """Shared volume of a ``size``³ box at corner ``first`` and a ``second_size``³ (default ``size``³) box at corner
    ``second``, as a fraction of the smaller box."""
    other = size if second_size is None else second_size
    a, b = np.asarray(first), np.asarray(second)
    shared = np.clip(np.minimum(a + size, b + other) - np.maximum(a, b), 0, None)
    return float(np.prod(shared / min(size, other)))


def crop_box(volume: np.ndarray, corner: np.ndarray, size: int) -> np.ndarray:
    """The ``size``³ crop of ``volume`` at ``corner``; parts outside the volume read as 0 (the background value)."""
    out = np.zeros((size, size, size), dtype=volume.dtype)
    lo = np.maximum(corner, 0)
    hi = np.minimum(np.asarray(corner) + size, volume.shape)
    if np.any(hi <= lo):
        return out
    src = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    dst = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, corner, strict=True))
    out[dst] = volume[src]
    return out


def sample_pair_corners(
    mask: np.ndarray, size: int, count: int, cfg: PatchConfig, rng: np.random.Generator, max_tries: int = 20
) -> np.ndarray:
    """Corners of ``count`` crop pairs, shape (count, 2, 3): first crops centred on brain voxels, second ones jittered.

    A volume smaller than ``size`` along an axis gets corners that centre it (the crop pads with background). A draw
    that misses ``min_brain_fraction`` or ``min_overlap`` is redrawn up to ``max_tries`` times; the last draw is kept,
    so a tiny or empty mask degrades to centred crops instead of failing.
    """
    shape = np.asarray(mask.shape)
    brain = np.argwhere(mask > 0)
    centre = (shape - 1) / 2.0
    hi = np.maximum(shape - size, 0)
    max_shift = round(cfg.jitter_frac * size)
    corners = np.zeros((count, 2, 3), dtype=np.int64)
    for i in range(count):
        for _ in range(max_tries):
            middle = brain[rng.integers(len(brain))] if len(brain) else centre
            first = np.where(
                shape >= size, np.clip(np.round(middle - size / 2).astype(int), 0, hi), (shape - size) // 2
            )
            if cfg.min_brain_fraction > 0 and len(brain):
                inside = crop_box(mask, first, size)
                if inside.mean() < cfg.min_brain_fraction * min(1.0, len(brain) / size**3):
                    continue
            break
        for _ in range(max_tries):
            shift = rng.integers(-max_shift, max_shift + 1, size=3) if max_shift else np.zeros(3, dtype=int)
            second = np.where(shape >= size, np.clip(first + shift, 0, hi), first)
            if box_overlap(first, second, size) >= cfg.min_overlap:
                break
        else:
            second = first
        corners[i, 0], corners[i, 1] = first, second
    return corners


def _linear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (low, high) and weights of linear interpolation from ``n_in`` to ``n_out`` samples, with
    ``torch.nn.functional.interpolate(mode="trilinear", align_corners=False)``'s sample positions."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    low = np.floor(src).astype(np.intp)
    return low, np.minimum(low + 1, n_in - 1), (src - low).astype(np.float32)


def resize_cube(crop: np.ndarray, size: int) -> np.ndarray:
    """A cubic ``crop`` resized to ``size``³ by trilinear interpolation (unchanged when it already is), same dtype.

    Separable (one axis at a time, the first axis first, so a downsized crop shrinks before the costly passes), with
    torch's ``align_corners=False`` sample positions: equal to ``F.interpolate(mode="trilinear")`` to float32 rounding.
    """
    if crop.shape == (size, size, size):
        return crop
    out = crop.astype(np.float32, copy=False)
    for axis in range(3):
        low, high, weight = _linear_axis(out.shape[axis], size)
        lower = np.take(out, low, axis=axis)
        upper = np.take(out, high, axis=axis)
        upper -= lower
        upper *= weight.reshape([-1 if a == axis else 1 for a in range(3)])
        lower += upper
        out = lower
    return out.astype(crop.dtype, copy=False)


def _corner_at(centre: np.ndarray, edge: int, shape: np.ndarray) -> np.ndarray:
    """Corner of the ``edge``³ box centred at ``centre``, moved inside the volume along each axis where it fits there;
    centred on the volume (padded with background) along an axis shorter than ``edge``."""
    inside = np.clip(np.round(centre - edge / 2).astype(np.int64), 0, np.maximum(shape - edge, 0))
    return np.where(shape >= edge, inside, (shape - edge) // 2)


def _box_sum(table: np.ndarray, corner: np.ndarray, edge: int) -> float:
    """Sum of the volume inside the ``edge``³ box at ``corner`` (clipped to the volume), from its summed-volume
    ``table`` (shape + 1 per axis, zeros in the first plane of each axis)."""
    lo = np.clip(corner, 0, np.asarray(table.shape) - 1)
    hi = np.clip(np.asarray(corner) + edge, 0, np.asarray(table.shape) - 1)
    (a, b, c), (x, y, z) = lo.tolist(), hi.tolist()
    return float(
        table[x, y, z] - table[a, y, z] - table[x, b, z] - table[x, y, c]
        + table[a, b, z] + table[a, y, c] + table[x, b, c] - table[a, b, c]
    )  # fmt: skip


def sample_scaled_pairs(
    mask: np.ndarray, count: int, cfg: PatchConfig, rng: np.random.Generator, max_tries: int = 20
) -> np.ndarray:
    """``count`` pairs of cubic crops, each view at its own scale: (count, 2, 4) ints, per view its corner and edge.

    Each view's edge is ``round(s · L)`` with s drawn uniformly in ``cfg.crop_scale`` for that view alone and L the
    volume's longest edge. The first crop is centred on a random brain voxel and redrawn (up to ``max_tries`` times)
    while it holds less than ``min_brain_fraction`` brain; the second is centred at most ``jitter_frac`` of the smaller
    edge away per axis and redrawn until the two share ``min_overlap`` of the smaller crop (else it is centred on the
    first). Boxes stay inside the volume along every axis that can hold them.
    """
    if cfg.crop_scale is None:
        raise ValueError("sample_scaled_pairs needs patches.crop_scale")
    low, high = cfg.crop_scale
    shape = np.asarray(mask.shape)
    longest = int(shape.max())
    brain = np.argwhere(mask > 0)
    table = np.zeros(tuple(shape + 1), dtype=np.int64)
    table[1:, 1:, 1:] = (mask > 0).cumsum(0).cumsum(1).cumsum(2)
    centre = (shape - 1) / 2.0
    out = np.zeros((count, 2, 4), dtype=np.int64)
    edges = np.maximum(2, np.round(longest * rng.uniform(low, high, size=(count, 2)))).astype(np.int64)
    for i in range(count):
        e1, e2 = int(edges[i, 0]), int(edges[i, 1])
        for _ in range(max_tries):
            middle = brain[rng.integers(len(brain))] if len(brain) else centre
            first = _corner_at(middle, e1, shape)
            if cfg.min_brain_fraction <= 0 or not len(brain):
                break
            if _box_sum(table, first, e1) / e1**3 >= cfg.min_brain_fraction * min(1.0, len(brain) / e1**3):
                break
        first_centre = first + e1 / 2
        max_shift = round(cfg.jitter_frac * min(e1, e2))
        for _ in range(max_tries):
            shift = rng.integers(-max_shift, max_shift + 1, size=3) if max_shift else np.zeros(3, dtype=np.int64)
            second = _corner_at(first_centre + shift, e2, shape)
            if box_overlap(first, second, e1, e2) >= cfg.min_overlap:
                break
        else:
            second = _corner_at(first_centre, e2, shape)
        out[i, 0, :3], out[i, 0, 3] = first, e1
        out[i, 1, :3], out[i, 1, 3] = second, e2
    return out


def view_pairs(
    volume: np.ndarray, mask: np.ndarray, size: int, cfg: PatchConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``cfg.patches_per_volume`` crop pairs of one volume: ``(view1, view2, corners)``, views (n, 1, s, s, s).

    With ``cfg.crop_scale`` (the default) each view is a random resized crop at its own scale
    (:func:`sample_scaled_pairs`), resized to ``size``³; ``corners`` are (n, 2, 4): per view its corner and edge. With
    ``crop_scale`` unset both views are plain ``size``³ crops and ``corners`` are (n, 2, 3). The views keep the
    volume's dtype (float16 in the catalog); augmentation happens later, per view. Deterministic given ``rng``'s state.
    """
    if cfg.crop_scale is None:
        corners = sample_pair_corners(mask, size, cfg.patches_per_volume, cfg, rng)
        first = np.stack([crop_box(volume, c[0], size) for c in corners])[:, None]
        second = np.stack([crop_box(volume, c[1], size) for c in corners])[:, None]
        return first, second, corners
    placed = sample_scaled_pairs(mask, cfg.patches_per_volume, cfg, rng)
    views = [
        np.stack([resize_cube(crop_box(volume, box[:3], int(box[3])), size) for box in placed[:, v]])[:, None]
        for v in (0, 1)
    ]
    return views[0], views[1], placed
