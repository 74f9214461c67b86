"""Cluster helper: a private local Ray by default, environment defaults, and reuse within a process."""

from __future__ import annotations

import os

import pytest

from brainiac.platform.cluster import LOOPBACK_ENV, RAY_ENV_DEFAULTS, init_ray, ray_token_path


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_local_ray_runs_tasks_with_the_configured_cpus(ray_session):
    import ray

    assert ray_session.address == "local"
    assert ray_session.cpus == 4  # more logical CPUs than the 2 cores (see TINY_RAY)

    @ray.remote(num_cpus=0.5)
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(6)]) == [0, 1, 4, 9, 16, 25]
    again = init_ray()  # a second call reuses the runtime instead of starting another
    assert not again.started_here and again.cpus == 4
    for key in RAY_ENV_DEFAULTS:
        assert key in os.environ
    # token auth with the user's token (mode 0600), servers on loopback, the State API on a loopback port
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(ray_token_path())
    assert ray_token_path().stat().st_mode & 0o777 == 0o600
    assert all(os.environ[k] == v for k, v in LOOPBACK_ENV.items())
    assert ray._private.worker._global_node.node_ip_address == "127.0.0.1"
    assert ray_session.dashboard_url.startswith("http://127.0.0.1:")
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # only Ray's processes point at it, not this one's children
    # the system settings init_ray gave the local Ray (Ray keeps them on its node object)
    system = ray._private.worker._global_node._config
    assert system["num_workers_soft_limit"] == 4 * 2  # cluster.workers_per_cpu idle workers per CPU
    # a dashboard nobody looks at (include_dashboard=False): no metrics or task events are collected for it
    assert system["enable_metrics_collection"] is False and system["task_events_report_interval_ms"] == 0


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_ray_workers_do_not_shadow_stdlib_platform(ray_session):
    import ray

    @ray.remote(num_cpus=0.5)
    def which_platform() -> str:
        import platform

        return platform.system()

    assert ray.get(which_platform.remote()) in {"Linux", "Darwin", "Windows"}
