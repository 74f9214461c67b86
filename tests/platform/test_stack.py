"""`brainiac stack up|status|down`: three healthy services on 127.0.0.1, and nothing left behind after down."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from brainiac.platform import stack
from brainiac.platform.cluster import ensure_ray_token


@pytest.mark.stack
@pytest.mark.timeout(240)
def test_stack_up_status_down_leaves_no_process(tmp_path):
    env = {**os.environ, "BRAINIAC_STACK_DIR": str(tmp_path / "stack"), "BRAINIAC_RAY_NUM_CPUS": "1"}
    # The head requires the user's token; Ray's own CLI finds it as every client does.
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ensure_ray_token())}
    for name in stack.DEFAULT_PORTS:
        env[f"BRAINIAC_{name.upper().replace('-', '_')}_PORT"] = str(stack.free_port())
    cli = [sys.executable, "-m", "brainiac.platform.cli.main", "stack"]
    try:
        up = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, timeout=200)
        assert up.returncode == 0, up.stderr[-2000:]
        status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout
        lines = status.stdout.strip().splitlines()
        assert len(lines) == 3 and all("healthy" in line and "http://127.0.0.1:" in line for line in lines)

        states = stack.status(state_dir=tmp_path / "stack")
        procs = []
        for st in states:
            root = psutil.Process(st.pid)
            procs += [root, *root.children(recursive=True)]
        assert len(procs) > 3  # the Ray head alone runs gcs_server, raylet, dashboard ...
        # Every service's HTTP endpoint listens on loopback only.
        listening = {c.laddr.port: c.laddr.ip for p in procs for c in _tcp_listeners(p)}
        for st in states:
            port = int(st.url.rsplit(":", 1)[1])
            assert listening.get(port) == "127.0.0.1", (st.name, listening)

        # The Ray job server accepts a job and runs it with this environment's Python.
        job = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", states[0].url, "--",
             "python", "-c", "import brainiac.platform.config, ray; ray.init(); print('job-ok', ray.cluster_resources()['CPU'])"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert "job-ok 1.0" in job.stdout, job.stdout[-2000:] + job.stderr[-2000:]

        down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0 and "ray, mlflow, s3" in down.stdout
        _, alive = psutil.wait_procs(procs, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
        after = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert after.returncode == 1 and after.stdout.count("stopped") == 3
    finally:
        stack.down(state_dir=tmp_path / "stack")


def _tcp_listeners(proc: psutil.Process):
    try:
        return [c for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
