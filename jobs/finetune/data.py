"""Task data from the catalog: cases, inputs, labels and subject-level splits for one :class:`TaskSpec`.

Cases join current ``scans`` rows (of the datasets ``catalog.allowed_access`` allows, or the ones ``catalog.datasets``
names) with QC-passing ``volumes`` of one preprocess version. The sequence task takes every scan as a case; the others
take one case per subject session holding every listed sequence (channel order = the spec's). Splits come from the
catalog's ``splits`` table, so a subject is on exactly one side, and the few-shot / fraction regimes draw only from the
train subjects, deterministically per seed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brainiac.ingestion.splits import draw_fraction, draw_shots, read_splits
from brainiac.ingestion.volumes import decode_array, newest_preprocess_version
from brainiac.models.tasks.spec import TaskSpec
from brainiac.platform.catalog import Catalog, sql_literal
from brainiac.platform.config import Config
from brainiac.platform.errors import UserError

__all__ = ["TaskData", "load_task_data", "regime_subjects"]

SCAN_COLUMNS = ["scan_id", "dataset", "subject_id", "session", "sequence", "age_years", "diagnosis", "labels"]


@dataclass
class TaskData:
    """All cases of one task, in memory (fine-tuning sets are hundreds to thousands of cases, not the whole pool).

    Attributes:
        inputs: (n, S, D, H, W) float16, S = number of sequences.
        targets: (n,) float32 (regression, binary 0/1), int64 class indices, or (n, D, H, W) uint8 masks.
        raw: (n,) the label before binarising (e.g. survival days), for the C-index.
    """

    spec: TaskSpec
    case_ids: list[str]
    scan_ids: list[str]
    """Per case, the scan of its first channel (the spec's first sequence): where its grid and geometry come from."""
    subjects: list[str]
    datasets: list[str]
    split: list[str]
    inputs: np.ndarray
    targets: np.ndarray
    raw: np.ndarray
    preprocess_version: str
    volumes_version: int
    access_levels: list[str] = field(default_factory=list)
    table_versions: dict[str, int] = field(default_factory=dict)
    """Delta versions of ``scans``, ``volumes`` and ``splits`` the cases were read at."""
    left_out: str | None = None
    """What ``catalog.allowed_access`` left out of the catalog (datasets, scans, levels), or ``None``."""

    def indices(self, split: str, subjects: set[str] | None = None) -> np.ndarray:
        """Case indices of ``split`` (optionally only those of ``subjects``)."""
        return np.array(
            [
                i
                for i, (s, sub) in enumerate(zip(self.split, self.subjects, strict=True))
                if s == split and (subjects is None or sub in subjects)
            ],
            dtype=np.int64,
        )

    def counts(self) -> dict[str, int]:
        return {s: int(sum(1 for x in self.split if x == s)) for s in ("train", "val", "test")}


def _label_of(row: dict[str, Any], spec: TaskSpec) -> Any:
    if spec.label.startswith("labels."):
        return json.loads(row.get("labels") or "{}").get(spec.label.split(".", 1)[1])
    return row.get(spec.label)


def _target(value: Any, spec: TaskSpec) -> tuple[float | int | None, float | None]:
    """(target, raw) for a label value, or (None, None) when the case has no usable label."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None, None
    if spec.kind == "regression":
        return float(value), float(value)
    if spec.threshold is not None:
        return float(float(value) > spec.threshold), float(value)
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if text not in spec.classes:
        return None, None
    index = spec.classes.index(text)
    return (index if spec.kind == "multiclass" else float(index)), float(index)


def load_task_data(
    catalog: Catalog,
    cfg: Config,
    spec: TaskSpec,
    preprocess_version: str = "",
    table_versions: Mapping[str, int] | None = None,
) -> TaskData:
    """Assemble every case of ``spec`` from the catalog: volumes of ``preprocess_version``, else of the config's
    ``patches.preprocess_version``, else of the newest version.

    ``table_versions`` pins ``scans``, ``volumes`` and ``splits`` to Delta versions (time travel), so an evaluation can be
    repeated on exactly the same cases later; tables not named are read at their current version, which
    :attr:`TaskData.table_versions` records.

    Only datasets that ``catalog.allowed_access`` allows are read (and of those, the ones ``catalog.datasets``
    names); :attr:`TaskData.left_out` says what was left out.

    Raises:
        UserError: no volumes, a named dataset that is unknown or at a level the job may not read, or no case with a
            label.
    """
    pinned = dict(table_versions or {})
    volumes_version = pinned.get("volumes", catalog.version("volumes"))
    if volumes_version is None:
        raise UserError(f"the catalog {catalog.uri} has no volumes table; run `brainiac preprocess` first")
    used = {"scans": pinned.get("scans", catalog.version("scans")), "volumes": int(volumes_version),
            "splits": pinned.get("splits", catalog.version("splits"))}  # fmt: skip
    reader = catalog.restricted(cfg.catalog.allowed_access)
    left_out = reader.access_report(cfg.catalog.datasets).line
    version = preprocess_version or cfg.patches.preprocess_version or newest_preprocess_version(reader)
    wanted = sorted(set(spec.sequences) | set(spec.optional_sequences))
    scans = reader.scans(dataset=cfg.catalog.datasets or None, sequence=wanted, version=used["scans"])
    rows = scans.to_arrow([*SCAN_COLUMNS, "access"]).to_pylist()
    if spec.diagnosis:
        rows = [r for r in rows if r.get("diagnosis") in spec.diagnosis]
    labelled = []
    for r in rows:
        target, raw = _target(_label_of(r, spec), spec) if spec.kind != "segmentation" else (0, 0.0)
        if target is not None:
            labelled.append({**r, "target": target, "raw": raw})
    if spec.mixed_datasets_only:
        classes: dict[str, set] = {}
        for r in labelled:
            classes.setdefault(r["dataset"], set()).add(r["target"])
        labelled = [r for r in labelled if len(classes[r["dataset"]]) > 1]
    if not labelled:
        raise UserError(f"task {spec.name}: no catalogued scan of sequences {wanted} carries the label '{spec.label}'")

    columns = ["scan_id", "fixed", "fixed_shape", "dtype", "labels_fixed", "label_name"]
    ids = [r["scan_id"] for r in labelled]
    where = f"preprocess_version = {sql_literal(version)} AND qc_pass"
    selected = catalog.select_keys("volumes", "scan_id", ids, columns, where=where, version=volumes_version)
    volumes = {v["scan_id"]: v for v in selected.to_pylist()}

    cases: dict[tuple, dict[str, dict]] = {}
    for r in labelled:
        if r["scan_id"] not in volumes:
            continue
        key = (r["scan_id"],) if spec.per_scan else (r["subject_id"], r.get("session") or "")
        cases.setdefault(key, {})[r["sequence"]] = r
    split_of = read_splits(catalog, cfg.splits.seed, version=used["splits"])
    out: dict[str, list] = {
        k: [] for k in ("case_ids", "scan_ids", "subjects", "datasets", "split", "inputs", "targets", "raw")
    }
    for key, by_sequence in sorted(cases.items()):
        if spec.per_scan:
            (row,) = by_sequence.values()
            channels = [row]
        else:
            if not all(s in by_sequence for s in spec.sequences):
                continue
            channels = [by_sequence[s] for s in spec.sequences]
        first = channels[0]
        split = split_of.get(first["subject_id"])
        if split is None:
            continue
        arrays = []
        for row in channels:
            v = volumes[row["scan_id"]]
            arrays.append(decode_array(v["fixed"], v["fixed_shape"], v["dtype"] or "float16"))
        if spec.kind == "segmentation":
            v = volumes[first["scan_id"]]
            if v["labels_fixed"] is None or (spec.label_name and v["label_name"] != spec.label_name):
                continue
            target: Any = (decode_array(v["labels_fixed"], v["fixed_shape"], "uint8") > 0).astype(np.uint8)
        else:
            target = first["target"]
        out["case_ids"].append("/".join(str(k) for k in key))
        out["scan_ids"].append(first["scan_id"])
        out["subjects"].append(first["subject_id"])
        out["datasets"].append(first["dataset"])
        out["split"].append(split)
        out["inputs"].append(np.stack(arrays))
        out["targets"].append(target)
        out["raw"].append(first["raw"])
    if not out["inputs"]:
        raise UserError(f"task {spec.name}: no case has every sequence {spec.sequences} preprocessed and split")
    if spec.kind == "multiclass":
        targets = np.asarray(out["targets"], dtype=np.int64)
    elif spec.kind == "segmentation":
        targets = np.stack(out["targets"])
    else:
        targets = np.asarray(out["targets"], dtype=np.float32)
    return TaskData(
        spec=spec,
        case_ids=out["case_ids"],
        scan_ids=out["scan_ids"],
        subjects=out["subjects"],
        datasets=out["datasets"],
        split=out["split"],
        inputs=np.stack(out["inputs"]),
        targets=targets,
        raw=np.asarray(out["raw"], dtype=np.float64),
        preprocess_version=version,
        volumes_version=int(volumes_version),
        access_levels=sorted({r["access"] for r in labelled}),
        table_versions={k: int(v) for k, v in used.items() if v is not None},
        left_out=left_out,
    )


def regime_subjects(data: TaskData, *, shots: int | None, fraction: float | None, seed: int) -> set[str]:
    """Train subjects of a data regime: all, a ``fraction`` of them, or ``shots`` per class (regression: per quantile
    bin of the label). Only train subjects are ever drawn, so validation and test never shrink or leak."""
    train = data.indices("train")
    subjects = [data.subjects[i] for i in train]
    if fraction is not None:
        return set(draw_fraction(subjects, fraction, seed))
    if shots is None:
        return set(subjects)
    spec = data.spec
    if spec.kind == "segmentation":
        labels = {data.subjects[i]: "case" for i in train}
    elif spec.kind == "regression":
        values = data.targets[train].astype(float)
        edges = np.quantile(values, np.linspace(0, 1, spec.regression_bins + 1)[1:-1])
        labels = {data.subjects[i]: int(np.searchsorted(edges, data.targets[i], side="right")) for i in train}
    else:
        labels = {data.subjects[i]: int(data.targets[i]) for i in train}
    return set(draw_shots(labels, shots, seed))
