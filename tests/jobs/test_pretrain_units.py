"""The pretraining stream's work units: which rows of which ``volumes`` Parquet files each map task reads, and the
reading of just those rows, how mixed the stream's batches are, and the held-out pairs read by key. Plain Parquet files
and small Delta tables; the Ray path end to end is in ``test_pretrain.py``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brainiac.ingestion.volumes import encode_array
from brainiac.jobs.config import load_config
from brainiac.jobs.pretrain.pairs import (
    ARRAY_COLUMNS,
    augmented_block_pairs,
    crop_pairs,
    read_pairs,
    read_rows,
    volume_tag,
)
from brainiac.jobs.pretrain.stream import rounds_per_decode, spread_subset, work_units
from brainiac.platform.config import config_to_dict


def _volumes_file(path, scan_ids: list[str], row_group_size: int, shape=(24, 24, 24)) -> None:
    """A ``volumes``-like Parquet file: each volume filled with its own index, so a read row names itself."""
    wholes, masks = [], []
    for i, _ in enumerate(scan_ids):
        wholes.append(encode_array(np.full(shape, float(i), dtype=np.float16)))
        masks.append(encode_array(np.ones(shape, dtype=np.uint8)))
    table = pa.table(
        {
            "scan_id": scan_ids,
            "whole": wholes,
            "whole_shape": [list(shape)] * len(scan_ids),
            "mask": masks,
            "dtype": ["float16"] * len(scan_ids),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


def _files(tmp_path) -> tuple[list[str], dict[str, str]]:
    files, where = [], {}
    for f, count in enumerate([7, 3, 5]):
        ids = [f"f{f}-s{i}" for i in range(count)]
        path = str(tmp_path / f"part-{f}.parquet")
        _volumes_file(path, ids, row_group_size=2)
        files.append(path)
        where.update({scan: path for scan in ids})
    return files, where


def _unit_rows(unit) -> list[tuple[str, int]]:
    return list(zip(unit["paths"], unit["rows"], strict=True))


def test_units_cover_each_kept_row_once_drawn_across_files(tmp_path):
    files, where = _files(tmp_path)
    keep = {s for s in where if not s.endswith(("s1", "s4"))}  # other splits' rows sit in the same files
    units = work_units(files, keep)
    assert all(len(u["rows"]) == 1 for u in units), "rows_per_unit=1: one volume per task"
    read = []
    for unit in units:
        for path, row in _unit_rows(unit):
            table = read_rows(path, [row])
            assert table.column_names == ARRAY_COLUMNS
            read += [(path, scan) for scan in table.column("scan_id").to_pylist()]
    assert sorted(read) == sorted((where[s], s) for s in keep), "every kept row once, read from its own file"

    capped = work_units(files, keep, max_units=4)
    assert max(len(u["rows"]) for u in capped) == 3, "ceil(11 kept rows / 4 units) rows per unit"
    everything = sorted(r for u in units for r in _unit_rows(u))
    assert sorted(r for u in capped for r in _unit_rows(u)) == everything
    grouped = work_units(files, keep, rows_per_unit=4, seed=3)
    assert sorted(len(u["rows"]) for u in grouped) == [2, 4, 4], "10 rows: 4 a unit, the last of a visit fewer"
    assert max(len(set(u["paths"])) for u in grouped) > 1, "a unit draws from several files"
    assert grouped == work_units(files, keep, rows_per_unit=4, seed=3), "deterministic for a seed"
    twice = work_units(files, keep, rows_per_unit=4, visits=2)
    assert sorted(r for u in twice for r in _unit_rows(u)) == sorted(everything * 2), "each row once per visit"
    assert all(len(set(_unit_rows(u))) == len(u["rows"]) for u in twice), "never twice in one unit"
    assert work_units(files, {"not-there"}) == []


def test_units_mix_many_files_and_read_large_row_groups_a_few_times(tmp_path):
    """Files of one 16-row group each (one commit: one dataset): a unit of 16 volumes takes pieces of 4 rows of
    several files, and a row group is read by a few units, not once per volume (16x the bytes it uses)."""
    files = []
    for f in range(8):
        path = str(tmp_path / f"rg-{f}.parquet")
        _volumes_file(path, [f"d{f}-s{i}" for i in range(16)], row_group_size=16, shape=(4, 4, 4))
        files.append(path)
    keep = {f"d{f}-s{i}" for f in range(8) for i in range(16) if i % 3}  # 10 of 16 rows of each group kept
    units = work_units(files, keep, rows_per_unit=16)
    assert all(len(set(u["paths"])) >= 3 for u in units[:-1]), [sorted(set(u["paths"])) for u in units]
    group_reads = sum(len(set(u["paths"])) for u in units)  # one 16-row group per file
    assert group_reads * 16 <= 5 * len(keep), "about 4x the rows used are read (pieces of 4), not 16x (one a unit)"
    single = work_units(files, keep, rows_per_unit=1)
    assert len(single) == len(keep)


def test_spread_subset_takes_datasets_then_subjects_in_turn():
    groups = {f"{d}-{s}-{k}": (d, f"{d}-{s}") for d in "abc" for s in range(4) for k in range(5)}
    groups.update({f"z-0-{k}": ("z", "z-0") for k in range(30)})  # one subject with many scans
    chosen = spread_subset(groups, 8, seed=1)
    assert len(chosen) == 8 and chosen == spread_subset(groups, 8, seed=1)
    assert len({groups[c][0] for c in chosen}) == 4, "every dataset"
    assert len({groups[c][1] for c in chosen}) >= 7, "no subject twice before the datasets' other subjects"
    assert len(spread_subset(groups, 1000, seed=1)) == len(groups)


def test_read_rows_returns_the_asked_rows_in_order_across_row_groups(tmp_path):
    files, _ = _files(tmp_path)
    table = read_rows(files[0], [6, 0, 3])  # row groups of 2 rows: groups 3, 0 and 1
    assert table.column("scan_id").to_pylist() == ["f0-s6", "f0-s0", "f0-s3"]
    assert read_rows(files[0], []).num_rows == 0


def test_read_pairs_interleaves_the_units_volumes_and_yields_augmented_blocks(tmp_path, monkeypatch):
    import brainiac.jobs.pretrain.pairs as pairs_module

    assert augmented_block_pairs(32) == 32 and augmented_block_pairs(96) == 1  # 4 MiB of float16 pairs, at least one
    monkeypatch.setattr(pairs_module, "AUGMENTED_BLOCK_BYTES", 16 * 2 * 16**3 * 2)  # blocks of 16 pairs of 16³
    files, _ = _files(tmp_path)
    cfg = load_config("pretrain/tiny", ["model.img_size=16", "patches.patches_per_volume=20", "augment.device=data"])
    crop = {"size": 16, "patches": config_to_dict(cfg.patches), "augment": config_to_dict(cfg.augment), "pairs": 10}
    paths = [files[0], files[2], files[0], files[1]]
    rows = [2, 4, 5, 0]
    batch = {"paths": np.array([np.array(paths, dtype=object)], dtype=object), "rows": np.array([np.array(rows)])}
    blocks = list(read_pairs(batch, **crop, tag=True))
    # 4 volumes x 10 pairs leave as blocks of 16, 16 and 8
    assert [len(b["view1"]) for b in blocks] == [16, 16, 8]
    assert all(b["view1"].shape[1:] == (1, 16, 16, 16) and b["view1"].dtype == np.float16 for b in blocks)
    tags = np.concatenate([b["volume"] for b in blocks])
    scans = {volume_tag(s): s for s in ["f0-s2", "f2-s4", "f0-s5", "f1-s0"]}
    assert {scans[t] for t in tags} == set(scans.values()) and all(np.sum(tags == t) == 10 for t in scans)
    assert all(len(set(tags[i : i + 4].tolist())) == 4 for i in range(0, 40, 4)), "every 4 pairs: 4 volumes"

    table = read_rows(files[0], [2, 5])
    plain = list(crop_pairs(table, **{**crop, "augment": None}))
    assert [len(b["view1"]) for b in plain] == [16, 4] and "volume" not in plain[0]
    first = plain[0]["view1"][:2].reshape(2, -1)
    values = sorted(float(v[v != 0][0]) for v in first)
    assert values == [2.0, 5.0], "the first two pairs come from the two rows (filled with 2 and 5)"


def test_rounds_per_decode_fills_a_pass_from_a_small_selection():
    from brainiac.models.train_config import PatchConfig

    patches = PatchConfig(patches_per_volume=32, min_pairs_per_pass=4096)
    assert rounds_per_decode(patches, 98) == 2  # 98 x 32 = 3,136 pairs < 4,096: two rounds per decode
    assert rounds_per_decode(patches, 200) == 1 and rounds_per_decode(patches, 1) == 128


def _volumes_catalog(append_volumes, root, datasets: int = 4, subjects: int = 3, scans: int = 2, shape=(24, 24, 24)):
    """A catalog whose ``volumes`` table holds one commit (one file, one 16-row group) per dataset, each volume filled
    with its own index + 1; returns the catalog and scan id → (dataset, subject)."""
    catalog, groups = None, {}
    for d in range(datasets):
        rows = []
        for s in range(subjects):
            for k in range(scans):
                scan = f"ds{d}-sub{s}-{k}"
                fill = np.full(shape, len(groups) + 1, dtype=np.float16)
                groups[scan] = (f"ds{d}", f"ds{d}-sub{s}")
                rows.append(
                    {"scan_id": scan, "preprocess_version": "v1", "dataset": f"ds{d}", "subject_id": f"ds{d}-sub{s}",
                     "sequence": "T1w", "whole": encode_array(fill), "whole_shape": list(shape),
                     "mask": encode_array(np.ones(shape, dtype=np.uint8)), "fixed": encode_array(fill[:8, :8, :8]),
                     "fixed_shape": [8, 8, 8], "dtype": "float16", "qc_pass": True}
                )  # fmt: skip
        catalog = append_volumes(root, rows, 16)
    return catalog, groups


def test_eval_pairs_reads_only_the_volumes_it_cuts_spread_over_datasets(tmp_path, monkeypatch, append_volumes):
    from brainiac.jobs.pretrain.stream import PretrainSelection, eval_pairs
    from brainiac.platform.catalog import Catalog

    catalog, groups = _volumes_catalog(append_volumes, tmp_path, datasets=3, subjects=4, scans=3)  # 36 held-out volumes
    cfg = load_config("pretrain/tiny", ["model.img_size=16"])
    selection = PretrainSelection("v1", catalog.version("volumes"), [], sorted(groups), eval_groups=groups)
    read: list[str] = []

    def spying(original):
        def spy(self, *args, **kwargs):
            table = original(self, *args, **kwargs)
            if "whole" in table.column_names:
                read.extend(table.column("scan_id").to_pylist())
            return table

        return spy

    for name in ("select", "select_keys"):
        monkeypatch.setattr(Catalog, name, spying(getattr(Catalog, name)))
    first, second = eval_pairs(catalog, cfg, selection, count=6, seed=1)
    assert first.shape == second.shape == (6, 1, 16, 16, 16) and first.dtype == np.float32
    assert len(read) == 6, f"six volumes' arrays read for six pairs, not the 36 held out: {len(read)}"
    assert len({groups[s][0] for s in read}) == 3 and len({groups[s][1] for s in read}) == 6, "spread"
    again, _ = eval_pairs(catalog, cfg, selection, count=6, seed=1)
    np.testing.assert_array_equal(first, again)  # the same pairs score both encoders


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_stream_batches_draw_from_many_volumes_and_datasets(tmp_path, ray_session, append_volumes):
    """A batch of 8 pairs draws from at least 4 volumes of several datasets (before: units of one file, a volume's
    pairs in a row: about 2 volumes of one dataset per batch)."""
    from brainiac.jobs.pretrain.stream import PretrainSelection, batch_mix, pair_dataset

    catalog, groups = _volumes_catalog(append_volumes, tmp_path)  # 4 datasets x 6 volumes
    cfg = load_config(
        "pretrain/tiny",
        [f"catalog.uri={tmp_path / 'catalog'}", "model.img_size=16", "patches.patches_per_volume=4",
         "patches.min_pairs_per_pass=1", "patches.shuffle_buffer=16", "pretrain.batch_size=8"],
    )  # fmt: skip
    selection = PretrainSelection("v1", catalog.version("volumes"), sorted(groups), [])
    dataset = pair_dataset(catalog, cfg, selection, selection.train_ids, tag=True)
    batches = [
        b["volume"]
        for b in dataset.iter_batches(batch_size=8, drop_last=True, local_shuffle_buffer_size=16, batch_format="numpy")
    ]
    mix = batch_mix(batches, {volume_tag(s): g for s, g in groups.items()})
    assert mix["batches"] == 24 * 4 // 8
    assert mix["volumes"] >= 0.5 * 8 and mix["datasets"] >= 2, mix


def test_mix_shape_interleaves_a_batch_of_volumes_within_a_memory_bound():
    from brainiac.jobs.pretrain.pairs import view_pair_bytes
    from brainiac.jobs.pretrain.stream import MIX_BYTES, mix_shape

    tiny = mix_shape(load_config("pretrain/tiny"), 28)  # 28 volumes x 32 pairs < 4,096: 5 rounds, 160 pairs a pass
    assert tiny["volumes"] == 16 and tiny["visits"] * tiny["pairs"] >= 160 and tiny["wave"] <= tiny["pairs"]
    augmenting = mix_shape(load_config("pretrain/tiny", ["augment.device=data"]), 28)
    assert augmenting["volumes"] * augmenting["pairs"] <= 256, "augmenting tasks stay short"
    big = mix_shape(load_config("pretrain/vit-b"), 41_000)  # 96³ views, 16 pairs a volume, batch 64
    assert big["visits"] == 1, "a large selection reads each volume once a pass"
    assert big["volumes"] * big["wave"] * view_pair_bytes(96) <= MIX_BYTES and big["volumes"] >= 2
