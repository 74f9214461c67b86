"""The adapter interface: a layout turns a dataset root into :class:`SourceScan` records (or :class:`Problem` records for
inputs that cannot be ingested), without decoding any voxels.

Adapters only *discover*: they walk the layout, parse its conventions (BIDS entities, BraTS case folders, a manifest's
columns, DICOM series) and attach the raw metadata the dataset provides. Harvesting headers, hashing content,
pseudonymizing and harmonizing happen later, in one place for every layout, so that the four layouts cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from brainiac.platform.storage import StorageLocation

__all__ = ["QUARANTINE_REASONS", "Adapter", "Problem", "SourceScan"]

QUARANTINE_REASONS = {
    "empty_file": "the file has zero bytes",
    "truncated": "the file is shorter than its header says (truncated gzip or payload)",
    "not_nifti": "not a NIfTI-1/2 file",
    "not_3d": "the image is not 3-D (2-D or 4-D where 3-D is required)",
    "singular_affine": "the voxel-to-world affine is singular or not finite",
    "bad_sidecar": "a JSON sidecar could not be parsed",
    "bad_manifest_row": "a manifest row is missing a required field or has an unparseable value",
    "path_outside_root": "a manifest path points outside the dataset root",
    "missing_file": "a file the layout or manifest names does not exist",
    "dicom_no_pixels": "a DICOM series without pixel data",
    "dicom_missing_slices": "a DICOM series with missing or irregularly spaced slices",
    "dicom_unreadable": "a DICOM file could not be parsed",
    "nonfinite_voxels": "NaN or Inf voxels",
    "all_zero": "every voxel is zero",
    "constant": "every voxel has the same value",
    "unknown_layout": "no adapter recognises the folder",
    "bad_filename": "the path is not valid UTF-8 (Arrow and Delta hold UTF-8 only)",
    "symlink_outside_root": "a symlink whose target resolves outside the dataset root (never read)",
    "broken_symlink": "a symlink whose target does not exist, or a symlink loop",
    "not_a_file": "a folder reached through a symlink (not followed), or a FIFO, socket or device, where a file is expected",
    "unreadable": "a file or folder that could not be listed, stat-ed or read (permission denied, vanished); errno in detail",
    "harvest_failed": "reading the scan raised an unexpected error, or its harvest task failed for good",
    "preprocess_failed": "preprocessing the scan raised an unexpected error",
    "preprocess_task_failed": "the scan's preprocessing task failed for good (e.g. its worker was killed for memory)",
}
"""Short reason codes of the quarantine table, with what each means."""


@dataclass
class SourceScan:
    """One image as a dataset holds it, discovered but not yet harvested.

    Attributes:
        dataset: dataset name (from the card or ``--dataset``).
        layout: the adapter that found it.
        source_uri: absolute local path or ``s3://`` URI of the image file; for DICOM, of the series folder.
        relative_path: ``source_uri`` relative to the dataset root (POSIX separators).
        subject: the dataset's own subject id. It is pseudonymized before anything is written.
        session, run: as the layout names them (BIDS ``ses-``/``run-``, ADNI ``VISCODE``), or ``None``.
        sequence_hints: inputs to :func:`brainiac.ingestion.harmonize.infer_sequence` (``bids_suffix``, ``bids_ce``,
            ``description``, ``filename``).
        meta: raw per-scan metadata the dataset provides (age, sex, diagnosis, field strength, manufacturer, model, TR,
            TE, site ...), under the canonical keys ``age``/``age_unit``, ``sex``, ``diagnosis``, ``field_strength``,
            ``manufacturer``, ``scanner_model``, ``tr_ms``, ``te_ms``, ``site``; raw values, not yet harmonized.
        labels: task labels (``idh``, ``survival_days``, ``stroke_onset_days``, ``mask_relative_path`` ...).
        files: for DICOM, the slice files of the series (absolute URIs); empty for NIfTI.
        format: ``nifti`` or ``dicom``.
    """

    dataset: str
    layout: str
    source_uri: str
    relative_path: str
    subject: str
    session: str | None = None
    run: str | None = None
    sequence_hints: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    format: Literal["nifti", "dicom"] = "nifti"


@dataclass
class Problem:
    """An input that cannot be ingested; it becomes one quarantine row and the job goes on."""

    dataset: str
    source_uri: str
    reason: str
    detail: str

    def __post_init__(self) -> None:
        if self.reason not in QUARANTINE_REASONS:
            raise ValueError(f"unknown quarantine reason {self.reason!r}; known: {sorted(QUARANTINE_REASONS)}")
        self.detail = self.detail[:500]


class Adapter(Protocol):
    """A dataset layout."""

    layout: str
    """Name used by ``--layout`` and on dataset cards."""

    def detect(self, root: StorageLocation) -> bool:
        """True if ``root`` follows this layout (cheap: look at a few names, never read images)."""
        ...

    def discover(self, root: StorageLocation, dataset: str, card: Any | None = None) -> Iterator[SourceScan | Problem]:
        """Every image under ``root`` as a :class:`SourceScan`, and every unusable input as a :class:`Problem`."""
        ...
