"""Does SimCLR pretraining learn something useful? Linear probes on frozen embeddings of the pretrained tiny encoder
next to the same probes on a randomly initialised encoder of the same architecture, measured in the same run.

    .venv/bin/python bench/ssl_probe.py --work /tmp/sslprobe --build                    # 40 subjects, 200 steps
    .venv/bin/python bench/ssl_probe.py --work /tmp/sslprobe --build --subjects 24 --steps 150
    .venv/bin/python bench/ssl_probe.py --work /tmp/sslprobe --encoder RUN_DIR/checkpoint_.../encoder   # probe only

Data: the ``small`` synthetic cohort (2 mm voxels, all five task cohorts). With ``--build`` the bench creates what is
missing under ``--work``, the same steps by hand being::

    export BRAINIAC_PSEUDONYM_KEY=bench-key-0123456789abcdef     # any key of >= 16 characters
    brainiac synth WORK/cohort --subjects 40 --preset small --seed 0
    brainiac ingest WORK/cohort/synth-* --catalog WORK/catalog -c tiny
    brainiac preprocess --catalog WORK/catalog -c tiny \\
        --set preprocess.whole_spacing_mm=2 --set preprocess.registration_spacing_mm=2

(the tiny config's 32³ ``fixed`` cube, the whole-brain grid at the cohort's own 2 mm). Without ``--build`` the catalog
must exist (``--catalog`` or ``WORK/catalog``).

Pretraining: the real job, :func:`brainiac.jobs.pretrain.run.pretrain` with ``pretrain/tiny`` (2 CPU Ray Train
workers, 32³ ViT of width 48) for ``--steps`` optimiser steps on the train split, checkpoints and MLflow under
``--work``.
The baseline is the same architecture at the run's own initial weights (``torch.manual_seed(cfg.seed)`` before building
it, as the job does).

Probe input: each QC-passing volume's ``fixed`` cube (the whole brain on the template grid, z-scored), resized with
``torch.nn.functional.interpolate`` (trilinear) to the model's ``img_size`` when it differs; both encoders see the same
tensors, in eval mode, and their pooled features are the embeddings. Probes (scikit-learn, installed with MLflow):
standardised features, then

* **sequence** (T1w/T1ce/T2w/FLAIR/DWI): multinomial logistic regression; accuracy and balanced accuracy;
* **age** (``scans.age_years``; scans without an age are left out): ridge regression; R² and MAE in years.

The regularisation strength of each probe is chosen by grouped (subject) cross-validation inside the train split, for
each encoder alike. Subjects come from the catalog's ``splits`` table: the probe is fitted on the ``train`` split and
scored on ``val`` + ``test`` (subjects that pretraining never saw either); no subject is on both sides (checked). The
95 % interval of each difference is a paired bootstrap over held-out subjects. A ``chance`` column gives the score of
predicting the train split's majority class / mean age. No assertions: the table is the evidence.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from brainiac.platform.cluster import configure_ray_environment

configure_ray_environment()

import torch  # noqa: E402

CLI = [sys.executable, "-c", "from brainiac.platform.cli.main import main; main()"]
SEQUENCE_ORDER = ["T1w", "T1ce", "T2w", "FLAIR", "DWI", "ADC", "SWI", "PD", "other"]


# ----------------------------------------------------------------------------------------------------------------------
# Catalog


def build(work: Path, catalog: Path, subjects: int, seed: int) -> None:
    """Synthesize (``small`` preset), ingest and preprocess into ``catalog`` whatever is missing."""
    from brainiac.platform.catalog import Catalog

    env = dict(os.environ)
    env.setdefault("BRAINIAC_PSEUDONYM_KEY", "ssl-probe-key-0123456789abcdef")
    cohort = work / "cohort"

    def run(args: list[str], what: str) -> None:
        started = time.perf_counter()
        print(f"  {what} ...", flush=True)
        subprocess.run([*CLI, *args], check=True, env=env, stdout=subprocess.DEVNULL)
        print(f"  {what}: {time.perf_counter() - started:.0f} s", flush=True)

    if not (cohort / "_truth").is_dir():
        run(["synth", str(cohort), "--subjects", str(subjects), "--preset", "small", "--seed", str(seed)],
            f"brainiac synth --preset small --subjects {subjects}")  # fmt: skip
    if Catalog.open(str(catalog)).version("volumes") is None:
        folders = sorted(str(p) for p in cohort.glob("synth-*"))
        run(["ingest", *folders, "--catalog", str(catalog), "-c", "tiny"], "brainiac ingest")
        run(["preprocess", "--catalog", str(catalog), "-c", "tiny", "-q", "--set", "preprocess.whole_spacing_mm=2",
             "--set", "preprocess.registration_spacing_mm=2"], "brainiac preprocess")  # fmt: skip


def probe_rows(catalog_uri: str, cfg):
    """One row per QC-passing volume of the version pretraining reads: scan, subject, split, sequence, age, cube."""
    import pandas as pd

    from brainiac.ingestion.splits import read_splits
    from brainiac.jobs.pretrain.stream import select_volumes
    from brainiac.platform.catalog import Catalog, sql_literal

    catalog = Catalog.open(catalog_uri)
    selection = select_volumes(catalog, cfg)  # the version pretraining reads, and the same access check
    where = f"preprocess_version = {sql_literal(selection.preprocess_version)} AND qc_pass"
    cols = ["scan_id", "dataset", "subject_id", "sequence", "fixed", "fixed_shape", "dtype"]
    vols = catalog.select("volumes", where, cols, version=selection.volumes_version).to_pandas()
    ages = catalog.select_keys("scans", "scan_id", list(vols["scan_id"]), ["scan_id", "age_years"]).to_pandas()
    ages = ages.drop_duplicates("scan_id")
    rows = vols.merge(ages, on="scan_id", how="left")
    rows["split"] = rows["subject_id"].map(read_splits(catalog, cfg.splits.seed, sorted(rows["subject_id"].unique())))
    rows = rows[rows["split"].notna()].sort_values("scan_id").reset_index(drop=True)
    return pd.DataFrame(rows), selection


def cubes(rows, size: int) -> torch.Tensor:
    """(N, 1, size, size, size) float32: each row's ``fixed`` cube, trilinearly resized to ``size`` if needed."""
    from brainiac.ingestion.volumes import decode_array

    out = []
    for blob, shape, dtype in zip(rows["fixed"], rows["fixed_shape"], rows["dtype"], strict=True):
        shape = [int(s) for s in shape]
        x = torch.from_numpy(decode_array(blob, shape, dtype or "float16").astype(np.float32))[None, None]
        if tuple(x.shape[2:]) != (size,) * 3:
            x = torch.nn.functional.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def embed(encoder: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> np.ndarray:
    encoder.eval()
    return torch.cat([encoder(chunk) for chunk in x.split(batch)]).numpy().astype(np.float64)


# ----------------------------------------------------------------------------------------------------------------------
# Probes


def _cv(groups: np.ndarray) -> object:
    from sklearn.model_selection import GroupKFold

    return GroupKFold(n_splits=max(2, min(5, len(np.unique(groups)))))


def fit_sequence_probe(train_x: np.ndarray, train_y: np.ndarray, groups: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    grid = GridSearchCV(pipe, {"logisticregression__C": np.logspace(-3, 2, 6)}, cv=_cv(groups), scoring="accuracy")
    return grid.fit(train_x, train_y, groups=groups)


def fit_age_probe(train_x: np.ndarray, train_y: np.ndarray, groups: np.ndarray):
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), Ridge())
    grid = GridSearchCV(
        pipe, {"ridge__alpha": np.logspace(-2, 4, 7)}, cv=_cv(groups), scoring="neg_mean_absolute_error"
    )
    return grid.fit(train_x, train_y, groups=groups)


def _metrics(kind: str):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, mean_absolute_error, r2_score

    if kind == "sequence":
        return {"accuracy": accuracy_score, "balanced accuracy": balanced_accuracy_score}
    return {"R²": r2_score, "MAE (years)": mean_absolute_error}


def bootstrap_diff(metric, y, pred_a, pred_b, groups, n: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of metric(a) - metric(b), resampling held-out subjects with replacement."""
    rng = np.random.default_rng(seed)
    subjects = np.unique(groups)
    index = {s: np.flatnonzero(groups == s) for s in subjects}
    diffs = []
    for _ in range(n):
        take = np.concatenate([index[s] for s in rng.choice(subjects, size=len(subjects), replace=True)])
        if len(np.unique(y[take])) < 2:
            continue
        diffs.append(metric(y[take], pred_a[take]) - metric(y[take], pred_b[take]))
    if not diffs:
        return float("nan"), float("nan")
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the cohort, catalog, checkpoints and MLflow")
    ap.add_argument("--catalog", help="catalog to read (default WORK/catalog)")
    ap.add_argument("--build", action="store_true", help="synthesize + ingest + preprocess into WORK if missing")
    ap.add_argument("--subjects", type=int, default=40, help="subjects of the small cohort --build generates")
    ap.add_argument("--seed", type=int, default=0, help="cohort seed for --build")
    ap.add_argument("--steps", type=int, default=200, help="pretraining optimiser steps")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train CPU workers")
    ap.add_argument("--encoder", help="probe this exported encoder (checkpoint or encoder folder) instead of training")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the difference's interval")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override KEY=VALUE")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # sklearn convergence/class-count chatter on a few dozen samples
    started = time.perf_counter()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    catalog = Path(args.catalog).resolve() if args.catalog else work / "catalog"
    if args.build:
        build(work, catalog, args.subjects, args.seed)

    from brainiac.jobs.config import load_config
    from brainiac.models.export import load_encoder
    from brainiac.models.simclr import SimCLRModel

    overrides = [
        f"catalog.uri={catalog}",
        f"pretrain.max_steps={args.steps}",
        f"pretrain.num_workers={args.workers}",
        f"pretrain.storage_path={work / 'runs'}",
        f"pretrain.run_name=ssl-probe-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        *args.overrides,
    ]
    cfg = load_config("pretrain/tiny", overrides)
    rows, selection = probe_rows(str(catalog), cfg)

    if args.encoder:
        encoder_ref, train_note = args.encoder, f"given encoder {args.encoder}"
    else:
        from brainiac.jobs.pretrain.run import pretrain

        print(
            f"pretraining {cfg.model.kind} {cfg.model.img_size}³ hidden {cfg.model.hidden_size} for {args.steps} steps"
            f" on {len(selection.train_ids)} train volumes, {args.workers} workers x batch {cfg.pretrain.batch_size}",
            flush=True,
        )
        t = time.perf_counter()
        summary = pretrain(cfg, progress=False)
        import ray

        ray.shutdown()
        encoder_ref = summary.checkpoint
        train_note = (
            f"pretrain {summary.steps} steps in {time.perf_counter() - t:.0f} s, final loss {summary.final_loss:.3f},"
            f" {summary.samples_per_s or 0:.1f} pairs/s, data-wait {summary.data_wait_fraction or 0:.0%}; held-out"
            f" pair retrieval top-1 {summary.eval_top1:.3f} vs random init {summary.eval_top1_random:.3f}"
        )
        print(f"  {train_note}\n  checkpoint {summary.checkpoint}", flush=True)

    pretrained, backbone = load_encoder(str(encoder_ref))
    torch.manual_seed(cfg.seed)
    random_init = SimCLRModel(cfg.model, cfg.projection).encoder
    x = cubes(rows, backbone.img_size)
    feats = {"pretrained": embed(pretrained, x), "random": embed(random_init, x)}

    train = (rows["split"] == "train").to_numpy()
    held = rows["split"].isin(["val", "test"]).to_numpy()
    leaked = set(rows.loc[train, "subject_id"]) & set(rows.loc[held, "subject_id"])
    subjects = rows["subject_id"].to_numpy()

    print(
        f"\ncatalog {catalog} (preprocess {selection.preprocess_version}): {len(rows)} volumes, input fixed cube"
        f" {tuple(int(s) for s in rows['fixed_shape'].iloc[0])} -> {backbone.img_size}³,"
        f" features {feats['random'].shape[1]}"
    )
    print(
        f"probe fit on train: {train.sum()} volumes / {len(set(subjects[train]))} subjects; scored on val+test:"
        f" {held.sum()} volumes / {len(set(subjects[held]))} subjects; subjects on both sides: {len(leaked)}"
    )
    print(f"{train_note}")

    table = []
    for target in ("sequence", "age"):
        if target == "sequence":
            y = rows["sequence"].to_numpy()
            ok = np.ones(len(rows), dtype=bool)
        else:
            y = rows["age_years"].to_numpy(dtype=float)
            ok = np.isfinite(y)
        tr, te = train & ok, held & ok
        fit = fit_sequence_probe if target == "sequence" else fit_age_probe
        preds = {}
        for name, f in feats.items():
            preds[name] = fit(f[tr], y[tr], subjects[tr]).predict(f[te])
        if target == "sequence":
            values, counts = np.unique(y[tr], return_counts=True)
            chance = np.full(te.sum(), values[np.argmax(counts)], dtype=object)
            classes = ", ".join(f"{s} {int((y[te] == s).sum())}" for s in SEQUENCE_ORDER if (y[te] == s).any())
            note = f"held-out classes: {classes}"
        else:
            chance = np.full(te.sum(), float(np.mean(y[tr])))
            note = f"held-out ages {np.min(y[te]):.0f}-{np.max(y[te]):.0f} y (sd {np.std(y[te]):.1f})"
        for metric_name, metric in _metrics(target).items():
            a, b = metric(y[te], preds["pretrained"]), metric(y[te], preds["random"])
            lo, hi = bootstrap_diff(metric, y[te], preds["pretrained"], preds["random"], subjects[te],
                                    args.bootstrap, cfg.seed)  # fmt: skip
            table.append((target, metric_name, a, b, a - b, lo, hi, metric(y[te], chance), te.sum(), note))

    print(
        f"\n{'target':<9} {'metric':<18} {'pretrained':>10} {'random':>8} {'difference':>10}  {'95% CI':<16}"
        f" {'chance':>7}"
    )
    for target, metric_name, a, b, d, lo, hi, c, *_ in table:
        print(f"{target:<9} {metric_name:<18} {a:10.3f} {b:8.3f} {d:+10.3f}  [{lo:+.3f}, {hi:+.3f}]  {c:7.3f}")
    for target in ("sequence", "age"):
        row = next(r for r in table if r[0] == target)
        print(f"  {target}: n = {row[8]} held-out volumes; {row[9]}")
    print("  (MAE: lower is better, so a negative difference favours the pretrained encoder)")
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
