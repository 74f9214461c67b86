"""Survival read as right-censored (time, event) from the label file to the loss and the C-index, and few-shot draws
of K cases per class (issue #19, defects 1 and 3). Unit tests on hand-built rows and task data: no Ray, no catalog."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from brainiac.ingestion.adapters.base import SourceScan
from brainiac.ingestion.harmonize import parse_survival, parse_vital_status
from brainiac.ingestion.rows import build_row
from brainiac.jobs.finetune import data as data_module
from brainiac.jobs.finetune.data import TaskData, regime_subjects
from brainiac.jobs.finetune.engine import TargetScale, _loss_fn, predict, score
from brainiac.models.tasks.spec import task_spec
from brainiac.platform.errors import ConfigError
from brainiac.platform.pseudonym import Pseudonymizer

SURVIVAL = task_spec("survival")
COX = dataclasses.replace(SURVIVAL, loss="cox")


# --- parsing ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "event", "expected"),
    [
        (123, None, (123.0, True)),  # BraTS: a bare number is the day of death
        ("123", None, (123.0, True)),
        ("123.0", None, (123.0, True)),
        ("ALIVE (361 days later)", None, (361.0, False)),  # BraTS 2020 survival_info.csv
        ("alive 361", None, (361.0, False)),
        ("Alive, 361 days", None, (361.0, False)),
        ("361+", None, (361.0, False)),
        ("Deceased (200 d)", None, (200.0, True)),
        ("14 months", None, (14 * 30.4375, True)),
        (300, "alive", (300.0, False)),  # a vital-status column (PACS export)
        (300, "Deceased", (300.0, True)),
        ("300", "0", (300.0, False)),  # UCSF-PDGM's "1-dead 0-alive"
        (300, 1.0, (300.0, True)),
        (300, "", (300.0, True)),  # an empty status cell: the number's own convention
        # Junk is refused, alive or dead alike: never a guess, never a bias towards deaths.
        ("NA", None, (None, None)),
        ("", None, (None, None)),
        (None, None, (None, None)),
        (float("nan"), None, (None, None)),
        ("ALIVE", None, (None, None)),
        ("ALIVE, last seen 2019-03-04", None, (None, None)),
        ("see notes 12", None, (None, None)),
        ("12 days 13", None, (None, None)),
        (-5, None, (None, None)),
        (True, None, (None, None)),
        (300, "unknown", (None, None)),
        ("ALIVE (3 days later)", "dead", (None, None)),  # text and status column disagree
    ],
)
def test_survival_labels_parse_to_time_and_event(value, event, expected):
    time, observed = parse_survival(value, event)
    if expected[0] is None:
        assert (time, observed) == (None, None)
    else:
        assert time == pytest.approx(expected[0]) and observed is expected[1]


def test_vital_status_vocabulary():
    assert [parse_vital_status(v) for v in ("1", 1, "Dead", "deceased", "yes")] == [True] * 5
    assert [parse_vital_status(v) for v in ("0", 0, "Alive", "living", "Censored")] == [False] * 5
    assert [parse_vital_status(v) for v in (None, "", "unknown", "dead or alive", 7)] == [None] * 5


def _row(labels: dict) -> dict:
    scan = SourceScan("synth-brats", "brats", "key:x", "c/c_t1.nii.gz", "c", sequence_hints={"filename": "c_t1"})
    facts = {"scan_id": "a" * 64, "bytes": 1, "shape": [2, 2, 2], "spacing_mm": [1, 1, 1], "axcodes": "RAS",
             "affine": np.eye(4).ravel().tolist(), "dtype": "int16"}  # fmt: skip
    row = build_row(scan, facts, card=None, access="open", pseudonymizer=Pseudonymizer(b"k" * 32),
                    extra_labels=labels, mask_uris={}, now=dt.datetime.now(dt.UTC))  # fmt: skip
    return json.loads(row["labels"])


def test_catalog_rows_keep_censored_survivors():
    # Before: float() failed on the ALIVE form, so only the deaths reached the catalog.
    assert _row({"survival_days": "ALIVE (361 days later)"}) == {"survival_days": 361.0, "survival_event": False}
    assert _row({"survival_days": "420"}) == {"survival_days": 420.0, "survival_event": True}
    assert _row({"survival_days": "420", "survival_event": "alive"}) == {
        "survival_days": 420.0,
        "survival_event": False,
    }
    assert _row({"survival_days": "unknown"}) == {}


def test_binary_survival_target_respects_censoring():
    t = SURVIVAL.threshold
    assert data_module._target(t + 100, SURVIVAL, event=True) == (1.0, (t + 100, 1.0))
    assert data_module._target(t + 100, SURVIVAL, event=False) == (1.0, (t + 100, 0.0))  # alive past 15 months
    assert data_module._target(t - 100, SURVIVAL, event=True) == (0.0, (t - 100, 1.0))
    # Censored before the threshold: the class is unknown. Left out for BCE, kept for the Cox loss's risk sets.
    assert data_module._target(t - 100, SURVIVAL, event=False) == (None, None)
    target, raw = data_module._target(t - 100, COX, event=False)
    assert math.isnan(target) and raw == (t - 100, 0.0)
    assert data_module._event_of({"labels": json.dumps({"survival_event": False})}, SURVIVAL) is False
    with pytest.raises(ConfigError, match="event_label"):
        dataclasses.replace(SURVIVAL, event_label="", loss="cox")


# --- the C-index sign and the Cox loss ------------------------------------------------------------------------------


class _Risk(nn.Module):
    """A 'model' whose output for case i is the i-th value of its input's first voxel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, 0, 0, 0]


def _survival_cases():
    time = np.array([100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0])
    event = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])  # three censored
    raw = np.stack([time, event], axis=1)
    targets = np.where(time > SURVIVAL.threshold, 1.0, np.where(event == 1, 0.0, np.nan))
    return time, event, raw, targets


@pytest.mark.parametrize("spec", [SURVIVAL, COX], ids=["bce", "cox"])
def test_c_index_sign_perfect_and_reversed_ranking(spec):
    time, _, raw, targets = _survival_cases()
    # What each loss learns when it ranks correctly: BCE a high logit for long survival, Cox a high risk for short.
    right = time / 100 if spec.loss == "bce" else -time / 100
    for output, expected in ((right, 1.0), (-right, 0.0)):
        x = torch.zeros(len(time), 1, 2, 2, 2)
        x[:, 0, 0, 0, 0] = torch.as_tensor(output, dtype=torch.float32)
        predictions = predict(_Risk(), spec, x.numpy(), TargetScale())
        metrics = score(spec, predictions, targets, raw)
        assert metrics["c_index"] == pytest.approx(expected)
        assert metrics["auc"] == pytest.approx(expected)  # on the cases with a class only


def test_c_index_counts_censored_cases_only_in_their_risk_sets():
    time, event, raw, targets = _survival_cases()
    # Case 2, censored at 300 (alive then), is predicted to live longest. Read as a death at 300 it would be discordant
    # with the five cases that outlived it; censored, its only comparable pairs are the deaths before 300, which it
    # outlived as predicted, so the ranking is perfect.
    prediction = time / 1000
    prediction[2] = 10.0
    censored = score(SURVIVAL, prediction, targets, raw)["c_index"]
    as_events = score(SURVIVAL, prediction, targets, np.stack([time, np.ones_like(event)], axis=1))["c_index"]
    assert censored == 1.0  # 20 comparable pairs, all concordant
    assert as_events == pytest.approx(23 / 28)
    with pytest.raises(ValueError, match="time, event"):
        score(SURVIVAL, prediction, targets, time)  # a bare time would read every case as a death


def test_cox_loss_reads_the_event_flags():
    loss = _loss_fn(COX)
    time, event, raw, _ = _survival_cases()
    risk = torch.as_tensor(np.linspace(1, -1, len(time)), dtype=torch.float32)[:, None]
    y = torch.zeros(len(time))
    base = loss(risk, y, torch.as_tensor(raw, dtype=torch.float32))
    flipped = raw.copy()
    flipped[2, 1] = 1.0  # the case censored at 300 now dies there
    other = loss(risk, y, torch.as_tensor(flipped, dtype=torch.float32))
    everyone = loss(risk, y, torch.as_tensor(np.stack([time, np.ones_like(event)], axis=1), dtype=torch.float32))
    assert base.item() != pytest.approx(other.item()) and base.item() != pytest.approx(everyone.item())
    with pytest.raises(ValueError, match="time, event"):
        loss(risk, y, torch.as_tensor(time, dtype=torch.float32))


# --- few-shot draws -----------------------------------------------------------------------------------------------------


def _sequence_data(subjects: int = 40, sessions: int = 2) -> TaskData:
    """A per-scan task: every subject has ``sessions`` sessions of the four sequences; 60 % of subjects train."""
    spec = task_spec("sequence")
    case_ids, subject_ids, split, targets = [], [], [], []
    for s in range(subjects):
        side = "train" if s % 5 < 3 else ("val" if s % 5 == 3 else "test")
        for session in range(sessions):
            for c, _ in enumerate(spec.classes):
                case_ids.append(f"scan-{s}-{session}-{c}")
                subject_ids.append(f"sub-{s:03d}")
                split.append(side)
                targets.append(c)
    n = len(case_ids)
    return TaskData(spec=spec, case_ids=case_ids, scan_ids=list(case_ids), subjects=subject_ids, datasets=["d"] * n,
                    split=split, inputs=np.zeros((n, 1, 2, 2, 2), np.float16), targets=np.asarray(targets, np.int64),
                    raw=np.asarray(targets, np.float64), preprocess_version="p", volumes_version=0)  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_k_shots_are_k_cases_per_class_for_a_per_scan_task(seed):
    data = _sequence_data()
    keep = regime_subjects(data, shots=5, fraction=None, seed=seed)
    train = data.indices("train", keep)  # what the fine-tuning worker trains on
    counts = np.bincount(data.targets[train], minlength=4)
    assert counts.tolist() == [5, 5, 5, 5]  # before: every scan of 5 subjects per class, 10+ per class
    assert all(data.split[i] == "train" for i in train)
    assert keep <= {data.subjects[i] for i in data.indices("train")}
    for c in range(4):  # a class's five draws come from five different subjects when it has them
        assert len({data.subjects[i] for i in train if data.targets[i] == c}) == 5
    again = data.indices("train", regime_subjects(data, shots=5, fraction=None, seed=seed))
    assert again.tolist() == train.tolist()


def test_k_shots_take_all_of_a_small_class_and_say_so(caplog):
    data = _sequence_data(subjects=10, sessions=1)  # 6 train subjects: 6 cases per class
    t1ce = [i for i, c in enumerate(data.case_ids) if c.endswith("-3")]
    data.targets[t1ce[2:]] = 0  # T1ce kept only by subjects 0 and 1, both in train
    with caplog.at_level(logging.WARNING, logger="brainiac.ingestion.splits"):
        train = data.indices("train", regime_subjects(data, shots=5, fraction=None, seed=0))
    counts = np.bincount(data.targets[train], minlength=4)
    assert counts.tolist() == [5, 5, 5, 2]
    assert "fewer than K = 5" in caplog.text


def test_fraction_and_full_regimes_keep_whole_subjects():
    data = _sequence_data()
    full = data.indices("train", regime_subjects(data, shots=None, fraction=None, seed=0))
    assert full.tolist() == data.indices("train").tolist()
    half = data.indices("train", regime_subjects(data, shots=None, fraction=0.5, seed=0))
    subjects = {data.subjects[i] for i in half}
    assert len(subjects) == 12 and len(half) == 12 * 8  # every scan of half the 24 train subjects


# --- end to end on the synthetic cohort -----------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_ingested_survival_keeps_the_generators_censored_cases(pipeline):
    """synth-brats writes ``ALIVE (N days later)`` and synth-gbm-dicom a ``VitalStatus`` column for the ~15 % of
    gliomas the generator censors; every glioma with a survival record reaches the catalog with its own (time, event)."""
    from brainiac.ingestion.identified import identify

    rows = identify(pipeline.catalog.scans().to_pandas(), pipeline.catalog.uri)
    merged = rows.merge(pipeline.truth, left_on=["dataset", "relative_path"], right_on=["dataset", "path"])
    glioma = merged[merged["survival_days"].notna()]
    assert len(glioma) > 0
    seen = {True: 0, False: 0}
    for row in glioma.itertuples():
        labels = json.loads(row.labels)
        if "survival_days" not in labels:  # BraTS-style tables leave some cases out entirely, as real ones do
            assert row.dataset == "synth-brats"
            continue
        censored = not math.isnan(row.survival_censored_days)
        expected = row.survival_censored_days if censored else row.survival_days
        assert abs(labels["survival_days"] - expected) <= 0.5 and labels["survival_event"] is (not censored), row
        seen[not censored] += 1
    assert seen[True] > 0
    truth_censored = glioma["survival_censored_days"].notna() & glioma["labels"].str.contains("survival_days")
    assert seen[False] == int(truth_censored.sum())
    assert seen[False] > 0  # the tiny pipeline's cohort (seed 7) censors a synth-gbm-dicom glioma: VitalStatus alive
