"""``brainiac embed``: encoder features of every preprocessed volume into the catalog's ``embeddings`` Delta table.

For users who want features rather than a fine-tuned model (BrainIAC's feature-extraction script). One row per scan
and model: the encoder's pooled feature vector of the volume's fixed cube (resized to the encoder's input size when
they differ). Rows are written by MERGE keyed on (scan_id, model), so re-running adds only what is missing and a new
model version lands beside the old one (the table is partitioned by model).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from brainiac.ingestion.volumes import decode_array, newest_preprocess_version
from brainiac.platform.catalog import EMBEDDINGS_SCHEMA, Catalog, merge_with_retry, sql_in, sql_literal
from brainiac.platform.config import Config
from brainiac.platform.errors import UserError

__all__ = ["EmbedSummary", "embed", "model_label"]


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_label(ref: str, tracking_uri: str | None) -> str:
    """A stable name for ``ref``: ``NAME/VERSION`` for a registry URI (aliases move, versions do not), else the path."""
    if not ref.startswith("models:/"):
        return ref
    from brainiac.models.export import model_version

    version = model_version(ref, tracking_uri)
    return f"{version.name}/{version.version}"


def embed(cfg: Config, model_ref: str, *, batch_size: int = 16, progress: bool = True) -> EmbedSummary:
    """Embed every QC-passing volume of the newest (or configured) preprocess version with the encoder ``model_ref``.

    Raises:
        UserError: no volumes, no such model, or an access level the job may not read.
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
    if catalog.version("volumes") is None:
        raise UserError(f"the catalog {catalog.uri} has no volumes table; run `brainiac preprocess` first")
    version = cfg.patches.preprocess_version or newest_preprocess_version(catalog)
    meta = catalog.select(
        "volumes", f"preprocess_version = {sql_literal(version)} AND qc_pass", ["scan_id", "dataset"]
    ).to_pandas()
    catalog.scans(dataset=sorted(meta["dataset"].unique()), allowed_access=cfg.catalog.allowed_access).to_arrow(
        ["scan_id"]
    )  # the access check: a level this job may not read is an error
    done = set()
    if catalog.version("embeddings") is not None:
        done = set(catalog.select("embeddings", f"model = {sql_literal(label)}", ["scan_id"])["scan_id"].to_pylist())
    todo = sorted(set(meta["scan_id"]) - done)
    summary = EmbedSummary(model=label, preprocess_version=version, selected=len(meta))
    encoder.eval()
    columns = ["scan_id", "dataset", "subject_id", "sequence", "fixed", "fixed_shape", "dtype"]
    now = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(todo), desc="embed", unit="scan", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            where = f"preprocess_version = {sql_literal(version)} AND {sql_in('scan_id', chunk)}"
            batch = catalog.select("volumes", where, columns).to_pylist()
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
    if rows:
        source = pa.Table.from_pylist(rows, schema=EMBEDDINGS_SCHEMA)

        def attempt() -> int:
            table = catalog.create_if_missing("embeddings")
            (
                table.merge(source, predicate="t.model = s.model AND t.scan_id = s.scan_id",
                            source_alias="s", target_alias="t")
                .when_not_matched_insert_all()
                .execute()
            )  # fmt: skip
            return len(rows)

        summary.written = merge_with_retry(attempt, what="embeddings")
    summary.embeddings_version = catalog.version("embeddings")
    summary.seconds = time.perf_counter() - started
    return summary
