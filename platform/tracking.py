"""MLflow tracking: resolve the tracking URI, create experiments with a sane artifact location, never log secrets.

The embedded default is a sqlite file under ``./brainiac-data``; its artifacts go beside it in ``mlartifacts/`` instead of
MLflow's ``./mlruns`` in whatever directory the job happens to run. A server (``http://...``) keeps its own artifact store.

A server with authentication takes MLflow's own client settings: ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` (basic auth), ``MLFLOW_TRACKING_TOKEN`` or ``~/.mlflow/credentials``. When none is set and
the URI is the ``brainiac stack`` MLflow server, :func:`use_tracking` takes the stack's credentials from its state
directory (:func:`brainiac.platform.stack.mlflow_credentials_for`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from brainiac.platform.config import TrackingConfig, config_to_dict
from brainiac.platform.errors import UserError

__all__ = ["ensure_experiment", "flatten_params", "resolve_tracking_uri", "use_tracking"]


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """Absolute tracking URI for ``cfg.uri``: relative sqlite paths are made absolute (Ray workers have other CWDs)."""
    uri = cfg.uri.strip()
    if uri.startswith("sqlite:///"):
        raw = uri[len("sqlite:///") :]
        path = Path(raw) if raw.startswith("/") else Path.cwd() / raw
        return f"sqlite:///{path.resolve()}"
    if uri.startswith(("http://", "https://", "databricks", "file:")):
        return uri
    if "://" not in uri:  # a bare path means a sqlite file
        return f"sqlite:///{Path(uri).expanduser().resolve()}"
    raise UserError(f"unsupported MLflow tracking URI '{uri}'; use http(s)://host:port or sqlite:///path/mlflow.db")


def _local_artifact_root(tracking_uri: str) -> Path | None:
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts"
    return None


def _use_stack_credentials(uri: str) -> bool:
    """Export the ``brainiac stack`` MLflow credentials when ``uri`` is that server and the user set none; True if
    it did. Exported (not passed) because MLflow's clients, the Tune callback's included, read only the environment;
    processes started afterwards (a local Ray's workers) inherit them."""
    if not uri.startswith(("http://127.0.0.1:", "http://localhost:")):
        return False
    if any(
        os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    ):
        return False
    from brainiac.platform.stack import mlflow_credentials_for

    creds = mlflow_credentials_for(uri)
    if creds is None:
        return False
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = creds
    return True


def use_tracking(cfg: TrackingConfig) -> str:
    """Point MLflow at ``cfg`` (creating the sqlite file's directory, or taking the local stack's credentials for its
    server) and return the resolved URI."""
    import mlflow

    uri = resolve_tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    _use_stack_credentials(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(cfg: TrackingConfig) -> str:
    """Create ``cfg.experiment`` if needed (artifacts beside a sqlite store) and return its id."""
    import mlflow

    uri = use_tracking(cfg)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    root = _local_artifact_root(uri)
    location = (root / cfg.experiment).as_uri() if root is not None else None
    return client.create_experiment(cfg.experiment, artifact_location=location)


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a config into ``section.key -> str`` MLflow params, secrets redacted."""
    data = config_to_dict(config, redact=True)
    out: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
        else:
            out[path] = str(node)[:6000]

    walk(data, prefix)
    return out
