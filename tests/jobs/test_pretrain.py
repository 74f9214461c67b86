"""Pretraining end to end on the tiny pipeline: Ray Data stream → 2 Ray Train CPU workers → checkpoints, MLflow run,
registered encoder, held-out retrieval above a random encoder; fault injection and resume; the same job on a
multi-node Ray cluster; the CLI's error contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from brainiac.jobs.pretrain.run import pretrain
from brainiac.models.export import load_encoder

HERE = Path(__file__).parent


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float, int]]:
    """(step, value, timestamp) of one metric, in logging order."""
    points = mlflow.MlflowClient(uri, registry_uri=uri).get_metric_history(run_id, key)
    return sorted(((m.step, m.value, m.timestamp) for m in points), key=lambda p: (p[2], p[0]))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_stream_settings_live_on_its_own_data_context(pipeline, ray_session):
    """The stream's block size and its switched-off operator reservation apply to its dataset, not to every dataset
    of the process (other jobs in the same driver keep Ray Data's defaults)."""
    import ray

    from brainiac.jobs.pretrain.pairs import augmented_block_pairs
    from brainiac.jobs.pretrain.stream import pair_dataset, select_volumes

    cfg = pipeline.pretrain_config()
    selection = select_volumes(pipeline.catalog, cfg)
    process_wide = ray.data.DataContext.get_current()
    before = (process_wide.target_max_block_size, process_wide.op_resource_reservation_enabled)
    dataset = pair_dataset(pipeline.catalog, cfg, selection, selection.train_ids)
    size = cfg.model.img_size
    assert dataset.context.op_resource_reservation_enabled is False
    assert dataset.context.target_max_block_size == augmented_block_pairs(size) * 2 * size**3 * 2 * 3 // 4
    assert (process_wide.target_max_block_size, process_wide.op_resource_reservation_enabled) == before
    assert before[1] is True, "Ray Data's default reserves resources per operator"


@pytest.mark.timeout(900)
def test_pretrain_registers_an_encoder_that_beats_random_init(pipeline):
    s = pipeline.encoder
    cfg = pipeline.pretrain_config()
    uri = f"sqlite:///{pipeline.root / 'mlflow.db'}"

    assert s.steps == cfg.pretrain.max_steps == 60
    assert len(s.workers) == 2 and len({w["pid"] for w in s.workers}) == 2
    assert s.final_loss is not None and s.samples_per_s and 0.0 <= s.data_wait_fraction <= 1.0
    # The learning signal: held-out pairs (val subjects, never trained on) are retrieved better than at init.
    assert s.eval_pairs == cfg.pretrain.eval_pairs
    assert s.eval_top1 > s.eval_top1_random, (s.eval_top1, s.eval_top1_random)

    # Checkpoint: model, optimiser, scheduler, step, per-rank RNG and generator states, config.
    ckpt = Path(s.checkpoint)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 60 and state["engine"]["scheduler"]["last_epoch"] == 60
    assert len(state["generators"]) == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["generators"][0], state["generators"][1])  # ranks augment independently
    assert state["config"]["model"]["hidden_size"] == 48
    assert (ckpt / "encoder" / "encoder.pt").is_file() and (ckpt / "encoder" / "backbone.yaml").is_file()

    # MLflow: the full config as params, per-step metrics from rank 0 only, eval metrics, the loss plot.
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run = client.get_run(s.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_size"] == "48" and run.data.params["pretrain.num_workers"] == "2"
    steps = [p[0] for p in _history(uri, s.mlflow_run_id, "train/loss")]
    assert steps == list(range(5, 61, 5))  # one writer: every report step exactly once
    for key in ("train/lr", "train/samples_per_s", "train/data_wait_fraction", "train/top1"):
        assert _history(uri, s.mlflow_run_id, key), key
    assert run.data.metrics["eval/top1_pretrained"] == pytest.approx(s.eval_top1)
    artifacts = {a.path for a in client.list_artifacts(s.mlflow_run_id)}
    assert {"encoder", "loss_curves.png", "selection.json"} <= artifacts

    # Registry: brainiac-encoder@candidate with provenance tags; loads strictly and equals the checkpoint.
    assert s.model_uri == "models:/brainiac-encoder@candidate"
    version = client.get_model_version_by_alias("brainiac-encoder", "candidate")
    assert version.run_id == s.mlflow_run_id
    tags = version.tags
    volumes_version = pipeline.catalog.version("volumes")
    assert tags["volumes_table_version"] == str(volumes_version)
    assert tags["preprocess_version"] == pipeline.volumes.preprocess_version
    assert len(tags["config_hash"]) == 16 and tags["git_commit"]
    assert "restricted" in tags["access"].split(",")  # the synthetic hospital DICOM cohort is DUA-restricted
    encoder, backbone = load_encoder(s.model_uri, tracking_uri=uri)
    reference, _ = load_encoder(str(ckpt))
    assert backbone.hidden_size == 48
    for (name, a), (_, b) in zip(encoder.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.timeout(900)
def test_injected_fault_resumes_from_checkpoint_and_same_name_resumes_again(pipeline, tmp_path):
    pipeline.volumes  # noqa: B018 - the catalog with volumes and splits
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = [
        f"tracking.uri={uri}",
        f"pretrain.storage_path={tmp_path / 'runs'}",
        "pretrain.run_name=fault-drill",
        "pretrain.checkpoint_every=10",
        "pretrain.log_every=5",
        "pretrain.register_as=",
        "pretrain.eval_pairs=16",
    ]
    first = pretrain(
        pipeline.pretrain_config(*base, "pretrain.max_steps=30", "pretrain.fail_at_step=15", "pretrain.fail_rank=1"),
        progress=False,
    )
    assert first.failures == 1
    assert first.resumed_from_step == 10  # the newest checkpoint before the fault
    assert first.steps == 30
    assert (tmp_path / "runs" / "fault-drill" / "_brainiac" / "fault-injected").is_file()
    state = torch.load(Path(first.checkpoint) / "state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 30 and state["engine"]["scheduler"]["last_epoch"] == 30
    # The loss curve continues: after the restart, logging resumes past the checkpoint (step 10), never from step 0.
    # Rank 0 may have logged step 15 before rank 1 failed, so 15 can appear twice (before and after the restart).
    steps = [p[0] for p in _history(uri, first.mlflow_run_id, "train/loss")]
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(restarts) <= 1 and all(steps[i] > 10 for i in restarts), steps
    assert sorted(set(steps)) == [5, 10, 15, 20, 25, 30] and steps[-1] == 30

    again = pretrain(pipeline.pretrain_config(*base, "pretrain.max_steps=40"), progress=False)
    assert again.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    assert again.resumed_from_step == 30 and again.steps == 40 and again.failures == 0
    assert [p[0] for p in _history(uri, first.mlflow_run_id, "train/loss")][-2:] == [35, 40]


@pytest.mark.timeout(600)
def test_pretrain_runs_on_a_multi_node_cluster_with_workers_on_different_nodes(pipeline, tmp_path):
    """The same job on a 3-node Ray cluster started on this machine (in a subprocess: one Ray per process)."""
    pipeline.volumes  # noqa: B018
    cfg = pipeline.pretrain_config(
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"pretrain.storage_path={tmp_path / 'runs'}",
        "pretrain.run_name=multinode",
        "pretrain.placement_strategy=STRICT_SPREAD",
        "pretrain.max_steps=10",
        "pretrain.checkpoint_every=10",
        "pretrain.register_as=",
        "pretrain.eval_pairs=8",
        "pretrain.data_cpus=1",
    )
    from brainiac.platform.config import config_to_dict

    spec = tmp_path / "config.json"
    spec.write_text(json.dumps(config_to_dict(cfg, redact=False)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, str(HERE / "multinode_pretrain.py"), str(spec), str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=540, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["cluster_nodes"] >= 3
    assert result["steps"] == 10
    nodes = [w["node_id"] for w in result["workers"]]
    assert len(nodes) == 2 and len(set(nodes)) == 2, result["workers"]  # STRICT_SPREAD: one worker per node


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    brainiac = Path(sys.executable).parent / "brainiac"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    empty = subprocess.run(
        [str(brainiac), "pretrain", "--catalog", str(tmp_path / "nothing"), "-c", "tiny"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert empty.returncode == 2
    assert empty.stderr.strip().startswith("error:") and "brainiac preprocess" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1
    unknown = subprocess.run(
        [str(brainiac), "pretrain", "-c", "no-such-config"], capture_output=True, text=True, env=env, timeout=120
    )
    assert unknown.returncode == 2 and "unknown config 'no-such-config'" in unknown.stderr
