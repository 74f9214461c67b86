"""``brainiac predict``: a registered task model on new NIfTI scans, preprocessed like its training volumes."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from brainiac.platform.cli.common import ConfigOption, SetOption, build_config


def _sequence_option(name: str) -> typer.models.OptionInfo:
    return typer.Option(f"--{name.lower()}", metavar="FILE", help=f"{name} scan of a multi-sequence case.",
                        rich_help_panel="Sequences")  # fmt: skip


def predict(
    model: Annotated[str, typer.Option("--model", "-m", help="models:/brainiac-<task>@ALIAS or models:/NAME/VERSION.")],
    scans: Annotated[
        list[str] | None,
        typer.Argument(metavar="SCAN...", help="NIfTI scans (.nii/.nii.gz), one case each, for one-sequence tasks."),
    ] = None,
    t1w: Annotated[str | None, _sequence_option("T1w")] = None,
    t1ce: Annotated[str | None, _sequence_option("T1ce")] = None,
    t2w: Annotated[str | None, _sequence_option("T2w")] = None,
    flair: Annotated[str | None, _sequence_option("FLAIR")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the JSON results and masks.")] = (
        "brainiac-predictions"
    ),
    sequence_check: Annotated[
        bool,
        typer.Option(
            "--sequence-check/--no-sequence-check",
            help="Check each input with the registry's brainiac-sequence@champion (when there is one).",
        ),
    ] = True,
    any_version: Annotated[
        bool,
        typer.Option(
            "--any-version",
            help="Also predict with a version that is not its task's champion (e.g. a refused candidate); its outputs "
            "are marked NOT CHAMPION.",
        ),
    ] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Predict with a registered task model on new scans. Each scan goes through the same preprocessing as the
    model's training volumes (recorded with the model: no catalog needed); the result is printed with its units and
    written as one JSON per case to --out. Segmentation also writes the tumour mask on the input's own grid (same
    shape and affine, any orientation or voxel size) and reports its volume in mL. Multi-sequence tasks take one file
    per sequence flag. Only a task's [b]champion[/b] (the version that passed every promotion gate) predicts; any
    other version is refused with the reason it is not champion, unless --any-version.

      [b]brainiac predict --model models:/brainiac-segmentation@champion flair.nii.gz[/b]
      [b]brainiac predict --model models:/brainiac-brain_age@champion sub-01_T1w.nii.gz sub-02_T1w.nii.gz[/b]
      [b]brainiac predict --model models:/brainiac-idh@champion --flair flair.nii.gz --t1ce t1ce.nii.gz[/b]
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from rich.console import Console

    from brainiac.jobs.predict import predict_scans

    cfg = build_config(config, set_)
    console = Console()
    flags = {s: f for s, f in (("T1w", t1w), ("T1ce", t1ce), ("T2w", t2w), ("FLAIR", flair)) if f is not None}
    inputs: list[str | dict[str, str]] = [*(scans or []), *([flags] if flags else [])]

    def info(line: str) -> None:
        console.print(line, markup=False, highlight=False, style="dim")

    predictions = predict_scans(
        cfg, model, inputs, out_dir=out, sequence_check=sequence_check, info=info, any_version=any_version
    )
    for p in predictions:
        console.print(p.headline, markup=False, highlight=False)
    console.print(f"{len(predictions)} prediction(s) by {predictions[0].model} written to {out}", markup=False,
                  highlight=False)  # fmt: skip
