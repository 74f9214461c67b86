"""``brainiac config``: list shipped configs and show the fully resolved config a job would run with."""

from __future__ import annotations

import typer
import yaml

from brainiac.jobs.config import available_configs
from brainiac.platform.cli.common import CatalogOption, ConfigOption, SetOption, build_config
from brainiac.platform.config import config_to_dict

app = typer.Typer(
    help="Inspect configuration: what ships with the package and what a job would actually use.", no_args_is_help=True
)


@app.command("list")
def list_configs() -> None:
    """List the configs shipped inside the package (usable as [b]--config NAME[/b])."""
    for name in available_configs():
        typer.echo(name)


@app.command()
def show(config: ConfigOption = None, set_: SetOption = None, catalog: CatalogOption = None) -> None:
    """Print the resolved config as YAML: defaults, environment, [b]--config[/b] file and [b]--set[/b] overrides applied.

    Secrets in storage options are shown as ***. Example: [b]brainiac config show -c tiny --set cluster.num_cpus=8[/b]
    """
    cfg = build_config(config, set_, catalog=catalog)
    typer.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
