"""Presets (voxel scale and sizes per ``tiny``/``small``/``full``) and the fixed generative constants of the phantom."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRESETS", "Preset", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """How coarse and how large the generated volumes are.

    Anatomy is built on a working grid at ``voxel_mm`` (block averages of the 1 mm MNI152 maps, i.e. partial volumes), and
    each acquisition samples it at a voxel size from :attr:`voxel_families` scaled by ``voxel_mm``.
    """

    name: str
    voxel_mm: float
    """Base isotropic voxel size in mm: 3 (tiny), 2 (small), 1 (full)."""
    thick_factor: float
    """Slice thickness of a thick-slice acquisition, as a multiple of ``voxel_mm`` (1x1x3 mm at full)."""
    fov_mm: tuple[float, float, float] = (192.0, 228.0, 192.0)
    """Field of view of a head acquisition along left-right, anterior-posterior, superior-inferior."""
    brats_fov_mm: tuple[float, float, float] = (240.0, 240.0, 155.0)
    """BraTS releases are 240x240x155 voxels of 1 mm in an atlas space; scaled by ``voxel_mm`` here."""
    gzip_level: int = 6
    """zlib level of .nii.gz files (fixed, and the gzip header's mtime is 0, so the bytes are reproducible)."""
    anatomy_variation: float = 1.0
    """Strength of the inter-subject anatomical variation beyond the template's (docs/synthetic-cohort.md): head shape
    (per-axis sd 4 %), children's smaller heads and thinner skulls, a coarse lobe-scale deformation (2-5 mm), brain
    atrophy that opens a CSF gap under the skull (up to 3 mm at 90 y), MCI ventricle enlargement and tumour mass
    effect. 0 gives the earlier cohort's anatomy (the 3-6 mm fine deformation and the head scale only); 1 is the default
    of every preset, because real anatomy varies and brain-extraction methods must be told apart."""

    def voxel_families(self) -> dict[str, tuple[float, float, float]]:
        """Voxel sizes (in-plane, in-plane, through-plane) in mm: isotropic, anisotropic, thick-slice."""
        v = self.voxel_mm
        return {
            "iso": (v, v, v),
            "aniso": (round(0.9 * v, 3), round(0.9 * v, 3), round(1.2 * v, 3)),
            "thick": (v, v, round(self.thick_factor * v, 3)),
        }


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", voxel_mm=3.0, thick_factor=2.0, gzip_level=1),
    "small": Preset("small", voxel_mm=2.0, thick_factor=2.5),
    "full": Preset("full", voxel_mm=1.0, thick_factor=3.0),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError naming the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError as exc:
        raise ValueError(f"unknown synth preset {name!r}; choose one of: {', '.join(PRESETS)}") from exc
