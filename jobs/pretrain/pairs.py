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

__all__ = ["crop_pairs", "read_pairs"]

ARRAY_COLUMNS = ["scan_id", "whole", "whole_shape", "mask", "dtype"]
"""The ``volumes`` columns a pair is cut from."""

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
    keep: frozenset[str],
    augment: dict[str, Any] | None = None,
    repeats: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Decode each ``volumes`` row of ``batch`` whose scan id is in ``keep`` and cut its view pairs, ``repeats`` rounds
    of ``patches_per_volume`` pairs from one decode.

    ``batch`` arrives as Arrow (delta-rs may write ``string_view`` columns, which Ray's numpy conversion rejects).

    Yields one ``{"view1", "view2"}`` per round, each (``patches_per_volume``, 1, size, size, size) float16, as soon as
    it is cut: Ray Data ships each yield as its own block, so the first batch waits for one round, not for every pair of
    the volume. Rows of other scans yield nothing (an empty 5-D array would not convert to an Arrow tensor column and
    Ray would fall back to pickling the column). Locations come from a fresh OS-seeded generator, so every pass over
    the data draws new ones.
    """
    cfg = PatchConfig(**patches)
    rng = np.random.default_rng()
    chain = _augment(augment) if augment is not None else None
    columns = [batch.column(name).to_pylist() for name in ("scan_id", "whole", "whole_shape", "mask", "dtype")]
    for scan_id, blob, shape, mask_blob, dtype in zip(*columns, strict=True):
        if scan_id not in keep:  # a volume of another split stored in the same Parquet file
            continue
        shape = [int(s) for s in shape]
        volume = decode_array(blob, shape, dtype or "float16")
        mask = decode_array(mask_blob, shape, "uint8")
        for _ in range(max(1, repeats)):
            first, second, _ = view_pairs(volume, mask, size, cfg, rng)
            if chain is not None:
                seed = int(rng.integers(2**31 - len(first)))
                views = [chain.pair(a, b, seed=seed + i) for i, (a, b) in enumerate(zip(first, second, strict=True))]
                first = np.stack([v[0] for v in views])
                second = np.stack([v[1] for v in views])
            yield {"view1": first, "view2": second}


def read_pairs(
    batch: dict[str, np.ndarray], *, filesystem: Any = None, keep: frozenset[str], **crop: Any
) -> Iterator[dict[str, np.ndarray]]:
    """Read the ``volumes`` Parquet files named in ``batch["path"]`` and yield the view pairs of their rows in ``keep``
    (:func:`crop_pairs` with ``crop``), volume by volume.

    The scan id column is read first, so a file holding only other splits' volumes costs a few bytes; the array
    columns are read only for files with something to cut. ``filesystem`` is a pyarrow filesystem for remote paths
    (``None``: local).
    """
    import pyarrow.parquet as pq

    for path in batch["path"]:
        parquet = pq.ParquetFile(str(path), filesystem=filesystem)  # the footer is read once for both reads
        if not keep.intersection(parquet.read(columns=["scan_id"]).column("scan_id").to_pylist()):
            continue
        table = parquet.read(columns=ARRAY_COLUMNS)
        for i in range(table.num_rows):
            yield from crop_pairs(table.slice(i, 1), keep=keep, **crop)
