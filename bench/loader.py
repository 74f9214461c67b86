"""View pairs/s of the pretraining data path (Ray Data) next to a MONAI ``Dataset`` + torch ``DataLoader`` doing the
same decode, crop and augment on the same volumes, measured in the same run, as a ratio. Target: Ray / DataLoader
>= 1.0x.

    .venv/bin/python bench/loader.py --catalog CATALOG [--pairs N] [--batch 16] [--cpus N] [--rounds 2]

A catalog: any catalog preprocessed with ``-c tiny`` (32³ views of the tiny config), e.g.::

    export BRAINIAC_PSEUDONYM_KEY=bench-key-0123456789abcdef     # any key of >= 16 characters
    brainiac synth /tmp/lb/cohort --subjects 20 --preset tiny --seed 0
    brainiac ingest /tmp/lb/cohort/synth-* --catalog /tmp/lb/catalog -c tiny
    brainiac preprocess --catalog /tmp/lb/catalog -c tiny

Both sides read the volumes pretraining reads (``select_volumes`` of ``pretrain/tiny``: the train split, newest
preprocess version) and per volume do the same work: decode ``whole`` and ``mask`` (zstd float16 / uint8), cut
``patches.patches_per_volume`` same-location view pairs (:func:`~brainiac.models.patches.view_pairs`) per round, as many
rounds per decode as the stream cuts to fill ``patches.min_pairs_per_pass`` from a small selection, augment each view
with the MONAI chain (:class:`~brainiac.models.augment.ViewAugment`, ``augment.device=data``) and hand out batches of
``--batch`` pairs as torch tensors:

* **Ray Data**: the real :func:`~brainiac.jobs.pretrain.stream.pair_dataset` on a local Ray with ``num_cpus = --cpus``
  (work units of up to ``pretrain.batch_size`` volumes drawn from all the pinned ``volumes`` Parquet files, their
  pairs interleaved, ``pretrain.data_tasks_per_cpu`` map tasks per CPU, each reading its rows in
  ``map_batches(read_pairs)``), iterated as the training loop does:
  ``iter_torch_batches(batch_size, drop_last=True, local_shuffle_buffer_size=patches.shuffle_buffer)``. It reads its
  rows from the Parquet files on every pass.
* **DataLoader**: the same rows read once from the ``volumes`` table into memory, a ``monai.data.Dataset`` whose
  transform decodes, crops and augments one volume into its pairs, ``DataLoader(num_workers = --cpus, shuffle=True,
  persistent_workers=True, batch_size=None)``, re-batched to ``--batch`` pairs in the main process (what
  ``iter_torch_batches`` does for Ray).

Timing: each side first runs one whole untimed warm-up pass (worker processes start and import MONAI; a whole pass,
because a Ray Data pass left unfinished force-cancels its running tasks, which kills their worker processes, so the
next pass would pay the imports again; training finishes its passes). Then a new pass is timed from creating the
iterator until ``--pairs`` pairs have been handed out (default 0: the whole pass, the rate of a training epoch; a
longer count continues into further passes, inside the timing). Beside the rate each side prints the seconds to the
timed pass's first batch and the rate after it: a pipeline that hands out large blocks shows a long first wait and
then pairs it had already made, so the rate after the first batch is delivery, not production. With ``--rounds N``
the sides alternate, the first side alternating too. The headline is the median over rounds of the ratio within a
round: on a shared machine a neighbour's load moves the speed of both sides by up to a third within minutes, so a
ratio of two runs taken minutes apart (or of the best runs of each side) mostly measures that. The best rate of each
side is printed beside it. For reference the Ray pipeline is also timed without augmentation (``augment.device=worker``:
the stream only decodes and crops; the batched augmentation then runs on the training worker, outside this bench).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from brainiac.platform.cluster import configure_ray_environment

configure_ray_environment()

import torch  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# The DataLoader peer


class DecodeCropAugment:
    """MONAI ``Dataset`` transform: one in-memory ``volumes`` row → ``{"view1", "view2"}`` (n, 1, s, s, s) float16.

    The same steps as :func:`brainiac.jobs.pretrain.pairs.crop_pairs` for one row (OS-seeded locations, per-pair seeds
    for the MONAI chain), written out here so that the peer shares no code path with the Ray map beyond the library
    functions both call.
    """

    def __init__(self, size: int, patches: Any, augment: Any, repeats: int = 1) -> None:
        self.size = size
        self.patches = patches
        self.augment_cfg = augment
        self.repeats = repeats
        self._chain = None

    def __call__(self, row: dict[str, Any]) -> dict[str, torch.Tensor]:
        from brainiac.ingestion.volumes import decode_array
        from brainiac.models.augment import ViewAugment
        from brainiac.models.patches import view_pairs

        if self._chain is None:  # built once per DataLoader worker process
            self._chain = ViewAugment(self.augment_cfg)
        rng = np.random.default_rng()
        shape = [int(s) for s in row["whole_shape"]]
        volume = decode_array(row["whole"], shape, row["dtype"] or "float16")
        mask = decode_array(row["mask"], shape, "uint8")
        views = []
        for _ in range(self.repeats):  # the stream's rounds: patches_per_volume pairs each, one decode per volume
            first, second, _ = view_pairs(volume, mask, self.size, self.patches, rng)
            seed = int(rng.integers(2**31 - len(first)))
            views += [self._chain.pair(a, b, seed=seed + i) for i, (a, b) in enumerate(zip(first, second, strict=True))]
        return {
            "view1": torch.from_numpy(np.stack([v[0] for v in views])),
            "view2": torch.from_numpy(np.stack([v[1] for v in views])),
        }


def rebatch(volumes: Iterator[dict[str, torch.Tensor]], batch: int) -> Iterator[dict[str, torch.Tensor]]:
    """Per-volume tensors of pairs → batches of exactly ``batch`` pairs (the remainder of the pass is dropped)."""
    pending: list[dict[str, torch.Tensor]] = []
    have = 0
    for item in volumes:
        pending.append(item)
        have += len(item["view1"])
        while have >= batch:
            joined = {k: torch.cat([p[k] for p in pending]) for k in ("view1", "view2")}
            yield {k: v[:batch] for k, v in joined.items()}
            rest = {k: v[batch:] for k, v in joined.items()}
            have -= batch
            pending = [rest] if have else []


# ----------------------------------------------------------------------------------------------------------------------
# Timing


def timed(make_pass: Callable[[], Iterator[dict[str, torch.Tensor]]], pairs: int) -> dict[str, float]:
    """Hand out ``pairs`` pairs (0: one whole pass) from fresh passes after one whole untimed warm-up pass.

    Returns ``rate`` (pairs/s over the whole timed span), ``first_s`` (seconds from creating the timed pass's iterator
    to its first batch: the per-pass start-up) and ``steady`` (pairs/s after that first batch).
    """
    marks: list[float] = []

    def consume(count: int | None) -> int:
        """``count`` pairs, or one whole pass for ``None``."""
        got = 0
        while count is None or got < count:
            before = got
            for batch in make_pass():
                got += len(batch["view1"])
                marks.append(time.perf_counter())
                if count is not None and got >= count:
                    break
            if got == before:
                raise SystemExit("a pass over the data gave no batch: lower --batch or select more volumes")
            if count is None:
                break
        return got

    consume(None)
    marks.clear()
    started = time.perf_counter()
    got = consume(pairs or None)
    ended = time.perf_counter()
    first = len(marks) and (got / len(marks))  # pairs per batch
    return {
        "rate": got / (ended - started),
        "first_s": marks[0] - started,
        "steady": (got - first) / max(ended - marks[0], 1e-9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True, help="a catalog preprocessed with -c tiny (see above)")
    ap.add_argument("--config", default="pretrain/tiny", help="pretraining config (patch sizes, augmentation)")
    ap.add_argument("--pairs", type=int, default=0, help="timed view pairs per measurement (0: one whole pass)")
    ap.add_argument("--batch", type=int, default=16, help="pairs per batch handed out")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray num_cpus and DataLoader num_workers")
    ap.add_argument("--rounds", type=int, default=1, help="alternating DataLoader/Ray rounds; headline: median ratio")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override KEY=VALUE")
    args = ap.parse_args()
    started = time.perf_counter()

    import ray
    from monai.data import Dataset
    from torch.utils.data import DataLoader

    from brainiac.jobs.config import load_config
    from brainiac.jobs.pretrain.stream import ARRAY_COLUMNS, pair_dataset, rounds_per_decode, select_volumes
    from brainiac.platform.catalog import Catalog, sql_literal
    from brainiac.platform.cluster import init_ray

    base = [f"catalog.uri={args.catalog}", *args.overrides]
    cfg = load_config(args.config, [*base, "augment.device=data"])
    cfg_crop = load_config(args.config, [*base, "augment.device=worker"])
    catalog = Catalog.open(args.catalog)
    selection = select_volumes(catalog, cfg)
    ids = selection.train_ids
    rows = catalog.select_keys(
        "volumes",
        "scan_id",
        ids,
        ARRAY_COLUMNS,
        where=f"preprocess_version = {sql_literal(selection.preprocess_version)}",
        version=selection.volumes_version,
    ).to_pylist()
    # the stream cuts several rounds of patches_per_volume pairs per decode when the selection is small; the peer cuts
    # the same rounds, so both do the same work per volume
    repeats = rounds_per_decode(cfg.patches, len(ids))
    per_volume = cfg.patches.patches_per_volume * repeats
    size = cfg.model.img_size
    mb = sum(len(r["whole"]) + len(r["mask"]) for r in rows) / len(rows) / 1e6
    print(
        f"{len(rows)} train volumes of {args.catalog} (preprocess {selection.preprocess_version}), "
        f"{mb:.2f} MB compressed each, {per_volume} pairs of {size}³ per volume ({repeats} rounds; {len(rows) * per_volume} per pass); "
        f"{args.cpus} CPUs, batch {args.batch}, {args.pairs or 'one pass of'} timed pairs after a whole warm-up pass, "
        f"{args.rounds} alternating rounds",
        flush=True,
    )

    init_ray(dataclasses.replace(cfg.cluster, num_cpus=args.cpus, address="local"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    shuffle = cfg.patches.shuffle_buffer or None

    def ray_pass(conf) -> Callable[[], Iterator[dict[str, torch.Tensor]]]:
        dataset = pair_dataset(catalog, conf, selection, ids)
        return lambda: dataset.iter_torch_batches(
            batch_size=args.batch, drop_last=True, local_shuffle_buffer_size=shuffle
        )

    dataset = Dataset(data=rows, transform=DecodeCropAugment(size, cfg.patches, cfg.augment, repeats))
    loader = DataLoader(dataset, batch_size=None, shuffle=True, num_workers=args.cpus, persistent_workers=True)

    passes = {"loader": lambda: rebatch(iter(loader), args.batch), "ray": ray_pass(cfg)}
    runs: dict[str, list[dict[str, float]]] = {"loader": [], "ray": [], "ray_crop": []}
    try:
        for r in range(args.rounds):
            for side in ("loader", "ray") if r % 2 == 0 else ("ray", "loader"):  # neither side always runs first
                runs[side].append(timed(passes[side], args.pairs))
            runs["ray_crop"].append(timed(ray_pass(cfg_crop), args.pairs))
            print(
                f"  round {r + 1}: DataLoader {runs['loader'][-1]['rate']:.1f}, "
                f"Ray Data {runs['ray'][-1]['rate']:.1f}, "
                f"Ray Data without augmentation {runs['ray_crop'][-1]['rate']:.1f} pairs/s",
                flush=True,
            )
    finally:
        ray.shutdown()
    loader_run, ray_run, crop_run = (max(runs[k], key=lambda m: m["rate"]) for k in ("loader", "ray", "ray_crop"))
    paired = [r["rate"] / d["rate"] for r, d in zip(runs["ray"], runs["loader"], strict=True)]
    ratio = float(np.median(paired))
    verdict = "meets" if ratio >= 1.0 else "BELOW"

    def detail(m: dict[str, float]) -> str:
        return f"{m['rate']:8.1f} pairs/s  (first batch after {m['first_s']:.1f} s, then {m['steady']:.1f} pairs/s)"

    rows_out = [
        (f"MONAI Dataset + DataLoader ({args.cpus} workers), decode+crop+augment", detail(loader_run)),
        (f"Ray Data pair_dataset ({args.cpus} CPUs), decode+crop+augment", detail(ray_run)),
        (
            f"ratio Ray Data / DataLoader, median of {len(paired)} rounds",
            f"{ratio:8.2f}x  ({verdict} the 1.0x target)",
        ),
        ("ratio within each round, in order", ", ".join(f"{x:.2f}x" for x in paired)),
        ("ratio of the best rates (taken minutes apart)", f"{ray_run['rate'] / loader_run['rate']:8.2f}x"),
        ("Ray Data, decode+crop only (augment.device=worker), reference", detail(crop_run)),
        ("wall time", f"{time.perf_counter() - started:8.0f} s"),
    ]
    print()
    for name, value in rows_out:
        print(f"{name:<66}: {value}")


if __name__ == "__main__":
    main()
