"""``brainiac finetune``: fine-tune one task with a Ray Tune sweep of Ray Train trials, tracked and registered in MLflow."""

from __future__ import annotations

from typing import Annotated

import typer

from brainiac.platform.cli.common import (
    CatalogOption,
    ConfigOption,
    DatasetOption,
    SetOption,
    build_config,
    parse_int_list,
    report_access,
)


def finetune(
    task: Annotated[
        str,
        typer.Option(
            "--task",
            "-t",
            help="Task spec: sequence, brain_age, idh, survival, mci, "
            "stroke_onset, segmentation (models/tasks/specs.yaml).",
        ),
    ],
    catalog: CatalogOption = None,
    dataset: DatasetOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    strategy: Annotated[
        str | None, typer.Option("--strategy", help="scratch (random init) | linear (frozen encoder) | full.")
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            "--init", help="Encoder: a checkpoint folder or models:/brainiac-encoder@ALIAS (/VERSION, /latest)."
        ),
    ] = None,
    shots: Annotated[int | None, typer.Option("--shots", help="K training cases per class (few-shot regime).")] = None,
    fraction: Annotated[
        float | None, typer.Option("--fraction", help="Train on this fraction of the training subjects.")
    ] = None,
    trials: Annotated[int | None, typer.Option("--trials", help="Hyperparameter configs to sample (ASHA).")] = None,
    seeds: Annotated[
        str | None, typer.Option("--seeds", help="Comma-separated seeds; each config runs once per seed.")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs per trial.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Less Tune output.")] = False,
) -> None:
    """Fine-tune the encoder on one clinical task, BrainIAC's experiment: does a pretrained encoder beat training from
    scratch with few labels? One engine serves all seven tasks; the task spec picks the inputs (one or several
    sequences per session), the label (in its units: brain age in years, stroke onset in days), head, loss and metrics.

    Hyperparameters (lr, weight decay, dropout, encoder-lr multiplier, freeze depth) are swept by Ray Tune with ASHA;
    every trial is a Ray Train run. Selection uses the validation split only; the chosen config is scored once on the
    test split (mean over seeds, 95 % bootstrap CI). The sweep is an MLflow parent run with one child run per trial; the
    chosen model is registered as [b]brainiac-TASK[/b] with the alias [b]challenger[/b].

      [b]brainiac finetune --task idh --strategy linear --init models:/brainiac-encoder@candidate --shots 5 --seeds 0,1,2[/b]
      [b]brainiac finetune --task brain_age --strategy full --init ./runs/pretrain-x/checkpoint_... --trials 8[/b]
    """
    from rich.console import Console
    from rich.table import Table

    from brainiac.jobs.finetune.run import finetune as run

    flags = {"finetune.task": task, "finetune.strategy": strategy, "finetune.init": init, "finetune.shots": shots,
             "finetune.fraction": fraction, "finetune.trials": trials, "finetune.max_epochs": epochs,
             "finetune.seeds": parse_int_list(seeds, "--seeds") if seeds is not None else None}  # fmt: skip
    cfg = build_config(config, set_, flags=flags, catalog=catalog, datasets=dataset)
    report_access(cfg)  # an unknown or forbidden --dataset stops here; say what the access levels leave out
    s = run(cfg, progress=not quiet)
    console = Console()
    console.print(
        f"[b]finetune[/b] {s.task} · {s.strategy} · {s.regime} · init {s.init} — cases {s.cases} · "
        f"{s.trials} trial(s), {s.stopped_early} stopped early · {s.seconds:.0f} s"
    )
    console.print(f"best config {s.best_config} · validation {s.val}")
    table = Table("test metric", "mean over seeds", "95 % CI", "per seed")
    for metric, v in s.test.items():
        table.add_row(metric, f"{v['mean']:.3f}", f"[{v['low']:.3f}, {v['high']:.3f}]",
                      ", ".join(f"{x:.3f}" for x in v["seeds"]))  # fmt: skip
    console.print(table)
    console.print(f"model {s.model_uri} (version {s.model_version}) · MLflow run {s.mlflow_run_id}")
