"""Run platform jobs on a Ray cluster through the Ray Jobs API: plan, submit, follow, list and stop them.

A submitted job runs ``python -m brainiac.platform.cli.main JOB ARGS`` on the cluster, with this project installed into
the job's runtime environment from the dependency-free wheel :mod:`brainiac.platform.wheel` builds
(``runtime_env["py_modules"]``).

Nothing is taken from the working directory (no ``working_dir``): the job sees exactly the package and its shipped
configs, never a checkout's ``.git`` or data. What the job reads and writes must be reachable from the cluster (an
``s3://`` catalog, an MLflow server); local paths name files on the cluster's nodes.

Credentials: the Ray token (``--token`` or ``RAY_AUTH_TOKEN``) travels only as an ``Authorization: Bearer`` header, as
Ray's own client sends it. Environment forwarded to the job is visible to anyone who can read the cluster's job list
(Ray stores the runtime_env with the job), so only :data:`FORWARDED_ENV` goes by default; secrets such as ``AWS_*`` or
``BRAINIAC_PSEUDONYM_KEY`` go only when named with ``--forward-env``, and their values are never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brainiac.platform.errors import UserError

if TYPE_CHECKING:  # ray is imported lazily: `brainiac --help` must not pay for it
    from ray.job_submission import JobStatus, JobSubmissionClient

    from brainiac.platform.wheel import ProjectWheel

__all__ = [
    "FORWARDED_ENV",
    "JOBS",
    "JobPlan",
    "connect",
    "follow",
    "plan_job",
    "resolve_address",
    "submit",
]

JOBS = ("ingest", "preprocess", "pretrain", "finetune", "evaluate", "promote", "embed")
"""Jobs ``brainiac submit`` runs on a cluster; each is the ``brainiac`` sub-command of the same name."""

DRIVER_COMPUTE_JOBS = frozenset({"embed", "evaluate"})
"""Jobs whose driver process runs the model itself: ``--gpus`` reserves GPUs for it and it gets one CPU by default.
Every other job's driver only orchestrates Ray tasks and actors, which reserve their own resources; it reserves none,
so a waiting driver never holds a core or a GPU that its own workers need."""

GPU_ARGS: dict[str, Callable[[float], list[str]]] = {
    "pretrain": lambda n: ["--gpus-per-worker", f"{n:g}"],
    "finetune": lambda n: ["--set", f"finetune.gpus_per_trial={n:g}"],
}
"""How ``--gpus N`` reaches jobs whose GPU work happens in Ray workers: GPUs per Train worker / per Tune trial."""

GPU_CONFLICTS = {"pretrain": ("--gpus-per-worker", "pretrain.use_gpu"), "finetune": ("finetune.gpus_per_trial",)}

FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "BRAINIAC_CATALOG")
"""Environment variables passed to every job when set here: where results go. They name locations, not secrets."""

CONNECT_TIMEOUT_S = 5.0
ENTRYPOINT = "python -m brainiac.platform.cli.main"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ----------------------------------------------------------------------------------------------------------- address
def resolve_address(address: str | None) -> str:
    """The Jobs API URL: ``address``, else ``$RAY_API_SERVER_ADDRESS`` (Ray's own CLI variable), else ``$RAY_ADDRESS``.

    Raises:
        UserError: no address, or one that is not an ``http(s)://`` dashboard URL (``host:6379``, ``ray://`` and
            ``auto`` name the GCS or Ray Client port, which takes no job submissions).
    """
    source = "--address"
    if not address:
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if os.environ.get(name):
                address, source = os.environ[name], name
                break
    if not address:
        raise UserError("no Ray cluster given: pass --address http://HEAD:8265 (the head's dashboard / Jobs API URL)")
    if not address.startswith(("http://", "https://")):
        raise UserError(
            f"{source}={address} is not a Jobs API address: give the head's dashboard URL, e.g. http://HEAD:8265 "
            "(host:port, ray:// and auto name the GCS / Ray Client port, which takes no job submissions)"
        )
    return address.rstrip("/")


def auth_headers(token: str | None = None) -> dict[str, str]:
    """``Authorization: Bearer <token>`` from ``token``, ``$RAY_AUTH_TOKEN`` or the file ``$RAY_AUTH_TOKEN_PATH`` — the
    header and sources Ray 2.60's own client uses. Without any, Ray's client still adds ``~/.ray/auth_token`` itself
    when ``RAY_AUTH_MODE=token``."""
    token = token or os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).expanduser().read_text()
        except OSError as exc:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {exc.strerror}") from exc
    token = (token or "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _probe(url: str, headers: dict[str, str], timeout_s: float) -> None:
    """Fail in seconds, with one line, when ``url`` is not a reachable Ray dashboard (Ray's client has no timeout)."""
    request = urllib.request.Request(f"{url}/api/version", headers=headers)  # noqa: S310 - resolve_address admits http(s) only
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310 - resolve_address admits http(s) only
            body = resp.read(4096)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise UserError(_auth_message(url, exc.code)) from exc
        raise UserError(
            f"{url} answered HTTP {exc.code}: is it the Ray head's dashboard (port 8265 by default)?"
        ) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"cannot reach the Ray Jobs API at {url} ({reason}); is the head running, and is this its dashboard port?"
        ) from exc
    if b"ray_version" not in body:
        raise UserError(f"{url} is not a Ray dashboard (no ray_version at /api/version)")


def _auth_message(url: str, code: int) -> str:
    if code == 401:
        return f"the Ray cluster at {url} requires a token: pass --token or set RAY_AUTH_TOKEN"
    return f"the Ray cluster at {url} rejected the token (HTTP 403): check --token / RAY_AUTH_TOKEN"


def connect(address: str | None = None, token: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S):
    """A :class:`ray.job_submission.JobSubmissionClient` for the cluster, after a quick reachability probe.

    Raises:
        UserError: no or malformed address, nothing answering there, not a Ray dashboard, or a refused token.
    """
    url = resolve_address(address)
    headers = auth_headers(token)
    if not headers:  # a Ray on this machine (`brainiac stack`) accepts this user's own token
        from brainiac.platform.cluster import is_local_ray, ray_token_path

        mine = ray_token_path()
        if is_local_ray(url) and mine.exists():
            headers = auth_headers(mine.read_text())
    _probe(url, headers, timeout_s)
    from ray.job_submission import JobSubmissionClient

    with _user_errors(url):
        return JobSubmissionClient(url, headers=headers)


@contextlib.contextmanager
def _user_errors(url: str, submission_id: str | None = None) -> Iterator[None]:
    """Turn the Jobs SDK's errors that a user causes (unknown id, taken id, token, lost connection) into one line."""
    try:
        yield
    except (RuntimeError, OSError) as exc:  # the SDK raises RuntimeError for HTTP errors; requests' are OSErrors
        raise UserError(_sdk_error_line(exc, url, submission_id)) from exc


def _sdk_error_line(exc: Exception, url: str, submission_id: str | None) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    if "status code 401" in text or "status code 403" in text:
        return _auth_message(url, 401 if "status code 401" in text else 403)
    if submission_id and ("does not exist" in text or "status code 404" in text):
        return f"no job '{submission_id}' on {url}; see: brainiac jobs list --address {url}"
    if "already exists" in text:
        return f"submission id '{submission_id}' is already taken on {url}"
    if isinstance(exc, OSError):
        return f"lost the connection to {url}: {first}"
    return f"the Ray Jobs API at {url} refused the request: {first}"


def _client_url(client: JobSubmissionClient) -> str:
    return getattr(client, "_address", "the Ray cluster")


# ------------------------------------------------------------------------------------------------------------ submit
@dataclass(frozen=True)
class JobPlan:
    """Everything :func:`submit` sends: built without a cluster, so it can be shown and tested."""

    job: str
    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    entrypoint_num_cpus: float
    entrypoint_num_gpus: float
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def env_names(self) -> list[str]:
        """Names (never values) of the environment variables the job receives."""
        return sorted(self.runtime_env.get("env_vars", {}))


def default_submission_id(job: str) -> str:
    """``brainiac-<job>-<UTC time>-<4 hex>``: sortable, greppable, unique enough for humans to retype."""
    return f"brainiac-{job}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def check_job(job: str) -> str:
    if job not in JOBS:
        raise UserError(f"unknown job '{job}'; jobs: {', '.join(JOBS)}")
    return job


def plan_job(
    job: str,
    args: Iterable[str] = (),
    *,
    wheel: ProjectWheel,
    gpus: float = 0.0,
    cpus: float | None = None,
    submission_id: str | None = None,
    forward_env: Iterable[str] = (),
    environ: dict[str, str] | None = None,
) -> JobPlan:
    """The submission of ``brainiac JOB ARGS`` to a cluster.

    Args:
        job: one of :data:`JOBS`.
        args: the job's own command-line arguments.
        wheel: the project wheel (:func:`brainiac.platform.wheel.project_wheel`), shipped in ``py_modules``.
        gpus: GPUs per compute process: per pretrain worker (``--gpus-per-worker``), per finetune trial
            (``finetune.gpus_per_trial``), or reserved for the driver of embed/evaluate. ingest, preprocess and
            promote use none.
        cpus: CPUs reserved for the driver; default 1 for embed/evaluate (their driver computes), else 0.
        submission_id: default :func:`default_submission_id`.
        forward_env: further variables to pass (secrets among them); each must be set in ``environ``.
        environ: the submitter's environment (default ``os.environ``).

    Raises:
        UserError: unknown job, GPUs for a job that uses none, ``--gpus`` and the job's own GPU flag together, a bad
            submission id, or a ``--forward-env`` name that is malformed or not set.
    """
    check_job(job)
    args = list(args)
    environ = dict(os.environ if environ is None else environ)
    if gpus < 0 or (cpus is not None and cpus < 0):
        raise UserError("--gpus and --cpus must be >= 0")
    driver_gpus = 0.0
    if gpus > 0:
        if job in GPU_ARGS:
            clash = [a for a in args for key in GPU_CONFLICTS[job] if key in a]
            if clash:
                raise UserError(f"give either --gpus or the job's own {clash[0].split('=')[0]}, not both")
            args += GPU_ARGS[job](gpus)
        elif job in DRIVER_COMPUTE_JOBS:
            driver_gpus = gpus
        else:
            raise UserError(f"{job} uses no GPU; drop --gpus")
    driver_cpus = cpus if cpus is not None else (1.0 if job in DRIVER_COMPUTE_JOBS else 0.0)
    submission_id = submission_id or default_submission_id(job)
    if not _SUBMISSION_ID.match(submission_id):
        raise UserError(f"submission id '{submission_id}' must be 1-128 letters, digits, '.', '_' or '-'")
    env_vars = {name: environ[name] for name in FORWARDED_ENV if environ.get(name)}
    for name in forward_env:
        if not _ENV_NAME.match(name):
            raise UserError(f"--forward-env takes a variable name, got '{name}'")
        if name not in environ:
            raise UserError(f"--forward-env {name}: {name} is not set in this environment")
        env_vars[name] = environ[name]
    runtime_env: dict[str, Any] = {"py_modules": [str(wheel.path)]}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return JobPlan(
        job=job,
        submission_id=submission_id,
        entrypoint=f"{ENTRYPOINT} {shlex.join([job, *args])}".strip(),
        runtime_env=runtime_env,
        entrypoint_num_cpus=float(driver_cpus),
        entrypoint_num_gpus=float(driver_gpus),
        metadata={"brainiac_job": job, "brainiac_wheel": wheel.path.name},
    )


def submit(client: JobSubmissionClient, plan: JobPlan) -> str:
    """Submit ``plan``; returns the submission id. A taken id or refused request is a :class:`UserError`."""
    with _user_errors(_client_url(client), plan.submission_id):
        return client.submit_job(
            entrypoint=plan.entrypoint,
            submission_id=plan.submission_id,
            runtime_env=plan.runtime_env,
            metadata=plan.metadata,
            entrypoint_num_cpus=plan.entrypoint_num_cpus,
            entrypoint_num_gpus=plan.entrypoint_num_gpus,
        )


# ------------------------------------------------------------------------------------------------- follow and query
def job_info(client: JobSubmissionClient, submission_id: str):
    """The job's details (status, message, times, entrypoint); an unknown id is a :class:`UserError`."""
    with _user_errors(_client_url(client), submission_id):
        return client.get_job_info(submission_id)


def job_logs(client: JobSubmissionClient, submission_id: str) -> str:
    with _user_errors(_client_url(client), submission_id):
        return client.get_job_logs(submission_id)


def list_jobs(client: JobSubmissionClient) -> list:
    """Every job the cluster knows, oldest first."""
    with _user_errors(_client_url(client)):
        jobs = client.list_jobs()
    return sorted(jobs, key=lambda j: (j.start_time or 0, j.submission_id or ""))


def stop_job(client: JobSubmissionClient, submission_id: str) -> bool:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period). False if it had already ended."""
    with _user_errors(_client_url(client), submission_id):
        return client.stop_job(submission_id)


async def _stream(client: JobSubmissionClient, submission_id: str, write: Callable[[str], object], done: list[int]):
    """Write log chunks from Ray's log websocket until the job ends; ``done[0]`` counts the characters written."""
    async for chunk in client.tail_job_logs(submission_id):
        write(chunk)
        done[0] += len(chunk)


def follow(
    client: JobSubmissionClient,
    submission_id: str,
    write: Callable[[str], object] | None = None,
    poll_s: float = 1.0,
) -> JobStatus:
    """Print the job's logs as they come until it ends; returns its terminal status.

    Streams over Ray's log websocket; where that fails (a proxy without websockets, a dropped connection) it polls
    the whole log and prints what is new.
    """
    write = write or _stdout
    job_info(client, submission_id)  # an unknown id fails here, with one line
    done = [0]
    sdk_log = logging.getLogger("ray.dashboard.modules.job.sdk")
    level = sdk_log.level
    sdk_log.setLevel(logging.WARNING)  # not "WebSocket closed ... close code 1000" after every job
    try:
        asyncio.run(_stream(client, submission_id, write, done))
        streamed = True
    except Exception:
        streamed = False
    finally:
        sdk_log.setLevel(level)
    while True:
        status = job_info(client, submission_id).status
        if not streamed:
            logs = job_logs(client, submission_id)
            if len(logs) > done[0]:
                write(logs[done[0] :])
                done[0] = len(logs)
        if str(status) in TERMINAL:
            return status
        time.sleep(poll_s)


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
