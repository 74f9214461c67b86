"""Typed config section ``quickstart``: how big the one-command tour is (cohort, steps, tasks, sweeps) and where it goes.

The rest of the run (cohort size in ``synth``, model size, pretraining recipe, preprocessing grid) comes from the same
sections every job reads;
``jobs/configs/quickstart.yaml`` and ``quickstart-fast.yaml`` set them for a 2-core laptop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from brainiac.platform.errors import ConfigError
from brainiac.platform.fields import bounds

__all__ = ["QuickstartConfig"]


@dataclass
class QuickstartConfig:
    """``brainiac quickstart``: synth → ingest → preprocess → pretrain → finetune → evaluate → promote → predict → report."""

    workdir: str = "brainiac-quickstart"
    """Everything goes under here: cohort/, catalog/, mlflow.db, runs/, predictions/, report.html, state.json."""

    pretrain_steps: int = field(default=150, metadata=bounds(ge=1))
    """SimCLR optimiser steps of the tiny encoder."""

    tasks: list[str] = field(default_factory=lambda: ["sequence", "brain_age", "segmentation"])
    """Tasks fine-tuned from the pretrained encoder, evaluated and promoted."""

    scratch_tasks: list[str] = field(default_factory=lambda: ["brain_age"])
    """Tasks also trained from scratch, so the report shows what pretraining bought."""

    trials: int = field(default=2, metadata=bounds(ge=1))
    """Tune trials per task sweep."""

    max_epochs: int = field(default=6, metadata=bounds(ge=1))
    """Epochs per trial (ASHA stops weak trials earlier)."""

    gates: dict[str, list[str]] = field(
        default_factory=lambda: {
            "sequence": ["balanced_accuracy>=0.4"],
            "brain_age": ["mae<=25"],
            "segmentation": ["dice>=0.2"],
        }
    )
    """Absolute gates per task for the first promotion (there is no champion yet to beat)."""

    robustness_artifacts: list[str] = field(default_factory=lambda: ["bias_field", "rician_noise", "motion_ghosting"])
    """Artifacts the evaluation and the promotion compare (fewer = faster)."""

    saliency_cases: int = field(default=2, metadata=bounds(ge=0))
    """Test cases per classification/regression task explained with occlusion saliency."""

    bootstrap: int = field(default=200, metadata=bounds(ge=100))
    """Bootstrap resamples for every CI of the tour."""

    def __post_init__(self) -> None:
        stray = sorted(set(self.scratch_tasks) - set(self.tasks))
        if stray:
            raise ConfigError(f"quickstart.scratch_tasks {stray} must also be in quickstart.tasks")
