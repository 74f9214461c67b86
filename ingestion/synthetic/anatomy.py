"""Base anatomy: MNI152 2009 tissue maps on a working grid, region masks, smooth subject deformations and rigid poses.

All anatomy lives in *template space*: MNI152 millimetres (RAS). nilearn ships the 1 mm 2009 templates offline
(197x233x189, index (i, j, k) -> (i - 98, j - 134, k - 72) mm). The working grid keeps the template's box and takes block
means of the 1 mm maps at the preset's voxel size, which is a partial-volume model of a coarser acquisition.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from scipy import ndimage as ndi

from brainiac.platform.mni_regions import HIPPOCAMPUS_PITCH_DEG, MEDIAL_TEMPORAL, ellipsoid_weight

__all__ = [
    "HEAD_CENTER_MM",
    "BaseAnatomy",
    "Deformation",
    "MassEffect",
    "base_anatomy",
    "child_head_factor",
    "deform_volume",
    "deformation_coords",
    "jacobian_determinant",
    "random_deformation",
    "random_rigid",
    "rigid_matrix",
    "shrunk_distance",
    "triple",
]

TEMPLATE_ORIGIN_MM = np.array([-98.0, -134.0, -72.0])
"""MNI mm of voxel (0, 0, 0) of nilearn's 1 mm template."""
HEAD_CENTER_MM = np.array([0.0, -17.0, 12.0])
"""Centre of the head (brain plus skull shell) in MNI mm; acquisitions centre their field of view on it."""
BRAIN_CENTER_MM = np.array([0.0, -17.0, 5.0])
"""Centre of the brain in MNI mm (BraTS-style atlas grids centre on it)."""

_T = TypeVar("_T")


def triple(values: Iterable[_T]) -> tuple[_T, _T, _T]:
    """``values``, which must be exactly three, as a 3-tuple (an (x, y, z) the type checker knows the length of)."""
    x, y, z = values
    return x, y, z


_NILEARN_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@functools.lru_cache(maxsize=1)
def _templates_1mm() -> dict[str, np.ndarray]:
    """nilearn's 1 mm MNI152 2009 maps, loaded once per process, exactly as ``nilearn.datasets.load_mni152_*`` return
    them (GM and WM rescaled to a maximum of 1; brain mask = T1 / max > 0.2). The files are read straight from nilearn's
    package data, which avoids importing ``nilearn.datasets`` (and scikit-learn, ~2.5 s)."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    folder = Path(next(iter(spec.submodule_search_locations or []))) / "datasets" / "data" if spec else None
    if folder is not None and all((folder / f).is_file() for f in _NILEARN_FILES.values()):
        raw = {k: _load_nifti(folder / f) for k, f in _NILEARN_FILES.items()}
    else:  # pragma: no cover - a nilearn that moved its data files
        from nilearn import datasets

        raw = {
            "t1": np.asarray(datasets.load_mni152_template(resolution=1).dataobj, dtype=np.float32),
            "gm": np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32),
            "wm": np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32),
        }
    out = {k: v / np.float32(v.max()) for k, v in raw.items()}
    out["mask"] = (out.pop("t1") > 0.2).astype(np.float32)
    return out


def _load_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    img = nib.load(path)
    if not isinstance(img, nib.Nifti1Image):  # nibabel types load() as the base class, which has no dataobj
        raise TypeError(f"{path} is a {type(img).__name__}, not a NIfTI-1 image")
    return np.asarray(img.dataobj, dtype=np.float32)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a.astype(np.float32, copy=True)
    pad = [(0, (-s) % f) for s in a.shape]
    a = np.pad(a, pad, mode="edge")
    s = a.shape
    return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5), dtype=np.float32)


@dataclass(frozen=True, eq=False)
class BaseAnatomy:
    """Template-space maps on the working grid (read-only arrays, shared by every subject of a preset).

    Attributes:
        spacing: working voxel size in mm (isotropic).
        affine: working-grid voxel index -> MNI mm.
        gm, wm, csf: tissue fractions inside the brain mask (CSF = mask - GM - WM, clipped at 0).
        mask: brain-mask fraction; ``mask > 0.5`` is the brain.
        dist_in / dist_out: mm from the brain-mask surface, inwards / outwards.
        dist_vent: mm from the lateral/third ventricles (0 inside them).
        hippocampus: 1 inside the medial temporal lobe ellipsoids (hippocampi, amygdalae, entorhinal and
            parahippocampal cortex: :data:`brainiac.platform.mni_regions.MEDIAL_TEMPORAL`, the region the model side
            scores saliency in too), soft at the edge; where MCI and ageing take grey matter.
        coords: MNI mm of every working voxel, shape (3, *grid).
    """

    spacing: float
    affine: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    dist_in: np.ndarray
    dist_out: np.ndarray
    dist_vent: np.ndarray
    hippocampus: np.ndarray
    coords: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return triple(self.gm.shape)


@functools.lru_cache(maxsize=3)
def base_anatomy(spacing: float) -> BaseAnatomy:
    """Template maps block-averaged to ``spacing`` mm (an integer number of mm), with distance maps and regions."""
    f = round(spacing)
    if abs(f - spacing) > 1e-6 or f < 1:
        raise ValueError(f"working spacing must be a whole number of mm, got {spacing}")
    t = _templates_1mm()
    gm, wm, mask = (_block_mean(t[k], f) for k in ("gm", "wm", "mask"))
    gm = np.minimum(gm, mask)
    wm = np.minimum(wm, np.maximum(mask - gm, 0))
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    # Crop the template box to the head (brain plus 20 mm for the skull shell): fewer voxels to warp per subject.
    inside0 = mask > 0.5
    far = ndi.distance_transform_edt(~inside0, sampling=f) > 20.0
    keep = np.argwhere(~far)
    lo, hi = keep.min(axis=0), keep.max(axis=0) + 1
    gm, wm, csf, mask = (a[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].copy() for a in (gm, wm, csf, mask))
    affine = np.eye(4)
    affine[:3, :3] *= f
    affine[:3, 3] = TEMPLATE_ORIGIN_MM + (f - 1) / 2.0 + lo * f
    shape = gm.shape
    idx = np.indices(shape, dtype=np.float32)
    coords = np.einsum("ij,j...->i...", affine[:3, :3].astype(np.float32), idx) + affine[:3, 3].astype(
        np.float32
    ).reshape(3, 1, 1, 1)
    inside = mask > 0.5
    dist_in = ndi.distance_transform_edt(inside, sampling=f).astype(np.float32)
    dist_out = ndi.distance_transform_edt(~inside, sampling=f).astype(np.float32)
    x, y, z = coords
    vent = (csf > 0.45) & inside & (np.abs(x) < 30) & (y > -45) & (y < 30) & (z > -5) & (z < 35) & (dist_in > 12)
    vent = ndi.binary_opening(vent, iterations=1) if f == 1 else vent
    dist_vent = ndi.distance_transform_edt(~vent, sampling=f).astype(np.float32)
    hippo = np.maximum.reduce(
        [ellipsoid_weight(coords, c, s, HIPPOCAMPUS_PITCH_DEG, soft_mm=max(1.0, f / 2)) for c, s in MEDIAL_TEMPORAL]
    )
    arrays = {
        "gm": gm,
        "wm": wm,
        "csf": csf,
        "mask": mask,
        "dist_in": dist_in,
        "dist_out": dist_out,
        "dist_vent": dist_vent,
        "hippocampus": hippo,
        "coords": coords,
    }
    for a in arrays.values():
        a.setflags(write=False)
    return BaseAnatomy(spacing=float(f), affine=affine, **arrays)


# ----------------------------------------------------------------------------------------------------------------------
# Subject shape: head size and shape, a smooth deformation, brain atrophy and tumour mass effect; then a rigid pose.

SHRINK_SIGMA_MM = 12.0
"""Width (Gaussian sd, mm of signed distance from the template brain surface) of the band that atrophy displaces."""
SURFACE_SMOOTH_MM = 4.0
"""Gaussian smoothing of the signed distance before its gradient is taken (the direction atrophy moves tissue)."""
MASS_TAPER_MM = (-8.0, 4.0)
"""Mass effect is full deeper than 8 mm inside the template brain surface and fades to nothing 4 mm outside it (the
inner table of the skull), so tumours push brain and ventricles, close the CSF gap, and never move the skull."""


@dataclass(frozen=True)
class Deformation:
    """Per-subject part of the backward map subject mm -> template mm (see :func:`deformation_coords`).

    ``field`` is a smooth random displacement (white noise on a 6 mm lattice, Gaussian-smoothed with sigma 12 mm) rescaled
    so that its largest magnitude inside the brain equals ``max_mm``; ``scale`` is the subject's adult linear head size
    relative to MNI152 (men ~3 % larger than women, sd 3 %) and ``shape`` per-axis factors (x, y, z) with product 1
    (long, wide or tall heads) applied on top of it.
    """

    field: np.ndarray  # (3, *working grid) displacement in mm
    max_mm: float
    scale: float
    shape: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class MassEffect:
    """A tumour pushing the brain: the template core of radius ``radius_mm`` around ``centre_mm`` expands to
    ``radius_mm + push_mm`` and the tissue around it is pushed outwards by ``push_mm * exp(-(r - R) / R)`` (R the expanded
    radius), tapered to zero at the skull (:data:`MASS_TAPER_MM`)."""

    centre_mm: tuple[float, float, float]
    radius_mm: float
    push_mm: float


def _smooth_field(
    rng: np.random.Generator, anat: BaseAnatomy, lattice_mm: float, sigma_mm: float, max_mm: float
) -> np.ndarray:
    """White noise on a ``lattice_mm`` lattice, Gaussian-smoothed (``sigma_mm``), sampled on the working grid and
    rescaled so that its largest magnitude inside the brain is ``max_mm``."""
    grid_shape = anat.shape
    extent = np.array(grid_shape) * anat.spacing
    coarse = tuple(math.ceil(e / lattice_mm) + 1 for e in extent)
    noise = rng.standard_normal((3, *coarse)).astype(np.float32)
    noise = np.stack([ndi.gaussian_filter(n, sigma_mm / lattice_mm, mode="reflect") for n in noise])
    # Sample the lattice at the working-grid points (linear interpolation of an already smooth field).
    idx = [np.arange(s, dtype=np.float32) * anat.spacing / lattice_mm for s in grid_shape]
    grid = np.meshgrid(*idx, indexing="ij", sparse=False)
    u = np.stack([ndi.map_coordinates(n, grid, order=1, mode="nearest") for n in noise])
    mag = np.sqrt((u**2).sum(axis=0))
    peak = float(mag[anat.mask > 0.5].max()) or 1.0
    u *= max_mm / peak
    return u.astype(np.float32)


@functools.lru_cache(maxsize=3)
def _periphery(anat: BaseAnatomy) -> np.ndarray:
    """Weight of the coarse deformation: 0 within 35 mm of the brain centre, rising smoothly to 1 at 75 mm. Cortical
    shape varies between people far more than the deep grey matter and medial temporal lobe do once heads are
    aligned, and a baseline that reads regional means must still find those regions."""
    r = np.sqrt(((anat.coords - BRAIN_CENTER_MM.astype(np.float32).reshape(3, 1, 1, 1)) ** 2).sum(axis=0))
    x = np.clip((r - 35.0) / 40.0, 0.0, 1.0)
    w = (x * x * (3.0 - 2.0 * x)).astype(np.float32)
    w.setflags(write=False)
    return w


def random_deformation(
    rng: np.random.Generator,
    anat: BaseAnatomy,
    max_mm: float,
    scale: float,
    shape: tuple[float, float, float] = (1.0, 1.0, 1.0),
    coarse_mm: float = 0.0,
) -> Deformation:
    """A smooth random displacement field on the working grid: a fine component (6 mm lattice, sigma 12 mm) with max
    |u| = ``max_mm`` inside the brain, plus a coarse one (12 mm lattice, sigma 30 mm: lobe-sized shape differences
    that no affine registration absorbs) with max |u| = ``coarse_mm`` before it is faded out towards the brain centre
    (:func:`_periphery`: the cortex and brain surface move, the deep structures hardly)."""
    u = _smooth_field(rng, anat, 6.0, 12.0, max_mm)
    if coarse_mm > 0:
        u = u + _smooth_field(rng, anat, 12.0, 30.0, coarse_mm) * _periphery(anat)
    return Deformation(field=u, max_mm=float(max_mm), scale=float(scale), shape=triple(float(v) for v in shape))


def child_head_factor(age_years: float, variation: float = 1.0) -> float:
    """Linear head size of a child relative to the adult it becomes: 0.90 at 5 y, 0.95 at 10 y, 1 from 18 y.

    Head circumference is ~51 cm at 5 years against ~56 cm in adults (and brain volume ~90 % of adult), so a 5-year-old
    head is about 0.9 of its adult linear size; growth slows through adolescence. ``variation`` scales the effect.
    """
    young = max(0.0, min(1.0, (18.0 - float(age_years)) / 13.0))
    return float(1.0 - 0.10 * variation * young**1.5)


def shrink_profile(s: np.ndarray | float, shrink_mm: float):
    """Backward displacement (mm, along the outward normal) that brain atrophy of ``shrink_mm`` applies at signed
    distance ``s`` from the template brain surface: a Gaussian bump of sd :data:`SHRINK_SIGMA_MM` centred on the
    surface. A subject point at ``s`` samples the template at ``s + shrink_profile(s)``."""
    return shrink_mm * np.exp(-0.5 * (np.asarray(s, dtype=np.float32) / SHRINK_SIGMA_MM) ** 2)


def shrunk_distance(s: float, shrink_mm: float) -> float:
    """Template signed distance that lands at subject signed distance ``s`` once the brain has shrunk by ``shrink_mm``:
    the skull is drawn there in template space so that it stays where it was in the subject."""
    return float(s + shrink_profile(s, shrink_mm))


@dataclass(frozen=True, eq=False)
class _ShapeFields:
    signed: np.ndarray  # smoothed signed distance to the brain surface (mm, positive outside)
    shrink: np.ndarray  # (3, *grid): Gaussian bump x gradient of the signed distance (per mm of atrophy)
    taper: np.ndarray  # mass-effect weight: 1 deep in the brain, 0 at the skull


@functools.lru_cache(maxsize=3)
def _shape_fields(anat: BaseAnatomy) -> _ShapeFields:
    signed = ndi.gaussian_filter(anat.dist_out - anat.dist_in, SURFACE_SMOOTH_MM / anat.spacing, mode="nearest")
    grad = np.stack(np.gradient(signed, anat.spacing)).astype(np.float32)
    bump = shrink_profile(signed, 1.0)
    lo, hi = MASS_TAPER_MM
    x = np.clip((hi - signed) / (hi - lo), 0.0, 1.0)
    out = _ShapeFields(
        signed=signed.astype(np.float32),
        shrink=(grad * bump).astype(np.float32),
        taper=(x * x * (3.0 - 2.0 * x)).astype(np.float32),  # smoothstep
    )
    for a in (out.signed, out.shrink, out.taper):
        a.setflags(write=False)
    return out


def _sample(field: np.ndarray, anat: BaseAnatomy, mm: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(anat.affine)
    idx = np.einsum("ij,j...->i...", inv[:3, :3].astype(np.float32), mm) + inv[:3, 3].astype(np.float32).reshape(
        3, 1, 1, 1
    )
    if field.ndim == 3:
        return ndi.map_coordinates(field, idx, order=1, mode="nearest", prefilter=False)
    return np.stack([ndi.map_coordinates(f, idx, order=1, mode="nearest", prefilter=False) for f in field])


def _mass_effect(anat: BaseAnatomy, mm: np.ndarray, mass: MassEffect) -> np.ndarray:
    """Backward radial map of a tumour's mass effect (see :class:`MassEffect`), tapered to nothing at the skull."""
    c = np.asarray(mass.centre_mm, np.float32).reshape(3, 1, 1, 1)
    d = mm - c
    r = np.sqrt((d * d).sum(axis=0))
    big = np.float32(mass.radius_mm + mass.push_mm)
    inside = np.float32(mass.radius_mm) / big
    with np.errstate(divide="ignore", invalid="ignore"):
        outside = 1.0 - np.float32(mass.push_mm) * np.exp(-(r - big) / big) / np.maximum(r, 1e-3)
    ratio = np.where(r < big, inside, outside).astype(np.float32)  # template radius / subject radius
    w = _sample(_shape_fields(anat).taper, anat, mm)
    return (mm + w * (ratio - 1.0) * d).astype(np.float32)


def deformation_coords(
    anat: BaseAnatomy,
    deformation: Deformation,
    *,
    size: tuple[float, float, float] | None = None,
    shrink_mm: float = 0.0,
    mass: MassEffect | None = None,
) -> np.ndarray:
    """Working-grid index coordinates of the template point each subject-space voxel samples.

    The backward map from subject mm ``p`` to template mm ``q`` composes, in order:

    1. head size and shape: ``p1 = c + (p - c) / size`` per axis (``size`` defaults to ``scale * shape``);
    2. the smooth random displacement: ``p2 = p1 + u(p)``;
    3. a tumour's mass effect (:class:`MassEffect`), when given;
    4. brain atrophy: ``q = p3 + shrink_mm * bump(s(p3)) * grad s(p3)``, with ``s`` the smoothed signed distance from
       the template brain surface: the brain surface retreats by ``shrink_mm`` and the CSF gap under the skull widens
       (the skull itself is drawn ``shrunk_distance`` out in template space, so it stays put).
    """
    if size is None:
        size = triple(deformation.scale * v for v in deformation.shape)
    c = HEAD_CENTER_MM.astype(np.float32).reshape(3, 1, 1, 1)
    inv_size = (1.0 / np.asarray(size, np.float32)).reshape(3, 1, 1, 1)
    q = c + (anat.coords - c) * inv_size + deformation.field
    if mass is not None and mass.push_mm > 0:
        q = _mass_effect(anat, q, mass)
    if shrink_mm > 0:
        q = q + np.float32(shrink_mm) * _sample(_shape_fields(anat).shrink, anat, q)
    inv = np.linalg.inv(anat.affine)
    return (
        np.einsum("ij,j...->i...", inv[:3, :3].astype(np.float32), q)
        + inv[:3, 3].astype(np.float32).reshape(3, 1, 1, 1)
    ).astype(np.float32)


def deform_volume(
    vol: np.ndarray, anat: BaseAnatomy, deformation: Deformation, *, order: int, coords: np.ndarray | None = None
) -> np.ndarray:
    """Warp a template-space volume into subject space (``order`` 1 for images, 0 for labels and masks)."""
    if coords is None:
        coords = deformation_coords(anat, deformation)
    out = ndi.map_coordinates(vol, coords, order=order, mode="constant", cval=0.0, prefilter=False)
    return out.astype(vol.dtype, copy=False)


def jacobian_determinant(coords: np.ndarray) -> np.ndarray:
    """Determinant of d(template index)/d(subject index) of a backward map (as from :func:`deformation_coords`);
    positive everywhere for a fold-free (diffeomorphic) map."""
    g = np.stack([np.stack(np.gradient(c)) for c in coords])  # g[i, j] = d coords_i / d x_j
    return (
        g[0, 0] * (g[1, 1] * g[2, 2] - g[1, 2] * g[2, 1])
        - g[0, 1] * (g[1, 0] * g[2, 2] - g[1, 2] * g[2, 0])
        + g[0, 2] * (g[1, 0] * g[2, 1] - g[1, 1] * g[2, 0])
    ).astype(np.float32)


def rigid_matrix(rotation_deg: tuple[float, float, float], translation_mm: tuple[float, float, float]) -> np.ndarray:
    """4x4 rigid transform: rotate about x, then y, then z (degrees) about the head centre, then translate (mm).

    It maps subject (template-space) millimetres to scanner millimetres (RAS). The rotation is about
    :data:`HEAD_CENTER_MM`, so the translation is the displacement of the head centre.
    """
    ax, ay, az = (math.radians(a) for a in rotation_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    r = rz @ ry @ rx
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = HEAD_CENTER_MM - r @ HEAD_CENTER_MM + np.asarray(translation_mm, dtype=float)
    return m


def random_rigid(rng: np.random.Generator, max_rotation_deg: float, max_translation_mm: float):
    """Rotation angles uniform in +-``max_rotation_deg`` per axis and translation uniform in +-``max_translation_mm``."""
    rot = triple(float(v) for v in np.round(rng.uniform(-max_rotation_deg, max_rotation_deg, 3), 3))
    tr = triple(float(v) for v in np.round(rng.uniform(-max_translation_mm, max_translation_mm, 3), 3))
    return rot, tr, rigid_matrix(rot, tr)
