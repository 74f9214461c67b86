"""Connect a job to Ray: an existing cluster when one is named, else a private in-process Ray.

``address="local"`` (the default) always starts a new local Ray, so a job never joins a stray cluster by accident; a
cluster is used only when named by ``--address``, ``RAY_ADDRESS`` or the config (``auto``, ``host:port``, ``ray://``).
Ray 2.60 turns token authentication on by default; for local clusters and tests we set ``RAY_AUTH_MODE=disabled`` unless
the user chose a mode, and we turn usage statistics off (our machines have no outside network).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from brainiac.platform.config import ClusterConfig

__all__ = ["RayRuntime", "configure_ray_environment", "init_ray"]

log = logging.getLogger(__name__)

RAY_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    # Ray Train v2 is the default in 2.60; say so explicitly so a different default elsewhere cannot surprise us.
    "RAY_TRAIN_V2_ENABLED": "1",
}
"""Environment defaults set before Ray starts; a value the user already exported always wins."""


def configure_ray_environment() -> dict[str, str]:
    """Set :data:`RAY_ENV_DEFAULTS` where the user has not. Returns the effective values."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in RAY_ENV_DEFAULTS}


@dataclass(frozen=True)
class RayRuntime:
    """What :func:`init_ray` connected to."""

    address: str
    """The address asked for (``local`` for an in-process Ray)."""
    started_here: bool
    """True when this process started Ray (and so should shut it down)."""
    cpus: float
    gpus: float


def init_ray(cfg: ClusterConfig | None = None, *, address: str | None = None) -> RayRuntime:
    """Start or connect to Ray according to ``cfg`` (or ``address``), once per process.

    Args:
        cfg: cluster section of the config. ``num_cpus``/``object_store_memory_mb``/``include_dashboard`` apply only to a
            local Ray; a remote cluster's resources are its own.
        address: overrides ``cfg.address`` (the CLI's ``--address``).

    Returns:
        A :class:`RayRuntime`. If Ray is already initialised in this process it is reused, not restarted.
    """
    import ray

    cfg = cfg or ClusterConfig()
    target = address or cfg.address or "local"
    configure_ray_environment()
    if ray.is_initialized():
        res = ray.cluster_resources()
        return RayRuntime(target, False, res.get("CPU", 0.0), res.get("GPU", 0.0))
    kwargs: dict[str, object] = {
        "address": target,
        "logging_level": getattr(logging, cfg.log_level),
        "log_to_driver": True,
    }
    if target == "local":
        kwargs["include_dashboard"] = cfg.include_dashboard
        if cfg.include_dashboard:
            kwargs["dashboard_host"] = "127.0.0.1"
        if cfg.num_cpus is not None:
            kwargs["num_cpus"] = cfg.num_cpus
        if cfg.object_store_memory_mb is not None:
            kwargs["object_store_memory"] = cfg.object_store_memory_mb << 20
        cpus = cfg.num_cpus or os.cpu_count() or 1
        system: dict[str, object] = {"num_workers_soft_limit": int(cpus * cfg.workers_per_cpu)}
        if not cfg.include_dashboard:
            # Without a dashboard nothing reads Ray's metrics or task events; sending them cost ~1.5 CPU-seconds a
            # minute (dashboard agent, GCS, every worker): over 1 % of a 2-core machine (measured beside
            # bench/loader.py).
            system |= {"enable_metrics_collection": False, "task_events_report_interval_ms": 0}
        kwargs["_system_config"] = system
    log.info("connecting to Ray at %s", target)
    ray.init(**kwargs)
    res = ray.cluster_resources()
    return RayRuntime(target, True, res.get("CPU", 0.0), res.get("GPU", 0.0))
