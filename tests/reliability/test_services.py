"""The services the platform starts on a machine are its user's, not the network's (issue #18, "Services").

- Every server the stack and the test fixtures start (Ray head: GCS, raylet, dashboard, agents, workers; the in-process
  local Ray; MLflow; moto) listens on loopback only, read from ``/proc/net/tcp{,6}``.
- The Ray head refuses a caller without the user's token; MLflow refuses one without its admin login (basic auth).
- A secret in the shell that ran ``stack up`` reaches neither a Ray job nor the MLflow server's process.
- A local Ray's Ray Train run is not disturbed by another Ray started beside it (the placement-group cleaner once asked
  the other cluster about its controller, heard "no such actor" and removed a healthy run's placement group).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from brainiac.platform import stack
from brainiac.platform.cluster import ray_token_path

PLANTED = "BRAINIAC_TEST_PLANTED_SECRET"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory):
    """A Ray head and an MLflow server of the stack, started from a shell that holds a planted secret."""
    state = tmp_path_factory.mktemp("services")
    secret = "planted-" + os.urandom(8).hex()
    os.environ[PLANTED] = secret
    os.environ["BRAINIAC_RAY_NUM_CPUS"] = "1"
    try:
        started = {}
        for name in ("ray", "mlflow"):
            ports = {p: stack.free_port() for p in stack.SERVICES[name].ports}
            started[name] = stack.start_service(name, state, ports=ports)
    finally:
        os.environ.pop(PLANTED, None)
        os.environ.pop("BRAINIAC_RAY_NUM_CPUS", None)
    try:
        yield {"state": state, "secret": secret, **started}
    finally:
        stack.down(["ray", "mlflow"], state)


def _tree(pid: int) -> list[psutil.Process]:
    """A service's process and every descendant, plus what left the tree but stayed in its session (Ray's daemons)."""
    root = psutil.Process(pid)
    procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == pid:
                procs.setdefault(p.pid, p)
        except (ProcessLookupError, PermissionError):
            continue
    return list(procs.values())


def _listening() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) for every listening TCP socket of the machine (``/proc/net/tcp`` and
    ``tcp6``; state 0A is LISTEN)."""
    out = {}
    for name, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            local, st, inode = fields[1], fields[3], int(fields[9])
            if st != "0A":
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = str(ipaddress.ip_address(raw[:4] if width == 8 else raw))
            out[inode] = (ip, int(hex_port, 16))
    return out


def _sockets_of(proc: psutil.Process) -> set[int]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except (FileNotFoundError, PermissionError):
        pass
    return inodes


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.mark.stack
@pytest.mark.ray
@pytest.mark.timeout(240)
def test_every_started_server_listens_on_loopback_only(services, s3_server, mlflow_server, ray_session):
    procs = {"stack-ray": _tree(services["ray"].pid), "stack-mlflow": _tree(services["mlflow"].pid)}
    procs["s3-fixture"] = _tree(s3_server.pid)
    procs["mlflow-fixture"] = _tree(mlflow_server.pid)
    # The in-process local Ray of the session: its GCS, raylet, dashboard, agents and workers are this process's.
    procs["local-ray"] = psutil.Process().children(recursive=True)
    listening = _listening()
    found: list[tuple[str, str, str, int]] = []
    for group, members in procs.items():
        for p in members:
            try:
                name = p.name()
            except psutil.NoSuchProcess:
                continue
            for inode in _sockets_of(p) & listening.keys():
                found.append((group, name, *listening[inode]))
    names = {name for _, name, _, _ in found}
    assert {"gcs_server", "raylet"} <= names, names  # Ray's own servers were seen, not just the HTTP endpoints
    assert {group for group, *_ in found} == set(procs), found
    open_to_network = [f for f in found if not _is_loopback(f[2])]
    print(f"listening sockets: {len(found)}; on a non-loopback address: {len(open_to_network)}")
    assert open_to_network == [], open_to_network


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.stack
@pytest.mark.timeout(240)
def test_ray_head_and_mlflow_refuse_callers_without_credentials(services):
    token = ray_token_path().read_text().strip()
    assert stat.S_IMODE(ray_token_path().stat().st_mode) == 0o600 and len(token) == 64
    jobs = f"{services['ray'].url}/api/jobs/"
    assert _get(jobs) == 401
    assert _get(jobs, {"Authorization": "Bearer " + "0" * 64}) == 403
    assert _get(jobs, {"Authorization": f"Bearer {token}"}) == 200

    state = services["state"]
    user, password = stack.mlflow_credentials(state)
    search = f"{services['mlflow'].url}/api/2.0/mlflow/experiments/search?max_results=1"
    basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    wrong = "Basic " + base64.b64encode(f"{user}:not-{password}".encode()).decode()
    assert _get(search) == 401
    assert _get(search, {"Authorization": wrong}) == 401
    assert _get(search, {"Authorization": basic}) == 200
    # The secrets live in files of mode 0600 and never in a log.
    for private in (state / stack.MLFLOW_AUTH_FILE, state / "stack.env"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    env_file = (state / "stack.env").read_text()
    assert f"MLFLOW_TRACKING_PASSWORD={password}" in env_file and f"RAY_AUTH_TOKEN_PATH={ray_token_path()}" in env_file
    logs = (state / "mlflow.log").read_text(errors="replace") + (state / "ray.log").read_text(errors="replace")
    assert password not in logs and token not in logs
    # A brainiac client of the stack's URL finds the login by itself.
    assert stack.mlflow_credentials_for(services["mlflow"].url, state) == (user, password)


@pytest.mark.stack
@pytest.mark.timeout(240)
def test_a_secret_of_the_owner_reaches_neither_a_job_nor_mlflow(services):
    from ray.job_submission import JobStatus, JobSubmissionClient

    secret = services["secret"]
    for name in ("ray", "mlflow"):
        for p in _tree(services[name].pid):
            try:
                environ = Path(f"/proc/{p.pid}/environ").read_bytes()
            except (FileNotFoundError, ProcessLookupError):
                continue
            assert secret.encode() not in environ and PLANTED.encode() not in environ, (name, p.name())

    token = ray_token_path().read_text().strip()
    client = JobSubmissionClient(services["ray"].url, headers={"Authorization": f"Bearer {token}"})
    probe = f"import os, json; print('ENV=' + json.dumps(sorted(k for k in os.environ if k in {{'{PLANTED}', 'HOME', 'PATH'}})))"
    job = client.submit_job(entrypoint=f'python -c "{probe}"')
    deadline = time.monotonic() + 150
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-2000:]
    (line,) = [ln for ln in logs.splitlines() if ln.startswith("ENV=")]
    assert json.loads(line[4:]) == ["HOME", "PATH"], line


TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import ray, ray.train
    from ray.train.torch import TorchTrainer

    from brainiac.platform.cluster import init_ray
    from brainiac.platform.config import ClusterConfig

    work = Path(sys.argv[1])

    def loop(cfg):
        from ray.util.state import get_actor

        work = Path(cfg["work"])
        me = ray.get_runtime_context().get_actor_id()
        for i in range(600):
            time.sleep(0.25)
            if i == 2:
                (work / "training").touch()  # the placement group is registered with the cleaner by now
            if (work / "other-up").exists():
                break
        # What Ray Train's placement-group cleaner asks: the State API, found from inside this cluster.
        try:
            seen = get_actor(me, timeout=30)
            answer = "ALIVE" if seen and seen.state == "ALIVE" else repr(seen)
        except Exception as exc:
            answer = f"{type(exc).__name__}: {exc}"
        (work / "state-api.txt").write_text(answer)
        for i in range(8):  # give the cleaner (1 s period) time to act on a wrong answer
            time.sleep(0.5)
            ray.train.report({"i": i})

    init_ray(ClusterConfig(num_cpus=2, object_store_memory_mb=128, include_dashboard=False))
    trainer = TorchTrainer(
        loop,
        train_loop_config={"work": str(work)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(work / "runs"), name="beside"),
    )
    trainer.fit()
    (work / "done").touch()
    """
)


@pytest.mark.timeout(300)
def test_local_train_run_survives_another_ray_starting_beside_it(tmp_path):
    """A local Ray Train run goes on while a plain ``ray start --head`` comes up and goes away on the same host. Both
    use one sandboxed temp dir (``RAY_TMPDIR``), as two Rays of one user share ``/tmp/ray``: the other's
    ``ray_current_cluster`` is what misled the cleaner."""
    sandbox = Path(tempfile.mkdtemp(prefix="bsvc-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(sandbox), "TMPDIR": str(sandbox)}
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    started = time.monotonic()
    run = subprocess.Popen(
        [sys.executable, str(tmp_path / "train.py"), str(tmp_path)], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    other = None
    try:
        while not (tmp_path / "training").exists():
            assert run.poll() is None, run.communicate()[0][-3000:]
            assert time.monotonic() - started < 200, "training never started"
            time.sleep(0.5)
        ray_bin = str(Path(sys.executable).parent / "ray")
        other = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={stack.free_port()}", "--num-cpus=1",
             "--include-dashboard=false", f"--dashboard-agent-listen-port={stack.free_port()}", "--disable-usage-stats"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        current = sandbox / "ray" / "ray_current_cluster"
        while not current.exists():
            assert other.poll() is None, "the other Ray did not start"
            assert time.monotonic() - started < 260, "the other Ray did not come up"
            time.sleep(0.5)
        (tmp_path / "other-up").touch()
        output, _ = run.communicate(timeout=max(10.0, 280 - (time.monotonic() - started)))
    finally:
        for proc in (other, run):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (other, run):
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        if other is not None:  # `ray start --block` leaves its daemons in its session
            for p in psutil.process_iter():
                try:
                    if os.getsid(p.pid) == other.pid:
                        p.kill()
                except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                    continue
        shutil.rmtree(sandbox, ignore_errors=True)
    assert run.returncode == 0, output[-3000:]
    assert (tmp_path / "done").exists(), output[-3000:]
    # What the placement-group cleaner hears about a live actor of its cluster, asked while the other Ray is up.
    assert (tmp_path / "state-api.txt").read_text() == "ALIVE", output[-3000:]
    assert not re.search(r"Failed to query Ray Train Controller|Cleaning up placement group", output), output[-3000:]
