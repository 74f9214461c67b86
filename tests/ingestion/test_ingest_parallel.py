"""Discovery runs on Ray: folders are listed and DICOM headers read in Ray tasks (other processes than the driver), in a
few chunks rather than one task per folder or file, with exactly the results of a listing and a header pass in the
driver; what a header task sends back holds no raw identifier."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from brainiac.ingestion.adapters import dicom as dicom_adapter
from brainiac.ingestion.adapters import listing
from brainiac.ingestion.adapters.base import Problem, SourceScan
from brainiac.ingestion.adapters.common import SKIP_DIRS, list_files
from brainiac.ingestion.adapters.dicom import DicomAdapter, seal, unseal
from brainiac.ingestion.harvest import MAX_CHUNK, harvest_chunks
from brainiac.ingestion.phi import pseudonymize_uid
from brainiac.ingestion.synthetic.writers import deterministic_uid, write_dicom_series
from brainiac.platform.storage import StorageLocation

KEY = b"parallel-test-key-0123456789abcdef"
PHI = {"PatientID": "MRN-55501234", "PatientName": "Dulcinea^Toboso", "InstitutionName": "Hospital de la Mancha"}


def _tree(root: Path, folders: int) -> None:
    """Nested files in many top-level folders, plus what listing must skip or keep at the top level."""
    for i in range(folders):
        deep = root / f"sub-{i:03d}" / "ses-1" / "anat"
        deep.mkdir(parents=True)
        (deep / f"sub-{i:03d}_T1w.nii.gz").write_bytes(b"x" * (i + 1))
        (deep / f".hidden-{i}").write_bytes(b"h")
    (root / "participants.tsv").write_text("participant_id\n")
    (root / "derivatives" / "masks").mkdir(parents=True)
    (root / "derivatives" / "masks" / "m.nii.gz").write_bytes(b"m")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / "empty-folder").mkdir()


def _driver_list_files(root: StorageLocation) -> list[str]:
    """What ``list_files`` returned before listing moved to Ray: one ``fs.find`` in the driver, then the filter."""
    base = root.path.rstrip("/")
    out = []
    for full in root.fsspec().find(base):
        rel = os.path.relpath(full, base)
        if any(p in SKIP_DIRS or p.startswith(".") for p in rel.split("/")):
            continue
        out.append(rel)
    return sorted(out)


@pytest.mark.timeout(120)
def test_listing_runs_in_a_few_ray_tasks_with_the_driver_listing_result(ray_session, tmp_path):
    root = StorageLocation.resolve(tmp_path / "ds")
    _tree(tmp_path / "ds", folders=40)
    expected_find = {p: int(i["size"]) for p, i in root.fsspec().find(root.path, detail=True).items()}
    tasks = listing.TASK_STATS["list_files"]

    assert listing.find_files(root) == expected_find
    # 40 folders (+ derivatives, .git, empty-folder) at >= 16 per task on 4 CPUs: 3 tasks, not 43
    assert listing.TASK_STATS["list_files"] - tasks == 3
    assert listing.WORKER_PIDS["list_files"] and os.getpid() not in listing.WORKER_PIDS["list_files"]

    tasks = listing.TASK_STATS["list_files"]
    assert list_files(root) == _driver_list_files(root)
    assert listing.TASK_STATS["list_files"] > tasks
    assert len(list_files(root)) == 41  # 40 images + participants.tsv

    with listing.cached_listings():  # detection then discovery list a root once
        tasks = listing.TASK_STATS["list_files"]
        assert list_files(root) == list_files(root)
        assert listing.TASK_STATS["list_files"] - tasks == 3  # 41 folders (derivatives, .git pruned): 3 tasks, once


@pytest.mark.timeout(120)
def test_listing_a_file_or_a_missing_root_matches_fs_find(ray_session, tmp_path):
    (tmp_path / "one.nii.gz").write_bytes(b"abc")
    for target in (tmp_path / "one.nii.gz", tmp_path / "missing"):
        loc = StorageLocation.resolve(target)
        expected = {p: int(i["size"]) for p, i in loc.fsspec().find(loc.path, detail=True).items()}
        assert listing.find_files(loc) == expected


def _write_pacs(root: Path) -> dict[str, dict[str, str]]:
    """Three series of 6 slices: two in one folder (one study), one in a nested folder, plus unusable files."""
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    truth = {}
    for name, folder, patient, description in (
        ("a", "exam1", "MRN-55501234", "t1_mprage_sag"),
        ("b", "exam1", "MRN-55501234", "t2_flair_ax"),
        ("c", "other/exam2", "MRN-66602345", "T2 TSE"),
    ):
        tags = {
            **PHI,
            "PatientID": patient,
            "StudyInstanceUID": deterministic_uid(folder, "study"),
            "SeriesDescription": description,
            "SeriesNumber": 3 if name == "b" else 2,
            "Modality": "MR",
            "Manufacturer": "SIEMENS",
            "MagneticFieldStrength": "3",
            "RepetitionTime": "2300",
            "EchoTime": "2.98",
            "PatientSex": "F",
        }
        data = rng.integers(0, 500, size=(5, 4, 6)).astype(np.uint16)
        write_dicom_series(root / folder, data, affine, tags=tags, uid_seed=name, rescale_slope=1.0, file_order_rng=rng)
        truth[name] = {
            "series": deterministic_uid(name, "series"),
            "study": tags["StudyInstanceUID"],
            "patient": patient,
            "description": description,
            "folder": str(root / folder),
        }
    (root / "exam1" / "broken.dcm").write_bytes(b"not a dicom file at all")
    (root / "exam1" / "empty.dcm").write_bytes(b"")
    (root / "notes.csv").write_text("MRN\nMRN-55501234\n")
    return truth


def _dump(items: list[SourceScan | Problem]) -> list[dict]:
    return [{"type": type(i).__name__, **dataclasses.asdict(i)} for i in items]


@pytest.mark.timeout(120)
def test_dicom_headers_are_read_in_ray_tasks_with_identical_results(ray_session, tmp_path, monkeypatch):
    root = StorageLocation.resolve(tmp_path / "pacs")
    truth = _write_pacs(tmp_path / "pacs")

    # in the driver (no Ray): the reference
    monkeypatch.setattr(dicom_adapter, "ray_ready", lambda: False)
    monkeypatch.setattr(listing, "ray_ready", lambda: False)
    tasks = dict(listing.TASK_STATS)
    reference = _dump(list(DicomAdapter(KEY).discover(root, "ds")))
    assert dict(listing.TASK_STATS) == tasks
    monkeypatch.undo()

    # on Ray, in chunks small enough that series span chunks (the header of a series is kept once)
    monkeypatch.setattr(dicom_adapter, "FILES_PER_TASK", 4)
    tasks = listing.TASK_STATS["dicom_headers"]
    on_ray = _dump(list(DicomAdapter(KEY).discover(root, "ds")))
    assert on_ray == reference
    assert listing.TASK_STATS["dicom_headers"] - tasks == 5  # 20 files at >= 4 per task: 5 tasks
    assert listing.WORKER_PIDS["dicom_headers"] and os.getpid() not in listing.WORKER_PIDS["dicom_headers"]

    # ... and identical to what the adapter produced before: raw subject in memory, keyed pseudonyms, series order
    scans = [i for i in on_ray if i["type"] == "SourceScan"]
    problems = sorted((Path(i["source_uri"]).name, i["reason"]) for i in on_ray if i["type"] == "Problem")
    assert problems == [("broken.dcm", "dicom_unreadable"), ("empty.dcm", "empty_file")]
    assert len(scans) == 3
    for scan in scans:
        name = next(
            n for n, t in truth.items() if pseudonymize_uid(KEY, t["series"], "series") == scan["meta"]["series"]
        )
        t = truth[name]
        assert scan["subject"] == t["patient"]
        assert scan["session"] == pseudonymize_uid(KEY, t["study"], "study")
        assert scan["sequence_hints"] == {"description": t["description"]}
        suffix = f"#{scan['meta']['series']}" if name in "ab" else ""
        assert scan["source_uri"] == t["folder"] + suffix
        assert len(scan["files"]) == 6 and scan["meta"]["n_slices"] == 6
        assert scan["meta"]["manufacturer"] == "SIEMENS" and scan["meta"]["field_strength"] == 3.0
    # series sorted by (folder, SeriesNumber): a (2) then b (3) in exam1, then c
    assert [s["sequence_hints"]["description"] for s in scans] == ["t1_mprage_sag", "t2_flair_ax", "T2 TSE"]


def test_header_tasks_send_no_raw_identifier_back(tmp_path):
    root = StorageLocation.resolve(tmp_path / "pacs")
    truth = _write_pacs(tmp_path / "pacs")
    items = [(str(p), p.stat().st_size) for p in sorted((tmp_path / "pacs").rglob("*.dcm"))]
    pid, results = dicom_adapter._read_headers(items, root.uri, {}, "ds", KEY, 2)
    assert pid == os.getpid()
    payload = pickle.dumps(results)
    secrets = [*PHI.values(), "MRN-66602345", "t1_mprage_sag", "t2_flair_ax", "T2 TSE"]
    for t in truth.values():
        secrets += [t["series"], t["study"]]
    secrets += [deterministic_uid(name, "slice", k) for name in "abc" for k in range(6)]
    for secret in secrets:
        assert secret.encode() not in payload, secret
    headers = [r for r in results if r is not None and not isinstance(r, Problem)]
    assert {unseal(KEY, h.patient_id) for h in headers} == {"MRN-55501234", "MRN-66602345"}
    assert sum(bool(h.header) for h in headers) == 3  # the allow-listed header once per series in a chunk


def test_seal_round_trips_and_needs_the_key():
    token = seal(KEY, "MRN-55501234")
    assert token is not None and "MRN" not in token and token == seal(KEY, "MRN-55501234")
    assert unseal(KEY, token) == "MRN-55501234"
    assert seal(KEY, None) is None and unseal(KEY, None) is None
    assert unseal(KEY, seal(KEY, "")) == ""
    with pytest.raises(ValueError):
        unseal(b"another-key-0123456789abcdef", token)
    tampered = bytearray.fromhex(token)
    tampered[-1] ^= 1
    with pytest.raises(ValueError):  # authenticated: an altered token is refused, not decrypted to garbage
        unseal(KEY, tampered.hex())
    # AES-SIV (RFC 5297, via `cryptography`): a 16-byte synthetic IV + a ciphertext as long as the text
    assert len(bytes.fromhex(token)) == 16 + len("MRN-55501234")
    assert seal(KEY, "MRN-55501235") != token


def test_harvest_chunks_are_equal_per_cpu_and_bounded():
    assert harvest_chunks(300, 1) == 8 and harvest_chunks(300, 2) == 16
    assert harvest_chunks(3, 4) == 3  # a small input: one task per scan, not more
    n = 49_000
    chunks = harvest_chunks(n, 2)
    assert chunks % 2 == 0 and -(-n // chunks) <= MAX_CHUNK
    assert listing.split(list(range(10)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]


@pytest.mark.timeout(600)
def test_pipeline_ingest_lists_and_reads_dicom_headers_on_ray(pipeline):
    pipeline.catalog  # noqa: B018 - the tiny cohort ingested (all layouts, one of them DICOM)
    assert listing.TASK_STATS["list_files"] > 0 and listing.TASK_STATS["dicom_headers"] > 0
    assert os.getpid() not in listing.WORKER_PIDS["list_files"] | listing.WORKER_PIDS["dicom_headers"]
