"""Small helpers every adapter shares: listing files under a root (local or S3, in Ray tasks when Ray is running, see
:mod:`~brainiac.ingestion.adapters.listing`), relative paths, reading tables."""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable

import pandas as pd

from brainiac.ingestion.adapters.listing import find_files
from brainiac.platform.storage import StorageLocation

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SKIP_DIRS = {"derivatives", "sourcedata", "code", "stimuli", "_truth", ".git", ".datalad"}


def list_files(root: StorageLocation, skip_dirs: Iterable[str] = SKIP_DIRS) -> list[str]:
    """Relative POSIX paths of every file under ``root``, skipping hidden files and ``skip_dirs`` at any depth.

    The root's folders are listed in parallel Ray tasks when Ray is running (:func:`.listing.find_files`).
    """
    base = root.path.rstrip("/")
    skip = set(skip_dirs)
    out = []
    for full in find_files(root, skip_top=skip, skip_hidden=True):
        rel = posixpath.relpath(full, base) if not root.is_remote else full[len(base) + 1 :]
        parts = rel.split("/")
        if any(p in skip or p.startswith(".") for p in parts):
            continue
        out.append(rel)
    return sorted(out)


def is_nifti(rel: str) -> bool:
    return rel.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_table(root: StorageLocation, rel: str, sep: str = ",") -> pd.DataFrame:
    """A CSV/TSV under ``root`` as strings (no type guessing: ids like ``002_S_0295`` and ``00012`` stay intact)."""
    loc = root.join(rel)
    with loc.fsspec().open(loc.path, "rb") as fh:
        data = fh.read()
    return pd.read_csv(io.BytesIO(data), sep=sep, dtype=str, keep_default_na=False, na_values=["", "n/a", "NA", "NaN"])


def inside_root(rel: str) -> bool:
    """True if a manifest path stays inside the dataset root (no absolute paths, no ``..`` escape)."""
    if not rel or rel.startswith(("/", "\\")) or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
        return False
    norm = posixpath.normpath(rel.replace("\\", "/"))
    return not (norm == ".." or norm.startswith("../"))
