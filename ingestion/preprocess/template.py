"""Template-space output grids and registration images, built on the MNI152 2009 template of the foundation.

The template itself (nilearn's offline 1 mm MNI152 2009 T1, its brain mask, centroid and box) is
:mod:`brainiac.platform.mni152`, shared with the model-side task regions; this module re-exports those names.

Template space is MNI152 millimetres in RAS. Every SimpleITK image built by this package carries RAS physical coordinates
(origin and direction straight from the NIfTI affine), not ITK's usual LPS: registration does not care which world frame
is used as long as the template and the scan share it, and then every 4x4 matrix this package returns maps template RAS mm
to scanner RAS mm, the convention of NIfTI affines and of the synthetic truth's ``rigid_transform``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from brainiac.platform.mni152 import MASK_THRESHOLD, brain_box_mm, brain_centroid_mm, brain_mask_1mm, mni152

__all__ = [
    "MASK_THRESHOLD",
    "Grid",
    "brain_box_mm",
    "brain_centroid_mm",
    "brain_mask_1mm",
    "fixed_grid",
    "mni152",
    "registration_template",
    "template_mask_image",
    "whole_grid",
]

REGISTRATION_MARGIN_MM = 24.0
"""Context kept around the brain box in the registration template (the metric only samples inside the brain mask)."""


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid in template space: ``shape`` and ``affine`` (voxel index (i, j, k) → MNI RAS mm), axis-aligned."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        x, y, z = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(x), float(y), float(z)


def whole_grid(spacing_mm: float, margin_mm: float) -> Grid:
    """The whole-brain crop: the template brain box plus margin at ``spacing_mm``, centred on the box.

    The same grid for every scan of a config, so patches and masks line up across subjects.
    """
    lo, hi = brain_box_mm(margin_mm)
    shape = tuple(math.ceil((h - lo_) / spacing_mm - 1e-6) + 1 for lo_, h in zip(lo, hi, strict=True))
    return _centred_grid((lo + hi) / 2.0, shape, spacing_mm)


def fixed_grid(size: int, spacing_mm: float | None, margin_mm: float) -> Grid:
    """The ``size``³ cube centred on the brain box. ``spacing_mm=None`` fits the box's longest edge (with margin)
    exactly, keeping voxels isotropic; a given spacing crops or pads the box instead."""
    lo, hi = brain_box_mm(margin_mm)
    if spacing_mm is None:
        spacing_mm = float(np.max(hi - lo)) / size
    return _centred_grid((lo + hi) / 2.0, (size, size, size), spacing_mm)


def _centred_grid(centre: np.ndarray, shape: tuple[int, int, int], spacing: float) -> Grid:
    affine = np.eye(4)
    affine[:3, :3] *= spacing
    affine[:3, 3] = centre - (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * spacing
    return Grid(shape=shape, affine=affine)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a.astype(np.float32, copy=True)
    pad = [(0, (-s) % f) for s in a.shape]
    a = np.pad(a.astype(np.float32), pad, mode="constant")
    s = a.shape
    return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def registration_template(spacing_mm: float):
    """The fixed image and fixed-image mask of registration: the T1 template and its brain mask at ``spacing_mm``,
    cropped to the brain box plus :data:`REGISTRATION_MARGIN_MM`. Whole-mm spacings are block means of the 1 mm maps
    (a partial-volume model of a coarser voxel); others are Gaussian-smoothed and linearly resampled. Cached SimpleITK
    images (float32, uint8); treat them as read-only."""
    import SimpleITK as sitk

    from brainiac.ingestion.preprocess.steps import to_sitk

    t1, affine = mni152()
    mask = brain_mask_1mm().astype(np.float32)
    lo, hi = brain_box_mm(REGISTRATION_MARGIN_MM)
    f = round(spacing_mm)
    if abs(f - spacing_mm) < 1e-6 and f >= 1:
        inv = np.linalg.inv(affine)
        i0 = np.maximum(np.floor(inv[:3, :3] @ lo + inv[:3, 3]).astype(int), 0)
        i1 = np.minimum(np.ceil(inv[:3, :3] @ hi + inv[:3, 3]).astype(int) + 1, t1.shape)
        crop = tuple(slice(a, b) for a, b in zip(i0, i1, strict=True))
        aff = affine.copy()
        aff[:3, 3] = affine[:3, :3] @ (i0 + (f - 1) / 2.0) + affine[:3, 3]
        aff[:3, :3] *= f
        fixed = to_sitk(_block_mean(t1[crop], f), aff)
        fmask = to_sitk((_block_mean(mask[crop], f) > 0.5).astype(np.uint8), aff)
        return fixed, fmask
    grid = _centred_grid(
        (lo + hi) / 2.0, tuple(math.ceil((h - a) / spacing_mm) + 1 for a, h in zip(lo, hi, strict=True)), spacing_mm
    )
    sigma = 0.5 * spacing_mm
    src_t1 = sitk.SmoothingRecursiveGaussian(to_sitk(t1, affine), sigma)
    src_mask = sitk.SmoothingRecursiveGaussian(to_sitk(mask, affine), sigma)
    ref = _reference(grid)
    fixed = sitk.Resample(src_t1, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fmask = sitk.Resample(src_mask, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32) > 0.5
    return fixed, sitk.Cast(fmask, sitk.sitkUInt8)


@functools.lru_cache(maxsize=1)
def template_mask_image():
    """The 1 mm template brain mask as a uint8 SimpleITK image (0/1), carried to output grids by nearest neighbour."""
    from brainiac.ingestion.preprocess.steps import to_sitk

    return to_sitk(brain_mask_1mm().astype(np.uint8), mni152()[1])


def _reference(grid: Grid):
    import SimpleITK as sitk

    ref = sitk.Image([int(s) for s in grid.shape], sitk.sitkUInt8)
    spacing = np.asarray(grid.spacing)
    ref.SetSpacing(spacing.tolist())
    ref.SetOrigin(grid.affine[:3, 3].tolist())
    ref.SetDirection((grid.affine[:3, :3] / spacing).flatten().tolist())
    return ref
