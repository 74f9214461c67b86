"""Typed config section ``promote``: which version to judge, the gates it must pass and the aliases it moves.

No torch or MLflow import, so ``brainiac promote --help`` and config validation stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from brainiac.platform.errors import ConfigError
from brainiac.platform.fields import bounds

__all__ = ["PromoteConfig"]


@dataclass
class PromoteConfig:
    """Promoting a task model through the registry: ``brainiac promote brainiac-<task>``."""

    candidate: str = "@challenger"
    """The version to judge: a version number (``7``) or an alias (``@challenger``)."""

    champion_alias: str = "champion"
    """The alias that marks the model in use; only a version that passes every gate gets it."""

    previous_alias: str = "previous"
    """The alias the replaced champion keeps, so ``--rollback`` is one command."""

    primary_metric: str = ""
    """The metric that must improve; empty = the task spec's ``select_metric``."""

    min_delta: float = 0.0
    """The lower bound of the improvement's bootstrap CI must reach this (in the metric's units, direction-aware)."""

    confidence: float = field(default=0.95, metadata=bounds(gt=0.5, lt=1.0))
    """Confidence level of the paired bootstrap interval of the improvement."""

    gates: list[str] = field(default_factory=list)
    """Absolute gates on the candidate's test metrics, e.g. ``["auc>=0.7", "hd95<=12"]``. They also apply to a first
    promotion, when there is no champion to compare with."""

    baseline_gate: bool = True
    """A first promotion (no champion yet) must beat the task's trivial baseline on the primary metric: the lower bound
    of the paired, subject-level bootstrap interval of the improvement (at ``confidence``) must be above 0. The
    baseline ignores the image: the training-class prior (chance), the training mean, a constant risk, an empty mask
    (:func:`brainiac.jobs.promote.gates.baseline_predictions`). Without it a model at chance could become champion
    and serve predictions; turn it off only to seed a registry on purpose."""

    robustness: bool = True
    """Compare both models under imaging artifacts; none may regress past ``robustness_tolerance``."""

    robustness_tolerance: float = field(default=0.05, metadata=bounds(ge=0.0))
    """How much worse (primary metric, its own units, averaged over an artifact's strengths) the candidate may be."""

    robustness_artifacts: list[str] = field(default_factory=list)
    """Artifacts to compare (empty = all of :data:`brainiac.models.tasks.robustness.ARTIFACTS`)."""

    bootstrap: int = field(default=1000, metadata=bounds(ge=100))
    """Bootstrap resamples for the metric CIs and the paired improvement CI."""

    table_versions: dict[str, int] = field(default_factory=dict)
    """Pin the evaluation data to these catalog table versions (``scans``, ``volumes``, ``splits``); empty = the current
    ones, which the decision records so it can be repeated exactly."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.table_versions) - {"scans", "volumes", "splits"})
        if unknown:
            raise ConfigError(f"promote.table_versions: unknown table(s) {unknown}; pin scans, volumes or splits")
        if self.champion_alias == self.previous_alias:
            raise ConfigError("promote.champion_alias and promote.previous_alias must differ")
