"""BIDS layout: entity parsing (sub, ses, acq, ce, rec, run, suffix), sidecar inheritance, participants.tsv.

We parse names ourselves instead of indexing with pybids: its database is the slow part at scale (REFERENCE.md).
Sidecar inheritance follows the BIDS inheritance principle: a JSON applies to an image when it sits in the image's folder
or an ancestor, its entities are a subset of the image's and its suffix matches; deeper files override shallower ones.

At pool scale (tens of thousands of images, as many sidecars) discovery stays linear: the sidecars are read by the Ray
tasks that list their folders (:func:`~brainiac.ingestion.adapters.listing.find_files_with_contents`), and matched
through a :class:`SidecarIndex` built once, keyed by folder, suffix and subject, so each image looks only at the few
sidecars in its own folder and its ancestors instead of at every sidecar of the dataset.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from brainiac.ingestion.adapters.base import Problem, SourceScan
from brainiac.ingestion.adapters.common import (
    SKIP_DIRS,
    is_nifti,
    list_files_checked,
    listing_problems,
    problem_for_oserror,
    read_table,
    strip_nifti_suffix,
    table_records,
)
from brainiac.ingestion.adapters.listing import find_listing
from brainiac.platform.storage import StorageLocation

__all__ = ["MATCH_STATS", "BidsAdapter", "SidecarIndex", "parse_entities"]

MATCH_STATS: Counter[str] = Counter()
"""``indexes``: sidecar indexes built; ``checks``: (image, sidecar) entity comparisons made. Discovery of N images with
one sidecar each makes about N checks and builds one index per dataset (a test holds it to that)."""

ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "part", "chunk")
_ENTITY = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")
ANAT_SUFFIXES = {"T1w", "T2w", "FLAIR", "T2starw", "PDw", "PD", "T1map", "T2map", "angio", "dwi", "swi", "UNIT1"}

# participants.tsv columns seen across real datasets, tried in order when the card does not name one.
AGE_COLUMNS = ("age", "age_at_scan", "age_years", "age_at_first_scan_years", "Age", "AGE", "age_at_baseline")
SEX_COLUMNS = ("sex", "gender", "Sex", "Gender", "SEX")
DIAGNOSIS_COLUMNS = ("diagnosis", "group", "dx", "DX", "Group", "condition")


def parse_entities(name: str) -> tuple[dict[str, str], str] | None:
    """``sub-01_ses-1_ce-gad_T1w.nii.gz`` → ``({"sub": "01", "ses": "1", "ce": "gad"}, "T1w")``; None if not BIDS."""
    stem = strip_nifti_suffix(name)
    if stem.endswith(".json"):
        stem = stem[: -len(".json")]
    parts = stem.split("_")
    if len(parts) < 2:
        return None
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        m = _ENTITY.match(part)
        if not m:
            return None
        entities[m.group(1)] = m.group(2)
    return entities, parts[-1]


def _first(row: dict[str, Any], names: tuple[str, ...], override: str | None) -> Any:
    for name in (override,) if override else names:
        if name and name in row and row[name] not in (None, ""):
            return row[name]
    return None


Sidecar = tuple[str, dict[str, str], str, dict[str, Any]]
"""(folder relative to the root, entities, suffix, parsed JSON) of one sidecar."""


def _ancestors(directory: str) -> list[str]:
    """``a/b/c`` → ``["a/b/c", "a/b", "a", ""]``: the folders whose sidecars an image in ``directory`` inherits."""
    out = [directory]
    while directory:
        directory = posixpath.dirname(directory)
        out.append(directory)
    return out


class SidecarIndex:
    """The dataset's JSON sidecars indexed once by (folder, suffix, ``sub`` entity or None).

    :meth:`metadata` applies the inheritance principle to one image by looking up its own folder and each ancestor,
    for sidecars of its subject and subject-less ones: a handful of candidates, whatever the dataset's size.
    """

    def __init__(self, sidecars: Iterable[Sidecar]) -> None:
        self._by_key: dict[tuple[str, str, str | None], list[tuple[int, dict[str, str], dict[str, Any]]]] = {}
        for order, (folder, entities, suffix, data) in enumerate(sidecars):
            self._by_key.setdefault((folder, suffix, entities.get("sub")), []).append((order, entities, data))
        MATCH_STATS["indexes"] += 1

    def metadata(self, directory: str, entities: dict[str, str], suffix: str) -> dict[str, Any]:
        """The merged sidecar metadata of an image in ``directory``: shallow → deep, fewer → more entities (then file
        order), later values overriding earlier ones."""
        applicable = []
        subjects = (entities["sub"], None) if entities.get("sub") is not None else (None,)
        checks = 0
        for folder in _ancestors(directory):
            depth = folder.count("/") + (folder != "")
            for sub in subjects:
                for order, ents, data in self._by_key.get((folder, suffix, sub), ()):
                    checks += 1
                    if all(entities.get(k) == v for k, v in ents.items()):
                        applicable.append(((depth, len(ents), order), data))
        MATCH_STATS["checks"] += checks
        meta: dict[str, Any] = {}
        for _, data in sorted(applicable, key=lambda a: a[0]):
            meta.update(data)
        return meta


def _relative_files(root: StorageLocation, full_paths: Iterable[str]) -> list[str]:
    """What :func:`~brainiac.ingestion.adapters.common.list_files` returns, from an existing listing."""
    base = root.path.rstrip("/")
    prefix = base + "/"
    out = []
    for full in full_paths:
        if full.startswith(prefix):
            rel = full[len(prefix) :]
        else:
            rel = posixpath.relpath(full, base) if not root.is_remote else full[len(base) + 1 :]
        if any(p in SKIP_DIRS or p.startswith(".") for p in rel.split("/")):
            continue
        out.append(rel)
    return sorted(out)


class BidsAdapter:
    """Raw BIDS datasets (OpenNeuro, OASIS-3, ATLAS, ISLES, CamCAN ...)."""

    layout = "bids"

    def detect(self, root: StorageLocation) -> bool:
        fs = root.fsspec()
        if fs.exists(root.join("dataset_description.json").path):
            return True
        try:
            return any(posixpath.basename(p.rstrip("/")).startswith("sub-") for p in fs.ls(root.path, detail=False))
        except OSError:  # missing or unreadable root: not recognisably BIDS
            return False

    def _participants(
        self, root: StorageLocation, files: list[str], card: Any, dataset: str, problems: list[Problem]
    ) -> dict[str, dict[str, Any]]:
        """``participants.tsv`` by subject id; one that cannot be read adds a problem to ``problems`` (and the scans
        go in without participant metadata)."""
        if "participants.tsv" not in files:
            return {}
        try:
            df = read_table(root, "participants.tsv", sep="\t")
        except OSError as exc:
            problems.append(problem_for_oserror(dataset, root.join("participants.tsv").uri, exc, "participants.tsv"))
            return {}
        cols = getattr(card, "columns", {}) or {}
        out = {}
        for row in table_records(df):
            pid = str(row.get(cols.get("subject", "participant_id")) or "")
            pid = pid[4:] if pid.startswith("sub-") else pid
            if not pid:
                continue
            out[pid] = {
                "age": _first(row, AGE_COLUMNS, cols.get("age")),
                "sex": _first(row, SEX_COLUMNS, cols.get("sex")),
                "diagnosis": _first(row, DIAGNOSIS_COLUMNS, cols.get("diagnosis")),
                "site": _first(row, ("site", "Site", "center"), cols.get("site")),
                "_row": row,
            }
        return out

    def _sidecars(
        self, root: StorageLocation, files: list[str], dataset: str, contents: dict[str, bytes] | None = None
    ) -> tuple[list[Sidecar], list[Problem]]:
        """Every parseable sidecar (in file order) and a problem per unreadable one. ``contents``: bytes already read
        by the listing tasks, by fsspec path; a sidecar missing from it is read here."""
        out, problems = [], []
        contents = contents or {}
        base = root.path.rstrip("/")
        for rel in files:
            if not rel.endswith(".json") or rel in ("dataset_description.json", "participants.json"):
                continue
            parsed = parse_entities(posixpath.basename(rel))
            if parsed is None:
                continue
            try:
                raw = contents.get(f"{base}/{rel}")
                data = json.loads(raw.decode("utf-8") if raw is not None else root.join(rel).read_text())
                if not isinstance(data, dict):
                    raise ValueError("top level is not an object")
            except (ValueError, UnicodeDecodeError) as exc:
                problems.append(Problem(dataset, root.join(rel).uri, "bad_sidecar", f"{rel}: {exc}"))
                continue
            except OSError as exc:  # vanished or unreadable since it was listed
                problems.append(problem_for_oserror(dataset, root.join(rel).uri, exc, "the sidecar"))
                continue
            out.append((posixpath.dirname(rel), parsed[0], parsed[1], data))
        return out, problems

    def _derivative_masks(
        self, root: StorageLocation, label_suffixes: set[str], dataset: str, problems: list[Problem]
    ) -> dict[tuple[str, str | None], dict[str, str]]:
        """Label maps under ``derivatives/`` keyed by (sub, ses): ``{kind: relative path}`` with kind from ``desc-``.
        Entries listing leaves out (a symlink out of the dataset root ...) are added to ``problems``."""
        deriv = root.join("derivatives")
        out: dict[tuple[str, str | None], dict[str, str]] = {}
        if not deriv.exists():
            return out
        files, left_out = list_files_checked(deriv, dataset, skip_dirs={".git"}, within=root)
        problems += left_out
        for rel in files:
            parsed = parse_entities(posixpath.basename(rel)) if is_nifti(rel) else None
            if parsed is None or "sub" not in parsed[0] or parsed[1] not in label_suffixes:
                continue
            kind = parsed[0].get("desc") or parsed[1]
            out.setdefault((parsed[0]["sub"], parsed[0].get("ses")), {})[kind] = f"derivatives/{rel}"
        return out

    def discover(self, root: StorageLocation, dataset: str, card: Any | None = None) -> Iterator[SourceScan | Problem]:
        # One listing, in Ray tasks when Ray runs, that also reads the sidecars (list_files' filter applied here).
        # Symlinks out of the root, dangling ones, folders behind a file's name and unreadable entries are not in it:
        # they are quarantined here and never read.
        listed, contents, left_out = find_listing(root, read_suffixes=(".json",), skip_top=SKIP_DIRS, skip_hidden=True)
        files = _relative_files(root, listed)
        problems = listing_problems(root, dataset, left_out)
        masks = self._derivative_masks(
            root, set((getattr(card, "label_maps", {}) or {}).keys()) | {"mask", "dseg", "roi"}, dataset, problems
        )
        participants = self._participants(root, files, card, dataset, problems)
        sidecars, sidecar_problems = self._sidecars(root, files, dataset, contents)
        problems += sidecar_problems
        del contents
        index = SidecarIndex(sidecars)
        yield from problems
        label_suffixes = set((getattr(card, "label_maps", {}) or {}).keys())
        for rel in files:
            if not is_nifti(rel):
                continue
            parsed = parse_entities(posixpath.basename(rel))
            if parsed is None or "sub" not in parsed[0]:
                continue
            entities, suffix = parsed
            if suffix in label_suffixes or suffix in ("mask", "dseg", "label", "roi"):
                continue  # label maps are attached to scans, not catalogued as scans
            meta = index.metadata(posixpath.dirname(rel), entities, suffix)
            person = participants.get(entities["sub"], {})
            yield SourceScan(
                dataset=dataset,
                layout=self.layout,
                source_uri=root.join(rel).uri,
                relative_path=rel,
                subject=entities["sub"],
                session=entities.get("ses"),
                run=entities.get("run"),
                sequence_hints={
                    "bids_suffix": suffix,
                    **({"bids_ce": entities["ce"]} if "ce" in entities else {}),
                    **(
                        {"description": str(meta.get("SeriesDescription") or meta.get("ProtocolName"))}
                        if meta.get("SeriesDescription") or meta.get("ProtocolName")
                        else {}
                    ),
                    "filename": posixpath.basename(rel),
                },
                meta={
                    "age": person.get("age"),
                    "sex": person.get("sex"),
                    "diagnosis": person.get("diagnosis"),
                    "site": person.get("site"),
                    "field_strength": meta.get("MagneticFieldStrength"),
                    "manufacturer": meta.get("Manufacturer"),
                    "scanner_model": meta.get("ManufacturersModelName"),
                    "tr_ms": _seconds_to_ms(meta.get("RepetitionTime")),
                    "te_ms": _seconds_to_ms(meta.get("EchoTime")),
                    "sidecar": {k: v for k, v in meta.items() if k in _SIDECAR_KEEP},
                    "participant": person.get("_row", {}),
                },
                labels={
                    f"{k}_relative_path": v for k, v in masks.get((entities["sub"], entities.get("ses")), {}).items()
                },
                format="nifti",
            )


_SIDECAR_KEEP = {
    "MagneticFieldStrength", "Manufacturer", "ManufacturersModelName", "RepetitionTime", "EchoTime", "InversionTime",
    "FlipAngle", "SliceThickness", "MRAcquisitionType", "ScanningSequence", "SequenceVariant", "PulseSequenceType",
}  # fmt: skip
"""Sidecar keys copied into the catalog's header JSON (acquisition facts only; free text stays out)."""


def _seconds_to_ms(value: Any) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return round(seconds * 1000.0, 4) if seconds < 50 else seconds  # BIDS says seconds; some writers put ms
