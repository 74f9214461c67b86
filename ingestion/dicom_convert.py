"""DICOM series → NIfTI: slice headers, series geometry and the conversion into the lake's raw area.

Geometry follows DICOM PS3.3 C.7.6.2 (Image Plane Module). Patient coordinates are LPS. The pixel at row ``r`` and
column ``c`` of a slice lies at

    ImagePositionPatient + c · ΔC · row_cosines + r · ΔR · column_cosines,    PixelSpacing = (ΔR, ΔC),

where the *row* cosines (first three ImageOrientationPatient values) point along a row, i.e. the direction in which the
column index grows. We store slice planes transposed, so NIfTI voxel ``(i, j, k)`` = (column, row, slice) and the LPS
affine has columns ``ΔC·row_cosines``, ``ΔR·column_cosines``, the slice step vector and the first slice's position;
``diag(-1, -1, 1, 1)`` turns it into RAS+. Slices are ordered by their position along the slice normal
(``row_cosines × column_cosines``), never by file name or InstanceNumber, and the slice step comes from the positions,
never from SliceThickness (which is the excitation thickness and differs from the step for gapped or overlapping
acquisitions). The step vector is the mean step from the first to the last slice, so a tilted (sheared) stack keeps its
true geometry in the sform.

A series is refused (a :class:`~brainiac.ingestion.adapters.base.Problem`) rather than converted into a wrong volume
when slices are missing (a step larger than :data:`GAP_FACTOR` × the median step) or irregular (a slice off the
straight, evenly spaced line by more than :data:`STEP_TOLERANCE` × the median step), when slices disagree on
orientation, size or spacing (a 3-plane localizer), when several volumes share the slice positions (multi-echo,
dynamic or diffusion series: 4-D), when pixel data is missing or truncated, or when a file cannot be parsed.

Nothing identifying leaves this module: the NIfTI gets no text from the DICOM header (``descrip``, ``aux_file`` and
``intent_name`` stay empty, no extensions), the file name is the caller's pseudonymous choice, and the returned
``header`` is :func:`~brainiac.ingestion.phi.safe_dicom_header` (an allow-list) of the first slice. Problem details
name files and never quote header values (:func:`describe_error`), and pydicom's value validation on reading is
switched off process-wide on first use, because its warnings and log lines quote the offending value (a malformed
UID, an over-long name).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np

from brainiac.ingestion.adapters.base import Problem, SourceScan
from brainiac.ingestion.phi import ALLOWED_DICOM_KEYWORDS, safe_dicom_header
from brainiac.platform.storage import StorageLocation

__all__ = [
    "GAP_FACTOR",
    "LPS_TO_RAS",
    "STEP_TOLERANCE",
    "ConvertedSeries",
    "SeriesError",
    "SeriesGeometry",
    "SliceHeader",
    "convert_series",
    "describe_error",
    "parse_slice_header",
    "series_geometry",
    "series_scan_id",
    "slice_header_from_dataset",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM patient coordinates (LPS) to NIfTI world coordinates (RAS+)."""

GAP_FACTOR = 1.5
"""A step between neighbouring slices larger than this multiple of the median step means missing slices."""

STEP_TOLERANCE = 0.05
"""Largest distance of a slice from the evenly spaced line through the first and last slice, as a fraction of the
median step; beyond it the spacing is irregular and no single affine describes the stack."""

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between two slices' direction cosines that still counts as the same orientation."""

REMOTE_READ_THREADS = 16
"""Concurrent reads of slice files on an object store."""

_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_IMPLICIT = "1.2.840.10008.1.2"
_PIXEL_GROUP = 0x7FE0
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

_IDENTITY_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "SeriesDescription",
    "ProtocolName",
    "SeriesNumber",
    "NumberOfFrames",
    "PatientBirthDate",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
)
HEADER_KEYWORDS: tuple[str, ...] = tuple(sorted(ALLOWED_DICOM_KEYWORDS | set(_IDENTITY_KEYWORDS)))
"""The attributes a header-only read parses (``specific_tags``): the PHI allow-list plus what grouping needs."""


def _pydicom() -> Any:
    """pydicom, set up for untrusted input: value validation on *reading* off, because its warnings quote header
    values (a malformed UID, a name) into logs; PHI must never reach a log. Writing validation is left alone."""
    import pydicom
    import pydicom.config

    if pydicom.config.settings.reading_validation_mode != pydicom.config.IGNORE:
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


_QUOTED = re.compile(r"(?<!\w)b?'[^']*'(?!\w)|(?<!\w)b?\"[^\"]*\"(?!\w)")


def describe_error(exc: BaseException) -> str:
    """An exception as ``Type: message`` with quoted values blanked (a parser's message may quote header bytes)."""
    return f"{type(exc).__name__}: {_QUOTED.sub('<…>', str(exc))[:200]}"


class SeriesError(Exception):
    """A series (or slice file) that cannot become a volume; ``reason`` is a quarantine reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class SliceHeader:
    """What one DICOM file says about itself, read without decoding pixels.

    The identity fields (``patient_id`` and the UIDs) are PHI and live only in memory: grouping and pseudonymizing
    use them, nothing writes them. ``header`` is already PHI-free (allow-list).
    """

    uri: str
    series_uid: str | None
    study_uid: str | None
    sop_uid: str | None
    sop_class_uid: str | None
    patient_id: str | None
    description: str | None
    series_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    rows: int | None
    columns: int | None
    frames: int
    samples_per_pixel: int
    has_pixels: bool
    truncated: bool
    header: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_directory(self) -> bool:
        """A DICOMDIR (media storage directory), which indexes files and holds no image."""
        return self.sop_class_uid == _MEDIA_STORAGE_DIRECTORY


@dataclass(frozen=True)
class SeriesGeometry:
    """Where a series' voxels are: slice order, RAS affine and shape ``(columns, rows, slices)``."""

    order: tuple[int, ...]
    """Indices into the slice list, sorted by position along the slice normal."""
    affine: np.ndarray
    """4×4 voxel-to-RAS affine of the NIfTI volume (voxel = column, row, slice)."""
    shape: tuple[int, int, int]
    step_mm: float
    """Distance between neighbouring slice centres (from the positions)."""


@dataclass(frozen=True)
class ConvertedSeries:
    """A DICOM series written as a NIfTI volume in the raw area, with the catalog's geometry fields."""

    nifti_uri: str
    scan_id: str
    """:func:`series_scan_id` of the slice files (content identity, independent of file names and order)."""
    bytes: int
    """Size of the NIfTI file written."""
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    affine: tuple[float, ...]
    """16 values, row-major, voxel → RAS+ world (what the NIfTI's sform holds)."""
    axcodes: str
    dtype: str
    header: dict[str, Any]
    """:func:`~brainiac.ingestion.phi.safe_dicom_header` of the first slice: JSON-able, no PHI."""
    n_slices: int
    qform_code: int = 1
    sform_code: int = 1


# -- slice headers -------------------------------------------------------------------------------------------------------


@overload
def _floats(value: Any, n: Literal[2]) -> tuple[float, float] | None: ...
@overload
def _floats(value: Any, n: Literal[3]) -> tuple[float, float, float] | None: ...
@overload
def _floats(value: Any, n: Literal[6]) -> tuple[float, float, float, float, float, float] | None: ...
def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(np.isfinite(out)):
        return None
    return out


def _int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _expected_pixel_bytes(ds: Any) -> int | None:
    rows, cols = _int(getattr(ds, "Rows", None)), _int(getattr(ds, "Columns", None))
    bits = _int(getattr(ds, "BitsAllocated", None))
    if not rows or not cols or not bits:
        return None
    spp = _int(getattr(ds, "SamplesPerPixel", None), 1) or 1
    frames = _int(getattr(ds, "NumberOfFrames", None), 1) or 1
    return (rows * cols * spp * frames * bits + 7) // 8


def slice_header_from_dataset(
    ds: Any, uri: str, *, has_pixels: bool, truncated: bool = False, with_header: bool = True
) -> SliceHeader:
    """A :class:`SliceHeader` from a parsed pydicom ``Dataset`` (header-only or full); ``with_header=False`` skips the
    allow-listed header (the costly part) when only geometry is needed."""
    get = lambda k: getattr(ds, k, None)  # noqa: E731
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(get("SOPClassUID")) or _text(getattr(meta, "MediaStorageSOPClassUID", None) if meta else None)
    sop_uid = _text(get("SOPInstanceUID")) or _text(getattr(meta, "MediaStorageSOPInstanceUID", None) if meta else None)
    return SliceHeader(
        uri=uri,
        series_uid=_text(get("SeriesInstanceUID")),
        study_uid=_text(get("StudyInstanceUID")),
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        patient_id=_text(get("PatientID")),
        description=_text(get("SeriesDescription")) or _text(get("ProtocolName")),
        series_number=_int(get("SeriesNumber")),
        position=_floats(get("ImagePositionPatient"), 3),
        orientation=_floats(get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(get("PixelSpacing"), 2),
        rows=_int(get("Rows")),
        columns=_int(get("Columns")),
        frames=_int(get("NumberOfFrames"), 1) or 1,
        samples_per_pixel=_int(get("SamplesPerPixel"), 1) or 1,
        has_pixels=has_pixels,
        truncated=truncated,
        header=safe_dicom_header(ds) if with_header else {},
    )


def _pixel_element_state(ds: Any, head: bytes, pos: int, size: int) -> tuple[bool, bool, bool]:
    """``(has_pixels, truncated, decided)`` from the bytes at ``pos``, where a header-only read stopped.

    ``decided`` is false when ``head`` ends before the pixel element's tag and length could be read.
    """
    if pos >= size:
        return False, False, True
    if pos + 12 > len(head):
        return False, False, False
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:  # fall back on the transfer syntax
        meta = getattr(ds, "file_meta", None)
        ts = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
        implicit, little = ts == _IMPLICIT, ts != _BIG_ENDIAN
    order: Literal["little", "big"] = "little" if little else "big"
    group = int.from_bytes(head[pos : pos + 2], order)
    if group != _PIXEL_GROUP:
        return False, False, True
    if implicit:
        length, start = int.from_bytes(head[pos + 4 : pos + 8], order), pos + 8
    elif head[pos + 4 : pos + 6] in _LONG_VRS:
        length, start = int.from_bytes(head[pos + 8 : pos + 12], order), pos + 12
    else:
        length, start = int.from_bytes(head[pos + 6 : pos + 8], order), pos + 8
    if length == 0xFFFFFFFF:  # encapsulated (compressed) frames: the fragments carry their own lengths
        return True, False, True
    expected = _expected_pixel_bytes(ds)
    truncated = start + length > size or (expected is not None and length < expected)
    return length > 0, truncated, True


def parse_slice_header(head: bytes, uri: str, size: int) -> SliceHeader:
    """Parse the header of one DICOM file from its first bytes without decoding pixels.

    Args:
        head: the first bytes of the file (all of it, or enough to reach the pixel data element).
        uri: the file's URI (kept on the result).
        size: the file's full size in bytes (to tell a missing pixel element from a truncated one).

    Returns:
        The slice header.

    Raises:
        SeriesError: ``dicom_unreadable`` when the bytes are not a DICOM dataset with a SeriesInstanceUID.
        EOFError: ``head`` ends before the header does; read more of the file and call again.
    """
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    fh = io.BytesIO(head)
    try:
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS))
        except InvalidDicomError:
            fh = io.BytesIO(head)
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS), force=True)
    except Exception as exc:
        if len(head) < size:
            raise EOFError(f"header longer than {len(head)} bytes") from exc
        raise SeriesError("dicom_unreadable", f"{posixpath.basename(uri)}: {describe_error(exc)}") from exc
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(getattr(meta, "TransferSyntaxUID", "") or "") == _DEFLATED:
        if len(head) < size:
            raise EOFError("deflated dataset: the whole file is needed")
        try:
            full = pydicom.dcmread(io.BytesIO(head), force=True)
            pixels = full.get("PixelData")
        except Exception as exc:  # a cut deflate stream
            raise SeriesError("truncated", f"{posixpath.basename(uri)}: {describe_error(exc)}") from exc
        expected = _expected_pixel_bytes(full)
        has_pixels, decided = bool(pixels), True
        truncated = bool(pixels) and expected is not None and len(pixels) < expected
    else:
        has_pixels, truncated, decided = _pixel_element_state(ds, head, fh.tell(), size)
    if not decided:
        raise EOFError(f"header longer than {len(head)} bytes")
    header = slice_header_from_dataset(ds, uri, has_pixels=has_pixels, truncated=truncated)
    if header.series_uid is None and not header.is_directory:
        if len(head) < size:
            raise EOFError("no SeriesInstanceUID in the bytes read")
        raise SeriesError("dicom_unreadable", f"{posixpath.basename(uri)}: not a DICOM image (no SeriesInstanceUID)")
    return header


# -- series geometry -----------------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm < 1e-6:
        raise SeriesError("not_3d", f"degenerate direction cosines {v.tolist()}")
    return v / norm


def series_geometry(slices: Sequence[SliceHeader]) -> SeriesGeometry:
    """Order the slices of one series along their normal and derive the RAS affine, or explain why not.

    Raises:
        SeriesError: with reason ``dicom_no_pixels``, ``truncated``, ``not_3d``, ``dicom_missing_slices`` or
            ``dicom_unreadable`` (multi-frame files, colour images).
    """
    n = len(slices)
    if n == 0:
        raise SeriesError("dicom_no_pixels", "no slice files")
    no_pixels = [s for s in slices if not s.has_pixels]
    if no_pixels:
        raise SeriesError(
            "dicom_no_pixels", f"{len(no_pixels)} of {n} files have no pixel data (first: {_name(no_pixels[0])})"
        )
    truncated = [s for s in slices if s.truncated]
    if truncated:
        raise SeriesError("truncated", f"{len(truncated)} of {n} files have truncated pixel data: {_names(truncated)}")
    if any(s.frames > 1 for s in slices):
        raise SeriesError("dicom_unreadable", "multi-frame (enhanced) DICOM is not supported; convert to single-frame")
    if any(s.samples_per_pixel != 1 for s in slices):
        raise SeriesError("dicom_unreadable", "colour (SamplesPerPixel > 1) images are not MR volumes")
    lacking = [s for s in slices if s.position is None or s.orientation is None or s.pixel_spacing is None]
    if lacking:
        raise SeriesError(
            "not_3d",
            f"{len(lacking)} of {n} files lack ImagePositionPatient/ImageOrientationPatient/PixelSpacing "
            f"(not a volume; first: {_name(lacking[0])})",
        )
    first = slices[0]
    first_iop = np.asarray(first.orientation, dtype=np.float64)
    first_spacing = np.asarray(first.pixel_spacing, dtype=np.float64)
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise SeriesError("not_3d", f"slices differ in size: {first.rows}×{first.columns} vs {s.rows}×{s.columns}")
        # (`lacking` is empty: every slice has an orientation and a pixel spacing)
        if np.max(np.abs(np.asarray(s.orientation, np.float64) - first_iop)) > ORIENTATION_TOLERANCE:
            raise SeriesError("not_3d", "slices differ in orientation (a multi-plane localizer?)")
        if np.max(np.abs(np.asarray(s.pixel_spacing, np.float64) - first_spacing)) > 1e-4:
            raise SeriesError("not_3d", f"slices differ in pixel spacing: {first.pixel_spacing} vs {s.pixel_spacing}")
    if n < 2:
        raise SeriesError("not_3d", "a single slice is a 2-D image")
    if not first.rows or not first.columns:
        raise SeriesError("dicom_unreadable", "no Rows/Columns")
    iop = first_iop
    row_cos, col_cos = _unit(iop[:3]), _unit(iop[3:])
    if abs(float(row_cos @ col_cos)) > 1e-2:
        raise SeriesError("not_3d", f"row and column cosines are not orthogonal: {iop.tolist()}")
    normal = _unit(np.cross(row_cos, col_cos))
    positions = np.array([s.position for s in slices], dtype=np.float64)
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    dist = distance[order]
    steps = np.diff(dist)
    span = float(dist[-1] - dist[0])
    dup_tol = max(1e-3, 1e-4 * span)
    if np.any(steps <= dup_tol):
        counts = Counter(np.round(dist / dup_tol).astype(np.int64).tolist())
        per = set(counts.values())
        if len(per) == 1 and next(iter(per)) > 1:
            raise SeriesError(
                "not_3d",
                f"{next(iter(per))} images at each of {len(counts)} positions (multi-echo, dynamic or diffusion: 4-D)",
            )
        raise SeriesError("dicom_missing_slices", f"{int(np.sum(steps <= dup_tol))} duplicate slice positions")
    median = float(np.median(steps))
    big = np.flatnonzero(steps > GAP_FACTOR * median)
    if big.size:
        k = int(big[0])
        missing = int(sum(round(float(steps[i]) / median) - 1 for i in big))
        raise SeriesError(
            "dicom_missing_slices",
            f"gap of {steps[k]:.3f} mm after slice {k + 1} of {n} (median step {median:.3f} mm); "
            f"about {max(missing, 1)} slice(s) missing",
        )
    ordered = positions[order]
    step_vec = (ordered[-1] - ordered[0]) / (n - 1)
    line = ordered[0] + np.arange(n)[:, None] * step_vec
    off = np.linalg.norm(ordered - line, axis=1)
    if float(off.max()) > STEP_TOLERANCE * median:
        k = int(np.argmax(off))
        raise SeriesError(
            "dicom_missing_slices",
            f"irregular slice spacing: slice {k + 1} of {n} is {off[k]:.3f} mm off the evenly spaced stack "
            f"(median step {median:.3f} mm)",
        )
    d_row, d_col = (float(v) for v in first_spacing)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * d_col  # voxel i = column index: moves along a row
    lps[:3, 1] = col_cos * d_row  # voxel j = row index: moves down a column
    lps[:3, 2] = step_vec
    lps[:3, 3] = ordered[0]
    return SeriesGeometry(
        order=tuple(int(i) for i in order),
        affine=LPS_TO_RAS @ lps,
        shape=(int(first.columns), int(first.rows), n),
        step_mm=float(np.linalg.norm(step_vec)),
    )


def _name(s: SliceHeader) -> str:
    return posixpath.basename(s.uri.split("#", 1)[0])


def _names(slices: Sequence[SliceHeader], limit: int = 3) -> str:
    names = [_name(s) for s in slices[:limit]]
    return ", ".join(names) + (f" (+{len(slices) - limit} more)" if len(slices) > limit else "")


def series_scan_id(slice_digests: Sequence[str]) -> str:
    """Content identity of a DICOM series: sha256 over its slices' sha256 hex digests, sorted, one per line.

    Sorting makes it independent of file names and of the order files are listed or read in (docs/architecture.md#scan-identity).
    """
    return hashlib.sha256("\n".join(sorted(slice_digests)).encode()).hexdigest()


# -- conversion ----------------------------------------------------------------------------------------------------------


def _fs_path(uri: str) -> str:
    uri = uri.split("#", 1)[0]
    return uri[len("s3://") :] if uri.startswith("s3://") else uri


def _source_fs(scan: SourceScan, raw_area: StorageLocation, source: StorageLocation | None) -> Any:
    if source is not None:
        return source.fsspec()
    first = scan.files[0]
    if first.startswith("s3://"):
        options: Mapping[str, str] | None = raw_area.options if raw_area.is_remote else None
        return StorageLocation.resolve(first, options).fsspec()
    return StorageLocation.resolve(posixpath.dirname(first)).fsspec()


def _check_out_name(out_name: str) -> None:
    if not out_name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"out_name must end in .nii or .nii.gz, got {out_name!r}")
    if out_name.startswith("/") or any(part in ("", "..") for part in out_name.split("/")):
        raise ValueError(f"out_name must be a relative path inside the raw area, got {out_name!r}")


def _nifti_bytes(volume: np.ndarray, affine: np.ndarray, gz: bool, compresslevel: int) -> tuple[bytes, Any]:
    import nibabel as nib

    img = nib.Nifti1Image(volume, affine)
    hdr = img.header
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b""
    hdr["aux_file"] = b""
    hdr["intent_name"] = b""
    hdr["db_name"] = b""
    hdr["cal_min"] = hdr["cal_max"] = 0.0
    hdr.extensions.clear()
    raw = img.to_bytes()
    if gz:
        raw = gzip.compress(raw, compresslevel=compresslevel, mtime=0)
    return raw, hdr


def convert_series(
    scan: SourceScan,
    raw_area: StorageLocation,
    out_name: str,
    *,
    source: StorageLocation | None = None,
    compresslevel: int = 6,
) -> ConvertedSeries | Problem:
    """Convert one DICOM series (from :class:`~brainiac.ingestion.adapters.dicom.DicomAdapter`) into a NIfTI file.

    Every slice file is read once: its bytes are hashed (for :func:`series_scan_id`) and parsed. Slices are ordered
    along the slice normal, checked for gaps and irregular spacing, rescaled with their own RescaleSlope/Intercept and
    stacked; the volume is written as int16 when the rescaled values are integers that fit, else float32, with
    sform = qform = the RAS affine (code 1, scanner) and no text from the DICOM header.

    Args:
        scan: a ``format="dicom"`` scan whose ``files`` are the series' slice files (local paths or ``s3://`` URIs).
        raw_area: the lake's raw area (local directory or ``s3://`` prefix).
        out_name: pseudonymous relative name of the NIfTI under ``raw_area`` (``.nii`` or ``.nii.gz``); the caller
            chooses it and it must not contain source identifiers. ``{scan_id}`` in it is replaced by the scan id,
            which makes the name content-addressed.
        source: where the slice files live, with its options (the dataset root from discovery); default: derived
            from the first file's URI (S3 options from ``raw_area`` when both are on S3, else the environment).
        compresslevel: gzip level for ``.nii.gz``.

    Returns:
        :class:`ConvertedSeries`, or a :class:`~brainiac.ingestion.adapters.base.Problem` (``missing_file``,
        ``dicom_unreadable``, ``dicom_no_pixels``, ``truncated``, ``not_3d``, ``dicom_missing_slices``) for a series
        that cannot become a faithful volume. Nothing is written for a problem.

    Raises:
        ValueError: ``scan`` is not a DICOM scan with files, or ``out_name`` is not a relative NIfTI name.
    """
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    if scan.format != "dicom" or not scan.files:
        raise ValueError(f"convert_series needs a DICOM scan with slice files, got format={scan.format!r}")
    _check_out_name(out_name)

    def problem(reason: str, detail: str) -> Problem:
        return Problem(scan.dataset, scan.source_uri, reason, detail)

    fs = _source_fs(scan, raw_area, source)
    paths = [_fs_path(u) for u in scan.files]
    remote = scan.files[0].startswith("s3://")
    if remote:  # object stores reward concurrent GETs; local reads stay sequential on a small machine
        with ThreadPoolExecutor(max_workers=REMOTE_READ_THREADS) as pool:
            fetched = dict(zip(paths, pool.map(lambda p: _cat_one(fs, p), paths), strict=True))
    else:
        fetched = {p: _cat_one(fs, p) for p in paths}
    blobs: dict[str, bytes] = {}
    digests: list[str] = []
    slices: list[SliceHeader] = []
    datasets: list[Any] = []
    for path in paths:
        data = fetched.get(path)
        if isinstance(data, FileNotFoundError) or data is None:
            return problem("missing_file", f"{posixpath.basename(path)} is gone")
        if isinstance(data, BaseException):
            return problem("dicom_unreadable", f"{posixpath.basename(path)}: {describe_error(data)}")
        blobs[path] = data
        digests.append(hashlib.sha256(data).hexdigest())
    del fetched  # every read succeeded: `blobs` holds the only reference to each file's bytes
    scan_id = series_scan_id(digests)
    target = raw_area.join(out_name.replace("{scan_id}", scan_id).replace("{shard}", scan_id[:2]))
    if "{scan_id}" in out_name and target.exists():  # content-addressed: this series was converted before
        existing = _already_converted(target, scan_id, blobs[paths[0]])
        if existing is not None:
            return existing
    for uri, path in zip(scan.files, paths, strict=True):
        data = blobs.pop(path, b"")  # parsed below; keep one copy of the series in memory, not two
        try:
            try:
                ds = pydicom.dcmread(io.BytesIO(data))
            except InvalidDicomError:
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception as exc:
            return problem("dicom_unreadable", f"{posixpath.basename(path)}: {describe_error(exc)}")
        _ensure_transfer_syntax(ds)
        pixel = ds.get("PixelData")  # the value (bytes), or None
        expected = _expected_pixel_bytes(ds)
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        encapsulated = bool(ts is not None and ts.is_compressed)
        truncated = bool(pixel is not None and expected and not encapsulated and len(pixel) < expected)
        sl = slice_header_from_dataset(ds, uri, has_pixels=bool(pixel), truncated=truncated, with_header=False)
        if sl.series_uid is None:
            return problem("dicom_unreadable", f"{posixpath.basename(path)}: no SeriesInstanceUID")
        slices.append(sl)
        datasets.append(ds)
    if len({s.series_uid for s in slices}) > 1:
        return problem("dicom_unreadable", f"the files belong to {len({s.series_uid for s in slices})} series")
    try:
        geom = series_geometry(slices)
    except SeriesError as exc:
        return problem(exc.reason, exc.detail)

    nx, ny, nz = geom.shape
    volume = np.empty((nx, ny, nz), dtype=np.float64)
    integral = True
    for k, idx in enumerate(geom.order):
        ds = datasets[idx]
        try:
            plane = np.asarray(ds.pixel_array)
        except Exception as exc:
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
            return problem(
                "dicom_unreadable",
                f"{_name(slices[idx])}: cannot decode pixel data ({ts}): {describe_error(exc)}",
            )
        if plane.shape != (ny, nx):
            return problem(
                "dicom_unreadable", f"{_name(slices[idx])}: pixel array {plane.shape} vs Rows×Columns {ny}×{nx}"
            )
        slope = float(getattr(ds, "RescaleSlope", None) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", None) or 0.0)
        integral = integral and slope == 1.0 and intercept.is_integer()
        volume[:, :, k] = plane.T.astype(np.float64) * slope + intercept
    if integral and volume.size and volume.min() >= -32768 and volume.max() <= 32767:
        out = volume.astype(np.int16)
    else:
        out = volume.astype(np.float32)

    raw, hdr = _nifti_bytes(out, geom.affine, target.path.endswith(".gz"), compresslevel)
    from brainiac.ingestion.staging import stage_bytes

    stage_bytes(target, raw)  # a temporary name renamed into place: a crash never leaves half a file

    import nibabel as nib

    affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    zooms = hdr.get_zooms()
    header = json.loads(json.dumps(safe_dicom_header(datasets[geom.order[0]]), default=str))
    return ConvertedSeries(
        nifti_uri=target.uri,
        scan_id=scan_id,
        bytes=len(raw),
        shape=(nx, ny, nz),
        spacing_mm=(float(zooms[0]), float(zooms[1]), float(zooms[2])),
        affine=tuple(float(v) for v in affine.ravel()),
        axcodes="".join(nib.aff2axcodes(affine)),
        dtype=str(out.dtype),
        header=header,
        n_slices=nz,
        qform_code=int(hdr["qform_code"]),
        sform_code=int(hdr["sform_code"]),
    )


def _already_converted(target: StorageLocation, scan_id: str, first_slice: bytes) -> ConvertedSeries | None:
    """The facts of a series whose content-addressed conversion exists: its geometry from the NIfTI header, its header
    values from one slice; no pixel is decoded and nothing is written. ``None`` when the file does not read (it is then
    converted again)."""
    from brainiac.ingestion.headers import HarvestError, harvest_nifti

    try:
        facts = harvest_nifti(target)
        ds = _pydicom().dcmread(io.BytesIO(first_slice), stop_before_pixels=True, force=True)
    except (HarvestError, OSError, ValueError):
        return None
    header = json.loads(json.dumps(safe_dicom_header(ds), default=str))
    return ConvertedSeries(
        nifti_uri=target.uri,
        scan_id=scan_id,
        bytes=facts.bytes,
        shape=facts.shape,
        spacing_mm=facts.spacing_mm,
        affine=facts.affine,
        axcodes=facts.axcodes,
        dtype=facts.dtype,
        header=header,
        n_slices=facts.shape[2],
        qform_code=facts.qform_code,
        sform_code=facts.sform_code,
    )


def _ensure_transfer_syntax(ds: Any) -> None:
    """Give a file without File Meta (old ACR-NEMA style, read with ``force``) the transfer syntax it was read with,
    which pixel decoding needs."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and getattr(meta, "TransferSyntaxUID", None):
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit is None or implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little in (None, True) else ExplicitVRBigEndian


def _cat_one(fs: Any, path: str) -> bytes | BaseException:
    try:
        return fs.cat_file(path)
    except Exception as exc:
        return exc
