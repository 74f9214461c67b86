"""Per-view random augmentation for contrastive pretraining, on the CPU (MONAI, per sample) or batched on any device.

SimCLR (Chen et al. 2020) learns what survives strong, independent augmentation of two views. Both paths here apply the
same steps, in the same order, with the same parameter distributions (:class:`~brainiac.models.config.AugmentConfig`),
listed as MONAI per-sample transform → batched torch implementation:

1. random affine (rotation, scaling, translation): ``RandAffine`` → ``affine_grid`` + ``grid_sample``;
2. flips along ``flip_axes``: ``RandFlip`` per axis → ``torch.flip`` under a per-sample mask;
3. bias field exp(Σ c·Legendre): ``RandBiasField`` → the same polynomial basis, separable, via ``einsum``;
4. gamma on the min-max range: ``RandAdjustContrast`` → the same formula per sample;
5. multiplicative contrast: ``RandScaleIntensity`` → a per-sample factor;
6. Gibbs ringing: ``RandGibbsNoise`` → ``torch.fft.rfftn`` with the same spherical k-space mask (exact);
7. Gaussian smoothing: ``RandGaussianSmooth`` → one banded matrix per sample and axis (batched matmul), zero padded;
8. Gaussian noise: ``RandGaussianNoise`` → ``randn`` with a per-sample std;
9. coarse dropout: ``RandCoarseDropout`` → per-sample boxes set to 0.

The batched path covers every step. It draws every parameter per sample and runs on the tensor's device, so on a GPU
worker the CPUs only decode and crop. It never synchronises with the host (no ``nonzero``, ``.any()`` or ``.item()``
deciding what to run): each step runs on the whole batch and a per-sample mask selects its result, so the next batch can
be augmented on a side CUDA stream while the current one trains. The paths agree in distribution, not bit for bit: MONAI's smoothing integrates
the Gaussian (``erf``) where the batched path samples it (truncated at 4σ), and MONAI composes its affine matrix in
its own order (rotation, shear, translation, scale) where the batched one applies rotation·scale about the patch
centre, then the shift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandCoarseDropout,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandGibbsNoise,
    RandScaleIntensity,
)

from brainiac.models.config import AugmentConfig

__all__ = [
    "BatchParams",
    "BatchedViewAugment",
    "ViewAugment",
    "build_augment",
    "build_view_chain",
]


def _box_sizes(frac: tuple[float, float], n: int) -> tuple[int, int]:
    lo = max(1, round(frac[0] * n))
    return lo, max(lo, round(frac[1] * n))


def build_view_chain(cfg: AugmentConfig, spatial_shape: Sequence[int]) -> Compose:
    """MONAI's per-sample chain for channel-first (C, D, H, W) patches of ``spatial_shape``; steps with p = 0 are left
    out. Seed it with ``chain.set_random_state(seed)``.

    Args:
        cfg: probabilities and ranges.
        spatial_shape: (D, H, W) of the patches (translation and dropout box sizes are fractions of it).

    Raises:
        ValueError: ``spatial_shape`` is not three positive sizes.
    """
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"spatial_shape must be three positive sizes (D, H, W), got {tuple(spatial_shape)}")
    steps: list = []
    if cfg.affine_p > 0:
        steps.append(
            RandAffine(
                prob=cfg.affine_p,
                rotate_range=(math.radians(cfg.rotate_deg),) * 3,
                scale_range=(cfg.scale,) * 3,
                translate_range=tuple(cfg.translate_frac * n for n in shape),
                mode="bilinear",
                padding_mode="zeros",
            )
        )
    if cfg.flip_p > 0:
        steps.extend(RandFlip(prob=cfg.flip_p, spatial_axis=axis) for axis in cfg.flip_axes)
    if cfg.bias_field_p > 0:
        steps.append(
            RandBiasField(degree=cfg.bias_field_degree, coeff_range=cfg.bias_field_coeff, prob=cfg.bias_field_p)
        )
    if cfg.gamma_p > 0:
        steps.append(RandAdjustContrast(prob=cfg.gamma_p, gamma=cfg.gamma_range))
    if cfg.contrast_p > 0:
        lo, hi = cfg.contrast_range
        steps.append(RandScaleIntensity(factors=(lo - 1.0, hi - 1.0), prob=cfg.contrast_p))
    if cfg.gibbs_p > 0:
        steps.append(RandGibbsNoise(prob=cfg.gibbs_p, alpha=cfg.gibbs_alpha))
    if cfg.smooth_p > 0:
        sigma = (cfg.smooth_sigma[0], cfg.smooth_sigma[1])  # a (low, high) pair (AugmentConfig checks it)
        steps.append(RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=cfg.smooth_p))
    if cfg.noise_p > 0:
        steps.append(RandGaussianNoise(prob=cfg.noise_p, mean=0.0, std=cfg.noise_std))
    if cfg.dropout_p > 0:
        sizes = [_box_sizes(cfg.dropout_size_frac, n) for n in shape]
        steps.append(
            RandCoarseDropout(
                holes=cfg.dropout_holes[0],
                max_holes=cfg.dropout_holes[1],
                spatial_size=[s[0] for s in sizes],
                max_spatial_size=[s[1] for s in sizes],
                fill_value=0.0,
                prob=cfg.dropout_p,
            )
        )
    return Compose(steps)


class ViewAugment:
    """MONAI per-sample augmentation of one channel-first patch (C, D, H, W): the CPU path (``device="data"``).

    Each call draws fresh parameters, so two calls on the same patch give two independently augmented views. Output is
    a deterministic function of the seed: of ``seed`` given at construction and the sequence of calls, or of the
    ``seed`` given to the call (use a per-sample seed, e.g. derived from run seed, epoch and patch id, to make a
    distributed data stream reproducible whatever its partitioning).

    Args:
        cfg: probabilities and ranges.
        seed: seeds the chain's random state.
    """

    def __init__(self, cfg: AugmentConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self._chains: dict[tuple[int, ...], Compose] = {}

    def _chain(self, shape: tuple[int, ...]) -> Compose:
        chain = self._chains.get(shape)
        if chain is None:
            chain = build_view_chain(self.cfg, shape)
            chain.set_random_state(seed=self.seed)
            self._chains[shape] = chain
        return chain

    def _apply(self, chain: Compose, patch: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        img = torch.as_tensor(patch).to(torch.float32).clone()
        out = chain(img)
        if isinstance(out, MetaTensor):
            out = out.as_tensor()
        out = torch.as_tensor(out)
        if isinstance(patch, np.ndarray):
            return out.numpy().astype(patch.dtype, copy=False)
        return out.to(dtype=patch.dtype, device=patch.device)

    @staticmethod
    def _check(patch: np.ndarray | torch.Tensor) -> tuple[int, ...]:
        if not isinstance(patch, np.ndarray | torch.Tensor) or patch.ndim != 4:
            shape = getattr(patch, "shape", type(patch).__name__)
            raise ValueError(f"ViewAugment expects a channel-first patch (C, D, H, W), got {shape}")
        if not (
            patch.dtype in (np.float16, np.float32, np.float64) or getattr(patch.dtype, "is_floating_point", False)
        ):
            raise ValueError(f"ViewAugment expects a floating-point patch, got dtype {patch.dtype}")
        return tuple(int(s) for s in patch.shape[1:])

    def __call__(self, patch: np.ndarray | torch.Tensor, seed: int | None = None) -> np.ndarray | torch.Tensor:
        """One augmented view of ``patch``, same type, shape and dtype.

        Raises:
            ValueError: ``patch`` is not a 4-D floating-point array or tensor.
        """
        chain = self._chain(self._check(patch))
        if seed is not None:
            chain.set_random_state(seed=int(seed))
        return self._apply(chain, patch)

    def pair(
        self, first: np.ndarray | torch.Tensor, second: np.ndarray | torch.Tensor | None = None, seed: int | None = None
    ) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
        """Two views with independent draws: of the two crops of a pair, or twice of ``first`` when ``second`` is None.

        Raises:
            ValueError: a patch is not 4-D floating point, or the two crops differ in shape.
        """
        shape = self._check(first)
        if second is not None and tuple(second.shape) != tuple(first.shape):
            raise ValueError(
                f"the two crops must have the same shape, got {tuple(first.shape)} and {tuple(second.shape)}"
            )
        chain = self._chain(shape)
        if seed is not None:
            chain.set_random_state(seed=int(seed))
        return self._apply(chain, first), self._apply(chain, first if second is None else second)


@dataclass
class BatchParams:
    """Per-sample random parameters of one batched augmentation call (B samples; masks say which steps apply)."""

    affine: torch.Tensor
    """(B,) bool: apply the affine."""
    theta: torch.Tensor
    """(B, 3, 4) affine in ``affine_grid``'s normalised (x=W, y=H, z=D) coordinates, output → input."""
    flip: torch.Tensor
    """(B, len(flip_axes)) bool: flip along each configured axis."""
    bias: torch.Tensor
    """(B,) bool: apply the bias field."""
    bias_coeff: torch.Tensor
    """(B, g, g, g) Legendre coefficients, g = degree + 1, zero where i + j + k > degree."""
    gamma: torch.Tensor
    """(B,) bool."""
    gamma_value: torch.Tensor
    """(B,) gamma exponents."""
    contrast: torch.Tensor
    """(B,) bool."""
    contrast_factor: torch.Tensor
    """(B,) intensity factors."""
    gibbs: torch.Tensor
    """(B,) bool."""
    gibbs_alpha: torch.Tensor
    """(B,) Gibbs strengths in [0, 1]."""
    smooth: torch.Tensor
    """(B,) bool."""
    smooth_sigma: torch.Tensor
    """(B, 3) σ per spatial axis (D, H, W), in voxels."""
    noise: torch.Tensor
    """(B,) bool."""
    noise_std: torch.Tensor
    """(B,) noise standard deviations."""
    dropout: torch.Tensor
    """(B,) bool."""
    dropout_boxes: torch.Tensor
    """(B, max_holes, 6) long: start (D, H, W) and size (D, H, W) of each box."""
    dropout_valid: torch.Tensor
    """(B, max_holes) bool: which boxes are used (the number of boxes varies per sample)."""


def _legendre(degree: int, n: int, device: torch.device) -> torch.Tensor:
    """(degree + 1, n) Legendre polynomials P_0..P_degree on linspace(-1, 1, n), as numpy's ``leggrid3d`` uses."""
    x = torch.linspace(-1.0, 1.0, n, device=device)
    polys = [torch.ones_like(x), x]
    for k in range(1, degree):
        polys.append(((2 * k + 1) * x * polys[k] - k * polys[k - 1]) / (k + 1))
    return torch.stack(polys[: degree + 1])


def _gibbs_rfft_mask(spatial: tuple[int, ...], radius: torch.Tensor) -> torch.Tensor:
    """MONAI's Gibbs k-space sphere in ``rfftn`` layout: (b,) radii → (b, D, H, W // 2 + 1) float mask.

    MONAI keeps the frequencies whose position in the ``fftshift``-ed grid lies within ``radius`` of the grid centre
    ((n - 1) / 2) and returns the real part of the inverse FFT. For even n that sphere is off-centre by half a voxel, so
    it is not symmetric under f → -f, and taking the real part is the same as applying the symmetrised mask
    (M(f) + M(-f)) / 2. That mask is Hermitian-symmetric, so the half spectrum of ``rfftn`` suffices (half the work).
    """
    dev = radius.device

    def offsets(n: int, idx: torch.Tensor) -> torch.Tensor:
        """Distance along one axis from the shifted grid's centre, for unshifted FFT indices ``idx``."""
        return ((idx + n // 2) % n).float() - (n - 1) / 2

    sq = []
    sq_neg = []
    for axis, n in enumerate(spatial):
        idx = torch.arange(n // 2 + 1 if axis == 2 else n, device=dev)
        shape = [1, 1, 1]
        shape[axis] = -1
        sq.append((offsets(n, idx) ** 2).view(shape))
        sq_neg.append((offsets(n, (-idx) % n) ** 2).view(shape))
    dist = torch.sqrt(sq[0] + sq[1] + sq[2])
    dist_neg = torch.sqrt(sq_neg[0] + sq_neg[1] + sq_neg[2])
    r = radius.view(-1, 1, 1, 1)
    return ((dist[None] <= r).float() + (dist_neg[None] <= r).float()) / 2


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles about x, y, z → (B, 3, 3) rotation matrices Rz·Ry·Rx."""
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rx = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rz = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(b,) σ → (b, 2·radius + 1) normalised sampled Gaussian kernels."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


class BatchedViewAugment:
    """Batched augmentation of (B, C, D, H, W) tensors with per-sample random parameters, on the tensor's device.

    The worker path (``device="worker"``): call it on the batch right after it reaches the GPU, once per view. Runs under
    ``torch.no_grad``; computes in float32 and returns the input dtype. Deterministic for a given ``generator`` state on
    a given device (a generator must live on the tensor's device).

    Args:
        cfg: probabilities and ranges (the same as the MONAI path's).
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    # -- parameters ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_params(
        self,
        batch: int,
        spatial_shape: Sequence[int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> BatchParams:
        """Draw every random parameter for ``batch`` samples of ``spatial_shape`` (D, H, W).

        Raises:
            ValueError: ``batch`` < 1 or ``spatial_shape`` not three positive sizes.
        """
        shape = tuple(int(s) for s in spatial_shape)
        if batch < 1 or len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"need batch >= 1 and a spatial shape (D, H, W), got batch={batch}, shape={spatial_shape}")
        cfg, dev, g = self.cfg, torch.device(device), generator

        def rand(*size: int) -> torch.Tensor:
            return torch.rand(*size, device=dev, generator=g)

        def uniform(lo: float, hi: float, *size: int) -> torch.Tensor:
            return lo + (hi - lo) * rand(*size)

        def coin(p: float, *size: int) -> torch.Tensor:
            return rand(*(size or (batch,))) < p

        # 1. affine, built in voxel units about the centre and mapped to normalised (x=W, y=H, z=D) coordinates.
        affine = coin(cfg.affine_p)
        rad = math.radians(cfg.rotate_deg)
        lin = _rotation(uniform(-rad, rad, batch, 3)) @ torch.diag_embed(
            uniform(1 - cfg.scale, 1 + cfg.scale, batch, 3)
        )
        half = (shape[2] / 2, shape[1] / 2, shape[0] / 2)
        ratio = torch.tensor([[half[j] / half[i] for j in range(3)] for i in range(3)], dtype=torch.float32)
        lin = lin * ratio.to(dev, non_blocking=True)  # D⁻¹ · A · D (an async copy: no host sync on CUDA)
        shift = uniform(-2 * cfg.translate_frac, 2 * cfg.translate_frac, batch, 3)  # normalised units span 2
        theta = torch.cat([lin, shift[:, :, None]], dim=2)

        flip = coin(cfg.flip_p, batch, len(cfg.flip_axes))

        # 3. bias field coefficients on i + j + k <= degree, as MONAI's RandBiasField.
        g1 = cfg.bias_field_degree + 1
        idx = torch.arange(g1, device=dev)
        tri = (idx[:, None, None] + idx[None, :, None] + idx[None, None, :]) <= cfg.bias_field_degree
        bias_coeff = uniform(*cfg.bias_field_coeff, batch, g1, g1, g1) * tri

        n_holes = torch.floor(uniform(cfg.dropout_holes[0], cfg.dropout_holes[1] + 1, batch)).long()
        hole_max = cfg.dropout_holes[1]
        sizes, starts = [], []
        for n in shape:
            lo, hi = _box_sizes(cfg.dropout_size_frac, n)
            size = torch.floor(uniform(lo, hi + 1, batch, hole_max)).long().clamp(max=n)
            sizes.append(size)
            starts.append(torch.floor(rand(batch, hole_max) * (n - size + 1)).long())
        boxes = torch.stack([*starts, *sizes], dim=-1)

        return BatchParams(
            affine=affine,
            theta=theta,
            flip=flip,
            bias=coin(cfg.bias_field_p),
            bias_coeff=bias_coeff,
            gamma=coin(cfg.gamma_p),
            gamma_value=uniform(*cfg.gamma_range, batch),
            contrast=coin(cfg.contrast_p),
            contrast_factor=uniform(*cfg.contrast_range, batch),
            gibbs=coin(cfg.gibbs_p),
            gibbs_alpha=uniform(*cfg.gibbs_alpha, batch),
            smooth=coin(cfg.smooth_p),
            smooth_sigma=uniform(*cfg.smooth_sigma, batch, 3),
            noise=coin(cfg.noise_p),
            noise_std=uniform(0.0, cfg.noise_std, batch),
            dropout=coin(cfg.dropout_p),
            dropout_boxes=boxes,
            dropout_valid=torch.arange(hole_max, device=dev)[None, :] < n_holes[:, None],
        )

    # -- application --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self, x: torch.Tensor, params: BatchParams, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``x`` (B, C, D, H, W) with ``params``; ``generator`` draws the noise. Returns a new tensor.

        No host synchronisation: every step runs on the whole batch and a per-sample mask picks its result
        (``torch.where``), so nothing waits for the device to learn which samples were drawn; samples a step skips keep
        their values bit for bit. Steps whose probability is 0 in the config are not run at all.

        Raises:
            ValueError: ``x`` is not 5-D floating point, or ``params`` were drawn for another batch size.
        """
        self._check(x, generator)
        if params.affine.shape[0] != x.shape[0]:
            raise ValueError(f"params are for batch {params.affine.shape[0]}, input is {tuple(x.shape)}")
        cfg = self.cfg
        dtype = x.dtype
        x = x.to(torch.float32, copy=True)
        b, spatial = x.shape[0], tuple(x.shape[2:])
        dims = (-3, -2, -1)

        def per_sample(mask: torch.Tensor) -> torch.Tensor:
            return mask.view(b, 1, 1, 1, 1)

        if cfg.affine_p > 0:
            grid = F.affine_grid(params.theta, list(x.shape), align_corners=False)
            warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            x = torch.where(per_sample(params.affine), warped, x)
            del grid, warped

        if cfg.flip_p > 0:
            for j, axis in enumerate(cfg.flip_axes):
                x = torch.where(per_sample(params.flip[:, j]), x.flip(2 + axis), x)

        if cfg.bias_field_p > 0:
            polys = [_legendre(cfg.bias_field_degree, n, x.device) for n in spatial]
            field = torch.einsum("bijk,id,jh,kw->bdhw", params.bias_coeff, *polys)
            x = torch.where(per_sample(params.bias), x * torch.exp(field)[:, None], x)

        if cfg.gamma_p > 0:
            lo = x.amin(dim=(1, 2, 3, 4), keepdim=True)
            span = x.amax(dim=(1, 2, 3, 4), keepdim=True) - lo
            gamma = params.gamma_value.view(b, 1, 1, 1, 1)
            x = torch.where(per_sample(params.gamma), ((x - lo) / (span + 1e-7)) ** gamma * span + lo, x)

        if cfg.contrast_p > 0:
            x = x * torch.where(params.contrast, params.contrast_factor, 1.0).view(b, 1, 1, 1, 1)

        if cfg.gibbs_p > 0:
            radius = (1 - params.gibbs_alpha) * max(spatial) * math.sqrt(2) / 2
            keep = _gibbs_rfft_mask(spatial, radius)[:, None]  # (B, 1, D, H, W // 2 + 1)
            rung = torch.fft.irfftn(torch.fft.rfftn(x, dim=dims) * keep, s=spatial, dim=dims)
            x = torch.where(per_sample(params.gibbs), rung, x)
            del keep, rung

        if cfg.smooth_p > 0:
            x = torch.where(per_sample(params.smooth), self._smooth(x, params.smooth_sigma), x)

        if cfg.noise_p > 0:
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            std = torch.where(params.noise, params.noise_std, 0.0).view(b, 1, 1, 1, 1)
            x = torch.where(per_sample(params.noise), x + std * noise, x)

        if cfg.dropout_p > 0:
            x = x.masked_fill(self._dropout_mask(params, spatial)[:, None], 0.0)
        return x.to(dtype)

    def _smooth(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian smoothing of (b, C, D, H, W) with a σ per sample and axis, zero padded at the faces.

        Along each axis of length n the filter is a banded (n, n) matrix per sample (the sampled kernel, truncated at
        ``ceil(4 · max σ)``, on its diagonals), so one batched matmul per axis smooths the whole batch: the same numbers
        as a zero-padded ``conv3d`` with that kernel (MONAI's ``GaussianSmooth(approx="sampled")``), without a grouped
        convolution per sample. Smoothing stays out of the Gibbs step's FFT on purpose: a product of spectra there is a
        circular convolution, which wraps the opposite face into the border voxels instead of zeros.
        """
        radius = max(1, math.ceil(4.0 * self.cfg.smooth_sigma[1]))
        out = x
        for axis, letter in enumerate("dhw"):
            n = x.shape[2 + axis]
            kernels = _gaussian_kernels(sigma[:, axis], radius)  # (b, 2r + 1), normalised over the whole kernel
            offset = torch.arange(n, device=x.device)[None, :] - torch.arange(n, device=x.device)[:, None]  # j - i
            band = kernels[:, (offset.clamp(-radius, radius) + radius)]  # (b, n, n)
            band = band * (offset.abs() <= radius)
            spec = "bcdhw".replace(letter, "j")
            out = torch.einsum(f"b{letter}j,{spec}->bcdhw", band, out)  # e.g. "bdj,bcjhw->bcdhw"
        return out

    @staticmethod
    def _dropout_mask(params: BatchParams, spatial: tuple[int, ...]) -> torch.Tensor:
        """(B, D, H, W) bool: voxels inside any used box of a sample chosen for dropout."""
        dev = params.dropout_boxes.device
        b, holes = params.dropout_valid.shape
        mask = torch.zeros((b, *spatial), dtype=torch.bool, device=dev)
        ranges = [torch.arange(n, device=dev) for n in spatial]
        for h in range(holes):
            box = params.dropout_boxes[:, h]
            inside = [
                (r[None, :] >= box[:, a, None]) & (r[None, :] < box[:, a, None] + box[:, 3 + a, None])
                for a, r in enumerate(ranges)
            ]
            used = params.dropout_valid[:, h] & params.dropout
            mask |= (
                used.view(b, 1, 1, 1)
                & inside[0][:, :, None, None]
                & inside[1][:, None, :, None]
                & inside[2][:, None, None, :]
            )
        return mask

    @staticmethod
    def _check(x: torch.Tensor, generator: torch.Generator | None) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"BatchedViewAugment expects a floating-point tensor (B, C, D, H, W), got {shape}")
        if generator is not None and torch.device(generator.device).type != x.device.type:
            raise ValueError(f"the generator lives on {generator.device}, the batch on {x.device}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One augmented view of every sample of ``x`` (B, C, D, H, W), parameters drawn per sample.

        Raises:
            ValueError: ``x`` is not 5-D floating point, or ``generator`` is on another device.
        """
        self._check(x, generator)
        params = self.sample_params(x.shape[0], x.shape[2:], x.device, generator)
        return self.apply(x, params, generator)

    def pair(
        self, first: torch.Tensor, second: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views with independent draws: of the two crops of each pair, or twice of ``first``."""
        return self(first, generator), self(first if second is None else second, generator)


def build_augment(cfg: AugmentConfig, seed: int = 0) -> ViewAugment | BatchedViewAugment:
    """The augmentation ``cfg.device`` asks for: ``data`` → :class:`ViewAugment` (MONAI, per sample, in the data stream),
    ``worker`` → :class:`BatchedViewAugment` (batched, on the training worker's device)."""
    return ViewAugment(cfg, seed=seed) if cfg.device == "data" else BatchedViewAugment(cfg)
