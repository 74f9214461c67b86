"""``brainiac submit``: run a platform job on a Ray cluster through the Ray Jobs API, this project shipped as a wheel."""

from __future__ import annotations

from typing import Annotated

import typer

from brainiac.platform.cli.jobs_cmd import AddressOption, TokenOption, follow_to_exit


def submit(
    job: Annotated[
        str,
        typer.Argument(help="ingest, preprocess, pretrain, finetune, evaluate, promote or embed.", show_default=False),
    ],
    job_args: Annotated[
        list[str] | None,
        typer.Argument(metavar="JOB_ARGS", help="The job's own arguments, after [b]--[/b].", show_default=False),
    ] = None,
    address: AddressOption = None,
    gpus: Annotated[
        float,
        typer.Option(
            "--gpus",
            help="GPUs for each process that computes: every pretrain worker ([b]--gpus-per-worker[/b]; scale out "
            "with the job's [b]--workers[/b]), every finetune trial ([b]finetune.gpus_per_trial[/b]), or the driver "
            "of embed / evaluate. ingest, preprocess and promote use none.",
        ),
    ] = 0.0,
    cpus: Annotated[
        float | None,
        typer.Option(
            "--cpus",
            help="CPUs reserved for the job's driver. Default: 1 for embed / evaluate (their driver runs the model), "
            "0 for the others (their driver only orchestrates; workers and tasks reserve their own).",
            show_default=False,
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Follow the logs until the job ends; exit 1 unless it SUCCEEDED.")
    ] = False,
    submission_id: Annotated[
        str | None,
        typer.Option("--submission-id", help="Job id. Default: brainiac-JOB-<UTC time>-<4 hex>.", show_default=False),
    ] = None,
    forward_env: Annotated[
        list[str] | None,
        typer.Option(
            "--forward-env",
            metavar="NAME",
            help="Also pass this variable of your environment to the job (e.g. AWS_ACCESS_KEY_ID, "
            "BRAINIAC_PSEUDONYM_KEY). Repeatable. Values are never printed, but the cluster stores them with the job.",
        ),
    ] = None,
    token: TokenOption = None,
) -> None:
    """Run [b]brainiac JOB [JOB ARGS][/b] on a Ray cluster as a Ray job.

    This project travels as a wheel built from the installed sources (no dependencies: the cluster image owns torch,
    CUDA and Ray; cached by source hash, so a second submit does not rebuild). Nothing from the working directory
    goes. The job receives MLFLOW_TRACKING_URI and BRAINIAC_CATALOG when they are set here; anything else, secrets
    included, only with [b]--forward-env[/b] — better, give the cluster its own secrets. Paths are resolved on the
    cluster: use an s3:// catalog and an MLflow server there.

    Prints the submission id; find the job again with [b]brainiac jobs status|logs|stop ID[/b].

      [b]brainiac submit ingest --address http://HEAD:8265 -- s3://lake/raw/BraTS2021 --catalog s3://lake/catalog[/b]
      [b]brainiac submit pretrain --address http://HEAD:8265 --gpus 1 --wait -- --config vit-b --workers 64[/b]
    """
    from brainiac.platform import jobs_client
    from brainiac.platform.wheel import project_wheel

    jobs_client.check_job(job)
    client = jobs_client.connect(address, token)
    wheel = project_wheel()
    plan = jobs_client.plan_job(
        job, job_args or [], wheel=wheel, gpus=gpus, cpus=cpus, submission_id=submission_id,
        forward_env=forward_env or [],
    )  # fmt: skip
    url = jobs_client.resolve_address(address)
    typer.echo(
        f"wheel {wheel.path.name} ({wheel.size / 1024:.0f} KiB{', cached' if wheel.cached else ''}); "
        f"env: {', '.join(plan.env_names) or 'none'}; driver: {plan.entrypoint_num_cpus:g} CPU, "
        f"{plan.entrypoint_num_gpus:g} GPU",
        err=True,
    )
    sid = jobs_client.submit(client, plan)
    typer.echo(f"submitted {sid}")
    if not wait:
        typer.echo(f"follow: brainiac jobs logs {sid} --follow --address {url}", err=True)
        return
    raise typer.Exit(follow_to_exit(client, sid))
