"""The root configuration of a ``brainiac`` job: every layer's typed sections, assembled above the packages that define
them (docs/architecture.md#layers).

The foundation (:mod:`brainiac.platform.config`) holds the loader and its own sections (catalog, tracking, cluster,
ingest, synth); ingestion, models and jobs define theirs beside their code. Only this module, at the jobs layer, brings
them together, so no package imports one above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from brainiac.ingestion.preprocess.config import PreprocessConfig
from brainiac.ingestion.splits_config import SplitConfig
from brainiac.jobs.quickstart.config import QuickstartConfig
from brainiac.models.config import AugmentConfig, BackboneConfig, ProjectionConfig, SSLConfig
from brainiac.models.finetune_config import FinetuneConfig
from brainiac.models.promote_config import PromoteConfig
from brainiac.models.train_config import OptimConfig, PatchConfig, PretrainConfig
from brainiac.platform.config import (
    CatalogConfig,
    ClusterConfig,
    IngestConfig,
    SynthConfig,
    TrackingConfig,
    load_typed,
    shipped_yaml_names,
)
from brainiac.platform.fields import bounds

__all__ = ["CONFIG_PACKAGE", "Config", "available_configs", "load_config"]

CONFIG_PACKAGE = "brainiac.jobs.configs"
"""The package whose YAML files (package data, ``jobs/configs/*.yaml`` and ``jobs/configs/pretrain/*.yaml``) are the
shipped run configs that ``--config NAME`` and ``base: NAME`` name; the foundation's loader is told it here."""


@dataclass
class Config:
    """The whole configuration of a ``brainiac`` job. Later capabilities add their own sections here."""

    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    model: BackboneConfig = field(default_factory=BackboneConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    quickstart: QuickstartConfig = field(default_factory=QuickstartConfig)
    seed: int = field(default=0, metadata=bounds(ge=0))
    """Seed for every random draw a job makes, so that a run can be repeated exactly."""


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a job's config: shipped name or YAML path (``None`` = defaults), then ``section.key=value`` overrides, then
    validate everything.

    Example:
        >>> cfg = load_config("tiny", ["cluster.num_cpus=4"])
        >>> cfg.cluster.num_cpus
        4

    Raises:
        ConfigError: the file is missing or malformed, or a key is unknown, mistyped or out of range.
    """
    return load_typed(Config, source, overrides, package=CONFIG_PACKAGE)


def available_configs() -> list[str]:
    """Names of the run configs shipped inside the package (``tiny``, ``pretrain/tiny``, ...)."""
    return shipped_yaml_names(CONFIG_PACKAGE)
