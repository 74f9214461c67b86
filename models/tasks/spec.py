"""Task specs: what a fine-tuning task reads, predicts and is scored by, loaded from ``specs.yaml`` (data, not code).

One :class:`TaskSpec` drives the generic engine: which sequences form an input (one scan, or one scan per sequence of a
subject session with features mean-pooled over them), where the label comes from (a ``scans`` column, a key of the
``labels`` JSON, or the ``volumes`` label map), the head and loss, the metrics and which one selects models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Literal

from brainiac.platform.errors import ConfigError, UserError

__all__ = ["TaskSpec", "load_specs", "task_spec"]

HIGHER_IS_BETTER = {"balanced_accuracy": True, "macro_auc": True, "auc": True, "f1": True, "c_index": True,
                    "dice": True, "mae": False, "hd95": False}  # fmt: skip


@dataclass(frozen=True)
class TaskSpec:
    """One fine-tuning task."""

    name: str
    description: str
    sequences: list[str]
    """Sequences forming one input, in channel order (one scan each, from the same subject session)."""
    label: str
    """``<scans column>``, ``labels.<key>`` (the scans' labels JSON) or ``volumes.labels_fixed``."""
    kind: Literal["multiclass", "binary", "regression", "segmentation"]
    loss: Literal["ce", "bce", "l1", "mse", "cox", "dice_bce"]
    metrics: list[str]
    select_metric: str
    """The validation metric Tune optimises (direction from :data:`HIGHER_IS_BETTER`)."""
    per_scan: bool = False
    """Each scan is its own case (the sequence task); otherwise one case per subject session."""
    optional_sequences: list[str] = field(default_factory=list)
    """Unused; kept so that specs recorded with older models still load. No shipped task lists one: the model reads
    exactly ``sequences`` (see stroke_onset in ``specs.yaml`` for why FLAIR is not added "when present")."""
    classes: list[str] = field(default_factory=list)
    """Label values in class order (binary: [negative, positive])."""
    threshold: float | None = None
    """Binary task from a number: positive when the label exceeds it."""
    event_label: str = ""
    """Survival: ``labels.<key>`` saying whether the event was observed at the label's time (true) or the case was
    censored there (false). With it the label is a right-censored time: a case censored before ``threshold`` has no
    binary class (it is left out of a ``bce`` task, and kept, class unknown, for the Cox loss's risk sets), and the
    cases' ``raw`` is (time, event) for the Cox loss and the C-index. Empty: every time is an observed event."""
    units: str = ""
    diagnosis: list[str] = field(default_factory=list)
    """Keep only scans with these diagnoses (empty = all)."""
    mixed_datasets_only: bool = False
    """Keep only datasets in which every class occurs (no site shortcut)."""
    label_name: str = ""
    """Segmentation: the ``volumes.label_name`` whose map is the target (non-zero = foreground)."""
    regression_bins: int = field(default=4)
    """Few-shot regression: K shots per quantile bin of the label."""
    saliency_region: Literal["tumour", "hippocampus"] | None = None
    """Where the task's signal lies, for the saliency mass check of ``brainiac evaluate``: ``tumour`` (the case's
    whole-tumour mask), ``hippocampus`` (the medial temporal lobe where the synthetic generator puts MCI atrophy), or
    none. An evaluation setting: it does not enter :meth:`fingerprint`."""

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.select_metric]

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.kind == "multiclass" else 1

    @property
    def is_classification(self) -> bool:
        return self.kind in ("multiclass", "binary")

    def fingerprint(self) -> str:
        """12 hex digits of the spec's content (label, classes, threshold, inputs, loss...): a registered model records
        it, so promotion can tell a model of this task definition from one of an older, different one. The description
        and the evaluation-only ``saliency_region`` are left out: they do not change what a model of the task is."""
        import hashlib
        import json
        from dataclasses import asdict

        body = {k: v for k, v in asdict(self).items() if k not in ("description", "saliency_region")}
        if not body["event_label"]:  # added later: a task without one keeps the fingerprint it always had
            del body["event_label"]
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def __post_init__(self) -> None:
        if self.select_metric not in self.metrics:
            raise ConfigError(f"task {self.name}: select_metric {self.select_metric} is not among its metrics")
        unknown = [m for m in self.metrics if m not in HIGHER_IS_BETTER]
        if unknown:
            raise ConfigError(f"task {self.name}: unknown metrics {unknown}")
        if self.kind == "multiclass" and len(self.classes) < 2:
            raise ConfigError(f"task {self.name}: a multiclass task lists its classes")
        if self.event_label and not (self.event_label.startswith("labels.") and self.threshold is not None):
            raise ConfigError(f"task {self.name}: event_label must be a labels.<key> of a task with a threshold")
        if self.loss == "cox" and not self.event_label:
            raise ConfigError(f"task {self.name}: the Cox loss needs an event_label (which cases were censored)")
        if self.kind == "binary" and self.threshold is None and len(self.classes) != 2:
            raise ConfigError(f"task {self.name}: a binary task needs two classes or a threshold")


@cache
def load_specs() -> dict[str, TaskSpec]:
    """Every task spec shipped in ``specs.yaml``, by name."""
    from brainiac.platform.config import from_dict, read_yaml_mapping

    data, _ = read_yaml_mapping("specs", package="brainiac.models.tasks", kind="task specs")
    return {name: from_dict(TaskSpec, {"name": name, **body}, prefix=f"tasks.{name}") for name, body in data.items()}


def task_spec(name: str) -> TaskSpec:
    """The spec of task ``name``.

    Raises:
        UserError: no such task (the message lists the known ones).
    """
    specs = load_specs()
    if name not in specs:
        raise UserError(f"unknown task '{name}'; known tasks: {', '.join(specs)}")
    return specs[name]
