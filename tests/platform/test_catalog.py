"""Catalog queries: SQL over every table, time travel, one-line SQL errors, stats and the overview plot."""

from __future__ import annotations

import json

import pytest

from brainiac.platform.cli.main import main
from brainiac.platform.errors import UserError

pytestmark = pytest.mark.timeout(600)


def test_sql_json_csv_and_as_of(pipeline, capsys):
    uri = pipeline.catalog.uri
    assert main(["catalog", "query", "SELECT dataset, count(*) AS n FROM scans GROUP BY dataset ORDER BY dataset",
                 "--catalog", uri, "--format", "json"]) == 0  # fmt: skip
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.strip().splitlines()]
    readable = pipeline.truth[pipeline.truth["dataset"] != "synth-gbm-dicom"]  # restricted: not for the CLI's defaults
    assert {r["dataset"]: r["n"] for r in rows} == readable.groupby("dataset").size().to_dict()
    assert "left out 1 dataset" in out.err
    assert main(["catalog", "query", "--catalog", uri, "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "dataset,sequence,scans" and len(out) > 5
    # Version 0 is the empty table the first ingest created; time travel sees it empty.
    assert (
        main(["catalog", "query", "SELECT count(*) AS n FROM scans", "--catalog", uri, "--as-of", "0", "-f", "json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["n"] == 0


@pytest.mark.parametrize("sql", ["SELEC nonsense", "SELECT no_such_column FROM scans", "SELECT * FROM no_such_table"])
def test_bad_sql_is_one_line_and_exit_2(pipeline, sql, capsys):
    assert main(["catalog", "query", sql, "--catalog", pipeline.catalog.uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: SQL error") and len(err.splitlines()) == 1


def test_missing_version_is_a_user_error(pipeline):
    with pytest.raises(UserError, match="no version 999"):
        pipeline.catalog.table("scans", 999)


def test_stats_and_overview_plot(pipeline, tmp_path, capsys):
    png = tmp_path / "overview.png"
    assert (
        main(
            [
                "catalog",
                "stats",
                "--catalog",
                pipeline.catalog.uri,
                "--plot",
                str(png),
                "--json",
                "--intensity-sample",
                "1",
            ]
        )
        == 0
    )
    stats = json.loads(capsys.readouterr().out.split("\noverview plot:")[0])
    readable = pipeline.truth[pipeline.truth["dataset"] != "synth-gbm-dicom"]
    assert stats["scans"] == len(readable)
    assert set(stats["fingerprint"]) == set(pipeline.cohort.cohorts.values()) - {"synth-gbm-dicom"}
    assert stats["left_out"].startswith("left out 1 dataset")
    fp = stats["fingerprint"]["synth-brats"]
    assert (
        len(fp["median_spacing_mm"]) == 3 and fp["intensity_percentiles"]["p99.5"] > fp["intensity_percentiles"]["p0.5"]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
