"""Appends to the ``volumes`` table whose cost does not grow with the table: workers write Parquet part files into the
version's partition folder, and the driver commits only Delta file actions.

Why: a MERGE per batch re-reads the target partition to find matches, so a run of ``n`` batches reads O(n²) bytes
(hundreds of TB at 49k volumes of ~3.6 MB), and every result travelled through the driver. Here a commit writes one
log entry and reads no data file; the arrays go from the worker straight to storage.

How a run writes:

1. Once, up front, :class:`VolumeCommitter` pins a snapshot of ``volumes`` and reads the ``scan_id`` column of the
   version's partition (one narrow read): :attr:`VolumeCommitter.done`. The caller submits only scans not in it.
2. A worker (a Ray task) writes its rows with :func:`write_part_file` as one Parquet file under
   ``<table>/preprocess_version=<v>/`` with small row groups (one volume each by default, so a reader of one volume
   reads about one volume) and returns a small :class:`PartFile` (path, size, Delta statistics, scan ids).
3. The driver buffers part files and commits them as one append of ``AddAction`` s when about ``commit_bytes`` have
   gathered, or ``commit_seconds`` have passed, or ``commit_files`` files wait (:meth:`VolumeCommitter.due`).

Guarantees (for writers that go through this module):

- **Crash**: readers see a file only once its commit lands. A crash loses at most the uncommitted buffer; its files are
  orphans that no reader sees (``vacuum`` removes them) and a re-run writes those scans again under new names.
- **Re-run**: scans committed before are in ``done`` and never submitted again, so a second run writes zero rows.
- **Concurrent runs of one version**: every commit carries a Delta application transaction (``txn``) with the app id
  ``brainiac.preprocess/<version>``; Delta refuses a commit when another commit with that app id landed after the
  committer's snapshot. The loser refreshes its snapshot (log only), reads ``scan_id`` of just the files others added to
  the partition since (work bounded by what they wrote, not by the table), drops its rows for those scans (rewriting a
  part file that mixes kept and dropped rows), and retries. Two jobs may both compute a scan, but at most one row per
  ``(preprocess_version, scan_id)`` is committed. A plain append or MERGE by other code is not covered.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from brainiac.platform.catalog import VOLUMES_SCHEMA, Catalog
from brainiac.platform.faults import maybe_crash

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from brainiac.platform.storage import StorageLocation

__all__ = [
    "APP_ID_PREFIX",
    "DEFAULT_COMMIT_BYTES",
    "DEFAULT_COMMIT_FILES",
    "DEFAULT_COMMIT_SECONDS",
    "PartFile",
    "VolumeCommitter",
    "partition_dir",
    "run_tasks",
    "write_part_file",
]

log = logging.getLogger(__name__)

PARTITION_COLUMN = "preprocess_version"
FILE_SCHEMA = pa.schema([f for f in VOLUMES_SCHEMA if f.name != PARTITION_COLUMN])
"""Columns stored in a part file: Delta keeps partition values in the log, not in the data files."""
BLOB_COLUMNS = frozenset(f.name for f in FILE_SCHEMA if pa.types.is_binary(f.type))
"""Already zstd-compressed arrays: no second compression, no dictionary, no min/max statistics."""
SMALL_COLUMNS = [f.name for f in FILE_SCHEMA if f.name not in BLOB_COLUMNS]

_PLAIN = re.compile(r"[A-Za-z0-9._-]+")
APP_ID_PREFIX = "brainiac.preprocess/"
DEFAULT_COMMIT_BYTES = 1 << 30
DEFAULT_COMMIT_SECONDS = 120.0
DEFAULT_COMMIT_FILES = 512
COMMIT_ATTEMPTS = 8


def partition_dir(version: str) -> str:
    """The partition folder of ``version`` relative to the table root (Hive style).

    Raises:
        ValueError: a version with characters that Delta would have to escape in paths (versions are short hashes).
    """
    if not _PLAIN.fullmatch(version):
        raise ValueError(f"preprocess version {version!r} must match {_PLAIN.pattern}")
    return f"{PARTITION_COLUMN}={version}"


@dataclass(frozen=True)
class PartFile:
    """One Parquet file a worker wrote into a version's partition, not yet committed: what the driver needs to add it."""

    path: str
    """Relative to the table root, as the Delta log stores it."""
    version: str
    size: int
    stats: str
    """Delta ``stats`` JSON (see :func:`file_stats`)."""
    scan_ids: tuple[str, ...]

    @property
    def rows(self) -> int:
        return len(self.scan_ids)

    def action(self) -> Any:
        from deltalake.transaction import AddAction

        return AddAction(
            path=self.path,
            size=self.size,
            partition_values={PARTITION_COLUMN: self.version},
            modification_time=int(time.time() * 1000),
            data_change=True,
            stats=self.stats,
        )


def file_stats(table: pa.Table) -> str:
    """Delta ``stats`` JSON of a part file: the row count only.

    Why no file-level min/max: a file holds a few scans with random (hash) ids, so its ``scan_id`` range covers most of
    the key space and prunes nothing, while every statistic in the log is parsed again each time delta-rs refreshes its
    snapshot, once per commit, for every file of the table. Readers of single volumes prune by the row-group
    statistics inside each file instead (one volume per row group)."""
    return json.dumps({"numRecords": table.num_rows})


def _write_parquet(location: StorageLocation, version: str, table: pa.Table, rows_per_row_group: int) -> PartFile:
    import pyarrow.parquet as pq

    rel = posixpath.join(partition_dir(version), f"part-{uuid.uuid4().hex}.zstd.parquet")
    target = location.join(rel)
    fs = location.pyarrow_filesystem()
    if not location.is_remote:
        fs.create_dir(posixpath.dirname(target.path), recursive=True)
    pq.write_table(
        table,
        target.path,
        filesystem=fs,
        row_group_size=max(1, rows_per_row_group),
        compression={name: ("NONE" if name in BLOB_COLUMNS else "ZSTD") for name in table.column_names},
        use_dictionary=SMALL_COLUMNS,
        write_statistics=SMALL_COLUMNS,
    )
    size = fs.get_file_info(target.path).size
    return PartFile(
        path=rel,
        version=version,
        size=int(size),
        stats=file_stats(table),
        scan_ids=tuple(table.column("scan_id").to_pylist()),
    )


def write_part_file(
    location: StorageLocation,
    version: str,
    rows: Sequence[Mapping[str, Any]],
    now: dt.datetime,
    *,
    rows_per_row_group: int = 1,
) -> PartFile:
    """Write ``rows`` (``volumes`` rows of one version) as one Parquet file in the version's partition of the table at
    ``location``; runs in a worker. ``preprocessed_at`` is set to ``now``. Nothing is visible to readers until the driver
    commits the returned :class:`PartFile`.

    Raises:
        ValueError: a row of another version, or a scan twice in ``rows``.
    """
    if not rows:
        raise ValueError("write_part_file needs at least one row")
    other = {r[PARTITION_COLUMN] for r in rows} - {version}
    if other:
        raise ValueError(f"rows of version(s) {sorted(other)} given for version {version}")
    ids = [r["scan_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("a scan appears twice in one part file")
    table = pa.Table.from_pylist([{**r, "preprocessed_at": now} for r in rows], schema=VOLUMES_SCHEMA)
    return _write_parquet(location, version, table.drop_columns([PARTITION_COLUMN]), rows_per_row_group)


def _is_conflict(exc: Exception) -> bool:
    from deltalake.exceptions import CommitFailedError

    text = str(exc).lower()
    return isinstance(exc, CommitFailedError) or "concurrent" in text or "conflict" in text


CHECKPOINT_EVERY = 10
"""Commits of one run between Delta checkpoints (each followed by a reload of the table from it)."""


@dataclass
class VolumeCommitter:
    """The driver side of a run's writes to one ``preprocess_version`` of ``volumes`` (see the module docstring).

    Example:
        >>> committer = VolumeCommitter.open(catalog, version)  # doctest: +SKIP
        >>> todo = [s for s in scans if s["scan_id"] not in committer.done]  # doctest: +SKIP
        >>> committer.add(part)  # a PartFile from a worker  # doctest: +SKIP
        >>> if committer.due(): committer.commit()  # doctest: +SKIP
    """

    catalog: Catalog
    version: str
    table: DeltaTable
    done: set[str]
    """Scan ids committed under this version: at open, plus this run's commits and others' seen since."""
    commit_bytes: int = DEFAULT_COMMIT_BYTES
    commit_seconds: float = DEFAULT_COMMIT_SECONDS
    commit_files: int = DEFAULT_COMMIT_FILES
    rows_per_row_group: int = 1
    clock: Callable[[], float] = time.monotonic
    commits: int = 0
    rows_committed: int = 0
    duplicates_dropped: int = 0
    _known: set[str] = field(default_factory=set, repr=False)
    _buffer: list[PartFile] = field(default_factory=list, repr=False)
    _buffer_bytes: int = 0
    _last_commit: float = 0.0

    @classmethod
    def open(
        cls,
        catalog: Catalog,
        version: str,
        *,
        commit_bytes: int = DEFAULT_COMMIT_BYTES,
        commit_seconds: float = DEFAULT_COMMIT_SECONDS,
        commit_files: int = DEFAULT_COMMIT_FILES,
        rows_per_row_group: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> VolumeCommitter:
        """Pin the current snapshot of ``volumes`` (created if missing) and read which scans ``version`` already holds:
        the ``scan_id`` column of that partition at that snapshot, the run's only read of existing data."""
        table = catalog.create_if_missing("volumes")
        snapshot = table.version()
        where = f"{PARTITION_COLUMN} = '{version.replace(chr(39), chr(39) * 2)}'"
        done = set(catalog.select("volumes", where, ["scan_id"], version=snapshot)["scan_id"].to_pylist())
        committer = cls(
            catalog,
            version,
            table,
            done,
            commit_bytes=commit_bytes,
            commit_seconds=commit_seconds,
            commit_files=commit_files,
            rows_per_row_group=rows_per_row_group,
            clock=clock,
        )
        committer._known = set(committer._partition_files())
        committer._last_commit = clock()
        return committer

    @property
    def app_id(self) -> str:
        return APP_ID_PREFIX + self.version

    @property
    def location(self) -> StorageLocation:
        return self.catalog.table_location("volumes")

    @property
    def pending_files(self) -> int:
        return len(self._buffer)

    @property
    def pending_bytes(self) -> int:
        return self._buffer_bytes

    def add(self, part: PartFile) -> None:
        """Buffer a worker's part file for the next commit."""
        if part.version != self.version:
            raise ValueError(f"part file of version {part.version} given to the committer of {self.version}")
        self._buffer.append(part)
        self._buffer_bytes += part.size

    def due(self) -> bool:
        """Whether the buffer should be committed now: enough bytes or files, or the last commit is old enough that a
        crash would lose too much finished work."""
        if not self._buffer:
            return False
        return (
            self._buffer_bytes >= self.commit_bytes
            or len(self._buffer) >= self.commit_files
            or self.clock() - self._last_commit >= self.commit_seconds
        )

    def commit(self) -> int:
        """Commit the buffered part files as one Delta append (file actions only); returns the rows committed.

        Rows for scans already committed (by this run or, concurrently, by another) are dropped first; a lost commit
        race refreshes from the log and the winners' new files, then retries.

        Raises:
            CommitFailedError: still losing after :data:`COMMIT_ATTEMPTS` attempts, or any other commit error.
        """
        from deltalake.transaction import CommitProperties, Transaction

        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            parts = self._drop_committed(self._buffer)
            if not parts:
                self._clear()
                return 0
            txn_version = (self.table.transaction_version(self.app_id) or 0) + 1
            try:
                self.table.create_write_transaction(
                    [p.action() for p in parts],
                    mode="append",
                    schema=VOLUMES_SCHEMA,
                    partition_by=[PARTITION_COLUMN],
                    commit_properties=CommitProperties(
                        app_transactions=[Transaction(self.app_id, txn_version)],
                        custom_metadata={"brainiac.operation": "preprocess append"},
                    ),
                )
            except Exception as exc:  # deltalake raises several types for a lost race
                if not _is_conflict(exc) or attempt == COMMIT_ATTEMPTS:
                    raise
                delay = 0.1 * (2 ** (attempt - 1)) * (0.5 + random.random())  # noqa: S311 - retry jitter, not a secret
                log.info("volumes: commit race lost (attempt %d), refreshing and retrying in %.2fs", attempt, delay)
                time.sleep(delay)
                self._buffer = parts
                self._refresh()
                continue
            maybe_crash("volumes.committed")
            rows = sum(p.rows for p in parts)
            self._known.update(p.path for p in parts)
            for p in parts:
                self.done.update(p.scan_ids)
            self.commits += 1
            self.rows_committed += rows
            self._clear()
            if self.commits % CHECKPOINT_EVERY == 0:
                self._checkpoint()
            self._refresh(committed_txn=txn_version)
            return rows
        raise AssertionError("unreachable")

    # -- internals -------------------------------------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        """Write a Delta checkpoint and reload the table from it.

        delta-rs keeps every commit since the snapshot was loaded in its log segment and replays it when it commits and
        refreshes: without this, commit time grew ~4x over 200 commits of a 49k-row write (bench/preprocess_commits.py).
        A checkpoint every :data:`CHECKPOINT_EVERY` commits keeps that segment short for this writer and every reader.
        """
        self.table.create_checkpoint()
        table = self.catalog.table("volumes")
        if table is None:
            raise RuntimeError("the volumes table vanished after its checkpoint")
        self.table = table

    def _clear(self) -> None:
        self._buffer = []
        self._buffer_bytes = 0
        self._last_commit = self.clock()

    def _partition_files(self) -> list[str]:
        """Paths (relative to the table root) of the version's files in the current snapshot, from the log alone."""
        root = self.location.uri.rstrip("/") + "/"
        uris = self.table.file_uris(file_pruning_predicate=[(PARTITION_COLUMN, "=", self.version)])
        return [uri[len(root) :] if uri.startswith(root) else uri for uri in uris]

    def _refresh(self, committed_txn: int | None = None) -> None:
        """Move the snapshot to the newest version (the log only) and learn the scans that other writers of this version
        committed since the last look.

        After our own commit, when this version's ``txn`` is still the one we wrote, nobody else wrote the version
        since (a writer of it commits ``txn + 1`` on top of a snapshot holding ours), so nothing more is read: a commit
        costs a log append and a log refresh. Otherwise the new files of the partition are found by comparing the
        snapshot's file list with what we knew, and only their ``scan_id`` column is read.
        """
        import pyarrow.parquet as pq

        self.table.update_incremental()
        if committed_txn is not None and self.table.transaction_version(self.app_id) == committed_txn:
            return
        new = [path for path in self._partition_files() if path not in self._known]
        if not new:
            return
        fs, loc = self.location.pyarrow_filesystem(), self.location
        for path in new:
            ids = pq.read_table(loc.join(path).path, columns=["scan_id"], filesystem=fs)["scan_id"].to_pylist()
            self.done.update(ids)
        self._known.update(new)
        log.info("volumes: %d file(s) of version %s were committed by another writer", len(new), self.version)

    def _drop_committed(self, parts: Iterable[PartFile]) -> list[PartFile]:
        """``parts`` without rows of scans in :attr:`done`: a file with none is kept as is, one with only such rows is
        deleted, a mixed one is rewritten without them (our own uncommitted file, so the read is bounded)."""
        import pyarrow.parquet as pq

        kept: list[PartFile] = []
        fs = self.location.pyarrow_filesystem()
        for part in parts:
            dup = self.done.intersection(part.scan_ids)
            if not dup:
                kept.append(part)
                continue
            self.duplicates_dropped += len(dup)
            path = self.location.join(part.path).path
            if len(dup) < part.rows:
                table = pq.read_table(path, filesystem=fs, schema=FILE_SCHEMA)
                keep = pc.invert(pc.is_in(table.column("scan_id"), value_set=pa.array(sorted(dup), pa.string())))
                kept.append(_write_parquet(self.location, self.version, table.filter(keep), self.rows_per_row_group))
            fs.delete_file(path)
        return kept


def run_tasks(
    committer: VolumeCommitter,
    chunks: Iterable[Any],
    submit: Callable[[Any], Any],
    *,
    window: int,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_done: Callable[[int], object] | None = None,
    size: Callable[[Any], int] = len,
    on_failure: Callable[[Any, Exception], None] | None = None,
) -> int:
    """Drive Ray tasks with at most ``window`` in flight and commit their part files as they complete; returns the rows
    committed.

    ``submit(chunk)`` starts one task and returns its ObjectRef; a task returns a dict whose ``"part"`` is a
    :class:`PartFile` or ``None`` (``on_result`` sees every dict, ``on_done`` the size of each finished chunk, for a
    progress bar). Submitting lazily keeps ``ray.wait`` cheap (it scans every ref it is given) and the driver's memory
    flat; the buffer is committed whenever :meth:`VolumeCommitter.due` says so, and once more at the end.

    A task that fails for good (a worker killed for memory after Ray's retries, an error the task did not catch) does
    not abort the run: a chunk of several items is run again one item per task, so the failure is pinned to its item,
    and a failed single item goes to ``on_failure(chunk, error)`` (without it, the error is raised).
    """
    import ray

    source = iter(chunks)
    retry: list[Any] = []
    pending: dict[Any, Any] = {}

    def top_up() -> None:
        while len(pending) < max(1, window):
            chunk = retry.pop() if retry else next(source, None)
            if chunk is None:
                return
            pending[submit(chunk)] = chunk

    rows = 0
    top_up()
    while pending:
        # The timeout lets a time-due commit happen while every task in flight is still running.
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(5.0, committer.commit_seconds))
        for ref in ready:
            chunk = pending.pop(ref)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if on_failure is None:
                    raise
                if size(chunk) > 1 and isinstance(chunk, list):
                    log.warning(
                        "a task of %d items failed (%s); running them one by one", size(chunk), type(exc).__name__
                    )
                    retry.extend([item] for item in chunk)
                else:
                    on_failure(chunk, exc)
                    if on_done is not None:
                        on_done(size(chunk))
                top_up()
                continue
            top_up()
            if on_done is not None:
                on_done(size(chunk))
            if on_result is not None:
                on_result(out)
            if out.get("part") is not None:
                committer.add(out["part"])
            maybe_crash("preprocess.task")  # its part file is on storage, not yet committed: an orphan if killed now
        if committer.due():
            rows += committer.commit()
    return rows + committer.commit()
