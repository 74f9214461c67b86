"""Canonical vocabulary for catalog columns: sequence, sex, diagnosis, manufacturer, field strength, age in years and
survival as (time in days, event).

Real datasets spell the same fact many ways (``PTGENDER=Female``, ``sex=F``, DICOM ``PatientSex=F``; ``SIEMENS`` vs
``Siemens Healthineers``; ADNI ``DX=CN`` vs OASIS ``control``; ages as ``045Y``, ``age_at_scan=45.2`` or months). Every
adapter maps raw values through these functions, so a query for ``sequence = 'T1ce'`` or ``manufacturer = 'GE'`` means the
same thing for all 34 datasets. Unknown values map to ``other`` (or ``None`` for sex/age), never to a guess.
"""

from __future__ import annotations

import math
import re
from typing import Literal

__all__ = [
    "AGE_CAP_YEARS",
    "DIAGNOSES",
    "MANUFACTURERS",
    "SEQUENCES",
    "canonical_diagnosis",
    "canonical_field_strength",
    "canonical_manufacturer",
    "canonical_sex",
    "coarse_age",
    "infer_sequence",
    "parse_age_years",
    "parse_survival",
    "parse_vital_status",
]

Sequence = Literal["T1w", "T1ce", "T2w", "FLAIR", "DWI", "ADC", "SWI", "PD", "other"]
SEQUENCES: tuple[str, ...] = ("T1w", "T1ce", "T2w", "FLAIR", "DWI", "ADC", "SWI", "PD", "other")
DIAGNOSES: tuple[str, ...] = ("healthy", "MCI", "AD", "glioma", "stroke", "other")
MANUFACTURERS: tuple[str, ...] = ("Siemens", "GE", "Philips", "Canon", "Hitachi", "other")
AGE_CAP_YEARS = 90.0
"""HIPAA Safe Harbor: ages over 89 are reported as 90."""

# -- sequences ----------------------------------------------------------------------------------------------------------

_BIDS_SUFFIX = {
    "t1w": "T1w",
    "t2w": "T2w",
    "flair": "FLAIR",
    "t2flair": "FLAIR",
    "dwi": "DWI",
    "adc": "ADC",
    "swi": "SWI",
    "pd": "PD",
    "pdw": "PD",
}
_CONTRAST_ENTITY = re.compile(r"(gad|gd|gadolinium|contrast|post|ce|t1ce|t1gd)", re.I)

# Order matters: the most specific patterns first (flair before t2). T1ce is decided separately: a T1 indicator plus a
# contrast token anywhere ("T1W_3D_TFE_GD", "AX T1 SE +C", "MPRAGE POST", "t1ce", "t1gd").
_T1CE_COMPACT = re.compile(r"\bt1[-_ ]?(ce|gd|c|post|contrast|gad)\b", re.I)
_CONTRAST_TOKEN = re.compile(r"\b(gd|gad|gado\w*|contrast|post|ce|c|cor[-_ ]?post|enh\w*)\b|\+\s*c\b|\+gd", re.I)
_T1_TOKEN = re.compile(r"\bt1(w|[-_ ]?weighted)?\b|mprage|spgr|bravo|\btfl\b|\btfe\b|\bvibe\b", re.I)
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("FLAIR", re.compile(r"flair|dark[-_ ]?fluid|\btirm\b|\bfl[-_ ]?ir\b", re.I)),
    ("ADC", re.compile(r"\badc\b|apparent[-_ ]diffusion", re.I)),
    ("DWI", re.compile(r"\bdwi\b|diffusion|\bdiff\b|\bdti\b|trace", re.I)),
    ("SWI", re.compile(r"\bswi\b|susceptib", re.I)),
    ("PD", re.compile(r"\bpdw?\b|proton[-_ ]density", re.I)),
    ("T2w", re.compile(r"\bt2(?![-_ ]?\*)(w|[-_ ]?weighted|\b|[-_])|\btse\b|\bfse\b", re.I)),
    ("T1w", _T1_TOKEN),
)


def _match_patterns(text: str) -> str | None:
    normalized = re.sub(r"[._-]+", " ", text)  # "_" is a word character; make separators real word boundaries
    t1ce = _T1CE_COMPACT.search(normalized) or (_T1_TOKEN.search(normalized) and _CONTRAST_TOKEN.search(normalized))
    if t1ce and not re.search(r"flair|dark[-_ ]?fluid|\btirm\b|\bt2\b", normalized, re.I):
        return "T1ce"
    for name, pattern in _PATTERNS:
        if pattern.search(normalized):
            return name
    return None


def infer_sequence(
    bids_suffix: str | None = None,
    bids_ce: str | None = None,
    description: str | None = None,
    filename: str | None = None,
) -> tuple[str, str]:
    """Canonical sequence and the rule that decided it, tried in order: BIDS suffix → sidecar/DICOM description →
    file-name pattern.

    Args:
        bids_suffix: BIDS suffix such as ``T1w`` or ``FLAIR``.
        bids_ce: the BIDS ``ce-`` entity (a contrast agent); with ``T1w`` it means ``T1ce``.
        description: sidecar ``SeriesDescription``/``ProtocolName`` or DICOM SeriesDescription.
        filename: the file name (or its stem).

    Returns:
        ``(sequence, rule)`` with rule one of ``bids_suffix``, ``description``, ``filename``, ``unknown``.
    """
    if bids_suffix:
        seq = _BIDS_SUFFIX.get(bids_suffix.lower())
        if seq is not None:
            if seq == "T1w" and bids_ce and _CONTRAST_ENTITY.search(bids_ce):
                return "T1ce", "bids_suffix"
            return seq, "bids_suffix"
    if description:
        seq = _match_patterns(description)
        if seq is not None:
            return seq, "description"
    if filename:
        stem = re.sub(r"\.(nii(\.gz)?|dcm|mgz|nrrd)$", "", filename.rsplit("/", 1)[-1], flags=re.I)
        seq = _match_patterns(stem)
        if seq is not None:
            return seq, "filename"
    return "other", "unknown"


# -- demographics -------------------------------------------------------------------------------------------------------

_SEX = {"f": "F", "female": "F", "woman": "F", "w": "F", "2": "F", "m": "M", "male": "M", "man": "M", "1": "M"}


def canonical_sex(value: object) -> str | None:
    """``F``, ``M`` or ``None`` (unknown, other or missing). Numeric codes follow the common 1 = male, 2 = female."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    if text.endswith(".0"):
        text = text[:-2]
    return _SEX.get(text)


def _first_match(text: str, table: tuple[tuple[str, re.Pattern[str]], ...]) -> str:
    """The name of the first pattern of ``table`` found in ``text``, else ``other`` (never a guess)."""
    return next((name for name, pattern in table if pattern.search(text)), "other")


_DIAGNOSIS = (
    ("MCI", re.compile(r"\b(e|l)?mci\b|mild[-_ ]cognitive", re.I)),
    ("AD", re.compile(r"\bad\b|alzheimer|dementia", re.I)),
    ("healthy", re.compile(r"\b(cn|nc|hc|control|controls|healthy|normal|cognitively[-_ ]normal)\b", re.I)),
    ("glioma", re.compile(r"glioma|\bgbm\b|\blgg\b|\bhgg\b|astrocytoma|oligodendroglioma|glioblastoma", re.I)),
    ("stroke", re.compile(r"stroke|infarct|ischemi", re.I)),
)


def canonical_diagnosis(value: object) -> str | None:
    """One of :data:`DIAGNOSES`, or ``None`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        return None
    return _first_match(str(value).strip(), _DIAGNOSIS)


# -- scanner ------------------------------------------------------------------------------------------------------------

_VENDORS = (
    ("Siemens", re.compile(r"siemens", re.I)),
    ("GE", re.compile(r"\bge\b|general[-_ ]electric|ge[-_ ]medical|gehc", re.I)),
    ("Philips", re.compile(r"philips", re.I)),
    ("Canon", re.compile(r"canon|toshiba", re.I)),
    ("Hitachi", re.compile(r"hitachi|fujifilm", re.I)),
)


def canonical_manufacturer(value: object) -> str | None:
    """One of :data:`MANUFACTURERS`, or ``None`` when missing."""
    if value is None or not str(value).strip():
        return None
    return _first_match(str(value), _VENDORS)


def canonical_field_strength(value: object) -> float | None:
    """Field strength in tesla. Accepts ``3``, ``"3T"``, ``"1.5 T"`` and values in gauss (``15000`` → 1.5)."""
    if value is None:
        return None
    match = re.search(r"[-+]?\d*\.?\d+", str(value))
    if not match:
        return None
    tesla = float(match.group())
    if tesla > 100:  # recorded in gauss (some GE and old Philips headers)
        tesla /= 10_000
    if not 0.05 <= tesla <= 12:
        return None
    return round(tesla, 2)


_DICOM_AGE_UNITS: dict[str, Literal["years", "months", "weeks", "days"]] = {
    "Y": "years",
    "M": "months",
    "W": "weeks",
    "D": "days",
}
"""The unit letter of a DICOM age string (``045Y``)."""


def parse_age_years(value: object, unit: Literal["years", "months", "weeks", "days"] = "years") -> float | None:
    """Age in **years**, capped at :data:`AGE_CAP_YEARS` and coarsened so it cannot single a person out.

    Accepts numbers in ``unit``, DICOM age strings (``045Y``, ``006M``, ``012W``, ``030D``) whose own unit wins, and
    censored ages (``89+``, ``90+``, ``>89``: HIPAA's top-coding) read as the cap. Ages are rounded to 0.1 year, and
    under 2 years to whole months (1/12 year): an age to the day, with a scan date elsewhere, is a birth date.
    Returns ``None`` for missing, negative or unparseable values.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if not text:
        return None
    censored = re.fullmatch(r"(?:>\s*=?\s*)?(\d{2,3})\s*(?:Y|years?)?\s*(\+|or older|and older)?", text, re.I)
    if censored and (text.startswith(">") or censored.group(2)) and float(censored.group(1)) >= 85:
        return AGE_CAP_YEARS
    dicom = re.fullmatch(r"(\d{1,3})\s*([YMWD])", text, re.I)
    if dicom:
        number, unit_char = float(dicom.group(1)), dicom.group(2).upper()
        unit = _DICOM_AGE_UNITS[unit_char]
    else:
        try:
            number = float(text)
        except ValueError:
            return None
    if not math.isfinite(number) or number < 0:
        return None
    years = min(number / {"years": 1.0, "months": 12.0, "weeks": 52.1775, "days": 365.25}[unit], AGE_CAP_YEARS)
    return coarse_age(years)


def coarse_age(years: float) -> float:
    """Whole months (as years, 3 decimals) under 2 years, else 0.1 year."""
    if years < 2.0:
        return round(round(years * 12) / 12, 3)
    return round(years, 1)


# -- survival -----------------------------------------------------------------------------------------------------------

_DEAD = re.compile(r"\b(dead|deceased|died|death|expired)\b", re.I)
_ALIVE = re.compile(r"\b(alive|living|censored|lost[-_ ]to[-_ ]follow[-_ ]?up)\b", re.I)
_EVENT_CODES = {"1": True, "yes": True, "y": True, "true": True, "0": False, "no": False, "n": False, "false": False}
_TIME_UNITS = {"day": 1.0, "week": 7.0, "month": 30.4375, "year": 365.25}
_SURVIVAL_NUMBER = re.compile(r"\d+(?:\.\d+)?")
# What may stand around the one number of a survival text besides a status word: units and filler, nothing else, so
# that "ALIVE, last seen 2019-03-04" or "see notes" is refused instead of misread.
_SURVIVAL_FILLER = re.compile(r"\b(days?|weeks?|months?|years?|d|later|after|since|surgery|diagnosis|follow[-_ ]?up|"
                              r"at|last|os|of|for)\b|[()\[\],;:~+=-]", re.I)  # fmt: skip


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def parse_vital_status(value: object) -> bool | None:
    """Whether a vital-status / event column records the event (death): ``True`` for ``1``, ``dead``, ``Deceased``,
    ``died``, ``yes``; ``False`` for ``0``, ``alive``, ``Living``, ``censored``, ``no``; ``None`` for anything else
    (missing, ``unknown``, free text), never a guess. UCSF-PDGM's ``1-dead 0-alive`` column, UPENN-GBM's
    ``Survival_Status`` and a PACS export's ``VitalStatus`` all read through this."""
    if _missing(value) or isinstance(value, bool):
        return value if isinstance(value, bool) else None
    text = str(value).strip().lower()
    if text.endswith(".0"):
        text = text[:-2]
    if text in _EVENT_CODES:
        return _EVENT_CODES[text]
    dead, alive = bool(_DEAD.search(text)), bool(_ALIVE.search(text))
    return dead if dead != alive else None


def parse_survival(value: object, event: object = None) -> tuple[float | None, bool | None]:
    """``(time in days, event)`` of a right-censored survival label, or ``(None, None)`` when it cannot be read.

    BraTS 2019/2020 ``Survival_days`` holds a number (days to death: an observed event) for most cases and
    ``ALIVE (361 days later)`` for those still alive at last follow-up (censored at 361 days). Reading only what
    ``float()`` accepts drops exactly the survivors and biases the labels towards short survival, so every form is read:

    - a number (``123``, ``"123.0"``) or ``"123 days"``: the event at 123 days (BraTS' convention for a bare number);
    - a status word with one number, in either order (``ALIVE (361 days later)``, ``alive 361``, ``Deceased, 200 d``):
      censored (alive, living, censored, lost to follow-up) or the event (dead, deceased, died) at that time;
    - a number with a trailing ``+`` (``361+``): censored, the survival-analysis shorthand;
    - units other than days (``14 months``) are converted (30.4375 days a month, 365.25 a year).

    ``event`` is a separate vital-status column when the dataset card maps one (``survival_event``), read by
    :func:`parse_vital_status`; it decides the event for a bare number. Anything uncertain gives ``(None, None)``
    rather than a guess: missing or negative times, free text besides the number and units, several numbers, an event
    column that is present but unreadable, or an event column that contradicts the text. Dropping such a case does not
    depend on whether the patient died, so it cannot bias the labels the way dropping every ``ALIVE`` row did.
    """
    if _missing(value) or isinstance(value, bool):
        return None, None
    text_event: bool | None = None
    if isinstance(value, int | float):
        time = float(value)
    else:
        text = str(value).strip()
        try:
            time = float(text)
        except ValueError:
            numbers = _SURVIVAL_NUMBER.findall(text)
            dead, alive = bool(_DEAD.search(text)), bool(_ALIVE.search(text))
            rest = _SURVIVAL_FILLER.sub(" ", _ALIVE.sub(" ", _DEAD.sub(" ", _SURVIVAL_NUMBER.sub(" ", text))))
            if len(numbers) != 1 or (dead and alive) or rest.strip() or re.search(r"-\s*\d", text):
                return None, None
            time = float(numbers[0])
            lower = text.lower()
            unit = next((f for u, f in _TIME_UNITS.items() if re.search(rf"\b{u}s?\b", lower)), 1.0)
            time *= unit
            if dead or alive:
                text_event = dead
            elif text.rstrip().endswith("+"):
                text_event = False
    if not math.isfinite(time) or time < 0:
        return None, None
    column_event: bool | None = None
    if not _missing(event):
        column_event = parse_vital_status(event)
        if column_event is None:
            return None, None
    if column_event is not None and text_event is not None and column_event != text_event:
        return None, None
    chosen = column_event if column_event is not None else text_event
    return time, True if chosen is None else chosen
