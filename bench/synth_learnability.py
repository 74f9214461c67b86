"""Are the synthetic cohort's labels learnable from the images, and only from the images?

A deliberately simple, non-deep baseline is fitted per task on a generated cohort (one case per subject, 30 subjects
per task cohort by default):

* **features** (:func:`scan_features`): each scan is resampled into template (MNI152) space on a 3 mm grid with the
  *true* affine transform from ``_truth/scans.csv`` (rigid pose and head size/shape, :func:`true_affine`: a stand-in
  for the preprocessing stage's affine registration; the subject's non-linear anatomy stays), divided by
  its median inside the template brain mask and crudely bias-corrected (divided by a sigma = 25 mm smoothed copy);
  features are the mean intensity in 23 coarse atlas boxes (MNI coordinates, left and right) and 27 intensity
  quantiles. Multi-sequence tasks concatenate their sequences. No header field, file name or other truth column
  reaches the features.
* **model**: a screened linear model (inside each leave-one-out training fold, keep the ``SCREEN_K`` = 3 features most
  correlated with the label, fit a ridge on them, predict the left-out case); kernel ridge on all features for the
  3-class sequence task;
* **score**: accuracy (sequence), ROC AUC (MCI, IDH), R^2 of the leave-one-out predictions (age in years, log of
  days since stroke onset);
* **verdict**: a permutation test of the whole procedure: p = (1 + #(null >= observed)) / (1 + n_perm).

Leakage checks (each must stay at chance; Bonferroni over the family):

* **headers and names**: kernel ridge on NIfTI header fields (shape, zooms, data type, scl_slope, affine, axis codes,
  compression) plus hashed character 3-grams of the file path; and kernel ridge on image features plus the real
  versus shuffled header/name features (does the true pairing predict better?). The sequence label lives in file names
  by convention, so it is reported but exempt;
* **nuisance**: within each cohort, kernel ridge on vendor, field strength, voxel size, orientation and skull presence
  from the truth table, for every label of that cohort.

Run ``python bench/synth_learnability.py [--subjects-per-cohort 30] [--seed 0] [--perm 999] [--out DIR]``; the test suite
runs :func:`run_study` at seed 0 with 149 permutations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

STUDY_COHORTS = ("bids", "brats", "adni", "stroke")
GRID_MM = 3.0
GRID_LO = np.array([-78.0, -114.0, -72.0])
GRID_HI = np.array([78.0, 78.0, 90.0])
QUANTILES = np.array([0.001, 0.005, 0.01, 0.02, *np.linspace(0.05, 0.95, 19), 0.98, 0.99, 0.995, 0.999])
SCREEN_K = 3
BIAS_SIGMA_MM = 25.0


# ----------------------------------------------------------------------------------------------------------------------
# Features


ATLAS_BOXES_MM: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    # Coarse anatomical regions as MNI boxes (|x| ranges; each is split into left and right), in the spirit of an atlas.
    "lateral_ventricle": ((3, 25), (-40, 25), (0, 30)),
    "hippocampus": ((18, 36), (-40, -8), (-24, -2)),
    "amygdala": ((15, 32), (-10, 2), (-26, -10)),
    "thalamus": ((2, 20), (-32, -5), (-2, 18)),
    "striatum": ((10, 32), (-5, 25), (-8, 20)),
    "frontal": ((0, 75), (20, 80), (-20, 75)),
    "parietal": ((0, 75), (-70, -20), (25, 80)),
    "temporal": ((40, 75), (-60, 10), (-35, 10)),
    "occipital": ((0, 60), (-110, -70), (-20, 50)),
    "cerebellum": ((0, 55), (-95, -40), (-60, -20)),
    "centrum_semiovale": ((15, 35), (-40, 20), (25, 45)),
}


def _template_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI mm of a 3 mm grid over the brain, the template brain mask on it, and the atlas regions (one row each)."""
    from brainiac.ingestion.synthetic.anatomy import base_anatomy

    axes = [np.arange(lo, hi + 1e-6, GRID_MM) for lo, hi in zip(GRID_LO, GRID_HI, strict=True)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"))
    anat = base_anatomy(3.0)
    inv = np.linalg.inv(anat.affine)
    idx = np.einsum("ij,j...->i...", inv[:3, :3], pts) + inv[:3, 3].reshape(3, 1, 1, 1)
    mask = ndi.map_coordinates(anat.mask, idx, order=1) > 0.5
    x, y, z = pts
    regions = [mask & (np.abs(x) < 8) & (y > -38) & (y < -15) & (z > -50) & (z < -10)]  # brainstem
    for (x0, x1), (y0, y1), (z0, z1) in ATLAS_BOXES_MM.values():
        for side in (-1, 1):
            sx = side * x
            regions.append(mask & (sx >= x0) & (sx <= x1) & (y >= y0) & (y <= y1) & (z >= z0) & (z <= z1))
    return pts, mask, np.stack(regions).reshape(len(regions), -1).astype(np.float32)


_GRID: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def true_affine(row) -> np.ndarray:
    """Template mm -> scanner mm of one truth row: the subject's head size and shape (``head_size_xyz``, per axis about
    the head centre) followed by its rigid pose (``rigid_transform``). It stands in for the preprocessing stage's
    affine registration; what it leaves out is the subject's non-linear anatomy (deformation, atrophy, mass effect)."""
    from brainiac.ingestion.synthetic.anatomy import HEAD_CENTER_MM

    rigid = np.array(json.loads(row.rigid_transform)).reshape(4, 4)
    size = getattr(row, "head_size_xyz", None)
    size = np.array(json.loads(size), float) if isinstance(size, str) and size else np.full(3, float(row.head_scale))
    scale = np.eye(4)
    scale[:3, :3] = np.diag(size)
    scale[:3, 3] = HEAD_CENTER_MM - size * HEAD_CENTER_MM
    return rigid @ scale


def scan_features(path: Path, rigid: np.ndarray) -> np.ndarray:
    """Simple image features of one scan: mean intensity in 23 atlas regions and 27 intensity quantiles.

    The scan is sampled on a 3 mm template-space grid through the true affine transform (standing in for
    registration), divided by its median inside the template brain mask, and bias-corrected by dividing by a heavily
    smoothed copy (sigma 25 mm; a crude stand-in for N4). Regions are MNI boxes (:data:`ATLAS_BOXES_MM`, left and right,
    plus the brainstem); quantiles are taken over the template brain mask.
    """
    global _GRID
    if _GRID is None:
        _GRID = _template_grid()
    pts, mask, regions = _GRID
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    world = np.einsum("ij,j...->i...", rigid[:3, :3], pts) + rigid[:3, 3].reshape(3, 1, 1, 1)
    inv = np.linalg.inv(img.affine)
    idx = np.einsum("ij,j...->i...", inv[:3, :3], world) + inv[:3, 3].reshape(3, 1, 1, 1)
    vol = ndi.map_coordinates(data, idx, order=1, mode="constant", cval=0.0)
    vol = vol / (float(np.median(vol[mask])) or 1.0)
    sig = BIAS_SIGMA_MM / (3 * GRID_MM)  # estimated on a 3x coarser grid: the field is smooth, and this is 20x cheaper
    coarse = ndi.gaussian_filter((vol * mask)[::3, ::3, ::3], sig)
    weight = ndi.gaussian_filter(mask[::3, ::3, ::3].astype(np.float32), sig)
    low = coarse / np.maximum(weight, 1e-3)
    low = ndi.zoom(
        low, [a / b for a, b in zip(vol.shape, low.shape, strict=True)], order=1, grid_mode=True, mode="nearest"
    )
    vol = vol / np.maximum(low, 1e-3) * mask
    q = np.quantile(vol[mask], QUANTILES)
    means = (regions @ vol.ravel()) / np.maximum(regions.sum(axis=1), 1)
    return np.concatenate([means, q]).astype(np.float32)


def tumour_features(seg_path: Path, image_paths: list[Path], rigid: np.ndarray) -> np.ndarray:
    """Radiomics-style features from the segmentation a BraTS release ships with each case (``<Case>_seg.nii.gz``, data
    every IDH model uses, not truth): log volumes of labels 1/2/4, enhancing and edema fractions, the tumour centroid in
    template mm (via the true affine transform) and the median of each sequence inside the core and the enhancing rim,
    relative to the median of the brain."""
    seg_img = nib.load(seg_path)
    seg = np.asarray(seg_img.dataobj)
    vox = float(np.prod(seg_img.header.get_zooms()[:3])) / 1000.0
    vols = {v: float((seg == v).sum()) * vox for v in (1, 2, 4)}
    core = vols[1] + vols[4]
    tumour = np.argwhere(np.isin(seg, (1, 4)))
    if len(tumour):
        centre = seg_img.affine @ np.append(tumour.mean(axis=0), 1.0)
        centre = np.linalg.inv(rigid) @ centre
    else:
        centre = np.zeros(4)
    feats = [
        *(np.log1p(vols[v]) for v in (1, 2, 4)),
        vols[4] / (core + 1e-3),
        vols[2] / (core + 1e-3),
        *centre[:3],
    ]
    brain = seg >= 0
    for path in image_paths:
        data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        ref = float(np.median(data[(data > 0) & brain])) or 1.0
        for v in (1, 4):
            sel = seg == v
            feats.append(float(np.median(data[sel])) / ref if sel.any() else 0.0)
    return np.asarray(feats, np.float32)


def header_features(path: Path, rel: str) -> np.ndarray:
    """What a model could learn from metadata alone: header fields and hashed character 3-grams of the file path."""
    img = nib.load(path)
    h = img.header
    codes = "".join(nib.aff2axcodes(img.affine))
    slope = h.get_slope_inter()[0]
    fields = [
        *img.shape[:3],
        *h.get_zooms()[:3],
        float(h["datatype"]),
        float(slope if slope is not None else 1.0),
        *img.affine[:3].ravel(),
        *[float(c == a) for a in "RLAPSI" for c in codes],
        float(path.name.endswith(".gz")),
    ]
    grams = np.zeros(64, np.float32)
    for i in range(len(rel) - 2):
        grams[int(hashlib.md5(rel[i : i + 3].encode()).hexdigest()[:4], 16) % 64] += 1
    return np.concatenate([np.asarray(fields, np.float32), grams])


# ----------------------------------------------------------------------------------------------------------------------
# Model and permutation test


def _kernel(*blocks: np.ndarray) -> np.ndarray:
    """Sum of linear kernels of z-scored feature blocks, each scaled to unit mean diagonal."""
    k = 0.0
    for x in blocks:
        x = np.asarray(x, np.float64)
        sd = x.std(axis=0)
        z = (x - x.mean(axis=0)) / np.where(sd > 1e-9, sd, 1.0)
        kb = z @ z.T
        k = k + kb / (np.mean(np.diag(kb)) or 1.0)
    return np.asarray(k)


def loo_predictions(k: np.ndarray, y: np.ndarray, lam: float = 1.0) -> np.ndarray:
    """Exact leave-one-out predictions of kernel ridge with a (nearly unpenalised) intercept, for every column of y."""
    n = k.shape[0]
    kc = k + 100.0 * np.ones((n, n))  # intercept as a heavily weighted constant feature
    h = kc @ np.linalg.inv(kc + lam * np.mean(np.diag(k)) * np.eye(n))
    y2 = y.reshape(n, -1)
    resid = (y2 - h @ y2) / (1.0 - np.diag(h))[:, None]
    return (y2 - resid).reshape(y.shape)


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 1e-9, sd, 1.0)


def screened_loo_predictions(x: np.ndarray, y: np.ndarray, k: int = SCREEN_K, lam: float = 1.0) -> np.ndarray:
    """Leave-one-out predictions of a screened ridge: in each training fold keep the ``k`` features most correlated
    with the label (mass-univariate screening, as in voxel-based morphometry), then fit kernel ridge on them.

    ``x`` must be z-scored (label-free). Screening happens inside each fold, so the left-out case never influences
    which features are kept.
    """
    n = x.shape[0]
    y2 = y.reshape(n, -1).astype(np.float64)
    out = np.empty_like(y2)
    idx = np.arange(n)
    for i in range(n):
        tr = idx != i
        xt, yt = x[tr], y2[tr]
        yc = yt - yt.mean(axis=0)
        xc = xt - xt.mean(axis=0)
        r = np.abs(xc.T @ yc).sum(axis=1) / (np.sqrt((xc**2).sum(axis=0)) + 1e-9)
        keep = np.argpartition(-r, min(k, r.size - 1))[:k]
        xs = xc[:, keep]
        kern = xs @ xs.T
        alpha = np.linalg.solve(kern + lam * (np.mean(np.diag(kern)) or 1.0) * np.eye(n - 1), yc)
        out[i] = (x[i, keep] - xt[:, keep].mean(axis=0)) @ xs.T @ alpha + yt.mean(axis=0)
    return out.reshape(y.shape)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    ranks = pd.Series(s).rank().to_numpy()
    pos = y > 0
    n1, n0 = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _score(kind: str, y: np.ndarray, pred: np.ndarray) -> float:
    if kind == "multiclass":
        return float((pred.argmax(axis=1) == y.argmax(axis=1)).mean())
    if kind == "binary":
        return _auc(y, pred)
    return float(1.0 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def _encode(kind: str, labels: np.ndarray) -> np.ndarray:
    if kind == "multiclass":
        classes = sorted(set(labels.tolist()))
        return np.array([[float(v == c) for c in classes] for v in labels])
    if kind == "binary":
        return np.where(labels.astype(bool), 1.0, -1.0)
    return labels.astype(np.float64)


@dataclass
class TaskResult:
    task: str
    cohort: str
    n: int
    metric: str
    score: float
    chance: float
    null_95: float
    p: float
    extra: dict

    def line(self) -> str:
        ex = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return (
            f"{self.task:<14} {self.cohort:<7} n={self.n:<3} {self.metric:<9} {self.score:7.3f} "
            f"(chance {self.chance:.3f}, null95 {self.null_95:.3f}, margin {self.score - self.null_95:+.3f}) "
            f"p={self.p:.4f} {ex}"
        )


Predictor = Callable[[np.ndarray], np.ndarray]
"""Leave-one-out predictions for an encoded label vector/matrix (features are bound inside)."""


def ridge_model(*blocks: np.ndarray) -> Predictor:
    """Kernel ridge on all features (z-scored blocks, each with equal weight)."""
    k = _kernel(*blocks)
    return lambda y: loo_predictions(k, y)


def screened_model(*blocks: np.ndarray, k: int = SCREEN_K) -> Predictor:
    """Screened linear model: the ``k`` features most correlated with the label inside each training fold."""
    z = np.concatenate([_zscore(np.asarray(b, np.float64)) for b in blocks], axis=1)
    return lambda y: screened_loo_predictions(z, y, k=k)


def permutation_test(
    model: Predictor, labels: np.ndarray, kind: str, n_perm: int, rng: np.random.Generator
) -> tuple[float, np.ndarray]:
    """Observed LOO score and the scores of the same procedure on ``n_perm`` label permutations."""
    y = _encode(kind, labels)
    observed = _score(kind, y, model(y))
    null = np.empty(n_perm)
    for i in range(n_perm):
        yp = y[rng.permutation(len(y))]
        null[i] = _score(kind, yp, model(yp))
    return observed, null


def _result(task, cohort, kind, model, labels, n_perm, rng, extra=None) -> TaskResult:
    obs, null = permutation_test(model, labels, kind, n_perm, rng)
    chance = {"multiclass": 1.0 / len(set(labels.tolist())), "binary": 0.5}.get(kind, 0.0)
    metric = {"multiclass": "accuracy", "binary": "AUC"}.get(kind, "R2")
    p = float((1 + (null >= obs).sum()) / (1 + n_perm))
    return TaskResult(task, cohort, len(labels), metric, obs, chance, float(np.quantile(null, 0.95)), p, extra or {})


# ----------------------------------------------------------------------------------------------------------------------
# The study


TASKS = {
    # task: (cohort, sequences used, label column, kind)
    "sequence": ("bids", None, "sequence", "multiclass"),
    "age": ("bids", ("T1w",), "age_years", "regression"),
    "mci": ("adni", ("T1w",), "diagnosis", "binary"),
    "idh": ("brats", ("T1w", "T1ce", "T2w", "FLAIR"), "idh", "binary"),
    "stroke_onset": ("stroke", ("T1w", "FLAIR", "DWI"), "stroke_onset_days", "regression"),
}
NUISANCE = ("vendor", "field_strength_t", "voxel_size_mm", "axcodes", "skull_present")
COHORT_LABELS = {
    "bids": ("age_years", "sex", "sequence"),
    "adni": ("age_years", "sex", "diagnosis"),
    "brats": ("age_years", "sex", "idh", "survival_days"),
    "stroke": ("age_years", "sex", "stroke_onset_days"),
    "dicom": ("age_years", "sex", "idh"),
}


def _cases(truth: pd.DataFrame, task: str, seed: int) -> pd.DataFrame:
    """One case per subject (first session); for ``sequence`` one random sequence per subject."""
    cohort, seqs, _, _ = TASKS[task]
    t = truth[(truth.cohort == cohort) & (truth.kind == "image") & (truth.duplicate_of.fillna("") == "")]
    first = t.groupby("subject_uid").session.transform("min")
    t = t[t.session == first]
    if seqs is None:
        return t.groupby("subject_uid").sample(n=1, random_state=seed)
    return t[t.sequence.isin(seqs)]


def _label(task: str, rows: pd.DataFrame) -> np.ndarray:
    col, kind = TASKS[task][2], TASKS[task][3]
    v = rows[col]
    if task == "mci":
        return (v == "MCI").to_numpy()
    if task == "idh":
        return (v == "mutant").to_numpy()
    if task == "stroke_onset":
        return np.log(v.astype(float).to_numpy())
    if kind == "regression":
        return v.astype(float).to_numpy()
    return v.to_numpy()


def _nuisance_matrix(rows: pd.DataFrame) -> np.ndarray:
    cols = []
    for c in NUISANCE:
        v = rows[c]
        if c == "voxel_size_mm":
            cols.append(np.array([json.loads(s) for s in v], float))
        elif c == "field_strength_t":
            cols.append(v.astype(float).to_numpy()[:, None])
        else:
            levels = sorted(set(map(str, v)))
            cols.append(np.array([[float(str(x) == lv) for lv in levels] for x in v]))
    return np.concatenate(cols, axis=1)


def nuisance_checks(truth: pd.DataFrame, n_perm: int, seed: int) -> list[TaskResult]:
    """Within each cohort, nuisance features -> every label of the cohort (one scan per subject)."""
    out = []
    for cohort, labels in COHORT_LABELS.items():
        t = truth[(truth.cohort == cohort) & (truth.kind == "image") & (truth.duplicate_of.fillna("") == "")]
        if t.empty:
            continue
        for label in labels:
            rows = t if label == "sequence" else t.groupby("subject_uid").head(1)  # sequence is a per-scan label
            if rows[label].isna().all() or len(rows) < 8:
                continue
            y = rows[label]
            if label in ("age_years", "survival_days", "stroke_onset_days"):
                kind, lab = "regression", np.log1p(y.astype(float).to_numpy())
            elif y.nunique() == 2:
                kind, lab = "binary", (y == sorted(y.unique())[0]).to_numpy()
            else:
                kind, lab = "multiclass", y.astype(str).to_numpy()
            rng = np.random.default_rng([seed, len(out)])
            out.append(_result(f"nuis:{label}", cohort, kind, ridge_model(_nuisance_matrix(rows)), lab, n_perm, rng))
    return out


def run_study(
    out: Path, *, n_perm: int = 999, n_shuffle: int = 99, seed: int = 0, verbose: bool = False
) -> dict[str, list[TaskResult]]:
    """Learnability and leakage checks on a generated cohort at ``out`` (with ``_truth/scans.csv``)."""
    truth = pd.read_csv(out / "_truth" / "scans.csv", keep_default_na=False, na_values=[""])
    learn, header_only, shuffled = [], [], []
    for task, (cohort, _seqs, _, kind) in TASKS.items():
        rows = _cases(truth, task, seed)
        folder = out / rows.dataset.iloc[0]
        feats: dict[str, list[np.ndarray]] = {}
        heads: dict[str, list[np.ndarray]] = {}
        for _, r in rows.iterrows():
            rigid = true_affine(r)
            feats.setdefault(r.subject_uid, []).append(scan_features(folder / r.path, rigid))
            heads.setdefault(r.subject_uid, []).append(header_features(folder / r.path, r.path))
        subjects = list(dict.fromkeys(rows.subject_uid))
        if task == "idh":  # BraTS ships a segmentation per case: add the radiomics any IDH model would use
            segs = truth[(truth.cohort == cohort) & (truth.kind == "label")].set_index("subject_uid")
            for uid, g in rows.groupby("subject_uid", sort=False):
                rigid = true_affine(g.iloc[0])
                paths = [folder / p for p in g.sort_values("sequence").path]
                feats[uid].append(tumour_features(folder / segs.loc[uid, "path"], paths, rigid))
        x = np.stack([np.concatenate(feats[s]) for s in subjects])
        hx = np.stack([np.concatenate(heads[s]) for s in subjects])
        per_subject = rows.groupby("subject_uid", sort=False).head(1).set_index("subject_uid").loc[subjects]
        y = _label(task, per_subject)
        rng = np.random.default_rng([seed, 1])
        model = ridge_model(x) if kind == "multiclass" else screened_model(x)
        extra = {}
        if kind == "regression":
            pred = model(y.astype(float))
            unit = " y" if task == "age" else " log-days"
            extra = {
                "MAE": f"{np.abs(pred - y).mean():.2f}{unit}",
                "MAE_of_mean": f"{np.abs(y - y.mean()).mean():.2f}{unit}",
            }
        learn.append(_result(task, cohort, kind, model, y, n_perm, rng, extra))
        header_only.append(
            _result(f"hdr:{task}", cohort, kind, ridge_model(hx), y, n_perm, np.random.default_rng([seed, 2]))
        )
        # real headers + voxels vs shuffled headers + voxels: does the true pairing predict better?
        yy = _encode(kind, y)
        real = _score(kind, yy, ridge_model(x, hx)(yy))
        srng = np.random.default_rng([seed, 3])
        null = np.array([_score(kind, yy, ridge_model(x, hx[srng.permutation(len(y))])(yy)) for _ in range(n_shuffle)])
        p_shuffle = float((1 + (null >= real).sum()) / (1 + n_shuffle))
        shuffled.append(
            TaskResult(
                f"shuf:{task}",
                cohort,
                len(y),
                "score",
                real,
                float(np.median(null)),
                float(np.quantile(null, 0.95)),
                p_shuffle,
                {},
            )
        )
        if verbose:
            print(learn[-1].line(), flush=True)
    nuis = nuisance_checks(truth, n_perm, seed)
    return {"learnable": learn, "header_only": header_only, "header_shuffle": shuffled, "nuisance": nuis}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects-per-cohort", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--perm", type=int, default=999)
    ap.add_argument("--out", type=Path, default=None, help="reuse or create a cohort here (default: a temp folder)")
    args = ap.parse_args(argv)
    from brainiac.ingestion.synthetic import generate_cohort

    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.TemporaryDirectory()
        out = Path(tmp.name) / "cohort"
    if not (out / "_truth" / "scans.csv").is_file():
        t0 = time.perf_counter()
        s = generate_cohort(
            out, subjects=args.subjects_per_cohort * len(STUDY_COHORTS), seed=args.seed, cohorts=STUDY_COHORTS
        )
        print(f"generated {s.n_subjects} subjects / {s.n_scans} scans in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    res = run_study(out, n_perm=args.perm, seed=args.seed)
    for group, items in res.items():
        print(f"\n== {group}")
        for r in items:
            print(r.line())
    print(f"\nstudy took {time.perf_counter() - t0:.1f} s")
    bad = [r for r in res["learnable"] if r.p >= 0.01]
    m = sum(len(v) for k, v in res.items() if k != "learnable")
    leaks = [r for k, v in res.items() if k != "learnable" for r in v if r.p < 0.01 / m]
    print(f"not learnable at p<0.01: {[r.task for r in bad]}; leaks (Bonferroni over {m}): {[r.task for r in leaks]}")
    if tmp is not None:
        tmp.cleanup()
    return 1 if bad or leaks else 0


if __name__ == "__main__":
    sys.exit(main())
