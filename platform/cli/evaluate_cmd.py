"""``brainiac evaluate``: a registered task model on the test split, with bootstrap CIs, robustness and saliency."""

from __future__ import annotations

from typing import Annotated

import typer

from brainiac.platform.cli.common import CatalogOption, ConfigOption, SetOption, build_config


def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="models:/brainiac-<task>@ALIAS or models:/NAME/VERSION.")],
    catalog: CatalogOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    robustness: Annotated[bool, typer.Option(help="Also score under imaging artifacts at several strengths.")] = True,
    saliency: Annotated[
        int, typer.Option("--saliency", help="Test cases to explain with occlusion maps (0 = none).")
    ] = 3,
) -> None:
    """Score a registered task model on its task's test split: each metric with a 95 % bootstrap CI, then the same
    under gamma/contrast shift, bias field, Gibbs ringing, Rician noise, motion ghosting and a resolution drop at
    several strengths (a table and a plot), and occlusion saliency overlays for a few cases; where the task spec names
    the signal's region (tumour, hippocampus), the saliency mass inside it against random regions of the same size.
    Everything is logged to a new MLflow run that names the model version.

      [b]brainiac evaluate --model models:/brainiac-idh@challenger[/b]
    """
    from rich.console import Console
    from rich.table import Table

    from brainiac.jobs.finetune.evaluate import evaluate as run

    cfg = build_config(config, set_, catalog=catalog)
    s = run(cfg, model, robustness=robustness, saliency_cases=saliency)
    console = Console()
    console.print(f"[b]evaluate[/b] {s.model_uri} (version {s.version}) · task {s.task} · {s.test_cases} test cases")
    table = Table("metric", "value", "95 % CI")
    for metric, v in s.metrics.items():
        table.add_row(metric, f"{v['value']:.3f}", f"[{v['low']:.3f}, {v['high']:.3f}]")
    console.print(table)
    if s.robustness:
        metric = next(iter(s.metrics))
        rob = Table("artifact", "strength", metric)
        for row in s.robustness:
            rob.add_row(str(row["artifact"]), f"{row['strength']:g}", f"{row.get(metric, float('nan')):.3f}")
        console.print(rob)
    if s.saliency_mass_ratio is not None:
        console.print(
            f"saliency mass in the {s.saliency_region} vs random regions: {s.saliency_mass_ratio:.2f}× "
            f"({s.saliency_region_cases} case{'s' if s.saliency_region_cases != 1 else ''})"
        )
    console.print(f"MLflow run {s.mlflow_run_id} · {s.seconds:.1f} s")
