"""Odd entries in a dataset tree (issue #18): symlinks (DataLad/git-annex trees, links out of the root, dangling links,
links to folders), FIFOs and entries that cannot be listed or stat-ed are each quarantined with their own reason and
never read, the good scans beside them are ingested, and nothing aborts the run.

Tests run as root on this machine, where ``chmod 000`` denies nothing: permission errors are injected at ``os.scandir``
(the one call listing makes per folder) instead.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainiac.ingestion.adapters import listing
from brainiac.ingestion.adapters.base import QUARANTINE_REASONS, Problem, SourceScan
from brainiac.ingestion.adapters.bids import BidsAdapter
from brainiac.ingestion.adapters.brats import BratsAdapter
from brainiac.ingestion.adapters.dicom import DicomAdapter
from brainiac.ingestion.adapters.manifest import ManifestAdapter
from brainiac.platform.storage import StorageLocation

KEY = b"k" * 32
NEW_REASONS = ("symlink_outside_root", "broken_symlink", "not_a_file", "unreadable")


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(0, 1000, size=(8, 8, 8)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


@pytest.fixture
def opened(monkeypatch):
    """Paths under a watched folder that this process opened (a Python audit hook; it stays installed, but records
    only while the test runs)."""
    seen: list[str] = []
    watch: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if watch and event == "open" and isinstance(args[0], str) and args[0].startswith(watch[0]):
            seen.append(args[0])

    sys.addaudithook(hook)
    yield watch, seen
    watch.clear()


def _odd_bids(tmp: Path) -> tuple[Path, Path, set[str], dict[str, str]]:
    """A BIDS tree: 3 good scans (one a git-annex style link into ``.git/annex/objects``) and one odd entry per
    case. Returns (root, outside folder, good relative paths, {relative path: expected reason})."""
    root, outside = tmp / "ds", tmp / "elsewhere"
    (root).mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "odd", "BIDSVersion": "1.8.0"}')
    _image(root / "sub-01/anat/sub-01_T1w.nii.gz", 1)
    _image(root / "sub-02/anat/sub-02_T1w.nii.gz", 2)
    obj = root / ".git/annex/objects/Xq/7v/SHA256E-s1--ab.nii.gz/SHA256E-s1--ab.nii.gz"
    _image(obj, 3)
    _link(Path(os.path.relpath(obj, root / "sub-03/anat")), root / "sub-03/anat/sub-03_T1w.nii.gz")  # relative
    (root / "sub-03/anat/sub-03_T1w.json").write_text('{"RepetitionTime": 2.0}')
    # the odd ones
    (root / "folder").mkdir()
    _link(root / "folder", root / "sub-04/anat/sub-04_T1w.nii.gz")  # a folder behind an image's name
    _link(root / "folder", root / "sub-01/anat/sub-01_T2w.json")  # ... and behind a sidecar's (aborted discovery)
    _image(outside / "secret.nii.gz", 5)
    _link(outside / "secret.nii.gz", root / "sub-05/anat/sub-05_T1w.nii.gz")  # another user's file
    _image(outside / "anat/sub-06_T1w.nii.gz", 6)
    _link(outside / "anat", root / "sub-06/anat")  # a whole folder out of the root
    _link(root / "gone.nii.gz", root / "sub-07/anat/sub-07_T1w.nii.gz")  # dangling
    _link(Path("sub-08_T1w.nii.gz"), root / "sub-08/anat/sub-08_T1w.nii.gz")  # a loop onto itself
    os.mkfifo(root / "sub-01/anat/sub-01_FLAIR.nii.gz")  # a FIFO: reading it would block forever
    _link(outside / "secret.nii.gz", root / "participants.tsv")  # a table out of the root must not be read
    good = {"sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nii.gz"}
    odd = {
        "sub-04/anat/sub-04_T1w.nii.gz": "not_a_file",
        "sub-01/anat/sub-01_T2w.json": "not_a_file",
        "sub-05/anat/sub-05_T1w.nii.gz": "symlink_outside_root",
        "sub-06/anat": "symlink_outside_root",
        "sub-07/anat/sub-07_T1w.nii.gz": "broken_symlink",
        "sub-08/anat/sub-08_T1w.nii.gz": "broken_symlink",
        "sub-01/anat/sub-01_FLAIR.nii.gz": "not_a_file",
        "participants.tsv": "symlink_outside_root",
    }
    return root, outside, good, odd


def _split(items) -> tuple[list[SourceScan], list[Problem]]:
    items = list(items)
    return [i for i in items if isinstance(i, SourceScan)], [i for i in items if isinstance(i, Problem)]


def _by_rel(root: Path, problems: list[Problem]) -> dict[str, str]:
    return {os.path.relpath(p.source_uri, root): p.reason for p in problems}


def test_new_reasons_are_in_the_quarantine_vocabulary():
    assert set(NEW_REASONS) <= set(QUARANTINE_REASONS)
    assert Problem("ds", "x", "symlink_outside_root", "d").reason == "symlink_outside_root"


@pytest.mark.timeout(30)
def test_bids_quarantines_each_odd_entry_and_keeps_annex_links(tmp_path, opened):
    root, outside, good, odd = _odd_bids(tmp_path)
    watch, seen = opened
    watch.append(str(outside))
    scans, problems = _split(BidsAdapter().discover(StorageLocation.resolve(root), "odd"))
    assert {s.relative_path for s in scans} == good
    assert _by_rel(root, problems) == odd
    annexed = next(s for s in scans if s.subject == "03")
    assert annexed.meta["tr_ms"] == 2000.0  # the annexed image's sidecar still applies
    assert seen == []  # nothing out of the root was opened, not even participants.tsv
    for p in problems:  # the detail never names the link's target
        assert str(outside) not in p.detail and str(root) not in p.detail and p.detail


@pytest.mark.timeout(30)
def test_unreadable_folder_and_vanished_file_are_quarantined_with_errno(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    _image(root / "sub-01/anat/sub-01_T1w.nii.gz", 1)
    _image(root / "sub-02/anat/sub-02_T1w.nii.gz", 2)
    _image(root / "sub-03/anat/sub-03_T1w.nii.gz", 3)
    _image(root / "sub-03/anat/sub-03_run-2_T1w.nii.gz", 4)
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\n")
    denied, vanishing = root / "sub-02/anat", root / "sub-03/anat/sub-03_run-2_T1w.nii.gz"
    real_scandir = os.scandir

    class Entries:
        """What ``os.scandir`` gives, with one file deleted between the folder read and the entries' stat."""

        def __init__(self, path):
            self.entries = list(real_scandir(path))
            if os.fspath(path) == str(vanishing.parent) and vanishing.exists():
                vanishing.unlink()

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    def scandir(path="."):
        if os.fspath(path) == str(denied):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return Entries(path)

    monkeypatch.setattr(os, "scandir", scandir)
    import brainiac.ingestion.adapters.listing as listing

    monkeypatch.setattr(listing, "ray_ready", lambda: False)  # list in this process, where scandir is patched
    scans, problems = _split(BidsAdapter().discover(StorageLocation.resolve(root), "odd"))
    assert {s.relative_path for s in scans} == {"sub-01/anat/sub-01_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nii.gz"}
    assert _by_rel(root, problems) == {"sub-02/anat": "unreadable", "sub-03/anat/sub-03_run-2_T1w.nii.gz": "unreadable"}
    details = {os.path.basename(p.source_uri): p.detail for p in problems}
    assert "EACCES" in details["anat"] and "ENOENT" in details["sub-03_run-2_T1w.nii.gz"]
    assert all(str(tmp_path) not in d for d in details.values())

    # a participants table that fails to open is quarantined; the scans still go in (without its metadata)
    import fsspec.implementations.local as local_fs

    def deny(path, *args, **kwargs):
        if str(path).endswith("participants.tsv"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(local_fs, "open", deny, raising=False)
    scans, problems = _split(BidsAdapter().discover(StorageLocation.resolve(root), "odd"))
    assert len(scans) == 2 and ("participants.tsv", "unreadable") in _by_rel(root, problems).items()


@pytest.mark.timeout(30)
def test_brats_and_manifest_quarantine_links_out_of_the_root(tmp_path):
    outside = _image(tmp_path / "elsewhere/x.nii.gz", 9)
    brats = tmp_path / "brats"
    for case in ("Case_001", "Case_002"):
        _image(brats / case / f"{case}_t1.nii.gz", 1)
    _link(outside, brats / "Case_001/Case_001_flair.nii.gz")
    _link(brats / "Case_002", brats / "Case_002/Case_002_t2.nii.gz")
    scans, problems = _split(BratsAdapter().discover(StorageLocation.resolve(brats), "b"))
    assert sorted(s.relative_path for s in scans) == ["Case_001/Case_001_t1.nii.gz", "Case_002/Case_002_t1.nii.gz"]
    assert _by_rel(brats, problems) == {
        "Case_001/Case_001_flair.nii.gz": "symlink_outside_root",
        "Case_002/Case_002_t2.nii.gz": "not_a_file",
    }

    man = tmp_path / "manifest"
    _image(man / "img/a.nii.gz", 1)
    _link(outside, man / "img/b.nii.gz")
    _link(man / "img/nothing.nii.gz", man / "img/c.nii.gz")
    (man / "manifest.csv").write_text("subject,path\ns1,img/a.nii.gz\ns2,img/b.nii.gz\ns3,img/c.nii.gz\n")
    scans, problems = _split(ManifestAdapter().discover(StorageLocation.resolve(man), "m"))
    assert [s.relative_path for s in scans] == ["img/a.nii.gz"]
    assert _by_rel(man, problems) == {"img/b.nii.gz": "symlink_outside_root", "img/c.nii.gz": "broken_symlink"}
    assert all(p.detail.startswith("manifest row") for p in problems)

    # a manifest that is itself a link out of the root is never read
    (man / "manifest.csv").unlink()
    _link(tmp_path / "elsewhere/manifest.csv", man / "manifest.csv")
    (tmp_path / "elsewhere/manifest.csv").write_text("subject,path\ns9,../elsewhere/x.nii.gz\n")
    scans, problems = _split(ManifestAdapter().discover(StorageLocation.resolve(man), "m"))
    assert scans == [] and _by_rel(man, problems) == {"manifest.csv": "symlink_outside_root"}


def _dicom_series(folder: Path, seed: str) -> list[Path]:
    from brainiac.ingestion.synthetic.writers import write_dicom_series

    data = np.random.default_rng(0).integers(0, 1000, size=(6, 5, 4)).astype(np.uint16)
    tags = {"Modality": "MR", "PatientID": "P1", "StudyInstanceUID": "1.2.3.4", "SeriesNumber": "1"}
    return write_dicom_series(
        folder, data, np.eye(4), tags=tags, uid_seed=seed, rescale_slope=1.0, file_order_rng=np.random.default_rng(1)
    )


@pytest.mark.timeout(30)
def test_dicom_reads_symlinked_slices_inside_the_root_and_quarantines_the_rest(tmp_path):
    """A DataLad export of a PACS folder: every slice is a symlink into ``.git/annex/objects``. Those slices used to be
    dropped (the listing kept only regular files); now the series is found whole. A link out of the root is not."""
    root = tmp_path / "pacs"
    files = _dicom_series(root / ".git/annex/objects/series", "s1")
    for f in files:
        _link(Path(os.path.relpath(f, root / "exam1")), root / "exam1" / f.name)
    stray = _dicom_series(tmp_path / "elsewhere", "s2")[0]
    _link(stray, root / "exam2" / stray.name)
    _link(root / "exam2" / "missing.dcm", root / "exam2" / "dangling.dcm")
    loc = StorageLocation.resolve(root)
    assert DicomAdapter(KEY).detect(loc)
    scans, problems = _split(DicomAdapter(KEY).discover(loc, "pacs"))
    assert len(scans) == 1 and scans[0].relative_path == "exam1"
    assert sorted(Path(f).name for f in scans[0].files) == sorted(f.name for f in files)
    assert _by_rel(root, problems) == {
        f"exam2/{stray.name}": "symlink_outside_root",
        "exam2/dangling.dcm": "broken_symlink",
    }


@pytest.mark.timeout(30)
def test_plain_trees_list_exactly_what_fs_find_lists(tmp_path):
    """The new local walk changes nothing for a tree of plain files (what every test of listing compares against)."""
    root = tmp_path / "ds"
    for i in range(5):
        _image(root / f"sub-{i}" / "anat" / f"sub-{i}_T1w.nii.gz", i)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x").write_text("x")
    loc = StorageLocation.resolve(root)
    expected = {p: int(i["size"]) for p, i in loc.fsspec().find(loc.path, detail=True).items()}
    found = listing.find_listing(loc)
    assert found.sizes == expected and found.problems == []


@pytest.mark.timeout(120)
def test_ingest_of_an_odd_bids_tree_ingests_the_good_and_quarantines_each_odd_one(ray_session, tmp_path, opened):
    """End to end, on Ray (listing in Ray tasks): the run finishes, the 3 good scans are current in the catalog, and
    each odd entry is one quarantine row with its reason; nothing out of the root is opened by this process."""
    from brainiac.ingestion.ingest import ingest
    from brainiac.jobs.config import load_config
    from brainiac.platform.catalog import Catalog

    root, outside, good, odd = _odd_bids(tmp_path / "src")
    watch, seen = opened
    watch.append(str(outside))
    tasks = listing.TASK_STATS["list_files"]
    cfg = load_config("tiny", [f"catalog.uri={tmp_path / 'catalog'}"])
    summary = ingest(cfg, [str(root)], dataset="odd", progress=False)
    assert listing.TASK_STATS["list_files"] > tasks  # the odd folders were listed by Ray tasks
    assert summary.inserted == len(good)
    assert dict(summary.quarantined) == dict(Counter(odd.values()))
    cat = Catalog.open(cfg.catalog.uri)
    assert cat.scans().to_arrow().num_rows == len(good)
    q = cat.read("quarantine").to_pylist()
    assert Counter(r["reason"] for r in q) == Counter(odd.values())
    assert all(str(outside) not in (r["detail"] or "") for r in q)
    assert seen == []
    shutil.rmtree(tmp_path / "catalog", ignore_errors=True)
