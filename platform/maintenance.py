"""Catalog table maintenance: compaction that keeps each table's row-group layout, vacuum with a retention, checkpoints.

Every writer of the platform commits in batches (ingest every ``ingest.commit_scans`` scans, preprocess about 1 GB a
commit), so tables collect many small files and many log entries. Readers then pay per file (a request each on S3)
and per log entry (the Delta log replay). ``brainiac catalog optimize`` rewrites small files into larger ones with the
same row-group size the writer chose (``volumes`` keeps one volume per row group, so a reader of one volume still reads
about one volume), removes the files no version younger than the retention needs, and writes a checkpoint so the log
replay starts there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from brainiac.platform.catalog import ROW_GROUP_ROWS, SCHEMAS, Catalog
from brainiac.platform.errors import UserError

__all__ = ["DEFAULT_RETENTION_HOURS", "TableMaintenance", "optimize_catalog", "optimize_table"]

DEFAULT_RETENTION_HOURS = 168
"""Vacuum keeps every file a version of the last 7 days needs (Delta's own default), so time travel and readers that
pinned a recent version keep working."""

TARGET_FILE_BYTES = 256 << 20
"""Compaction target: a few hundred MB per file (Delta's default is 100 MB; larger files mean fewer S3 requests)."""


@dataclass
class TableMaintenance:
    """What maintenance did to one table."""

    table: str
    version_before: int
    version_after: int
    files_before: int
    files_after: int
    files_compacted: int = 0
    files_vacuumed: int = 0
    checkpoint: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def optimize_table(
    catalog: Catalog,
    name: str,
    *,
    retention_hours: int = DEFAULT_RETENTION_HOURS,
    compact: bool = True,
    vacuum: bool = True,
    dry_run: bool = False,
) -> TableMaintenance | None:
    """Compact, vacuum and checkpoint one table (``None`` if it does not exist).

    Args:
        retention_hours: vacuum removes only files that no version younger than this needs. Under Delta's 7-day
            default a reader that pinned an older version (a long pretraining run reads one pinned version) may lose
            its files: allowed, since the user asks for it explicitly.
        dry_run: report what would be compacted or removed, change nothing.
    """
    from deltalake import WriterProperties

    if retention_hours < 0:
        raise UserError(f"--retain-hours must be >= 0, got {retention_hours}")
    table = catalog.table(name)
    if table is None:
        return None
    before = len(table.file_uris())
    report = TableMaintenance(name, table.version(), table.version(), before, before)
    if compact and not dry_run:
        rows = ROW_GROUP_ROWS.get(name)
        props = WriterProperties(max_row_group_size=rows, write_batch_size=rows) if rows else None
        metrics = table.optimize.compact(target_size=TARGET_FILE_BYTES, writer_properties=props)
        report.files_compacted = int(metrics.get("numFilesRemoved", 0))
        table = catalog.table(name)
        if table is None:
            raise RuntimeError(f"table {name} vanished during maintenance")
    if vacuum:
        removed = table.vacuum(
            retention_hours=retention_hours,
            dry_run=dry_run,
            enforce_retention_duration=retention_hours >= DEFAULT_RETENTION_HOURS,
        )
        report.files_vacuumed = len(removed)
    if not dry_run:
        table.create_checkpoint()
        table.cleanup_metadata()
        report.checkpoint = True
        table = catalog.table(name)
        if table is None:
            raise RuntimeError(f"table {name} vanished during maintenance")
    report.version_after = table.version()
    report.files_after = len(table.file_uris())
    return report


def optimize_catalog(
    catalog: Catalog,
    tables: list[str] | None = None,
    *,
    retention_hours: int = DEFAULT_RETENTION_HOURS,
    dry_run: bool = False,
) -> list[TableMaintenance]:
    """:func:`optimize_table` on ``tables`` (default: every table of the catalog).

    Raises:
        UserError: an unknown table name.
    """
    names = tables or list(SCHEMAS)
    unknown = sorted(set(names) - set(SCHEMAS))
    if unknown:
        raise UserError(f"unknown table(s) {', '.join(unknown)}; choose from {', '.join(SCHEMAS)}")
    reports = (optimize_table(catalog, name, retention_hours=retention_hours, dry_run=dry_run) for name in names)
    return [r for r in reports if r is not None]
