"""The pretraining data path: catalog selection → Ray Data stream of view pairs, never materialised in full.

The driver resolves *which* volumes to read from small metadata (``volumes`` ⋈ ``splits`` ⋈ the access check on
``scans``). Ray Data then reads only those rows' arrays from the ``volumes`` Delta table (the Parquet files of the
pinned table version and preprocess partition, split into work units of up to a batch of volumes drawn at random from
every file, in a fresh random order per pass), decodes them, cuts their view pairs, hands them out interleaved across
the unit's volumes (a batch's negatives come from many volumes, subjects and datasets) and, when
``augment.device == "data"``, augments each view with MONAI on the CPU. Train workers pull batches with
``get_dataset_shard("train").iter_torch_batches``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brainiac.ingestion.splits import read_splits
from brainiac.ingestion.volumes import decode_array, resolve_volume_set
from brainiac.jobs.config import Config
from brainiac.jobs.pretrain.pairs import ARRAY_COLUMNS, augmented_block_pairs, view_pair_bytes
from brainiac.models.train_config import PatchConfig
from brainiac.platform.catalog import Catalog, sql_in, sql_literal
from brainiac.platform.errors import UserError

__all__ = [
    "PretrainSelection",
    "batch_mix",
    "eval_pairs",
    "mix_shape",
    "pair_dataset",
    "rounds_per_decode",
    "select_volumes",
    "spread_subset",
    "work_units",
]

MAX_UNITS = 4096
"""At most this many work units (map tasks) per pass: beyond that each unit takes more volumes."""

MIX_VOLUMES_MAX = 32
"""At most this many volumes per map task: their pairs leave interleaved, so a batch of B pairs draws from
min(B, this) volumes of one task (and more through the consumer's shuffle buffer)."""

MIX_BYTES = 256 << 20
"""Bytes of cut (not yet handed out) crops one map task holds at most: a wave of pairs of every volume of the task
(see :func:`mix_shape`); it also bounds the volumes of a task where a round of their pairs is large."""

AUGMENTED_TASK_PAIRS = 256
"""Pairs a map task cuts at most when it also augments them (``augment.device == "data"``; ~15 ms a 32³ pair on one
CPU): longer tasks leave CPUs idle at the end of a pass, so a volume's pairs of a pass are split over more visits."""

CROP_TASK_PAIRS = 2048
"""Pairs a map task cuts at most when it only crops (~0.5 ms a 32³ pair): a small selection cuts many rounds per
volume, and a pass of a few long tasks cannot keep every CPU busy."""

PIECES_PER_UNIT = 4
"""A work unit takes its rows from at least this many pieces of row groups (of other files, mostly): the rows of one
row group are one commit's (one dataset, often one subject), and splitting a row group further only reads it again."""


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
    eval_groups: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Held-out scan id → (dataset, subject): :func:`eval_pairs` spreads its few volumes over them."""
    left_out: str | None = None
    """What ``catalog.allowed_access`` left out of the catalog (datasets, scans, levels), or ``None``."""


def select_volumes(catalog: Catalog, cfg: Config) -> PretrainSelection:
    """Resolve the config's patch selection against the catalog (driver side, metadata only): the volumes of the
    datasets ``catalog.datasets`` and ``patches.datasets`` name (default: all) that ``catalog.allowed_access`` allows;
    :attr:`PretrainSelection.left_out` says what the access levels left out.

    Raises:
        UserError: no volumes, a named dataset that is unknown or at a level the job may not read, or an empty train
            or held-out selection.
    """
    pcfg = cfg.patches
    reader = catalog.restricted(cfg.catalog.allowed_access)  # every read below sees only what the job may read
    volume_set = resolve_volume_set(reader, pcfg.preprocess_version)  # pinned: "newest" is read in the same snapshot
    volumes_version, version = volume_set.volumes_version, volume_set.preprocess_version
    left_out = reader.access_report([*cfg.catalog.datasets, *pcfg.datasets]).line
    where = f"preprocess_version = {sql_literal(version)} AND qc_pass"
    for named in (cfg.catalog.datasets, pcfg.datasets):
        if named:
            where += f" AND {sql_in('dataset', named)}"
    if pcfg.sequences:
        where += f" AND {sql_in('sequence', pcfg.sequences)}"
    meta = reader.select("volumes", where, ["scan_id", "dataset", "subject_id"], version=volumes_version).to_pandas()
    if meta.empty:
        datasets = sorted(set(cfg.catalog.datasets) | set(pcfg.datasets))
        raise UserError(
            f"no QC-passing volumes of preprocess version {version} that this job may read match "
            f"datasets={datasets or 'all'} sequences={pcfg.sequences or 'all'}"
        )
    # The access levels of the scans behind the selection: the model's provenance tag.
    levels = reader.scans(dataset=sorted(meta["dataset"].unique())).to_arrow(["scan_id", "access"]).to_pandas()
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
        left_out=left_out,
        eval_groups={
            str(scan): (str(d), str(subject))
            for scan, d, subject in zip(held["scan_id"], held["dataset"], held["subject_id"], strict=True)
        },
    )


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def pair_dataset(catalog: Catalog, cfg: Config, selection: PretrainSelection, scan_ids: list[str], tag: bool = False):
    """The Ray Dataset of view pairs for ``scan_ids``, streamed from ``volumes`` at the selection's table version.

    The Parquet files are those of the selection's ``preprocess_version`` partition at the pinned Delta version (what
    ``ray.data.read_delta`` reads, plus partition pruning). The driver finds the rows of ``scan_ids`` in them once
    (:func:`work_units`, shaped by :func:`mix_shape`); each pass then maps those units in a fresh random order, each
    read inside its map task (:func:`~brainiac.jobs.pretrain.pairs.read_pairs`). Only numpy pairs leave the task
    (delta-rs' ``string_view`` columns never reach Ray's block serialiser, which rejects them). With ``tag`` each pair
    also carries its volume's :func:`~brainiac.jobs.pretrain.pairs.volume_tag` (``volume``), for :func:`batch_mix`.
    """
    import ray.data

    table = catalog.table("volumes", selection.volumes_version)
    if table is None:  # the selection was read from it
        raise RuntimeError(f"the volumes table at version {selection.volumes_version} vanished")
    files = table.file_uris(file_pruning_predicate=f"preprocess_version = {sql_literal(selection.preprocess_version)}")
    location = catalog.table_location("volumes")
    filesystem = None
    if location.is_remote:
        filesystem = location.pyarrow_filesystem()
        files = [f.split("://", 1)[1] if "://" in f else f for f in files]
    from brainiac.jobs.pretrain.pairs import read_pairs
    from brainiac.platform.config import config_to_dict

    shape = mix_shape(cfg, len(scan_ids))
    # Work units of `volumes` rows drawn at random from every file (pieces of row groups, see work_units): each task
    # cuts pairs of `volumes` rows and hands them out interleaved, so a batch draws from about as many volumes (of
    # many datasets and subjects) as it has pairs; the consumer's shuffle buffer holds only a few blocks and cannot
    # make that mix. The units come from the pinned file list, so no pass lists or sizes the files again (what
    # read_parquet does in a task on every pass, seconds before the first batch). A fresh random order on every pass.
    units = work_units(
        files, set(scan_ids), filesystem, rows_per_unit=shape["volumes"], visits=shape["visits"], seed=cfg.seed
    )
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
    #   emitted at each yield and not sliced (Ray slices blocks above 1.5x the target); crop-only tasks yield blocks of
    #   the same count of pairs.
    # - No per-operator resource reservation: it admitted one map task at the start of every pass and the others
    #   about a second later, and it cost the driver CPU on every scheduling step. This pipeline has a single map
    #   whose CPU share is capped anyway (pretrain.data_cpus through the Train DataConfig's resource limits).
    context = items.context
    size = cfg.model.img_size
    context.target_max_block_size = augmented_block_pairs(size) * view_pair_bytes(size) * 3 // 4
    context.op_resource_reservation_enabled = False
    return items.randomize_block_order().map_batches(
        read_pairs,  # type: ignore[arg-type]  # ray types fn for any batch format; the default one gives it numpy dicts
        fn_kwargs={
            "filesystem": filesystem,
            "size": cfg.model.img_size,
            "patches": config_to_dict(cfg.patches),
            "augment": config_to_dict(cfg.augment) if cfg.augment.device == "data" else None,
            "pairs": shape["pairs"],
            "wave": shape["wave"],
            "tag": tag,
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


def mix_shape(cfg: Config, volumes: int) -> dict[str, int]:
    """How a pass over ``volumes`` selected volumes is cut into map tasks: ``volumes`` per task (their pairs
    interleaved), ``pairs`` cut from each per visit, in waves of ``wave``, and ``visits`` of each volume per pass
    (``visits x pairs`` >= the pairs a volume gives a pass: ``patches_per_volume x`` :func:`rounds_per_decode`).

    A task holds its decoded volumes and one wave's crops, ``volumes x wave`` pairs of at most :data:`MIX_BYTES`
    (fewer volumes per task where a round of ``patches_per_volume`` pairs is large: 96³ views are 3.5 MB a pair).
    Each wave costs a search of the brain mask per volume (``view_pairs``), so waves are as large as that allows.
    A task cuts at most :data:`AUGMENTED_TASK_PAIRS`
    (augmenting) or :data:`CROP_TASK_PAIRS` pairs, so a volume is visited (read and decoded) more than once per pass
    where a small selection cuts many rounds of each.
    """
    per_pass = cfg.patches.patches_per_volume * rounds_per_decode(cfg.patches, volumes)
    pair_bytes = view_pair_bytes(cfg.model.img_size)
    round_pairs = min(per_pass, cfg.patches.patches_per_volume)
    mix = max(1, min(cfg.pretrain.batch_size, MIX_VOLUMES_MAX, volumes, MIX_BYTES // (round_pairs * pair_bytes)))
    task_pairs = AUGMENTED_TASK_PAIRS if cfg.augment.device == "data" else CROP_TASK_PAIRS
    pairs = min(per_pass, max(1, task_pairs // mix))
    visits = math.ceil(per_pass / pairs)
    pairs = math.ceil(per_pass / visits)
    wave = max(1, min(pairs, MIX_BYTES // (mix * pair_bytes)))
    return {"volumes": mix, "pairs": pairs, "wave": wave, "visits": visits}


def work_units(
    files: list[str],
    keep: set[str],
    filesystem: Any = None,
    max_units: int = MAX_UNITS,
    rows_per_unit: int = 1,
    visits: int = 1,
    seed: int = 0,
) -> list[dict[str, list[Any]]]:
    """The map tasks of one pass: ``{"paths": [file, ...], "rows": [position, ...]}`` (one entry per volume), covering
    every row of ``files`` whose ``scan_id`` is in ``keep`` exactly ``visits`` times, at most once per unit, with
    ``rows_per_unit`` rows per unit, or ``ceil(rows x visits / max_units)`` where that is more (the last unit of a visit
    may hold fewer).

    A unit's rows are drawn at random (seeded by ``seed``; each visit draws anew) from all ``files``, in pieces of a
    row group: a piece holds at most ``rows_per_unit /`` :data:`PIECES_PER_UNIT` rows, so a unit mixes several files
    (datasets, subjects) while a row group is read by a few units at most, whatever its size (a one-volume task used to
    read a 16-row group to use one row). The ``scan_id`` column of every file is read once, a few files at a time (on
    ``s3://`` each costs a request).
    """
    import pyarrow.parquet as pq

    from brainiac.jobs.pretrain.pairs import row_group_bounds

    def positions(path: str) -> tuple[list[str], np.ndarray]:
        parquet = pq.ParquetFile(path, filesystem=filesystem)
        return parquet.read(columns=["scan_id"]).column("scan_id").to_pylist(), row_group_bounds(parquet)

    with ThreadPoolExecutor(max_workers=8) as pool:
        columns = list(pool.map(positions, files))
    total = sum(sum(scan in keep for scan in ids) for ids, _ in columns)
    per_unit = max(1, rows_per_unit, math.ceil(total * max(1, visits) / max(1, max_units)))
    piece = max(1, per_unit // PIECES_PER_UNIT)
    pieces: list[tuple[str, list[int]]] = []
    for path, (ids, bounds) in zip(files, columns, strict=True):
        for lo, hi in itertools.pairwise(bounds.tolist()):
            kept = [r for r in range(lo, hi) if ids[r] in keep]
            pieces += [(path, kept[i : i + piece]) for i in range(0, len(kept), piece)]
    units: list[dict[str, list[Any]]] = []
    for visit in range(max(1, visits)):
        paths: list[str] = []
        rows: list[int] = []
        for i in np.random.default_rng([seed, visit]).permutation(len(pieces)).tolist():
            path, left = pieces[i]
            while left:
                room = per_unit - len(rows)
                paths += [path] * len(left[:room])
                rows += left[:room]
                left = left[room:]
                if len(rows) == per_unit:
                    units.append({"paths": paths, "rows": rows})
                    paths, rows = [], []
        if rows:
            units.append({"paths": paths, "rows": rows})
    return units


def spread_subset(groups: dict[str, tuple[str, str]], count: int, seed: int) -> list[str]:
    """``count`` scan ids of ``groups`` (scan id → (dataset, subject)), spread over datasets, then subjects: datasets
    take turns, and within a dataset its subjects take turns, each order fixed by ``seed`` (deterministic)."""

    def order(values: Any) -> list[Any]:
        return sorted(values, key=lambda v: _seed_of(seed, v))

    def turns(queues: list[list[str]]) -> list[str]:
        return [x for row in itertools.zip_longest(*queues) for x in row if x is not None]

    tree: dict[str, dict[str, list[str]]] = {}
    for scan, (dataset, subject) in groups.items():
        tree.setdefault(dataset, {}).setdefault(subject, []).append(scan)
    per_dataset = [turns([order(tree[d][s]) for s in order(tree[d])]) for d in order(tree)]
    return turns(per_dataset)[: max(0, count)]


def eval_pairs(
    catalog: Catalog, cfg: Config, selection: PretrainSelection, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` held-out view pairs (float32, augmented with the MONAI chain under fixed seeds), read in the driver.

    The same pairs score the trained and the randomly initialised encoder, so the comparison is paired.
    """
    from brainiac.models.augment import ViewAugment
    from brainiac.models.patches import view_pairs

    # Only the volumes the pairs come from: one pair per volume up to `count` volumes, spread over datasets and
    # subjects, read by key (the held-out split of a large catalog is tens of GB of arrays).
    groups = selection.eval_groups or {scan: (scan, scan) for scan in selection.eval_ids}
    chosen = spread_subset(groups, min(count, len(groups)), seed)
    rows = catalog.select_keys(
        "volumes",
        "scan_id",
        chosen,
        ARRAY_COLUMNS,
        where=f"preprocess_version = {sql_literal(selection.preprocess_version)}",
        version=selection.volumes_version,
    ).to_pylist()
    if not rows:
        raise UserError(f"none of the {len(chosen)} chosen held-out volumes is in the volumes table")
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


def batch_mix(batches: list[np.ndarray], group: dict[int, tuple[str, str]]) -> dict[str, float]:
    """Mean distinct volumes, subjects and datasets per batch, from each batch's ``volume`` tags
    (:func:`~brainiac.jobs.pretrain.pairs.volume_tag`) and ``group``: tag → (dataset, subject).

    SimCLR's negatives are the other pairs of a batch: a batch of B pairs should come from close to B volumes of many
    subjects and datasets, not from the few volumes one map task read.
    """
    if not batches:
        return {"batches": 0, "volumes": 0.0, "subjects": 0.0, "datasets": 0.0}
    tags = [[int(t) for t in np.asarray(b).tolist()] for b in batches]
    return {
        "batches": len(tags),
        "volumes": float(np.mean([len(set(t)) for t in tags])),
        "subjects": float(np.mean([len({group[v] for v in t}) for t in tags])),
        "datasets": float(np.mean([len({group[v][0] for v in t}) for t in tags])),
    }
