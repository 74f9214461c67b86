"""DICOM layout: every file under a dataset root is read header-only, and files are grouped into series by
SeriesInstanceUID — never by folder or file name, because PACS exports put several series in one folder, split one
series over folders, and name files by hash or counter.

Each series becomes one :class:`~brainiac.ingestion.adapters.base.SourceScan` (``format="dicom"``) whose ``files`` are
sorted by position along the slice normal; :func:`brainiac.ingestion.dicom_convert.convert_series` later turns it into
a NIfTI volume in the raw area. Series that cannot be faithful volumes are reported here already, from headers alone
(missing or irregular slices, no or truncated pixel data, 4-D or multi-plane series), and unparseable files are
reported one by one, so a bad file never hides the good series beside it.

PHI (docs/architecture.md#privacy, PS3.15 Basic Profile as an allow-list):

- ``SourceScan.subject`` carries the raw PatientID **in memory only**; the caller replaces it with
  :meth:`brainiac.platform.pseudonym.Pseudonymizer.subject_id` before anything is written or logged.
- ``session`` is a keyed pseudonym of the StudyInstanceUID (``study-<hex>``), never the UID or a date; ``run`` is the
  SeriesNumber (a small counter within the study); ``meta["series"]`` is a keyed pseudonym of the SeriesInstanceUID.
- ``meta`` holds only allow-listed acquisition values and the age in years derived by
  :func:`brainiac.ingestion.phi.safe_dicom_header` (from PatientAge, or from birth and study dates, which are dropped).
- ``sequence_hints["description"]`` is the free-text SeriesDescription (ProtocolName when absent). It is an input to
  :func:`brainiac.ingestion.harmonize.infer_sequence` only and must not be stored: free text can hold anything.
- ``source_uri``/``relative_path`` are the user's own paths, held **in memory only** (a PACS export's folder names may
  contain identifiers): the catalog stores a keyed source key (``src-…``) and the real path goes to the identified zone
  (:mod:`brainiac.ingestion.identified`). ``source_uri`` is the series folder (the files' common parent) and
  ends with ``relative_path`` (``""`` for a series in the root itself). When several series share one folder,
  ``#series-<hex>`` (the series pseudonym) is appended to both, so that each series has its own source key.

Symlinks: slice files that are symlinks into the root (a DataLad / git-annex export) are read like regular files; those
leading out of the root, dangling ones and unreadable entries are quarantined by the listing and never opened
(:mod:`~brainiac.ingestion.adapters.listing`).

Parallelism: the root is listed with :func:`brainiac.ingestion.adapters.listing.find_listing` and the headers are read in
Ray tasks over contiguous chunks of the sorted file list (a few tasks per CPU, :data:`FILES_PER_TASK` files at least), each
task with its own thread pool for I/O. What a task sends back to the driver holds no raw identifier: the study, series and
SOP instance UIDs are already keyed pseudonyms (equality, which grouping and de-duplication need, is kept), and the
PatientID and free-text description, which the driver still needs raw in memory (the subject pseudonym and sequence
inference are computed later, in one place for every layout), travel sealed under a key derived from the project key
(:func:`seal`, AES-SIV). The allow-listed header travels once per series and chunk. Without Ray (an adapter used on its own) the
same chunk function runs in this process.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import posixpath
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from brainiac.ingestion.adapters.base import Problem, SourceScan
from brainiac.ingestion.adapters.common import listing_problems
from brainiac.ingestion.adapters.listing import (
    chunk_count,
    describe_oserror,
    find_listing,
    ray_cpus,
    ray_ready,
    readable_inside,
    run_chunks,
    split,
)
from brainiac.ingestion.dicom_convert import (
    SeriesError,
    SliceHeader,
    parse_slice_header,
    series_geometry,
)
from brainiac.ingestion.phi import pseudonymize_uid
from brainiac.platform.storage import StorageLocation

__all__ = ["DICOM_SUFFIXES", "NOT_DICOM_SUFFIXES", "DicomAdapter", "is_dicom_bytes"]

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima", ".dc3")
"""File suffixes that claim to be DICOM: such a file that cannot be parsed is quarantined as ``dicom_unreadable``."""

NOT_DICOM_SUFFIXES = (
    ".nii", ".nii.gz", ".gz", ".mgz", ".nrrd", ".mha", ".mhd", ".json", ".csv", ".tsv", ".txt", ".md", ".yaml", ".yml",
    ".xml", ".html", ".pdf", ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".zip", ".tar", ".py", ".log", ".ini", ".db",
)  # fmt: skip
"""Files with these suffixes are never read (clinical CSVs, READMEs, converted volumes next to a PACS export)."""

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
HEAD_BYTES = 64 * 1024
"""Bytes read per file for the header; files whose header is longer are read whole."""
DETECT_SAMPLE = 500
"""Files listed at most by :meth:`DicomAdapter.detect`."""
DETECT_SNIFF = 5
"""Files without a DICOM suffix whose first 132 bytes :meth:`DicomAdapter.detect` reads, at most."""
REMOTE_THREADS = 16
LOCAL_THREADS = 2
FILES_PER_TASK = 256
"""DICOM files whose headers one Ray task reads, at least (a header costs about a millisecond locally)."""


def is_dicom_bytes(head: bytes) -> bool:
    """True for the DICOM Part 10 signature: a 128-byte preamble followed by ``DICM``."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def _suffix_is(name: str, suffixes: Iterable[str]) -> bool:
    low = name.lower()
    return any(low.endswith(s) for s in suffixes)


def _hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root)
    return any(part.startswith(".") for part in rel.split("/"))


class DicomAdapter:
    """Finds DICOM series anywhere under a dataset root (local or ``s3://``).

    Args:
        key: the pseudonym key used for the session (StudyInstanceUID) and series pseudonyms; default: the project
            key (:func:`brainiac.platform.pseudonym.load_or_create_key`), loaded on first use.
        threads: concurrent header reads; default 16 on S3, 2 locally.
    """

    layout = "dicom"

    def __init__(self, key: bytes | None = None, threads: int | None = None) -> None:
        self._key_value = key
        self.threads = threads

    @property
    def key(self) -> bytes:
        if self._key_value is None:
            from brainiac.platform.pseudonym import load_or_create_key

            self._key_value = load_or_create_key()
        return self._key_value

    # -- detect --------------------------------------------------------------------------------------------------------
    def detect(self, root: StorageLocation) -> bool:
        """True when ``root`` holds DICOM files and no NIfTI-style layout.

        Looks at up to :data:`DETECT_SAMPLE` names: any NIfTI file or a BIDS ``dataset_description.json`` means another
        layout; a DICOM suffix means DICOM; otherwise a few suffix-less files are sniffed for the ``DICM`` magic.
        """
        fs = root.fsspec()
        if not fs.isdir(root.path) or fs.exists(posixpath.join(root.path, "dataset_description.json")):
            return False
        names: list[str] = []
        for dirpath, _dirs, files in fs.walk(root.path):
            for name in sorted(files):
                path = posixpath.join(dirpath, name)
                if _hidden(path, root.path):
                    continue
                names.append(path)
            if len(names) >= DETECT_SAMPLE:
                break
        names = names[:DETECT_SAMPLE]
        if any(_suffix_is(n, _NIFTI_SUFFIXES) for n in names):
            return False
        if any(_suffix_is(n, DICOM_SUFFIXES) for n in names):
            return True
        unknown = [n for n in names if not _suffix_is(n, NOT_DICOM_SUFFIXES)]
        if not root.is_remote:  # never sniff a symlink out of the root, a FIFO (a read would block) or a folder
            real_root = os.path.realpath(root.path)
            unknown = [n for n in unknown if readable_inside(n, real_root)]
        for path in unknown[:DETECT_SNIFF]:
            try:
                if is_dicom_bytes(fs.cat_file(path, start=0, end=132)):
                    return True
            except OSError:
                continue
        return False

    # -- discover ------------------------------------------------------------------------------------------------------
    def discover(self, root: StorageLocation, dataset: str, card: Any | None = None) -> Iterator[SourceScan | Problem]:
        """One :class:`SourceScan` per DICOM series under ``root`` and one :class:`Problem` per unusable file or series.

        Entries the listing leaves out (symlinks out of the root, dangling ones, unreadable folders) come first as
        problems. Reads each candidate file's header only (its first :data:`HEAD_BYTES`, pixel data is never decoded). A file
        with a DICOM suffix that does not parse is ``dicom_unreadable``; other files count only if they carry the
        ``DICM`` magic, so clinical spreadsheets and READMEs beside the images are ignored, and DICOMDIR index files
        are skipped. Files repeating a SOPInstanceUID already seen in the series (a copied file) are dropped.

        Args:
            root: the dataset root.
            dataset: dataset name for the records.
            card: the dataset card (unused: DICOM headers carry what the catalog needs).

        Yields:
            File-level problems first, then series (or series-level problems) in a stable order.
        """
        del card
        to_uri: Callable[[str], str] = (lambda p: "s3://" + p) if root.is_remote else (lambda p: p)
        listing, _, left_out = find_listing(root, skip_hidden=True, files_only=True)
        yield from listing_problems(root, dataset, left_out, skip_dirs=())
        candidates: list[tuple[str, int]] = []
        for path in sorted(listing):
            if _hidden(path, root.path):
                continue
            name = posixpath.basename(path)
            if name.upper() == "DICOMDIR" or _suffix_is(name, NOT_DICOM_SUFFIXES):
                continue
            candidates.append((path, listing[path]))

        threads = self.threads or (REMOTE_THREADS if root.is_remote else LOCAL_THREADS)
        args = (root.uri, dict(root.options), dataset, self.key, threads)
        if ray_ready() and candidates:
            chunks = split(candidates, chunk_count(len(candidates), FILES_PER_TASK, ray_cpus()))
            parts: Iterable[list[SliceHeader | Problem | None]] = run_chunks(
                "dicom_headers", _read_headers, chunks, *args
            )
        else:
            parts = [_read_headers(candidates, *args)[1]]

        series: dict[str, list[SliceHeader]] = defaultdict(list)
        headers: dict[str, dict[str, Any]] = {}
        memo: dict[Any, Any] = {}
        for part in parts:
            for result in part:
                if isinstance(result, Problem):
                    yield result
                elif result is not None and not result.is_directory and result.series_uid:
                    # one allow-listed header per series is all discovery needs; dropping the rest keeps a
                    # dataset of millions of slices in memory
                    headers.setdefault(result.series_uid, result.header)
                    result.header = {}
                    result.patient_id = _memo(memo, unseal, self.key, result.patient_id)
                    result.description = _memo(memo, unseal, self.key, result.description)
                    series[result.series_uid].append(result)

        # keys of ``series`` are series pseudonyms (the tasks never send a UID back)
        folders = {sid: _series_folder([s.uri for s in slices]) for sid, slices in series.items()}
        per_folder: dict[str, int] = defaultdict(int)
        for folder in folders.values():
            per_folder[folder] += 1
        root_path = to_uri(root.path)
        for sid in sorted(series, key=lambda u: (folders[u], series[u][0].series_number or 0, u)):
            slices = _dedupe(series[sid])
            folder = folders[sid]
            source_uri, relative = folder, _relative(folder, root_path)
            if per_folder[folder] > 1:
                source_uri += f"#{sid}"
                relative += f"#{sid}"
            try:
                geometry = series_geometry(slices)
            except SeriesError as exc:
                yield Problem(dataset, source_uri, exc.reason, exc.detail)
                continue
            ordered = [slices[i] for i in geometry.order]
            yield self._scan(dataset, ordered, headers[sid], source_uri, relative, geometry.step_mm)

    # -- helpers -------------------------------------------------------------------------------------------------------
    def _series_id(self, uid: str) -> str:
        return pseudonymize_uid(self.key, uid, "series")

    def _scan(
        self,
        dataset: str,
        slices: list[SliceHeader],
        header: dict[str, Any],
        source_uri: str,
        relative: str,
        step_mm: float,
    ) -> SourceScan:
        first = slices[0]
        study = first.study_uid  # already the keyed pseudonym (``study-<hex>``), see _protect
        # PatientID; without one (an anonymized export), the top folder under the root, else the study
        meta_series = first.series_uid or self._series_id("")
        subject = first.patient_id or relative.split("/", 1)[0].split("#", 1)[0] or study or meta_series
        meta: dict[str, Any] = {
            "manufacturer": header.get("Manufacturer"),
            "scanner_model": header.get("ManufacturerModelName"),
            "field_strength": header.get("MagneticFieldStrength"),
            "tr_ms": header.get("RepetitionTime"),
            "te_ms": header.get("EchoTime"),
            "ti_ms": header.get("InversionTime"),
            "sex": header.get("PatientSex"),
            "age": header.get("age_years"),
            "age_unit": "years",
            "modality": header.get("Modality"),
            "series": meta_series,
            "n_slices": len(slices),
            "slice_step_mm": round(step_mm, 6),
        }
        return SourceScan(
            dataset=dataset,
            layout=self.layout,
            source_uri=source_uri,
            relative_path=relative,
            subject=subject,
            session=study,
            run=str(first.series_number) if first.series_number is not None else None,
            sequence_hints={"description": first.description} if first.description else {},
            meta={k: v for k, v in meta.items() if v is not None},
            files=[s.uri for s in slices],
            format="dicom",
        )


def _read_header(fs: Any, path: str, uri: str, size: int, dataset: str) -> SliceHeader | Problem | None:
    name = posixpath.basename(path)
    claims_dicom = _suffix_is(name, DICOM_SUFFIXES)
    try:
        head = fs.cat_file(path, start=0, end=min(size, HEAD_BYTES)) if size else b""
    except OSError as exc:  # permission denied, vanished since listing, a folder: the file, not DICOM, is the problem
        return Problem(dataset, uri, "unreadable", f"{name} could not be read: {describe_oserror(exc)}")
    if not is_dicom_bytes(head) and not claims_dicom:
        return None  # not DICOM (and does not claim to be): not ours to judge
    if not head:
        return Problem(dataset, uri, "empty_file", f"{name} has zero bytes")
    for attempt in range(2):
        try:
            return parse_slice_header(head, uri, size)
        except SeriesError as exc:
            return Problem(dataset, uri, exc.reason, exc.detail)
        except EOFError:
            if attempt:
                break
            try:
                head = fs.cat_file(path)
                size = len(head)
            except OSError as exc:
                return Problem(dataset, uri, "unreadable", f"{name} could not be read: {describe_oserror(exc)}")
    return Problem(dataset, uri, "dicom_unreadable", f"{name}: header could not be parsed")


def _protect(header: SliceHeader, key: bytes, memo: dict[Any, Any]) -> SliceHeader:
    """Replace the identifiers of a slice header before it leaves the worker: UIDs by their keyed pseudonyms (the
    same the adapter records), PatientID and the free-text description sealed (:func:`seal`)."""
    if header.series_uid:
        header.series_uid = pseudonymize_uid(key, header.series_uid, "series")
    if header.study_uid:
        header.study_uid = pseudonymize_uid(key, header.study_uid, "study")
    if header.sop_uid:
        header.sop_uid = pseudonymize_uid(key, header.sop_uid, "sop")
    header.patient_id = _memo(memo, seal, key, header.patient_id)
    header.description = _memo(memo, seal, key, header.description)
    return header


def _memo(memo: dict[Any, Any], fn: Callable[[bytes, str | None], str | None], key: bytes, value: str | None) -> Any:
    """``fn(key, value)`` computed once per value (the slices of a series repeat the same values); the memo lives only
    as long as one chunk or one discovery."""
    if value is None:
        return None
    if (fn, value) not in memo:
        memo[fn, value] = fn(key, value)
    return memo[fn, value]


def _read_headers(
    items: list[tuple[str, int]], uri: str, options: dict[str, str], dataset: str, key: bytes, threads: int
) -> tuple[int, list[SliceHeader | Problem | None]]:
    """Ray task (or in-process fallback): the headers of ``items`` (``(fsspec path, size)``, in order), protected by
    :func:`_protect`, with the allow-listed header kept only on the first slice of each series in the chunk."""
    root = StorageLocation.resolve(uri, options or None)
    fs = root.fsspec()
    to_uri: Callable[[str], str] = (lambda p: "s3://" + p) if root.is_remote else (lambda p: p)

    def read(item: tuple[str, int]) -> SliceHeader | Problem | None:
        path, size = item
        return _read_header(fs, path, to_uri(path), size, dataset)

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(items) or 1))) as pool:
        results = list(pool.map(read, items))
    seen: set[str] = set()
    memo: dict[Any, Any] = {}
    for result in results:
        if isinstance(result, SliceHeader):
            _protect(result, key, memo)
            if not result.is_directory and result.series_uid:
                if result.series_uid in seen:
                    result.header = {}
                seen.add(result.series_uid)
    return os.getpid(), results


@functools.lru_cache(maxsize=8)
def _siv(key: bytes) -> AESSIV:
    """AES-SIV (RFC 5297) under a 512-bit key derived from the project key for this one purpose."""
    return AESSIV(hmac.new(key, b"brainiac-dicom-seal-aes-siv", hashlib.sha512).digest())


def seal(key: bytes, text: str | None) -> str | None:
    """``text`` encrypted and authenticated with AES-SIV (RFC 5297, deterministic: equal texts give equal tokens, which
    memoisation relies on) under a key derived from ``key``, as hex; ``None`` stays ``None``. Only :func:`unseal` with
    the same key reads it back: identifiers that must cross from a Ray worker to the driver never travel (or spill to
    Ray's object store) in the clear."""
    if text is None:
        return None
    return _siv(key).encrypt(text.encode(), None).hex()


def unseal(key: bytes, token: str | None) -> str | None:
    """The text :func:`seal` sealed. Raises ``ValueError`` for a token not sealed under ``key`` (or altered)."""
    if token is None:
        return None
    try:
        return _siv(key).decrypt(bytes.fromhex(token), None).decode()
    except InvalidTag as exc:
        raise ValueError("sealed value does not verify under this key") from exc


def _series_folder(uris: list[str]) -> str:
    dirs = sorted({posixpath.dirname(u) for u in uris})
    if len(dirs) == 1:
        return dirs[0]
    if dirs[0].startswith("s3://"):
        return "s3://" + posixpath.commonpath([d[len("s3://") :] for d in dirs])
    return posixpath.commonpath(dirs)


def _relative(folder: str, root: str) -> str:
    """``folder`` relative to ``root``; ``""`` for the root itself, so that ``source_uri`` always ends with it."""
    return "" if folder == root else posixpath.relpath(folder, root)


def _dedupe(slices: list[SliceHeader]) -> list[SliceHeader]:
    seen: set[str] = set()
    out = []
    for s in sorted(slices, key=lambda s: s.uri):
        if s.sop_uid and s.sop_uid in seen:
            continue
        if s.sop_uid:
            seen.add(s.sop_uid)
        out.append(s)
    return out
