"""The preprocess job on the tiny pipeline: every scan becomes a volume once, versions sit side by side, labels keep
their values, splits are written, and a second run does nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from brainiac.ingestion.identified import identify
from brainiac.ingestion.prepare import preprocess
from brainiac.ingestion.volumes import read_volumes, row_arrays

pytestmark = pytest.mark.timeout(900)


def test_every_scan_becomes_one_volume(pipeline):
    summary = pipeline.volumes
    scans = pipeline.catalog.scans().to_pandas()
    expected = scans[scans["sequence"] != "other"]
    assert summary.processed == len(expected) and not summary.quarantined
    vols = read_volumes(pipeline.catalog, summary.preprocess_version, qc_pass_only=False).to_pandas()
    assert set(vols["scan_id"]) == set(expected["scan_id"])
    assert vols["qc_pass"].mean() >= 0.9, vols.loc[~vols["qc_pass"], "qc_reason"].tolist()
    assert summary.decode_ms_per_volume is not None and summary.decode_ms_per_volume < 50


def test_arrays_decode_with_the_tiny_shapes_and_z_scores(pipeline):
    version = pipeline.volumes.preprocess_version
    row = read_volumes(pipeline.catalog, version).slice(0, 1).to_pylist()[0]
    arrays = row_arrays(row)
    assert arrays["fixed"].shape == (32, 32, 32) and arrays["fixed"].dtype == np.float16
    brain = arrays["whole"][arrays["mask"] > 0].astype(np.float32)
    assert abs(brain.mean()) < 0.2 and 0.8 < brain.std() < 1.2


def test_label_maps_keep_their_values(pipeline):
    version = pipeline.volumes.preprocess_version
    rows = read_volumes(pipeline.catalog, version, qc_pass_only=False).to_pandas()
    brats = rows[rows["dataset"] == "synth-brats"]
    assert len(brats) > 0 and (brats["label_name"] == "seg").all()
    for row in brats.to_dict("records")[:4]:
        arrays = row_arrays(row)
        assert set(np.unique(arrays["labels_whole"])) <= {0, 1, 2, 4}
        assert {1, 2, 4} & set(np.unique(arrays["labels_whole"]))


@pytest.fixture(scope="module")
def own_pipeline(fork_pipeline):
    """A copy of the pipeline's catalog, preprocessed, for the test that adds a preprocess version: the session
    pipeline is read only."""
    return fork_pipeline("prepare", "volumes", tracking=False)


def test_second_run_does_nothing_and_a_new_config_is_a_new_version(own_pipeline):
    version, table_version = own_pipeline.volumes.preprocess_version, own_pipeline.catalog.version("volumes")
    again = preprocess(own_pipeline.config, progress=False)
    assert again.processed == 0 and again.already_done == own_pipeline.volumes.processed
    assert own_pipeline.catalog.version("volumes") == table_version
    other = dataclasses.replace(
        own_pipeline.config,
        preprocess=dataclasses.replace(own_pipeline.config.preprocess, clip_percentiles=[1.0, 99.0]),
    )
    new = preprocess(other, progress=False, limit=2)
    assert new.preprocess_version != version and new.processed == 2
    old = read_volumes(own_pipeline.catalog, version, qc_pass_only=False)
    assert len(old) == own_pipeline.volumes.processed  # old kept


def test_splits_cover_every_subject_once(pipeline):
    pipeline.volumes  # noqa: B018
    splits = pipeline.catalog.read("splits").to_pandas()
    splits = splits[splits["seed"] == pipeline.config.splits.seed]
    subjects = set(pipeline.catalog.scans().to_pandas()["subject_id"])
    assert set(splits["subject_id"]) == subjects and not splits["subject_id"].duplicated().any()
    assert set(splits["split"]) <= {"train", "val", "test"} and (splits["split"] == "train").any()


def test_voxel_defects_are_quarantined_once_and_the_rest_is_processed(pipeline, tmp_path):
    import shutil

    import nibabel as nib

    from brainiac.ingestion.ingest import ingest
    from brainiac.jobs.config import load_config
    from brainiac.platform.catalog import Catalog

    src = pipeline.cohort.out_dir / pipeline.cohort.cohorts["adni"]
    root = tmp_path / "synth-adni"
    shutil.copytree(src, root)
    victim = sorted((root / "images").glob("*.nii"))[0]
    img = nib.load(victim, mmap=False)  # we overwrite this very file below
    data = np.array(img.dataobj, dtype=np.float32)
    data[data.shape[0] // 2, :, :] = np.nan  # only decoding reveals this; ingest accepts the file
    nib.save(nib.Nifti1Image(data, img.affine), victim)
    cfg = load_config("tiny", [f"catalog.uri={tmp_path / 'catalog'}"])
    assert not ingest(cfg, [str(root)], progress=False).quarantined
    first = preprocess(cfg, progress=False)
    assert first.quarantined == {"nonfinite_voxels": 1}
    assert first.processed == first.selected - 1
    catalog = Catalog.open(cfg.catalog.uri)
    q = identify(catalog.read("quarantine").to_pandas(), catalog.uri)
    assert q["source_uri"].tolist() == [str(victim)]
    again = preprocess(cfg, progress=False)
    assert again.processed == 0 and not again.quarantined  # not retried
