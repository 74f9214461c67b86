"""View pairs for contrastive pretraining: two crops of the same brain location, a small random jitter apart.

SimCLR on whole images pulls two augmentations of one image together; on 3-D brains that image is a patch, so the two
views must show the **same place** (Tak et al.: same location, different augmentation). The pair is cut from a decoded
``whole`` volume of the catalog: the first crop is centred on a random brain voxel (so it holds brain, not background),
the second is the first moved by at most ``jitter_frac`` of the edge per axis while sharing ``min_overlap`` of its
volume. Optionally (``crop_fraction_min``/``crop_fraction_max``) a crop spans a fraction of the brain and is resized: SimCLR's random resized crop.
Pure numpy (scipy for the resize), used inside the Ray Data stream and by the benchmarks.
"""

from __future__ import annotations

import numpy as np

from brainiac.models.train_config import PatchConfig

__all__ = ["box_overlap", "brain_extent", "crop_box", "resize_cube", "sample_pair_corners", "view_pairs"]


def box_overlap(first: np.ndarray, second: np.ndarray, size: int) -> float:
    """Shared volume of two ``size``³ boxes with corners ``first`` and ``second``, as a fraction of one box."""
    shared = np.clip(size - np.abs(np.asarray(first) - np.asarray(second)), 0, size)
    return float(np.prod(shared / size))


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


def resize_cube(crop: np.ndarray, size: int) -> np.ndarray:
    """A cubic ``crop`` resized to ``size``³ by trilinear interpolation (unchanged when it already is), same dtype."""
    if crop.shape[0] == size:
        return crop
    from scipy.ndimage import zoom

    out = zoom(crop.astype(np.float32), size / crop.shape[0], order=1, mode="nearest", prefilter=False)
    return out[:size, :size, :size].astype(crop.dtype)


def brain_extent(mask: np.ndarray) -> int:
    """Longest edge in voxels of the bounding box of ``mask > 0`` (of the whole volume when the mask is empty)."""
    brain = np.argwhere(mask > 0)
    if not len(brain):
        return int(max(mask.shape))
    return int((brain.max(axis=0) - brain.min(axis=0) + 1).max())


def view_pairs(
    volume: np.ndarray, mask: np.ndarray, size: int, cfg: PatchConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``cfg.patches_per_volume`` crop pairs of one volume: ``(view1, view2, corners)``, views (n, 1, s, s, s).

    With ``cfg.crop_fraction_min``/``crop_fraction_max`` set, each pair is cut at an edge of that fraction (drawn per
    pair) of the brain's longest extent and resized to ``size``³; ``corners`` are then (n, 2, 4): the two corners and
    the crop edge in the last column. The views keep the volume's dtype (float16 in the catalog); augmentation happens
    later, per view.
    """
    if cfg.crop_fraction_min is None and cfg.crop_fraction_max is None:
        corners = sample_pair_corners(mask, size, cfg.patches_per_volume, cfg, rng)
        first = np.stack([crop_box(volume, c[0], size) for c in corners])[:, None]
        second = np.stack([crop_box(volume, c[1], size) for c in corners])[:, None]
        return first, second, corners
    low = cfg.crop_fraction_min if cfg.crop_fraction_min is not None else cfg.crop_fraction_max
    high = cfg.crop_fraction_max if cfg.crop_fraction_max is not None else cfg.crop_fraction_min
    if low > high:
        raise ValueError(f"patches.crop_fraction_min {low} is above patches.crop_fraction_max {high}")
    edges = np.maximum(2, np.round(brain_extent(mask) * rng.uniform(low, high, cfg.patches_per_volume)))
    firsts, seconds, placed = [], [], []
    for edge in edges.astype(int).tolist():
        pair = sample_pair_corners(mask, edge, 1, cfg, rng)[0]
        firsts.append(resize_cube(crop_box(volume, pair[0], edge), size))
        seconds.append(resize_cube(crop_box(volume, pair[1], edge), size))
        placed.append(np.concatenate([pair, np.full((2, 1), edge)], axis=1))
    return np.stack(firsts)[:, None], np.stack(seconds)[:, None], np.stack(placed)
