"""One resolver of the volume set a job reads: the pinned ``volumes`` snapshot, the preprocess version and its config."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from brainiac.ingestion.volumes import resolve_volume_set
from brainiac.platform.catalog import Catalog
from brainiac.platform.errors import UserError


def _rows(version: str, day: int, n: int = 2, qc_pass: bool = True) -> list[dict]:
    at = dt.datetime(2026, 1, day, tzinfo=dt.UTC)
    return [
        {
            "scan_id": f"{version}-{i}",
            "dataset": "d",
            "subject_id": f"s{i}",
            "preprocess_version": version,
            "preprocessed_at": at,
            "qc_pass": qc_pass,
        }
        for i in range(n)
    ]


def test_newest_is_read_in_the_pinned_snapshot_and_an_explicit_version_is_kept(tmp_path: Path, append_volumes):
    catalog = append_volumes(tmp_path, _rows("aaa", 1) + _rows("bbb", 3), 2)
    first = catalog.version("volumes")
    newest = resolve_volume_set(catalog)
    assert (newest.volumes_version, newest.preprocess_version, newest.config) == (first, "bbb", None)
    assert resolve_volume_set(catalog, "newest").preprocess_version == "bbb"

    # A preprocess run commits a newer version (and a QC-failed newest one) after the job pinned its snapshot.
    catalog = append_volumes(tmp_path, _rows("ccc", 5) + _rows("zzz", 9, qc_pass=False), 2)
    assert resolve_volume_set(catalog).preprocess_version == "ccc"
    pinned = resolve_volume_set(catalog, table_version=first)
    assert (pinned.volumes_version, pinned.preprocess_version) == (first, "bbb")
    explicit = resolve_volume_set(catalog, "aaa")
    assert (explicit.preprocess_version, explicit.volumes_version) == ("aaa", catalog.version("volumes"))


def test_a_catalog_without_volumes_names_the_command_to_run(tmp_path: Path):
    with pytest.raises(UserError, match="no volumes table; run `brainiac preprocess"):
        resolve_volume_set(Catalog.open(str(tmp_path / "catalog")))


def test_a_pinned_table_is_opened_once_per_catalog(tmp_path: Path, append_volumes):
    catalog = append_volumes(tmp_path, _rows("aaa", 1), 2)
    version = catalog.version("volumes")
    assert catalog.table("volumes", version) is catalog.table("volumes", version)
    assert catalog.table("volumes") is not catalog.table("volumes")  # the moving head is read afresh
