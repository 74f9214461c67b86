"""Models travel as weights plus a typed spec, never as a pickle: a registered version round-trips through the real
MLflow registry with identical outputs; a planted malicious pickle in place of the weights is refused before it can run
(its marker file is never written); weights with a missing or unexpected key, a spec naming an unknown architecture and
a version logged the old way (``mlflow.pytorch.log_model`` pickle) are each one clear error."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch

from brainiac.models.config import BackboneConfig
from brainiac.models.export import (
    SPEC_FILE,
    WEIGHTS_FILE,
    ModelSpec,
    build_model,
    load_model_artifacts,
    save_model_artifacts,
    write_model_folder,
)
from brainiac.models.tasks.spec import task_spec
from brainiac.platform.cli.main import main
from brainiac.platform.errors import UserError


@pytest.fixture
def registry(tmp_path: Path) -> dict:
    """A sqlite tracking/registry store of this test, its artifacts under ``tmp_path`` (never ./mlruns)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("models", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return {"uri": uri, "client": client, "experiment": experiment}


def _spec(task: str = "sequence") -> ModelSpec:
    return ModelSpec.for_task(task_spec(task), BackboneConfig.tiny(), (1, 32, 32, 32), "full")


def _model(spec: ModelSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(spec).eval()


def _register(registry: dict, folder: Path, name: str = "brainiac-sequence", alias: str = "champion") -> str:
    """Log a model folder (as written, or tampered with) to a new run and register it; returns ``models:/NAME@ALIAS``."""
    client = registry["client"]
    run_id = client.create_run(registry["experiment"]).info.run_id
    client.log_artifacts(run_id, str(folder), "model")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, source=source, run_id=run_id, tags={"task": "sequence"})
    client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}@{alias}"


def _rewrite_spec(folder: Path, **changes) -> None:
    """Change fields of a written spec and make its checksum fit the weights now there (as an attacker who can write
    the registry would)."""
    import hashlib

    data = json.loads((folder / SPEC_FILE).read_text())
    data.update(changes)
    data["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    (folder / SPEC_FILE).write_text(json.dumps(data))


class _WritesMarker:
    """Unpickling this runs ``exec`` of code that writes ``path``: the classic poisoned-checkpoint payload."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.path)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("task", ["sequence", "segmentation"])
def test_round_trip_through_the_registry_gives_identical_outputs(registry, task):
    spec = _spec(task)
    model = _model(spec, seed=3)
    client = registry["client"]
    run_id = client.create_run(registry["experiment"]).info.run_id
    source = save_model_artifacts(client, run_id, model, spec)
    name = f"brainiac-{task}"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=source, run_id=run_id, tags={"task": task})
    client.set_registered_model_alias(name, "champion", version.version)

    # Only tensors and JSON were logged: no MLmodel, no pickled module.
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, "model")}
    assert logged == {SPEC_FILE, WEIGHTS_FILE}

    loaded = load_model_artifacts(f"models:/{name}@champion", registry["uri"])
    assert loaded.label == f"{name}/{version.version}"
    assert type(loaded.module) is type(model) and not loaded.module.training
    assert loaded.spec.task == task_spec(task) and loaded.spec.input_shape == [1, 32, 32, 32]
    x = torch.randn(2, *loaded.spec.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model(x))
    fresh = _model(spec, seed=4)  # the weights really came from the registry, not from the seed
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))


def test_planted_malicious_pickle_is_refused_and_never_runs(registry, tmp_path, capsys):
    marker = tmp_path / "marker"
    # A state_dict-shaped checkpoint whose tensor is the payload, in torch.save's own format.
    torch.save({"head.weight": _WritesMarker(marker)}, tmp_path / "payload.pt")
    payload = (tmp_path / "payload.pt").read_bytes()
    # The payload is live: a full unpickler (torch.load(weights_only=False), mlflow.pytorch.load_model of a pickled
    # model) runs it.
    control = tmp_path / "control"
    torch.save({"head.weight": _WritesMarker(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.read_text() == "pwned"

    folder = write_model_folder(tmp_path / "model", _model(_spec()), _spec())
    (folder / WEIGHTS_FILE).write_bytes(payload)
    (folder / "preprocess.json").write_text(json.dumps({}))  # so predict reaches the model itself
    uri = _register(registry, folder, alias="poisoned")
    # 1. The checksum in the spec no longer fits the weights: refused before the file is read.
    with pytest.raises(UserError, match="does not match the checksum"):
        load_model_artifacts(uri, registry["uri"])
    assert not marker.exists()
    # 2. The attacker rewrote the checksum too: torch.load(weights_only=True) refuses the global, nothing runs.
    _rewrite_spec(folder)
    uri = _register(registry, folder, alias="poisoned")
    with pytest.raises(UserError, match=f"{WEIGHTS_FILE} is not a plain state_dict of tensors"):
        load_model_artifacts(uri, registry["uri"])
    assert not marker.exists()

    # The same through `brainiac predict`: one error line, exit status 2, and still no marker.
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8), dtype=np.float32), np.eye(4)), scan)
    capsys.readouterr()
    code = main(["predict", "--model", uri, str(scan), "--out", str(tmp_path / "out"), "--set",
                 f"tracking.uri={registry['uri']}", "--no-sequence-check"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "not a plain state_dict of tensors (Unsupported global: GLOBAL exec" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_planted_pickle_in_an_exported_encoder_is_one_clear_error(tmp_path):
    from brainiac.models.backbones import build_backbone
    from brainiac.models.export import load_encoder, save_encoder

    folder = save_encoder(tmp_path / "encoder", build_backbone(BackboneConfig.tiny()), BackboneConfig.tiny())
    marker = tmp_path / "marker"
    torch.save({"vit.patch_embedding.position_embeddings": _WritesMarker(marker)}, folder / "encoder.pt")
    with pytest.raises(UserError, match=r"encoder\.pt is not a plain state_dict of tensors \(Unsupported global"):
        load_encoder(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_state_dict_that_does_not_fit_the_spec_is_refused(registry, tmp_path, change):
    spec = _spec()
    folder = write_model_folder(tmp_path / "model", _model(spec), spec)
    state = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    if change == "missing":
        del state["head.weight"]
        needle = 'Missing key\\(s\\) in state_dict: "head.weight"'
    elif change == "unexpected":
        state["head.extra"] = torch.zeros(1)
        needle = 'Unexpected key\\(s\\) in state_dict: "head.extra"'
    else:
        state["head.bias"] = torch.zeros(7)
        needle = "size mismatch for head.bias"
    torch.save(state, folder / WEIGHTS_FILE)
    _rewrite_spec(folder)
    with pytest.raises(UserError, match=needle):
        load_model_artifacts(_register(registry, folder), registry["uri"])
    # Nor can such a model be logged: the spec is checked against the model when written.
    with pytest.raises(UserError, match="do not match the model spec"):
        write_model_folder(tmp_path / "other", _model(_spec("brain_age")), spec)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("architecture", "torch.nn.Linear", "model_spec.architecture"),
        ("architecture", "unetr", "does not build a multiclass model"),
        ("weights_format", "pickle", "model_spec.weights_format"),
        ("spec_version", 99, "model spec version 99"),
        ("loader", "os.system", "model_spec.loader"),
    ],
)
def test_spec_naming_an_unknown_architecture_or_field_is_refused(registry, tmp_path, field, value, needle):
    spec = _spec()
    folder = write_model_folder(tmp_path / "model", _model(spec), spec)
    _rewrite_spec(folder, **{field: value})
    with pytest.raises(UserError, match=needle):
        load_model_artifacts(_register(registry, folder), registry["uri"])


def test_a_version_logged_as_a_pickle_is_refused_with_a_re_log_message(registry, tmp_path, capsys):
    mlflow.set_experiment(experiment_id=registry["experiment"])
    with mlflow.start_run() as run:
        mlflow.log_dict({}, "model/preprocess.json")
        info = mlflow.pytorch.log_model(torch.nn.Linear(2, 4), name="model", serialization_format="pickle",
                                        pip_requirements=["torch"])  # fmt: skip
    client = registry["client"]
    client.create_registered_model("brainiac-sequence")
    version = client.create_model_version("brainiac-sequence", source=info.model_uri, run_id=run.info.run_id,
                                          tags={"task": "sequence"}, model_id=info.model_id)  # fmt: skip
    client.set_registered_model_alias("brainiac-sequence", "old", version.version)
    with pytest.raises(UserError, match=r"is a pickled MLflow model with no model_spec\.json; re-log it"):
        load_model_artifacts("models:/brainiac-sequence@old", registry["uri"])

    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8), dtype=np.float32), np.eye(4)), scan)
    capsys.readouterr()
    code = main(["predict", "--model", "models:/brainiac-sequence@old", str(scan), "--out", str(tmp_path / "out"),
                 "--set", f"tracking.uri={registry['uri']}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "pickled MLflow model" in err and "re-log it with `brainiac finetune`" in err
