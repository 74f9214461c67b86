"""``brainiac embed``: encoder features of every preprocessed volume into the catalog's ``embeddings`` Delta table.

For users who want features rather than a fine-tuned model (BrainIAC's feature-extraction script). One row per scan
and model: the encoder's pooled feature vector of the volume's fixed cube (resized to the encoder's input size when
they differ). Vectors are appended as the run goes (every few thousand, or every few minutes), and a run first skips the
scans the table already holds for that model, so a re-run or a run after a crash adds only what is missing; a new model
version lands beside the old one (the table is partitioned by model).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from brainiac.ingestion.volumes import decode_array, resolve_volume_set
from brainiac.jobs.config import Config
from brainiac.jobs.pretrain.pairs import row_group_bounds
from brainiac.platform.catalog import EMBEDDINGS_SCHEMA, Catalog, merge_with_retry, sql_in, sql_literal

__all__ = ["EmbedSummary", "embed", "model_label", "volume_rows"]


@dataclass
class EmbedSummary:
    """What one embedding run wrote."""

    model: str
    preprocess_version: str
    selected: int = 0
    written: int = 0
    dim: int = 0
    embeddings_version: int | None = None
    seconds: float = 0.0
    left_out: str | None = None
    """What ``catalog.allowed_access`` left out of the catalog (datasets, scans, levels), or ``None``."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_label(ref: str, tracking_uri: str | None) -> str:
    """A stable name for ``ref``: ``NAME/VERSION`` for a registry URI (aliases move, versions do not), else the path."""
    if not ref.startswith("models:/"):
        return ref
    from brainiac.models.export import model_version

    version = model_version(ref, tracking_uri)
    return f"{version.name}/{version.version}"


COMMIT_ROWS = 4096
"""Vectors per commit at most: a crash loses at most this many (and :data:`COMMIT_SECONDS` of work)."""

COMMIT_SECONDS = 300.0
"""Seconds between commits at most."""

VOLUME_COLUMNS = ["scan_id", "dataset", "subject_id", "sequence", "fixed", "fixed_shape", "dtype"]
"""The ``volumes`` columns an embedding reads (``preprocess_version`` is the partition, not a file column)."""


def volume_rows(
    files: list[str], scan_ids: set[str], filesystem: Any = None, batch_size: int = 16
) -> Iterator[pa.Table]:
    """The :data:`VOLUME_COLUMNS` of the rows of ``files`` whose ``scan_id`` is in ``scan_ids``, in batches of
    ``batch_size`` rows (the last may hold fewer), in file order.

    The ``scan_id`` column of every file is read once, a few files at a time; then each row group that holds a wanted
    row is read once, as the batches reach it (one row group and one batch in memory, not the selection).
    """
    import pyarrow.parquet as pq

    from brainiac.jobs.pretrain.pairs import read_rows

    def wanted(path: str) -> list[int]:
        ids = pq.read_table(path, columns=["scan_id"], filesystem=filesystem).column("scan_id").to_pylist()
        return [i for i, scan in enumerate(ids) if scan in scan_ids]

    with ThreadPoolExecutor(max_workers=8) as pool:
        rows_of = list(pool.map(wanted, files))
    pending: list[pa.Table] = []
    have = 0
    for path, rows in zip(files, rows_of, strict=True):
        if not rows:
            continue
        parquet = pq.ParquetFile(path, filesystem=filesystem)
        bounds = row_group_bounds(parquet)
        group_of = np.searchsorted(bounds, rows, side="right") - 1
        for group in sorted(set(group_of.tolist())):
            in_group = [r for r, g in zip(rows, group_of.tolist(), strict=True) if g == group]
            pending.append(read_rows(path, in_group, filesystem, columns=VOLUME_COLUMNS))
            have += len(in_group)
            while have >= batch_size:
                joined = pa.concat_tables(pending)
                yield joined.slice(0, batch_size)
                pending, have = [joined.slice(batch_size)], have - batch_size
    if have:
        yield pa.concat_tables(pending)


def embed(
    cfg: Config,
    model_ref: str,
    *,
    batch_size: int = 16,
    progress: bool = True,
    commit_rows: int = COMMIT_ROWS,
    commit_seconds: float = COMMIT_SECONDS,
) -> EmbedSummary:
    """Embed every QC-passing volume of the newest (or configured) preprocess version with the encoder ``model_ref``
    that the ``embeddings`` table does not hold yet for that model.

    The rows are found once (:func:`volume_rows`) and embedded ``batch_size`` at a time; the vectors are appended to
    ``embeddings`` every ``commit_rows`` vectors or ``commit_seconds`` seconds, whichever comes first, so a crash keeps
    every committed batch and a re-run embeds only the rest. An append reads nothing of the table; two runs of the same
    model at the same time would both write the scans neither had committed when it started.

    Only the datasets ``catalog.allowed_access`` allows are embedded (of those, the ones ``catalog.datasets`` names);
    :attr:`EmbedSummary.left_out` says what was left out.

    Raises:
        UserError: no volumes, no such model, or a named dataset that is unknown or at a level the job may not read.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from brainiac.models.export import load_encoder
    from brainiac.platform.tracking import resolve_tracking_uri

    started = time.perf_counter()
    uri = resolve_tracking_uri(cfg.tracking)
    encoder, backbone = load_encoder(model_ref, tracking_uri=uri)
    label = model_label(model_ref, uri)
    catalog = Catalog.open(cfg.catalog.uri, cfg.catalog.storage_options)
    reader = catalog.restricted(cfg.catalog.allowed_access)  # the volumes of the datasets this job may read
    volume_set = resolve_volume_set(reader, cfg.patches.preprocess_version)  # pinned, "newest" in the same snapshot
    volumes_version, version = volume_set.volumes_version, volume_set.preprocess_version
    left_out = reader.access_report(cfg.catalog.datasets).line
    partition = f"preprocess_version = {sql_literal(version)}"
    where = f"{partition} AND qc_pass" + (
        f" AND {sql_in('dataset', cfg.catalog.datasets)}" if cfg.catalog.datasets else ""
    )
    meta = reader.select("volumes", where, ["scan_id", "dataset"], version=volumes_version).to_pandas()
    done = set()
    if catalog.version("embeddings") is not None:
        done = set(catalog.select("embeddings", f"model = {sql_literal(label)}", ["scan_id"])["scan_id"].to_pylist())
    todo = set(meta["scan_id"]) - done
    summary = EmbedSummary(model=label, preprocess_version=version, selected=len(meta), left_out=left_out)
    summary.embeddings_version = catalog.version("embeddings")
    files: list[str] = []
    if todo:
        table = catalog.table("volumes", volumes_version)
        if table is None:  # `todo` was read from it
            raise RuntimeError(f"the volumes table at version {volumes_version} vanished")
        files = table.file_uris(file_pruning_predicate=partition)
    location = catalog.table_location("volumes")
    filesystem = None
    if location.is_remote:
        filesystem = location.pyarrow_filesystem()
        files = [f.split("://", 1)[1] if "://" in f else f for f in files]
    encoder.eval()
    now = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = []
    last_commit = time.perf_counter()

    def commit() -> None:
        nonlocal rows, last_commit
        if rows:
            summary.written += _append(catalog, pa.Table.from_pylist(rows, schema=EMBEDDINGS_SCHEMA))
            summary.embeddings_version = catalog.version("embeddings")
        rows, last_commit = [], time.perf_counter()

    with tqdm(total=len(todo), desc="embed", unit="scan", disable=not progress) as bar:
        for batch in volume_rows(files, todo, filesystem, batch_size):
            batch = batch.to_pylist()
            x = torch.stack([torch.from_numpy(decode_array(r["fixed"], r["fixed_shape"], r["dtype"]).astype(np.float32))
                             for r in batch])[:, None]  # fmt: skip
            if tuple(x.shape[2:]) != (backbone.img_size,) * 3:
                x = F.interpolate(x, size=(backbone.img_size,) * 3, mode="trilinear", align_corners=False)
            with torch.no_grad():
                vectors = encoder(x).numpy().astype(np.float32)
            for r, v in zip(batch, vectors, strict=True):
                rows.append({"scan_id": r["scan_id"], "model": label, "preprocess_version": version,
                             "dataset": r["dataset"], "subject_id": r["subject_id"], "sequence": r["sequence"],
                             "vector": v.tolist(), "embedded_at": now})  # fmt: skip
            summary.dim = int(vectors.shape[1])
            bar.update(len(batch))
            if len(rows) >= commit_rows or time.perf_counter() - last_commit >= commit_seconds:
                commit()
        commit()
    summary.seconds = time.perf_counter() - started
    return summary


def _append(catalog: Catalog, source: pa.Table) -> int:
    """Append ``source`` to ``embeddings`` (created when missing): a blind append, which reads none of the table and
    does not conflict with other appends (a lost commit race is retried)."""
    from deltalake import write_deltalake

    location = catalog.table_location("embeddings")

    def attempt() -> int:
        catalog.create_if_missing("embeddings")
        write_deltalake(
            location.uri, source, mode="append", storage_options=location.delta_storage_options(), name="embeddings"
        )
        return source.num_rows

    return merge_with_retry(attempt, what="embeddings")
