"""The catalog: a directory or ``s3://`` prefix holding the platform's Delta tables, with schemas, SQL and safe MERGE.

Tables (docs/architecture.md#tables): ``scans`` (one row per image, partitioned by dataset), ``quarantine`` (inputs
that could not be ingested, with a reason code), ``duplicates`` (the same image stored as other bytes),
``scan_signatures`` and ``duplicate_queue`` (the duplicate search's inputs), ``volumes`` and ``preprocess_configs``
(preprocessed voxels, by version), ``splits`` and ``embeddings``. Writers go through :func:`merge_with_retry`, which
retries a MERGE when another writer committed first, so two ingest jobs on one catalog end without duplicate rows.
Tables are written without deletion vectors so that every reader (Ray's ``read_delta``, polars, older delta-rs) can read
them.

Access levels (``open | registered | restricted``, the ``access`` column of ``scans``, from the dataset card): a catalog
opened with ``allowed_access`` (:meth:`Catalog.restricted`) shows every reader, SQL included, only the rows of the
datasets whose scans are all at an allowed level (docs/access.md). It is a guard against mistakes inside the platform,
not a security boundary: whoever holds storage credentials reads the files directly, so cloud IAM on the per-dataset
prefixes is what enforces a data use agreement.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from brainiac.platform.errors import UserError
from brainiac.platform.storage import StorageLocation

if TYPE_CHECKING:
    import pandas as pd
    from deltalake import DeltaTable, QueryBuilder

__all__ = [
    "ACCESS_LEVELS",
    "PREPROCESS_CONFIGS_SCHEMA",
    "ROW_GROUP_ROWS",
    "SCHEMAS",
    "SPLITS_SCHEMA",
    "VOLUMES_SCHEMA",
    "AccessReport",
    "Catalog",
    "ScanQuery",
    "insert_missing",
    "merge_with_retry",
    "read_only_statement",
    "sql_in",
    "sql_literal",
]

log = logging.getLogger(__name__)

_TS = pa.timestamp("us", tz="UTC")

SCANS_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),  # sha256 of the file bytes, or of the sorted slice hashes of a DICOM series
        ("dataset", pa.string()),
        ("layout", pa.string()),
        ("access", pa.string()),  # open | registered | restricted (from the dataset card)
        ("site", pa.string()),
        ("subject_id", pa.string()),  # keyed pseudonym, never the dataset's own id
        ("session", pa.string()),
        ("run", pa.string()),
        ("sequence", pa.string()),  # canonical: T1w, T1ce, T2w, FLAIR, DWI, ADC, SWI, PD, other
        (
            "sequence_rule",
            pa.string(),
        ),  # which rule decided the sequence: bids_suffix | description | filename | unknown
        ("source_uri", pa.string()),  # absolute path or s3:// URI as given
        ("relative_path", pa.string()),  # relative to the dataset root
        ("image_uri", pa.string()),  # the NIfTI to read (= source_uri, or the converted file in the raw area for DICOM)
        ("format", pa.string()),  # nifti | dicom
        ("bytes", pa.int64()),
        ("shape", pa.list_(pa.int32())),
        ("spacing_mm", pa.list_(pa.float64())),
        ("axcodes", pa.string()),
        ("affine", pa.list_(pa.float64())),  # 16 values, row-major, RAS+ world
        ("qform_code", pa.int16()),
        ("sform_code", pa.int16()),
        ("dtype", pa.string()),
        ("field_strength_t", pa.float64()),
        ("manufacturer", pa.string()),
        ("scanner_model", pa.string()),
        ("tr_ms", pa.float64()),
        ("te_ms", pa.float64()),
        ("age_years", pa.float64()),  # years, capped at 90
        ("sex", pa.string()),  # F | M | null
        ("diagnosis", pa.string()),  # healthy | MCI | AD | glioma | stroke | other | null
        ("labels", pa.string()),  # JSON: idh, survival_days, stroke_onset_days, mask_uri ...
        ("header", pa.string()),  # JSON escape hatch, PHI removed
        ("status", pa.string()),  # current | superseded
        ("ingested_at", _TS),
        ("ingest_version", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("dataset", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("seen_at", _TS),
        ("ingest_version", pa.string()),
    ]
)

DUPLICATES_SCHEMA = pa.schema(
    [
        ("group_id", pa.string()),  # hash of the canonically reoriented voxels shared by the group
        ("scan_id", pa.string()),
        ("dataset", pa.string()),
        ("subject_id", pa.string()),
        ("method", pa.string()),
        ("found_at", _TS),
    ]
)

SPLITS_SCHEMA = pa.schema(
    [
        ("subject_id", pa.string()),
        ("seed", pa.int64()),
        ("split", pa.string()),  # train | val | test
        ("group_id", pa.string()),  # duplicate group the subject belongs to (itself when alone)
        ("assigned_at", _TS),
    ]
)

VOLUMES_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),
        ("preprocess_version", pa.string()),
        ("dataset", pa.string()),
        ("subject_id", pa.string()),
        ("sequence", pa.string()),
        ("whole", pa.binary()),  # zstd-compressed float16, C order, whole-brain crop on the template grid
        ("whole_shape", pa.list_(pa.int32())),
        ("whole_spacing_mm", pa.list_(pa.float64())),
        ("whole_affine", pa.list_(pa.float64())),
        ("fixed", pa.binary()),  # zstd-compressed float16, fixed_size³ cube (96³ in production)
        ("fixed_shape", pa.list_(pa.int32())),
        ("fixed_affine", pa.list_(pa.float64())),
        ("mask", pa.binary()),  # zstd-compressed uint8 brain mask on the whole grid
        ("labels_whole", pa.binary()),  # zstd-compressed uint8 label map on the whole grid (null if none)
        ("labels_fixed", pa.binary()),  # zstd-compressed uint8 label map on the fixed grid (null if none)
        ("label_name", pa.string()),
        ("dtype", pa.string()),
        ("transform", pa.list_(pa.float64())),  # template mm -> scanner mm, row-major 4x4
        ("registration_metric", pa.float64()),
        ("brain_volume_ml", pa.float64()),
        ("snr", pa.float64()),
        ("clipped_fraction", pa.float64()),
        ("qc_pass", pa.bool_()),
        ("qc_reason", pa.string()),
        ("seconds", pa.float64()),
        ("preprocessed_at", _TS),
    ]
)

EMBEDDINGS_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),
        ("model", pa.string()),  # registered name and version (brainiac-encoder/3) or the checkpoint folder
        ("preprocess_version", pa.string()),
        ("dataset", pa.string()),
        ("subject_id", pa.string()),
        ("sequence", pa.string()),
        ("vector", pa.list_(pa.float32())),
        ("embedded_at", _TS),
    ]
)

PREPROCESS_CONFIGS_SCHEMA = pa.schema(
    [
        ("preprocess_version", pa.string()),  # PreprocessConfig.version(): the key volumes rows carry
        ("config", pa.string()),  # JSON of PreprocessConfig.to_dict(), so a model's inputs can be rebuilt from one scan
        ("created_at", _TS),  # first time a preprocess job ran with this version
    ]
)

SCAN_SIGNATURES_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),
        ("dataset", pa.string()),
        ("subject_id", pa.string()),
        ("sequence", pa.string()),
        ("grid_key", pa.string()),  # sequence|RAS voxel size (0.1 mm): the scans a copy can be among
        ("signature_version", pa.string()),  # signatures.SIGNATURE_VERSION: another scheme is recomputed, never mixed
        ("signature", pa.binary()),  # float16 thumbnail (signatures.CELLS³), null for an image with no foreground
        ("bucket_keys", pa.list_(pa.int64())),  # SimHash band keys (band index in the high bits)
        ("computed_at", pa.timestamp("us", tz="UTC")),
    ]
)
"""``<catalog>/scan_signatures``: one row per catalogued (scan_id, dataset) and signature scheme."""

DUPLICATE_QUEUE_SCHEMA = pa.schema(
    [
        ("scan_id", pa.string()),
        ("dataset", pa.string()),
        ("queued_at", pa.timestamp("us", tz="UTC")),
    ]
)
"""``<catalog>/duplicate_queue``: the (scan_id, dataset) nodes whose duplicate search is owed: written before the
``scans`` commit that adds them, removed after the ``duplicates`` commit of their search
(:mod:`brainiac.ingestion.duplicates`). Empty between runs unless a run crashed."""

SCHEMAS: dict[str, pa.Schema] = {
    "scans": SCANS_SCHEMA,
    "quarantine": QUARANTINE_SCHEMA,
    "duplicates": DUPLICATES_SCHEMA,
    "splits": SPLITS_SCHEMA,
    "volumes": VOLUMES_SCHEMA,
    "embeddings": EMBEDDINGS_SCHEMA,
    "preprocess_configs": PREPROCESS_CONFIGS_SCHEMA,
    "scan_signatures": SCAN_SIGNATURES_SCHEMA,  # duplicate search (ingestion/duplicates.py)
    "duplicate_queue": DUPLICATE_QUEUE_SCHEMA,  # searches owed by a killed ingest (ingestion/duplicates.py)
}
PARTITIONS: dict[str, list[str]] = {"scans": ["dataset"], "volumes": ["preprocess_version"], "embeddings": ["model"]}
TABLE_CONFIGURATION = {"delta.enableDeletionVectors": "false"}
ROW_GROUP_ROWS: dict[str, int] = {"volumes": 1}
"""Rows per Parquet row group where a table's rows are large: one ``volumes`` row (a few MB of arrays) per group, so
a reader of one volume reads about one volume (:meth:`Catalog.select_keys`, the pretraining stream). Writers and
compaction keep it."""

ACCESS_LEVELS = ("open", "registered", "restricted")
"""The access levels a dataset card may give (``brainiac.ingestion.cards`` holds the same tuple; the catalog does not
import the cards, which import the config)."""

UNFILTERED_TABLES = frozenset({"preprocess_configs"})
"""Tables without rows of a dataset: a restricted catalog shows them whole. ``splits`` is filtered by a semi-join on
the readable scans' ``subject_id``; every other table by its ``dataset`` column (a table with neither is hidden)."""


def sql_literal(value: Any) -> str:
    """A SQL literal for a Python value (strings quoted with '' escaping; None → NULL)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


SQL_IN_MAX_VALUES = 256
""":func:`sql_in` is for short lists from a config or a vocabulary (datasets, sequences, reason codes); a list that
grows with the data (ids) goes through :meth:`Catalog.select_keys` instead."""


def sql_in(column: str, values: Sequence[Any]) -> str:
    """``column IN (...)`` (or FALSE for no values) for a short list of at most :data:`SQL_IN_MAX_VALUES` values.

    Raises:
        ValueError: more values than that: select by a key array with :meth:`Catalog.select_keys` (a literal list of
            ~20,000 values overflows the stack of deltalake's native SQL planner and kills the process).
    """
    if len(values) > SQL_IN_MAX_VALUES:
        raise ValueError(
            f"sql_in on '{column}' with {len(values)} values (max {SQL_IN_MAX_VALUES}); use Catalog.select_keys"
        )
    if not values:
        return "FALSE"
    return f'"{column}" IN ({", ".join(sql_literal(v) for v in values)})'


def _plain_types(table: pa.Table, schema: pa.Schema | None) -> pa.Table:
    """DataFusion returns view types (Utf8View); give readers the catalog's plain types."""
    fields = []
    for f in table.schema:
        if schema is not None and f.name in schema.names:
            fields.append(schema.field(f.name))
        elif pa.types.is_string_view(f.type):
            fields.append(pa.field(f.name, pa.string()))
        elif pa.types.is_binary_view(f.type):
            fields.append(pa.field(f.name, pa.binary()))
        else:
            fields.append(f)
    return table.cast(pa.schema(fields))


def _plain_batch(batch: pa.RecordBatch, schema: pa.Schema | None) -> pa.RecordBatch:
    table = _plain_types(pa.Table.from_batches([batch]), schema)
    return table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)


def _key_array(values: Iterable[Any] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """The distinct keys as one plain Arrow array (the value set of a semi-join)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(list(values))
    if pa.types.is_string_view(values.type) or pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
    return pc.unique(values)


def _empty_like(dt: DeltaTable, columns: Sequence[str]) -> pa.Table:
    schema = pa.schema(dt.schema().to_arrow())
    return schema.empty_table().select(list(columns))


KEYED_BATCH_ROWS = 65_536
"""Rows per batch when :meth:`Catalog.select_keys` reads a large row group."""


def _read_keyed_rows(
    path: str, column: str, keys: pa.Array, columns: Sequence[str], filesystem: Any
) -> pa.Table | None:
    """The ``columns`` of the rows of one Parquet file whose ``column`` is in ``keys``, reading the key column and
    then only the row groups that hold a match (``None`` when no row matches)."""
    import numpy as np
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path, filesystem=filesystem)
    key_column = parquet.read(columns=[column]).column(column)
    if pa.types.is_string_view(key_column.type):
        key_column = key_column.cast(pa.string())
    rows = np.flatnonzero(pc.is_in(key_column, value_set=keys.cast(key_column.type)).to_numpy(False))
    if rows.size == 0:
        return None
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    starts = np.cumsum([0, *sizes])
    group_of = np.searchsorted(starts, rows, side="right") - 1
    pieces = []
    for group in sorted(set(group_of.tolist())):
        local = rows[group_of == group] - int(starts[group])
        if sizes[group] <= KEYED_BATCH_ROWS:  # a small group (one volume, a few rows): read it whole
            table = parquet.read_row_groups([group], columns=list(columns) or [column])
            pieces.append(_plain_types(table, None).take(pa.array(local, pa.int64())))
            continue
        # A large group (a metadata table written in one piece): stream it in batches, keeping the hits of each,
        # so memory holds one batch and the result, not the whole group.
        offset = 0
        for batch in parquet.iter_batches(KEYED_BATCH_ROWS, row_groups=[group], columns=list(columns) or [column]):
            inside = local[(local >= offset) & (local < offset + batch.num_rows)] - offset
            if inside.size:
                table = _plain_types(pa.Table.from_batches([batch]), None)
                pieces.append(table.take(pa.array(inside, pa.int64())))
            offset += batch.num_rows
    return pa.concat_tables(pieces)


_WRITE_KEYWORDS = frozenset(
    [
        "COPY",
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "CREATE",
        "DROP",
        "ALTER",
        "TRUNCATE",
        "SET",
        "RESET",
        "PREPARE",
        "EXECUTE",
        "DEALLOCATE",
        "ATTACH",
        "DETACH",
        "LOAD",
        "INSTALL",
        "GRANT",
        "REVOKE",
        "VACUUM",
        "OPTIMIZE",
    ]
)
_READ_STARTS = frozenset({"SELECT", "WITH", "VALUES", "EXPLAIN", "SHOW", "DESCRIBE", "("})


def read_only_statement(sql: str) -> str:
    """``sql`` as one read-only statement (a query), without a trailing semicolon.

    DataFusion executes ``COPY ... TO`` (which writes files anywhere the process may write, on S3 too), DDL and DML, so
    the catalog's SQL entry points accept a single query and nothing else: a statement that starts with ``SELECT``,
    ``WITH``, ``VALUES``, ``EXPLAIN``, ``SHOW`` or ``DESCRIBE``, with no write keyword outside string literals and
    quoted identifiers, and no second statement.

    Raises:
        UserError: anything else; the message is one line.
    """
    import re

    text = sql.strip()
    # Blank out comments, string literals and quoted identifiers, so that only SQL keywords are left to inspect.
    bare = re.sub(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", " ", text, flags=re.S)
    body = bare.strip().rstrip(";").strip()
    if ";" in body:
        raise UserError("SQL error: one statement at a time (found ';' between statements)")
    words = re.findall(r"[A-Za-z_]+|\(", body)
    if not words or words[0].upper() not in _READ_STARTS:
        raise UserError("SQL error: only read-only queries (SELECT, WITH, VALUES, EXPLAIN, SHOW, DESCRIBE) are allowed")
    writes = sorted({w.upper() for w in words} & _WRITE_KEYWORDS)
    if writes:
        raise UserError(f"SQL error: the catalog is read-only through SQL ({', '.join(writes)} refused)")
    return text.rstrip().rstrip(";")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _to_pyarrow(reader: Any) -> pa.Table:
    """deltalake's QueryBuilder yields an arro3 stream; read it into a pyarrow Table (zero-copy C stream)."""
    return pa.RecordBatchReader.from_stream(reader).read_all()


def _is_conflict(exc: Exception) -> bool:
    from deltalake.exceptions import CommitFailedError

    text = str(exc).lower()
    return (
        isinstance(exc, CommitFailedError)
        or "conflict" in text
        or "concurrent" in text
        or "version already exists" in text
    )


def merge_with_retry(write: Callable[[], Any], *, what: str, attempts: int = 8, base_delay_s: float = 0.2) -> Any:
    """Run ``write`` (which must re-read the table and recompute its changes each call) until it commits.

    Delta's optimistic concurrency makes a writer fail when another committed first; re-running the whole read →
    diff → MERGE then sees the winner's rows, so the loser adds nothing twice.
    """
    for attempt in range(1, attempts + 1):
        try:
            return write()
        except Exception as exc:  # deltalake raises several types for a lost commit race
            if not _is_conflict(exc) or attempt == attempts:
                raise
            delay = base_delay_s * (2 ** (attempt - 1)) * (0.5 + random.random())  # noqa: S311 - retry jitter, not a secret
            log.info("%s: commit conflict (attempt %d/%d), retrying in %.2fs: %s", what, attempt, attempts, delay, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")


def insert_missing(table: DeltaTable, rows: pa.Table, keys: Sequence[str]) -> int:
    """Insert the ``rows`` whose ``keys`` match no row of ``table`` (a MERGE with only a not-matched insert: a row
    already stored, by this writer earlier or by another one concurrently, is left alone); returns the rows inserted.

    Call it inside :func:`merge_with_retry` so a lost commit race re-runs it against the winner's rows.
    """
    if rows.num_rows == 0:
        return 0
    predicate = " AND ".join(f't."{k}" = s."{k}"' for k in keys)
    metrics = (
        table.merge(rows, predicate=predicate, source_alias="s", target_alias="t")
        .when_not_matched_insert_all()
        .execute()
    )
    return int(metrics.get("num_target_rows_inserted", 0))


@dataclass(frozen=True)
class AccessReport:
    """Which datasets a job reads and which it leaves out for their access level (:meth:`Catalog.access_report`)."""

    allowed_access: tuple[str, ...]
    """The levels the job may read (``catalog.allowed_access``)."""
    readable: dict[str, int]
    """Dataset → rows of ``scans`` (superseded versions included), for the datasets the job reads (the named ones, or
    every readable one)."""
    left_out: dict[str, tuple[str, int]]
    """Dataset → (its levels beyond ``allowed_access``, rows of ``scans``), for the datasets left out. Empty when the
    job named its datasets: it then reads exactly those."""

    @property
    def line(self) -> str | None:
        """One line for the job's log and summary, e.g. ``left out 2 datasets (12 scans) at access level restricted:
        allowed open, registered``; ``None`` when nothing was left out."""
        if not self.left_out:
            return None
        levels = sorted({level for levels, _ in self.left_out.values() for level in levels.split(", ")})
        n, scans = len(self.left_out), sum(count for _, count in self.left_out.values())
        return (
            f"left out {n} dataset{'s' if n != 1 else ''} ({scans} scan{'s' if scans != 1 else ''}) at access "
            f"level{'s' if len(levels) != 1 else ''} {', '.join(levels)}: allowed {', '.join(self.allowed_access)}"
        )


@dataclass(frozen=True)
class Catalog:
    """A catalog location and the tables under it, seen whole or through an access filter.

    Example:
        >>> cat = Catalog.open("brainiac-data/catalog")
        >>> cat.scans(sequence="T1w", age_between=(60, 90)).to_pandas()  # doctest: +SKIP
        >>> cat.sql("SELECT dataset, count(*) AS n FROM scans GROUP BY dataset")  # doctest: +SKIP
        >>> cat.restricted(["open"]).sql("SELECT count(*) FROM volumes")  # doctest: +SKIP
    """

    location: StorageLocation
    allowed_access: tuple[str, ...] | None = None
    """``None``: every row (writers, maintenance). Otherwise every read (:meth:`select`, :meth:`select_keys`,
    :meth:`scan_batches`, :meth:`read`, :meth:`sql`, :meth:`scans`) sees only the datasets whose ``scans`` rows are all
    at one of these levels, judged on the newest ``scans`` (time travel does not bring back a dataset since restricted).
    :meth:`table` stays the raw Delta table: callers read its files only for keys they selected through the filter."""
    _levels: dict[int, dict[str, tuple[frozenset[str], int]]] = dataclasses.field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    """Cache of :meth:`_dataset_levels`, keyed by the ``scans`` version it was read at."""
    _pinned: dict[tuple[str, int], DeltaTable] = dataclasses.field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    """Tables opened at a given version (:meth:`table`): a version never changes, so a job that pins its tables opens
    each one once (its log is read once) however many reads it makes."""

    @classmethod
    def open(
        cls,
        uri: str | StorageLocation,
        storage_options: Mapping[str, str] | None = None,
        *,
        allowed_access: Sequence[str] | None = None,
    ) -> Catalog:
        """The catalog at ``uri``; with ``allowed_access`` (a job's ``catalog.allowed_access``), restricted to it."""
        loc = uri if isinstance(uri, StorageLocation) else StorageLocation.resolve(uri, storage_options)
        return cls(loc).restricted(allowed_access)

    def restricted(self, allowed_access: Sequence[str] | None) -> Catalog:
        """This catalog seen by a reader that may read only ``allowed_access`` (``None``: unchanged). Restricting an
        already restricted catalog keeps the levels both allow, so a filter can only narrow.

        Raises:
            ValueError: a level that is not one of :data:`ACCESS_LEVELS` (the config checks user input before).
        """
        if allowed_access is None:
            return self
        unknown = sorted(set(allowed_access) - set(ACCESS_LEVELS))
        if unknown:
            raise ValueError(f"unknown access levels {unknown}; expected some of {list(ACCESS_LEVELS)}")
        levels = [a for a in ACCESS_LEVELS if a in allowed_access]
        if self.allowed_access is not None:
            levels = [a for a in levels if a in self.allowed_access]
        if self.allowed_access is not None and tuple(levels) == self.allowed_access:
            return self
        return dataclasses.replace(self, allowed_access=tuple(levels))

    def unrestricted(self) -> Catalog:
        """This catalog with every row visible (for writers, which must see what they merge against)."""
        return self if self.allowed_access is None else dataclasses.replace(self, allowed_access=None)

    def _dataset_levels(self) -> dict[str, tuple[frozenset[str], int]]:
        """Dataset → (its access levels, its rows) in the newest ``scans``, current and superseded rows alike (a null
        level counts as ``unknown``), read once per ``scans`` version.

        The answer comes from the Delta log alone (each file's partition value, row count and min/max statistics of
        ``access``), so a reader whose storage credentials cannot open restricted partitions still gets it; a file
        without statistics is read. Levels between a file's min and max count as present (a mixed file is judged by
        every level it may hold).
        """
        dt = self.table("scans")
        if dt is None:
            return {}
        version = int(dt.version())
        cached = self._levels.get(version)
        if cached is not None:
            return cached
        actions = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
        levels: dict[str, set[str]] = {}
        rows: dict[str, int] = {}
        unread: set[str] = set()
        for action in actions:
            dataset = action.get("partition.dataset")
            if dataset is None:
                continue  # a row without a dataset is never readable: it matches no dataset filter
            dataset = str(dataset)
            count = int(action.get("num_records") or 0)
            rows[dataset] = rows.get(dataset, 0) + count
            found = levels.setdefault(dataset, set())
            low, high, nulls = action.get("min.access"), action.get("max.access"), action.get("null_count.access")
            if nulls is None or (low is None and nulls < count):
                unread.add(dataset)  # no statistics: read the values
                continue
            if nulls:
                found.add("unknown")
            if low is not None and high is not None:
                found.update({low, high, *(a for a in ACCESS_LEVELS if low <= a <= high)})
        for dataset in sorted(unread):
            where = f"dataset = {sql_literal(dataset)}"
            values = self.unrestricted().select("scans", where, ["access"])["access"].unique().to_pylist()
            levels[dataset].update(v if v is not None else "unknown" for v in values)
        cached = {d: (frozenset(levels[d]), rows[d]) for d in levels}
        self._levels.clear()
        self._levels[version] = cached
        return cached

    def _beyond(self, levels: Iterable[str]) -> list[str]:
        allowed = set(self.allowed_access if self.allowed_access is not None else ACCESS_LEVELS)
        return sorted(set(levels) - allowed)

    def readable_datasets(self) -> list[str]:
        """The datasets this catalog's readers see: those whose every ``scans`` row is at an allowed level."""
        return sorted(d for d, (levels, _) in self._dataset_levels().items() if not self._beyond(levels))

    def access_report(self, datasets: Sequence[str] | None = None) -> AccessReport:
        """What a job of this (restricted) catalog reads and leaves out; ``datasets`` are the ones it was told to read
        (``--dataset``, ``catalog.datasets``), checked here.

        Raises:
            UserError: a named dataset that the catalog does not hold, or one at a level this job may not read (one
                line naming them, so a user never gets silently less than they asked for).
        """
        allowed = self.allowed_access if self.allowed_access is not None else ACCESS_LEVELS
        levels = self._dataset_levels()
        if datasets:
            names = list(dict.fromkeys(datasets))
            unknown = [d for d in names if d not in levels]
            if unknown:
                known = ", ".join(self.readable_datasets()) or "none"
                raise UserError(
                    f"unknown dataset{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in catalog {self.uri} "
                    f"(readable datasets: {known})"
                )
            forbidden = {d: self._beyond(levels[d][0]) for d in names if self._beyond(levels[d][0])}
            if forbidden:
                what = ", ".join(f"{d} ({', '.join(lv)})" for d, lv in forbidden.items())
                raise UserError(
                    f"dataset{'s' if len(forbidden) > 1 else ''} {what} may not be read by this job: "
                    f"catalog.allowed_access is {', '.join(allowed)}"
                )
            return AccessReport(tuple(allowed), {d: levels[d][1] for d in names}, {})
        readable, left_out = {}, {}
        for d, (lv, count) in sorted(levels.items()):
            beyond = self._beyond(lv)
            if beyond:
                left_out[d] = (", ".join(beyond), count)
            else:
                readable[d] = count
        return AccessReport(tuple(allowed), readable, left_out)

    def set_access(self, dataset: str, level: str) -> int:
        """Give every ``scans`` row of ``dataset`` (current and superseded) the access ``level``: one Delta UPDATE,
        confined to the dataset's partition, that touches only rows at another level; returns the rows changed.

        Ingest calls it when a dataset card's level changed since the rows were written, so that a dataset made
        ``restricted`` disappears from every reader that may not read it (time travel included: readers judge
        datasets by the newest ``scans``).

        Raises:
            ValueError: a level that is not one of :data:`ACCESS_LEVELS`.
        """
        if level not in ACCESS_LEVELS:
            raise ValueError(f"unknown access level {level!r}; expected one of {list(ACCESS_LEVELS)}")
        predicate = f"dataset = {sql_literal(dataset)} AND (access IS NULL OR access <> {sql_literal(level)})"

        def attempt() -> int:
            dt = self.table("scans")
            if dt is None:
                return 0
            metrics = dt.update(updates={"access": sql_literal(level)}, predicate=predicate)
            return int(metrics.get("num_updated_rows", 0))

        return merge_with_retry(attempt, what=f"access of {dataset}")

    def _session(self, tables: Mapping[str, DeltaTable]) -> QueryBuilder:
        """A DataFusion session with ``tables`` registered under their names; on a restricted catalog each name is a
        view that keeps only readable rows, and the tables behind the views are dropped from the session, so no SQL
        can name them.

        ``scans`` keeps the rows of readable datasets at an allowed level; ``splits`` the subjects that have a
        readable scan (a semi-join on ``scan`` rows, at the same version as the query's ``scans`` if it has one);
        :data:`UNFILTERED_TABLES` stay whole; every other table keeps the rows of readable datasets (its ``dataset``
        column: a short literal list, which prunes partitions and statistics), and one without that column is left
        out of the session.
        """
        from deltalake import QueryBuilder

        qb = QueryBuilder()
        if self.allowed_access is None:
            for name, dt in tables.items():
                qb.register(name, dt)
            return qb
        datasets = self.readable_datasets()
        scans_where = f"{sql_in('access', list(self.allowed_access))} AND {sql_in('dataset', datasets)}"
        token = uuid.uuid4().hex
        hidden: dict[str, str] = {}

        def register_hidden(name: str, dt: DeltaTable) -> str:
            hidden[name] = f"__raw_{token}_{name}"
            qb.register(hidden[name], dt)
            return hidden[name]

        views: list[tuple[str, str]] = []
        for name, dt in tables.items():
            if name in UNFILTERED_TABLES:
                qb.register(name, dt)
                continue
            columns = set(pa.schema(dt.schema().to_arrow()).names)
            if name == "scans":
                where = scans_where
            elif name == "splits":
                scans_dt = tables["scans"] if "scans" in tables else self.table("scans")
                if scans_dt is None:
                    where = "FALSE"
                else:
                    source = hidden.get("scans") or register_hidden("scans", scans_dt)
                    where = f'"subject_id" IN (SELECT "subject_id" FROM "{source}" WHERE {scans_where})'  # noqa: S608 - a random table name registered here; scans_where built from quoted literals
            elif "dataset" in columns:
                where = sql_in("dataset", datasets)
            else:
                log.warning("table %s has no dataset column: left out of a restricted catalog's SQL", name)
                continue
            views.append((name, f'SELECT * FROM "{hidden.get(name) or register_hidden(name, dt)}" WHERE {where}'))  # noqa: S608 - table names are ours; where built from quoted literals
        for name, select in views:
            _to_pyarrow(qb.execute(f'CREATE VIEW "{name}" AS {select}'))
        for raw in hidden.values():  # the views hold their own plans; the raw tables leave the session
            _to_pyarrow(qb.execute(f'DROP TABLE "{raw}"'))
        return qb

    @property
    def uri(self) -> str:
        return self.location.uri

    def table_location(self, name: str) -> StorageLocation:
        return self.location.join(name)

    def table(self, name: str, version: int | None = None) -> DeltaTable | None:
        """The Delta table ``name`` (at ``version``), or ``None`` if it does not exist yet. A table at a given version
        is opened once per catalog object and shared by later calls (callers must not move it to another version)."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        if version is not None and (name, version) in self._pinned:
            return self._pinned[(name, version)]
        loc = self.table_location(name)
        try:
            table = DeltaTable(loc.uri, version=version, storage_options=loc.delta_storage_options())
            if version is not None:
                self._pinned[(name, version)] = table
            return table
        except TableNotFoundError:
            return None
        except Exception as exc:
            if version is not None:
                raise UserError(f"table '{name}' has no version {version} ({_first_line(exc)})") from exc
            raise

    def tables(self) -> list[str]:
        """Names of the tables that exist in this catalog."""
        return [name for name in SCHEMAS if self.table(name) is not None]

    def version(self, name: str) -> int | None:
        dt = self.table(name)
        return None if dt is None else dt.version()

    def select(
        self,
        name: str,
        where: str | None = None,
        columns: Sequence[str] | None = None,
        version: int | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        """Rows of one table matching a SQL ``where`` clause, through DataFusion (partition and statistics pruning).

        pyarrow's own dataset filter cannot compare delta-rs' string-view statistics, so filtered reads go here.
        """
        dt = self.table(name, version)
        schema = SCHEMAS.get(name)
        if dt is None:
            empty = (schema or pa.schema([])).empty_table()
            return empty.select(list(columns)) if columns else empty
        cols = ", ".join(f'"{c}"' for c in columns) if columns else "*"
        sql = (
            f'SELECT {cols} FROM "{name}"'  # noqa: S608 - identifiers quoted, where is the caller's own filter (read-only session)
            + (f" WHERE {where}" if where else "")
            + (f" LIMIT {int(limit)}" if limit else "")
        )
        return _plain_types(_to_pyarrow(self._session({name: dt}).execute(sql)), schema)

    def sql_table(self, name: str, query: str, version: int | None = None) -> pa.Table:
        """``query`` over the one table ``name`` (at ``version``), through this catalog's access filter: an aggregate
        computed where the rows are, with only ``name`` opened (:meth:`sql` opens every table, all at one version).
        An empty table when ``name`` does not exist.

        Raises:
            UserError: the SQL does not plan or run.
        """
        dt = self.table(name, version)
        if dt is None:
            return pa.table({})
        try:
            return _plain_types(_to_pyarrow(self._session({name: dt}).execute(query)), None)
        except Exception as exc:  # DataFusion raises at planning or at execution time
            raise UserError(f"SQL error: {_first_line(exc)}") from exc

    def select_keys(
        self,
        name: str,
        column: str,
        values: Iterable[Any] | pa.Array | pa.ChunkedArray,
        columns: Sequence[str] | None = None,
        *,
        where: str | None = None,
        version: int | None = None,
    ) -> pa.Table:
        """Rows of ``name`` whose ``column`` is one of ``values`` (and that match the SQL ``where``), read in time and
        memory that grow with the table and the selection, never with their product.

        The selection is a semi-join against an Arrow array of keys, never a SQL literal list (a 20,000-value
        ``IN (...)`` overflows deltalake's native stack, and at 19,000 values a 1M-row scan took 20 s):

        1. the narrow pass reads ``column`` and the partition columns (through DataFusion, with ``where`` pushed down
           to partitions and statistics) and keeps the rows whose key is in ``values``;
        2. the wide pass reads, file by file (8 at a time), only the key column and then only the row groups that hold
           a kept row, projecting ``columns``. A reader of a few volumes reads about those volumes.

        Rows come in file order; the row order of ``values`` is not kept.
        """
        dt = self.table(name, version)
        schema = SCHEMAS.get(name)
        wanted = list(columns) if columns else (list(schema.names) if schema is not None else None)
        if dt is None:
            empty = (schema or pa.schema([])).empty_table()
            return empty.select(wanted) if wanted else empty
        keys = _key_array(values)
        partitions = list(dt.metadata().partition_columns)
        narrow = self._stream(name, dt, [column, *[p for p in partitions if p != column]], where)
        kept: dict[tuple, set[str]] = {}
        for batch in narrow:
            hit = batch.filter(pc.is_in(batch.column(column), value_set=keys))
            if hit.num_rows == 0:
                continue
            parts = [hit.column(p).to_pylist() for p in partitions] if partitions else []
            for i, key in enumerate(hit.column(column).to_pylist()):
                kept.setdefault(tuple(str(p[i]) for p in parts), set()).add(key)
        if wanted is None:
            wanted = list(dt.schema().to_arrow().names)
        if not kept:
            return _plain_types(_empty_like(dt, wanted), schema)
        key_sets = {part: pa.array(sorted(ids), pa.string()) for part, ids in kept.items()}  # once, not per file
        files = self._files(dt, name, partitions, set(kept))
        file_columns = [c for c in wanted if c not in partitions]
        location = self.table_location(name)
        filesystem = location.pyarrow_filesystem() if location.is_remote else None

        def read(item: tuple[str, tuple]) -> pa.Table | None:
            path, part = item
            table = _read_keyed_rows(path, column, key_sets[part], file_columns, filesystem)
            if table is None:
                return None
            for p, value in zip(partitions, part, strict=True):
                if p in wanted:
                    table = table.append_column(p, pa.array([value] * table.num_rows, pa.string()))
            return table.select(wanted)

        with ThreadPoolExecutor(max_workers=8) as pool:
            pieces = [_plain_types(t, schema) for t in pool.map(read, files) if t is not None]
        if not pieces:
            return _plain_types(_empty_like(dt, wanted), schema)
        return pa.concat_tables(pieces)

    def scan_batches(
        self, name: str, columns: Sequence[str] | None = None, where: str | None = None, version: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of ``SELECT columns FROM name WHERE where``, streamed: memory holds one batch, not the table."""
        dt = self.table(name, version)
        if dt is None:
            return iter(())
        return self._stream(name, dt, list(columns) if columns else None, where)

    def _stream(
        self, name: str, dt: DeltaTable, columns: Sequence[str] | None, where: str | None
    ) -> Iterator[pa.RecordBatch]:
        cols = ", ".join(f'"{c}"' for c in columns) if columns else "*"
        sql = f'SELECT {cols} FROM "{name}"' + (f" WHERE {where}" if where else "")  # noqa: S608 - identifiers quoted, where is the caller's own filter (read-only session)
        reader = pa.RecordBatchReader.from_stream(self._session({name: dt}).execute(sql))
        schema = SCHEMAS.get(name)
        for batch in reader:
            yield _plain_batch(batch, schema)

    def _files(self, dt: DeltaTable, name: str, partitions: list[str], wanted: set[tuple]) -> list[tuple[str, tuple]]:
        """Data files of ``dt`` (absolute paths, as the table's pyarrow filesystem names them) in the partitions
        ``wanted``, with each file's partition values."""
        from urllib.parse import unquote

        actions = pa.table(dt.get_add_actions(flatten=True))
        paths = actions.column("path").to_pylist()
        values = [actions.column(f"partition.{p}").to_pylist() for p in partitions]
        location = self.table_location(name)
        root = location.path.rstrip("/")
        out = []
        for i, path in enumerate(paths):
            part = tuple(str(v[i]) for v in values)
            if part in wanted:
                out.append((f"{root}/{unquote(path)}", part))
        return out

    def read(self, name: str, version: int | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """A whole table as Arrow (empty with the right schema if the table does not exist); a restricted catalog
        reads it through :meth:`select`, which keeps only readable rows."""
        dt = self.table(name, version)
        if dt is None:
            schema = SCHEMAS.get(name, pa.schema([]))
            return schema.empty_table() if columns is None else schema.empty_table().select(list(columns))
        if self.allowed_access is not None:
            return self.select(name, None, columns, version)
        return dt.to_pyarrow_dataset().to_table(columns=list(columns) if columns else None)

    def create_if_missing(self, name: str) -> DeltaTable:
        """Create an empty table with its schema, partitioning and reader-friendly configuration."""
        from deltalake import write_deltalake

        dt = self.table(name)
        if dt is not None:
            return dt
        loc = self.table_location(name)
        try:
            write_deltalake(
                loc.uri,
                SCHEMAS[name].empty_table(),
                mode="ignore",
                partition_by=PARTITIONS.get(name),
                configuration=TABLE_CONFIGURATION,
                storage_options=loc.delta_storage_options(),
                name=name,
            )
        except Exception as exc:  # another writer created it between our check and our write
            if not _is_conflict(exc):
                raise
        table = self.table(name)
        if table is None:
            raise RuntimeError(f"table {name} vanished right after it was created")
        return table

    # -- queries ---------------------------------------------------------------------------------------------------------
    def sql(self, query: str, as_of: int | None = None) -> pa.Table:
        """Run SQL (DataFusion dialect) over every table of the catalog; ``as_of`` time-travels each table to that
        version (tables that did not exist yet are left out). The whole result is collected: for large results use
        :meth:`sql_batches`.

        Raises:
            UserError: bad SQL, an unknown table or column; the message is one line.
        """
        reader = self._sql_reader(read_only_statement(query), as_of)
        try:
            return _plain_types(reader.read_all(), None)
        except Exception as exc:  # DataFusion raises at planning or at execution time
            raise UserError(f"SQL error: {_first_line(exc)}") from exc

    def sql_batches(self, query: str, as_of: int | None = None, limit: int | None = None) -> Iterator[pa.RecordBatch]:
        """:meth:`sql`, streamed batch by batch; ``limit`` wraps the query so DataFusion stops the scan there.

        Raises:
            UserError: bad SQL, an unknown table or column, a negative limit; the message is one line.
        """
        if limit is not None and limit < 0:
            raise UserError(f"--limit must be >= 0, got {limit}")
        text = read_only_statement(query)
        if limit is not None:
            text = f"SELECT * FROM ({text}) AS limited LIMIT {int(limit)}"  # noqa: S608 - the user's statement, already checked read-only; limit is an int
        reader = self._sql_reader(text, as_of)
        try:
            empty = True
            for batch in reader:
                empty = False
                yield _plain_batch(batch, None)
            if empty:  # no rows: one empty batch still tells the columns (a CSV header)
                yield _plain_batch(pa.RecordBatch.from_pylist([], schema=reader.schema), None)
        except Exception as exc:  # DataFusion raises at execution time too
            raise UserError(f"SQL error: {_first_line(exc)}") from exc

    def _sql_reader(self, query: str, as_of: int | None) -> pa.RecordBatchReader:
        """A streaming reader of ``query`` over every table that exists (at ``as_of``), each seen through this
        catalog's access filter (:meth:`_session`)."""
        tables: dict[str, DeltaTable] = {}
        for name in SCHEMAS:
            try:
                dt = self.table(name, as_of)
            except UserError:  # the table did not exist yet at that version
                continue
            if dt is not None:
                tables[name] = dt
        if not tables:
            raise UserError(f"catalog {self.uri} has no tables yet; run `brainiac ingest` first")
        qb = self._session(tables)
        try:
            return pa.RecordBatchReader.from_stream(qb.execute(query))
        except Exception as exc:  # DataFusion raises at planning time
            raise UserError(f"SQL error: {_first_line(exc)}") from exc

    def scans(
        self,
        *,
        dataset: str | Sequence[str] | None = None,
        sequence: str | Sequence[str] | None = None,
        age_between: tuple[float, float] | None = None,
        include_superseded: bool = False,
        version: int | None = None,
        allowed_access: Sequence[str] | None = None,
    ) -> ScanQuery:
        """A filtered view of ``scans`` (current rows only unless ``include_superseded``).

        ``allowed_access`` (a job's ``catalog.allowed_access``; else this catalog's own restriction) keeps only the
        rows of datasets readable at those levels: a job reads what it may and says what it left out
        (:meth:`access_report`), instead of failing because the catalog also holds data it may not use.
        """
        return ScanQuery(self, dataset, sequence, age_between, include_superseded, version, allowed_access)


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


@dataclass(frozen=True)
class ScanQuery:
    """Filters over the ``scans`` table, pushed down to partitions (dataset) and Parquet statistics; rows of datasets
    that ``allowed_access`` (or the catalog's restriction) does not allow are left out."""

    catalog: Catalog
    dataset: str | Sequence[str] | None
    sequence: str | Sequence[str] | None
    age_between: tuple[float, float] | None
    include_superseded: bool
    version: int | None
    allowed_access: Sequence[str] | None = None

    def where(self) -> str:
        """The SQL condition these filters amount to."""
        parts = []
        if (ds := _as_list(self.dataset)) is not None:
            parts.append(sql_in("dataset", ds))
        if (seq := _as_list(self.sequence)) is not None:
            parts.append(sql_in("sequence", seq))
        if self.age_between is not None:
            lo, hi = self.age_between
            parts.append(f"age_years BETWEEN {float(lo)!r} AND {float(hi)!r}")
        if not self.include_superseded:
            parts.append("status = 'current'")
        return " AND ".join(parts) if parts else "TRUE"

    def to_arrow(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The matching rows that the access levels allow (see :meth:`Catalog.restricted`)."""
        reader = self.catalog.restricted(self.allowed_access)
        return reader.select("scans", self.where(), columns, self.version)

    def access_report(self) -> AccessReport:
        """What this selection leaves out for its access levels (and an error for a named dataset it may not read)."""
        return self.catalog.restricted(self.allowed_access).access_report(_as_list(self.dataset))

    def to_pandas(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        return self.to_arrow(columns).to_pandas()

    def to_ray(self, columns: Sequence[str] | None = None):
        """A Ray Dataset of the matching rows (read through the same filters)."""
        import ray.data

        return ray.data.from_arrow(self.to_arrow(columns))
