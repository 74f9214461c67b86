"""Ingest of the synthetic cohorts (all four layouts plus the stroke cohort) checked scan by scan against the truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainiac.ingestion.identified import identify
from brainiac.ingestion.ingest import ingest

pytestmark = pytest.mark.timeout(600)

DIAGNOSIS = {"CN": "healthy", "MCI": "MCI", "glioma": "glioma", "stroke": "stroke"}


@pytest.fixture(scope="module")
def joined(pipeline) -> pd.DataFrame:
    """Current catalog rows joined to the truth on (dataset, path relative to the dataset root)."""
    rows = identify(pipeline.catalog.scans().to_pandas(), pipeline.catalog.uri)
    truth = pipeline.truth.rename(columns=lambda c: f"true_{c}")
    merged = rows.merge(
        truth, left_on=["dataset", "relative_path"], right_on=["true_dataset", "true_path"], how="outer", indicator=True
    )
    return merged


def test_row_counts_per_cohort_equal_the_truth(pipeline, joined):
    assert (joined["_merge"] == "both").all(), joined.loc[
        joined["_merge"] != "both", ["dataset", "relative_path", "true_path"]
    ]
    counts = pipeline.catalog.sql("SELECT dataset, count(*) AS n FROM scans WHERE status = 'current' GROUP BY dataset")
    got = dict(zip(counts["dataset"].to_pylist(), counts["n"].to_pylist(), strict=True))
    assert got == pipeline.truth.groupby("dataset").size().to_dict()
    assert set(got) == set(pipeline.cohort.cohorts.values())


def test_harmonized_metadata_matches_the_truth(joined):
    assert (joined["sequence"] == joined["true_sequence"]).all()
    # Ages: each dataset reports them at its own precision (some as whole years), never in other units.
    # BraTS-style releases report age only for the cases in their survival table, as real ones do.
    assert (joined["age_years"] - joined["true_age_years"]).abs().max() < 1.0
    assert joined.loc[joined["dataset"] != "synth-brats", "age_years"].notna().all()
    assert joined["age_years"].notna().mean() > 0.8
    assert (joined["diagnosis"] == joined["true_diagnosis"].map(DIAGNOSIS)).all()
    given = joined["sex"].notna()
    assert given.mean() > 0.5 and (joined.loc[given, "sex"] == joined.loc[given, "true_sex"]).all()
    known = joined["field_strength_t"].notna()
    assert known.any() and np.allclose(
        joined.loc[known, "field_strength_t"], joined.loc[known, "true_field_strength_t"]
    )
    vendor = joined["manufacturer"].notna()
    assert vendor.any() and (joined.loc[vendor, "manufacturer"] == joined.loc[vendor, "true_vendor"]).all()
    assert joined["subject_id"].str.fullmatch(r"sub-[0-9a-f]{20}").all()


def test_geometry_matches_the_truth_within_a_micron(joined):
    for row in joined.itertuples():
        assert list(row.shape) == json.loads(row.true_shape), row.relative_path
        affine = np.array(row.affine).reshape(4, 4)
        true = np.array(json.loads(row.true_affine)).reshape(4, 4)
        corners = np.array(
            [[i, j, k, 1] for i in (0, row.shape[0] - 1) for j in (0, row.shape[1] - 1) for k in (0, row.shape[2] - 1)]
        )
        # Compare the voxel grid in millimetres: a DICOM series is stored slice-ascending, so its voxel order (and
        # axcodes) may legitimately differ from the truth's while every voxel sits in the same place.
        ours = np.array(sorted(map(tuple, np.round(corners @ affine.T, 4))))
        theirs = np.array(sorted(map(tuple, np.round(corners @ true.T, 4))))
        assert np.abs(ours - theirs).max() < 1e-3, row.relative_path
        if row.format == "nifti":
            assert row.axcodes == row.true_axcodes


def test_labels_are_joined_across_differently_formatted_ids(joined):
    labels = joined["labels"].map(json.loads)
    brats = joined["dataset"] == "synth-brats"
    idh = labels[brats].map(lambda d: d.get("idh"))
    assert idh.notna().all()
    assert (idh == (joined.loc[brats, "true_idh"] == "mutant")).all()
    stroke = joined["dataset"] == "synth-stroke-bids"
    onset = labels[stroke].map(lambda d: d.get("stroke_onset_days"))
    assert np.allclose(onset.astype(float), joined.loc[stroke, "true_stroke_onset_days"], atol=0.01)
    assert labels[brats].map(lambda d: "tumour_uri" in d or "seg_uri" in d).all()


def test_second_run_is_a_no_op(pipeline):
    before = pipeline.catalog.version("scans")
    sources = [str(pipeline.cohort.out_dir / f) for f in pipeline.cohort.cohorts.values()]
    summary = ingest(pipeline.config, sources, progress=False)
    assert summary.inserted == 0 and summary.superseded == 0
    assert summary.unchanged == len(pipeline.truth)
    assert pipeline.catalog.version("scans") == before


def test_no_phi_in_any_table(pipeline):
    clinical = pd.read_csv(pipeline.cohort.out_dir / pipeline.cohort.cohorts["dicom"] / "clinical.csv", dtype=str)
    secrets = set(clinical["PatientName"]) | {n.split()[0] for n in clinical["PatientName"]} | set(clinical["MRN"])
    import pydicom

    some = next((pipeline.cohort.out_dir / pipeline.cohort.cohorts["dicom"]).rglob("*.dcm"))
    ds = pydicom.dcmread(some, stop_before_pixels=True)
    secrets |= {
        str(ds.PatientBirthDate),
        str(ds.StudyDate),
        str(ds.InstitutionName),
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
    }
    secrets = {s for s in secrets if len(s) >= 4}
    for name in pipeline.catalog.tables():
        frame = pipeline.catalog.read(name).to_pandas()
        for column in frame.columns:  # binary columns (arrays, signatures) as hex: JSON cannot hold raw bytes
            if any(isinstance(v, bytes) for v in frame[column]):
                frame[column] = frame[column].map(lambda v: v.hex() if isinstance(v, bytes) else v)
        text = frame.to_json(date_format="iso")
        leaked = sorted(s for s in secrets if s in text)
        assert not leaked, f"{name} leaks {leaked}"


def test_access_levels_are_enforced(pipeline):
    levels = pipeline.catalog.sql("SELECT DISTINCT dataset, access FROM scans").to_pandas()
    assert dict(zip(levels["dataset"], levels["access"], strict=True))["synth-gbm-dicom"] == "restricted"
    allowed = pipeline.catalog.scans(allowed_access=["open", "registered"]).to_pandas()
    assert len(allowed) > 0 and "synth-gbm-dicom" not in set(allowed["dataset"])  # left out, not an error
    fine = pipeline.catalog.scans(dataset=["synth-brats"], allowed_access=["open"]).to_pandas()
    assert len(fine) == int((pipeline.truth["dataset"] == "synth-brats").sum())


def test_python_query_api_filters(pipeline):
    t1 = pipeline.catalog.scans(sequence="T1w", age_between=(40, 90)).to_pandas()
    assert len(t1) > 0 and (t1["sequence"] == "T1w").all() and t1["age_years"].between(40, 90).all()
    everything = pipeline.catalog.scans().to_pandas()
    expected = everything[(everything["sequence"] == "T1w") & everything["age_years"].between(40, 90)]
    assert set(t1["scan_id"]) == set(expected["scan_id"])
    ray_ds = pipeline.catalog.scans(sequence="T1w", age_between=(40, 90)).to_ray(columns=["scan_id"])
    assert sorted(r["scan_id"] for r in ray_ds.take_all()) == sorted(t1["scan_id"])


def test_cross_dataset_copies_are_linked(pipeline, joined):
    dup = pipeline.catalog.read("duplicates").to_pandas()
    truth = joined[joined["true_duplicate_group"].notna() & (joined["true_duplicate_group"] != "")]
    assert len(truth) > 0, "the tiny cohort should contain cross-dataset copies"
    copies = truth[truth["true_duplicate_of"].notna() & (truth["true_duplicate_of"] != "")]
    # Every copy is grouped with its original, and nothing else is grouped.
    originals = joined.set_index(
        joined["dataset"].map({"synth-brats": "brats"}).fillna("x") + "/" + joined["relative_path"]
    )
    expected_pairs = {
        frozenset({r.scan_id, originals.loc[r.true_duplicate_of, "scan_id"]}) for r in copies.itertuples()
    }
    found_pairs = {frozenset(g["scan_id"]) for _, g in dup.groupby("group_id")}
    assert found_pairs == expected_pairs
    assert pipeline.ingest_summary.duplicate_groups == len(expected_pairs)
