"""Tracking: URI resolution, experiment creation, and a real run on an MLflow server with no secret in its params."""

from __future__ import annotations

import pytest

from brainiac.jobs.config import load_config
from brainiac.platform.config import TrackingConfig
from brainiac.platform.errors import UserError
from brainiac.platform.tracking import ensure_experiment, flatten_params, resolve_tracking_uri


def test_relative_sqlite_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(TrackingConfig(uri="sqlite:///data/m.db")) == f"sqlite:///{tmp_path}/data/m.db"
    assert resolve_tracking_uri(TrackingConfig(uri="m.db")) == f"sqlite:///{tmp_path}/m.db"
    assert resolve_tracking_uri(TrackingConfig(uri="http://127.0.0.1:5000")) == "http://127.0.0.1:5000"
    with pytest.raises(UserError, match="unsupported MLflow tracking URI"):
        resolve_tracking_uri(TrackingConfig(uri="ftp://x"))


@pytest.mark.timeout(120)
def test_sqlite_store_keeps_artifacts_beside_it(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(uri="sqlite:///store/mlflow.db", experiment="local-exp")
    exp_id = ensure_experiment(cfg)
    exp = mlflow.MlflowClient().get_experiment(exp_id)
    assert exp.artifact_location == (tmp_path / "store" / "mlartifacts" / "local-exp").as_uri()
    assert ensure_experiment(cfg) == exp_id


@pytest.mark.timeout(120)
def test_run_on_mlflow_server_logs_config_without_secrets(mlflow_server, monkeypatch):
    import mlflow

    monkeypatch.setenv("BRAINIAC_STORAGE_OPTIONS", '{"AWS_SECRET_ACCESS_KEY": "do-not-log-me"}')
    cfg = load_config("tiny", [f"tracking.uri={mlflow_server.url}", "tracking.experiment=server-test"])
    exp_id = ensure_experiment(cfg.tracking)
    params = flatten_params(cfg)
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_params(params)
        mlflow.log_metric("loss", 0.5, step=1)
    got = mlflow.MlflowClient(mlflow_server.url).get_run(run.info.run_id)
    assert got.data.params["cluster.num_cpus"] == "4"
    assert got.data.metrics["loss"] == 0.5
    assert "do-not-log-me" not in str(got.data.params)
    assert got.data.params["catalog.storage_options.AWS_SECRET_ACCESS_KEY"] == "***"
