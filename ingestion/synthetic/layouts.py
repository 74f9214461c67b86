"""The on-disk conventions each cohort is written in, exactly as such data arrives: BIDS (lifespan and stroke), a
BraTS-style glioma release, an ADNI-like flat folder with a CSV manifest, and a hospital PACS export in DICOM."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypedDict

import numpy as np

from brainiac.ingestion.synthetic.physics import Acquisition, Scanner
from brainiac.ingestion.synthetic.subjects import SessionPlan, SubjectPlan
from brainiac.ingestion.synthetic.writers import deterministic_uid, write_dicom_series, write_nifti

__all__ = ["DATASET_FOLDERS", "LAYOUTS", "TISSUE_CLASSES", "Layout", "ScanOut", "SequenceProtocol", "protocol"]

TISSUE_CLASSES = {
    0: "background", 1: "CSF", 2: "GM", 3: "WM", 4: "skull", 5: "scalp", 6: "WMH", 7: "lesion", 8: "extra-cerebral CSF",
}  # fmt: skip
"""Values of the truth tissue maps (``_truth/tissue``): the dominant tissue of each voxel; 7 = tumour or infarct."""

DATASET_FOLDERS = {
    "bids": "synth-lifespan-bids",
    "brats": "synth-brats",
    "adni": "synth-adni",
    "dicom": "synth-gbm-dicom",
    "stroke": "synth-stroke-bids",
}
"""Dataset folder (under OUT) of each cohort."""


@dataclass
class ScanOut:
    """One acquired volume, ready to be written: stored array, its slope and grid, and what is true about it."""

    sequence: str
    data: np.ndarray
    slope: float
    acq: Acquisition
    mask: np.ndarray
    labels: np.ndarray | None
    scanner: Scanner
    skull_present: bool
    dtype: str
    rigid: np.ndarray
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    tissue: np.ndarray | None = None
    """Tissue classes on this grid (see ``TISSUE_CLASSES``), truth only."""
    nifti_ext: str = ".nii.gz"
    """Container a NIfTI layout uses for this scan (cross-dataset duplicates are re-saved as ``.nii``)."""


_PROTOCOL: dict[str, tuple[float, float, float | None, float, str, str]] = {
    # sequence: repetition time, echo time, inversion time (ms), flip angle, scanning sequence, 2D/3D
    "T1w": (2300.0, 2.98, 900.0, 9.0, "GR\\IR", "3D"),
    "T1ce": (2300.0, 2.98, 900.0, 9.0, "GR\\IR", "3D"),
    "T2w": (5000.0, 100.0, None, 150.0, "SE", "2D"),
    "FLAIR": (9000.0, 120.0, 2500.0, 150.0, "SE\\IR", "2D"),
    "DWI": (5000.0, 80.0, None, 90.0, "EP", "2D"),
}
_VENDOR_TIMING = {"Siemens": 1.0, "GE": 1.04, "Philips": 0.96}
_SERIES_DESCRIPTION = {
    "Siemens": {"T1w": "t1_mprage_sag_p2", "T1ce": "t1_mprage_sag_p2_post", "T2w": "t2_tse_tra", "FLAIR": "t2_tirm_tra_dark-fluid", "DWI": "ep2d_diff_tra_TRACEW"},
    "GE": {"T1w": "SAG 3D T1 BRAVO", "T1ce": "SAG 3D T1 BRAVO +C", "T2w": "AX T2 FSE", "FLAIR": "AX T2 FLAIR", "DWI": "AX DWI 1000b"},
    "Philips": {"T1w": "T1W_3D_TFE", "T1ce": "T1W_3D_TFE_GD", "T2w": "T2W_TSE", "FLAIR": "FLAIR_LONGTR", "DWI": "DWI_SSh_b1000"},
}  # fmt: skip


class SequenceProtocol(TypedDict):
    """What :func:`protocol` gives: times in ms (``ti_ms`` ``None`` without inversion), flip angle in degrees, DICOM
    ScanningSequence, ``2D``/``3D`` and the vendor's series description."""

    tr_ms: float
    te_ms: float
    ti_ms: float | None
    flip_deg: float
    scanning_sequence: str
    mode: str
    description: str


def protocol(sequence: str, scanner: Scanner) -> SequenceProtocol:
    """Timing and naming of a sequence on a scanner (ms; vendor-specific but independent of any label)."""
    tr, te, ti, flip, seq, mode = _PROTOCOL[sequence]
    f = _VENDOR_TIMING[scanner.vendor]
    return {
        "tr_ms": round(tr * f, 2),
        "te_ms": round(te * f, 3),
        "ti_ms": round(ti * f, 1) if ti else None,
        "flip_deg": flip,
        "scanning_sequence": seq,
        "mode": mode,
        "description": _SERIES_DESCRIPTION[scanner.vendor][sequence],
    }


def _tsv(path: Path, header: list[str], rows: list[list[object]], sep: str = "\t") -> None:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=sep, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


class Layout:
    """Base class: a cohort's folder, its subject ids, file names and the tables written next to the images."""

    cohort = ""
    gzip_level = 6

    def __init__(self, root: Path, gzip_level: int) -> None:
        self.root = root
        self.gzip_level = gzip_level
        self.files = 0

    def subject_id(self, plan: SubjectPlan) -> str:
        raise NotImplementedError

    def write_scan(self, plan: SubjectPlan, session: SessionPlan, scan: ScanOut) -> str:
        """Write one volume; return its path relative to the dataset root (a series folder for DICOM)."""
        raise NotImplementedError

    def write_labels(self, plan: SubjectPlan, session: SessionPlan, scan: ScanOut) -> str | None:
        """Write the label map the dataset ships (BraTS seg, stroke lesion mask), if any, on ``scan``'s grid."""
        return None

    def finalize(self, plans: list[SubjectPlan]) -> None:
        """Write the dataset-level tables once every scan is written."""

    def _nifti(self, rel: str, scan: ScanOut, data: np.ndarray | None = None, slope: float | None = None) -> str:
        path = self.root / rel
        write_nifti(
            path,
            scan.data if data is None else data,
            scan.acq.affine,
            slope=scan.slope if slope is None else slope,
            gzip_level=self.gzip_level,
        )
        self.files += 1
        return rel

    def _write_text(self, writer, rel: str, *args) -> None:
        writer(self.root / rel, *args)
        self.files += 1


# ----------------------------------------------------------------------------------------------------------------------
# BIDS


class BidsLifespan(Layout):
    """OpenNeuro-style raw BIDS: ``sub-*/ses-*/anat/*_{T1w,T2w,FLAIR}.nii.gz`` with JSON sidecars, ``participants.tsv``
    (``age`` at the first session, ``sex``), per-subject ``sessions.tsv`` (``age`` at each session)."""

    cohort = "bids"
    suffix_dir: ClassVar[dict[str, str]] = {
        "T1w": "anat",
        "T1ce": "anat",
        "T2w": "anat",
        "FLAIR": "anat",
        "DWI": "dwi",
    }
    name = "Synthetic lifespan brain MRI (BrainIAC phantom)"

    def subject_id(self, plan: SubjectPlan) -> str:
        return f"{plan.index + 1:03d}"

    def _stem(self, plan: SubjectPlan, session: SessionPlan, sequence: str) -> str:
        sub, ses = f"sub-{plan.cohort_id}", f"ses-{session.label}"
        suffix = {"DWI": "dwi", "T1ce": "ce-gadolinium_T1w"}.get(sequence, sequence)
        return f"{sub}/{ses}/{self.suffix_dir[sequence]}/{sub}_{ses}_{suffix}"

    def _sidecar(self, scan: ScanOut) -> dict:
        p = protocol(scan.sequence, scan.scanner)
        side = {
            "MagneticFieldStrength": scan.scanner.field_t,
            "Manufacturer": scan.scanner.manufacturer,
            "ManufacturersModelName": scan.scanner.model,
            "RepetitionTime": round(float(p["tr_ms"]) / 1000, 5),
            "EchoTime": round(float(p["te_ms"]) / 1000, 6),
            "FlipAngle": p["flip_deg"],
            "MRAcquisitionType": p["mode"],
            "SeriesDescription": p["description"],
            "SliceThickness": scan.acq.voxel_mm[2],
        }
        if p["ti_ms"]:
            side["InversionTime"] = round(float(p["ti_ms"]) / 1000, 4)
        if scan.sequence == "DWI":
            side["DiffusionBValue"] = 1000
        return side

    def write_scan(self, plan, session, scan):
        stem = self._stem(plan, session, scan.sequence)
        self._write_text(_json, f"{stem}.json", self._sidecar(scan))
        return self._nifti(f"{stem}{scan.nifti_ext}", scan)

    def _participants(self, plans):
        header = ["participant_id", "age", "sex"]
        rows = [[f"sub-{p.cohort_id}", f"{p.age_years:.1f}", p.sex] for p in plans]
        meta = {
            "age": {"Description": "Age at the first session", "Units": "years"},
            "sex": {"Description": "Sex", "Levels": {"F": "female", "M": "male"}},
        }
        return header, rows, meta

    def finalize(self, plans):
        plans = sorted(plans, key=lambda p: p.cohort_id)
        self._write_text(
            _json,
            "dataset_description.json",
            {
                "Name": self.name,
                "BIDSVersion": "1.9.0",
                "DatasetType": "raw",
                "License": "CC0",
                "Authors": ["BrainIAC synthetic cohort generator"],
                "GeneratedBy": [{"Name": "brainiac synth", "Description": "synthetic phantom; no real subject"}],
            },
        )
        header, rows, meta = self._participants(plans)
        self._write_text(_tsv, "participants.tsv", header, rows)
        self._write_text(_json, "participants.json", meta)
        (self.root / "README").write_text(f"{self.name}\n\nSynthetic data generated by `brainiac synth`.\n")
        self.files += 1
        for p in plans:
            if len(p.sessions) > 1 or self.cohort == "bids":
                rows = [[f"ses-{s.label}", f"{p.age_at(s):.1f}"] for s in p.sessions]
                self._write_text(_tsv, f"sub-{p.cohort_id}/sub-{p.cohort_id}_sessions.tsv", ["session_id", "age"], rows)


class BidsStroke(BidsLifespan):
    """ISLES/ATLAS-style stroke BIDS: T1w and FLAIR in ``anat/``, a 3-D DWI trace in ``dwi/``; lesion masks in
    ``derivatives/lesion_masks`` on the T1w grid; ``participants.tsv`` with ``age_at_scan``, ``gender`` and
    ``time_since_stroke_days``."""

    cohort = "stroke"
    name = "Synthetic ischemic stroke cohort (BrainIAC phantom)"

    def subject_id(self, plan):
        return f"str{plan.index + 1:03d}"

    def write_labels(self, plan, session, scan):
        if scan.sequence != "T1w" or scan.labels is None:
            return None
        sub, ses = f"sub-{plan.cohort_id}", f"ses-{session.label}"
        rel = f"derivatives/lesion_masks/{sub}/{ses}/anat/{sub}_{ses}_space-orig_desc-lesion_mask.nii.gz"
        return self._nifti(rel, scan, data=scan.labels.astype(np.uint8), slope=1.0)

    def _participants(self, plans):
        header = ["participant_id", "age_at_scan", "gender", "time_since_stroke_days"]
        rows = [
            [
                f"sub-{p.cohort_id}",
                f"{p.age_years:.0f}",
                "female" if p.sex == "F" else "male",
                f"{p.stroke.onset_days:.2f}",
            ]
            for p in plans
        ]
        meta = {
            "age_at_scan": {"Description": "Age at the MRI", "Units": "years"},
            "gender": {"Description": "Gender as recorded", "Levels": {"female": "female", "male": "male"}},
            "time_since_stroke_days": {"Description": "Time from symptom onset to MRI", "Units": "days"},
        }
        return header, rows, meta

    def finalize(self, plans):
        super().finalize(plans)
        self._write_text(
            _json,
            "derivatives/lesion_masks/dataset_description.json",
            {
                "Name": "Manual lesion masks",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "brainiac synth"}],
            },
        )


# ----------------------------------------------------------------------------------------------------------------------
# BraTS


class Brats(Layout):
    """BraTS-style release: ``<Case>/<Case>_{t1,t1ce,t2,flair,seg}.nii.gz`` on one skull-stripped atlas grid (labels 1,
    2, 4); ``survival_info.csv`` keyed ``SynthBraTS20_Training_012`` and ``idh_status.csv`` keyed by the bare number
    ``12`` (case ids formatted differently from folder names, as in real releases)."""

    cohort = "brats"
    names: ClassVar[dict[str, str]] = {"T1w": "t1", "T1ce": "t1ce", "T2w": "t2", "FLAIR": "flair"}

    def subject_id(self, plan):
        return f"SynthBraTS_{int(plan.cohort_id):05d}"

    def write_scan(self, plan, session, scan):
        case = plan.cohort_id
        return self._nifti(f"{case}/{case}_{self.names[scan.sequence]}.nii.gz", scan)

    def write_labels(self, plan, session, scan):
        if scan.sequence != "FLAIR" or scan.labels is None:
            return None
        case = plan.cohort_id
        return self._nifti(f"{case}/{case}_seg.nii.gz", scan, data=scan.labels.astype(np.uint8), slope=1.0)

    @staticmethod
    def number(plan: SubjectPlan) -> int:
        return int(plan.cohort_id.rsplit("_", 1)[1])

    def finalize(self, plans):
        plans = sorted(plans, key=lambda p: p.cohort_id)
        surv = []
        for p in plans:
            if p.resection == "NA" and p.index % 2 == 0:  # some cases have no survival record at all
                continue
            if p.survival_censored_days is not None:
                days: str = f"ALIVE ({p.survival_censored_days:.0f} days later)"
            else:
                days = f"{p.survival_days:.0f}"
            surv.append([f"SynthBraTS20_Training_{self.number(p):03d}", f"{p.age_years:.3f}", days, p.resection])
        self._write_text(
            _tsv, "survival_info.csv", ["Brats20ID", "Age", "Survival_days", "Extent_of_Resection"], surv, ","
        )
        idh = []
        for p in plans:
            value = "wildtype"
            if p.glioma.idh_mutant:
                value = "mutant (IDH1 R132H)" if p.index % 5 else "mutant (IDH2)"
            idh.append([str(self.number(p)), value])
        self._write_text(_tsv, "idh_status.csv", ["BraTS21ID", "IDH"], idh, ",")


# ----------------------------------------------------------------------------------------------------------------------
# ADNI-like manifest


class AdniManifest(Layout):
    """ADNI/IDA-style download: flat ``images/ADNI_<PTID>_MR_<Description>_S<series>_I<image>.nii`` files plus
    ``manifest.csv`` with PTID, VISCODE, AGE (age at *baseline*, as in ADNIMERGE; add ``Years_bl`` for the age at the
    visit), PTGENDER, DX (CN/MCI), EXAMDATE, Description, Image_ID and FILE (path relative to the dataset root)."""

    cohort = "adni"
    descriptions: ClassVar[dict[str, str]] = {"T1w": "MPRAGE", "FLAIR": "Axial_FLAIR"}

    def __init__(self, root, gzip_level):
        super().__init__(root, gzip_level)
        self.rows: list[list[str]] = []

    def subject_id(self, plan):
        site = (7, 23, 130)[plan.site]  # site number is part of PTID, as in ADNI
        return f"{site:03d}_S_{int(plan.cohort_id):04d}"

    def write_scan(self, plan, session, scan):
        num = int(deterministic_uid(plan.uid, session.label, scan.sequence)[5:12]) % 900_000 + 100_000
        desc = self.descriptions[scan.sequence]
        rel = f"images/ADNI_{plan.cohort_id}_MR_{desc}_S{num // 3}_I{num}.nii"
        self._nifti(rel, scan)
        self.rows.append(
            [
                plan.cohort_id,
                session.label,
                f"{plan.age_years:.1f}",
                f"{session.years_from_baseline:.3f}",
                "Female" if plan.sex == "F" else "Male",
                plan.diagnosis,
                session.date.isoformat(),
                desc.replace("_", " "),
                f"I{num}",
                rel,
            ]
        )
        return rel

    def finalize(self, plans):
        header = ["PTID", "VISCODE", "AGE", "Years_bl", "PTGENDER", "DX", "EXAMDATE", "Description", "Image_ID", "FILE"]
        self._write_text(_tsv, "manifest.csv", header, sorted(self.rows), ",")


# ----------------------------------------------------------------------------------------------------------------------
# DICOM (hospital PACS export of a glioma service)


class DicomPacs(Layout):
    """Hospital PACS export: ``PAT<nnnn>/STUDY_<session>/<NNN>_<SeriesDescription>/<hex>.dcm``, one series per
    folder, one slice per file, files in shuffled order, with real geometry and MR tags and fake but realistic PHI
    (PatientName, PatientID = MRN, PatientBirthDate, InstitutionName, ...). ``clinical.csv`` is keyed by MRN."""

    cohort = "dicom"
    series_number: ClassVar[dict[str, int]] = {"T1w": 3, "T2w": 5, "FLAIR": 7, "T1ce": 11, "DWI": 9}

    def __init__(self, root, gzip_level, seed: int = 0):
        super().__init__(root, gzip_level)
        self.seed = seed

    def subject_id(self, plan):
        return plan.identity["mrn"]

    def series_folder(self, plan: SubjectPlan, session: SessionPlan, scan: ScanOut) -> str:
        # Export folders are numbered, not named by MRN, date or accession: a user's paths are stored as given, so
        # the export (like a de-identifying PACS export) keeps identifiers out of them; the PHI lives in the headers.
        desc = re.sub(r"[^A-Za-z0-9]+", "_", protocol(scan.sequence, scan.scanner)["description"]).strip("_")
        return f"PAT{plan.index + 1:04d}/STUDY_{session.label}/{self.series_number[scan.sequence]:03d}_{desc}"

    def write_scan(self, plan, session, scan):
        from brainiac.ingestion.synthetic.subjects import rng_for

        rel = self.series_folder(plan, session, scan)
        p = protocol(scan.sequence, scan.scanner)
        ident = plan.identity
        age = int(plan.age_at(session))
        date = session.date.strftime("%Y%m%d")
        t = rng_for(self.seed, "dicom-time", plan.uid, session.label)
        time = f"{int(t.integers(7, 19)):02d}{int(t.integers(0, 60)):02d}{int(t.integers(0, 60)):02d}"
        key = f"{self.seed}|{plan.uid}|{session.label}"
        tags: dict[str, object] = {
            "PatientName": ident["name"],
            "PatientID": ident["mrn"],
            "PatientBirthDate": ident["birth_date"],
            "PatientSex": plan.sex,
            "PatientAge": f"{age:03d}Y",
            "StudyDate": date,
            "SeriesDate": date,
            "AcquisitionDate": date,
            "ContentDate": date,
            "StudyTime": time,
            "AccessionNumber": ident["accession"],
            "InstitutionName": ident["institution"],
            "ReferringPhysicianName": ident["referring"],
            "StudyInstanceUID": deterministic_uid(key, "study"),
            "FrameOfReferenceUID": deterministic_uid(key, "frame"),
            "StudyID": ident["accession"][-4:],
            "StudyDescription": "MRI BRAIN W/WO CONTRAST",
            "SeriesDescription": p["description"],
            "ProtocolName": p["description"],
            "SeriesNumber": self.series_number[scan.sequence],
            "Modality": "MR",
            "BodyPartExamined": "BRAIN",
            "PatientPosition": "HFS",
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
            "Manufacturer": scan.scanner.manufacturer,
            "ManufacturerModelName": scan.scanner.model,
            "MagneticFieldStrength": f"{scan.scanner.field_t:g}",
            "RepetitionTime": f"{p['tr_ms']:g}",
            "EchoTime": f"{p['te_ms']:g}",
            "FlipAngle": f"{p['flip_deg']:g}",
            "ScanningSequence": p["scanning_sequence"],
            "SequenceVariant": "SP\\MP" if p["mode"] == "3D" else "SK",
            "MRAcquisitionType": p["mode"],
            "WindowCenter": f"{scan.scanner.scale * 0.6 / scan.slope:.0f}",
            "WindowWidth": f"{scan.scanner.scale * 1.2 / scan.slope:.0f}",
        }
        if p["ti_ms"]:
            tags["InversionTime"] = f"{p['ti_ms']:g}"
        if scan.sequence == "T1ce":
            tags["ContrastBolusAgent"] = "GADOBUTROL"
        files = write_dicom_series(
            self.root / rel,
            scan.data,
            scan.acq.affine,
            tags=tags,
            uid_seed=f"{key}|{scan.sequence}",
            rescale_slope=scan.slope,
            file_order_rng=rng_for(self.seed, "dicom-order", plan.uid, session.label, scan.sequence),
        )
        self.files += len(files)
        return rel

    def finalize(self, plans):
        rows = []
        for p in sorted(plans, key=lambda p: p.cohort_id):
            idh = "n/a" if p.glioma is None else ("mutant" if p.glioma.idh_mutant else "wildtype")
            os_days = "" if p.survival_days is None else f"{p.survival_days:.0f}"
            status = "" if p.survival_days is None else ("alive" if p.survival_censored_days else "deceased")
            if p.survival_censored_days is not None:
                os_days = f"{p.survival_censored_days:.0f}"
            rows.append(
                [p.cohort_id, p.identity["name"].replace("^", " "), f"{int(p.age_years)}", p.sex, idh, os_days, status]
            )
        header = ["MRN", "PatientName", "AgeAtDiagnosis", "Sex", "IDH1", "OS_days", "VitalStatus"]
        self._write_text(_tsv, "clinical.csv", header, rows, ",")


LAYOUTS: dict[str, type[Layout]] = {
    "bids": BidsLifespan,
    "brats": Brats,
    "adni": AdniManifest,
    "dicom": DicomPacs,
    "stroke": BidsStroke,
}
