"""Pick held-out scans for the quickstart's ``predict`` stage: a test-split subject's NIfTI files, one case per task."""

from __future__ import annotations

from typing import Any

from brainiac.ingestion.splits import read_splits
from brainiac.jobs.config import Config
from brainiac.platform.catalog import Catalog

__all__ = ["heldout_inputs"]


def heldout_inputs(cfg: Config, task: str, cases: int = 1) -> list[Any] | None:
    """Inputs for :func:`brainiac.jobs.predict.predict_scans`: up to ``cases`` test-split cases of ``task``, as a file
    path (one-sequence tasks) or ``{sequence: path}`` (multi-sequence tasks); ``None`` when the test split has none.
    Files are the catalog's NIfTI images (``image_uri``: the original file, or the conversion of a DICOM series), of
    the datasets the config may read (``catalog.allowed_access``, ``catalog.datasets``)."""
    from brainiac.models.tasks.spec import task_spec

    spec = task_spec(task)
    catalog = Catalog.open(cfg.catalog.uri, cfg.catalog.storage_options)
    rows = (
        catalog.scans(
            dataset=cfg.catalog.datasets or None, sequence=spec.sequences, allowed_access=cfg.catalog.allowed_access
        )
        .to_arrow(["subject_id", "session", "sequence", "image_uri", "diagnosis", "labels", "dataset"])
        .to_pylist()
    )
    if spec.diagnosis:
        rows = [r for r in rows if r["diagnosis"] in spec.diagnosis]
    if spec.kind == "segmentation":
        rows = [r for r in rows if f"{spec.label_name}_uri" in (r["labels"] or "")]
    split = read_splits(catalog, cfg.splits.seed)
    by_case: dict[tuple[str, str], dict[str, str]] = {}
    for r in sorted(rows, key=lambda r: (r["subject_id"], r["session"] or "", r["sequence"])):
        if split.get(r["subject_id"]) == "test" and r["image_uri"]:
            by_case.setdefault((r["subject_id"], r["session"] or ""), {}).setdefault(r["sequence"], r["image_uri"])
    out: list[Any] = []
    for files in by_case.values():
        if spec.per_scan or len(spec.sequences) == 1:
            out.append(next(iter(files.values())))
        elif all(s in files for s in spec.sequences):
            out.append({s: files[s] for s in spec.sequences})
        if len(out) == cases:
            break
    return out or None
