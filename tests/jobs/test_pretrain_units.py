"""The pretraining stream's work units: which rows of which ``volumes`` Parquet files each map task reads, and the
reading of just those rows. Plain Parquet files, no Ray: the Ray path is covered end to end in ``test_pretrain.py``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from brainiac.ingestion.volumes import encode_array
from brainiac.jobs.pretrain.pairs import ARRAY_COLUMNS, augmented_block_pairs, crop_pairs, read_pairs, read_rows
from brainiac.jobs.pretrain.stream import rounds_per_decode, work_units
from brainiac.platform.config import config_to_dict, load_config


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


def test_units_cover_each_kept_row_once_within_its_file(tmp_path):
    files, where = _files(tmp_path)
    keep = {s for s in where if not s.endswith(("s1", "s4"))}  # other splits' rows sit in the same files
    units = work_units(files, keep)
    assert all(len(u["rows"]) == 1 for u in units), "a small selection gets one volume per task"
    read = []
    for unit in units:
        table = read_rows(unit["path"], unit["rows"])
        assert table.column_names == ARRAY_COLUMNS
        read += [(unit["path"], scan) for scan in table.column("scan_id").to_pylist()]
    assert sorted(read) == sorted((where[s], s) for s in keep), "every kept row once, read from its own file"

    capped = work_units(files, keep, max_units=4)
    assert max(len(u["rows"]) for u in capped) == 3, "ceil(11 kept rows / 4 units) rows per unit"
    assert sorted((u["path"], r) for u in capped for r in u["rows"]) == sorted(
        (u["path"], r) for u in units for r in u["rows"]
    )
    grouped = work_units(files, keep, rows_per_unit=3)  # what a crop-only stream asks for
    assert [len(u["rows"]) for u in grouped] == [3, 2, 2, 3], "3 rows a unit, never across files"
    assert work_units(files, {"not-there"}) == []


def test_read_rows_returns_the_asked_rows_in_order_across_row_groups(tmp_path):
    files, _ = _files(tmp_path)
    table = read_rows(files[0], [6, 0, 3])  # row groups of 2 rows: groups 3, 0 and 1
    assert table.column("scan_id").to_pylist() == ["f0-s6", "f0-s0", "f0-s3"]
    assert read_rows(files[0], []).num_rows == 0


def test_read_pairs_cuts_only_the_units_rows_and_yields_augmented_blocks(tmp_path, monkeypatch):
    import brainiac.jobs.pretrain.pairs as pairs_module

    assert augmented_block_pairs(32) == 32 and augmented_block_pairs(96) == 1  # 4 MiB of float16 pairs, at least one
    monkeypatch.setattr(pairs_module, "AUGMENTED_BLOCK_BYTES", 16 * 2 * 16**3 * 2)  # blocks of 16 pairs of 16³
    files, _ = _files(tmp_path)
    cfg = load_config("pretrain/tiny", ["model.img_size=16", "patches.patches_per_volume=20", "augment.device=data"])
    crop = {"size": 16, "patches": config_to_dict(cfg.patches), "augment": config_to_dict(cfg.augment), "repeats": 1}
    batch = {"path": np.array([files[0]], dtype=object), "rows": np.array([np.array([2, 5])], dtype=object)}
    blocks = list(read_pairs(batch, **crop))
    # 20 pairs per volume leave as blocks of 16 and 4; two volumes
    assert [len(b["view1"]) for b in blocks] == [16, 4, 16, 4]
    assert all(b["view1"].shape[1:] == (1, 16, 16, 16) and b["view1"].dtype == np.float16 for b in blocks)

    table = read_rows(files[0], [2])
    plain = list(crop_pairs(table, **{**crop, "augment": None}))
    assert [len(b["view1"]) for b in plain] == [20], "without augmentation a round leaves whole"
    assert np.allclose(plain[0]["view1"][plain[0]["view1"] != 0], 2.0), "the crops come from row 2 (filled with 2)"


def test_rounds_per_decode_fills_a_pass_from_a_small_selection():
    from brainiac.models.train_config import PatchConfig

    patches = PatchConfig(patches_per_volume=32, min_pairs_per_pass=4096)
    assert rounds_per_decode(patches, 98) == 2  # 98 x 32 = 3,136 pairs < 4,096: two rounds per decode
    assert rounds_per_decode(patches, 200) == 1 and rounds_per_decode(patches, 1) == 128
