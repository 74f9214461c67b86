"""Small helpers every adapter shares: listing files under a root (local or S3, in Ray tasks when Ray is running, see
:mod:`~brainiac.ingestion.adapters.listing`), relative paths, reading tables."""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Iterable
from typing import Any, cast

import pandas as pd

from brainiac.ingestion.adapters.base import Problem
from brainiac.ingestion.adapters.listing import ListingProblem, describe_oserror, find_listing, inside
from brainiac.platform.storage import StorageLocation

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SKIP_DIRS = {"derivatives", "sourcedata", "code", "stimuli", "_truth", ".git", ".datalad"}


class OutsideRootError(PermissionError):
    """A file to be read is a symlink whose real path lies outside the dataset root: it is never opened."""


def relative(root: StorageLocation, full: str) -> str:
    """An fsspec path below ``root`` relative to it (POSIX separators)."""
    base = root.path.rstrip("/")
    if full.startswith(base + "/"):
        return full[len(base) + 1 :]
    return posixpath.relpath(full, base) if not root.is_remote else full[len(base) + 1 :]


def skipped(rel: str, skip_dirs: Iterable[str] = SKIP_DIRS) -> bool:
    """True if ``rel`` lies in a hidden entry or a ``skip_dirs`` folder at any depth (what listing helpers drop)."""
    skip = set(skip_dirs)
    return any(p in skip or p.startswith(".") for p in rel.split("/"))


def shown_uri(uri: str) -> str:
    """``uri`` as Arrow and Delta can hold it: bytes of a non-UTF-8 name (surrogate escapes) written as ``\\xNN``."""
    return uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def listing_problems(
    root: StorageLocation,
    dataset: str,
    problems: Iterable[ListingProblem],
    skip_dirs: Iterable[str] = SKIP_DIRS,
    base: StorageLocation | None = None,
) -> list[Problem]:
    """Quarantine records for what listing left out (symlinks out of the root, dangling links, unreadable entries),
    except those in hidden or ``skip_dirs`` folders, which the layout ignores anyway. ``base``: the folder whose
    relative paths are filtered (default ``root``)."""
    base = base or root
    out = []
    for path, reason, detail in problems:
        if skipped(relative(base, path), skip_dirs):
            continue
        uri = "s3://" + path if root.is_remote else path
        out.append(Problem(dataset, shown_uri(uri), reason, detail))
    return out


def list_files_checked(
    root: StorageLocation,
    dataset: str,
    skip_dirs: Iterable[str] = SKIP_DIRS,
    within: StorageLocation | None = None,
) -> tuple[list[str], list[Problem]]:
    """:func:`list_files`, and a :class:`Problem` for every entry listing left out (see :func:`listing_problems`).
    ``within``: the dataset root symlinks must stay inside, when ``root`` is one of its folders."""
    skip = set(skip_dirs)
    found = find_listing(root, skip_top=skip, skip_hidden=True, within=within)
    files = sorted(rel for rel in (relative(root, full) for full in found.sizes) if not skipped(rel, skip))
    return files, listing_problems(root, dataset, found.problems, skip)


def list_files(root: StorageLocation, skip_dirs: Iterable[str] = SKIP_DIRS) -> list[str]:
    """Relative POSIX paths of every file under ``root``, skipping hidden files and ``skip_dirs`` at any depth.

    The root's folders are listed in parallel Ray tasks when Ray is running (:func:`.listing.find_files`). Symlinks
    that leave the root, dangling ones and unreadable entries are left out (:func:`list_files_checked` reports them).
    """
    return list_files_checked(root, "", skip_dirs)[0]


def check_inside_root(root: StorageLocation, rel: str) -> StorageLocation:
    """``root``/``rel``, after making sure a local file's real path stays inside the real ``root``.

    Raises:
        OutsideRootError: ``rel`` is (or passes through) a symlink that leads out of the root.
    """
    loc = root.join(rel)
    if not root.is_remote and not inside(os.path.realpath(loc.path), os.path.realpath(root.path)):
        raise OutsideRootError(13, "the file is a symlink whose target resolves outside the dataset root")
    return loc


def problem_for_oserror(dataset: str, uri: str, exc: OSError, what: str = "the file") -> Problem:
    """The quarantine record for an ``OSError`` met while reading ``uri``: ``symlink_outside_root`` for
    :class:`OutsideRootError`, else ``unreadable`` with the errno name (``ENOENT`` for a file that vanished since it
    was listed; the detail never quotes the path: the exception's file names are dropped)."""
    if isinstance(exc, OutsideRootError):
        return Problem(dataset, shown_uri(uri), "symlink_outside_root", f"{what}: {exc.strerror}; not read")
    return Problem(dataset, shown_uri(uri), "unreadable", f"{what} could not be read: {describe_oserror(exc)}")


def is_nifti(rel: str) -> bool:
    return rel.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_table(root: StorageLocation, rel: str, sep: str = ",") -> pd.DataFrame:
    """A CSV/TSV under ``root`` as strings (no type guessing: ids like ``002_S_0295`` and ``00012`` stay intact).

    Raises:
        OutsideRootError: the file is a symlink out of the root (it is not opened).
        OSError: the file cannot be read (missing, permission denied, a folder).
    """
    loc = check_inside_root(root, rel)
    with loc.fsspec().open(loc.path, "rb") as fh:
        data = fh.read()
    return pd.read_csv(io.BytesIO(data), sep=sep, dtype=str, keep_default_na=False, na_values=["", "n/a", "NA", "NaN"])


def table_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of a :func:`read_table` frame as ``{column: value}`` dicts (its column names are strings)."""
    return cast("list[dict[str, Any]]", df.to_dict("records"))


def inside_root(rel: str) -> bool:
    """True if a manifest path stays inside the dataset root (no absolute paths, no ``..`` escape)."""
    if not rel or rel.startswith(("/", "\\")) or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
        return False
    norm = posixpath.normpath(rel.replace("\\", "/"))
    return not (norm == ".." or norm.startswith("../"))
