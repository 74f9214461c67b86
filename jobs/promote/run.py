"""``brainiac promote``: judge a registered task model against the current champion and move the ``champion`` alias only
if every gate passes; ``--rollback`` puts the previous champion back.

A first candidate, with no champion to compare with, is compared with its task's trivial baseline instead (the
training-class prior, the training mean, a constant risk, an empty mask): by default it must beat it by the same paired
bootstrap (``promote.baseline_gate``), so a model at chance never becomes the model that ``brainiac predict`` serves.

Both versions are evaluated in one process on the same test cases, read at pinned catalog table versions (recorded in
the decision), so the comparison is paired and repeatable. The decision, both models' metrics and every gate's reason
go to version tags, the version's description and a model-card artifact of a ``promote-<task>-v<N>`` MLflow run. The
history of champions is a registered-model tag, so a rollback also knows which version came before.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainiac.jobs.config import Config
from brainiac.jobs.promote.gates import (
    GateCheck,
    absolute_gates,
    access_gate,
    baseline_gate,
    baseline_predictions,
    improvement_gate,
    lineage_gate,
    paired_improvement,
    robustness_gate,
)
from brainiac.platform.errors import UserError

__all__ = ["HISTORY_TAG", "PromotionDecision", "RollbackResult", "promote", "rollback"]

HISTORY_TAG = "brainiac.champion_history"
"""Registered-model tag: JSON list of the versions that held ``champion``, oldest first."""

LINEAGE_TAGS = ("task", "task_spec", "init", "strategy", "regime", "preprocess_version", "volumes_table_version",
                "access", "units")  # fmt: skip
"""Version tags the model card shows as the candidate's lineage."""


@dataclass
class PromotionDecision:
    """What ``promote`` decided and why."""

    model_name: str
    task: str
    candidate_version: str
    champion_version: str | None
    primary_metric: str
    promoted: bool = False
    passed: bool = False
    dry_run: bool = False
    checks: list[GateCheck] = field(default_factory=list)
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    improvement: dict[str, float] | None = None
    """Paired improvement on ``primary_metric`` over the champion, or over the trivial baseline of a first promotion."""
    baseline: str | None = None
    """The trivial baseline a first promotion was compared with (e.g. ``training mean 54.2 years``), else ``None``."""
    robustness: dict[str, dict[str, float]] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    catalog: str = ""
    table_versions: dict[str, int] = field(default_factory=dict)
    preprocess_version: str = ""
    test_cases: int = 0
    decided_at: str = ""
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RollbackResult:
    """Which version lost and which regained ``champion``."""

    model_name: str
    from_version: str
    to_version: str
    previous_version: str | None


def _registry(cfg: Config, model_name: str):
    """A client of the config's tracking/registry store, once ``model_name`` is known to be registered there."""
    import mlflow

    from brainiac.platform.tracking import use_tracking

    uri = use_tracking(cfg.tracking)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    try:
        client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"no registered model '{model_name}' in {uri} (register one with `brainiac finetune`)") from exc
    return client


def _version_by_ref(client, name: str, ref: str):
    """A version of ``name`` by number (``7``) or alias (``@challenger``, ``challenger``)."""
    import mlflow

    try:
        if ref.lstrip("@").isdigit():
            return client.get_model_version(name, ref.lstrip("@"))
        return client.get_model_version_by_alias(name, ref.lstrip("@"))
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"{name}: no version '{ref}' ({str(exc).splitlines()[0]})") from exc


def _champion(client, name: str, alias: str):
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _history(client, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    try:
        return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    except json.JSONDecodeError:
        return []


def _evaluate(cfg: Config, spec, model_uri: str, tags: dict[str, str], data, test: np.ndarray):
    """Predictions, test metrics with CIs (subject-clustered, class-stratified bootstrap) and the robustness rows of one
    registered version on the test cases.

    The version is rebuilt from its weights and spec (:func:`~brainiac.models.export.load_model_artifacts`): a version
    logged as a pickle is refused, never unpickled.
    """
    from brainiac.jobs.finetune.evaluate import metric_cis
    from brainiac.models.export import load_model_artifacts
    from brainiac.models.tasks.inference import TargetScale, predict
    from brainiac.platform.tracking import resolve_tracking_uri

    p = cfg.promote
    model = load_model_artifacts(model_uri, resolve_tracking_uri(cfg.tracking)).module
    scale = TargetScale(float(tags.get("target_mean", 0.0)), float(tags.get("target_std", 1.0)))
    x, y, raw = data.inputs[test], data.targets[test], data.raw[test]
    predictions = predict(model, spec, x, scale)
    metrics = metric_cis(spec, predictions, y, raw, n_boot=p.bootstrap, groups=[data.subjects[i] for i in test])
    rows: list[dict[str, Any]] = []
    if p.robustness:
        from brainiac.models.tasks.robustness import robustness_table

        rows = robustness_table(model, spec, x, y, raw, scale, artifacts=p.robustness_artifacts or None, seed=0)
    return predictions, metrics, rows


def promote(cfg: Config, model_name: str, *, dry_run: bool = False) -> PromotionDecision:
    """Judge ``cfg.promote.candidate`` of ``model_name`` and move the champion alias if it passes.

    Raises:
        UserError: unknown model or version, a malformed gate, a candidate that already is champion, or no test cases.
    """

    from brainiac.jobs.finetune.data import load_task_data
    from brainiac.models.tasks.spec import task_spec
    from brainiac.platform.catalog import Catalog

    started = time.perf_counter()
    p = cfg.promote
    client = _registry(cfg, model_name)
    candidate = _version_by_ref(client, model_name, p.candidate)
    if "task" not in candidate.tags:
        raise UserError(f"{model_name} version {candidate.version} carries no 'task' tag: it is not a task model")
    spec = task_spec(candidate.tags["task"])
    metric = p.primary_metric or spec.select_metric
    if metric not in spec.metrics:
        raise UserError(f"promote.primary_metric '{metric}' is not a metric of task {spec.name}: {spec.metrics}")
    champion = _champion(client, model_name, p.champion_alias)
    if champion is not None and str(champion.version) == str(candidate.version):
        raise UserError(f"{model_name} version {candidate.version} already is '{p.champion_alias}'")
    absolute_gates(p.gates, spec, {m: {"value": 0.0} for m in spec.metrics})  # malformed gates fail before any work
    from brainiac.models.tasks.robustness import ARTIFACTS

    unknown = [a for a in p.robustness_artifacts if a not in ARTIFACTS]
    if unknown:
        raise UserError(f"promote.robustness_artifacts: unknown {unknown}; known: {', '.join(ARTIFACTS)}")

    decision = PromotionDecision(
        model_name=model_name,
        task=spec.name,
        candidate_version=str(candidate.version),
        champion_version=str(champion.version) if champion is not None else None,
        primary_metric=metric,
        dry_run=dry_run,
        decided_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    lineage = lineage_gate(spec, spec.fingerprint(), candidate.tags, champion.tags if champion is not None else None)
    decision.lineage = {k: candidate.tags.get(k, "–") for k in LINEAGE_TAGS}
    decision.checks.append(lineage)
    decision.checks.append(access_gate(candidate.tags, cfg.catalog.allowed_access))

    catalog = Catalog.open(cfg.catalog.uri, cfg.catalog.storage_options)
    data = load_task_data(
        catalog,
        cfg,
        spec,
        preprocess_version=candidate.tags.get("preprocess_version", ""),
        table_versions=p.table_versions,
    )
    test = data.indices("test")
    if len(test) == 0:
        raise UserError(f"task {spec.name}: the test split holds no case")
    decision.catalog, decision.table_versions = catalog.uri, data.table_versions
    decision.preprocess_version, decision.test_cases = data.preprocess_version, len(test)
    y, raw = data.targets[test], data.raw[test]
    subjects = [data.subjects[i] for i in test]  # the bootstrap resamples subjects, not scans

    cand_pred, cand_metrics, cand_rows = _evaluate(
        cfg, spec, f"models:/{model_name}/{candidate.version}", candidate.tags, data, test
    )
    decision.metrics["candidate"] = cand_metrics
    decision.checks += absolute_gates(p.gates, spec, cand_metrics)
    if champion is not None and lineage.passed:
        champ_pred, champ_metrics, champ_rows = _evaluate(
            cfg, spec, f"models:/{model_name}/{champion.version}", champion.tags, data, test
        )
        decision.metrics["champion"] = champ_metrics
        decision.improvement = paired_improvement(
            spec, metric, cand_pred, champ_pred, y, raw, n_boot=p.bootstrap, confidence=p.confidence, groups=subjects
        )
        decision.checks.append(improvement_gate(metric, decision.improvement, p.min_delta, p.confidence))
        if p.robustness:
            checks, decision.robustness = robustness_gate(metric, cand_rows, champ_rows, p.robustness_tolerance)
            decision.checks += checks
    elif champion is None and p.baseline_gate:
        from brainiac.jobs.finetune.evaluate import metric_cis

        train = data.indices("train") if spec.kind != "segmentation" else test[:0]  # an empty mask needs no labels
        base_pred, decision.baseline = baseline_predictions(spec, data.targets[train], y)
        decision.metrics["baseline"] = metric_cis(spec, base_pred, y, raw, n_boot=p.bootstrap, groups=subjects)
        decision.improvement = paired_improvement(
            spec, metric, cand_pred, base_pred, y, raw, n_boot=p.bootstrap, confidence=p.confidence, groups=subjects
        )
        decision.checks.append(baseline_gate(metric, decision.improvement, p.confidence, decision.baseline))
    elif champion is None and not p.gates:
        decision.checks.append(
            GateCheck("absolute gates", True, "none configured and promote.baseline_gate off (first promotion)")
        )
    decision.passed = not decision.failed
    if not dry_run:
        _record(cfg, client, decision, cand_rows)
        if decision.passed:
            _move_aliases(client, decision, p.champion_alias, p.previous_alias)
            decision.promoted = True
    decision.seconds = time.perf_counter() - started
    return decision


def _record(cfg: Config, client, d: PromotionDecision, rows: list[dict[str, Any]]) -> None:
    """Log the promotion run (metrics, decision JSON, model card) and tag the candidate version with the verdict."""
    from brainiac.jobs.promote.card import model_card
    from brainiac.platform.tracking import ensure_experiment

    experiment_id = ensure_experiment(cfg.tracking)
    run = client.create_run(experiment_id, run_name=f"promote-{d.task}-v{d.candidate_version}", tags={
        "brainiac.job": "promote", "brainiac.task": d.task, "brainiac.model": f"{d.model_name}/{d.candidate_version}",
        "brainiac.champion": f"{d.model_name}/{d.champion_version}" if d.champion_version else "none"})  # fmt: skip
    d.mlflow_run_id = run.info.run_id
    d.promoted = d.passed  # the card is written before the alias moves; it describes the decision being applied
    card = model_card(d)
    d.promoted = False
    for role, metrics in d.metrics.items():
        for name, v in metrics.items():
            if np.isfinite(v["value"]):
                client.log_metric(d.mlflow_run_id, f"{role}_{name}", v["value"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_card.md"
        path.write_text(card)
        client.log_artifact(d.mlflow_run_id, str(path))
    client.log_dict(d.mlflow_run_id, {**d.as_dict(), "promoted": d.passed}, "decision.json")
    if rows:
        client.log_dict(d.mlflow_run_id, rows, "robustness/candidate.json")
    client.set_terminated(d.mlflow_run_id, status="FINISHED")

    reasons = "; ".join(f"{c.name}: {c.detail}" for c in d.failed) or "all gates passed"
    tags = {
        "promotion.decision": "promoted" if d.passed else "rejected",
        "promotion.reasons": reasons[:4000],
        "promotion.compared_with": d.champion_version or ("trivial baseline" if d.baseline else "none"),
        "promotion.run_id": d.mlflow_run_id,
        "promotion.at": d.decided_at,
        "promotion.table_versions": json.dumps(d.table_versions, sort_keys=True),
    }
    for role, metrics in d.metrics.items():
        for name, v in metrics.items():
            tags[f"promotion.{role}.{name}"] = f"{v['value']:.6g}"
    if d.improvement:
        tags[f"promotion.improvement.{d.primary_metric}"] = json.dumps(
            {k: round(v, 6) for k, v in d.improvement.items()}
        )
    for key, value in tags.items():
        client.set_model_version_tag(d.model_name, d.candidate_version, key, value)
    client.update_model_version(d.model_name, d.candidate_version, description=card[:5000])


def _move_aliases(client, d: PromotionDecision, champion_alias: str, previous_alias: str) -> None:
    history = _history(client, d.model_name)
    if d.champion_version is not None:
        client.set_registered_model_alias(d.model_name, previous_alias, d.champion_version)
        if not history or history[-1] != d.champion_version:
            history.append(d.champion_version)
    client.set_registered_model_alias(d.model_name, champion_alias, d.candidate_version)
    history.append(d.candidate_version)
    client.set_registered_model_tag(d.model_name, HISTORY_TAG, json.dumps(history))


def rollback(cfg: Config, model_name: str) -> RollbackResult:
    """Give ``champion`` back to the version that held it before the current one; ``previous`` moves one further back
    (or is removed when there is none). The demoted version is tagged with when and why.

    Raises:
        UserError: no such model, no champion, or no earlier champion to return to.
    """

    p = cfg.promote
    client = _registry(cfg, model_name)
    current = _champion(client, model_name, p.champion_alias)
    if current is None:
        raise UserError(f"{model_name} has no '{p.champion_alias}' to roll back")
    history = _history(client, model_name)
    if history and history[-1] == str(current.version):
        history.pop()
    if not history:
        previous = _champion(client, model_name, p.previous_alias)
        if previous is None:
            raise UserError(f"{model_name}: no earlier champion than version {current.version} to roll back to")
        history = [str(previous.version)]
    target = history[-1]
    client.set_registered_model_alias(model_name, p.champion_alias, target)
    before = history[-2] if len(history) > 1 else None
    if before is not None:
        client.set_registered_model_alias(model_name, p.previous_alias, before)
    else:
        client.delete_registered_model_alias(model_name, p.previous_alias)
    client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history))
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    client.set_model_version_tag(model_name, str(current.version), "promotion.rolled_back_at", now)
    client.set_model_version_tag(model_name, str(current.version), "promotion.decision", "rolled back")
    return RollbackResult(model_name, str(current.version), target, before)
