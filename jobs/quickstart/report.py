"""The quickstart's report: one self-contained HTML page a researcher can show their PI, and the terminal summary.

:func:`write_report` turns plain data (the summaries the jobs return, see :class:`ReportInputs`) into ``report.html``
with every figure embedded as a base64 PNG and the CSS inline, so the file can be mailed or opened offline. Figures
that live elsewhere are fetched while writing: the catalog overview from the catalog itself, the pretraining curves
from the MLflow run's metric history, the saliency overlays from the evaluation runs' artifacts, and the registry's
versions and aliases live from MLflow. Every section is always there: one whose input is missing says "not run", and
one whose source fails says why in one line, so a report is still written after a long pipeline whatever went wrong.
:func:`summary_lines` is the one-screen terminal summary of the same inputs.
"""

from __future__ import annotations

import base64
import contextlib
import html
import logging
import math
import shlex
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

__all__ = ["SECTIONS", "ReportInputs", "summary_lines", "write_report"]

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
"""(stable id, heading) of every section, in page order; the ids are the page's anchors."""

DPI = 100
"""Resolution of the figures drawn here: enough for a screen, small enough to keep the page light."""

ALIAS_ORDER = ("champion", "previous", "challenger", "candidate")

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a; margin: 0;
       background: #f5f6f8; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #dde3ea; }
h3 { font-size: 16px; margin: 22px 0 6px; }
h4 { font-size: 14.5px; margin: 16px 0 4px; }
nav a { margin-right: 14px; color: #2760a8; text-decoration: none; }
.meta { color: #5b6775; font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13.5px; }
th, td { border: 1px solid #dde3ea; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f0f3f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #e6eaef; margin: 6px 0; }
pre, code { font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }
pre { background: #f3f5f8; padding: 8px 10px; overflow-x: auto; white-space: pre-wrap; margin: 4px 0 10px; }
.not-run { color: #8a5a00; background: #fff6e0; padding: 6px 10px; border-left: 4px solid #e0a800; }
.error { color: #8c1d18; background: #fdecea; padding: 6px 10px; border-left: 4px solid #d93025; }
.pass { color: #17753a; font-weight: 600; }
.fail { color: #b3261e; font-weight: 600; }
.headline { font-size: 16px; font-weight: 600; background: #eef5ff; padding: 8px 12px; border-radius: 4px; }
figure { margin: 8px 0 16px; }
figcaption { color: #5b6775; font-size: 13px; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.gallery figure { flex: 1 1 480px; }
"""


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


class Markup(str):
    """Text that is already HTML (built here from escaped parts) and must not be escaped again."""


def _e(value: Any) -> str:
    return value if isinstance(value, Markup) else html.escape(str(value), quote=True)


def _join(parts: Iterable[str]) -> Markup:
    return Markup("".join(_e(p) for p in parts))


def _tag(name: str, content: Any = "", **attrs: str) -> Markup:
    attributes = "".join(f' {k.rstrip("_")}="{html.escape(str(v), quote=True)}"' for k, v in attrs.items())
    return Markup(f"<{name}{attributes}>{_e(content)}</{name}>")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> Markup:
    head = _tag("tr", _join(_tag("th", h) for h in header))
    body = [
        _tag("tr", _join(_tag("td", c, class_="num") if i in numeric else _tag("td", c) for i, c in enumerate(row)))
        for row in rows
    ]
    return _tag("table", _join([_tag("thead", head), _tag("tbody", _join(body))]))


def _pairs(rows: Iterable[Sequence[Any]]) -> Markup:
    """A two-column name → value table."""
    return _tag("table", _join(_tag("tr", _join([_tag("th", k), _tag("td", v)])) for k, v in rows))


def _not_run(why: str) -> Markup:
    return _tag("p", f"not run — {why}", class_="not-run")


def _error(what: str, exc: BaseException) -> Markup:
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return _tag("p", f"{what} unavailable: {type(exc).__name__}: {line}", class_="error")


def _img(png: Path, alt: str, caption: str = "") -> Markup:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    image = Markup(f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}">')
    return _tag("figure", _join([image, _tag("figcaption", caption) if caption else ""]))


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


def _finite(value: Any) -> bool:
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


def _figure(width: float, height: float):
    """A pyplot-free Agg figure (no global state, safe in any thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def _mlflow_client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)


# ----------------------------------------------------------------------------------------------------------------------
# Small facts shared by the page and the terminal summary.


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


def _pretrain_line(p: Mapping[str, Any]) -> str:
    return (
        f"pretraining: {p.get('steps', 0)} steps, final loss {_num(p.get('final_loss'))}, held-out top-1 "
        f"{_num(p.get('eval_top1'))} vs {_num(p.get('eval_top1_random'))} with random-init weights"
    )


def _prediction_text(p: Mapping[str, Any]) -> str:
    if p.get("text") or p.get("headline"):
        return str(p.get("text") or p.get("headline"))
    value = f"{_num(p.get('value'))} {p.get('units', '')}".strip()
    return f"{p.get('input', '?')}: {value}"


def summary_lines(inputs: ReportInputs, report_path: Path | str | None = None) -> list[str]:
    """The one-screen terminal summary: time per stage, pretraining, the champion of every task with its metric, the
    prediction and where the report is (``report_path``, else ``report.html`` in ``inputs.workdir`` if it exists)."""
    lines = [f"{inputs.title} — {duration(inputs.total_seconds)} in all"]
    width = max((len(s) for s in inputs.stage_seconds), default=0)
    lines += [f"  {stage:<{width}}  {duration(sec):>12}" for stage, sec in inputs.stage_seconds.items()]
    if inputs.pretrain:
        lines.append(_pretrain_line(inputs.pretrain))
    champions = _champions(inputs)
    tasks = list(dict.fromkeys([*(str(r.get("task")) for r in inputs.finetune), *champions]))
    if tasks:
        lines.append("champions:")
        for task in tasks:
            if task in champions:
                lines.append("  " + _champion_line(task, champions[task]))
            else:
                lines.append(f"  {task}: fine-tuned, not promoted")
    lines += [f"prediction: {_prediction_text(p)}" for p in inputs.predictions]
    if report_path is None and inputs.workdir and (Path(inputs.workdir) / "report.html").is_file():
        report_path = Path(inputs.workdir) / "report.html"
    if report_path is not None:
        lines.append(f"report: {report_path}")
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# Sections. Each returns the body under its heading.


def _overview(inputs: ReportInputs, _tmp: Path) -> Markup:
    meta = _pairs(
        [
            ["created", inputs.created_at],
            ["working directory", inputs.workdir or "–"],
            ["catalog", inputs.catalog_uri or "–"],
            ["MLflow tracking", inputs.tracking_uri or "–"],
            ["total time", duration(inputs.total_seconds)],
        ],
    )
    parts: list[str] = [meta]
    if inputs.stage_seconds:
        total = sum(inputs.stage_seconds.values()) or 1.0
        rows = [[s, duration(v), f"{100 * v / total:.0f} %"] for s, v in inputs.stage_seconds.items()]
        parts += [_tag("h3", "Time per stage"), _table(["stage", "wall time", "share"], rows, numeric=(1, 2))]
    glance = [_pretrain_line(inputs.pretrain)] if inputs.pretrain else []
    glance += [_champion_line(t, c) for t, c in _champions(inputs).items()]
    glance += [f"prediction: {_prediction_text(p)}" for p in inputs.predictions]
    if glance:
        parts += [_tag("h3", "At a glance"), _tag("ul", _join(_tag("li", g) for g in glance))]
    return _join(parts)


def _catalog(inputs: ReportInputs, tmp: Path) -> Markup:
    from brainiac.platform.catalog import Catalog

    if not inputs.catalog_uri:
        return _not_run("no catalog was given")
    catalog = Catalog.open(inputs.catalog_uri, inputs.catalog_options or None)
    if catalog.table("scans") is None:
        return _not_run(f"the catalog {inputs.catalog_uri} has no scans table (ingest did not run)")
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
    parts: list[str] = [
        _tag(
            "p",
            f"{totals['scans']} current scans of {totals['subjects']} pseudonymised subjects in "
            f"{totals['datasets']} datasets (table version {catalog.version('scans')}).",
        ),
        _table(["dataset", "subjects", "scans", *sequences], rows, numeric=range(1, 3 + len(sequences))),
    ]
    try:
        from brainiac.platform.catalog_stats import plot_overview

        png = plot_overview(catalog, tmp / "catalog_overview.png")
        parts.append(
            _img(
                png, "catalog overview", "Scans per dataset and sequence, age at scan, voxel spacing and volume shapes."
            )
        )
    except Exception as exc:  # the counts above stand on their own
        parts.append(_error("overview plot", exc))
    return _join(parts)


def _history(client, run_id: str, keys: Sequence[str]) -> list[tuple[int, float]]:
    """(step, value) of the first of ``keys`` the run logged, one point per step."""
    for key in keys:
        points = client.get_metric_history(run_id, key)
        if points:
            return sorted({m.step: m.value for m in points}.items())
    return []


def _pretraining(inputs: ReportInputs, tmp: Path) -> Markup:
    from matplotlib.ticker import MaxNLocator

    p = inputs.pretrain
    if not p:
        return _not_run("no pretraining summary was given")
    pairs = int(p.get("eval_pairs") or 0)
    rows = [
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
    parts: list[str] = [
        _tag(
            "p",
            "SimCLR on two augmented views of each scan. Retrieval top-1: how often a view's nearest neighbour among "
            "the other views is its own partner; the held-out value is measured on subjects never trained on, for the "
            "trained encoder and for the same architecture at its initial weights.",
        ),
        _pairs(rows),
    ]
    run_id, uri = p.get("mlflow_run_id"), inputs.tracking_uri
    if not (run_id and uri):
        parts.append(_not_run("no MLflow run to read the loss curve from"))
        return _join(parts)
    try:
        client = _mlflow_client(uri)
        loss = _history(client, run_id, ("train/loss", "loss"))
        top1 = _history(client, run_id, ("train/top1", "top1"))
    except Exception as exc:
        parts.append(_error("metric history", exc))
        return _join(parts)
    if not loss and not top1:
        parts.append(_not_run(f"run {run_id} logged no loss or top-1 history"))
        return _join(parts)
    fig = _figure(10, 3.3)
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
    fig.savefig(tmp / "pretraining.png", dpi=DPI)
    parts.append(_img(tmp / "pretraining.png", "pretraining curves", f"From MLflow run {run_id}."))
    return _join(parts)


def _finetune_plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
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
    fig = _figure(3.0 * cols, 1.9 * nrows)
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
    fig.savefig(path, dpi=DPI)
    return path


def _finetuning(inputs: ReportInputs, tmp: Path) -> Markup:
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
    parts: list[str] = [
        _tag(
            "p",
            "Test-split metrics: the mean over seeds of each seed's test value, with the 95 % subject-level bootstrap "
            "interval of that same mean. "
            "Arrows in the figure show which direction is better.",
        ),
        _table(["task", "initialisation", "regime", "cases", "trials", "test metrics (95 % CI)", "model"], table),
    ]
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
                        task,
                        regime,
                        metric,
                        _ci(s.get("mean"), s.get("low"), s.get("high")),
                        f"{_arm(pre)}: {_ci(v.get('mean'), v.get('low'), v.get('high'))}",
                        f"{delta:+.3g}",
                        verdict,
                    ]
                )
    if comparison:
        parts += [
            _tag("h3", "Pretrained vs scratch"),
            _table(
                ["task", "regime", "metric", "scratch", "pretrained", "Δ (pretrained − scratch)", "verdict"],
                comparison,
                numeric=(5,),
            ),
        ]
    png = _finetune_plot(rows, tmp / "finetuning.png")
    if png is not None:
        parts.append(_img(png, "fine-tuning results", "Grey: trained from scratch; blue: from the pretrained encoder."))
    return _join(parts)


def _spec_for(task: str, rows: Sequence[Mapping[str, Any]]):
    """The task's spec, or a stand-in naming the metrics the rows carry (a task the registry no longer knows)."""
    from brainiac.models.tasks.spec import task_spec
    from brainiac.platform.errors import UserError

    try:
        return task_spec(task)
    except UserError:
        metrics = list(dict.fromkeys(k for r in rows for k in r if k not in ("artifact", "strength")))
        return SimpleNamespace(name=task, metrics=metrics)


def _robustness(inputs: ReportInputs, tmp: Path) -> Markup:
    evaluations = [e for e in inputs.evaluations if e]
    if not evaluations:
        return _not_run("no model was evaluated")
    from brainiac.models.tasks.robustness import robustness_plot

    parts: list[str] = [
        _tag(
            "p",
            "Each model's test metrics on clean inputs (95 % bootstrap CI over test cases), then under MRI artifacts "
            "of increasing strength (contrast, bias field, Gibbs ringing, Rician noise, motion ghosting, resolution "
            "drop); strength 0 is the clean input.",
        )
    ]
    for i, ev in enumerate(evaluations):
        task = str(ev.get("task", "?"))
        parts.append(_tag("h3", f"{task} · version {ev.get('version', '?')} · {ev.get('test_cases', '?')} test cases"))
        metrics = ev.get("metrics") or {}
        if metrics:
            parts.append(_table(["metric", "test value [95 % CI]"], [[m, _ci_of(v)] for m, v in metrics.items()]))
        rows = ev.get("robustness") or []
        if not rows:
            parts.append(_not_run("robustness was not evaluated for this model"))
            continue
        spec = _spec_for(task, rows)
        png = robustness_plot(rows, spec, tmp / f"robustness_{i}.png")
        parts.append(_img(png, f"robustness of {task}", f"Metric against artifact strength, {task}."))
        parts.append(_worst_drops(rows, list(spec.metrics)))
    return _join(parts)


def _worst_drops(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> Markup:
    """Per artifact: the first metric at the strongest setting and its change from the clean input."""
    if not metrics:
        return Markup("")
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


def _saliency(inputs: ReportInputs, tmp: Path) -> Markup:
    evaluations = [e for e in inputs.evaluations if e and e.get("saliency_pngs")]
    if not evaluations:
        return _not_run("no evaluation produced saliency overlays")
    if not inputs.tracking_uri:
        return _not_run("no MLflow tracking URI to fetch the overlays from")
    parts: list[str] = [
        _tag(
            "p",
            "Occlusion saliency over a few test cases: where hiding the image changes the prediction most. On tasks "
            "whose signal has a known place (the tumour for idh and survival, the hippocampus for mci) the mass ratio "
            "compares the saliency inside it with random regions of the same size (above 1: the model looks there).",
        )
    ]
    for i, ev in enumerate(evaluations):
        task, run_id = str(ev.get("task", "?")), ev.get("mlflow_run_id")
        ratio = ev.get("saliency_mass_ratio")
        heading = f"{task} · version {ev.get('version', '?')}"
        region = ev.get("saliency_region") or "region"
        parts.append(_tag("h3", heading + (f" · {region} mass ratio {_num(ratio)}" if _finite(ratio) else "")))
        if not run_id:
            parts.append(_not_run("the evaluation has no MLflow run"))
            continue
        figures = []
        for artifact in ev["saliency_pngs"]:
            try:
                local = _download(
                    run_id=run_id,
                    artifact_path=artifact,
                    dst_path=str(tmp / f"saliency_{i}"),
                    tracking_uri=inputs.tracking_uri,
                )
                figures.append(_img(Path(local), f"saliency {task}", artifact))
            except Exception as exc:
                figures.append(_error(f"artifact {artifact}", exc))
        parts.append(_tag("div", _join(figures), class_="gallery"))
    return _join(parts)


def _aliases_text(aliases: Mapping[str, str]) -> str:
    order = sorted(aliases, key=lambda a: (ALIAS_ORDER.index(a) if a in ALIAS_ORDER else len(ALIAS_ORDER), a))
    return ", ".join(f"{a} → v{aliases[a]}" for a in order) or "none"


def _registry(inputs: ReportInputs, _tmp: Path) -> Markup:
    if not inputs.tracking_uri and not inputs.promotions:
        return _not_run("no MLflow registry was given")
    parts: list[str] = []
    if inputs.tracking_uri:
        try:
            parts += _live_registry(inputs.tracking_uri)
        except Exception as exc:
            parts.append(_error("the registry", exc))
    if inputs.promotions:
        parts.append(_tag("h3", "Promotion decisions of this run"))
        parts += [_decision(d) for d in inputs.promotions]
    else:
        parts.append(_not_run("no promotion was attempted"))
    return _join(parts)


def _live_registry(uri: str) -> list[str]:
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
        return [_not_run("no model named brainiac-* is registered")]
    parts: list[str] = [
        _tag("p", "Every registered brainiac-* model as the registry holds it now, newest version first.")
    ]
    for model in models:
        aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():  # version search results carry no aliases on every store
            by_version.setdefault(version, []).append(alias)
        versions = sorted(client.search_model_versions(f"name = '{model.name}'"), key=lambda v: -int(v.version))
        rows = []
        for v in versions[:20]:
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
        parts += [
            _tag("h3", model.name),
            _tag("p", f"aliases: {_aliases_text(aliases)}"),
            _table(["version", "aliases", "task", "created (UTC)", "promotion", "reasons", "source run"], rows),
        ]
        if len(versions) > 20:
            parts.append(_tag("p", f"… and {len(versions) - 20} older versions.", class_="meta"))
    return parts


def _decision(d: Mapping[str, Any]) -> Markup:
    verdict = "promoted to champion" if d.get("promoted") else ("passed (dry run)" if d.get("passed") else "rejected")
    against = f"champion v{d['champion_version']}" if d.get("champion_version") else "no champion (first promotion)"
    if not d.get("champion_version") and d.get("baseline"):
        against += f", the trivial baseline: {d['baseline']}"
    head = f"{d.get('model_name', '?')} v{d.get('candidate_version', '?')} against {against}: {verdict}"
    checks = [
        [
            c.get("name", "?"),
            _tag("span", "pass" if c.get("passed") else "FAIL", class_="pass" if c.get("passed") else "fail"),
            c.get("detail", ""),
        ]
        for c in d.get("checks", [])
    ]
    parts: list[str] = [_tag("h4", head), _table(["gate", "result", "detail"], checks)]
    metrics = d.get("metrics") or {}
    names = list(dict.fromkeys(m for role in metrics.values() for m in role))
    if names:
        rows = [[role, *(_ci_of(values.get(m)) for m in names)] for role, values in metrics.items()]
        parts.append(_table(["model", *names], rows))
    imp = d.get("improvement")
    if imp:
        parts.append(
            _tag("p", f"paired improvement on {d.get('primary_metric')}: {_ci_of(imp)} (positive = candidate better)")
        )
    if d.get("mlflow_run_id"):
        parts.append(_tag("p", f"decision logged in MLflow run {d['mlflow_run_id']}", class_="meta"))
    return _join(parts)


def _prediction(inputs: ReportInputs, _tmp: Path) -> Markup:
    if not inputs.predictions:
        return _not_run("no prediction was made")
    parts: list[str] = []
    for p in inputs.predictions:
        parts.append(_tag("p", _prediction_text(p), class_="headline"))
        rows = [[k, v if isinstance(v, str) else _json(v)] for k, v in p.items() if k not in ("text", "headline")]
        if rows:
            parts.append(_pairs(rows))
    return _join(parts)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str, sort_keys=True) if isinstance(value, dict | list | tuple) else _num(value)


def _reproduce(inputs: ReportInputs, _tmp: Path) -> Markup:
    parts: list[str] = []
    if inputs.commands:
        parts.append(_tag("p", "Each stage of this run, as a command that repeats it:"))
        for stage, command in inputs.commands:
            parts += [_tag("h3", stage), _tag("pre", command)]
    else:
        parts.append(_not_run("no stage commands were recorded"))
    if inputs.tracking_uri:
        parts += [
            _tag("h3", "Browse runs, metrics and the registry"),
            _tag("pre", f"mlflow ui --backend-store-uri {shlex.quote(inputs.tracking_uri)}"),
        ]
    if inputs.catalog_uri:
        sql = (
            "SELECT dataset, sequence, count(*) AS scans FROM scans WHERE status = 'current' "
            "GROUP BY dataset, sequence ORDER BY dataset, sequence"
        )
        parts += [
            _tag("h3", "Query the catalog"),
            _tag(
                "pre",
                f"brainiac catalog query {shlex.quote(sql)} --catalog {shlex.quote(inputs.catalog_uri)}\n"
                f"brainiac catalog stats --catalog {shlex.quote(inputs.catalog_uri)}",
            ),
        ]
    return _join(parts)


RENDERERS: dict[str, Callable[[ReportInputs, Path], Markup]] = {
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


def _page(inputs: ReportInputs, bodies: Mapping[str, str]) -> str:
    nav = _tag("nav", _join(_tag("a", title, href=f"#{sid}") for sid, title in SECTIONS))
    sections = _join(_tag("section", _join([_tag("h2", title, id=sid), bodies[sid]])) for sid, title in SECTIONS)
    head = _join(
        [
            Markup('<meta charset="utf-8">'),
            Markup('<meta name="viewport" content="width=device-width, initial-scale=1">'),
            _tag("title", inputs.title),
            _tag("style", Markup(CSS)),
        ]
    )
    header = _join([_tag("h1", inputs.title), _tag("p", f"generated {inputs.created_at}", class_="meta"), nav])
    body = _tag("main", _join([header, sections]))
    return f'<!DOCTYPE html>\n<html lang="en">\n{_tag("head", head)}\n{_tag("body", body)}\n</html>\n'


def write_report(path: Path | str, inputs: ReportInputs) -> Path:
    """Write the self-contained HTML report to ``path`` (a folder gets ``report.html``) and return the file.

    A section whose source fails (an unreachable MLflow, a missing artifact) shows the error in one line instead of
    stopping the report: the report is the last thing a long run writes.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "report.html"
    bodies: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="brainiac-report-") as folder:
        for sid, title in SECTIONS:
            tmp = Path(folder) / sid
            tmp.mkdir()
            try:
                bodies[sid] = RENDERERS[sid](inputs, tmp)
            except Exception as exc:  # one broken source must not cost the whole report
                log.warning("report section %s failed: %s", sid, exc, exc_info=True)
                bodies[sid] = _error(title, exc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_page(inputs, bodies), encoding="utf-8")
    return path
