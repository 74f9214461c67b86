"""Subject-level splits that never move: train/val/test as a keyed hash of the subject pseudonym and a seed.

A subject's split is ``hash(seed, subject_id)`` mapped onto the configured fractions, so it does not depend on who else
is in the catalog: a growing lake never reshuffles old subjects, and re-running gives the same table. The one exception
is a small dataset's first assignment, which is nudged so that train, val and test each get one of its subjects
(``splits.cover_small_datasets``); stored rows never move either way. Subjects linked
in the ``duplicates`` table (the same person stored in two datasets) take the split of their group's first member, so
no image reaches two splits. Few-shot (K cases per class) and fraction (of subjects) draws come from the train split,
deterministic per seed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from brainiac.ingestion.graph import connected_components
from brainiac.ingestion.splits_config import SplitConfig
from brainiac.platform.catalog import SPLITS_SCHEMA, Catalog, insert_missing, merge_with_retry

__all__ = ["SPLITS_SCHEMA", "SplitConfig", "assign", "draw_fraction", "draw_shots", "subject_groups", "write_splits"]

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


def _unit(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from (seed, key), stable across machines and Python versions."""
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def subject_groups(subjects: Iterable[str], links: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Map each subject to its group id: the smallest subject id connected to it through duplicate links."""
    return connected_components(subjects, links)


def assign(subject_or_group: str, cfg: SplitConfig) -> str:
    """The split of a subject (or duplicate group) under ``cfg``."""
    u = _unit(cfg.seed, subject_or_group)
    train, val, _ = cfg.fractions
    return "train" if u < train else ("val" if u < train + val else "test")


def _duplicate_links(catalog: Catalog) -> list[tuple[str, str]]:
    dup = catalog.read("duplicates", columns=["group_id", "subject_id"])
    members: dict[str, list[str]] = defaultdict(list)
    for g, s in zip(dup["group_id"].to_pylist(), dup["subject_id"].to_pylist(), strict=True):
        members[g].append(s)
    return [(m[0], other) for m in members.values() for other in m[1:]]


@dataclass
class SplitSummary:
    counts: dict[str, int]
    new_subjects: int
    conflicts: list[str]
    """Subjects whose stored split disagrees with their duplicate group (kept as stored; old rows never move)."""


def _cover_small_datasets(
    final: dict[str, str], movable: set[str], datasets: Mapping[str, str], cfg: SplitConfig
) -> dict[str, str]:
    """Moves that give every dataset of three or more subjects at least one subject in each split.

    Hash thresholds leave a split empty for a small dataset by chance (5 subjects at 70/15/15: no test subject 44 % of
    the time), and then its tasks cannot be evaluated at all. Only subjects being assigned now (``movable``) move, one
    per empty split, from a split that keeps another member; the one whose hash lies nearest the empty split's interval
    goes. Stored assignments never move, and a big dataset never triggers this.
    """
    train, val, _ = cfg.fractions
    target = {"val": (train + train + val) / 2, "test": 1.0}
    members: dict[str, list[str]] = defaultdict(list)
    for subject, dataset in sorted(datasets.items()):
        if subject in final:
            members[dataset].append(subject)
    moves: dict[str, str] = {}
    for subjects in members.values():
        if len(subjects) < len(SPLITS):
            continue
        current = {s: moves.get(s, final[s]) for s in subjects}
        for split in ("test", "val"):
            if split in current.values():
                continue
            sizes: defaultdict[str, int] = defaultdict(int)
            for v in current.values():
                sizes[v] += 1
            candidates = [s for s in subjects if s in movable and sizes[current[s]] > 1]
            if not candidates:
                continue
            chosen = min(candidates, key=lambda s: abs(_unit(cfg.seed, s) - target[split]))
            current[chosen] = moves[chosen] = split
    return moves


def write_splits(
    catalog: Catalog, subjects: Sequence[str], cfg: SplitConfig, datasets: Mapping[str, str] | None = None
) -> SplitSummary:
    """Assign every subject not yet in ``splits`` for ``cfg.seed``; existing assignments are never changed.

    ``datasets`` (subject → dataset) lets a small dataset's first assignment cover train, val and test (see
    :func:`_cover_small_datasets`); without it every subject takes its hash split.
    """
    groups = subject_groups(subjects, _duplicate_links(catalog))
    now = dt.datetime.now(dt.UTC)

    def attempt() -> SplitSummary:
        dt_ = catalog.create_if_missing("splits")
        have = catalog.select("splits", f"seed = {int(cfg.seed)}", ["subject_id", "split"])
        stored = dict(zip(have["subject_id"].to_pylist(), have["split"].to_pylist(), strict=True))
        # A group follows a member that already has a split, so a new copy of an old subject joins its side.
        group_split: dict[str, str] = {}
        for s, g in sorted(groups.items()):
            if s in stored:
                group_split.setdefault(g, stored[s])
        rows: list[dict[str, Any]] = []
        conflicts: list[str] = []
        for s in sorted(set(subjects)):
            g = groups.get(s, s)
            want = group_split.setdefault(g, assign(g, cfg))
            if s in stored:
                if stored[s] != want:
                    conflicts.append(s)
                continue
            rows.append({"subject_id": s, "seed": int(cfg.seed), "split": want, "group_id": g, "assigned_at": now})
        if datasets and cfg.cover_small_datasets:
            size = Counter(groups.values())
            alone = {s for s, g in groups.items() if size[g] == 1}
            movable = {r["subject_id"] for r in rows} & (alone | (set(subjects) - set(groups)))
            planned = {**stored, **{r["subject_id"]: r["split"] for r in rows}}
            moves = _cover_small_datasets(planned, movable, datasets, cfg)
            for r in rows:
                r["split"] = moves.get(r["subject_id"], r["split"])
        if rows:
            insert_missing(dt_, pa.Table.from_pylist(rows, schema=SPLITS_SCHEMA), ["subject_id", "seed"])
        final = {**stored, **{r["subject_id"]: r["split"] for r in rows}}
        counts = {k: sum(1 for s in set(subjects) if final.get(s) == k) for k in SPLITS}
        return SplitSummary(counts, len(rows), conflicts)

    return merge_with_retry(attempt, what="splits")


def read_splits(
    catalog: Catalog, seed: int, subjects: Sequence[str] | None = None, version: int | None = None
) -> dict[str, str]:
    """subject_id → split for ``seed`` (optionally only for ``subjects``; ``version`` time-travels the table)."""
    where = f"seed = {int(seed)}"
    columns = ["subject_id", "split"]
    if subjects is None:
        t = catalog.select("splits", where, columns, version=version)
    else:
        t = catalog.select_keys("splits", "subject_id", subjects, columns, where=where, version=version)
    return dict(zip(t["subject_id"].to_pylist(), t["split"].to_pylist(), strict=True))


def draw_fraction(train_subjects: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A deterministic ``fraction`` of the train subjects (at least one), independent of their order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ranked = sorted(set(train_subjects), key=lambda s: _unit(seed, f"fraction\x1f{s}"))
    return sorted(ranked[: max(1, round(fraction * len(ranked)))])


def draw_shots(labels: Mapping[str, object], k: int, seed: int, groups: Mapping[str, str] | None = None) -> list[str]:
    """K cases per class from ``labels`` (train case → class), deterministic per seed; a class with fewer than K cases
    gives all it has, and a log line says so.

    A case is the unit the task predicts on: a scan for a per-scan task (sequence), a subject session otherwise, so
    "K = 5" means five training examples per class, not five subjects with all their scans (which gave 11-16 scans per
    class for the sequence task). ``groups`` (case → subject) spreads a class's draw over subjects: cases of subjects
    not yet drawn in that class come first, so K cases come from K different subjects whenever the class has them.
    Callers pass only train-split cases, so the draw never reaches validation or test subjects. Each case's rank is a
    keyed hash of (seed, class, case), independent of the mapping's order and of which other cases exist.
    """
    if k < 1:
        raise ValueError(f"shots per class must be >= 1, got {k}")
    by_class: dict[object, list[str]] = defaultdict(list)
    for case, c in labels.items():
        by_class[c].append(case)
    out = []
    for c, members in sorted(by_class.items(), key=lambda kv: str(kv[0])):
        ranked = sorted(members, key=lambda case: _unit(seed, f"shots\x1f{c}\x1f{case}"))
        if len(ranked) < k:
            log.warning("few-shot draw: class %s has %d train cases, fewer than K = %d; all of them are used",
                        c, len(ranked), k)  # fmt: skip
        if groups is None:
            out += ranked[:k]
            continue
        chosen: list[str] = []
        seen: set[str] = set()
        for case in ranked:  # first pass: one case per subject
            if len(chosen) < k and groups.get(case, case) not in seen:
                chosen.append(case)
                seen.add(groups.get(case, case))
        taken = set(chosen)
        chosen += [case for case in ranked if case not in taken][: k - len(chosen)]
        out += chosen
    return sorted(out)
