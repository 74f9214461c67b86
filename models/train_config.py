"""Typed config sections of the pretraining job: which patches to stream (``patches``), how to optimise (``optim``) and
how to run, checkpoint and scale (``pretrain``).

No torch or Ray import here, so the CLI validates a config before paying for either. Production defaults: ViT-B at 96³,
AdamW with warmup + cosine, bf16 on GPU, a checkpoint every 500 steps. Tiny values live in ``jobs/configs/pretrain/tiny.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

from brainiac.platform.errors import ConfigError
from brainiac.platform.fields import bounds

__all__ = ["OptimConfig", "PatchConfig", "PretrainConfig"]


@dataclass
class PatchConfig:
    """Which volumes feed pretraining and how view pairs are cut from them.

    Two views are crops of the **same location** of one brain, each at its own random scale (``crop_scale``): the
    second crop's centre is the first's moved by a random jitter of at most ``jitter_frac`` of the smaller crop's edge
    per axis, redrawn until the two boxes share at least ``min_overlap`` of the smaller one's volume. Then each view is
    augmented independently (``augment``; the shipped pretraining configs turn its intensity steps up).
    """

    preprocess_version: str = ""
    """``volumes`` rows of this preprocess version; empty = the newest version in the table."""

    datasets: list[str] = field(default_factory=list)
    """Datasets to read (empty = all the job's access levels allow)."""

    sequences: list[str] = field(default_factory=list)
    """Canonical sequences to read (empty = all)."""

    splits: list[str] = field(default_factory=lambda: ["train"])
    """Subject splits (``splits`` table) to train on. Pretraining never sees the held-out ``eval_split``."""

    eval_split: str = "val"
    """Split whose patches measure positive-pair retrieval at the end (the trained encoder against a random one)."""

    patches_per_volume: int = field(default=8, metadata=bounds(ge=1, le=1024))
    """View pairs cut from one decoded volume per pass (decoding is amortised over them)."""

    jitter_frac: float = field(default=0.25, metadata=bounds(ge=0.0, le=1.0))
    """Largest shift of the second crop against the first, per axis, as a fraction of the (smaller) crop edge."""

    min_overlap: float = field(default=0.4, metadata=bounds(ge=0.0, le=1.0))
    """Least shared volume of the two crops (fraction of the smaller crop)."""

    min_brain_fraction: float = field(default=0.3, metadata=bounds(ge=0.0, le=1.0))
    """Least fraction of brain-mask voxels in the first crop (redrawn otherwise), so views are not empty background."""

    crop_scale: tuple[float, float] | None = field(default=(0.4, 1.0), metadata=bounds(gt=0.0, le=1.5))
    """Random resized crops: each view draws its own scale s uniformly in [low, high] and is a cube of edge s·L (L =
    the ``whole`` volume's longest edge), resized (trilinear) to ``img_size``. At 1.0 a view is the whole volume fitted
    into the cube, as fine-tuning's ``fixed`` cube shows it; at 0.4 it shows 0.4 of the volume per axis in finer
    detail. The views' scales are independent, so the encoder learns to match a part to its whole (SimCLR's random
    resized crop, Chen et al. 2020). ``null``: plain ``img_size``³ crops of the ``whole`` grid, one size for both
    views: 0.5-0.6 of the volume per axis, a sixth of it (161 x 197 x 171 voxels at 1 mm with 96³ crops; the same
    at the tiny configs' 3 mm with 32³)."""

    min_pairs_per_pass: int = field(default=4096, metadata=bounds(ge=1))
    """Each pass of the stream yields at least this many pairs (a small selection cuts more pairs per volume from one
    read, at new random locations every pass), so the stream restarts (a few seconds of Ray Data start-up) rarely, not
    every few steps."""

    shuffle_buffer: int = field(default=64, metadata=bounds(ge=0))
    """Pairs held in the local shuffle buffer of each worker's iterator (0 = no shuffle beyond the block order)."""

    def __post_init__(self) -> None:
        if self.crop_scale is not None and (len(self.crop_scale) != 2 or self.crop_scale[0] > self.crop_scale[1]):
            raise ConfigError(
                f"patches.crop_scale must be two numbers [low, high] with low <= high, got {list(self.crop_scale)}"
            )


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule: linear warmup then cosine decay to ``min_lr_ratio · lr``."""

    name: Literal["adamw", "lars"] = "adamw"
    """``adamw`` (ViT default) or ``lars`` (SimCLR's large-batch choice; bias and norm weights skip adaptation)."""

    lr: float | None = field(default=1.5e-4, metadata=bounds(gt=0.0, le=10.0))
    """Peak learning rate (after warmup) for the whole global batch, as given. ``null`` when ``base_lr_per_256`` sets
    it instead (exactly one of the two is set)."""

    base_lr_per_256: float | None = field(default=None, metadata=bounds(gt=0.0, le=10.0))
    """Linear scaling rule (Goyal et al. 2017; SimCLR, MAE): the peak learning rate is this rate per 256 pairs times
    the global batch, ``base_lr_per_256 · batch_size · num_workers · grad_accum_steps / 256`` (:meth:`peak_lr`), so
    one recipe holds at any number of GPUs. A per-256 rate used unscaled on a 4,096-pair batch trains 16x too slowly."""

    weight_decay: float = field(default=0.05, metadata=bounds(ge=0.0, le=1.0))
    """Decoupled weight decay; never applied to biases and norm weights."""

    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=bounds(ge=0.0, lt=1.0))
    """AdamW betas."""

    momentum: float = field(default=0.9, metadata=bounds(ge=0.0, lt=1.0))
    """LARS momentum."""

    trust_coefficient: float = field(default=0.001, metadata=bounds(gt=0.0))
    """LARS trust ratio coefficient η."""

    warmup_steps: int = field(default=500, metadata=bounds(ge=0))
    """Optimiser steps of linear warmup from 0 to ``lr``."""

    min_lr_ratio: float = field(default=0.01, metadata=bounds(ge=0.0, le=1.0))
    """Floor of the cosine decay as a fraction of ``lr``."""

    grad_clip: float = field(default=1.0, metadata=bounds(ge=0.0))
    """Clip the global gradient norm to this value (0 = no clipping)."""

    def __post_init__(self) -> None:
        if (self.lr is None) == (self.base_lr_per_256 is None):
            raise ConfigError(
                "set exactly one of optim.lr (the peak rate as given) and optim.base_lr_per_256 (scaled by the global "
                f"batch), the other null; got lr={self.lr}, base_lr_per_256={self.base_lr_per_256}"
            )

    def peak_lr(self, global_batch: int | None = None) -> float:
        """The peak learning rate for a global batch of ``global_batch`` pairs (per optimiser step, all workers).

        Raises:
            ValueError: the rate is per 256 pairs and ``global_batch`` is not given.
        """
        if self.lr is not None:
            return self.lr
        if global_batch is None or global_batch < 1:
            raise ValueError(f"optim.base_lr_per_256 needs the global batch to scale by, got {global_batch}")
        per_256 = cast(float, self.base_lr_per_256)  # __post_init__: lr is None, so base_lr_per_256 is set
        return per_256 * global_batch / 256


@dataclass
class PretrainConfig:
    """Running the SimCLR job: steps, batch, precision, scaling, checkpoints, failures and the registered model."""

    run_name: str = ""
    """Name of the run; the same name again resumes from its last checkpoint. Empty = ``pretrain-<UTC time>``."""

    storage_path: str = ""
    """Where Ray Train keeps checkpoints (a directory or ``s3://``, shared by all nodes). Empty = ``brainiac-data/runs``."""

    max_steps: int = field(default=100_000, metadata=bounds(ge=1))
    """Optimiser steps in total (a resumed run continues towards the same total)."""

    batch_size: int = field(default=32, metadata=bounds(ge=2))
    """View pairs per worker per micro-step (every pair gives 2·world·batch − 2 negatives)."""

    grad_accum_steps: int = field(default=1, metadata=bounds(ge=1))
    """Micro-steps whose gradients add up before one optimiser step."""

    num_workers: int = field(default=2, metadata=bounds(ge=1))
    """Ray Train workers (one process, one GPU each on a GPU cluster)."""

    use_gpu: bool = False
    """Put each worker on a GPU."""

    cpus_per_worker: float = field(default=1.0, metadata=bounds(gt=0.0))
    """CPUs reserved per Train worker. Fractions leave CPUs to Ray Data on small machines."""

    gpus_per_worker: float = field(default=1.0, metadata=bounds(gt=0.0))
    """GPUs per worker when ``use_gpu``."""

    data_cpus: float | None = field(default=None, metadata=bounds(gt=0.0))
    """Cap on the CPUs Ray Data's decode/crop operators may use (``None`` = what the workers leave free). Capping it
    stops the stream from taking the CPUs Train needs, and leaving it room stops it from starving (a hang, not an
    error, in Ray)."""

    data_tasks_per_cpu: int = field(default=2, metadata=bounds(ge=1, le=8))
    """Map tasks of the stream in flight per CPU of Ray Data's share, like a DataLoader's ``prefetch_factor``: with
    one, a CPU idles between a finished task and the next (Ray Data notices the end of a task up to 0.1 s late, then
    starts the next; with one-volume tasks about 15 % of the time). Keep ``cluster.workers_per_cpu`` at least as
    large, or Ray kills the extra workers between passes and each new pass pays their imports again."""

    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    """How workers are placed on nodes; ``STRICT_SPREAD`` puts every worker on a different node."""

    precision: Literal["fp32", "bf16"] = "bf16"
    """bf16 autocast on GPU; CPU workers always compute in fp32."""

    compile: bool = True
    """``torch.compile`` the model's forward and backward on GPU workers (ignored on CPU, where compiling costs minutes
    and gains little). ``false`` runs eager on the GPU too (to compare, or to debug)."""

    checkpoint_every: int = field(default=500, metadata=bounds(ge=1))
    """Optimiser steps between checkpoints (and one at the end)."""

    keep_checkpoints: int = field(default=3, metadata=bounds(ge=1))
    """Newest checkpoints kept in storage."""

    max_failures: int = field(default=3, metadata=bounds(ge=-1))
    """Worker-group failures survived by restarting from the last checkpoint (-1 = unlimited)."""

    log_every: int = field(default=10, metadata=bounds(ge=1))
    """Optimiser steps between metric reports (loss, lr, samples/s, data-wait fraction, top-1)."""

    eval_pairs: int = field(default=128, metadata=bounds(ge=4))
    """Held-out view pairs on which the final encoder's retrieval accuracy is compared with a random encoder's."""

    register_as: str = "brainiac-encoder"
    """Registered-model name of the encoder in MLflow; empty = log it but do not register."""

    alias: str = "candidate"
    """Alias set on the new model version (``models:/brainiac-encoder@candidate``); promotion moves ``champion``.
    MLflow reserves ``latest`` (``models:/brainiac-encoder/latest`` is the newest version anyway)."""

    fail_at_step: int | None = field(default=None, metadata=bounds(ge=1))
    """Fault injection for tests and drills: rank ``fail_rank`` raises at this step, once (first attempt only)."""

    fail_rank: int = field(default=0, metadata=bounds(ge=0))
    """Rank that raises at ``fail_at_step``."""

    def global_batch(self, workers: int | None = None) -> int:
        """View pairs per optimiser step over all workers: ``batch_size · workers · grad_accum_steps`` (``workers``
        defaults to ``num_workers``, the world size the job starts)."""
        return self.batch_size * (self.num_workers if workers is None else workers) * self.grad_accum_steps

    def __post_init__(self) -> None:
        if self.alias.lower() == "latest" or (self.alias and not self.alias.replace("-", "_").isidentifier()):
            raise ConfigError(f"pretrain alias {self.alias!r} is not allowed ('latest' is reserved by MLflow)")
        if self.run_name and not all(c.isalnum() or c in "-_." for c in self.run_name):
            raise ConfigError(
                f"pretrain run_name may hold letters, digits, '-', '_' and '.' only, got {self.run_name!r}"
            )
