"""One decoded scan in, model-ready arrays and QC numbers out: :func:`preprocess_scan`.

Pure and single-scan: no I/O, no Ray, no catalog. The Ray job decodes a scan, calls this, and writes the result; it runs on
one thread by default (``threads=1``) because Ray parallelises across scans.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brainiac.ingestion.preprocess.config import PreprocessConfig

__all__ = ["PreprocessResult", "VoxelDefect", "check_voxels", "preload", "preprocess_scan"]


class VoxelDefect(Exception):
    """A defect that only decoding reveals and that makes the scan unusable: it belongs in ``quarantine``.

    Attributes:
        reason: a short code, one of :attr:`REASONS`.
        detail: one human-readable line.
    """

    REASONS = ("nonfinite_voxels", "all_zero", "constant")

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown voxel defect reason {reason!r}; expected one of {self.REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across Ray workers
        return type(self), (self.reason, self.detail)


@dataclass
class PreprocessResult:
    """Model-ready outputs of one scan. Every array is indexed (i, j, k) on a template-space (MNI152 RAS mm) grid that is
    the same for every scan of a config."""

    whole: np.ndarray
    """float16 whole-brain crop at ``cfg.whole_spacing_mm``: z-scored over the brain, 0 outside it (by default)."""
    whole_affine: np.ndarray
    """4x4 voxel → MNI152 RAS mm of ``whole``, ``mask`` and ``labels_whole``."""
    fixed: np.ndarray
    """float16 ``cfg.fixed_size``³ cube of the brain box (isotropic voxels), normalised like ``whole``."""
    fixed_affine: np.ndarray
    """4x4 voxel → MNI152 RAS mm of ``fixed``, ``fixed_mask`` and ``labels_fixed``."""
    mask: np.ndarray
    """uint8 brain mask (0/1) on the ``whole`` grid, made by ``cfg.brain_mask`` (the atlas mask when a learned method
    failed on this scan; ``transform["brain_mask"]`` says which)."""
    fixed_mask: np.ndarray
    """uint8 brain mask on the ``fixed`` grid."""
    labels_whole: dict[str, np.ndarray] = field(default_factory=dict)
    """uint8 label maps on the ``whole`` grid (nearest-neighbour: label values are never mixed)."""
    labels_fixed: dict[str, np.ndarray] = field(default_factory=dict)
    """uint8 label maps on the ``fixed`` grid."""
    transform: dict[str, Any] = field(default_factory=dict)
    """How the outputs were sampled from the scan: ``kind`` (rigid | affine), ``matrix`` (16 floats, row-major: MNI152
    RAS mm → scanner RAS mm; output voxel x takes the scan's value at ``matrix @ affine @ x``), ``parameters`` and
    ``center`` (SimpleITK Euler3D or Affine parameters about that centre, in the same RAS frame), ``affine_matrix`` and
    ``affine_parameters`` (the full affine fit that places the brain mask), and ``frame``/``template`` names.
    :func:`brainiac.ingestion.preprocess.steps.to_native` maps any output grid volume back to the scan's grid."""
    qc: dict[str, Any] = field(default_factory=dict)
    """``registration_metric`` (final Mattes MI), ``brain_volume_ml``, ``snr``, ``clipped_fraction``, ``fov_coverage``,
    ``affine_scale`` (cube root of the affine's determinant), ``brain_mean``/``brain_std`` (bias-corrected intensity
    before the z-score), ``qc_pass`` and ``qc_reason``. ``brain_volume_ml`` is the volume of ``mask`` (with a learned
    ``cfg.brain_mask``, the intracranial volume it implies); a learned method adds ``atlas_volume_ml`` and
    ``mask_dice_atlas`` (Dice of ``mask`` to the atlas mask on the ``whole`` grid; NaN when the method failed)."""
    timings_s: dict[str, float] = field(default_factory=dict)
    """Wall seconds per step: ``reorient``, ``n4``, ``registration``, ``brain_mask`` (learned methods only),
    ``resample``, ``normalise``, ``qc``."""
    preprocess_version: str = ""
    """``cfg.version()``."""


def check_voxels(data: np.ndarray) -> None:
    """Raise :class:`VoxelDefect` for NaN/Inf voxels, an all-zero volume or a constant one (nothing to register)."""
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(data.size - np.count_nonzero(finite))
            raise VoxelDefect("nonfinite_voxels", f"{bad} of {data.size} voxels are NaN or infinite")
    if not np.any(data):
        raise VoxelDefect("all_zero", f"every voxel of the {'x'.join(map(str, data.shape))} volume is zero")
    first = data.flat[0]
    if np.all(data == first):
        raise VoxelDefect("constant", f"every voxel of the {'x'.join(map(str, data.shape))} volume is {first}")


def preload(cfg: PreprocessConfig) -> None:
    """Load and cache the template images ``cfg`` needs (~1 s once per process) and its learned brain-mask network,
    e.g. when a Ray worker starts, so the first scan's timings are not inflated."""
    from brainiac.ingestion.preprocess.template import (
        fixed_grid,
        registration_template,
        template_mask_image,
        whole_grid,
    )

    registration_template(cfg.registration_spacing_mm)
    template_mask_image()
    whole_grid(cfg.whole_spacing_mm, cfg.margin_mm)
    fixed_grid(cfg.fixed_size, cfg.fixed_spacing_mm, cfg.margin_mm)
    from brainiac.ingestion.preprocess.brain_mask import preload as preload_network

    for method in sorted(cfg.mask_methods() - {"atlas"}):
        preload_network(dataclasses.replace(cfg, brain_mask=method))


@contextlib.contextmanager
def _sitk_threads(threads: int) -> Iterator[None]:
    import SimpleITK as sitk

    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


def _label_uint8(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"label map {name!r} must be 3-D, got shape {array.shape}")
    integer = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_)
    if not integer and (not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array))):
        raise ValueError(f"label map {name!r} has non-integer values; label maps hold integer codes")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"label map {name!r} has values outside 0..255 ({array.min()}..{array.max()})")
    return array.astype(np.uint8, copy=False)


def preprocess_scan(
    data: np.ndarray,
    affine: np.ndarray,
    cfg: PreprocessConfig,
    labels: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    *,
    threads: int = 1,
) -> PreprocessResult:
    """Preprocess one decoded scan into model-ready arrays (issue 5).

    Steps: reorient to RAS by axis permutation and flips (no interpolation); N4 bias field fitted on a block-averaged copy;
    rotation search + rigid + affine Mattes-MI registration to the MNI152 2009 T1 template with its brain mask as the
    fixed-image mask; brain mask = the template mask carried through the affine fit (``cfg.brain_mask = "atlas"``, no
    weights) or a network's mask of the N4-corrected scan in its own space (``deepbet``, ``hd-bet``; see
    :mod:`.brain_mask`), checked against the atlas mask; one resampling of the scan (linear) and of every label map (nearest neighbour) straight onto the two
    template-space grids, with the bias field applied at output resolution; percentile clipping and z-score over the
    brain; QC numbers and a pass/fail rule.

    Args:
        data: the scan's voxels (3-D, or 4-D with one volume), any numeric dtype, indexed like its NIfTI.
        affine: 4x4 voxel → scanner RAS mm (the NIfTI affine as stored; any orientation).
        cfg: the settings; ``cfg.version()`` identifies the output.
        labels: optional label maps, name → (integer array, its own 4x4 affine), e.g. a BraTS ``seg`` (0, 1, 2, 4) or a
            lesion mask; carried through the same transform with nearest-neighbour interpolation.
        threads: SimpleITK and torch threads (1: Ray parallelises across scans).

    Returns:
        A :class:`PreprocessResult`. A failed registration sets ``qc["qc_pass"] = False`` with a reason; it does not raise.

    Raises:
        VoxelDefect: NaN/Inf voxels, an all-zero or a constant volume.
        ValueError: wrong shapes (not 3-D, affine not 4x4 or singular) or label maps that are not integer codes.
    """
    import SimpleITK as sitk

    from brainiac.ingestion.preprocess import qc as qc_mod
    from brainiac.ingestion.preprocess import steps
    from brainiac.ingestion.preprocess.template import fixed_grid, template_mask_image, whole_grid

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    data = np.asarray(data)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"preprocess_scan expects one 3-D volume, got shape {data.shape}")
    if min(data.shape) < 2:
        raise ValueError(f"preprocess_scan needs at least 2 voxels along every axis, got shape {data.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"affine must be a finite, invertible 4x4 matrix, got shape {affine.shape}")
    check_voxels(data)
    label_maps = {name: (_label_uint8(name, arr), np.asarray(aff, dtype=np.float64)) for name, (arr, aff) in
                  (labels or {}).items()}  # fmt: skip

    with _sitk_threads(threads):
        ras, ras_affine = steps.reorient_ras(data, affine)
        image = steps.to_sitk(ras, ras_affine, np.float32)
        lap("reorient")

        bias = steps.fit_bias(image, cfg)
        lap("n4")

        moving = sitk.BinShrink(image, steps.shrink_factors(image.GetSpacing(), cfg.registration_spacing_mm))
        try:
            reg = steps.register(steps.correct(moving, bias), cfg)
            reg_error = ""
        except RuntimeError as exc:  # ITK gave up (degenerate input): flag it, keep the row, never crash the job
            reg = steps.identity_registration()
            reg_error = str(exc).strip().splitlines()[-1][:200]
        matrix = reg.rigid if cfg.transform == "rigid" else reg.affine
        to_template = np.linalg.inv(reg.affine) @ matrix  # output grid mm -> template mm, for the atlas mask
        lap("registration")

        learned, mask_error = None, ""
        if cfg.brain_mask != "atlas":
            from brainiac.ingestion.preprocess.brain_mask import learned_mask

            try:
                learned = learned_mask(steps.correct(image, bias), cfg, threads=threads)
            except (RuntimeError, ValueError, AssertionError, IndexError) as exc:  # no brain found: flag, use the atlas
                mask_error = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            lap("brain_mask")

        grids = {
            "whole": whole_grid(cfg.whole_spacing_mm, cfg.margin_mm),
            "fixed": fixed_grid(cfg.fixed_size, cfg.fixed_spacing_mm, cfg.margin_mm),
        }
        out_labels: dict[str, dict[str, np.ndarray]]  # grid → label map name → label volume on that grid
        images, masks, atlas_masks, out_labels = {}, {}, {}, {"whole": {}, "fixed": {}}
        label_images = {name: steps.to_sitk(arr, aff) for name, (arr, aff) in label_maps.items()}
        for key, grid in grids.items():
            img = steps.resample(image, grid.shape, grid.affine, matrix)
            if bias.log_field is not None:
                log_field = steps.resample(bias.log_field, grid.shape, grid.affine, matrix, extrapolate=True)
                img = img * np.exp(-log_field)
            images[key] = img
            atlas_masks[key] = (
                steps.resample(
                    template_mask_image(),
                    grid.shape,
                    grid.affine,
                    to_template,
                    interpolator=sitk.sitkNearestNeighbor,
                    pixel_type=sitk.sitkUInt8,
                )
                > 0
            )
            masks[key] = (
                atlas_masks[key]
                if learned is None
                else steps.resample(learned, grid.shape, grid.affine, matrix) >= 0.5  # linear on the 0/1 mask
            )
            for name, lab in label_images.items():
                out_labels[key][name] = np.ascontiguousarray(
                    steps.resample(
                        lab,
                        grid.shape,
                        grid.affine,
                        matrix,
                        interpolator=sitk.sitkNearestNeighbor,
                        pixel_type=sitk.sitkUInt8,
                    )
                )
        lap("resample")

        whole, stats = steps.zscore(images["whole"], masks["whole"], cfg.clip_percentiles)
        fixed = np.clip(images["fixed"], stats.low, stats.high, dtype=np.float32)
        fixed = (fixed - np.float32(stats.mean)) * np.float32(1.0 / stats.std) if stats.std > 0 else fixed * 0
        if cfg.zero_outside_mask:
            whole[~masks["whole"]] = 0.0
            fixed[~masks["fixed"]] = 0.0
        whole16 = np.ascontiguousarray(whole, dtype=np.float16)
        fixed16 = np.ascontiguousarray(fixed, dtype=np.float16)
        lap("normalise")

        voxel_ml = float(np.prod(grids["whole"].spacing)) / 1000.0
        sigma = qc_mod.noise_sigma(ras, bias)
        qc: dict[str, Any] = {
            "registration_metric": reg.metric,
            "brain_volume_ml": float(np.count_nonzero(masks["whole"])) * voxel_ml,
            "snr": stats.mean / sigma if sigma > 0 else float("nan"),
            "clipped_fraction": stats.clipped_fraction,
            "fov_coverage": qc_mod.fov_coverage(reg.affine, ras.shape, ras_affine),
            "affine_scale": float(np.cbrt(np.linalg.det(reg.affine[:3, :3]))),
            "brain_mean": stats.mean,
            "brain_std": stats.std,
        }
        if cfg.brain_mask != "atlas":
            qc["atlas_volume_ml"] = float(np.count_nonzero(atlas_masks["whole"])) * voxel_ml
            qc["mask_dice_atlas"] = (
                float(qc_mod.dice(masks["whole"], atlas_masks["whole"])) if learned is not None else float("nan")
            )
        qc["qc_pass"], qc["qc_reason"] = qc_mod.assess(qc, cfg)
        extra = [f"registration_error: {reg_error}"] if reg_error else []
        extra += (
            [f"brain_mask_error: {cfg.brain_mask} failed ({mask_error}); the atlas mask was used"] if mask_error else []
        )
        if extra:
            qc["qc_pass"] = False
            qc["qc_reason"] = "; ".join(filter(None, [*extra, qc["qc_reason"]]))
        lap("qc")

    transform = {
        "kind": cfg.transform,
        "matrix": [float(v) for v in matrix.flatten()],
        "parameters": reg.rigid_parameters if cfg.transform == "rigid" else reg.affine_parameters,
        "center": reg.centre,
        "affine_matrix": [float(v) for v in reg.affine.flatten()],
        "affine_parameters": reg.affine_parameters,
        "iterations": reg.iterations,
        "frame": "RAS mm; matrix maps template to scanner",
        "template": "MNI152 2009c nonlinear symmetric T1, nilearn 1 mm",
        "brain_mask": cfg.brain_mask if not mask_error else "atlas",
    }
    return PreprocessResult(
        whole=whole16,
        whole_affine=grids["whole"].affine.copy(),
        fixed=fixed16,
        fixed_affine=grids["fixed"].affine.copy(),
        mask=np.ascontiguousarray(masks["whole"], dtype=np.uint8),
        fixed_mask=np.ascontiguousarray(masks["fixed"], dtype=np.uint8),
        labels_whole=out_labels["whole"],
        labels_fixed=out_labels["fixed"],
        transform=transform,
        qc=qc,
        timings_s=timings,
        preprocess_version=cfg.version(),
    )
