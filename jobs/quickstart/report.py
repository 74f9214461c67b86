"""The quickstart's report: one self-contained HTML page a researcher can show their PI, and the terminal summary.

:func:`write_report` is :func:`~brainiac.jobs.quickstart.report_data.gather` (every read of the catalog and MLflow,
into a :class:`~brainiac.jobs.quickstart.report_data.ReportData`) followed by :func:`render` (a Jinja2 template with
autoescaping, no I/O), so the page can be built and tested from hand-made data without any service. Every figure is
embedded as a base64 PNG and the CSS is inline, so the file can be mailed or opened offline. :func:`summary_lines` is
the one-screen terminal summary of the same inputs.
"""

from __future__ import annotations

import functools
from pathlib import Path

from brainiac.jobs.quickstart.report_data import (
    SECTIONS,
    Notice,
    ReportData,
    ReportInputs,
    champion_lines,
    duration,
    gather,
    prediction_text,
    pretrain_line,
)

__all__ = ["SECTIONS", "ReportData", "ReportInputs", "gather", "render", "summary_lines", "write_report"]

TEMPLATE = "report.html.j2"
"""The page template, shipped in this package's ``templates/`` folder."""


@functools.cache
def _environment():
    """The Jinja2 environment: templates from this package, every value HTML-escaped, a missing field an error."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("brainiac.jobs.quickstart", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.tests["notice"] = lambda value: isinstance(value, Notice)
    return env


def render(data: ReportData) -> str:
    """The report page of ``data``: every section of :data:`SECTIONS` in order, under a navigation bar of anchors."""
    return _environment().get_template(TEMPLATE).render(data=data, sections=SECTIONS)


def write_report(path: Path | str, inputs: ReportInputs) -> Path:
    """Write the self-contained HTML report to ``path`` (a folder gets ``report.html``) and return the file.

    A section whose source fails (an unreachable MLflow, a missing artifact) shows the error in one line instead of
    stopping the report: the report is the last thing a long run writes.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "report.html"
    page = render(gather(inputs))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def summary_lines(inputs: ReportInputs, report_path: Path | str | None = None) -> list[str]:
    """The one-screen terminal summary: time per stage, pretraining, the champion of every task with its metric, the
    prediction and where the report is (``report_path``, else ``report.html`` in ``inputs.workdir`` if it exists)."""
    lines = [f"{inputs.title} — {duration(inputs.total_seconds)} in all"]
    width = max((len(s) for s in inputs.stage_seconds), default=0)
    lines += [f"  {stage:<{width}}  {duration(sec):>12}" for stage, sec in inputs.stage_seconds.items()]
    if inputs.pretrain:
        lines.append(pretrain_line(inputs.pretrain))
    champions = champion_lines(inputs)
    tasks = list(dict.fromkeys([*(str(r.get("task")) for r in inputs.finetune), *champions]))
    if tasks:
        lines.append("champions:")
        lines += [f"  {champions.get(task, f'{task}: fine-tuned, not promoted')}" for task in tasks]
    lines += [f"prediction: {prediction_text(p)}" for p in inputs.predictions]
    if report_path is None and inputs.workdir and (Path(inputs.workdir) / "report.html").is_file():
        report_path = Path(inputs.workdir) / "report.html"
    if report_path is not None:
        lines.append(f"report: {report_path}")
    return lines
