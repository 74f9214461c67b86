"""Registry promotion against both MLflow backends (a sqlite file and a real ``mlflow server`` over HTTP): a first
promotion refused when it does not beat the trivial baseline, then decided by absolute gates, a failed gate that leaves the champion untouched, a pass that moves the alias and
keeps ``previous``, and a rollback; plus the pure gate logic."""

from __future__ import annotations

import copy
import json

import mlflow
import numpy as np
import pytest
import torch

from brainiac.jobs.promote.gates import (
    absolute_gates,
    access_gate,
    baseline_gate,
    baseline_predictions,
    improvement_gate,
    lineage_gate,
    paired_improvement,
    parse_gate,
    robustness_gate,
)
from brainiac.models.tasks.spec import task_spec
from brainiac.platform.cli.main import main
from brainiac.platform.errors import UserError

NAME = "brainiac-sequence"


@pytest.fixture(scope="module")
def trained(fork_pipeline, tmp_path_factory):
    """A sequence model fine-tuned on the tiny pipeline (logged and registered in a copy of its MLflow store), and a
    degraded copy whose head predicts one class for every input (balanced accuracy 1/4 by construction); both with the
    trained version's tags."""
    from brainiac.jobs.finetune.run import finetune
    from brainiac.models.export import load_model_artifacts, model_version

    pipeline = fork_pipeline("promote", "encoder", catalog=False)
    cfg = pipeline.pretrain_config(
        "finetune.task=sequence", "finetune.strategy=full", f"finetune.init={pipeline.encoder.model_uri}",
        "finetune.max_epochs=6", "finetune.bootstrap=200", "finetune.alias=promote-source", "finetune.lr=0.003",
        f"finetune.storage_path={tmp_path_factory.mktemp('promote-runs')}",
    )  # fmt: skip
    summary = finetune(cfg, progress=False)
    uri = pipeline.tracking_uri
    tags = dict(model_version(summary.model_uri, uri).tags)
    loaded = load_model_artifacts(summary.model_uri, uri)
    model = loaded.module
    degraded = copy.deepcopy(model)
    with torch.no_grad():
        degraded.head.weight.zero_()
        degraded.head.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    return {"good": model, "bad": degraded, "spec": loaded.spec, "tags": tags, "test": summary.test}


def _register(tracking_uri: str, model, spec, tags: dict[str, str]) -> str:
    """Log ``model`` (weights + spec) to a run of ``tracking_uri`` and register the run's ``model/`` folder as a new
    version of NAME with ``tags``."""
    from brainiac.models.export import save_model_artifacts

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiment = mlflow.set_experiment("promote-test").experiment_id
    run_id = client.create_run(experiment).info.run_id
    source = save_model_artifacts(client, run_id, model, spec)
    client.set_terminated(run_id)
    try:
        client.get_registered_model(NAME)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(NAME)
    version = client.create_model_version(NAME, source, run_id, tags=tags)
    return str(version.version)


def _register_pickled(tracking_uri: str, model, tags: dict[str, str]) -> str:
    """A version logged the old way (``mlflow.pytorch.log_model`` pickle), which promote must refuse to load."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    mlflow.set_experiment("promote-test")
    with mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", pip_requirements=["torch"])
    version = client.create_model_version(NAME, info.model_uri, run.info.run_id, tags=tags, model_id=info.model_id)
    return str(version.version)


def _promote(pipeline, tracking_uri: str, *args: str) -> int:
    return main(["promote", NAME, "--catalog", str(pipeline.root / "catalog"), "--config", "tiny",
                 "--set", f"tracking.uri={tracking_uri}", "--set", "promote.bootstrap=200",
                 "--set", f"patches.preprocess_version={pipeline.volumes.preprocess_version}", *args])  # fmt: skip


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["sqlite", "http"])
def test_promote_gates_move_and_roll_back_the_champion(pipeline, trained, tmp_path, request, capsys, backend):
    uri = (
        f"sqlite:///{tmp_path / 'registry.db'}" if backend == "sqlite" else request.getfixturevalue("mlflow_server").url
    )
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert trained["test"]["balanced_accuracy"]["mean"] > 0.5, trained["test"]  # the good model really is better
    bad = _register(uri, trained["bad"], trained["spec"], trained["tags"])

    # 1. First promotion, no champion: the candidate must beat the trivial baseline (the training-class prior) by the
    # paired bootstrap. The one-class model is exactly at chance: refused although its absolute gate passes.
    assert _promote(pipeline, uri, "--candidate", bad, "--gate", "balanced_accuracy>=0.2") == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "rejected" in out
    tags = client.get_model_version(NAME, bad).tags
    assert tags["promotion.decision"] == "rejected" and "beats trivial baseline" in tags["promotion.reasons"]
    assert (
        "needs lower bound > 0" in tags["promotion.reasons"] and tags["promotion.compared_with"] == "trivial baseline"
    )
    assert float(tags["promotion.baseline.balanced_accuracy"]) == pytest.approx(
        float(tags["promotion.candidate.balanced_accuracy"])
    )
    assert "champion" not in client.get_registered_model(NAME).aliases
    # With the baseline gate turned off on purpose (seeding a registry), the absolute gates alone decide: a failing one
    # leaves no champion ...
    off = ("--set", "promote.baseline_gate=false")
    assert _promote(pipeline, uri, "--candidate", bad, "--gate", "balanced_accuracy>=0.5", *off) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "gate balanced_accuracy>=0.5" in out and "rejected" in out
    assert "champion" not in client.get_registered_model(NAME).aliases
    # ... a passing one makes it champion.
    assert _promote(pipeline, uri, "--candidate", bad, "--gate", "balanced_accuracy>=0.2", *off) == 0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == bad

    # 2. A better candidate passes the paired improvement gate: champion moves, the old one keeps `previous`.
    good = _register(uri, trained["good"], trained["spec"], trained["tags"])
    assert (
        _promote(pipeline, uri, "--candidate", good, "--set", "promote.robustness_artifacts=[gibbs, rician_noise]") == 0
    )
    out = capsys.readouterr().out
    assert "promoted" in out and "improvement in balanced_accuracy" in out
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == good
    assert str(client.get_model_version_by_alias(NAME, "previous").version) == bad
    version = client.get_model_version(NAME, good)
    assert version.tags["promotion.decision"] == "promoted" and version.tags["promotion.compared_with"] == bad
    assert float(version.tags["promotion.candidate.balanced_accuracy"]) > float(
        version.tags["promotion.champion.balanced_accuracy"]
    )
    assert json.loads(version.tags["promotion.table_versions"])["volumes"] >= 0
    assert "# brainiac-sequence version" in version.description and "| lineage | pass |" in version.description
    card = mlflow.artifacts.load_text(f"runs:/{version.tags['promotion.run_id']}/model_card.md")
    assert "## Gates" in card and "## Robustness" in card and "previous champion" in card

    # 3. A worse candidate fails the improvement gate; the champion is untouched and the reasons are on the version.
    worse = _register(uri, trained["bad"], trained["spec"], trained["tags"])
    assert _promote(pipeline, uri, "--candidate", worse, "--min-delta", "0.0") == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "improvement in balanced_accuracy" in out
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == good
    assert "improvement in balanced_accuracy" in client.get_model_version(NAME, worse).tags["promotion.reasons"]

    # 4. Dry run writes nothing; rollback restores the previous champion in one command.
    assert _promote(pipeline, uri, "--candidate", worse, "--dry-run") == 1
    assert "promotion.decision" in client.get_model_version(NAME, worse).tags  # from step 3, not rewritten
    assert _promote(pipeline, uri, "--rollback") == 0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == bad
    assert "previous" not in client.get_registered_model(NAME).aliases
    assert client.get_model_version(NAME, good).tags["promotion.decision"] == "rolled back"
    assert _promote(pipeline, uri, "--rollback") == 2  # nothing earlier than the first champion
    assert "no earlier champion" in capsys.readouterr().err

    # 5. A version logged as a pickle is never loaded: one error line, exit 2, the champion untouched.
    pickled = _register_pickled(uri, trained["good"], trained["tags"])
    capsys.readouterr()  # MLflow's own warning while logging the pickle is not promote's output
    assert _promote(pipeline, uri, "--candidate", pickled) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "pickled MLflow model" in err and "re-log it" in err
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == bad


def test_a_first_promotion_must_beat_the_trivial_baseline_by_the_paired_subject_bootstrap():
    """Every kind of task has a baseline that ignores the image; a candidate no better than it fails the gate, one
    clearly better passes, and the baseline scores chance by construction."""
    from brainiac.jobs.finetune.engine import score

    rng = np.random.default_rng(0)
    # Multiclass: the constant prior scores balanced accuracy 1/k and macro AUC 0.5.
    spec = task_spec("sequence")
    train, y = rng.integers(0, 4, 80), np.repeat(np.arange(4), 15)
    base, what = baseline_predictions(spec, train, y)
    assert base.shape == (60, 4) and "prior" in what
    assert score(spec, base, y, y) == pytest.approx({"balanced_accuracy": 0.25, "macro_auc": 0.5})
    subjects = np.arange(60) // 3  # three scans per subject
    chance = np.eye(4)[rng.integers(0, 4, 60)]  # a model guessing at random
    imp = paired_improvement(
        spec, "balanced_accuracy", chance, base, y, y, n_boot=300, confidence=0.95, groups=subjects
    )
    assert not baseline_gate("balanced_accuracy", imp, 0.95, what).passed
    skilled = np.eye(4)[np.where(rng.uniform(size=60) < 0.7, y, rng.integers(0, 4, 60))]
    imp = paired_improvement(
        spec, "balanced_accuracy", skilled, base, y, y, n_boot=300, confidence=0.95, groups=subjects
    )
    check = baseline_gate("balanced_accuracy", imp, 0.95, what)
    assert check.passed and "beats the baseline" in check.detail and imp["low"] > 0
    # A model that *is* the baseline (a constant prediction) improves by exactly 0 on every resample: refused.
    same = paired_improvement(spec, "balanced_accuracy", base, base, y, y, n_boot=100, confidence=0.95)
    assert (
        same == {"value": 0.0, "low": 0.0, "high": 0.0}
        and not baseline_gate("balanced_accuracy", same, 0.95, what).passed
    )

    # Regression: the training mean; binary and survival: the training prior (NaN labels ignored); segmentation: empty.
    spec = task_spec("brain_age")
    base, what = baseline_predictions(spec, np.array([40.0, 60.0]), np.zeros(5))
    assert base.tolist() == [50.0] * 5 and "training mean 50" in what
    base, _ = baseline_predictions(task_spec("survival"), np.array([1.0, 0.0, np.nan, 1.0]), np.zeros(3))
    assert base == pytest.approx([2 / 3] * 3)
    spec = task_spec("idh")
    y = np.r_[np.ones(10), np.zeros(30)].astype(np.float32)
    base, _ = baseline_predictions(spec, y, y)
    assert score(spec, base, y, y)["auc"] == 0.5
    base, what = baseline_predictions(task_spec("segmentation"), np.zeros(0), np.ones((2, 4, 4, 4)))
    assert base.shape == (2, 4, 4, 4) and not base.any() and what == "empty mask"


def test_gates_are_direction_aware_and_name_their_reasons():
    spec = task_spec("brain_age")  # MAE: lower is better
    assert parse_gate("mae<=5", spec) == ("mae", "<=", 5.0)
    with pytest.raises(UserError, match="reports mae, not auc"):
        parse_gate("auc>=0.7", spec)
    with pytest.raises(UserError, match="METRIC>=VALUE"):
        parse_gate("mae is small", spec)
    assert [c.passed for c in absolute_gates(["mae<=5", "mae<=1"], spec, {"mae": {"value": 3.0}})] == [True, False]
    assert not absolute_gates(["mae<=5"], spec, {"mae": {"value": float("nan")}})[0].passed

    rng = np.random.default_rng(0)
    y = rng.uniform(20, 80, 60).astype(np.float32)
    close, far = y + rng.normal(0, 2, 60), y + rng.normal(0, 10, 60)
    imp = paired_improvement(spec, "mae", close, far, y, y, n_boot=300, confidence=0.95)
    assert imp["value"] > 0 and imp["low"] > 0  # smaller error = positive improvement
    assert improvement_gate("mae", imp, 0.0, 0.95).passed
    assert not improvement_gate("mae", imp, imp["high"] + 1, 0.95).passed
    back = paired_improvement(spec, "mae", far, close, y, y, n_boot=300, confidence=0.95)
    assert back["high"] < 0 and not improvement_gate("mae", back, 0.0, 0.95).passed

    def rows(v):
        return [
            {"artifact": "noise", "strength": 0.0, "mae": 1.0},
            {"artifact": "noise", "strength": 0.1, "mae": v},
        ]

    checks, table = robustness_gate("mae", rows(6.0), rows(5.0), tolerance=0.5)
    assert not checks[0].passed and table["noise"]["change"] == pytest.approx(-1.0)
    assert robustness_gate("mae", rows(5.4), rows(5.0), tolerance=0.5)[0][0].passed

    fp = spec.fingerprint()
    tags = {"task": "brain_age", "task_spec": fp, "preprocess_version": "a"}
    assert lineage_gate(spec, fp, tags, dict(tags)).passed
    assert not lineage_gate(spec, fp, tags, {**tags, "preprocess_version": "b"}).passed
    assert not lineage_gate(spec, fp, {**tags, "task_spec": "0" * 12}, None).passed
    assert access_gate({"access": "open,registered"}, ["open", "registered"]).passed
    assert not access_gate({"access": "open,restricted"}, ["open", "registered"]).passed
