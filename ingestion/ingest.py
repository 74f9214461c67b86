"""The ingest pipeline: discover sources with their layout adapter (folders listed and DICOM headers read in Ray tasks,
see :mod:`brainiac.ingestion.adapters.listing`), harvest headers and content ids in parallel on Ray, build harmonized
PHI-free rows, and MERGE them into the catalog idempotently.

Idempotence (the catalog is the system of record, so re-running must be safe):
- a scan whose ``(source_uri, scan_id)`` is already current is left alone (``source_uri`` in the catalog is the keyed
  source key, :func:`brainiac.ingestion.identified.source_key`: the real path stays in the identified zone); a run that changes nothing commits nothing,
  so the table version does not move;
- a file whose bytes changed at the same path becomes a new row and the old row is marked ``superseded`` in the same
  MERGE commit (history stays reachable by time travel);
- a source that disappeared is left as it is (still ``current``): ingest never deletes what it cannot see, since an
  unmounted disk or a partial sync looks the same as a deletion.
Concurrent ingests into one catalog recompute their diff and retry when they lose a commit race, so no row is written
twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from brainiac.ingestion.adapters.base import Problem, SourceScan
from brainiac.ingestion.adapters.bids import BidsAdapter
from brainiac.ingestion.adapters.brats import BratsAdapter
from brainiac.ingestion.adapters.common import problem_for_oserror, read_table, table_records
from brainiac.ingestion.adapters.listing import cached_listings
from brainiac.ingestion.adapters.manifest import ManifestAdapter
from brainiac.ingestion.cards import DatasetCard, card_for, load_card, normalize_case_id
from brainiac.ingestion.duplicates import append_harvest_signatures, queue_searches, repair_unsearched
from brainiac.ingestion.harvest import Known, harvest_stream
from brainiac.ingestion.identified import SOURCE_KEY_PREFIX, IdentifiedZone, default_identified_uri, source_key
from brainiac.ingestion.rows import INGEST_VERSION, build_row, label_lookup
from brainiac.platform.catalog import (
    QUARANTINE_SCHEMA,
    SCANS_SCHEMA,
    Catalog,
    insert_missing,
    merge_with_retry,
    sql_in,
)
from brainiac.platform.errors import UserError
from brainiac.platform.faults import maybe_crash
from brainiac.platform.pseudonym import Pseudonymizer, bind_catalog_key
from brainiac.platform.storage import StorageLocation

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from brainiac.jobs.config import Config  # the job's root config (annotation only: jobs sit above ingestion)

__all__ = ["IngestSummary", "adapters", "ingest", "write_quarantine", "write_scans"]

log = logging.getLogger(__name__)

DETECT_ORDER = ("dicom", "bids", "brats", "manifest")

DISCOVERY_THREADS = 8
"""Dataset roots discovered at the same time (their folder listings run as Ray tasks)."""


def adapters(key: bytes | None = None) -> dict[str, Any]:
    """Every layout adapter by name (DICOM imported lazily: it pulls in pydicom). ``key`` pseudonymizes DICOM UIDs."""
    from brainiac.ingestion.adapters.dicom import DicomAdapter

    return {
        "bids": BidsAdapter(),
        "brats": BratsAdapter(),
        "manifest": ManifestAdapter(),
        "dicom": DicomAdapter(key=key),
    }


@dataclass
class IngestSummary:
    """What one ingest run did."""

    catalog: str
    scans_version: int | None
    quarantine_version: int | None
    discovered: int = 0
    inserted: int = 0
    superseded: int = 0
    unchanged: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """dataset → sequence → current rows after the run."""
    datasets: dict[str, str] = field(default_factory=dict)
    """dataset → layout used."""
    duplicate_groups: int = 0
    """Groups of copies (same image, other bytes) found involving this run's new scans."""
    skipped: int = 0
    """Files not read at all: the catalog holds them from this ingest version, same size, not modified since."""
    commits: int = 0
    """Commits that wrote harvested scans or quarantine rows (one per ``ingest.commit_scans`` harvested scans)."""
    identified: str = ""
    """Where the identified zone (real paths, full quarantine) is."""
    access_changed: dict[str, int] = field(default_factory=dict)
    """dataset → stored rows whose access level this run changed (its card's level changed)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: ``list`` (discovery), ``harvest`` (waiting for harvest tasks), ``write`` (the commits),
    ``duplicates``, ``summary``."""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# writing


def write_scans(
    catalog: Catalog, rows: list[dict[str, Any]], inserted: list[dict[str, Any]] | None = None
) -> tuple[int, int, int]:
    """MERGE rows into ``scans``: insert new (source, content) pairs, supersede older content at the same source, and
    refresh the derived columns of rows written by an older ``ingest_version`` (a fixed harmonization rule reaches old
    rows without new bytes).

    Returns ``(inserted, superseded, unchanged)`` (refreshed rows count as unchanged). Commits nothing when nothing
    changed. ``inserted``, when given, receives the rows this call inserted.
    """

    def attempt() -> tuple[int, int, int]:
        dt_ = catalog.create_if_missing("scans")
        sources = sorted({r["source_uri"] for r in rows})
        datasets = sorted({r["dataset"] for r in rows})
        current = catalog.select_keys(
            "scans",
            "source_uri",
            sources,
            ["scan_id", "source_uri", "status", "dataset", "ingest_version"],
            where=f"{sql_in('dataset', datasets)} AND status = 'current'",
        )
        versions = {
            (s, i): v
            for s, i, v in zip(
                current["source_uri"].to_pylist(),
                current["scan_id"].to_pylist(),
                current["ingest_version"].to_pylist(),
                strict=True,
            )
        }
        new_rows = [r for r in rows if (r["source_uri"], r["scan_id"]) not in versions]
        refresh = [
            r for r in rows if versions.get((r["source_uri"], r["scan_id"]), r["ingest_version"]) != r["ingest_version"]
        ]
        new_keys = {(r["source_uri"], r["scan_id"]) for r in new_rows}
        new_sources = {s for s, _ in new_keys}
        stale = [
            {"source_uri": s, "scan_id": i, "dataset": d}
            for s, i, d in zip(current["source_uri"].to_pylist(), current["scan_id"].to_pylist(), current["dataset"].to_pylist(), strict=True)
            if s in new_sources and (s, i) not in new_keys
        ]  # fmt: skip
        if not new_rows and not refresh:
            return 0, 0, len(rows)
        superseding = [{**{k: None for k in SCANS_SCHEMA.names}, **s, "status": "superseded"} for s in stale]
        refreshing = [{**r, "status": "refresh"} for r in refresh]
        source = pa.Table.from_pylist(new_rows + superseding + refreshing, schema=SCANS_SCHEMA)
        keep = {"scan_id", "dataset", "source_uri", "status", "ingested_at"}
        (
            dt_.merge(
                source,
                predicate="t.dataset = s.dataset AND t.source_uri = s.source_uri AND t.scan_id = s.scan_id",
                source_alias="s",
                target_alias="t",
            )
            .when_matched_update(updates={"status": "s.status"}, predicate="s.status = 'superseded'")
            .when_matched_update(
                updates={c: f"s.{c}" for c in SCANS_SCHEMA.names if c not in keep}, predicate="s.status = 'refresh'"
            )
            .when_not_matched_insert_all(predicate="s.status = 'current'")
            .execute()
        )
        if inserted is not None:
            inserted.extend(new_rows)
        return len(new_rows), len(stale), len(rows) - len(new_rows)

    # Within one batch, the same content at the same source is one row.
    seen, unique = set(), []
    for r in rows:
        if (r["source_uri"], r["scan_id"]) not in seen:
            seen.add((r["source_uri"], r["scan_id"]))
            unique.append(r)
    rows = unique
    return merge_with_retry(attempt, what="scans") if rows else (0, 0, 0)


def write_quarantine(catalog: Catalog, problems: Iterable[Problem], now: dt.datetime) -> int:
    """Record problems once per (source, reason); returns how many were new."""
    rows = {(p.source_uri, p.reason): p for p in problems}
    if not rows:
        return 0

    def attempt() -> int:
        dt_ = catalog.create_if_missing("quarantine")
        existing = catalog.select_keys("quarantine", "source_uri", {k[0] for k in rows}, ["source_uri", "reason"])
        have = set(zip(existing["source_uri"].to_pylist(), existing["reason"].to_pylist(), strict=True))
        new = [p for key, p in rows.items() if key not in have]
        if not new:
            return 0
        table = pa.Table.from_pylist(
            [
                {"source_uri": p.source_uri, "dataset": p.dataset, "reason": p.reason, "detail": p.detail,
                 "seen_at": now, "ingest_version": INGEST_VERSION}
                for p in new
            ],
            schema=QUARANTINE_SCHEMA,
        )  # fmt: skip
        insert_missing(dt_, table, ["source_uri", "reason"])
        return len(new)

    return merge_with_retry(attempt, what="quarantine")


def _utf8_names(plans: list[tuple]) -> tuple[list[tuple], list[Problem]]:
    """Scans whose path is not valid UTF-8 (a Latin-1 file name on a Linux disk) are quarantined as ``bad_filename``:
    Arrow and Delta hold UTF-8 only, so one such name used to crash every ingest of its dataset, forever."""
    good, bad = [], []
    for plan in plans:
        scan = plan[0]
        try:
            scan.source_uri.encode("utf-8")
            scan.relative_path.encode("utf-8")
        except UnicodeEncodeError:
            shown = scan.source_uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            bad.append(Problem(scan.dataset, shown, "bad_filename", "the path is not valid UTF-8; rename the file"))
            continue
        good.append(plan)
    return good, bad


def for_harvest(scan: SourceScan) -> SourceScan:
    """What a harvest task needs of a scan (where to read it, its format and files), without the subject, session,
    metadata, labels and sequence hints: for DICOM those are the unsealed PatientID and SeriesDescription, which must not
    travel through the object store (spilled to disk, shipped to other nodes). The driver keeps the full scan."""
    masks = {k: v for k, v in scan.labels.items() if k.endswith("_relative_path")}  # label masks are staged there too
    return dataclasses.replace(scan, subject="", session=None, run=None, sequence_hints={}, meta={}, labels=masks)


def known_sources(catalog: Catalog, scans: Sequence[SourceScan], keys: Sequence[str]) -> list[Known | None]:
    """For each NIfTI scan (with its source key), what the catalog holds at its source when that row is current and was
    written by this ``ingest_version`` (``None`` otherwise): the harvest then skips a file of the same size not modified
    since, so a re-ingest of an unchanged pool lists and stats its files but reads none of them. DICOM series are always
    read."""
    wanted = [k for s, k in zip(scans, keys, strict=True) if s.format != "dicom"]
    if not wanted or catalog.version("scans") is None:
        return [None] * len(scans)
    datasets = sorted({s.dataset for s in scans})
    table = catalog.select_keys(
        "scans", "source_uri", wanted, ["source_uri", "scan_id", "bytes", "ingested_at", "ingest_version"],
        where=f"{sql_in('dataset', datasets)} AND status = 'current'",
    )  # fmt: skip
    from brainiac.ingestion import rows as row_rules  # read at call time: a test or a hotfix may bump it

    held: dict[str, Known] = {}
    for r in table.to_pylist():
        if r["ingest_version"] == row_rules.INGEST_VERSION and r["bytes"] is not None and r["ingested_at"] is not None:
            held[r["source_uri"]] = Known(r["scan_id"], int(r["bytes"]), r["ingested_at"].timestamp())
    return [held.get(k) if s.format != "dicom" else None for s, k in zip(scans, keys, strict=True)]


def link_duplicates(catalog: Catalog, new_ids: set[str], options: dict[str, str]) -> int:
    """Find and record the copies the scans just added form with the catalog; returns the number of groups.

    Incremental (:func:`brainiac.ingestion.duplicates.link_new_scans`): only pairs involving ``new_ids`` are
    enumerated, shortlisted by stored signatures, and only the shortlist is decoded.
    """
    from brainiac.ingestion.duplicates import link_new_scans

    return link_new_scans(catalog, new_ids, options or None)


def current_counts(catalog: Catalog, datasets: Sequence[str]) -> dict[str, dict[str, int]]:
    """dataset → sequence → current rows, counted by DataFusion (the driver receives the counts, not the rows)."""
    table = catalog.sql(
        f"SELECT dataset, sequence, count(*) AS n FROM scans WHERE {sql_in('dataset', list(datasets))} "  # noqa: S608 - dataset names validated (DATASET_NAME) and quoted by sql_in
        "AND status = 'current' GROUP BY dataset, sequence"
    )
    counts: dict[str, dict[str, int]] = {}
    for d, seq, n in zip(
        table["dataset"].to_pylist(), table["sequence"].to_pylist(), table["n"].to_pylist(), strict=True
    ):
        counts.setdefault(d, {})[seq] = int(n)
    return {d: dict(sorted(c.items())) for d, c in sorted(counts.items())}


# ---------------------------------------------------------------------------------------------------------------------
# the job


DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""A dataset name: it becomes a column value, a partition folder and an MLflow tag, so it is short and plain."""


def _resolve_card(root: StorageLocation, dataset: str | None, card_path: str | None) -> tuple[str, DatasetCard | None]:
    """The dataset's name and card. A folder name is used only when a shipped card has that name: any other folder
    name may carry identifiers (``Cohen_Mei_7787823/``), so a dataset without a card must be named with ``--dataset``."""
    card: DatasetCard | None
    if card_path:
        card = load_card(card_path)
        name = dataset or card.name
    elif dataset:
        name, card = dataset, card_for(dataset)
    else:
        folder = root.uri.rstrip("/").rsplit("/", 1)[-1]
        card = card_for(folder)
        if card is None:
            raise UserError(
                f"{root.uri} has no dataset card; name the dataset with --dataset NAME (a folder name is not used as a "
                "dataset name: it may carry identifiers) or give --card"
            )
        name = folder
    if not DATASET_NAME.fullmatch(name):
        raise UserError(f"dataset name {name!r} must be lowercase letters, digits, '.', '_' or '-' (at most 64)")
    return name, card


def apply_access_levels(catalog: Catalog, levels: dict[str, str]) -> dict[str, int]:
    """Give the rows already stored of each dataset its level of this run (a card that changed from ``open`` to
    ``restricted`` must hide the dataset from every reader at once, not only its new scans); returns dataset → rows
    changed. One count per dataset (partition-pruned) and an UPDATE only where a row differs: no commit otherwise."""
    if catalog.version("scans") is None or not levels:
        return {}
    differing = catalog.sql(
        f"SELECT dataset, access, count(*) AS n FROM scans WHERE {sql_in('dataset', list(levels))} "  # noqa: S608 - dataset names validated (DATASET_NAME) and quoted by sql_in
        "GROUP BY dataset, access"
    ).to_pylist()
    stale = sorted({r["dataset"] for r in differing if r["access"] != levels[r["dataset"]]})
    changed = {name: catalog.set_access(name, levels[name]) for name in stale}
    for name, n in changed.items():
        log.warning("dataset %s: access level set to %s on %d stored rows", name, levels[name], n)
    return changed


def catalog_problem(problem: Problem, key: str) -> Problem:
    """The catalog's view of a problem: the source key instead of the path, and the detail without any part of the path
    (a detail may name a slice file); the identified zone keeps both as they were."""
    detail = problem.detail or ""
    parts = {p for p in re.split(r"[/#]", problem.source_uri) if len(p) >= 3 and p.lower() not in _GENERIC_FOLDERS}
    for part in sorted(parts, key=len, reverse=True):
        detail = detail.replace(part, "<path>")
    return Problem(problem.dataset, key, problem.reason, _FILE_NAME.sub("<file>", detail))


_GENERIC_FOLDERS = frozenset({"data", "home", "mnt", "tmp", "users", "scratch", "raw", "anat", "func", "dwi", "perf"})
"""Folder names too common to be identifiers, left in a detail (``pixel data`` stays readable)."""

_FILE_NAME = re.compile(r"[^\s:'\"]+\.(?:dcm|ima|img|nii|nii\.gz|json|tsv|csv|txt)\b", re.IGNORECASE)
"""A file name quoted in a detail (a DICOM slice's name is not part of its series' path)."""


def rekey_legacy_rows(catalog: Catalog, datasets: Sequence[str], key: bytes, identified: IdentifiedZone) -> int:
    """Rows written before the identified zone existed (``ingest_version`` < 4) hold real paths: move each path to the
    identified zone and replace it in ``scans`` and ``quarantine`` by its source key (one MERGE per table; nothing to do,
    and no commit, once a catalog is converted). Superseded rows lose their ``image_uri`` (it was the user's file); the
    current rows are re-harvested by this run (their version is old), which stages their images. Old table versions
    still hold the paths until a vacuum: run ``brainiac catalog optimize`` with a zero retention to drop them."""
    if catalog.version("scans") is None or not datasets:
        return 0
    where = f"{sql_in('dataset', list(datasets))} AND NOT starts_with(source_uri, '{SOURCE_KEY_PREFIX}')"
    legacy = catalog.sql(f"SELECT scan_id, dataset, source_uri, relative_path, status FROM scans WHERE {where}")  # noqa: S608 - sql_in quotes the validated dataset names; the prefix is a constant
    if not legacy.num_rows:
        return 0
    rows = legacy.to_pylist()
    now = dt.datetime.now(dt.UTC)
    identified.record_sources(
        [
            {**r, "source_key": source_key(key, r["source_uri"]), "relative_path": r["relative_path"] or ""}
            for r in rows
        ],
        now,
    )
    source = pa.Table.from_pylist(
        [{"scan_id": r["scan_id"], "dataset": r["dataset"], "source_uri": r["source_uri"],
          "new_source": source_key(key, r["source_uri"])} for r in rows]
    )  # fmt: skip

    def attempt() -> None:
        _existing_table(catalog, "scans").merge(
            source,
            predicate="t.dataset = s.dataset AND t.source_uri = s.source_uri AND t.scan_id = s.scan_id",
            source_alias="s",
            target_alias="t",
        ).when_matched_update(
            updates={
                "source_uri": "s.new_source",
                "relative_path": "NULL",
                "image_uri": "CASE WHEN t.status = 'current' THEN t.image_uri ELSE NULL END",
                "ingest_version": "'legacy'",
            }
        ).execute()

    merge_with_retry(attempt, what="scans (re-keying legacy rows)")
    if catalog.table("quarantine") is not None:
        bad = catalog.sql(
            "SELECT DISTINCT source_uri, dataset FROM quarantine WHERE "  # noqa: S608 - sql_in quotes the validated dataset names; the prefix is a constant
            f"{sql_in('dataset', list(datasets))} AND NOT starts_with(source_uri, '{SOURCE_KEY_PREFIX}')"
        )
        if bad.num_rows:
            keyed = pa.Table.from_pylist(
                [{**r, "new_source": source_key(key, r["source_uri"])} for r in bad.to_pylist()]
            )
            merge_with_retry(
                lambda: _existing_table(catalog, "quarantine")
                .merge(keyed, predicate="t.source_uri = s.source_uri AND t.dataset = s.dataset",
                       source_alias="s", target_alias="t")
                .when_matched_update(updates={"source_uri": "s.new_source", "detail": "''"})
                .execute(),
                what="quarantine (re-keying legacy rows)",
            )  # fmt: skip
    log.info("re-keyed %d rows ingested before the identified zone", len(rows))
    return len(rows)


def _existing_table(catalog: Catalog, name: str) -> DeltaTable:
    """A table this run has seen in the catalog, opened at its latest version (for each try of a merge)."""
    table = catalog.table(name)
    if table is None:
        raise RuntimeError(f"catalog table {name} vanished during the run")
    return table


def _choose_layout(root: StorageLocation, requested: str, card: DatasetCard | None, registry: dict[str, Any]) -> str:
    if requested != "auto":
        if requested not in registry:
            raise UserError(f"unknown layout '{requested}'; choose auto, {', '.join(registry)}")
        return requested
    if card is not None:
        return card.layout
    for name in DETECT_ORDER:
        if registry[name].detect(root):
            return name
    raise UserError(f"could not recognise the layout of {root}; pass --layout bids|brats|manifest|dicom")


def _label_tables(root: StorageLocation, card: DatasetCard | None, dataset: str) -> tuple[dict, list[Problem]]:
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    problems: list[Problem] = []
    if card is None:
        return tables, problems
    for lf in card.label_files:
        try:
            df = read_table(root, lf.path, sep=lf.sep)
        except FileNotFoundError:
            problems.append(Problem(dataset, root.join(lf.path).uri, "missing_file", "label file named on the card"))
            continue
        except OSError as exc:  # a link out of the root, a folder, permission denied
            problems.append(problem_for_oserror(dataset, root.join(lf.path).uri, exc, "label file named on the card"))
            continue
        if lf.id_column not in df.columns:
            raise UserError(
                f"label file {lf.path} of {dataset} has no column '{lf.id_column}' (card field label_files.id_column)"
            )
        tables[lf.path] = {normalize_case_id(r[lf.id_column], card.case_id_pattern): r for r in table_records(df)}
    return tables, problems


def ingest(
    cfg: Config,
    sources: Sequence[str],
    *,
    layout: str = "auto",
    dataset: str | None = None,
    card_path: str | None = None,
    access: str | None = None,
    progress: bool = True,
    names: Mapping[str, str] | None = None,
) -> IngestSummary:
    """Ingest ``sources`` (dataset roots, local or ``s3://``) into the catalog of ``cfg``.

    Args:
        cfg: the run config (catalog location and storage options, Ray settings).
        sources: dataset root folders; each is one dataset.
        layout: ``auto`` (card, then detection) or a layout name.
        dataset: dataset name; default: the card's name, or the folder name when a shipped card has that name (any other
            folder needs an explicit name: folder names may carry identifiers). Only with a single source.
        card_path: a dataset card YAML to use instead of the shipped card.
        access: access level for a dataset without a card (default ``restricted``: unknown terms are treated as strict).
        names: dataset name of each source (as given in ``sources``), for a job that ingests many roots without cards
            (a pool whose folder names it chose itself); ``dataset`` wins for a single source.

    Raises:
        UserError: a source that does not exist, an unknown layout, a card that does not validate.
    """
    from brainiac.platform.cluster import init_ray

    started = time.perf_counter()
    if dataset and len(sources) > 1:
        raise UserError("--dataset names one dataset; give one SOURCE per run, or let names come from cards/folders")
    options = dict(cfg.catalog.storage_options)
    catalog = Catalog.open(cfg.catalog.uri, options or None)
    catalog.location.makedirs()  # a local directory, or a check that the S3 bucket exists
    identified = IdentifiedZone(
        cfg.ingest.identified_uri or default_identified_uri(catalog.uri),
        cfg.ingest.identified_storage_options or options or None,
    )
    pseudonymizer = Pseudonymizer.from_environment()
    bind_catalog_key(catalog.location, pseudonymizer)
    registry = adapters(pseudonymizer.key)
    now = dt.datetime.now(dt.UTC)
    summary = IngestSummary(catalog=catalog.uri, scans_version=None, quarantine_version=None, identified=identified.uri)

    plans: list[tuple[SourceScan, DatasetCard | None, str, dict]] = []
    problems: list[Problem] = []
    roots = []
    given: dict[str, str] = {}  # root URI -> the source as the caller wrote it (the key of ``names``)
    for source in sources:
        root = StorageLocation.resolve(source, options or None)
        if not root.exists():
            raise UserError(f"source not found: {source}")
        roots.append(root)
        given[root.uri] = source
    if roots:  # discovery lists folders and reads DICOM headers in Ray tasks (adapters.listing): Ray starts first
        init_ray(cfg.cluster)
    repair_unsearched(catalog, options or None)  # duplicate searches a killed run still owes (duplicates.py)

    levels: dict[str, str] = {}

    def discover(root: StorageLocation) -> tuple[str, str, list[Problem], list[tuple]]:
        name, card = _resolve_card(root, dataset or (names or {}).get(given[root.uri]), card_path)
        found: list[Problem] = []
        planned: list[tuple] = []
        with cached_listings():  # detection and discovery list the root once
            chosen = _choose_layout(root, layout, card, registry)
            level = card.access if card is not None else (access or "restricted")
            levels[name] = level
            tables, label_problems = _label_tables(root, card, name)
            found += label_problems
            for item in registry[chosen].discover(root, name, card):
                if isinstance(item, Problem):
                    found.append(item)
                else:
                    planned.append((item, card, level, tables))
        return name, chosen, found, planned

    # Roots are discovered side by side: each mostly waits for its listing tasks, and a pool has dozens of roots.
    with ThreadPoolExecutor(max_workers=min(DISCOVERY_THREADS, max(1, len(roots)))) as pool:
        for name, chosen, found, planned in pool.map(discover, roots):
            summary.datasets[name] = chosen
            problems += found
            plans += planned
    plans, unreadable = _utf8_names(plans)
    problems += unreadable
    summary.discovered = len(plans)
    summary.access_changed = apply_access_levels(catalog, levels)
    summary.phases["list"] = round(time.perf_counter() - started, 2)
    rekey_legacy_rows(catalog, list(summary.datasets), pseudonymizer.key, identified)

    # Harvest and commit progressively: every `commit_scans` harvested scans are merged into `scans` (and their problems
    # into `quarantine`), so a crash or a kill keeps every commit made before it and a re-run skips those scans.
    raw_area = catalog.location.join("raw")
    keys = [source_key(pseudonymizer.key, p[0].source_uri) for p in plans]
    # DICOM conversions are named by content (the series' scan id): a new series is a new file, never a rewrite.
    out_names = [f"{p[0].dataset}/dicom/{{shard}}/{{scan_id}}.nii.gz" for p in plans]
    known = known_sources(catalog, [p[0] for p in plans], keys) if cfg.ingest.skip_unchanged else None
    phase = dict.fromkeys(("harvest", "write"), 0.0)
    new_ids: set[str] = set()
    rows: list[dict[str, Any]] = []
    signatures: dict[tuple[str, str], dict[str, Any] | None] = {}
    pending_problems: list[Problem] = list(problems)
    pending_sources: list[dict[str, str]] = []
    quarantined: Counter = Counter(p.reason for p in problems)

    def commit() -> None:
        tick = time.perf_counter()
        # The identified zone first: every catalog row can then be traced back to its source by ingest, even after a
        # crash between the two commits (an identified row without a catalog row is harmless and re-used).
        identified.record_sources(pending_sources, now)
        identified.record_problems(
            [{**asdict(p), "source_key": source_key(pseudonymizer.key, p.source_uri)} for p in pending_problems], now
        )
        keyed_problems = [catalog_problem(p, source_key(pseudonymizer.key, p.source_uri)) for p in pending_problems]
        pending_sources.clear()
        written: list[dict[str, Any]] = []
        queue_searches(catalog, rows)  # before the scans commit: a kill after it leaves the search owed, not lost
        inserted, superseded, unchanged = write_scans(catalog, rows, written)
        maybe_crash("ingest.scans.committed")
        summary.inserted += inserted
        summary.superseded += superseded
        summary.unchanged += unchanged
        if written:
            new_ids.update(r["scan_id"] for r in written)
            append_harvest_signatures(
                catalog, written, [signatures.get((r["source_uri"], r["scan_id"])) for r in written]
            )
        signatures.clear()
        if write_quarantine(catalog, keyed_problems, now) or inserted or superseded:
            summary.commits += 1
        maybe_crash("ingest.quarantine.committed")
        rows.clear()
        pending_problems.clear()
        phase["write"] += time.perf_counter() - tick

    tick = time.perf_counter()
    shipped = [for_harvest(p[0]) for p in plans]
    stream = harvest_stream(shipped, out_names, options, raw_area.uri, progress=progress, known=known)
    with contextlib.closing(stream):  # an error below cancels the pending harvest tasks now, not at exit
        for index, result in stream:
            maybe_crash("ingest.harvest")
            scan, card, level, tables = plans[index]
            if "unchanged" in result:
                summary.unchanged += 1
                summary.skipped += 0 if result.get("read") else 1
                continue
            if "problem" in result:
                problem = Problem(**result["problem"])
                pending_problems.append(problem)
                quarantined[problem.reason] += 1
            else:
                for mask_problem in result.get("mask_problems", []):
                    pending_problems.append(Problem(**mask_problem))
                    quarantined[mask_problem["reason"]] += 1
                row = build_row(
                    scan, result["facts"], card=card, access=level, pseudonymizer=pseudonymizer,
                    extra_labels=label_lookup(card, tables, scan.subject), mask_uris=result.get("masks", {}), now=now,
                )  # fmt: skip
                # The catalog sees the source key and the staged image only; the real path goes to the identified zone.
                row["source_uri"] = keys[index]
                row["relative_path"] = row["image_uri"][len(catalog.uri.rstrip("/")) + 1 :]
                pending_sources.append(
                    {"source_key": keys[index], "scan_id": row["scan_id"], "dataset": scan.dataset,
                     "source_uri": scan.source_uri, "relative_path": scan.relative_path}
                )  # fmt: skip
                rows.append(row)
                signatures[(row["source_uri"], row["scan_id"])] = result.get("signature")
            if len(rows) + len(pending_problems) >= cfg.ingest.commit_scans:
                phase["harvest"] += time.perf_counter() - tick
                commit()
                tick = time.perf_counter()
    phase["harvest"] += time.perf_counter() - tick
    commit()
    summary.phases.update({k: round(v, 2) for k, v in phase.items()})

    tick = time.perf_counter()
    if new_ids:
        summary.duplicate_groups = link_duplicates(catalog, new_ids, options)
    summary.phases["duplicates"] = round(time.perf_counter() - tick, 2)
    tick = time.perf_counter()
    summary.quarantined = dict(quarantined)
    summary.scans_version = catalog.version("scans")
    summary.quarantine_version = catalog.version("quarantine")
    if summary.datasets and summary.scans_version is not None:
        summary.counts = current_counts(catalog, list(summary.datasets))
    summary.phases["summary"] = round(time.perf_counter() - tick, 2)
    summary.seconds = round(time.perf_counter() - started, 2)
    return summary
