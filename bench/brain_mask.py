"""Brain extraction (issue 20): each ``preprocess.brain_mask`` method's mask against the synthetic truth and on nilearn's
MNI152 template under random rigid poses: Dice and 95 % Hausdorff distance per method × cohort × sequence (medians with
bootstrap 95 % intervals over subjects), and seconds per scan per core (per GPU when CUDA runs the network).

    .venv/bin/python bench/brain_mask.py                                  # tiny preset, 10 subjects, atlas + deepbet
    .venv/bin/python bench/brain_mask.py --preset small --subjects 20 --mni-poses 4 --results docs/bench/brain_mask
    .venv/bin/python bench/brain_mask.py --methods atlas,deepbet,hd-bet   # hd-bet: minutes per scan on CPU
    .venv/bin/python bench/brain_mask.py --preset small --subjects 40 --out DIR --scores RESULTS/brain_mask.json

A per-sequence rule (``--rule deepbet,T2w=atlas``, always scored, as ``preprocess.brain_mask_by_sequence``) is scored
from the methods' own scans: each scan is preprocessed alone and deterministically, so picking each scan's record of
the method the rule gives its sequence is what running the rule would give (timings aside). ``--scores`` re-summarises
a previous run's JSON on the same cohort without preprocessing again.

The cohort comes from ``brainiac synth``'s API (:func:`brainiac.ingestion.synthetic.generate_cohort`), so changes to the
generator's anatomy show up here; truth masks are ``OUT/_truth/<mask_path>`` of ``_truth/scans.csv``, on each scan's
own grid. Every method runs through :func:`preprocess_scan` (the production path); its whole-grid mask is carried back to
the scan's grid with the stored transform (nearest neighbour) and compared there. HD95 is MONAI's definition: the larger
of the two directed 95th percentiles of surface-to-surface distances, in mm. On MNI152 the atlas mask *is* the truth mask
carried through the registration, so the atlas row there measures registration alone and is an upper bound.

Seconds are CPU seconds of the whole ``preprocess_scan`` call with one thread (``total``) and wall seconds of its
``brain_mask`` step (0 for atlas, whose mask costs a resampling), one scan at a time. Writes ``brain_mask.md``,
``brain_mask.json`` and ``brain_mask_worst.png`` (each method's two worst synthetic scans, of distinct subjects: a mid
slice with the truth contour in green and the method's in red) to ``--results``.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from scipy.spatial.transform import Rotation

from brainiac.ingestion.preprocess import PreprocessConfig, preload, preprocess_scan, steps, to_native
from brainiac.ingestion.preprocess.qc import dice
from brainiac.models.tasks.metrics import bootstrap_ci

COHORTS = ("bids", "brats", "adni", "stroke")


def config(preset: str, method: str) -> PreprocessConfig:
    if preset == "tiny":
        return PreprocessConfig.tiny(brain_mask=method)
    if preset == "small":
        return PreprocessConfig(brain_mask=method, whole_spacing_mm=2.0)
    return PreprocessConfig(brain_mask=method)


def hd95(a: np.ndarray, b: np.ndarray, spacing: np.ndarray) -> float:
    """95 % Hausdorff distance (mm) between two boolean masks on one grid (MONAI's metric; inf when one is empty)."""
    if not a.any() or not b.any():
        return float("inf")
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(
            torch.from_numpy(a)[None, None],
            torch.from_numpy(b)[None, None],
            include_background=True,
            percentile=95,
            spacing=[float(v) for v in spacing],
        )
    return float(hd)


def median_ci(per_subject: list[float], n: int, seed: int) -> tuple[float, float, float]:
    """Median over subjects with its percentile bootstrap interval (one value per subject, resampled as subjects)."""
    if not per_subject:
        return (float("nan"),) * 3
    return bootstrap_ci(np.median, np.asarray(per_subject, dtype=float), n_boot=n, seed=seed)


def mni_cases(poses: int, seed: int) -> list[dict]:
    """nilearn's 1 mm MNI152 T1 resampled into scanner grids turned by up to 10° and moved by up to 10 mm per axis
    (linear for the image, nearest neighbour for its brain mask)."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    data, affine = np.asarray(t1.get_fdata(), dtype=np.float32), t1.affine
    mdata = np.asarray(mask.get_fdata(), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = []
    import SimpleITK as sitk

    for i in range(poses):
        rot = np.eye(4)
        rot[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-10, 10, 3), degrees=True).as_matrix()
        rot[:3, 3] = rng.uniform(-10, 10, 3)
        centre = affine[:3, :3] @ (np.asarray(data.shape) / 2) + affine[:3, 3]
        about = np.eye(4)
        about[:3, 3] = centre
        pose = about @ rot @ np.linalg.inv(about)
        grid = pose @ affine
        img = steps.resample(steps.to_sitk(data, affine), data.shape, grid, np.eye(4))
        truth = steps.resample(
            steps.to_sitk(mdata, affine), data.shape, grid, np.eye(4), interpolator=sitk.sitkNearestNeighbor
        )
        out.append(
            {
                "cohort": "mni152",
                "sequence": "T1w",
                "subject": f"pose{i}",
                "data": img,
                "affine": grid,
                "truth": truth > 0.5,
            }
        )
    return out


def synth_cases(folder: Path, cohorts: list[str]) -> list[dict]:
    with (folder / "_truth" / "scans.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "image" and r["format"] == "nifti"]
    out = []
    for r in rows:
        if r["cohort"] not in cohorts:
            continue
        img = nib.load(folder / r["dataset"] / r["path"])
        truth = nib.load(folder / "_truth" / r["mask_path"])
        out.append(
            {
                "cohort": r["cohort"],
                "sequence": r["sequence"],
                "subject": r["subject_uid"],
                "path": r["path"],
                "data": np.asarray(img.dataobj),
                "affine": img.affine,
                "truth": np.asarray(truth.dataobj) > 0,
                "truth_affine": truth.affine,
            }
        )
    return out


def run_case(case: dict, cfg: PreprocessConfig) -> dict:
    t_cpu = time.process_time()
    result = preprocess_scan(case["data"], case["affine"], cfg)
    cpu = time.process_time() - t_cpu
    matrix = np.asarray(result.transform["matrix"]).reshape(4, 4)
    truth_affine = case.get("truth_affine", case["affine"])
    ours = to_native(result.mask, result.whole_affine, matrix, case["truth"].shape, truth_affine) > 0
    spacing = np.linalg.norm(truth_affine[:3, :3], axis=0)
    return {
        "dice": dice(ours, case["truth"]),
        "hd95_mm": hd95(ours, case["truth"], spacing),
        "cpu_s": cpu,
        "mask_s": result.timings_s.get("brain_mask", 0.0),
        "qc_pass": bool(result.qc["qc_pass"]),
        "mask_dice_atlas": result.qc.get("mask_dice_atlas"),
        "used": result.transform.get("brain_mask"),
        "ours": ours,
    }


def rule_config(rule: str) -> PreprocessConfig:
    """``deepbet,T2w=atlas`` → the :class:`PreprocessConfig` with that ``brain_mask`` and ``brain_mask_by_sequence``
    exceptions (validated like any config)."""
    base, *pairs = rule.split(",")
    return PreprocessConfig(brain_mask=base, brain_mask_by_sequence=dict(p.split("=", 1) for p in pairs))


def apply_rule(records: list[dict], rule: str) -> list[dict]:
    """The records a per-sequence rule gives: each scan's record of the method the rule picks for its sequence
    (:meth:`PreprocessConfig.for_sequence`, as preprocessing does), renamed ``rule`` (each scan is preprocessed alone
    and deterministically, so this is what running the rule gives, timings aside). Empty when a method the rule needs
    was not run."""
    cfg = rule_config(rule)
    by_case = {(r["method"], r["case"]): r for r in records}
    sequence = {r["case"]: r["sequence"] for r in records}
    out = []
    for case in sorted(sequence):
        picked = by_case.get((cfg.for_sequence(sequence[case]).brain_mask, case))
        if picked is None:
            return []
        out.append({**picked, "method": rule})
    return out


def summarise(records: list[dict], boot: int, seed: int) -> list[dict]:
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["cohort"], r["sequence"])].append(r)
        groups[(r["method"], r["cohort"] if r["cohort"] == "mni152" else "synthetic", "all")].append(r)
        if r["cohort"] != "mni152":
            groups[(r["method"], "synthetic", r["sequence"])].append(r)
    rows = []
    for (method, cohort, seq), rs in sorted(groups.items()):
        row = {"method": method, "cohort": cohort, "sequence": seq, "scans": len(rs)}
        for metric in ("dice", "hd95_mm"):
            by_subject: dict[str, list[float]] = defaultdict(list)
            for r in rs:
                by_subject[r["subject"]].append(r[metric])
            row["subjects"] = len(by_subject)
            row[metric] = median_ci([float(np.mean(v)) for v in by_subject.values()], boot, seed)
        row["cpu_s"] = float(np.median([r["cpu_s"] for r in rs]))
        row["mask_s"] = float(np.median([r["mask_s"] for r in rs]))
        row["qc_fail"] = sum(not r["qc_pass"] for r in rs)
        rows.append(row)
    return rows


def paired_vs_atlas(records: list[dict], boot: int, seed: int) -> list[dict]:
    """Each method's Dice minus the atlas mask's on the same synthetic scans, per sequence and over all: the mean over
    subjects of each subject's mean difference, with a bootstrap 95 % interval over subjects."""
    atlas = {r["case"]: r["dice"] for r in records if r["method"] == "atlas"}
    out = []
    for method in sorted({r["method"] for r in records} - {"atlas"}):
        mine = [r for r in records if r["method"] == method and r["cohort"] != "mni152" and r["case"] in atlas]
        for seq in [*sorted({r["sequence"] for r in mine}), "all"]:
            by_subject: dict[str, list[float]] = defaultdict(list)
            for r in mine:
                if seq in ("all", r["sequence"]):
                    by_subject[r["subject"]].append(r["dice"] - atlas[r["case"]])
            diffs = np.asarray([np.mean(v) for v in by_subject.values()], dtype=float)
            if diffs.size:
                est = bootstrap_ci(np.mean, diffs, n_boot=boot, seed=seed)
                out.append({"method": method, "sequence": seq, "subjects": int(diffs.size), "dice_minus_atlas": est})
    return out


def markdown(rows: list[dict], meta: dict, paired: list[dict] | None = None) -> str:
    lines = [
        f"Brain masks vs truth ({meta['preset']} preset, {meta['subjects']} subjects, seed {meta['seed']}; MNI152: "
        f"{meta['mni_poses']} random rigid poses at 1 mm; device {meta['device']}; one thread).",
        "",
        "| method | cohort | sequence | scans | subjects | Dice median [95 % CI] | HD95 mm median [95 % CI] "
        "| s/scan total (CPU) | s/scan mask step | QC fails |",
        "|---|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        d, h = r["dice"], r["hd95_mm"]
        lines.append(
            f"| {r['method']} | {r['cohort']} | {r['sequence']} | {r['scans']} | {r['subjects']} "
            f"| {d[0]:.3f} [{d[1]:.3f}, {d[2]:.3f}] | {h[0]:.1f} [{h[1]:.1f}, {h[2]:.1f}] "
            f"| {r['cpu_s']:.1f} | {r['mask_s']:.1f} | {r['qc_fail']} |"
        )
    if paired:
        lines += [
            "",
            "Paired on the same synthetic scans: Dice minus the atlas mask's (mean over subjects [95 % CI]).",
            "",
            "| method | sequence | subjects | Dice − atlas [95 % CI] |",
            "|---|---|---:|---|",
        ]
        for p in paired:
            d = p["dice_minus_atlas"]
            lines.append(
                f"| {p['method']} | {p['sequence']} | {p['subjects']} | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] |"
            )
    return "\n".join(lines) + "\n"


def worst_figure(records: list[dict], cases: list[dict], preset: str, path: Path, per_method: int = 2) -> None:
    """Each method's ``per_method`` worst synthetic scans (distinct subjects), a mid slice with the truth contour in
    green and the method's in red; a mask a record does not carry (``--scores``) is recomputed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in records})
    fig, axes = plt.subplots(per_method, len(methods), figsize=(4.2 * len(methods), 4.2 * per_method), squeeze=False)
    for col, method in enumerate(methods):
        ranked = sorted(
            (r for r in records if r["method"] == method and r["cohort"] != "mni152"), key=lambda r: r["dice"]
        )
        worst: list[dict] = []
        for r in ranked:
            if len(worst) < per_method and r["subject"] not in {w["subject"] for w in worst}:
                worst.append(r)
        for row, (ax, rec) in enumerate(zip(axes[:, col], worst, strict=False)):
            case = cases[rec["case"]]
            ours = rec.get("ours")
            if ours is None:
                ours = run_case(case, config(preset, rule_config(method).for_sequence(case["sequence"]).brain_mask))[
                    "ours"
                ]
            truth_affine = case.get("truth_affine", case["affine"])
            ras, _ = steps.reorient_ras(np.asarray(case["data"], dtype=np.float32), case["affine"])
            t_ras, _ = steps.reorient_ras(case["truth"].astype(np.uint8), truth_affine)
            o_ras, _ = steps.reorient_ras(ours.astype(np.uint8), truth_affine)
            k = round(float(np.argwhere(t_ras).mean(axis=0)[2]))
            ax.imshow(ras[:, :, k].T, cmap="gray", origin="lower")
            ax.contour(t_ras[:, :, k].T, levels=[0.5], colors="lime", linewidths=1.2)
            ax.contour(o_ras[:, :, k].T, levels=[0.5], colors="red", linewidths=1.2)
            ax.set_title(
                f"{method}: #{row + 1} worst, Dice {rec['dice']:.3f}\n"
                f"{case['cohort']} {case['sequence']} {case['subject'][:10]}",
                fontsize=9,
            )
        for ax in axes[:, col]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "full"])
    ap.add_argument("--subjects", type=int, default=10, help="synthetic subjects, spread over --cohorts")
    ap.add_argument("--cohorts", default=",".join(COHORTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--methods", default=None, help="comma list of atlas, deepbet, hd-bet (default atlas,deepbet; +hd-bet on CUDA)"
    )
    ap.add_argument(
        "--rule",
        action="append",
        default=["deepbet,T2w=atlas"],
        help="a per-sequence rule to score from the methods' scans: BASE[,SEQUENCE=METHOD...] (repeatable)",
    )
    ap.add_argument("--mni-poses", type=int, default=2, help="random rigid poses of the 1 mm MNI152 template (0: none)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples of subjects")
    ap.add_argument("--out", type=Path, default=None, help="cohort folder to create or reuse (default: temporary)")
    ap.add_argument(
        "--scores",
        type=Path,
        default=None,
        help="summarise a previous run's brain_mask.json (same --preset/--subjects/--seed/--out cohort) instead of "
        "preprocessing again; rules are applied anew",
    )
    ap.add_argument("--results", type=Path, default=Path(tempfile.gettempdir()) / "brainiac-bench-brain_mask")
    args = ap.parse_args()

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    methods = args.methods.split(",") if args.methods else ["atlas", "deepbet", *(["hd-bet"] if cuda else [])]
    for m in methods:
        config(args.preset, m)  # validates the name
    cohorts = args.cohorts.split(",")

    from brainiac.ingestion.synthetic import generate_cohort

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(tmp.name) if tmp else args.out
    folder = root / f"{args.preset}-s{args.subjects}-seed{args.seed}-{'-'.join(cohorts)}"
    if not (folder / "_truth" / "synth.json").is_file():
        t = time.perf_counter()
        generate_cohort(folder, subjects=args.subjects, seed=args.seed, preset=args.preset, cohorts=cohorts)
        print(f"generated {args.preset} cohort in {time.perf_counter() - t:.0f} s: {folder}")
    cases = synth_cases(folder, cohorts)
    if args.mni_poses:
        cases += mni_cases(args.mni_poses, args.seed)
    print(f"{len(cases)} scans × {len(methods)} methods")

    records: list[dict] = []
    if args.scores is not None:
        previous = json.loads(args.scores.read_text())
        records = [r for r in previous["scans"] if "," not in r["method"]]
        methods = list(previous["meta"]["methods"])
        print(f"{len(records)} scores read from {args.scores}")
    for method in methods if args.scores is None else []:
        preload(config(args.preset, method))
        preload(PreprocessConfig(brain_mask=method))  # templates and the method's network, outside the timings
        for i, case in enumerate(cases):
            cfg = PreprocessConfig(brain_mask=method) if case["cohort"] == "mni152" else config(args.preset, method)
            r = run_case(case, cfg)
            records.append(
                {**r, "method": method, "case": i, **{k: case[k] for k in ("cohort", "sequence", "subject")}}
            )
            print(
                f"  {method:8s} {case['cohort']:7s} {case['sequence']:6s} Dice {r['dice']:.3f} HD95 {r['hd95_mm']:5.1f}"
                f" mm  {r['cpu_s']:.1f} s CPU (mask {r['mask_s']:.1f} s){'' if r['qc_pass'] else '  QC fail'}",
                flush=True,
            )

    meta = {
        "preset": args.preset,
        "subjects": args.subjects,
        "seed": args.seed,
        "cohorts": cohorts,
        "mni_poses": args.mni_poses,
        "methods": methods,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "boot": args.boot,
    }
    for rule in dict.fromkeys(args.rule):
        records += apply_rule([r for r in records if "," not in r["method"]], rule)
    meta["rules"] = list(dict.fromkeys(args.rule))
    rows = summarise(records, args.boot, args.seed)
    args.results.mkdir(parents=True, exist_ok=True)
    paired = paired_vs_atlas(records, args.boot, args.seed)
    (args.results / "brain_mask.md").write_text(markdown(rows, meta, paired))
    per_scan = [{k: v for k, v in r.items() if k != "ours"} for r in records]
    (args.results / "brain_mask.json").write_text(
        json.dumps({"meta": meta, "summary": rows, "paired_vs_atlas": paired, "scans": per_scan}, indent=1)
    )
    worst_figure(records, cases, args.preset, args.results / "brain_mask_worst.png")
    print(markdown(rows, meta, paired))
    print(f"wrote {args.results}/brain_mask.md, .json, _worst.png")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
