"""``brainiac quickstart``: the whole platform end to end on the embedded defaults, ending in ``report.html``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from brainiac.platform.cli.common import ConfigOption, SetOption, build_config


def quickstart(
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", "-w", help="Where everything goes. Default: ./brainiac-quickstart."),
    ] = None,
    fast: Annotated[
        bool, typer.Option("--fast", help="A ~3-minute smoke run: tiny cohort, few steps, one short trial per task.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip the stages an earlier run in this workdir finished; redo the rest.")
    ] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Run the whole platform on this machine in one command: a synthetic five-site cohort → the Delta Lake catalog →
    preprocessing and subject-level splits → SimCLR pretraining on local Ray → Ray Tune fine-tuning sweeps (sequence,
    brain age and tumour segmentation, brain age also from scratch) → evaluation with CIs, robustness and saliency →
    registry promotion behind gates → predictions on held-out scans → a self-contained [b]report.html[/b].

    Local Ray starts in-process, the catalog is a directory of Delta tables and MLflow a sqlite file, all under
    --workdir; about 10 minutes on a 2-core laptop without a GPU ([b]--fast[/b]: about 3). Re-running is safe:
    ingest and preprocess add nothing new, and [b]--resume[/b] continues an interrupted run where it stopped.

      [b]brainiac quickstart[/b]
      [b]brainiac quickstart --fast --workdir /tmp/tour[/b]
      [b]mlflow ui --backend-store-uri sqlite:///brainiac-quickstart/mlflow.db[/b]   (browse what it logged)
    """
    from brainiac.jobs.quickstart.run import quickstart as run

    cfg = build_config(config or ("quickstart-fast" if fast else "quickstart"), set_)
    result = run(cfg, workdir, resume=resume, progress=True, echo=typer.echo)
    typer.echo("")
    for line in result.summary:
        typer.echo(line)
