"""Scale harness: ingest a BrainIAC-shaped pool (34 datasets, four layouts, planted cross-dataset copies; see
``bench/scale_pool.py``) at several sizes and report wall time and driver peak memory per ingest phase, the no-op
re-ingest, adding a new 1k-scan dataset to the full catalog vs ingesting it alone, and whether the duplicate search
found every planted copy and no false group. Also times queries on a 1M-row ``scans``-like table.

    .venv/bin/python bench/scale.py --sizes 1000,7000,49000 --out scale.json   # the full run
    .venv/bin/python bench/scale.py --smoke                                    # ~200 scans, what the test runs
    .venv/bin/python bench/scale.py --sizes 1000 --s3 --s3-size 300            # plus a reduced run on moto S3
    .venv/bin/python bench/scale.py --sizes 0 --query-rows 1000000             # only the 1M-row query figures

What is timed: each ``ingest()`` call from its start to its summary, with Ray already started (a long-running
cluster pays that once). Phases come from ``IngestSummary.phases`` when ingest reports them (list, harvest, write,
duplicates, summary), otherwise from wrappers around the module's write/duplicate functions. Driver memory is the
resident set size of this process sampled every 20 ms; a phase's figure is the peak seen during it (Ray workers'
memory is not counted). Pool generation (2 processes) is timed separately and not part of any ingest figure.
Payloads are small arrays with the real spacing (see ``scale_pool``), so per-byte costs (sha256 of 7 MB files) are
below real ones; what grows with N here is the per-scan and per-pool work, which is what the harness is for.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("BRAINIAC_PSEUDONYM_KEY", "scale-bench-key-0123456789abcdef")


def _pool_module():
    """``bench/scale_pool.py`` (bench/ is not a package)."""
    if "scale_pool" in sys.modules:
        return sys.modules["scale_pool"]
    path = Path(__file__).resolve().parent / "scale_pool.py"
    spec = importlib.util.spec_from_file_location("scale_pool", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_pool"] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


PHASES = ("list", "harvest", "write", "duplicates", "summary")


# ----------------------------------------------------------------------------------------------------------------------
# measuring one ingest


class RssSampler:
    """Resident set size of this process, sampled every ``interval`` seconds in a thread, with timestamps."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self._proc.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), self._proc.memory_info().rss))

    def peak_mb(self, intervals: list[tuple[float, float]]) -> float | None:
        vals = [r for t, r in self.samples if any(a <= t <= b for a, b in intervals)]
        return round(max(vals) / 2**20, 1) if vals else None


@contextlib.contextmanager
def _marks(module: Any) -> Iterator[list[tuple[str, float, float]]]:
    """Wrap the ingest module's phase functions to record when each ran: ``(phase, start, end)``."""
    marks: list[tuple[str, float, float]] = []
    names = {
        "harvest_all": "harvest",
        "write_scans": "write",
        "write_quarantine": "write",
        "link_duplicates": "duplicates",
    }
    saved = {}

    def wrap(fn: Callable, phase: str) -> Callable:
        def inner(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                marks.append((phase, t, time.perf_counter()))

        return inner

    for name, phase in names.items():
        if hasattr(module, name):
            saved[name] = getattr(module, name)
            setattr(module, name, wrap(saved[name], phase))
    try:
        yield marks
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def measure_ingest(cfg: Any, sources: list[str]) -> dict[str, Any]:
    """One ``ingest()`` of ``sources``: seconds and driver peak RSS per phase, plus the summary's counts."""
    import brainiac.ingestion.ingest as ingest_module

    with _marks(ingest_module) as marks, RssSampler() as rss:
        start = time.perf_counter()
        # The pool's folder names are the bench's own (no card, no identifier): each names its dataset.
        names = {s: s.rstrip("/").rsplit("/", 1)[-1] for s in sources}
        summary = ingest_module.ingest(cfg, sources, progress=False, names=names)
        end = time.perf_counter()
    reported = dict(getattr(summary, "phases", {}) or {})
    by = {p: [(a, b) for q, a, b in marks if q == p] for p in ("harvest", "write", "duplicates")}
    first = min([a for _, a, _ in marks], default=end)
    if "list" in reported:  # listing ends where ingest says; harvest and write may start later than the first mark
        first = min(start + reported["list"], first)
    dup_start = min([a for a, _ in by["duplicates"]], default=None)
    work_end = max([b for q, _, b in marks], default=start)
    windows: dict[str, list[tuple[float, float]]] = {"list": [(start, first)]}
    # harvest and write may interleave (batched commits): harvest is the rest of the span between listing and duplicates
    span_end = dup_start if dup_start is not None else work_end
    windows["harvest"] = by["harvest"] or _minus([(first, span_end)], by["write"])
    windows["write"] = by["write"]
    windows["duplicates"] = by["duplicates"]
    windows["summary"] = [(work_end, end)]
    seconds = {p: reported.get(p, round(sum(b - a for a, b in windows[p]), 2)) for p in PHASES}
    return {
        "seconds": round(end - start, 2),
        "phases": {p: {"s": seconds[p], "peak_mb": rss.peak_mb(windows[p])} for p in PHASES},
        "peak_mb": rss.peak_mb([(start, end)]),
        "phases_from": "IngestSummary.phases" if reported else "wrappers",
        "discovered": summary.discovered,
        "inserted": summary.inserted,
        "unchanged": summary.unchanged,
        "quarantined": summary.quarantined,
        "duplicate_groups": summary.duplicate_groups,
    }


def _minus(spans: list[tuple[float, float]], holes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = list(spans)
    for ha, hb in sorted(holes):
        nxt = []
        for a, b in out:
            if hb <= a or ha >= b:
                nxt.append((a, b))
                continue
            if a < ha:
                nxt.append((a, ha))
            if hb < b:
                nxt.append((hb, b))
        out = nxt
    return out


# ----------------------------------------------------------------------------------------------------------------------
# checks against the pool's truth


def check_duplicates(catalog: Any, truth: dict[str, Any], root: str, uri_root: str) -> dict[str, Any]:
    """Compare the ``duplicates`` table with the planted groups (by source path): found, missed, false groups."""
    planted = {frozenset(p.replace(root, uri_root, 1) for p in g) for g in truth["groups"]}
    found: set[frozenset[str]] = set()
    if catalog.table("duplicates") is not None:
        dup = catalog.read("duplicates", columns=["group_id", "scan_id"]).to_pylist()
        from brainiac.ingestion.identified import IdentifiedZone, default_identified_uri

        # The catalog holds source keys; the planted groups are source paths, which the identified zone maps.
        zone = IdentifiedZone(default_identified_uri(catalog.uri), catalog.location.options or None)
        uri: dict[str, set[str]] = {}
        for r in zone.read("sources").select(["scan_id", "source_uri"]).to_pylist():
            uri.setdefault(r["scan_id"], set()).add(r["source_uri"])
        groups: dict[str, set[str]] = {}
        for r in dup:
            groups.setdefault(r["group_id"], set()).update(uri.get(r["scan_id"], set()))
        found = {frozenset(g) for g in groups.values()}
    return {
        "planted": len(planted),
        "found": len(planted & found),
        "missed": len(planted - found),
        "false": len(found - planted),
        "ok": planted == found,
    }


# ----------------------------------------------------------------------------------------------------------------------
# one size


def _config(catalog: str, options: dict[str, str] | None = None) -> Any:
    from brainiac.jobs.config import load_config

    cfg = load_config("tiny", [f"catalog.uri={catalog}", "cluster.num_cpus=2"])
    if options:
        cfg.catalog.storage_options = dict(options)
    return cfg


def _start_ray(cfg: Any) -> None:
    import ray

    from brainiac.platform.cluster import init_ray

    init_ray(cfg.cluster)

    @ray.remote(num_cpus=1)
    def up() -> int:
        return os.getpid()

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ray.get([up.remote() for _ in range(cpus)])  # idle workers exist before anything is timed


def generate(root: Path, scans: int, processes: int = 2) -> tuple[dict[str, Any], float]:
    pool = _pool_module()
    t = time.perf_counter()
    truth = pool.write_pool(pool.plan_pool(root, scans), processes)
    return truth, round(time.perf_counter() - t, 2)


def generate_new(root: Path, processes: int = 2) -> dict[str, Any]:
    pool = _pool_module()
    return pool.write_pool(pool.plan_pool(root, 0, [pool.NEW_DATASET]), processes)


def run_size(n: int, workdir: Path, *, new_root: Path | None = None, keep: bool = False, echo=print) -> dict[str, Any]:
    """Generate the pool at ``n`` scans and measure: full ingest, no-op re-ingest, adding the new 1k dataset to it and
    ingesting that dataset alone; check counts and duplicate groups against the truth."""
    from brainiac.platform.catalog import Catalog

    root = workdir / f"pool-{n}"
    shutil.rmtree(root, ignore_errors=True)
    truth, gen_s = generate(root, n)
    size_mb = round(_pool_module().disk_bytes(root) / 1e6, 1)
    echo(f"[{n}] pool: {truth['scans']} scans, {len(truth['groups'])} planted copy groups, {size_mb} MB, {gen_s} s")
    sources = [str(root / name) for name in truth["datasets"]]
    catalog_uri = str(workdir / f"catalog-{n}")
    shutil.rmtree(catalog_uri, ignore_errors=True)
    cfg = _config(catalog_uri)
    _start_ray(cfg)
    out: dict[str, Any] = {"n": n, "scans": truth["scans"], "datasets": len(truth["datasets"]),
                           "planted_groups": len(truth["groups"]), "pool_mb": size_mb, "generate_s": gen_s}  # fmt: skip
    out["ingest"] = measure_ingest(cfg, sources)
    echo(f"[{n}] ingest: {out['ingest']['seconds']} s {out['ingest']['phases']}")
    catalog = Catalog.open(catalog_uri)
    out["duplicates"] = check_duplicates(catalog, truth, str(root), str(root))
    out["counts_ok"] = (
        out["ingest"]["discovered"] == truth["scans"] == out["ingest"]["inserted"] and not out["ingest"]["quarantined"]
    )
    echo(f"[{n}] duplicates vs truth: {out['duplicates']}; counts ok: {out['counts_ok']}")
    out["noop"] = measure_ingest(cfg, sources)
    echo(f"[{n}] no-op re-ingest: {out['noop']['seconds']} s (inserted {out['noop']['inserted']})")
    if new_root is not None:
        new = json.loads((new_root / "truth.json").read_text())
        new_sources = [str(new_root / name) for name in new["datasets"]]
        out["add_new"] = measure_ingest(cfg, new_sources)
        alone_uri = str(workdir / f"catalog-{n}-new-alone")
        shutil.rmtree(alone_uri, ignore_errors=True)
        out["new_alone"] = measure_ingest(_config(alone_uri), new_sources)
        out["new_scans"] = new["scans"]
        shutil.rmtree(alone_uri, ignore_errors=True)
        echo(
            f"[{n}] add {new['scans']}-scan dataset: {out['add_new']['seconds']} s; alone: {out['new_alone']['seconds']} s"
        )
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(catalog_uri, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# S3


def run_s3(n: int, workdir: Path, echo=print) -> dict[str, Any]:
    """The pool at ``n`` scans uploaded to a moto S3 server on 127.0.0.1, ingested into an S3 catalog."""
    import boto3

    from brainiac.platform import stack
    from brainiac.platform.catalog import Catalog
    from brainiac.platform.storage import StorageLocation

    root = workdir / f"s3pool-{n}"
    shutil.rmtree(root, ignore_errors=True)
    truth, gen_s = generate(root, n)
    state = workdir / "s3-server"
    ports = {p: stack.free_port() for p in stack.SERVICES["s3"].ports}
    st = stack.start_service("s3", state, ports=ports)
    try:
        options = {"AWS_ENDPOINT_URL": st.url, "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_ALLOW_HTTP": "true", "AWS_CONDITIONAL_PUT": "etag"}  # fmt: skip
        boto3.client("s3", endpoint_url=st.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing-secret").create_bucket(Bucket="scale")  # fmt: skip
        t = time.perf_counter()
        dest = StorageLocation.resolve("s3://scale/pool", options)
        dest.fsspec().put(str(root) + "/", dest.path + "/", recursive=True)
        upload_s = round(time.perf_counter() - t, 2)
        cfg = _config("s3://scale/catalog", options)
        _start_ray(cfg)
        sources = [f"s3://scale/pool/{name}" for name in truth["datasets"]]
        out: dict[str, Any] = {"n": n, "scans": truth["scans"], "generate_s": gen_s, "upload_s": upload_s}
        out["ingest"] = measure_ingest(cfg, sources)
        out["duplicates"] = check_duplicates(
            Catalog.open(cfg.catalog.uri, options), truth, str(root), "s3://scale/pool"
        )
        out["noop"] = measure_ingest(cfg, sources)
        echo(f"[s3 {n}] ingest {out['ingest']['seconds']} s, no-op {out['noop']['seconds']} s, {out['duplicates']}")
        echo(f"[s3 {n}] phases: ingest {out['ingest'].get('phases')}, no-op {out['noop'].get('phases')}")
        return out
    finally:
        stack.stop_service("s3", state)
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# 1M-row query figures


def _best(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return round(best, 3), result


def query_figures(rows: int, workdir: Path, echo=print) -> dict[str, Any]:
    """Build a ``rows``-row ``scans`` table (synthetic rows, no files; partitioned by dataset like the real one) and
    time a filtered count, a point lookup, a group-by and a 60k-id selection (best of 3 each)."""
    import numpy as np
    import pyarrow as pa
    from deltalake import write_deltalake

    from brainiac.platform.catalog import SCANS_SCHEMA, TABLE_CONFIGURATION, Catalog

    pool = _pool_module()
    uri = workdir / f"query-{rows}"
    shutil.rmtree(uri, ignore_errors=True)
    catalog = Catalog.open(str(uri))
    catalog.create_if_missing("scans")
    rng = np.random.default_rng(0)
    weights = np.array([d.cases * d.per_case for d in pool.POOL], dtype=float)
    names = np.array([d.name for d in pool.POOL])
    t = time.perf_counter()
    ds = names[rng.choice(len(names), size=rows, p=weights / weights.sum())]
    order = np.argsort(ds, kind="stable")
    ds = ds[order]
    ids = [f"{x:016x}{y:016x}{i:032x}" for i, (x, y) in enumerate(rng.integers(0, 2**63, size=(rows, 2)))]
    seqs = np.array(["T1w", "T1ce", "T2w", "FLAIR", "DWI", "PD"])[rng.integers(0, 6, rows)]
    columns: dict[str, Any] = {
        "scan_id": pa.array(ids),
        "dataset": pa.array(ds),
        "layout": pa.array(np.where(np.char.startswith(ds, "brats"), "brats", "bids")),
        "access": pa.array(["registered"] * rows),
        "subject_id": pa.array([f"s{i // 3:010x}" for i in range(rows)]),
        "sequence": pa.array(seqs),
        "source_uri": pa.array([f"/data/pool/{d}/img{i}.nii.gz" for i, d in enumerate(ds)]),
        "image_uri": pa.array([f"/data/pool/{d}/img{i}.nii.gz" for i, d in enumerate(ds)]),
        "format": pa.array(["nifti"] * rows),
        "bytes": pa.array(rng.integers(2_000_000, 20_000_000, rows)),
        "shape": pa.FixedSizeListArray.from_arrays(pa.array(np.tile([240, 240, 155], rows).astype(np.int32)), 3),
        "spacing_mm": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(3 * rows)), 3),
        "affine": pa.FixedSizeListArray.from_arrays(pa.array(np.tile(np.eye(4).ravel(), rows)), 16),
        "age_years": pa.array(rng.uniform(5, 90, rows).round(1)),
        "sex": pa.array(np.where(rng.random(rows) < 0.5, "F", "M")),
        "status": pa.array(["current"] * rows),
    }
    table = pa.table(
        {f.name: (columns[f.name].cast(f.type) if f.name in columns else pa.nulls(rows, f.type)) for f in SCANS_SCHEMA},
        schema=SCANS_SCHEMA,
    )
    loc = catalog.table_location("scans")
    write_deltalake(loc.uri, table, mode="append", partition_by=["dataset"], configuration=TABLE_CONFIGURATION)
    build_s = round(time.perf_counter() - t, 2)
    del table, columns
    out: dict[str, Any] = {"rows": rows, "build_s": build_s}
    echo(f"[query] {rows} rows written in {build_s} s")
    out["filtered_count_s"], r = _best(
        lambda: catalog.sql(
            "SELECT count(*) AS n FROM scans WHERE sequence = 'T1w' AND age_years BETWEEN 60 AND 80 "
            "AND status = 'current'"
        )
    )
    out["filtered_count_rows"] = int(r.column(0)[0].as_py())
    probe = ids[rows // 2]
    out["point_lookup_s"], r = _best(lambda: catalog.select("scans", f"scan_id = '{probe}'", ["scan_id", "dataset"]))
    out["point_lookup_ok"] = r.num_rows == 1
    out["group_by_s"], r = _best(
        lambda: catalog.sql("SELECT dataset, sequence, count(*) AS n FROM scans GROUP BY dataset, sequence")
    )
    out["group_by_groups"] = r.num_rows
    if hasattr(catalog, "select_keys"):
        wanted = [ids[i] for i in rng.choice(rows, size=min(60_000, rows), replace=False)]
        with RssSampler() as rss:
            out["select_60k_s"], r = _best(
                lambda: catalog.select_keys("scans", "scan_id", wanted, ["scan_id", "dataset", "sequence", "image_uri"])
            )
        out["select_60k_rows"] = r.num_rows
        out["select_60k_peak_mb"] = rss.peak_mb([(0, float("inf"))])
        out["select_60k_added_mb"] = round(out["select_60k_peak_mb"] - rss.samples[0][1] / 2**20, 1)
    else:
        out["select_60k_s"] = None
        echo("[query] Catalog.select_keys is not there yet: 60k-id selection skipped")
    echo(f"[query] {out}")
    shutil.rmtree(uri, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# report


def markdown(results: dict[str, Any]) -> str:
    """Phase × N table: seconds and driver peak MB per size, and the ratio of the last two sizes' seconds."""
    sizes = results["sizes"]
    ns = [r["n"] for r in sizes]
    lines = []
    head = "| phase | " + " | ".join(f"N={n} s | N={n} peak MB" for n in ns)
    ratio = len(ns) >= 2
    if ratio:
        head += f" | ratio {ns[-2]}->{ns[-1]} (s) |"
    else:
        head += " |"
    lines.append(head)
    lines.append("|" + "---|" * (1 + 2 * len(ns) + (1 if ratio else 0)))

    def row(label: str, get: Callable[[dict], tuple[float | None, float | None]]) -> None:
        cells = [get(r) for r in sizes]
        text = " | ".join(f"{'' if s is None else s} | {'' if m is None else m}" for s, m in cells)
        line = f"| {label} | {text}"
        if ratio:
            a, b = cells[-2][0], cells[-1][0]
            line += f" | {round(b / a, 2) if a and b is not None else ''}"
        lines.append(line + " |")

    row("generate pool (2 procs)", lambda r: (r["generate_s"], None))
    for p in PHASES:
        row(f"ingest: {p}", lambda r, p=p: (r["ingest"]["phases"][p]["s"], r["ingest"]["phases"][p]["peak_mb"]))
    row("ingest: total", lambda r: (r["ingest"]["seconds"], r["ingest"]["peak_mb"]))
    row("no-op re-ingest", lambda r: (r["noop"]["seconds"], r["noop"]["peak_mb"]))
    row(
        "add new 1k dataset to catalog",
        lambda r: ((r.get("add_new") or {}).get("seconds"), (r.get("add_new") or {}).get("peak_mb")),
    )
    row("same dataset, empty catalog", lambda r: ((r.get("new_alone") or {}).get("seconds"), (r.get("new_alone") or {}).get("peak_mb")))  # fmt: skip
    lines.append("")
    for r in sizes:
        d = r["duplicates"]
        lines.append(
            f"- N={r['n']}: {r['scans']} scans in {r['datasets']} datasets; planted copy groups found "
            f"{d['found']}/{d['planted']}, missed {d['missed']}, false groups {d['false']}; counts match truth: "
            f"{r['counts_ok']}; phases from {r['ingest']['phases_from']}"
        )
    if results.get("s3"):
        s = results["s3"]
        lines.append(
            f"- S3 (moto on 127.0.0.1), N={s['n']}: upload {s['upload_s']} s (not timed in ingest), ingest "
            f"{s['ingest']['seconds']} s {_phase_text(s['ingest'])}, no-op {s['noop']['seconds']} s, duplicates "
            f"{s['duplicates']['found']}/{s['duplicates']['planted']} found, {s['duplicates']['false']} false"
        )
    if results.get("query"):
        q = results["query"]
        lines.append(
            f"- {q['rows']:,}-row scans table (built in {q['build_s']} s): filtered count {q['filtered_count_s']} s, "
            f"point lookup {q['point_lookup_s']} s, group-by {q['group_by_s']} s, 60k-id select_keys "
            + (
                f"{q['select_60k_s']} s ({q['select_60k_rows']} rows, driver peak {q['select_60k_peak_mb']} MB, "
                f"+{q.get('select_60k_added_mb')} MB over the process before the selection)"
                if q.get("select_60k_s") is not None
                else "skipped (Catalog.select_keys missing)"
            )
        )
    return "\n".join(lines)


def _phase_text(m: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{p} {m['phases'][p]['s']}" for p in PHASES) + ")"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,7000,49000", help="comma-separated pool sizes (0: none)")
    ap.add_argument("--smoke", action="store_true", help="one ~200-scan pool, no new-dataset step, small query table")
    ap.add_argument("--s3", action="store_true", help="also run a reduced size against a moto S3 server")
    ap.add_argument("--s3-size", type=int, default=300)
    ap.add_argument("--query-rows", type=int, default=1_000_000, help="rows of the query table (0: skip)")
    ap.add_argument("--no-new", action="store_true", help="skip adding the 1k-scan dataset")
    ap.add_argument("--workdir", type=Path, default=None, help="where pools and catalogs go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep pools and catalogs")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    sizes = [200] if args.smoke else [int(s) for s in args.sizes.split(",") if int(s) > 0]
    query_rows = 20_000 if args.smoke and args.query_rows == 1_000_000 else args.query_rows
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="brainiac-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"sizes": [], "machine": {"cpus": os.cpu_count()}}
    new_root = None
    if sizes and not args.no_new and not args.smoke:
        new_root = workdir / "new-dataset"
        shutil.rmtree(new_root, ignore_errors=True)
        generate_new(new_root)
    for n in sizes:
        results["sizes"].append(run_size(n, workdir, new_root=new_root, keep=args.keep))
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    if args.s3:
        results["s3"] = run_s3(args.s3_size, workdir)
    if query_rows:
        results["query"] = query_figures(query_rows, workdir)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print()
    print(markdown(results) if results["sizes"] else json.dumps(results, indent=1))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
