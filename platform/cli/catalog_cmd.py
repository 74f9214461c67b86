"""``brainiac catalog``: SQL over the catalog's Delta tables, with time travel, and an overview with a plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from brainiac.platform.cli.common import CatalogOption, ConfigOption, SetOption, build_config

app = typer.Typer(
    help="Look into the catalog: SQL over its Delta tables (scans, quarantine, ...) and an overview with a plot.",
    no_args_is_help=True,
)

DEFAULT_SQL = (
    "SELECT dataset, sequence, count(*) AS scans FROM scans WHERE status = 'current' GROUP BY 1, 2 ORDER BY 1, 2"
)


def _open(config, set_, catalog):
    from brainiac.platform.catalog import Catalog

    cfg = build_config(config, set_, catalog=catalog)
    return Catalog.open(cfg.catalog.uri, cfg.catalog.storage_options or None)


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
    limit: Annotated[int, typer.Option(help="Rows shown in table format (json/csv print all).")] = 50,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Run SQL over the catalog. Example:

    [b]brainiac catalog query "SELECT dataset, sequence, count(*) FROM scans GROUP BY 1,2" --format csv[/b]

    Superseded rows stay in [b]scans[/b] with status = 'superseded'; filter on status = 'current' for today's view.
    """
    cat = _open(config, set_, catalog)
    result = cat.sql(sql, as_of=as_of)
    df = result.to_pandas()
    if format_ == "json":
        sys.stdout.write(df.to_json(orient="records", lines=True, default_handler=str))
    elif format_ == "csv":
        df.to_csv(sys.stdout, index=False)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(df)} rows" + (f" (first {limit})" if len(df) > limit else ""))
        for col in df.columns:
            table.add_column(str(col))
        for row in df.head(limit).itertuples(index=False):
            table.add_row(*[str(v) for v in row])
        Console().print(table)


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
    fingerprint (median spacing and shape, optional intensity percentiles)."""
    from brainiac.platform.catalog_stats import catalog_stats, plot_overview, scans_frame, stats_json

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
    if plot is not None and st["scans"]:
        typer.echo(f"overview plot: {plot_overview(cat, plot, as_of, frame=frame)}")
