"""``brainiac preprocess``: catalogued raw scans → model-ready ``volumes`` (one version per config) and subject ``splits``."""

from __future__ import annotations

from typing import Annotated

import typer

from brainiac.platform.cli.common import (
    CatalogOption,
    ConfigOption,
    DatasetOption,
    SetOption,
    build_config,
    report_access,
)


def preprocess(
    catalog: CatalogOption = None,
    dataset: DatasetOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    limit: Annotated[
        int | None, typer.Option(help="Process at most N scans this run (a first look at a big catalog).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Preprocess every catalogued scan into the [b]volumes[/b] table, in parallel on Ray: reorient to RAS, N4 bias
    correction, rigid registration to MNI152 (SimpleITK, Mattes MI, template brain mask), atlas brain mask, crop, a
    whole-brain grid and a fixed cube (96³ by default), z-score; label maps follow with nearest neighbour. QC numbers
    are stored and failed registrations are kept with [b]qc_pass = false[/b], never as good data.

    The [b]preprocess_version[/b] is a hash of the [b]preprocess[/b] config section: a new config writes a new version
    beside the old one; re-running does only what is missing. Subjects get train/val/test [b]splits[/b] that never move.

      [b]brainiac preprocess --catalog s3://lake/catalog --set preprocess.fixed_size=128[/b]
    """
    from rich.console import Console

    from brainiac.ingestion.prepare import preprocess as run

    cfg = build_config(config, set_, catalog=catalog, datasets=dataset)
    report_access(cfg)  # an unknown or forbidden --dataset stops here; say what the access levels leave out
    s = run(cfg, progress=not quiet, limit=limit)
    console = Console()
    console.print(f"[b]volumes[/b] {s.catalog} — preprocess_version {s.preprocess_version}, table v{s.volumes_version}")
    console.print(
        f"scans {s.selected} · already done {s.already_done} · processed {s.processed}"
        + (
            f" ({s.seconds_per_scan:.2f} s/scan wall, decode {s.decode_ms_per_volume:.1f} ms/volume)"
            if s.processed
            else ""
        )
    )
    failed = ", ".join(f"{k} {v}" for k, v in s.qc_failed.items()) or "none"
    quarantined = ", ".join(f"{k} {v}" for k, v in s.quarantined.items()) or "none"
    console.print(
        f"qc failed: {failed} · quarantined: {quarantined} · splits (subjects): {s.splits} · {s.seconds:.1f} s"
    )
