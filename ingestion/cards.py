"""Dataset cards: one YAML per public dataset saying how to read it (layout, column names, label files) and under what
terms (access level, licence, citation).

A card is data, not code: adding a dataset with a known layout means writing a card. Cards ship in
``ingestion/datasets/*.yaml`` and are validated by the same typed loader as run configs, so a misspelt field or an
unknown access level is an error naming the field. ``access`` is enforced: jobs state which levels they may read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from brainiac.platform.config import from_dict, read_yaml_mapping, shipped_yaml_names
from brainiac.platform.errors import ConfigError

__all__ = ["ACCESS_LEVELS", "DatasetCard", "LabelFile", "available_cards", "card_for", "load_card", "normalize_case_id"]

ACCESS_LEVELS = ("open", "registered", "restricted")
"""``open``: anyone may download; ``registered``: sign-up and data-use terms (ADNI, PPMI, OASIS-3);
``restricted``: a signed DUA or institutional approval (hospital data, most clinical trials)."""

CARDS_PACKAGE = "brainiac.ingestion.datasets"


@dataclass
class LabelFile:
    """A table beside the images (clinical CSV/TSV) joined to scans by subject id."""

    path: str
    """Relative to the dataset root."""
    id_column: str
    """Column holding the subject/case id."""
    columns: dict[str, str] = field(default_factory=dict)
    """Canonical key (``idh``, ``survival_days``, ``age``, ``sex``, ``diagnosis``, ``stroke_onset_days`` ...) → column."""
    sep: str = ","
    """Field separator (``\\t`` for TSV)."""


@dataclass
class DatasetCard:
    """How to read one dataset and under what terms."""

    name: str
    layout: Literal["bids", "brats", "manifest", "dicom"]
    access: Literal["open", "registered", "restricted"]
    citation: str
    url: str = ""
    licence: str = ""
    description: str = ""
    conditions: list[str] = field(default_factory=list)
    """Populations in the dataset (healthy, glioma, stroke, MCI, AD ...)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Canonical key → source column in participants.tsv (BIDS) or the manifest (``subject``, ``session``, ``age``,
    ``sex``, ``diagnosis``, ``path``, ``site``, ``field_strength``, ``manufacturer``, ``description``)."""
    default_diagnosis: str = ""
    """Diagnosis of every subject when the dataset has no column for it (a healthy-volunteer study, a glioma release)."""
    age_unit: Literal["years", "months", "weeks", "days"] = "years"
    age_offset_column: str = ""
    """Manifest column with years since baseline, added to ``age`` (ADNIMERGE's AGE is the baseline age)."""
    manifest: str = ""
    """Manifest file name relative to the root (layout ``manifest``)."""
    label_files: list[LabelFile] = field(default_factory=list)
    label_maps: dict[str, str] = field(default_factory=dict)
    """BraTS-style file suffix (``seg``) or BIDS derivative suffix (``mask``) → label-map kind; not scans themselves."""
    case_id_pattern: str = r"(\d+)\D*$"
    """Regex whose first group is the canonical case number, so ``BraTS21_012`` and ``BraTS2021_00012`` match."""
    idh_positive: list[str] = field(default_factory=lambda: ["mutant", "mut", "positive", "1", "true", "yes"])
    """Raw IDH values (case-insensitive prefixes) meaning mutant."""
    synthetic: bool = False
    """True for the generated cohorts that mimic this card's real counterpart."""

    def __post_init__(self) -> None:
        try:
            re.compile(self.case_id_pattern)
        except re.error as exc:
            raise ConfigError(
                f"dataset card '{self.name}': field 'case_id_pattern' is not a valid regex: {exc}"
            ) from exc


def normalize_case_id(raw: object, pattern: str) -> str:
    """Canonical case key: the number the pattern captures, without leading zeros; else the stripped text."""
    text = str(raw).strip()
    match = re.search(pattern, text)
    if match and match.groups() and match.group(1) is not None:
        group = match.group(1)
        return str(int(group)) if group.isdigit() else group
    return text


def available_cards() -> list[str]:
    return shipped_yaml_names(CARDS_PACKAGE)


def load_card(source: str | Path) -> DatasetCard:
    """A shipped card by name, or a card YAML by path.

    Raises:
        ConfigError: unknown card, bad YAML, or a field that is unknown, mistyped or out of range (the message names the
            card and the field).
    """
    data, origin = read_yaml_mapping(source, CARDS_PACKAGE, kind="dataset card")
    try:
        return from_dict(DatasetCard, data, prefix="card")
    except ConfigError as exc:
        raise ConfigError(f"dataset card {origin}: {exc}") from exc
    except TypeError as exc:  # a required field is missing
        missing = re.findall(r"'(\w+)'", str(exc))
        raise ConfigError(f"dataset card {origin}: missing required field(s) {', '.join(missing) or str(exc)}") from exc


def card_for(dataset: str) -> DatasetCard | None:
    """The shipped card for a dataset name, if there is one."""
    return load_card(dataset) if dataset in available_cards() else None
