"""`brainiac submit` and `brainiac jobs`: the shipped wheel (no dependencies, code and configs, installable the way Ray
installs it), what a submission carries (env, GPUs, ids), one-line errors, and real jobs on a real local Ray head."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from base64 import urlsafe_b64encode
from hashlib import sha256
from pathlib import Path

import pytest

from brainiac.platform import jobs_client, stack
from brainiac.platform import wheel as project_wheels
from brainiac.platform.cli.main import main
from brainiac.platform.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wheel-cache")


def _build_outputs() -> dict[str, int]:
    """What an in-tree setuptools build would create or touch in the checkout, with modification times."""
    return {
        p.name: p.stat().st_mtime_ns
        for p in REPO_ROOT.iterdir()
        if p.name in ("build", "dist") or p.name.endswith(".egg-info")
    }


@pytest.fixture(scope="module")
def wheel(wheel_cache: Path) -> project_wheels.ProjectWheel:
    before = _build_outputs()
    built = project_wheels.project_wheel(wheel_cache)
    assert not built.cached
    assert _build_outputs() == before  # built from a copy: no build/ or egg-info written into the checkout
    return built


def test_wheel_ships_code_and_configs_without_dependencies(wheel, wheel_cache):
    assert wheel.path.suffix == ".whl" and 0 < wheel.size < project_wheels.MAX_WHEEL_BYTES
    # Ray names an uploaded wheel by its file name only, so the name must change with the code.
    assert f"+src.{wheel.digest[:12]}-py3-none-any.whl" in wheel.path.name
    with zipfile.ZipFile(wheel.path) as zf:
        names = set(zf.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = zf.read(metadata).decode()
        assert "Requires-Dist" not in meta and "Provides-Extra" not in meta
        assert re.search(r"^Name: brainiac$", meta, re.M)
        assert f"Version: 0.1.0+src.{wheel.digest[:12]}" in meta
        # RECORD must match what is inside, or pip refuses the wheel on the cluster.
        (record,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        for line in zf.read(record).decode().splitlines():
            path, digest, size = line.rsplit(",", 2)
            if digest:
                data = zf.read(path)
                assert digest == "sha256=" + urlsafe_b64encode(sha256(data).digest()).rstrip(b"=").decode(), path
                assert int(size) == len(data)
    assert "brainiac/platform/cli/main.py" in names
    assert "brainiac/platform/jobs_client.py" in names
    shipped = {
        f"brainiac/jobs/configs/{p.relative_to(REPO_ROOT / 'jobs/configs')}"
        for p in (REPO_ROOT / "jobs/configs").rglob("*.yaml")
    }
    assert {"brainiac/jobs/configs/tiny.yaml", "brainiac/jobs/configs/pretrain/tiny.yaml"} <= shipped <= names
    assert not [
        n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith(("tests/", "brainiac/tests"))
    ]
    # Built once per source hash: the second call reuses the file, and no build output lands in the checkout.
    again = project_wheels.project_wheel(wheel_cache)
    assert again.cached and again.path == wheel.path and again.digest == wheel.digest


@pytest.mark.timeout(120)
def test_wheel_installs_the_way_ray_installs_py_modules(wheel, tmp_path):
    """Ray runs ``pip install WHEEL --target DIR`` and puts DIR on PYTHONPATH; nothing may be downloaded."""
    target = tmp_path / "target"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "-q", str(wheel.path), f"--target={target}"],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-2000:]
    probe = (
        "import brainiac.platform.cli.main as m; from brainiac.jobs.config import available_configs; "
        "print(m.__file__); print(','.join(available_configs()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(target)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    module_file, configs = out.stdout.strip().splitlines()
    assert Path(module_file).is_relative_to(target)  # the shipped copy wins over the editable install
    assert {"tiny", "pretrain/tiny"} <= set(configs.split(","))


def test_plan_carries_one_wheel_safe_env_and_resources(wheel):
    environ = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "BRAINIAC_CATALOG": "s3://lake/catalog",
        "AWS_SECRET_ACCESS_KEY": "do-not-ship",
        "BRAINIAC_PSEUDONYM_KEY": "do-not-ship-either-0123456789",
    }
    plan = jobs_client.plan_job("ingest", ["/data/my scans", "--catalog", "s3://lake/c"], wheel=wheel, environ=environ)
    assert plan.runtime_env["py_modules"] == [str(wheel.path)]
    assert "working_dir" not in plan.runtime_env
    assert plan.runtime_env["env_vars"] == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "BRAINIAC_CATALOG": "s3://lake/catalog",
    }
    assert plan.entrypoint == "python -m brainiac.platform.cli.main ingest '/data/my scans' --catalog s3://lake/c"
    assert (plan.entrypoint_num_cpus, plan.entrypoint_num_gpus) == (0.0, 0.0)
    assert re.fullmatch(r"brainiac-ingest-\d{8}T\d{6}Z-[0-9a-f]{4}", plan.submission_id)
    assert plan.metadata["brainiac_job"] == "ingest"

    secret = jobs_client.plan_job("ingest", wheel=wheel, environ=environ, forward_env=["AWS_SECRET_ACCESS_KEY"])
    assert secret.env_names == ["AWS_SECRET_ACCESS_KEY", "BRAINIAC_CATALOG", "MLFLOW_TRACKING_URI"]

    # --gpus: per Train worker for pretrain, per trial for finetune, on the driver for embed / evaluate.
    pre = jobs_client.plan_job("pretrain", ["--workers", "8"], wheel=wheel, gpus=1, environ={})
    assert pre.entrypoint.endswith("pretrain --workers 8 --gpus-per-worker 1") and pre.entrypoint_num_gpus == 0
    fin = jobs_client.plan_job("finetune", wheel=wheel, gpus=0.5, environ={})
    assert fin.entrypoint.endswith("--set finetune.gpus_per_trial=0.5")
    emb = jobs_client.plan_job("embed", wheel=wheel, gpus=1, environ={}, submission_id="my-embed.1")
    assert (emb.entrypoint_num_cpus, emb.entrypoint_num_gpus, emb.submission_id) == (1.0, 1.0, "my-embed.1")
    assert jobs_client.plan_job("promote", wheel=wheel, cpus=2, environ={}).entrypoint_num_cpus == 2.0

    for kwargs, needle in [
        ({"job": "preprocess", "gpus": 1}, "preprocess uses no GPU"),
        ({"job": "pretrain", "gpus": 1, "args": ["--gpus-per-worker", "2"]}, "either --gpus or the job's own"),
        ({"job": "ingest", "forward_env": ["NOT_SET_ANYWHERE"]}, "NOT_SET_ANYWHERE is not set"),
        ({"job": "ingest", "submission_id": "a b"}, "submission id 'a b'"),
        ({"job": "train"}, "unknown job 'train'"),
    ]:
        with pytest.raises(UserError, match=re.escape(needle)):
            jobs_client.plan_job(wheel=wheel, environ={}, **kwargs)


def test_auth_header_is_the_bearer_token_ray_sends(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert jobs_client.auth_headers() == {}
    assert jobs_client.auth_headers("abc") == {"Authorization": "Bearer abc"}
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert jobs_client.auth_headers() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs_client.auth_headers() == {"Authorization": "Bearer from-env"}
    assert jobs_client.auth_headers("flag") == {"Authorization": "Bearer flag"}


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["submit", "train", "--address", "http://127.0.0.1:9"], {}, "unknown job 'train'"),
        (["submit", "ingest", "--address", "http://127.0.0.1:{port}", "--", "x"], {}, "cannot reach the Ray Jobs API"),
        (["submit", "ingest", "--address", "127.0.0.1:6379"], {}, "is not a Jobs API address"),
        (["jobs", "list"], {"RAY_ADDRESS": "127.0.0.1:6379"}, "RAY_ADDRESS=127.0.0.1:6379 is not a Jobs API address"),
        (["jobs", "status", "some-id"], {}, "no Ray cluster given"),
        (["jobs", "logs", "some-id", "--address", "http://127.0.0.1:{port}"], {}, "cannot reach the Ray Jobs API"),
    ],
)
def test_user_errors_are_one_fast_line(argv, env, needle, capsys, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    port = stack.free_port()  # nothing listens there: connection refused
    started = time.monotonic()
    assert main([a.format(port=port) for a in argv]) == 2
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------------------- a real Ray head
@pytest.mark.stack
@pytest.mark.timeout(600)
def test_submit_ingest_preprocess_pretrain_on_a_real_head(tmp_path, wheel_cache, monkeypatch, capsys):
    """Three jobs through the Jobs API on a 4-CPU head started like ``brainiac stack up``; the catalog, the MLflow run
    and the forwarded pseudonym key prove that the jobs ran the shipped code with the submitter's settings."""
    from brainiac.ingestion.synthetic import generate_cohort
    from brainiac.platform.catalog import Catalog
    from brainiac.platform.pseudonym import IDENTITY_FILE, fingerprint

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    # One BIDS dataset of 4 subjects (12 scans): the smallest catalog whose splits all hold a subject (pretrain
    # measures retrieval on val), so the time goes to the job machinery under test rather than to data.
    cohort = generate_cohort(tmp_path / "cohort", subjects=4, seed=1, preset="tiny", cohorts=("bids",))
    sources = [str(cohort.out_dir / cohort.cohorts["bids"])]
    timings["cohort"] = time.monotonic() - t0

    # The head gets none of the submitter's settings: what the jobs see must come through the submission.
    monkeypatch.delenv("BRAINIAC_PSEUDONYM_KEY", raising=False)
    monkeypatch.setenv("BRAINIAC_CONFIG_DIR", str(tmp_path / "head-config"))
    monkeypatch.setenv("BRAINIAC_RAY_NUM_CPUS", "4")
    state = tmp_path / "stack"
    ports = {p: stack.free_port() for p in stack.SERVICES["ray"].ports}
    ray_tmp = Path(tempfile.gettempdir()) / f"brainiac-ray-{ports['ray']}"
    try:
        t0 = time.monotonic()
        url = stack.start_service("ray", state, ports=ports).url
        timings["head"] = time.monotonic() - t0

        catalog, key = tmp_path / "catalog", "submitter-key-0123456789abcdef"
        monkeypatch.setenv("BRAINIAC_CACHE_DIR", str(wheel_cache))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        monkeypatch.setenv("BRAINIAC_CATALOG", str(catalog))
        monkeypatch.setenv("BRAINIAC_PSEUDONYM_KEY", key)
        ids = {}

        def run(job: str, *args: str, extra: tuple[str, ...] = ()) -> str:
            sid = f"test-{job}-{os.getpid()}"
            t = time.monotonic()
            argv = ["submit", job, "--address", url, "--wait", "--submission-id", sid, *extra, "--", *args]
            code = main(argv)
            timings[job] = time.monotonic() - t
            out, err = capsys.readouterr()
            (tmp_path / f"{job}.log").write_text(out + err)  # kept by pytest for a post-mortem
            assert key not in out + err  # the forwarded secret is never printed
            assert code == 0, (out + err)[-3000:]
            assert f"submitted {sid}" in out and f"job {sid} SUCCEEDED" in err
            ids[job] = sid
            return out

        run("ingest", *sources, "--catalog", str(catalog), "--quiet", extra=("--forward-env", "BRAINIAC_PSEUDONYM_KEY"))
        out = run("preprocess", "--config", "tiny", "--quiet", extra=("--forward-env", "BRAINIAC_PSEUDONYM_KEY"))
        assert "volumes" in out  # the job's own summary came back through the log stream
        run(
            "pretrain", "--catalog", str(catalog), "--config", "tiny", "--workers", "1", "--max-steps", "3",
            "--run-name", "submitted", "--quiet",
            "--set", f"pretrain.storage_path={tmp_path / 'runs'}", "--set", "pretrain.checkpoint_every=3",
            "--set", "pretrain.eval_pairs=8",
            # One pass over 6 train volumes gives 192 pairs, plenty for 3 steps; the default (4096 per pass) unions
            # 22 copies of the read, and Ray Data's 1.5-CPU share split over so many operators starves every read.
            "--set", "patches.min_pairs_per_pass=64",
        )  # fmt: skip

        client = jobs_client.connect(url)
        for job, sid in ids.items():
            assert str(client.get_job_status(sid)) == "SUCCEEDED", job
            info = client.get_job_info(sid)
            timings[f"{job} on the cluster"] = (info.end_time - info.start_time) / 1000
            assert info.runtime_env["py_modules"][0].endswith(".whl") and "working_dir" not in info.runtime_env
        # The cluster installed the shipped wheel (Ray's py_modules resources), not the checkout.
        installed = list(ray_tmp.glob("session_*/runtime_resources/py_modules_files/*/brainiac/platform/cli/main.py"))
        assert installed, list(ray_tmp.glob("session_*/runtime_resources/*"))

        cat = Catalog.open(str(catalog))
        assert cat.table("scans").to_pyarrow_table().num_rows > 0
        assert cat.table("volumes").to_pyarrow_table().num_rows > 0
        # BRAINIAC_CATALOG reached preprocess (no --catalog there), and the key came only through --forward-env.
        identity = json.loads((catalog / IDENTITY_FILE).read_text())
        assert identity["pseudonym_key_fingerprint"] == fingerprint(key.encode())

        from mlflow import MlflowClient

        store = f"sqlite:///{tmp_path / 'mlflow.db'}"
        tracking = MlflowClient(store, registry_uri=store)  # not the registry an earlier test made global
        runs = tracking.search_runs([e.experiment_id for e in tracking.search_experiments()])
        (run_id,) = [r.info.run_id for r in runs if r.info.run_name == "submitted" and r.info.status == "FINISHED"]
        assert tracking.get_model_version_by_alias("brainiac-encoder", "candidate").run_id == run_id

        assert main(["jobs", "list", "--address", url]) == 0
        listing = capsys.readouterr().out
        assert all(sid in listing for sid in ids.values()) and "SUCCEEDED" in listing
        assert main(["jobs", "logs", ids["pretrain"], "--address", url]) == 0
        assert "pretrain" in capsys.readouterr().out
        assert main(["jobs", "status", ids["ingest"], "--address", url]) == 0
        assert "SUCCEEDED" in capsys.readouterr().out
        assert main(["jobs", "status", "no-such-job", "--address", url]) == 2
        assert "no job 'no-such-job'" in capsys.readouterr().err
        # A failing job: --wait exits 1 with the status as its last line.
        assert main(["submit", "promote", "--address", url, "--wait", "--", "--no-such-flag"]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1].split()[2] == "FAILED"
        # A long run is stopped once it runs; following it then ends with exit status 1 and STOPPED.
        long_run = [
            "--catalog", str(catalog), "--config", "tiny", "--workers", "1", "--max-steps", "100000", "--quiet",
            "--set", "patches.min_pairs_per_pass=64", "--set", f"pretrain.storage_path={tmp_path / 'runs'}",
        ]  # fmt: skip
        t0 = time.monotonic()
        assert main(["submit", "pretrain", "--address", url, "--submission-id", "long", "--", *long_run]) == 0
        deadline = time.monotonic() + 120
        while str(client.get_job_status("long")) == "PENDING" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert main(["jobs", "stop", "long", "--address", url]) == 0
        assert "stop requested for long" in capsys.readouterr().out
        assert main(["jobs", "logs", "long", "--follow", "--address", url]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("job long STOPPED")
        timings["submit, run, stop"] = time.monotonic() - t0
    finally:
        stack.stop_service("ray", state)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        with capsys.disabled():
            print("\ntimings (s):", {k: round(v, 1) for k, v in timings.items()})
