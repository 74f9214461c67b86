"""Biology in template space: ageing, MCI hippocampal loss, glioma (BraTS labels) and stroke, plus the skull shell.

Every effect edits tissue fractions on the working grid of :class:`~.anatomy.BaseAnatomy` before the subject's deformation
is applied, so effects follow the subject's anatomy. The numbers below are the generative model; docs/synthetic-cohort.md
explains them and their noise.

Ageing (``brain_age`` = chronological age + N(0, 5 y), the "brain-age gap"):
    * the brain surface retreats from the skull by :func:`brain_shrink_mm` (applied by the subject's deformation;
      :func:`base_tissue` keeps the skull in place);
    * ventricles grow by ``VENT_GROWTH_MM * ((a - 20) / 70) ** 1.5`` mm of CSF around their surface (0 before 20 y);
    * cortical GM thins: a fraction ``0.35 * (a - 5) / 85`` of the GM in the outer 10 mm of the brain becomes CSF
      (weighted linearly from the surface inwards);
    * medial-temporal (hippocampal) GM loses 0.5 %/year after 55 y;
    * white-matter hyperintensities: Poisson(0.2 * (a - 50)) periventricular blobs (sigma 2.5-5 mm) after 50 y;
    * myelination: WM contrast ``1 - 0.6 * exp(-a / 4)`` of its adult value (children have less WM/GM contrast).
MCI: extra medial-temporal atrophy (hippocampus, amygdala, entorhinal/parahippocampal cortex; their GM turns to CSF,
which also widens the temporal horns): CN ~ |N(0, 0.04)|, MCI ~ N(0.32, 0.08) clipped to [0, 0.55] of that GM (the
distributions overlap, and age adds its own loss); with anatomical variation the ventricles grow by ``MCI_VENT_MM``
and the brain surface retreats by ``MCI_SHRINK_MM`` more per unit of that loss.
Glioma: see :class:`GliomaParams`. Stroke: see :class:`StrokeParams`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from brainiac.ingestion.synthetic.anatomy import BaseAnatomy, MassEffect, shrunk_distance, triple

__all__ = [
    "BRATS_LABELS",
    "GliomaParams",
    "StrokeParams",
    "Tissue",
    "add_glioma",
    "add_stroke",
    "apply_ageing",
    "base_tissue",
    "brain_shrink_mm",
    "sample_glioma",
    "sample_stroke",
    "skull_growth",
    "stroke_levels",
    "survival_days",
]

VENT_GROWTH_MM = 7.0
MCI_VENT_MM = 10.0
"""Extra ventricle growth per unit of medial-temporal loss (MCI ~0.32 -> ~3 mm, about 20 years of ageing)."""
BRAIN_SHRINK_MM = 3.0
"""Retreat of the brain surface from the skull at brain age 90 (``3 * ((a - 25) / 65) ** 1.5`` mm, 0 before 25 y)."""
MCI_SHRINK_MM = 1.5
"""Extra brain-surface retreat per unit of medial-temporal loss (MCI ~0.32 -> ~0.5 mm)."""
MAX_SHRINK_MM = 4.0
"""Cap on the retreat (whatever the ``variation``): beyond ~5 mm the atrophy map would fold at concave brain surfaces."""
BRATS_LABELS = {"NCR": 1, "ED": 2, "ET": 4}
"""BraTS 2021 label values: 1 necrotic / non-enhancing tumour core, 2 peritumoral edema, 4 enhancing tumour."""


@dataclass
class Tissue:
    """Template-space tissue fractions of one subject at one session (working grid, float32)."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    skull: np.ndarray
    scalp: np.ndarray
    vessel: np.ndarray
    wmh: np.ndarray
    """Fraction of the WM that is hyperintense on FLAIR/T2."""
    lesions: dict[str, np.ndarray] = field(default_factory=dict)
    """Lesion fractions that replace normal tissue: ``ncr``, ``net``, ``et``, ``ed`` (glioma), ``infarct`` (stroke)."""
    labels: np.ndarray | None = None
    """uint8 label map: BraTS values for glioma, 1 for a stroke lesion."""
    wm_maturity: float = 1.0
    lesion_levels: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per-sequence intensity overrides for lesions (e.g. T2-FLAIR mismatch, stroke stage)."""


def _ramp(d: np.ndarray, lo: float, hi: float, w: float) -> np.ndarray:
    """Fraction of a voxel of width ``w`` lying in the shell lo <= d < hi (linear partial volume)."""
    a = np.clip((d - lo) / w + 0.5, 0.0, 1.0)
    b = np.clip((d - hi) / w + 0.5, 0.0, 1.0)
    return (a - b).astype(np.float32)


def skull_growth(age_years: float) -> float:
    """Skull and scalp thickness of a child relative to an adult's: 0.68 at 5 y, rising linearly to 1 at 18 y."""
    return float(0.55 + 0.45 * max(0.0, min(1.0, float(age_years) / 18.0)))


def base_tissue(
    anat: BaseAnatomy, rng: np.random.Generator, *, thickness: float = 1.0, shrink_mm: float = 0.0
) -> Tissue:
    """Copy the template tissues and add a skull and scalp shell outside the brain mask (thickness drawn per subject).

    Layers outward from the brain-mask surface: CSF/dura 0-2 mm, skull 4.5-7.5 mm thick, scalp (fat and skin) 4-7 mm;
    ``thickness`` scales both (children's are thinner: :func:`skull_growth`). A superior sagittal sinus (bright on T1ce) runs along
    the midline just outside the brain. With brain atrophy of ``shrink_mm`` (applied later by the subject's deformation,
    which pulls the brain surface inwards), the layers are drawn where that deformation leaves them at their usual
    distances, so the skull stays put and the CSF gap under it widens by ``shrink_mm``.
    """
    w = anat.spacing
    skull_mm = float(rng.uniform(4.5, 7.5)) * thickness
    scalp_mm = float(rng.uniform(4.0, 7.0)) * thickness
    d = anat.dist_out
    outside = anat.mask <= 0.5
    b1, b2, b3 = (shrunk_distance(v, shrink_mm) for v in (2.0, 2.0 + skull_mm, 2.0 + skull_mm + scalp_mm))
    csf_shell = np.where(outside, _ramp(d, 0.0, b1, w), 0.0)
    skull = np.where(outside, _ramp(d, b1, b2, w), 0.0).astype(np.float32)
    scalp = np.where(outside, _ramp(d, b2, b3, w), 0.0).astype(np.float32)
    x, _, z = anat.coords
    vessel = ((np.abs(x) < max(3.0, w)) & (d > 0) & (d < b1 + 2.0) & (z > -20)).astype(np.float32)
    return Tissue(
        gm=anat.gm.copy(),
        wm=anat.wm.copy(),
        csf=(anat.csf + csf_shell).astype(np.float32),
        skull=skull,
        scalp=scalp,
        vessel=vessel,
        wmh=np.zeros(anat.shape, np.float32),
    )


def _to_csf(t: Tissue, frac_gm: np.ndarray, frac_wm: np.ndarray | None = None) -> None:
    lost = t.gm * frac_gm
    t.gm -= lost
    t.csf += lost
    if frac_wm is not None:
        lost = t.wm * frac_wm
        t.wm -= lost
        t.csf += lost


def apply_ageing(
    t: Tissue,
    anat: BaseAnatomy,
    brain_age: float,
    hippocampal_loss: float,
    rng: np.random.Generator,
    *,
    variation: float = 0.0,
) -> dict[str, float]:
    """Ventricle growth, cortical thinning, hippocampal loss (age + ``hippocampal_loss``), WMH and myelination.

    With anatomical ``variation`` > 0 the ventricles also grow with medial-temporal loss (MCI):
    ``MCI_VENT_MM * variation * hippocampal_loss`` mm more CSF around them."""
    a = float(brain_age)
    w = anat.spacing
    vent_mm = VENT_GROWTH_MM * max(0.0, min(1.0, (a - 20.0) / 70.0)) ** 1.5
    vent_mm += MCI_VENT_MM * variation * float(hippocampal_loss)
    if vent_mm > 0:
        p = np.clip((vent_mm - anat.dist_vent) / w + 0.5, 0.0, 1.0) * (anat.dist_vent > 0) * (anat.mask > 0.5)
        _to_csf(t, p, p)
    cortical = 0.35 * max(0.0, min(1.0, (a - 5.0) / 85.0))
    band = np.clip(1.0 - anat.dist_in / 10.0, 0.0, 1.0) * (anat.mask > 0.5)
    _to_csf(t, cortical * band)
    hippo = min(0.8, 0.005 * max(0.0, a - 55.0) + hippocampal_loss)
    if hippo > 0:
        _to_csf(t, hippo * anat.hippocampus)
    t.wm_maturity = float(1.0 - 0.6 * math.exp(-a / 4.0))
    n_wmh = int(rng.poisson(0.2 * max(0.0, a - 50.0)))
    if n_wmh:
        cand = np.flatnonzero(((anat.wm > 0.6) & (anat.dist_vent > 2) & (anat.dist_vent < 14)).ravel())
        picks = rng.choice(cand, size=min(n_wmh, cand.size), replace=False)
        centres = anat.coords.reshape(3, -1)[:, picks].T
        acc = np.zeros(anat.shape, np.float32)
        for c, s in zip(centres, rng.uniform(2.5, 5.0, len(centres)), strict=True):
            d2 = ((anat.coords - c.reshape(3, 1, 1, 1)) ** 2).sum(axis=0)
            acc += np.exp(-d2 / (2 * s * s)).astype(np.float32)
        t.wmh = (np.clip(acc, 0, 1) * (anat.wm > 0.3)).astype(np.float32)
    return {"ventricle_growth_mm": vent_mm, "cortical_gm_loss": cortical, "hippocampal_loss": hippo, "n_wmh": n_wmh}


def brain_shrink_mm(brain_age: float, hippocampal_loss: float, variation: float) -> float:
    """How far the brain surface retreats from the skull (mm): global atrophy with age plus a little more with
    medial-temporal loss (:data:`BRAIN_SHRINK_MM`, :data:`MCI_SHRINK_MM`), times the anatomical ``variation``."""
    age = BRAIN_SHRINK_MM * max(0.0, min(1.0, (float(brain_age) - 25.0) / 65.0)) ** 1.5
    return float(min(MAX_SHRINK_MM, variation * (age + MCI_SHRINK_MM * float(hippocampal_loss))))


def _lumpy_distance(anat: BaseAnatomy, rng: np.random.Generator, centre, radius: float, lumpiness: float) -> np.ndarray:
    """Distance to ``centre`` in units of a radius modulated by smooth noise (irregular, blob-like shapes)."""
    d = np.sqrt(((anat.coords - np.asarray(centre, np.float32).reshape(3, 1, 1, 1)) ** 2).sum(axis=0))
    noise = rng.standard_normal(tuple(max(2, s // 4) for s in anat.shape)).astype(np.float32)
    noise = ndi.gaussian_filter(noise, 1.5)
    noise /= float(np.abs(noise).max()) or 1.0
    noise = ndi.zoom(noise, [s / n for s, n in zip(anat.shape, noise.shape, strict=True)], order=1)
    noise = noise[: anat.shape[0], : anat.shape[1], : anat.shape[2]]
    return d / (radius * (1.0 + lumpiness * noise))


# ----------------------------------------------------------------------------------------------------------------------
# Glioma


@dataclass(frozen=True)
class GliomaParams:
    """One glioma. IDH-mutant tumours (50 % of cases) are frontal more often (75 % vs 25 %), enhance less often
    (20 % vs 90 %, with a thinner rim), are less often necrotic (20 % vs 90 %), have less edema and often (60 % vs
    5 %) show T2-FLAIR mismatch (the non-enhancing core is bright on T2 and dark on FLAIR). Every distribution
    overlaps between the two groups, which is the label noise: no single feature separates them."""

    idh_mutant: bool
    frontal: bool
    centre_mm: tuple[float, float, float]
    radius_mm: float
    enhancing: bool
    rim_mm: float
    necrosis_frac: float
    edema_ratio: float
    mismatch: bool
    push_mm: float = 0.0
    """Mass effect: the core (``radius_mm`` in template space) expands by ``push_mm`` and pushes the brain around it."""

    def mass_effect(self) -> MassEffect | None:
        return MassEffect(self.centre_mm, self.radius_mm, self.push_mm) if self.push_mm > 0 else None


def sample_glioma(
    rng: np.random.Generator, anat: BaseAnatomy, idh_mutant: bool, variation: float = 0.0
) -> GliomaParams:
    """Draw one glioma. With ``variation`` > 0 it has mass effect: a fraction ``variation * U(0.1, 0.3)`` of the drawn
    radius is expansion, so the core is that much smaller in template space and grows back to the drawn radius by
    pushing the brain around it (:class:`~.anatomy.MassEffect`)."""
    frontal = bool(rng.random() < (0.75 if idh_mutant else 0.25))
    radius = float(rng.uniform(12, 26) if idh_mutant else rng.uniform(12, 24))
    y = anat.coords[1]
    ok = (anat.wm > 0.5) & (anat.dist_in > 0.6 * radius) & ((y > 5) if frontal else (y <= 5))
    if not ok.any():
        ok = anat.wm > 0.5
    idx = rng.choice(np.flatnonzero(ok.ravel()))
    centre = triple(float(v) for v in np.round(anat.coords.reshape(3, -1)[:, idx], 2))
    enhancing = bool(rng.random() < (0.2 if idh_mutant else 0.9))
    necrotic = bool(rng.random() < (0.2 if idh_mutant else 0.9))
    params = GliomaParams(
        idh_mutant=idh_mutant,
        frontal=frontal,
        centre_mm=centre,
        radius_mm=radius,
        enhancing=enhancing,
        rim_mm=float(rng.uniform(1.5, 4.0) if idh_mutant else rng.uniform(2.5, 7.0)),
        necrosis_frac=float(rng.uniform(0.2, 0.7)) if necrotic else 0.0,
        edema_ratio=float(rng.uniform(1.05, 1.4) if idh_mutant else rng.uniform(1.3, 2.0)),
        mismatch=bool(rng.random() < (0.6 if idh_mutant else 0.05)),
    )
    push_frac = float(rng.uniform(0.1, 0.3)) * variation
    if push_frac > 0:
        core = radius / (1.0 + push_frac)
        params = dataclasses.replace(params, radius_mm=core, push_mm=radius - core)
    return params


def add_glioma(t: Tissue, anat: BaseAnatomy, g: GliomaParams, rng: np.random.Generator) -> dict[str, float]:
    """Write the tumour's compartments into ``t`` (fractions and BraTS labels); returns volumes in ml."""
    d = _lumpy_distance(anat, rng, g.centre_mm, g.radius_mm, 0.25)
    brain = anat.mask > 0.5
    core = (d < 1.0) & brain
    nec = core & (d < g.necrosis_frac)
    rim = core & ~nec & (d >= 1.0 - g.rim_mm / g.radius_mm) if g.enhancing else np.zeros_like(core)
    net = core & ~nec & ~rim
    edema = (d >= 1.0) & (d < g.edema_ratio) & brain & ((t.wm + t.gm) > 0.3)
    labels = np.zeros(anat.shape, np.uint8)
    labels[edema] = BRATS_LABELS["ED"]
    labels[nec | net] = BRATS_LABELS["NCR"]
    labels[rim] = BRATS_LABELS["ET"]
    t.lesions.update(
        ncr=nec.astype(np.float32), net=net.astype(np.float32), et=rim.astype(np.float32), ed=edema.astype(np.float32)
    )
    t.labels = labels
    if g.mismatch:  # T2-FLAIR mismatch: FLAIR-suppressed non-enhancing core
        t.lesion_levels.setdefault("FLAIR", {})["net"] = 0.32
    vox_ml = anat.spacing**3 / 1000.0
    return {
        "tumour_volume_ml": float((nec | net | rim).sum() * vox_ml),
        "enhancing_volume_ml": float(rim.sum() * vox_ml),
        "edema_volume_ml": float(edema.sum() * vox_ml),
    }


def survival_days(rng: np.random.Generator, g: GliomaParams, age: float, volumes: dict[str, float]) -> float:
    """log(days) = 6.1 + 0.9 IDH-mutant - 0.25 log(core ml / 30) - 0.6 enhancing fraction - 0.015 (age - 60) + N(0, 0.45).

    Medians come out near 14 months for IDH-wildtype and 3-4 years for IDH-mutant tumours.
    """
    core = max(volumes["tumour_volume_ml"], 0.5)
    enh = volumes["enhancing_volume_ml"] / core
    mu = 6.1 + 0.9 * g.idh_mutant - 0.25 * math.log(core / 30.0) - 0.6 * enh - 0.015 * (age - 60.0)
    return float(math.exp(mu + rng.normal(0.0, 0.45)))


# ----------------------------------------------------------------------------------------------------------------------
# Stroke

TERRITORIES = ("MCA", "ACA", "PCA")


def _territory(anat: BaseAnatomy, name: str, side: int) -> np.ndarray:
    x, y, z = anat.coords
    sx = side * x
    if name == "MCA":
        m = (sx > 18) & (y > -70) & (y < 35) & (z > -15) & (z < 60)
    elif name == "ACA":
        m = (sx > 2) & (sx < 20) & (y > -45) & (z > 5)
    else:  # PCA: occipital lobe and inferomedial temporal lobe
        m = (sx > 2) & (sx < 50) & ((y < -62) | ((y < -25) & (z < 2) & (sx > 12)))
    return m & (anat.mask > 0.5)


@dataclass(frozen=True)
class StrokeParams:
    """An arterial-territory infarct (MCA 60 %, PCA 25 %, ACA 15 %) whose look depends on days since onset.

    Volume ~ lognormal(median 20 ml, sigma 0.8) clipped to 2-150 ml; each lesion evolves at its own rate
    (``rate`` ~ lognormal(0, 0.35), the label noise): DWI bright first (decays with ~8 days), FLAIR brightens over ~1 day,
    T1 darkens over days, and chronic lesions cavitate towards CSF (time constant 60 days).
    """

    territory: str
    side: int
    centre_mm: tuple[float, float, float]
    radius_mm: float
    onset_days: float
    rate: float


def sample_stroke(rng: np.random.Generator, anat: BaseAnatomy, onset_days: float) -> StrokeParams:
    territory = str(rng.choice(TERRITORIES, p=[0.6, 0.15, 0.25]))
    side = int(rng.choice([-1, 1]))
    m = _territory(anat, territory, side) & ((anat.gm + anat.wm) > 0.5)
    idx = rng.choice(np.flatnonzero(m.ravel()))
    centre = triple(float(v) for v in np.round(anat.coords.reshape(3, -1)[:, idx], 2))
    vol_ml = float(np.clip(20.0 * math.exp(rng.normal(0, 0.8)), 2.0, 150.0))
    radius = (3 * vol_ml * 1000 / (4 * math.pi)) ** (1 / 3)
    return StrokeParams(
        territory=territory,
        side=side,
        centre_mm=centre,
        radius_mm=float(radius),
        onset_days=float(onset_days),
        rate=float(math.exp(rng.normal(0.0, 0.35))),
    )


def stroke_levels(s: StrokeParams, gm_level: dict[str, float], csf_level: dict[str, float]) -> dict[str, float]:
    """Per-sequence intensity of the infarct at its (rate-scaled) age; ``gm_level``/``csf_level`` are per-sequence."""
    t = s.onset_days * s.rate
    cav = 0.85 * (1.0 - math.exp(-t / 60.0))
    acute = {
        "T1w": 1.0 - 0.3 * (1.0 - math.exp(-t / 4.0)),
        "FLAIR": 1.0 + 0.7 * (1.0 - math.exp(-t / 0.7)),
        "DWI": 1.0 + 1.4 * math.exp(-t / 8.0),
        "T2w": 1.0 + 0.6 * (1.0 - math.exp(-t / 0.7)),
        "T1ce": 1.0 - 0.3 * (1.0 - math.exp(-t / 4.0)),
    }
    return {q: (1 - cav) * acute[q] * gm_level[q] + cav * csf_level[q] for q in acute}


def add_stroke(t: Tissue, anat: BaseAnatomy, s: StrokeParams, rng: np.random.Generator) -> dict[str, float]:
    d = _lumpy_distance(anat, rng, s.centre_mm, s.radius_mm, 0.35)
    lesion = (d < 1.0) & _territory(anat, s.territory, s.side) & ((t.gm + t.wm) > 0.3)
    if not lesion.any():  # never empty: at least the centre voxel
        ijk = np.round(np.linalg.inv(anat.affine) @ np.array([*s.centre_mm, 1.0]))[:3].astype(int)
        lesion[tuple(ijk)] = True
    t.lesions["infarct"] = lesion.astype(np.float32)
    t.labels = lesion.astype(np.uint8)
    return {"lesion_volume_ml": float(lesion.sum() * anat.spacing**3 / 1000.0)}
