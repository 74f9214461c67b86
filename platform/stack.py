"""A real local stack on 127.0.0.1, started and stopped by PID: a Ray head with its job server, an MLflow server with a
sqlite backend, and a moto S3 server.

Each service is one foreground process started in its own session (``start_new_session``) with its output in a log file;
its PID, port and log path go into ``<state_dir>/<name>.json``. ``down`` terminates the recorded process and every
descendant it had (Ray's head spawns gcs_server, raylet, dashboard and workers), waits, then kills what is left, so nothing
stays behind. ``infra/local/stack.sh``, the ``brainiac stack`` command and the pytest fixtures all go through this module.

Nothing is open to the network or to other users of the machine:

- every server listens on 127.0.0.1 only (Ray's GCS, raylet and workers too: see :mod:`brainiac.platform.cluster`);
- the Ray head requires the user's Ray token (``RAY_AUTH_MODE=token``), and MLflow runs its ``basic-auth`` app with
  an ``admin`` password generated on first start; both secrets stay in files of mode 0600
  (``<config dir>/ray-auth-token``, ``<state_dir>/mlflow-auth.ini``) and are never printed or logged;
- a service gets a minimal environment (:func:`service_env`), never its owner's whole one: a job submitted to the Ray
  head, or anyone who can read the MLflow server's process, sees no secret of the shell that ran ``stack up``.

``<state_dir>/stack.env`` (mode 0600) holds the variables a client needs (``RAY_ADDRESS``, ``RAY_AUTH_TOKEN_PATH``,
``MLFLOW_TRACKING_URI`` with its username and password, ``AWS_ENDPOINT_URL``): ``set -a; . .brainiac/stack/stack.env``.
``brainiac`` commands find the MLflow credentials of a stack URL by themselves (:func:`mlflow_credentials_for`).
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from brainiac.platform.cluster import LOOPBACK_ENV, RAY_ENV_DEFAULTS, ensure_ray_token
from brainiac.platform.errors import UserError

__all__ = [
    "SERVICES",
    "ServiceStatus",
    "default_state_dir",
    "down",
    "mlflow_credentials",
    "mlflow_credentials_for",
    "service_env",
    "start_service",
    "status",
    "stop_service",
    "up",
]

HOST = "127.0.0.1"
DEFAULT_PORTS = {
    "ray": 6380, "ray-client": 6381, "ray-agent": 52366, "ray-dashboard": 8265, "mlflow": 5000, "s3": 5555
}  # fmt: skip
"""Default ports; override with ``BRAINIAC_<NAME>_PORT`` (``BRAINIAC_RAY_PORT``, ``BRAINIAC_MLFLOW_PORT``, ...)."""


def default_state_dir() -> Path:
    """``$BRAINIAC_STACK_DIR``, else ``./.brainiac/stack`` under the working directory."""
    return Path(os.environ.get("BRAINIAC_STACK_DIR") or Path.cwd() / ".brainiac" / "stack").resolve()


def _port(name: str) -> int:
    env = os.environ.get(f"BRAINIAC_{name.upper().replace('-', '_')}_PORT")
    return int(env) if env else DEFAULT_PORTS[name]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for tests that must not collide with a running stack)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """An executable of the current environment (the venv's ``bin``), falling back to PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http URLs of our own services on 127.0.0.1
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Service:
    """How to run and probe one service of the local stack."""

    name: str
    argv: Callable[[Path, dict[str, int]], list[str]]
    ports: tuple[str, ...]
    health_urls: Callable[[dict[str, int]], tuple[str, ...]]
    """Every URL must answer before the service counts as healthy."""
    env: Callable[[Path, dict[str, int]], dict[str, str]] = lambda state, ports: {}
    """The service's own settings (secrets included), added to :func:`service_env`'s minimal environment."""
    startup_timeout_s: float = 60.0

    def url(self, ports: dict[str, int]) -> str:
        """Where a client points: the dashboard / job server for Ray, the HTTP endpoint otherwise."""
        return f"http://{HOST}:{ports[self.ports[-1]]}"


def _ray_argv(state: Path, ports: dict[str, int]) -> list[str]:
    return [
        _bin("ray"), "start", "--head", "--block",
        f"--node-ip-address={HOST}", f"--port={ports['ray']}",
        "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={ports['ray-dashboard']}",
        # Its own port: GCS port + 1 may be held by another process (a failed bind kills the whole head).
        f"--ray-client-server-port={ports['ray-client']}",
        # An explicit agent port: the default (52365) may be held by another Ray on this machine, and a head without
        # its agent answers /api/version but refuses every job ("No available agent").
        f"--dashboard-agent-listen-port={ports['ray-agent']}",
        "--disable-usage-stats",
        "--temp-dir=" + str(Path(tempfile.gettempdir()) / f"brainiac-ray-{ports['ray']}"),
        f"--num-cpus={os.environ.get('BRAINIAC_RAY_NUM_CPUS', '4')}",
    ]  # fmt: skip


def _ray_env(state: Path, ports: dict[str, int]) -> dict[str, str]:
    """Ray's own settings: the user's ``RAY_*`` knobs (not an address of another cluster), token auth with the user's
    token, loopback-only servers, and this head's State API for Ray Train's placement-group cleaner (else it asks
    whichever Ray started last on the host). ``BRAINIAC_STACK_DIR`` lets a job's driver find the stack's MLflow
    credentials (:func:`mlflow_credentials_for`)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("RAY_") and k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    env = {**RAY_ENV_DEFAULTS, **env, **LOOPBACK_ENV}
    if env["RAY_AUTH_MODE"].lower() == "token" and not (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")):
        env["RAY_AUTH_TOKEN_PATH"] = str(ensure_ray_token())
    env["RAY_API_SERVER_ADDRESS"] = f"http://{HOST}:{ports['ray-dashboard']}"
    env["BRAINIAC_STACK_DIR"] = str(state)
    return env


def _mlflow_argv(state: Path, ports: dict[str, int]) -> list[str]:
    return [
        _bin("mlflow"), "server", "--app-name", "basic-auth",
        "--host", HOST, "--port", str(ports["mlflow"]), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
        "--artifacts-destination", str(state / "mlartifacts"),
    ]  # fmt: skip


MLFLOW_ADMIN = "admin"
MLFLOW_AUTH_FILE = "mlflow-auth.ini"


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 (never briefly readable by others) and write ``text``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _mlflow_auth_config(state: Path) -> Path:
    """``<state>/mlflow-auth.ini`` for MLflow's basic-auth app, created once (mode 0600): the ``admin`` user with a
    generated password (MLflow sets it when it creates its user database, ``mlflow-auth.db`` beside it), no
    permission for any other user, and the secret key of the app's CSRF protection."""
    path = state / MLFLOW_AUTH_FILE
    if not path.exists():
        _write_private(
            path,
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{state / 'mlflow-auth.db'}\n"
            f"admin_username = {MLFLOW_ADMIN}\n"
            f"admin_password = {secrets.token_urlsafe(24)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"# not read by MLflow: the app's MLFLOW_FLASK_SERVER_SECRET_KEY\nflask_secret_key = {secrets.token_hex(32)}\n",
        )
    return path


def _read_auth(state: Path) -> configparser.SectionProxy | None:
    path = Path(state) / MLFLOW_AUTH_FILE
    if not path.exists():
        return None
    parser = configparser.ConfigParser()
    parser.read(path)
    return parser["mlflow"] if parser.has_section("mlflow") else None


def _mlflow_env(state: Path, ports: dict[str, int]) -> dict[str, str]:
    path = _mlflow_auth_config(state)
    auth = _read_auth(state)
    if auth is None:
        raise RuntimeError(f"the MLflow login file in {state} was not written")
    return {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_AUTH_CONFIG_PATH": str(path),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": auth["flask_secret_key"],
    }


def mlflow_credentials(state_dir: Path | None = None) -> tuple[str, str] | None:
    """``(username, password)`` of the stack's MLflow admin, or None when the stack never started MLflow."""
    auth = _read_auth(Path(state_dir or default_state_dir()))
    if auth is None or not auth.get("admin_password"):
        return None
    return auth.get("admin_username", MLFLOW_ADMIN), auth["admin_password"]


def mlflow_credentials_for(uri: str, state_dir: Path | None = None) -> tuple[str, str] | None:
    """The stack's MLflow credentials if ``uri`` is the URL of the stack's MLflow server (as recorded by ``up``)."""
    state_dir = Path(state_dir or default_state_dir())
    rec = _read_state(state_dir, "mlflow")
    if not rec or rec.get("url", "").rstrip("/") != uri.rstrip("/"):
        return None
    return mlflow_credentials(state_dir)


def _s3_argv(state: Path, ports: dict[str, int]) -> list[str]:
    return [_bin("moto_server"), "-H", HOST, "-p", str(ports["s3"])]


SERVICES: dict[str, Service] = {
    "ray": Service(
        "ray",
        _ray_argv,
        ("ray", "ray-client", "ray-agent", "ray-dashboard"),
        lambda p: (
            f"http://{HOST}:{p['ray-dashboard']}/api/version",
            f"http://{HOST}:{p['ray-agent']}/api/local_raylet_healthz",
        ),
        env=_ray_env,
        startup_timeout_s=90.0,
    ),
    "mlflow": Service(
        "mlflow",
        _mlflow_argv,
        ("mlflow",),
        lambda p: (f"http://{HOST}:{p['mlflow']}/health",),
        env=_mlflow_env,
        # The basic-auth app creates its user database on first start: ~10 s here, minutes on a loaded machine.
        startup_timeout_s=150.0,
    ),
    "s3": Service("s3", _s3_argv, ("s3",), lambda p: (f"http://{HOST}:{p['s3']}/moto-api/",)),
}


@dataclass
class ServiceStatus:
    """State of one service as recorded in its state file and probed now."""

    name: str
    pid: int | None
    url: str | None
    running: bool
    healthy: bool
    log: str | None

    def line(self) -> str:
        state = "healthy" if self.healthy else ("running, not answering" if self.running else "stopped")
        where = f"  {self.url}" if self.url else ""
        pid = f"  pid {self.pid}" if self.pid else ""
        return f"{self.name:<7}{state:<24}{where}{pid}"


BASE_ENV = (
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "CUDA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH",
)
"""Variables of the owner's environment a service keeps: where home and temp files are, locale, which GPUs."""


def service_env(name: str, state_dir: Path, ports: dict[str, int]) -> dict[str, str]:
    """The environment ``name`` runs with: :data:`BASE_ENV` from the owner's, ``PATH`` with this environment's
    ``bin`` first (Ray jobs run ``python`` from the head's PATH), ``VIRTUAL_ENV``, and the service's own settings.
    Nothing else: no cloud credentials, tokens or keys the owner's shell happens to hold."""
    env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
    venv_bin = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(venv_bin), os.environ.get("PATH", os.defpath)])
    env["VIRTUAL_ENV"] = str(venv_bin.parent)
    env.update(SERVICES[name].env(state_dir, ports))
    return env


def _state_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def _alive(pid: int) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _read_state(state_dir: Path, name: str) -> dict | None:
    path = _state_file(state_dir, name)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def service_status(name: str, state_dir: Path | None = None) -> ServiceStatus:
    state_dir = Path(state_dir or default_state_dir())
    svc = SERVICES[name]
    rec = _read_state(state_dir, name)
    if not rec:
        return ServiceStatus(name, None, None, False, False, None)
    running = _alive(rec["pid"])
    healthy = running and all(_http_ok(u) for u in svc.health_urls(rec["ports"]))
    return ServiceStatus(name, rec["pid"], rec["url"], running, healthy, rec.get("log"))


def start_service(name: str, state_dir: Path | None = None, ports: dict[str, int] | None = None) -> ServiceStatus:
    """Start one service (no-op if it already runs healthy) and wait until its health probe answers.

    Raises:
        UserError: unknown service, a port already taken by something else, or a service that did not come up (the
            message points to its log).
    """
    if name not in SERVICES:
        raise UserError(f"unknown service '{name}'; services: {', '.join(SERVICES)}")
    state_dir = Path(state_dir or default_state_dir())
    state_dir.mkdir(parents=True, exist_ok=True)
    current = service_status(name, state_dir)
    if current.healthy:
        return current
    if current.running and current.pid:
        stop_service(name, state_dir)
    svc = SERVICES[name]
    ports = {p: (ports or {}).get(p) or _port(p) for p in svc.ports}
    for p, number in ports.items():
        with socket.socket() as s:
            if s.connect_ex((HOST, number)) == 0:
                raise UserError(
                    f"port {number} on {HOST} ({name} {p}) is already in use; set BRAINIAC_{p.upper().replace('-', '_')}_PORT"
                )
    log_path = state_dir / f"{name}.log"
    env = service_env(name, state_dir, ports)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - our services' fixed argument lists, no shell
            svc.argv(state_dir, ports), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=state_dir, start_new_session=True,
        )  # fmt: skip
    url = svc.url(ports)
    record = {"pid": proc.pid, "ports": ports, "url": url, "log": str(log_path), "started_at": time.time()}
    _state_file(state_dir, name).write_text(json.dumps(record, indent=2))
    write_env_file(state_dir)
    deadline = time.monotonic() + svc.startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{name} exited with status {proc.returncode} while starting; see {log_path}")
        if all(_http_ok(u) for u in svc.health_urls(ports)):
            return service_status(name, state_dir)
        time.sleep(0.5)
    stop_service(name, state_dir)
    raise UserError(f"{name} did not answer within {svc.startup_timeout_s:.0f} s; see {log_path}")


def stop_service(name: str, state_dir: Path | None = None, timeout_s: float = 20.0) -> bool:
    """Stop a service and every process it spawned. Returns True if something was running."""
    import psutil

    state_dir = Path(state_dir or default_state_dir())
    rec = _read_state(state_dir, name)
    if not rec:
        return False
    pid = rec["pid"]
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    # Processes that left the tree but stayed in the service's session (daemonized helpers) go too.
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and os.getsid(p.pid) == pid and p not in procs:
                procs.append(p)
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            continue
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    _state_file(state_dir, name).unlink(missing_ok=True)
    write_env_file(state_dir)
    return bool(procs)


def write_env_file(state_dir: Path) -> Path:
    """Rewrite ``<state_dir>/stack.env`` (mode 0600) for the services recorded now: what a client exports to use the
    stack (``set -a; . stack.env``). It holds the MLflow password, so it is private like the auth config."""
    lines = []
    ray = _read_state(state_dir, "ray")
    if ray:
        lines += [f"RAY_ADDRESS={HOST}:{ray['ports']['ray']}", "RAY_AUTH_MODE=token"]
        token = os.environ.get("RAY_AUTH_TOKEN_PATH") or (
            None if os.environ.get("RAY_AUTH_TOKEN") else str(ensure_ray_token())
        )
        if token:
            lines.append(f"RAY_AUTH_TOKEN_PATH={token}")
    mlflow = _read_state(state_dir, "mlflow")
    creds = mlflow_credentials(state_dir)
    if mlflow:
        lines.append(f"MLFLOW_TRACKING_URI={mlflow['url']}")
        if creds:
            lines += [f"MLFLOW_TRACKING_USERNAME={creds[0]}", f"MLFLOW_TRACKING_PASSWORD={creds[1]}"]
    s3 = _read_state(state_dir, "s3")
    if s3:
        lines.append(f"AWS_ENDPOINT_URL={s3['url']}")
    path = state_dir / "stack.env"
    path.unlink(missing_ok=True)
    _write_private(path, "".join(f"{line}\n" for line in lines))
    return path


def check_names(names: Iterable[str]) -> list[str]:
    """The service names, validated; an unknown one is a user error naming it."""
    names = list(names)
    for n in names:
        if n not in SERVICES:
            raise UserError(f"unknown service '{n}'; services: {', '.join(SERVICES)}")
    return names


def up(names: Iterable[str] = tuple(SERVICES), state_dir: Path | None = None) -> list[ServiceStatus]:
    """Start the named services (all by default) and return their status."""
    return [start_service(n, state_dir) for n in check_names(names)]


def down(names: Iterable[str] = tuple(SERVICES), state_dir: Path | None = None) -> list[str]:
    """Stop the named services (all by default); returns the names that were running."""
    return [n for n in check_names(names) if stop_service(n, state_dir)]


def status(names: Iterable[str] = tuple(SERVICES), state_dir: Path | None = None) -> list[ServiceStatus]:
    return [service_status(n, state_dir) for n in check_names(names)]


def main(argv: list[str] | None = None) -> int:
    """``python -m brainiac.platform.stack up|down|status [service...]`` (used by ``infra/local/stack.sh``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("up", "down", "status"):
        print("usage: python -m brainiac.platform.stack up|down|status [ray|mlflow|s3 ...]", file=sys.stderr)
        return 2
    action, names = args[0], args[1:] or list(SERVICES)
    try:
        if action == "up":
            for st in up(names):
                print(st.line())
        elif action == "down":
            stopped = down(names)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        else:
            sts = status(names)
            for st in sts:
                print(st.line())
            return 0 if all(s.healthy for s in sts) else 1
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
