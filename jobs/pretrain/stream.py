"""The pretraining data path: catalog selection → Ray Data stream of view pairs, never materialised in full.

The driver resolves *which* volumes to read from small metadata (``volumes`` ⋈ ``splits`` ⋈ the access check on
``scans``). Ray Data then reads only those rows' arrays from the ``volumes`` Delta table (the Parquet files of the
pinned table version and preprocess partition, in a fresh random order per pass; rows of other scans skipped), decodes
them, cuts ``patches_per_volume`` view pairs per volume and, when ``augment.device == "data"``, augments each view with MONAI on the CPU. Train workers pull batches with
``get_dataset_shard("train").iter_torch_batches``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brainiac.ingestion.splits import read_splits
from brainiac.ingestion.volumes import decode_array, newest_preprocess_version
from brainiac.jobs.pretrain.pairs import ARRAY_COLUMNS
from brainiac.platform.catalog import Catalog, sql_in, sql_literal
from brainiac.platform.config import Config
from brainiac.platform.errors import UserError

__all__ = ["PretrainSelection", "eval_pairs", "pair_dataset", "select_volumes"]


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
    ``ray.data.read_delta`` reads, plus partition pruning); each is read inside the map task
    (:func:`~brainiac.jobs.pretrain.pairs.read_pairs`), its scan ids first, and rows of other scans are skipped before
    decoding. Only numpy pairs leave the task (delta-rs' ``string_view`` columns never reach Ray's block serialiser,
    which rejects them).
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

    # Small output blocks carry each volume's pairs to the workers as they are cut, not after a whole file.
    ray.data.DataContext.get_current().target_max_block_size = 8 << 20
    # One pass yields at least min_pairs_per_pass pairs: a small selection cuts more rounds of pairs per volume from a
    # single read, rather than reading the files again (a union of many reads starves Ray Data's CPU share and hangs).
    per_pass = max(1, len(scan_ids) * cfg.patches.patches_per_volume)
    repeats = max(1, math.ceil(cfg.patches.min_pairs_per_pass / per_pass))
    # The pinned version's file list is already known, so the stream starts from it: read_parquet would list and
    # size the files again in a task on every pass (5-10 s before the first batch on this 2-core machine; see
    # bench/loader.py). A fresh random file order on every pass.
    paths = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return paths.randomize_block_order().map_batches(
        read_pairs,
        fn_kwargs={
            "filesystem": filesystem,
            "keep": frozenset(scan_ids),
            "size": cfg.model.img_size,
            "patches": config_to_dict(cfg.patches),
            "augment": config_to_dict(cfg.augment) if cfg.augment.device == "data" else None,
            "repeats": repeats,
        },
        batch_size=1,
        # One CPU per task: at most as many map workers as CPUs, so Ray keeps them between passes (above its idle soft
        # limit it kills workers, and a fresh one pays the torch/MONAI import again, seconds on a small machine); less
        # only when Ray Data's whole CPU share (pretrain.data_cpus) is smaller, or no task could ever start.
        num_cpus=min(1.0, cfg.pretrain.data_cpus or 1.0),
    )


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
