"""``brainiac synth``: write the synthetic multi-site brain MRI cohort with known truth."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from brainiac.platform.cli.common import ConfigOption, SetOption, build_config
from brainiac.platform.errors import UserError

if TYPE_CHECKING:
    from rich.console import JustifyMethod

PRESETS = ("tiny", "small", "full")


def synth(
    out: Annotated[
        Path,
        typer.Argument(
            help="Output folder: new, empty, or a previous [b]brainiac synth[/b] output (which is replaced).",
            show_default=False,
        ),
    ],
    subjects: Annotated[
        int | None,
        typer.Option(
            "--subjects",
            "-n",
            min=1,
            help="Distinct subjects in total, spread evenly over the cohorts (config: synth.subjects, default 40).",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            min=0,
            help="Seed of every draw; the same seed writes byte-identical files (config: seed, default 0).",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            "-p",
            help="[b]tiny[/b] 3 mm voxels (tests), [b]small[/b] 2 mm (quickstart), [b]full[/b] 1 mm (realistic sizes). Config: synth.preset.",
        ),
    ] = None,
    anatomy_variation: Annotated[
        float | None,
        typer.Option(
            "--anatomy-variation",
            min=0.0,
            max=2.0,
            help="How much anatomy differs between subjects: 1 (the preset's) realistic head sizes and shapes, "
            "deformations, atrophy and tumour mass effect; 0 the template under a pose and scale (config: "
            "synth.anatomy_variation).",
        ),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Write a synthetic multi-site brain MRI cohort whose truth is known.

    Built from the MNI152 2009 templates that ship with nilearn (no download). Each subject gets its own smooth
    head size and shape (children's heads smaller), smooth deformations (3-6 mm fine, 2-5 mm lobe-scale), head pose (up to 15 degrees, 10 mm), scanner (Siemens/GE/Philips, 1.5 or 3 T: intensity
    scale, bias field, Rician noise), voxel size, orientation and data type, and biology whose labels are learnable
    from the voxels only: ageing (ventricles, cortical thinning, white-matter hyperintensities), MCI (medial-temporal
    atrophy), glioma (BraTS labels, IDH, survival, mass effect) and stroke (appearance by days since onset).

    [b]OUT/[/b] gets one dataset folder per cohort, each written as such data really arrives:

    [b]synth-lifespan-bids[/b]  BIDS, T1w/T2w/FLAIR, healthy 5-90 y;
    [b]synth-brats[/b]  BraTS case folders with seg, IDH and survival CSVs;
    [b]synth-adni[/b]  flat NIfTI files + manifest.csv (CN/MCI);
    [b]synth-gbm-dicom[/b]  PACS export, one slice per file, fake PHI, some BraTS cases re-saved;
    [b]synth-stroke-bids[/b]  BIDS T1w/FLAIR/DWI + lesion masks, days since onset.

    The ground truth (age in years, labels, true brain masks, true rigid transforms, duplicate links) goes to
    [b]OUT/_truth/[/b], outside the dataset folders, so ingesting a cohort never sees it.

    Timing on 2 cores, 40 subjects: [b]tiny[/b] about 20 s (80 MB), [b]small[/b] about 65 s (220 MB);
    [b]full[/b] takes about 18 s and 60 MB per subject. Example: [b]brainiac synth ./synth --subjects 40 --seed 0[/b], then
    [b]brainiac ingest ./synth/synth-lifespan-bids ...[/b]
    """
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = build_config(
        config,
        set_,
        flags={
            "synth.preset": preset,
            "synth.subjects": subjects,
            "seed": seed,
            "synth.anatomy_variation": anatomy_variation,
        },
    )

    from rich.console import Console
    from rich.table import Table

    from brainiac.jobs.synth import run

    console = Console(stderr=False)
    summary = run(cfg, out, progress=True)
    table = Table(title=f"brainiac synth: {summary.out_dir}", title_justify="left")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("cohort", "left"),
        ("dataset folder", "left"),
        ("subjects", "right"),
        ("scans", "right"),
        ("files", "right"),
    )
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for name, folder in summary.cohorts.items():
        c = summary.per_cohort.get(name, {})
        table.add_row(name, folder, str(c.get("subjects", 0)), str(c.get("scans", 0)), str(c.get("files", 0)))
    console.print(table)
    console.print(
        f"{summary.n_subjects} subjects, {summary.n_scans} scans, {summary.n_files} files "
        f"(preset {cfg.synth.preset}, seed {cfg.seed}) in {summary.seconds:.1f} s\n"
        f"output: {summary.out_dir}\ntruth:  {summary.truth}  (never ingest _truth/)"
    )
