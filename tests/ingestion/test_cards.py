"""Shipped dataset cards: every card loads through the typed loader, the real public datasets are all there, and the
loader rejects a misspelt or missing field by name."""

from __future__ import annotations

import re
from dataclasses import fields
from importlib import resources
from pathlib import Path

import pytest

from brainiac.ingestion.cards import (
    ACCESS_LEVELS,
    CARDS_PACKAGE,
    DatasetCard,
    available_cards,
    load_card,
    normalize_case_id,
)
from brainiac.platform.errors import ConfigError

REAL_DATASETS = {
    "brats-2021",
    "upenn-gbm",
    "ucsf-pdgm",
    "adni",
    "oasis-3",
    "ixi",
    "atlas-v2",
    "isles-2022",
    "openneuro-ds000228",
    "ppmi",
    "abide",
    "camcan",
}
"""Real public datasets that must have a card. Other cards (the ``synth-`` cohorts) may ship beside them."""

DEFAULT_PATTERN = next(f.default for f in fields(DatasetCard) if f.name == "case_id_pattern")

MINIMAL_CARD = "name: tiny\nlayout: bids\naccess: open\ncitation: Nobody (2024).\n"


def _card_files() -> list[str]:
    return sorted(p.name for p in resources.files(CARDS_PACKAGE).iterdir() if p.name.endswith((".yaml", ".yml")))


@pytest.fixture(scope="module")
def cards() -> dict[str, DatasetCard]:
    return {name: load_card(name) for name in available_cards()}


def test_every_card_file_is_picked_up() -> None:
    """A card saved as ``.yml`` would be invisible to ``available_cards``; all cards use ``.yaml``."""
    files = _card_files()
    assert files, "no dataset cards shipped"
    assert all(f.endswith(".yaml") for f in files), files


def test_required_real_datasets_are_present(cards: dict[str, DatasetCard]) -> None:
    missing = REAL_DATASETS - set(cards)
    assert not missing, f"no card for {sorted(missing)}"


def test_card_name_matches_file_name(cards: dict[str, DatasetCard]) -> None:
    for file_name, card in cards.items():
        assert card.name == file_name, f"{file_name}.yaml declares name {card.name!r}"
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", card.name), (
            f"card name {card.name!r} is not lowercase-hyphenated"
        )


def test_access_levels(cards: dict[str, DatasetCard]) -> None:
    for card in cards.values():
        assert card.access in ACCESS_LEVELS, card.name
    real = [cards[name] for name in REAL_DATASETS]
    levels = {card.access for card in real}
    assert "registered" in levels
    assert "open" in levels


def test_real_cards_are_documented(cards: dict[str, DatasetCard]) -> None:
    for name in sorted(REAL_DATASETS):
        card = cards[name]
        assert card.synthetic is False, name
        assert card.citation.strip(), name
        assert card.url.startswith("https://"), name
        assert card.licence.strip(), name
        assert card.description.strip(), name
        assert card.conditions, name
        if card.layout == "manifest":
            assert card.manifest, f"{name}: manifest layout without a manifest file"
        for label_file in card.label_files:
            assert label_file.path and label_file.id_column, name


def test_case_id_patterns_have_a_group(cards: dict[str, DatasetCard]) -> None:
    """``normalize_case_id`` uses group 1; a pattern without one would silently fall back to the raw text."""
    for card in cards.values():
        assert re.compile(card.case_id_pattern).groups >= 1, card.name


def test_misspelt_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(MINIMAL_CARD + "licnce: CC0\n")
    with pytest.raises(ConfigError, match="licnce"):
        load_card(path)


def test_missing_required_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "no-access.yaml"
    path.write_text(MINIMAL_CARD.replace("access: open\n", ""))
    with pytest.raises(ConfigError, match="access"):
        load_card(path)


def test_minimal_card_loads(tmp_path: Path) -> None:
    """The two negative tests above fail for the named reason only: the card they start from is valid."""
    path = tmp_path / "tiny.yaml"
    path.write_text(MINIMAL_CARD)
    card = load_card(path)
    assert (card.name, card.layout, card.access) == ("tiny", "bids", "open")


def test_brats_case_ids_match_across_releases(cards: dict[str, DatasetCard]) -> None:
    assert normalize_case_id("BraTS2021_00012", DEFAULT_PATTERN) == normalize_case_id("BraTS21_012", DEFAULT_PATTERN)
    pattern = cards["brats-2021"].case_id_pattern
    keys = {normalize_case_id(raw, pattern) for raw in ("BraTS2021_00012", "BraTS21_012", "BraTS2021_00012_t1")}
    assert keys == {"12"}


@pytest.mark.parametrize(
    ("dataset", "same", "different"),
    [
        ("upenn-gbm", ["UPENN-GBM-00001_11", "UPENN-GBM-00001_21", "UPENN-GBM-00001"], "UPENN-GBM-00011_11"),
        ("ucsf-pdgm", ["UCSF-PDGM-0004", "UCSF-PDGM-004", "UCSF-PDGM-0004_T1"], "UCSF-PDGM-0001"),
        ("ixi", ["IXI002-Guys-0828-T1", 2], "IXI012-HH-1211-T1"),
        ("adni", ["011_S_0002", "ADNI/011_S_0002/MPRAGE"], "022_S_0002"),
        ("atlas-v2", ["sub-r001s001", "sub-r001s001_ses-1_T1w"], "sub-r002s001"),
        ("oasis-3", ["sub-OAS30001", "OAS30001", "OAS30001_MR_d0129"], "OAS30002"),
        ("abide", ["sub-0050002", 50002], "sub-0050003"),
        ("camcan", ["sub-CC110033", "CC110033"], "CC110037"),
    ],
)
def test_dataset_case_ids_join_images_to_tables(
    cards: dict[str, DatasetCard], dataset: str, same: list[object], different: str
) -> None:
    """Each card's pattern gives one key for the ids its images and its tables use, and distinct keys for others."""
    pattern = cards[dataset].case_id_pattern
    keys = {normalize_case_id(raw, pattern) for raw in same}
    assert len(keys) == 1, f"{dataset}: {same} -> {keys}"
    assert normalize_case_id(different, pattern) not in keys
