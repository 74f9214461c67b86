"""The Ray Train worker loop of SimCLR pretraining: stream batches, step, report, checkpoint, resume.

Every worker runs :func:`train_loop`. It rebuilds the one :class:`~brainiac.platform.config.Config` the driver sent,
restores the newest checkpoint when Ray Train hands one over (after a worker failure or when a run of the same name is
started again), then pulls view pairs from its shard of the Ray Data stream until ``pretrain.max_steps`` optimiser
steps are done. Rank 0 logs metrics to MLflow (one writer, as sqlite wants) and writes the checkpoints.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from brainiac.jobs.config import Config
from brainiac.models.export import ENCODER_DIR, save_encoder
from brainiac.models.simclr import SimCLRModel, SimCLRStep
from brainiac.platform.config import from_dict
from brainiac.platform.storage import StorageLocation

__all__ = ["InjectedFault", "train_loop"]

STATE_FILE = "state.pt"


class InjectedFault(RuntimeError):
    """Raised by the fault-injection switch (``pretrain.fail_at_step``) to prove that a run survives a lost worker."""


@dataclass
class _Window:
    """Metrics accumulated between two reports."""

    started: float = field(default_factory=time.perf_counter)
    wait_s: float = 0.0
    steps: int = 0
    samples: int = 0
    loss: float | torch.Tensor = 0.0
    top1: float | torch.Tensor = 0.0

    def add(self, loss: float | torch.Tensor, top1: float | torch.Tensor, samples: int) -> None:
        """Add one step's numbers; device tensors are summed on the device and read once, in :meth:`metrics`."""
        self.steps += 1
        self.samples += samples
        self.loss += loss
        self.top1 += top1

    def metrics(self, step: int, lr: float, world: int, epoch: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        steps = max(self.steps, 1)
        return {
            "step": step,
            "epoch": epoch,
            "loss": float(self.loss) / steps,
            "lr": lr,
            "top1": float(self.top1) / steps,
            "samples_per_s": self.samples * world / elapsed,
            "data_wait_fraction": min(1.0, self.wait_s / elapsed),
            "step_time_s": elapsed / steps,
        }


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


class _Tracker:
    """Rank 0's MLflow writer: batches of metrics against the run the driver created."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.client = None
        self.run_id = run_id
        if tracking_uri and run_id:
            import mlflow

            self.client = mlflow.MlflowClient(tracking_uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None or self.run_id is None:  # (a client is made only with a run id)
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"train/{k}", float(v), now, step) for k, v in metrics.items() if k != "step"]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Run on every Ray Train worker; ``loop_config`` holds ``config`` (plain data of the run's Config), ``run_dir``
    (with ``run_storage_options``) and optionally ``tracking_uri``/``mlflow_run_id``."""
    import ray
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not one INFO line per report on the console
    cfg = from_dict(Config, loop_config["config"])
    pcfg = cfg.pretrain
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Intra-op threads beyond the worker's CPU share spin against each other: 50x slower steps on a busy 2-core host.
    torch.set_num_threads(max(1, int(pcfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    run_dir = StorageLocation.resolve(loop_config["run_dir"], loop_config.get("run_storage_options") or {})
    placement = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                 "host": socket.gethostname(), "device": str(device)}  # fmt: skip

    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights; the driver rebuilds them as the baseline
    model = SimCLRModel(cfg.model, cfg.projection)
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"], strict=True)
    model.to(device)
    wrapped = ray.train.torch.prepare_model(model, move_to_device=False)
    cuda = device.type == "cuda"
    if cuda:  # fixed shapes: cuDNN picks the fastest conv algorithm once per shape (a process-wide switch, set here)
        torch.backends.cudnn.benchmark = True
    engine = SimCLRStep(
        wrapped, cfg.ssl, cfg.optim, cfg.augment, pcfg.max_steps, device, pcfg.precision, pcfg.grad_accum_steps,
        global_batch=pcfg.global_batch(world),  # the world that runs, which scales a per-256 learning rate
        compile=pcfg.compile and cuda,  # torch.compile of the (DDP-wrapped) model's forward and backward
    )  # fmt: skip
    engine.generator.manual_seed(cfg.seed * 7919 + rank)
    step, epoch = 0, 0
    if state is not None:
        engine.load_state_dict({**state["engine"], "generator": state["generators"][rank % len(state["generators"])]})
        _set_rng_state(state["rng"][rank % len(state["rng"])])
        step, epoch = int(state["step"]), int(state["epoch"])
    placement["start_step"] = step  # 0, or the checkpoint this attempt resumed from

    tracker = _Tracker(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id")) if rank == 0 else None
    fault_marker = run_dir.join("_brainiac", "fault-injected")
    shard = ray.train.get_dataset_shard("train")
    window = _Window()
    while step < pcfg.max_steps:
        batches = iter(
            shard.iter_torch_batches(
                batch_size=pcfg.batch_size,
                drop_last=True,
                local_shuffle_buffer_size=cfg.patches.shuffle_buffer or None,
                # Batches stay on the host, pinned by Ray's prefetch thread; SimCLRStep.prepare copies them without
                # blocking (non_blocking=True) on a side stream. Ray's default (device="auto") would copy them from
                # pageable memory, synchronously, every step.
                device="cpu",
                pin_memory=cuda,
            )
        )
        seen = 0
        while step < pcfg.max_steps:
            started = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            window.wait_s += time.perf_counter() - started
            seen += 1
            # Read the loss back (a wait for the device) only on steps that report it; the others queue work and
            # return, so the next batch is fetched, copied and augmented (on a side stream, the next time round this
            # loop) while the device still runs this step.
            due = (
                step + 1 == pcfg.max_steps
                or (step + 1) % pcfg.log_every == 0
                or (step + 1) % pcfg.checkpoint_every == 0
            )
            views = engine.prepare(batch["view1"], batch["view2"])
            result = engine.micro_step(views, sync=due)
            if result is None:
                continue
            step += 1
            window.add(result.loss, result.top1, result.samples)
            if pcfg.fail_at_step == step and rank == pcfg.fail_rank and not fault_marker.exists():
                fault_marker.write_text(f"rank {rank} raised at step {step}\n")
                raise InjectedFault(f"injected fault: rank {rank} at step {step} (pretrain.fail_at_step)")
            at_checkpoint = step % pcfg.checkpoint_every == 0 or step == pcfg.max_steps
            if step % pcfg.log_every and not at_checkpoint:
                continue
            metrics = window.metrics(step, result.lr, world, epoch)
            window = _Window()
            if tracker is not None:
                tracker.log(metrics, step)
            metrics = {**metrics, **placement}  # the driver's callback learns where every rank ran
            if not at_checkpoint:
                ray.train.report(metrics)
                continue
            generators = _all_gather(engine.generator.get_state(), world)
            rngs = _all_gather(_rng_state(), world)
            if rank != 0:
                ray.train.report(metrics)
                continue
            with tempfile.TemporaryDirectory() as folder:
                payload = {
                    "model": model.state_dict(),
                    "engine": {k: v for k, v in engine.state_dict().items() if k != "generator"},
                    "generators": generators,
                    "rng": rngs,
                    "step": step,
                    "epoch": epoch,
                    "config": loop_config["config"],
                }
                torch.save(payload, Path(folder) / STATE_FILE)
                save_encoder(Path(folder) / ENCODER_DIR, model.encoder, cfg.model)
                (Path(folder) / "config.yaml").write_text(yaml.safe_dump(loop_config["config"], sort_keys=False))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        if seen == 0:
            raise RuntimeError(
                f"rank {rank}: the data shard yielded no batch of {pcfg.batch_size} pairs; lower pretrain.batch_size, "
                "raise patches.patches_per_volume or select more volumes"
            )
        epoch += 1
