"""Ingest edge cases: quarantine of bad inputs next to good ones, changed files, S3 sources and catalogs, concurrency."""

from __future__ import annotations

import gzip
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainiac.ingestion.identified import identify
from brainiac.ingestion.ingest import ingest, write_scans
from brainiac.jobs.config import load_config
from brainiac.platform.catalog import Catalog

pytestmark = pytest.mark.timeout(600)


def _config(uri: str, options: dict[str, str] | None = None):
    cfg = load_config("tiny", [f"catalog.uri={uri}"])
    if options:
        cfg.catalog.storage_options = dict(options)
    return cfg


@pytest.fixture
def mixed_bids(pipeline, tmp_path) -> tuple[Path, dict[str, str]]:
    """A copy of the lifespan BIDS cohort with bad files added beside the good ones; returns (root, expected)."""
    src = pipeline.cohort.out_dir / pipeline.cohort.cohorts["bids"]
    root = tmp_path / "mixed-bids"
    shutil.copytree(src, root)
    anat = next(root.glob("sub-*/ses-*/anat"))
    good = next(anat.glob("*_T1w.nii.gz"))
    sub = good.name.split("_")[0]
    ses = good.name.split("_")[1]
    bad = {
        f"{sub}_{ses}_run-2_T1w.nii.gz": "empty_file",
        f"{sub}_{ses}_run-3_T1w.nii.gz": "truncated",
        f"{sub}_{ses}_run-4_T1w.nii.gz": "not_nifti",
        f"{sub}_{ses}_run-5_T1w.nii.gz": "not_3d",
        f"{sub}_{ses}_run-6_T1w.json": "bad_sidecar",
    }
    (anat / f"{sub}_{ses}_run-2_T1w.nii.gz").write_bytes(b"")
    (anat / f"{sub}_{ses}_run-3_T1w.nii.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (anat / f"{sub}_{ses}_run-4_T1w.nii.gz").write_bytes(gzip.compress(b"<html>not an image</html>" * 30))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4)), anat / f"{sub}_{ses}_run-5_T1w.nii.gz")
    (anat / f"{sub}_{ses}_run-6_T1w.json").write_text("{not json")
    shutil.copy(good, anat / f"{sub}_{ses}_run-6_T1w.nii.gz")  # a good image whose sidecar is bad
    return root, {str(anat / name): reason for name, reason in bad.items()}


def test_mixed_folder_quarantines_exactly_the_bad_files(pipeline, mixed_bids, tmp_path):
    root, expected = mixed_bids
    cfg = _config(str(tmp_path / "catalog"))
    summary = ingest(cfg, [str(root)], dataset="synth-lifespan-bids", progress=False)
    cat = Catalog.open(cfg.catalog.uri)
    q = identify(cat.read("quarantine").to_pandas(), cat.uri)
    assert dict(zip(q["source_uri"], q["reason"], strict=True)) == expected
    n_good = int((pipeline.truth["dataset"] == "synth-lifespan-bids").sum()) + 1  # + the image with the bad sidecar
    assert summary.inserted == n_good and len(cat.scans().to_pandas()) == n_good
    assert summary.quarantined == {r: list(expected.values()).count(r) for r in set(expected.values())}
    # Running again records nothing twice.
    before = cat.version("quarantine")
    ingest(cfg, [str(root)], dataset="synth-lifespan-bids", progress=False)
    assert cat.version("quarantine") == before


def test_manifest_paths_outside_the_root_are_quarantined(pipeline, tmp_path):
    src = pipeline.cohort.out_dir / pipeline.cohort.cohorts["adni"]
    root = tmp_path / "adni"
    shutil.copytree(src, root)
    lines = (root / "manifest.csv").read_text().splitlines()
    header, first = lines[0], lines[1]
    fields = first.split(",")
    evil = [*fields[:-1], "../../etc/passwd"]
    missing = [*fields[:-1], "images/nope.nii"]
    (root / "manifest.csv").write_text("\n".join([header, *lines[1:], ",".join(evil), ",".join(missing)]) + "\n")
    cfg = _config(str(tmp_path / "catalog"))
    summary = ingest(cfg, [str(root)], dataset="synth-adni", progress=False)
    assert summary.quarantined == {"path_outside_root": 1, "missing_file": 1}
    assert summary.inserted == len(lines) - 1


def test_changed_file_supersedes_and_history_stays(pipeline, tmp_path):
    src = pipeline.cohort.out_dir / pipeline.cohort.cohorts["brats"]
    root = tmp_path / "synth-brats"
    shutil.copytree(src, root)
    cfg = _config(str(tmp_path / "catalog"))
    ingest(cfg, [str(root)], progress=False)
    cat = Catalog.open(cfg.catalog.uri)
    v1 = cat.version("scans")
    target = next(root.glob("*/*_t1.nii.gz"))
    img = nib.load(target)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) + 1, img.affine, img.header), target)
    removed = next(root.glob("*/*_t2.nii.gz"))
    removed.unlink()
    summary = ingest(cfg, [str(root)], progress=False)
    assert (summary.inserted, summary.superseded) == (1, 1)
    rows = identify(cat.scans(include_superseded=True).to_pandas(), cat.uri)
    mine = rows[rows["source_uri"] == str(target)]
    assert sorted(mine["status"]) == ["current", "superseded"]
    assert cat.version("scans") == v1 + 1  # one MERGE commit for insert + supersede
    old = identify(cat.scans(version=v1).to_pandas(), cat.uri)
    assert (old.loc[old["source_uri"] == str(target), "status"] == "current").all()  # time travel
    # A file that disappeared is left in place (documented): ingest never deletes what it cannot see.
    assert (rows.loc[rows["source_uri"] == str(removed), "status"] == "current").all()


def test_ingest_from_s3_to_s3(pipeline, s3_bucket, s3_options):
    src = pipeline.cohort.out_dir / pipeline.cohort.cohorts["bids"]
    from brainiac.platform.storage import StorageLocation

    dest = StorageLocation.resolve(f"s3://{s3_bucket}/raw/synth-lifespan-bids", s3_options)
    dest.fsspec().put(str(src) + "/", dest.path + "/", recursive=True)
    cfg = _config(f"s3://{s3_bucket}/catalog", s3_options)
    summary = ingest(cfg, [dest.uri], progress=False)
    expected = int((pipeline.truth["dataset"] == "synth-lifespan-bids").sum())
    assert summary.inserted == expected and not summary.quarantined
    cat = Catalog.open(cfg.catalog.uri, s3_options)
    rows = identify(cat.scans().to_pandas(), cat.uri, storage_options=s3_options)
    assert len(rows) == expected and rows["source_uri"].str.startswith(f"s3://{s3_bucket}/raw/").all()
    assert cat.scans().to_pandas()["image_uri"].str.startswith(f"s3://{s3_bucket}/catalog/raw/").all()
    local = pipeline.catalog.scans(dataset="synth-lifespan-bids").to_pandas()
    assert set(rows["scan_id"]) == set(local["scan_id"])  # same bytes, same identity wherever they live
    assert ingest(cfg, [dest.uri], progress=False).inserted == 0


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_writers_end_without_duplicates(pipeline, tmp_path, where, request):
    rows = pipeline.catalog.scans().to_arrow().to_pylist()
    if where == "s3":
        bucket, options = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_options")
        cat = Catalog.open(f"s3://{bucket}/concurrent", options)
    else:
        cat = Catalog.open(str(tmp_path / "concurrent"))
    cat.create_if_missing("scans")
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: write_scans(cat, rows), range(3)))
    assert sum(r[0] for r in results) == len(rows)  # exactly one writer inserted each row
    table = cat.scans().to_pandas()
    assert len(table) == len(rows) and not table.duplicated(["source_uri", "scan_id"]).any()


def test_new_ingest_version_refreshes_derived_columns_in_place(pipeline, tmp_path, monkeypatch):
    import brainiac.ingestion.rows as rows_module

    src = pipeline.cohort.out_dir / pipeline.cohort.cohorts["adni"]
    cfg = _config(str(tmp_path / "catalog"))
    ingest(cfg, [str(src)], progress=False)
    cat = Catalog.open(cfg.catalog.uri)
    v = cat.version("scans")
    monkeypatch.setattr(rows_module, "INGEST_VERSION", "test-next")
    summary = ingest(cfg, [str(src)], progress=False)
    assert (summary.inserted, summary.superseded) == (0, 0)
    after = cat.scans(include_superseded=True).to_pandas()
    assert (after["ingest_version"] == "test-next").all() and (after["status"] == "current").all()
    assert cat.version("scans") == v + 1
    assert ingest(cfg, [str(src)], progress=False).inserted == 0 and cat.version("scans") == v + 1


def test_ingest_commits_progressively_and_a_crash_keeps_finished_commits(pipeline, tmp_path, monkeypatch):
    """With ``ingest.commit_scans`` = 4, a run commits every 4 harvested scans; a crash in the third commit leaves the
    first two in the table, and the re-run adds only the rest, with no duplicate rows."""
    import brainiac.ingestion.ingest as ingest_module

    src = pipeline.cohort.out_dir / pipeline.cohort.cohorts["adni"]
    expected = int((pipeline.truth["dataset"] == "synth-adni").sum())
    assert expected > 8
    cfg = _config(str(tmp_path / "catalog"))
    cfg.ingest.commit_scans = 4
    real_write, calls = ingest_module.write_scans, []

    def crashing(catalog, rows, inserted=None):
        calls.append(len(rows))
        if len(calls) == 3:
            raise RuntimeError("simulated crash during the third commit")
        return real_write(catalog, rows, inserted)

    monkeypatch.setattr(ingest_module, "write_scans", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest(cfg, [str(src)], progress=False)
    cat = Catalog.open(cfg.catalog.uri)
    kept = len(cat.scans().to_pandas())
    assert kept == calls[0] + calls[1] >= 6  # the two commits before the crash survived it
    monkeypatch.setattr(ingest_module, "write_scans", real_write)
    summary = ingest(cfg, [str(src)], progress=False)
    assert (summary.inserted, summary.unchanged) == (expected - kept, kept)
    assert -(-(expected - kept) // 4) <= summary.commits <= -(-expected // 4)
    assert set(summary.phases) >= {"list", "harvest", "write", "duplicates", "summary"}
    table = cat.scans().to_pandas()
    assert len(table) == expected and not table.duplicated(["source_uri", "scan_id"]).any()


def test_an_unexpected_reader_error_quarantines_that_scan_only(tmp_path, monkeypatch):
    """A reader bug on one exotic file used to fail its whole harvest chunk and abort the run; now that scan alone is
    quarantined as ``harvest_failed``, with the error's type and never its text (which may quote header values)."""
    import brainiac.ingestion.harvest as harvest_module
    from brainiac.ingestion.adapters.base import SourceScan

    real = harvest_module.harvest_nifti

    def flaky(location):
        if location.uri.endswith("bad.nii.gz"):
            raise KeyError("PatientName=Doe^Jane")
        return real(location)

    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), good)
    (tmp_path / "bad.nii.gz").write_bytes(good.read_bytes())  # a real file: only the (patched) reader fails on it
    scans = [
        SourceScan("ds", "bids", str(tmp_path / name), name, "s1", format="nifti")
        for name in ("good.nii.gz", "bad.nii.gz")
    ]
    monkeypatch.setattr(harvest_module, "harvest_nifti", flaky)
    out = harvest_module._harvest_chunk([(s, "x.nii.gz", None) for s in scans], {}, str(tmp_path / "raw"))
    assert "facts" in out[0] and out[1]["problem"]["reason"] == "harvest_failed"
    assert "KeyError" in out[1]["problem"]["detail"] and "Doe" not in out[1]["problem"]["detail"]


def test_reingest_reads_no_unchanged_file_and_rereads_a_touched_one(pipeline, tmp_path):
    """A re-ingest skips files the catalog holds (same size, modified before their row was written); a file modified
    since is read again, and a changed one supersedes its row. Signatures of new scans are stored at harvest."""
    import os
    import time

    src = pipeline.cohort.out_dir / pipeline.cohort.cohorts["adni"]
    root = tmp_path / "copy" / src.name  # the folder name picks the dataset card
    shutil.copytree(src, root)
    past = time.time() - 3600
    images = sorted(p for p in root.rglob("*.nii*"))
    for path in images:
        os.utime(path, (past, past))
    cfg = _config(str(tmp_path / "catalog"))
    first = ingest(cfg, [str(root)], progress=False)
    cat = Catalog.open(cfg.catalog.uri)
    assert first.skipped == 0 and cat.read("scan_signatures").num_rows == first.inserted
    again = ingest(cfg, [str(root)], progress=False)
    assert (again.inserted, again.skipped, again.unchanged) == (0, first.inserted, first.inserted)
    catalogued = sorted(identify(cat.scans().to_pandas(), cat.uri)["source_uri"])
    os.utime(catalogued[0])  # touched now: read and hashed again, still the same content
    img = nib.load(catalogued[1])
    changed = nib.Nifti1Image(np.asanyarray(img.dataobj) + 1, img.affine, img.header)
    nib.save(changed, catalogued[1])  # new content
    third = ingest(cfg, [str(root)], progress=False)
    assert (third.skipped, third.inserted, third.superseded) == (first.inserted - 2, 1, 1), third
    cfg.ingest.skip_unchanged = False
    assert ingest(cfg, [str(root)], progress=False).skipped == 0


def test_harvest_tasks_receive_no_subject_metadata_or_series_description(pipeline, tmp_path, monkeypatch):
    """DICOM discovery unseals PatientID and SeriesDescription in the driver; what goes to the harvest tasks (through
    Ray's object store) carries neither, nor any other per-subject metadata."""
    import brainiac.ingestion.ingest as ingest_module

    src = pipeline.cohort.out_dir / pipeline.cohort.cohorts["dicom"]
    real, shipped = ingest_module.harvest_stream, []

    def recording(scans, *args, **kwargs):
        shipped.extend(scans)
        return real(scans, *args, **kwargs)

    monkeypatch.setattr(ingest_module, "harvest_stream", recording)
    cfg = _config(str(tmp_path / "catalog"))
    summary = ingest(cfg, [str(src)], progress=False)
    assert summary.inserted > 0 and len(shipped) == summary.discovered
    for scan in shipped:
        assert scan.subject == "" and not scan.meta and not scan.sequence_hints
        assert not {k for k in scan.labels if not k.endswith("_relative_path")}  # label masks only, to be staged
        assert scan.session is None and scan.format == "dicom" and scan.files
    table = Catalog.open(cfg.catalog.uri).scans().to_pandas()
    assert table["subject_id"].str.len().min() > 8 and table["sequence"].notna().all()  # rows still built in full


def test_a_non_utf8_file_name_is_quarantined_and_the_rest_ingested(pipeline, tmp_path):
    """A Latin-1 file name on a Linux disk cannot enter Arrow or Delta (UTF-8 only); it used to crash every ingest of its
    dataset. It is quarantined as ``bad_filename`` and every other scan is ingested."""
    import os

    from brainiac.ingestion.adapters.base import Problem

    src = pipeline.cohort.out_dir / pipeline.cohort.cohorts["brats"]
    root = tmp_path / "copy" / src.name
    shutil.copytree(src, root)
    case = next(p for p in root.iterdir() if p.is_dir())
    good = next(case.glob("*_t1.nii.gz"))
    odd = os.fsencode(str(case)) + b"/" + case.name.encode() + b"_t1caf\xe9.nii.gz"  # a Latin-1 byte in the name
    with open(odd, "wb") as fh:
        fh.write(good.read_bytes())
    cfg = _config(str(tmp_path / "catalog"))
    summary = ingest(cfg, [str(root)], progress=False)
    assert summary.quarantined.get("bad_filename") == 1
    expected = int((pipeline.truth["dataset"] == src.name).sum())
    assert summary.inserted == expected
    catalog = Catalog.open(cfg.catalog.uri)
    q = identify(catalog.read("quarantine").to_pandas(), catalog.uri).to_dict("records")
    assert [r["reason"] for r in q] == ["bad_filename"] and "caf\\xe9" in q[0]["source_uri"]
    assert Problem("ds", "x", "harvest_failed", "d").reason == "harvest_failed"  # every reason the jobs use is known
