"""Saliency regions: the task specs name them, the hippocampus region is the foundation's MNI definition (the one the
synthetic generator draws MCI atrophy in), and on a real preprocessed grid it lies where the generator put the medial
temporal lobe of that subject (its truth pose and head size)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from brainiac.ingestion.identified import identify
from brainiac.models.tasks.regions import SALIENCY_REGIONS, grid_mm, head_scale, hippocampus_mask, template_brain_ml
from brainiac.models.tasks.spec import load_specs


def test_specs_name_the_signal_region_without_changing_fingerprints():
    specs = load_specs()
    assert {n: s.saliency_region for n, s in specs.items() if s.saliency_region} == {
        "idh": "tumour", "survival": "tumour", "mci": "hippocampus"}  # fmt: skip
    assert all(s.saliency_region in (None, *SALIENCY_REGIONS) for s in specs.values())
    mci = specs["mci"]
    # An evaluation setting: registered models keep their task fingerprint when it is added or changed.
    assert dataclasses.replace(mci, saliency_region=None).fingerprint() == mci.fingerprint()
    assert dataclasses.replace(mci, threshold=0.5).fingerprint() != mci.fingerprint()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_hippocampus_mask_on_an_mni_grid_is_the_medial_temporal_lobe():
    from brainiac.platform.mni_regions import HIPPOCAMPI, MEDIAL_TEMPORAL

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-90.0, -126.0, -72.0]
    shape = (91, 109, 91)
    mask = hippocampus_mask(affine, shape)
    mm = grid_mm(affine, shape)
    ijk = np.linalg.inv(affine)[:3, :3]
    for centre, _ in MEDIAL_TEMPORAL:  # every ellipsoid centre is inside, a point 25 mm lateral of it is not
        centre = np.asarray(centre)
        lateral = centre + np.array([np.sign(centre[0]) * 25.0, 0.0, 0.0])
        inside, outside = (np.round(ijk @ (p - affine[:3, 3])).astype(int) for p in (centre, lateral))
        assert mask[tuple(inside)] and not mask[tuple(outside)]
    ml = mask.sum() * 8 / 1000
    assert 12.0 < ml < 20.0  # six ellipsoids of 1.9-3.7 mL each, overlapping
    for (cx, cy, _), _ in HIPPOCAMPI:  # bilateral: each hemisphere holds half, near its hippocampus
        side = mask & (np.sign(mm[0]) == np.sign(cx))
        assert abs(side.sum() - mask.sum() / 2) < 0.1 * mask.sum()
        assert abs(float(mm[0][side].mean()) - cx) < 4.0 and abs(float(mm[1][side].mean()) - cy) < 10.0
    bigger = hippocampus_mask(affine, shape, scale=1.1)
    assert bigger.sum() / mask.sum() == pytest.approx(1.1**3, rel=0.05)
    assert head_scale(template_brain_ml() * 1.1**3) == pytest.approx(1.1)
    assert head_scale(None) == head_scale(float("nan")) == 1.0
    with pytest.raises(ValueError, match="scale"):
        hippocampus_mask(affine, shape, scale=0.0)


def test_the_generators_mci_region_is_the_model_sides_region():
    """One definition: the generator's soft medial-temporal map (where MCI takes grey matter) is >= 0.5 exactly on the
    voxels :func:`hippocampus_mask` marks on the generator's own working grid (template-sized, so ``scale`` 1)."""
    from brainiac.ingestion.synthetic.anatomy import base_anatomy

    for spacing in (3.0, 2.0):
        anat = base_anatomy(spacing)
        mask = hippocampus_mask(anat.affine, anat.shape)
        assert mask.any() and np.array_equal(mask, anat.hippocampus >= 0.5), spacing


@pytest.mark.timeout(900)
def test_hippocampus_masks_on_the_tiny_pipeline_follow_each_subjects_true_pose_and_head_size(pipeline):
    """On every mci case's preprocessed 32³ grid: non-empty, bilateral, 10-25 mL, and the same voxels (Dice >= 0.85,
    centres of mass within 3 mm) as the generator's region carried through that subject's truth (pose, head scale)
    and the catalog's recorded transform; only the generator's smooth deformation (<= 6 mm) is left out."""
    from brainiac.ingestion.synthetic.anatomy import HEAD_CENTER_MM
    from brainiac.jobs.finetune.data import load_task_data
    from brainiac.jobs.finetune.evaluate import hippocampus_masks
    from brainiac.models.tasks.spec import task_spec
    from brainiac.platform.catalog import sql_literal

    version = pipeline.volumes.preprocess_version
    catalog, cfg = pipeline.catalog, pipeline.config
    data = load_task_data(catalog, cfg, task_spec("mci"), preprocess_version=version)
    masks = hippocampus_masks(catalog, cfg, data, data.case_ids)
    assert len(data.case_ids) >= 3 and set(masks) == set(data.case_ids)

    scans = catalog.scans(sequence="T1w").to_arrow(
        ["scan_id", "subject_id", "session", "dataset", "source_uri", "relative_path"]
    )
    scans = identify(scans.to_pandas(), catalog.uri)  # real paths, to meet the truth table
    scans["case"] = scans["subject_id"] + "/" + scans["session"].fillna("")
    scans = scans[scans["case"].isin(masks)]
    columns = ["scan_id", "fixed_affine", "fixed_shape", "brain_volume_ml", "transform"]
    where = f"preprocess_version = {sql_literal(version)} AND qc_pass"
    rows = catalog.select_keys("volumes", "scan_id", list(scans["scan_id"]), columns, where=where)
    rows = rows.to_pandas().merge(scans, on="scan_id")
    rows = rows.merge(pipeline.truth, left_on=["dataset", "relative_path"], right_on=["dataset", "path"])
    assert sorted(rows["case"]) == sorted(masks)
    for _, r in rows.iterrows():
        mask, shape = masks[r["case"]], tuple(r["fixed_shape"])
        affine = np.asarray(r["fixed_affine"]).reshape(4, 4)
        mm = grid_mm(affine, shape)
        assert mask.shape == shape and mask.any()
        assert (mm[0][mask] < -10).any() and (mm[0][mask] > 10).any()  # both hemispheres
        assert 10.0 < mask.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000 < 25.0
        # The head size recovered from the brain-mask volume is the generator's, to the accuracy of an affine fit: the
        # synthetic anatomy now varies (anisotropic head shapes, lobe-scale warps, atrophy under a fixed skull), which
        # an affine registration absorbs only in part (measured: up to 0.021 off at 20 subjects).
        assert head_scale(r["brain_volume_ml"]) == pytest.approx(r["head_scale"], abs=0.04)
        # Truth: output mm -> scanner mm (catalog transform) -> subject mm (truth pose) -> template mm (truth scale).
        to_scanner = np.asarray(r["transform"]).reshape(4, 4)
        pose = np.asarray(json.loads(r["rigid_transform"])).reshape(4, 4)
        unscale = np.eye(4)
        unscale[:3, :3] /= r["head_scale"]
        unscale[:3, 3] = HEAD_CENTER_MM * (1 - 1 / r["head_scale"])
        truth = hippocampus_mask(unscale @ np.linalg.inv(pose) @ to_scanner @ affine, shape)
        assert _dice(mask, truth) >= 0.85, r["case"]
        assert np.linalg.norm(mm[:, mask].mean(axis=1) - mm[:, truth].mean(axis=1)) < 3.0


def test_region_ratios_compare_with_translations_inside_the_brain_not_the_background():
    from brainiac.jobs.finetune.evaluate import region_ratios
    from brainiac.models.tasks.saliency import mass_ratio

    inputs = np.zeros((1, 1, 32, 32, 32), np.float32)
    inputs[0, 0, 8:24, 8:24, 8:24] = 1.0  # a brain in the middle of the background
    uniform = inputs[:, 0].copy()  # saliency spread evenly over the brain: no preference for any place in it
    region = np.zeros((32, 32, 32), bool)
    region[12:16, 12:16, 12:16] = True
    (ratio,) = region_ratios(uniform, inputs, [region])
    assert abs(ratio - 1.0) < 0.05
    assert mass_ratio(uniform, region[None], np.random.default_rng(0)) > 1.5  # the background-inflated baseline
    focused = uniform.copy()
    focused[0][region] *= 10
    assert region_ratios(focused, inputs, [region])[0] > 3
    assert (
        region_ratios(uniform, inputs, [None]) == [] and region_ratios(np.zeros_like(uniform), inputs, [region]) == []
    )
