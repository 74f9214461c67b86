"""Canonical vocabulary: every dataset's spelling maps to one catalog value, unknowns never become a guess."""

from __future__ import annotations

import pytest

from brainiac.ingestion.harmonize import (
    canonical_diagnosis,
    canonical_field_strength,
    canonical_manufacturer,
    canonical_sex,
    infer_sequence,
    parse_age_years,
)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"bids_suffix": "T1w"}, ("T1w", "bids_suffix")),
        ({"bids_suffix": "T1w", "bids_ce": "gadolinium"}, ("T1ce", "bids_suffix")),
        ({"bids_suffix": "FLAIR", "filename": "x_t1.nii.gz"}, ("FLAIR", "bids_suffix")),
        ({"description": "AX T1 POST GAD"}, ("T1ce", "description")),
        ({"description": "MPRAGE"}, ("T1w", "description")),
        ({"description": "T1W_3D_TFE_GD"}, ("T1ce", "description")),
        ({"description": "SAG 3D T1 BRAVO +C"}, ("T1ce", "description")),
        ({"description": "SAG 3D T1 BRAVO"}, ("T1w", "description")),
        ({"description": "MPRAGE_POST"}, ("T1ce", "description")),
        # The vendor protocol names the synthetic PACS export uses (Siemens, GE, Philips).
        ({"description": "t2_tirm_tra_dark-fluid"}, ("FLAIR", "description")),
        ({"description": "t1_mprage_sag_p2_post"}, ("T1ce", "description")),
        ({"description": "t2_tse_tra"}, ("T2w", "description")),
        ({"description": "ep2d_diff_tra_TRACEW"}, ("DWI", "description")),
        ({"description": "FLAIR_LONGTR"}, ("FLAIR", "description")),
        ({"description": "AX DWI 1000b"}, ("DWI", "description")),
        ({"description": "AX T2 FLAIR POST"}, ("FLAIR", "description")),
        ({"description": "Ax T2 FLAIR"}, ("FLAIR", "description")),
        ({"description": "AX T2 TSE"}, ("T2w", "description")),
        ({"filename": "BraTS2021_00012_t1ce.nii.gz"}, ("T1ce", "filename")),
        ({"filename": "case_t1gd.nii.gz"}, ("T1ce", "filename")),
        ({"filename": "BraTS2021_00012_t1.nii.gz"}, ("T1w", "filename")),
        ({"filename": "BraTS2021_00012_t2.nii.gz"}, ("T2w", "filename")),
        ({"filename": "BraTS2021_00012_flair.nii.gz"}, ("FLAIR", "filename")),
        ({"filename": "subj_adc.nii.gz"}, ("ADC", "filename")),
        ({"filename": "BraTS2021_00012_seg.nii.gz"}, ("other", "unknown")),
        ({"description": "localizer", "filename": "scan_t2.nii"}, ("T2w", "filename")),
    ],
)
def test_sequence_inference_order_and_rule(kwargs, expected):
    assert infer_sequence(**kwargs) == expected


def test_demographics_and_scanner_vocabulary():
    assert [canonical_sex(v) for v in ["F", "female", "Male", 1, 2.0, "O", None, float("nan")]] == [
        "F", "F", "M", "M", "F", None, None, None,
    ]  # fmt: skip
    assert [canonical_diagnosis(v) for v in ["CN", "EMCI", "LMCI", "Dementia", "control", "GBM", "ischemic stroke", "PD", ""]] == [
        "healthy", "MCI", "MCI", "AD", "healthy", "glioma", "stroke", "other", None,
    ]  # fmt: skip
    assert [canonical_manufacturer(v) for v in ["SIEMENS", "GE MEDICAL SYSTEMS", "Philips Healthcare", "TOSHIBA_MEC", "Bruker", ""]] == [
        "Siemens", "GE", "Philips", "Canon", "other", None,
    ]  # fmt: skip
    assert [canonical_field_strength(v) for v in [3, "1.5T", "15000", "2.89362", "abc", 0]] == [
        3.0,
        1.5,
        1.5,
        2.89,
        None,
        None,
    ]


def test_age_is_years_capped_at_90():
    assert parse_age_years("045Y") == 45.0
    assert parse_age_years("006M") == 0.5
    assert parse_age_years(540, unit="months") == 45.0
    assert parse_age_years("97") == 90.0  # HIPAA Safe Harbor
    assert parse_age_years("-3") is None and parse_age_years("n/a") is None and parse_age_years(None) is None


@pytest.mark.parametrize(
    ("raw", "unit", "expected"),
    [
        ("89+", "years", 90.0),
        ("90+", "years", 90.0),
        (">89", "years", 90.0),
        ("090Y", "years", 90.0),
        (45.3781, "years", 45.4),  # an age to the day, with a scan date, is a birth date: 0.1 year
        ("010D", "years", 0.0),  # under 2 years: whole months
        ("050D", "years", 0.167),
        (400, "days", 1.083),  # 13 months
        (1.49, "years", 1.5),  # 17.88 months -> 18
        ("3+", "years", None),  # not a top-coded age
    ],
)
def test_ages_are_coarsened_and_top_coded_ages_read_as_the_cap(raw, unit, expected):
    assert parse_age_years(raw, unit=unit) == expected
