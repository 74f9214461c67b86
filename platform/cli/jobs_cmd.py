"""``brainiac jobs``: list, inspect, follow and stop jobs on a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="The head's dashboard / Jobs API URL, e.g. [b]http://HEAD:8265[/b]. Default: $RAY_API_SERVER_ADDRESS, "
        "else $RAY_ADDRESS when it is an http(s):// URL.",
        show_default=False,
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Ray auth token for a cluster with RAY_AUTH_MODE=token, sent as an Authorization: Bearer header. "
        "Default: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH. Prefer the variable: a flag shows in ps.",
        show_default=False,
    ),
]
IdArgument = Annotated[
    str, typer.Argument(help="Submission id, as printed by [b]brainiac submit[/b].", show_default=False)
]

app = typer.Typer(
    help="Jobs on a Ray cluster (the Ray Jobs API): [b]list[/b], [b]status[/b], [b]logs[/b] (with --follow) and "
    "[b]stop[/b]. Submit them with [b]brainiac submit[/b].",
    no_args_is_help=True,
)


def _time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def follow_to_exit(client, submission_id: str) -> int:
    """Follow a job's logs to its end; 0 if it SUCCEEDED, else 1, with its status as the last line (stderr)."""
    from brainiac.platform import jobs_client

    try:
        status = jobs_client.follow(client, submission_id)
    except KeyboardInterrupt:
        typer.echo(
            f"\nstopped following; job {submission_id} keeps running (brainiac jobs stop {submission_id})", err=True
        )
        raise
    info = jobs_client.job_info(client, submission_id)
    took = f" in {(info.end_time - info.start_time) / 1000:.1f} s" if info.end_time and info.start_time else ""
    if str(status) == "SUCCEEDED":
        typer.echo(f"job {submission_id} SUCCEEDED{took}", err=True)
        return 0
    reason = (info.message or "").strip().splitlines()
    typer.echo(f"job {submission_id} {status}{took}" + (f": {reason[-1]}" if reason else ""), err=True)
    return 1


@app.command("list")
def list_(address: AddressOption = None, token: TokenOption = None) -> None:
    """Every job the cluster knows, oldest first: submission id, status, brainiac job, start time (UTC)."""
    from brainiac.platform import jobs_client

    client = jobs_client.connect(address, token)
    jobs = jobs_client.list_jobs(client)
    typer.echo(f"{'SUBMISSION ID':<46} {'STATUS':<10} {'JOB':<11} STARTED (UTC)")
    for job in jobs:
        name = (job.metadata or {}).get("brainiac_job", "-")
        typer.echo(
            f"{job.submission_id or job.job_id or '-':<46} {job.status!s:<10} {name:<11} {_time(job.start_time)}"
        )


@app.command()
def status(submission_id: IdArgument, address: AddressOption = None, token: TokenOption = None) -> None:
    """A job's status, start and end time, message and entrypoint."""
    from brainiac.platform import jobs_client

    info = jobs_client.job_info(jobs_client.connect(address, token), submission_id)
    typer.echo(f"{submission_id}  {info.status}")
    typer.echo(f"started {_time(info.start_time)}  ended {_time(info.end_time)} (UTC)")
    if info.message:
        typer.echo(f"message: {info.message.strip()}")
    typer.echo(f"entrypoint: {info.entrypoint}")


@app.command()
def logs(
    submission_id: IdArgument,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends; exit 1 unless it SUCCEEDED.")
    ] = False,
    address: AddressOption = None,
    token: TokenOption = None,
) -> None:
    """Print a job's driver log (stdout and stderr of [b]brainiac JOB ...[/b] on the cluster)."""
    from brainiac.platform import jobs_client

    client = jobs_client.connect(address, token)
    if follow:
        raise typer.Exit(follow_to_exit(client, submission_id))
    typer.echo(jobs_client.job_logs(client, submission_id), nl=False)


@app.command()
def stop(submission_id: IdArgument, address: AddressOption = None, token: TokenOption = None) -> None:
    """Stop a running job (SIGTERM to its driver, SIGKILL after Ray's grace period). Checkpoints already written stay."""
    from brainiac.platform import jobs_client

    client = jobs_client.connect(address, token)
    if jobs_client.stop_job(client, submission_id):
        typer.echo(f"stop requested for {submission_id}")
    else:
        typer.echo(f"{submission_id} had already ended: {jobs_client.job_info(client, submission_id).status}")
