"""``brainiac predict``: the preprocess config travels from the catalog to the registered model; a segmentation mask
comes back on the input's own grid (odd orientation, anisotropic voxels) over the tumour; regression and multiclass
results print with their units and land in JSON; the sequence check; user errors are one line with exit status 2."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from brainiac.jobs.config import load_config
from brainiac.jobs.predict import model_preprocess_config, preprocess_file
from brainiac.platform.cli.main import main


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model registry of this module's own: a ``champion`` set here never reaches other tests."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('predict-registry') / 'mlflow.db'}"
    _experiment(uri)  # creates the store up front, so later calls log nothing about it
    return uri


def _experiment(registry: str) -> str:
    """The tiny config's experiment in ``registry``, artifacts beside the sqlite file (never ./mlruns in the CWD)."""
    from brainiac.platform.tracking import ensure_experiment

    return ensure_experiment(load_config("tiny", [f"tracking.uri={registry}"]).tracking)


def _finetune_config(pipeline, registry: str, storage: Path, *overrides: str):
    return load_config(
        "tiny",
        [
            f"catalog.uri={pipeline.root / 'catalog'}",
            f"tracking.uri={registry}",
            # Pinned: the volumes the pipeline built (as a registered model records its preprocessing).
            f"patches.preprocess_version={pipeline.volumes.preprocess_version}",
            f"finetune.storage_path={storage}",
            "finetune.strategy=scratch",
            "finetune.bootstrap=100",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def segmenter(pipeline, registry, tmp_path_factory):
    """A UNETR trained from scratch on the tiny cohort's BraTS FLAIRs (train split: 3 cases), registered as
    segmentation@champion."""
    from brainiac.jobs.finetune.run import finetune

    # No augmentation: 30 epochs on 3 cases converge faster without it (and it once flipped image and mask apart).
    cfg = _finetune_config(pipeline, registry, tmp_path_factory.mktemp("seg-runs"), "finetune.task=segmentation",
                           "finetune.max_epochs=30", "finetune.lr=0.002", "finetune.batch_size=2",
                           "finetune.augment=false", "finetune.alias=champion")  # fmt: skip
    return finetune(cfg, progress=False)


def _reorient_anisotropic(img: nib.Nifti1Image, axcodes: tuple[str, str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels in another axis order and direction, every other slice of the last axis (spacing doubled); the
    affine follows, so each kept voxel stays where it was in millimetres."""
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(axcodes)
    )
    data = nib.orientations.apply_orientation(np.asanyarray(img.dataobj), ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    return np.ascontiguousarray(data[:, :, ::2]), affine @ np.diag([1.0, 1.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def odd_flair(pipeline, tmp_path_factory) -> dict[str, Path]:
    """A training-split BraTS FLAIR and its tumour mask, both moved to PIR axes with 2x thicker slices."""
    catalog = pipeline.catalog
    seed = pipeline.config.splits.seed
    rows = catalog.sql(
        "SELECT s.source_uri, s.scan_id FROM scans s JOIN splits p ON s.subject_id = p.subject_id "
        f"WHERE s.dataset = 'synth-brats' AND s.sequence = 'FLAIR' AND p.split = 'train' AND p.seed = {seed} "
        "ORDER BY s.source_uri LIMIT 1"
    ).to_pylist()
    assert rows, "the tiny cohort has a BraTS subject in the train split"
    from brainiac.ingestion.identified import identify

    source = Path(identify(pd.DataFrame(rows), catalog.uri)["source_uri"].iloc[0])  # the file on disk, by its key
    truth = pipeline.truth
    row = truth[[source.as_posix().endswith(p) for p in truth["path"]]].iloc[0]
    label = pipeline.cohort.out_dir / "_truth" / row["label_path"]
    out = tmp_path_factory.mktemp("odd")
    flair = nib.load(source)
    data, affine = _reorient_anisotropic(flair, ("P", "I", "R"))
    image = nib.Nifti1Image(data.astype(np.int16), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, out / "flair_pir.nii.gz")
    mask, mask_affine = _reorient_anisotropic(nib.load(label), ("P", "I", "R"))
    np.testing.assert_allclose(mask_affine, affine)
    nib.save(nib.Nifti1Image((mask > 0).astype(np.uint8), mask_affine), out / "truth_pir.nii.gz")
    return {"flair": out / "flair_pir.nii.gz", "truth": out / "truth_pir.nii.gz", "source": source,
            "scan_id": rows[0]["scan_id"]}  # fmt: skip


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by ``steps`` voxels (6-connected), in numpy."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        for axis in range(3):
            grown |= np.roll(out, 1, axis) | np.roll(out, -1, axis)
        out = grown
    return out


# A line Ray's log monitor forwards from an actor of the session's Ray (e.g. a finished Train run's
# PlacementGroupCleaner) to this driver process's stderr, at any moment: "(ActorName pid=123) ..." in ANSI colour.
RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\([\w.:-]+ pid=\d+(, ip=[\d.]+)?\)")


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in this process; stderr without the lines Ray forwards from other work of the test session (predict
    itself never starts Ray; run as a command it would not share a process with a Ray driver)."""
    code = main(argv)
    captured = capsys.readouterr()
    err = "".join(line for line in captured.err.splitlines(keepends=True) if not RAY_FORWARDED.match(line))
    return code, captured.out, err


@pytest.mark.timeout(900)
def test_preprocess_records_its_config_once_and_it_rebuilds_the_catalog_volume(pipeline):
    from brainiac.ingestion.prepare import preprocess_config_of, record_preprocess_config

    version = pipeline.volumes.preprocess_version
    rows = pipeline.catalog.select("preprocess_configs").to_pylist()
    assert [r["preprocess_version"] for r in rows].count(version) == 1
    cfg = preprocess_config_of(pipeline.catalog, version)
    assert cfg is not None and cfg.version() == version and cfg == pipeline.config.preprocess
    assert preprocess_config_of(pipeline.catalog, "no-such-version") is None
    assert record_preprocess_config(pipeline.catalog, cfg) is False  # idempotent: MERGE on the version
    assert pipeline.catalog.select("preprocess_configs").num_rows == len(rows)
    # The recorded config rebuilds a catalog volume from its raw file, voxel for voxel.
    scan = pipeline.catalog.sql(
        "SELECT s.image_uri, v.fixed, v.fixed_shape FROM scans s JOIN volumes v ON s.scan_id = v.scan_id "
        f"WHERE v.preprocess_version = '{version}' AND s.sequence = 'FLAIR' AND s.dataset = 'synth-brats' LIMIT 1"
    ).to_pylist()[0]
    from brainiac.ingestion.volumes import decode_array

    _, result = preprocess_file(scan["image_uri"], cfg)
    np.testing.assert_array_equal(result.fixed, decode_array(scan["fixed"], scan["fixed_shape"], "float16"))


@pytest.mark.timeout(1800)
def test_segmentation_mask_is_on_the_input_grid_and_over_the_tumour(pipeline, registry, segmenter, odd_flair,
                                                                    tmp_path, capsys):  # fmt: skip
    client = mlflow.MlflowClient(registry, registry_uri=registry)
    version = client.get_model_version_by_alias("brainiac-segmentation", "champion")
    recorded = model_preprocess_config(version, registry)
    assert recorded is not None and recorded.version() == pipeline.volumes.preprocess_version

    out = tmp_path / "out"
    code, stdout, _ = _run(["predict", "--model", "models:/brainiac-segmentation@champion", str(odd_flair["flair"]),
                            "--out", str(out), "--set", f"tracking.uri={registry}"], capsys)  # fmt: skip
    assert code == 0, stdout
    assert "no models:/brainiac-sequence@champion" in stdout  # no sequence model here: said once, not an error
    assert "tumour volume" in stdout and " mL" in stdout

    image = nib.load(odd_flair["flair"])
    mask_img = nib.load(out / "flair_pir_mask.nii.gz")
    assert mask_img.shape == image.shape
    np.testing.assert_array_equal(mask_img.affine, image.affine)
    np.testing.assert_array_equal(mask_img.get_qform(), image.get_qform())
    np.testing.assert_array_equal(mask_img.get_sform(), image.get_sform())
    assert int(mask_img.header["qform_code"]) == 1 and int(mask_img.header["sform_code"]) == 1
    assert nib.aff2axcodes(mask_img.affine) == ("P", "I", "R")

    predicted = np.asanyarray(mask_img.dataobj) > 0
    truth = np.asanyarray(nib.load(odd_flair["truth"]).dataobj) > 0
    assert predicted.any() and truth.any()
    dice = 2 * np.count_nonzero(predicted & truth) / (np.count_nonzero(predicted) + np.count_nonzero(truth))
    near = np.count_nonzero(predicted & _dilate(truth, 2)) / np.count_nonzero(predicted)
    assert dice > 0.5 and near > 0.7, (dice, near)  # 0.83 when written (PIR, 3x3x6 mm)

    result = json.loads((out / "flair_pir.json").read_text())
    voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
    assert result["task"] == "segmentation" and result["mask_path"] == str(out / "flair_pir_mask.nii.gz")
    assert result["tumour_volume_ml"] == pytest.approx(np.count_nonzero(predicted) * voxel_ml)
    assert result["preprocess_version"] == pipeline.volumes.preprocess_version


@pytest.mark.timeout(1800)
def test_regression_prints_the_value_with_units_and_writes_json(pipeline, registry, tmp_path, capsys):
    from brainiac.jobs.finetune.run import finetune

    cfg = _finetune_config(pipeline, registry, tmp_path / "runs", "finetune.task=brain_age", "finetune.max_epochs=1",
                           "finetune.alias=champion")  # fmt: skip
    s = finetune(cfg, progress=False)
    t1 = pipeline.catalog.sql(
        "SELECT image_uri FROM scans WHERE sequence = 'T1w' AND dataset = 'synth-lifespan-bids' ORDER BY image_uri "
        "LIMIT 2"
    )["image_uri"].to_pylist()
    out = tmp_path / "out"
    code, stdout, _ = _run(["predict", "--model", s.model_uri, *t1, "--out", str(out), "--set",
                            f"tracking.uri={registry}", "--no-sequence-check"], capsys)  # fmt: skip
    assert code == 0, stdout
    stdout = " ".join(stdout.split())  # rich wraps lines at the terminal width (staged scans have 64-hex names)
    assert stdout.count("brain age ") == 2 and stdout.count(" years") >= 2
    for path in t1:
        stem = Path(path).name.removesuffix(".gz").removesuffix(".nii")
        result = json.loads((out / f"{stem}.json").read_text())
        assert result["task"] == "brain_age" and result["units"] == "years" and np.isfinite(result["value"])
        assert f"brain age {result['value']:.1f} years" in stdout
        assert result["inputs"] == {"T1w": str(Path(path).resolve())}


class ModelRef(str):
    """A registry URI that also knows the version number it was registered as."""

    version: str

    def __new__(cls, uri: str, version: str) -> ModelRef:
        out = super().__new__(cls, uri)
        out.version = version
        return out


def _register_constant_sequence_model(registry: str, preprocess_cfg, alias: str) -> ModelRef:
    """A real registered task model (weights + spec) that calls every input T1w (p ≈ 1), with the recorded
    preprocessing of a task model."""
    from brainiac.models.config import BackboneConfig
    from brainiac.models.export import ModelSpec, build_model, save_model_artifacts
    from brainiac.models.tasks.spec import task_spec

    size = preprocess_cfg.fixed_size
    spec = ModelSpec.for_task(task_spec("sequence"), BackboneConfig.tiny(img_size=size), (1, size, size, size))
    model = build_model(spec)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([12.0, 0.0, 0.0, 0.0]))  # classes: T1w, T2w, FLAIR, T1ce
    client = mlflow.MlflowClient(registry, registry_uri=registry)
    run_id = client.create_run(_experiment(registry), run_name="constant-sequence-model").info.run_id
    source = save_model_artifacts(client, run_id, model, spec)
    client.log_dict(run_id, preprocess_cfg.to_dict(), "model/preprocess.json")
    client.set_terminated(run_id)
    name = "brainiac-sequence"
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name, source=source, run_id=run_id, tags={"task": "sequence", "preprocess_version": preprocess_cfg.version()}
    )
    client.set_registered_model_alias(name, alias, version.version)
    return ModelRef(f"models:/{name}@{alias}", str(version.version))


@pytest.mark.timeout(1800)
def test_sequence_check_rejects_a_confidently_other_sequence(pipeline, registry, segmenter, odd_flair, tmp_path,
                                                             capsys):  # fmt: skip
    from brainiac.ingestion.prepare import preprocess_config_of

    client = mlflow.MlflowClient(registry, registry_uri=registry)
    uri = _register_constant_sequence_model(
        registry, preprocess_config_of(pipeline.catalog, pipeline.volumes.preprocess_version), "champion"
    )
    capsys.readouterr()  # MLflow's own warnings while logging it are not predict's output
    try:
        base = ["--out", str(tmp_path / "out"), "--set", f"tracking.uri={registry}"]
        code, _, err = _run(["predict", "--model", segmenter.model_uri, str(odd_flair["flair"]), *base], capsys)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert "looks like T1w" in err and "--no-sequence-check" in err
        code, stdout, _ = _run(["predict", "--model", segmenter.model_uri, str(odd_flair["flair"]), *base,
                                "--no-sequence-check"], capsys)  # fmt: skip
        assert code == 0 and "tumour volume" in stdout
        # The sequence model itself is a multiclass task model: class and probabilities, no check of its own input.
        code, stdout, _ = _run(["predict", "--model", uri, str(odd_flair["flair"]), *base], capsys)
        assert code == 0 and "sequence T1w (T1w 1.00" in stdout
        result = json.loads((tmp_path / "out" / "flair_pir.json").read_text())
        assert result["label"] == "T1w" and sum(result["probabilities"].values()) == pytest.approx(1.0)
        # A refused candidate is not served; on purpose (--any-version) its outputs are marked NOT CHAMPION.
        refused = _register_constant_sequence_model(
            registry, preprocess_config_of(pipeline.catalog, pipeline.volumes.preprocess_version), "challenger"
        )
        client.set_model_version_tag("brainiac-sequence", refused.version, "promotion.decision", "rejected")
        code, _, err = _run(["predict", "--model", "models:/brainiac-sequence@challenger", str(odd_flair["flair"]),
                             *base], capsys)  # fmt: skip
        assert code == 2 and "is not the champion" in err and len(err.strip().splitlines()) == 1, err
        code, stdout, _ = _run(["predict", "--model", "models:/brainiac-sequence@challenger", str(odd_flair["flair"]),
                                *base, "--any-version"], capsys)  # fmt: skip
        assert code == 0 and "WARNING" in stdout and "NOT CHAMPION" in stdout
        result = json.loads((tmp_path / "out" / "flair_pir.json").read_text())
        assert result["champion"] is False and "refused at promotion" in result["not_champion"]
    finally:
        client.delete_registered_model_alias("brainiac-sequence", "champion")


def test_user_errors_are_one_line_and_exit_2(registry, tmp_path, capsys):
    client = mlflow.MlflowClient(registry, registry_uri=registry)
    run = client.create_run(_experiment(registry))
    for name, tags in (("brainiac-idh", {"task": "idh"}), ("brainiac-untagged", {}),
                       ("brainiac-brain_age", {"task": "brain_age"})):  # fmt: skip
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # already there from another test
            client.create_registered_model(name)
        v = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                        tags=tags)  # fmt: skip
        client.set_registered_model_alias(name, "bare", v.version)
    # A version whose run records its preprocessing but holds no weights + spec (as a model logged as a pickle).
    other = client.create_run(_experiment(registry)).info.run_id
    client.log_dict(other, {}, "model/preprocess.json")
    v = client.create_model_version("brainiac-brain_age", source=f"runs:/{other}/model", run_id=other,
                                    tags={"task": "brain_age"})  # fmt: skip
    client.set_registered_model_alias("brainiac-brain_age", "noweights", v.version)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8), dtype=np.float32), np.eye(4)), scan)
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image\n")
    base = ["--out", str(tmp_path / "out"), "--set", f"tracking.uri={registry}"]
    cases = [
        (["--model", "models:/brainiac-idh@bare", str(tmp_path / "missing.nii.gz")], "does not exist"),
        (["--model", "models:/brainiac-idh@bare", str(text)], "is not a readable NIfTI file"),
        (["--model", "models:/brainiac-idh@bare", "--t1ce", str(scan)], "task idh needs --flair"),
        (["--model", "models:/brainiac-idh@bare", str(scan)], "takes one scan per sequence"),
        (["--model", "models:/brainiac-nope@champion", str(scan)], "cannot find models:/brainiac-nope@champion"),
        (["--model", "models:/brainiac-untagged@bare", str(scan)], "not a fine-tuned task model"),
        (["--model", "models:/brainiac-brain_age@bare", str(scan)], "records no preprocess config; re-register"),
        (["--model", "models:/brainiac-brain_age@noweights", str(scan)], "has no model_spec.json; re-log it"),
    ]
    for argv, needle in cases:
        code, _, err = _run(["predict", *argv, *base], capsys)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "out").exists()  # nothing written for a refused request


def test_predict_serves_champions_only_and_says_why_a_version_is_refused(registry, tmp_path, capsys):
    """A version without the champion alias (here: refused at promotion for not beating the trivial baseline, as the
    quickstart's segmenter was by its Dice gate) is not used: one line naming the version, the promotion's reasons and
    the missing champion, exit 2, nothing written. The check runs on a real registered model with weights and its
    recorded preprocessing, so it is the champion rule that refuses it."""
    from brainiac.ingestion.preprocess import PreprocessConfig
    from brainiac.jobs.predict import serving_status
    from brainiac.models.export import model_version

    client = mlflow.MlflowClient(registry, registry_uri=registry)
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # the sequence test may have made it
        client.delete_registered_model_alias("brainiac-sequence", "champion")
    ref = _register_constant_sequence_model(registry, PreprocessConfig(fixed_size=16), "refused")
    reasons = "beats trivial baseline: balanced_accuracy beats the baseline by +0, 95% CI [+0, +0]"
    client.set_model_version_tag("brainiac-sequence", ref.version, "promotion.decision", "rejected")
    client.set_model_version_tag("brainiac-sequence", ref.version, "promotion.reasons", reasons)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8), dtype=np.float32), np.eye(4)), scan)
    code, stdout, err = _run(["predict", "--model", ref, str(scan), "--out", str(tmp_path / "out"), "--set",
                              f"tracking.uri={registry}"], capsys)  # fmt: skip
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    err = " ".join(err.split())
    assert f"brainiac-sequence v{ref.version} is not the champion" in err and "refused at promotion" in err
    assert reasons in err and "brainiac-sequence has no champion" in err and "--any-version" in err
    assert not (tmp_path / "out").exists() and "sequence" not in stdout

    # The same version once it holds the alias is served; a newer, never-judged version is not, and names the champion.
    client.set_registered_model_alias("brainiac-sequence", "champion", ref.version)
    try:
        assert serving_status(model_version(ref, registry), registry) is None
        newer = _register_constant_sequence_model(registry, PreprocessConfig(fixed_size=16), "newer")
        status = serving_status(model_version(newer, registry), registry)
        assert status is not None and "never promoted" in status and f"the champion is v{ref.version}" in status
    finally:
        client.delete_registered_model_alias("brainiac-sequence", "champion")
