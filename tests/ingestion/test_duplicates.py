"""Same image, other bytes: copies cropped (even into the brain), reoriented and re-typed are found; other brains not.
The search is incremental (only pairs of new scans, through signature buckets, never the square of the pool), stores
signatures once per scan, and groups byte-identical copies without decoding."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from scipy import ndimage

from brainiac.ingestion import duplicates
from brainiac.ingestion.duplicates import (
    SearchStats,
    candidate_pairs,
    find_duplicates,
    link_new_scans,
    record_duplicates,
    search_new_scans,
    shortlist_pairs,
)
from brainiac.ingestion.signatures import CELLS, Signature, bucket_keys
from brainiac.platform.catalog import SCANS_SCHEMA, Catalog

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _brain(seed: int, shape=(60, 70, 50)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.normal(size=shape), 3) * 400 + 500
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    head = ((zz - 30) / 26) ** 2 + ((yy - 35) / 31) ** 2 + ((xx - 25) / 22) ** 2 < 1
    return (img * head + rng.normal(0, 5, shape)).astype(np.float32)


def _row(path, data, affine, dataset, subject, scan_id=None):
    nib.save(nib.Nifti1Image(data, affine), path)
    return {"scan_id": scan_id or str(path), "dataset": dataset, "subject_id": subject, "sequence": "T1w",
            "affine": affine.reshape(-1).tolist(), "shape": list(data.shape), "image_uri": str(path)}  # fmt: skip


def _cropped_flipped_int16(original: np.ndarray, affine: np.ndarray, low=(2, 3, 5)) -> tuple[np.ndarray, np.ndarray]:
    """The copy: cropped ``low`` voxels into the head on the low side, first axis flipped in the header, int16."""
    crop = original[low[0] :, low[1] :, low[2] :]
    flipped = crop[::-1].round().astype(np.int16)
    copy_affine = affine @ np.array([[-1, 0, 0, crop.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    copy_affine[:3, 3] += affine[:3, :3] @ np.array(low)
    return flipped, copy_affine


def _transposed_rescaled(original: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The copy: axes stored in another order (z, x, y), intensities ×0.37 + 11, cropped 4 voxels on the high side."""
    data = np.transpose(original[:, :, :-4], (2, 0, 1)) * 0.37 + 11
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1  # new axis k reads old axis (2, 0, 1)[k]
    return data.astype(np.float32), affine @ perm


def test_cropped_flipped_retyped_copy_is_found_and_other_brains_are_not(tmp_path):
    original = _brain(0)
    flipped, copy_affine = _cropped_flipped_int16(original, AFFINE)
    rows = [
        _row(tmp_path / "a.nii.gz", original, AFFINE, "brats", "s1"),
        _row(tmp_path / "b.nii.gz", flipped, copy_affine, "upenn", "s9"),
        _row(tmp_path / "c.nii.gz", _brain(1), AFFINE, "upenn", "s2"),  # another person on the same grid
        _row(tmp_path / "d.nii.gz", _brain(2), AFFINE, "brats", "s3"),
    ]
    assert len(candidate_pairs(rows)) >= 3  # header-level candidates include the look-alikes
    groups = find_duplicates(rows)
    assert [g.scan_ids for g in groups] == [(str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"))]


def test_shortlist_keeps_cropped_reencoded_and_header_flipped_copies_only(tmp_path):
    rows = []
    for k in range(3):
        original = _brain(10 + k)
        rows.append(_row(tmp_path / f"o{k}.nii.gz", original, AFFINE, "brats", f"s{k}"))
        copy, aff = (_cropped_flipped_int16 if k % 2 == 0 else _transposed_rescaled)(original, AFFINE)
        rows.append(_row(tmp_path / f"c{k}.nii.gz", copy, aff, "ucsf", f"u{k}"))
    signatures: dict[str, Signature | None] = {}
    stats = SearchStats()
    groups = find_duplicates(rows, involving={r["scan_id"] for r in rows[1::2]}, signatures=signatures, stats=stats)
    copies = {tuple(sorted([rows[2 * k]["scan_id"], rows[2 * k + 1]["scan_id"]])) for k in range(3)}
    assert {g.scan_ids for g in groups} == copies
    # Each copy shares buckets with its original and correlates ≥ 0.99; the shortlist holds no other pair.
    for a, b in copies:
        assert set(signatures[a].buckets) & set(signatures[b].buckets)
        assert float(signatures[a].vector @ signatures[b].vector) > 0.99
    assert stats.shortlisted == 3 and stats.verified == 3
    assert stats.header_pairs == 9  # every ucsf scan × every brats scan on the grid: what the buckets avoid decoding


def _header_rows(n_per_dataset: int, datasets=("brats", "upenn")) -> list[dict]:
    """Same-grid header rows (240×240×155 at 1 mm, as in BraTS) with no image behind them."""
    affine = np.eye(4).reshape(-1).tolist()
    return [
        {"scan_id": f"{d}-{i}", "dataset": d, "subject_id": f"{d}-s{i}", "sequence": "T1w", "affine": affine,
         "shape": [240, 240, 155], "image_uri": f"/nonexistent/{d}/{i}.nii.gz"}
        for d in datasets for i in range(n_per_dataset)
    ]  # fmt: skip


def _random_signature(rng: np.random.Generator, like: np.ndarray | None = None, noise: float = 0.0) -> Signature:
    v = rng.normal(size=CELLS**3).astype(np.float32) if like is None else like + noise * rng.normal(size=CELLS**3)
    v = (v / np.linalg.norm(v)).astype(np.float32)
    return Signature(v, bucket_keys(v))


@pytest.mark.parametrize("n", [200, 800])
def test_one_new_scan_enumerates_its_bucket_not_the_pool(n, monkeypatch):
    """The old search listed every cross-dataset pair of a grid (n² here) and filtered to new scans afterwards."""
    rng = np.random.default_rng(n)
    rows = [*_header_rows(n), {**_header_rows(1, ("ucsf",))[0], "scan_id": "new"}]
    signatures = {r["scan_id"]: _random_signature(rng) for r in rows}
    signatures["upenn-7"] = _random_signature(rng, signatures["new"].vector, noise=0.003)  # its planted copy
    decoded: list[str] = []

    def no_decode(uri, options):
        decoded.append(uri)
        raise OSError("no image behind a header row")

    monkeypatch.setattr(duplicates, "_load_canonical", no_decode)
    monkeypatch.setattr(duplicates, "_ray_up", lambda: False)  # count decodes in this process
    assert len(candidate_pairs(rows, involving={"new"})) == 2 * n  # header level: linear in the pool, no n²
    stats = SearchStats()
    assert shortlist_pairs(rows, signatures, {"new"}, stats=stats) == [(n + 7, len(rows) - 1)]
    assert stats.bucket_pairs <= 3  # the bucket, not the 2n header candidates, let alone n² pairs
    stats = SearchStats()
    assert find_duplicates(rows, involving={"new"}, signatures=signatures, stats=stats) == []  # the copy has no file
    assert stats.header_pairs == 2 * n and stats.bucket_pairs <= 3 and stats.shortlisted == 1
    assert stats.signatures_computed == 0
    assert len(decoded) == 2  # only the shortlisted pair was ever opened


def test_byte_identical_copies_are_grouped_without_decoding(tmp_path, monkeypatch):
    def no_decode(uri, options):
        raise AssertionError(f"decoded {uri}")

    monkeypatch.setattr(duplicates, "_load_canonical", no_decode)
    monkeypatch.setattr(duplicates, "_ray_up", lambda: False)
    rows = _header_rows(1, ("brats", "upenn"))
    rows[1]["scan_id"] = rows[0]["scan_id"]  # the same bytes, catalogued under two datasets
    rows[0]["shape"] = [200, 200, 100]  # and no header candidate, so nothing needs a signature
    groups = find_duplicates(rows, involving={rows[0]["scan_id"]})
    assert len(groups) == 1
    assert groups[0].members == (("brats-0", "brats"), ("brats-0", "upenn"))
    assert groups[0].method == "identical-bytes"
    cat = Catalog.open(str(tmp_path / "catalog"))
    assert record_duplicates(cat, rows, groups) == 2
    table = cat.read("duplicates").to_pylist()
    assert sorted((r["dataset"], r["subject_id"]) for r in table) == [("brats", "brats-s0"), ("upenn", "upenn-s0")]
    assert record_duplicates(cat, rows, groups) == 0  # idempotent


def _catalog_with(tmp_path: Path, rows: list[dict]) -> Catalog:
    cat = Catalog.open(str(tmp_path / "catalog"))
    cat.create_if_missing("scans")
    _append_scans(cat, rows)
    return cat


def _append_scans(cat: Catalog, rows: list[dict]) -> None:
    n = len(rows)
    cols = {c: pa.nulls(n, SCANS_SCHEMA.field(c).type) for c in SCANS_SCHEMA.names}
    for c in ("scan_id", "dataset", "subject_id", "sequence", "image_uri", "affine", "shape"):
        cols[c] = pa.array([r[c] for r in rows], SCANS_SCHEMA.field(c).type)
    cols["status"] = pa.array(["current"] * n)
    write_deltalake(cat.table_location("scans").uri, pa.table(cols, schema=SCANS_SCHEMA), mode="append")


def test_catalog_search_stores_signatures_and_reuses_them(tmp_path, monkeypatch):
    originals = [_brain(20 + k) for k in range(3)]
    brats = [_row(tmp_path / f"b{k}.nii.gz", a, AFFINE, "brats", f"s{k}") for k, a in enumerate(originals)]
    cat = _catalog_with(tmp_path, brats)
    copy, aff = _cropped_flipped_int16(originals[1], AFFINE)
    upenn = [_row(tmp_path / "u0.nii.gz", copy, aff, "upenn", "p0"), _row(tmp_path / "u1.nii.gz", _brain(99), AFFINE, "upenn", "p1")]  # fmt: skip
    _append_scans(cat, upenn)
    computed: list[int] = []
    real = duplicates.signature_of_uri
    monkeypatch.setattr(duplicates, "signature_of_uri", lambda u, o: computed.append(1) or real(u, o))
    monkeypatch.setattr(duplicates, "_ray_up", lambda: False)  # count signatures in this process

    assert link_new_scans(cat, {r["scan_id"] for r in upenn}) == 1
    assert len(computed) == 5  # every scan of the grid, once
    stored = cat.read("scan_signatures")
    assert stored.num_rows == 5 and len(stored["bucket_keys"][0]) > 0

    # A third dataset: only its own scan is decoded for a signature; the old ones come from the table.
    copy2, aff2 = _transposed_rescaled(originals[1], AFFINE)
    ucsf = [_row(tmp_path / "c0.nii.gz", copy2, aff2, "ucsf", "c0")]
    _append_scans(cat, ucsf)
    computed.clear()
    groups, stats = search_new_scans(cat, {ucsf[0]["scan_id"]})
    assert len(computed) == 1 and stats.signatures_computed == 1 and stats.signatures_reused == 5
    assert [g.scan_ids for g in groups] == [
        tuple(sorted([brats[1]["scan_id"], ucsf[0]["scan_id"], upenn[0]["scan_id"]]))
    ]
    assert stats.shortlisted == 2  # the two earlier copies, not the four other scans of the grid
    dup = cat.read("duplicates").to_pylist()
    assert {r["subject_id"] for r in dup} == {"s1", "p0", "c0"}


@pytest.mark.timeout(180)
def test_ray_tasks_find_the_same_groups(tmp_path, ray_session, monkeypatch):
    monkeypatch.setattr(duplicates, "_URIS_PER_TASK", 2)  # several signature tasks, even for a handful of scans
    monkeypatch.setattr(duplicates, "_PAIRS_PER_TASK", 1)
    rows, copies = [], set()
    for k in range(3):
        original = _brain(30 + k)
        rows.append(_row(tmp_path / f"o{k}.nii.gz", original, AFFINE, "brats", f"s{k}"))
        copy, aff = _cropped_flipped_int16(original, AFFINE, low=(k, 2, 1))
        rows.append(_row(tmp_path / f"c{k}.nii.gz", copy, aff, "dicom", f"d{k}"))
        copies.add(tuple(sorted([rows[-2]["scan_id"], rows[-1]["scan_id"]])))
    stats = SearchStats()
    groups = find_duplicates(rows, involving={r["scan_id"] for r in rows[1::2]}, stats=stats)
    assert {g.scan_ids for g in groups} == copies
    assert stats.signatures_computed == 6 and stats.verified == 3
