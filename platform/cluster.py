"""Connect a job to Ray: an existing cluster when one is named, else a private in-process Ray.

``address="local"`` (the default) always starts a new local Ray, so a job never joins a stray cluster by accident; a
cluster is used only when named by ``--address``, ``RAY_ADDRESS`` or the config (``auto``, ``host:port``, ``ray://``).

A Ray on this machine (the in-process one, and the ``brainiac stack`` head) is a service of its user, not of the
network:

- **Token authentication.** ``RAY_AUTH_MODE=token`` unless the user chose a mode. The token is generated once per user
  (:func:`ray_token_path`, mode 0600, 256 random bits) and handed to Ray through ``RAY_AUTH_TOKEN_PATH`` unless the
  user set ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``. Every gRPC and HTTP server of the cluster (GCS, raylet, core
  workers, dashboard, agents) then refuses a caller without it.
- **Loopback only.** Ray binds its gRPC servers to 127.0.0.1 only when the node's IP *is* 127.0.0.1, and resolves an
  explicit ``127.0.0.1`` (``ray.init(_node_ip_address=...)``, ``ray start --node-ip-address``) to the host's
  routable IP on Linux. Its one switch that keeps loopback is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single-node
  mode, as on laptops), read by ``ray._private.services.get_node_ip_address``; we set it for local clusters.
- **Isolation.** Ray Train's placement-group cleaner (an actor) asks the State API whether its controller still
  lives, and finds that API through ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else the *latest* ``ray start``
  on the host (``<tmp>/ray/ray_current_cluster``). Beside another Ray it asked the other cluster, heard "no such
  actor", and removed a healthy run's placement group. A local Ray therefore runs its dashboard (the State API) on a
  free loopback port and its processes get ``RAY_API_SERVER_ADDRESS`` pointing at it; see :func:`init_ray`.

Usage statistics are off (our machines have no outside network).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainiac.platform.config import ClusterConfig

__all__ = [
    "LOOPBACK_ENV",
    "RayRuntime",
    "configure_ray_environment",
    "ensure_ray_token",
    "init_ray",
    "is_local_ray",
    "ray_token_path",
]

log = logging.getLogger(__name__)

RAY_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    # Ray Train v2 is the default in 2.60; say so explicitly so a different default elsewhere cannot surprise us.
    "RAY_TRAIN_V2_ENABLED": "1",
}
"""Environment defaults set before Ray starts; a value the user already exported always wins."""

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Makes Ray take 127.0.0.1 as the node IP, so that GCS, raylet, workers and agents listen on loopback only."""

TOKEN_FILE = "ray-auth-token"  # noqa: S105 - a file name, not a password


def ray_token_path() -> Path:
    """Where this user's Ray token lives: ``<brainiac config dir>/ray-auth-token`` (see
    :func:`brainiac.platform.pseudonym.config_dir`)."""
    from brainiac.platform.pseudonym import config_dir

    return config_dir() / TOKEN_FILE


def ensure_ray_token() -> Path:
    """Create the user's Ray token (64 hex characters, as ``ray get-auth-token --generate`` makes) if there is none,
    readable by its owner only; return its path. Safe against a concurrent creator (exclusive create)."""
    path = ray_token_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def is_local_ray(target: str | None) -> bool:
    """True for a Ray on this machine: ``local`` or an address on loopback (the ``brainiac stack`` head)."""
    if target in (None, "local"):
        return True
    host = target.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def configure_ray_environment(target: str | None = "local") -> dict[str, str]:
    """Set :data:`RAY_ENV_DEFAULTS` where the user has not; for a Ray on this machine (``target`` ``local`` or a
    loopback address) also the user's token and :data:`LOOPBACK_ENV`. Returns the effective defaults.

    Call it before Ray starts. If ``ray`` was imported earlier, Ray's cached settings (auth mode, token, node IP
    policy) are refreshed, as Ray itself does when it turns token auth on.
    """
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if is_local_ray(target):
        if os.environ["RAY_AUTH_MODE"].lower() == "token" and not (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
        ):
            os.environ["RAY_AUTH_TOKEN_PATH"] = str(ensure_ray_token())
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
    _refresh_ray_settings()
    return {k: os.environ[k] for k in RAY_ENV_DEFAULTS}


def _refresh_ray_settings() -> None:
    """Make an already imported, not yet started Ray see the environment: Ray reads these once at import."""
    constants: Any = sys.modules.get("ray._private.ray_constants")  # a module: its attributes are untyped
    if constants is not None:
        flag = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        if flag is not None:
            constants.ENABLE_RAY_CLUSTER = flag.lower() in ("1", "true")
    raylet = sys.modules.get("ray._raylet")
    worker = sys.modules.get("ray._private.worker")
    connected = (
        worker is not None and getattr(worker, "global_worker", None) is not None and worker.global_worker.connected
    )
    if raylet is not None and not connected:
        raylet.Config.initialize("")
        raylet.AuthenticationTokenLoader.instance().reset_cache()


@dataclass(frozen=True)
class RayRuntime:
    """What :func:`init_ray` connected to."""

    address: str
    """The address asked for (``local`` for an in-process Ray)."""
    started_here: bool
    """True when this process started Ray (and so should shut it down)."""
    cpus: float
    gpus: float
    dashboard_url: str | None = None
    """The State API / dashboard of a local Ray (loopback), else None."""


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """``extra`` in ``os.environ`` for the block only: Ray's processes started inside inherit it, the caller's later
    subprocesses do not."""
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def local_temp_dir() -> Path:
    """Root of the local Rays' session directories: ``<tmp>/brainiac-ray-<uid>``, private to the user, never Ray's
    shared ``<tmp>/ray`` (whose ``ray_current_cluster`` names whichever ``ray start`` ran last). ``/tmp`` when the
    temp dir's name is long: Ray's socket paths below it must fit in 107 bytes."""
    base = tempfile.gettempdir()
    path = Path(base if len(base) <= 40 else "/tmp") / f"brainiac-ray-{os.getuid()}"  # noqa: S108 - a per-user 0700 folder (Ray's socket paths must stay short)
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def init_ray(cfg: ClusterConfig | None = None, *, address: str | None = None) -> RayRuntime:
    """Start or connect to Ray according to ``cfg`` (or ``address``), once per process.

    A local Ray gets token auth, loopback-only servers, a session directory under :func:`local_temp_dir`, and its
    dashboard on a free 127.0.0.1 port: Ray Train's placement-group cleaner needs the State API the dashboard serves,
    and ``RAY_API_SERVER_ADDRESS`` (set only for Ray's own processes) points it at this cluster rather than at
    another Ray on the host. ``cfg.include_dashboard`` decides whether metrics and task events are collected for it.

    Args:
        cfg: cluster section of the config. ``num_cpus``/``object_store_memory_mb``/``include_dashboard`` apply only to a
            local Ray; a remote cluster's resources are its own.
        address: overrides ``cfg.address`` (the CLI's ``--address``).

    Returns:
        A :class:`RayRuntime`. If Ray is already initialised in this process it is reused, not restarted.
    """
    cfg = cfg or ClusterConfig()
    target = address or cfg.address or "local"
    configure_ray_environment(target)
    import ray

    if ray.is_initialized():
        res = ray.cluster_resources()
        return RayRuntime(target, False, res.get("CPU", 0.0), res.get("GPU", 0.0))
    kwargs: dict[str, Any] = {  # ray.init's keywords
        "address": target,
        "logging_level": getattr(logging, cfg.log_level),
        "log_to_driver": True,
    }
    extra_env: dict[str, str] = {}
    dashboard_url = None
    if target == "local":
        port = _free_loopback_port()
        dashboard_url = f"http://127.0.0.1:{port}"
        kwargs |= {
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": port,
            "_temp_dir": str(local_temp_dir()),
        }
        extra_env["RAY_API_SERVER_ADDRESS"] = dashboard_url
        if cfg.num_cpus is not None:
            kwargs["num_cpus"] = cfg.num_cpus
        if cfg.object_store_memory_mb is not None:
            kwargs["object_store_memory"] = cfg.object_store_memory_mb << 20
        cpus = cfg.num_cpus or os.cpu_count() or 1
        system: dict[str, object] = {"num_workers_soft_limit": int(cpus * cfg.workers_per_cpu)}
        if not cfg.include_dashboard:
            # Nobody looks at this dashboard (it serves the State API only): collecting Ray's metrics and task
            # events for it cost ~1.5 CPU-seconds a minute (dashboard agent, GCS, every worker): over 1 % of a
            # 2-core machine (measured beside bench/loader.py).
            system |= {"enable_metrics_collection": False, "task_events_report_interval_ms": 0}
        kwargs["_system_config"] = system
    log.info("connecting to Ray at %s", target)
    with _environ(extra_env):
        ray.init(**kwargs)
    res = ray.cluster_resources()
    return RayRuntime(target, True, res.get("CPU", 0.0), res.get("GPU", 0.0), dashboard_url)
