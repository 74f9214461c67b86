"""QC numbers of one preprocessed scan and the pass/fail rule.

A failed registration is *flagged*, never raised: the row is written with ``qc_pass = False`` and a reason, and consumers
read ``qc_pass = true``. Only voxel defects that make preprocessing meaningless (NaN/Inf, all zero, constant) raise, in
:func:`brainiac.ingestion.preprocess.core.check_voxels`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from brainiac.ingestion.preprocess.config import PreprocessConfig
    from brainiac.ingestion.preprocess.steps import BiasField

__all__ = ["assess", "dice", "fov_coverage", "noise_sigma"]

_MAD_TO_SIGMA = 1.0 / (0.6744897501960817 * math.sqrt(2.0))
"""median(|a - b|) of two independent N(0, s²) values is 0.6745·√2·s."""


def noise_sigma(native: np.ndarray, bias: BiasField, stride: int = 2) -> float:
    """Standard deviation of the scan's noise, in scanner units.

    From the background (outside the dilated Otsu head mask) when there is one: magnitude MRI noise there is Rayleigh,
    whose second moment is 2σ². Skull-stripped or zero-filled scans have no usable background (mostly exact zeros); then
    from the head itself: the median absolute difference of neighbouring voxels (robust to tissue edges). Both on every
    ``stride``-th voxel, which is plenty of samples and cheap at 1 mm.
    """
    from scipy import ndimage as ndi

    from brainiac.ingestion.preprocess.steps import from_sitk

    head = from_sitk(bias.head) > 0
    near = ndi.binary_dilation(head, iterations=2)
    idx = [
        np.minimum(np.arange(0, n, stride) // f, m - 1)
        for n, f, m in zip(native.shape, bias.factors, head.shape, strict=True)
    ]
    sub = np.asarray(native[::stride, ::stride, ::stride], dtype=np.float32)
    background = sub[~near[np.ix_(*idx)]]
    if background.size >= 1000 and np.count_nonzero(background) >= 0.5 * background.size:
        return float(np.sqrt(np.mean(np.square(background, dtype=np.float64)) / 2.0))
    inside = head[np.ix_(*idx)]
    diff = np.abs(np.diff(sub, axis=0))[inside[1:] & inside[:-1]]
    return float(np.median(diff)) * _MAD_TO_SIGMA if diff.size else float("nan")


def fov_coverage(matrix: np.ndarray, shape: tuple[int, ...], affine: np.ndarray) -> float:
    """Fraction of the template brain (every 3rd voxel of the 1 mm mask) that ``matrix`` maps inside the scan's field
    of view. A truncated scan or a registration that flew off leaves part of the brain outside."""
    from brainiac.platform.mni152 import brain_mask_1mm, mni152

    t_affine = mni152()[1]
    idx = np.argwhere(brain_mask_1mm()[::3, ::3, ::3]) * 3
    pts = idx @ t_affine[:3, :3].T + t_affine[:3, 3]
    to_voxel = np.linalg.inv(affine) @ matrix
    vox = pts @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    inside = np.all((vox > -0.5) & (vox < np.asarray(shape[:3]) - 0.5), axis=1)
    return float(inside.mean())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(a & b) / total if total else 1.0


def assess(qc: dict[str, float], cfg: PreprocessConfig) -> tuple[bool, str]:
    """Apply the QC rule to the numbers in ``qc``; returns (``qc_pass``, ``qc_reason``: ``""`` or ``"; "``-joined
    ``code: detail`` items, codes ``registration_metric``, ``brain_volume``, ``fov_coverage``, ``flat_intensity``,
    ``mask_disagreement`` (a learned mask's Dice to the atlas mask below ``cfg.qc_min_mask_dice``); the caller adds
    ``registration_error`` when ITK gave up and ``brain_mask_error`` when the network found no brain)."""
    reasons = []
    metric = qc["registration_metric"]
    if not metric <= cfg.qc_max_metric:  # NaN fails too
        reasons.append(f"registration_metric: {metric:.3f} > {cfg.qc_max_metric:g}")
    low, high = cfg.qc_brain_volume_ml
    volume = qc["brain_volume_ml"]
    if not low <= volume <= high:
        reasons.append(f"brain_volume: {volume:.0f} mL outside [{low:g}, {high:g}]")
    cover = qc["fov_coverage"]
    if not cover >= cfg.qc_min_fov_coverage:
        reasons.append(f"fov_coverage: {cover:.2f} < {cfg.qc_min_fov_coverage:g}")
    agreement = qc.get("mask_dice_atlas")
    if agreement is not None and not math.isnan(agreement) and agreement < cfg.qc_min_mask_dice:
        reasons.append(f"mask_disagreement: Dice {agreement:.3f} to the atlas mask < {cfg.qc_min_mask_dice:g}")
    if not qc["brain_std"] > 0:
        reasons.append("flat_intensity: the brain has one intensity")
    return not reasons, "; ".join(reasons)
