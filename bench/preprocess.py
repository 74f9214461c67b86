"""Per-scan preprocessing (issue 5): seconds per 1 mm scan per core by step, beside the bare load + decode floor measured on
the same files in the same run, and accuracy against the synthetic truth on the ``small`` (2 mm) cohort.

    .venv/bin/python bench/preprocess.py                       # ~2-3 min on one core
    .venv/bin/python bench/preprocess.py --full-subjects 4 --full-scans 12 --small-subjects 16 --out /tmp/ppbench

Speed: ``full`` preset (1 mm) BIDS + BraTS scans. ``load`` is nibabel open + decode to an array (the floor any
preprocessing pays); ``write`` is what the Ray job adds per row: float16 arrays and the mask compressed with zstd
(pyarrow's codec). Target: <= 3 s per 1 mm scan per core end to end. Wall seconds are per step; CPU seconds of the whole
call are printed beside them, since other processes on a shared machine inflate wall time.

Accuracy (issue 5 "done when"): brain-mask Dice against the true mask in each scan's own grid (our mask carried back with
the stored transform, nearest neighbour), registration error = median distance between where the truth's
``rigid_transform`` and ours put template brain-surface points, and exact label sets of BraTS segs and stroke lesion masks.
Cohorts are generated into ``--out`` (reused when already there with the same settings) or a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
from scipy import ndimage as ndi

from brainiac.ingestion.preprocess import PreprocessConfig, preload, preprocess_scan, to_native
from brainiac.ingestion.preprocess.template import mni152

STEPS = ("load", "reorient", "n4", "registration", "resample", "normalise", "qc", "write")


def cohort(out: Path, preset: str, subjects: int, cohorts: list[str], seed: int) -> Path:
    """Generate (or reuse) a synthetic cohort; returns its folder."""
    from brainiac.ingestion.synthetic import generate_cohort

    folder = out / f"{preset}-s{subjects}-seed{seed}-{'-'.join(cohorts)}"
    marker = folder / "_truth" / "synth.json"
    if not marker.is_file():
        t = time.perf_counter()
        generate_cohort(folder, subjects=subjects, seed=seed, preset=preset, cohorts=cohorts)
        print(
            f"  generated {preset} cohort ({subjects} subjects, {', '.join(cohorts)}) in {time.perf_counter() - t:.0f} s"
        )
    return folder


def truth_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "_truth" / "scans.csv").open() as fh:
        return list(csv.DictReader(fh))


def label_index(rows: list[dict[str, str]]) -> dict[tuple[str, str], dict[str, str]]:
    """(cohort, scan folder or subject) -> label row: BraTS ``seg`` per case folder, stroke lesion mask per subject."""
    out = {}
    for r in rows:
        if r["kind"] != "label":
            continue
        key = r["path"].rsplit("/", 1)[0] if r["cohort"] == "brats" else r["subject_uid"]
        out[(r["cohort"], key)] = r
    return out


def labels_for(folder: Path, r: dict[str, str], index) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    key = r["path"].rsplit("/", 1)[0] if r["cohort"] == "brats" else r["subject_uid"]
    lab = index.get((r["cohort"], key))
    if lab is None:
        return {}
    img = nib.load(folder / lab["dataset"] / lab["path"])
    return {"seg" if r["cohort"] == "brats" else "lesion": (np.asarray(img.dataobj), img.affine)}


def write_equivalent(result) -> tuple[float, float, int]:
    """Seconds to compress what a ``volumes`` row holds (float16 whole + fixed, uint8 mask) with zstd, seconds to decode
    the whole crop back to an array, and the compressed bytes."""
    t = time.perf_counter()
    blobs = [pa.compress(a.tobytes(), codec="zstd", asbytes=True) for a in (result.whole, result.fixed, result.mask)]
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    raw = pa.decompress(blobs[0], decompressed_size=result.whole.nbytes, codec="zstd", asbytes=True)
    back = np.frombuffer(raw, dtype=np.float16).reshape(result.whole.shape)
    t_decode = time.perf_counter() - t
    assert np.array_equal(back, result.whole)
    return t_write, t_decode, sum(len(b) for b in blobs)


def speed(folder: Path, cfg: PreprocessConfig, max_scans: int) -> None:
    by_cohort: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in truth_rows(folder):
        if r["kind"] == "image" and r["format"] == "nifti":
            by_cohort[r["cohort"]].append(r)
    # Round-robin over cohorts, so BraTS (1 mm isotropic, 240x240x155) is timed beside BIDS (thick slices, skulls).
    queues = list(by_cohort.values())
    rows = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)][:max_scans]
    index = label_index(truth_rows(folder))
    per_step: dict[str, list[float]] = defaultdict(list)
    cpu, sizes, decode, voxels = [], [], [], []
    print(f"\n1 mm speed: {len(rows)} scans of the full preset, one thread (threads=1)")
    print(
        f"  {'scan':<44} {'shape':>15} {'load':>6} {'n4':>6} {'reg':>6} {'resamp':>6} {'norm':>6} {'total':>6} {'cpu':>6}"
    )
    for r in rows:
        path = folder / r["dataset"] / r["path"]
        t = time.perf_counter()
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        if isinstance(data, np.memmap):  # uncompressed .nii: force the read, or it would be billed to the next step
            data = np.array(data)
        t_load = time.perf_counter() - t
        labels = labels_for(folder, r, index)
        c = time.process_time()
        result = preprocess_scan(data, img.affine, cfg, labels or None)
        cpu_s = time.process_time() - c
        t_write, t_decode, nbytes = write_equivalent(result)
        steps = {"load": t_load, **result.timings_s, "write": t_write}
        for k in STEPS:
            per_step[k].append(steps.get(k, 0.0))
        cpu.append(cpu_s + t_load + t_write)
        sizes.append(nbytes)
        decode.append(t_decode)
        voxels.append(data.size)
        total = sum(steps.values())
        name = f"{r['cohort']}/{Path(r['path']).name}"[:44]
        print(
            f"  {name:<44} {'x'.join(map(str, data.shape)):>15} {t_load:6.2f} {steps['n4']:6.2f} "
            f"{steps['registration']:6.2f} {steps['resample']:6.2f} {steps['normalise']:6.2f} {total:6.2f} {cpu[-1]:6.2f}"
        )
    mean = {k: float(np.mean(v)) for k, v in per_step.items()}
    total = sum(mean.values())
    floor = mean["load"]
    print("\n  seconds per 1 mm scan per core (mean over scans, wall):")
    for k in STEPS:
        print(f"    {k:<13} {mean[k]:6.3f} s  {100 * mean[k] / total:5.1f} %")
    print(f"    {'end to end':<13} {total:6.3f} s   (CPU {np.mean(cpu):.3f} s; target <= 3 s)")
    print(
        f"    {'load floor':<13} {floor:6.3f} s   bare nibabel load + decode of the same files; end to end = {total / floor:.1f}x it"
    )
    print(
        f"  volumes row: {np.mean(sizes) / 1e6:.2f} MB compressed (whole {tuple(result.whole.shape)} + fixed "
        f"{tuple(result.fixed.shape)} float16 + mask); decode of the whole crop {1000 * np.mean(decode):.1f} ms/volume"
    )


def surface_points() -> np.ndarray:
    t1, affine = mni152()
    mask = t1 > 0.2
    idx = np.argwhere(mask & ~ndi.binary_erosion(mask))[::20]
    return np.c_[idx @ affine[:3, :3].T + affine[:3, 3], np.ones(len(idx))]


def accuracy(folder: Path, cfg: PreprocessConfig) -> dict[str, float]:
    rows = truth_rows(folder)
    index = label_index(rows)
    pts = surface_points()
    images = [r for r in rows if r["kind"] == "image" and r["format"] == "nifti"]
    dice, err, label_ok, qc_fail, wall = [], [], [], [], []
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    print(f"\naccuracy on the small preset: {len(images)} scans")
    for r in images:
        img = nib.load(folder / r["dataset"] / r["path"])
        labels = labels_for(folder, r, index)
        t = time.perf_counter()
        result = preprocess_scan(np.asarray(img.dataobj), img.affine, cfg, labels or None)
        wall.append(time.perf_counter() - t)
        matrix = np.asarray(result.transform["matrix"]).reshape(4, 4)
        truth = np.asarray(json.loads(r["rigid_transform"])).reshape(4, 4)
        e = float(np.median(np.linalg.norm((pts @ matrix.T - pts @ truth.T)[:, :3], axis=1)))
        mask_img = nib.load(folder / "_truth" / r["mask_path"])
        true_mask = np.asarray(mask_img.dataobj) > 0
        ours = to_native(result.mask, result.whole_affine, matrix, true_mask.shape, mask_img.affine) > 0
        d = 2.0 * np.count_nonzero(ours & true_mask) / (np.count_nonzero(ours) + np.count_nonzero(true_mask))
        dice.append(d)
        err.append(e)
        groups[f"{r['cohort']} {r['sequence']}{' +skull' if r['skull_present'] == 'true' else ''}"].append((d, e))
        for name, (arr, _) in labels.items():
            source = set(np.unique(arr).tolist())
            label_ok.append(
                set(np.unique(result.labels_whole[name]).tolist()) == source
                and set(np.unique(result.labels_fixed[name]).tolist()) <= source
            )
        if not result.qc["qc_pass"]:
            qc_fail.append(f"{r['path']}: {result.qc['qc_reason']}")
    print(f"  {'cohort / sequence':<24} {'n':>3} {'Dice med':>9} {'Dice min':>9} {'err mm med':>11} {'err mm max':>11}")
    for name in sorted(groups):
        d, e = np.asarray(groups[name]).T
        print(f"  {name:<24} {len(d):3d} {np.median(d):9.3f} {d.min():9.3f} {np.median(e):11.2f} {e.max():11.2f}")
    summary = {
        "dice_median": float(np.median(dice)),
        "dice_worst": float(np.min(dice)),
        "error_mm_median": float(np.median(err)),
        "error_mm_worst": float(np.max(err)),
    }
    ok = lambda b: "ok" if b else "FAIL"  # noqa: E731
    print(f"\n  brain-mask Dice      median {summary['dice_median']:.3f} (>= 0.95 {ok(summary['dice_median'] >= 0.95)}), "
          f"worst {summary['dice_worst']:.3f} (>= 0.90 {ok(summary['dice_worst'] >= 0.90)})")  # fmt: skip
    print(f"  registration error   median {summary['error_mm_median']:.2f} mm (<= 2 mm "
          f"{ok(summary['error_mm_median'] <= 2.0)}), worst scan {summary['error_mm_worst']:.2f} mm")  # fmt: skip
    print(f"  label sets preserved {sum(label_ok)}/{len(label_ok)} label maps ({ok(all(label_ok))})")
    print(f"  qc_pass              {len(images) - len(qc_fail)}/{len(images)}; mean {np.mean(wall):.2f} s/scan at 2 mm")
    for line in qc_fail:
        print(f"    failed QC: {line}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="cohort folder to create or reuse (default: temporary)")
    ap.add_argument("--full-subjects", type=int, default=2, help="subjects of the 1 mm cohort (BIDS + BraTS)")
    ap.add_argument("--full-scans", type=int, default=7, help="at most this many 1 mm scans are timed")
    ap.add_argument("--small-subjects", type=int, default=8, help="subjects of the 2 mm accuracy cohort")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args(argv)
    cfg = PreprocessConfig()
    print(f"preprocess_version {cfg.version()}: {json.dumps(cfg.to_dict())}")
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if not args.skip_speed:
            full = cohort(out, "full", args.full_subjects, ["bids", "brats"], args.seed)
            preload(cfg)  # template caches, once per process (not timed)
            speed(full, cfg, args.full_scans)
        if not args.skip_accuracy:
            small = cohort(out, "small", args.small_subjects, ["bids", "brats", "adni", "stroke"], args.seed)
            accuracy(small, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
