"""Augmentation: independent views, determinism, shapes and dtypes, and the batched path's fidelity to MONAI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from monai.transforms import AdjustContrast, GaussianSmooth, GibbsNoise

from brainiac.models.augment import BatchedViewAugment, ViewAugment, build_augment, build_view_chain
from brainiac.models.config import AugmentConfig

ALL_ON = AugmentConfig(
    affine_p=1.0,
    flip_p=1.0,
    gamma_p=1.0,
    contrast_p=1.0,
    bias_field_p=1.0,
    gibbs_p=1.0,
    noise_p=1.0,
    smooth_p=1.0,
    dropout_p=1.0,
)
"""Every step applied, so that any two draws differ."""

OFF = AugmentConfig().disabled()


def only(**probs: float) -> AugmentConfig:
    """A config with just the named steps switched on."""
    return dataclasses.replace(OFF, **probs)


@pytest.fixture
def patch() -> np.ndarray:
    """A smooth positive blob on a zero background, like a z-scored brain crop."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij"))
    blob = np.exp(-(grid**2).sum(0) * 2) * 3 + 0.1 * np.random.default_rng(0).standard_normal((32, 32, 32))
    return blob[None].astype(np.float32)


# --- MONAI per-sample path -------------------------------------------------------------------------------------------


def test_two_views_of_one_patch_differ(patch: np.ndarray) -> None:
    v1, v2 = ViewAugment(ALL_ON, seed=0).pair(patch)
    assert not np.allclose(v1, v2)
    assert not np.allclose(v1, patch)


def test_same_seed_same_views(patch: np.ndarray) -> None:
    a = ViewAugment(ALL_ON, seed=7).pair(patch)
    b = ViewAugment(ALL_ON, seed=7).pair(patch)
    c = ViewAugment(ALL_ON, seed=8).pair(patch)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])
    # A per-call seed makes a view a function of (patch, seed) alone, whatever came before.
    aug = ViewAugment(ALL_ON, seed=0)
    first = aug(patch, seed=123)
    aug(patch)
    np.testing.assert_array_equal(aug(patch, seed=123), first)


@pytest.mark.parametrize("kind", ["numpy32", "numpy16", "torch32", "torch16"])
def test_shape_and_dtype_are_preserved(patch: np.ndarray, kind: str) -> None:
    x = {
        "numpy32": patch,
        "numpy16": patch.astype(np.float16),
        "torch32": torch.from_numpy(patch),
        "torch16": torch.from_numpy(patch).half(),
    }[kind]
    out = ViewAugment(ALL_ON, seed=1)(x)
    assert type(out) is type(x) and out.shape == x.shape and out.dtype == x.dtype


def test_two_crops_of_a_pair_are_augmented_independently(patch: np.ndarray) -> None:
    shifted = np.roll(patch, 2, axis=1)
    v1, v2 = ViewAugment(ALL_ON, seed=0).pair(patch, shifted)
    assert v1.shape == v2.shape == patch.shape
    with pytest.raises(ValueError, match=r"\(1, 32, 32, 32\) and \(1, 16, 32, 32\)"):
        ViewAugment(ALL_ON).pair(patch, patch[:, :16])


def test_disabled_chain_is_identity_and_bad_input_is_rejected(patch: np.ndarray) -> None:
    assert len(build_view_chain(OFF, (32, 32, 32)).transforms) == 0
    np.testing.assert_array_equal(ViewAugment(OFF)(patch), patch)
    assert len(build_view_chain(ALL_ON, (32, 32, 32)).transforms) == 9  # one flip axis by default
    with pytest.raises(ValueError, match=r"\(C, D, H, W\).*\(32, 32, 32\)"):
        ViewAugment(ALL_ON)(patch[0])
    with pytest.raises(ValueError, match="floating-point"):
        ViewAugment(ALL_ON)(patch.astype(np.int16))


# --- batched torch path ----------------------------------------------------------------------------------------------


def test_batched_path_runs_on_cpu_and_preserves_shape_dtype(patch: np.ndarray) -> None:
    x = torch.from_numpy(patch)[None].repeat(3, 1, 1, 1, 1)
    before = x.clone()
    aug = BatchedViewAugment(ALL_ON)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    torch.testing.assert_close(x, before)  # the input is not modified
    out16 = aug(x.bfloat16(), torch.Generator().manual_seed(0))
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16.float()).all()
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\).*\(1, 32, 32, 32\)"):
        aug(x[0])


def test_batched_path_draws_per_sample_and_is_deterministic(patch: np.ndarray) -> None:
    x = torch.from_numpy(patch)[None].repeat(4, 1, 1, 1, 1)  # four copies of the same patch
    aug = BatchedViewAugment(ALL_ON)
    params = aug.sample_params(4, (32, 32, 32), generator=torch.Generator().manual_seed(0))
    for name in ("theta", "bias_coeff", "gamma_value", "contrast_factor", "gibbs_alpha", "smooth_sigma", "noise_std"):
        values = getattr(params, name).reshape(4, -1)
        assert len({tuple(v.tolist()) for v in values}) == 4, f"{name} is shared across samples"

    out = aug(x, torch.Generator().manual_seed(5))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(out[i], out[j]), f"samples {i} and {j} got the same augmentation"
    torch.testing.assert_close(aug(x, torch.Generator().manual_seed(5)), out, rtol=0, atol=0)
    v1, v2 = aug.pair(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(v1, out, rtol=0, atol=0)
    assert not torch.allclose(v1, v2)


def test_batched_probabilities_gate_each_sample(patch: np.ndarray) -> None:
    x = torch.from_numpy(patch)[None].repeat(16, 1, 1, 1, 1)
    torch.testing.assert_close(BatchedViewAugment(OFF)(x), x, rtol=0, atol=0)
    out = BatchedViewAugment(only(contrast_p=0.5))(x, torch.Generator().manual_seed(0))
    changed = [not torch.equal(out[i], x[i]) for i in range(16)]
    assert 0 < sum(changed) < 16


def _one(aug: BatchedViewAugment, x: torch.Tensor, **fields: object):
    """Params for a batch of one with the given fields overridden."""
    params = aug.sample_params(x.shape[0], x.shape[2:], generator=torch.Generator().manual_seed(0))
    return dataclasses.replace(params, **fields)


def test_batched_affine_rotation_matches_rot90(patch: np.ndarray) -> None:
    x = torch.from_numpy(patch)[None]
    aug = BatchedViewAugment(only(affine_p=1.0))
    identity = torch.eye(3, 4)[None]
    out = aug.apply(x, _one(aug, x, theta=identity))
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    quarter = torch.tensor([[[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    out = aug.apply(x, _one(aug, x, theta=quarter))
    candidates = [torch.rot90(x, k, dims=(3, 4)) for k in (1, -1)]
    assert min((out - c).abs().max().item() for c in candidates) < 1e-4


def test_batched_bias_field_matches_monai_polynomial(patch: np.ndarray) -> None:
    x = torch.from_numpy(patch)[None]
    aug = BatchedViewAugment(only(bias_field_p=1.0))
    params = aug.sample_params(1, (32, 32, 32), generator=torch.Generator().manual_seed(3))
    out = aug.apply(x, params)
    coords = [np.linspace(-1.0, 1.0, 32, dtype=np.float32)] * 3
    field = np.polynomial.legendre.leggrid3d(*coords, params.bias_coeff[0].numpy())  # what RandBiasField evaluates
    np.testing.assert_allclose(out[0].numpy(), patch * np.exp(field), rtol=1e-4, atol=1e-5)


def test_batched_gamma_and_smoothing_match_monai(patch: np.ndarray) -> None:
    x = torch.from_numpy(patch)[None]
    img = torch.from_numpy(patch)

    aug = BatchedViewAugment(only(gamma_p=1.0))
    out = aug.apply(x, _one(aug, x, gamma_value=torch.tensor([1.3])))
    torch.testing.assert_close(out[0], torch.as_tensor(AdjustContrast(1.3)(img)), rtol=1e-4, atol=1e-4)

    aug = BatchedViewAugment(only(smooth_p=1.0, smooth_sigma=(0.5, 1.0)))
    out = aug.apply(x, _one(aug, x, smooth_sigma=torch.tensor([[1.0, 1.0, 1.0]])))
    expected = torch.as_tensor(GaussianSmooth(sigma=1.0, approx="sampled")(img))
    torch.testing.assert_close(out[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(32, 32, 32), (17, 20, 15)])
def test_batched_gibbs_matches_monai(shape: tuple[int, int, int]) -> None:
    """The half-spectrum (rfft) implementation reproduces MONAI's full-FFT GibbsNoise, odd and even sizes alike."""
    x = torch.randn(2, 1, *shape, generator=torch.Generator().manual_seed(0))
    aug = BatchedViewAugment(only(gibbs_p=1.0))
    alphas = torch.tensor([0.0, 0.4])
    out = aug.apply(x, _one(aug, x, gibbs_alpha=alphas))
    for i, alpha in enumerate(alphas.tolist()):
        torch.testing.assert_close(out[i], torch.as_tensor(GibbsNoise(alpha)(x[i])), rtol=1e-4, atol=1e-5)


def test_batched_flip_and_dropout(patch: np.ndarray) -> None:
    x = torch.from_numpy(patch)[None].repeat(2, 1, 1, 1, 1)
    aug = BatchedViewAugment(only(flip_p=1.0, flip_axes=[0, 2]))
    out = aug.apply(x, _one(aug, x, flip=torch.tensor([[True, False], [False, True]])))
    torch.testing.assert_close(out[0], x[0].flip(1), rtol=0, atol=0)
    torch.testing.assert_close(out[1], x[1].flip(3), rtol=0, atol=0)

    cfg = only(dropout_p=1.0, dropout_holes=(2, 3), dropout_size_frac=(0.25, 0.25))
    aug = BatchedViewAugment(cfg)
    ones = torch.ones(8, 1, 32, 32, 32)
    out = aug(ones, torch.Generator().manual_seed(0))
    dropped = (out == 0).flatten(1).sum(1)
    box = 8**3  # a quarter of 32 per axis
    assert bool(((dropped >= box) & (dropped <= 3 * box)).all()), dropped.tolist()
    assert set(torch.unique(out).tolist()) == {0.0, 1.0}


def test_build_augment_follows_device() -> None:
    assert isinstance(build_augment(AugmentConfig(device="data"), seed=1), ViewAugment)
    assert isinstance(build_augment(AugmentConfig(device="worker")), BatchedViewAugment)


def test_batched_rotation_stays_in_range() -> None:
    aug = BatchedViewAugment(only(affine_p=1.0, scale=0.0, rotate_deg=15.0))
    theta = aug.sample_params(64, (32, 32, 32), generator=torch.Generator().manual_seed(0)).theta
    rot = theta[:, :, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(64, 3, 3), rtol=1e-5, atol=1e-5)
    trace = rot.diagonal(dim1=1, dim2=2).sum(-1)
    angle = torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1, 1)))
    assert angle.max().item() <= 3 * 15 + 1e-3  # three rotations of at most 15° each
    assert angle.max().item() > 10  # and they do rotate
