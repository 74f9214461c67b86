"""The model card of a promotion decision: one markdown page with the verdict, every gate's reason, the test metrics
with CIs of the candidate and of what it was compared with (the champion, or a first promotion's trivial baseline),
robustness, lineage and the commands to reproduce or roll back. It is logged as an MLflow artifact and set as the model
version's description, so the registry UI shows why a version is (or is not) champion."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from brainiac.jobs.promote.run import PromotionDecision

__all__ = ["model_card"]


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def _ci(v: dict[str, float] | None) -> str:
    if not v:
        return "–"
    return f"{_fmt(v['value'])} [{_fmt(v['low'])}, {_fmt(v['high'])}]"


def model_card(d: PromotionDecision) -> str:
    """Markdown for ``d``."""
    verdict = "PROMOTED to champion" if d.promoted else ("would be promoted" if d.dry_run and d.passed else "REJECTED")
    champion = f"version {d.champion_version}" if d.champion_version else "no champion (first promotion)"
    if d.baseline:
        champion += f", the trivial baseline: {d.baseline}"
    reference = "champion" if d.champion_version or not d.baseline else "baseline"
    lines = [
        f"# {d.model_name} version {d.candidate_version}: {verdict}",
        "",
        f"*Task* {d.task} · *compared with* {champion} · *decided* {d.decided_at} · *test cases* {d.test_cases}",
        "",
        "## Gates",
        "",
        "| gate | result | why |",
        "| --- | --- | --- |",
        *[f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.detail} |" for c in d.checks],
        "",
        "## Test metrics (95 % bootstrap CI)",
        "",
        f"| metric | candidate | {reference} |",
        "| --- | --- | --- |",
        *[
            f"| {m} | {_ci(d.metrics['candidate'].get(m))} | {_ci(d.metrics.get(reference, {}).get(m))} |"
            for m in d.metrics["candidate"]
        ],
    ]
    if d.improvement:
        imp = d.improvement
        lines += [
            "",
            f"Paired improvement in **{d.primary_metric}** over the {reference}: {imp['value']:+.4g} "
            f"(CI [{_fmt(imp['low'])}, {_fmt(imp['high'])}], positive = better).",
        ]
    if d.robustness:
        lines += ["", "## Robustness (mean over strengths)", "", "| artifact | candidate | champion | change |",
                  "| --- | --- | --- | --- |"]  # fmt: skip
        lines += [
            f"| {a} | {_fmt(r['candidate'])} | {_fmt(r['champion'])} | {r['change']:+.4g} |"
            for a, r in d.robustness.items()
        ]
    lineage = d.lineage
    lines += [
        "",
        "## Lineage",
        "",
        *[f"- **{k}**: {v}" for k, v in lineage.items()],
        "",
        "## Evaluation data",
        "",
        f"- catalog: `{d.catalog}`",
        f"- table versions: {', '.join(f'{k}@{v}' for k, v in sorted(d.table_versions.items()))}",
        f"- preprocess_version: `{d.preprocess_version}`",
        "",
        "## Reproduce",
        "",
        "```",
        f"brainiac promote {d.model_name} --candidate {d.candidate_version} --dry-run "
        + " ".join(f"--set promote.table_versions.{k}={v}" for k, v in sorted(d.table_versions.items())),
        f"brainiac promote {d.model_name} --rollback   # put the previous champion back",
        "```",
        "",
    ]
    return "\n".join(lines)
