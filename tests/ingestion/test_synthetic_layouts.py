"""The synthetic cohort is written in the real conventions it claims, every file opens, and the truth matches the files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from brainiac.ingestion.synthetic import DATASET_FOLDERS, TRUTH_COLUMNS


def _truth(summary) -> pd.DataFrame:
    return pd.read_csv(summary.truth, keep_default_na=False, na_values=[""], dtype={"cohort_subject_id": str})


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_summary_and_folders(synth_small):
    s = synth_small
    assert s.cohorts == DATASET_FOLDERS
    assert sorted(p.name for p in s.out_dir.iterdir()) == sorted([*DATASET_FOLDERS.values(), "_truth"])
    assert s.n_subjects == 15
    assert all(c["subjects"] >= 3 for c in s.per_cohort.values())
    assert s.per_cohort["dicom"]["subjects"] > 3  # the cross-dataset duplicates are extra entries
    n_files = sum(1 for p in s.out_dir.rglob("*") if p.is_file())
    assert s.n_files == n_files
    assert s.truth == s.out_dir / "_truth" / "scans.csv"


def test_every_file_opens(synth_small):
    readers = {".nii": nib.load, ".gz": nib.load, ".dcm": pydicom.dcmread}
    for folder in synth_small.cohorts.values():
        for path in _files(synth_small.out_dir / folder):
            if path.suffix in (".json",):
                json.loads(path.read_text())
            elif path.suffix in (".tsv", ".csv"):
                assert len(pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")) > 0, path
            elif path.name == "README":
                assert path.read_text()
            elif path.suffix == ".dcm":
                ds = pydicom.dcmread(path)
                assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
            else:
                img = readers[path.suffix](path)
                assert np.isfinite(np.asarray(img.dataobj)).all(), path


def test_truth_covers_every_image_and_nothing_else(synth_small):
    t = _truth(synth_small)
    assert list(t.columns) == list(TRUTH_COLUMNS)
    out = synth_small.out_dir
    listed = set()
    for _, r in t.iterrows():
        target = out / r.dataset / r.path
        assert target.exists(), target
        if r.format == "dicom":
            assert target.is_dir() and len(list(target.glob("*.dcm"))) == r.n_files
            listed.update(target.glob("*.dcm"))
        else:
            listed.add(target)
        for col in ("mask_path", "tissue_path", "label_path"):
            if isinstance(r[col], str) and r[col]:
                assert (out / "_truth" / r[col]).is_file(), r[col]
    images = {p for f in synth_small.cohorts.values() for p in _files(out / f) if p.suffix in (".nii", ".gz", ".dcm")}
    assert images == listed
    assert t.age_years.between(5, 95).all()
    assert set(t.sex) == {"F", "M"}


def test_bids_conventions(synth_small):
    for cohort, age_col in (("bids", "age"), ("stroke", "age_at_scan")):
        root = synth_small.out_dir / DATASET_FOLDERS[cohort]
        desc = json.loads((root / "dataset_description.json").read_text())
        assert desc["BIDSVersion"] and desc["Name"] and desc["DatasetType"] == "raw"
        parts = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str)
        assert parts.columns[0] == "participant_id" and age_col in parts.columns
        assert "age" in parts.columns if cohort == "bids" else "age" not in parts.columns  # names vary by cohort
        subjects = {p.name for p in root.glob("sub-*") if p.is_dir()}
        assert subjects == set(parts.participant_id)
        images = [p for p in root.rglob("*.nii*") if "derivatives" not in p.parts]
        assert images
        pattern = re.compile(
            r"(sub-[a-zA-Z0-9]+)/(ses-[a-zA-Z0-9]+)/(anat|dwi)/\1_\2(_ce-gadolinium)?_(T1w|T2w|FLAIR|dwi)\.nii(\.gz)?$"
        )
        for img in images:
            rel = img.relative_to(root).as_posix()
            assert pattern.fullmatch(rel), rel
            side = json.loads(img.with_name(img.name.split(".")[0] + ".json").read_text())
            for key in (
                "MagneticFieldStrength",
                "Manufacturer",
                "ManufacturersModelName",
                "EchoTime",
                "RepetitionTime",
            ):
                assert key in side, (rel, key)
            assert side["EchoTime"] < 1 and side["RepetitionTime"] < 20  # seconds, as BIDS wants
    stroke = synth_small.out_dir / DATASET_FOLDERS["stroke"]
    assert "time_since_stroke_days" in pd.read_csv(stroke / "participants.tsv", sep="\t").columns
    for mask in (stroke / "derivatives" / "lesion_masks").rglob("*_mask.nii.gz"):
        sub, ses = mask.name.split("_")[:2]
        t1 = stroke / sub / ses / "anat" / f"{sub}_{ses}_T1w.nii.gz"
        m, ref = nib.load(mask), nib.load(t1)
        assert m.shape == ref.shape and np.allclose(m.affine, ref.affine)
        assert set(np.unique(np.asarray(m.dataobj))) <= {0, 1} and np.asarray(m.dataobj).any()


def test_brats_conventions(synth_small):
    root = synth_small.out_dir / DATASET_FOLDERS["brats"]
    cases = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(cases) == 3
    for case in cases:
        names = sorted(p.name for p in (root / case).iterdir())
        assert names == sorted(f"{case}_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair", "seg"))
        imgs = [nib.load(root / case / n) for n in names]
        assert all(i.shape == imgs[0].shape and np.allclose(i.affine, imgs[0].affine) for i in imgs)
        assert "".join(nib.aff2axcodes(imgs[0].affine)) == "LPS"
        seg = np.asarray(nib.load(root / case / f"{case}_seg.nii.gz").dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2, 4} and (seg > 0).any()
        flair = np.asarray(nib.load(root / case / f"{case}_flair.nii.gz").dataobj)
        assert flair[seg > 0].min() >= 0
    surv = pd.read_csv(root / "survival_info.csv", dtype=str)
    idh = pd.read_csv(root / "idh_status.csv", dtype=str)
    assert list(surv.columns) == ["Brats20ID", "Age", "Survival_days", "Extent_of_Resection"]
    assert list(idh.columns) == ["BraTS21ID", "IDH"]
    numbers = {int(c.rsplit("_", 1)[1]) for c in cases}
    assert not set(idh.BraTS21ID) & set(cases)  # ids formatted unlike the folders ...
    assert {int(v) for v in idh.BraTS21ID} == numbers  # ... but they map by number
    assert {int(v.rsplit("_", 1)[1]) for v in surv.Brats20ID} <= numbers
    assert idh.IDH.str.match(r"^(wildtype|mutant \(IDH[12].*\))$").all()


def test_adni_manifest(synth_small):
    root = synth_small.out_dir / DATASET_FOLDERS["adni"]
    m = pd.read_csv(root / "manifest.csv", dtype=str)
    for col in ("PTID", "VISCODE", "AGE", "PTGENDER", "DX", "EXAMDATE", "FILE"):
        assert col in m.columns
    assert m.PTID.str.fullmatch(r"\d{3}_S_\d{4}").all()
    assert set(m.DX) <= {"CN", "MCI"} and set(m.PTGENDER) <= {"Male", "Female"}
    assert set(m.VISCODE) <= {"bl", "m12"}
    assert pd.to_datetime(m.EXAMDATE, format="%Y-%m-%d").notna().all()
    files = {p.relative_to(root).as_posix() for p in (root / "images").iterdir()}
    assert files == set(m.FILE)  # relative paths, every file listed once
    assert all(not Path(f).is_absolute() and f.endswith(".nii") for f in m.FILE)


def test_dicom_series(synth_small):
    root = synth_small.out_dir / DATASET_FOLDERS["dicom"]
    t = _truth(synth_small)
    t = t[t.cohort == "dicom"]
    series_uids = set()
    for _, r in t.iterrows():
        folder = root / r.path
        files = sorted(folder.glob("*.dcm"))
        ds = [pydicom.dcmread(f) for f in files]
        assert len({d.SeriesInstanceUID for d in ds}) == 1  # one series per folder
        series_uids.add(ds[0].SeriesInstanceUID)
        for d in ds:
            for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                        "PatientName", "PatientBirthDate", "PatientID", "MagneticFieldStrength", "Manufacturer",
                        "EchoTime", "RepetitionTime", "StudyDate", "StudyInstanceUID"):  # fmt: skip
                assert tag in d, (folder, tag)
        instance = [int(d.InstanceNumber) for d in ds]
        assert sorted(instance) == list(range(1, len(ds) + 1))
        assert instance != sorted(instance)  # file names do not follow slice order
        # geometry: slice k sits at affine @ (0, 0, k) in LPS
        affine = np.array(json.loads(r.affine)).reshape(4, 4)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        for d in ds:
            expect = lps @ np.array([0.0, 0.0, int(d.InstanceNumber) - 1, 1.0])
            np.testing.assert_allclose([float(v) for v in d.ImagePositionPatient], expect[:3], atol=1e-3)
        first = ds[0]
        assert re.fullmatch(r"[A-Za-z'-]+\^[A-Za-z]+\^[A-Z]", str(first.PatientName))
        assert re.fullmatch(r"\d{8}", first.PatientBirthDate) and first.PatientID == r.cohort_subject_id
        birth = pd.Timestamp(first.PatientBirthDate)
        study = pd.Timestamp(first.StudyDate)
        assert abs((study - birth).days / 365.25 - r.age_years) < 0.1
    assert len(series_uids) == len(t)
    clinical = pd.read_csv(root / "clinical.csv", dtype=str)
    assert set(clinical.MRN) == set(t.cohort_subject_id.astype(str))
    # Export folders are numbered: identifiers live in the headers, never in the paths a catalog stores as given.
    folders = {p.name for p in root.iterdir() if p.is_dir()}
    assert all(re.fullmatch(r"PAT\d{4}", f) for f in folders) and not folders & set(clinical.MRN)


def test_cross_dataset_duplicates_are_the_same_image(synth_small):
    t = _truth(synth_small)
    dups = t[t.duplicate_of.notna()]
    assert len(dups) >= 4 and set(dups.cohort) == {"dicom"}
    out = synth_small.out_dir
    for _, r in dups.iterrows():
        assert r.duplicate_of.startswith("brats/")
        orig = t[(t.cohort == "brats") & (t.path == r.duplicate_of.split("/", 1)[1])].iloc[0]
        assert orig.subject_uid == r.subject_uid and orig.sequence == r.sequence
        assert r.axcodes != orig.axcodes or r.shape != orig.shape
        # rebuild the DICOM volume and compare it voxel by voxel with the BraTS file in millimetres
        ds = sorted(
            (pydicom.dcmread(f) for f in (out / r.dataset / r.path).glob("*.dcm")), key=lambda d: d.InstanceNumber
        )
        vol = np.stack([d.pixel_array.T * float(d.RescaleSlope) for d in ds], axis=-1)
        affine = np.array(json.loads(r.affine)).reshape(4, 4)
        src = nib.load(out / orig.dataset / orig.path)
        src_data = np.asarray(src.dataobj)
        ijk = np.indices(vol.shape).reshape(3, -1)
        src_ijk = np.rint(np.linalg.inv(src.affine) @ affine @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3].astype(int)
        np.testing.assert_array_equal(vol.reshape(-1), src_data[tuple(src_ijk)])


def test_no_absolute_paths_or_run_times(synth_small):
    out = synth_small.out_dir
    needles = [str(out), str(out.resolve()), "/tmp/", str(Path.home())]
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".csv", ".tsv", ".json", ".md", "") and path.name != "":
            text = path.read_text(encoding="utf-8")
            assert not any(n in text for n in needles), path
    for path in out.rglob("*.nii.gz"):
        raw = path.read_bytes()
        assert raw[4:8] == b"\x00\x00\x00\x00"  # gzip MTIME field is 0
        break


def test_truth_geometry_is_consistent(synth_small):
    """Masks share their scan's grid; the template brain moved by the true rigid transform covers the true mask."""
    from brainiac.ingestion.synthetic.anatomy import HEAD_CENTER_MM, base_anatomy

    anat = base_anatomy(3.0)
    t = _truth(synth_small)
    for _, r in t[(t.kind == "image") & (t.format == "nifti")].groupby("cohort").head(2).iterrows():
        img = nib.load(synth_small.out_dir / r.dataset / r.path)
        mask = nib.load(synth_small.out_dir / "_truth" / r.mask_path)
        assert mask.shape == img.shape and np.allclose(mask.affine, img.affine)
        assert np.allclose(img.affine, np.array(json.loads(r.affine)).reshape(4, 4), atol=1e-3)
        assert "".join(nib.aff2axcodes(img.affine)) == r.axcodes
        assert np.allclose(img.header.get_zooms(), json.loads(r.voxel_size_mm), atol=1e-3)
        rigid = np.array(json.loads(r.rigid_transform)).reshape(4, 4)
        # template brain voxels -> subject mm (head scale about the head centre) -> scanner mm -> scan voxels
        pts = np.argwhere(anat.mask > 0.5).T
        mm = anat.affine @ np.vstack([pts, np.ones(pts.shape[1])])
        mm[:3] = HEAD_CENTER_MM[:, None] + (mm[:3] - HEAD_CENTER_MM[:, None]) * r.head_scale
        ijk = np.rint(np.linalg.inv(img.affine) @ rigid @ mm)[:3].astype(int)
        ok = np.all((ijk >= 0) & (ijk < np.array(img.shape)[:, None]), axis=0)
        m = np.asarray(mask.dataobj) > 0
        hit = m[tuple(ijk[:, ok])].mean()
        assert hit > 0.85, (r.path, hit)  # misses come only from the 3-6 mm deformation
        assert not np.isclose(rigid, np.eye(4)).all()


@pytest.mark.parametrize("preset", ["tiny"])
def test_skull_presence_matches_truth(synth_small, preset):
    t = _truth(synth_small)
    t = t[(t.kind == "image") & (t.format == "nifti")]
    assert set(t.skull_present) == {True, False}
    for _, r in t.iterrows():
        data = np.asarray(nib.load(synth_small.out_dir / r.dataset / r.path).dataobj, dtype=np.float32)
        tissue = np.asarray(nib.load(synth_small.out_dir / "_truth" / r.tissue_path).dataobj)
        if r.skull_present:
            assert data[np.isin(tissue, (4, 5))].mean() > 0.05 * data[tissue == 3].mean()
        else:
            mask = np.asarray(nib.load(synth_small.out_dir / "_truth" / r.mask_path).dataobj) > 0
            assert data[~mask].max() == 0
