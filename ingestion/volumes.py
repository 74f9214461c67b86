"""The ``volumes`` table's array codec and readers: float16/uint8 arrays stored zstd-compressed in Delta binary columns.

An array is stored as its raw C-order bytes compressed with zstd (pyarrow's codec, no extra dependency) beside its
shape; decoding is one ``pa.decompress`` and a ``np.frombuffer``, a few milliseconds for a 96³ volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import pyarrow as pa

from brainiac.platform.catalog import Catalog, sql_literal

if TYPE_CHECKING:
    from brainiac.ingestion.preprocess.config import PreprocessConfig

__all__ = [
    "VolumeSet",
    "decode_array",
    "encode_array",
    "newest_preprocess_version",
    "read_volumes",
    "resolve_volume_set",
]

NEWEST = "newest"
"""The version name that asks for the preprocess version written last (also what an empty version means)."""


def encode_array(array: np.ndarray) -> bytes:
    """zstd-compressed C-order bytes of ``array`` (dtype and shape are stored in their own columns)."""
    return pa.compress(np.ascontiguousarray(array).tobytes(), codec="zstd", asbytes=True)


@overload
def decode_array(blob: bytes, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray: ...
@overload
def decode_array(blob: None, shape: Sequence[int], dtype: str | np.dtype) -> None: ...
@overload
def decode_array(blob: bytes | None, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray | None: ...
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


@dataclass(frozen=True)
class VolumeSet:
    """One set of preprocessed volumes, pinned for a whole job: every read of the job uses this ``volumes`` snapshot
    and this preprocess version, and registration records both with the config that wrote them."""

    volumes_version: int
    """Delta version of ``volumes`` the job reads (its whole run, whatever commits meanwhile)."""
    preprocess_version: str
    """The ``preprocess_version`` partition: one preprocessing config's output."""
    config: PreprocessConfig | None
    """The settings recorded for that version in ``preprocess_configs``; ``None`` for volumes written before the
    catalog kept that record."""


def resolve_volume_set(catalog: Catalog, version: str | None = None, *, table_version: int | None = None) -> VolumeSet:
    """``(catalog, version | "newest")`` → the pinned :class:`VolumeSet` a job reads: the one resolver of pretrain,
    finetune, embed, evaluate and promote (predict reads the model's own recorded config, with no catalog).

    ``volumes`` is pinned first (``table_version``, else its current version) and "newest" -- ``None``, ``""`` or
    ``"newest"`` -- is looked up in that same snapshot: the preprocess version written last among the QC-passing volumes
    ``catalog`` shows (restrict it to the job's access levels first). A preprocess run that commits while the job
    starts can therefore never slip in between the lookup and the reads.

    Raises:
        UserError: the catalog has no ``volumes`` table or no preprocessed volume.
    """
    from brainiac.ingestion.prepare import preprocess_config_of
    from brainiac.platform.errors import UserError

    pinned = catalog.version("volumes") if table_version is None else int(table_version)
    if pinned is None:
        raise UserError(
            f"the catalog {catalog.uri} has no volumes table; run `brainiac preprocess --catalog {catalog.uri}` first"
        )
    chosen = version if version and version != NEWEST else newest_preprocess_version(catalog, table_version=pinned)
    return VolumeSet(int(pinned), chosen, preprocess_config_of(catalog, chosen))


def newest_preprocess_version(catalog: Catalog, *, table_version: int | None = None) -> str:
    """The preprocess version written last among QC-passing ``volumes`` (at ``table_version``, else the newest
    snapshot): what jobs read unless told a version. The driver receives one row per version, never the arrays.

    Raises:
        UserError: the catalog holds no preprocessed volume.
    """
    from brainiac.platform.errors import UserError

    # Aggregated where the rows are (one row per preprocess version reaches the driver), in the pinned snapshot.
    newest = catalog.sql_table(
        "volumes",
        "SELECT preprocess_version, max(preprocessed_at) AS preprocessed_at_max FROM volumes WHERE qc_pass "
        "GROUP BY preprocess_version",
        version=table_version,
    )
    if newest.num_rows == 0:
        raise UserError(
            f"the catalog {catalog.uri} has no preprocessed volumes; run `brainiac preprocess --catalog {catalog.uri}` first"
        )
    order = newest.sort_by([("preprocessed_at_max", "descending"), ("preprocess_version", "ascending")])
    return str(order["preprocess_version"][0].as_py())
