"""Import BrainIAC's official checkpoint format into a :class:`ViTEncoder`, through an explicit key map, strictly.

BrainIAC V2's checkpoint (``BrainIAC.ckpt``) is a PyTorch Lightning checkpoint: a dict whose ``"state_dict"`` holds the
weights of a MONAI ``ViT`` (ViT-B, 96³, 16³ patches, ``classification=False``, so **no CLS token**) under the prefix
``backbone.``. BrainIAC's own loader keeps the keys that start with ``backbone.``, strips it and loads them with
``strict=False``, which hid two known problems: checkpoints written with MONAI < 1.4 lack the per-block
``norm_cross_attn`` LayerNorm that newer MONAI builds, and downstream (fine-tuned) checkpoints nest the ViT one level
deeper (``backbone.backbone.*``, ``model.backbone.backbone.*``) next to a ``classifier.fc`` head. A bare state dict, or
one saved from a DDP-wrapped model (``module.``), occurs too.

The key map (:func:`map_brainiac_keys`) does, for every checkpoint key:

1. strip wrapper prefixes (:data:`WRAPPER_PREFIXES`: ``module.``, ``model.``, ``backbone.``, ``encoder.``, any number,
   any order) until a MONAI ViT key is reached (:data:`VIT_ROOTS`: ``cls_token``, ``patch_embedding.*``, ``blocks.*``,
   ``norm.*``);
2. map that MONAI ViT key ``k`` to our :class:`ViTEncoder`'s ``vit.k``;
3. a key that reaches no ViT key but starts with a known head prefix (:data:`IGNORED_HEADS`: BrainIAC's downstream
   ``classifier.``, MONAI's ``classification_head.``) is *ignored, explicitly*: listed in the map's ``ignored``;
4. anything else is unexpected.

Our keys left unfilled are missing, except the MONAI ≥ 1.4 ``blocks.N.norm_cross_attn`` LayerNorm, which never enters the
forward pass (no cross-attention) and is *filled explicitly* with the identity (weight 1, bias 0, a fresh LayerNorm)
when the checkpoint predates it (listed in ``filled``). Missing or unexpected keys, two checkpoint keys reaching the same
weight, or a shape mismatch are a :class:`UserError` that names the keys. A checkpoint without a CLS token needs
``pooling: mean``; with ``pooling: cls`` the import fails and says so, rather than pool the first patch token as
BrainIAC's code does.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from brainiac.models.backbones import ViTEncoder
from brainiac.models.config import BackboneConfig
from brainiac.platform.errors import UserError

__all__ = [
    "IGNORED_HEADS",
    "VIT_ROOTS",
    "WRAPPER_PREFIXES",
    "KeyMap",
    "brainiac_v2_backbone",
    "convert_brainiac_checkpoint",
    "import_brainiac_checkpoint",
    "map_brainiac_keys",
]

WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "model.", "backbone.", "encoder.")
"""Prefixes that wrappers put in front of the ViT's keys: DDP (``module.``), a Lightning module's attribute (``model.``,
``backbone.``, ``encoder.``), BrainIAC's ``ViTBackboneNet.backbone`` inside a downstream model (``backbone.backbone.``)."""

VIT_ROOTS: tuple[str, ...] = ("cls_token", "patch_embedding.", "blocks.", "norm.")
"""How MONAI ``ViT`` state-dict keys begin (after wrapper prefixes are stripped)."""

IGNORED_HEADS: Mapping[str, str] = {
    "classifier.": "BrainIAC downstream head (dropout + Linear(768 → k), keys classifier.fc.*)",
    "classification_head.": "MONAI ViT(classification=True) head",
}
"""Head prefixes (after wrapper prefixes) that the import drops on purpose, with the reason."""

_FILLABLE = re.compile(r"^vit\.blocks\.\d+\.norm_cross_attn\.(weight|bias)$")
"""Our keys a MONAI < 1.4 checkpoint lacks; unused without cross-attention, filled with the identity LayerNorm."""


@dataclass
class KeyMap:
    """Where each checkpoint key goes. ``ok`` is true when the import is exact (nothing missing or unexpected)."""

    mapped: dict[str, str] = field(default_factory=dict)
    """Checkpoint key → our encoder key."""
    ignored: dict[str, str] = field(default_factory=dict)
    """Checkpoint key → why it is dropped (a classification head)."""
    filled: list[str] = field(default_factory=list)
    """Our keys the checkpoint lacks that are filled with the identity (cross-attention LayerNorm, never used)."""
    missing: list[str] = field(default_factory=list)
    """Our keys no checkpoint key fills."""
    unexpected: list[str] = field(default_factory=list)
    """Checkpoint keys that map to nothing we have."""
    duplicates: list[str] = field(default_factory=list)
    """Our keys that two or more checkpoint keys reach."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.duplicates)


def brainiac_v2_backbone(**overrides: Any) -> BackboneConfig:
    """The backbone of BrainIAC V2's released checkpoint: ViT-B at 96³, 16³ patches, no CLS token (``pooling: mean``)."""
    return replace(BackboneConfig(pooling="mean"), **overrides)


def _strip_wrappers(key: str) -> str:
    rest = key
    while not (rest == "cls_token" or rest.startswith(VIT_ROOTS[1:])):
        prefix = next((p for p in WRAPPER_PREFIXES if rest.startswith(p)), None)
        if prefix is None:
            break
        rest = rest[len(prefix) :]
    return rest


def map_brainiac_keys(
    checkpoint_keys: Iterable[str], encoder_keys: Iterable[str], extra_ignored: Sequence[str] = ()
) -> KeyMap:
    """Build the key map from BrainIAC checkpoint keys to our :class:`ViTEncoder` keys (see the module docstring).

    Args:
        checkpoint_keys: keys of the checkpoint's state dict (already unwrapped from Lightning's ``"state_dict"``).
        encoder_keys: keys of the target encoder's state dict (``vit.…``).
        extra_ignored: further head prefixes (after wrapper stripping) to drop on purpose, e.g. a projection head's.
    """
    ours = list(encoder_keys)
    our_set = set(ours)
    heads = {**IGNORED_HEADS, **{p: "ignored on request" for p in extra_ignored}}
    km = KeyMap()
    reached: dict[str, list[str]] = {}
    for key in checkpoint_keys:
        rest = _strip_wrappers(key)
        is_vit = rest == "cls_token" or rest.startswith(VIT_ROOTS[1:])
        if is_vit and f"vit.{rest}" in our_set:
            km.mapped[key] = f"vit.{rest}"
            reached.setdefault(f"vit.{rest}", []).append(key)
            continue
        head = next((p for p in heads if rest.startswith(p)), None)
        if not is_vit and head is not None:
            km.ignored[key] = heads[head]
        else:
            km.unexpected.append(key)
    km.duplicates = sorted(f"{k} ← {' & '.join(v)}" for k, v in reached.items() if len(v) > 1)
    for key in ours:
        if key in reached:
            continue
        (km.filled if _FILLABLE.match(key) else km.missing).append(key)
    return km


def _fmt(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" … (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _read_state_dict(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"no BrainIAC checkpoint file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{path} holds Python objects besides tensors ({str(exc).splitlines()[0][:200]}); if you trust the file, "
            "import it with trust_pickle=True"
        ) from exc
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"cannot read {path} as a PyTorch checkpoint: {type(exc).__name__}: {exc}") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise UserError(f"{path} is not a state dict or a Lightning checkpoint with a 'state_dict'")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"the state dict in {path} has non-tensor entries: {_fmt(not_tensors)}")
    return {str(k): v for k, v in state.items()}


def import_brainiac_checkpoint(
    path: str | Path,
    backbone: BackboneConfig,
    *,
    extra_ignored: Sequence[str] = (),
    trust_pickle: bool = False,
) -> ViTEncoder:
    """Build a :class:`ViTEncoder` for ``backbone`` and fill it from BrainIAC's official checkpoint at ``path``.

    Args:
        path: a Lightning checkpoint (``{"state_dict": …}``) or a bare state dict of a MONAI ViT, keys possibly prefixed.
        backbone: the architecture the checkpoint holds; :func:`brainiac_v2_backbone` for BrainIAC V2's release. A
            checkpoint without a CLS token (BrainIAC's) needs ``pooling="mean"``.
        extra_ignored: further head prefixes to drop on purpose (after wrapper prefixes).
        trust_pickle: unpickle arbitrary objects (only for a file you trust); by default only tensors and containers.

    Raises:
        UserError: unreadable file; ``pooling="cls"`` with a checkpoint that has no CLS token; missing, unexpected,
            duplicated or mis-shaped keys (listed).
    """
    path = Path(path).expanduser()
    if backbone.kind != "vit":
        raise UserError(f"BrainIAC checkpoints hold a MONAI ViT; set model.kind: vit (got {backbone.kind!r})")
    state = _read_state_dict(path, trust_pickle)
    encoder = ViTEncoder(backbone)
    target = encoder.state_dict()
    km = map_brainiac_keys(state, target, extra_ignored)
    if "vit.cls_token" in km.missing:
        raise UserError(
            f"{path} has no CLS token (a MONAI ViT built with classification=False, as BrainIAC V2's): set "
            "model.pooling: mean; pooling: cls would have to pool an untrained token or, as BrainIAC's code does, "
            "the first patch token"
        )
    cls_unexpected = [k for k in km.unexpected if _strip_wrappers(k) == "cls_token"]
    if cls_unexpected and backbone.pooling != "cls":
        raise UserError(f"{path} has a CLS token ({cls_unexpected[0]}): set model.pooling: cls to import it")
    problems = [
        f"{label}: {_fmt(keys)}"
        for label, keys in (
            ("missing", km.missing),
            ("unexpected", km.unexpected),
            ("reached twice", km.duplicates),
        )
        if keys
    ]
    mismatched = [
        f"{src} {tuple(state[src].shape)}≠{tuple(target[dst].shape)}"
        for src, dst in km.mapped.items()
        if state[src].shape != target[dst].shape
    ]
    if mismatched:
        problems.append(f"shape mismatch: {_fmt(mismatched)}")
    if problems:
        raise UserError(
            f"BrainIAC checkpoint {path} does not match the backbone ({'; '.join(problems)}); check model.* sizes"
        )
    new_state: dict[str, torch.Tensor] = {dst: state[src].to(target[dst].dtype) for src, dst in km.mapped.items()}
    for key in km.filled:
        new_state[key] = torch.ones_like(target[key]) if key.endswith(".weight") else torch.zeros_like(target[key])
    try:
        encoder.load_state_dict(new_state, strict=True)
    except RuntimeError as exc:  # should not happen after the checks above; never a partial load
        raise UserError(f"BrainIAC checkpoint {path} does not load: {' '.join(str(exc).split())[:600]}") from exc
    return encoder


def convert_brainiac_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    backbone: BackboneConfig,
    *,
    extra_ignored: Sequence[str] = (),
    trust_pickle: bool = False,
) -> Path:
    """Import BrainIAC's checkpoint once and write our export folder (``encoder.pt`` + ``backbone.yaml``) to ``out_dir``.

    The folder then works anywhere an encoder is accepted (``--init out_dir``, :func:`~brainiac.models.export.load_encoder`).
    """
    from brainiac.models.export import save_encoder

    encoder = import_brainiac_checkpoint(path, backbone, extra_ignored=extra_ignored, trust_pickle=trust_pickle)
    return save_encoder(out_dir, encoder, backbone)
