"""Named anatomical regions in MNI152 millimetres (RAS): the one definition the synthetic generator draws its anatomy
with and the model side scores saliency against (docs/architecture.md#regions).

A region is a union of ellipsoids, each a centre and semi-axes (x, y, z) in mm whose y-z axes are pitched by a region
angle (the long axis rising posteriorly), evaluated by :func:`ellipsoid_weight` at any MNI mm. Ingestion
(:mod:`brainiac.ingestion.synthetic.anatomy`: where MCI and ageing take grey matter) and models
(:mod:`brainiac.models.tasks.regions`: where an MCI model's saliency should lie) are siblings that may not import each
other, so the numbers live here, in the foundation.

**Medial temporal lobe** (:data:`MEDIAL_TEMPORAL`): hippocampi, amygdalae, and entorhinal/parahippocampal cortex below
them, pitched by :data:`HIPPOCAMPUS_PITCH_DEG` (the hippocampal long axis rises ~25° posteriorly). The ellipsoids are
sized to the structures (hippocampal long semi-axis 18 mm; 1.9-3.7 mL each) and placed at published MNI coordinates:
every centroid of the matching volume of interest of the AAL atlas (:data:`AAL_CENTROIDS_MM`; Tzourio-Mazoyer N. et al.,
"Automated anatomical labeling of activations in SPM using a macroscopic anatomical parcellation of the MNI MRI
single-subject brain", NeuroImage 15:273-289, 2002) lies inside its ellipsoid, 3.9-7.7 mm from its centre
(``tests/platform/test_mni_regions.py``). Every ellipsoid sits a little lower and further back than AAL's centroid, which
lies at most 0.8 of the way from the ellipsoid's centre to its surface; AAL was drawn on a single-subject MNI brain
(Colin27), not on the MNI152 2009 average used here, whose structures lie a few mm apart. The numbers are the geometry
of synthetic generator version 2 unchanged, so the cohort's MCI signal sits exactly in the region the model side scores.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "AAL_CENTROIDS_MM",
    "HIPPOCAMPI",
    "HIPPOCAMPUS_PITCH_DEG",
    "MEDIAL_TEMPORAL",
    "MEDIAL_TEMPORAL_PARTS",
    "Ellipsoid",
    "ellipsoid_weight",
    "inside_region",
]

Ellipsoid = tuple[tuple[float, float, float], tuple[float, float, float]]
"""``(centre, semi_axes)`` in MNI mm: centre (x, y, z) and semi-axes along x and the pitched y and z."""

HIPPOCAMPUS_PITCH_DEG = 25.0
"""Pitch of the medial-temporal ellipsoids: their long (y) axis rises posteriorly by this many degrees."""

MEDIAL_TEMPORAL_PARTS: dict[str, Ellipsoid] = {
    "hippocampus_l": ((-26.0, -24.0, -12.0), (7.0, 18.0, 7.0)),
    "hippocampus_r": ((27.0, -23.0, -12.0), (7.0, 18.0, 7.0)),
    "amygdala_l": ((-23.0, -5.0, -18.0), (8.0, 8.0, 7.0)),
    "amygdala_r": ((24.0, -4.0, -18.0), (8.0, 8.0, 7.0)),
    "parahippocampal_l": ((-25.0, -20.0, -26.0), (8.0, 16.0, 6.0)),
    "parahippocampal_r": ((26.0, -19.0, -26.0), (8.0, 16.0, 6.0)),
}
"""The medial temporal lobe's ellipsoids by structure (``_l`` left, ``_r`` right), in MNI mm."""

HIPPOCAMPI: tuple[Ellipsoid, ...] = (MEDIAL_TEMPORAL_PARTS["hippocampus_l"], MEDIAL_TEMPORAL_PARTS["hippocampus_r"])
"""Left and right hippocampus."""

MEDIAL_TEMPORAL: tuple[Ellipsoid, ...] = tuple(MEDIAL_TEMPORAL_PARTS.values())
"""The medial temporal lobe (the ``hippocampus`` saliency region): hippocampi, amygdalae, then entorhinal /
parahippocampal cortex, each left then right."""

AAL_CENTROIDS_MM: dict[str, tuple[float, float, float]] = {
    "hippocampus_l": (-25.03, -20.74, -10.13),
    "hippocampus_r": (29.23, -19.78, -10.33),
    "amygdala_l": (-23.27, -0.67, -17.14),
    "amygdala_r": (27.32, 0.64, -17.50),
    "parahippocampal_l": (-21.17, -15.95, -20.70),
    "parahippocampal_r": (25.38, -15.15, -20.47),
}
"""Published centroids (MNI mm) of the AAL volumes Hippocampus, Amygdala and ParaHippocampal, left and right
(Tzourio-Mazoyer et al. 2002, as tabulated with the atlas), keyed like :data:`MEDIAL_TEMPORAL_PARTS`: the reference the
ellipsoids are checked against."""


def ellipsoid_weight(
    coords: np.ndarray, center: tuple[float, ...], semi: tuple[float, ...], pitch_deg: float, soft_mm: float
) -> np.ndarray:
    """Soft membership (float32, 0-1) of each point of ``coords`` (MNI mm, shape ``(3, ...)``) in one ellipsoid.

    The y-z axes are rotated by ``pitch_deg`` about x. With ``r`` the normalised radius, the weight is
    ``clip((1 - r) / (soft_mm / min(semi)) + 0.5, 0, 1)``: a ramp about ``soft_mm`` wide across the surface, and
    ``>= 0.5`` exactly where ``r <= 1``, whatever ``soft_mm``.
    """
    c = np.asarray(center, dtype=np.float32).reshape(3, *([1] * (coords.ndim - 1)))
    d = coords - c
    t = math.radians(pitch_deg)
    y = d[1] * math.cos(t) + d[2] * math.sin(t)
    z = -d[1] * math.sin(t) + d[2] * math.cos(t)
    r = np.sqrt((d[0] / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)
    scale = soft_mm / min(semi)
    return np.clip((1.0 - r) / scale + 0.5, 0.0, 1.0).astype(np.float32)


def inside_region(
    coords: np.ndarray, ellipsoids: tuple[Ellipsoid, ...] = MEDIAL_TEMPORAL, pitch_deg: float = HIPPOCAMPUS_PITCH_DEG
) -> np.ndarray:
    """Boolean mask of the points of ``coords`` (MNI mm, shape ``(3, ...)``) inside any of ``ellipsoids``."""
    inside = [ellipsoid_weight(coords, c, s, pitch_deg, soft_mm=1.0) >= 0.5 for c, s in ellipsoids]
    return np.logical_or.reduce(inside)
