"""Session-wide fixtures: an isolated environment, one local Ray, real S3 and MLflow servers on loopback, and the tiny
pipeline that later stages extend (cohort -> catalog -> volumes -> encoder), built once per test run."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

# Isolate every test run from the user's own config, keys and clusters before anything imports Ray or MLflow. Ray
# runs with token auth (brainiac.platform.cluster), its token in the isolated config dir below.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("BRAINIAC_CATALOG", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("BRAINIAC_STORAGE_OPTIONS", None)

from brainiac.jobs.config import Config, load_config
from brainiac.platform import stack
from brainiac.platform.config import ClusterConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RAY = ClusterConfig(num_cpus=4, object_store_memory_mb=256, include_dashboard=False)
"""More logical CPUs than the 2 cores, so that Train workers, Tune trials and Ray Data cannot starve each other."""


RAY_FIXTURES = {"ray_session", "pipeline", "tour"}
"""Fixtures that run Ray; a test using one must carry an explicit ``@pytest.mark.timeout`` so a hang fails fast."""

SERVICE_FIXTURES = {"s3_server", "s3_options", "s3_bucket", "mlflow_server", "services", "tour"}
"""Fixtures that start real servers (moto S3, MLflow, the local stack): their tests are ``integration``."""

SLOW_FIXTURES = {"synth_study", "tour"}
"""Fixtures that cost a minute or more to build (the learnability cohort, a whole quickstart)."""

SLOW_TIMEOUT_S = 240
"""A test that allows itself this long (``@pytest.mark.timeout``) runs a job end to end: ``slow``."""

TIERS = {
    "ray": "uses Ray (a Ray fixture, or marked by hand when it starts Ray itself)",
    "integration": "starts or talks to real services (moto S3, MLflow server, the local stack)",
    "slow": f"runs a job end to end (timeout >= {SLOW_TIMEOUT_S} s, or a fixture that builds a cohort or a quickstart)",
    "unit": "none of the above: the quick tier (`infra/local/test.sh --quick`)",
}
"""Test tiers, applied by :func:`pytest_collection_modifyitems` from what each test uses; never set ``unit`` by hand."""


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def tiers_of(item: pytest.Item) -> set[str]:
    """The tiers a collected test belongs to, from its fixtures and markers (``unit`` when it is in no other)."""
    fixtures = set(getattr(item, "fixturenames", ()))
    tiers = {name for name in ("ray", "integration", "slow") if item.get_closest_marker(name) is not None}
    if fixtures & RAY_FIXTURES:
        tiers.add("ray")
    if fixtures & SERVICE_FIXTURES or item.get_closest_marker("stack") is not None:
        tiers.add("integration")
    timeout = item.get_closest_marker("timeout")
    seconds = timeout.args[0] if timeout is not None and timeout.args else timeout and timeout.kwargs.get("timeout")
    if fixtures & SLOW_FIXTURES or (isinstance(seconds, int | float) and seconds >= SLOW_TIMEOUT_S):
        tiers.add("slow")
    return tiers or {"unit"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [
        item.nodeid
        for item in items
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("timeout") is None
    ]
    if missing:
        raise pytest.UsageError(f"Ray tests without @pytest.mark.timeout: {', '.join(missing)}")
    if any(item.get_closest_marker("unit") is not None for item in items):
        raise pytest.UsageError("the unit tier is derived from what a test uses; remove @pytest.mark.unit")
    for item in items:
        for tier in tiers_of(item):
            item.add_marker(tier)


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private config dir (pseudonym key) and stack dir for the whole run; nothing lands in the user's home."""
    home = tmp_path_factory.mktemp("brainiac-home")
    old = {k: os.environ.get(k) for k in ("BRAINIAC_CONFIG_DIR", "BRAINIAC_STACK_DIR", "BRAINIAC_PSEUDONYM_KEY")}
    os.environ["BRAINIAC_CONFIG_DIR"] = str(home / "config")
    os.environ["BRAINIAC_STACK_DIR"] = str(home / "stack")
    os.environ.pop("BRAINIAC_PSEUDONYM_KEY", None)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def pseudonym_key() -> Iterator[str]:
    """A fixed pseudonym key for the session's pipeline (tests of key handling use their own)."""
    key = "test-pseudonym-key-0123456789abcdef"
    os.environ["BRAINIAC_PSEUDONYM_KEY"] = key
    yield key
    os.environ.pop("BRAINIAC_PSEUDONYM_KEY", None)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """One in-process local Ray for the whole run (``address="local"``: never joins a stray cluster)."""
    import ray

    from brainiac.platform.cluster import init_ray

    runtime = init_ray(TINY_RAY)
    yield runtime
    ray.shutdown()


@dataclass(frozen=True)
class Server:
    """A real service started on loopback for the test session."""

    name: str
    url: str
    pid: int
    state_dir: str = ""
    """Where its PID file, log and (MLflow) auth config live."""


def _start(name: str, state_dir: Path) -> Iterator[Server]:
    ports = {p: stack.free_port() for p in stack.SERVICES[name].ports}
    st = stack.start_service(name, state_dir, ports=ports)
    assert st.healthy and st.url and st.pid
    try:
        yield Server(name, st.url, st.pid, str(state_dir))
    finally:
        stack.stop_service(name, state_dir)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """moto's S3 HTTP server on 127.0.0.1 (a real S3 API, not an in-process mock)."""
    yield from _start("s3", tmp_path_factory.mktemp("s3-server"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An ``mlflow server`` with a sqlite backend and basic auth on 127.0.0.1. Its admin login is exported as
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` while it runs, as a user of a protected server does."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    old = {k: os.environ.get(k) for k in keys}
    for server in _start("mlflow", tmp_path_factory.mktemp("mlflow-server")):
        creds = stack.mlflow_credentials(Path(server.state_dir))
        assert creds is not None
        os.environ.update(zip(keys, creds, strict=True))
        try:
            yield server
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="session")
def s3_options(s3_server: Server) -> dict[str, str]:
    """Storage options (deltalake vocabulary) for the moto server; moto accepts any credentials."""
    return {
        "AWS_ENDPOINT_URL": s3_server.url,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_ALLOW_HTTP": "true",
        "AWS_CONDITIONAL_PUT": "etag",
    }


@pytest.fixture
def s3_bucket(s3_options: dict[str, str]) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=s3_options["AWS_ENDPOINT_URL"],
        region_name=s3_options["AWS_REGION"],
        aws_access_key_id=s3_options["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_options["AWS_SECRET_ACCESS_KEY"],
    ).create_bucket(Bucket=name)
    return name


class SharedStateChanged(AssertionError):
    """A test (or a fixture it uses) wrote to a session fixture's folder that every other test reads."""


@dataclass(frozen=True)
class FolderState:
    """What a shared fixture's folder holds: each Delta table's newest commit, the rows of each table of each sqlite
    file (the MLflow store), and every file's size and modification time. Cheap: a listing and a few ``count(*)``."""

    tables: dict[str, int]
    rows: dict[str, int]
    files: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, root: Path) -> FolderState:
        tables: dict[str, int] = {}
        rows: dict[str, int] = {}
        files: dict[str, tuple[int, int]] = {}
        for folder, _, names in os.walk(root):
            here = Path(folder)
            if here.name == "_delta_log":
                commits = [int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()]
                tables[here.parent.relative_to(root).as_posix()] = max(commits, default=-1)
            for name in names:
                path = here / name
                try:
                    st = path.stat()
                except FileNotFoundError:  # a temporary file gone while listing
                    continue
                rel = path.relative_to(root).as_posix()
                files[rel] = (st.st_size, st.st_mtime_ns)
                if name.endswith(".db"):
                    rows.update({f"{rel}:{table}": n for table, n in _sqlite_rows(path).items()})
        return cls(tables, rows, files)

    def changes(self, now: FolderState) -> list[str]:
        """What differs in ``now``, one phrase each: Delta tables by version, sqlite tables by rows, other files."""
        out: list[str] = []
        changed_tables = []
        for name in sorted(self.tables.keys() | now.tables.keys()):
            was, is_ = self.tables.get(name), now.tables.get(name)
            if was != is_:
                changed_tables.append(name)
                what = "created" if was is None else "removed" if is_ is None else f"version {was} -> {is_}"
                out.append(f"Delta table {name}: {what}")
        changed_dbs = set()
        for key in sorted(self.rows.keys() | now.rows.keys()):
            was, is_ = self.rows.get(key, 0), now.rows.get(key, 0)
            if was != is_:
                changed_dbs.add(key.rsplit(":", 1)[0])
                out.append(f"sqlite {key}: {was} -> {is_} rows")

        def explained(rel: str) -> bool:
            return rel in changed_dbs or any(rel.startswith(f"{table}/") for table in changed_tables)

        for what, paths in (
            ("added", now.files.keys() - self.files.keys()),
            ("removed", self.files.keys() - now.files.keys()),
            ("modified", {p for p in self.files.keys() & now.files.keys() if self.files[p] != now.files[p]}),
        ):
            shown = sorted(p for p in paths if not explained(p))
            if shown:
                more = f" (+{len(shown) - 5} more)" if len(shown) > 5 else ""
                out.append(f"files {what}: {', '.join(shown[:5])}{more}")
        return out


def _sqlite_rows(path: Path) -> dict[str, int]:
    """Rows per table of a sqlite file, opened read-only (an MLflow store: runs, registered models, aliases...)."""
    import sqlite3

    con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {name: con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for name in names}
    except sqlite3.DatabaseError:  # not a sqlite file after all: its size and time still count
        return {}
    finally:
        con.close()


class SharedFolder:
    """The guard of a session fixture's folder: the state it is expected to be in (taken when the fixture last built
    something there), checked after every test that uses the fixture."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.expected = FolderState.of(root)
        self.built = "its creation"

    def changes(self) -> list[str]:
        return self.expected.changes(FolderState.of(self.root))

    def verify(self, by: str) -> None:
        """Raise :class:`SharedStateChanged` naming ``by`` and every change since the fixture's last build; the new state
        is then expected, so that the next test is blamed only for its own changes."""
        found = self.changes()
        if not found:
            return
        self.expected = FolderState.of(self.root)
        raise SharedStateChanged(
            f"{by} changed the shared session fixture `{self.name}` ({self.root}) after {self.built}: "
            + "; ".join(found)
            + f". Other tests read `{self.name}`: a test that writes needs its own copy (for the pipeline, a "
            "`fork_pipeline` of it: see tests/conftest.py) or its own folder."
        )

    def rebuilt(self, what: str) -> None:
        """The fixture itself wrote ``what``: its new state is the expected one."""
        self.expected = FolderState.of(self.root)
        self.built = what


CURRENT_TEST = {"nodeid": "a fixture outside any test"}
"""The test being run (set before its fixtures), named when a shared fixture finds itself changed while building."""


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    CURRENT_TEST["nodeid"] = item.nodeid


SHARED_FIXTURES = ("pipeline", "tour", "synth_small", "synth_study")
"""Session fixtures whose folders every test using them reads: a test must not write there (checked after each)."""

COHORT_GUARDS: dict[str, SharedFolder] = {}
"""Guards of the shared generated cohorts (``tests/ingestion/conftest.py``), taken when a test first uses one."""


def _guard_of(name: str, fixture: object) -> SharedFolder | None:
    """A shared fixture's guard: its own when it builds in its folder (the pipeline, the tour), else, for a generated
    cohort, one taken the first time a test uses it."""
    if hasattr(fixture, "guard"):
        return fixture.guard
    if name not in COHORT_GUARDS and hasattr(fixture, "out_dir"):
        COHORT_GUARDS[name] = SharedFolder(name, Path(fixture.out_dir))
    return COHORT_GUARDS.get(name)


@pytest.fixture(autouse=True)
def shared_fixtures_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that uses a shared session fixture: fail it if it (or a fixture it uses) changed that fixture's
    folder: a new Delta commit, an MLflow run or alias, any file added, removed or rewritten."""
    used = {name: request.getfixturevalue(name) for name in SHARED_FIXTURES if name in request.fixturenames}
    guards = [guard for guard in (_guard_of(name, fixture) for name, fixture in used.items()) if guard is not None]
    yield
    for guard in guards:
        guard.verify(request.node.nodeid)


class TinyPipeline:
    """Lazily built tiny pipeline rooted at ``root``: ``cohort`` → ``catalog`` → (later) volumes → encoder.

    Each stage is built once, by the pipeline itself; the guard then takes the folder's state as the expected one. A test
    that writes (a new preprocess version, splits, embeddings, an MLflow run or alias) works on :meth:`fork` instead."""

    subjects = 20
    seed = 7

    def __init__(self, root: Path) -> None:
        self.root = root
        self.catalog_dir = root / "catalog"
        self.tracking_db = root / "mlflow.db"
        self.guard: SharedFolder | None = SharedFolder("pipeline", root)

    def _build(self, stage: str, build):
        """Build ``stage`` (its earlier stages first, through ``build``); the folder must be as the last build left it."""
        if self.guard is not None:
            self.guard.verify(f"{CURRENT_TEST['nodeid']} (before pipeline.{stage} was built)")
        value = build()
        if self.guard is not None:
            self.guard.rebuilt(f"building pipeline.{stage}")
        return value

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.tracking_db}"

    @cached_property
    def config(self) -> Config:
        """The tiny config, with catalog and MLflow inside the pipeline directory."""
        return load_config("tiny", [f"catalog.uri={self.catalog_dir}", f"tracking.uri={self.tracking_uri}"])

    @cached_property
    def cohort(self):
        """The tiny synthetic cohort: all five cohorts in their real layouts, truth in ``_truth/``."""
        from brainiac.ingestion.synthetic import generate_cohort

        return self._build(
            "cohort",
            lambda: generate_cohort(self.root / "cohort", subjects=self.subjects, seed=self.seed, preset="tiny"),
        )

    @cached_property
    def truth(self):
        """The generator's per-scan truth table (images only)."""
        import pandas as pd

        truth = pd.read_csv(self.cohort.truth, dtype={"path": str})
        return truth[truth["kind"] == "image"].reset_index(drop=True)

    @cached_property
    def catalog(self):
        """The cohort ingested into the catalog (needs the session Ray, which the fixture starts)."""
        from brainiac.ingestion.ingest import ingest
        from brainiac.platform.catalog import Catalog

        def build():
            sources = [str(self.cohort.out_dir / folder) for folder in self.cohort.cohorts.values()]
            self.ingest_summary = ingest(self.config, sources, progress=False)

        self._build("catalog", build)
        return Catalog.open(self.config.catalog.uri)

    @cached_property
    def volumes(self):
        """The catalog preprocessed into ``volumes`` (tiny 3 mm grids, 32³ cubes) plus ``splits``; the summary."""
        from brainiac.ingestion.prepare import preprocess

        def build():
            self.catalog  # noqa: B018 - build the previous stage
            return preprocess(self.config, progress=False)

        return self._build("volumes", build)

    def pretrain_config(self, *overrides: str) -> Config:
        """The shipped ``pretrain/tiny`` config pointed at this pipeline's catalog, MLflow and run storage."""
        return load_config(
            "pretrain/tiny",
            [
                f"catalog.uri={self.catalog_dir}",
                f"tracking.uri={self.tracking_uri}",
                f"pretrain.storage_path={self.root / 'runs'}",
                # Pinned: the volumes this pipeline built (a fork may hold newer, partial preprocess versions).
                f"patches.preprocess_version={self.volumes.preprocess_version}",
                *overrides,
            ],
        )

    @cached_property
    def encoder(self):
        """SimCLR-pretrained tiny encoder (2 CPU workers, 60 steps), registered as ``brainiac-encoder@candidate``;
        the :class:`~brainiac.jobs.pretrain.run.PretrainSummary`."""
        from brainiac.jobs.pretrain.run import pretrain

        def build():
            self.volumes  # noqa: B018 - build the previous stage
            return pretrain(self.pretrain_config("pretrain.run_name=pipeline-encoder"), progress=False)

        return self._build("encoder", build)

    def fork(self, root: Path, *stages: str, catalog: bool = True, tracking: bool = True) -> TinyPipeline:
        """A pipeline for a test that writes: ``stages`` are built here first (once, for every test), then the catalog
        (with its identified zone) and/or the MLflow store (with its artifacts) are copied under ``root``; what is not
        copied stays this pipeline's, to be read only. The fork shares the cohort and every built stage's summary.

        A copied catalog keeps its rows' absolute ``image_uri`` (the staged images of this catalog, read only); a copied
        MLflow store has its artifact locations moved to the copy, so new runs and versions land there."""
        import shutil

        for stage in stages:
            getattr(self, stage)
        fork = TinyPipeline(root)
        fork.guard = None  # a fork is its test module's own: it may write, and builds its later stages itself
        fork.__dict__.update(
            {k: v for k, v in self.__dict__.items() if k in ("cohort", "truth", "ingest_summary", "volumes", "encoder")}
        )
        if catalog:
            for name in ("catalog", "catalog-identified"):
                if (self.root / name).exists():
                    shutil.copytree(self.root / name, root / name, symlinks=True)
        else:
            fork.catalog_dir = self.catalog_dir
            fork.__dict__["catalog"] = self.catalog
        if tracking:  # no store yet (no stage logged to MLflow): the fork starts its own
            if self.tracking_db.exists():
                shutil.copy2(self.tracking_db, fork.tracking_db)
                _move_paths_in_sqlite(fork.tracking_db, self.root, root)
            if (self.root / "mlartifacts").exists():
                shutil.copytree(self.root / "mlartifacts", root / "mlartifacts", symlinks=True)
        else:
            fork.tracking_db = self.tracking_db
        return fork


def _move_paths_in_sqlite(db: Path, old: Path, new: Path) -> None:
    """Rewrite ``old``/... to ``new``/... (as paths and as file URIs) in every text column of a copied sqlite file: the
    artifact locations of a copied MLflow store then name the copy's artifacts."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        pairs = [(f"{old}/", f"{new}/"), (f"{old.as_uri()}/", f"{new.as_uri()}/")]
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                if kind and not any(t in kind.upper() for t in ("CHAR", "TEXT", "CLOB")):
                    continue
                for was, now in pairs:
                    con.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                        (was, now, was),
                    )
        con.commit()
    finally:
        con.close()


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, ray_session, pseudonym_key) -> Iterator[TinyPipeline]:
    """The tiny pipeline shared by every test that needs data: stages are built lazily, once per session. Read only:
    after each test using it, :func:`shared_fixtures_unchanged` fails the test if its folder changed."""
    built = TinyPipeline(tmp_path_factory.mktemp("pipeline"))
    yield built
    built.guard.verify("a fixture's teardown at the end of the session")


@pytest.fixture(scope="session")
def fork_pipeline(pipeline: TinyPipeline, tmp_path_factory: pytest.TempPathFactory):
    """``fork_pipeline(name, *stages, catalog=True, tracking=True)``: a writable :meth:`TinyPipeline.fork` of the
    session pipeline in a new folder; a module that writes takes one in a module-scoped fixture of its own."""

    def fork(name: str, *stages: str, catalog: bool = True, tracking: bool = True) -> TinyPipeline:
        return pipeline.fork(tmp_path_factory.mktemp(name), *stages, catalog=catalog, tracking=tracking)

    return fork


@dataclass
class Tour:
    """The output of one ``brainiac quickstart --fast`` run: its config, result and the lines it printed."""

    cfg: Config
    workdir: Path
    result: object
    lines: list[str]
    guard: SharedFolder | None = None
    """Checks after each test using the tour that its work directory is as the quickstart left it."""


@pytest.fixture(scope="session")
def tour(tmp_path_factory: pytest.TempPathFactory, ray_session, pseudonym_key) -> Iterator[Tour]:
    """``quickstart --fast`` run once per session on the session Ray; the quickstart test and the notebooks read it."""
    from brainiac.jobs.quickstart.run import quickstart

    cfg = load_config("quickstart-fast")
    workdir = tmp_path_factory.mktemp("tour")
    lines: list[str] = []
    result = quickstart(cfg, workdir, progress=False, echo=lines.append)
    tour = Tour(cfg, workdir, result, lines, SharedFolder("tour", workdir))
    yield tour
    tour.guard.verify("a fixture's teardown at the end of the session")


@pytest.fixture(scope="session")
def append_volumes():
    """Append fake ``volumes`` rows (plain dicts; missing columns are null) to ``<root>/catalog`` as one commit, with
    ``rows_per_group`` rows per Parquet row group; returns the catalog. For small hand-made catalogs in unit tests."""
    import pyarrow as pa
    from deltalake import WriterProperties, write_deltalake

    from brainiac.platform.catalog import TABLE_CONFIGURATION, VOLUMES_SCHEMA, Catalog

    def append(root: Path, rows: list[dict], rows_per_group: int):
        write_deltalake(
            str(root / "catalog" / "volumes"),
            pa.Table.from_pylist(rows, schema=VOLUMES_SCHEMA),
            mode="append",
            partition_by=["preprocess_version"],
            configuration=TABLE_CONFIGURATION,
            writer_properties=WriterProperties(max_row_group_size=rows_per_group),
        )
        return Catalog.open(str(root / "catalog"))

    return append
