"""``brainiac ingest``: datasets in their own layouts → the Delta Lake catalog."""

from __future__ import annotations

from typing import Annotated

import typer

from brainiac.platform.cli.common import CatalogOption, ConfigOption, SetOption, build_config


def ingest(
    sources: Annotated[
        list[str], typer.Argument(help="Dataset root folders (local or s3://bucket/prefix); one dataset each.")
    ],
    catalog: CatalogOption = None,
    layout: Annotated[
        str, typer.Option(help="auto (the dataset card, else detection) or one of bids, brats, manifest, dicom.")
    ] = "auto",
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Dataset name (one SOURCE only; lowercase, digits, . _ -). Needed unless the folder is named after a "
            "shipped card: a folder name may carry identifiers, so it is never used as a name on its own."
        ),
    ] = None,
    card: Annotated[str | None, typer.Option(help="A dataset card YAML to use instead of the shipped card.")] = None,
    access: Annotated[
        str | None,
        typer.Option(help="Access level for a dataset without a card: open, registered or restricted (default)."),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Ingest datasets into the catalog: discover scans, harvest geometry and content ids in parallel on Ray, write
    harmonized PHI-free rows to the [b]scans[/b] table and unusable inputs to [b]quarantine[/b].

    Re-running is safe: unchanged files add nothing (the table version does not move), changed files supersede their
    old row, and bad files never stop good ones.

    The catalog holds no source path: each image is copied into the catalog's raw area under its content id, with the
    header's free text and the gzip file name removed, and [b]source_uri[/b] is a keyed source id. The real paths and
    the full quarantine go to the [b]identified zone[/b] ([b]ingest.identified_uri[/b], default
    [b]<catalog>-identified[/b]), which only ingest reads. Examples:

      [b]brainiac ingest data/ds000228 data/BraTS2021 --catalog s3://lake/catalog[/b]
      [b]brainiac ingest /pacs/export --layout dicom --dataset hospital-gbm --access restricted[/b]
    """
    from rich.console import Console
    from rich.table import Table

    from brainiac.ingestion.ingest import ingest as run_ingest

    if access is not None and access not in ("open", "registered", "restricted"):
        from brainiac.platform.errors import UserError

        raise UserError(f"--access must be open, registered or restricted, not '{access}'")
    cfg = build_config(config, set_, catalog=catalog)
    summary = run_ingest(
        cfg, sources, layout=layout, dataset=dataset, card_path=card, access=access, progress=not quiet
    )
    console = Console()
    table = Table(title=f"catalog {summary.catalog} — scans v{summary.scans_version}", show_lines=False)
    table.add_column("dataset")
    table.add_column("layout")
    table.add_column("scans by sequence")
    for name, lay in summary.datasets.items():
        counts = summary.counts.get(name, {})
        table.add_row(name, lay, ", ".join(f"{s} {n}" for s, n in counts.items()) or "-")
    console.print(table)
    q = ", ".join(f"{r} {n}" for r, n in sorted(summary.quarantined.items())) or "none"
    console.print(
        f"discovered {summary.discovered} · new {summary.inserted} · superseded {summary.superseded} · "
        f"unchanged {summary.unchanged} · quarantined: {q} · {summary.seconds:.1f} s"
    )
    for name, n in summary.access_changed.items():
        console.print(f"{name}: access level of {n} stored rows changed to its card's level")
    if summary.quarantined:
        console.print(f"real paths of the quarantined inputs: the quarantine table of {summary.identified}")
