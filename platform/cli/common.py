"""Options shared by every ``brainiac`` command, and the one place that turns them into a :class:`Config`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from brainiac.platform.config import Config, load_config

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


def build_config(config: str | Path | None, overrides: list[str] | None, *, catalog: str | None = None) -> Config:
    """Config from ``--config`` and ``--set``, then explicit flags (which win over both)."""
    extra = list(overrides or [])
    if catalog is not None:
        extra.append(f"catalog.uri={catalog}")
    return load_config(config, extra)
