"""DICOM adapter and converter: geometry round-trips against a known RAS truth, quarantine of broken series, grouping
by SeriesInstanceUID, and no PHI in anything returned or written."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import shutil
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import axcodes2ornt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from brainiac.ingestion.adapters.base import Problem, SourceScan
from brainiac.ingestion.adapters.dicom import DicomAdapter
from brainiac.ingestion.dicom_convert import ConvertedSeries, convert_series, series_scan_id
from brainiac.ingestion.phi import pseudonymize_uid
from brainiac.platform.storage import StorageLocation

KEY = b"test-key-0123456789abcdef"

PHI = {
    "PatientName": "Quixote^Alonso^Q",
    "PatientID": "MRN-90817263",
    "PatientBirthDate": "19580312",
    "StudyDate": "20240105",
    "SeriesDate": "20240105",
    "AcquisitionDate": "20240105",
    "InstitutionName": "Hospital Santa Barbara de Zurbaran",
    "AccessionNumber": "ACC77125590",
    "ReferringPhysicianName": "Rocinante^Dr",
    "StudyDescription": "MRI BRAIN W/WO",
}
"""Fake identifying values written into every test series; none may come back out."""


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def truth_affine(axcodes: str, zooms, degrees: float, axis=(1.0, 0.4, 0.2), offset=(-41.3, 27.9, 13.1)) -> np.ndarray:
    """A RAS affine whose voxel axes follow ``axcodes``, scaled by ``zooms``, then rotated obliquely."""
    ornt = axcodes2ornt(tuple(axcodes))
    m = np.zeros((3, 3))
    for vox_axis, (ras_axis, sign) in enumerate(ornt):
        m[int(ras_axis), vox_axis] = sign * zooms[vox_axis]
    aff = np.eye(4)
    aff[:3, :3] = _rotation(axis, degrees) @ m
    aff[:3, 3] = offset
    return aff


def write_series(
    folder: Path,
    raw: np.ndarray,
    affine: np.ndarray,
    *,
    rng: np.random.Generator,
    slope: float = 1.0,
    intercept: float = 0.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    description: str = "T1 MPRAGE",
    skip: tuple[int, ...] = (),
    nudge: dict[int, float] | None = None,
    extra: dict[str, object] | None = None,
    suffix: str = ".dcm",
    syntax: str = ExplicitVRLittleEndian,
) -> dict[str, object]:
    """Write ``raw`` (uint16, voxel order of ``affine``) as one file per slice along axis 2, independently of the code
    under test: files in shuffled order, random names, InstanceNumber shuffled too; returns the UIDs used."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    zooms = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos, col_cos = lps[:3, 0] / zooms[0], lps[:3, 1] / zooms[1]
    normal = np.cross(row_cos, col_cos)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    nz = raw.shape[2]
    instance = rng.permutation(nz) + 1
    folder.mkdir(parents=True, exist_ok=True)
    sop_uids = []
    for k in rng.permutation(nz):
        k = int(k)
        if k in skip:
            continue
        ds = Dataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        sop_uids.append(ds.SOPInstanceUID)
        for name, value in PHI.items():
            setattr(ds, name, value)
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = description
        ds.SeriesNumber = 4
        ds.InstanceNumber = int(instance[k])
        ds.Modality = "MR"
        ds.Manufacturer = "SIEMENS"
        ds.ManufacturerModelName = "Prisma"
        ds.MagneticFieldStrength = "3"
        ds.RepetitionTime = "2300"
        ds.EchoTime = "2.98"
        pos = (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]
        if nudge and k in nudge:
            pos = pos + nudge[k] * zooms[2] * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [f"{zooms[1]:.6f}", f"{zooms[0]:.6f}"]
        ds.SliceThickness = "5.0"  # deliberately wrong: spacing must come from positions
        plane = np.ascontiguousarray(raw[:, :, k].T.astype(">u2" if syntax == ExplicitVRBigEndian else np.uint16))
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        for name, value in (extra or {}).items():
            setattr(ds, name, value)
        ds.PixelData = plane.tobytes()
        name = folder / f"{rng.bytes(8).hex().upper()}{suffix}"
        if syntax == "raw":  # an old ACR-NEMA-style file: no preamble, no DICM, no file meta, implicit VR
            del ds.file_meta
            pydicom.dcmwrite(name, ds, implicit_vr=True, little_endian=True)
            continue
        if syntax == RLELossless:
            ds.compress(RLELossless)  # encapsulated (compressed) pixel data
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        pydicom.dcmwrite(name, ds, enforce_file_format=True)
    return {"series": series_uid, "study": study_uid, "frame": frame_uid, "sop": sop_uids}


def _by_position(folder: Path) -> list[Path]:
    """The slice files of a series folder in order along the slice normal."""

    def distance(f: Path) -> float:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        iop = np.array(ds.ImageOrientationPatient, float)
        return float(np.dot(np.array(ds.ImagePositionPatient, float), np.cross(iop[:3], iop[3:])))

    return sorted(folder.iterdir(), key=distance)


def _scans(items) -> list[SourceScan]:
    return [i for i in items if isinstance(i, SourceScan)]


def _problems(items) -> list[Problem]:
    return [i for i in items if isinstance(i, Problem)]


def _corners(affine: np.ndarray, shape) -> np.ndarray:
    idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return (affine @ idx.T).T[:, :3]


def assert_same_image(img: nib.Nifti1Image, data: np.ndarray, affine: np.ndarray, atol_mm: float = 1e-3) -> None:
    """Same voxels at the same world positions: the 8 corner centres agree as sets, and after reorienting both to the
    closest canonical orientation the affines and arrays agree."""
    assert img.shape == data.shape  # (columns, rows, slices)
    got, want = _corners(img.affine, img.shape), _corners(affine, data.shape)
    dist = np.linalg.norm(want[:, None, :] - got[None, :, :], axis=2)
    assert dist.min(axis=1).max() < atol_mm, dist.min(axis=1)
    can_img = nib.as_closest_canonical(img)
    can_truth = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    assert can_img.shape == can_truth.shape
    np.testing.assert_allclose(can_img.affine, can_truth.affine, atol=atol_mm)
    np.testing.assert_allclose(can_img.get_fdata(), can_truth.get_fdata(), rtol=1e-6, atol=1e-4)


CASES = {
    # axcodes, zooms, oblique angle, shape, slope, intercept, expected dtype
    "LPS-oblique10-0.8x0.9x1.2": ("LPS", (0.8, 0.9, 1.2), 10.0, (7, 9, 6), 1.0, 0.0, "int16"),
    "LAS-lefthanded-1x1x3-rescaled": ("LAS", (1.0, 1.0, 3.0), 12.0, (8, 6, 5), 2.5, -10.0, "float32"),
    "PSR-sagittal-oblique": ("PSR", (1.1, 0.95, 1.4), -9.0, (6, 7, 5), 1.0, -1024.0, "int16"),
    "RIA-coronal": ("RIA", (0.7, 1.3, 2.0), 0.0, (5, 4, 6), 0.5, 0.0, "float32"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_geometry_round_trip(tmp_path, case):
    axcodes, zooms, degrees, shape, slope, intercept, dtype = CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    raw = rng.integers(0, 3000, size=shape).astype(np.uint16)
    affine = truth_affine(axcodes, zooms, degrees)
    write_series(tmp_path / "src" / "exam", raw, affine, rng=rng, slope=slope, intercept=intercept)
    root = StorageLocation.resolve(tmp_path / "src")
    items = list(DicomAdapter(KEY).discover(root, "ds"))
    assert not _problems(items)
    (scan,) = _scans(items)
    assert scan.format == "dicom" and len(scan.files) == shape[2]
    assert scan.meta["slice_step_mm"] == pytest.approx(zooms[2], abs=1e-4)  # not SliceThickness (5.0)
    out = convert_series(scan, StorageLocation.resolve(tmp_path / "raw"), "ds/x/{scan_id}.nii.gz")
    assert isinstance(out, ConvertedSeries), out
    assert out.dtype == dtype and out.n_slices == shape[2]
    assert Path(out.nifti_uri).name == f"{out.scan_id}.nii.gz" and Path(out.nifti_uri).stat().st_size == out.bytes
    img = nib.load(out.nifti_uri)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.get_sform(), img.get_qform(), atol=1e-4)
    np.testing.assert_allclose(np.array(out.affine).reshape(4, 4), img.affine, atol=1e-6)
    assert out.axcodes == "".join(nib.aff2axcodes(img.affine))
    assert sorted(out.spacing_mm) == pytest.approx(sorted(zooms), abs=1e-4)
    assert img.get_data_dtype() == np.dtype(dtype)
    assert_same_image(img, raw.astype(np.float64) * slope + intercept, affine)


def test_synthetic_writer_series_matches_truth_and_simpleitk(tmp_path):
    """The cohort writer's series (shuffled, hashed names) converts to its truth; SimpleITK's GDCM reader agrees."""
    import SimpleITK as sitk

    from brainiac.ingestion.synthetic.writers import write_dicom_series

    rng = np.random.default_rng(7)
    data = rng.integers(0, 4000, size=(9, 8, 7)).astype(np.uint16)
    affine = truth_affine("RAS", (0.9, 0.9, 1.2), 10.0, axis=(0.2, 1.0, 0.3))
    tags = {k: v for k, v in PHI.items()} | {"PatientSex": "M", "Modality": "MR", "SeriesDescription": "AX FLAIR"}
    write_dicom_series(
        tmp_path / "pacs" / "s1", data, affine, tags=tags, uid_seed="x", rescale_slope=2.0, file_order_rng=rng
    )
    (scan,) = _scans(DicomAdapter(KEY).discover(StorageLocation.resolve(tmp_path / "pacs"), "ds"))
    out = convert_series(scan, StorageLocation.resolve(tmp_path / "raw"), "a.nii")
    assert isinstance(out, ConvertedSeries), out
    img = nib.load(out.nifti_uri)
    assert_same_image(img, data.astype(np.float64) * 2.0, affine)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "pacs" / "s1")))
    ref = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(ref.GetDirection()).reshape(3, 3) * np.array(ref.GetSpacing())
    lps[:3, 3] = ref.GetOrigin()
    sitk_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    sitk_data = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)  # sitk arrays are (k, j, i)
    assert_same_image(img, sitk_data.astype(np.float64), sitk_ras)


def test_missing_and_irregular_slices_are_quarantined(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 100, size=(5, 5, 8)).astype(np.uint16)
    affine = truth_affine("LPS", (1.0, 1.0, 1.5), 10.0)
    write_series(tmp_path / "src" / "gap", raw, affine, rng=rng, skip=(4,))
    write_series(tmp_path / "src" / "irregular", raw, affine, rng=rng, nudge={5: 0.3})
    write_series(tmp_path / "src" / "ok", raw, affine, rng=rng)
    root = StorageLocation.resolve(tmp_path / "src")
    items = list(DicomAdapter(KEY).discover(root, "ds"))
    problems = {Path(p.source_uri).name: p for p in _problems(items)}
    assert set(problems) == {"gap", "irregular"}
    assert all(p.reason == "dicom_missing_slices" for p in problems.values())
    assert "gap of 3.000 mm" in problems["gap"].detail and "irregular" in problems["irregular"].detail
    assert [Path(s.source_uri).name for s in _scans(items)] == ["ok"]

    # the converter checks on its own, whatever the caller hands it
    files = sorted(str(p) for p in (tmp_path / "src" / "gap").iterdir())
    scan = SourceScan("ds", "dicom", str(tmp_path / "src" / "gap"), "gap", "x", files=files, format="dicom")
    out = convert_series(scan, StorageLocation.resolve(tmp_path / "raw"), "gap.nii.gz")
    assert isinstance(out, Problem) and out.reason == "dicom_missing_slices"
    assert not (tmp_path / "raw").exists()


def test_bad_files_are_quarantined_without_losing_good_neighbours(tmp_path):
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 100, size=(4, 5, 4)).astype(np.uint16)
    affine = truth_affine("LPS", (1.0, 1.0, 1.0), 5.0)
    folder = tmp_path / "src" / "mixed"
    good = write_series(folder, raw, affine, rng=rng)
    good_files = sorted(str(p) for p in folder.iterdir())
    first = Path(good_files[0])
    (folder / "garbage.dcm").write_bytes(b"\x00\x01 definitely not dicom" * 10)
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "cut.dcm").write_bytes(first.read_bytes()[:200])  # DICM magic, header cut inside the file meta
    (folder / "clinical.csv").write_text(f"MRN,PatientName\n{PHI['PatientID']},{PHI['PatientName']}\n")
    (folder / "README").write_text("exported by PACS\n")  # no suffix, no magic: not DICOM, not a problem
    # a non-image object in the same folder: its own series, no pixel data
    ds = pydicom.dcmread(first)
    del ds.PixelData
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    pydicom.dcmwrite(folder / "report.dcm", ds, enforce_file_format=True)
    # a series whose middle slice lost the end of its pixel data
    trunc = write_series(tmp_path / "src" / "trunc", raw, affine, rng=rng)
    victim = sorted((tmp_path / "src" / "trunc").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-7])

    items = list(DicomAdapter(KEY).discover(StorageLocation.resolve(tmp_path / "src"), "ds"))
    reasons = {(Path(p.source_uri.split("#")[0]).name, p.reason) for p in _problems(items)}
    assert reasons == {
        ("garbage.dcm", "dicom_unreadable"),
        ("empty.dcm", "empty_file"),
        ("cut.dcm", "dicom_unreadable"),
        ("mixed", "dicom_no_pixels"),
        ("trunc", "truncated"),
    }
    (scan,) = _scans(items)
    assert scan.meta["series"] == pseudonymize_uid(KEY, str(good["series"]), "series")
    assert scan.source_uri == f"{folder}#{scan.meta['series']}"  # the folder holds two series
    assert sorted(scan.files) == good_files
    out = convert_series(scan, StorageLocation.resolve(tmp_path / "raw"), "good.nii.gz")
    assert isinstance(out, ConvertedSeries)
    assert_same_image(nib.load(out.nifti_uri), raw.astype(float), affine)
    assert trunc["series"]  # (its series was reported above as truncated)

    # a slice deleted after discovery is a missing file for the converter
    Path(scan.files[1]).unlink()
    gone = convert_series(scan, StorageLocation.resolve(tmp_path / "raw"), "again.nii.gz")
    assert isinstance(gone, Problem) and gone.reason == "missing_file"


def test_grouping_is_by_series_uid_not_folder(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 100, size=(4, 4, 5)).astype(np.uint16)
    b = rng.integers(0, 100, size=(6, 5, 3)).astype(np.uint16)
    aff_a, aff_b = truth_affine("LPS", (1, 1, 2), 0.0), truth_affine("PSR", (1, 1, 1.5), 10.0)
    study = generate_uid()
    ua = write_series(tmp_path / "src" / "flat", a, aff_a, rng=rng, study_uid=study, description="AX T2")
    ub = write_series(tmp_path / "src" / "flat", b, aff_b, rng=rng, study_uid=study, description="SAG FLAIR")
    # one series split over two folders is still one series
    c = rng.integers(0, 100, size=(4, 4, 6)).astype(np.uint16)
    uc = write_series(tmp_path / "src" / "split" / "part1", c, aff_a, rng=rng, description="T1")
    part1, part2 = tmp_path / "src" / "split" / "part1", tmp_path / "src" / "split" / "part2"
    part2.mkdir()
    for f in sorted(part1.iterdir())[:3]:
        f.rename(part2 / f.name)

    items = list(DicomAdapter(KEY).discover(StorageLocation.resolve(tmp_path / "src"), "ds"))
    assert not _problems(items)
    scans = {s.sequence_hints["description"]: s for s in _scans(items)}
    assert set(scans) == {"AX T2", "SAG FLAIR", "T1"}
    assert len(scans["AX T2"].files) == 5 and len(scans["SAG FLAIR"].files) == 3 and len(scans["T1"].files) == 6
    assert scans["AX T2"].source_uri != scans["SAG FLAIR"].source_uri
    assert scans["AX T2"].relative_path.startswith("flat#series-")
    assert scans["T1"].source_uri == str(tmp_path / "src" / "split") and scans["T1"].relative_path == "split"
    assert scans["AX T2"].session == scans["SAG FLAIR"].session == pseudonymize_uid(KEY, study, "study")
    assert scans["T1"].session != scans["AX T2"].session
    assert scans["AX T2"].meta["series"] == pseudonymize_uid(KEY, str(ua["series"]), "series")
    assert scans["SAG FLAIR"].meta["series"] == pseudonymize_uid(KEY, str(ub["series"]), "series")
    assert uc["series"]
    raw_area = StorageLocation.resolve(tmp_path / "raw")
    for desc, data, aff in (("AX T2", a, aff_a), ("SAG FLAIR", b, aff_b), ("T1", c, aff_a)):
        out = convert_series(scans[desc], raw_area, f"{desc.replace(' ', '_')}.nii.gz")
        assert isinstance(out, ConvertedSeries)
        assert_same_image(nib.load(out.nifti_uri), data.astype(float), aff)


def test_scan_id_is_content_identity(tmp_path):
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 100, size=(4, 4, 4)).astype(np.uint16)
    write_series(tmp_path / "one", raw, truth_affine("LPS", (1, 1, 1), 0.0), rng=rng)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    for i, f in enumerate(sorted((tmp_path / "two").iterdir())):  # same bytes, other names
        f.rename(f.with_name(f"IM{i:04d}"))
    raw_area = StorageLocation.resolve(tmp_path / "raw")
    ids = []
    for name in ("one", "two"):
        (scan,) = _scans(DicomAdapter(KEY).discover(StorageLocation.resolve(tmp_path / name), "ds"))
        assert scan.source_uri == str(tmp_path / name) and scan.relative_path == ""  # the series is the root
        out = convert_series(scan, raw_area, f"{name}.nii.gz")
        assert isinstance(out, ConvertedSeries)
        ids.append(out.scan_id)
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in (tmp_path / "one").iterdir()]
    assert ids[0] == ids[1] == series_scan_id(digests)
    assert (raw_area.join("one.nii.gz").fsspec().cat_file(raw_area.join("one.nii.gz").path)) == (
        Path(raw_area.join("two.nii.gz").path).read_bytes()
    )  # deterministic output bytes


def test_no_phi_in_anything_returned_or_written(tmp_path, caplog):
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 1000, size=(6, 5, 4)).astype(np.uint16)
    bad_uid = "1.2.840.0777.0042"  # a malformed UID (leading zeros): pydicom's validation would quote it in a log
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = {"OperatorsName": "Panza^Sancho", "StationName": "MRI-BARATARIA"}
        affine = truth_affine("LPS", (1, 1, 2), 10.0)
        uids = write_series(tmp_path / "src" / "exam", raw, affine, rng=rng, study_uid=bad_uid, extra=extra)
    (tmp_path / "src" / "exam" / "broken.dcm").write_bytes(b"junk")
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # only what reading and converting log counts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(DicomAdapter(KEY).discover(StorageLocation.resolve(tmp_path / "src"), "ds"))
        (scan,) = _scans(items)
        out = convert_series(scan, StorageLocation.resolve(tmp_path / "raw"), "sub-x/ses-y/t1.nii.gz")
    logged = "\n".join([str(w.message) for w in caught] + [r.getMessage() for r in caplog.records])
    assert scan.subject == PHI["PatientID"]  # raw, in memory only: the caller pseudonymizes it
    exact = (np.datetime64("2024-01-05") - np.datetime64("1958-03-12")).astype(int) / 365.25
    assert scan.meta["age"] == round(exact, 1) != round(exact, 3)  # coarsened: an age to the day is a birth date
    assert scan.meta["sex"] == "F" and scan.meta["manufacturer"] == "SIEMENS" and scan.meta["field_strength"] == 3.0
    assert scan.meta["tr_ms"] == 2300.0 and scan.meta["te_ms"] == 2.98
    assert isinstance(out, ConvertedSeries)

    returned = [dataclasses.asdict(i) for i in items] + [dataclasses.asdict(out)]
    for record in returned:
        record.pop("subject", None)
    text = json.dumps(returned, default=str)
    nifti = gzip.decompress(Path(out.nifti_uri).read_bytes())
    secrets = [
        *PHI.values(),
        "Panza",
        "BARATARIA",
        "Quixote",
        "1958-03-12",
        "2024-01-05",
        uids["study"],
        uids["series"],
        uids["frame"],
        *uids["sop"],
    ]
    for secret in secrets:
        assert str(secret) not in text, secret
        assert str(secret) not in logged, secret
        assert str(secret).encode() not in nifti, secret
    hdr = nib.load(out.nifti_uri).header
    assert bytes(hdr["descrip"]).strip(b"\x00") == b"" and bytes(hdr["aux_file"]).strip(b"\x00") == b""
    assert not hdr.extensions
    assert "age_years" in out.header and "PatientBirthDate" not in out.header
    json.dumps(out.header)  # JSON-able as it is


def test_detect(tmp_path):
    rng = np.random.default_rng(6)
    raw = rng.integers(0, 100, size=(3, 3, 3)).astype(np.uint16)
    adapter = DicomAdapter(KEY)
    write_series(tmp_path / "dcm" / "a", raw, np.eye(4), rng=rng)
    write_series(tmp_path / "nosuffix" / "a", raw, np.eye(4), rng=rng, suffix="")
    (tmp_path / "nosuffix" / "notes.txt").write_text("x")
    nib.save(nib.Nifti1Image(raw, np.eye(4)), tmp_path / "dcm_and_nifti.nii.gz")
    (tmp_path / "empty").mkdir()
    assert adapter.detect(StorageLocation.resolve(tmp_path / "dcm"))
    assert adapter.detect(StorageLocation.resolve(tmp_path / "nosuffix"))
    assert not adapter.detect(StorageLocation.resolve(tmp_path / "empty"))
    assert not adapter.detect(StorageLocation.resolve(tmp_path))  # a NIfTI at the root: another layout
    (scan,) = _scans(adapter.discover(StorageLocation.resolve(tmp_path / "nosuffix"), "ds"))
    assert len(scan.files) == 3


def test_four_d_and_localizer_series_are_not_volumes(tmp_path):
    rng = np.random.default_rng(8)
    raw = rng.integers(0, 100, size=(4, 4, 3)).astype(np.uint16)
    series = generate_uid()
    for echo in (1, 2):  # two echoes at the same positions in one series
        write_series(tmp_path / "src" / "me", raw, np.eye(4), rng=rng, series_uid=series, extra={"EchoNumbers": echo})
    loc = generate_uid()
    for codes in ("LPS", "PSR", "LSA"):  # a 3-plane localizer: one slice per plane
        write_series(
            tmp_path / "src" / "loc", raw[:, :, :1], truth_affine(codes, (1, 1, 1), 0), rng=rng, series_uid=loc
        )
    items = list(DicomAdapter(KEY).discover(StorageLocation.resolve(tmp_path / "src"), "ds"))
    reasons = {Path(p.source_uri).name: (p.reason, p.detail) for p in _problems(items)}
    assert not _scans(items)
    assert reasons["me"][0] == "not_3d" and "4-D" in reasons["me"][1]
    assert reasons["loc"][0] == "not_3d" and "orientation" in reasons["loc"][1]


def test_s3_source_and_raw_area(tmp_path, s3_options, s3_bucket):
    rng = np.random.default_rng(9)
    raw = rng.integers(0, 500, size=(5, 4, 4)).astype(np.uint16)
    affine = truth_affine("LAS", (0.9, 0.9, 1.2), 10.0)
    write_series(tmp_path / "src" / "exam" / "s1", raw, affine, rng=rng)
    root = StorageLocation.resolve(f"s3://{s3_bucket}/cohort", s3_options)
    fs = root.fsspec()
    for f in (tmp_path / "src").rglob("*.dcm"):
        fs.put_file(str(f), f"{root.path}/{f.relative_to(tmp_path / 'src').as_posix()}")
    adapter = DicomAdapter(KEY)
    assert adapter.detect(root)
    (scan,) = _scans(adapter.discover(root, "ds"))
    assert scan.source_uri == f"s3://{s3_bucket}/cohort/exam/s1" and scan.relative_path == "exam/s1"
    assert all(f.startswith(f"s3://{s3_bucket}/cohort/exam/s1/") for f in scan.files)
    raw_area = StorageLocation.resolve(f"s3://{s3_bucket}/lake/raw", s3_options)
    out = convert_series(scan, raw_area, "ds/{scan_id}.nii.gz", source=root)
    assert isinstance(out, ConvertedSeries) and out.nifti_uri.startswith(f"s3://{s3_bucket}/lake/raw/ds/")
    local = tmp_path / "back.nii.gz"
    local.write_bytes(fs.cat_file(out.nifti_uri[len("s3://") :]))
    assert local.stat().st_size == out.bytes
    assert_same_image(nib.load(local), raw.astype(float), affine)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")  # the cut RLE file, on purpose
@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless, "raw"], ids=str
)
def test_transfer_syntaxes(tmp_path, syntax):
    """Header-only discovery finds the pixel data (and its truncation) in every encoding; the converter decodes it."""
    rng = np.random.default_rng(10)
    raw = rng.integers(0, 4000, size=(6, 5, 4)).astype(np.uint16)
    affine = truth_affine("LAS", (0.9, 1.1, 1.3), 10.0)
    write_series(tmp_path / "src" / "ok", raw, affine, rng=rng, syntax=syntax)
    write_series(tmp_path / "src" / "cut", raw, affine, rng=rng, syntax=syntax)
    victim = _by_position(tmp_path / "src" / "cut")[1]  # a middle slice
    victim.write_bytes(victim.read_bytes()[:-9])
    items = list(DicomAdapter(KEY).discover(StorageLocation.resolve(tmp_path / "src"), "ds"))
    scans = {Path(s.source_uri).name: s for s in _scans(items)}
    problems = sorted((Path(p.source_uri).name, p.reason) for p in _problems(items))
    raw_area = StorageLocation.resolve(tmp_path / "raw")
    if syntax == RLELossless:  # compressed frames carry no length to check: the converter finds the cut file
        assert not problems and set(scans) == {"ok", "cut"}
        bad = convert_series(scans["cut"], raw_area, "cut.nii.gz")
        assert isinstance(bad, Problem) and bad.reason == "dicom_unreadable", bad
    elif syntax == DeflatedExplicitVRLittleEndian:  # a cut deflate stream hides even the series UID
        assert problems == [(victim.name, "dicom_unreadable"), ("cut", "dicom_missing_slices")]
        assert set(scans) == {"ok"}
    else:  # native pixel data: discovery checks its length against Rows × Columns × bits
        assert problems == [("cut", "truncated")]
        assert set(scans) == {"ok"}
    out = convert_series(scans["ok"], raw_area, "x.nii.gz")
    assert isinstance(out, ConvertedSeries), out
    assert_same_image(nib.load(out.nifti_uri), raw.astype(float), affine)
