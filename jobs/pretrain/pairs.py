"""The Ray Data map of the pretraining stream: ``volumes`` Parquet files → view pairs. A light module (numpy, pyarrow;
torch and MONAI only when augmenting on the CPU), because every Ray worker that runs the map imports it.

They are plain functions run as Ray tasks, not actors: task workers are reused across passes over the data, so a new
epoch costs no process start or import, and the MONAI chain (``augment.device == "data"``) is cached per process.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from brainiac.ingestion.volumes import decode_array
from brainiac.models.patches import view_pairs
from brainiac.models.train_config import PatchConfig

__all__ = [
    "augmented_block_pairs",
    "crop_pairs",
    "read_pairs",
    "read_rows",
    "row_group_bounds",
    "view_pair_bytes",
    "volume_tag",
]

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


def volume_tag(scan_id: str) -> int:
    """A stable int64 naming ``scan_id`` (the measurement's ``volume`` column: Arrow tensors take no strings)."""
    return int.from_bytes(hashlib.blake2b(scan_id.encode(), digest_size=8).digest(), "little", signed=True)


FIRST_WAVE_PAIRS = 64
"""Pairs of a task's first wave at most (a few per volume; when its waves are larger): every pass starts with its
tasks cutting their first wave, and the first batch waits for it (512 crops of 32³ took ~1 s on a shared CPU)."""


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
    pairs: int | None = None,
    wave: int | None = None,
    tag: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Decode each ``volumes`` row of ``batch``, cut ``pairs`` view pairs of each (``patches_per_volume`` when
    ``None``) and yield them **interleaved across the rows** (the rows are the selection's:
    :func:`~brainiac.jobs.pretrain.stream.work_units` picked them, from many files).

    Interleaved: the pairs are cut in waves of ``wave`` pairs per volume (``patches_per_volume`` when ``None``: the
    rounds one decode used to give) and each wave leaves in rounds, each round one pair of every volume in a fresh
    random order, so any ``len(batch)`` consecutive pairs come from ``len(batch)`` distinct volumes. SimCLR's negatives
    are the other pairs of a batch, and the consumer's shuffle buffer holds only a few blocks: the mix has to be made
    here. A task holds its decoded volumes and one wave's crops (:func:`~brainiac.jobs.pretrain.stream.mix_shape` sizes
    both); the first block waits for a first wave of at most :data:`FIRST_WAVE_PAIRS` pairs, not for every pair.

    ``batch`` arrives as Arrow (delta-rs may write ``string_view`` columns, which Ray's numpy conversion rejects).

    Yields ``{"view1", "view2"}`` (and ``"volume"``, :func:`volume_tag` of each pair's scan, with ``tag``), each view
    (n, 1, size, size, size) float16, :func:`augmented_block_pairs` pairs at a time, augmented first when ``augment``
    is set. Ray Data ships each yield as its own block. Locations come from a fresh OS-seeded generator, so every pass
    over the data draws new ones.
    """
    cfg = PatchConfig(**patches)
    total = max(1, int(pairs or cfg.patches_per_volume))
    wave = max(1, min(total, int(wave or cfg.patches_per_volume)))
    rng = np.random.default_rng()
    chain = _augment(augment) if augment is not None else None
    block = augmented_block_pairs(size)
    decoded = []
    columns = [batch.column(name).to_pylist() for name in ("whole", "whole_shape", "mask", "dtype", "scan_id")]
    for blob, shape, mask_blob, dtype, scan in zip(*columns, strict=True):
        shape = [int(s) for s in shape]
        volume = decode_array(blob, shape, dtype or "float16")
        decoded.append((volume, decode_array(mask_blob, shape, "uint8"), volume_tag(str(scan)) if tag else 0))
    # A small first wave where a whole one is many pairs: the first block of the task leaves sooner.
    first = max(1, min(wave, FIRST_WAVE_PAIRS // max(1, len(decoded))))
    done = 0
    while decoded and done < total:
        count = min(first if done == 0 else wave, total - done)
        done += count
        cut = dataclasses.replace(cfg, patches_per_volume=count)
        views = [view_pairs(volume, mask, size, cut, rng)[:2] for volume, mask, _ in decoded]
        # round r: pair r of every volume, the volumes in a fresh random order each round
        order = [(v, r) for r in range(count) for v in rng.permutation(len(decoded)).tolist()]
        seed = int(rng.integers(2**31 - len(order)))
        for start in range(0, len(order), block):
            picked = order[start : start + block]
            if chain is not None:
                pair = [
                    chain.pair(views[v][0][r], views[v][1][r], seed=seed + start + i) for i, (v, r) in enumerate(picked)
                ]
                out = {"view1": np.stack([a for a, _ in pair]), "view2": np.stack([b for _, b in pair])}
            else:
                out = {"view1": np.stack([views[v][0][r] for v, r in picked]),
                       "view2": np.stack([views[v][1][r] for v, r in picked])}  # fmt: skip
            if tag:
                out["volume"] = np.array([decoded[v][2] for v, _ in picked], dtype=np.int64)
            yield out


def read_pairs(batch: dict[str, np.ndarray], *, filesystem: Any = None, **crop: Any) -> Iterator[dict[str, np.ndarray]]:
    """Read the work units of ``batch`` (``paths`` and ``rows``: one entry per volume, a ``volumes`` Parquet file and
    the row's position in it, from :func:`~brainiac.jobs.pretrain.stream.work_units`) and yield the view pairs of each
    unit's rows interleaved (:func:`crop_pairs` with ``crop``).

    Each file of a unit is read once, and only the row groups that hold the unit's rows, only the array columns.
    ``filesystem`` is a pyarrow filesystem for remote paths (``None``: local).
    """
    for paths, rows in zip(batch["paths"], batch["rows"], strict=True):
        by_file: dict[str, list[int]] = {}
        for path, row in zip(paths, rows, strict=True):
            by_file.setdefault(str(path), []).append(int(row))
        tables = [read_rows(path, positions, filesystem) for path, positions in by_file.items()]
        yield from crop_pairs(pa.concat_tables(tables), **crop)


def row_group_bounds(parquet: Any) -> np.ndarray:
    """Row positions where each row group of a ``pq.ParquetFile`` starts, and the file's row count last."""
    return np.cumsum([0, *(parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups))])


def read_rows(path: str, rows: list[int], filesystem: Any = None, columns: list[str] | None = None) -> pa.Table:
    """The ``columns`` (default :data:`ARRAY_COLUMNS`) of rows ``rows`` (positions in the file, in this order) of one
    Parquet file, reading only the row groups that hold them, each once."""
    import pyarrow.parquet as pq

    columns = columns or ARRAY_COLUMNS
    parquet = pq.ParquetFile(path, filesystem=filesystem)
    if not rows:
        return parquet.read_row_groups([], columns=columns)
    starts = row_group_bounds(parquet)
    group_of = (np.searchsorted(starts, rows, side="right") - 1).tolist()
    groups = sorted(set(group_of))
    sizes = np.diff(starts)
    read_start = dict(zip(groups, np.cumsum([0, *(sizes[g] for g in groups[:-1])]).tolist(), strict=True))
    local = [read_start[g] + r - int(starts[g]) for r, g in zip(rows, group_of, strict=True)]
    table = parquet.read_row_groups(groups, columns=columns)
    return pa.concat_tables([table.slice(i, 1) for i in local])  # no `take`: it has no kernel for string_view
