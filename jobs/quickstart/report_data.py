"""What the quickstart report shows, as plain data (:class:`ReportData`), and :func:`gather`, the one place it is read.

:func:`gather` turns the summaries the jobs return (:class:`ReportInputs`) into every heading fact, table row, figure
(a base64 PNG) and line the page shows. Figures that live elsewhere are fetched here: the catalog overview from the
catalog itself, the pretraining curves from the MLflow run's metric history, the saliency overlays from the evaluation
runs' artifacts, and the registry's versions and aliases live from MLflow. Every section is always there: one whose
input is missing is a "not run" :class:`Notice`, and one whose source fails is an error :class:`Notice` saying why in
one line, so a report is still written after a long pipeline whatever went wrong. Rendering the data is
:func:`brainiac.jobs.quickstart.report.render`'s job and needs no service.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
import shlex
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

from brainiac.platform.config import redact_uri_credentials

if TYPE_CHECKING:
    from _typeshed import ConvertibleToFloat

__all__ = [
    "SECTIONS",
    "CatalogSection",
    "Decision",
    "Figure",
    "FinetuningSection",
    "Gate",
    "Notice",
    "OverviewSection",
    "Prediction",
    "PredictionSection",
    "PretrainingSection",
    "RegisteredModel",
    "RegistrySection",
    "ReportData",
    "ReportInputs",
    "ReproduceSection",
    "RobustnessModel",
    "RobustnessSection",
    "SaliencyModel",
    "SaliencySection",
    "Table",
    "champion_lines",
    "duration",
    "gather",
    "prediction_text",
    "pretrain_line",
]

log = logging.getLogger(__name__)

SECTIONS: tuple[tuple[str, str], ...] = (
    ("overview", "Overview"),
    ("catalog", "Catalog"),
    ("pretraining", "Self-supervised pretraining"),
    ("finetuning", "Fine-tuning"),
    ("robustness", "Robustness"),
    ("saliency", "Saliency"),
    ("registry", "Model registry"),
    ("prediction", "Prediction"),
    ("reproduce", "Reproduce"),
)
"""(stable id, heading) of every section, in page order; the ids are the page's anchors and :class:`ReportData`'s
field names."""

DPI = 100
"""Resolution of the figures drawn here: enough for a screen, small enough to keep the page light."""

ALIAS_ORDER = ("champion", "previous", "challenger", "candidate")
"""Registry aliases in the order the page lists them (others follow alphabetically)."""

REGISTRY_VERSIONS_SHOWN = 20
"""Newest versions of each registered model listed; the rest are counted."""


@dataclass
class ReportInputs:
    """Everything the report shows, as plain data the quickstart already holds (summaries' ``as_dict()``)."""

    title: str = "BrainIAC quickstart"
    workdir: str = ""
    catalog_uri: str | None = None
    """The catalog the run ingested into (``None``: the catalog section says "not run")."""
    tracking_uri: str | None = None
    """MLflow tracking URI for metric histories, artifacts and the registry."""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Stage name → wall seconds, in run order."""
    total_seconds: float | None = None
    pretrain: dict[str, Any] | None = None
    """``PretrainSummary.as_dict()``."""
    finetune: list[dict[str, Any]] = field(default_factory=list)
    """``FinetuneSummary.as_dict()`` per sweep (a task may have a scratch and a pretrained sweep)."""
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """``EvaluationSummary.as_dict()`` per evaluated model version."""
    promotions: list[dict[str, Any]] = field(default_factory=list)
    """``PromotionDecision.as_dict()`` per promotion attempt."""
    predictions: list[dict[str, Any]] = field(default_factory=list)
    """Free-form: ``text`` (the printed line), ``model_uri``, ``input``, ``value``, ``units``, output paths..."""
    commands: list[tuple[str, str]] = field(default_factory=list)
    """(stage, exact shell command that reproduces it)."""
    catalog_options: dict[str, str] = field(default_factory=dict)
    """Storage options to open an ``s3://`` catalog (never written to the page)."""

    def __post_init__(self) -> None:
        # The URI as jobs resolve it (a relative sqlite path is relative to this process' working directory).
        if self.tracking_uri:
            from brainiac.platform.config import TrackingConfig
            from brainiac.platform.errors import UserError
            from brainiac.platform.tracking import resolve_tracking_uri

            with contextlib.suppress(UserError):  # else shown as given; the sections that read it say why they cannot
                self.tracking_uri = resolve_tracking_uri(TrackingConfig(uri=self.tracking_uri))


# ----------------------------------------------------------------------------------------------------------------------
# The data the page shows. Text is final (numbers already formatted the way the page and the terminal print them);
# the template only lays it out.


@dataclass
class Notice:
    """One line in place of content: a part that did not run (``not-run``) or whose source failed (``error``)."""

    text: str
    kind: Literal["not-run", "error"]


@dataclass
class Figure:
    """A PNG embedded in the page, so the file stands alone."""

    png_base64: str
    alt: str
    caption: str = ""


@dataclass
class Table:
    """A table of display text; ``numeric`` columns are right-aligned."""

    header: list[str]
    rows: list[list[str]]
    numeric: tuple[int, ...] = ()


@dataclass
class OverviewSection:
    """Where the run's outputs are, how long each stage took, and the headline results."""

    facts: list[tuple[str, str]]
    """Created, working directory, catalog, tracking URI, total time."""
    stage_times: Table | None
    """Stage, wall time and share of the total; ``None`` when no stage was timed."""
    glance: list[str]
    """The pretraining line, each task's champion line and each prediction, as the terminal summary prints them."""


@dataclass
class CatalogSection:
    """What the run ingested: current scans, subjects and datasets, per sequence, with the overview plot."""

    scans: int
    subjects: int
    datasets: int
    table_version: int
    """Version of the ``scans`` Delta table the counts come from."""
    counts: Table
    """Per dataset: subjects, scans and scans per sequence (current rows only)."""
    overview: Figure | Notice


@dataclass
class PretrainingSection:
    """The self-supervised run's numbers and its training curves."""

    facts: list[tuple[str, str]]
    curves: Figure | Notice
    """Loss and top-1 histories from the MLflow run, with the held-out values and chance."""


@dataclass
class FinetuningSection:
    """Every sweep's test metrics, pretrained against scratch where a task has both."""

    sweeps: Table
    comparison: Table | None
    """Pretrained vs scratch per (task, regime, metric); ``None`` when no task has both arms."""
    results: Figure | None


@dataclass
class RobustnessModel:
    """One evaluated model: clean test metrics, then the metric under artifacts of rising strength."""

    task: str
    version: str
    test_cases: str
    metrics: Table | None
    """Clean test metrics with CIs; ``None`` when the evaluation logged none."""
    curves: Figure | Notice
    worst_drops: Table | None


@dataclass
class RobustnessSection:
    """Robustness of every evaluated model."""

    models: list[RobustnessModel]


@dataclass
class SaliencyModel:
    """One evaluated model's saliency overlays and how much saliency falls in the task's region."""

    task: str
    version: str
    region: str
    mass_ratio: str | None
    """Formatted saliency mass ratio inside ``region``; ``None`` when not measured."""
    overlays: list[Figure | Notice] | Notice
    """One figure (or the reason it is missing) per artifact; a notice when the evaluation has no MLflow run."""


@dataclass
class SaliencySection:
    """Saliency of every evaluation that produced overlays."""

    models: list[SaliencyModel]


@dataclass
class RegisteredModel:
    """One ``brainiac-*`` model as the registry holds it now."""

    name: str
    aliases: str
    versions: Table
    """The newest :data:`REGISTRY_VERSIONS_SHOWN` versions."""
    older: int
    """Versions not listed."""


@dataclass
class Gate:
    """One promotion check and its outcome."""

    name: str
    passed: bool
    detail: str


@dataclass
class Decision:
    """One promotion attempt of this run: the gates, the metrics compared, and the verdict."""

    heading: str
    """Candidate, what it was judged against, and the verdict."""
    gates: list[Gate]
    metrics: Table | None
    primary_metric: str
    improvement: str | None
    """Paired improvement on the primary metric with its CI; ``None`` when not measured."""
    mlflow_run_id: str | None


@dataclass
class RegistrySection:
    """The registry now, and the promotion decisions this run made."""

    live: list[RegisteredModel] | Notice | None
    """Every ``brainiac-*`` model as the registry holds it now; ``None`` when no tracking URI was given."""
    decisions: list[Decision] | Notice


@dataclass
class Prediction:
    """One prediction: the line it printed and every field it returned."""

    headline: str
    details: list[tuple[str, str]]


@dataclass
class PredictionSection:
    """The predictions made on held-out scans."""

    predictions: list[Prediction]


@dataclass
class ReproduceSection:
    """Commands that repeat the run and browse what it left behind."""

    commands: list[tuple[str, str]] | Notice
    """(stage, shell command) of every stage of the run."""
    mlflow_ui: str | None
    catalog_queries: str | None


@dataclass
class ReportData:
    """Everything the report page shows; each section is its content or one :class:`Notice` in its place."""

    title: str
    created_at: str
    overview: OverviewSection | Notice
    catalog: CatalogSection | Notice
    pretraining: PretrainingSection | Notice
    finetuning: FinetuningSection | Notice
    robustness: RobustnessSection | Notice
    saliency: SaliencySection | Notice
    registry: RegistrySection | Notice
    prediction: PredictionSection | Notice
    reproduce: ReproduceSection | Notice


# ----------------------------------------------------------------------------------------------------------------------
# Formatting and small facts shared by the page and the terminal summary.


def _not_run(why: str) -> Notice:
    return Notice(f"not run — {why}", "not-run")


def _error(what: str, exc: BaseException) -> Notice:
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return Notice(redact_uri_credentials(f"{what} unavailable: {type(exc).__name__}: {line}"), "error")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> Table:
    return Table(list(header), [[str(c) for c in row] for row in rows], tuple(numeric))


def _pairs(rows: Iterable[Sequence[Any]]) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in rows]


def _figure_file(png: Path, alt: str, caption: str = "") -> Figure:
    return Figure(base64.b64encode(Path(png).read_bytes()).decode("ascii"), alt, caption)


def _figure_drawn(fig, alt: str, caption: str = "") -> Figure:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return Figure(base64.b64encode(buffer.getvalue()).decode("ascii"), alt, caption)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, bool):
        return "–" if value is None else str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "–"
    return str(int(v)) if v.is_integer() and abs(v) < 1e6 else f"{v:.{digits}g}"


def _ci(mean: Any, low: Any, high: Any) -> str:
    bounds = f" [{_num(low)}, {_num(high)}]" if _finite(low) and _finite(high) else ""
    return f"{_num(mean)}{bounds}"


def _ci_of(v: Mapping[str, Any] | None) -> str:
    """``value [low, high]`` of a ``{value, low, high}`` dict."""
    return _ci(v.get("value"), v.get("low"), v.get("high")) if v else "–"


def _finite(value: Any) -> TypeGuard[ConvertibleToFloat]:
    """Whether ``float(value)`` is a finite number (so the caller may call ``float`` on it)."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def duration(seconds: float | None) -> str:
    """``2.3 s``, ``4 min 07 s``, ``1 h 03 min``."""
    if seconds is None or not _finite(seconds):
        return "–"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _new_figure(width: float, height: float):
    """A pyplot-free Agg figure (no global state, safe in any thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def _mlflow_client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)


def _is_scratch(row: Mapping[str, Any]) -> bool:
    return row.get("strategy") == "scratch" or str(row.get("init") or "") in ("", "scratch")


def _arm(row: Mapping[str, Any]) -> str:
    return "scratch" if _is_scratch(row) else f"pretrained · {row.get('strategy', '?')}"


def _higher_is_better(metric: str) -> bool:
    from brainiac.models.tasks.spec import HIGHER_IS_BETTER

    return HIGHER_IS_BETTER.get(metric, True)


def _champions(inputs: ReportInputs) -> dict[str, dict[str, Any]]:
    """Task → the registry state after the last promotion attempt of its model: champion version, its primary metric
    with CI, whether this run promoted it, and the reasons when it did not."""
    out: dict[str, dict[str, Any]] = {}
    for d in inputs.promotions:
        promoted = bool(d.get("promoted"))
        version = d.get("candidate_version") if promoted else d.get("champion_version")
        role = "candidate" if promoted else "champion"
        metric = str(d.get("primary_metric", ""))
        value = (d.get("metrics") or {}).get(role, {}).get(metric)
        failed = [c for c in d.get("checks", []) if not c.get("passed")]
        out[str(d.get("task") or d.get("model_name"))] = {
            "model": d.get("model_name", "?"),
            "version": version,
            "promoted": promoted,
            "metric": metric,
            "value": value,
            "candidate": d.get("candidate_version"),
            "passed": bool(d.get("passed")),
            "reasons": "; ".join(f"{c.get('name')}: {c.get('detail')}" for c in failed) or "all gates passed",
        }
    return out


def _champion_line(task: str, c: Mapping[str, Any]) -> str:
    if c["version"] is None:
        return f"{task}: no champion (candidate v{c['candidate']} rejected: {c['reasons']})"
    v = c["value"] or {}
    metric = f" · {c['metric']} {_ci(v.get('value'), v.get('low'), v.get('high'))}" if v else ""
    if c["promoted"]:
        how = "promoted now"
    elif c["passed"]:
        how = f"kept; candidate v{c['candidate']} passed every gate but was not promoted (dry run)"
    else:
        how = f"kept; candidate v{c['candidate']} rejected: {c['reasons']}"
    return f"{task}: {c['model']} v{c['version']} champion{metric} ({how})"


def champion_lines(inputs: ReportInputs) -> dict[str, str]:
    """Task → one line on its champion after this run's promotion attempts (version, metric with CI, and why)."""
    return {task: _champion_line(task, c) for task, c in _champions(inputs).items()}


def pretrain_line(p: Mapping[str, Any]) -> str:
    """Steps, final loss and held-out top-1 against the random-init encoder, in one line."""
    return (
        f"pretraining: {p.get('steps', 0)} steps, final loss {_num(p.get('final_loss'))}, held-out top-1 "
        f"{_num(p.get('eval_top1'))} vs {_num(p.get('eval_top1_random'))} with random-init weights"
    )


def prediction_text(p: Mapping[str, Any]) -> str:
    """The line a prediction printed, else ``input: value units``."""
    if p.get("text") or p.get("headline"):
        return str(p.get("text") or p.get("headline"))
    value = f"{_num(p.get('value'))} {p.get('units', '')}".strip()
    return f"{p.get('input', '?')}: {value}"


# ----------------------------------------------------------------------------------------------------------------------
# Sections. Each reads its sources and returns its content, or a Notice saying why there is none; ``scratch`` is an
# empty folder of its own for files a source can only write to disk.


def _overview(inputs: ReportInputs, _scratch: Path) -> OverviewSection:
    facts = _pairs(
        [
            ["created", inputs.created_at],
            ["working directory", inputs.workdir or "–"],
            ["catalog", redact_uri_credentials(inputs.catalog_uri or "") or "–"],
            ["MLflow tracking", redact_uri_credentials(inputs.tracking_uri or "") or "–"],
            ["total time", duration(inputs.total_seconds)],
        ]
    )
    stage_times = None
    if inputs.stage_seconds:
        total = sum(inputs.stage_seconds.values()) or 1.0
        rows = [[s, duration(v), f"{100 * v / total:.0f} %"] for s, v in inputs.stage_seconds.items()]
        stage_times = _table(["stage", "wall time", "share"], rows, numeric=(1, 2))
    glance = [pretrain_line(inputs.pretrain)] if inputs.pretrain else []
    glance += champion_lines(inputs).values()
    glance += [f"prediction: {prediction_text(p)}" for p in inputs.predictions]
    return OverviewSection(facts=facts, stage_times=stage_times, glance=glance)


def _catalog(inputs: ReportInputs, scratch: Path) -> CatalogSection | Notice:
    from brainiac.platform.catalog import Catalog

    if not inputs.catalog_uri:
        return _not_run("no catalog was given")
    catalog = Catalog.open(inputs.catalog_uri, inputs.catalog_options or None)
    scans = catalog.table("scans")
    if scans is None:
        return _not_run(
            f"the catalog {redact_uri_credentials(inputs.catalog_uri)} has no scans table (ingest did not run)"
        )
    current = "FROM scans WHERE status = 'current'"
    totals = catalog.sql(
        f"SELECT count(*) AS scans, count(DISTINCT subject_id) AS subjects, count(DISTINCT dataset) AS datasets {current}"
    ).to_pylist()[0]
    by_seq = catalog.sql(f"SELECT dataset, sequence, count(*) AS n {current} GROUP BY dataset, sequence").to_pylist()
    by_ds = catalog.sql(
        f"SELECT dataset, count(DISTINCT subject_id) AS subjects, count(*) AS scans {current} GROUP BY dataset "
        "ORDER BY dataset"
    ).to_pylist()
    sequences = sorted({str(r["sequence"]) for r in by_seq})
    counts = {(r["dataset"], str(r["sequence"])): r["n"] for r in by_seq}
    rows = [
        [d["dataset"], d["subjects"], d["scans"], *(counts.get((d["dataset"], s), 0) for s in sequences)] for d in by_ds
    ]
    try:
        from brainiac.ingestion.catalog_stats import plot_overview

        overview: Figure | Notice = _figure_file(
            plot_overview(catalog, scratch / "catalog_overview.png"),
            "catalog overview",
            "Scans per dataset and sequence, age at scan, voxel spacing and volume shapes.",
        )
    except Exception as exc:  # the counts stand on their own
        overview = _error("overview plot", exc)
    return CatalogSection(
        scans=totals["scans"],
        subjects=totals["subjects"],
        datasets=totals["datasets"],
        table_version=scans.version(),
        counts=_table(["dataset", "subjects", "scans", *sequences], rows, numeric=range(1, 3 + len(sequences))),
        overview=overview,
    )


def _history(client, run_id: str, keys: Sequence[str]) -> list[tuple[int, float]]:
    """(step, value) of the first of ``keys`` the run logged, one point per step."""
    for key in keys:
        points = client.get_metric_history(run_id, key)
        if points:
            return sorted({m.step: m.value for m in points}.items())
    return []


def _pretraining(inputs: ReportInputs, _scratch: Path) -> PretrainingSection | Notice:
    p = inputs.pretrain
    if not p:
        return _not_run("no pretraining summary was given")
    pairs = int(p.get("eval_pairs") or 0)
    facts = _pairs(
        [
            ["MLflow run", p.get("mlflow_run_id") or "–"],
            ["steps", _num(p.get("steps"))],
            ["final NT-Xent loss", _num(p.get("final_loss"))],
            ["throughput", f"{_num(p['samples_per_s'])} samples/s" if _finite(p.get("samples_per_s")) else "–"],
            ["data-wait fraction", _num(p.get("data_wait_fraction"))],
            ["held-out positive-pair top-1, pretrained", _num(p.get("eval_top1"))],
            ["held-out positive-pair top-1, random-init encoder", _num(p.get("eval_top1_random"))],
            ["held-out pairs (chance = 1 / pairs)", f"{pairs} (chance {_num(1 / pairs) if pairs else '–'})"],
            ["failures recovered", _num(p.get("failures"))],
            ["registered encoder", f"{p.get('model_uri') or '–'} (version {p.get('model_version') or '–'})"],
            ["wall time", duration(p.get("seconds"))],
        ]
    )
    return PretrainingSection(facts=facts, curves=_pretraining_curves(p, inputs.tracking_uri, pairs))


def _pretraining_curves(p: Mapping[str, Any], uri: str | None, pairs: int) -> Figure | Notice:
    """Loss and top-1 per step from the run's metric history, with the held-out top-1 values and chance."""
    from matplotlib.ticker import MaxNLocator

    run_id = p.get("mlflow_run_id")
    if not (run_id and uri):
        return _not_run("no MLflow run to read the loss curve from")
    try:
        client = _mlflow_client(uri)
        loss = _history(client, run_id, ("train/loss", "loss"))
        top1 = _history(client, run_id, ("train/top1", "top1"))
    except Exception as exc:
        return _error("metric history", exc)
    if not loss and not top1:
        return _not_run(f"run {run_id} logged no loss or top-1 history")
    fig = _new_figure(10, 3.3)
    ax_loss, ax_top1 = fig.subplots(1, 2)
    if loss:
        ax_loss.plot(*zip(*loss, strict=True), marker=".", color="#2760a8")
    ax_loss.set(title="NT-Xent loss (training batches)", xlabel="step", ylabel="loss")
    if top1:
        ax_top1.plot(*zip(*top1, strict=True), marker=".", color="#2760a8", label="training batch top-1")
    last = max((s for s, _ in loss + top1), default=0)
    for key, label, colour in (
        ("eval_top1", "held-out, pretrained", "#17753a"),
        ("eval_top1_random", "held-out, random init", "#b3261e"),
    ):
        if _finite(p.get(key)):
            ax_top1.scatter([last], [p[key]], s=60, zorder=3, color=colour, label=label)
    if pairs:
        ax_top1.axhline(1 / pairs, ls=":", color="gray", label="chance (held-out)")
    ax_top1.set(title="positive-pair retrieval top-1", xlabel="step", ylim=(0, 1.02))
    ax_top1.legend(fontsize=8, loc="best")
    for ax in (ax_loss, ax_top1):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _figure_drawn(fig, "pretraining curves", f"From MLflow run {run_id}.")


def _finetune_plot(rows: list[dict[str, Any]]) -> Figure | None:
    """One panel per (task, metric): every sweep's test mean with its 95 % CI."""
    panels = [
        (t, m)
        for t in dict.fromkeys(r["task"] for r in rows)
        for m in dict.fromkeys(m for r in rows if r["task"] == t for m in r.get("test", {}))
    ]
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = _new_figure(3.0 * cols, 1.9 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (task, metric) in zip(axes, panels, strict=False):
        sweeps = [r for r in rows if r["task"] == task and metric in r.get("test", {})]
        for y, r in enumerate(sweeps):
            v = r["test"][metric]
            colour = "#8a8f98" if _is_scratch(r) else "#2760a8"
            if _finite(v.get("low")) and _finite(v.get("high")):
                ax.plot([v["low"], v["high"]], [y, y], color=colour, lw=2)
            ax.scatter([v.get("mean", math.nan)], [y], color=colour, zorder=3)
        ax.set_yticks(range(len(sweeps)), [_arm(r) for r in sweeps], fontsize=8)
        ax.set_ylim(-0.7, len(sweeps) - 0.3)
        arrow = "↑" if _higher_is_better(metric) else "↓"
        ax.set_title(f"{task}: {metric} {arrow}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="x")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _figure_drawn(fig, "fine-tuning results", "Grey: trained from scratch; blue: from the pretrained encoder.")


def _finetuning(inputs: ReportInputs, _scratch: Path) -> FinetuningSection | Notice:
    rows = [r for r in inputs.finetune if r]
    if not rows:
        return _not_run("no fine-tuning sweep was given")
    table = []
    for r in rows:
        test = r.get("test") or {}
        metrics = "; ".join(f"{m} {_ci(v.get('mean'), v.get('low'), v.get('high'))}" for m, v in test.items())
        cases = " / ".join(f"{k} {v}" for k, v in (r.get("cases") or {}).items())
        model = f"{r.get('model_uri') or '–'}" + (f" (v{r['model_version']})" if r.get("model_version") else "")
        table.append(
            [r.get("task"), _arm(r), r.get("regime", "–"), cases or "–", _num(r.get("trials")), metrics or "–", model]
        )
    comparison = _pretrained_vs_scratch(rows)
    return FinetuningSection(
        sweeps=_table(
            ["task", "initialisation", "regime", "cases", "trials", "test metrics (95 % CI)", "model"], table
        ),
        comparison=_table(
            ["task", "regime", "metric", "scratch", "pretrained", "Δ (pretrained − scratch)", "verdict"],
            comparison,
            numeric=(5,),
        )
        if comparison
        else None,
        results=_finetune_plot(rows),
    )


def _pretrained_vs_scratch(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Per (task, regime) with a scratch sweep: each pretrained sweep's metric against scratch, and which is better."""
    comparison = []
    for task, regime in dict.fromkeys((r.get("task"), r.get("regime")) for r in rows):
        group = [r for r in rows if r.get("task") == task and r.get("regime") == regime]
        scratch = next((r for r in group if _is_scratch(r)), None)
        if scratch is None:
            continue
        for pre in (r for r in group if not _is_scratch(r)):
            for metric, v in (pre.get("test") or {}).items():
                s = (scratch.get("test") or {}).get(metric)
                if not s or not (_finite(s.get("mean")) and _finite(v.get("mean"))):
                    continue
                delta = float(v["mean"]) - float(s["mean"])
                better = (delta > 0) == _higher_is_better(metric) if delta else None
                overlap = (
                    _finite(v.get("low"))
                    and _finite(s.get("high"))
                    and not (float(v["low"]) > float(s["high"]) or float(s["low"]) > float(v["high"]))
                )
                verdict = "equal" if better is None else ("pretrained better" if better else "scratch better")
                verdict += " (CIs overlap)" if overlap else ""
                comparison.append(
                    [
                        str(task),
                        str(regime),
                        metric,
                        _ci(s.get("mean"), s.get("low"), s.get("high")),
                        f"{_arm(pre)}: {_ci(v.get('mean'), v.get('low'), v.get('high'))}",
                        f"{delta:+.3g}",
                        verdict,
                    ]
                )
    return comparison


def _spec_for(task: str, rows: Sequence[Mapping[str, Any]]):
    """The task's spec, or a stand-in naming the metrics the rows carry (a task the registry no longer knows)."""
    from brainiac.models.tasks.spec import task_spec
    from brainiac.platform.errors import UserError

    try:
        return task_spec(task)
    except UserError:
        metrics = list(dict.fromkeys(k for r in rows for k in r if k not in ("artifact", "strength")))
        return SimpleNamespace(name=task, metrics=metrics)


def _robustness(inputs: ReportInputs, scratch: Path) -> RobustnessSection | Notice:
    evaluations = [e for e in inputs.evaluations if e]
    if not evaluations:
        return _not_run("no model was evaluated")
    from brainiac.models.tasks.robustness import robustness_plot

    models = []
    for i, ev in enumerate(evaluations):
        task = str(ev.get("task", "?"))
        metrics = ev.get("metrics") or {}
        rows = ev.get("robustness") or []
        curves: Figure | Notice = _not_run("robustness was not evaluated for this model")
        worst_drops = None
        if rows:
            spec = _spec_for(task, rows)
            png = robustness_plot(rows, spec, scratch / f"robustness_{i}.png")
            curves = _figure_file(png, f"robustness of {task}", f"Metric against artifact strength, {task}.")
            worst_drops = _worst_drops(rows, list(spec.metrics))
        models.append(
            RobustnessModel(
                task=task,
                version=str(ev.get("version", "?")),
                test_cases=str(ev.get("test_cases", "?")),
                metrics=_table(["metric", "test value [95 % CI]"], [[m, _ci_of(v)] for m, v in metrics.items()])
                if metrics
                else None,
                curves=curves,
                worst_drops=worst_drops,
            )
        )
    return RobustnessSection(models)


def _worst_drops(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> Table | None:
    """Per artifact: the first metric at the strongest setting and its change from the clean input."""
    if not metrics:
        return None
    metric = metrics[0]
    clean = next((r.get(metric) for r in rows if float(r.get("strength", 1)) == 0.0), None)
    table = []
    for name in dict.fromkeys(str(r["artifact"]) for r in rows):
        strongest = max((r for r in rows if r["artifact"] == name), key=lambda r: float(r["strength"]))
        value = strongest.get(metric)
        change = f"{float(value) - float(clean):+.3g}" if _finite(value) and _finite(clean) else "–"
        table.append([name, _num(strongest["strength"]), _num(value), change])
    return _table(["artifact", "strongest setting", metric, "change from clean"], table, numeric=(1, 2, 3))


def _download(**kwargs: Any) -> str:
    """``mlflow.artifacts.download_artifacts`` without its progress bar (it would break up the terminal summary)."""
    import os

    import mlflow.artifacts

    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        return mlflow.artifacts.download_artifacts(**kwargs)
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _saliency(inputs: ReportInputs, scratch: Path) -> SaliencySection | Notice:
    evaluations = [e for e in inputs.evaluations if e and e.get("saliency_pngs")]
    if not evaluations:
        return _not_run("no evaluation produced saliency overlays")
    if not inputs.tracking_uri:
        return _not_run("no MLflow tracking URI to fetch the overlays from")
    models = []
    for i, ev in enumerate(evaluations):
        task, run_id = str(ev.get("task", "?")), ev.get("mlflow_run_id")
        ratio = ev.get("saliency_mass_ratio")
        overlays: list[Figure | Notice] | Notice = _not_run("the evaluation has no MLflow run")
        if run_id:
            overlays = []
            for artifact in ev["saliency_pngs"]:
                try:
                    local = _download(
                        run_id=run_id,
                        artifact_path=artifact,
                        dst_path=str(scratch / f"saliency_{i}"),
                        tracking_uri=inputs.tracking_uri,
                    )
                    overlays.append(_figure_file(Path(local), f"saliency {task}", artifact))
                except Exception as exc:
                    overlays.append(_error(f"artifact {artifact}", exc))
        models.append(
            SaliencyModel(
                task=task,
                version=str(ev.get("version", "?")),
                region=str(ev.get("saliency_region") or "region"),
                mass_ratio=_num(ratio) if _finite(ratio) else None,
                overlays=overlays,
            )
        )
    return SaliencySection(models)


def _aliases_text(aliases: Mapping[str, str]) -> str:
    order = sorted(aliases, key=lambda a: (ALIAS_ORDER.index(a) if a in ALIAS_ORDER else len(ALIAS_ORDER), a))
    return ", ".join(f"{a} → v{aliases[a]}" for a in order) or "none"


def _registry(inputs: ReportInputs, _scratch: Path) -> RegistrySection | Notice:
    if not inputs.tracking_uri and not inputs.promotions:
        return _not_run("no MLflow registry was given")
    live: list[RegisteredModel] | Notice | None = None
    if inputs.tracking_uri:
        try:
            live = _live_registry(inputs.tracking_uri)
        except Exception as exc:
            live = _error("the registry", exc)
    decisions = [_decision(d) for d in inputs.promotions] or _not_run("no promotion was attempted")
    return RegistrySection(live=live, decisions=decisions)


def _live_registry(uri: str) -> list[RegisteredModel] | Notice:
    client = _mlflow_client(uri)
    models = sorted(
        (
            m
            for m in client.search_registered_models(filter_string="name LIKE 'brainiac-%'")
            if m.name.startswith("brainiac-")
        ),
        key=lambda m: m.name,
    )
    if not models:
        return _not_run("no model named brainiac-* is registered")
    out = []
    for model in models:
        aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():  # version search results carry no aliases on every store
            by_version.setdefault(version, []).append(alias)
        versions = sorted(client.search_model_versions(f"name = '{model.name}'"), key=lambda v: -int(v.version))
        rows = []
        for v in versions[:REGISTRY_VERSIONS_SHOWN]:
            created = datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M")
            tags = v.tags or {}
            rows.append(
                [
                    f"v{v.version}",
                    ", ".join(sorted(set(v.aliases or []) | set(by_version.get(str(v.version), [])))) or "–",
                    tags.get("task", "–"),
                    created,
                    tags.get("promotion.decision", "–"),
                    tags.get("promotion.reasons", "–"),
                    v.run_id or "–",
                ]
            )
        out.append(
            RegisteredModel(
                name=model.name,
                aliases=_aliases_text(aliases),
                versions=_table(
                    ["version", "aliases", "task", "created (UTC)", "promotion", "reasons", "source run"], rows
                ),
                older=max(0, len(versions) - REGISTRY_VERSIONS_SHOWN),
            )
        )
    return out


def _decision(d: Mapping[str, Any]) -> Decision:
    verdict = "promoted to champion" if d.get("promoted") else ("passed (dry run)" if d.get("passed") else "rejected")
    against = f"champion v{d['champion_version']}" if d.get("champion_version") else "no champion (first promotion)"
    if not d.get("champion_version") and d.get("baseline"):
        against += f", the trivial baseline: {d['baseline']}"
    metrics = d.get("metrics") or {}
    names = list(dict.fromkeys(m for role in metrics.values() for m in role))
    imp = d.get("improvement")
    return Decision(
        heading=f"{d.get('model_name', '?')} v{d.get('candidate_version', '?')} against {against}: {verdict}",
        gates=[
            Gate(str(c.get("name", "?")), bool(c.get("passed")), str(c.get("detail", ""))) for c in d.get("checks", [])
        ],
        metrics=_table(
            ["model", *names], [[role, *(_ci_of(values.get(m)) for m in names)] for role, values in metrics.items()]
        )
        if names
        else None,
        primary_metric=str(d.get("primary_metric")),
        improvement=_ci_of(imp) if imp else None,
        mlflow_run_id=d.get("mlflow_run_id") or None,
    )


def _prediction(inputs: ReportInputs, _scratch: Path) -> PredictionSection | Notice:
    if not inputs.predictions:
        return _not_run("no prediction was made")
    return PredictionSection(
        [
            Prediction(
                headline=prediction_text(p),
                details=_pairs(
                    [k, v if isinstance(v, str) else _json(v)] for k, v in p.items() if k not in ("text", "headline")
                ),
            )
            for p in inputs.predictions
        ]
    )


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str, sort_keys=True) if isinstance(value, dict | list | tuple) else _num(value)


def _reproduce(inputs: ReportInputs, _scratch: Path) -> ReproduceSection:
    catalog_queries = None
    if inputs.catalog_uri:
        sql = (
            "SELECT dataset, sequence, count(*) AS scans FROM scans WHERE status = 'current' "
            "GROUP BY dataset, sequence ORDER BY dataset, sequence"
        )
        shown_catalog = redact_uri_credentials(inputs.catalog_uri)  # a password never reaches the page
        catalog_queries = (
            f"brainiac catalog query {shlex.quote(sql)} --catalog {shlex.quote(shown_catalog)}\n"
            f"brainiac catalog stats --catalog {shlex.quote(shown_catalog)}"
        )
    return ReproduceSection(
        commands=list(inputs.commands) or _not_run("no stage commands were recorded"),
        mlflow_ui=f"mlflow ui --backend-store-uri {shlex.quote(redact_uri_credentials(inputs.tracking_uri))}"
        if inputs.tracking_uri
        else None,
        catalog_queries=catalog_queries,
    )


GATHERERS: dict[str, Callable[[ReportInputs, Path], Any]] = {
    "overview": _overview,
    "catalog": _catalog,
    "pretraining": _pretraining,
    "finetuning": _finetuning,
    "robustness": _robustness,
    "saliency": _saliency,
    "registry": _registry,
    "prediction": _prediction,
    "reproduce": _reproduce,
}
"""Section id → the function that reads its sources."""


def gather(inputs: ReportInputs) -> ReportData:
    """Read every section's sources (the catalog, MLflow runs, artifacts and the registry) into :class:`ReportData`.

    A section whose source fails (an unreachable MLflow, a broken catalog) becomes an error :class:`Notice` instead of
    stopping the report: the report is the last thing a long run writes.
    """
    sections: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="brainiac-report-") as folder:
        for sid, title in SECTIONS:
            scratch = Path(folder) / sid
            scratch.mkdir()
            try:
                sections[sid] = GATHERERS[sid](inputs, scratch)
            except Exception as exc:  # one broken source must not cost the whole report
                # The message only, credentials redacted: a traceback would carry URIs as the sources gave them.
                log.warning("report section %s failed: %s", sid, redact_uri_credentials(f"{type(exc).__name__}: {exc}"))
                sections[sid] = _error(title, exc)
    return ReportData(title=inputs.title, created_at=inputs.created_at, **sections)
