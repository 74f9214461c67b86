"""The pretraining driver (``brainiac pretrain``): select → stream → Ray Train → evaluate → MLflow model registry.

1. Resolve the volumes to read from the catalog (train split for training, the held-out split for evaluation).
2. Start or reuse an MLflow run named like the Ray Train run; the same ``run_name`` again resumes both.
3. Run :func:`~brainiac.jobs.pretrain.loop.train_loop` on ``pretrain.num_workers`` Ray Train workers, checkpointing to
   ``storage_path/run_name`` and surviving ``max_failures`` worker failures.
4. Score positive-pair retrieval on held-out patches for the trained encoder and for the same architecture at its
   initial weights (the run's own starting point), log both, log the encoder and register it with provenance tags.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from brainiac.jobs.config import Config
from brainiac.jobs.pretrain.stream import PretrainSelection, eval_pairs, pair_dataset, select_volumes
from brainiac.platform.catalog import Catalog
from brainiac.platform.config import DEFAULT_DATA_DIR, config_to_dict, redact_uri_credentials
from brainiac.platform.errors import UserError
from brainiac.platform.storage import StorageLocation

__all__ = ["PretrainSummary", "config_hash", "pretrain"]

log = logging.getLogger(__name__)

RUN_NAME_TAG = "brainiac.run_name"


@dataclass
class PretrainSummary:
    """What a pretraining run did and where its outputs are."""

    run_name: str
    steps: int = 0
    final_loss: float | None = None
    samples_per_s: float | None = None
    data_wait_fraction: float | None = None
    train_top1: float | None = None
    eval_top1: float | None = None
    eval_top1_random: float | None = None
    eval_pairs: int = 0
    failures: int = 0
    resumed_from_step: int | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    model_version: str | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_hash(cfg: Config) -> str:
    """sha256 (first 16 hex) of the redacted config without run bookkeeping: the same recipe hashes the same."""
    data = config_to_dict(cfg, redact=True)
    data["pretrain"] = {k: v for k, v in data["pretrain"].items() if k not in ("run_name", "fail_at_step", "fail_rank")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str:
    """Commit of the code that runs (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607 - git from PATH, fixed arguments, only to tag the run
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _storage(cfg: Config) -> StorageLocation:
    raw = cfg.pretrain.storage_path or f"{DEFAULT_DATA_DIR}/runs"
    options = cfg.catalog.storage_options if raw.startswith("s3://") else {}
    location = StorageLocation.resolve(raw if "://" in raw else str(Path(raw).resolve()), options)
    return location


class _Monitor:
    """A zero-CPU Ray actor fed by the Train controller's callback: last metrics, where each rank ran, failures.

    Ray Train v2 runs callbacks inside its controller actor, not in the driver; the driver polls this actor to draw the
    progress bar and to learn, at the end, on which nodes the workers ran.
    """

    def __init__(self) -> None:
        self.last: dict[str, Any] = {}
        self.workers: dict[int, dict[str, Any]] = {}
        self.failures: list[str] = []
        self.first_step: int | None = None
        self.start_steps: set[int] = set()

    def report(self, metrics: list[dict[str, Any]]) -> None:
        for m in metrics:
            if "start_step" in m:
                self.start_steps.add(int(m["start_step"]))
            if "rank" in m:
                self.workers[int(m["rank"])] = {k: m[k] for k in ("rank", "node_id", "pid", "host", "device") if k in m}
        if metrics:
            self.last = dict(metrics[0])
            if self.first_step is None:
                self.first_step = int(self.last.get("step", 0))

    def failure(self, message: str) -> None:
        self.failures.append(message)

    def state(self) -> dict[str, Any]:
        return {
            "last": self.last,
            "workers": self.workers,
            "failures": self.failures,
            "first_step": self.first_step,
            "resumed_from": max(self.start_steps, default=0),
        }


def _callback(monitor):
    import ray.train

    class ForwardToMonitor(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            monitor.report.remote([dict(m) for m in metrics])

        def after_exception(self, run_context, worker_exceptions):
            first = next(iter(worker_exceptions.values()), None)
            monitor.failure.remote(f"{type(first).__name__}: {str(first).splitlines()[0] if first else ''}")

    return ForwardToMonitor()


def _fit_with_progress(trainer, monitor, total: int, show: bool):
    """``trainer.fit()`` in a thread while the main thread draws a progress bar from the monitor actor."""
    import threading

    import ray
    from tqdm.auto import tqdm

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="brainiac-pretrain-fit", daemon=True)
    thread.start()
    with tqdm(total=total, desc="pretrain", unit="step", disable=not show) as bar:
        while thread.is_alive():
            thread.join(timeout=1.0)
            last = ray.get(monitor.state.remote())["last"]
            if last:
                bar.n = int(last.get("step", 0))
                bar.set_postfix(
                    loss=f"{last.get('loss', float('nan')):.3f}", wait=f"{last.get('data_wait_fraction', 0):.0%}"
                )
                bar.refresh()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _mlflow_run(cfg: Config, run_name: str, selection: PretrainSelection, catalog: Catalog) -> tuple[str, str]:
    """(tracking_uri, run_id): the MLflow run tagged with ``run_name`` (a resumed run continues it), or a new one with
    the config as params and the provenance tags."""
    import mlflow

    from brainiac.platform.tracking import ensure_experiment, flatten_params, use_tracking

    experiment_id = ensure_experiment(cfg.tracking)
    uri = use_tracking(cfg.tracking)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return uri, run_id
    tags = {
        RUN_NAME_TAG: run_name,
        "brainiac.job": "pretrain",
        "brainiac.catalog": redact_uri_credentials(catalog.uri),
        "brainiac.volumes_table_version": str(selection.volumes_version),
        "brainiac.preprocess_version": selection.preprocess_version,
        "brainiac.split_seed": str(cfg.splits.seed),
        "brainiac.pretrain_splits": ",".join(cfg.patches.splits),
        "brainiac.access": ",".join(selection.access_levels),
        "brainiac.config_hash": config_hash(cfg),
        "brainiac.git_commit": git_commit(),
    }
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    params = flatten_params(cfg)
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100], synchronous=True)
    client.log_dict(run.info.run_id, {"datasets": selection.datasets, "train_volumes": len(selection.train_ids),
                                      "eval_volumes": len(selection.eval_ids)}, "selection.json")  # fmt: skip
    return uri, run.info.run_id


def pretraining_record(cfg: Config, catalog: Catalog, selection: PretrainSelection) -> dict[str, Any]:
    """What the encoder saw, written beside it (``pretraining.json``): fine-tuning reads the catalog's ``splits`` table
    as of ``splits_version`` under ``split_seed`` and refuses a task whose val/test subjects were in ``splits``."""
    return {
        "catalog": redact_uri_credentials(catalog.uri),  # an identity to compare, never a secret
        "split_seed": int(cfg.splits.seed),
        "splits": list(cfg.patches.splits),
        "splits_version": catalog.version("splits"),
        "volumes_version": int(selection.volumes_version),
        "preprocess_version": selection.preprocess_version,
        "img_size": int(cfg.model.img_size),
        "train_volumes": len(selection.train_ids),
    }


def _retrieval(
    cfg: Config, encoder_dir: Path, catalog: Catalog, selection: PretrainSelection
) -> tuple[float, float, int]:
    """Held-out positive-pair top-1 of the trained encoder and of the run's initial weights, on the same pairs."""
    import torch

    from brainiac.models.export import load_encoder
    from brainiac.models.simclr import SimCLRModel
    from brainiac.models.ssl import positive_pair_top1

    first, second = eval_pairs(catalog, cfg, selection, cfg.pretrain.eval_pairs, seed=cfg.seed + 1)
    trained, _ = load_encoder(str(encoder_dir))
    torch.manual_seed(cfg.seed)
    initial = SimCLRModel(cfg.model, cfg.projection).encoder

    @torch.no_grad()
    def top1(encoder: torch.nn.Module) -> float:
        encoder.eval()
        f1 = torch.cat([encoder(torch.as_tensor(c).float()) for c in torch.as_tensor(first).split(32)])
        f2 = torch.cat([encoder(torch.as_tensor(c).float()) for c in torch.as_tensor(second).split(32)])
        return float(positive_pair_top1(f1, f2))

    return top1(trained), top1(initial), len(first)


def _register(cfg: Config, uri: str, run_id: str, encoder_dir: Path, selection: PretrainSelection) -> tuple[str, str]:
    """Log the encoder under the run and register it; returns ``(models:/NAME@ALIAS or runs:/ URI, version)``."""
    import mlflow

    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.log_artifacts(run_id, str(encoder_dir), "encoder")
    source = f"{client.get_run(run_id).info.artifact_uri}/encoder"
    name = cfg.pretrain.register_as
    if not name:
        return f"runs:/{run_id}/encoder", ""
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="BrainIAC SimCLR-pretrained 3-D brain MRI encoder")
    run_tags = client.get_run(run_id).data.tags
    tags = {k.split(".", 1)[1]: v for k, v in run_tags.items() if k.startswith("brainiac.") and k != RUN_NAME_TAG}
    tags["run_name"] = run_tags.get(RUN_NAME_TAG, "")
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    if cfg.pretrain.alias:
        client.set_registered_model_alias(name, cfg.pretrain.alias, version.version)
        return f"models:/{name}@{cfg.pretrain.alias}", str(version.version)
    return f"models:/{name}/{version.version}", str(version.version)


def _loss_plot(uri: str, run_id: str, out: Path) -> Path | None:
    """A PNG of loss, retrieval top-1 and data-wait fraction against step, from the run's metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient(uri, registry_uri=uri)
    keys = [("train/loss", "NT-Xent loss"), ("train/top1", "positive-pair top-1 (batch)"),
            ("train/data_wait_fraction", "data-wait fraction")]  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(12, 3.2))
    any_points = False
    for ax, (key, title) in zip(axes, keys, strict=True):
        points = sorted({m.step: m.value for m in client.get_metric_history(run_id, key)}.items())
        if points:
            any_points = True
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    if not any_points:
        plt.close(fig)
        return None
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def pretrain(cfg: Config, *, progress: bool = True) -> PretrainSummary:
    """Run SimCLR pretraining as ``cfg`` describes and return a :class:`PretrainSummary`.

    Raises:
        UserError: nothing to train on, a data access level the job may not read, or a run that failed for good.
    """
    import ray.data
    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train.torch import TorchTrainer

    from brainiac.jobs.pretrain.loop import train_loop
    from brainiac.models.export import write_pretraining_record
    from brainiac.platform.cluster import init_ray

    started = time.perf_counter()
    pcfg = cfg.pretrain
    run_name = pcfg.run_name or dt.datetime.now(dt.UTC).strftime("pretrain-%Y%m%d-%H%M%S")
    catalog = Catalog.open(cfg.catalog.uri, cfg.catalog.storage_options)
    selection = select_volumes(catalog, cfg)
    storage = _storage(cfg)
    run_dir = storage.join(run_name)
    uri, run_id = _mlflow_run(cfg, run_name, selection, catalog)
    init_ray(cfg.cluster)

    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar (ours) instead of one per operator
    dataset = pair_dataset(catalog, cfg, selection, selection.train_ids)
    resources = {"CPU": pcfg.cpus_per_worker} | ({"GPU": pcfg.gpus_per_worker} if pcfg.use_gpu else {})
    data_config = ray.train.DataConfig(
        datasets_to_split=["train"],
        execution_options=ExecutionOptions(resource_limits=ExecutionResources(cpu=pcfg.data_cpus))
        if pcfg.data_cpus
        else None,
    )
    monitor: Any = ray.remote(num_cpus=0)(_Monitor).remote()  # an actor handle: ray types no `.remote` on its methods
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config_to_dict(cfg, redact=True),
            "run_dir": run_dir.uri,
            "run_storage_options": dict(storage.options) if storage.is_remote else {},
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=pcfg.num_workers,
            use_gpu=pcfg.use_gpu,
            resources_per_worker=resources,
            placement_strategy=pcfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage.uri if not storage.is_remote else storage.path,
            storage_filesystem=storage.pyarrow_filesystem() if storage.is_remote else None,
            failure_config=ray.train.FailureConfig(max_failures=pcfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=pcfg.keep_checkpoints),
            callbacks=[_callback(monitor)],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]  # Train V2's RunConfig: ray.train picks it at run time, mypy sees V1's
        ),
        datasets={"train": dataset},
        dataset_config=data_config,
    )
    import mlflow

    client = mlflow.MlflowClient(uri, registry_uri=uri)
    try:
        result = _fit_with_progress(trainer, monitor, pcfg.max_steps, progress)
    except ray.train.TrainingFailedError as exc:
        client.set_terminated(run_id, status="FAILED")
        raise UserError(f"pretraining run {run_name} failed: {str(exc).splitlines()[0]}") from exc
    state: dict[str, Any] = ray.get(monitor.state.remote())
    if result.checkpoint is None:
        raise UserError(f"pretraining run {run_name} ended without a checkpoint")

    summary = PretrainSummary(run_name=run_name, mlflow_run_id=run_id, selection=asdict(selection) | {
        "train_ids": len(selection.train_ids), "eval_ids": len(selection.eval_ids)})  # fmt: skip
    last = state["last"] or (result.metrics or {})
    summary.steps = int(last.get("step", 0))
    summary.final_loss = last.get("loss")
    summary.samples_per_s = last.get("samples_per_s")
    summary.data_wait_fraction = last.get("data_wait_fraction")
    summary.train_top1 = last.get("top1")
    summary.failures = len(state["failures"])
    summary.workers = [state["workers"][r] for r in sorted(state["workers"])]
    summary.checkpoint = result.checkpoint.path
    summary.resumed_from_step = state["resumed_from"] or None

    with tempfile.TemporaryDirectory() as local:
        with result.checkpoint.as_directory() as folder:
            import shutil

            shutil.copytree(Path(folder) / "encoder", Path(local) / "encoder")
        encoder_dir = Path(local) / "encoder"
        write_pretraining_record(encoder_dir, pretraining_record(cfg, catalog, selection))
        summary.eval_top1, summary.eval_top1_random, summary.eval_pairs = _retrieval(
            cfg, encoder_dir, catalog, selection
        )
        final_step = summary.steps
        for key, value in (
            ("eval/top1_pretrained", summary.eval_top1),
            ("eval/top1_random_init", summary.eval_top1_random),
        ):
            client.log_metric(run_id, key, value, step=final_step)
        summary.model_uri, summary.model_version = _register(cfg, uri, run_id, encoder_dir, selection)
        plot = _loss_plot(uri, run_id, Path(local) / "loss_curves.png")
        if plot is not None:
            client.log_artifact(run_id, str(plot))
    client.set_tag(run_id, "brainiac.checkpoint", summary.checkpoint)
    client.set_terminated(run_id, status="FINISHED")
    summary.seconds = time.perf_counter() - started
    return summary
