"""Staging source images into the catalog's raw area under content ids, with no identifier left in names or headers.

The de-identified catalog never points at a user's file: a BIDS path ``Jane_Doe_1965/sub-JaneDoe/anat/...`` maps every
pseudonym back to a name. Ingest therefore copies each image into ``<catalog>/raw/<dataset>/<id[:2]>/<id>.nii[.gz]``
(``id`` = the source file's sha256, the scan id) and the catalog's ``image_uri`` points there. The copy also drops
what a NIfTI file can carry besides voxels and geometry: the header's free-text fields (``descrip``, ``aux_file``,
``intent_name``, ``db_name``: dcm2niix writes acquisition times there), header extensions (DICOM and AFNI headers can
be embedded), and the gzip member's original file name, comment and time stamp.

A clean file (no text, no extension: what most pipelines write) is copied byte for byte except for the gzip header, with
no decompression; only a file with text or extensions is decompressed, patched and recompressed. Content-addressed names
make staging idempotent (an existing target is the same content and is not written again) and keep time travel honest: a
pixel edit at the same source is a new scan id and a new file, and the superseded row keeps pointing at its own bytes.
Writes go to a temporary name and are renamed into place (locally) or put as one object (S3), so a crash never leaves a
partial file under a final name.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import posixpath
import uuid
import zlib

from brainiac.platform.storage import StorageLocation

__all__ = ["TEXT_FIELDS", "clean_nifti_bytes", "stage_bytes", "stage_image", "staged_name"]

TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")
"""NIfTI header fields that hold free text (``db_name`` only in NIfTI-1)."""

_GZIP_MAGIC = b"\x1f\x8b"
_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16


def staged_name(dataset: str, content_id: str, gz: bool, kind: str = "") -> str:
    """Relative name under the raw area: ``<dataset>/[<kind>/]<id[:2]>/<id>.nii[.gz]`` (the dataset prefix lets cloud IAM
    grant or deny each dataset's images with the dataset's access level)."""
    parts = [dataset, *([kind] if kind else []), content_id[:2], f"{content_id}.nii{'.gz' if gz else ''}"]
    return "/".join(parts)


def _strip_gzip_header(data: bytes) -> bytes:
    """The same gzip member with a bare header: no original file name, comment, time stamp or header CRC (RFC 1952
    §2.3). The deflate stream, CRC32 and size that follow are untouched, so nothing is recompressed."""
    flags = data[3]
    pos = 10
    if flags & _FEXTRA:
        pos += 2 + int.from_bytes(data[pos : pos + 2], "little")
    for flag in (_FNAME, _FCOMMENT):
        if flags & flag:
            pos = data.index(b"\x00", pos) + 1
    if flags & _FHCRC:
        pos += 2
    if flags & (_FNAME | _FCOMMENT | _FEXTRA | _FHCRC) == 0 and data[4:8] == b"\x00\x00\x00\x00":
        return data
    header = _GZIP_MAGIC + bytes([data[2], flags & _FTEXT]) + b"\x00\x00\x00\x00" + data[8:10]
    return header + data[pos:]


def _header_needs_cleaning(head: bytes) -> bool:
    """Whether the uncompressed start of a NIfTI file carries free text or extensions."""
    from brainiac.ingestion.headers import parse_nifti_header

    hdr = parse_nifti_header(head)
    for name in TEXT_FIELDS:
        if name in hdr and bytes(hdr[name]).strip(b"\x00 "):
            return True
    size = int(hdr["sizeof_hdr"])
    return len(head) >= size + 4 and head[size] != 0


def _clean_header(raw: bytearray) -> None:
    """Blank the text fields and drop the extensions of an uncompressed NIfTI file, in place (same length: the data keep
    their offset)."""
    from brainiac.ingestion.headers import parse_nifti_header

    hdr = parse_nifti_header(bytes(raw[:544]))
    for name in TEXT_FIELDS:
        if name in hdr:
            hdr[name] = b""
    size = int(hdr["sizeof_hdr"])
    block = hdr.binaryblock
    raw[: len(block)] = block
    offset = int(hdr["vox_offset"])
    if len(raw) >= size + 4:
        raw[size : size + 4] = b"\x00\x00\x00\x00"
        raw[size + 4 : max(size + 4, offset)] = bytes(max(0, offset - size - 4))


def clean_nifti_bytes(data: bytes, gz: bool) -> bytes:
    """The bytes to stage for a NIfTI file's bytes ``data``: text fields blanked, extensions dropped, gzip header bare.
    Decompresses only when the header holds text or extensions."""
    if gz:
        if data[:2] != _GZIP_MAGIC:
            raise ValueError("not a gzip file")
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, 1024)
        if not _header_needs_cleaning(head):
            return _strip_gzip_header(data)
        raw = bytearray(gzip.decompress(data))
        _clean_header(raw)
        return gzip.compress(bytes(raw), compresslevel=1, mtime=0)
    if not _header_needs_cleaning(data[:1024]):
        return data
    raw = bytearray(data)
    _clean_header(raw)
    return bytes(raw)


def stage_bytes(target: StorageLocation, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically: a temporary sibling renamed into place (locally), one PUT (S3)."""
    fs = target.fsspec()
    if target.is_remote:
        fs.pipe_file(target.path, data)
        return
    folder = posixpath.dirname(target.path)
    os.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{posixpath.basename(target.path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target.path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stage_image(
    source: StorageLocation, raw_area: StorageLocation, dataset: str, content_id: str | None = None, kind: str = ""
) -> str:
    """Stage one NIfTI file; returns the staged URI. ``content_id`` (the file's sha256, when the caller has it) lets an
    already staged file be found without reading the source; without it the source is read and hashed here."""
    gz = source.path.endswith(".gz")
    if content_id is not None:
        target = raw_area.join(staged_name(dataset, content_id, gz, kind))
        if target.exists():
            return target.uri
    with source.fsspec().open(source.path, "rb") as fh:
        data = fh.read()
    if content_id is None:
        content_id = hashlib.sha256(data).hexdigest()
        target = raw_area.join(staged_name(dataset, content_id, gz, kind))
        if target.exists():
            return target.uri
    stage_bytes(target, clean_nifti_bytes(data, gz))
    return target.uri
