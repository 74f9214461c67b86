"""Tumour segmentation head: MONAI UNETR whose ViT is the pretrained encoder (BrainIAC V2's segmentation model).

:func:`build_unetr` builds :class:`DepthAwareUNETR` (MONAI's ``UNETR`` decoder) and copies the pretrained
:class:`ViTEncoder`'s weights into ``unetr.vit``, strictly: the two ViTs have exactly the same keys and shapes, and any
missing, unexpected or mis-shaped key is a :class:`UserError` naming the keys.

The CLS token stays. An encoder pretrained with ``pooling="cls"`` prepended a learned CLS token that every patch token
attends to in every block, so dropping it (as MONAI's UNETR, built with ``classification=False``, does) changes what
every block computes for the patch tokens: the features the decoder saw were not the pretrained ones. Here the ViT is
built like the encoder's (CLS token prepended, no position embedding for it, exactly as in MONAI's ``ViT`` and hence
in :class:`ViTEncoder`), runs all blocks with it, and the token is stripped only afterwards, before the skip
connections and the final state are reshaped onto the patch grid (a CLS token has no place on that grid). A
``pooling="mean"`` encoder has no CLS token and neither has its UNETR.

Weights saved before the CLS token was kept (a ``vit`` state without ``cls_token``) still load with ``strict=True``:
a load pre-hook sees the key is absent and removes the token from the model, which then computes exactly what those
weights were trained with (no CLS token). Nothing is filled in or skipped silently.

MONAI's UNETR hard-codes a 16³ patch and 12 transformer blocks (its skip connections read blocks 3, 6 and 9).
:class:`DepthAwareUNETR` keeps MONAI's decoder but builds the ViT at the encoder's depth and reads the blocks at
L/4, L/2 and 3L/4 (3, 6, 9 for ViT-B, exactly MONAI's), so tiny encoders segment too; the patch must still be 16³.

The ``linear`` strategy must freeze ``unetr.vit`` itself, e.g. ``freeze(unetr.vit)`` or
``freeze_encoder(unetr)``: that is the module the forward pass uses and the optimiser sees. BrainIAC's segmentation
script froze a *separate copy* of the ViT that the UNETR never called, so its "frozen" encoder was in fact fine-tuned.
"""

from __future__ import annotations

import logging

import torch
from monai.networks.nets import UNETR
from torch import nn

from brainiac.models.backbones import Encoder, ViTEncoder, freeze, vit_blocks
from brainiac.models.config import BackboneConfig
from brainiac.platform.errors import UserError

__all__ = [
    "DepthAwareUNETR",
    "build_unetr",
    "decoder_parameters",
    "encoder_parameters",
    "freeze_encoder",
]

_log = logging.getLogger(__name__)

_UNETR_PATCH = 16


def _without_cls_token_if_saved_without(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """Load pre-hook of ``unetr.vit``: a state saved before the CLS token was kept loads as the model it came from.

    Such a state has ``vit.*`` keys but no ``vit.cls_token``; its UNETR ran the blocks on patch tokens only. Removing
    the token from the module (rather than inventing a value for it, or loading non-strictly) makes ``strict=True``
    hold and the model compute exactly what it computed when it was saved.
    """
    saved_vit = any(key.startswith(prefix) for key in state_dict)
    if "cls_token" in module._parameters and saved_vit and prefix + "cls_token" not in state_dict:
        _log.info("UNETR weights saved without a CLS token: running them as trained, without one")
        del module.cls_token


class DepthAwareUNETR(UNETR):
    """MONAI UNETR whose ViT is built like the encoder's (depth, CLS token); skips read blocks L/4, L/2 and 3L/4."""

    def __init__(self, backbone: BackboneConfig, **kwargs) -> None:
        super().__init__(**kwargs)
        from monai.networks.nets import ViT

        layers = backbone.num_layers
        self.vit = ViT(
            in_channels=backbone.in_channels, img_size=backbone.img_size, patch_size=backbone.patch_size,
            hidden_size=backbone.hidden_size, mlp_dim=backbone.mlp_dim, num_layers=layers,
            num_heads=backbone.num_heads, proj_type="conv", pos_embed_type=backbone.pos_embed_type,
            classification=backbone.pooling == "cls", dropout_rate=backbone.dropout_rate, spatial_dims=3,
            post_activation="none", qkv_bias=backbone.qkv_bias,
        )  # fmt: skip
        if hasattr(self.vit, "classification_head"):
            # As in ViTEncoder: keep the CLS token, drop MONAI's classifier on it (nothing here trains it).
            del self.vit.classification_head
        for block in vit_blocks(self.vit):
            block.attn.use_flash_attention = backbone.flash_attention  # as ViTEncoder: MONAI does not pass it through
        self.vit.register_load_state_dict_pre_hook(_without_cls_token_if_saved_without)
        self.skip_layers = (layers // 4, layers // 2, (3 * layers) // 4)

    @property
    def has_cls_token(self) -> bool:
        """Whether the blocks run with the CLS token (False for ``pooling="mean"`` and for pre-CLS saved weights)."""
        return "cls_token" in self.vit._parameters

    def vit_tokens(self, x_in: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch tokens of ``self.vit`` for (B, C, D, H, W) input: the normed final state and every block's output.

        The blocks run with the CLS token (when the encoder has one); it is stripped from every returned state, so
        each is (B, N, C) in the patch grid's row-major order, equal to :class:`ViTEncoder`'s ``tokens`` and
        ``hidden_states`` for the same weights.
        """
        x, hidden = self.vit(x_in)
        if self.has_cls_token:
            x, hidden = x[:, 1:], [h[:, 1:] for h in hidden]
        return x, hidden

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x, hidden = self.vit_tokens(x_in)
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(self.proj_feat(hidden[self.skip_layers[0]]))
        enc3 = self.encoder3(self.proj_feat(hidden[self.skip_layers[1]]))
        enc4 = self.encoder4(self.proj_feat(hidden[self.skip_layers[2]]))
        dec3 = self.decoder5(self.proj_feat(x), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))


def _fmt(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" … (+{len(keys) - limit} more)" if len(keys) > limit else "")


def build_unetr(
    encoder: Encoder, backbone: BackboneConfig, out_channels: int = 1, feature_size: int = 16
) -> DepthAwareUNETR:
    """A MONAI UNETR (instance norm, residual blocks) whose ``.vit`` holds exactly ``encoder``'s weights.

    Args:
        encoder: the pretrained (or freshly built, for ``scratch``) :class:`ViTEncoder`.
        backbone: the config ``encoder`` was built from (sizes, dropout, qkv bias, position embedding).
        out_channels: output channels of the segmentation logits (1 for a whole-tumour mask).
        feature_size: width of UNETR's convolutional decoder (BrainIAC: 16).

    Returns:
        The UNETR; the caller owns it, ``encoder`` itself is not part of it (its tensors are copied, not shared).

    Raises:
        UserError: the encoder is not a ViT, its architecture cannot feed UNETR (patch size, depth), or its weights do
            not fill ``unetr.vit`` exactly (missing/unexpected/mis-shaped keys are listed).
    """
    if not isinstance(encoder, ViTEncoder) or backbone.kind != "vit":
        raise UserError(
            f"segmentation needs a ViT encoder (model.kind: vit), got {type(encoder).__name__} with kind={backbone.kind!r}"
        )
    if backbone.patch_size != _UNETR_PATCH:
        raise UserError(
            f"MONAI UNETR hard-codes patch_size={_UNETR_PATCH}; this backbone has patch_size={backbone.patch_size}"
        )
    if out_channels < 1 or feature_size < 1:
        raise UserError(f"out_channels and feature_size must be >= 1, got {out_channels} and {feature_size}")
    unetr = DepthAwareUNETR(
        backbone,
        in_channels=backbone.in_channels,
        out_channels=out_channels,
        img_size=backbone.img_size,
        feature_size=feature_size,
        hidden_size=backbone.hidden_size,
        mlp_dim=backbone.mlp_dim,
        num_heads=backbone.num_heads,
        proj_type="conv",
        norm_name="instance",
        conv_block=True,
        res_block=True,
        dropout_rate=backbone.dropout_rate,
        spatial_dims=3,
        qkv_bias=backbone.qkv_bias,
    )
    _copy_encoder_weights(encoder, unetr)
    if backbone.pos_embed_type == "sincos":
        # UNETR always builds learnable position embeddings; the copied sin-cos table stays fixed, as in the encoder.
        unetr.vit.patch_embedding.position_embeddings.requires_grad_(False)
    for block in unetr.vit.blocks:
        # Same as ViTEncoder: the cross-attention LayerNorm never enters the forward pass (no cross-attention), so it
        # gets no gradient; freezing it keeps DDP from waiting for one.
        if not getattr(block, "with_cross_attention", False) and hasattr(block, "norm_cross_attn"):
            block.norm_cross_attn.requires_grad_(False)
    return unetr


def _copy_encoder_weights(encoder: ViTEncoder, unetr: UNETR) -> None:
    source = encoder.vit.state_dict()
    target = unetr.vit.state_dict()  # same keys as the encoder's ViT, cls_token included when it has one
    state = dict(source)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)}→{tuple(target[k].shape)}"
        for k in set(state) & set(target)
        if state[k].shape != target[k].shape
    )
    if missing or unexpected or mismatched:
        parts = [
            f"{label}: {_fmt(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        raise UserError(f"the encoder's weights do not fit UNETR's ViT ({'; '.join(parts)})")
    unetr.vit.load_state_dict(state, strict=True)


def encoder_parameters(unetr: UNETR) -> list[nn.Parameter]:
    """The parameters of the pretrained part, ``unetr.vit`` (for freezing or a lower encoder learning rate)."""
    return list(unetr.vit.parameters())


def decoder_parameters(unetr: UNETR) -> list[nn.Parameter]:
    """Every UNETR parameter outside ``unetr.vit``: the convolutional decoder and the output layer."""
    encoder_ids = {id(p) for p in unetr.vit.parameters()}
    return [p for p in unetr.parameters() if id(p) not in encoder_ids]


def freeze_encoder(unetr: UNETR) -> UNETR:
    """``linear`` strategy: freeze ``unetr.vit`` itself (sticky eval mode, no gradients) and return ``unetr``."""
    freeze(unetr.vit)
    return unetr
