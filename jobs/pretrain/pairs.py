"""The Ray Data map of the pretraining stream: volume rows → view pairs. A light module (numpy, pyarrow; torch and MONAI
only when augmenting on the CPU), because every Ray worker that runs the map imports it.

It is a plain function run as Ray tasks, not an actor: task workers are reused across passes over the data, so a new
epoch costs no process start or import, and the MONAI chain (``augment.device == "data"``) is cached per process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from brainiac.ingestion.volumes import decode_array
from brainiac.models.patches import view_pairs
from brainiac.models.train_config import PatchConfig

__all__ = ["crop_pairs"]

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
) -> dict[str, np.ndarray]:
    """Decode each ``volumes`` row of ``batch`` whose scan id is in ``keep`` and cut its view pairs.

    ``batch`` arrives as Arrow (delta-rs may write ``string_view`` columns, which Ray's numpy conversion rejects).

    Returns ``{"view1", "view2"}``, each (n, 1, size, size, size) float16; n = kept rows · ``patches_per_volume``.
    Locations come from a fresh OS-seeded generator, so every pass over the data draws new ones.
    """
    cfg = PatchConfig(**patches)
    rng = np.random.default_rng()
    chain = _augment(augment) if augment is not None else None
    firsts, seconds = [], []
    columns = [batch.column(name).to_pylist() for name in ("scan_id", "whole", "whole_shape", "mask", "dtype")]
    for scan_id, blob, shape, mask_blob, dtype in zip(*columns, strict=True):
        if scan_id not in keep:  # a volume of another split stored in the same Parquet file
            continue
        shape = [int(s) for s in shape]
        volume = decode_array(blob, shape, dtype or "float16")
        mask = decode_array(mask_blob, shape, "uint8")
        first, second, _ = view_pairs(volume, mask, size, cfg, rng)
        if chain is not None:
            seed = int(rng.integers(2**31 - len(first)))
            views = [chain.pair(a, b, seed=seed + i) for i, (a, b) in enumerate(zip(first, second, strict=True))]
            first = np.stack([v[0] for v in views])
            second = np.stack([v[1] for v in views])
        firsts.append(first)
        seconds.append(second)
    if not firsts:
        empty = np.zeros((0, 1, size, size, size), dtype=np.float16)
        return {"view1": empty, "view2": empty}
    return {"view1": np.concatenate(firsts), "view2": np.concatenate(seconds)}
