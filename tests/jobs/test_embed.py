"""``brainiac embed`` writes one encoder vector per QC-passing volume into the ``embeddings`` Delta table, idempotently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainiac.ingestion.volumes import decode_array
from brainiac.jobs.embed import embed
from brainiac.models.export import load_encoder


@pytest.mark.timeout(900)
def test_embed_writes_each_volume_once_with_the_encoders_features(pipeline):
    uri = f"sqlite:///{pipeline.root / 'mlflow.db'}"
    ref = pipeline.encoder.model_uri
    cfg = pipeline.pretrain_config()
    first = embed(cfg, ref, progress=False)
    version = pipeline.volumes.preprocess_version  # other tests add newer, partial versions to this catalog
    volumes = pipeline.catalog.select("volumes", f"qc_pass AND preprocess_version = '{version}'", ["scan_id"]).num_rows
    assert first.preprocess_version == version
    assert first.selected == volumes and first.written == volumes and first.dim == 48
    assert first.model.startswith("brainiac-encoder/")  # a version, not the moving alias
    again = embed(cfg, ref, progress=False)
    assert again.written == 0 and again.embeddings_version == first.embeddings_version
    rows = pipeline.catalog.sql("SELECT scan_id, model, vector FROM embeddings").to_pylist()
    assert len(rows) == volumes and len({r["scan_id"] for r in rows}) == volumes
    # The stored vector is the encoder's feature vector of that volume's fixed cube.
    encoder, _ = load_encoder(ref, tracking_uri=uri)
    volume = pipeline.catalog.select(
        "volumes",
        f"scan_id = '{rows[0]['scan_id']}' AND preprocess_version = '{version}'",
        ["fixed", "fixed_shape", "dtype"],
    )
    v = volume.to_pylist()[0]
    x = torch.from_numpy(decode_array(v["fixed"], v["fixed_shape"], v["dtype"]).astype(np.float32))[None, None]
    with torch.no_grad():
        expected = encoder.eval()(x)[0].numpy()
    np.testing.assert_allclose(np.asarray(rows[0]["vector"]), expected, rtol=1e-4, atol=1e-5)
