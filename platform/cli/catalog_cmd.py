"""``brainiac catalog``: SQL over the catalog's Delta tables, with time travel, and an overview with a plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from brainiac.platform.cli.common import CatalogOption, ConfigOption, SetOption, build_config, open_catalog

app = typer.Typer(
    help="Look into the catalog: SQL over its Delta tables (scans, quarantine, ...) and an overview with a plot.",
    no_args_is_help=True,
)

DEFAULT_SQL = (
    "SELECT dataset, sequence, count(*) AS scans FROM scans WHERE status = 'current' GROUP BY 1, 2 ORDER BY 1, 2"
)


def _open(config, set_, catalog, *, restricted: bool = True):
    """The catalog of the config, seen through its ``catalog.allowed_access`` (``restricted=False``: whole, for
    maintenance, which reads and rewrites files without showing rows)."""
    cfg = build_config(config, set_, catalog=catalog)
    cat = open_catalog(cfg)
    return cat if restricted else cat.unrestricted()


@app.command()
def query(
    sql: Annotated[
        str, typer.Argument(help="SQL (DataFusion dialect). Tables: scans, quarantine, duplicates, ...")
    ] = DEFAULT_SQL,
    catalog: CatalogOption = None,
    format_: Annotated[
        Literal["table", "json", "csv"], typer.Option("--format", "-f", help="Output format.")
    ] = "table",
    as_of: Annotated[
        int | None, typer.Option("--as-of", help="Time travel: read every table at this Delta version.")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            help="At most this many rows; the limit reaches the scan, so `SELECT * FROM volumes` stops early. "
            "Default: 50 in table format, no limit for json/csv (streamed batch by batch)."
        ),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Run SQL over the catalog. Example:

    [b]brainiac catalog query "SELECT dataset, sequence, count(*) FROM scans GROUP BY 1,2" --format csv[/b]

    Superseded rows stay in [b]scans[/b] with status = 'superseded'; filter on status = 'current' for today's view.
    Results stream: json and csv print each batch as it arrives, so exporting a large table holds one batch in memory.

    Every table shows only the datasets [b]catalog.allowed_access[/b] allows (default: open, registered); what the
    query could not see is said on stderr after the results.
    """
    cat = _open(config, set_, catalog)
    if format_ == "table" and limit is None:
        limit = TABLE_ROWS
    batches = cat.sql_batches(sql, as_of=as_of, limit=limit)
    if format_ in ("json", "csv"):
        header = True
        for batch in batches:
            df = batch.to_pandas()
            if format_ == "json":
                if len(df):
                    text = df.to_json(orient="records", lines=True, default_handler=str)
                    sys.stdout.write(text if text.endswith("\n") else text + "\n")
            else:
                df.to_csv(sys.stdout, index=False, header=header)
                header = False
        _say_left_out(cat)
        return
    from rich.console import Console
    from rich.table import Table

    rows, columns = [], None
    for batch in batches:
        columns = batch.schema.names
        rows.extend(batch.to_pylist())
    shown = f"{len(rows)} rows" + (
        " (the limit; --limit N shows more)" if limit is not None and len(rows) >= limit else ""
    )
    table = Table(title=shown)
    for col in columns or []:
        table.add_column(str(col))
    for row in rows:
        table.add_row(*[_cell(v) for v in row.values()])
    Console().print(table)
    _say_left_out(cat)


def _say_left_out(cat) -> None:
    """After a query: on stderr, the datasets its tables did not show (stdout carries only the result)."""
    line = cat.access_report().line
    if line:
        typer.echo(f"note: {line} (catalog.allowed_access)", err=True)


TABLE_ROWS = 50
"""Rows a table-format query shows unless told ``--limit``."""


def _cell(value: object) -> str:
    """A table cell: binary columns (volume arrays) as their size, long text cut."""
    if isinstance(value, bytes | bytearray):
        return f"<{len(value):,} bytes>"
    text = str(value)
    return text if len(text) <= 120 else text[:117] + "..."


@app.command()
def optimize(
    table: Annotated[
        list[str] | None, typer.Option("--table", "-t", help="Only this table (repeatable). Default: every table.")
    ] = None,
    retain_hours: Annotated[
        int,
        typer.Option(
            help="Vacuum keeps every file a version younger than this needs (time travel and pinned readers). "
            "Under 168 (Delta's 7 days) is allowed but may break a long job reading a pinned older version."
        ),
    ] = 168,
    dry_run: Annotated[bool, typer.Option(help="Report what vacuum would remove; change nothing.")] = False,
    catalog: CatalogOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Compact small files (keeping each table's row-group layout), vacuum old files, and checkpoint the Delta log.

    Batched writers (ingest, preprocess, embed) leave many small files and log entries; run this after large jobs:

    [b]brainiac catalog optimize --catalog s3://lake/catalog[/b]
    """
    from brainiac.platform.maintenance import optimize_catalog

    cat = _open(config, set_, catalog, restricted=False)
    reports = optimize_catalog(cat, table, retention_hours=retain_hours, dry_run=dry_run)
    for r in reports:
        typer.echo(
            f"{r.table:<20} v{r.version_before} -> v{r.version_after}  files {r.files_before} -> {r.files_after}  "
            f"compacted {r.files_compacted}  vacuumed {r.files_vacuumed}"
            + ("  checkpoint" if r.checkpoint else "")
            + ("  (dry run)" if dry_run else "")
        )
    if not reports:
        typer.echo(f"catalog {cat.uri} has no tables yet")


@app.command()
def stats(
    catalog: CatalogOption = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write an overview PNG here (counts, ages, spacing, shapes).")
    ] = None,
    as_of: Annotated[int | None, typer.Option("--as-of", help="Read the scans table at this Delta version.")] = None,
    intensity_sample: Annotated[
        int, typer.Option(help="Decode up to N scans per dataset for intensity percentiles (0 = headers only).")
    ] = 0,
    json_: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Counts per dataset, sequence, site and access level; age and sex distributions; and the nnU-Net-style per-dataset
    fingerprint (median spacing and shape, optional intensity percentiles). Only the datasets
    [b]catalog.allowed_access[/b] allows are counted; a line says what was left out."""
    from brainiac.ingestion.catalog_stats import catalog_stats, plot_overview, scans_frame, stats_json

    cat = _open(config, set_, catalog)
    frame = scans_frame(cat, as_of)  # read once for the numbers and the plot
    st = catalog_stats(cat, version=as_of, intensity_sample=intensity_sample, frame=frame)
    if json_:
        typer.echo(stats_json(st))
    else:
        typer.echo(
            f"catalog {cat.uri}  scans v{st.get('scans_version')}: {st['scans']} scans, {st.get('subjects', 0)} subjects"
        )
        for ds, seqs in st.get("by_dataset_sequence", {}).items():
            fp = st["fingerprint"][ds]
            typer.echo(
                f"  {ds:<26} {fp['scans']:>5} scans {fp['subjects']:>4} subjects  spacing {fp['median_spacing_mm']}  "
                f"shape {fp['median_shape']}  " + ", ".join(f"{s} {n}" for s, n in seqs.items())
            )
        if st["scans"]:
            typer.echo(f"  age (years): {st['age_years']}  sex: {st['sex']}  access: {st['by_access']}")
        if st.get("left_out"):
            typer.echo(f"  {st['left_out']}")
    if plot is not None and st["scans"]:
        typer.echo(f"overview plot: {plot_overview(cat, plot, as_of, frame=frame)}")
