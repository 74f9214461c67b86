"""Deploy files under infra/ (KubeRay, the Ray cluster launcher, the MLflow server): they parse, every command line names
a real command with real flags, the files agree with each other, services publish on loopback, and nothing holds a
credential. Users deploy with these files as they are, so a typo here is a failed cluster start there.

No Ray and no network: the ``brainiac`` CLI is inspected as the click command it is, ``ray start`` and ``mlflow server``
through the option decorators in their installed sources, and the cluster-launcher file is validated against the
schema Ray ships.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from functools import cache
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
import yaml

from brainiac.platform.cli.main import app

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "aws-gpu.yaml"
CLUSTER_ENV = INFRA / "cluster-launcher" / "cluster.env.example"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
MLFLOW_K8S = INFRA / "mlflow" / "mlflow-k8s.yaml"
README = INFRA / "README.md"
EXPECTED = [
    KUBERAY / "raycluster.yaml",
    KUBERAY / "rayjob-pretrain.yaml",
    KUBERAY / "rayjob-ingest.yaml",
    KUBERAY / "Dockerfile",
    LAUNCHER,
    CLUSTER_ENV,
    COMPOSE,
    MLFLOW_K8S,
    INFRA / "mlflow" / "Dockerfile",
    README,
]

SECRET_NAME = "brainiac-env"
"""The Secret every Ray pod reads its environment from (built from cluster.env)."""
KEY_SECRET_NAME = "brainiac-pseudonym-key"
"""The Secret holding the catalog's pseudonym key: mounted on ingest drivers only."""
RAY_VERSION = version("ray")
MLFLOW_VERSION = version("mlflow")
PROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
ANNOUNCED_COMMANDS = {"submit", "jobs", "quickstart", "promote", "predict"}
"""Commands the README may name before they exist in the CLI."""
RUNTIME_ENV_KEYS = {
    "working_dir", "py_modules", "py_executable", "excludes", "pip", "uv", "conda", "env_vars", "config",
    "container", "image_uri", "nsight", "java_jars", "mpi", "worker_process_setup_hook",
}  # fmt: skip
AWS_INSTANCES = {  # instance type: (vCPUs, GPUs)
    "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0), "m6i.8xlarge": (32, 0), "m6i.16xlarge": (64, 0),
    "g5.xlarge": (4, 1), "g5.12xlarge": (48, 4), "g5.48xlarge": (192, 8),
    "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_docs(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d.get("kind") == kind]


def _cluster_specs() -> list[tuple[str, dict]]:
    """Every RayClusterSpec: standalone RayClusters and the clusters RayJobs create."""
    specs = [(f"{p.name}:{d['metadata']['name']}", d["spec"]) for p, d in _kuberay_docs("RayCluster")]
    specs += [(f"{p.name}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for p, d in _kuberay_docs("RayJob")]
    return [(name, spec) for name, spec in specs if spec]


def _groups(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def _ray_container(group: dict) -> dict:
    """KubeRay runs Ray in the first container of a group's pod template."""
    return group["template"]["spec"]["containers"][0]


def _all_ray_containers() -> Iterator[tuple[str, dict, dict]]:
    for name, spec in _cluster_specs():
        for group_name, group in _groups(spec):
            yield f"{name}/{group_name}", group, _ray_container(group)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _launcher() -> dict:
    (cfg,) = _docs(LAUNCHER)
    return cfg


LAUNCHER_COMMAND_KEYS = (
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands",
)  # fmt: skip


def _command_lines() -> list[tuple[str, str]]:
    """Every shell command line in the infra YAMLs: RayJob entrypoints, launcher commands, container commands."""
    lines = [(f"{p.name}:{d['metadata']['name']}", d["spec"]["entrypoint"]) for p, d in _kuberay_docs("RayJob")]
    cfg = _launcher()
    lines += [(f"{LAUNCHER.name}:{key}", c) for key in LAUNCHER_COMMAND_KEYS for c in cfg.get(key) or []]
    for path in [*sorted(KUBERAY.glob("*.yaml")), MLFLOW_K8S]:
        for doc in _docs(path):
            for container in _containers_in(doc):
                argv = [*container.get("command", []), *container.get("args", [])]
                if argv:
                    lines.append((f"{path.name}:{container['name']}", shlex.join(argv)))
                if argv[:1] and Path(argv[0]).name in ("sh", "bash") and "-c" in argv[:-1]:  # sh -c SCRIPT
                    lines.append((f"{path.name}:{container['name']}", argv[argv.index("-c") + 1]))
                for hook in container.get("lifecycle", {}).values():
                    cmd = hook.get("exec", {}).get("command", [])
                    if cmd[:1] and Path(cmd[0]).name in ("sh", "bash") and "-c" in cmd[:-1]:
                        lines.append((f"{path.name}:{container['name']}", cmd[cmd.index("-c") + 1]))
    return lines


def _containers_in(node) -> Iterator[dict]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers_in(item)


# ---------------------------------------------------------------------------------------------------------------------
# Shell command lines


def _segments(line: str) -> list[list[str]]:
    """Split a shell line into simple commands (at ``&&``, ``||``, ``;``, ``|``, parentheses), each a token list."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="();&|<>")
    lexer.whitespace_split = True
    segments, current = [], []
    for token in lexer:
        if token and set(token) <= set("();&|"):
            if current:
                segments.append(current)
            current = []
        else:
            current.append(token)
    if current:
        segments.append(current)
    return segments


def _invocations(line: str, program: str) -> list[list[str]]:
    """Arguments of every call of ``program`` in ``line`` (after leading ``VAR=value`` assignments)."""
    calls = []
    for seg in _segments(line):
        words = list(seg)
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            words.pop(0)
        if words and (words[0] == program or words[0].endswith(f"/{program}")):
            calls.append(words[1:])
    return calls


@cache
def _cli():
    return typer.main.get_command(app)


def _parse_brainiac(args: list[str]):
    """Resolve ``brainiac ARGS`` to its click command and parse the arguments exactly as the CLI would (without running
    anything). Returns ``(command path, click context)``; raises ``AssertionError`` naming what is wrong."""
    cmd, path, rest = _cli(), ["brainiac"], list(args)
    while hasattr(cmd, "commands"):
        assert rest, f"'{' '.join(path)}' needs a sub-command; it has {sorted(cmd.commands)}"
        assert rest[0] in cmd.commands, f"'{' '.join(path)}' has no command '{rest[0]}'; it has {sorted(cmd.commands)}"
        path.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    try:
        ctx = cmd.make_context(" ".join(path), list(rest))  # click consumes the list it gets
    except Exception as exc:  # click's UsageError / BadParameter: unknown option, missing argument, wrong type
        raise AssertionError(f"'{' '.join(path)} {shlex.join(rest)}': {exc}") from None
    return path, ctx


def _catalog_values() -> set[str]:
    return {_env(c)["BRAINIAC_CATALOG"]["value"] for _, _, c in _all_ray_containers()}


# ---------------------------------------------------------------------------------------------------------------------
# Parsing


def test_expected_files_exist_and_every_yaml_parses():
    missing = [str(p.relative_to(REPO)) for p in EXPECTED if not p.is_file()]
    assert not missing, missing
    yamls = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
    assert len(yamls) >= 6
    for path in yamls:
        docs = _docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path
    # Strings that are YAML themselves: each RayJob's runtime environment.
    jobs = _kuberay_docs("RayJob")
    assert {d["metadata"]["name"] for _, d in jobs} >= {"brainiac-pretrain", "brainiac-ingest"}
    for path, job in jobs:
        text = job["spec"].get("runtimeEnvYAML")
        if text is None:
            continue
        env = yaml.safe_load(text)
        assert isinstance(env, dict) and env, path
        assert set(env) <= RUNTIME_ENV_KEYS, (path, set(env) - RUNTIME_ENV_KEYS)
        # Ray rejects non-string env values; unquoted YAML numbers and booleans are the usual slip.
        bad = {k: v for k, v in env.get("env_vars", {}).items() if not isinstance(v, str)}
        assert not bad, (path, bad)


def test_cluster_env_example_is_a_plain_env_file():
    keys = []
    for raw in CLUSTER_ENV.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # Ray's own settings keep their lower-case names (RAY_num_workers_soft_limit)
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", line), (
            f"not KEY=VALUE (kubectl --from-env-file, sh): {raw!r}"
        )
        keys.append(line.split("=", 1)[0])
    assert {"MLFLOW_TRACKING_URI", "BRAINIAC_CATALOG", "AWS_REGION", "RAY_num_workers_soft_limit"} <= set(keys)


# ---------------------------------------------------------------------------------------------------------------------
# Commands and flags


def test_every_brainiac_command_line_is_a_real_command_with_real_options():
    lines = _command_lines()
    found = []
    for where, line in lines:
        for args in _invocations(line, "brainiac"):
            path, _ = _parse_brainiac(args)
            found.append((where, path[1]))
        for module in re.findall(r"\bpython3?(?:\.\d+)?\s+-m\s+([A-Za-z_][\w.]*)", line):
            assert importlib.util.find_spec(module) is not None, f"{where}: python -m {module} does not import"
    jobs = {where for where, _ in found if where.endswith(("brainiac-pretrain", "brainiac-ingest"))}
    assert jobs == {"rayjob-pretrain.yaml:brainiac-pretrain", "rayjob-ingest.yaml:brainiac-ingest"}, found
    assert {cmd for _, cmd in found} >= {"pretrain", "ingest", "preprocess"}
    assert any(where.startswith(LAUNCHER.name) for where, _ in found), "the launcher checks the installed CLI"


def test_the_checker_rejects_what_the_cli_rejects():
    with pytest.raises(AssertionError, match="no command 'pretrian'"):
        _parse_brainiac(["pretrian", "--workers", "2"])
    with pytest.raises(AssertionError, match="--gpus"):
        _parse_brainiac(["pretrain", "--gpus", "8"])
    with pytest.raises(AssertionError, match=r"--workers N.*integer"):
        _parse_brainiac(["pretrain", "--workers", "N"])
    assert _invocations("set -a && . f && RAY_X=1 brainiac config list || exit 1", "brainiac") == [["config", "list"]]


def test_entrypoints_use_the_cluster_they_run_on():
    catalogs = _catalog_values()
    assert len(catalogs) == 1, catalogs
    for path, job in _kuberay_docs("RayJob"):
        spec = job["spec"]
        cluster = spec["rayClusterSpec"]
        replicas = "maxReplicas" if cluster.get("enableInTreeAutoscaling") else "replicas"
        gpus = sum(
            int(_ray_container(g)["resources"]["limits"].get("nvidia.com/gpu", 0)) * g[replicas]
            for g in cluster.get("workerGroupSpecs", [])
        )
        for args in _invocations(spec["entrypoint"], "brainiac"):
            path_, ctx = _parse_brainiac(args)
            if path_[1] == "ingest":  # the catalog's one pseudonym key reaches the head, where the driver runs
                head = _ray_container(cluster["headGroupSpec"])
                assert _key_secret_mounted(head), path.name
            # --catalog, where given, is the catalog the pods are configured with.
            if ctx.params.get("catalog") is not None:
                assert {ctx.params["catalog"]} == catalogs, (path.name, ctx.params["catalog"])
            if path_[1] == "pretrain" and (ctx.params.get("gpus_per_worker") or 0) > 0:
                need = ctx.params["workers"] * ctx.params["gpus_per_worker"]
                assert need <= gpus, f"{path.name}: {need} GPUs asked, the job's cluster has {gpus}"


def test_rayjob_lifecycle_fields():
    for path, job in _kuberay_docs("RayJob"):
        spec = job["spec"]
        assert job["apiVersion"] == "ray.io/v1"
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), path
        if "rayClusterSpec" in spec:
            assert spec["shutdownAfterJobFinishes"] is True, path
            assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
        assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0, path
        assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "InteractiveMode"}


def _package_dir(name: str) -> Path:
    """Where an installed package lives, found without importing it."""
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def _option_strings(call: ast.Call) -> set[str]:
    """``"--on/--off", "-o"`` of a ``click.option(...)`` call, split into single option strings."""
    out: set[str] = set()
    for arg in call.args:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
            out.update(arg.value.split("/"))
    return out


def _click_options(source: Path, function: str, shared: Path | None = None) -> set[str]:
    """Option strings of the click command ``function`` in ``source``, read from its decorators with ``ast``: importing
    Ray's or MLflow's CLI costs seconds, reading the source milliseconds (both are pinned in constraints.txt).
    ``shared`` resolves decorators that are module-level ``NAME = click.option(...)`` in another module."""
    named: dict[str, set[str]] = {}
    if shared is not None:
        for node in ast.parse(shared.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                named.update({t.id: _option_strings(node.value) for t in node.targets if isinstance(t, ast.Name)})
    tree = ast.parse(source.read_text())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    options: set[str] = set()
    for dec in func.decorator_list:
        if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "option":
            options |= _option_strings(dec)
        elif isinstance(dec, ast.Attribute) and dec.attr in named:
            options |= named[dec.attr]
    return options


@cache
def _ray_start_flags() -> set[str]:
    # The shared logging options (--log-style, --log-color, -v) come from another decorator and are not read here.
    flags = _click_options(_package_dir("ray") / "scripts" / "scripts.py", "start")
    assert {"--head", "--address", "--port", "--num-gpus", "--dashboard-host"} <= flags, "ray start not read"
    return flags


def test_ray_start_flags_exist_in_the_installed_ray():
    flags = _ray_start_flags()
    for name, spec in _cluster_specs():
        for group_name, group in _groups(spec):
            params = group["rayStartParams"]
            # KubeRay's CRD types rayStartParams as map[string]string: a bare number is rejected by the API server.
            assert all(isinstance(v, str) for v in params.values()), (name, group_name, params)
            unknown = {k for k in params if f"--{k}" not in flags}
            assert not unknown, (name, group_name, unknown)
    cfg = _launcher()
    starts = [
        (key, args)
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for line in cfg[key]
        for args in _invocations(line, "ray")
        if args[:1] == ["start"]
    ]
    assert {key for key, _ in starts} == {"head_start_ray_commands", "worker_start_ray_commands"}
    for key, args in starts:
        unknown = {a.split("=", 1)[0] for a in args[1:] if a.startswith("-")} - flags
        assert not unknown, (key, unknown)


@cache
def _mlflow_server_flags() -> set[str]:
    mlflow_dir = _package_dir("mlflow")
    flags = _click_options(mlflow_dir / "cli" / "__init__.py", "server", shared=mlflow_dir / "utils" / "cli_args.py")
    assert {"--backend-store-uri", "--host", "--port", "--artifacts-destination", "--allowed-hosts"} <= flags
    return flags


def _flags(argv: list[str]) -> dict[str, str | None]:
    out, i = {}, 0
    while i < len(argv):
        if argv[i].startswith("--"):
            name, _, value = argv[i].partition("=")
            if not value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            out[name] = value or None
        i += 1
    return out


def test_mlflow_servers_use_real_flags_a_database_and_s3_artifacts():
    flags = _mlflow_server_flags()
    (deployment, service) = _docs(MLFLOW_K8S)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    compose = _docs(COMPOSE)[0]["services"]["mlflow"]
    for where, argv, env in (("k8s", container["args"], _env(container)), ("compose", compose["command"], None)):
        assert argv[0] == "server", where
        used = _flags(argv[1:])
        assert set(used) <= flags, (where, set(used) - flags)
        assert used["--artifacts-destination"].startswith(("s3://", "${")), where
        assert used["--host"] == "0.0.0.0", where  # inside its container/pod; exposure is decided by ports/Service
        if env is not None:  # the backend URI, with its password, only ever from a Secret
            ref = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == "MLFLOW_BACKEND_STORE_URI"
    assert compose["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert service["spec"]["type"] == "ClusterIP"
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    # One MLflow server image, the MLflow release the platform is tested with, built from infra/mlflow/Dockerfile.
    assert container["image"] == compose["image"] and compose["image"].endswith(f":{MLFLOW_VERSION}")
    assert f"mlflow=={MLFLOW_VERSION}" in (INFRA / "mlflow" / "Dockerfile").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# Consistency across files


def test_one_image_and_ray_version_everywhere():
    images = {c["image"] for _, _, c in _all_ray_containers()}
    for _, job in _kuberay_docs("RayJob"):
        images |= {c["image"] for c in _containers_in(job["spec"].get("submitterPodTemplate", {}))}
    images.add(_launcher()["docker"]["image"])
    assert len(images) == 1, images
    (image,) = images
    assert image.endswith(f":{PROJECT_VERSION}"), f"image tag should be the project version {PROJECT_VERSION}: {image}"
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION, name
    base = re.search(r"^FROM\s+(\S+)", (KUBERAY / "Dockerfile").read_text(), re.M).group(1)
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-gpu", base
    # The launcher re-installs the project wheel of the same version over the image's copy.
    wheel = f"brainiac-{PROJECT_VERSION}-py3-none-any.whl"
    assert any(wheel in c for c in _launcher()["setup_commands"])


def test_gpu_groups_agree_with_their_resources():
    gpu_groups = 0
    for name, spec in _cluster_specs():
        for group_name, group in _groups(spec):
            res = _ray_container(group)["resources"]
            limits, requests = res["limits"], res.get("requests", {})
            assert {"cpu", "memory"} <= set(limits), (name, group_name)
            gpus = limits.get("nvidia.com/gpu")
            num_gpus = group["rayStartParams"].get("num-gpus")
            if gpus is None:
                assert num_gpus in (None, "0"), (name, group_name)
                assert "nvidia.com/gpu" not in requests, (name, group_name)
            else:
                gpu_groups += 1
                assert group_name != "head", name
                assert num_gpus is None or int(num_gpus) == int(gpus), (name, group_name, num_gpus, gpus)
                assert requests.get("nvidia.com/gpu", gpus) == gpus, (
                    name,
                    group_name,
                )  # Kubernetes: requests == limits
            num_cpus = group["rayStartParams"].get("num-cpus")
            if num_cpus is not None:
                assert float(num_cpus) <= float(limits["cpu"]), (name, group_name)
            if group_name != "head":
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (name, group_name)
    assert gpu_groups >= 2  # the RayCluster's and the pretraining job's


def test_every_ray_pod_has_shared_memory_env_and_token_auth():
    seen = 0
    for name, group, container in _all_ray_containers():
        seen += 1
        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        shm = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert len(shm) == 1, name
        assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", name

        sources = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert sources in ([SECRET_NAME], [SECRET_NAME, KEY_SECRET_NAME]), (name, sources)
        env = _env(container)
        ref = env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == SECRET_NAME and ref["key"] == "MLFLOW_TRACKING_URI" and not ref.get("optional"), name
        assert env["BRAINIAC_CATALOG"]["value"].startswith("s3://"), name
        for var, entry in env.items():
            if re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|PSEUDONYM_KEY", var):
                assert "value" not in entry, f"{name}: {var} must come from a Secret, not a literal"
        # The operator sets RAY_AUTH_MODE=token (authOptions); a container must never switch it off.
        assert env.get("RAY_AUTH_MODE", {}).get("value") in (None, "token"), name
    assert seen >= 5
    for name, spec in _cluster_specs():
        assert spec["authOptions"]["mode"] == "token", name


def test_launcher_passes_rays_schema_and_matches_its_instances():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((_package_dir("ray") / "autoscaler" / "ray-schema.json").read_text())
    cfg = _launcher()
    jsonschema.validate(cfg, schema)

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0  # drivers only on the head
    gpu_types = 0
    for name, node in types.items():
        cpus, gpus = AWS_INSTANCES[node["node_config"]["InstanceType"]]
        res = node["resources"]
        if name != cfg["head_node_type"]:
            assert res.get("CPU") == cpus and res.get("GPU", 0) == gpus, (name, res)
            assert node.get("min_workers", 0) <= node["max_workers"] <= cfg["max_workers"], name
        gpu_types += gpus > 0
    assert gpu_types >= 1

    # Token auth on every node, with the token and the environment mounted from outside the repository.
    mounts = cfg["file_mounts"]
    assert mounts["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    env_file = next(remote for remote, local in mounts.items() if local.endswith("cluster.env"))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = cfg[key][-1]
        assert "export RAY_AUTH_MODE=token" in start and f". {env_file}" in start, key
    head = next(a for line in cfg["head_start_ray_commands"] for a in _invocations(line, "ray") if a[:1] == ["start"])
    assert "--dashboard-host=127.0.0.1" in head and "--port=6379" in head
    worker = next(
        a for line in cfg["worker_start_ray_commands"] for a in _invocations(line, "ray") if a[:1] == ["start"]
    )
    assert "--address=$RAY_HEAD_IP:6379" in worker
    wheel_dir = next(remote for remote, local in mounts.items() if local == "./dist")
    assert any(f"{wheel_dir}/brainiac-" in c for c in cfg["setup_commands"])


def _resolve_defaults(text: str) -> str:
    """Compose interpolation as it happens with nothing set: ``${VAR:-default}`` → default."""
    return re.sub(r"\$\{[A-Za-z_]\w*:?-([^}]*)\}", r"\1", text)


def test_compose_publishes_on_loopback_only():
    (compose,) = _docs(COMPOSE)
    published = 0
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
                continue
            parts = _resolve_defaults(str(port)).split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", f"{name}: {port} publishes beyond loopback"
        assert service.get("network_mode") != "host", name
    assert published >= 1
    assert "ports" not in compose["services"]["postgres"]


# ---------------------------------------------------------------------------------------------------------------------
# No credentials


_PLACEHOLDER = re.compile(r"^(\$\{.*|\$\(.*|\$[A-Za-z_]\w*.*|<.*>?|)$")
"""Values that are not secrets: empty, ``${VAR}``, ``$(command)``, ``$VAR``, ``<fill me in>``."""
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?<![{$])\b([\w.-]*(?:password|passwd|secret|token|api[_-]?key)[\w.-]*)[\"']?[ \t]*[:=][ \t]*([^\s,;)]*)"
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_AWS_SECRET = re.compile(
    r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*\d)(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
)
_URI_PASSWORD = re.compile(r"\b[a-z][\w+.-]*://[^\s/:@]+:([^\s/@]+)@")
MOTO_DUMMY = {"test"}
"""The local S3 server (moto) accepts any key; the README uses its documented dummy."""


def _credential_findings(text: str) -> list[str]:
    found = [m.group(0) for m in _AWS_KEY_ID.finditer(text)]
    found += [m.group(0) for m in _AWS_SECRET.finditer(text)]
    for m in _SECRET_ASSIGNMENT.finditer(text):
        value = m.group(2).strip("\"'`")
        if not _PLACEHOLDER.match(value) and value not in MOTO_DUMMY and not value.startswith(("~/", "./", "/")):
            found.append(m.group(0))
    found += [m.group(0) for m in _URI_PASSWORD.finditer(text) if not _PLACEHOLDER.match(m.group(1))]
    return found


def test_credential_scanner_catches_planted_secrets():
    secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert _credential_findings(f"AWS_SECRET_ACCESS_KEY={secret}")
    assert _credential_findings("aws_access_key_id: AKIA" + "IOSFODNN7EXAMPLE")
    assert _credential_findings("POSTGRES_PASSWORD: hunter2")
    assert _credential_findings("uri: postgresql://mlflow:hunter2@db:5432/mlflow")
    assert not _credential_findings("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}\nkey: AWS_SECRET_ACCESS_KEY")


def test_no_literal_credentials_in_infra_files():
    files = [p for d in (KUBERAY, LAUNCHER.parent, COMPOSE.parent) for p in sorted(d.rglob("*")) if p.is_file()]
    files.append(README)
    assert len(files) >= len(EXPECTED)
    findings = {str(p.relative_to(REPO)): f for p in files if (f := _credential_findings(p.read_text()))}
    assert not findings, findings


# ---------------------------------------------------------------------------------------------------------------------
# README


def _readme_command_lines(text: str) -> list[str]:
    """Shell lines of the README's fenced code blocks (continuations joined, comments dropped), ``$B`` as brainiac."""
    lines = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(re.sub(r"(^|\s)\$B(?=\s)", r"\1brainiac", line))
    return lines


def test_readme_names_real_files_commands_and_the_environment():
    text = README.read_text()
    for rel in set(re.findall(r"\binfra/[\w./-]*[\w/]", text)):
        assert (REPO / rel).exists(), f"README mentions {rel}, which does not exist"
    for var in ("RAY_ADDRESS", "BRAINIAC_CATALOG", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "RAY_AUTH_TOKEN"):
        assert var in text, var
    existing = set(_cli().commands)
    checked = set()
    for line in _readme_command_lines(text):
        for args in _invocations(line, "brainiac"):
            if args[0] not in existing:
                assert args[0] in ANNOUNCED_COMMANDS, f"README runs 'brainiac {args[0]}', which does not exist"
                continue
            path, ctx = _parse_brainiac(args)
            checked.add(path[1])
            if path[1] == "submit":  # the job's own arguments must parse as `brainiac JOB ARGS` too
                _parse_brainiac([ctx.params["job"], *ctx.params.get("job_args", [])])
    assert {"ingest", "pretrain", "stack"} <= checked, checked
    inline = set(re.findall(r"`brainiac ([a-z][\w-]*)", text))
    assert inline <= existing | ANNOUNCED_COMMANDS, inline - existing - ANNOUNCED_COMMANDS


def _key_secret_mounted(container: dict) -> bool:
    refs = [e["secretRef"] for e in container.get("envFrom", []) if "secretRef" in e]
    refs += [
        e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
    ]
    return any(r["name"] == KEY_SECRET_NAME and not r.get("optional") for r in refs)


def test_the_pseudonym_key_reaches_only_ingest_drivers():
    """With the key, any job could brute-force short hospital IDs through the HMAC: only the head of a job that runs
    `brainiac ingest` mounts it, never a worker, the long-lived cluster or another job, and never the shared env file."""
    mounted = []
    for name, group, container in _all_ray_containers():
        env = _env(container)
        assert "BRAINIAC_PSEUDONYM_KEY" not in env or _key_secret_mounted(container), name
        if _key_secret_mounted(container) or "BRAINIAC_PSEUDONYM_KEY" in env:
            mounted.append((name, group.get("groupName", "head")))
    ingest_heads = []
    for path, job in _kuberay_docs("RayJob"):
        if any(_parse_brainiac(a)[0][1] == "ingest" for a in _invocations(job["spec"]["entrypoint"], "brainiac")):
            ingest_heads.append(path.name)
    assert ingest_heads and all(group == "head" for _, group in mounted), mounted
    assert len(mounted) == len(ingest_heads), (mounted, ingest_heads)
    env_file = (REPO / "infra" / "cluster-launcher" / "cluster.env.example").read_text()
    assert not re.search(r"^\s*#?\s*BRAINIAC_PSEUDONYM_KEY\s*=", env_file, re.M)
