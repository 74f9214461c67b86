"""Who is in each cohort: per-subject draws (age, sex, diagnosis, lesions, site, sessions, fake identity) from the seed.

Every draw comes from a generator keyed by (seed, cohort, subject index, purpose), so subject ``i`` of a cohort is the
same whatever the cohort size, and nuisance draws (site, scanner, voxel size, orientation, data type) never share a
stream with labels.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from brainiac.ingestion.synthetic.anatomy import BaseAnatomy, child_head_factor, triple
from brainiac.ingestion.synthetic.biology import GliomaParams, StrokeParams, sample_glioma, sample_stroke
from brainiac.ingestion.synthetic.physics import SCANNERS, Scanner

__all__ = ["COHORT_SEQUENCES", "SessionPlan", "SubjectPlan", "fake_identity", "plan_cohort", "rng_for"]

COHORT_SEQUENCES: dict[str, tuple[str, ...]] = {
    "bids": ("T1w", "T2w", "FLAIR"),
    "brats": ("T1w", "T1ce", "T2w", "FLAIR"),
    "adni": ("T1w", "FLAIR"),
    "dicom": ("T1w", "T1ce", "T2w", "FLAIR"),
    "stroke": ("T1w", "FLAIR", "DWI"),
}

FIRST_F = ("Maria", "Jennifer", "Linda", "Susan", "Aisha", "Mei", "Sofia", "Olga", "Fatima", "Emma", "Grace", "Ana")
FIRST_M = ("James", "Robert", "Ahmed", "Wei", "Carlos", "Ivan", "David", "Kwame", "Lucas", "Hiroshi", "Omar", "Paul")
LAST = (
    "Smith", "Garcia", "Nguyen", "Okafor", "Kowalski", "Johnson", "Chen", "Rossi", "Haddad", "Patel", "Müller",
    "Silva", "Kim", "Brown", "Novak", "Cohen",
)  # fmt: skip


def _key(part: object) -> int:
    return int.from_bytes(hashlib.sha256(str(part).encode()).digest()[:4], "little")


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    """An independent generator for (seed, parts...); stable across runs, platforms and numbers of subjects."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(_key(p) for p in parts)]))


@dataclass
class SessionPlan:
    label: str
    years_from_baseline: float
    date: dt.date


@dataclass
class SubjectPlan:
    """Everything drawn for one subject; the truth table is written from these fields."""

    uid: str
    cohort: str
    index: int
    cohort_id: str
    sex: str
    age_years: float
    """Chronological age at the first session, in years."""
    brain_age_gap_years: float
    diagnosis: str
    hippocampal_loss: float
    scanner: Scanner
    site: int
    sessions: list[SessionPlan]
    deform_max_mm: float
    head_scale: float
    """Adult linear head size relative to MNI152 (children's heads are smaller: :meth:`head_size`)."""
    head_shape: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Per-axis (x, y, z) shape factors with product 1, on top of ``head_scale``."""
    coarse_deform_mm: float = 0.0
    """Largest displacement of the coarse (lobe-scale) deformation inside the brain."""
    anatomy_variation: float = 0.0
    glioma: GliomaParams | None = None
    stroke: StrokeParams | None = None
    survival_days: float | None = None
    survival_censored_days: float | None = None
    resection: str = ""
    identity: dict[str, str] = field(default_factory=dict)
    """Fake but realistic PHI (DICOM cohort): name, MRN, birth date, institution."""
    duplicate_of: str = ""
    """``uid`` of the subject this one re-saves (cross-dataset duplicate), else empty."""

    def age_at(self, session: SessionPlan) -> float:
        return self.age_years + session.years_from_baseline

    def head_size(self, session: SessionPlan) -> tuple[float, float, float]:
        """Per-axis linear head size relative to MNI152 at ``session`` (children grow between sessions)."""
        s = self.head_scale * child_head_factor(self.age_at(session), self.anatomy_variation)
        return triple(round(s * v, 5) for v in self.head_shape)


def _date(rng: np.random.Generator, start: dt.date = dt.date(2010, 1, 1), span_days: int = 4000) -> dt.date:
    return start + dt.timedelta(days=int(rng.integers(0, span_days)))


def _sites(seed: int, cohort: str) -> list[Scanner]:
    rng = rng_for(seed, cohort, "sites")
    idx = rng.choice(len(SCANNERS), size=3, replace=False)
    return [SCANNERS[int(i)] for i in idx]


def fake_identity(rng: np.random.Generator, sex: str, age: float, scan_date: dt.date) -> dict[str, str]:
    first = str(rng.choice(FIRST_F if sex == "F" else FIRST_M))
    last = str(rng.choice(LAST))
    middle = chr(ord("A") + int(rng.integers(0, 26)))
    birth = scan_date - dt.timedelta(days=round(age * 365.25))
    return {
        "name": f"{last}^{first}^{middle}",
        "mrn": f"{int(rng.integers(1_000_000, 9_999_999))}",
        "birth_date": birth.strftime("%Y%m%d"),
        "institution": str(
            rng.choice(["Mercy General Hospital", "St. Luke's Medical Center", "Riverside University Hospital"])
        ),
        "referring": f"{rng.choice(LAST)}^{rng.choice(FIRST_F + FIRST_M)}",
        "accession": f"A{int(rng.integers(10_000_000, 99_999_999))}",
    }


def plan_cohort(
    seed: int, cohort: str, n: int, anat: BaseAnatomy, uid_offset: int, variation: float = 0.0
) -> list[SubjectPlan]:
    """Draw ``n`` subjects of ``cohort``; ``uid_offset`` makes subject uids unique across cohorts; ``variation`` is the
    preset's ``anatomy_variation`` (head shape, coarse deformation, tumour mass effect)."""
    sites = _sites(seed, cohort)
    ids = rng_for(seed, cohort, "ids")
    case_numbers = ids.choice(np.arange(1, max(10_000, 10 * n)), size=n, replace=False)
    plans = []
    for i in range(n):
        lab = rng_for(seed, cohort, i, "labels")
        nui = rng_for(seed, cohort, i, "nuisance")
        sex = "F" if lab.random() < 0.5 else "M"
        gap = float(lab.normal(0.0, 5.0))
        site = int(nui.integers(0, len(sites)))
        deform_max = float(nui.uniform(3.0, 6.0))
        head_scale = float(np.clip((1.017 if sex == "M" else 0.983) * nui.normal(1.0, 0.03), 0.9, 1.1))
        shp = rng_for(seed, cohort, i, "head-shape")  # its own stream: the draws above stay as they were
        log_shape = np.clip(shp.normal(0.0, 0.04, 3), -0.1, 0.1) * variation
        head_shape = triple(round(float(v), 5) for v in np.exp(log_shape - log_shape.mean()))
        coarse_mm = round(float(shp.uniform(2.0, 5.0)) * variation, 3)
        start = _date(nui)
        sessions = [SessionPlan("01", 0.0, start)]
        diagnosis, hippo, glioma, stroke = "CN", float(abs(lab.normal(0.0, 0.04))), None, None
        resection = ""
        if cohort == "bids":
            age = float(lab.uniform(5.0, 90.0))
            if nui.random() < 0.25:
                years = float(nui.uniform(1.0, 4.0))
                sessions.append(SessionPlan("02", years, start + dt.timedelta(days=round(years * 365.25))))
        elif cohort == "adni":
            age = float(lab.uniform(55.0, 90.0))
            if lab.random() < 0.5:
                diagnosis = "MCI"
                hippo = float(np.clip(lab.normal(0.32, 0.08), 0.0, 0.55))
            sessions[0].label = "bl"
            if nui.random() < 0.3:
                years = float(np.round(nui.normal(1.0, 0.05), 3))
                sessions.append(SessionPlan("m12", years, start + dt.timedelta(days=round(years * 365.25))))
        elif cohort in ("brats", "dicom"):
            mutant = bool(lab.random() < 0.5)
            age = float(np.clip(lab.normal(42, 12), 18, 80) if mutant else np.clip(lab.normal(62, 11), 25, 88))
            diagnosis = "glioma"
            glioma = sample_glioma(rng_for(seed, cohort, i, "tumour"), anat, mutant, variation)
            resection = str(lab.choice(["GTR", "STR", "NA"], p=[0.6, 0.25, 0.15]))
        elif cohort == "stroke":
            age = float(np.clip(lab.normal(67, 12), 30, 95))
            diagnosis = "stroke"
            onset = float(math.exp(lab.uniform(math.log(0.1), math.log(1500.0))))
            stroke = sample_stroke(rng_for(seed, cohort, i, "lesion"), anat, round(onset, 2))
        else:  # pragma: no cover - validated by the caller
            raise ValueError(cohort)
        plan = SubjectPlan(
            uid=f"S{uid_offset + i:05d}",
            cohort=cohort,
            index=i,
            cohort_id=str(int(case_numbers[i])),
            sex=sex,
            age_years=round(age, 2),
            brain_age_gap_years=round(gap, 2),
            diagnosis=diagnosis,
            hippocampal_loss=round(hippo, 4),
            scanner=sites[site],
            site=site,
            sessions=sessions,
            deform_max_mm=round(deform_max, 3),
            head_scale=round(head_scale, 4),
            head_shape=head_shape,
            coarse_deform_mm=coarse_mm,
            anatomy_variation=float(variation),
            glioma=glioma,
            stroke=stroke,
            resection=resection,
        )
        plan.identity = fake_identity(rng_for(seed, cohort, i, "identity"), sex, age, start)
        plans.append(plan)
    return plans
