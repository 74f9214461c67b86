"""Manifest layout: image files anywhere under the root plus a CSV whose columns the dataset card maps (ADNI, IXI ...).

The manifest is trusted for metadata but not for paths: a path that is absolute or climbs out of the dataset root is
quarantined as ``path_outside_root``, and one that names no file as ``missing_file``. A row naming an entry the listing
left out (a symlink out of the root, a dangling one, a folder, an unreadable file) is quarantined with the listing's
reason; so is a folder that could not be listed, and the manifest itself when it cannot be read.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

from brainiac.ingestion.adapters.base import Problem, SourceScan
from brainiac.ingestion.adapters.common import inside_root, list_files_checked, problem_for_oserror, read_table
from brainiac.platform.errors import UserError
from brainiac.platform.storage import StorageLocation

__all__ = ["ManifestAdapter"]

MANIFEST_NAMES = ("manifest.csv", "manifest.tsv", "images.csv", "scans.csv")


class ManifestAdapter:
    """A CSV/TSV manifest plus images."""

    layout = "manifest"

    def _manifest_name(self, root: StorageLocation, card: Any | None) -> str | None:
        if card is not None and getattr(card, "manifest", None):
            return card.manifest
        fs = root.fsspec()
        for name in MANIFEST_NAMES:
            if fs.exists(root.join(name).path):
                return name
        return None

    def detect(self, root: StorageLocation) -> bool:
        return self._manifest_name(root, None) is not None

    def discover(self, root: StorageLocation, dataset: str, card: Any | None = None) -> Iterator[SourceScan | Problem]:
        name = self._manifest_name(root, card)
        if name is None:
            raise UserError(
                f"no manifest found in {root} (looked for {', '.join(MANIFEST_NAMES)}); name it on the dataset card"
            )
        cols = dict(getattr(card, "columns", {}) or {})
        for key, default in (("subject", "subject"), ("path", "path"), ("session", "session")):
            cols.setdefault(key, default)
        files, left_out = list_files_checked(root, dataset)
        odd = {_relative_uri(root, p.source_uri): p for p in left_out}
        if name in odd:  # the manifest itself is a symlink out of the root, dangling, ...: nothing can be trusted
            yield odd[name]
            return
        try:
            table = read_table(root, name, sep="\t" if name.endswith(".tsv") else ",")
        except OSError as exc:
            yield problem_for_oserror(dataset, root.join(name).uri, exc, "the manifest")
            return
        # a folder that could not be listed may hide files the manifest names: say so once, before their rows
        yield from (p for p in left_out if p.reason == "unreadable" and p.detail.startswith("the folder"))
        missing = [cols[k] for k in ("subject", "path") if cols[k] not in table.columns]
        if missing:
            raise UserError(
                f"manifest {name} of {dataset} lacks column(s) {', '.join(missing)}; fix the card's `columns`"
            )
        existing = set(files)
        manifest_uri = root.join(name).uri
        for i, row in enumerate(table.to_dict("records")):
            rel, subject = row.get(cols["path"]), row.get(cols["subject"])
            if not isinstance(rel, str) or not rel or not isinstance(subject, str) or not subject:
                yield Problem(
                    dataset, f"{manifest_uri}#row={i + 2}", "bad_manifest_row", f"row {i + 2}: empty subject or path"
                )
                continue
            if not inside_root(rel):
                yield Problem(dataset, f"{manifest_uri}#row={i + 2}", "path_outside_root", f"row {i + 2}: {rel}")
                continue
            rel = posixpath.normpath(rel.replace("\\", "/"))
            if rel in odd:
                problem = odd[rel]
                yield Problem(dataset, problem.source_uri, problem.reason, f"manifest row {i + 2}: {problem.detail}")
                continue
            if rel not in existing:
                yield Problem(
                    dataset,
                    root.join(rel).uri,
                    "missing_file",
                    f"manifest row {i + 2} names a file that does not exist",
                )
                continue

            def get(key: str, row: dict = row) -> Any:  # a cell: a string, NaN where empty, None without the column
                return row.get(cols[key]) if key in cols else None

            age = get("age")
            offset = row.get(card.age_offset_column) if card is not None and card.age_offset_column else None
            yield SourceScan(
                dataset=dataset,
                layout=self.layout,
                source_uri=root.join(rel).uri,
                relative_path=rel,
                subject=subject.strip(),
                session=(get("session") or None),
                sequence_hints={
                    **({"description": str(get("description"))} if get("description") else {}),
                    "filename": posixpath.basename(rel),
                },
                meta={
                    "age": age,
                    "age_offset_years": offset,
                    "sex": get("sex"),
                    "diagnosis": get("diagnosis"),
                    "site": get("site"),
                    "field_strength": get("field_strength"),
                    "manufacturer": get("manufacturer"),
                    "scanner_model": get("scanner_model"),
                },
                format="nifti",
            )


def _relative_uri(root: StorageLocation, uri: str) -> str:
    """A listed URI relative to ``root`` (the key a manifest row names it by)."""
    prefix = root.uri.rstrip("/") + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri
