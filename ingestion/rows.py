"""Turning a discovered, harvested scan into one harmonized, PHI-free catalog row."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from brainiac.ingestion.adapters.base import SourceScan
from brainiac.ingestion.cards import DatasetCard, normalize_case_id
from brainiac.ingestion.harmonize import (
    AGE_CAP_YEARS,
    canonical_diagnosis,
    canonical_field_strength,
    canonical_manufacturer,
    canonical_sex,
    coarse_age,
    infer_sequence,
    parse_age_years,
    parse_survival,
)
from brainiac.platform.pseudonym import Pseudonymizer

__all__ = ["INGEST_VERSION", "LABEL_KEYS", "build_row", "parse_idh"]

INGEST_VERSION = "5"
"""Bumped when the row semantics change, so rows from older ingests can be found and rebuilt (3: ages coarsened; 4: the
catalog holds source keys and staged images, real paths moved to the identified zone; 5: survival is read as (time,
event): ``labels.survival_days`` holds the event or censoring time and ``labels.survival_event`` whether the death was
observed, so BraTS' ``ALIVE (361 days later)`` rows are kept as censored instead of dropped)."""

LABEL_KEYS = ("idh", "survival_days", "survival_event", "stroke_onset_days", "resection", "mgmt")
"""Task labels a card may map from participants, manifests or label files."""


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def parse_idh(value: Any, positive: list[str]) -> bool | None:
    """IDH status as a boolean: ``mutant``/``IDH1 R132H``-style values are True, ``wildtype`` False, else None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    if not text or text in ("na", "n/a", "unknown", "nos", "nan"):
        return None
    if text.startswith(("wild", "wt", "negative", "0", "false", "no")):
        return False
    return True if any(text.startswith(p.lower()) for p in positive) else None


def label_lookup(
    card: DatasetCard | None, tables: dict[str, dict[str, dict[str, Any]]], subject: str
) -> dict[str, Any]:
    """Values for ``subject`` from the card's label files (already read into ``tables`` keyed by normalized id)."""
    if card is None:
        return {}
    key = normalize_case_id(subject, card.case_id_pattern)
    out: dict[str, Any] = {}
    for lf in card.label_files:
        row = tables.get(lf.path, {}).get(key)
        if row is None:
            continue
        for canonical, column in lf.columns.items():
            if row.get(column) not in (None, ""):
                out[canonical] = row[column]
    return out


def build_row(
    scan: SourceScan,
    facts: dict[str, Any],
    *,
    card: DatasetCard | None,
    access: str,
    pseudonymizer: Pseudonymizer,
    extra_labels: dict[str, Any],
    mask_uris: dict[str, str],
    now: dt.datetime,
) -> dict[str, Any]:
    """One ``scans`` row. ``facts`` holds the harvested geometry and content id; ``extra_labels`` what label files say."""
    meta = dict(scan.meta)
    participant = meta.pop("participant", {}) or {}
    sidecar = meta.pop("sidecar", {}) or {}
    dicom_header = facts.get("header") or {}
    cols = card.columns if card is not None else {}
    from_columns = {
        k: participant.get(cols[k])
        for k in (*LABEL_KEYS, "age", "sex", "diagnosis")
        if k in cols and cols[k] in participant
    }
    merged = {**from_columns, **extra_labels}

    age_raw = meta.get("age") if meta.get("age") not in (None, "") else merged.get("age")
    age = parse_age_years(age_raw, card.age_unit if card is not None else "years")
    if age is None and dicom_header.get("age_years") is not None:
        age = parse_age_years(dicom_header["age_years"])
    offset = _number(meta.get("age_offset_years"))
    if age is not None and offset is not None:
        age = coarse_age(min(age + offset, AGE_CAP_YEARS))

    sequence, rule = infer_sequence(**scan.sequence_hints)
    labels: dict[str, Any] = {}
    positive = card.idh_positive if card is not None else ["mutant", "mut", "positive", "1", "true"]
    if merged.get("idh") is not None:
        labels["idh"] = parse_idh(merged["idh"], positive)
    survival_time, survival_event = parse_survival(merged.get("survival_days"), merged.get("survival_event"))
    if survival_time is not None:
        labels["survival_days"], labels["survival_event"] = survival_time, survival_event
    if (value := _number(merged.get("stroke_onset_days"))) is not None:
        labels["stroke_onset_days"] = value
    for key in ("resection", "mgmt"):
        if merged.get(key) not in (None, ""):
            labels[key] = str(merged[key])
    labels.update({f"{kind}_uri": uri for kind, uri in mask_uris.items()})

    header = {**sidecar, **{k: v for k, v in dicom_header.items() if k != "age_years"}}
    return {
        "scan_id": facts["scan_id"],
        "dataset": scan.dataset,
        "layout": scan.layout,
        "access": access,
        "site": str(meta["site"]) if meta.get("site") not in (None, "") else None,
        "subject_id": pseudonymizer.subject_id(scan.dataset, scan.subject),
        "session": scan.session,
        "run": scan.run,
        "sequence": sequence,
        "sequence_rule": rule,
        "source_uri": scan.source_uri,
        "relative_path": scan.relative_path,
        "image_uri": facts.get("image_uri", scan.source_uri),
        "format": scan.format,
        "bytes": int(facts["bytes"]),
        "shape": [int(v) for v in facts["shape"]],
        "spacing_mm": [float(v) for v in facts["spacing_mm"]],
        "axcodes": facts["axcodes"],
        "affine": [float(v) for v in facts["affine"]],
        "qform_code": int(facts.get("qform_code", 0)),
        "sform_code": int(facts.get("sform_code", 0)),
        "dtype": facts["dtype"],
        "field_strength_t": canonical_field_strength(
            meta.get("field_strength") or dicom_header.get("MagneticFieldStrength")
        ),
        "manufacturer": canonical_manufacturer(meta.get("manufacturer") or dicom_header.get("Manufacturer")),
        "scanner_model": (meta.get("scanner_model") or dicom_header.get("ManufacturerModelName")) or None,
        "tr_ms": _number(meta.get("tr_ms") if meta.get("tr_ms") is not None else dicom_header.get("RepetitionTime")),
        "te_ms": _number(meta.get("te_ms") if meta.get("te_ms") is not None else dicom_header.get("EchoTime")),
        "age_years": age,
        "sex": canonical_sex(
            meta.get("sex")
            if meta.get("sex") not in (None, "")
            else merged.get("sex") or dicom_header.get("PatientSex")
        ),
        "diagnosis": canonical_diagnosis(
            meta.get("diagnosis")
            if meta.get("diagnosis") not in (None, "")
            else merged.get("diagnosis") or (card.default_diagnosis if card is not None else None)
        ),
        "labels": json.dumps(labels, sort_keys=True),
        "header": json.dumps(header, sort_keys=True, default=str),
        "status": "current",
        "ingested_at": now,
        "ingest_version": INGEST_VERSION,
    }
