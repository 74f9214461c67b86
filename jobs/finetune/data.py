"""Task data from the catalog: cases, inputs, labels and subject-level splits for one :class:`TaskSpec`.

Cases join current ``scans`` rows (of the datasets ``catalog.allowed_access`` allows, or the ones ``catalog.datasets``
names) with QC-passing ``volumes`` of one preprocess version. The sequence task takes every scan as a case; the others
take one case per subject session holding every listed sequence (channel order = the spec's). Splits come from the
catalog's ``splits`` table, so a subject is on exactly one side, and the few-shot / fraction regimes draw only from the
train subjects, deterministically per seed: K cases per class (scans for the sequence task, subject sessions otherwise),
or a fraction of the subjects.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from brainiac.ingestion.preprocess.config import PreprocessConfig
from brainiac.ingestion.splits import draw_fraction, draw_shots, read_splits
from brainiac.ingestion.volumes import decode_array, resolve_volume_set
from brainiac.jobs.config import Config
from brainiac.models.tasks.spec import TaskSpec
from brainiac.platform.catalog import Catalog, sql_literal
from brainiac.platform.errors import UserError

__all__ = ["CaseSelection", "TaskData", "load_task_data", "regime_cases", "regime_subjects"]

log = logging.getLogger(__name__)

SCAN_COLUMNS = ["scan_id", "dataset", "subject_id", "session", "sequence", "age_years", "diagnosis", "labels"]


@dataclass
class TaskData:
    """All cases of one task, in memory (fine-tuning sets are hundreds to thousands of cases, not the whole pool).

    Attributes:
        inputs: (n, S, D, H, W) float16, S = number of sequences.
        targets: (n,) float32 (regression, binary 0/1), int64 class indices, or (n, D, H, W) uint8 masks. A survival
            case censored before the threshold has no class: NaN (kept only for the Cox loss).
        raw: (n,) the label before binarising; for a task with an ``event_label`` (survival) (n, 2): the time and
            whether the event was observed there (1) or the case was censored (0), for the Cox loss and the C-index.
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
    preprocess_config: PreprocessConfig | None = None
    """The settings recorded for ``preprocess_version`` (:class:`~brainiac.ingestion.volumes.VolumeSet`), which a
    registered model keeps so that ``brainiac predict`` rebuilds its inputs; ``None`` when the catalog has no record."""

    def indices(self, split: str, subjects: AbstractSet[str] | None = None) -> np.ndarray:
        """Case indices of ``split`` (optionally only those of ``subjects``; a :class:`CaseSelection` keeps only its
        cases, so a few-shot draw is exactly the cases drawn, not every case of their subjects)."""
        cases = subjects.cases if isinstance(subjects, CaseSelection) else None
        return np.array(
            [
                i
                for i, (s, sub) in enumerate(zip(self.split, self.subjects, strict=True))
                if s == split and (subjects is None or sub in subjects) and (cases is None or self.case_ids[i] in cases)
            ],
            dtype=np.int64,
        )

    def counts(self) -> dict[str, int]:
        return {s: int(sum(1 for x in self.split if x == s)) for s in ("train", "val", "test")}


class CaseSelection(frozenset):
    """The subjects of a data regime that also names the exact cases drawn (:attr:`cases`, by case id).

    A set of subject ids, as :func:`regime_subjects` always returned, so set comparisons and membership tests keep
    working; :meth:`TaskData.indices` additionally keeps only :attr:`cases`, so a subject that has several cases
    contributes only the drawn ones.
    """

    cases: frozenset[str]

    def __new__(cls, subjects: set[str], cases: set[str]) -> CaseSelection:
        out = super().__new__(cls, subjects)
        out.cases = frozenset(cases)
        return out

    def __reduce__(self) -> tuple:
        return (CaseSelection, (set(self), set(self.cases)))


def _labels_json(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(row.get("labels") or "{}")


def _label_of(row: dict[str, Any], spec: TaskSpec) -> Any:
    if spec.label.startswith("labels."):
        return _labels_json(row).get(spec.label.split(".", 1)[1])
    return row.get(spec.label)


def _event_of(row: dict[str, Any], spec: TaskSpec) -> bool:
    """Whether the event was observed at the label's time. Rows of ingests before version 5 carry no event flag: they
    held only numeric survival times, which BraTS-style tables give for deaths, so they read as events."""
    value = _labels_json(row).get(spec.event_label.split(".", 1)[1])
    return True if value is None else bool(value)


def _target(
    value: Any, spec: TaskSpec, event: bool = True
) -> tuple[float | int | None, float | tuple[float, float] | None]:
    """(target, raw) for a label value, or (None, None) when the case has no usable label.

    With an ``event_label`` the value is a right-censored time and raw is ``(time, event)``. A case alive beyond the
    threshold is positive whether or not it died later, a death at or before it negative; a case censored at or before
    the threshold may yet pass it, so it has no class: left out of a ``bce`` task, kept with a NaN target for the Cox
    loss (whose risk sets it belongs to until its censoring time).
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None, None
    if spec.kind == "regression":
        return float(value), float(value)
    if spec.event_label:
        time = float(value)
        if time > cast(float, spec.threshold):  # TaskSpec: an event_label comes with a threshold
            target = 1.0
        elif event:
            target = 0.0
        elif spec.loss == "cox":
            target = float("nan")
        else:
            return None, None
        return target, (time, float(event))
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
    reader = catalog.restricted(cfg.catalog.allowed_access)
    volume_set = resolve_volume_set(reader, preprocess_version or cfg.patches.preprocess_version,
                                    table_version=pinned.get("volumes"))  # fmt: skip
    version, volumes_version = volume_set.preprocess_version, volume_set.volumes_version
    used = {"scans": pinned.get("scans", catalog.version("scans")), "volumes": volume_set.volumes_version,
            "splits": pinned.get("splits", catalog.version("splits"))}  # fmt: skip
    left_out = reader.access_report(cfg.catalog.datasets).line
    wanted = sorted(set(spec.sequences))  # exactly what the model reads (optional_sequences is unused)
    scans = reader.scans(dataset=cfg.catalog.datasets or None, sequence=wanted, version=used["scans"])
    rows = scans.to_arrow([*SCAN_COLUMNS, "access"]).to_pylist()
    if spec.diagnosis:
        rows = [r for r in rows if r.get("diagnosis") in spec.diagnosis]
    labelled = []
    for r in rows:
        label_target: float | int | None
        raw: float | tuple[float, float] | None
        if spec.kind == "segmentation":
            label_target, raw = 0, 0.0
        else:
            event = _event_of(r, spec) if spec.event_label else True
            label_target, raw = _target(_label_of(r, spec), spec, event)
        if label_target is not None:
            labelled.append({**r, "target": label_target, "raw": raw})
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
            labels = decode_array(v["labels_fixed"], v["fixed_shape"], "uint8")
            target: Any = (labels > 0).astype(np.uint8)
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
        preprocess_config=volume_set.config,
    )


def regime_cases(data: TaskData, *, shots: int | None, fraction: float | None, seed: int) -> np.ndarray:
    """Train case indices of a data regime: all, those of a ``fraction`` of the train subjects, or ``shots`` cases per
    class (regression: per quantile bin of the label; segmentation: ``shots`` cases), class-stratified.

    A case is what the task predicts on (a scan for a per-scan task, a subject session otherwise), so the few-shot
    regime trains on exactly K examples per class (all of a class with fewer, said in a log line); draws spread over
    distinct subjects first. Only train cases are ever drawn, so validation and test never shrink or leak. Survival
    cases without a class (censored before the threshold, Cox loss only) are their own stratum.
    """
    train = data.indices("train")
    if fraction is not None:
        keep = set(draw_fraction([data.subjects[i] for i in train], fraction, seed))
        return np.array([i for i in train if data.subjects[i] in keep], dtype=np.int64)
    if shots is None:
        return train
    spec = data.spec
    if spec.kind == "segmentation":
        strata: dict[int, object] = {int(i): "case" for i in train}
    elif spec.kind == "regression":
        values = data.targets[train].astype(float)
        edges = np.quantile(values, np.linspace(0, 1, spec.regression_bins + 1)[1:-1])
        strata = {int(i): int(np.searchsorted(edges, data.targets[i], side="right")) for i in train}
    else:
        strata = {int(i): int(data.targets[i]) if np.isfinite(data.targets[i]) else "no class" for i in train}
    labels = {data.case_ids[i]: c for i, c in strata.items()}
    groups = {data.case_ids[i]: data.subjects[i] for i in strata}
    drawn = set(draw_shots(labels, shots, seed, groups=groups))
    out = np.array([i for i in train if data.case_ids[i] in drawn], dtype=np.int64)
    log.info("task %s: %d-shot draw (seed %d) holds %d train cases of %d subjects", spec.name, shots, seed, len(out),
             len({data.subjects[i] for i in out}))  # fmt: skip
    return out


def regime_subjects(data: TaskData, *, shots: int | None, fraction: float | None, seed: int) -> CaseSelection:
    """The train subjects of a data regime, carrying the exact cases of :func:`regime_cases`.

    A :class:`CaseSelection`: a set of subject ids for callers that ask who is in the regime, which
    :meth:`TaskData.indices` narrows to the drawn cases (``data.indices("train", regime_subjects(...))`` gives K cases
    per class, not every case of K subjects per class).
    """
    cases = regime_cases(data, shots=shots, fraction=fraction, seed=seed)
    return CaseSelection({data.subjects[i] for i in cases}, {data.case_ids[i] for i in cases})
