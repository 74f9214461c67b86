"""The ``splits`` section of the run config (kept apart from :mod:`brainiac.ingestion.splits` so configs load light)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SplitConfig"]


@dataclass
class SplitConfig:
    """How subjects are split."""

    seed: int = field(default=0, metadata={"ge": 0})
    """Seed of the assignment; one catalog can hold splits for several seeds side by side."""
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    """Expected fractions of subjects in train, val and test (they must sum to 1)."""
    cover_small_datasets: bool = True
    """Give every dataset of three or more subjects at least one subject in each split when its subjects are first
    assigned (tiny cohorts would otherwise often have no test case for a task); stored splits never move."""

    def __post_init__(self) -> None:
        from brainiac.platform.errors import ConfigError

        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ConfigError(
                f"config key 'splits.fractions' must be three non-negative numbers summing to 1, got {self.fractions}"
            )
