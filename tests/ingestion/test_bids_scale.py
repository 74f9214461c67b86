"""BIDS discovery at pool scale: sidecars matched through an index built once (linear, not scans × sidecars), read by
the Ray tasks that list their folders, with the BIDS inheritance principle unchanged."""

from __future__ import annotations

import json
import posixpath
import random
from pathlib import Path
from typing import Any

import pytest

from brainiac.ingestion.adapters import bids, listing
from brainiac.ingestion.adapters.base import Problem, SourceScan
from brainiac.ingestion.adapters.bids import BidsAdapter, SidecarIndex, parse_entities
from brainiac.platform.storage import StorageLocation


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def _bids(root: Path, subjects: int, seed: int = 0) -> None:
    """Subjects with two sessions, T1w (some with two runs) and FLAIR, sidecars at every level of inheritance."""
    rng = random.Random(seed)
    _write(root / "dataset_description.json", {"Name": "t", "BIDSVersion": "1.9.0"})
    for ses in ("1", "2"):  # dataset-wide sidecars (a name needs an entity to be one: `T1w.json` is not parsed)
        _write(
            root / f"ses-{ses}_T1w.json",
            {"MagneticFieldStrength": 3, "Manufacturer": "Siemens", "Level": f"root-ses-{ses}"},
        )
        _write(root / f"ses-{ses}_FLAIR.json", {"MagneticFieldStrength": 1.5, "Level": "root-flair"})
    for i in range(subjects):
        sub = f"sub-{i:03d}"
        if rng.random() < 0.3:
            _write(root / sub / f"{sub}_T1w.json", {"Level": "subject", "Manufacturer": "GE"})
        for ses in ("1", "2"):
            anat = root / sub / f"ses-{ses}" / "anat"
            runs = ("1", "2") if rng.random() < 0.2 else (None,)
            for run in runs:
                stem = f"{sub}_ses-{ses}" + (f"_run-{run}" if run else "") + "_T1w"
                (anat / f"{stem}.nii.gz").parent.mkdir(parents=True, exist_ok=True)
                (anat / f"{stem}.nii.gz").write_bytes(b"x")
                if rng.random() < 0.8:
                    _write(anat / f"{stem}.json", {"RepetitionTime": 2.3 + i / 1000, "EchoTime": 0.003})
            if rng.random() < 0.5:
                stem = f"{sub}_ses-{ses}_FLAIR"
                (anat / f"{stem}.nii.gz").write_bytes(b"x")
                _write(anat / f"{stem}.json", {"RepetitionTime": 9.0, "Manufacturer": "Philips"})
    # A sidecar of another subject at the root must not reach anyone else.
    _write(root / "sub-000_ses-1_T1w.json", {"Level": "root-sub-000"})


def _reference_meta(sidecars: list[tuple[str, dict, str, dict]], rel: str) -> dict:
    """The inheritance principle as the scans × sidecars scan it replaces (the reference for equivalence)."""
    entities, suffix = parse_entities(posixpath.basename(rel))
    directory = posixpath.dirname(rel)
    applicable = [
        s for s in sidecars
        if s[2] == suffix and (directory == s[0] or directory.startswith(s[0] + "/") or s[0] == "")
        and all(entities.get(k) == v for k, v in s[1].items())
    ]  # fmt: skip
    meta: dict = {}
    for _, _, _, data in sorted(applicable, key=lambda s: (s[0].count("/") + (s[0] != ""), len(s[1]))):
        meta.update(data)
    return meta


def _scans(root: Path) -> list[SourceScan]:
    out = list(BidsAdapter().discover(StorageLocation.resolve(str(root)), "t"))
    assert not [p for p in out if isinstance(p, Problem)]
    return out


def test_index_gives_the_inheritance_principle_result(tmp_path):
    root = tmp_path / "ds"
    _bids(root, subjects=40)
    loc = StorageLocation.resolve(str(root))
    adapter = BidsAdapter()
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    sidecars, problems = adapter._sidecars(loc, files, "t")
    assert not problems
    index = SidecarIndex(sidecars)
    images = [f for f in files if f.endswith(".nii.gz")]
    for rel in images:
        entities, suffix = parse_entities(posixpath.basename(rel))
        assert index.metadata(posixpath.dirname(rel), entities, suffix) == _reference_meta(sidecars, rel), rel
    # Through discovery: a suffix's sidecars never reach another suffix.
    for scan in _scans(root):
        assert scan.meta["field_strength"] == (1.5 if "FLAIR" in scan.relative_path else 3), scan.relative_path


def test_root_sidecar_of_one_subject_reaches_only_that_subject(tmp_path):
    root = tmp_path / "ds"
    _bids(root, subjects=5)
    loc = StorageLocation.resolve(str(root))
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    sidecars, _ = BidsAdapter()._sidecars(loc, files, "t")
    index = SidecarIndex(sidecars)
    levels = {}
    for rel in files:
        if rel.endswith("_T1w.nii.gz"):
            entities, suffix = parse_entities(posixpath.basename(rel))
            levels[rel] = index.metadata(posixpath.dirname(rel), entities, suffix).get("Level")
    own = [r for r in levels if r.startswith("sub-000/ses-1/")]
    # A deeper folder beats more entities: the subject folder's sidecar, when there is one, overrides the root's.
    expected = "subject" if (root / "sub-000" / "sub-000_T1w.json").exists() else "root-sub-000"
    assert own and all(levels[r] == expected for r in own)
    others = [r for r in levels if not r.startswith("sub-000/")]
    assert all(levels[r] != "root-sub-000" for r in others)
    assert all(levels[r] in ("root-ses-2", "subject") for r in others if "/ses-2/" in r)
    assert all(levels[r] in ("root-ses-1", "subject") for r in others if "/ses-1/" in r)


def test_matching_is_linear_and_the_index_is_built_once(tmp_path):
    """Each image compares its entities with the few sidecars of its own folders, not with every sidecar: the
    scans × sidecars scan this replaces made ~N² comparisons (90,000 here), the index about N."""
    root = tmp_path / "ds"
    _write(root / "dataset_description.json", {"Name": "t", "BIDSVersion": "1.9.0"})
    _write(root / "run-1_T1w.json", {"MagneticFieldStrength": 3})
    n = 300
    for i in range(n):
        anat = root / f"sub-{i:04d}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{i:04d}_run-1_T1w.nii.gz").write_bytes(b"x")
        _write(anat / f"sub-{i:04d}_run-1_T1w.json", {"RepetitionTime": 2.0 + i / 1e4})
    bids.MATCH_STATS.clear()
    scans = _scans(root)
    assert len(scans) == n
    assert bids.MATCH_STATS["indexes"] == 1
    assert bids.MATCH_STATS["checks"] == 2 * n  # its own sidecar and the root one, nothing else
    assert {s.meta["tr_ms"] for s in scans} == {round((2.0 + i / 1e4) * 1000, 4) for i in range(n)}
    assert {s.meta["field_strength"] for s in scans} == {3}


def test_contents_listing_equals_listing_plus_reads(tmp_path):
    root = tmp_path / "ds"
    _bids(root, subjects=6)
    _write(root / "sub-001" / "sub-001_T1w.json", "{" + " " * 2000 + "}")
    loc = StorageLocation.resolve(str(root))
    sizes, contents = listing.find_files_with_contents(loc, read_suffixes=(".JSON",), max_bytes=1000)
    assert sizes == listing.find_files(loc)
    expected = {p: Path(p).read_bytes() for p, n in sizes.items() if p.endswith(".json") and n <= 1000}
    assert contents == expected and str(root / "sub-001" / "sub-001_T1w.json") not in contents
    with listing.cached_listings():
        first = listing.find_files_with_contents(loc, read_suffixes=(".json",))
        (root / "ses-1_T1w.json").unlink()
        assert listing.find_files_with_contents(loc, read_suffixes=(".json",)) == first  # listed once per block


@pytest.mark.timeout(120)
def test_sidecars_are_read_in_the_listing_tasks(ray_session, tmp_path, monkeypatch):
    root = tmp_path / "ds"
    _bids(root, subjects=40)
    _write(root / "sub-039" / "ses-1" / "anat" / "sub-039_ses-1_FLAIR.json", "{not json")
    expected = {s.relative_path: s.meta for s in _scans_no_ray(root)}

    def no_driver_reads(self):  # the driver must not open sidecars one by one
        raise AssertionError(f"driver read {self.uri}")

    monkeypatch.setattr(StorageLocation, "read_text", no_driver_reads)
    tasks = listing.TASK_STATS["list_files"]
    out = list(BidsAdapter().discover(StorageLocation.resolve(str(root)), "t"))
    assert listing.TASK_STATS["list_files"] > tasks
    problems = [p for p in out if isinstance(p, Problem)]
    assert [p.reason for p in problems] == ["bad_sidecar"] and problems[0].source_uri.endswith(
        "sub-039_ses-1_FLAIR.json"
    )
    got = {s.relative_path: s.meta for s in out if isinstance(s, SourceScan)}
    assert got == expected


def _scans_no_ray(root: Path) -> list[SourceScan]:
    """Discovery with the listing and reads done in this process (what an adapter used on its own does)."""
    import unittest.mock

    with unittest.mock.patch.object(listing, "ray_ready", lambda: False):
        return [s for s in BidsAdapter().discover(StorageLocation.resolve(str(root)), "t") if isinstance(s, SourceScan)]
