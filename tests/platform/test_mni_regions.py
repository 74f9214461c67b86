"""The foundation's MNI152 template and region geometry: the template loader shared by preprocessing and the task
regions, and the medial-temporal ellipsoids checked against published atlas coordinates (docs/architecture.md#regions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brainiac.platform import mni152 as template
from brainiac.platform.mni_regions import (
    AAL_CENTROIDS_MM,
    HIPPOCAMPI,
    HIPPOCAMPUS_PITCH_DEG,
    MEDIAL_TEMPORAL,
    MEDIAL_TEMPORAL_PARTS,
    ellipsoid_weight,
    inside_region,
)


def _normalised_radius(point, centre, semi, pitch_deg: float) -> float:
    d = np.asarray(point, float) - np.asarray(centre, float)
    t = math.radians(pitch_deg)
    y = d[1] * math.cos(t) + d[2] * math.sin(t)
    z = -d[1] * math.sin(t) + d[2] * math.cos(t)
    return math.sqrt((d[0] / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)


def test_every_published_aal_centroid_lies_inside_its_structures_ellipsoid_within_8_mm():
    assert set(AAL_CENTROIDS_MM) == set(MEDIAL_TEMPORAL_PARTS)
    for name, (centre, semi) in MEDIAL_TEMPORAL_PARTS.items():
        published = AAL_CENTROIDS_MM[name]
        assert _normalised_radius(published, centre, semi, HIPPOCAMPUS_PITCH_DEG) < 0.85, name
        assert np.linalg.norm(np.subtract(published, centre)) < 8.0, name
        assert np.sign(published[0]) == np.sign(centre[0]) == (1 if name.endswith("_r") else -1), name
    assert tuple(MEDIAL_TEMPORAL_PARTS.values()) == MEDIAL_TEMPORAL
    assert (MEDIAL_TEMPORAL_PARTS["hippocampus_l"], MEDIAL_TEMPORAL_PARTS["hippocampus_r"]) == HIPPOCAMPI


def test_ellipsoid_weight_is_half_on_the_surface_and_inside_region_is_the_union():
    centre, semi = MEDIAL_TEMPORAL_PARTS["hippocampus_l"]
    t = math.radians(HIPPOCAMPUS_PITCH_DEG)
    axis = np.array([0.0, math.cos(t), math.sin(t)])  # the pitched long axis
    pts = np.stack([np.asarray(centre) + axis * semi[1] * f for f in (0.0, 0.5, 0.999, 1.001, 1.5)], axis=1)
    for soft in (1.0, 1.5):
        w = ellipsoid_weight(pts.astype(np.float32), centre, semi, HIPPOCAMPUS_PITCH_DEG, soft_mm=soft)
        assert w.dtype == np.float32 and w[0] == 1.0 and w[-1] == 0.0
        assert w[2] >= 0.5 > w[3]
    assert inside_region(pts.astype(np.float32)).tolist() == [True, True, True, False, False]
    far = np.array([[0.0], [60.0], [60.0]], np.float32)  # frontal cortex: outside every ellipsoid
    assert not inside_region(far).any()


def test_the_template_mask_centroid_and_box():
    t1, affine = template.mni152()
    assert t1.shape == (197, 233, 189) and not t1.flags.writeable and t1.max() == pytest.approx(1.0)
    assert np.allclose(affine[:3, 3], [-98.0, -134.0, -72.0])
    mask = template.brain_mask_1mm()
    assert mask.dtype == bool and np.array_equal(mask, t1 > template.MASK_THRESHOLD)
    assert template.brain_volume_ml() == pytest.approx(mask.sum() / 1000.0)
    assert 1500.0 < template.brain_volume_ml() < 2200.0
    lo, hi = template.brain_box_mm(5.0)
    centroid = template.brain_centroid_mm()
    assert np.all(lo + 5.0 < centroid) and np.all(centroid < hi - 5.0)
    centroid[0] = 99.0  # a copy: the cached centroid is not changed
    assert template.brain_centroid_mm()[0] != 99.0
