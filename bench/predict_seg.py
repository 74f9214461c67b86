"""Native-space Dice of ``brainiac predict``'s tumour masks on held-out scans.

The whole user path, measured where a user looks at it: a segmenter is fine-tuned by the real job
(:func:`brainiac.jobs.finetune.run.finetune`, registered in a registry of the bench's own), then
:func:`brainiac.jobs.predict.predict_scans` takes each held-out FLAIR *file* — preprocessing it from scratch with the
config the model recorded, predicting on the fixed grid and mapping the mask back through the registration onto the
file's own grid — and the written mask is compared with the truth mask on that same native grid. So the figure includes
every resampling the platform does (scan → template grid → scan), not only the model's Dice on the training grid.

    # default: a BraTS-only tiny cohort (40 subjects, FLAIR + seg kept), 30 epochs from scratch; CPU, a few minutes
    .venv/bin/python bench/predict_seg.py --work /tmp/predict-seg

    # an existing catalog (truth = each FLAIR's label map, its scans.labels "seg_uri") and more epochs
    .venv/bin/python bench/predict_seg.py --work /tmp/ps --catalog /data/catalog --epochs 200

Steps:

1. Cohort and catalog (unless ``--catalog``): ``generate_cohort(preset="tiny", cohorts=["brats"])`` into
   ``WORK/cohort``; the T1w/T1ce/T2w files are removed before ingestion (the segmentation task reads FLAIR only, and
   preprocessing them would quadruple the build); ingest and preprocess with the ``tiny`` config (3 mm grids, 32³
   cube of ~6 mm voxels); splits ``--fractions`` (default 0.6/0.1/0.3, so the test split holds a dozen subjects).
2. Train: ``finetune`` task ``segmentation``, ``--strategy`` (default scratch: no encoder needed), one trial,
   ``--epochs``, ``--lr``, ``--batch-size`` 2 (more optimiser steps per epoch); only the train split is trained on.
   Augmentation is off by default (the 0.795 figure was measured so): before this bench the engine's segmentation
   flips moved image and mask along different axes, which left the model near Dice 0.15 after 60 epochs; that is
   fixed and tested now. ``--augment`` turns the (fixed) flips and intensity changes on.
3. Predict on the FLAIRs of the test split (``--split``; never a training subject) and score the native-space masks:
   Dice against the generator's truth labels (``_truth/labels/...``, > 0 = whole tumour), or against the catalog's label
   map for ``--catalog``.

Prints one row per scan and ``native-space Dice (test): mean ± sd (n)``; writes ``WORK/predict_seg.json``.
The target is a mean ≥ 0.7. What it does NOT measure: the fixed cube's voxels are ~6 mm at the tiny preset, so the
masks are coarse by construction; the truth of the synthetic cohort is exact, real data's is not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

TARGET_DICE = 0.7


def build_catalog(work: Path, subjects: int, seed: int, cfg) -> Path:
    """BraTS-only tiny cohort (FLAIR + seg) → catalog with volumes and splits, each step only if missing."""
    from brainiac.ingestion.ingest import ingest
    from brainiac.ingestion.prepare import preprocess
    from brainiac.ingestion.synthetic import generate_cohort
    from brainiac.platform.catalog import Catalog

    cohort = work / "cohort"
    if not (cohort / "_truth").is_dir():
        started = time.perf_counter()
        summary = generate_cohort(cohort, subjects=subjects, seed=seed, preset="tiny", cohorts=["brats"])
        for name in ("t1", "t1ce", "t2"):
            for path in (cohort / summary.cohorts["brats"]).glob(f"*/*_{name}.nii.gz"):
                path.unlink()
        print(
            f"  synth: {subjects} BraTS subjects, FLAIR + seg kept: {time.perf_counter() - started:.0f} s", flush=True
        )
    catalog = Catalog.open(cfg.catalog.uri)
    if catalog.version("scans") is None:
        started = time.perf_counter()
        ingest(cfg, [str(p) for p in sorted(cohort.glob("synth-*"))], progress=False)
        print(f"  ingest: {time.perf_counter() - started:.0f} s", flush=True)
    if catalog.version("volumes") is None:
        started = time.perf_counter()
        s = preprocess(cfg, progress=False)
        print(f"  preprocess: {s.processed} scans, {time.perf_counter() - started:.0f} s", flush=True)
    return cohort


def held_out_scans(cfg, split: str, cohort: Path | None) -> list[dict[str, Any]]:
    """FLAIR scans of ``split`` subjects with their truth mask file: the generator's truth for a synthetic cohort,
    else the label map the catalog recorded for the scan."""
    import pandas as pd

    from brainiac.platform.catalog import Catalog

    catalog = Catalog.open(cfg.catalog.uri, cfg.catalog.storage_options)
    rows = catalog.sql(
        "SELECT s.scan_id, s.source_uri, s.image_uri, s.labels FROM scans s JOIN splits p ON s.subject_id = p.subject_id "
        f"WHERE s.sequence = 'FLAIR' AND s.status = 'current' AND p.split = '{split}' AND p.seed = {cfg.splits.seed} "
        "ORDER BY s.source_uri"
    ).to_pylist()
    truth = None
    if cohort is not None:
        truth = pd.read_csv(cohort / "_truth" / "scans.csv", dtype={"path": str, "label_path": str})
        truth = truth[(truth["kind"] == "image") & (truth["sequence"] == "FLAIR")]
    if truth is not None and rows:  # the generator's truth is keyed by source path: the identified zone has them
        from brainiac.ingestion.identified import identify

        real = identify(pd.DataFrame(rows), catalog.uri, cfg.ingest.identified_uri, cfg.catalog.storage_options)
        rows = [{**r, "path": p} for r, p in zip(rows, real["source_uri"], strict=True)]
    out = []
    for r in rows:
        if truth is not None:
            match = truth[[r["path"].endswith("/" + p) for p in truth["path"]]]
            label = str(cohort / "_truth" / match.iloc[0]["label_path"]) if len(match) else None
        else:
            label = json.loads(r["labels"] or "{}").get("seg_uri")
        if label:
            out.append({"scan": r["image_uri"], "truth": label})
    return out


def dice(a, b) -> float:
    import numpy as np

    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 2.0 * int(np.count_nonzero(a & b)) / total if total else 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/brainiac-predict-seg"))
    parser.add_argument("--catalog", help="use this catalog instead of building a synthetic one")
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--fractions", default="[0.6,0.1,0.3]", help="train/val/test subject fractions")
    parser.add_argument("--strategy", default="scratch", choices=("scratch", "linear", "full"))
    parser.add_argument("--init", default="", help="encoder for linear/full (models:/brainiac-encoder@ALIAS)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--augment", action="store_true", help="the job's segmentation augmentation (see docstring)")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("BRAINIAC_PSEUDONYM_KEY", "predict-seg-bench-key-0123456789abcdef")
    import nibabel as nib
    import numpy as np

    from brainiac.jobs.config import load_config
    from brainiac.jobs.finetune.run import finetune
    from brainiac.jobs.predict import predict_scans

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    catalog_uri = args.catalog or str(work / "catalog")
    cfg = load_config("tiny", [
        f"catalog.uri={catalog_uri}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"splits.fractions={args.fractions}", "finetune.task=segmentation", f"finetune.strategy={args.strategy}",
        f"finetune.init={args.init}", f"finetune.max_epochs={args.epochs}", f"finetune.lr={args.lr}",
        f"finetune.batch_size={args.batch_size}", f"finetune.augment={str(args.augment).lower()}",
        "finetune.bootstrap=100", "finetune.alias=bench", f"finetune.storage_path={work / 'runs'}",
        *args.overrides,
    ])  # fmt: skip
    started = time.perf_counter()
    print("predict_seg: building the catalog", flush=True)
    cohort = None if args.catalog else build_catalog(work, args.subjects, args.seed, cfg)

    t = time.perf_counter()
    s = finetune(cfg, progress=False)
    train_s = time.perf_counter() - t
    job_dice = s.test.get("dice", {}).get("mean", float("nan"))
    print(f"  finetune: {s.cases} cases, {args.epochs} epochs, {train_s:.0f} s; job's fixed-grid test Dice "
          f"{job_dice:.3f}; {s.model_uri} v{s.model_version}", flush=True)  # fmt: skip

    scans = held_out_scans(cfg, args.split, cohort)
    if not scans:
        print(f"no FLAIR with a label map in the {args.split} split", file=sys.stderr)
        return 1
    t = time.perf_counter()
    predictions = predict_scans(cfg, s.model_uri, [x["scan"] for x in scans], out_dir=work / "predictions",
                                sequence_check=False)  # fmt: skip
    predict_s = time.perf_counter() - t
    rows = []
    for item, p in zip(scans, predictions, strict=True):
        mask_img = nib.load(p.mask_path)
        image = nib.load(item["scan"])
        assert mask_img.shape == image.shape and np.allclose(mask_img.affine, image.affine)
        predicted = np.asanyarray(mask_img.dataobj) > 0
        truth = np.asanyarray(nib.load(item["truth"]).dataobj) > 0
        voxel_ml = abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000
        rows.append({"scan": Path(item["scan"]).name, "dice": dice(predicted, truth),
                     "predicted_ml": p.tumour_volume_ml, "truth_ml": float(np.count_nonzero(truth)) * voxel_ml,
                     "qc_pass": p.qc_pass})  # fmt: skip
    print(f"\n{'scan':<40} {'dice':>6} {'pred mL':>8} {'true mL':>8}")
    for r in rows:
        print(f"{r['scan']:<40} {r['dice']:6.3f} {r['predicted_ml']:8.1f} {r['truth_ml']:8.1f}")
    values = [r["dice"] for r in rows]
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    print(f"\nnative-space Dice ({args.split}): {mean:.3f} ± {sd:.3f} (n={len(values)}); target ≥ {TARGET_DICE}: "
          f"{'met' if mean >= TARGET_DICE else 'NOT met'}")  # fmt: skip
    print(f"predict: {predict_s / len(rows):.1f} s per scan; total {time.perf_counter() - started:.0f} s")
    report = {"split": args.split, "n": len(values), "dice_mean": mean, "dice_sd": sd, "target": TARGET_DICE,
              "job_fixed_grid_test_dice": job_dice, "cases": s.cases, "epochs": args.epochs, "lr": args.lr,
              "batch_size": args.batch_size, "augment": args.augment,
              "strategy": args.strategy, "model": f"{s.model_uri} v{s.model_version}", "train_s": train_s,
              "predict_s_per_scan": predict_s / len(rows), "rows": rows}  # fmt: skip
    (work / "predict_seg.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
