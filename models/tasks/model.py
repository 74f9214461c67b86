"""The task model: a pretrained (or fresh) encoder plus the head a :class:`TaskSpec` asks for, and the strategy wiring.

Classification and regression share one head: the encoder embeds each sequence of a case, the features are mean-pooled
over sequences (BrainIAC's multi-sequence tasks), then dropout and a linear layer. Segmentation is MONAI's UNETR built
on the same ViT weights. Strategies: ``scratch`` (random init), ``linear`` (the encoder actually used is frozen:
parameters, norm statistics and dropout), ``full`` (encoder at a lower learning rate, optionally its first blocks frozen).
"""

from __future__ import annotations

import torch
from torch import nn

from brainiac.models.backbones import Encoder, ViTEncoder, build_backbone, freeze
from brainiac.models.config import BackboneConfig
from brainiac.models.tasks.spec import TaskSpec

__all__ = ["TaskModel", "build_task_model", "encoder_of", "parameter_groups"]


class TaskModel(nn.Module):
    """Encoder → mean over sequences → dropout → linear head. Input (B, S, D, H, W), output (B, outputs)."""

    def __init__(self, encoder: Encoder, outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.feature_dim, outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, D, H, W) → (B, F): per-sequence encoder features, mean-pooled over the S sequences."""
        b, s = x.shape[:2]
        f = self.encoder(x.reshape(b * s, 1, *x.shape[2:]))
        return f.reshape(b, s, -1).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def encoder_of(model: nn.Module) -> nn.Module:
    """The pretrained part of a task model: the encoder, or a UNETR's ViT."""
    return model.encoder if isinstance(model, TaskModel) else model.vit


def _freeze_first_blocks(encoder: nn.Module, depth: int) -> None:
    """``full`` with ``freeze_depth``: patch embedding and the first ``depth`` ViT blocks stay fixed."""
    vit = getattr(encoder, "vit", encoder)
    if depth <= 0 or not hasattr(vit, "blocks"):
        return
    freeze(vit.patch_embedding)
    if hasattr(vit, "cls_token"):
        vit.cls_token.requires_grad_(False)
    for block in list(vit.blocks)[:depth]:
        freeze(block)


def build_task_model(
    spec: TaskSpec,
    backbone: BackboneConfig,
    encoder: Encoder | None,
    strategy: str,
    *,
    dropout: float = 0.0,
    freeze_depth: int = 0,
) -> nn.Module:
    """The model for ``spec``: ``encoder`` (pretrained) or a fresh one from ``backbone`` (scratch), wired per strategy.

    Raises:
        ValueError: segmentation without a ViT encoder.
    """
    if strategy == "scratch" or encoder is None:
        encoder = build_backbone(backbone)
    if spec.kind == "segmentation":
        from brainiac.models.tasks.segmentation import build_unetr

        if not isinstance(encoder, ViTEncoder):
            raise ValueError("segmentation needs a ViT encoder (UNETR's encoder is a ViT)")
        model: nn.Module = build_unetr(encoder, backbone, out_channels=1)
    else:
        model = TaskModel(encoder, spec.num_outputs, dropout)
    if strategy == "linear":
        freeze(encoder_of(model))
    elif strategy == "full":
        _freeze_first_blocks(encoder_of(model), freeze_depth)
    return model


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, encoder_lr_mult: float, strategy: str
) -> list[dict]:
    """Optimiser groups: the head (or decoder) at ``lr``; the encoder at ``lr · encoder_lr_mult`` under ``full``.

    Frozen parameters are left out entirely, so no optimiser can move them (weight decay included).
    """
    encoder_ids = {id(p) for p in encoder_of(model).parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    enc = [p for p in encoder_of(model).parameters() if p.requires_grad]
    groups = [{"params": head, "lr": lr, "weight_decay": weight_decay}]
    if enc and strategy != "linear":
        mult = encoder_lr_mult if strategy == "full" else 1.0
        groups.append({"params": enc, "lr": lr * mult, "weight_decay": weight_decay})
    return groups
