"""Orchestration: plan subjects, simulate each session, acquire and write every scan, add cross-dataset duplicates,
and write the ground truth to ``OUT/_truth``."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from brainiac.ingestion.synthetic.anatomy import (
    BRAIN_CENTER_MM,
    HEAD_CENTER_MM,
    BaseAnatomy,
    base_anatomy,
    deform_volume,
    deformation_coords,
    random_deformation,
    random_rigid,
    triple,
)
from brainiac.ingestion.synthetic.biology import (
    BRATS_LABELS,
    add_glioma,
    add_stroke,
    apply_ageing,
    base_tissue,
    brain_shrink_mm,
    skull_growth,
    stroke_levels,
    survival_days,
)
from brainiac.ingestion.synthetic.layouts import DATASET_FOLDERS, LAYOUTS, DicomPacs, Layout, ScanOut
from brainiac.ingestion.synthetic.physics import (
    AXCODES,
    LEVELS,
    Acquisition,
    acquisition_grid,
    add_bias_and_noise,
    quantize,
    render,
    resample,
)
from brainiac.ingestion.synthetic.presets import Preset, get_preset
from brainiac.ingestion.synthetic.subjects import (
    COHORT_SEQUENCES,
    SessionPlan,
    SubjectPlan,
    fake_identity,
    plan_cohort,
    rng_for,
)
from brainiac.ingestion.synthetic.writers import write_nifti
from brainiac.platform.errors import UserError

__all__ = ["ALL_COHORTS", "TRUTH_COLUMNS", "CohortSummary", "generate_cohort"]

ALL_COHORTS = ("bids", "brats", "adni", "dicom", "stroke")
MARKER = "_truth/synth.json"
"""Marks a folder as a previous ``brainiac synth`` output (so it may be replaced)."""
GENERATOR_VERSION = 2

TRUTH_COLUMNS = (
    "cohort", "dataset", "path", "kind", "format", "n_files", "subject_uid", "cohort_subject_id", "session", "sequence",
    "age_years", "brain_age_years", "sex", "diagnosis", "hippocampal_loss", "idh", "survival_days",
    "survival_censored_days", "stroke_onset_days", "stroke_territory", "lesion_volume_ml", "tumour_volume_ml",
    "enhancing_volume_ml", "vendor", "manufacturer", "scanner_model", "field_strength_t", "voxel_size_mm", "shape",
    "axcodes", "dtype", "scl_slope", "skull_present", "duplicate_of", "duplicate_group", "rigid_transform",
    "rotation_deg", "translation_mm", "deform_max_mm", "head_scale", "affine", "mask_path", "label_path", "tissue_path",
    "head_size_xyz", "coarse_deform_mm", "brain_shrink_mm", "ventricle_growth_mm", "mass_effect_mm",
    "anatomy_variation",
)  # fmt: skip


@dataclass
class CohortSummary:
    """What :func:`generate_cohort` wrote."""

    out_dir: Path
    cohorts: dict[str, str]
    """Cohort name -> dataset folder under ``out_dir``."""
    n_subjects: int
    n_scans: int
    n_files: int
    seconds: float
    truth: Path
    """The per-scan truth table (``out_dir/_truth/scans.csv``)."""
    per_cohort: dict[str, dict[str, int]] = field(default_factory=dict)
    """Subjects, scans and files per cohort."""


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, np.ndarray | list | tuple):
        return json.dumps(
            [float(f"{float(x):.6g}") if not isinstance(x, int | str) else x for x in np.ravel(v).tolist()]
        )
    return str(v)


def _check_out(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory; choose another OUT")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    marker = out_dir / MARKER
    if not marker.is_file():
        raise UserError(
            f"output folder {out_dir} is not empty and is not a previous 'brainiac synth' output; choose an empty or new folder"
        )
    try:
        previous = json.loads(marker.read_text())
        owned = [*previous.get("cohorts", {}).values(), "_truth"]
    except (json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{marker} is unreadable; remove {out_dir} or choose another OUT") from exc
    for name in owned:  # remove only what the previous run wrote
        target = out_dir / str(name)
        if "/" in str(name) or str(name) in ("", ".", ".."):
            continue
        if target.is_dir():
            shutil.rmtree(target)


def duplicate_indices(seed: int, n_brats: int) -> list[int]:
    """Which BraTS subjects (by index) are re-saved into another cohort: 20 %, at least one."""
    if n_brats < 1:
        return []
    rng = rng_for(seed, "duplicates")
    n = min(n_brats, max(1, round(0.2 * n_brats)))
    return sorted(rng.choice(n_brats, size=n, replace=False).tolist())


def _allocate(subjects: int, cohorts: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(subjects, len(cohorts))
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(cohorts)}


@dataclass
class _Session:
    """A subject at one session, warped into subject space: one image per sequence, the brain mask and labels."""

    images: dict[str, np.ndarray]
    labels: np.ndarray | None
    tissue: np.ndarray
    info: dict[str, float]


class _Generator:
    def __init__(self, out_dir: Path, seed: int, preset: Preset, progress: Callable[[int], object] | None) -> None:
        self.out = out_dir
        self.seed = seed
        self.preset = preset
        self.anat: BaseAnatomy = base_anatomy(preset.voxel_mm)
        self.rows: list[dict[str, object]] = []
        self.truth_files = 0
        self.progress = progress

    # -- simulation ------------------------------------------------------------------------------------------------
    def deformation(self, plan: SubjectPlan):
        """The subject's shape, shared by all its sessions, drawn from its own random stream."""
        return random_deformation(
            rng_for(self.seed, plan.cohort, plan.index, "deformation"),
            self.anat,
            plan.deform_max_mm,
            plan.head_scale,
            plan.head_shape,
            coarse_mm=plan.coarse_deform_mm,
        )

    def simulate(self, plan: SubjectPlan, session: SessionPlan, deformation) -> _Session:
        anat = self.anat
        variation = self.preset.anatomy_variation
        age = plan.age_at(session)
        brain_age = age + plan.brain_age_gap_years
        shrink = brain_shrink_mm(brain_age, plan.hippocampal_loss, variation)
        t = base_tissue(
            anat,
            rng_for(self.seed, plan.cohort, plan.index, "skull"),
            thickness=1.0 - variation * (1.0 - skull_growth(age)),
            shrink_mm=shrink,
        )
        info = apply_ageing(
            t,
            anat,
            brain_age,
            plan.hippocampal_loss,
            rng_for(self.seed, plan.cohort, plan.index, session.label, "wmh"),
            variation=variation,
        )
        mass = None
        if plan.glioma is not None:
            info.update(add_glioma(t, anat, plan.glioma, rng_for(self.seed, plan.cohort, plan.index, "tumour-shape")))
            mass = plan.glioma.mass_effect()
        if plan.stroke is not None:
            info.update(add_stroke(t, anat, plan.stroke, rng_for(self.seed, plan.cohort, plan.index, "lesion-shape")))
            levels = stroke_levels(
                plan.stroke, {q: v["gm"] for q, v in LEVELS.items()}, {q: v["csf"] for q, v in LEVELS.items()}
            )
            for q, lv in levels.items():
                t.lesion_levels.setdefault(q, {})["infarct"] = lv
        size = plan.head_size(session)
        coords = deformation_coords(anat, deformation, size=size, shrink_mm=shrink, mass=mass)
        images = {
            q: deform_volume(render(t, q), anat, deformation, order=1, coords=coords)
            for q in COHORT_SEQUENCES[plan.cohort]
        }
        labels = None
        if t.labels is not None:
            labels = deform_volume(t.labels, anat, deformation, order=0, coords=coords)
            info.update(_lesion_volumes(labels, anat.spacing, glioma=plan.glioma is not None))
        if plan.glioma is not None and plan.survival_days is None:
            srng = rng_for(self.seed, plan.cohort, plan.index, "survival")
            plan.survival_days = round(survival_days(srng, plan.glioma, plan.age_years, info), 1)
            if srng.random() < 0.15:
                plan.survival_censored_days = round(plan.survival_days * float(srng.uniform(0.3, 0.95)), 1)
        tissue = deform_volume(_tissue_classes(t, anat.mask > 0.5), anat, deformation, order=0, coords=coords)
        info.update(
            brain_shrink_mm=shrink,
            head_scale=float(np.prod(size) ** (1.0 / 3.0)),
            mass_effect_mm=0.0 if mass is None else mass.push_mm,
        )
        return _Session(images=images, labels=labels, tissue=tissue, info=info)

    def acquire(
        self,
        sess: _Session,
        sequence: str,
        plan: SubjectPlan,
        acq: Acquisition,
        pose,
        *,
        skull: bool,
        dtype: str,
        rng: np.random.Generator,
        cache: dict,
    ) -> ScanOut:
        rot, tr, rigid = pose
        key = (acq.shape, acq.affine.tobytes())  # never id(acq): ids of freed grids are reused
        if key not in cache:
            labels = None if sess.labels is None else resample(sess.labels, self.anat, rigid, acq, order=0)
            tissue = resample(sess.tissue, self.anat, rigid, acq, order=0)
            mask = np.isin(tissue, BRAIN_CLASSES).astype(np.uint8)
            cache[key] = (mask, labels, tissue)
        mask, labels, tissue = cache[key]
        img = resample(sess.images[sequence], self.anat, rigid, acq, order=1)
        if not skull:
            img *= mask
        img = add_bias_and_noise(img, acq, plan.scanner, rng, self.preset.voxel_mm)
        if not skull:
            img *= mask
        data, slope = quantize(img, plan.scanner, dtype)
        if not skull:
            tissue = np.where(mask > 0, tissue, 0).astype(np.uint8)
        return ScanOut(sequence, data, slope, acq, mask, labels, plan.scanner, skull, dtype, rigid, rot, tr, tissue)

    # -- truth -----------------------------------------------------------------------------------------------------
    def truth_row(
        self,
        layout: Layout,
        plan: SubjectPlan,
        session: SessionPlan,
        scan: ScanOut,
        rel: str,
        sess_info: dict[str, float],
        *,
        kind: str = "image",
        fmt: str = "nifti",
        n_files: int = 1,
        duplicate_of: str = "",
        duplicate_group: str = "",
    ) -> None:
        cohort = layout.cohort
        stem = rel[:-7] if rel.endswith(".nii.gz") else rel[:-4] if rel.endswith(".nii") else rel
        mask_rel = f"masks/{cohort}/{stem}_brainmask.nii.gz"
        write_nifti(
            self.out / "_truth" / mask_rel,
            scan.mask.astype(np.uint8),
            scan.acq.affine,
            gzip_level=self.preset.gzip_level,
        )
        self.truth_files += 1
        tissue_rel = ""
        if scan.tissue is not None and kind == "image":
            tissue_rel = f"tissue/{cohort}/{stem}_dseg.nii.gz"
            write_nifti(
                self.out / "_truth" / tissue_rel,
                scan.tissue.astype(np.uint8),
                scan.acq.affine,
                gzip_level=self.preset.gzip_level,
            )
            self.truth_files += 1
        label_rel = ""
        if scan.labels is not None and kind == "image":
            label_rel = f"labels/{cohort}/{stem}_labels.nii.gz"
            write_nifti(
                self.out / "_truth" / label_rel,
                scan.labels.astype(np.uint8),
                scan.acq.affine,
                gzip_level=self.preset.gzip_level,
            )
            self.truth_files += 1
        g, s = plan.glioma, plan.stroke
        age = plan.age_at(session)
        size = plan.head_size(session)
        self.rows.append(
            {
                "cohort": cohort,
                "dataset": DATASET_FOLDERS[cohort],
                "path": rel,
                "kind": kind,
                "format": fmt,
                "n_files": n_files,
                "subject_uid": plan.uid if not plan.duplicate_of else plan.duplicate_of,
                "cohort_subject_id": plan.cohort_id,
                "session": session.label,
                "sequence": "seg" if kind == "label" else scan.sequence,
                "age_years": round(age, 3),
                "brain_age_years": round(age + plan.brain_age_gap_years, 3),
                "sex": plan.sex,
                "diagnosis": plan.diagnosis,
                "hippocampal_loss": round(sess_info.get("hippocampal_loss", 0.0), 4),
                "idh": "" if g is None else ("mutant" if g.idh_mutant else "wildtype"),
                "survival_days": plan.survival_days,
                "survival_censored_days": plan.survival_censored_days,
                "stroke_onset_days": None if s is None else s.onset_days,
                "stroke_territory": "" if s is None else f"{s.territory}-{'L' if s.side < 0 else 'R'}",
                "lesion_volume_ml": sess_info.get("lesion_volume_ml"),
                "tumour_volume_ml": sess_info.get("tumour_volume_ml"),
                "enhancing_volume_ml": sess_info.get("enhancing_volume_ml"),
                "vendor": scan.scanner.vendor,
                "manufacturer": scan.scanner.manufacturer,
                "scanner_model": scan.scanner.model,
                "field_strength_t": scan.scanner.field_t,
                "voxel_size_mm": list(scan.acq.voxel_mm),
                "shape": [int(v) for v in scan.data.shape],
                "axcodes": "".join(nib.aff2axcodes(scan.acq.affine)),
                "dtype": str(scan.data.dtype) if fmt == "nifti" else "uint16",
                "scl_slope": scan.slope,
                "skull_present": scan.skull_present,
                "duplicate_of": duplicate_of,
                "duplicate_group": duplicate_group,
                "rigid_transform": scan.rigid,
                "rotation_deg": list(scan.rotation_deg),
                "translation_mm": list(scan.translation_mm),
                "deform_max_mm": plan.deform_max_mm,
                "head_scale": round(float(np.prod(size) ** (1.0 / 3.0)), 4),
                "head_size_xyz": list(size),
                "coarse_deform_mm": plan.coarse_deform_mm,
                "brain_shrink_mm": round(sess_info.get("brain_shrink_mm", 0.0), 3),
                "ventricle_growth_mm": round(sess_info.get("ventricle_growth_mm", 0.0), 3),
                "mass_effect_mm": round(g.push_mm, 3) if g is not None else 0.0,
                "anatomy_variation": plan.anatomy_variation,
                "affine": scan.acq.affine,
                "mask_path": mask_rel,
                "label_path": label_rel,
                "tissue_path": tissue_rel,
            }
        )

    # -- cohorts ---------------------------------------------------------------------------------------------------
    def run_cohort(
        self, layout: Layout, plans: list[SubjectPlan], keep: frozenset[str] = frozenset()
    ) -> dict[str, list[ScanOut]]:
        """Write every subject of one cohort; returns the scans of the subjects in ``keep`` (for duplicates)."""
        p = self.preset
        kept: dict[str, list[ScanOut]] = {}
        for plan in plans:
            deformation = self.deformation(plan)
            for session in plan.sessions:
                sess = self.simulate(plan, session, deformation)
                nui = rng_for(self.seed, plan.cohort, plan.index, session.label, "acquisition")
                cache: dict = {}
                if layout.cohort == "brats":  # co-registered, skull-stripped atlas grid; small residual pose
                    pose = random_rigid(nui, 3.0, 3.0)
                    shared = acquisition_grid((p.voxel_mm,) * 3, "LPS", p.brats_fov_mm, BRAIN_CENTER_MM)
                else:
                    pose = random_rigid(nui, 15.0, 10.0)
                    centre = (pose[2] @ np.array([*HEAD_CENTER_MM, 1.0]))[:3] + nui.uniform(-4, 4, 3)
                    shared = None
                skull_prob = {"brats": 0.0, "adni": 0.8}.get(layout.cohort, 1.0)
                for sequence in COHORT_SEQUENCES[plan.cohort]:
                    if shared is not None:
                        acq, dtype, skull = shared, "int16", False
                    else:
                        family = str(nui.choice(list(p.voxel_families())))
                        axcodes = str(nui.choice(AXCODES))
                        acq = acquisition_grid(p.voxel_families()[family], axcodes, p.fov_mm, centre)
                        dtype = "float32" if nui.random() < 0.25 else "int16"
                        skull = bool(nui.random() < skull_prob)
                    if layout.cohort == "dicom":
                        dtype = "int16"
                    noise = rng_for(self.seed, plan.cohort, plan.index, session.label, sequence, "noise")
                    scan = self.acquire(
                        sess, sequence, plan, acq, pose, skull=skull, dtype=dtype, rng=noise, cache=cache
                    )
                    if layout.cohort == "brats":
                        scan.slope = 1.0
                        scan.data = np.clip(
                            np.round(scan.data.astype(np.float32) * plan.scanner.slope), 0, 32767
                        ).astype(np.int16)
                    before = layout.files
                    rel = layout.write_scan(plan, session, scan)
                    fmt = "dicom" if isinstance(layout, DicomPacs) else "nifti"
                    self.truth_row(layout, plan, session, scan, rel, sess.info, fmt=fmt, n_files=layout.files - before)
                    label_rel = layout.write_labels(plan, session, scan)
                    if label_rel:
                        self.truth_row(layout, plan, session, scan, label_rel, sess.info, kind="label")
                    if plan.uid in keep:
                        kept.setdefault(plan.uid, []).append(scan)
            if self.progress:
                self.progress(1)
        return kept

    def duplicates(
        self,
        source: list[SubjectPlan],
        scans: dict[str, list[ScanOut]],
        target: Layout,
        target_plans: list[SubjectPlan],
    ) -> list[SubjectPlan]:
        """Re-save a few BraTS subjects into ``target`` with another orientation, a crop and another container."""
        chosen = duplicate_indices(self.seed, len(source))
        made = []
        brats_rows = {(r["subject_uid"], r["sequence"]): r["path"] for r in self.rows if r["cohort"] == "brats"}
        first_row: dict[str, dict] = {}  # each subject's first truth row, for its duplicate's tumour and anatomy facts
        for r in self.rows:
            first_row.setdefault(str(r["subject_uid"]), r)
        for j, k in enumerate(chosen):
            src = source[k]
            idx = len(target_plans) + j
            ident_rng = rng_for(self.seed, "duplicate-identity", src.uid)
            session = SessionPlan("01", 0.0, src.sessions[0].date)
            plan = SubjectPlan(
                uid=f"{src.uid}-dup",
                cohort=target.cohort,
                index=idx,
                cohort_id="",
                sex=src.sex,
                age_years=src.age_years,
                brain_age_gap_years=src.brain_age_gap_years,
                diagnosis=src.diagnosis,
                hippocampal_loss=src.hippocampal_loss,
                scanner=src.scanner,
                site=src.site,
                sessions=[session],
                deform_max_mm=src.deform_max_mm,
                head_scale=src.head_scale,
                head_shape=src.head_shape,
                coarse_deform_mm=src.coarse_deform_mm,
                anatomy_variation=src.anatomy_variation,
                glioma=src.glioma,
                survival_days=src.survival_days,
                survival_censored_days=src.survival_censored_days,
                resection=src.resection,
                identity=fake_identity(ident_rng, src.sex, src.age_years, session.date),
                duplicate_of=src.uid,
            )
            plan.cohort_id = target.subject_id(plan)
            axcodes = str(ident_rng.choice([a for a in AXCODES if a != "LPS"]))
            crop = ident_rng.integers(0, 4, size=(3, 2))
            src_row = first_row.get(src.uid, {})
            info = {  # a fact the source row lacks stays absent (truth_row reads it as None or 0)
                k: src_row[k]
                for k in ("tumour_volume_ml", "enhancing_volume_ml", "brain_shrink_mm", "ventricle_growth_mm")
                if src_row.get(k) is not None
            }
            for scan in scans[src.uid]:
                new = _reorient_crop(scan, axcodes, crop)
                before = target.files
                rel = target.write_scan(plan, session, new)
                fmt = "dicom" if isinstance(target, DicomPacs) else "nifti"
                self.truth_row(
                    target,
                    plan,
                    session,
                    new,
                    rel,
                    info,
                    fmt=fmt,
                    n_files=target.files - before,
                    duplicate_of=f"brats/{brats_rows[(src.uid, scan.sequence)]}",
                    duplicate_group=src.uid,
                )
            made.append(plan)
        return made

    def write_truth(self, cohorts: dict[str, str], meta: dict) -> Path:
        truth = self.out / "_truth"
        truth.mkdir(parents=True, exist_ok=True)
        rows = sorted(self.rows, key=lambda r: (str(r["cohort"]), str(r["path"])))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(TRUTH_COLUMNS)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in TRUTH_COLUMNS])
        path = truth / "scans.csv"
        path.write_text(buf.getvalue(), encoding="utf-8")
        (truth / "synth.json").write_text(json.dumps({**meta, "cohorts": cohorts}, indent=2, sort_keys=True) + "\n")
        (truth / "README.md").write_text(_TRUTH_README)
        self.truth_files += 3
        return path


_TRUTH_README = """# Ground truth of a `brainiac synth` cohort

Never ingest this folder. `scans.csv` has one row per image (and per shipped label map) of every cohort, keyed by
(`cohort`, `path`): `path` is relative to the cohort's dataset folder (for DICOM, the series folder). Brain masks of
each scan are in `masks/`, lesion label maps on each scan's grid in `labels/` (BraTS values 1/2/4, stroke 1). Ages are in
years. `rigid_transform` (row-major 4x4) maps template (MNI152) mm to the scan's scanner mm. The schema is documented in
`brainiac.ingestion.synthetic` and docs/synthetic-cohort.md.
"""


def _lesion_volumes(labels: np.ndarray, spacing: float, *, glioma: bool) -> dict[str, float]:
    """Lesion volumes (ml) of a subject-space label map: they include the head size and a tumour's mass effect."""
    vox_ml = spacing**3 / 1000.0
    if not glioma:
        return {"lesion_volume_ml": float(np.count_nonzero(labels)) * vox_ml}
    core = np.isin(labels, (BRATS_LABELS["NCR"], BRATS_LABELS["ET"]))
    return {
        "tumour_volume_ml": float(np.count_nonzero(core)) * vox_ml,
        "enhancing_volume_ml": float(np.count_nonzero(labels == BRATS_LABELS["ET"])) * vox_ml,
        "edema_volume_ml": float(np.count_nonzero(labels == BRATS_LABELS["ED"])) * vox_ml,
    }


BRAIN_CLASSES = (1, 2, 3, 6, 7)
"""Tissue classes inside the brain mask; the true brain mask is exactly ``isin(tissue, BRAIN_CLASSES)``."""


def _tissue_classes(t, inside: np.ndarray) -> np.ndarray:
    """Dominant tissue per voxel (``TISSUE_CLASSES``): inside the brain mask CSF/GM/WM, with WMH and lesions where they
    dominate; outside it extra-cerebral CSF (8), skull, scalp or background."""
    cls = (np.argmax(np.stack([t.csf, t.gm, t.wm]), axis=0) + 1).astype(np.uint8)
    cls[(cls == 3) & (t.wmh > 0.5)] = 6
    if t.lesions:
        cls[sum(t.lesions.values()) > 0.5] = 7
    out = np.stack([t.csf, t.skull, t.scalp])
    out_cls = np.array([8, 4, 5], np.uint8)[np.argmax(out, axis=0)]
    out_cls[out.sum(axis=0) < 0.5] = 0
    return np.where(inside, cls, out_cls).astype(np.uint8)


def _reorient_crop(scan: ScanOut, axcodes: str, crop: np.ndarray) -> ScanOut:
    """The same voxels in another axis order / direction, cropped by ``crop[axis] = (low, high)`` voxels; the affine
    follows so every voxel keeps its position in millimetres. No resampling, so labels stay exact."""
    start = nib.orientations.io_orientation(scan.acq.affine)
    t = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(tuple(axcodes)))

    def move(a: np.ndarray) -> np.ndarray:
        return nib.orientations.apply_orientation(a, t)

    affine = scan.acq.affine @ nib.orientations.inv_ornt_aff(t, scan.data.shape)
    data, mask = move(scan.data), move(scan.mask)
    labels = None if scan.labels is None else move(scan.labels)
    tissue = None if scan.tissue is None else move(scan.tissue)
    sl = tuple(slice(int(lo), s - int(hi)) for (lo, hi), s in zip(crop, data.shape, strict=True))
    shift = np.eye(4)
    shift[:3, 3] = [int(lo) for lo, _ in crop]
    affine = np.round(affine @ shift, 4)
    data, mask = np.ascontiguousarray(data[sl]), np.ascontiguousarray(mask[sl])
    labels = None if labels is None else np.ascontiguousarray(labels[sl])
    tissue = None if tissue is None else np.ascontiguousarray(tissue[sl])
    zooms = triple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    acq = Acquisition(affine=affine, shape=triple(data.shape), voxel_mm=zooms, axcodes=axcodes)
    return ScanOut(
        scan.sequence, data, scan.slope, acq, mask, labels, scan.scanner, scan.skull_present, scan.dtype, scan.rigid,
        scan.rotation_deg, scan.translation_mm, tissue, ".nii",
    )  # fmt: skip


def generate_cohort(
    out_dir: Path,
    *,
    subjects: int,
    seed: int,
    preset: str = "tiny",
    cohorts: Sequence[str] = ALL_COHORTS,
    progress: bool = False,
    anatomy_variation: float | None = None,
) -> CohortSummary:
    """Write a synthetic multi-site cohort under ``out_dir``: one dataset folder per cohort, truth in ``_truth/``.

    Args:
        out_dir: output folder; created if missing. It must be empty or a previous synth output (then replaced).
        subjects: distinct subjects in total, spread evenly over ``cohorts`` (at least one per cohort). A few BraTS
            subjects are re-saved into the DICOM cohort (or the BIDS one) as cross-dataset duplicates; they are not
            counted twice.
        seed: every draw derives from it; the same seed gives byte-identical files.
        preset: ``tiny`` (3 mm), ``small`` (2 mm) or ``full`` (1 mm).
        cohorts: any of ``bids``, ``brats``, ``adni``, ``dicom``, ``stroke``.
        progress: show a progress bar on stderr.
        anatomy_variation: strength of the inter-subject anatomical variation (head shape, children's heads, coarse
            deformation, atrophy, MCI ventricles, tumour mass effect); None takes the preset's (1.0), 0 the earlier
            template-like anatomy.

    Raises:
        UserError: unknown preset or cohort, too few subjects, or ``out_dir`` holds something else.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    try:
        p = get_preset(preset)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if anatomy_variation is not None:
        if not 0.0 <= float(anatomy_variation) <= 2.0:
            raise UserError(f"anatomy_variation must be between 0 and 2, got {anatomy_variation}")
        p = dataclasses.replace(p, anatomy_variation=float(anatomy_variation))
    cohorts = list(dict.fromkeys(cohorts))
    unknown = [c for c in cohorts if c not in ALL_COHORTS]
    if unknown or not cohorts:
        raise UserError(f"unknown cohort(s) {unknown or cohorts}; choose from {', '.join(ALL_COHORTS)}")
    cohorts = [c for c in ALL_COHORTS if c in cohorts]  # canonical order: duplicates need BraTS first
    if not isinstance(subjects, int) or isinstance(subjects, bool) or subjects < 1:
        raise UserError(f"subjects must be a positive integer, got {subjects!r}")
    if subjects < len(cohorts):
        raise UserError(f"{subjects} subject(s) cannot fill {len(cohorts)} cohorts; ask for at least {len(cohorts)}")
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    _check_out(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = _allocate(subjects, cohorts)
    dup_target = None
    if "brats" in cohorts:
        dup_target = "dicom" if "dicom" in cohorts else ("bids" if "bids" in cohorts else None)
    bar = None
    tick = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=subjects, desc="synth", unit="subject", leave=False)
        tick = bar.update
    gen = _Generator(out_dir, seed, p, tick)
    anat = gen.anat
    layouts: dict[str, Layout] = {}
    plans: dict[str, list[SubjectPlan]] = {}
    kept: dict[str, list[ScanOut]] = {}
    offset = 0
    per: dict[str, dict[str, int]] = {}
    for c in cohorts:
        root = out_dir / DATASET_FOLDERS[c]
        layout = LAYOUTS[c](root, p.gzip_level) if c != "dicom" else DicomPacs(root, p.gzip_level, seed)
        layouts[c] = layout
        plans[c] = plan_cohort(seed, c, counts[c], anat, offset, p.anatomy_variation)
        offset += counts[c]
        for plan in plans[c]:
            plan.cohort_id = layout.subject_id(plan)
        if bar is not None:
            bar.set_description(f"synth {c}")
        keep: frozenset[str] = frozenset()
        if c == "brats" and dup_target is not None:
            keep = frozenset(plans[c][i].uid for i in duplicate_indices(seed, len(plans[c])))
        scans = gen.run_cohort(layout, plans[c], keep)
        if c == "brats":
            kept = scans
    if dup_target is not None:
        dups = gen.duplicates(plans["brats"], kept, layouts[dup_target], plans[dup_target])
        plans[dup_target].extend(dups)
    for c in cohorts:
        layouts[c].finalize(plans[c])
        n_scans = sum(1 for r in gen.rows if r["cohort"] == c and r["kind"] == "image")
        per[c] = {"subjects": len(plans[c]), "scans": n_scans, "files": layouts[c].files}
    folders = {c: DATASET_FOLDERS[c] for c in cohorts}
    meta = {
        "generator": "brainiac synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "preset": preset,
        "subjects": subjects,
        "anatomy_variation": p.anatomy_variation,
    }
    truth = gen.write_truth(folders, meta)
    if bar is not None:
        bar.close()
    n_scans = sum(1 for r in gen.rows if r["kind"] == "image")
    return CohortSummary(
        out_dir=out_dir,
        cohorts=folders,
        n_subjects=subjects,
        n_scans=n_scans,
        n_files=sum(layouts[c].files for c in cohorts) + gen.truth_files,
        seconds=round(time.perf_counter() - t0, 2),
        truth=truth,
        per_cohort=per,
    )
