"""Per-scan preprocessing (issue 5) against the synthetic cohort's ground truth: brain-mask Dice, registration error at
brain-surface points, exact label sets, QC flags, voxel defects, config versions, output shapes and statistics.

One tiny cohort (3 mm, BIDS with skulls + BraTS with segmentations) is generated per module and a fixed selection of its
scans is preprocessed once; the tests read those results.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from brainiac.ingestion.preprocess import (
    PreprocessConfig,
    PreprocessResult,
    VoxelDefect,
    preprocess_scan,
    steps,
    to_native,
)
from brainiac.ingestion.preprocess.template import mni152
from brainiac.platform.config import from_dict
from brainiac.platform.errors import ConfigError

TINY = PreprocessConfig.tiny()
TINY_VOXEL_MM = 3.0


@dataclass
class Case:
    row: dict[str, str]
    data: np.ndarray
    affine: np.ndarray
    labels: dict[str, tuple[np.ndarray, np.ndarray]]
    result: PreprocessResult


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from brainiac.ingestion.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("preprocess") / "synth"
    generate_cohort(out, subjects=10, seed=5, preset="tiny", cohorts=["bids", "brats"])
    return out


@pytest.fixture(scope="module")
def cases(cohort: Path) -> list[Case]:
    """T1w and T2w of every BIDS subject (skull on or off, thick slices, odd orientations) and the FLAIR of every BraTS
    case with its ``seg`` label map."""
    rows = list(csv.DictReader((cohort / "_truth" / "scans.csv").open()))
    segs = {r["path"].rsplit("/", 1)[0]: r for r in rows if r["kind"] == "label" and r["cohort"] == "brats"}
    picked = []
    for r in rows:
        if r["kind"] != "image" or r["format"] != "nifti":
            continue
        if (r["cohort"], r["sequence"]) in (("bids", "T1w"), ("bids", "T2w"), ("brats", "FLAIR")):
            picked.append(r)
    out = []
    for r in picked:
        img = nib.load(cohort / r["dataset"] / r["path"])
        labels = {}
        seg = segs.get(r["path"].rsplit("/", 1)[0]) if r["cohort"] == "brats" else None
        if seg is not None:
            s = nib.load(cohort / seg["dataset"] / seg["path"])
            labels["seg"] = (np.asarray(s.dataobj), s.affine)
        data = np.asarray(img.dataobj)
        out.append(Case(r, data, img.affine, labels, preprocess_scan(data, img.affine, TINY, labels or None)))
    assert len(out) >= 10
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _surface_points_mm(step: int = 40) -> np.ndarray:
    """Every ``step``-th voxel of the template brain-mask surface, in MNI mm (homogeneous)."""
    t1, affine = mni152()
    mask = t1 > 0.2
    idx = np.argwhere(mask & ~ndi.binary_erosion(mask))[::step]
    return np.c_[idx @ affine[:3, :3].T + affine[:3, 3], np.ones(len(idx))]


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy against the generator's truth.


def test_brain_mask_dice_against_truth(cases: list[Case], cohort: Path) -> None:
    """Our mask, mapped back to each scan's own grid with the stored transform, against the true brain mask."""
    dice = []
    for c in cases:
        truth_img = nib.load(cohort / "_truth" / c.row["mask_path"])
        truth = np.asarray(truth_img.dataobj) > 0
        matrix = np.asarray(c.result.transform["matrix"]).reshape(4, 4)
        ours = to_native(c.result.mask, c.result.whole_affine, matrix, truth.shape, truth_img.affine) > 0
        dice.append(_dice(ours, truth))
    assert np.median(dice) >= 0.9, dice
    assert min(dice) >= 0.85, dice


def test_registration_error_at_brain_surface(cases: list[Case]) -> None:
    """The truth's ``rigid_transform`` and ours map the same template surface points to within ~2 tiny voxels."""
    pts = _surface_points_mm()
    errors = []
    for c in cases:
        truth = np.asarray(json.loads(c.row["rigid_transform"])).reshape(4, 4)
        ours = np.asarray(c.result.transform["matrix"]).reshape(4, 4)
        errors.append(float(np.median(np.linalg.norm((pts @ ours.T - pts @ truth.T)[:, :3], axis=1))))
    assert np.median(errors) <= TINY_VOXEL_MM, errors
    assert max(errors) <= 2 * TINY_VOXEL_MM, errors
    assert all(c.result.qc["qc_pass"] for c in cases), [c.result.qc for c in cases if not c.result.qc["qc_pass"]]


def test_reorientation_changes_nothing(cases: list[Case]) -> None:
    """The same voxels stored in another axis order and with flips give the same outputs: orientation comes from the
    affine, and reorientation to RAS permutes voxels without interpolating."""
    c = next(c for c in cases if c.row["cohort"] == "bids")
    flipped = np.ascontiguousarray(c.data[::-1, ::-1, :].transpose(2, 0, 1))
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, c.data.shape[0] - 1
    flip[1, 1], flip[1, 3] = -1, c.data.shape[1] - 1
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1  # new (k, i, j) -> old-flipped (i, j, k)
    affine = c.affine @ flip @ perm
    again = preprocess_scan(flipped, affine, TINY)
    np.testing.assert_allclose(again.transform["matrix"], c.result.transform["matrix"], atol=1e-6)
    np.testing.assert_allclose(again.whole.astype(np.float32), c.result.whole.astype(np.float32), atol=1e-2)
    np.testing.assert_array_equal(again.mask, c.result.mask)


# ---------------------------------------------------------------------------------------------------------------------
# Labels: nearest neighbour only.


def _brats_with_seg(cases: list[Case]) -> list[Case]:
    out = [c for c in cases if "seg" in c.labels]
    assert out, "the fixture must include BraTS cases with a seg"
    return out


def test_label_values_preserved_exactly(cases: list[Case]) -> None:
    for c in _brats_with_seg(cases):
        source = set(np.unique(c.labels["seg"][0]).tolist())
        assert source <= {0, 1, 2, 4}
        whole = c.result.labels_whole["seg"]
        fixed = c.result.labels_fixed["seg"]
        assert whole.dtype == np.uint8 and fixed.dtype == np.uint8
        assert whole.shape == c.result.whole.shape and fixed.shape == c.result.fixed.shape
        assert set(np.unique(whole).tolist()) == source
        assert set(np.unique(fixed).tolist()) <= source


def test_linear_interpolation_of_labels_would_be_caught(cases: list[Case]) -> None:
    """The check above can fail: carrying the seg with linear interpolation (BrainIAC's defect) invents codes such as 3
    between 2 and 4, which the exact-set comparison rejects."""
    import SimpleITK as sitk

    c = max(_brats_with_seg(cases), key=lambda c: int(np.count_nonzero(c.labels["seg"][0] == 4)))
    arr, aff = c.labels["seg"]
    source = set(np.unique(arr).tolist())
    assert 4 in source, "the fixture's BraTS cases must include enhancing tumour (label 4)"
    matrix = np.asarray(c.result.transform["matrix"]).reshape(4, 4)
    linear = steps.resample(steps.to_sitk(arr.astype(np.float32), aff), c.result.whole.shape, c.result.whole_affine,
                            matrix, interpolator=sitk.sitkLinear)  # fmt: skip
    assert set(np.unique(linear).tolist()) != source  # fractional codes
    rounded = set(np.unique(np.rint(linear)).astype(int).tolist())
    assert rounded != source and 3 in rounded, rounded  # even rounded: a code between 2 and 4


def test_non_integer_label_map_is_rejected(cases: list[Case]) -> None:
    c = cases[0]
    with pytest.raises(ValueError, match="non-integer"):
        preprocess_scan(c.data, c.affine, TINY, {"prob": (np.full(c.data.shape, 0.5, np.float32), c.affine)})


# ---------------------------------------------------------------------------------------------------------------------
# QC and voxel defects.


def test_qc_flags_pure_noise(cases: list[Case]) -> None:
    c = cases[0]
    rng = np.random.default_rng(0)
    noise = np.abs(rng.normal(100.0, 30.0, size=c.data.shape)).astype(np.float32)
    result = preprocess_scan(noise, c.affine, TINY)
    assert result.qc["qc_pass"] is False
    assert "registration_metric" in result.qc["qc_reason"]


def test_qc_flags_rotated_scan_with_limited_registration(cases: list[Case]) -> None:
    """A head turned 90° in the scanner, registered without the rotation search and with few iterations: the fit fails
    and QC says so instead of writing it as good data."""
    c = next(c for c in cases if c.row["sequence"] == "T1w" and c.row["skull_present"] == "true")
    centre = c.affine @ np.r_[(np.asarray(c.data.shape) - 1) / 2.0, 1.0]
    rot = np.eye(4)
    rot[:3, :3] = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]
    rot[:3, 3] = centre[:3] - rot[:3, :3] @ centre[:3]
    limited = PreprocessConfig.tiny(rotation_search_deg=0.0, registration_iterations=5)
    result = preprocess_scan(c.data, rot @ c.affine, limited)
    assert c.result.qc["qc_pass"] is True
    assert result.qc["qc_pass"] is False, result.qc
    assert result.qc["qc_reason"]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_voxels_raise(cases: list[Case], value: float) -> None:
    data = cases[0].data.astype(np.float32)
    data[3, 4, 5] = value
    with pytest.raises(VoxelDefect) as err:
        preprocess_scan(data, cases[0].affine, TINY)
    assert err.value.reason == "nonfinite_voxels"
    assert "1 of" in err.value.detail


def test_all_zero_raises(cases: list[Case]) -> None:
    with pytest.raises(VoxelDefect) as err:
        preprocess_scan(np.zeros((20, 24, 20), np.int16), np.diag([3.0, 3.0, 3.0, 1.0]), TINY)
    assert err.value.reason == "all_zero"


def test_constant_volume_raises() -> None:
    with pytest.raises(VoxelDefect) as err:
        preprocess_scan(np.full((20, 24, 20), 7, np.int16), np.diag([3.0, 3.0, 3.0, 1.0]), TINY)
    assert err.value.reason == "constant"


def test_registration_failure_is_flagged_not_raised(cases: list[Case], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("Exception thrown in SimpleITK ImageRegistrationMethod_Execute\nITK ERROR: degenerate")

    monkeypatch.setattr(steps, "register", broken)
    result = preprocess_scan(cases[0].data, cases[0].affine, TINY)
    assert result.qc["qc_pass"] is False
    assert result.qc["qc_reason"].startswith("registration_error: ITK ERROR: degenerate")


def test_bad_shapes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="3-D"):
        preprocess_scan(np.ones((4, 4)), np.eye(4), TINY)
    with pytest.raises(ValueError, match="4x4"):
        preprocess_scan(np.ones((4, 4, 4)), np.eye(3), TINY)


# ---------------------------------------------------------------------------------------------------------------------
# Config.


def test_config_version_is_stable_and_tracks_every_field() -> None:
    base = PreprocessConfig()
    assert base.version() == PreprocessConfig().version()
    assert len(base.version()) == 12
    assert from_dict(PreprocessConfig, base.to_dict()).version() == base.version()
    assert from_dict(PreprocessConfig, {"whole_spacing_mm": 1}).version() == base.version()  # 1 and 1.0 alike
    versions = {base.version()}
    for changed in (
        {"whole_spacing_mm": 1.5},
        {"fixed_size": 64},
        {"n4": False},
        {"transform": "affine"},
        {"clip_percentiles": [1.0, 99.0]},
        {"registration_samples": 4000},
    ):
        versions.add(from_dict(PreprocessConfig, {**base.to_dict(), **changed}).version())
    assert len(versions) == 7


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="fixed_size"):
        from_dict(PreprocessConfig, {"fixed_size": 2})
    with pytest.raises(ConfigError, match="transform"):
        from_dict(PreprocessConfig, {"transform": "bspline"})
    with pytest.raises(ConfigError, match="clip_percentiles"):
        from_dict(PreprocessConfig, {"clip_percentiles": [99.0, 1.0]})
    with pytest.raises(ConfigError, match="did you mean"):
        from_dict(PreprocessConfig, {"fixed_sise": 32})


# ---------------------------------------------------------------------------------------------------------------------
# Output contract.


def test_output_shapes_dtypes_and_statistics(cases: list[Case]) -> None:
    first = cases[0].result
    for c in cases:
        r = c.result
        assert r.whole.dtype == np.float16 and r.fixed.dtype == np.float16
        assert r.fixed.shape == (TINY.fixed_size,) * 3
        assert r.whole.shape == first.whole.shape  # one template grid for every scan
        np.testing.assert_allclose(r.whole_affine, first.whole_affine)
        np.testing.assert_allclose(np.abs(np.diag(r.whole_affine))[:3], TINY.whole_spacing_mm)
        assert r.mask.dtype == np.uint8 and r.mask.shape == r.whole.shape and set(np.unique(r.mask)) <= {0, 1}
        assert r.fixed_mask.shape == r.fixed.shape
        brain = r.mask.astype(bool)
        values = r.whole[brain].astype(np.float64)
        assert abs(values.mean()) < 0.02 and abs(values.std() - 1.0) < 0.02
        assert not np.any(r.whole[~brain])
        assert np.all(np.isfinite(r.whole)) and np.all(np.isfinite(r.fixed))
        assert set(r.timings_s) == {"reorient", "n4", "registration", "resample", "normalise", "qc"}
        for key in ("registration_metric", "brain_volume_ml", "snr", "clipped_fraction", "qc_pass", "qc_reason"):
            assert key in r.qc
        assert 0.0 <= r.qc["clipped_fraction"] <= 0.011
        assert r.qc["snr"] > 1.0
        assert len(r.transform["matrix"]) == 16 and r.transform["kind"] == "rigid"
        rot = np.asarray(r.transform["matrix"]).reshape(4, 4)[:3, :3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-6)  # rigid: a rotation
        assert r.preprocess_version == TINY.version()
