"""Harvest a NIfTI file's identity and geometry in one streamed read, without decoding voxels.

One pass over the bytes computes the sha256 content id, keeps the first bytes for the header and the last four for the
gzip size field. From those alone we get shape, spacing, affine, axcodes, qform/sform codes and data type, and we catch
files that are empty, not NIfTI, not 3-D, have a singular affine, or are shorter than their header says (a truncated
gzip's size field disagrees with ``vox_offset + voxels × itemsize``). Defects only decoding reveals (NaN/Inf, all-zero)
are left to preprocessing, which decodes anyway.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from brainiac.platform.storage import StorageLocation

__all__ = ["HarvestError", "NiftiFacts", "harvest_nifti", "load_nifti", "parse_nifti_header"]

CHUNK = 1 << 20
_HEADER_BYTES = 540 + 4  # NIfTI-2 header and the extension flag


class HarvestError(Exception):
    """A file that cannot be ingested; ``reason`` is a quarantine reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NiftiFacts:
    """What the catalog records about one NIfTI file."""

    scan_id: str
    bytes: int
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    affine: tuple[float, ...]  # 16 values, row-major
    axcodes: str
    qform_code: int
    sform_code: int
    dtype: str


def parse_nifti_header(head: bytes) -> nib.Nifti1Header:
    """A NIfTI-1 or NIfTI-2 header from the (uncompressed) first bytes of a file."""
    if len(head) < 348:
        raise HarvestError("not_nifti", f"only {len(head)} header bytes")
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        for endian in ("<", ">"):
            size = int(np.frombuffer(head[:4], dtype=f"{endian}i4")[0])
            if size == cls.sizeof_hdr:
                try:
                    hdr = cls.from_fileobj(io.BytesIO(head), check=False)
                except Exception as exc:
                    raise HarvestError("not_nifti", f"unreadable header: {exc}") from exc
                magic = bytes(hdr["magic"]).rstrip(b"\x00")
                if magic not in (b"n+1", b"ni1", b"n+2", b"ni2"):
                    raise HarvestError("not_nifti", f"bad magic {magic!r}")
                return hdr
    raise HarvestError("not_nifti", "header size field is neither 348 (NIfTI-1) nor 540 (NIfTI-2)")


def _geometry(hdr: nib.Nifti1Header) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray, int, int]:
    dims = [int(d) for d in hdr["dim"][1 : int(hdr["dim"][0]) + 1]]
    while len(dims) > 3 and dims[-1] == 1:  # (x, y, z, 1) is a 3-D image
        dims.pop()
    if len(dims) != 3 or min(dims) < 2:
        raise HarvestError("not_3d", f"shape {tuple(int(d) for d in hdr['dim'][1 : int(hdr['dim'][0]) + 1])}")
    affine = hdr.get_best_affine()
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise HarvestError("singular_affine", f"affine {np.round(affine, 4).tolist()}")
    nx, ny, nz = dims
    sx, sy, sz = (float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return (nx, ny, nz), (sx, sy, sz), affine, int(hdr["qform_code"]), int(hdr["sform_code"])


def harvest_nifti(file: StorageLocation) -> NiftiFacts:
    """Content id and geometry of one ``.nii``/``.nii.gz`` file, reading it once as a stream.

    Raises:
        HarvestError: with a quarantine reason (``empty_file``, ``not_nifti``, ``not_3d``, ``singular_affine``,
            ``truncated``, ``missing_file``).
    """
    fs = file.fsspec()
    sha = hashlib.sha256()
    total = 0
    head_raw = bytearray()
    tail = b""
    try:
        with fs.open(file.path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                sha.update(chunk)
                total += len(chunk)
                if len(head_raw) < 65536:
                    head_raw += chunk[: 65536 - len(head_raw)]
                tail = (tail + chunk)[-4:]
    except FileNotFoundError as exc:
        raise HarvestError("missing_file", "the file vanished since it was listed") from exc
    if total == 0:
        raise HarvestError("empty_file", "0 bytes")
    gz = head_raw[:2] == b"\x1f\x8b"
    if gz:
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(bytes(head_raw), _HEADER_BYTES)
        except zlib.error as exc:
            raise HarvestError("truncated", f"corrupt gzip stream: {exc}") from exc
    else:
        head = bytes(head_raw[:_HEADER_BYTES])
    hdr = parse_nifti_header(head)
    shape, spacing, affine, qcode, scode = _geometry(hdr)
    itemsize = np.dtype(hdr.get_data_dtype()).itemsize
    expected = int(hdr["vox_offset"]) + math.prod(shape) * itemsize
    if gz:
        isize = int.from_bytes(tail, "little")
        if isize != expected % (1 << 32):
            raise HarvestError("truncated", f"gzip holds {isize} bytes, header implies {expected}")
    elif total < expected:
        raise HarvestError("truncated", f"file holds {total} bytes, header implies {expected}")
    return NiftiFacts(
        scan_id=sha.hexdigest(),
        bytes=total,
        shape=shape,
        spacing_mm=(round(spacing[0], 6), round(spacing[1], 6), round(spacing[2], 6)),
        affine=tuple(float(v) for v in affine.reshape(-1)),
        axcodes="".join(nib.aff2axcodes(affine)),
        qform_code=qcode,
        sform_code=scode,
        dtype=str(np.dtype(hdr.get_data_dtype())),
    )


def load_nifti(uri: str, options: dict[str, str] | None = None) -> nib.Nifti1Image:
    """Decode a whole ``.nii``/``.nii.gz`` from a local path or ``s3://`` URI, in memory (no temporary file, no mmap
    of a file that a later writer could truncate)."""
    loc = StorageLocation.resolve(uri, options or None)
    with loc.fsspec().open(loc.path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return nib.Nifti1Image.from_bytes(raw)
