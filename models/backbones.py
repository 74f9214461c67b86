"""3-D encoders built from MONAI networks: one (B, D) feature vector per volume, plus token features for dense heads.

``build_backbone(cfg)`` returns an :class:`Encoder`:

- :class:`ViTEncoder` wraps ``monai.networks.nets.ViT`` (BrainIAC V2: ViT-B, 96³, 16³ patches). The feature is a real,
  learned CLS token prepended to the patch tokens (``pooling="cls"``) or the mean of the patch tokens (``"mean"``).
  BrainIAC V2's code takes ``features[0][:, 0]`` from a ViT built without a CLS token, i.e. the first patch token (one
  corner of the volume); this module never does.
- :class:`ResNetEncoder` wraps ``monai.networks.nets.ResNet`` (BrainIAC V1: ResNet50-3D) without its classifier; the
  feature is the global average of the last stage.

:func:`freeze` turns an encoder into a fixed feature extractor (linear probing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets import ViT
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck, get_inplanes
from torch import nn

from brainiac.models.config import BackboneConfig

__all__ = [
    "Encoder",
    "EncoderOutput",
    "ResNetEncoder",
    "ViTEncoder",
    "build_backbone",
    "freeze",
    "is_frozen",
    "vit_blocks",
]

_RESNET_LAYERS: dict[int, tuple[type[ResNetBlock] | type[ResNetBottleneck], list[int]]] = {
    10: (ResNetBlock, [1, 1, 1, 1]),
    18: (ResNetBlock, [2, 2, 2, 2]),
    34: (ResNetBlock, [3, 4, 6, 3]),
    50: (ResNetBottleneck, [3, 4, 6, 3]),
}
"""Block type and blocks per stage of MONAI's resnet10/18/34/50 factories."""


def vit_blocks(vit: ViT) -> Sequence[TransformerBlock]:
    """The transformer blocks of a MONAI ``ViT``, typed as such (``ViT.blocks`` is a plain ``nn.ModuleList``)."""
    return cast("Sequence[TransformerBlock]", vit.blocks)


@dataclass
class EncoderOutput:
    """Everything an encoder computes for a batch.

    Attributes:
        features: (B, D) the pooled feature vector, D = ``encoder.feature_dim``.
        tokens: (B, N, C) final token features in row-major order over ``grid`` (ViT: patch tokens after the final
            LayerNorm, CLS token excluded; ResNet: last-stage feature map, C = D).
        grid: the spatial arrangement of the N tokens, (n_d, n_h, n_w).
        hidden_states: intermediate outputs, one per ViT block as (B, N, C) patch tokens (the CLS token removed, the
            layout UNETR's skip connections expect) or one per ResNet stage as a (B, C, d, h, w) feature map.
    """

    features: torch.Tensor
    tokens: torch.Tensor
    grid: tuple[int, int, int]
    hidden_states: list[torch.Tensor]


class Encoder(nn.Module):
    """Base class: ``forward(x)`` maps (B, C, D, H, W) volumes to (B, feature_dim) features."""

    feature_dim: int
    """Width D of the pooled feature vector."""

    in_channels: int

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )

    def forward_features(self, x: torch.Tensor) -> EncoderOutput:
        """Pooled features, token features and intermediate outputs for ``x`` of shape (B, C, D, H, W)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) → (B, feature_dim)."""
        return self.forward_features(x).features


class ViTEncoder(Encoder):
    """MONAI ViT with a real CLS token or mean pooling (Dosovitskiy et al. 2021; BrainIAC V2 uses ViT-B at 96³).

    The MONAI network lives in ``self.vit`` with MONAI's own parameter names (``patch_embedding``, ``blocks``, ``norm``
    and, for ``pooling="cls"``, ``cls_token``), so its weights copy strictly into the segmentation UNETR's ViT
    (:mod:`brainiac.models.tasks.segmentation`), which keeps the CLS token through the blocks as here. MONAI's
    classification head is removed: the CLS token's final state is the feature.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.kind != "vit":
            raise ValueError(f"ViTEncoder needs kind='vit', got {cfg.kind!r}")
        self.in_channels = cfg.in_channels
        self.pooling = cfg.pooling
        self.img_size = cfg.img_size
        self.vit = ViT(
            in_channels=cfg.in_channels,
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            mlp_dim=cfg.mlp_dim,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            proj_type="conv",
            pos_embed_type=cfg.pos_embed_type,
            classification=cfg.pooling == "cls",
            dropout_rate=cfg.dropout_rate,
            spatial_dims=3,
            post_activation="none",
            qkv_bias=cfg.qkv_bias,
        )
        if cfg.pooling == "cls":
            # Keep MONAI's learned cls_token; drop its Linear(hidden, num_classes) head, which SSL never trains (an
            # unused parameter would also trip DDP). Without the head MONAI's forward returns every token, normed.
            del self.vit.classification_head
        for block in vit_blocks(self.vit):
            block.attn.use_flash_attention = cfg.flash_attention  # MONAI's ViT does not pass the switch through
            # MONAI builds a cross-attention LayerNorm in every block even without cross-attention. It never gets a
            # gradient (DDP would fail on it), yet UNETR's ViT has it too, so keep it in the state dict, frozen.
            if not getattr(block, "with_cross_attention", False) and hasattr(block, "norm_cross_attn"):
                block.norm_cross_attn.requires_grad_(False)
        self.patch_size = cfg.patch_size
        self.grid = (cfg.img_size // cfg.patch_size,) * 3
        self.feature_dim = cfg.hidden_size

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus position embedding, (B, C, D, H, W) → (B, N, hidden): MONAI's ``patch_embedding``
        computed as reshape + ``linear`` with the ``Conv3d``'s own parameters.

        A 16³ convolution with stride 16 is one matrix product of the flattened patches with the kernel
        (hidden, C·16³), so the ``Conv3d`` keeps its parameters (state dicts and checkpoints are unchanged) and only its
        arithmetic moves to a plain GEMM, which needs no cuDNN algorithm search. Under autocast the input is cast before
        the reshape's copy, and the fp32 position embedding is cast to the tokens' dtype, so the residual stream stays
        in bf16 instead of being promoted to fp32 by one addition.
        """
        pe = self.vit.patch_embedding
        conv = cast(nn.Conv3d, pe.patch_embeddings)  # proj_type="conv"
        p, (n_d, n_h, n_w) = self.patch_size, self.grid
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = x[:, :, : n_d * p, : n_h * p, : n_w * p]  # a strided conv ignores what does not fill a patch
        b, c = x.shape[:2]
        patches = (
            x.reshape(b, c, n_d, p, n_h, p, n_w, p)
            .permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, n_d, n_h, n_w, C, p, p, p): the kernel's (C, p, p, p) order
            .reshape(b, n_d * n_h * n_w, c * p**3)
        )
        tokens = F.linear(patches, conv.weight.flatten(1), conv.bias)
        tokens = tokens + pe.position_embeddings.to(tokens.dtype)
        return pe.dropout(tokens)

    def forward_features(self, x: torch.Tensor) -> EncoderOutput:
        self._check_input(x)
        if tuple(x.shape[2:]) != (self.img_size,) * 3:
            raise ValueError(
                f"ViTEncoder was built for {self.img_size}³ inputs, got spatial shape {tuple(x.shape[2:])} "
                f"(input shape {tuple(x.shape)})"
            )
        # MONAI's ViT.forward step by step, with the patch embedding of :meth:`embed` and the CLS token in the tokens'
        # dtype (under autocast a float32 CLS token would promote the whole concatenation, and the residual stream
        # after it, to float32).
        vit = self.vit
        h = self.embed(x)
        if hasattr(vit, "cls_token"):
            h = torch.cat([vit.cls_token.to(h.dtype).expand(h.shape[0], -1, -1), h], dim=1)
        hidden = []
        for block in vit.blocks:
            h = block(h)
            hidden.append(h)
        out = vit.norm(h)  # (B, [1 +] N, C) after the final LayerNorm
        if self.pooling == "cls":
            features, tokens = out[:, 0], out[:, 1:]
            hidden = [h[:, 1:] for h in hidden]
        else:
            tokens = out
            features = tokens.mean(dim=1)
        return EncoderOutput(features=features, tokens=tokens, grid=self.grid, hidden_states=list(hidden))


class ResNetEncoder(Encoder):
    """MONAI 3-D ResNet without its classifier (He et al. 2016; Hara et al. 2018; BrainIAC V1 uses ResNet50).

    The stem stride comes from the config (``conv1_t_stride=2`` by default, ~10× faster than MONAI's 1 at 96³).
    Uses BatchNorm: convert it to SyncBatchNorm in multi-rank training.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.kind != "resnet":
            raise ValueError(f"ResNetEncoder needs kind='resnet', got {cfg.kind!r}")
        block, layers = _RESNET_LAYERS[cfg.resnet_depth]
        self.in_channels = cfg.in_channels
        self.net = ResNet(
            block=block,
            layers=layers,
            block_inplanes=get_inplanes(),
            spatial_dims=3,
            n_input_channels=cfg.in_channels,
            conv1_t_size=cfg.conv1_t_size,
            conv1_t_stride=cfg.conv1_t_stride,
            no_max_pool=cfg.resnet_no_max_pool,
            widen_factor=cfg.resnet_widen_factor,
            feed_forward=False,
        )
        self.feature_dim = int(self.net.in_planes)  # channels of the last stage (MONAI updates in_planes as it builds)

    def forward_features(self, x: torch.Tensor) -> EncoderOutput:
        self._check_input(x)
        net = self.net
        h = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            h = net.maxpool(h)
        stages = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = layer(h)
            stages.append(h)
        features = net.avgpool(h).flatten(1)
        tokens = h.flatten(2).transpose(1, 2)
        grid = (int(h.shape[2]), int(h.shape[3]), int(h.shape[4]))
        return EncoderOutput(features=features, tokens=tokens, grid=grid, hidden_states=stages)


def build_backbone(cfg: BackboneConfig) -> Encoder:
    """Build the encoder a :class:`BackboneConfig` describes.

    Args:
        cfg: the backbone section of the config; ``BackboneConfig.tiny()`` gives the test-sized one.

    Raises:
        ValueError: for an unknown ``cfg.kind``.
    """
    if cfg.kind == "vit":
        return ViTEncoder(cfg)
    if cfg.kind == "resnet":
        return ResNetEncoder(cfg)
    raise ValueError(f"unknown backbone kind {cfg.kind!r}; expected 'vit' or 'resnet'")


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class _StayInEval:
    """Replacement ``train`` of a frozen module: it stays in eval mode whatever its parent asks for.

    A module-level class rather than a bound method so that a frozen module survives pickling (``torch.save``, Ray).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def freeze(module: nn.Module) -> nn.Module:
    """Make ``module`` a fixed feature extractor (linear probing) and return it.

    Sets ``requires_grad=False`` on every parameter and puts the module, norm layers included, in eval mode: BatchNorm
    uses (and no longer updates) its running statistics, dropout is off. The eval mode is sticky: a later
    ``parent.train()`` leaves this module in eval mode, so a training loop cannot silently resume updating BN
    statistics of a "frozen" encoder.
    """
    for p in module.parameters():
        p.requires_grad_(False)
    module.train = _StayInEval(module)  # type: ignore[method-assign]  # on purpose: an instance attribute shadows train
    module.train(False)
    return module


def is_frozen(module: nn.Module) -> bool:
    """Whether every parameter is frozen and every norm layer is in eval mode."""
    params_frozen = all(not p.requires_grad for p in module.parameters())
    norms_eval = all(not m.training for m in module.modules() if isinstance(m, _NORM_TYPES))
    return params_frozen and norms_eval
