"""Selecting rows by a key array (``Catalog.select_keys``) at sizes where a SQL literal list breaks, and its reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import WriterProperties, write_deltalake

from brainiac.platform.catalog import SCANS_SCHEMA, VOLUMES_SCHEMA, Catalog, sql_in


def _scans(n: int, seed: int = 0) -> pa.Table:
    ids = [f"{i:064x}" for i in np.random.default_rng(seed).permutation(n)]
    cols = {c: pa.nulls(n, SCANS_SCHEMA.field(c).type) for c in SCANS_SCHEMA.names}
    cols["scan_id"] = pa.array(ids)
    cols["dataset"] = pa.array([f"ds{i % 5}" for i in range(n)])
    cols["status"] = pa.array(["current"] * n)
    cols["access"] = pa.array(["open"] * n)
    cols["subject_id"] = pa.array([f"sub{i // 3}" for i in range(n)])
    return pa.table(cols, schema=SCANS_SCHEMA)


@pytest.fixture(scope="module")
def big_scans(tmp_path_factory) -> tuple[Catalog, pa.Table]:
    cat = Catalog.open(str(tmp_path_factory.mktemp("keys") / "catalog"))
    cat.create_if_missing("scans")
    table = _scans(120_000)
    for part in (table.slice(0, 70_000), table.slice(70_000)):  # two commits: several files per partition
        write_deltalake(cat.table_location("scans").uri, part, mode="append")
    return cat, table


def test_sixty_thousand_ids_are_selected_exactly(big_scans):
    cat, table = big_scans
    wanted = table["scan_id"].to_pylist()[::2]  # 60,000 ids: a literal IN list this long kills deltalake's planner
    got = cat.select_keys("scans", "scan_id", wanted, ["scan_id", "subject_id"])
    assert got.num_rows == 60_000 and set(got["scan_id"].to_pylist()) == set(wanted)
    assert got.schema.field("scan_id").type == pa.string()
    by_id = dict(zip(table["scan_id"].to_pylist(), table["subject_id"].to_pylist(), strict=True))
    assert all(
        by_id[s] == sub for s, sub in zip(got["scan_id"].to_pylist(), got["subject_id"].to_pylist(), strict=True)
    )


def test_where_and_partition_columns_combine_with_the_keys(big_scans):
    cat, table = big_scans
    wanted = table["scan_id"].to_pylist()[:30_000]
    got = cat.select_keys("scans", "scan_id", pa.array(wanted), ["scan_id", "dataset"], where="dataset = 'ds3'")
    expected = {s for s, d in zip(wanted, table["dataset"].to_pylist()[:30_000], strict=True) if d == "ds3"}
    assert set(got["scan_id"].to_pylist()) == expected and set(got["dataset"].to_pylist()) == {"ds3"}
    assert cat.select_keys("scans", "scan_id", ["no-such-id"], ["scan_id"]).num_rows == 0
    assert cat.select_keys("quarantine", "source_uri", ["x"], ["source_uri"]).num_rows == 0  # no table yet


def test_sql_in_refuses_lists_that_grow_with_the_data():
    assert sql_in("dataset", ["a", "b"]) == "\"dataset\" IN ('a', 'b')"
    with pytest.raises(ValueError, match="select_keys"):
        sql_in("scan_id", [str(i) for i in range(1000)])


def test_wide_rows_are_read_by_row_group_and_partition(tmp_path, monkeypatch):
    """One key in two preprocess versions: ``where`` picks the partition; only row groups holding a match are read."""
    import pyarrow.parquet as pq

    cat = Catalog.open(str(tmp_path / "catalog"))
    cat.create_if_missing("volumes")
    n = 64
    rows = []
    for version in ("v1", "v2"):
        for i in range(n):
            rows.append(
                {c: None for c in VOLUMES_SCHEMA.names}
                | {"scan_id": f"s{i:03d}", "preprocess_version": version, "whole": bytes([i]) * 1000, "qc_pass": True}
            )
    table = pa.Table.from_pylist(rows, schema=VOLUMES_SCHEMA)
    small_groups = WriterProperties(max_row_group_size=4, write_batch_size=4)  # as the preprocess writer lays them out
    write_deltalake(cat.table_location("volumes").uri, table, mode="append", writer_properties=small_groups)
    assert pq.ParquetFile(next((tmp_path / "catalog" / "volumes").rglob("*.parquet"))).num_row_groups >= 16
    groups_read: list[int] = []
    original = pq.ParquetFile.read_row_groups

    def counting(self, row_groups, *args, **kwargs):
        groups_read.extend(row_groups)
        return original(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counting)
    got = cat.select_keys(
        "volumes", "scan_id", ["s005", "s006", "s040"], ["scan_id", "whole", "preprocess_version"],
        where="preprocess_version = 'v2'",
    )  # fmt: skip
    assert sorted(got["scan_id"].to_pylist()) == ["s005", "s006", "s040"]
    assert set(got["preprocess_version"].to_pylist()) == {"v2"}
    assert {bytes(b)[:1] for b in got["whole"].to_pylist()} == {bytes([5]), bytes([6]), bytes([40])}
    assert len(groups_read) <= 3  # the groups of rows 4-7 and 40-43 (files may split them), never all 16


def test_scan_batches_stream_a_filtered_table(big_scans):
    cat, _ = big_scans
    total = sum(b.num_rows for b in cat.scan_batches("scans", ["scan_id"], where="dataset = 'ds1'"))
    assert total == 24_000


def test_query_limit_reaches_the_scan_and_results_stream(big_scans, capsys):
    from brainiac.platform.cli.main import main

    cat, _ = big_scans
    assert main(["catalog", "query", "SELECT * FROM scans", "--catalog", cat.uri, "-f", "csv", "--limit", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and lines[0].startswith("scan_id,")
    assert main(["catalog", "query", "SELECT scan_id FROM scans", "--catalog", cat.uri]) == 0
    assert "50 rows (the limit" in capsys.readouterr().out
    sql = "SELECT scan_id FROM scans WHERE dataset = 'ds1'"
    assert main(["catalog", "query", sql, "--catalog", cat.uri, "-f", "json"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 24_000  # every batch, one JSON line per row
    assert main(["catalog", "query", "SELECT scan_id FROM scans WHERE FALSE", "--catalog", cat.uri, "-f", "csv"]) == 0
    assert capsys.readouterr().out.strip() == "scan_id"  # an empty result still has its header


def test_optimize_compacts_keeps_row_groups_vacuums_and_checkpoints(tmp_path, capsys):
    import pyarrow.parquet as pq

    from brainiac.platform.cli.main import main

    cat = Catalog.open(str(tmp_path / "catalog"))
    cat.create_if_missing("volumes")
    one_per_group = WriterProperties(max_row_group_size=1, write_batch_size=1)
    for k in range(6):  # six small commits, as a batched writer leaves them
        rows = [
            {c: None for c in VOLUMES_SCHEMA.names}
            | {"scan_id": f"s{k}-{i}", "preprocess_version": "v1", "whole": bytes([k]) * 2000, "qc_pass": True}
            for i in range(3)
        ]
        write_deltalake(
            cat.table_location("volumes").uri,
            pa.Table.from_pylist(rows, schema=VOLUMES_SCHEMA),
            mode="append",
            writer_properties=one_per_group,
        )
    before = cat.table("volumes")
    assert len(before.file_uris()) == 6
    assert main(["catalog", "optimize", "--catalog", cat.uri, "--retain-hours", "0"]) == 0
    out = capsys.readouterr().out
    assert "volumes" in out and "checkpoint" in out
    after = cat.table("volumes")
    files = after.file_uris()
    assert len(files) == 1 and after.version() > before.version()
    assert pq.ParquetFile(files[0]).metadata.num_row_groups == 18  # still one volume per row group
    assert sorted(cat.read("volumes", columns=["scan_id"])["scan_id"].to_pylist()) == sorted(
        f"s{k}-{i}" for k in range(6) for i in range(3)
    )
    on_disk = list((tmp_path / "catalog" / "volumes").glob("preprocess_version=*/*.parquet"))
    assert len(on_disk) == 1  # retention 0: the six compacted files are gone
    assert list((tmp_path / "catalog" / "volumes" / "_delta_log").glob("*.checkpoint.parquet"))
    assert main(["catalog", "optimize", "--catalog", cat.uri, "--table", "nope"]) == 2


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT * FROM scans) TO '/tmp/brainiac-copy-test.csv'",
        "CREATE TABLE x AS SELECT 1",
        "DROP TABLE scans",
        "INSERT INTO scans SELECT * FROM scans",
        "SELECT 1; COPY (SELECT 1) TO '/tmp/brainiac-copy-test.csv'",
        "WITH a AS (SELECT 1) DELETE FROM scans",
        "SET datafusion.execution.batch_size = 1",
    ],
)
def test_catalog_sql_refuses_anything_but_one_query(big_scans, sql, capsys, tmp_path):
    from brainiac.platform.cli.main import main

    cat, _ = big_scans
    assert main(["catalog", "query", sql, "--catalog", cat.uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: SQL error") and len(err.splitlines()) == 1
    assert not Path("/tmp/brainiac-copy-test.csv").exists()


def test_read_only_statement_keeps_quoted_keywords_and_comments():
    from brainiac.platform.catalog import read_only_statement

    sql = "SELECT 'drop; copy' AS \"insert\" FROM scans -- delete\n WHERE dataset = 'a''b';"
    assert read_only_statement(sql) == sql[:-1]
    assert read_only_statement("  with t as (select 1 as x) select x from t").startswith("with")
