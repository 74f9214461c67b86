"""Inter-subject anatomical variation of the synthetic cohort (issue 20): smooth deformations that move the truth
alike, positive Jacobians, age-dependent atrophy and ventricles, children's smaller heads, tumour mass effect, and
determinism. Everything runs on the 3 mm working grid of the tiny preset (no files are written)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from brainiac.ingestion.synthetic.anatomy import (
    HEAD_CENTER_MM,
    base_anatomy,
    deform_volume,
    deformation_coords,
    jacobian_determinant,
    random_deformation,
)
from brainiac.ingestion.synthetic.cohort import BRAIN_CLASSES, _Generator, _tissue_classes, generate_cohort
from brainiac.ingestion.synthetic.presets import get_preset
from brainiac.ingestion.synthetic.subjects import plan_cohort
from brainiac.platform.errors import UserError

SEED = 11
CSF, GM, WM, SKULL, SCALP, XCSF = 1, 2, 3, 4, 5, 8


@pytest.fixture(scope="module")
def anat():
    return base_anatomy(3.0)


def _generator(tmp_path, variation: float = 1.0) -> _Generator:
    preset = dataclasses.replace(get_preset("tiny"), anatomy_variation=variation)
    return _Generator(tmp_path, SEED, preset, None)


def _simulate(gen: _Generator, plan):
    return gen.simulate(plan, plan.sessions[0], gen.deformation(plan))


@pytest.fixture(scope="module")
def lifespan(anat, tmp_path_factory):
    """The youngest and the oldest subjects of a 40-subject lifespan (BIDS) plan, simulated at their first session."""
    gen = _generator(tmp_path_factory.mktemp("lifespan"))
    plans = sorted(plan_cohort(SEED, "bids", 40, anat, 0, 1.0), key=lambda p: p.age_years)
    picked = plans[:5] + plans[-5:]
    return [(p, _simulate(gen, p)) for p in picked]


def test_deformed_images_and_truth_stay_aligned(anat, tmp_path):
    """The image, the tissue classes and the brain mask go through one map: WM voxels are bright on T1w, skull voxels
    dark, and the brain mask is the set of brain classes; the mask really moved away from the template's."""
    gen = _generator(tmp_path)
    plan = plan_cohort(SEED, "adni", 3, anat, 0, 1.0)[0]
    sess = _simulate(gen, plan)
    t1, tissue = sess.images["T1w"], sess.tissue
    assert np.median(t1[tissue == WM]) > 0.85
    assert np.median(t1[tissue == SKULL]) < 0.3
    assert np.median(t1[tissue == CSF]) < 0.45
    mask = np.isin(tissue, BRAIN_CLASSES)
    template = anat.mask > 0.5
    dice = 2 * np.count_nonzero(mask & template) / (np.count_nonzero(mask) + np.count_nonzero(template))
    assert 0.7 < dice < 0.97, dice  # deformed, but still a brain where a brain should be
    # Misaligning the truth by one working voxel (3 mm) would break the first check: WM labels then land on GM/CSF.
    shifted = np.roll(tissue, 2, axis=0)
    assert np.median(t1[shifted == WM]) < np.median(t1[tissue == WM]) - 0.02


@pytest.mark.parametrize("variation", [1.0, 2.0])
def test_jacobian_stays_positive(anat, variation):
    """Worst cases of every component at once: the largest fine and coarse warps, the oldest MCI brain, a strong
    tumour push, a child-sized long head."""
    from brainiac.ingestion.synthetic.anatomy import MassEffect
    from brainiac.ingestion.synthetic.biology import brain_shrink_mm

    shrink = brain_shrink_mm(95.0, 0.5, variation)
    mass = MassEffect((30.0, 10.0, 20.0), 18.0, 6.0 * variation)
    worst = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        d = random_deformation(rng, anat, 6.0, 1.0, (1.08, 0.93, 1.0), coarse_mm=7.0 * variation)
        coords = deformation_coords(anat, d, size=(0.97, 0.84, 0.9), shrink_mm=shrink, mass=mass)
        worst.append(float(jacobian_determinant(coords).min()))
    assert min(worst) > 0.05, worst
    # The check can fail: a fine warp far beyond the generator's 3-6 mm folds space.
    folded = random_deformation(np.random.default_rng(0), anat, 20.0, 1.0)
    assert jacobian_determinant(deformation_coords(anat, folded)).min() < 0


def test_older_brains_shrink_and_their_ventricles_grow(lifespan):
    """Brain fraction of the intracranial volume falls and ventricular CSF rises with age (5 youngest vs 5 oldest)."""
    young = [(p, s) for p, s in lifespan[:5]]
    old = [(p, s) for p, s in lifespan[5:]]
    assert max(p.age_years for p, _ in young) < 25 and min(p.age_years for p, _ in old) > 65

    def brain_fraction(s) -> float:
        brain = np.count_nonzero(np.isin(s.tissue, (GM, WM)))
        return brain / np.count_nonzero(np.isin(s.tissue, (*BRAIN_CLASSES, XCSF)))

    def ventricles(s) -> float:
        brain = np.isin(s.tissue, BRAIN_CLASSES)
        return np.count_nonzero(s.tissue == CSF) / np.count_nonzero(brain)

    def gap(s) -> float:  # extra-cerebral CSF between brain and skull, per brain voxel
        return np.count_nonzero(s.tissue == XCSF) / np.count_nonzero(np.isin(s.tissue, BRAIN_CLASSES))

    assert np.mean([brain_fraction(s) for _, s in old]) < np.mean([brain_fraction(s) for _, s in young]) - 0.03
    assert np.mean([ventricles(s) for _, s in old]) > 1.3 * np.mean([ventricles(s) for _, s in young])
    assert np.mean([gap(s) for _, s in old]) > 1.2 * np.mean([gap(s) for _, s in young])
    assert all(s.info["brain_shrink_mm"] > 0.5 for _, s in old)
    assert all(s.info["brain_shrink_mm"] < 0.2 for p, s in young if p.age_years + p.brain_age_gap_years < 25)


def test_children_have_smaller_heads(lifespan):
    kids = [(p, s) for p, s in lifespan if p.age_years < 12]
    adults = [(p, s) for p, s in lifespan if p.age_years > 18]
    assert len(kids) >= 2 and len(adults) >= 5
    assert all(s.info["head_scale"] < p.head_scale - 0.02 for p, s in kids)

    def head(s) -> int:
        return np.count_nonzero(s.tissue > 0)

    assert np.mean([head(s) for _, s in kids]) < 0.9 * np.mean([head(s) for _, s in adults])


def test_children_have_thinner_skulls(anat):
    from brainiac.ingestion.synthetic.biology import base_tissue, skull_growth

    assert skull_growth(5.0) < 0.7 and skull_growth(12.0) < 1.0 == skull_growth(18.0) == skull_growth(80.0)
    child = base_tissue(anat, np.random.default_rng(0), thickness=skull_growth(6.0))
    adult = base_tissue(anat, np.random.default_rng(0))
    assert child.skull.sum() < 0.8 * adult.skull.sum() and child.scalp.sum() < 0.8 * adult.scalp.sum()


def test_head_shapes_vary_and_keep_their_volume(anat):
    plans = plan_cohort(SEED, "stroke", 12, anat, 0, 1.0)
    shapes = np.array([p.head_shape for p in plans])
    assert np.allclose(shapes.prod(axis=1), 1.0, atol=1e-3)
    assert shapes.std(axis=0).min() > 0.01
    flat = plan_cohort(SEED, "stroke", 12, anat, 0, 0.0)
    assert all(p.head_shape == (1.0, 1.0, 1.0) and p.coarse_deform_mm == 0 for p in flat)
    # the knob leaves every other draw alone
    assert [p.age_years for p in flat] == [p.age_years for p in plans]
    assert [p.head_scale for p in flat] == [p.head_scale for p in plans]


def test_tumour_pushes_the_brain(anat, tmp_path):
    """With mass effect, tissue around the tumour moves (and the brain mask with it) while far tissue does not; the
    warped labels keep exactly the BraTS values."""
    gen = _generator(tmp_path)
    plan = next(p for p in plan_cohort(SEED, "brats", 6, anat, 0, 1.0) if p.glioma.push_mm > 3.0)
    g = plan.glioma
    d = gen.deformation(plan)
    from brainiac.ingestion.synthetic.biology import add_glioma, base_tissue

    t = base_tissue(anat, np.random.default_rng(0))
    add_glioma(t, anat, g, np.random.default_rng(1))
    classes = _tissue_classes(t, anat.mask > 0.5)
    pushed = deformation_coords(anat, d, mass=g.mass_effect())
    still = deformation_coords(anat, d)
    a = deform_volume(classes, anat, d, order=0, coords=pushed)
    b = deform_volume(classes, anat, d, order=0, coords=still)
    r = np.sqrt(((anat.coords - np.asarray(g.centre_mm, np.float32).reshape(3, 1, 1, 1)) ** 2).sum(axis=0))
    near = (r > g.radius_mm + g.push_mm) & (r < 2.5 * (g.radius_mm + g.push_mm))
    far = r > 90
    changed = a != b
    assert changed[near].mean() > 0.1, changed[near].mean()
    assert changed[far].mean() < 0.01
    assert ((a == 7) & (b != 7)).sum() > 0  # the core expanded into what was brain
    brain_a, brain_b = np.isin(a, BRAIN_CLASSES), np.isin(b, BRAIN_CLASSES)
    assert (brain_a != brain_b)[r < 3 * (g.radius_mm + g.push_mm)].any()
    labels = deform_volume(t.labels, anat, d, order=0, coords=pushed)
    assert set(np.unique(labels).tolist()) == set(np.unique(t.labels).tolist())
    # The mass effect never reaches the skull
    skull = np.isin(b, (SKULL, SCALP))
    assert (a[skull] == b[skull]).mean() > 0.97
    # and the tumour is pushed to about its drawn size (core radius + push) in subject space
    core_ml = np.count_nonzero(np.isin(labels, (1, 4))) * 27 / 1000
    base_ml = np.count_nonzero(np.isin(deform_volume(t.labels, anat, d, order=0, coords=still), (1, 4))) * 27 / 1000
    assert core_ml > 1.2 * base_ml


def test_simulation_is_deterministic_and_seeded(anat, tmp_path):
    plan = plan_cohort(SEED, "brats", 2, anat, 0, 1.0)[1]
    again = plan_cohort(SEED, "brats", 2, anat, 0, 1.0)[1]
    a, b = _simulate(_generator(tmp_path / "a"), plan), _simulate(_generator(tmp_path / "b"), again)
    for q in a.images:
        assert np.array_equal(a.images[q], b.images[q])
    assert np.array_equal(a.tissue, b.tissue) and np.array_equal(a.labels, b.labels)
    other = plan_cohort(SEED + 1, "brats", 2, anat, 0, 1.0)[1]
    gen = _generator(tmp_path / "c")
    gen.seed = SEED + 1
    c = _simulate(gen, other)
    assert not np.array_equal(a.tissue, c.tissue)


def test_variation_zero_is_the_earlier_anatomy(anat):
    """At 0 the map is the head scale about the head centre plus the fine warp, as before the knob existed."""
    plan = plan_cohort(SEED, "adni", 1, anat, 0, 0.0)[0]
    d = random_deformation(np.random.default_rng(0), anat, plan.deform_max_mm, plan.head_scale, plan.head_shape)
    c = HEAD_CENTER_MM.astype(np.float32).reshape(3, 1, 1, 1)
    q = c + (anat.coords - c) / np.float32(plan.head_scale) + d.field
    inv = np.linalg.inv(anat.affine)
    old = np.einsum("ij,j...->i...", inv[:3, :3], q) + inv[:3, 3].reshape(3, 1, 1, 1)
    new = deformation_coords(anat, d, size=plan.head_size(plan.sessions[0]))
    assert np.abs(new - old).max() < 1e-3


def test_anatomy_variation_is_validated(tmp_path):
    with pytest.raises(UserError, match="anatomy_variation"):
        generate_cohort(tmp_path / "x", subjects=1, seed=0, cohorts=("adni",), anatomy_variation=-1)
