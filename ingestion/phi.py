"""Keeping protected health information out of the catalog: an allow-list of DICOM attributes, keyed UID pseudonyms,
and ages derived from dates that are then dropped.

DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile) lists what must go; we invert it into an
**allow-list**: only the acquisition and geometry attributes below ever leave a header. Everything else (names, IDs,
birth dates, addresses, institution, physicians, free-text descriptions, private tags) is dropped without being named,
so an attribute a vendor invents tomorrow is dropped too. Instance UIDs are replaced by keyed pseudonyms (they can
identify a study across institutions), and dates survive only as an age in years or a day offset.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from typing import Any

from brainiac.ingestion.harmonize import AGE_CAP_YEARS, coarse_age, parse_age_years

__all__ = ["ALLOWED_DICOM_KEYWORDS", "PHI_DICOM_KEYWORDS", "age_from_dates", "pseudonymize_uid", "safe_dicom_header"]

ALLOWED_DICOM_KEYWORDS: frozenset[str] = frozenset(
    {
        # what the image is
        "Modality", "MRAcquisitionType", "ScanningSequence", "SequenceVariant", "ScanOptions", "ImageType",
        "ContrastBolusAgent",
        # scanner (not site: InstitutionName, StationName and DeviceSerialNumber are identifying)
        "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength",
        # acquisition parameters
        "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "EchoTrainLength", "NumberOfAverages",
        "PixelBandwidth", "ImagingFrequency",
        # geometry
        "Rows", "Columns", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "ImageOrientationPatient",
        "ImagePositionPatient", "PatientPosition",
        # pixel encoding
        "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
        "RescaleSlope", "RescaleIntercept", "RescaleType",
        # demographics that survive de-identification (age is capped, sex is kept)
        "PatientSex", "PatientAge",
    }
)  # fmt: skip
"""The only DICOM attributes (by keyword) that may be copied into a table or a log."""

PHI_DICOM_KEYWORDS: frozenset[str] = frozenset(
    {
        "PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "OtherPatientIDs", "OtherPatientNames",
        "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
        "PerformingPhysicianName", "OperatorsName", "AccessionNumber", "StudyID", "StudyInstanceUID",
        "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "StudyDate", "SeriesDate", "AcquisitionDate",
        "ContentDate", "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "StationName", "DeviceSerialNumber",
        "StudyDescription", "SeriesDescription", "ProtocolName",
    }
)  # fmt: skip
"""Identifying attributes the tests check never leak (documentation of intent; the allow-list is what enforces it)."""


def pseudonymize_uid(key: bytes, uid: str, kind: str = "uid") -> str:
    """A keyed, stable replacement for a DICOM UID (study, series, SOP instance)."""
    digest = hmac.new(key, f"{kind}\x1f{uid}".encode(), hashlib.sha256).hexdigest()[:24]
    return f"{kind}-{digest}"


def _parse_dicom_date(value: object) -> dt.date | None:
    text = str(value or "").strip()
    if len(text) < 8:
        return None
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


def age_from_dates(birth_date: object, scan_date: object) -> float | None:
    """Age in years at the scan from two DICOM dates (``YYYYMMDD``), capped at 90; ``None`` if either is missing."""
    birth, scan = _parse_dicom_date(birth_date), _parse_dicom_date(scan_date)
    if birth is None or scan is None or scan < birth:
        return None
    return coarse_age(min((scan - birth).days / 365.25, AGE_CAP_YEARS))


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, int | float | str) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


FREE_TEXT_PRESENCE = {"ContrastBolusAgent": "contrast_agent"}
"""Free-text attributes kept only as the fact that they are present: a contrast agent's name is typed by hand at the
console ("Gadavist 10ml for Cohen^Mei"), but that one was given is what sequence inference needs."""

NAME_KEYWORDS = frozenset({"Manufacturer", "ManufacturerModelName"})
"""Short vendor-controlled strings, kept when they look like a product name (letters, digits, a few separators, no run
of six digits or more that could be an ID or a date) and dropped otherwise."""

_NAME = re.compile(r"^(?!.*\d{6})[A-Za-z0-9][A-Za-z0-9 ._+\-/]{0,47}$")


def _keep(keyword: str, value: Any) -> bool:
    """Only numbers and coded values leave a header (PS3.15 basic profile: free text is removed)."""
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, int | float) or v is None for v in values):
        return True
    if keyword in NAME_KEYWORDS:
        return all(isinstance(v, str) and _NAME.match(v.strip()) for v in values)
    # Coded strings (DICOM VR CS): upper-case letters, digits, space and underscore, 16 characters at most.
    return all(isinstance(v, str) and re.fullmatch(r"[A-Z0-9 _]{0,16}", v) for v in values)


def safe_dicom_header(dataset: Any) -> dict[str, Any]:
    """The allow-listed attributes of a pydicom ``Dataset`` (or a keyword mapping) as plain JSON-able values.

    Only numbers and coded values pass (a free-text value on the allow-list is dropped: vendors and operators type
    names and dates into ``SoftwareVersions`` or ``ReceiveCoilName``); ``ContrastBolusAgent`` becomes
    ``contrast_agent: true``.

    ``PatientAge`` becomes years (capped at 90) and, when the header has only a birth date, the age is derived from
    ``PatientBirthDate`` and the study/acquisition date; neither date is returned.
    """
    get: Callable[[str], Any]
    if isinstance(dataset, Mapping):
        get = dataset.get
        keywords = list(dataset.keys())
    else:
        get = lambda k: getattr(dataset, k, None)  # noqa: E731
        keywords = [e.keyword for e in dataset if getattr(e, "keyword", "")]
    out: dict[str, Any] = {}
    for keyword in keywords:
        if keyword in FREE_TEXT_PRESENCE:
            if str(get(keyword) or "").strip():
                out[FREE_TEXT_PRESENCE[keyword]] = True
        elif keyword in ALLOWED_DICOM_KEYWORDS:
            value = _plain(get(keyword))
            if value not in (None, "", []) and (keyword in ("PatientAge", "PatientSex") or _keep(keyword, value)):
                out[keyword] = value
    age = parse_age_years(out.pop("PatientAge", None))
    if age is None:
        age = age_from_dates(get("PatientBirthDate"), get("StudyDate") or get("AcquisitionDate") or get("SeriesDate"))
    if age is not None:
        out["age_years"] = age
    return out
