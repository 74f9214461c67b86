"""Catalog overview: counts, demographics, geometry histograms and an nnU-Net-style per-dataset fingerprint, as numbers
and as one PNG a person would want to look at."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainiac.platform.catalog import Catalog
from brainiac.platform.config import redact_uri_credentials

__all__ = ["catalog_stats", "dataset_fingerprint", "plot_overview", "scans_frame"]


def scans_frame(catalog: Catalog, version: int | None = None) -> pd.DataFrame:
    """The current ``scans`` rows the statistics need, of the datasets ``catalog`` may read (see
    :meth:`Catalog.restricted`)."""
    cols = [
        "scan_id",
        "dataset",
        "site",
        "subject_id",
        "sequence",
        "age_years",
        "sex",
        "spacing_mm",
        "shape",
        "image_uri",
        "access",
    ]
    return catalog.scans(version=version).to_pandas(columns=cols)


def dataset_fingerprint(df: pd.DataFrame, catalog: Catalog, intensity_sample: int = 0) -> dict[str, dict[str, Any]]:
    """Per dataset: scans, subjects, median spacing and shape, and (if ``intensity_sample`` > 0) foreground intensity
    percentiles 0.5/50/99.5 over up to that many decoded scans (nnU-Net v2's fingerprint, the parts we need)."""
    out: dict[str, dict[str, Any]] = {}
    for name, group in df.groupby("dataset"):
        spacing = np.array(group["spacing_mm"].tolist(), dtype=float)
        shape = np.array(group["shape"].tolist(), dtype=float)
        entry: dict[str, Any] = {
            "scans": len(group),
            "subjects": int(group["subject_id"].nunique()),
            "median_spacing_mm": np.round(np.median(spacing, axis=0), 3).tolist(),
            "median_shape": np.median(shape, axis=0).astype(int).tolist(),
        }
        if intensity_sample > 0:
            entry["intensity_percentiles"] = _intensity(group.head(intensity_sample)["image_uri"].tolist(), catalog)
        out[str(name)] = entry
    return out


def _intensity(uris: list[str], catalog: Catalog) -> dict[str, float]:
    from brainiac.ingestion.headers import load_nifti

    values = []
    for uri in uris:
        img = load_nifti(uri, dict(catalog.location.options) or None)
        data = np.asarray(img.dataobj, dtype=np.float32)
        fg = data[data > np.percentile(data, 50)]
        values.append(fg[:: max(1, fg.size // 20000)])
    allv = np.concatenate(values) if values else np.zeros(1)
    return {f"p{p}": float(np.percentile(allv, p)) for p in (0.5, 50, 99.5)}


def catalog_stats(
    catalog: Catalog, version: int | None = None, intensity_sample: int = 0, frame: pd.DataFrame | None = None
) -> dict[str, Any]:
    """Everything ``brainiac catalog stats`` prints, as plain data (``frame``: the scans already read, if any), over
    the datasets ``catalog`` may read; ``left_out`` says what its access levels left out (``None``: nothing)."""
    df = scans_frame(catalog, version) if frame is None else frame
    left_out = catalog.access_report().line
    if df.empty:
        return {"scans": 0, "left_out": left_out}
    by_ds_seq = df.groupby(["dataset", "sequence"]).size().unstack(fill_value=0)
    ages = df["age_years"].dropna()
    return {
        "scans": len(df),
        "subjects": int(df["subject_id"].nunique()),
        "datasets": int(df["dataset"].nunique()),
        "by_dataset_sequence": {d: {s: int(n) for s, n in row.items() if n} for d, row in by_ds_seq.iterrows()},
        "by_site": {str(k): int(v) for k, v in df.groupby(df["site"].fillna("unknown")).size().items()},
        "by_access": {str(k): int(v) for k, v in df.groupby("access").size().items()},
        "sex": {str(k): int(v) for k, v in df["sex"].fillna("unknown").value_counts().items()},
        "age_years": {
            "n": int(ages.size),
            "min": float(ages.min()) if ages.size else None,
            "median": float(ages.median()) if ages.size else None,
            "max": float(ages.max()) if ages.size else None,
        },
        "fingerprint": dataset_fingerprint(df, catalog, intensity_sample),
        "scans_version": catalog.version("scans") if version is None else version,
        "left_out": left_out,
    }


def plot_overview(catalog: Catalog, path: Path, version: int | None = None, frame: pd.DataFrame | None = None) -> Path:
    """A 2×2 PNG: scans per dataset and sequence, age histogram by dataset, in-plane/slice spacing, volume shapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = scans_frame(catalog, version) if frame is None else frame
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    fig.suptitle(
        f"Catalog {redact_uri_credentials(catalog.uri)} — {len(df)} scans, {df['subject_id'].nunique()} subjects",
        fontsize=12,
    )
    counts = df.groupby(["dataset", "sequence"]).size().unstack(fill_value=0)
    counts.plot.barh(stacked=True, ax=axes[0, 0], colormap="tab10")
    axes[0, 0].set_title("scans per dataset and sequence")
    axes[0, 0].set_xlabel("scans")
    aged = df.dropna(subset=["age_years"])
    if len(aged):
        groups = list(aged.groupby("dataset"))
        axes[0, 1].hist(
            [g["age_years"] for _, g in groups],
            bins=np.arange(0, 95, 5),
            stacked=True,
            label=[str(n) for n, _ in groups],
        )
    axes[0, 1].set_title("age at scan (years), stacked by dataset")
    axes[0, 1].set_xlabel("years")
    if axes[0, 1].has_data():
        axes[0, 1].legend(fontsize=8)
    spacing = np.array(df["spacing_mm"].tolist(), dtype=float) if len(df) else np.zeros((0, 3))
    if len(spacing):
        axes[1, 0].hist([spacing.min(axis=1), spacing.max(axis=1)], bins=20, label=["finest axis", "coarsest axis"])
        axes[1, 0].legend(fontsize=8)
    axes[1, 0].set_title("voxel spacing (mm)")
    axes[1, 0].set_xlabel("mm")
    shape = np.array(df["shape"].tolist(), dtype=float) if len(df) else np.zeros((0, 3))
    if len(shape):
        for name in sorted(df["dataset"].unique()):
            sel = (df["dataset"] == name).to_numpy()
            axes[1, 1].scatter(shape[sel, 0] * shape[sel, 1], shape[sel, 2], s=18, alpha=0.7, label=str(name))
        axes[1, 1].legend(fontsize=7)
    axes[1, 1].set_title("volume shape")
    axes[1, 1].set_xlabel("in-plane voxels (x·y)")
    axes[1, 1].set_ylabel("slices (z)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stats_json(stats: dict[str, Any]) -> str:
    return json.dumps(stats, indent=2, sort_keys=True, default=str)
