"""Entry point of the ``brainiac`` command: registers the sub-commands and turns user errors into one line + exit 2."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

try:  # typer >= 0.20 vendors click under typer._click; older releases use click itself
    from typer._click import echo
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import echo
    from click import exceptions as click_exceptions  # type: ignore[no-redef]  # same module, from click itself

from brainiac.platform.cli import (
    catalog_cmd,
    config_cmd,
    embed_cmd,
    evaluate_cmd,
    finetune_cmd,
    ingest_cmd,
    jobs_cmd,
    predict_cmd,
    preprocess_cmd,
    pretrain_cmd,
    promote_cmd,
    quickstart_cmd,
    stack_cmd,
    submit_cmd,
    synth_cmd,
)
from brainiac.platform.errors import UserError

HELP = """BrainIAC platform: a Delta Lake catalog of brain MRI, Ray pretraining and fine-tuning, an MLflow registry.

Every command runs on embedded defaults (local Ray in-process, a catalog directory, MLflow on a sqlite file under
./brainiac-data) and unchanged on a cluster (RAY_ADDRESS, BRAINIAC_CATALOG=s3://..., MLFLOW_TRACKING_URI=http://...).
"""

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("synth")(synth_cmd.synth)
app.command("ingest")(ingest_cmd.ingest)
app.command("preprocess")(preprocess_cmd.preprocess)
app.command("pretrain")(pretrain_cmd.pretrain)
app.command("finetune")(finetune_cmd.finetune)
app.command("embed")(embed_cmd.embed)
app.command("evaluate")(evaluate_cmd.evaluate)
app.command("submit")(submit_cmd.submit)
app.command("predict")(predict_cmd.predict)
app.command("promote")(promote_cmd.promote)
app.command("quickstart")(quickstart_cmd.quickstart)
app.add_typer(catalog_cmd.app, name="catalog")
app.add_typer(stack_cmd.app, name="stack")
app.add_typer(config_cmd.app, name="config")
app.add_typer(jobs_cmd.app, name="jobs")


def _version() -> str:
    try:
        return version("brainiac")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"brainiac {_version()}")
        raise typer.Exit()


@app.callback()
def root(
    version_: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """BrainIAC platform command line."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. A user error prints ``error: <one line>`` on stderr and returns 2; bugs keep their traceback."""
    try:
        result = app(args=argv, prog_name="brainiac", standalone_mode=False)
    except UserError as exc:
        echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click_exceptions.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "brainiac"
        echo(f"error: {exc.format_message()} (see '{cmd} --help')", err=True)
        return 2
    except click_exceptions.ClickException as exc:
        echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code or 1
    except typer.Abort:
        echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        echo("interrupted", err=True)
        return 130
    except Exception as exc:
        from brainiac.platform.storage import storage_error_message

        message = storage_error_message(exc)
        if message is None:
            raise
        echo(f"error: {message}", err=True)
        return 2 if "credentials" in message else 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
