"""Typed config section ``finetune``: which task, strategy, initial weights, data regime, search space and budget.

No torch or Ray import, so the CLI validates a run before paying for either. Values a sweep samples (``lr``,
``weight_decay``, ``dropout``, ``encoder_lr_mult``, ``freeze_depth``, ``layer_decay``) are the defaults of a single run
and the centre of the Tune search space; ``*_range`` and ``*_choices`` fields bound the search. ``linear`` ignores
all of them except for segmentation: its probe is solved exactly, the penalty chosen by inner cross-validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from brainiac.platform.errors import ConfigError
from brainiac.platform.fields import bounds

__all__ = ["FinetuneConfig"]


@dataclass
class FinetuneConfig:
    """Fine-tuning one task: ``brainiac finetune --task T --strategy S``."""

    task: str = "sequence"
    """Task spec name (``models/tasks/specs.yaml``): sequence, brain_age, idh, survival, mci, stroke_onset, segmentation."""

    strategy: Literal["scratch", "linear", "full"] = "full"
    """``scratch`` = random init; ``linear`` = frozen encoder, a linear probe fitted to convergence on its features
    (segmentation: the UNETR decoder trains); ``full`` = everything trains, with layer-wise learning-rate decay."""

    init: str = ""
    """Pretrained encoder: a checkpoint/export folder or ``models:/brainiac-encoder@ALIAS`` (``/VERSION``, ``/latest``).
    Its own backbone config decides the architecture. Empty with ``linear``/``full`` is an error; ignored by scratch."""

    shots: int | None = field(default=None, metadata=bounds(ge=1))
    """Few-shot regime: K training cases per class (regression: per label quantile bin)."""

    fraction: float | None = field(default=None, metadata=bounds(gt=0.0, le=1.0))
    """Data regime: this fraction of the training subjects."""

    seeds: list[int] = field(default_factory=lambda: [0])
    """Every regime is repeated over these seeds (draws of the few-shot/fraction subset, init of heads, order)."""

    trials: int = field(default=1, metadata=bounds(ge=1))
    """Hyperparameter configurations Tune samples (each run once per seed)."""

    max_epochs: int = field(default=20, metadata=bounds(ge=1))
    """Epochs per trial (ASHA may stop a trial earlier)."""

    batch_size: int = field(default=8, metadata=bounds(ge=1))
    lr: float = field(default=1e-3, metadata=bounds(gt=0.0, le=1.0))
    lr_range: tuple[float, float] = (1e-4, 3e-3)
    weight_decay: float = field(default=1e-4, metadata=bounds(ge=0.0, le=1.0))
    weight_decay_range: tuple[float, float] = (1e-6, 1e-2)
    dropout: float = field(default=0.1, metadata=bounds(ge=0.0, lt=1.0))
    dropout_choices: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3])
    encoder_lr_mult: float = field(default=1.0, metadata=bounds(gt=0.0, le=1.0))
    """``full``: the encoder's top layer trains at ``lr · encoder_lr_mult``, lower layers ``layer_decay`` less per
    layer. 1.0 by default: layer-wise decay already slows the pretrained layers, so ``full`` and ``scratch`` start from
    the same ``lr`` (the old default 0.1 put every encoder layer at a tenth of scratch's rate)."""
    encoder_lr_mult_choices: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    layer_decay: float = field(default=0.75, metadata=bounds(gt=0.0, le=1.0))
    """``full``: layer-wise learning-rate decay (BEiT/MAE fine-tuning): encoder depth ``d`` of ``top`` (ViT: patch
    embedding 0, block ``i`` at ``i + 1``; ResNet: stem 0, stages 1-4) trains at ``lr · encoder_lr_mult ·
    layer_decay ** (top - d)``. 1.0 turns it off. Hyperparameter key ``layer_decay``."""
    layer_decay_choices: list[float] = field(default_factory=lambda: [0.65, 0.75, 0.9])
    warmup_fraction: float = field(default=0.1, metadata=bounds(ge=0.0, lt=1.0))
    """Every gradient-trained strategy: the learning rate rises linearly over this fraction of the optimiser steps,
    then follows a cosine to 0 (per step, over ``max_epochs``). Hyperparameter key ``warmup_fraction`` (a constant)."""
    freeze_depth: int = field(default=0, metadata=bounds(ge=0))
    """``full``: keep the patch embedding and the first ``freeze_depth`` transformer blocks frozen."""
    freeze_depth_choices: list[int] = field(default_factory=lambda: [0, 1, 2])

    augment: bool = True
    """BrainIAC's fine-tuning augmentation (affine, flip, smoothing, noise, contrast; labels nearest-neighbour)."""

    grace_epochs: int = field(default=2, metadata=bounds(ge=1))
    """ASHA: epochs every trial runs before it may be stopped."""

    max_concurrent_trials: int | None = field(default=None, metadata=bounds(ge=1))
    """Trials at once; ``None`` = what the cluster's CPUs allow (1 on a 2-core machine)."""

    cpus_per_trial: float = field(default=1.0, metadata=bounds(gt=0.0))
    gpus_per_trial: float = field(default=0.0, metadata=bounds(ge=0.0))

    storage_path: str = ""
    """Where Tune/Train keep trial checkpoints. Empty = ``brainiac-data/runs``."""

    register: bool = True
    """Log the best model and register it as ``brainiac-<task>``."""

    alias: str = "challenger"
    """Alias of the newly registered version (promotion later moves ``champion``)."""

    bootstrap: int = field(default=1000, metadata=bounds(ge=100))
    """Bootstrap resamples for the test metrics' 95 % confidence intervals."""

    def __post_init__(self) -> None:
        if self.shots is not None and self.fraction is not None:
            raise ConfigError("finetune: choose --shots or --fraction, not both")
        if not self.seeds:
            raise ConfigError("finetune.seeds must list at least one seed")
        if self.alias.lower() == "latest":
            raise ConfigError("finetune alias 'latest' is reserved by MLflow")
