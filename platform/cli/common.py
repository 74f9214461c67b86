"""Options shared by every ``brainiac`` command, and the one place that turns them into a :class:`Config`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from brainiac.platform.config import Config, load_config

if TYPE_CHECKING:
    from brainiac.platform.catalog import AccessReport, Catalog

ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="Shipped config name (e.g. [b]tiny[/b], [b]default[/b]) or a path to a YAML file. See [b]brainiac config list[/b].",
        rich_help_panel="Configuration",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override one config value by its dotted key, e.g. [b]--set cluster.num_cpus=4[/b]. Repeatable.",
        rich_help_panel="Configuration",
    ),
]
CatalogOption = Annotated[
    str | None,
    typer.Option(
        "--catalog",
        help="Catalog location: a directory or s3://bucket/prefix. Default: $BRAINIAC_CATALOG, else ./brainiac-data/catalog.",
        rich_help_panel="Configuration",
    ),
]

DatasetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--dataset",
        "-d",
        metavar="NAME",
        help="Read only this dataset (repeatable; catalog.datasets). Default: every dataset that "
        "[b]catalog.allowed_access[/b] allows; naming an unknown or a forbidden one is an error.",
        rich_help_panel="Configuration",
    ),
]


def build_config(
    config: str | Path | None,
    overrides: list[str] | None,
    *,
    catalog: str | None = None,
    datasets: list[str] | None = None,
) -> Config:
    """Config from ``--config`` and ``--set``, then explicit flags (which win over both)."""
    extra = list(overrides or [])
    if catalog is not None:
        extra.append(f"catalog.uri={catalog}")
    cfg = load_config(config, extra)
    if datasets:  # set as given: a name such as "yes" or "1" must not go through YAML's scalar typing
        cfg.catalog.datasets = list(dict.fromkeys(datasets))
    return cfg


def open_catalog(cfg: Config) -> Catalog:
    """The config's catalog, restricted to its ``catalog.allowed_access`` (what every command reads through)."""
    from brainiac.platform.catalog import Catalog

    return Catalog.open(cfg.catalog.uri, cfg.catalog.storage_options or None, allowed_access=cfg.catalog.allowed_access)


def report_access(cfg: Config, *, err: bool = False) -> AccessReport:
    """Check ``--dataset`` names against the catalog before a job starts (an unknown or forbidden one is a
    :class:`~brainiac.platform.errors.UserError`: one line, exit 2) and print what the job leaves out for its access
    level, on stderr with ``err`` (where stdout carries data)."""
    report = open_catalog(cfg).access_report(cfg.catalog.datasets)
    if report.line:
        typer.echo(report.line, err=err)
    return report
