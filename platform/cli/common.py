"""Options shared by every ``brainiac`` command, and the one place that turns them into a :class:`Config`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from brainiac.jobs.config import Config, load_config
from brainiac.platform.config import with_values
from brainiac.platform.errors import UserError

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
    flags: Mapping[str, Any] | None = None,
    catalog: str | None = None,
    datasets: list[str] | None = None,
) -> Config:
    """Config from ``--config`` and ``--set`` (text, parsed as YAML), then explicit flags, which win over both.

    Flags are typed values set on the config object by dotted key (:func:`~brainiac.platform.config.with_values`), never
    turned back into ``key=value`` text: ``--catalog 0123`` or ``--catalog on`` stays that string. ``None`` = not given.
    """
    cfg = load_config(config, list(overrides or []))
    values = {"catalog.uri": catalog, "catalog.datasets": list(dict.fromkeys(datasets)) if datasets else None}
    return with_values(cfg, {**values, **(flags or {})})


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]`` for a comma-separated flag; anything else is a :class:`UserError` naming the flag."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise UserError(f"{flag} takes comma-separated integers, e.g. 0,1,2; got {text!r}") from exc


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
