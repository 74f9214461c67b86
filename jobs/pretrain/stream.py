"""The pretraining data path: catalog selection → Ray Data stream of view pairs, never materialised in full.

The driver resolves *which* volumes to read from small metadata (``volumes`` ⋈ ``splits`` ⋈ the access check on
``scans``). Ray Data then reads only those rows' arrays from the ``volumes`` Delta table (the Parquet files of the
pinned table version and preprocess partition, split into work units of about one volume each, in a fresh random
order per pass), decodes them, cuts ``patches_per_volume`` view pairs per volume and, when
``augment.device == "data"``, augments each view with MONAI on the CPU. Train workers pull batches with
``get_dataset_shard("train").iter_torch_batches``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brainiac.ingestion.splits import read_splits
from brainiac.ingestion.volumes import decode_array, newest_preprocess_version
from brainiac.jobs.pretrain.pairs import ARRAY_COLUMNS, augmented_block_pairs, view_pair_bytes
from brainiac.models.train_config import PatchConfig
from brainiac.platform.catalog import Catalog, sql_in, sql_literal
from brainiac.platform.config import Config
from brainiac.platform.errors import UserError

__all__ = ["PretrainSelection", "eval_pairs", "pair_dataset", "rounds_per_decode", "select_volumes", "work_units"]

MAX_UNITS = 4096
"""At most this many work units (map tasks) per pass: one volume each up to this many volumes, then a few each."""

CROP_ONLY_VOLUMES_PER_TASK = 8
"""Volumes per map task when the stream only decodes and crops (augmentation on the training worker)."""


@dataclass
class PretrainSelection:
    """What a pretraining run reads: one pinned ``volumes`` version, its train and held-out scan ids, provenance."""

    preprocess_version: str
    volumes_version: int
    train_ids: list[str]
    eval_ids: list[str]
    datasets: dict[str, int] = field(default_factory=dict)
    """Training volumes per dataset."""
    access_levels: list[str] = field(default_factory=list)
    """Access levels of the training data (a model trained on ``restricted`` data carries that tag)."""


def select_volumes(catalog: Catalog, cfg: Config) -> PretrainSelection:
    """Resolve the config's patch selection against the catalog (driver side, metadata only).

    Raises:
        UserError: no volumes, an access level the job may not read, or an empty train or held-out selection.
    """
    volumes_version = catalog.version("volumes")
    if volumes_version is None:
        raise UserError(
            f"the catalog {catalog.uri} has no volumes table; run `brainiac preprocess --catalog {catalog.uri}` first"
        )
    pcfg = cfg.patches
    version = pcfg.preprocess_version or newest_preprocess_version(catalog)
    where = f"preprocess_version = {sql_literal(version)} AND qc_pass"
    if pcfg.datasets:
        where += f" AND {sql_in('dataset', pcfg.datasets)}"
    if pcfg.sequences:
        where += f" AND {sql_in('sequence', pcfg.sequences)}"
    meta = catalog.select("volumes", where, ["scan_id", "dataset", "subject_id"], version=volumes_version).to_pandas()
    if meta.empty:
        raise UserError(
            f"no QC-passing volumes of preprocess version {version} match datasets={pcfg.datasets or 'all'} "
            f"sequences={pcfg.sequences or 'all'}"
        )
    # The access check reads the scans rows behind the selection; a level the job may not read is an error.
    access = catalog.scans(dataset=sorted(meta["dataset"].unique()), allowed_access=cfg.catalog.allowed_access)
    levels = access.to_arrow(["scan_id", "access"]).to_pandas()
    levels = levels[levels["scan_id"].isin(meta["scan_id"])]
    split_of = read_splits(catalog, cfg.splits.seed, sorted(meta["subject_id"].unique()))
    meta["split"] = meta["subject_id"].map(split_of)
    train = meta[meta["split"].isin(pcfg.splits)]
    held = meta[meta["split"] == pcfg.eval_split]
    if train.empty:
        raise UserError(
            f"no volumes in splits {pcfg.splits} (seed {cfg.splits.seed}); run `brainiac preprocess` to assign splits"
        )
    if held.empty:
        raise UserError(f"no volumes in the held-out split '{pcfg.eval_split}' to measure retrieval on")
    return PretrainSelection(
        preprocess_version=version,
        volumes_version=int(volumes_version),
        train_ids=sorted(train["scan_id"]),
        eval_ids=sorted(held["scan_id"]),
        datasets={str(k): int(v) for k, v in train["dataset"].value_counts().sort_index().items()},
        access_levels=sorted(set(levels["access"])),
    )


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def pair_dataset(catalog: Catalog, cfg: Config, selection: PretrainSelection, scan_ids: list[str]):
    """The Ray Dataset of view pairs for ``scan_ids``, streamed from ``volumes`` at the selection's table version.

    The Parquet files are those of the selection's ``preprocess_version`` partition at the pinned Delta version (what
    ``ray.data.read_delta`` reads, plus partition pruning). The driver finds the rows of ``scan_ids`` in them once
    (:func:`work_units`); each pass then maps those units in a fresh random order, each read inside its map task
    (:func:`~brainiac.jobs.pretrain.pairs.read_pairs`). Only numpy pairs leave the task (delta-rs' ``string_view``
    columns never reach Ray's block serialiser, which rejects them).
    """
    import ray.data

    table = catalog.table("volumes", selection.volumes_version)
    files = table.file_uris(file_pruning_predicate=f"preprocess_version = {sql_literal(selection.preprocess_version)}")
    location = catalog.table_location("volumes")
    filesystem = None
    if location.is_remote:
        filesystem = location.pyarrow_filesystem()
        files = [f.split("://", 1)[1] if "://" in f else f for f in files]
    from brainiac.jobs.pretrain.pairs import read_pairs
    from brainiac.platform.config import config_to_dict

    repeats = rounds_per_decode(cfg.patches, len(scan_ids))
    # Work units of about one volume, not one Parquet file: a file holds a dozen volumes or more, so with a file per
    # task the last files of a pass ran on one CPU while the others idled (see bench/loader.py). The units come from
    # the pinned file list, so no pass lists or sizes the files again (what read_parquet does in a task on every pass,
    # seconds before the first batch). A fresh random order on every pass.
    # Cropping alone is ~1 ms a pair: a task of one volume would be mostly Ray Data's per-task cost, so it takes more.
    rows_per_unit = 1 if cfg.augment.device == "data" else CROP_ONLY_VOLUMES_PER_TASK
    units = work_units(files, set(scan_ids), filesystem, rows_per_unit=rows_per_unit)
    if not units:
        raise UserError(
            f"none of the {len(scan_ids)} selected volumes is in the volumes table's files at version "
            f"{selection.volumes_version}"
        )
    items = ray.data.from_items(units, override_num_blocks=len(units))
    # Settings of this dataset's own DataContext (from_items copies the current one; the pipeline shares it):
    # - Every yield of the map leaves as its own block, as soon as it is made. Ray Data buffers a task's yields until
    #   they pass target_max_block_size, so with the 8 MiB used before, a pass's first batch waited for a whole volume
    #   (64 augmented 32³ pairs, ~1.5 s on a shared CPU). Three quarters of one augmented block's bytes: a block is
    #   emitted at each yield and not sliced (Ray slices blocks above 1.5x the target); crop-only rounds are sliced into
    #   blocks of about that size.
    # - No per-operator resource reservation: it admitted one map task at the start of every pass and the others
    #   about a second later, and it cost the driver CPU on every scheduling step. This pipeline has a single map
    #   whose CPU share is capped anyway (pretrain.data_cpus through the Train DataConfig's resource limits).
    context = items.context
    size = cfg.model.img_size
    context.target_max_block_size = augmented_block_pairs(size) * view_pair_bytes(size) * 3 // 4
    context.op_resource_reservation_enabled = False
    return items.randomize_block_order().map_batches(
        read_pairs,
        fn_kwargs={
            "filesystem": filesystem,
            "size": cfg.model.img_size,
            "patches": config_to_dict(cfg.patches),
            "augment": config_to_dict(cfg.augment) if cfg.augment.device == "data" else None,
            "repeats": repeats,
        },
        batch_size=1,
        # data_tasks_per_cpu tasks per CPU (of Ray Data's share pretrain.data_cpus where that is under one CPU): a
        # queued task takes over the moment one ends. The local Ray keeps that many workers between passes
        # (cluster.workers_per_cpu); above its idle limit Ray kills workers, and a fresh one pays the torch/MONAI
        # import again, seconds on a small machine.
        num_cpus=min(1.0, cfg.pretrain.data_cpus or 1.0) / cfg.pretrain.data_tasks_per_cpu,
    )


def rounds_per_decode(patches: PatchConfig, volumes: int) -> int:
    """Rounds of ``patches_per_volume`` pairs cut from each decoded volume, so that one pass over ``volumes`` volumes
    yields at least ``min_pairs_per_pass`` pairs: a small selection cuts more rounds from a single read rather than
    reading the files again (a union of many reads starves Ray Data's CPU share and hangs)."""
    return max(1, math.ceil(patches.min_pairs_per_pass / max(1, volumes * patches.patches_per_volume)))


def work_units(
    files: list[str], keep: set[str], filesystem: Any = None, max_units: int = MAX_UNITS, rows_per_unit: int = 1
) -> list[dict[str, Any]]:
    """The map tasks of one pass: ``{"path": file, "rows": [positions]}``, covering every row of ``files`` whose
    ``scan_id`` is in ``keep`` exactly once, never mixing files, with ``rows_per_unit`` rows per unit, or
    ``ceil(rows / max_units)`` where that is more (the last unit of a file may hold fewer).

    Small units balance the CPUs at the end of a pass; ``max_units`` bounds the tasks of a very large catalog. The
    ``scan_id`` column of every file is read once, a few files at a time (on ``s3://`` each costs a request).
    """
    import pyarrow.parquet as pq

    def scan_ids_of(path: str) -> list[str]:
        return pq.read_table(path, columns=["scan_id"], filesystem=filesystem).column("scan_id").to_pylist()

    with ThreadPoolExecutor(max_workers=8) as pool:
        columns = list(pool.map(scan_ids_of, files))
    wanted = {path: [i for i, scan in enumerate(ids) if scan in keep] for path, ids in zip(files, columns, strict=True)}
    per_unit = max(1, rows_per_unit, math.ceil(sum(map(len, wanted.values())) / max(1, max_units)))
    return [
        {"path": path, "rows": rows[start : start + per_unit]}
        for path, rows in wanted.items()
        for start in range(0, len(rows), per_unit)
    ]


def eval_pairs(
    catalog: Catalog, cfg: Config, selection: PretrainSelection, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` held-out view pairs (float32, augmented with the MONAI chain under fixed seeds), read in the driver.

    The same pairs score the trained and the randomly initialised encoder, so the comparison is paired.
    """
    from brainiac.models.augment import ViewAugment
    from brainiac.models.patches import view_pairs

    rows = catalog.select(
        "volumes", sql_in("scan_id", selection.eval_ids), ARRAY_COLUMNS, version=selection.volumes_version
    ).to_pylist()
    augment = ViewAugment(cfg.augment, seed=seed)
    rng = np.random.default_rng(seed)
    firsts, seconds = [], []
    per_volume = max(1, -(-count // len(rows)))
    patches = dataclasses.replace(cfg.patches, patches_per_volume=per_volume)
    for i, row in enumerate(sorted(rows, key=lambda r: r["scan_id"])):
        shape = [int(s) for s in row["whole_shape"]]
        volume = decode_array(row["whole"], shape, row["dtype"] or "float16").astype(np.float32)
        mask = decode_array(row["mask"], shape, "uint8")
        first, second, _ = view_pairs(volume, mask, cfg.model.img_size, patches, rng)
        for j, (a, b) in enumerate(zip(first, second, strict=True)):
            va, vb = augment.pair(a, b, seed=_seed_of(seed, i, j) % 2**31)
            firsts.append(va)
            seconds.append(vb)
    return np.stack(firsts[:count]), np.stack(seconds[:count])
