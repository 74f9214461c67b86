"""``brainiac evaluate``: a registered task model on the test split, with bootstrap CIs, robustness and saliency.

The model version's tags say which task and preprocess version it belongs to, so evaluating needs only its URI. Results
go to a new MLflow run linked to the version: the test metrics with 95 % bootstrap CIs, a metric-vs-strength table and
plot for each imaging artifact, and saliency overlays for a few test cases. On tasks whose signal has a known place
(the tumour for ``idh`` and ``survival``), the saliency mass inside it is compared with random regions of the same size.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainiac.jobs.finetune.data import load_task_data
from brainiac.jobs.finetune.engine import TargetScale, predict, score
from brainiac.models.export import model_version
from brainiac.models.tasks.spec import TaskSpec, task_spec
from brainiac.platform.catalog import Catalog
from brainiac.platform.config import Config
from brainiac.platform.errors import UserError

__all__ = ["EvaluationSummary", "evaluate", "metric_cis"]

TUMOUR_TASKS = ("idh", "survival")


@dataclass
class EvaluationSummary:
    """Test metrics, robustness rows and saliency figures of one model version."""

    model_uri: str
    task: str
    version: str
    test_cases: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    robustness: list[dict[str, Any]] = field(default_factory=list)
    saliency_mass_ratio: float | None = None
    saliency_pngs: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tumour_masks(catalog: Catalog, cfg: Config, version: str) -> dict[str, np.ndarray]:
    """Whole-tumour masks on the fixed grid by case id (subject/session), from the segmentation task's data."""
    try:
        seg = load_task_data(catalog, cfg, task_spec("segmentation"), preprocess_version=version)
    except UserError:
        return {}
    return dict(zip(seg.case_ids, seg.targets, strict=True))


def metric_cis(
    spec: TaskSpec, predictions: np.ndarray, targets: np.ndarray, raw: np.ndarray, *, n_boot: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Each of the spec's metrics as ``{"value", "low", "high"}``: the point estimate and its 95 % percentile bootstrap
    interval over test cases (NaN bounds with fewer than two cases)."""
    from brainiac.models.tasks.metrics import bootstrap_ci

    point = score(spec, predictions, targets, raw)
    out: dict[str, dict[str, float]] = {}
    for metric in spec.metrics:

        def fn(p, t, r, metric=metric):
            return score(spec, p, t, r)[metric]

        _, low, high = bootstrap_ci(fn, predictions, targets, raw, n_boot=n_boot, seed=seed) if len(targets) > 1 else (
            math.nan, math.nan, math.nan)  # fmt: skip
        out[metric] = {"value": point[metric], "low": float(low), "high": float(high)}
    return out


def evaluate(
    cfg: Config,
    model_uri: str,
    *,
    robustness: bool = True,
    saliency_cases: int = 3,
    bootstrap: int | None = None,
    artifacts: list[str] | None = None,
) -> EvaluationSummary:
    """Evaluate the registered model ``model_uri`` on its task's test split (under ``artifacts``, default all).

    Raises:
        UserError: the URI names no version, the version is not a task model, or its task has no test cases.
    """
    import mlflow

    from brainiac.platform.tracking import ensure_experiment, use_tracking

    started = time.perf_counter()
    experiment_id = ensure_experiment(cfg.tracking)
    uri = use_tracking(cfg.tracking)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    mv = model_version(model_uri, uri)
    if "task" not in mv.tags:
        raise UserError(f"{model_uri} carries no 'task' tag: it is not a fine-tuned task model")
    spec = task_spec(mv.tags["task"])
    scale = TargetScale(float(mv.tags.get("target_mean", 0.0)), float(mv.tags.get("target_std", 1.0)))
    model = mlflow.pytorch.load_model(model_uri).eval()
    catalog = Catalog.open(cfg.catalog.uri, cfg.catalog.storage_options)
    data = load_task_data(catalog, cfg, spec, preprocess_version=mv.tags.get("preprocess_version", ""))
    test = data.indices("test")
    if len(test) == 0:
        raise UserError(f"task {spec.name}: the test split holds no case")
    x, y, raw = data.inputs[test], data.targets[test], data.raw[test]
    summary = EvaluationSummary(model_uri=model_uri, task=spec.name, version=str(mv.version), test_cases=len(test))
    predictions = predict(model, spec, x, scale)
    summary.metrics = metric_cis(spec, predictions, y, raw, n_boot=bootstrap or cfg.finetune.bootstrap)

    run = client.create_run(experiment_id, run_name=f"evaluate-{spec.name}-v{mv.version}", tags={
        "brainiac.job": "evaluate", "brainiac.task": spec.name, "brainiac.model": f"{mv.name}/{mv.version}"})  # fmt: skip
    run_id = run.info.run_id
    for metric, v in summary.metrics.items():
        for stat, value in v.items():
            if np.isfinite(value):
                client.log_metric(run_id, f"test_{metric}_{stat}", value)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if robustness:
            from brainiac.models.tasks.robustness import robustness_plot, robustness_table

            summary.robustness = robustness_table(model, spec, x, y, raw, scale, artifacts=artifacts, seed=0)
            client.log_dict(run_id, summary.robustness, "robustness/table.json")
            robustness_plot(summary.robustness, spec, folder / "robustness.png")
            client.log_artifact(run_id, str(folder / "robustness.png"), "robustness")
        if saliency_cases and spec.kind != "segmentation":
            from brainiac.models.tasks.saliency import mass_ratio, overlay_png, saliency_maps

            chosen = list(range(min(saliency_cases, len(test))))
            maps = saliency_maps(model, spec, x[chosen], method="occlusion")
            masks = _tumour_masks(catalog, cfg, data.preprocess_version) if spec.name in TUMOUR_TASKS else {}
            ratios = []
            for j, i in enumerate(chosen):
                case = data.case_ids[test[i]]
                region = masks.get(case)
                png = folder / f"saliency_{j}.png"
                overlay_png(x[i, 0], maps[j], png, region=region)
                client.log_artifact(run_id, str(png), "saliency")
                summary.saliency_pngs.append(f"saliency/{png.name}")
                if region is not None and region.any():
                    ratios.append(mass_ratio(maps[j][None], region[None].astype(bool), np.random.default_rng(j)))
            if ratios:
                summary.saliency_mass_ratio = float(np.mean(ratios))
                client.log_metric(run_id, "saliency_mass_ratio_tumour", summary.saliency_mass_ratio)
    client.log_dict(run_id, summary.as_dict(), "evaluation.json")
    client.set_terminated(run_id, status="FINISHED")
    summary.mlflow_run_id = run_id
    summary.seconds = time.perf_counter() - started
    return summary
