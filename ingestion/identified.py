"""The identified zone: where real source paths meet keyed ids, kept apart from the catalog and read only by ingest.

The de-identified catalog (what every other job and every query reads) holds pseudonyms and content ids only: a scan's
``source_uri`` there is a keyed *source key* (``src-`` + HMAC of the real path under the pseudonym key), its
``image_uri`` the staged copy (:mod:`brainiac.ingestion.staging`). The real paths live here, in two Delta tables at
their own location (``ingest.identified_uri``, default ``<catalog>-identified``; on a cloud store give it its own bucket
or prefix and credentials, ``ingest.identified_storage_options``):

- ``sources``: one row per (source key, scan id) ever ingested: the source's URI and path relative to its dataset root;
- ``quarantine``: every input that could not be ingested, with the real path and the full detail (the catalog's
  ``quarantine`` table carries the source key and the reason only).

An operator fixes inputs from here; a query user or a training job never needs it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Iterable, Mapping

import pyarrow as pa

from brainiac.platform.storage import StorageLocation

__all__ = [
    "IDENTIFIED_QUARANTINE_SCHEMA",
    "SOURCES_SCHEMA",
    "SOURCE_KEY_PREFIX",
    "IdentifiedZone",
    "default_identified_uri",
    "identify",
    "source_key",
]

SOURCE_KEY_PREFIX = "src-"

_TS = pa.timestamp("us", tz="UTC")

SOURCES_SCHEMA = pa.schema(
    [
        ("source_key", pa.string()),
        ("scan_id", pa.string()),
        ("dataset", pa.string()),
        ("source_uri", pa.string()),
        ("relative_path", pa.string()),
        ("seen_at", _TS),
    ]
)

IDENTIFIED_QUARANTINE_SCHEMA = pa.schema(
    [
        ("source_key", pa.string()),
        ("dataset", pa.string()),
        ("source_uri", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("seen_at", _TS),
    ]
)


def source_key(key: bytes, source_uri: str) -> str:
    """The keyed, stable pseudonym of a source path: equal paths give equal keys (re-ingest and supersede still find
    a source), and without the key a path cannot be confirmed by guessing."""
    raw = source_uri.encode("utf-8", "surrogateescape")
    return SOURCE_KEY_PREFIX + hmac.new(key, b"source\x1f" + raw, hashlib.sha256).hexdigest()[:24]


def default_identified_uri(catalog_uri: str) -> str:
    """``<catalog>-identified``: a sibling of the catalog, so that a cloud policy can grant it to ingest alone."""
    return catalog_uri.rstrip("/") + "-identified"


class IdentifiedZone:
    """The identified zone's two tables (created on first write)."""

    def __init__(self, uri: str, storage_options: Mapping[str, str] | None = None) -> None:
        self.location = StorageLocation.resolve(uri, storage_options or None)

    @property
    def uri(self) -> str:
        return self.location.uri

    def _table(self, name: str, schema: pa.Schema):
        from deltalake import DeltaTable, write_deltalake
        from deltalake.exceptions import TableNotFoundError

        uri = self.location.join(name).uri
        options = self.location.delta_storage_options()
        try:
            return DeltaTable(uri, storage_options=options)
        except TableNotFoundError:
            if not self.location.is_remote:
                self.location.makedirs()
            write_deltalake(uri, schema.empty_table(), mode="append", storage_options=options)
            return DeltaTable(uri, storage_options=options)

    def record_sources(self, rows: Iterable[Mapping[str, str]], now: dt.datetime) -> int:
        """Add (source key, scan id) pairs not held yet; returns how many were new. Written before the catalog's commit
        of the same scans, so every catalog row can be traced back by ingest."""
        from brainiac.platform.catalog import insert_missing, merge_with_retry

        table = pa.Table.from_pylist(
            [{**{k: r[k] for k in ("source_key", "scan_id", "dataset", "source_uri", "relative_path")}, "seen_at": now}
             for r in rows],
            schema=SOURCES_SCHEMA,
        )  # fmt: skip
        if not table.num_rows:
            return 0
        return merge_with_retry(
            lambda: insert_missing(self._table("sources", SOURCES_SCHEMA), table, ["source_key", "scan_id"]),
            what="identified sources",
        )

    def record_problems(self, rows: Iterable[Mapping[str, str]], now: dt.datetime) -> int:
        """Add (source key, reason) problems not held yet, with the real path and full detail."""
        from brainiac.platform.catalog import insert_missing, merge_with_retry

        table = pa.Table.from_pylist(
            [{**{k: r[k] for k in ("source_key", "dataset", "source_uri", "reason", "detail")}, "seen_at": now}
             for r in rows],
            schema=IDENTIFIED_QUARANTINE_SCHEMA,
        )  # fmt: skip
        if not table.num_rows:
            return 0
        return merge_with_retry(
            lambda: insert_missing(
                self._table("quarantine", IDENTIFIED_QUARANTINE_SCHEMA), table, ["source_key", "reason"]
            ),
            what="identified quarantine",
        )

    def read(self, name: str) -> pa.Table:
        """A whole table of the zone (for operators and tests: the zone grows with sources, one row each)."""
        schema = SOURCES_SCHEMA if name == "sources" else IDENTIFIED_QUARANTINE_SCHEMA
        return self._table(name, schema).to_pyarrow_table()


def identify(frame, catalog_uri: str, identified_uri: str = "", storage_options: Mapping[str, str] | None = None):
    """``frame`` (pandas rows of ``scans`` or ``quarantine``) with ``source_uri`` and ``relative_path`` replaced by the
    real ones from the identified zone: the operator's view, for fixing inputs and for tests that compare against the
    files on disk. Rows whose key is unknown keep their key."""
    zone = IdentifiedZone(identified_uri or default_identified_uri(catalog_uri), storage_options)
    if "scan_id" in frame.columns:
        sources = zone.read("sources").to_pandas()
        real = {
            (k, s): (u, r)
            for k, s, u, r in sources[["source_key", "scan_id", "source_uri", "relative_path"]].itertuples(index=False)
        }
        pairs = [real.get((k, s)) for k, s in zip(frame["source_uri"], frame["scan_id"], strict=True)]
    else:  # quarantine rows: ingest problems are in the zone's quarantine, preprocess problems name a catalog scan
        sources = zone.read("sources").to_pandas()
        problems = zone.read("quarantine").to_pandas()
        real = {k: (u, r) for k, u, r in sources[["source_key", "source_uri", "relative_path"]].itertuples(index=False)}
        real.update({k: (u, None) for k, u in problems[["source_key", "source_uri"]].itertuples(index=False)})
        pairs = [real.get(k) for k in frame["source_uri"]]
    out = frame.copy()
    out["source_uri"] = [p[0] if p else k for p, k in zip(pairs, frame["source_uri"], strict=True)]
    if "relative_path" in out.columns:
        out["relative_path"] = [p[1] if p else r for p, r in zip(pairs, frame["relative_path"], strict=True)]
    return out
