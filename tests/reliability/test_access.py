"""Access levels restrict every read: SQL over every per-scan table, the scan query, the jobs' selections and the CLI.

A small hand-made catalog holds four datasets: ``pub`` (open), ``reg`` (registered), ``hosp`` (restricted) and
``legacy`` (its current rows open, a superseded row restricted: a dataset counts as readable only when every row is).
The preprocess test ingests a tiny synthetic cohort with an open and a restricted dataset and runs the real job.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from brainiac.jobs.config import load_config
from brainiac.platform.catalog import PARTITIONS, SCHEMAS, TABLE_CONFIGURATION, Catalog
from brainiac.platform.cli.main import main
from brainiac.platform.errors import UserError

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
LEVELS = {"pub": "open", "reg": "registered", "hosp": "restricted"}
SIZES = {"pub": 3, "reg": 2, "hosp": 4}
PER_SCAN_TABLES = ("scans", "volumes", "duplicates", "embeddings", "scan_signatures", "quarantine")
OPEN_ONLY = ["--set", "catalog.allowed_access=[open]"]


def _put(cat: Catalog, name: str, rows: list[dict]) -> None:
    cat.create_if_missing(name)
    write_deltalake(
        cat.table_location(name).uri,
        pa.Table.from_pylist(rows, schema=SCHEMAS[name]),
        mode="append",
        partition_by=PARTITIONS.get(name),
        configuration=TABLE_CONFIGURATION,
    )


def _build(root: Path) -> Catalog:
    """Every table that carries rows of a dataset, with rows of all four datasets; splits put the first two subjects
    of a dataset in train and the third in val."""
    cat = Catalog.open(str(root / "catalog"))
    scans = [
        {"scan_id": f"{ds}{i}", "dataset": ds, "access": level, "subject_id": f"{ds}-s{i}", "sequence": "T1w",
         "status": "current", "ingested_at": NOW}
        for ds, level in LEVELS.items()
        for i in range(SIZES[ds])
    ]  # fmt: skip
    scans += [
        {"scan_id": "legacy0", "dataset": "legacy", "access": "open", "subject_id": "legacy-s0", "status": "current"},
        {"scan_id": "legacy-old", "dataset": "legacy", "access": "restricted", "subject_id": "legacy-s0",
         "status": "superseded"},
    ]  # fmt: skip
    current = [s for s in scans if s["status"] == "current"]
    _put(cat, "scans", scans)
    _put(cat, "volumes", [{"scan_id": s["scan_id"], "preprocess_version": "v1", "dataset": s["dataset"],
                           "subject_id": s["subject_id"], "sequence": "T1w", "qc_pass": True,
                           "preprocessed_at": NOW} for s in current])  # fmt: skip
    _put(cat, "splits", [{"subject_id": s["subject_id"], "seed": 0, "group_id": s["subject_id"],
                          "split": "val" if s["scan_id"].endswith("2") else "train"} for s in current])  # fmt: skip
    _put(cat, "duplicates", [{"group_id": "g1", "scan_id": s, "dataset": s[:-1]} for s in ("pub0", "hosp0")])
    _put(cat, "embeddings", [{"scan_id": s["scan_id"], "model": "m/1", "dataset": s["dataset"]} for s in current])
    _put(cat, "scan_signatures", [{"scan_id": s["scan_id"], "dataset": s["dataset"]} for s in current])
    _put(cat, "quarantine", [{"source_uri": f"{ds}/bad.nii", "dataset": ds, "reason": "not_nifti"} for ds in LEVELS])
    _put(cat, "preprocess_configs", [{"preprocess_version": "v1", "config": "{}", "created_at": NOW}])
    return cat


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Catalog:
    """The four-dataset catalog, read-only for the tests of this module that take it."""
    return _build(tmp_path_factory.mktemp("access"))


def _query(cat: Catalog, sql: str, capsys, *extra: str) -> tuple[list[dict], str]:
    assert main(["catalog", "query", sql, "--catalog", cat.uri, "-f", "json", *OPEN_ONLY, *extra]) == 0
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines() if line.strip()], out.err


def test_sql_shows_only_allowed_datasets_in_every_table(mixed, capsys):
    rows, err = _query(mixed, "SELECT count(*) AS n FROM scans", capsys)
    assert rows == [{"n": SIZES["pub"]}]
    assert "left out 3 datasets (8 scans) at access levels registered, restricted: allowed open" in err
    for table in PER_SCAN_TABLES:
        rows, _ = _query(mixed, f"SELECT DISTINCT dataset FROM {table}", capsys)
        assert [r["dataset"] for r in rows] == ["pub"], table
    rows, _ = _query(mixed, "SELECT * FROM volumes", capsys)
    assert sorted(r["scan_id"] for r in rows) == ["pub0", "pub1", "pub2"]
    rows, _ = _query(mixed, "SELECT * FROM duplicates", capsys)
    assert [r["scan_id"] for r in rows] == ["pub0"]  # the group's restricted member stays hidden
    rows, _ = _query(mixed, "SELECT subject_id FROM splits ORDER BY 1", capsys)  # a semi-join on readable scans
    assert [r["subject_id"] for r in rows] == ["pub-s0", "pub-s1", "pub-s2"]
    # No query form reaches the hidden rows: a filter on them, a join, a subquery, time travel to the first append.
    for sql in (
        "SELECT count(*) AS n FROM scans WHERE dataset = 'hosp' OR access = 'restricted'",
        "SELECT count(*) AS n FROM volumes v JOIN scans s ON v.scan_id = s.scan_id WHERE v.dataset <> 'pub'",
        "SELECT count(*) AS n FROM (SELECT scan_id FROM embeddings UNION ALL SELECT scan_id FROM scan_signatures) "
        "WHERE scan_id NOT LIKE 'pub%'",
    ):
        assert _query(mixed, sql, capsys)[0] == [{"n": 0}], sql
    assert _query(mixed, "SELECT count(*) AS n FROM scans", capsys, "--as-of", "1")[0] == [{"n": SIZES["pub"]}]
    assert _query(mixed, "SELECT count(*) AS n FROM preprocess_configs", capsys)[0] == [{"n": 1}]  # no dataset rows
    # The default levels (open, registered) add reg; a catalog opened without levels (writers) sees everything.
    assert main(["catalog", "query", "SELECT count(*) AS n FROM scans", "--catalog", mixed.uri, "-f", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"n": SIZES["pub"] + SIZES["reg"]}
    assert mixed.sql("SELECT count(*) AS n FROM scans").to_pylist() == [{"n": sum(SIZES.values()) + 2}]


def test_scan_query_and_every_read_path_return_only_allowed_rows(mixed):
    rows = mixed.scans(allowed_access=["open", "registered"]).to_pandas(["scan_id", "dataset"])
    assert sorted(set(rows["dataset"])) == ["pub", "reg"] and len(rows) == SIZES["pub"] + SIZES["reg"]
    assert mixed.scans(dataset="hosp", allowed_access=["open"]).to_arrow().num_rows == 0
    reader = mixed.restricted(["open"])
    assert reader.scans().to_arrow(["scan_id"]).num_rows == SIZES["pub"]
    assert set(reader.select("volumes", "qc_pass", ["dataset"])["dataset"].to_pylist()) == {"pub"}
    assert reader.select_keys("volumes", "scan_id", ["pub0", "hosp0", "reg1"], ["scan_id"])["scan_id"].to_pylist() == [
        "pub0"
    ]
    assert sum(b.num_rows for b in reader.scan_batches("embeddings", ["scan_id"])) == SIZES["pub"]
    assert reader.read("splits").num_rows == SIZES["pub"] and mixed.read("splits").num_rows == 10
    assert reader.restricted(["open", "restricted"]).allowed_access == ("open",)  # restricting can only narrow
    report = mixed.scans(allowed_access=["open", "registered"]).access_report()
    assert report.readable == {"pub": 3, "reg": 2}
    assert report.line == "left out 2 datasets (6 scans) at access level restricted: allowed open, registered"


def test_pretrain_selection_reads_allowed_volumes_and_says_what_it_left_out(mixed):
    from brainiac.jobs.pretrain.stream import select_volumes

    cfg = load_config(None, [f"catalog.uri={mixed.uri}"])  # default levels: open, registered
    selection = select_volumes(mixed, cfg)
    assert selection.train_ids == ["pub0", "pub1", "reg0", "reg1"] and selection.eval_ids == ["pub2"]
    assert selection.access_levels == ["open", "registered"]
    assert selection.left_out == "left out 2 datasets (6 scans) at access level restricted: allowed open, registered"
    cfg.catalog.datasets = ["reg", "pub"]  # named: exactly those, nothing reported as left out
    assert select_volumes(mixed, cfg).left_out is None
    cfg.catalog.datasets = ["hosp"]
    with pytest.raises(UserError, match=r"hosp \(restricted\) may not be read.*allowed_access is open, registered"):
        select_volumes(mixed, cfg)


@pytest.mark.parametrize(
    "command", [["preprocess"], ["pretrain"], ["finetune", "--task", "idh"], ["embed", "--model", "models:/x@y"]]
)
def test_naming_a_forbidden_or_unknown_dataset_is_one_line_and_exit_2(mixed, command, capsys):
    for name, expected in (("hosp", "hosp (restricted) may not be read"), ("nope", "unknown dataset nope")):
        assert main([*command, "--catalog", mixed.uri, "--dataset", "pub", "--dataset", name, *OPEN_ONLY]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert err.endswith("(readable datasets: pub)")  # the unknown-name error lists only what the job may read


def test_an_access_change_is_one_update_and_hides_the_dataset_in_old_versions(tmp_path):
    cat = _build(tmp_path)
    reader = cat.restricted(["open", "registered"])
    before = cat.version("scans")
    assert cat.set_access("reg", "restricted") == SIZES["reg"]
    assert cat.version("scans") == before + 1
    assert cat.set_access("reg", "restricted") == 0 and cat.version("scans") == before + 1  # no change, no commit
    assert set(reader.sql("SELECT dataset FROM scans")["dataset"].to_pylist()) == {"pub"}
    assert set(reader.sql("SELECT dataset FROM scans", as_of=before)["dataset"].to_pylist()) == {"pub"}
    assert set(reader.sql("SELECT dataset FROM volumes")["dataset"].to_pylist()) == {"pub"}
    with pytest.raises(ValueError, match="unknown access level"):
        cat.set_access("reg", "secret")


def test_a_reader_that_cannot_open_restricted_files_still_works(tmp_path):
    """What IAM on the per-dataset prefixes does (docs/access.md): the restricted partition's files are unreadable
    (here: not Parquet any more). The levels come from the Delta log and the views prune that partition, so a reader
    of open data never touches them; the unrestricted catalog does, and fails."""
    cat = _build(tmp_path)
    for part in (tmp_path / "catalog" / "scans" / "dataset=hosp").glob("*.parquet"):
        part.write_bytes(b"denied")
    reader = cat.restricted(["open", "registered"])
    assert reader.access_report().left_out == {"hosp": ("restricted", 4), "legacy": ("restricted", 2)}
    assert reader.sql("SELECT count(*) AS n FROM scans").to_pylist() == [{"n": SIZES["pub"] + SIZES["reg"]}]
    assert reader.scans(sequence="T1w").to_arrow(["scan_id"]).num_rows == SIZES["pub"] + SIZES["reg"]
    with pytest.raises(UserError, match="SQL error"):
        cat.sql("SELECT scan_id FROM scans")


def test_the_example_iam_policy_follows_the_layout_and_the_cards(mixed):
    """infra/aws/catalog-access-policy.json grants a role the open and registered datasets' prefixes and denies the
    restricted ones: its prefixes are the ones the catalog writes (``scans/dataset=<name>/``), its names real cards."""
    import re

    from brainiac.ingestion.cards import card_for

    policy = json.loads((Path(__file__).parents[2] / "infra" / "aws" / "catalog-access-policy.json").read_text())
    by_sid = {s["Sid"]: s for s in policy["Statement"]}

    def datasets(sid: str) -> dict[str, str]:
        names = re.findall(r"/catalog/(?:scans/dataset=|raw/)([^/]+)/\*$", "\n".join(by_sid[sid]["Resource"]), re.M)
        assert len(names) == len(by_sid[sid]["Resource"]) and names, sid
        return {n: card_for(n).access for n in names}

    assert set(datasets("ReadOpenDatasets").values()) == {"open"}
    assert set(datasets("ReadRegisteredDatasets").values()) == {"registered"}
    assert set(datasets("NeverRestrictedDatasets").values()) == {"restricted"}
    assert by_sid["NeverRestrictedDatasets"]["Effect"] == "Deny"
    partitions = {p.name for p in (Path(mixed.uri) / "scans").iterdir() if p.name.startswith("dataset=")}
    assert partitions == {f"dataset={d}" for d in [*LEVELS, "legacy"]}  # the prefix the policy names


@pytest.mark.timeout(300)
def test_preprocess_reads_the_allowed_datasets_and_says_what_it_left_out(ray_session, pseudonym_key, tmp_path, capsys):
    from brainiac.ingestion.ingest import ingest
    from brainiac.ingestion.prepare import preprocess
    from brainiac.ingestion.synthetic import generate_cohort

    cohort = generate_cohort(tmp_path / "cohort", subjects=2, seed=3, preset="tiny", cohorts=["adni", "dicom"])
    cfg = load_config("tiny", [f"catalog.uri={tmp_path / 'catalog'}", "catalog.allowed_access=[open, registered]"])
    ingest(cfg, [str(cohort.out_dir / folder) for folder in cohort.cohorts.values()], progress=False)
    cat = Catalog.open(cfg.catalog.uri)
    levels = dict(cat.sql("SELECT DISTINCT dataset, access FROM scans").to_pandas().values.tolist())
    assert levels == {"synth-adni": "open", "synth-gbm-dicom": "restricted"}
    restricted = cat.sql("SELECT count(*) AS n FROM scans WHERE dataset = 'synth-gbm-dicom'")["n"][0].as_py()

    summary = preprocess(cfg, progress=False)
    adni = cat.sql("SELECT count(*) AS n FROM scans WHERE dataset = 'synth-adni' AND sequence <> 'other'")
    assert summary.selected == adni["n"][0].as_py() > 0 and summary.processed == summary.selected
    assert summary.left_out == (
        f"left out 1 dataset ({restricted} scans) at access level restricted: allowed open, registered"
    )
    assert set(cat.read("volumes", columns=["dataset"])["dataset"].to_pylist()) == {"synth-adni"}
    # The command line says it too, before the job runs (here a re-run with nothing left to do).
    argv = ["preprocess", "--catalog", cfg.catalog.uri, "--config", "tiny", "-q"]
    assert main([*argv, "--set", "catalog.allowed_access=[open, registered]"]) == 0
    out = capsys.readouterr().out
    assert summary.left_out in out and "processed 0" in out
