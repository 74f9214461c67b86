"""Job: write the synthetic multi-site brain MRI cohort (``brainiac synth``) from a :class:`Config`.

Callable from the CLI, from tests and as ``python -m brainiac.jobs.synth OUT [--config NAME] [--set key=value ...]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brainiac.ingestion.synthetic import CohortSummary, generate_cohort
from brainiac.jobs.config import Config, load_config
from brainiac.platform.errors import UserError

__all__ = ["format_summary", "main", "run"]


def run(cfg: Config, out: Path, *, progress: bool = False) -> CohortSummary:
    """Generate ``cfg.synth.subjects`` subjects over ``cfg.synth.cohorts`` at ``cfg.synth.preset`` with ``cfg.seed`` and
    ``cfg.synth.anatomy_variation``."""
    return generate_cohort(
        Path(out),
        subjects=cfg.synth.subjects,
        seed=cfg.seed,
        preset=cfg.synth.preset,
        cohorts=tuple(cfg.synth.cohorts),
        progress=progress,
        anatomy_variation=cfg.synth.anatomy_variation,
    )


def format_summary(summary: CohortSummary) -> str:
    """Plain-text summary (the CLI renders a rich table with the same content)."""
    lines = [f"{'cohort':<8} {'folder':<22} {'subjects':>8} {'scans':>6} {'files':>6}"]
    for name, folder in summary.cohorts.items():
        c = summary.per_cohort.get(name, {})
        lines.append(f"{name:<8} {folder:<22} {c.get('subjects', 0):>8} {c.get('scans', 0):>6} {c.get('files', 0):>6}")
    lines.append(
        f"{summary.n_subjects} subjects, {summary.n_scans} scans, {summary.n_files} files in {summary.seconds:.1f} s "
        f"-> {summary.out_dir} (truth: {summary.truth})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brainiac.jobs.synth", description=__doc__)
    parser.add_argument("out", type=Path, help="output folder (empty, new, or a previous synth output)")
    parser.add_argument("--config", "-c", default=None, help="shipped config name or YAML path")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = run(cfg, args.out, progress=sys.stderr.isatty())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
