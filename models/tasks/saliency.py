"""Saliency: where a task model looks (issue 7, "Evaluation, robustness, explanation").

:func:`saliency_maps` explains a model's output for each case with one of three methods:

``"gradcam"``
    MONAI's ``monai.visualize.GradCAM`` on a ResNet encoder: the deepest stage whose feature map is at least
    ``min_grid`` (4) voxels a side (``layer4`` is 1³ at 32³ and 3³ at 96³, so ``layer2`` and ``layer3`` there), one map
    per sequence, averaged.
    Grad-CAM needs a ``(B, C, d, h, w)`` feature map; MONAI's implementation cannot use a ViT's ``(B, tokens, C)``
    activations (it would average the gradients over the channel axis instead of over space, and it has no reshape
    hook for the token grid, which is only 2³ for the tiny 32³ ViT and 6³ at 96³). So for a ViT encoder and for a UNETR,
    ``"gradcam"`` falls back to ``"gradient"`` below; :func:`saliency_method` says which one a model gets.
``"gradient"``
    Input × gradient of the target, absolute value summed over sequences, smoothed by a Gaussian of ``sigma`` voxels
    (MONAI ``GaussianSmooth``). Works for every model.
``"occlusion"``
    MONAI's ``monai.visualize.OcclusionSensitivity`` (Gaussian occlusion of a ``mask_size`` cube slid over the volume;
    the S sequences are the image's channels and are occluded together). The saliency is the drop of the target score
    when a region is occluded (classification: only drops count; regression and segmentation: the absolute change).

The target is the predicted class (multiclass), the positive class (binary), the output itself (regression) or the mean
foreground logit/probability (segmentation). Maps are ``(n, D, H, W)``, non-negative, divided by their per-case maximum.

:func:`mass_ratio` measures whether saliency concentrates in a region (tumour, hippocampus) more than in random regions
of the same shape, and :func:`overlay_png` draws a map over orthogonal slices.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from brainiac.models.backbones import ResNetEncoder
    from brainiac.models.tasks.spec import TaskSpec

__all__ = ["mass_ratio", "overlay_png", "saliency_maps", "saliency_method"]

METHODS = ("gradcam", "gradient", "occlusion")


class _Target(nn.Module):
    """The model reduced to one score per case, ``(B, S, D, H, W) -> (B, 1)``: what saliency explains."""

    def __init__(self, model: nn.Module, spec: TaskSpec, class_index: int, activated: bool) -> None:
        super().__init__()
        self.model = model
        self.kind = spec.kind
        self.class_index = class_index
        self.activated = activated
        # A fresh module is in training mode; MONAI's hooks restore a wrapper's mode onto the whole model afterwards.
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.kind == "segmentation":  # (B, 1, D, H, W) logits → mean foreground logit or probability
            out = out.sigmoid() if self.activated else out
            return out.flatten(1).mean(dim=1, keepdim=True)
        if self.kind == "multiclass":
            out = out.softmax(dim=1) if self.activated else out
            return out[:, self.class_index : self.class_index + 1]
        if self.kind == "binary":
            return out[:, :1].sigmoid() if self.activated else out[:, :1]
        return out[:, :1]  # regression: the (standardised) output itself


_RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1")


def _is_conv_model(model: nn.Module) -> bool:
    from brainiac.models.backbones import ResNetEncoder
    from brainiac.models.tasks.model import TaskModel

    return isinstance(model, TaskModel) and isinstance(model.encoder, ResNetEncoder)


def _gradcam_layer(model: nn.Module, x: torch.Tensor, min_grid: int) -> str:
    """The deepest ResNet stage whose feature map is at least ``min_grid`` voxels a side for input ``x`` (name inside
    :class:`_Target`). The last stage alone is 1³ at 32³ and 3³ at 96³, too coarse to locate anything."""
    net = cast("ResNetEncoder", model.encoder).net  # saliency_method picks Grad-CAM for ResNet task models only
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        getattr(net, name).register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape))
        for name in _RESNET_STAGES
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    for name in _RESNET_STAGES:
        if min(shapes[name][2:]) >= min_grid:
            return f"model.encoder.net.{name}"
    return "model.encoder.net.layer1"


def saliency_method(model: nn.Module, method: str) -> str:
    """The method :func:`saliency_maps` actually runs for ``model`` (``"gradcam"`` on a ViT or UNETR → ``"gradient"``)."""
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "gradcam" and not _is_conv_model(model):
        return "gradient"
    return method


def _class_index(model: nn.Module, spec: TaskSpec, x: torch.Tensor) -> int:
    if spec.kind != "multiclass":
        return 0
    with torch.no_grad():
        return int(model(x).argmax(dim=1)[0])


def _smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return volume
    from monai.transforms import GaussianSmooth

    return torch.as_tensor(GaussianSmooth(sigma=sigma)(volume[None]))[0]


def _gradient_map(target: _Target, x: torch.Tensor, sigma: float) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(target(x).sum(), x)
    return _smooth((x * grad).abs().sum(dim=1)[0].detach(), sigma)


def _gradcam_map(target: _Target, x: torch.Tensor, layer: str) -> torch.Tensor:
    from monai.visualize import GradCAM

    cam = GradCAM(nn_module=target, target_layers=layer, postprocessing=lambda m: m)
    # The input carries a gradient so that a frozen (linear-probe) encoder still has one at the hooked layer.
    with torch.enable_grad():
        maps = cam(x.clone().requires_grad_(True), class_idx=0)  # (S, 1, D, H, W): one map per sequence
    return torch.as_tensor(maps).detach().mean(dim=(0, 1))


def _occlusion_map(
    target: _Target, x: torch.Tensor, spec: TaskSpec, mask_size: int, overlap: float, n_batch: int
) -> torch.Tensor:
    from monai.visualize import OcclusionSensitivity

    occlusion = OcclusionSensitivity(
        target, mask_size=mask_size, n_batch=n_batch, verbose=False, mode="gaussian", overlap=overlap, activate=False
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)  # MONAI's own
        clean = target(x)[0, 0]
        occluded, _ = occlusion(x)  # (1, 1, D, H, W): the target score with the region around each voxel occluded
    change = clean - torch.as_tensor(occluded)[0, 0]
    return change.clamp(min=0) if spec.is_classification else change.abs()


def saliency_maps(
    model: nn.Module,
    spec: TaskSpec,
    inputs: np.ndarray,
    method: str = "gradcam",
    *,
    mask_size: int = 8,
    overlap: float = 0.5,
    n_batch: int = 16,
    sigma: float = 1.5,
    min_grid: int = 4,
) -> np.ndarray:
    """Saliency maps ``(n, D, H, W)`` of ``model`` for ``inputs`` ``(n, S, D, H, W)``; float32, ≥ 0, max 1 per case.

    Args:
        method: ``"gradcam"`` (falls back to ``"gradient"`` for ViT and UNETR models, see the module docstring),
            ``"gradient"`` or ``"occlusion"``.
        mask_size, overlap, n_batch: occlusion cube side in voxels (~8 at 32³), sliding-window overlap and the number
            of occluded copies per forward pass.
        sigma: Gaussian smoothing of the gradient map, in voxels.
        min_grid: Grad-CAM uses the deepest ResNet stage with at least this many voxels a side.

    A case whose map is zero everywhere (e.g. no occlusion lowers the score) stays zero.
    """
    run = saliency_method(model, method)
    x_all = torch.as_tensor(np.asarray(inputs, dtype=np.float32))
    if x_all.ndim != 5:
        raise ValueError(f"expected inputs of shape (n, S, D, H, W), got {tuple(x_all.shape)}")
    was_training = model.training
    model.eval()
    maps = []
    layer: str | None = None
    try:
        for i in range(x_all.shape[0]):
            x = x_all[i : i + 1]
            index = _class_index(model, spec, x)
            if run == "occlusion":
                m = _occlusion_map(_Target(model, spec, index, activated=True), x, spec, mask_size, overlap, n_batch)
            elif run == "gradcam":
                layer = layer or _gradcam_layer(model, x, min_grid)
                m = _gradcam_map(_Target(model, spec, index, activated=False), x, layer)
            else:
                m = _gradient_map(_Target(model, spec, index, activated=False), x, sigma)
            m = torch.nan_to_num(m.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0)
            peak = float(m.max())
            maps.append((m / peak if peak > 0 else m).numpy())
    finally:
        model.train(was_training)
    return np.stack(maps).astype(np.float32) if maps else np.zeros((0, *x_all.shape[2:]), np.float32)


def _box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive-exclusive bounding box ``(lo, hi)`` of the non-zero voxels (the whole volume if there are none)."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return np.zeros(mask.ndim, int), np.array(mask.shape)
    return idx.min(axis=0), idx.max(axis=0) + 1


def _translate(mask: np.ndarray, offset: Sequence[int]) -> np.ndarray:
    out = np.zeros_like(mask)
    src = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(offset, mask.shape, strict=True))
    dst = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(offset, mask.shape, strict=True))
    out[dst] = mask[src]
    return out


def _fraction(saliency: np.ndarray, mask: np.ndarray) -> float:
    total = float(saliency.sum())
    return float(saliency[mask].sum()) / total if total > 0 else float("nan")


def mass_ratio(
    maps: np.ndarray,
    region_mask: np.ndarray,
    rng: np.random.Generator | int | None = None,
    *,
    brain_mask: np.ndarray | None = None,
    n_random: int = 100,
) -> float:
    """Saliency mass inside ``region_mask`` relative to random regions of the same size and shape.

    The numerator is the mean over cases of the fraction of saliency mass inside the region. The denominator is the
    same fraction for ``n_random`` random translations of the region that keep its bounding box inside the brain box
    (the bounding box of ``brain_mask``, default the whole volume), averaged over translations and cases. The
    translated region has the same voxels, so a uniform map scores 1; > 1 means saliency concentrates in the region.

    Args:
        maps: ``(D, H, W)`` or ``(n, D, H, W)`` non-negative saliency.
        region_mask: boolean ``(D, H, W)`` (shared by all cases) or ``(n, D, H, W)``.
        rng: a NumPy generator or seed for the translations.
        brain_mask: boolean ``(D, H, W)`` or ``(n, D, H, W)`` whose bounding box bounds the translations.

    Returns:
        The ratio (NaN if every map is zero or no region is given).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    maps = np.asarray(maps, dtype=np.float64)
    maps = maps[None] if maps.ndim == 3 else maps
    regions = np.broadcast_to(np.asarray(region_mask, dtype=bool), maps.shape)
    brains = np.broadcast_to(
        np.ones(maps.shape[1:], bool) if brain_mask is None else np.asarray(brain_mask, bool), maps.shape
    )
    inside, random = [], []
    for saliency, region, brain in zip(maps, regions, brains, strict=True):
        if not region.any() or saliency.sum() <= 0:
            continue
        inside.append(_fraction(saliency, region))
        box_lo, box_hi = _box(brain)
        reg_lo, reg_hi = _box(region)
        low = np.minimum(box_lo - reg_lo, 0)  # a region sticking out of the brain box may not move that way
        high = np.maximum(box_hi - reg_hi, 0)
        fractions = [
            _fraction(saliency, _translate(region, rng.integers(low, high + 1).tolist())) for _ in range(n_random)
        ]
        random.append(float(np.mean(fractions)))
    if not inside:
        return float("nan")
    baseline = float(np.mean(random))
    return float(np.mean(inside)) / baseline if baseline > 0 else float("inf")


def overlay_png(
    volume: np.ndarray,
    saliency: np.ndarray,
    path: str | Path,
    region: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """PNG of three orthogonal slices through the saliency maximum: ``volume`` in grey, ``saliency`` as a heat overlay
    (voxels below 10 % of the maximum transparent) and the contour of ``region`` if given. Returns ``path``.

    The arrays are indexed (i, j, k) on the template's RAS grid (as preprocessing writes them), so fixing axis 0, 1, 2
    gives the sagittal, coronal and axial slice, each drawn with its second in-plane axis pointing up."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    volume = np.asarray(volume, dtype=np.float32)
    saliency = np.asarray(saliency, dtype=np.float32)
    if volume.shape != saliency.shape or volume.ndim != 3:
        raise ValueError(f"volume and saliency must both be (D, H, W), got {volume.shape} and {saliency.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    centre = np.unravel_index(int(np.nanargmax(saliency)), saliency.shape)
    peak = float(np.nanmax(saliency)) or 1.0
    grey_lo, grey_hi = (float(v) for v in np.nanpercentile(volume, [0.5, 99.5]))  # one grey scale for all three
    fig = Figure(figsize=(10.5, 3.8), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    heat = None
    for axis, (ax, label) in enumerate(zip(axes, ("sagittal", "coronal", "axial"), strict=True)):
        take: list[slice | int] = [slice(None)] * 3
        take[axis] = int(centre[axis])
        image, sal = volume[tuple(take)], saliency[tuple(take)]
        ax.imshow(image.T, cmap="gray", vmin=grey_lo, vmax=grey_hi, origin="lower")
        heat = ax.imshow(
            np.ma.masked_less(sal, 0.1 * peak).T, cmap="jet", alpha=0.5, vmin=0.0, vmax=peak, origin="lower"
        )
        if region is not None:
            reg = np.asarray(region, dtype=float)[tuple(take)]
            if reg.min() != reg.max():
                ax.contour(reg.T, levels=[0.5], colors="cyan", linewidths=1.0, origin="lower")
        ax.set_title(f"{label} {centre[axis]}")
        ax.set_axis_off()
    if heat is not None:
        fig.colorbar(heat, ax=list(axes), shrink=0.8, label="saliency")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path
