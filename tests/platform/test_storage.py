"""Storage layer: URI normalisation, option sources, secrets, and a real Delta round trip on an S3 API server."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from deltalake import DeltaTable, write_deltalake

from brainiac.platform.errors import UserError
from brainiac.platform.storage import StorageLocation, s3_options_from_env


def test_local_paths_are_absolute_and_join_stays_inside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = StorageLocation.resolve("cat")
    assert loc.uri == str(tmp_path / "cat")
    assert not loc.is_remote and loc.delta_storage_options() is None
    assert loc.join("scans", "part=1").uri == str(tmp_path / "cat" / "scans" / "part=1")
    assert StorageLocation.resolve(f"file://{tmp_path}/x").uri == str(tmp_path / "x")
    with pytest.raises(UserError, match="climbs out"):
        loc.join("../elsewhere")


@pytest.mark.parametrize(
    ("uri", "message"),
    [("", "empty storage URI"), ("gs://bucket/x", "unsupported storage scheme"), ("s3:///nobucket", "has no bucket")],
)
def test_bad_uris_are_user_errors(uri, message):
    with pytest.raises(UserError, match=message):
        StorageLocation.resolve(uri)


def test_s3_options_from_env_and_secrets_never_printed(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    assert s3_options_from_env()["AWS_REGION"] == "eu-west-1"
    loc = StorageLocation.resolve("s3a://bucket/some//prefix/")
    assert loc.uri == "s3://bucket/some/prefix"
    assert loc.path == "bucket/some/prefix" and loc.bucket == "bucket"
    assert loc.options["AWS_ALLOW_HTTP"] == "true"  # derived from the http:// endpoint
    assert "very-secret-value" not in repr(loc) + str(loc) + str(loc.redacted_options())
    assert loc.delta_storage_options()["AWS_SECRET_ACCESS_KEY"] == "very-secret-value"


def test_unknown_storage_option_is_named():
    with pytest.raises(UserError, match="AWS_ENDPOINT"):
        StorageLocation.resolve("s3://b/p", {"AWS_ENDPOINT": "http://x"})


@pytest.mark.timeout(120)
def test_delta_round_trip_on_s3_server_through_all_three_clients(s3_bucket, s3_options):
    """Write a Delta table on the moto S3 server, MERGE into it, time-travel, and read it back with deltalake,
    fsspec (s3fs) and a pyarrow filesystem, all derived from one StorageLocation."""
    loc = StorageLocation.resolve(f"s3://{s3_bucket}/catalog", s3_options).join("scans")
    df = pd.DataFrame({"scan_id": ["a", "b"], "dataset": ["d1", "d1"], "bytes": [10, 20]})
    write_deltalake(loc.uri, df, storage_options=loc.delta_storage_options(), partition_by=["dataset"])
    update = pa.table({"scan_id": ["b", "c"], "dataset": ["d1", "d2"], "bytes": [21, 30]})
    dt = DeltaTable(loc.uri, storage_options=loc.delta_storage_options())
    (
        dt.merge(update, predicate="t.scan_id = s.scan_id", source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )
    latest = DeltaTable(loc.uri, storage_options=loc.delta_storage_options())
    got = latest.to_pandas().sort_values("scan_id").reset_index(drop=True)
    assert got["scan_id"].tolist() == ["a", "b", "c"]
    assert got["bytes"].tolist() == [10, 21, 30]
    assert latest.version() == 1
    v0 = DeltaTable(loc.uri, version=0, storage_options=loc.delta_storage_options()).to_pandas()
    assert sorted(v0["bytes"]) == [10, 20]  # time travel sees the old bytes

    fs = loc.fsspec()
    assert fs.exists(f"{loc.path}/_delta_log/00000000000000000001.json")
    pa_paths = [u[len("s3://") :] for u in latest.file_uris()]
    ds = pads.dataset(pa_paths, format="parquet", filesystem=loc.pyarrow_filesystem())
    assert ds.count_rows() == 3
