"""Fine-tuning on the tiny pipeline: every task spec trains and scores through the one engine, the linear strategy
leaves the encoder bit-identical, splits and regimes never leak, and a 3-trial Tune sweep logs to MLflow and registers
a ``challenger``; the CLI's error contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from brainiac.jobs.finetune.data import load_task_data, regime_subjects
from brainiac.jobs.finetune.engine import predict, score, train_trial
from brainiac.models.export import load_encoder, load_model_artifacts
from brainiac.models.tasks.model import encoder_of
from brainiac.models.tasks.spec import load_specs, task_spec

HP = {"lr": 1e-3, "weight_decay": 1e-4, "dropout": 0.1, "encoder_lr_mult": 0.1, "freeze_depth": 0, "seed": 0}


@pytest.fixture(scope="module")
def encoder(pipeline):
    """The pipeline's pretrained encoder (its weights and backbone config), loaded from the registry."""
    uri = f"sqlite:///{pipeline.root / 'mlflow.db'}"
    model, backbone = load_encoder(pipeline.encoder.model_uri, tracking_uri=uri)
    return backbone, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def own_pipeline(fork_pipeline):
    """The pipeline with a copy of its MLflow store, for the tests that log runs and register models (the catalog is
    the shared one, read only: the encoder's pretraining record names it, which the leakage check verifies)."""
    return fork_pipeline("finetune", "encoder", catalog=False)


def _arrays(data, train, val):
    return {"train_x": data.inputs[train], "train_y": data.targets[train], "train_raw": data.raw[train],
            "val_x": data.inputs[val], "val_y": data.targets[val], "val_raw": data.raw[val]}  # fmt: skip


@pytest.mark.timeout(900)
@pytest.mark.parametrize("task", sorted(load_specs()))
def test_every_task_spec_trains_and_scores_through_the_one_engine(pipeline, encoder, task):
    spec = load_specs()[task]
    backbone, state = encoder
    data = load_task_data(pipeline.catalog, pipeline.pretrain_config(), spec)
    assert data.inputs.shape[1] == (1 if spec.per_scan else len(spec.sequences)) and len(data.targets) == len(
        data.inputs
    )
    train, val, test = data.indices("train"), data.indices("val"), data.indices("test")
    assert len(train) > 0
    fit = train_trial(spec, backbone, state, HP, _arrays(data, train, val), strategy="linear", max_epochs=2,
                      batch_size=4, augment=True)  # fmt: skip
    assert len(fit.history) == 2 and np.isfinite(fit.history[-1]["train_loss"])
    assert {f"val_{m}" for m in spec.metrics} <= set(fit.history[-1])
    evaluated = test if len(test) else train
    predictions = predict(fit.model, spec, data.inputs[evaluated], fit.scale)
    metrics = score(spec, predictions, data.targets[evaluated], data.raw[evaluated])
    assert set(metrics) == set(spec.metrics)
    if spec.kind == "regression":
        assert spec.units in ("years", "days") and np.isfinite(metrics["mae"])  # in the label's own units
    if spec.kind == "segmentation":
        assert predictions.shape[1:] == data.inputs.shape[2:] and 0.0 <= metrics["dice"] <= 1.0
    # The linear strategy trained only the head: every encoder weight is bit-identical to the pretrained one.
    trained = encoder_of(fit.model).state_dict()
    prefix = "vit." if spec.kind == "segmentation" else ""  # a UNETR holds the encoder's ViT itself
    for key, value in trained.items():
        assert torch.equal(value, state[prefix + key]), key


@pytest.mark.timeout(600)
def test_splits_and_regimes_never_leak_subjects(pipeline):
    for spec in load_specs().values():
        data = load_task_data(pipeline.catalog, pipeline.pretrain_config(), spec)
        sides = {s: {data.subjects[i] for i in data.indices(s)} for s in ("train", "val", "test")}
        assert not (sides["train"] & sides["val"]) and not (sides["train"] & sides["test"])
        assert not (sides["val"] & sides["test"])
        for seed in (0, 1):
            shots = regime_subjects(data, shots=1, fraction=None, seed=seed)
            part = regime_subjects(data, shots=None, fraction=0.5, seed=seed)
            assert shots <= sides["train"] and part <= sides["train"]
            assert shots == regime_subjects(data, shots=1, fraction=None, seed=seed)  # deterministic per seed
        if spec.kind in ("binary", "multiclass"):
            classes = {int(data.targets[i]) for i in data.indices("train")}
            picked = regime_subjects(data, shots=1, fraction=None, seed=0)
            assert len(picked) <= len(classes)  # one subject per class at K=1


@pytest.mark.timeout(900)
def test_tune_sweep_logs_child_runs_and_registers_a_challenger(own_pipeline, tmp_path):
    from brainiac.jobs.finetune.run import finetune

    uri = own_pipeline.tracking_uri
    cfg = own_pipeline.pretrain_config(
        "finetune.task=sequence", "finetune.strategy=full", f"finetune.init={own_pipeline.encoder.model_uri}",
        "finetune.trials=3", "finetune.max_epochs=2", "finetune.grace_epochs=1", "finetune.bootstrap=200",
        f"finetune.storage_path={tmp_path / 'runs'}",
    )  # fmt: skip
    s = finetune(cfg, progress=False)
    import ray

    # Trials stopped early by ASHA must not keep their CPUs reserved (the next job would wait forever).
    assert ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"] - 0.5
    assert s.trials == 3 and set(s.best_config) == {
        "lr", "weight_decay", "dropout", "encoder_lr_mult", "freeze_depth", "layer_decay", "warmup_fraction"}  # fmt: skip
    per_seed = s.test["balanced_accuracy"]["seeds"]  # one seed: the test value is that seed's
    assert len(per_seed) == 1 and s.test["balanced_accuracy"]["mean"] == pytest.approx(per_seed[0])
    assert s.leakage_check == "verified"
    assert set(s.test) == {"balanced_accuracy", "macro_auc"}
    assert (
        s.test["balanced_accuracy"]["low"] <= s.test["balanced_accuracy"]["mean"] <= s.test["balanced_accuracy"]["high"]
    )
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    parent = client.get_run(s.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["brainiac.task"] == "sequence"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{s.mlflow_run_id}'")
    assert len(children) == 3 and all("val_balanced_accuracy" in c.data.metrics for c in children)
    version = client.get_model_version_by_alias("brainiac-sequence", "challenger")
    assert version.run_id == s.mlflow_run_id and version.tags["strategy"] == "full"
    assert version.tags["task_spec"] == task_spec("sequence").fingerprint()  # what the lineage gate of promote checks
    loaded = load_model_artifacts("models:/brainiac-sequence@challenger", uri)  # weights + spec, no pickle
    out = loaded.module(torch.zeros(2, 1, 32, 32, 32))
    assert out.shape == (2, 4)
    assert loaded.spec.input_shape == [1, 32, 32, 32] and loaded.spec.strategy == "full"


def test_finetune_cli_errors_are_one_line_and_exit_2(tmp_path):
    brainiac = Path(sys.executable).parent / "brainiac"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for args, expected in (
        (["--task", "nope"], "unknown task 'nope'"),
        (["--task", "idh", "--strategy", "linear"], "needs --init"),
        (["--task", "idh", "--shots", "5", "--fraction", "0.1"], "not both"),
    ):
        out = subprocess.run([str(brainiac), "finetune", *args, "--catalog", str(tmp_path / "c")],
                             capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert expected in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def _linear_probe_model(pipeline, tmp_path, task: str):
    """(config, FinetuneSummary) of a 2-epoch linear model of ``task`` on the pipeline encoder, aliased ``evaluated``
    (``pipeline``: a fork with its own MLflow store)."""
    from brainiac.jobs.finetune.run import finetune

    cfg = pipeline.pretrain_config(
        f"finetune.task={task}", "finetune.strategy=linear", f"finetune.init={pipeline.encoder.model_uri}",
        "finetune.max_epochs=2", "finetune.bootstrap=200", "finetune.alias=evaluated",
        f"finetune.storage_path={tmp_path / 'runs'}",
    )  # fmt: skip
    return cfg, finetune(cfg, progress=False)


@pytest.mark.timeout(900)
def test_evaluate_scores_the_challenger_with_cis_robustness_and_saliency(own_pipeline, tmp_path):
    """``brainiac evaluate`` on a registered model: test metrics with CIs, every artifact at every strength, overlays."""
    from brainiac.jobs.finetune.evaluate import evaluate
    from brainiac.models.tasks.robustness import ARTIFACTS

    uri = own_pipeline.tracking_uri
    cfg, trained = _linear_probe_model(own_pipeline, tmp_path, "sequence")
    s = evaluate(cfg, trained.model_uri, saliency_cases=2, bootstrap=200)
    assert s.task == "sequence" and s.version == trained.model_version and s.test_cases > 0
    assert set(s.metrics) == {"balanced_accuracy", "macro_auc"}
    v = s.metrics["balanced_accuracy"]
    assert v["low"] <= v["value"] <= v["high"]
    # The same numbers as the sweep's own test scoring (one seed: mean == value).
    assert v["value"] == pytest.approx(trained.test["balanced_accuracy"]["mean"])
    assert {r["artifact"] for r in s.robustness} == set(ARTIFACTS)
    clean = [r for r in s.robustness if r["strength"] == 0]
    assert all(r["balanced_accuracy"] == pytest.approx(v["value"]) for r in clean)  # strength 0 = the clean input
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    artifacts = {
        a.path for folder in ("robustness", "saliency") for a in client.list_artifacts(s.mlflow_run_id, folder)
    }
    assert "robustness/robustness.png" in artifacts and len([a for a in artifacts if a.startswith("saliency/")]) == 2


@pytest.mark.timeout(900)
def test_evaluate_mci_logs_the_saliency_mass_ratio_in_the_hippocampus(own_pipeline, tmp_path):
    """The mci spec names the hippocampus as its signal region: evaluate compares the saliency there with random
    regions of the same size and logs ``saliency_mass_ratio_hippocampus`` (the tiny cohort has one mci test case)."""
    from brainiac.jobs.finetune.evaluate import evaluate

    uri = own_pipeline.tracking_uri
    cfg, trained = _linear_probe_model(own_pipeline, tmp_path, "mci")
    s = evaluate(cfg, trained.model_uri, robustness=False, saliency_cases=2, bootstrap=200)
    assert s.task == "mci" and s.test_cases >= 1
    assert s.saliency_region == "hippocampus" and s.saliency_region_cases == min(2, s.test_cases)
    assert s.saliency_mass_ratio is not None and np.isfinite(s.saliency_mass_ratio) and s.saliency_mass_ratio >= 0
    run = mlflow.MlflowClient(uri, registry_uri=uri).get_run(s.mlflow_run_id)
    assert run.data.metrics["saliency_mass_ratio_hippocampus"] == pytest.approx(s.saliency_mass_ratio)
    assert "saliency_mass_ratio_tumour" not in run.data.metrics


def test_task_specs_promise_only_the_inputs_the_model_reads():
    """stroke_onset promised FLAIR "when present" yet the model read T1w alone (the optional sequence was fetched and
    dropped). The encoder embeds one 1-channel volume per listed sequence and the head mean-pools a fixed list, so a
    missing FLAIR has no sound filler: the spec now says T1w, and no shipped spec lists optional sequences."""
    stroke = task_spec("stroke_onset")
    assert stroke.sequences == ["T1w"] and "FLAIR" not in stroke.description
    assert all(not spec.optional_sequences for spec in load_specs().values())
