"""The Ray Data map of the pretraining stream: ``volumes`` Parquet files → view pairs. A light module (numpy, pyarrow;
torch and MONAI only when augmenting on the CPU), because every Ray worker that runs the map imports it.

They are plain functions run as Ray tasks, not actors: task workers are reused across passes over the data, so a new
epoch costs no process start or import, and the MONAI chain (``augment.device == "data"``) is cached per process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from brainiac.ingestion.volumes import decode_array
from brainiac.models.patches import view_pairs
from brainiac.models.train_config import PatchConfig

__all__ = ["augmented_block_pairs", "crop_pairs", "read_pairs", "read_rows", "view_pair_bytes"]

ARRAY_COLUMNS = ["scan_id", "whole", "whole_shape", "mask", "dtype"]
"""The ``volumes`` columns a pair is cut from."""

AUGMENTED_BLOCK_BYTES = 4 << 20
"""Bytes of augmented pairs per output block (float16 views): 32 pairs of 32³, one pair of 96³.

Each block costs the driver and the raylet a few milliseconds (an object, a generator report, a scheduling step), so
blocks far smaller than this cost more than they save: on 2 CPUs, a pass in blocks of 32 tiny pairs took 9.3 CPU-s
outside the map tasks where blocks of 16 took 12.7, and its first batch came no later (profiled beside
``bench/loader.py``). Far larger blocks hold the first batch of a pass back: a block leaves its task only when whole."""


def view_pair_bytes(size: int) -> int:
    """Bytes of one pair of ``size``³ float16 views, as the map yields them."""
    return 2 * size**3 * np.dtype(np.float16).itemsize


def augmented_block_pairs(size: int) -> int:
    """Augmented view pairs per output block for ``size``³ views: :data:`AUGMENTED_BLOCK_BYTES` of them, at least one."""
    return max(1, AUGMENTED_BLOCK_BYTES // view_pair_bytes(size))


_AUGMENTS: dict[str, Any] = {}


def _augment(augment_cfg: dict[str, Any]):
    """The MONAI per-view chain for ``augment_cfg``, built once per worker process."""
    key = repr(sorted(augment_cfg.items()))
    if key not in _AUGMENTS:
        from brainiac.models.augment import ViewAugment
        from brainiac.models.config import AugmentConfig
        from brainiac.platform.config import from_dict

        _AUGMENTS[key] = ViewAugment(from_dict(AugmentConfig, augment_cfg, prefix="augment"))
    return _AUGMENTS[key]


def crop_pairs(
    batch: pa.Table,
    *,
    size: int,
    patches: dict[str, Any],
    augment: dict[str, Any] | None = None,
    repeats: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Decode each ``volumes`` row of ``batch`` and cut its view pairs, ``repeats`` rounds of ``patches_per_volume``
    pairs from one decode (the rows are the selection's: :func:`~brainiac.jobs.pretrain.stream.work_units` picked them).

    ``batch`` arrives as Arrow (delta-rs may write ``string_view`` columns, which Ray's numpy conversion rejects).

    Yields ``{"view1", "view2"}``, each (n, 1, size, size, size) float16, as soon as it is ready: a whole round when
    only cropping, and :func:`augmented_block_pairs` pairs at a time when augmenting (augmenting a round is the slow
    part). Ray Data ships each yield as its own block, so the first batch of a pass waits for one block, not for every
    pair of the volume. Locations come from a fresh OS-seeded generator, so every pass over the data draws new ones.
    """
    cfg = PatchConfig(**patches)
    rng = np.random.default_rng()
    chain = _augment(augment) if augment is not None else None
    block = augmented_block_pairs(size)
    columns = [batch.column(name).to_pylist() for name in ("whole", "whole_shape", "mask", "dtype")]
    for blob, shape, mask_blob, dtype in zip(*columns, strict=True):
        shape = [int(s) for s in shape]
        volume = decode_array(blob, shape, dtype or "float16")
        mask = decode_array(mask_blob, shape, "uint8")
        for _ in range(max(1, repeats)):
            first, second, _ = view_pairs(volume, mask, size, cfg, rng)
            if chain is not None:
                seed = int(rng.integers(2**31 - len(first)))
                for start in range(0, len(first), block):
                    pairs = range(start, min(start + block, len(first)))
                    views = [chain.pair(first[i], second[i], seed=seed + i) for i in pairs]
                    yield {"view1": np.stack([v[0] for v in views]), "view2": np.stack([v[1] for v in views])}
            else:
                yield {"view1": first, "view2": second}


def read_pairs(batch: dict[str, np.ndarray], *, filesystem: Any = None, **crop: Any) -> Iterator[dict[str, np.ndarray]]:
    """Read the work units of ``batch`` (``path``: a ``volumes`` Parquet file, ``rows``: row positions in it, from
    :func:`~brainiac.jobs.pretrain.stream.work_units`) and yield the view pairs of those rows (:func:`crop_pairs` with
    ``crop``), volume by volume.

    Only the row groups holding ``rows`` are read, and only the array columns. ``filesystem`` is a pyarrow filesystem
    for remote paths (``None``: local).
    """
    for path, rows in zip(batch["path"], batch["rows"], strict=True):
        table = read_rows(str(path), [int(r) for r in rows], filesystem)
        for i in range(table.num_rows):
            yield from crop_pairs(table.slice(i, 1), **crop)


def read_rows(path: str, rows: list[int], filesystem: Any = None) -> pa.Table:
    """The :data:`ARRAY_COLUMNS` of rows ``rows`` (positions in the file, in this order) of one Parquet file, reading
    only the row groups that hold them."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path, filesystem=filesystem)
    if not rows:
        return parquet.read_row_groups([], columns=ARRAY_COLUMNS)
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    starts = np.cumsum([0, *sizes])
    group_of = (np.searchsorted(starts, rows, side="right") - 1).tolist()
    groups = sorted(set(group_of))
    read_start = dict(zip(groups, np.cumsum([0, *(sizes[g] for g in groups[:-1])]).tolist(), strict=True))
    local = [read_start[g] + r - int(starts[g]) for r, g in zip(rows, group_of, strict=True)]
    table = parquet.read_row_groups(groups, columns=ARRAY_COLUMNS)
    return pa.concat_tables([table.slice(i, 1) for i in local])  # no `take`: it has no kernel for string_view
