"""How mixed the pretraining stream's batches are: distinct volumes and datasets per batch of ``--batch`` pairs.

SimCLR's negatives are the other pairs of a batch; a batch cut from a handful of volumes has near-duplicate negatives.
This bench iterates the real :func:`~brainiac.jobs.pretrain.stream.pair_dataset` (with its ``volume`` tag column) as
the training loop does (``iter_batches(batch_size, drop_last=True, local_shuffle_buffer_size=patches.shuffle_buffer)``)
and prints :func:`~brainiac.jobs.pretrain.stream.batch_mix` of ``--passes`` whole passes (after an untimed warm-up
pass), their pairs/s and the mean wait for a pass's first batch::

    .venv/bin/python bench/stream_mix.py --catalog CATALOG [--batch 16] [--cpus 2] [--set augment.device=data]

A catalog: any catalog preprocessed with ``-c tiny`` (see ``bench/loader.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from brainiac.platform.cluster import configure_ray_environment

configure_ray_environment()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True, help="a catalog preprocessed with -c tiny")
    ap.add_argument("--config", default="pretrain/tiny", help="pretraining config")
    ap.add_argument("--batch", type=int, default=16, help="pairs per batch handed out")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray num_cpus")
    ap.add_argument("--passes", type=int, default=1, help="whole passes measured (after one warm-up pass)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override KEY=VALUE")
    args = ap.parse_args()

    import ray

    from brainiac.jobs.config import load_config
    from brainiac.jobs.pretrain.pairs import volume_tag
    from brainiac.jobs.pretrain.stream import batch_mix, pair_dataset, select_volumes
    from brainiac.platform.catalog import Catalog
    from brainiac.platform.cluster import init_ray

    cfg = load_config(
        args.config, [f"catalog.uri={args.catalog}", f"pretrain.batch_size={args.batch}", *args.overrides]
    )
    catalog = Catalog.open(args.catalog)
    selection = select_volumes(catalog, cfg)
    meta = catalog.select("volumes", None, ["scan_id", "dataset", "subject_id"], version=selection.volumes_version)
    group = {volume_tag(s): (d, u) for s, d, u in zip(*(meta[c].to_pylist() for c in meta.column_names), strict=True)}
    init_ray(dataclasses.replace(cfg.cluster, num_cpus=args.cpus, address="local"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    try:
        dataset = pair_dataset(catalog, cfg, selection, selection.train_ids, tag=True)

        def one_pass():
            return dataset.iter_batches(
                batch_size=args.batch,
                drop_last=True,
                local_shuffle_buffer_size=cfg.patches.shuffle_buffer or None,
                batch_format="numpy",
            )

        for _ in one_pass():  # warm-up: workers start and import
            pass
        started = time.perf_counter()
        volumes, firsts = [], []
        for _ in range(args.passes):
            begun = time.perf_counter()
            for i, batch in enumerate(one_pass()):
                if i == 0:
                    firsts.append(time.perf_counter() - begun)
                volumes.append(batch["volume"])
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    mix = batch_mix(volumes, group)
    print(
        f"{len(selection.train_ids)} train volumes of {len(selection.datasets)} datasets, augment.device="
        f"{cfg.augment.device}, batch {args.batch}, shuffle buffer {cfg.patches.shuffle_buffer}, {args.cpus} CPUs: "
        f"{mix['batches']} batches, distinct volumes per batch {mix['volumes']:.2f}, subjects {mix['subjects']:.2f}, "
        f"datasets {mix['datasets']:.2f}; {mix['batches'] * args.batch / seconds:.1f} pairs/s, first batch of a pass "
        f"after {sum(firsts) / len(firsts):.2f} s"
    )


if __name__ == "__main__":
    main()
