"""The ``volumes`` table's array codec and readers: float16/uint8 arrays stored zstd-compressed in Delta binary columns.

An array is stored as its raw C-order bytes compressed with zstd (pyarrow's codec, no extra dependency) beside its
shape; decoding is one ``pa.decompress`` and a ``np.frombuffer``, a few milliseconds for a 96³ volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from brainiac.platform.catalog import Catalog, sql_literal

__all__ = ["decode_array", "encode_array", "newest_preprocess_version", "read_volumes"]


def encode_array(array: np.ndarray) -> bytes:
    """zstd-compressed C-order bytes of ``array`` (dtype and shape are stored in their own columns)."""
    return pa.compress(np.ascontiguousarray(array).tobytes(), codec="zstd", asbytes=True)


def decode_array(blob: bytes | None, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray | None:
    """Inverse of :func:`encode_array`; ``None`` stays ``None``."""
    if blob is None:
        return None
    dt = np.dtype(dtype)
    raw = pa.decompress(blob, decompressed_size=math.prod(shape) * dt.itemsize, codec="zstd", asbytes=True)
    return np.frombuffer(raw, dtype=dt).reshape(tuple(shape))


def read_volumes(
    catalog: Catalog,
    preprocess_version: str,
    *,
    scan_ids: Sequence[str] | None = None,
    qc_pass_only: bool = True,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Rows of ``volumes`` for one preprocess version (QC-passing ones unless told otherwise)."""
    where = f"preprocess_version = {sql_literal(preprocess_version)}"
    if qc_pass_only:
        where += " AND qc_pass"
    if scan_ids is not None:
        return catalog.select_keys("volumes", "scan_id", scan_ids, columns, where=where)
    return catalog.select("volumes", where, columns)


def row_arrays(row: dict[str, Any]) -> dict[str, np.ndarray | None]:
    """Decode every array of one ``volumes`` row."""
    whole_shape, fixed_shape = row["whole_shape"], row["fixed_shape"]
    return {
        "whole": decode_array(row.get("whole"), whole_shape, row.get("dtype") or "float16"),
        "fixed": decode_array(row.get("fixed"), fixed_shape, row.get("dtype") or "float16"),
        "mask": decode_array(row.get("mask"), whole_shape, "uint8"),
        "labels_whole": decode_array(row.get("labels_whole"), whole_shape, "uint8"),
        "labels_fixed": decode_array(row.get("labels_fixed"), fixed_shape, "uint8"),
    }


def newest_preprocess_version(catalog: Catalog) -> str:
    """The preprocess version written last among QC-passing ``volumes`` (what jobs read unless told a version).

    Raises:
        UserError: the catalog holds no preprocessed volume.
    """
    from brainiac.platform.errors import UserError

    table = None
    if catalog.version("volumes") is not None:
        table = catalog.sql(  # the newest per version, aggregated where the rows are: the driver receives a few rows
            "SELECT preprocess_version, max(preprocessed_at) AS preprocessed_at FROM volumes WHERE qc_pass "
            "GROUP BY preprocess_version"
        ).to_pandas()
    if table is None or table.empty:
        raise UserError(
            f"the catalog {catalog.uri} has no preprocessed volumes; run `brainiac preprocess --catalog {catalog.uri}` first"
        )
    return str(table.sort_values("preprocessed_at")["preprocess_version"].iloc[-1])
