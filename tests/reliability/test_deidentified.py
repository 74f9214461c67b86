"""The de-identified catalog holds no source path: images are staged by content id with clean headers, the real paths
live in the identified zone, and a dataset without a card must be named."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainiac.ingestion.identified import IdentifiedZone, default_identified_uri, source_key
from brainiac.ingestion.staging import clean_nifti_bytes, stage_image, staged_name
from brainiac.platform.storage import StorageLocation


def _nifti(descrip: bytes = b"", extension: bool = False) -> bytes:
    img = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.eye(4))
    img.header["descrip"] = descrip
    img.header["aux_file"] = b"Jane Doe" if descrip else b""
    if extension:
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"PatientName=Doe^Jane DOB 19650807"))
    return img.to_bytes()


def _gzip_named(raw: bytes, name: bytes) -> bytes:
    """A gzip member whose header names the original file (what ``gzip Jane_Doe_T1w.nii`` writes)."""
    body = gzip.compress(raw, mtime=1234567)
    flags = body[3] | 8
    return body[:3] + bytes([flags]) + body[4:10] + name + b"\x00" + body[10:]


def test_clean_file_is_copied_without_the_gzip_file_name_and_still_decodes() -> None:
    raw = _nifti()
    named = _gzip_named(raw, b"Jane_Doe_1965_T1w.nii")
    assert b"Jane_Doe" in named
    staged = clean_nifti_bytes(named, gz=True)
    assert b"Jane_Doe" not in staged
    assert staged[4:8] == b"\x00\x00\x00\x00"  # no time stamp
    assert gzip.decompress(staged) == raw  # the same deflate stream, not recompressed


def test_text_fields_and_extensions_are_dropped_voxels_kept() -> None:
    raw = _nifti(descrip=b"TE=30;Time=093012.5;Doe^Jane", extension=True)
    for gz, data in ((True, gzip.compress(raw)), (False, raw)):
        staged = clean_nifti_bytes(data, gz=gz)
        plain = gzip.decompress(staged) if gz else staged
        assert b"Doe" not in plain and b"Time=" not in plain and b"19650807" not in plain
        img = nib.Nifti1Image.from_bytes(plain)
        assert len(img.header.extensions) == 0
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.arange(120, dtype=np.int16).reshape(4, 5, 6))


def test_staging_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    src = tmp_path / "Cohen_Mei_7787823" / "T1.nii.gz"
    src.parent.mkdir()
    src.write_bytes(gzip.compress(_nifti(), mtime=0))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    raw_area = StorageLocation.resolve(tmp_path / "catalog" / "raw")
    uri = stage_image(StorageLocation.resolve(src), raw_area, "my-set")
    assert uri.endswith(staged_name("my-set", digest, True)) and "Cohen" not in uri
    first = Path(uri).stat().st_mtime_ns
    assert stage_image(StorageLocation.resolve(src), raw_area, "my-set", digest) == uri
    assert Path(uri).stat().st_mtime_ns == first  # not written again
    assert not list(Path(uri).parent.glob(".*.tmp"))  # no temporary left behind


def test_source_keys_are_keyed_and_stable() -> None:
    a = source_key(b"k" * 32, "/data/Jane_Doe/sub-01_T1w.nii.gz")
    assert a == source_key(b"k" * 32, "/data/Jane_Doe/sub-01_T1w.nii.gz")
    assert a != source_key(b"x" * 32, "/data/Jane_Doe/sub-01_T1w.nii.gz")
    assert a.startswith("src-") and "Jane" not in a
    assert default_identified_uri("s3://b/lake/catalog/") == "s3://b/lake/catalog-identified"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_catalog_paths_hold_no_source_path_and_the_identified_zone_maps_them_back(pipeline) -> None:
    catalog = pipeline.catalog
    cohort_root = str(pipeline.cohort.out_dir)
    scans = catalog.sql("SELECT scan_id, source_uri, relative_path, image_uri, labels FROM scans").to_pylist()
    assert scans
    catalog_root = catalog.uri.rstrip("/") + "/raw/"
    for r in scans:
        assert r["source_uri"].startswith("src-")
        assert cohort_root not in json.dumps(r)
        assert r["image_uri"].startswith(catalog_root)
        assert r["scan_id"][:16] in r["image_uri"] or "/dicom/" in r["image_uri"]
        for key, value in json.loads(r["labels"]).items():
            if key.endswith("_uri"):
                assert value.startswith(catalog_root), value
    zone = IdentifiedZone(default_identified_uri(catalog.uri))
    sources = zone.read("sources").to_pylist()
    by_key = {(s["source_key"], s["scan_id"]): s for s in sources}
    assert all((r["source_uri"], r["scan_id"]) in by_key for r in scans)
    assert all(s["source_uri"].startswith(cohort_root) for s in sources)


def test_a_dataset_without_a_card_must_be_named(tmp_path: Path) -> None:
    folder = tmp_path / "Jane_Doe_1965"
    (folder / "sub-01" / "anat").mkdir(parents=True)
    (folder / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(gzip.compress(_nifti()))
    (folder / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    out = subprocess.run(
        [sys.executable, "-m", "brainiac.platform.cli.main", "ingest", str(folder), "--catalog", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "--dataset" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c" / "scans").exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_changed_card_level_is_applied_to_stored_rows_on_reingest(pipeline, tmp_path: Path) -> None:
    """A dataset whose card changed from ``open`` to ``restricted`` disappears from every reader allowed only ``open``,
    its stored rows included, and a re-ingest that changes nothing commits nothing."""
    import shutil

    from brainiac.ingestion.cards import card_for
    from brainiac.ingestion.ingest import ingest
    from brainiac.jobs.config import load_config
    from brainiac.platform.catalog import Catalog

    root = tmp_path / "synth-brats"
    shutil.copytree(pipeline.cohort.out_dir / pipeline.cohort.cohorts["brats"], root)
    import brainiac.ingestion.datasets as shipped_cards

    text = (Path(shipped_cards.__file__).parent / "synth-brats.yaml").read_text()
    assert card_for("synth-brats").access == "open"
    card = tmp_path / "card.yaml"
    cfg = load_config("tiny", [f"catalog.uri={tmp_path / 'catalog'}"])
    card.write_text(text)
    first = ingest(cfg, [str(root)], card_path=str(card), progress=False)
    open_only = Catalog.open(cfg.catalog.uri, allowed_access=["open"])
    assert len(open_only.scans().to_pandas()) == first.inserted > 0
    card.write_text(text.replace("access: open", "access: restricted"))
    again = ingest(cfg, [str(root)], card_path=str(card), progress=False)
    assert again.access_changed == {"synth-brats": first.inserted} and again.inserted == 0
    assert len(Catalog.open(cfg.catalog.uri, allowed_access=["open"]).scans().to_pandas()) == 0
    version = Catalog.open(cfg.catalog.uri).version("scans")
    assert ingest(cfg, [str(root)], card_path=str(card), progress=False).access_changed == {}
    assert Catalog.open(cfg.catalog.uri).version("scans") == version


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_rows_of_an_older_ingest_are_rekeyed_and_their_images_staged(pipeline, tmp_path: Path) -> None:
    """A catalog written before the identified zone (real paths in ``source_uri``, the user's file as ``image_uri``)
    is converted by the next ingest: same scans, one current row per source, no path left in ``scans``."""
    import shutil

    import pyarrow as pa

    from brainiac.ingestion.ingest import ingest
    from brainiac.jobs.config import load_config
    from brainiac.platform.catalog import Catalog

    root = tmp_path / "synth-brats"
    shutil.copytree(pipeline.cohort.out_dir / pipeline.cohort.cohorts["brats"], root)
    cfg = load_config("tiny", [f"catalog.uri={tmp_path / 'catalog'}"])
    first = ingest(cfg, [str(root)], progress=False)
    catalog = Catalog.open(cfg.catalog.uri)
    zone = IdentifiedZone(default_identified_uri(catalog.uri))
    real = {(s["source_key"], s["scan_id"]): s for s in zone.read("sources").to_pylist()}
    rows = catalog.read("scans").to_pylist()
    legacy = pa.Table.from_pylist(
        [{"scan_id": r["scan_id"], "key": r["source_uri"], "path": real[(r["source_uri"], r["scan_id"])]["source_uri"],
          "rel": real[(r["source_uri"], r["scan_id"])]["relative_path"]} for r in rows]
    )  # fmt: skip
    catalog.table("scans").merge(
        legacy, predicate="t.scan_id = s.scan_id AND t.source_uri = s.key", source_alias="s", target_alias="t"
    ).when_matched_update(
        {"source_uri": "s.path", "relative_path": "s.rel", "image_uri": "s.path", "ingest_version": "'3'"}
    ).execute()  # what version 3 wrote
    shutil.rmtree(zone.location.path)
    shutil.rmtree(tmp_path / "catalog" / "raw")
    again = ingest(cfg, [str(root)], progress=False)
    assert (again.inserted, again.superseded) == (0, 0)
    after = catalog.read("scans").to_pandas()
    assert len(after) == first.inserted and (after["status"] == "current").all()
    assert after["source_uri"].str.startswith("src-").all() and not after["relative_path"].str.contains(str(root)).any()
    assert all(Path(u).exists() and u.startswith(catalog.uri) for u in after["image_uri"])
    assert (after["ingest_version"] == after["ingest_version"].iloc[0]).all() and after["ingest_version"].iloc[0] != "3"
