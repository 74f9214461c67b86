"""The MNI152 2009 template that nilearn ships offline and its brain mask: the space every layer's geometry is given in.

Template space is MNI152 millimetres in RAS (ICBM 2009a nonlinear symmetric, 1 mm: 197x233x189 voxels, index (i, j, k)
→ (i - 98, j - 134, k - 72) mm). Preprocessing registers scans to it (:mod:`brainiac.ingestion.preprocess.template`
builds its grids and registration images on these arrays), the model-side task regions are placed in it
(:mod:`brainiac.models.tasks.regions`), and the region geometry both sides share is given in its millimetres
(:mod:`brainiac.platform.mni_regions`).

The brain mask is nilearn's definition (``load_mni152_brain_mask``: T1 / max > 0.2). The file is read straight from
nilearn's package data, which avoids importing ``nilearn.datasets`` (and scikit-learn, ~2.5 s per worker).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = [
    "MASK_THRESHOLD",
    "brain_box_mm",
    "brain_centroid_mm",
    "brain_mask_1mm",
    "brain_volume_ml",
    "mni152",
]

_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MASK_THRESHOLD = 0.2
"""nilearn's brain-mask threshold on the max-normalised T1 template."""


@functools.lru_cache(maxsize=1)
def mni152() -> tuple[np.ndarray, np.ndarray]:
    """The 1 mm MNI152 2009 T1 template (197x233x189, float32, max 1) and its affine. Read-only, cached per process."""
    import importlib.util
    from pathlib import Path

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    folder = Path(next(iter(spec.submodule_search_locations or []))) / "datasets" / "data" if spec else None
    img: Any  # a Nifti1Image (nibabel types load() as the base class, which has no dataobj or affine)
    if folder is not None and (folder / _T1_FILE).is_file():
        img = nib.load(folder / _T1_FILE)
    else:  # pragma: no cover - a nilearn that moved its data files
        from nilearn import datasets

        img = datasets.load_mni152_template(resolution=1)
    t1 = np.asarray(img.dataobj, dtype=np.float32)
    t1 /= np.float32(t1.max())
    t1.setflags(write=False)
    affine = np.asarray(img.affine, dtype=np.float64)
    affine.setflags(write=False)
    return t1, affine


@functools.lru_cache(maxsize=1)
def brain_mask_1mm() -> np.ndarray:
    """The template brain mask on the 1 mm grid of :func:`mni152` (bool, read-only)."""
    mask = mni152()[0] > MASK_THRESHOLD
    mask.setflags(write=False)
    return mask


def brain_volume_ml() -> float:
    """Volume in mL of the template brain mask (1 mm voxels)."""
    return float(np.count_nonzero(brain_mask_1mm())) / 1000.0


def brain_centroid_mm() -> np.ndarray:
    """Centre of mass of the template brain mask in MNI mm (the pivot of the rigid part of an affine fit)."""
    return _centroid().copy()


@functools.lru_cache(maxsize=1)
def _centroid() -> np.ndarray:
    affine = mni152()[1]
    return affine[:3, :3] @ np.argwhere(brain_mask_1mm()).mean(axis=0) + affine[:3, 3]


def brain_box_mm(margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest MNI mm (voxel centres) of the template brain mask, widened by ``margin_mm`` on every side."""
    lo, hi = _box()
    return lo - margin_mm, hi + margin_mm


@functools.lru_cache(maxsize=1)
def _box() -> tuple[np.ndarray, np.ndarray]:
    affine = mni152()[1]
    idx = np.argwhere(brain_mask_1mm())
    corners = np.stack([idx.min(axis=0), idx.max(axis=0)]).astype(np.float64)
    mm = corners @ affine[:3, :3].T + affine[:3, 3]
    return mm.min(axis=0), mm.max(axis=0)
