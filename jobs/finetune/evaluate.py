"""``brainiac evaluate``: a registered task model on the test split, with bootstrap CIs, robustness and saliency.

The model version's tags say which task and preprocess version it belongs to, so evaluating needs only its URI. Results
go to a new MLflow run linked to the version: the test metrics with 95 % subject-clustered, class-stratified bootstrap
CIs, a metric-vs-strength table and plot for each imaging artifact, and saliency overlays for a few test cases. On tasks
whose spec names where the signal lies (``saliency_region``: the tumour for ``idh`` and ``survival``, the hippocampus
for ``mci``), the saliency mass inside that region is compared with random regions of the same size
(:func:`brainiac.models.tasks.saliency.mass_ratio`).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainiac.jobs.config import Config
from brainiac.jobs.finetune.data import TaskData, load_task_data
from brainiac.models.export import load_model_artifacts, model_version
from brainiac.models.tasks.inference import TargetScale, predict, score
from brainiac.models.tasks.spec import TaskSpec, task_spec
from brainiac.platform.catalog import Catalog, sql_literal
from brainiac.platform.errors import UserError

__all__ = [
    "REGION_PROVIDERS",
    "CaseScorer",
    "EvaluationSummary",
    "case_strata",
    "evaluate",
    "hippocampus_masks",
    "metric_cis",
    "region_ratios",
    "seed_mean_cis",
    "tumour_masks",
]


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
    """Mean saliency mass inside ``saliency_region`` over the explained test cases, relative to random regions."""
    saliency_region: str | None = None
    """The spec's region the ratio is about (``tumour``, ``hippocampus``); ``None`` when the task names none or no
    saliency ran."""
    saliency_region_cases: int = 0
    """Explained test cases with a non-empty region and a non-zero map: the ratio's n."""
    saliency_pngs: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


RegionProvider = Callable[[Catalog, Config, TaskData, Sequence[str]], dict[str, np.ndarray]]
"""(catalog, config, task data, case ids) → boolean region mask on the model-input grid, by case id."""


def tumour_masks(catalog: Catalog, cfg: Config, data: TaskData, cases: Sequence[str]) -> dict[str, np.ndarray]:
    """Whole-tumour masks on the fixed grid by case id (subject/session), from the segmentation task's data (read at
    the same preprocess version and Delta table versions as ``data``)."""
    try:
        seg = load_task_data(catalog, cfg, task_spec("segmentation"), preprocess_version=data.preprocess_version,
                             table_versions=data.table_versions)  # fmt: skip
    except UserError:
        return {}
    wanted = set(cases)
    return {c: m.astype(bool) for c, m in zip(seg.case_ids, seg.targets, strict=True) if c in wanted}


def hippocampus_masks(catalog: Catalog, cfg: Config, data: TaskData, cases: Sequence[str]) -> dict[str, np.ndarray]:
    """The synthetic generator's medial-temporal region on each case's fixed grid, by case id.

    Each case's first channel (``data.scan_ids``) gives the grid (``fixed_affine``, ``fixed_shape``) and the head size
    (``brain_volume_ml``, see :func:`brainiac.models.tasks.regions.head_scale`), read from ``volumes`` at the Delta
    version the task data was read at."""
    from brainiac.models.tasks.regions import head_scale, hippocampus_mask

    wanted = set(cases)
    case_of = {scan: case for case, scan in zip(data.case_ids, data.scan_ids, strict=True) if case in wanted}
    if not case_of:
        return {}
    where = f"preprocess_version = {sql_literal(data.preprocess_version)}"
    columns = ["scan_id", "fixed_affine", "fixed_shape", "brain_volume_ml"]
    rows = catalog.select_keys(
        "volumes", "scan_id", list(case_of), columns, where=where, version=data.volumes_version
    ).to_pylist()
    return {
        case_of[r["scan_id"]]: hippocampus_mask(
            np.asarray(r["fixed_affine"]).reshape(4, 4), tuple(r["fixed_shape"]), scale=head_scale(r["brain_volume_ml"])
        )
        for r in rows
    }


def region_ratios(maps: np.ndarray, inputs: np.ndarray, regions: Sequence[np.ndarray | None]) -> list[float]:
    """Per case, the saliency mass ratio of ``maps[j]`` in ``regions[j]``
    (:func:`~brainiac.models.tasks.saliency.mass_ratio`); cases without a region or with an all-zero map are left out.

    The random translations stay within the brain's box (the non-zero voxels of the case's input channels): in the
    background occlusion changes nothing, so translations landing there would make any model look focused.
    """
    from brainiac.models.tasks.saliency import mass_ratio

    ratios = []
    for j, region in enumerate(regions):
        if region is None or region.shape != maps[j].shape or not region.any():
            continue
        brain = np.any(np.asarray(inputs[j]) != 0, axis=0)
        ratio = mass_ratio(maps[j][None], region[None], np.random.default_rng(j), brain_mask=brain[None])
        if np.isfinite(ratio):  # NaN: an all-zero map (no occlusion lowered the score)
            ratios.append(float(ratio))
    return ratios


REGION_PROVIDERS: dict[str, RegionProvider] = {"tumour": tumour_masks, "hippocampus": hippocampus_masks}
"""Region masks for each value of :attr:`TaskSpec.saliency_region`."""


def case_strata(spec: TaskSpec, targets: np.ndarray) -> np.ndarray | None:
    """The bootstrap stratum of each case: its class for classification tasks and for survival (whose cases censored
    before the threshold have no class, NaN, and form a stratum of their own), so that every resample holds every
    class and AUC-type metrics stay defined; ``None`` (no strata) for regression and segmentation."""
    if spec.kind in ("multiclass", "binary"):
        return np.asarray(targets)
    return None


class CaseScorer:
    """The spec's metrics of one set of predictions on any resample of its cases.

    :func:`~brainiac.models.tasks.inference.score` computes every metric from scratch; for segmentation that means a
    surface distance per case per resample. Dice and HD95 are per-case quantities averaged over cases, so they are
    computed once per case here and a resample only averages them (the same value ``score`` gives on those cases).
    """

    def __init__(self, spec: TaskSpec, predictions: np.ndarray, targets: np.ndarray, raw: np.ndarray) -> None:
        from brainiac.models.tasks import metrics as M

        self.spec, self.predictions, self.targets, self.raw = spec, predictions, targets, raw
        self.per_case: dict[str, np.ndarray] = {}
        if spec.kind == "segmentation":
            per = {"dice": M.dice, "hd95": M.hd95}
            self.per_case = {
                m: np.array([per[m](p > 0.5, t > 0) for p, t in zip(predictions, targets, strict=True)], dtype=float)
                for m in spec.metrics
            }

    def __call__(self, idx: np.ndarray | None = None) -> dict[str, float]:
        """Every metric on the cases ``idx`` (all cases when ``None``; repeats count as often as they occur)."""
        if not self.per_case:
            if idx is None:
                return score(self.spec, self.predictions, self.targets, self.raw)
            return score(self.spec, self.predictions[idx], self.targets[idx], self.raw[idx])
        out = {}
        for m, values in self.per_case.items():
            v = values if idx is None else values[idx]
            finite = v[np.isfinite(v)]
            out[m] = float(np.mean(finite)) if len(finite) and len(v) else math.nan
        return out


def metric_cis(
    spec: TaskSpec,
    predictions: np.ndarray,
    targets: np.ndarray,
    raw: np.ndarray,
    *,
    n_boot: int,
    seed: int = 0,
    groups: Sequence[str] | np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Each of the spec's metrics as ``{"value", "low", "high"}``: the point estimate and its 95 % percentile bootstrap
    interval (NaN bounds with fewer than two cases, or when over 10 % of resamples leave the metric undefined).

    The bootstrap resamples whole subjects (``groups``: the subject of each case, e.g. ``TaskData.subjects`` of the
    test indices; ``None`` treats every case as its own subject) within each class (``strata``; ``None`` = the task's
    class, :func:`case_strata`), see :func:`brainiac.models.tasks.metrics.bootstrap_ci`: several scans of one subject
    are not independent evidence.
    """
    one = seed_mean_cis(spec, [predictions], targets, raw, groups, n_boot, seed, strata=strata)
    return {m: {"value": v["mean"], "low": v["low"], "high": v["high"]} for m, v in one.items()}


def seed_mean_cis(
    spec: TaskSpec,
    per_seed_predictions: Sequence[np.ndarray],
    targets: np.ndarray,
    raw: np.ndarray,
    groups: Sequence[str] | np.ndarray | None,
    n_boot: int,
    seed: int = 0,
    *,
    strata: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """The mean over training seeds of each test metric, with the bootstrap interval of that same quantity.

    Reporting the mean of per-seed scores next to the interval of some other estimand (e.g. a bootstrap of the
    seed-averaged prediction, which ensembles the seeds and scores higher) gave values outside their own interval.
    Here every resample of subjects (see :func:`metric_cis` for ``groups`` and ``strata``) scores each seed's
    predictions on the resampled cases and averages those scores, so estimand and interval match.

    Returns ``{metric: {"mean", "low", "high", "seeds"}}`` with ``seeds`` each seed's score on all test cases.
    """
    from brainiac.models.tasks.metrics import Resampler, percentile_interval

    scorers = [CaseScorer(spec, np.asarray(p), targets, raw) for p in per_seed_predictions]
    if not scorers:
        raise ValueError("need the predictions of at least one seed")
    per_seed = {m: [s()[m] for s in scorers] for m in spec.metrics}
    cis = {m: (math.nan, math.nan) for m in spec.metrics}
    if len(targets) >= 2:
        design = Resampler.build(len(targets), groups, case_strata(spec, targets) if strata is None else strata)
        values = {m: np.empty(n_boot) for m in spec.metrics}
        for b, idx in enumerate(design.indices(n_boot, seed)):
            scores = [s(idx) for s in scorers]  # every seed scored on the same resampled cases
            for m in spec.metrics:
                values[m][b] = np.mean([sc[m] for sc in scores])
        cis = {m: percentile_interval(values[m], 0.05) for m in spec.metrics}
    return {
        m: {"mean": float(np.mean(per_seed[m])), "low": cis[m][0], "high": cis[m][1], "seeds": per_seed[m]}
        for m in spec.metrics
    }


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
    model = load_model_artifacts(model_uri, uri).module  # weights + spec, never a pickle
    catalog = Catalog.open(cfg.catalog.uri, cfg.catalog.storage_options)
    data = load_task_data(catalog, cfg, spec, preprocess_version=mv.tags.get("preprocess_version", ""))
    test = data.indices("test")
    if len(test) == 0:
        raise UserError(f"task {spec.name}: the test split holds no case")
    x, y, raw = data.inputs[test], data.targets[test], data.raw[test]
    summary = EvaluationSummary(model_uri=model_uri, task=spec.name, version=str(mv.version), test_cases=len(test))
    predictions = predict(model, spec, x, scale)
    subjects = [data.subjects[i] for i in test]
    summary.metrics = metric_cis(spec, predictions, y, raw, n_boot=bootstrap or cfg.finetune.bootstrap, groups=subjects)

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
            client.log_dict(run_id, summary.robustness, "robustness/table.json")  # type: ignore[arg-type]  # mlflow annotates dict but logs any JSON value; this table is a list of rows
            robustness_plot(summary.robustness, spec, folder / "robustness.png")
            client.log_artifact(run_id, str(folder / "robustness.png"), "robustness")
        if saliency_cases and spec.kind != "segmentation":
            from brainiac.models.tasks.saliency import overlay_png, saliency_maps

            chosen = list(range(min(saliency_cases, len(test))))
            maps = saliency_maps(model, spec, x[chosen], method="occlusion")
            cases = [data.case_ids[test[i]] for i in chosen]
            region_name = summary.saliency_region = spec.saliency_region
            masks = REGION_PROVIDERS[region_name](catalog, cfg, data, cases) if region_name else {}
            for j, (i, case) in enumerate(zip(chosen, cases, strict=True)):
                png = folder / f"saliency_{j}.png"
                overlay_png(x[i, 0], maps[j], png, region=masks.get(case))
                client.log_artifact(run_id, str(png), "saliency")
                summary.saliency_pngs.append(f"saliency/{png.name}")
            ratios = region_ratios(maps, x[chosen], [masks.get(case) for case in cases])
            if ratios:
                summary.saliency_region_cases = len(ratios)
                summary.saliency_mass_ratio = float(np.mean(ratios))
                client.log_metric(run_id, f"saliency_mass_ratio_{region_name}", summary.saliency_mass_ratio)
    client.log_dict(run_id, summary.as_dict(), "evaluation.json")
    client.set_terminated(run_id, status="FINISHED")
    summary.mlflow_run_id = run_id
    summary.seconds = time.perf_counter() - started
    return summary
