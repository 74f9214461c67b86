"""PHI: only allow-listed DICOM attributes survive; UIDs are keyed pseudonyms; dates become ages capped at 90."""

from __future__ import annotations

import json

import pydicom
from pydicom.dataset import Dataset

from brainiac.ingestion.phi import PHI_DICOM_KEYWORDS, age_from_dates, pseudonymize_uid, safe_dicom_header


def _fake_dicom() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-0012345"
    ds.PatientBirthDate = "19480312"
    ds.StudyDate = "20210105"
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesDescription = "Jane Doe T1 MPRAGE"
    ds.Manufacturer = "SIEMENS"
    ds.MagneticFieldStrength = 3
    ds.EchoTime = 2.98
    ds.PixelSpacing = [0.9, 0.9]
    ds.PatientSex = "F"
    ds.add_new(0x00291010, "OB", b"\x00private")
    return ds


def test_only_allow_listed_attributes_survive():
    ds = _fake_dicom()
    header = safe_dicom_header(ds)
    text = json.dumps(header)
    for secret in ["Doe", "Jane", "MRN-0012345", "1948", "20210105", "Elsewhere", str(ds.StudyInstanceUID), "private"]:
        assert secret not in text, secret
    assert not PHI_DICOM_KEYWORDS & set(header)
    assert header["Manufacturer"] == "SIEMENS" and header["PixelSpacing"] == [0.9, 0.9] and header["PatientSex"] == "F"
    assert header["age_years"] == 72.8  # derived from birth and study dates, which are dropped; 0.1 year, not the day


def test_age_rules():
    assert safe_dicom_header({"PatientAge": "095Y"})["age_years"] == 90.0
    assert age_from_dates("19000101", "20200101") == 90.0
    assert age_from_dates("20200101", "19990101") is None and age_from_dates("", "20200101") is None


def test_uid_pseudonyms_are_keyed_and_stable():
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert pseudonymize_uid(b"k1" * 16, uid) == pseudonymize_uid(b"k1" * 16, uid)
    assert pseudonymize_uid(b"k1" * 16, uid) != pseudonymize_uid(b"k2" * 16, uid)
    assert uid not in pseudonymize_uid(b"k1" * 16, uid, kind="series")


def test_free_text_on_the_allow_list_is_dropped_and_contrast_kept_as_a_flag():
    """PS3.15's basic profile removes free text; on our allow-list only numbers and coded values survive."""
    header = safe_dicom_header(
        {
            "ContrastBolusAgent": "Gadavist 10ml for Cohen^Mei",
            "SoftwareVersions": "DOB 19780807",
            "ReceiveCoilName": "Head_32 (Dr Cohen's coil)",
            "ManufacturerModelName": "Prisma_fit",
            "Manufacturer": "Patient 1234567 scanner",
            "ScanningSequence": ["GR", "IR"],
            "ImageType": "ORIGINAL Cohen",
            "RepetitionTime": 2300.0,
        }
    )
    text = json.dumps(header)
    for secret in ("Cohen", "Mei", "19780807", "Gadavist", "1234567"):
        assert secret not in text, secret
    assert header["contrast_agent"] is True and header["ManufacturerModelName"] == "Prisma_fit"
    assert header["ScanningSequence"] == ["GR", "IR"] and header["RepetitionTime"] == 2300.0
    assert "ImageType" not in header and "Manufacturer" not in header
