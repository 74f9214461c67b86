"""Tissue contrasts per sequence, measured on the written files with the truth tissue maps and lesion labels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

CSF, GM, WM, SKULL, SCALP, WMH, LESION = 1, 2, 3, 4, 5, 6, 7


def _scans(summary) -> pd.DataFrame:
    t = pd.read_csv(summary.truth, keep_default_na=False, na_values=[""])
    return t[(t.kind == "image") & (t.format == "nifti")]


def _load(summary, r):
    data = np.asarray(nib.load(summary.out_dir / r.dataset / r.path).dataobj, dtype=np.float64)
    data *= float(r.scl_slope)
    tissue = np.asarray(nib.load(summary.out_dir / "_truth" / r.tissue_path).dataobj)
    labels = None
    if isinstance(r.label_path, str) and r.label_path:
        labels = np.asarray(nib.load(summary.out_dir / "_truth" / r.label_path).dataobj)
    return data, tissue, labels


def test_tissue_contrast_ordering(synth_small):
    seen = set()
    for _, r in _scans(synth_small).iterrows():
        data, tissue, labels = _load(synth_small, r)
        # CSF and WM from voxels whose whole 3x3x3 neighbourhood is that tissue (no partial volume); GM is too thin
        pure = {c: ndi.binary_erosion(tissue == c) for c in (CSF, WM)}
        pure[GM] = tissue == GM
        m = {c: float(np.median(data[v])) for c, v in pure.items() if v.sum() >= 10}
        if len(m) < 3:
            continue
        seen.add(r.sequence)
        if r.sequence in ("T1w", "T1ce"):
            assert m[WM] > m[GM] > m[CSF], (r.path, m)
        elif r.sequence == "T2w":
            assert m[CSF] > m[GM] > m[WM], (r.path, m)
        elif r.sequence == "FLAIR":
            assert m[CSF] < 0.5 * m[WM] and m[CSF] < 0.5 * m[GM], (r.path, m)  # CSF suppressed
            assert m[GM] > m[WM], (r.path, m)
            if (tissue == WMH).sum() >= 5:
                assert np.median(data[tissue == WMH]) > m[WM], r.path  # white-matter hyperintensities
            if labels is not None and r.diagnosis == "glioma":
                assert np.median(data[labels == 2]) > 1.3 * m[WM], r.path  # edema bright on FLAIR
        elif r.sequence == "DWI" and r.stroke_onset_days < 7 and (labels > 0).sum() >= 5:
            assert np.median(data[labels > 0]) > 1.5 * m[GM], r.path  # acute infarct bright on DWI
    assert seen >= {"T1w", "T1ce", "T2w", "FLAIR", "DWI"}


def test_enhancement_is_t1ce_only(synth_small):
    """Enhancing tumour (BraTS label 4) is bright on T1ce, not on T1w of the same case."""
    t = _scans(synth_small)
    brats = t[t.cohort == "brats"]
    checked = 0
    for uid, g in brats.groupby("subject_uid"):
        rows = {r.sequence: r for _, r in g.iterrows()}
        t1, _, labels = _load(synth_small, rows["T1w"])
        t1ce, tissue, _ = _load(synth_small, rows["T1ce"])
        et = labels == 4
        if et.sum() < 5:
            continue
        wm = tissue == WM
        assert np.median(t1ce[et]) / np.median(t1ce[wm]) > 1.15, uid
        assert np.median(t1[et]) / np.median(t1[wm]) < 0.8, uid
        checked += 1
    assert checked >= 1


def test_stroke_appearance_follows_onset(synth_small):
    """FLAIR lesion signal rises after the first day; chronic infarcts cavitate and go dark on T1w."""
    t = _scans(synth_small)
    s = t[t.cohort == "stroke"]
    ratios = []
    for _, r in s[s.sequence == "T1w"].iterrows():
        data, tissue, labels = _load(synth_small, r)
        lesion = labels > 0
        if lesion.sum() >= 5:
            ratios.append((r.stroke_onset_days, np.median(data[lesion]) / np.median(data[tissue == GM])))
    ratios.sort()
    assert len(ratios) >= 2
    assert ratios[-1][1] < ratios[0][1] or ratios[-1][0] == ratios[0][0]
