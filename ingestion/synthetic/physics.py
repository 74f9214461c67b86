"""MR physics of the phantom: sequence contrasts, scanners (vendor scale, field strength), acquisition grids
(voxel size, orientation and axis order), rigid resampling, bias field, Rician noise and on-disk data types.

Intensities are relative (T1w white matter = 1). Vendor scale and the stored data type are nuisance: they are drawn
independently of every label, and no header field depends on image content (slopes are fixed per vendor), so headers
carry no label information.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from brainiac.ingestion.synthetic.anatomy import BaseAnatomy, triple
from brainiac.ingestion.synthetic.biology import Tissue

__all__ = [
    "LEVELS",
    "SCANNERS",
    "Acquisition",
    "Scanner",
    "acquisition_grid",
    "add_bias_and_noise",
    "quantize",
    "render",
    "resample",
]

LEVELS: dict[str, dict[str, float]] = {
    # tissue/lesion -> relative signal. T1w: WM > GM > CSF. T2w: CSF > GM > WM. FLAIR: CSF suppressed, lesions bright.
    "T1w": dict(gm=0.62, wm=1.0, csf=0.18, skull=0.06, scalp=1.05, vessel=0.5, wmh=0.78, ncr=0.25, net=0.45, et=0.55, ed=0.55),
    "T1ce": dict(gm=0.62, wm=1.0, csf=0.18, skull=0.06, scalp=1.05, vessel=1.45, wmh=0.78, ncr=0.25, net=0.48, et=1.4, ed=0.55),
    "T2w": dict(gm=0.58, wm=0.40, csf=1.0, skull=0.05, scalp=0.55, vessel=0.08, wmh=0.85, ncr=1.0, net=0.9, et=0.7, ed=0.85),
    "FLAIR": dict(gm=0.65, wm=0.48, csf=0.07, skull=0.05, scalp=0.6, vessel=0.1, wmh=1.05, ncr=0.45, net=0.9, et=0.8, ed=0.95),
    "DWI": dict(gm=0.58, wm=0.48, csf=0.12, skull=0.02, scalp=0.12, vessel=0.05, wmh=0.55, ncr=0.3, net=0.6, et=0.65, ed=0.5),
}  # fmt: skip


def render(t: Tissue, sequence: str) -> np.ndarray:
    """Noise-free template-space image of ``sequence`` from tissue fractions (a partial-volume mixture)."""
    lv = LEVELS[sequence]
    wm_level = lv["gm"] + (lv["wm"] - lv["gm"]) * t.wm_maturity
    img = (
        t.gm * lv["gm"]
        + t.wm * ((1.0 - t.wmh) * wm_level + t.wmh * lv["wmh"])
        + t.csf * lv["csf"]
        + t.skull * lv["skull"]
        + t.scalp * lv["scalp"]
    )
    img = img * (1.0 - t.vessel) + t.vessel * lv["vessel"]
    if t.lesions:
        total = np.zeros_like(img)
        lesion_img = np.zeros_like(img)
        over = t.lesion_levels.get(sequence, {})
        for name, frac in t.lesions.items():
            total += frac
            lesion_img += frac * over.get(name, lv.get(name, 0.0))
        total = np.clip(total, 0.0, 1.0)
        img = img * (1.0 - total) + lesion_img
    return img.astype(np.float32)


@dataclass(frozen=True)
class Scanner:
    """A site's scanner. ``scale`` maps relative signal to stored values; ``slope`` is the NIfTI scl_slope (or DICOM
    RescaleSlope) this vendor writes, fixed per vendor, never derived from the image."""

    vendor: str
    manufacturer: str
    model: str
    field_t: float
    scale: float
    slope: float

    @property
    def noise_sd(self) -> float:
        """Rician noise sd relative to T1w WM (1.5 T has lower SNR than 3 T)."""
        return 0.045 if self.field_t < 2 else 0.025

    @property
    def bias_amplitude(self) -> float:
        """Peak log-amplitude of the multiplicative bias field (stronger at 3 T)."""
        return 0.12 if self.field_t < 2 else 0.25


SCANNERS: tuple[Scanner, ...] = (
    Scanner("Siemens", "SIEMENS", "Prisma", 3.0, 800.0, 1.0),
    Scanner("Siemens", "SIEMENS", "Avanto", 1.5, 800.0, 1.0),
    Scanner("GE", "GE MEDICAL SYSTEMS", "DISCOVERY MR750", 3.0, 2000.0, 1.0),
    Scanner("GE", "GE MEDICAL SYSTEMS", "Optima MR450w", 1.5, 2000.0, 1.0),
    Scanner("Philips", "Philips Medical Systems", "Ingenia", 3.0, 3000.0, 0.4),
    Scanner("Philips", "Philips Medical Systems", "Achieva", 1.5, 3000.0, 0.4),
)

AXCODES = ("RAS", "LAS", "LPS", "RPI", "PIR", "ASL", "LIP", "RSP")
"""Orientations of stored arrays: axial (RAS, LAS, LPS, RPI), sagittal (PIR, ASL) and coronal (LIP, RSP) axis orders."""


@dataclass(frozen=True)
class Acquisition:
    """An acquisition grid in scanner millimetres (RAS): voxel index -> mm via ``affine``."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    axcodes: str


def acquisition_grid(
    voxel_mm: tuple[float, float, float], axcodes: str, fov_mm: tuple[float, float, float], centre_mm: np.ndarray
) -> Acquisition:
    """Axis-aligned grid whose array axes follow ``axcodes``; the third array axis is the slice axis.

    ``fov_mm`` is given along (x, y, z) world axes; ``voxel_mm`` is (in-plane, in-plane, slice) along the array axes.
    """
    ornt = nib.orientations.axcodes2ornt(tuple(axcodes))
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    shape = []
    for ax, (world, sign) in enumerate(ornt):
        w = int(world)
        n = round(fov_mm[w] / voxel_mm[ax])
        shape.append(n)
        affine[w, ax] = sign * voxel_mm[ax]
    centre_idx = (np.array(shape) - 1) / 2.0
    affine[:3, 3] = np.asarray(centre_mm, float) - affine[:3, :3] @ centre_idx
    affine = np.round(affine, 4)
    return Acquisition(affine=affine, shape=triple(shape), voxel_mm=triple(voxel_mm), axcodes=axcodes)


def resample(vol: np.ndarray, anat: BaseAnatomy, rigid: np.ndarray, acq: Acquisition, *, order: int) -> np.ndarray:
    """Sample a subject-space volume on an acquisition grid: scanner voxel -> scanner mm -> (inverse rigid) subject mm
    -> working-grid index. ``order`` 1 (trilinear) for images, 0 (nearest) for labels and masks, never anything else."""
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (labels) or 1 (images), got {order}")
    m = np.linalg.inv(anat.affine) @ np.linalg.inv(rigid) @ acq.affine
    out = ndi.affine_transform(
        vol, m[:3, :3], offset=m[:3, 3], output_shape=acq.shape, order=order, mode="constant", cval=0.0, prefilter=False
    )
    return out


def _legendre(x: np.ndarray) -> list[np.ndarray]:
    return [np.ones_like(x), x, 1.5 * x * x - 0.5]


def add_bias_and_noise(
    img: np.ndarray, acq: Acquisition, scanner: Scanner, rng: np.random.Generator, ref_voxel_mm: float
) -> np.ndarray:
    """Multiplicative bias field (a random 2nd-order Legendre field in scanner coordinates, |log b| <= amplitude), then
    Rician noise: magnitude of a complex signal with Gaussian noise of sd ``noise_sd * sqrt(ref voxel / voxel volume)``."""
    axes = []
    for ax, n in enumerate(acq.shape):
        x = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        shape = [1, 1, 1]
        shape[ax] = n
        axes.append([p.reshape(shape) for p in _legendre(x)])
    coefs = rng.normal(0.0, 1.0, (3, 3, 3))
    coefs[0, 0, 0] = 0.0
    field = np.zeros(acq.shape, np.float32)
    for a in range(3):
        for b in range(3):
            for c in range(3):
                if a + b + c <= 2 and (a, b, c) != (0, 0, 0):
                    field += np.float32(coefs[a, b, c]) * axes[0][a] * axes[1][b] * axes[2][c]
    field *= np.float32(scanner.bias_amplitude / (float(np.abs(field).max()) or 1.0))
    sig = img * np.exp(field)
    vol = float(np.prod(acq.voxel_mm))
    sd = np.float32(scanner.noise_sd * np.sqrt(ref_voxel_mm**3 / vol))
    n1 = rng.standard_normal(acq.shape, dtype=np.float32) * sd
    n2 = rng.standard_normal(acq.shape, dtype=np.float32) * sd
    return np.sqrt((sig + n1) ** 2 + n2 * n2).astype(np.float32)


def quantize(img: np.ndarray, scanner: Scanner, dtype: str) -> tuple[np.ndarray, float]:
    """Stored array and scl_slope: int16 values ``round(signal * scale / slope)`` with the vendor's slope, or float32
    physical values with slope 1."""
    phys = img * np.float32(scanner.scale)
    if dtype == "float32":
        return np.round(phys, 2).astype(np.float32), 1.0
    stored = np.clip(np.round(phys / np.float32(scanner.slope)), 0, 32767).astype(np.int16)
    return stored, float(scanner.slope)
