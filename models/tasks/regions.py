"""Where a task's signal lies on the model-input grid, for the saliency mass check of ``brainiac evaluate`` (issue 7).

A task spec names its region (``saliency_region``): ``tumour`` comes from each case's own whole-tumour label map;
``hippocampus`` is the medial temporal lobe (hippocampi, amygdalae, entorhinal/parahippocampal cortex) as defined in
MNI152 mm by the foundation (:data:`brainiac.platform.mni_regions.MEDIAL_TEMPORAL`: ellipsoids placed at published AAL
atlas coordinates, docs/architecture.md#regions). :func:`hippocampus_mask` evaluates that definition at the template
coordinates of the model-input voxels. The synthetic generator draws its MCI atrophy in the same ellipsoids, so on a
synthetic cohort the region is exactly where the signal was put.

How the input grid relates to template space:

- preprocessing writes ``fixed`` (the model input) on an axis-aligned grid in MNI152 RAS mm; ``volumes.fixed_affine``
  maps its voxel indices to those mm;
- with ``preprocess.transform: rigid`` (the default) the scan is placed there by the *rigid part* of its affine fit to
  MNI152, pinned at the template brain centroid: orientation and position are the template's, but the brain keeps the
  subject's size, so an output point ``x`` sits at template point ``c + (x - c) / s`` (``c`` the template brain
  centroid, ``s`` the subject's linear head size relative to MNI152);
- with the atlas brain mask (``preprocess.brain_mask: atlas``, as in ``tiny``) the mask is the template mask carried by
  the full affine, so ``volumes.brain_volume_ml`` is the template brain volume times ``s³``: :func:`head_scale` recovers
  ``s`` from it (and gives ``s ≈ 1`` for ``transform: affine``, whose outputs are already template-sized). On the tiny
  cohort it matched the generator's ``head_scale`` within 0.7 %. With a learned mask (``deepbet``, the default, or
  ``hd-bet``) ``brain_volume_ml`` is the learned mask's volume, which also shrinks with atrophy, so ``s`` carries the
  ratio of the two masks too (a few % for an atrophied brain; the affine's own scale, ``qc.affine_scale``, and the
  atlas-mask volume, ``qc.atlas_volume_ml``, are not ``volumes`` columns).

What remains is each subject's own anatomy (on a synthetic cohort, the generator's smooth 3-6 mm deformation), which no
catalog column records.
"""

from __future__ import annotations

import functools

import numpy as np

from brainiac.platform.mni152 import brain_centroid_mm
from brainiac.platform.mni152 import brain_volume_ml as _template_mask_ml
from brainiac.platform.mni_regions import MEDIAL_TEMPORAL, inside_region

__all__ = ["SALIENCY_REGIONS", "grid_mm", "head_scale", "hippocampus_mask", "template_brain_ml"]

SALIENCY_REGIONS = ("tumour", "hippocampus")
"""Values of :attr:`brainiac.models.tasks.spec.TaskSpec.saliency_region`."""


def grid_mm(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World mm ``(3, *shape)`` (float32) of every voxel centre of a grid whose ``affine`` maps (i, j, k) to mm."""
    affine = np.asarray(affine, dtype=np.float64).reshape(4, 4)
    idx = np.indices(tuple(int(s) for s in shape), dtype=np.float64)
    mm = np.einsum("ij,j...->i...", affine[:3, :3], idx) + affine[:3, 3].reshape(3, 1, 1, 1)
    return mm.astype(np.float32)


@functools.cache
def template_brain_ml() -> float:
    """Volume in mL of the MNI152 brain mask that preprocessing carries onto every scan (1 mm voxels)."""
    return _template_mask_ml()


def head_scale(brain_volume_ml: float | None) -> float:
    """The subject's linear head size relative to MNI152, from the brain-mask volume preprocessing recorded
    (``volumes.brain_volume_ml``); 1.0 when it is missing or not a positive number."""
    if brain_volume_ml is None or not np.isfinite(brain_volume_ml) or brain_volume_ml <= 0:
        return 1.0
    return float(np.cbrt(brain_volume_ml / template_brain_ml()))


def hippocampus_mask(affine: np.ndarray, shape: tuple[int, int, int], *, scale: float = 1.0) -> np.ndarray:
    """Boolean ``shape`` mask of the voxels whose centre lies inside the medial temporal lobe (:data:`MEDIAL_TEMPORAL`).

    Args:
        affine: 4x4 voxel index → MNI152 RAS mm of the grid (``volumes.fixed_affine``).
        shape: the grid's shape (``volumes.fixed_shape``).
        scale: the subject's linear head size relative to MNI152 (:func:`head_scale`); the template region is scaled
            about the template brain centroid, where preprocessing pins the rigid placement.

    Raises:
        ValueError: ``scale`` is not a positive number.
    """
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale}")
    centre = brain_centroid_mm().astype(np.float32).reshape(3, 1, 1, 1)
    template = centre + (grid_mm(affine, shape) - centre) / np.float32(scale)
    return inside_region(template, MEDIAL_TEMPORAL)
