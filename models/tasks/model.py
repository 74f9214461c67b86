"""The task model: a pretrained (or fresh) encoder plus the head a :class:`TaskSpec` asks for, and the strategy wiring.

Classification and regression share one head: the encoder embeds each sequence of a case, the features are mean-pooled
over sequences (BrainIAC's multi-sequence tasks), then dropout and a linear layer. Segmentation is MONAI's UNETR built
on the same ViT weights. Strategies: ``scratch`` (random init), ``linear`` (the encoder actually used is frozen:
parameters, norm statistics and dropout), ``full`` (encoder with layer-wise learning-rate decay, optionally its first
blocks frozen).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from brainiac.models.backbones import Encoder, ViTEncoder, build_backbone, freeze
from brainiac.models.config import BackboneConfig
from brainiac.models.tasks.spec import TaskSpec

__all__ = ["TaskModel", "build_task_model", "encoder_layers", "encoder_of", "parameter_groups"]


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
    return model.encoder if isinstance(model, TaskModel) else cast(nn.Module, model.vit)


def _freeze_first_blocks(encoder: nn.Module, depth: int) -> None:
    """``full`` with ``freeze_depth``: patch embedding and the first ``depth`` ViT blocks stay fixed."""
    vit: Any = getattr(encoder, "vit", encoder)  # duck-typed: MONAI's ViT, or an encoder without blocks
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


def encoder_layers(encoder: nn.Module) -> tuple[dict[int, int], int]:
    """Depth of every encoder parameter (by ``id``) for layer-wise learning-rate decay, and the number of depths.

    ViT (an encoder's ``vit`` or a UNETR's ViT): patch embedding, position embedding and CLS token at 0, block ``i`` at
    ``i + 1``, the final norm at ``num_blocks + 1`` (it feeds the head directly). ResNet: stem (conv1, bn1) at 0,
    ``layer1..layer4`` at 1..4, the rest at 5. Anything else: one depth. Returns ``(depths, top)``, ``top`` being the
    highest depth, the one that :func:`parameter_groups` trains at the encoder's full rate.
    """
    vit: Any = getattr(encoder, "vit", encoder)  # duck-typed: MONAI's ViT, a ResNet or anything else
    if hasattr(vit, "blocks") and hasattr(vit, "patch_embedding"):
        blocks = len(vit.blocks)
        depth_of = {}
        for name, p in vit.named_parameters():
            if name.startswith(("patch_embedding.", "cls_token")):
                depth_of[id(p)] = 0
            elif name.startswith("blocks."):
                depth_of[id(p)] = int(name.split(".")[1]) + 1
            else:
                depth_of[id(p)] = blocks + 1
        # Parameters of the encoder outside its ViT (none today) train like the final norm.
        top = blocks + 1
        return {**{id(p): top for p in encoder.parameters()}, **depth_of}, top
    net = getattr(encoder, "net", None)
    if net is not None and hasattr(net, "layer4"):
        depth_of = {}
        for name, p in encoder.named_parameters():
            stage = name.split(".")[1] if name.startswith("net.") else ""
            depth_of[id(p)] = {"conv1": 0, "bn1": 0, "layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}.get(stage, 5)
        return depth_of, 5
    return {id(p): 1 for p in encoder.parameters()}, 1


def parameter_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    encoder_lr_mult: float,
    strategy: str,
    layer_decay: float = 1.0,
) -> list[dict]:
    """Optimiser groups: the head (or decoder) at ``lr``; under ``full`` the encoder with layer-wise decay.

    ``full``: a parameter at depth ``d`` of the encoder (:func:`encoder_layers`: patch embedding lowest, the last
    block and final norm highest) trains at ``lr · encoder_lr_mult · layer_decay ** (top - d)`` (BEiT's layer-wise
    learning-rate decay, Bao et al. 2022; used by MAE and DINOv2 fine-tuning): the generic early features the
    pretraining learned move least, the task-specific top most. ``scratch`` trains every parameter at ``lr`` (no
    pretrained features to preserve); ``linear`` only the head. Each group records its encoder ``depth`` (-1 for the
    head, and for the whole encoder under ``scratch``).

    Frozen parameters are left out entirely, so no optimiser can move them (weight decay included).
    """
    encoder = encoder_of(model)
    encoder_ids = {id(p) for p in encoder.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [{"params": head, "lr": lr, "weight_decay": weight_decay, "depth": -1}]
    if strategy == "linear":
        return groups
    if strategy != "full":
        enc = [p for p in encoder.parameters() if p.requires_grad]
        if enc:
            groups.append({"params": enc, "lr": lr, "weight_decay": weight_decay, "depth": -1})
        return groups
    depth_of, top = encoder_layers(encoder)
    by_depth: dict[int, list] = {}
    for p in encoder.parameters():
        if p.requires_grad:
            by_depth.setdefault(depth_of[id(p)], []).append(p)
    for depth in sorted(by_depth):
        scale = encoder_lr_mult * layer_decay ** (top - depth)
        groups.append({"params": by_depth[depth], "lr": lr * scale, "weight_decay": weight_decay, "depth": depth})
    return groups
