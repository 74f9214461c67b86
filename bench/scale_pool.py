"""A header-realistic pool shaped like BrainIAC's (48,965 scans from 34 datasets), scaled to any size, with planted
cross-dataset copies whose truth is written beside it. Used by ``bench/scale.py``; runnable alone:

    .venv/bin/python bench/scale_pool.py OUT --scans 7000

What is real and what is not:
- **Datasets and layouts**: 34 dataset folders in the four layouts the adapters read (6 BraTS-style case folders, 15
  BIDS, 10 CSV-manifest cohorts, 3 DICOM exports), sized in proportion to the real releases (a few with thousands of
  scans, many with hundreds, :data:`POOL`). DICOM is 3 small exports, about 0.4 % of the scans (it is slow to write
  and to read, and small in the real pool too).
- **Grids**: every dataset has its real voxel spacing; the BraTS family shares one grid (SRI24, 1 mm), ATLAS and a
  second MNI-registered set share the MNI152 1 mm grid, ADNI and AIBL share the ADNI MPRAGE grid; native-space
  datasets each have their own spacing, as real scanners' protocols do.
- **Voxel payloads are small**: a NIfTI's size is implied by the shape in its header (ingest checks the gzip size
  against it), so the real shape cannot be claimed cheaply. Each grid has a small array shape (12-34 voxels a side)
  with the real spacing, chosen so that two grids are duplicate-search candidates (same sequence and spacing, field
  of view within 8 voxels) exactly when the real grids are: :func:`check_grids` asserts it. Files are 5-50 KB, so
  49k scans take ~1.5 GB and are written in minutes by 2 processes; hashing costs are therefore far below real ones
  (see ``bench/ingest.py`` for the per-byte floor), and what the harness measures is the per-scan and per-pool work.
- **Images**: a brain-like ellipsoid with a smooth random texture of its own per scan (two different scans never
  correlate), so the voxel comparison of the duplicate search has real work to do.
- **Planted copies** (:data:`COPIES`): UPENN-GBM cases re-encoded (float32 + scale factor) inside BraTS 2021, UCSF-PDGM
  cases cropped inside BraTS 2021, OASIS-3 T1w re-exported header-flipped (LAS) in NACC, ATLAS T1w re-saved as
  uncompressed ``.nii`` in a second MNI-registered set. ``truth.json`` lists every copy group by source path.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gzip
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REAL_TOTAL = 48_965
"""Scans in BrainIAC's pool (34 datasets)."""

# ----------------------------------------------------------------------------------------------------------------------
# grids


@dataclass(frozen=True)
class Grid:
    real_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    small_shape: tuple[int, int, int]
    flip: tuple[int, int, int] = (1, 1, 1)
    """Axis signs of the stored orientation (``(-1, -1, 1)``: LPS, as BraTS stores SRI24)."""

    def affine(self, shape: Sequence[int] | None = None) -> np.ndarray:
        shape = shape or self.small_shape
        a = np.diag([*(f * s for f, s in zip(self.flip, self.spacing, strict=True)), 1.0])
        a[:3, 3] = -a[:3, :3] @ ((np.array(self.small_shape) - 1) / 2.0)
        return a


GRIDS: dict[str, Grid] = {
    # shared grids
    "sri24": Grid((240, 240, 155), (1.0, 1.0, 1.0), (24, 24, 16), (-1, -1, 1)),
    "mni1": Grid((197, 233, 189), (1.0, 1.0, 1.0), (20, 24, 26)),
    "adni": Grid((256, 256, 170), (1.0, 1.0, 1.2), (26, 26, 17)),
    # native-space grids, one per protocol
    "oasis": Grid((176, 256, 256), (1.0, 1.0, 1.0), (18, 34, 26)),
    "abide": Grid((160, 240, 256), (1.2, 1.0, 1.0), (16, 24, 26)),
    "abide2": Grid((176, 256, 256), (1.1, 1.0, 1.0), (18, 26, 26)),
    "camcan": Grid((192, 256, 256), (1.0, 1.0, 1.1), (19, 26, 26)),
    "ds000228": Grid((176, 192, 192), (1.3, 1.0, 1.0), (18, 19, 19)),
    "isles": Grid((112, 112, 73), (2.0, 2.0, 2.0), (14, 14, 12)),
    "hcp": Grid((260, 311, 260), (0.7, 0.7, 0.7), (26, 31, 26)),
    "sald": Grid((176, 256, 256), (1.0, 1.2, 1.0), (18, 26, 26)),
    "dlbs": Grid((256, 256, 150), (0.9, 0.9, 1.0), (26, 26, 15)),
    "nki": Grid((176, 256, 256), (1.0, 1.0, 1.3), (18, 26, 26)),
    "corr": Grid((192, 256, 256), (1.0, 1.1, 1.0), (19, 26, 26)),
    "ds000030": Grid((176, 256, 256), (1.0, 1.3, 1.0), (18, 26, 26)),
    "aomic": Grid((160, 256, 256), (1.0, 1.0, 1.4), (16, 26, 26)),
    "ixi": Grid((256, 256, 150), (0.9375, 0.9375, 1.2), (26, 26, 15)),
    "ppmi": Grid((176, 240, 256), (1.0, 1.1, 1.1), (18, 24, 26)),
    "nacc": Grid((192, 256, 160), (1.0, 1.0, 1.5), (19, 26, 16)),
    "oasis1": Grid((176, 208, 176), (1.0, 1.2, 1.2), (18, 21, 18)),
    "oasis2": Grid((256, 256, 128), (1.0, 0.9, 1.25), (26, 26, 13)),
    "miriad": Grid((256, 256, 208), (0.9375, 0.9375, 1.5), (26, 26, 21)),
    "habs": Grid((240, 256, 176), (1.1, 1.1, 1.0), (24, 26, 18)),
    "hcpa": Grid((208, 300, 320), (0.8, 0.8, 0.8), (21, 30, 32)),
    "flair2d": Grid((256, 256, 48), (0.9, 0.9, 3.0), (26, 26, 12)),
    "new": Grid((176, 240, 256), (1.05, 1.05, 1.05), (18, 24, 26)),
    "dicom": Grid((256, 256, 24), (0.9375, 0.9375, 6.0), (16, 16, 12)),
    "dicom2": Grid((256, 256, 30), (0.9, 0.9, 5.0), (16, 16, 12)),
    "dicom3": Grid((320, 320, 24), (0.7, 0.7, 6.5), (16, 16, 12)),
}

MAX_SHIFT = 8
"""Field-of-view tolerance (voxels) of the duplicate search's candidate stage (``find_duplicates(max_shift=8)``)."""


def _candidates(a: Grid, b: Grid, small: bool) -> bool:
    """Would scans of grids ``a`` and ``b`` be duplicate candidates (same sequence assumed)?"""
    key = [round(s, 1) for s in a.spacing] == [round(s, 1) for s in b.spacing]
    sa, sb = (a.small_shape, b.small_shape) if small else (a.real_shape, b.real_shape)
    return key and all(abs(x - y) * s <= MAX_SHIFT * s + 1e-6 for x, y, s in zip(sa, sb, a.spacing, strict=True))


def check_grids() -> None:
    """Two grids are duplicate candidates with their small shapes exactly when they are with their real shapes."""
    names = list(GRIDS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            real, small = _candidates(GRIDS[a], GRIDS[b], False), _candidates(GRIDS[a], GRIDS[b], True)
            if real != small:
                raise AssertionError(f"grids {a} and {b}: candidates {real} at full size but {small} when small")


# ----------------------------------------------------------------------------------------------------------------------
# datasets


@dataclass(frozen=True)
class Dataset:
    name: str
    layout: str  # bids | brats | manifest | dicom
    grid: str
    sequences: tuple[str, ...]
    cases: int
    """Subjects (BIDS, manifest), case folders (BraTS) or patients (DICOM) at full size."""
    sessions: int = 1
    grids: dict[str, str] = field(default_factory=dict)
    """Per-sequence grid where it differs from ``grid`` (2-D FLAIR next to a 3-D T1w)."""
    min_cases: int = 1

    @property
    def per_case(self) -> int:
        return len(self.sequences) * self.sessions

    def grid_of(self, seq: str) -> str:
        return self.grids.get(seq, self.grid)


_GBM = ("T1w", "T1ce", "T2w", "FLAIR")
POOL: tuple[Dataset, ...] = (
    # BraTS-style case folders (the BraTS family shares SRI24)
    Dataset("brats-2021", "brats", "sri24", _GBM, 1251),
    Dataset("upenn-gbm", "brats", "sri24", _GBM, 630),
    Dataset("ucsf-pdgm", "brats", "sri24", _GBM, 495),
    Dataset("brats-men", "brats", "sri24", _GBM, 750),
    Dataset("brats-ssa", "brats", "sri24", _GBM, 60),
    Dataset("brats-ped", "brats", "sri24", _GBM, 99),
    # BIDS
    Dataset("oasis-3", "bids", "oasis", ("T1w", "FLAIR"), 1350, sessions=2, grids={"FLAIR": "flair2d"}),
    Dataset("abide", "bids", "abide", ("T1w",), 1112),
    Dataset("abide-2", "bids", "abide2", ("T1w",), 1114),
    Dataset("camcan", "bids", "camcan", ("T1w", "T2w"), 650),
    Dataset("openneuro-ds000228", "bids", "ds000228", ("T1w",), 155),
    Dataset("isles-2022", "bids", "isles", ("DWI", "ADC", "FLAIR"), 250),
    Dataset("atlas-v2", "bids", "mni1", ("T1w",), 955),
    Dataset("hcp-ya", "bids", "hcp", ("T1w", "T2w"), 1113),
    Dataset("sald", "bids", "sald", ("T1w",), 494),
    Dataset("dlbs", "bids", "dlbs", ("T1w", "T2w"), 315),
    Dataset("nki-rs", "bids", "nki", ("T1w", "T2w"), 1300),
    Dataset("corr", "bids", "corr", ("T1w",), 1000),
    Dataset("ds000030", "bids", "ds000030", ("T1w",), 272),
    Dataset("aomic-id1000", "bids", "aomic", ("T1w",), 928),
    Dataset("mni-brainage", "bids", "mni1", ("T1w",), 1000),
    # CSV-manifest cohorts
    Dataset("adni", "manifest", "adni", ("T1w", "FLAIR"), 1600, sessions=2, grids={"FLAIR": "flair2d"}),
    Dataset("aibl", "manifest", "adni", ("T1w",), 1200),
    Dataset("ixi", "manifest", "ixi", ("T1w", "T2w", "PD"), 580),
    Dataset("ppmi", "manifest", "ppmi", ("T1w",), 1202),
    Dataset("nacc", "manifest", "nacc", ("T1w",), 1500),
    Dataset("oasis-1", "manifest", "oasis1", ("T1w",), 436),
    Dataset("oasis-2", "manifest", "oasis2", ("T1w",), 373),
    Dataset("miriad", "manifest", "miriad", ("T1w",), 708),
    Dataset("habs", "manifest", "habs", ("T1w",), 700),
    Dataset("hcp-aging", "manifest", "hcpa", ("T1w", "T2w"), 725),
    # DICOM exports (small)
    Dataset("hospital-gbm", "dicom", "dicom", ("T1w", "T1ce", "FLAIR"), 20),
    Dataset("tcga-gbm", "dicom", "dicom2", ("T1w", "T1ce", "T2w", "FLAIR"), 20),
    Dataset("rembrandt", "dicom", "dicom3", ("T1w", "FLAIR"), 20),
)
assert len(POOL) == 34

NEW_DATASET = Dataset("new-cohort", "bids", "new", ("T1w", "FLAIR"), 500, grids={"FLAIR": "flair2d"})
"""The dataset added to a full catalog (1,000 scans), also ingested alone into an empty one."""


@dataclass(frozen=True)
class CopyPlan:
    source: str
    target: str
    transform: str  # float | crop | flip | nii
    fraction: float
    """Share of the source's cases copied (at least one)."""
    sequences: tuple[str, ...] | None = None
    """Copied sequences (session 1 only); ``None``: the whole case."""


COPIES: tuple[CopyPlan, ...] = (
    CopyPlan("upenn-gbm", "brats-2021", "float", 0.24),
    CopyPlan("ucsf-pdgm", "brats-2021", "crop", 0.2),
    CopyPlan("oasis-3", "nacc", "flip", 0.15, ("T1w",)),
    CopyPlan("atlas-v2", "mni-brainage", "nii", 0.1, ("T1w",)),
)


SUFFIX = "-sim"
"""Appended to every dataset folder (the dataset's name in the catalog): the shipped cards of the real releases name
tables the pool does not have (ADNIMERGE.csv, IXI.xls ...), so the pool's datasets are card-less and their layouts
are detected, as for any dataset without a card."""


def folder(d: Dataset) -> str:
    return d.name + SUFFIX


def full_scans() -> int:
    return sum(d.cases * d.per_case for d in POOL)


def scaled(n: int) -> list[Dataset]:
    """The pool at about ``n`` scans: every dataset's case count scaled by ``n / 48,965`` (at least one case)."""
    f = n / full_scans()
    out = []
    for d in POOL:
        cases = max(d.min_cases, round(d.cases * f))
        out.append(Dataset(d.name, d.layout, d.grid, d.sequences, cases, d.sessions, dict(d.grids), d.min_cases))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# images


@functools.lru_cache(maxsize=64)
def _brain(shape: tuple[int, int, int]) -> np.ndarray:
    """A brain-like ellipsoid (1 inside, 0 outside) filling ~45 % of the box."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = sum((g / 0.85) ** 2 for g in grids)
    return (r <= 1.0).astype(np.float32)


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def image(key: str, shape: tuple[int, int, int]) -> np.ndarray:
    """The voxels of the scan named ``key``: int16, an ellipsoid with a smooth random texture of its own."""
    from scipy import ndimage

    rng = np.random.default_rng(_seed(key))
    tex = ndimage.uniform_filter(rng.standard_normal(shape, dtype=np.float32), 3, mode="nearest")
    tex *= 180.0 / (tex.std() + 1e-6)
    tex += 600.0
    tex *= _brain(shape)
    tex += 12.0 * rng.standard_normal(shape, dtype=np.float32)
    return np.clip(tex, 0, 4000).astype(np.int16)


@functools.lru_cache(maxsize=256)
def _header(shape: tuple[int, ...], dtype: str, affine: bytes, slope: float) -> bytes:
    """The 352 bytes before the voxels (header and empty extension flag), built once per grid and encoding."""
    import nibabel as nib

    aff = np.frombuffer(affine).reshape(4, 4)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.dtype(dtype))
    hdr.set_data_shape(shape)
    hdr.set_zooms(tuple(float(z) for z in np.sqrt((aff[:3, :3] ** 2).sum(axis=0))))
    hdr.set_qform(aff, code=1)
    hdr.set_sform(aff, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["scl_slope"], hdr["scl_inter"], hdr["vox_offset"] = slope, 0.0, 352
    return hdr.binaryblock + b"\x00\x00\x00\x00"


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, slope: float, gz: bool) -> bytes:
    head = _header(tuple(data.shape), data.dtype.str, np.ascontiguousarray(affine, dtype=float).tobytes(), slope)
    raw = head + np.asfortranarray(data).tobytes(order="F")
    return gzip.compress(raw, compresslevel=1, mtime=0) if gz else raw


def transformed(key: str, grid: Grid, transform: str | None) -> tuple[np.ndarray, np.ndarray, float]:
    """(stored array, affine, scale factor) of scan ``key`` on ``grid`` after a copy's ``transform``: the same
    image in world space, in other bytes."""
    data = image(key, grid.small_shape)
    affine = grid.affine()
    slope = 1.0
    if transform == "float":  # re-encoded: float32 with a scale factor, as a re-release's pipeline writes it
        data, slope = (data.astype(np.float32) / 2.0), 2.0
    elif transform == "crop":  # 2 voxels off the first axis's start, 1 off the last axis's end
        data = data[2:, :, :-1]
        shift = np.eye(4)
        shift[0, 3] = 2
        affine = affine @ shift
    elif transform == "flip":  # header-flipped: stored with the first axis reversed (RAS -> LAS), same world image
        n = data.shape[0]
        data = data[::-1].copy()
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = n - 1
        affine = affine @ flip
    return data, affine, slope


# ----------------------------------------------------------------------------------------------------------------------
# planning: every file of the pool, decided in the parent process, written by workers


@dataclass
class Task:
    path: str
    kind: str  # nifti | seg | dicom | json
    grid: str = ""
    key: str = ""
    transform: str | None = None
    payload: dict | None = None  # sidecar JSON, or DICOM tags


@dataclass
class Plan:
    root: Path
    datasets: list[Dataset]
    tasks: list[Task] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)
    """Relative path (to the pool root) → text of the dataset-level tables (participants.tsv, manifest.csv ...)."""
    expected: dict[str, int] = field(default_factory=dict)
    """Dataset → scans ingest should find."""
    groups: list[list[str]] = field(default_factory=list)
    """Planted copy groups, as absolute source paths (first: the original)."""


_VENDORS = (("Siemens", "Prisma", 3.0), ("GE", "DISCOVERY MR750", 3.0), ("Philips", "Ingenia", 1.5))
_TIMING = {"T1w": (2.3, 0.00298), "T1ce": (2.3, 0.00298), "T2w": (3.2, 0.408), "FLAIR": (9.0, 0.12),
           "DWI": (5.0, 0.08), "ADC": (5.0, 0.08), "PD": (3.0, 0.015)}  # fmt: skip
_BIDS_NAME = {"T1w": ("anat", "T1w"), "T1ce": ("anat", "ce-gadolinium_T1w"), "T2w": ("anat", "T2w"),
              "FLAIR": ("anat", "FLAIR"), "DWI": ("dwi", "dwi"), "ADC": ("dwi", "adc"), "PD": ("anat", "PDw")}  # fmt: skip
_BRATS = {
    "brats-2021": (lambda i: f"BraTS2021_{i:05d}", {"T1w": "t1", "T1ce": "t1ce", "T2w": "t2", "FLAIR": "flair"}, "seg"),
    "upenn-gbm": (lambda i: f"UPENN-GBM-{i:05d}_11", {"T1w": "T1", "T1ce": "T1GD", "T2w": "T2", "FLAIR": "FLAIR"}, "seg"),
    "ucsf-pdgm": (lambda i: f"UCSF-PDGM-{i:04d}", {"T1w": "T1", "T1ce": "T1c", "T2w": "T2", "FLAIR": "FLAIR"},
                  "tumor_segmentation"),
}  # fmt: skip
# BraTS 2023 releases (MEN, SSA, PED) really name files <case>-t1n/-t1c/-t2w/-t2f with "-" before the sequence; the
# BraTS adapter needs "<case>_" and harmonization does not read t1n/t2f, so the pool writes them BraTS-2021 style.
_BRATS_2021_STYLE = {"T1w": "t1", "T1ce": "t1ce", "T2w": "t2", "FLAIR": "flair"}
_MANIFEST_DESC = {"T1w": "MPRAGE", "T2w": "T2", "FLAIR": "Axial_FLAIR", "PD": "PD", "T1ce": "MPRAGE_POST_GD"}


def _sidecar(seq: str, i: int) -> dict:
    vendor, model, field_t = _VENDORS[i % 3]
    tr, te = _TIMING[seq]
    return {"MagneticFieldStrength": field_t, "Manufacturer": vendor, "ManufacturersModelName": model,
            "RepetitionTime": tr, "EchoTime": te, "SeriesDescription": f"{seq} protocol"}  # fmt: skip


def _table(header: list[str], rows: list[list[object]], sep: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=sep, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


class _Planner:
    def __init__(self, root: Path, datasets: list[Dataset]) -> None:
        self.plan = Plan(root, datasets)
        self.by_name = {d.name: d for d in datasets}

    def _add_scan(self, d: Dataset, rel: str, grid: str, key: str, transform: str | None, side: dict | None) -> str:
        path = str(self.plan.root / folder(d) / rel)
        self.plan.tasks.append(Task(path, "nifti", grid, key, transform))
        if side is not None:
            self.plan.tasks.append(Task(path.rsplit(".nii", 1)[0] + ".json", "json", payload=side))
        self.plan.expected[folder(d)] = self.plan.expected.get(folder(d), 0) + 1
        return path

    def bids(self, d: Dataset, cases: list[tuple[int, str | None, str | None, tuple[str, ...] | None]]) -> None:
        """``cases``: (index, source key prefix or None, transform, sequences) — a copy carries its source's key."""
        self.plan.tables[f"{folder(d)}/dataset_description.json"] = json.dumps({"Name": d.name, "BIDSVersion": "1.9.0"})
        rows = []
        for i, src, transform, seqs in cases:
            sub = f"sub-{d.name.replace('-', '')[:6]}{i:05d}"
            rows.append([sub, f"{20 + i % 70}", "F" if i % 2 else "M"])
            for s in range(1, (d.sessions if src is None else 1) + 1):
                ses = f"ses-{s}" if d.sessions > 1 else None
                for seq in seqs or d.sequences:
                    sub_dir, suffix = _BIDS_NAME[seq]
                    stem = "_".join(x for x in (sub, ses, suffix) if x)
                    ext = ".nii" if transform == "nii" else ".nii.gz"
                    rel = "/".join(x for x in (sub, ses, sub_dir, stem + ext) if x)
                    key = f"{src or d.name + f'|{i}'}|{s}|{seq}"
                    grid = self.by_name[src.split("|")[0]].grid_of(seq) if src else d.grid_of(seq)
                    path = self._add_scan(d, rel, grid, key, transform, _sidecar(seq, i))
                    if src:
                        self._copy_of(key, path)
        self.plan.tables[f"{folder(d)}/participants.tsv"] = _table(["participant_id", "age", "sex"], rows, "\t")

    def brats(self, d: Dataset, cases) -> None:
        case_name, names, seg = _BRATS.get(d.name, (lambda i, n=d.name: f"{n.replace('-', '_')}_{i:05d}",
                                                    _BRATS_2021_STYLE, "seg"))  # fmt: skip
        for i, src, transform, _seqs in cases:
            case = case_name(i)
            for seq in d.sequences:
                key = f"{src or d.name + f'|{i}'}|1|{seq}"
                grid = "sri24"
                path = self._add_scan(d, f"{case}/{case}_{names[seq]}.nii.gz", grid, key, transform, None)
                if src:
                    self._copy_of(key, path)
            self.plan.tasks.append(Task(str(self.plan.root / folder(d) / f"{case}/{case}_{seg}.nii.gz"), "seg", "sri24",
                                        f"{d.name}|{i}|seg", transform))  # fmt: skip

    def manifest(self, d: Dataset, cases) -> None:
        rows = []
        for i, src, transform, seqs in cases:
            subject = f"{(7, 23, 130)[i % 3]:03d}_S_{i:04d}" if d.name in ("adni", "aibl") else f"{d.name}-{i:05d}"
            for s in range(1, (d.sessions if src is None else 1) + 1):
                for seq in seqs or d.sequences:
                    desc = _MANIFEST_DESC[seq]
                    if d.name == "ixi":
                        rel = f"images/IXI{i:03d}-Guys-{i:04d}-{ {'T1w': 'T1', 'T2w': 'T2', 'PD': 'PD'}[seq] }.nii.gz"
                    elif d.name in ("adni", "aibl"):
                        num = _seed(f"{d.name}|{i}|{s}|{seq}") % 900_000 + 100_000
                        rel = f"images/{d.name.upper()}_{subject}_MR_{desc}_S{num // 3}_I{num}.nii"
                    else:
                        rel = f"images/{subject}_v{s}_{desc}.nii.gz"
                    key = f"{src or d.name + f'|{i}'}|{s}|{seq}"
                    grid = self.by_name[src.split("|")[0]].grid_of(seq) if src else d.grid_of(seq)
                    path = self._add_scan(d, rel, grid, key, transform, None)
                    if src:
                        self._copy_of(key, path)
                    rows.append([subject, f"v{s}", rel, f"{55 + i % 35}", "Female" if i % 2 else "Male",
                                 ("CN", "MCI", "AD")[i % 3], desc.replace("_", " ")])  # fmt: skip
        header = ["subject", "session", "path", "age", "sex", "diagnosis", "description"]
        self.plan.tables[f"{folder(d)}/manifest.csv"] = _table(header, rows, ",")

    def dicom(self, d: Dataset, cases) -> None:
        for i, _src, _t, _seqs in cases:
            for n, seq in enumerate(d.sequences):
                rel = f"PAT{i + 1:04d}/STUDY_1/{3 + 2 * n:03d}_{_MANIFEST_DESC.get(seq, seq)}"
                vendor, model, field_t = _VENDORS[i % 3]
                tr, te = _TIMING[seq]
                tags = {
                    "PatientName": f"DOE^PATIENT{i}", "PatientID": f"MRN{_seed(d.name + str(i)) % 10**7:07d}",
                    "PatientSex": "F" if i % 2 else "M", "PatientAge": f"{40 + i % 40:03d}Y", "StudyDate": "20200101",
                    "StudyInstanceUID": _uid(d.name, i, "study"), "FrameOfReferenceUID": _uid(d.name, i, "frame"),
                    "SeriesDescription": _MANIFEST_DESC.get(seq, seq), "SeriesNumber": 3 + 2 * n, "Modality": "MR",
                    "Manufacturer": vendor, "ManufacturerModelName": model, "MagneticFieldStrength": f"{field_t:g}",
                    "RepetitionTime": f"{tr * 1000:g}", "EchoTime": f"{te * 1000:g}", "ImageType": ["ORIGINAL", "PRIMARY"],
                }  # fmt: skip
                if seq == "T1ce":
                    tags["ContrastBolusAgent"] = "GADOBUTROL"
                self.plan.tasks.append(
                    Task(str(self.plan.root / folder(d) / rel), "dicom", d.grid_of(seq), f"{d.name}|{i}|1|{seq}",
                         payload=tags)
                )  # fmt: skip
                self.plan.expected[folder(d)] = self.plan.expected.get(folder(d), 0) + 1

    def _copy_of(self, key: str, path: str) -> None:
        self._pending.setdefault(key, []).append(path)

    def run(self) -> Plan:
        self._pending: dict[str, list[str]] = {}
        originals: dict[str, str] = {}
        copies: dict[str, list] = {d.name: [] for d in self.plan.datasets}
        reserved: dict[str, int] = {d.name: 0 for d in self.plan.datasets}
        for c in COPIES:
            src, dst = self.by_name.get(c.source), self.by_name.get(c.target)
            if src is None or dst is None:
                continue
            k = max(1, round(c.fraction * src.cases))
            for j in range(k):
                i = (j * 7919) % src.cases  # spread over the source's cases
                copies[dst.name].append((c, src.name, i))
            reserved[dst.name] += k
        for d in self.plan.datasets:
            own = max(1, d.cases - reserved[d.name])  # copies take the place of own cases: the size stays
            cases: list = [(i, None, None, None) for i in range(own)]
            for n, (c, src_name, i) in enumerate(copies[d.name]):
                cases.append((own + n, f"{src_name}|{i}", c.transform, c.sequences))
            getattr(self, d.layout)(d, cases)
        # originals: the path of every source scan a copy names
        for t in self.plan.tasks:
            if t.kind == "nifti" and t.transform is None:
                originals.setdefault(t.key, t.path)
        for key, paths in sorted(self._pending.items()):
            self.plan.groups.append([originals[key], *paths])
        return self.plan


def _uid(*parts: object) -> str:
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(h[:15], "big"))


def plan_pool(root: Path, scans: int, datasets: list[Dataset] | None = None) -> Plan:
    check_grids()
    return _Planner(Path(root), datasets if datasets is not None else scaled(scans)).run()


# ----------------------------------------------------------------------------------------------------------------------
# writing


def _write_tasks(tasks: list[Task]) -> int:
    from brainiac.ingestion.synthetic.writers import write_dicom_series

    made: set[str] = set()
    n = 0
    for t in tasks:
        folder = os.path.dirname(t.path)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        if t.kind == "json":
            Path(t.path).write_text(json.dumps(t.payload))
        elif t.kind in ("nifti", "seg"):
            grid = GRIDS[t.grid]
            data, affine, slope = transformed(t.key, grid, t.transform)
            if t.kind == "seg":
                data = (data > 700).astype(np.uint8)
                slope = 1.0
            Path(t.path).write_bytes(_nifti_bytes(data, affine, slope, t.path.endswith(".gz")))
        elif t.kind == "dicom":
            grid = GRIDS[t.grid]
            rng = np.random.default_rng(_seed(t.key + "|order"))
            write_dicom_series(Path(t.path), image(t.key, grid.small_shape), grid.affine(), tags=t.payload or {},
                               uid_seed=t.key, rescale_slope=1.0, file_order_rng=rng)  # fmt: skip
        n += 1
    return n


def write_pool(plan: Plan, processes: int = 2) -> dict:
    """Write every file of ``plan`` (``processes`` worker processes at most) plus ``truth.json``; returns the truth."""
    t0 = time.perf_counter()
    for rel, text in plan.tables.items():
        path = plan.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # Chunks of whole folders' neighbours (tasks are in folder order), interleaved over the workers.
    chunk = 500
    parts = [plan.tasks[i : i + chunk] for i in range(0, len(plan.tasks), chunk)]
    if processes > 1 and len(parts) > 1:
        with ProcessPoolExecutor(min(processes, 2)) as pool:
            written = sum(pool.map(_write_tasks, parts))
    else:
        written = sum(_write_tasks(p) for p in parts)
    transforms = {t.path: t.transform for t in plan.tasks if t.transform}
    truth = {
        "scans": sum(plan.expected.values()),
        "datasets": {
            folder(d): {"layout": d.layout, "grid": d.grid, "cases": d.cases, "scans": plan.expected.get(folder(d), 0)}
            for d in plan.datasets
        },
        "groups": plan.groups,
        "copies": {
            c.transform: sum(1 for g in plan.groups for p in g[1:] if transforms.get(p) == c.transform) for c in COPIES
        },
        "tasks": written,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    plan.root.mkdir(parents=True, exist_ok=True)
    (plan.root / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--scans", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args(argv)
    t = time.perf_counter()
    plan = plan_pool(args.out, args.scans)
    truth = write_pool(plan, args.processes)
    size = disk_bytes(args.out)
    print(f"{truth['scans']} scans in {len(plan.datasets)} datasets, {len(truth['groups'])} planted copy groups, "
          f"{size / 1e6:.0f} MB, {time.perf_counter() - t:.1f} s")  # fmt: skip
    for name, d in truth["datasets"].items():
        print(f"  {name:20s} {d['layout']:8s} {d['grid']:9s} {d['scans']:6d}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
