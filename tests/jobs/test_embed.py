"""``brainiac embed`` writes one encoder vector per QC-passing volume into the ``embeddings`` Delta table, idempotently,
appending as it goes and resuming after a crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainiac.ingestion.volumes import decode_array
from brainiac.jobs.embed import embed
from brainiac.models.export import load_encoder


@pytest.fixture(scope="module")
def own_pipeline(fork_pipeline):
    """A copy of the pipeline's catalog, to write ``embeddings`` into; the encoder is read from the pipeline's registry."""
    return fork_pipeline("embed", "encoder", tracking=False)


@pytest.mark.timeout(900)
def test_embed_writes_each_volume_once_with_the_encoders_features(own_pipeline):
    uri = own_pipeline.tracking_uri
    ref = own_pipeline.encoder.model_uri
    cfg = own_pipeline.pretrain_config()
    first = embed(cfg, ref, progress=False)
    version = own_pipeline.volumes.preprocess_version
    volumes = own_pipeline.catalog.select(
        "volumes", f"qc_pass AND preprocess_version = '{version}'", ["scan_id"]
    ).num_rows
    assert first.preprocess_version == version
    assert first.selected == volumes and first.written == volumes and first.dim == 48
    assert first.model.startswith("brainiac-encoder/")  # a version, not the moving alias
    again = embed(cfg, ref, progress=False)
    assert again.written == 0 and again.embeddings_version == first.embeddings_version
    rows = own_pipeline.catalog.sql("SELECT scan_id, model, vector FROM embeddings").to_pylist()
    assert len(rows) == volumes and len({r["scan_id"] for r in rows}) == volumes
    # The stored vector is the encoder's feature vector of that volume's fixed cube.
    encoder, _ = load_encoder(ref, tracking_uri=uri)
    volume = own_pipeline.catalog.select(
        "volumes",
        f"scan_id = '{rows[0]['scan_id']}' AND preprocess_version = '{version}'",
        ["fixed", "fixed_shape", "dtype"],
    )
    v = volume.to_pylist()[0]
    x = torch.from_numpy(decode_array(v["fixed"], v["fixed_shape"], v["dtype"]).astype(np.float32))[None, None]
    with torch.no_grad():
        expected = encoder.eval()(x)[0].numpy()
    np.testing.assert_allclose(np.asarray(rows[0]["vector"]), expected, rtol=1e-4, atol=1e-5)


def _volumes(append_volumes, root, datasets: int = 3, per_dataset: int = 7) -> list[str]:
    """A catalog whose ``volumes`` table holds one commit (one file, row groups of 4) per dataset; a volume's fixed cube
    is filled with its index + 1, and every fifth volume fails QC. Returns the QC-passing scan ids."""
    from brainiac.ingestion.volumes import encode_array

    passing, index = [], 0
    for d in range(datasets):
        rows = []
        for _ in range(per_dataset):
            scan, index = f"scan-{index:03d}", index + 1
            qc = index % 5 != 0
            passing += [scan] if qc else []
            rows.append(
                {"scan_id": scan, "preprocess_version": "v1", "dataset": f"ds{d}", "subject_id": f"sub-{index // 2}",
                 "sequence": "T1w", "fixed": encode_array(np.full((8, 8, 8), index, dtype=np.float16)),
                 "fixed_shape": [8, 8, 8], "dtype": "float16", "qc_pass": qc}
            )  # fmt: skip
        append_volumes(root, rows, 4)
    _open_scans(root, [f"scan-{i:03d}" for i in range(index)], [f"ds{i // per_dataset}" for i in range(index)])
    return passing


def _open_scans(root, scan_ids: list[str], datasets: list[str]) -> None:
    """``scans`` rows (access ``open``) for the volumes: readers judge a dataset's access level by its scans."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from brainiac.platform.catalog import SCANS_SCHEMA, TABLE_CONFIGURATION

    n = len(scan_ids)
    cols = {c: pa.nulls(n, SCANS_SCHEMA.field(c).type) for c in SCANS_SCHEMA.names}
    cols.update(scan_id=pa.array(scan_ids), dataset=pa.array(datasets), access=pa.array(["open"] * n),
                status=pa.array(["current"] * n))  # fmt: skip
    write_deltalake(str(root / "catalog" / "scans"), pa.table(cols, schema=SCANS_SCHEMA), mode="append",
                    partition_by=["dataset"], configuration=TABLE_CONFIGURATION)  # fmt: skip


class _MeanEncoder(torch.nn.Module):
    """A stand-in encoder: (mean, max) of the cube; raises on call ``fail_at`` (a crash mid-run)."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("worker lost")
        return torch.stack([x.mean(dim=(1, 2, 3, 4)), x.amax(dim=(1, 2, 3, 4))], dim=1)


def test_embed_appends_as_it_goes_keeps_committed_batches_after_a_crash_and_resumes(
    tmp_path, monkeypatch, append_volumes
):
    import types

    import brainiac.jobs.pretrain.pairs as pairs_module
    import brainiac.models.export as export
    from brainiac.jobs.config import load_config
    from brainiac.platform.catalog import Catalog

    passing = _volumes(append_volumes, tmp_path)  # 21 volumes, 17 pass QC
    cfg = load_config(
        "tiny",
        [f"catalog.uri={tmp_path / 'catalog'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
         "patches.preprocess_version=v1"],
    )  # fmt: skip
    encoder = _MeanEncoder(fail_at=4)
    monkeypatch.setattr(
        export, "load_encoder", lambda ref, tracking_uri=None: (encoder, types.SimpleNamespace(img_size=8))
    )
    selects: list[str] = []
    original_select = Catalog.select
    monkeypatch.setattr(
        Catalog, "select", lambda self, name, *a, **k: selects.append(name) or original_select(self, name, *a, **k)
    )
    reads: list[set[tuple[str, int]]] = []  # the row groups (of 4 rows) of each read
    original_read_rows = pairs_module.read_rows

    def read_rows(path, rows, filesystem=None, columns=None):
        reads.append({(path, r // 4) for r in rows})
        return original_read_rows(path, rows, filesystem, columns)

    monkeypatch.setattr(pairs_module, "read_rows", read_rows)
    model = str(tmp_path / "encoder")
    with pytest.raises(RuntimeError, match="worker lost"):
        embed(cfg, model, batch_size=4, progress=False, commit_rows=8)
    catalog = Catalog.open(cfg.catalog.uri)
    kept = catalog.read("embeddings", columns=["scan_id"]).column("scan_id").to_pylist()
    assert len(kept) == 8, "the first two batches (8 vectors) were committed; the third was pending at the crash"
    assert selects.count("volumes") == 1, "the volumes rows are found once, not read again for each batch"

    encoder.fail_at, reads[:] = None, []
    rest = embed(cfg, model, batch_size=4, progress=False, commit_rows=8)
    assert rest.selected == 17 and rest.written == 17 - 8 and rest.dim == 2
    assert sum(map(len, reads)) == len(set().union(*reads)), "each row group read once per run"
    rows = catalog.read("embeddings", columns=["scan_id", "model", "vector", "preprocess_version"]).to_pylist()
    assert sorted(r["scan_id"] for r in rows) == sorted(passing), "each QC-passing volume once"
    assert {r["model"] for r in rows} == {model} and {r["preprocess_version"] for r in rows} == {"v1"}
    for r in rows:  # the vector of the scan's own cube (filled with its index + 1)
        value = int(r["scan_id"].split("-")[1]) + 1
        assert r["vector"] == pytest.approx([value, value])
    assert rest.embeddings_version == catalog.version("embeddings") and rest.embeddings_version >= 3
    again = embed(cfg, model, batch_size=4, progress=False, commit_rows=8)
    assert again.written == 0 and again.embeddings_version == rest.embeddings_version
