"""``brainiac stack``: a real local Ray head, MLflow server and S3 server on 127.0.0.1, started and stopped by PID."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from brainiac.platform import stack

app = typer.Typer(
    help="Run a real local stack on 127.0.0.1: a Ray head with its job server (token auth, the user's token), an MLflow "
    "server (sqlite, basic auth with a generated admin password) and a moto S3 server. Use it to try cluster code paths "
    "on a laptop: [b]brainiac stack up[/b], then [b]set -a; . .brainiac/stack/stack.env[/b] (RAY_ADDRESS, the token "
    "path, MLFLOW_TRACKING_URI with its login, AWS_ENDPOINT_URL; mode 0600) and run jobs.",
    no_args_is_help=True,
)

Services = Annotated[
    list[str] | None,
    typer.Argument(help=f"Services to act on (default: all): {', '.join(stack.SERVICES)}.", show_default=False),
]
StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", help="Where PID files, logs and data live. Default: $BRAINIAC_STACK_DIR or ./.brainiac/stack."
    ),
]


@app.command()
def up(services: Services = None, state_dir: StateDir = None) -> None:
    """Start the services (already running ones are left alone) and wait until each answers its health check."""
    names = stack.check_names(services or list(stack.SERVICES))
    for name in names:
        typer.echo(f"starting {name} ...", err=True)
        typer.echo(stack.start_service(name, state_dir).line())


@app.command()
def down(services: Services = None, state_dir: StateDir = None) -> None:
    """Stop the services and every process they spawned. Data (MLflow db, artifacts) stays in the state directory."""
    stopped = stack.down(services or list(stack.SERVICES), state_dir)
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
def status(services: Services = None, state_dir: StateDir = None) -> None:
    """Show each service's state, URL and PID. Exit status 1 if any is not healthy."""
    states = stack.status(services or list(stack.SERVICES), state_dir)
    for st in states:
        typer.echo(st.line())
    if not all(s.healthy for s in states):
        raise typer.Exit(1)
