"""The fine-tuning driver (``brainiac finetune``): task data → Ray Tune sweep of Ray Train trials → select on validation
→ test once → MLflow parent run with child runs → register ``brainiac-<task>@challenger``.

Train-v2 pattern: each Tune trial builds a ``TorchTrainer`` (one worker) whose reports reach Tune through
``TuneReportCallback``, so ASHA can stop weak trials early. Every sampled hyperparameter config runs once per seed (Tune's
``constant_grid_search``: the seeds are a grid, the config is drawn once for all of them); selection averages the
validation metric over all of a config's seeds and only the chosen config ever sees the test split. The reported test
value of a metric is the mean over seeds of its per-seed value, with a subject-level bootstrap interval of that same
mean.

Before any trial starts the driver checks what would otherwise fail late or silently: that the encoder was built for
the volumes' size and channels (:func:`check_encoder_fits`), and that no validation or test subject of the task was in
the encoder's pretraining split (:func:`check_pretraining_leakage`).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainiac.jobs.config import Config
from brainiac.jobs.finetune.data import TaskData, load_task_data, regime_subjects
from brainiac.models.tasks.spec import TaskSpec, task_spec
from brainiac.platform.catalog import Catalog
from brainiac.platform.config import DEFAULT_DATA_DIR
from brainiac.platform.errors import UserError

__all__ = ["FinetuneSummary", "finetune"]

log = logging.getLogger(__name__)

HP_KEYS = ("lr", "weight_decay", "dropout", "encoder_lr_mult", "freeze_depth", "layer_decay", "warmup_fraction")
"""Hyperparameters a trial reads from its config (:func:`brainiac.jobs.finetune.engine.train_trial`); the sweep
samples the first six within the config's ranges and keeps ``warmup_fraction`` constant."""


@dataclass
class FinetuneSummary:
    """What a fine-tuning sweep did, what it chose and how the choice scored on the test split."""

    task: str
    strategy: str
    regime: str
    init: str
    cases: dict[str, int] = field(default_factory=dict)
    trials: int = 0
    stopped_early: int = 0
    best_config: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, dict[str, Any]] = field(default_factory=dict)
    """metric → {mean: the mean over seeds of the per-seed test value; low, high: the 95 % subject-level bootstrap
    interval of that same mean; seeds: the per-seed values}."""
    leakage_check: str = ""
    """How the encoder's pretraining subjects were checked against this task's val/test subjects (``verified``, or
    ``unverified: <why>``; a proven overlap stops the job)."""
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    model_version: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _regime(cfg: Config) -> str:
    f = cfg.finetune
    return f"shots={f.shots}" if f.shots else f"fraction={f.fraction}" if f.fraction else "full"


def _init_encoder(cfg: Config) -> tuple[Any, dict | None, str, dict[str, Any] | None]:
    """(backbone config, encoder state or None, provenance, pretraining record or None) for the configured strategy
    and ``init``; the record (``pretraining.json`` beside the encoder) names the data the encoder was pretrained on."""
    f = cfg.finetune
    if f.strategy == "scratch":
        return cfg.model, None, "scratch", None
    if not f.init:
        raise UserError(f"strategy '{f.strategy}' needs --init (a checkpoint path or models:/brainiac-encoder@ALIAS)")
    from brainiac.models.export import load_encoder, read_pretraining_record, resolve_encoder_dir
    from brainiac.platform.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(cfg.tracking)
    if Path(f.init).expanduser().is_file():
        # A single file is BrainIAC's official checkpoint format: its architecture is the config's model section.
        encoder, backbone = load_encoder(f.init, tracking_uri=tracking_uri, backbone=cfg.model)
        record = None
    else:
        folder = resolve_encoder_dir(f.init, tracking_uri)  # download a models:/ encoder once
        encoder, backbone = load_encoder(str(folder), tracking_uri=tracking_uri, backbone=cfg.model)
        record = read_pretraining_record(folder)
    return backbone, {k: v.detach().clone() for k, v in encoder.state_dict().items()}, f.init, record


def _configs_where(predicate) -> list[str]:
    """Names of the shipped configs for which ``predicate(config)`` holds (for an error message that names a fix)."""
    from brainiac.jobs.config import available_configs, load_config

    names = []
    for name in available_configs():
        try:
            if predicate(load_config(name)):
                names.append(name)
        except Exception:  # noqa: S112 - a config that does not load on its own (a partial base) names no fix
            continue
    return names


def check_encoder_fits(backbone, data: TaskData, init: str) -> None:
    """Refuse, before any trial starts, an encoder whose input size or channels differ from the task's volumes.

    A ViT's position embedding is fixed to its ``img_size``: without this check every Tune trial started and died in
    its worker with a traceback. The message names both sizes and the shipped configs that would match.

    Raises:
        UserError: the volumes are not ``img_size``³ (ViT) or have another number of channels than the encoder takes.
    """
    channels, *spatial = data.inputs.shape[1:]
    size = int(backbone.img_size)
    who = "a scratch model of this config" if init == "scratch" else f"the encoder {init}"
    if channels != backbone.in_channels:
        raise UserError(
            f"{who} takes {backbone.in_channels} input channel(s), but task {data.spec.name} gives {channels} "
            f"(sequences {list(data.spec.sequences)})"
        )
    if backbone.kind == "vit" and tuple(spatial) != (size, size, size):
        got = "x".join(str(n) for n in spatial)
        # Preprocessing settings live in the top-level configs, encoders in pretrain/<name>.
        preprocess = [n for n in _configs_where(lambda c: c.preprocess.fixed_size == size) if "/" not in n]
        pretrain = [
            n
            for n in _configs_where(lambda c: tuple(spatial) == (c.model.img_size,) * 3 and c.model.kind == "vit")
            if n.startswith("pretrain/")
        ]
        fixes = []
        if preprocess:
            fixes.append(f"preprocess to {size}³ (`brainiac preprocess --config {preprocess[0]}`)")
        if pretrain:
            fixes.append(f"use an encoder built for {got} (`brainiac pretrain --config {pretrain[0]}`)")
        raise UserError(
            f"{who} was built for {size}³ inputs, but the volumes of preprocess version {data.preprocess_version} "
            f"are {got}; " + (" or ".join(fixes) if fixes else f"preprocess with preprocess.fixed_size={size}")
        )


def check_pretraining_leakage(catalog: Catalog, record: dict[str, Any] | None, data: TaskData, split_seed: int) -> str:
    """Check that no validation or test subject of ``data`` was in the encoder's pretraining split.

    The encoder's ``pretraining.json`` names its catalog, split seed, the splits it trained on and the ``splits``
    table version; split rows never move, so the subjects it saw are those of its splits under its seed at that
    version. Only the task's own val/test subjects are looked up (a key join, not the whole table).

    Returns:
        ``"verified"``, or ``"unverified: <why>"`` when the encoder has no record or comes from another catalog.

    Raises:
        UserError: some val/test subjects were in the encoder's pretraining data (a different split seed, or
            pretraining on held-out splits).
    """
    if record is None:
        return "unverified: the encoder has no pretraining record (imported, or exported before records existed)"
    from brainiac.platform.config import redact_uri_credentials

    if record.get("catalog") != redact_uri_credentials(catalog.uri):
        return f"unverified: the encoder was pretrained on another catalog ({record.get('catalog')})"
    from brainiac.ingestion.splits import read_splits

    held = sorted({sub for sub, split in zip(data.subjects, data.split, strict=True) if split in ("val", "test")})
    if not held:
        return "verified"
    seen_splits = set(record.get("splits") or ["train"])
    pretrained_split = read_splits(catalog, int(record["split_seed"]), held, version=record.get("splits_version"))
    leaked = sorted(sub for sub, split in pretrained_split.items() if split in seen_splits)
    if leaked:
        raise UserError(
            f"the encoder was pretrained on {len(leaked)} of this task's {len(held)} validation/test subjects (its "
            f"split seed {record['split_seed']}, splits {sorted(seen_splits)}; this job's split seed "
            f"{split_seed}): fine-tune with --set splits.seed={record['split_seed']} or pretrain on this split"
        )
    return "verified"


def _arrays(data: TaskData, train: np.ndarray, val: np.ndarray) -> dict[str, np.ndarray]:
    """A trial's arrays; ``train_groups`` (the subject of each training case) keeps a subject in one fold of the
    linear probe's inner cross-validation."""
    return {
        "train_x": data.inputs[train], "train_y": data.targets[train], "train_raw": data.raw[train],
        "val_x": data.inputs[val], "val_y": data.targets[val], "val_raw": data.raw[val],
        "train_groups": np.asarray([data.subjects[i] for i in train]),
    }  # fmt: skip


def finetune_loop(config: dict[str, Any]) -> None:
    """Ray Train worker of one Tune trial: train, report every epoch, save the final model where the driver finds it."""
    import ray
    import ray.train
    import torch

    from brainiac.jobs.finetune.engine import train_trial

    torch.set_num_threads(max(1, int(config["cpus"])))
    payload = ray.get(config["payload"])
    spec: TaskSpec = payload["spec"]
    data: TaskData = payload["data"]
    keep = regime_subjects(data, shots=payload["shots"], fraction=payload["fraction"], seed=int(config["seed"]))
    arrays = _arrays(data, data.indices("train", keep), data.indices("val"))

    def report(metrics: dict[str, float], model: torch.nn.Module, scale) -> None:
        if metrics["epoch"] == payload["max_epochs"]:
            Path(config["model_path"]).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state": model.state_dict(), "scale": asdict(scale)}, config["model_path"])
        ray.train.report({**metrics, "train_cases": len(arrays["train_x"])})

    train_trial(
        spec, payload["backbone"], payload["encoder_state"], config, arrays,
        strategy=payload["strategy"], max_epochs=payload["max_epochs"], batch_size=payload["batch_size"],
        augment=payload["augment"], report=report,
    )  # fmt: skip


def _tune_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: one TorchTrainer per trial (Ray Train v2 with Tune)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    config = {**config, "model_path": str(Path(config["model_dir"]) / f"{trial_id}.pt")}
    trainer = TorchTrainer(
        finetune_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=1,
            use_gpu=config["gpus"] > 0,
            resources_per_worker={"CPU": config["cpus"]} | ({"GPU": config["gpus"]} if config["gpus"] > 0 else {}),
        ),
        run_config=ray.train.RunConfig(
            name=f"trial-{trial_id}",
            storage_path=config["storage"],
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # a V2 callback: see the next line
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]  # Train V2's RunConfig: ray.train picks it at run time, mypy sees V1's
        ),
    )
    trainer.fit()


def _release_stopped_trials(before: set[str], cfg: Config) -> int:
    """Remove the placement groups that trials stopped early by ASHA left behind (local Ray only).

    A stopped trial kills its TorchTrainer's controller before it can release its workers' placement group; Train's
    own cleaner needs the state API, which a local Ray without dashboard lacks, so the CPUs stayed reserved and the next
    job waited forever. On a local Ray nothing else can own a group created during the sweep, so any still alive is one
    of ours. Returns how many were removed.
    """
    if cfg.cluster.address != "local":
        return 0
    from ray import PlacementGroupID  # public re-export of the id type placement_group_table() keys hold
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    removed = 0
    for pg_id, info in placement_group_table().items():
        if pg_id not in before and info.get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    if removed:
        log.info("released %d placement group(s) of trials stopped early", removed)
    return removed


def _search_space(cfg: Config) -> dict[str, Any]:
    from ray import tune

    f = cfg.finetune
    if f.trials == 1:
        space: dict[str, Any] = {k: getattr(f, k) for k in HP_KEYS}
    else:
        space = {
            "lr": tune.loguniform(*f.lr_range),
            "weight_decay": tune.loguniform(*f.weight_decay_range),
            "dropout": tune.choice(f.dropout_choices),
            "encoder_lr_mult": tune.choice(f.encoder_lr_mult_choices) if f.strategy == "full" else f.encoder_lr_mult,
            "freeze_depth": tune.choice(f.freeze_depth_choices) if f.strategy == "full" else 0,
            "layer_decay": tune.choice(f.layer_decay_choices) if f.strategy == "full" else f.layer_decay,
            "warmup_fraction": f.warmup_fraction,
        }
    space["seed"] = tune.grid_search(list(f.seeds)) if len(f.seeds) > 1 else f.seeds[0]
    return space


def tune_config(cfg: Config, metric: str, mode: str, concurrent: int):
    """Tune's settings for the sweep: ``finetune.trials`` hyperparameter draws, each run for every seed.

    ``constant_grid_search`` makes Tune draw the sampled hyperparameters once per sample and run that draw over the
    whole grid of seeds; without it every (seed, sample) pair drew its own values, so each hyperparameter group held
    one seed and "averaged over seeds" averaged nothing. ASHA stops weak trials early only in a one-seed sweep: it
    judges each (config, seed) trial alone, so with several seeds it cut single seeds of most configs and left none
    that could be averaged over all of them (seen in a 2-config x 2-seed sweep).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    f = cfg.finetune
    scheduler = None
    if f.trials > 1 and len(set(f.seeds)) == 1:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=f.max_epochs, grace_period=min(f.grace_epochs, f.max_epochs))
    return tune.TuneConfig(
        metric=metric,
        mode=mode,
        num_samples=f.trials,
        search_alg=BasicVariantGenerator(constant_grid_search=True, max_concurrent=concurrent),
        scheduler=scheduler,
    )


def select_config(rows: list[dict[str, Any]], seeds: int, higher_is_better: bool) -> tuple[tuple, list[dict]] | None:
    """The hyperparameter group (``hp`` → its trial rows) with the best validation value averaged over its seeds.

    Only groups that completed every seed compete: a config whose seed was stopped early (ASHA) or failed would
    otherwise be judged on a subset of seeds, which favours lucky draws. ``None`` when no group completed them all.
    """
    by_hp: dict[tuple, list[dict]] = {}
    for r in rows:
        by_hp.setdefault(r["hp"], []).append(r)
    complete = {hp: rs for hp, rs in by_hp.items() if len({r["seed"] for r in rs}) >= seeds}

    def key(item: tuple[tuple, list[dict]]) -> float:
        values = [r["value"] for r in item[1] if np.isfinite(r["value"])]
        if len(values) < len(item[1]):  # a seed with an undefined metric ranks the group last
            return math.inf
        mean = float(np.mean(values))
        return -mean if higher_is_better else mean

    return min(complete.items(), key=key) if complete else None


def _test(spec: TaskSpec, data: TaskData, paths: list[str], cfg: Config, backbone, encoder_state) -> tuple:
    """Score the chosen config's models (one per seed) on the test split, once; returns (metrics, first model, scale).

    Each metric is one estimand, the mean over seeds of its per-seed test value, and its interval is the
    subject-clustered, class-stratified bootstrap of that same mean (:func:`~brainiac.jobs.finetune.evaluate.
    seed_mean_cis`): before, the value was the seed mean while the interval bootstrapped the seed-averaged prediction,
    two different quantities (and a table could show a value outside its own interval).
    """
    import torch

    from brainiac.jobs.finetune.evaluate import seed_mean_cis
    from brainiac.models.backbones import build_backbone
    from brainiac.models.tasks.inference import TargetScale, predict
    from brainiac.models.tasks.model import build_task_model

    test = data.indices("test")
    x, y, raw = data.inputs[test], data.targets[test], data.raw[test]
    predictions, first = [], None
    for path in paths:
        # The trial file holds tensors and floats only: read it without unpickling arbitrary objects.
        saved = torch.load(path, map_location="cpu", weights_only=True)
        encoder = build_backbone(backbone) if encoder_state is not None else None
        model = build_task_model(spec, backbone, encoder, cfg.finetune.strategy)
        model.load_state_dict(saved["state"], strict=True)
        scale = TargetScale(**saved["scale"])
        predictions.append(predict(model, spec, x, scale))
        first = first or (model, scale)
    groups = np.asarray([data.subjects[i] for i in test])
    return seed_mean_cis(spec, predictions, y, raw, groups, n_boot=cfg.finetune.bootstrap), first


def _register(
    cfg: Config, spec: TaskSpec, client, run_id: str, model, scale, data: TaskData, init: str, backbone, leakage: str
):
    """Log the chosen model as weights plus a typed spec and register it as ``brainiac-<task>`` with the alias.

    The run's ``model/`` folder holds ``weights.pt`` and ``model_spec.json`` (:func:`brainiac.models.export.
    save_model_artifacts`: no pickle, so loading it runs no code) and is the registered version's source. The
    preprocessing settings that produced the training volumes go beside it (``model/preprocess.json``), from the
    catalog's record of ``data.preprocess_version``, else from ``cfg.preprocess`` when its version is that one, so that
    ``brainiac predict`` can rebuild the model's inputs from a new scan without the catalog. A version with neither is
    registered anyway (predict then refuses it with a clear message).
    """
    import mlflow

    from brainiac.models.export import MODEL_DIR, ModelSpec, save_model_artifacts

    preprocess_cfg = data.preprocess_config  # resolved with the volume set (brainiac.ingestion.volumes)
    if preprocess_cfg is None and cfg.preprocess.version() == data.preprocess_version:
        preprocess_cfg = cfg.preprocess
    if preprocess_cfg is None:
        log.warning("preprocess version %s has no recorded config; `brainiac predict` will refuse this model",
                    data.preprocess_version)  # fmt: skip

    name = f"brainiac-{spec.name}"
    model_spec = ModelSpec.for_task(spec, backbone, data.inputs.shape[1:], cfg.finetune.strategy)
    source = save_model_artifacts(client, run_id, model.eval(), model_spec, MODEL_DIR)
    client.log_dict(run_id, {"mean": scale.mean, "std": scale.std, "units": spec.units},
                    f"{MODEL_DIR}/target_scale.json")  # fmt: skip
    if preprocess_cfg is not None:
        client.log_dict(run_id, preprocess_cfg.to_dict(), f"{MODEL_DIR}/preprocess.json")
    tags = {"task": spec.name, "strategy": cfg.finetune.strategy, "regime": _regime(cfg), "init": init,
            "preprocess_version": data.preprocess_version, "volumes_table_version": str(data.volumes_version),
            "access": ",".join(data.access_levels), "target_mean": str(scale.mean), "target_std": str(scale.std),
            "units": spec.units, "task_spec": spec.fingerprint(), "leakage_check": leakage}  # fmt: skip
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description=f"BrainIAC fine-tuned model: {spec.description}")
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, cfg.finetune.alias, version.version)
    return f"models:/{name}@{cfg.finetune.alias}", str(version.version)


def finetune(cfg: Config, *, progress: bool = True) -> FinetuneSummary:
    """Run the sweep ``cfg.finetune`` describes and return a :class:`FinetuneSummary`.

    Raises:
        UserError: unknown task, missing ``--init``, no data, or no validation cases to select on.
    """
    import mlflow
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from brainiac.platform.cluster import init_ray
    from brainiac.platform.tracking import ensure_experiment, flatten_params, use_tracking

    started = time.perf_counter()
    f = cfg.finetune
    spec = task_spec(f.task)
    backbone, encoder_state, init, record = _init_encoder(cfg)
    catalog = Catalog.open(cfg.catalog.uri, cfg.catalog.storage_options)
    data = load_task_data(catalog, cfg, spec)
    check_encoder_fits(backbone, data, init)
    leakage = "not applicable: scratch" if encoder_state is None else check_pretraining_leakage(
        catalog, record, data, cfg.splits.seed)  # fmt: skip
    if leakage.startswith("unverified"):
        log.warning("pretraining leakage check %s", leakage)
    counts = data.counts()
    if counts["train"] == 0:
        raise UserError(f"task {spec.name}: no training cases in the catalog's train split")
    if f.trials > 1 and counts["val"] == 0:
        raise UserError(f"task {spec.name}: a sweep selects on the validation split, which holds no case here")
    if spec.kind == "segmentation" and backbone.kind != "vit":
        raise UserError("segmentation builds a UNETR on a ViT encoder; the chosen encoder is not a ViT")

    experiment_id = ensure_experiment(cfg.tracking)
    uri = use_tracking(cfg.tracking)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    name = dt.datetime.now(dt.UTC).strftime(f"finetune-{spec.name}-{f.strategy}-%Y%m%d-%H%M%S")
    parent = client.create_run(experiment_id, run_name=name, tags={
        "brainiac.job": "finetune", "brainiac.task": spec.name, "brainiac.strategy": f.strategy,
        "brainiac.regime": _regime(cfg), "brainiac.init": init, "brainiac.access": ",".join(data.access_levels),
        "brainiac.leakage_check": leakage})  # fmt: skip
    for key, value in sorted(flatten_params(cfg).items()):
        if key.startswith(("finetune.", "model.", "catalog.uri", "splits.")):
            client.log_param(parent.info.run_id, key, value)

    init_ray(cfg.cluster)
    storage = Path(f.storage_path or f"{DEFAULT_DATA_DIR}/runs").resolve()
    model_dir = storage / name / "models"
    payload = ray.put({
        "spec": spec, "data": data, "backbone": backbone, "encoder_state": encoder_state, "strategy": f.strategy,
        "shots": f.shots, "fraction": f.fraction, "max_epochs": f.max_epochs, "batch_size": f.batch_size,
        "augment": f.augment})  # fmt: skip
    cpus = ray.cluster_resources().get("CPU", 1.0)
    if cfg.cluster.address == "local":  # logical CPUs of a local Ray may exceed the cores; trials would only contend
        cpus = min(cpus, float(os.cpu_count() or 1))
    concurrent = f.max_concurrent_trials or max(1, int(cpus // (f.cpus_per_trial + 1)))
    metric = f"val_{spec.select_metric}"
    mode = "max" if spec.higher_is_better else "min"
    space = _search_space(cfg) | {
        "payload": payload, "model_dir": str(model_dir), "storage": str(storage / name / "trials"),
        "cpus": f.cpus_per_trial, "gpus": f.gpus_per_trial}  # fmt: skip
    mlflow_cb = MLflowLoggerCallback(
        tracking_uri=uri, experiment_name=cfg.tracking.experiment,
        tags={"mlflow.parentRunId": parent.info.run_id, "brainiac.sweep": name}, save_artifact=False,
    )  # fmt: skip
    has_val = counts["val"] > 0
    tuner = tune.Tuner(
        tune.with_resources(_tune_trial, {"CPU": 0.1}),  # the trial only drives its TorchTrainer
        param_space=space,
        tune_config=tune_config(cfg, metric if has_val else "train_loss", mode if has_val else "min", concurrent),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            callbacks=[mlflow_cb],
            verbose=1 if progress else 0,
        ),
    )
    from ray.util.placement_group import placement_group_table

    before = set(placement_group_table())
    grid = tuner.fit()
    _release_stopped_trials(before, cfg)
    rows = []
    for result in grid:  # type: ignore[attr-defined]  # ResultGrid iterates through __getitem__ (ray declares no __iter__)
        if result.error is not None:
            log.warning("trial failed: %s", result.error)
            continue
        config, metrics = result.config, result.metrics or {}
        rows.append({"hp": tuple((k, config[k]) for k in HP_KEYS), "seed": config["seed"],
                     "epoch": metrics.get("epoch", 0), "value": metrics.get(metric, math.nan),
                     "path": str(Path(config["model_dir"]) / f"{result.metrics.get('trial_id', '')}.pt")})  # fmt: skip
    if not rows:
        client.set_terminated(parent.info.run_id, status="FAILED")
        raise UserError(f"every trial of the {spec.name} sweep failed; see the log above")

    complete = [r for r in rows if r["epoch"] == f.max_epochs and Path(r["path"]).is_file()]
    chosen = select_config(complete, len(set(f.seeds)), spec.higher_is_better)
    if chosen is None:
        client.set_terminated(parent.info.run_id, status="FAILED")
        raise UserError(f"no {spec.name} hyperparameter config ran to its last epoch on all {len(f.seeds)} seed(s)")
    best_hp, best_rows = chosen
    summary = FinetuneSummary(task=spec.name, strategy=f.strategy, regime=_regime(cfg), init=init, cases=counts,
                              trials=len(rows), stopped_early=len(rows) - len(complete),
                              leakage_check=leakage)  # fmt: skip
    summary.best_config = dict(best_hp)
    summary.val = {metric: float(np.nanmean([r["value"] for r in best_rows])) if best_rows else math.nan}
    test, (model, scale) = _test(spec, data, [r["path"] for r in sorted(best_rows, key=lambda r: r["seed"])], cfg,
                                 backbone, encoder_state)  # fmt: skip
    summary.test = test
    run_id = parent.info.run_id
    for k, v in summary.best_config.items():
        client.log_param(run_id, f"best.{k}", v)
    for m, values in test.items():
        for stat in ("mean", "low", "high"):
            if np.isfinite(values[stat]):
                client.log_metric(run_id, f"test_{m}_{stat}", values[stat])
    if np.isfinite(summary.val[metric]):
        client.log_metric(run_id, f"best_{metric}", summary.val[metric])
    client.log_dict(run_id, summary.as_dict(), "summary.json")
    summary.mlflow_run_id = run_id
    if f.register:
        summary.model_uri, summary.model_version = _register(
            cfg, spec, client, run_id, model, scale, data, init, backbone, leakage
        )
    client.set_terminated(run_id, status="FINISHED")
    summary.seconds = time.perf_counter() - started
    return summary
