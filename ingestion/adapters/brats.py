"""BraTS-style layout: one folder per case holding ``<Case>_<seq>.nii.gz`` files and a ``<Case>_seg.nii.gz`` label map.

Used by BraTS and by the NIfTI releases of UPENN-GBM and UCSF-PDGM. Clinical tables (survival, IDH) sit beside the
case folders and name cases differently from the folders (``BraTS20_Training_012`` vs ``BraTS2021_00012``); the
card's ``case_id_pattern`` reduces both to one key (see :func:`brainiac.ingestion.cards.normalize_case_id`).
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from brainiac.ingestion.adapters.base import Problem, SourceScan
from brainiac.ingestion.adapters.common import is_nifti, list_files, list_files_checked, strip_nifti_suffix
from brainiac.platform.storage import StorageLocation

__all__ = ["BratsAdapter"]

DEFAULT_LABEL_SUFFIXES = ("seg", "label", "labels", "mask", "tumor_segmentation")


class BratsAdapter:
    """Case-folder glioma releases."""

    layout = "brats"

    def _cases(self, files: list[str]) -> dict[str, list[str]]:
        cases: dict[str, list[str]] = defaultdict(list)
        for rel in files:
            parts = rel.split("/")
            if is_nifti(rel) and len(parts) >= 2:
                case = parts[-2]
                if strip_nifti_suffix(parts[-1]).startswith(case + "_"):
                    cases[case].append(rel)
        return cases

    def detect(self, root: StorageLocation) -> bool:
        files = list_files(root)
        cases = self._cases(files)
        return bool(cases) and not any(posixpath.basename(f).startswith("sub-") for f in files[:200])

    def discover(self, root: StorageLocation, dataset: str, card: Any | None = None) -> Iterator[SourceScan | Problem]:
        label_suffixes = tuple((getattr(card, "label_maps", {}) or {}).keys()) or DEFAULT_LABEL_SUFFIXES
        files, problems = list_files_checked(root, dataset)
        yield from problems  # symlinks out of the root, dangling links, unreadable entries: quarantined, never read
        for case, rels in sorted(self._cases(files).items()):
            masks = {}
            images = []
            for rel in sorted(rels):
                suffix = strip_nifti_suffix(posixpath.basename(rel))[len(case) + 1 :]
                if suffix.lower() in label_suffixes:
                    masks[suffix.lower()] = rel
                else:
                    images.append((rel, suffix))
            for rel, suffix in images:
                yield SourceScan(
                    dataset=dataset,
                    layout=self.layout,
                    source_uri=root.join(rel).uri,
                    relative_path=rel,
                    subject=case,
                    session=None,
                    sequence_hints={"filename": f"{case}_{suffix}.nii.gz"},
                    labels={f"{kind}_relative_path": path for kind, path in masks.items()},
                    format="nifti",
                )
