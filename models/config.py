"""Typed config sections for the model side of pretraining: backbone, projection head, SSL loss and augmentation.

Each section is a self-contained dataclass in torchtitan's style (a docstring under every field, ``Literal`` for choices,
range limits in ``field(metadata=...)`` read by :func:`brainiac.platform.config.from_dict`). No torch import here, so the
CLI can load and validate a config without paying for torch. Defaults are the production values (BrainIAC V2: ViT-B on
96³ patches); the tiny values used by tests and the quickstart are the same code with other numbers
(:meth:`BackboneConfig.tiny`).

Suggested sections of the root config: ``model`` (:class:`BackboneConfig`), ``projection`` (:class:`ProjectionConfig`),
``ssl`` (:class:`SSLConfig`), ``augment`` (:class:`AugmentConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from brainiac.platform.errors import ConfigError
from brainiac.platform.fields import bounds

__all__ = ["AugmentConfig", "BackboneConfig", "ProjectionConfig", "SSLConfig"]


_PROB = bounds(ge=0.0, le=1.0)


def _check_interval(name: str, value: tuple[float, ...], *, low: float | None = None) -> None:
    if len(value) != 2 or value[0] > value[1]:
        raise ConfigError(f"{name} must be two numbers [low, high] with low <= high, got {list(value)}")
    if low is not None and value[0] < low:
        raise ConfigError(f"{name} must not go below {low}, got {list(value)}")


@dataclass
class BackboneConfig:
    """The 3-D encoder: a MONAI ViT (BrainIAC V2) or a MONAI ResNet (BrainIAC V1)."""

    kind: Literal["vit", "resnet"] = "vit"
    """Encoder family: ``vit`` (MONAI ``ViT``) or ``resnet`` (MONAI ``ResNet``, 3-D)."""

    in_channels: int = field(default=1, metadata=bounds(ge=1))
    """Image channels of one view (one MRI sequence per view)."""

    img_size: int = field(default=96, metadata=bounds(ge=8))
    """Edge of the cubic input patch in voxels. The ViT is built for exactly this size; the ResNet accepts any size."""

    patch_size: int = field(default=16, metadata=bounds(ge=1))
    """ViT: edge of the cubic patch embedded as one token (96 / 16 = 6 → 216 tokens). Must divide ``img_size``."""

    hidden_size: int = field(default=768, metadata=bounds(ge=8))
    """ViT: token width (768 = ViT-B). Must be divisible by ``num_heads``."""

    mlp_dim: int = field(default=3072, metadata=bounds(ge=8))
    """ViT: hidden width of each transformer block's MLP."""

    num_layers: int = field(default=12, metadata=bounds(ge=1))
    """ViT: number of transformer blocks."""

    num_heads: int = field(default=12, metadata=bounds(ge=1))
    """ViT: attention heads per block."""

    pooling: Literal["cls", "mean"] = "cls"
    """ViT: the feature vector is a real, learned CLS token (``cls``) or the mean over patch tokens (``mean``). Never the
    first patch token, which is what BrainIAC V2's code takes (MONAI's ViT has no CLS token unless asked for one)."""

    pos_embed_type: Literal["learnable", "sincos"] = "learnable"
    """ViT: position embedding of the patch tokens (BrainIAC V2 uses ``learnable``)."""

    qkv_bias: bool = False
    """ViT: bias in the attention's qkv projection (MONAI's default, and BrainIAC V2's, is off)."""

    dropout_rate: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))
    """ViT: dropout inside the transformer blocks."""

    flash_attention: bool = False
    """ViT: attention through ``torch.nn.functional.scaled_dot_product_attention`` (fused flash/memory-efficient
    kernels on GPU) instead of MONAI's explicit softmax(QKᵀ)V. Same weights, same maths up to rounding. Needs
    ``dropout_rate == 0``: MONAI's fused path applies attention dropout in eval mode too."""

    resnet_depth: Literal[10, 18, 34, 50] = 50
    """ResNet: depth; 10/18/34 use basic blocks (512-d features), 50 bottlenecks (2048-d, BrainIAC V1)."""

    resnet_widen_factor: float = field(default=1.0, metadata=bounds(gt=0.0, le=4.0))
    """ResNet: multiplies every stage's width (0.25 gives a tiny net for tests)."""

    conv1_t_size: int = field(default=7, metadata=bounds(ge=1))
    """ResNet: kernel size of the stem convolution."""

    conv1_t_stride: int = field(default=2, metadata=bounds(ge=1))
    """ResNet: stride of the stem convolution. MONAI's default of 1 is ~10× slower at 96³; 2 is the usual choice."""

    resnet_no_max_pool: bool = False
    """ResNet: drop the max-pool after the stem (keeps more resolution on small inputs)."""

    def __post_init__(self) -> None:
        if self.kind == "vit":
            if self.img_size % self.patch_size:
                raise ConfigError(
                    f"backbone patch_size ({self.patch_size}) must divide img_size ({self.img_size}) for the ViT"
                )
            if self.flash_attention and self.dropout_rate > 0:
                raise ConfigError(
                    "backbone flash_attention needs dropout_rate 0 (MONAI's fused path drops out in eval too)"
                )
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"backbone hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
                )

    @classmethod
    def tiny(cls, kind: Literal["vit", "resnet"] = "vit", **overrides: Any) -> BackboneConfig:
        """The tiny encoder used by tests and the quickstart: 32³ input, few channels, seconds per step on a CPU.

        The same numbers belong in the shipped ``tiny`` YAML configs; this is only a convenience for code.
        """
        values: dict[str, Any] = {
            "kind": kind,
            "img_size": 32,
            "patch_size": 16,
            "hidden_size": 48,
            "mlp_dim": 96,
            "num_layers": 2,
            "num_heads": 3,
            "resnet_depth": 10,
            "resnet_widen_factor": 0.125,
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class ProjectionConfig:
    """The projection head g(·) of SimCLR (Chen et al. 2020): an MLP whose output is used only by the loss."""

    hidden_dim: int = field(default=2048, metadata=bounds(ge=1))
    """Width of the hidden layers."""

    out_dim: int = field(default=128, metadata=bounds(ge=1))
    """Width of the embedding the contrastive loss sees (SimCLR: 128)."""

    num_layers: int = field(default=2, metadata=bounds(ge=2, le=3))
    """Linear layers in the head: 2 (SimCLR v1) or 3 (SimCLR v2)."""

    batch_norm: bool = True
    """BatchNorm after each hidden linear layer (SimCLR). Use SyncBatchNorm across ranks in the training loop."""


@dataclass
class SSLConfig:
    """The NT-Xent contrastive objective (SimCLR, Chen et al. 2020)."""

    temperature: float = field(default=0.1, metadata=bounds(gt=0.0, le=10.0))
    """Softmax temperature τ. SimCLR uses 0.1 with large batches, nnssl 0.5, MONAI's tutorial 0.05."""

    gather_distributed: bool = True
    """Gather embeddings from every rank so each anchor sees 2·world·B − 2 negatives instead of 2·B − 2. The gather's
    backward sums gradients across ranks, so gradients stay exact."""


@dataclass
class AugmentConfig:
    """Per-view random augmentation. Each view gets its own draws; ``p`` fields are per-view probabilities."""

    device: Literal["worker", "data"] = "worker"
    """Where augmentation runs: ``worker`` = batched torch ops on the training worker's device (GPU: the CPUs only
    decode and crop); ``data`` = MONAI's per-sample chain inside the Ray Data stream (CPU)."""

    affine_p: float = field(default=0.5, metadata=_PROB)
    """Probability of a random affine (rotation, scaling, translation)."""

    rotate_deg: float = field(default=15.0, metadata=bounds(ge=0.0, le=180.0))
    """Rotation about each axis drawn from [-rotate_deg, rotate_deg] degrees."""

    scale: float = field(default=0.1, metadata=bounds(ge=0.0, lt=1.0))
    """Zoom factor drawn per axis from [1 - scale, 1 + scale]."""

    translate_frac: float = field(default=0.0, metadata=bounds(ge=0.0, le=0.5))
    """Shift per axis drawn from ±translate_frac of the patch edge (crop jitter already moves the views apart)."""

    flip_p: float = field(default=0.5, metadata=_PROB)
    """Probability of flipping along each axis in ``flip_axes``."""

    flip_axes: list[int] = field(default_factory=lambda: [0], metadata=bounds(ge=0, le=2))
    """Spatial axes that may be flipped; 0 is left-right in the catalog's RAS-oriented volumes."""

    gamma_p: float = field(default=0.3, metadata=_PROB)
    """Probability of a gamma curve on the min-max range of the patch (MONAI ``RandAdjustContrast``)."""

    gamma_range: tuple[float, float] = field(default=(0.7, 1.5), metadata=bounds(gt=0.0))
    """Range the gamma exponent is drawn from."""

    contrast_p: float = field(default=0.3, metadata=_PROB)
    """Probability of a multiplicative contrast change (MONAI ``RandScaleIntensity``)."""

    contrast_range: tuple[float, float] = field(default=(0.75, 1.25), metadata=bounds(gt=0.0))
    """Range the intensity factor is drawn from."""

    bias_field_p: float = field(default=0.3, metadata=_PROB)
    """Probability of a smooth multiplicative bias field exp(Σ c·Legendre) (MONAI ``RandBiasField``)."""

    bias_field_degree: int = field(default=3, metadata=bounds(ge=1, le=5))
    """Degree of the polynomial bias field."""

    bias_field_coeff: tuple[float, float] = field(default=(0.0, 0.1))
    """Range each polynomial coefficient is drawn from."""

    gibbs_p: float = field(default=0.2, metadata=_PROB)
    """Probability of Gibbs ringing: k-space truncated to a sphere (MONAI ``RandGibbsNoise``)."""

    gibbs_alpha: tuple[float, float] = field(default=(0.0, 0.5), metadata=_PROB)
    """Range of the Gibbs strength α in [0, 1]; the k-space radius shrinks as (1 - α)."""

    noise_p: float = field(default=0.3, metadata=_PROB)
    """Probability of additive Gaussian noise."""

    noise_std: float = field(default=0.1, metadata=bounds(ge=0.0))
    """Noise standard deviation is drawn from [0, noise_std] (the volumes are z-scored)."""

    smooth_p: float = field(default=0.2, metadata=_PROB)
    """Probability of Gaussian smoothing."""

    smooth_sigma: tuple[float, float] = field(default=(0.5, 1.0), metadata=bounds(gt=0.0, le=4.0))
    """Range of the smoothing σ in voxels, drawn per axis."""

    dropout_p: float = field(default=0.2, metadata=_PROB)
    """Probability of coarse dropout (boxes set to zero)."""

    dropout_holes: tuple[int, int] = field(default=(1, 4), metadata=bounds(ge=1, le=64))
    """Range of the number of boxes."""

    dropout_size_frac: tuple[float, float] = field(default=(0.1, 0.25), metadata=bounds(gt=0.0, le=1.0))
    """Range of each box's edge as a fraction of the patch edge, drawn per axis."""

    def __post_init__(self) -> None:
        _check_interval("augment gamma_range", self.gamma_range)
        _check_interval("augment contrast_range", self.contrast_range)
        _check_interval("augment bias_field_coeff", self.bias_field_coeff)
        _check_interval("augment gibbs_alpha", self.gibbs_alpha, low=0.0)
        _check_interval("augment smooth_sigma", self.smooth_sigma)
        _check_interval("augment dropout_holes", tuple(float(v) for v in self.dropout_holes), low=1)
        _check_interval("augment dropout_size_frac", self.dropout_size_frac)
        if len(set(self.flip_axes)) != len(self.flip_axes) or any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ConfigError(f"augment flip_axes must be distinct axes among 0, 1, 2, got {self.flip_axes}")
        if not all(math.isfinite(v) for v in (*self.gamma_range, *self.contrast_range, *self.bias_field_coeff)):
            raise ConfigError("augment ranges must be finite numbers")

    def disabled(self) -> AugmentConfig:
        """A copy with every probability at zero (identity augmentation): the held-out evaluation views."""
        return replace(
            self,
            affine_p=0.0,
            flip_p=0.0,
            gamma_p=0.0,
            contrast_p=0.0,
            bias_field_p=0.0,
            gibbs_p=0.0,
            noise_p=0.0,
            smooth_p=0.0,
            dropout_p=0.0,
        )
