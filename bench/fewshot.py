"""Does a pretrained encoder beat the same architecture at random init with few labels? An evaluation protocol with
power (issue #19): frozen features, many seeded draws per data regime, and a paired, subject-level bootstrap.

    .venv/bin/python bench/fewshot.py --preset smoke --work /tmp/fs-smoke          # < 5 min: the pipeline end to end
    nice -n 10 .venv/bin/python bench/fewshot.py --preset cpu --work /tmp/fs-cpu   # the issue's CPU preset (see below)
    .venv/bin/python bench/fewshot.py --preset gpu --work /tmp/fs-gpu              # ViT-B 96³ on one H100/H200

    # a reduced CPU run: fewer subjects / steps than the preset (what docs/results/fewshot-2026-12-06 ran)
    nice -n 10 .venv/bin/python bench/fewshot.py --preset cpu --work /tmp/fewshot-cpu --subjects 320 \\
        --pretrain-steps 600 --out docs/results --stem fewshot-2026-12-06

Steps (each cached under ``--work``: a second run reuses the cohort, catalog, encoders and embeddings):

1. Cohort and catalog: ``brainiac synth --preset P --subjects N`` → ``brainiac ingest -c tiny`` → ``brainiac
   preprocess -c CONFIG`` (the steps of ``bench/ssl_probe.py``), each only where its output is missing.
2. Encoders: SimCLR pretraining by the real job (``pretrain/tiny`` or ``pretrain/vit-b``) for ``--pretrain-steps``
   on the catalog's train split, saved to ``WORK/encoders/pretrained-<steps>``; and the same backbone config at random
   init (``torch.manual_seed(cfg.seed)``, the job's own initial weights) in ``WORK/encoders/random-<seed>``.
3. Features: the ``embed`` job (:func:`brainiac.jobs.embed.embed`) writes every QC-passing volume's pooled feature
   vector once per encoder into the catalog's ``embeddings`` table; the bench reads back that model's rows
   (``model = …``, a partition filter). A multi-sequence case's feature is the mean over its sequences' vectors, as
   the task model mean-pools its encoder features.
4. Cases: :func:`brainiac.jobs.finetune.data.load_task_data` (the fine-tuning job's own cases, labels and
   subject-level splits). Survival uses its Cox variant (``loss: cox``): (time, event) for every case, censored ones
   included, scored by AUC of survival beyond the threshold (risk negated) and Harrell's C.
5. Draws: ``--draws`` seeded draws per regime from the train split by the job's own
   :func:`~brainiac.jobs.finetune.data.regime_cases` (K cases per class, class-stratified, spread over subjects;
   regression: K per label quartile; ``fraction=F``: F of the train subjects); ``full`` is one draw (all of train).
6. Heads (``bench/fewshot_stats.py``): ridge / logistic (Newton; one-vs-rest for several classes) / Cox (Newton) on standardised features
   (train-split mean and SD, no labels used), the L2 penalty chosen per draw by grouped (subject) CV inside the draw
   (a draw too small to cross-validate, e.g. K = 1, uses the fixed default). Every draw is scored on all non-training
   subjects: ``val`` + ``test`` of the catalog's splits, which pretraining never saw either.
7. Statistics: per (task, regime, encoder) the estimand is the mean over draws of the task's select metric; its 95 %
   interval resamples scored subjects (clustered by subject, stratified by class) and recomputes the mean over draws;
   pretrained − random is computed on the same resamples (paired). Predictions are computed once per draw, so the
   bootstrap only re-indexes (vectorised over draws).

Out of this protocol: segmentation (no embedding-head regime — a dense decoder has to be trained, which is
``brainiac finetune``'s job, not a head on pooled features); full fine-tuning and from-scratch training (the finetune
job) are not run by this bench yet — the table says so rather than showing a number.

Writes ``OUT/STEM.md`` (table + verdict), ``OUT/STEM.png`` (one panel per task: metric by regime, both encoders),
``OUT/STEM.json`` (everything, including per-draw penalties and the cohort's counts).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fewshot_stats as stats

ALL_TASKS = ("sequence", "brain_age", "idh", "survival", "mci", "stroke_onset", "segmentation")
ALL_REGIMES = ("shots=1", "shots=5", "fraction=0.1", "full")
K5 = "shots=5"
OUT_OF_PROTOCOL = (
    "out of this protocol: no embedding-head regime (a dense decoder must be trained; `brainiac finetune`)"
)
CLI = [sys.executable, "-c", "from brainiac.platform.cli.main import main; main()"]

PRESETS: dict[str, dict[str, Any]] = {
    # The CPU preset. The generator spreads subjects evenly over its five cohorts (~200 gliomas, ~200 ADNI,
    # ~200 stroke of 1,000), and the default 70/15/15 splits score only val + test (~25 % of subjects, ~12 IDH subjects
    # per class at 320 subjects, measured): the preset splits 50/25/25, so ~100 gliomas (~50 per class), ~100 ADNI and
    # ~100 stroke subjects are scored, while K-shot draws still have 100 train subjects per cohort to draw from.
    "cpu": {"subjects": 1000, "synth_preset": "tiny", "preprocess_config": "tiny", "pretrain_config": "pretrain/tiny",
            "pretrain_steps": 3000, "draws": 200, "n_boot": 1000, "pretrain_set": [],
            "preprocess_set": ["splits.fractions=[0.5,0.25,0.25]"]},
    # The pipeline end to end in a few minutes (tests/test_bench_fewshot.py): numbers mean nothing.
    "smoke": {"subjects": 25, "synth_preset": "tiny", "preprocess_config": "tiny", "pretrain_config": "pretrain/tiny",
              "pretrain_steps": 10, "draws": 8, "n_boot": 50, "pretrain_set": ["pretrain.checkpoint_every=10"]},
    # ViT-B at 96³ on one H100/H200 (the default preprocess config's 96³ cube at 1 mm... the synth small preset's 2 mm).
    "gpu": {"subjects": 1000, "synth_preset": "small", "preprocess_config": "default",
            "pretrain_config": "pretrain/vit-b", "pretrain_steps": 2000, "draws": 200, "n_boot": 1000,
            "pretrain_set": ["pretrain.use_gpu=true", "pretrain.num_workers=1", "pretrain.batch_size=32"]},
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Draws and the scored set (pure: tested in tests/test_bench_fewshot.py)


def scored_indices(data) -> np.ndarray:
    """Every case of a non-training subject (``val`` + ``test``); refuses a subject on both sides."""
    scored = np.array([i for i, s in enumerate(data.split) if s in ("val", "test")], dtype=np.int64)
    train_subjects = {data.subjects[i] for i in data.indices("train")}
    leak = train_subjects & {data.subjects[i] for i in scored}
    if leak:
        raise RuntimeError(f"task {data.spec.name}: {len(leak)} subject(s) in both train and the scored set")
    return scored


def regime_draws(data, regime: str, n_draws: int, seed: int = 0) -> list[np.ndarray]:
    """Train case indices of ``n_draws`` seeded draws of ``regime`` (``full``: one draw, all of train)."""
    from brainiac.jobs.finetune.data import regime_cases

    if regime == "full":
        return [data.indices("train")]
    key, _, value = regime.partition("=")
    if key == "shots":
        return [regime_cases(data, shots=int(value), fraction=None, seed=seed + i) for i in range(n_draws)]
    if key == "fraction":
        return [regime_cases(data, shots=None, fraction=float(value), seed=seed + i) for i in range(n_draws)]
    raise SystemExit(f"unknown regime {regime!r}: use shots=K, fraction=F or full")


# ----------------------------------------------------------------------------------------------------------------------
# Cohort, encoders, embeddings


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("BRAINIAC_PSEUDONYM_KEY", "fewshot-bench-key-0123456789abcdef")
    return env


def build_catalog(work: Path, subjects: int, synth_preset: str, preprocess_config: str, seed: int,
                  preprocess_set: list[str] = ()) -> tuple[Path, dict]:  # fmt: skip
    """``WORK/cohort`` and ``WORK/catalog``, each step run only where its output is missing; returns step seconds."""
    from brainiac.platform.catalog import Catalog

    cohort, catalog = work / "cohort", work / "catalog"
    took: dict[str, float] = {}

    def run(args: list[str], what: str) -> None:
        t = time.perf_counter()
        print(f"  {what} ...", flush=True)
        subprocess.run([*CLI, *args], check=True, env=_env(), stdout=subprocess.DEVNULL)
        took[what.split()[1]] = round(time.perf_counter() - t, 1)
        print(f"  {what}: {took[what.split()[1]]:.0f} s", flush=True)

    if not (cohort / "_truth").is_dir():
        run(["synth", str(cohort), "--subjects", str(subjects), "--preset", synth_preset, "--seed", str(seed)],
            f"brainiac synth --preset {synth_preset} --subjects {subjects}")  # fmt: skip
    if Catalog.open(str(catalog)).version("scans") is None:
        run(["ingest", *sorted(str(p) for p in cohort.glob("synth-*")), "--catalog", str(catalog), "-c", "tiny"],
            "brainiac ingest")  # fmt: skip
    if Catalog.open(str(catalog)).version("volumes") is None:
        sets = [x for kv in preprocess_set for x in ("--set", kv)]
        run(["preprocess", "--catalog", str(catalog), "-c", preprocess_config, "-q", *sets], "brainiac preprocess")
    return catalog, took


def encoders(args, catalog: Path, tracking_uri: str) -> tuple[Path, Path, dict]:
    """(pretrained, random-init) encoder folders, made where missing; and what pretraining reported."""
    import torch

    from brainiac.jobs.config import load_config
    from brainiac.models.backbones import build_backbone
    from brainiac.models.export import load_encoder, save_encoder

    cfg = load_config(args.pretrain_config, [
        f"catalog.uri={catalog}", f"pretrain.max_steps={args.pretrain_steps}",
        f"pretrain.storage_path={args.work / 'runs'}", f"tracking.uri={tracking_uri}",
        f"pretrain.run_name=fewshot-pretrain-{args.pretrain_steps}", *args.pretrain_set])  # fmt: skip
    pre = args.work / "encoders" / f"pretrained-{args.pretrain_steps}"
    info_file = pre / "pretrain.json"
    if not (pre / "encoder.pt").is_file():
        from brainiac.jobs.pretrain.run import pretrain

        print(f"pretraining {cfg.model.kind} {cfg.model.img_size}³ width {cfg.model.hidden_size} for "
              f"{args.pretrain_steps} steps ...", flush=True)  # fmt: skip
        summary = pretrain(cfg, progress=False)
        import ray

        ray.shutdown()
        encoder, backbone = load_encoder(str(summary.checkpoint), tracking_uri=tracking_uri)
        save_encoder(pre, encoder, backbone)
        info_file.write_text(json.dumps(summary.as_dict(), default=str, indent=2))
        print(f"  {summary.steps} steps in {summary.seconds:.0f} s, final loss {summary.final_loss}, held-out "
              f"retrieval top-1 {summary.eval_top1} vs random {summary.eval_top1_random}", flush=True)  # fmt: skip
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    rnd = args.work / "encoders" / f"random-{cfg.seed}"
    if not (rnd / "encoder.pt").is_file():
        _, backbone = load_encoder(str(pre))
        torch.manual_seed(cfg.seed)  # the pretraining job's own initial weights
        save_encoder(rnd, build_backbone(backbone), backbone)
    return pre, rnd, info


def features(catalog: Path, cfg, ref: Path) -> tuple[dict[str, np.ndarray], dict]:
    """scan_id → pooled feature vector of encoder ``ref``: the embed job fills what the table lacks, then that model's
    rows are read back."""
    from brainiac.jobs.embed import embed, model_label
    from brainiac.platform.catalog import Catalog, sql_literal

    summary = embed(cfg, str(ref), progress=False)
    label = model_label(str(ref), None)
    table = Catalog.open(str(catalog)).select(
        "embeddings",
        f"model = {sql_literal(label)} AND preprocess_version = {sql_literal(summary.preprocess_version)}",
        ["scan_id", "vector"],
    )
    ids = table.column("scan_id").to_pylist()
    vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float64)
    return dict(zip(ids, vectors, strict=True)), summary.as_dict()


def case_scans(catalog_uri: str, cfg, data) -> list[list[str]]:
    """Per case, the scan of each of its sequences (channel order).

    ``TaskData`` records only each case's first-channel scan; the others are found as :func:`load_task_data` found
    them: the scans rows of the case's subject session, in the same query order, the last row of a sequence winning.
    """
    from brainiac.platform.catalog import Catalog

    spec = data.spec
    if spec.per_scan or len(spec.sequences) == 1:
        return [[s] for s in data.scan_ids]
    reader = Catalog.open(catalog_uri).restricted(cfg.catalog.allowed_access)
    rows = reader.scans(dataset=cfg.catalog.datasets or None, sequence=sorted(set(spec.sequences)),
                        version=data.table_versions.get("scans")).to_arrow(
        ["scan_id", "subject_id", "session", "sequence"]).to_pylist()  # fmt: skip
    by_case: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        key = f"{r['subject_id']}/{r.get('session') or ''}"
        by_case.setdefault(key, {}).setdefault(r["sequence"], []).append(r["scan_id"])
    out = []
    for case, first in zip(data.case_ids, data.scan_ids, strict=True):
        channels = by_case.get(case, {})
        scans = [first] + [channels[s][-1] if s in channels else "" for s in spec.sequences[1:]]
        # a sequence with several scans in a session: the one load_task_data used is the last with a volume
        out.append(scans)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# One task


def head_of(spec) -> str:
    if spec.kind == "segmentation":
        return "none"
    if spec.event_label:
        return "cox"
    return "ridge" if spec.kind == "regression" else "logistic"


def run_task(args, catalog: Path, cfg, spec, feats: dict[str, dict[str, np.ndarray]], regimes: list[str]) -> dict:
    """Every regime of one task for both encoders: counts, per-cell estimates with intervals and the paired diff."""
    from brainiac.jobs.finetune.data import load_task_data
    from brainiac.platform.catalog import Catalog

    head = head_of(spec)
    load_spec = replace(spec, loss="cox") if head == "cox" else spec
    t0 = time.perf_counter()
    data = load_task_data(Catalog.open(str(catalog)), cfg, load_spec)
    data.inputs = np.empty(0)  # the bench needs the cases, labels and splits, not the cubes
    scans = case_scans(str(catalog), cfg, data)
    keep = [i for i, ss in enumerate(scans) if all(s in feats["pretrained"] for s in ss)]
    if len(keep) < len(scans):
        print(f"  {spec.name}: {len(scans) - len(keep)} case(s) without an embedding of every sequence left out")
    idx = np.asarray(keep, dtype=np.int64)
    sub = lambda a: [a[i] for i in idx]  # noqa: E731
    data = replace(data, case_ids=sub(data.case_ids), scan_ids=sub(data.scan_ids), subjects=sub(data.subjects),
                   datasets=sub(data.datasets), split=sub(data.split), targets=data.targets[idx], raw=data.raw[idx],
                   inputs=np.empty(0))  # fmt: skip
    scans = [scans[i] for i in idx]
    train, scored = data.indices("train"), scored_indices(data)
    X = {}
    for enc, table in feats.items():
        x = np.stack([np.mean([table[s] for s in ss], 0) for ss in scans])
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-8  # train-split features only, no labels
        X[enc] = (x - mu) / sd
    if head == "cox":
        target = data.raw.reshape(len(data.raw), 2)
        y_scored = data.targets[scored].astype(float)  # 1 = survived beyond the threshold; NaN = censored before
    elif head == "ridge":
        target = data.targets[:, None].astype(float)
        y_scored = data.targets[scored].astype(float)
    else:
        target = data.targets[:, None].astype(float)
        y_scored = data.targets[scored].astype(float)
    groups = [data.subjects[i] for i in scored]
    strata = None if head == "ridge" else y_scored
    n_classes = len(spec.classes) if spec.kind == "multiclass" else 2
    metric = spec.select_metric
    counts = {"train_cases": len(train), "scored_cases": len(scored),
              "scored_subjects": len(set(groups)), "train_subjects": len({data.subjects[i] for i in train})}  # fmt: skip
    if head != "ridge":
        counts["scored_subjects_per_class"] = {
            _class_name(spec, c):
                len({g for g, yy in zip(groups, y_scored, strict=True) if (yy == c or (np.isnan(c) and np.isnan(yy)))})
            for c in np.unique(y_scored)}  # fmt: skip
    trivial = _trivial(head, metric, target[train], y_scored, n_classes)
    out = {"task": spec.name, "head": head, "metric": metric, "higher_is_better": spec.higher_is_better,
           "counts": counts, "trivial": trivial, "dim": int(X["pretrained"].shape[1]), "regimes": {}}  # fmt: skip
    print(f"  {spec.name}: {counts} load {time.perf_counter() - t0:.0f} s", flush=True)
    for regime in regimes:
        t = time.perf_counter()
        draws = regime_draws(data, regime, args.draws, seed=args.seed)
        tr = data.indices("train")
        pos = {int(c): j for j, c in enumerate(tr)}  # train-matrix row of each train case
        local = [np.array([pos[int(i)] for i in d], dtype=np.int64) for d in draws]
        preds, lam = {}, {}
        c_index = {}
        for enc in ("pretrained", "random"):
            p, chosen = stats.fit_predict(head, X[enc][tr], target[tr], [data.subjects[i] for i in tr], local,
                                          X[enc][scored], n_classes=n_classes, seed=args.seed)  # fmt: skip
            lam[enc] = chosen
            if head == "logistic" and spec.kind == "multiclass":
                preds[enc] = p.argmax(-1)
            elif head == "logistic":
                preds[enc] = p[..., 1]
            elif head == "cox":
                preds[enc] = -p  # survival beyond the threshold: the lower the risk, the likelier
                rt = data.raw[scored].reshape(-1, 2)
                c_index[enc] = float(np.nanmean(stats.cindex(rt[:, 0], rt[:, 1], p)))
            else:
                preds[enc] = p
        res = stats.compare(metric, y_scored, preds["pretrained"], preds["random"], groups, strata,
                            n_boot=args.n_boot, seed=args.seed)  # fmt: skip
        sizes = [len(d) for d in draws]
        cell = {"pretrained": res["a"], "random": res["b"], "diff": res["diff"], "draws": len(draws),
                "train_cases_per_draw": [int(min(sizes)), int(max(sizes))],
                "lambda": {e: _lam_summary(v) for e, v in lam.items()}, "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
        if c_index:
            cell["c_index_mean_over_draws"] = c_index
        out["regimes"][regime] = cell
        print(f"    {regime:>12}: pretrained {_fmt(res['a'])}  random {_fmt(res['b'])}  diff {_fmt(res['diff'])} "
              f"({len(draws)} draws of {sizes[0]} cases, {cell['seconds']:.0f} s)", flush=True)  # fmt: skip
    return out


def _class_name(spec, c: float) -> str:
    if not np.isfinite(c):
        return "censored before threshold" if spec.event_label else "no class"
    if spec.classes:
        return spec.classes[int(c)]
    return f"{'>' if c else '≤'} {spec.threshold:g} {spec.units}".strip()


def _lam_summary(v: np.ndarray) -> dict[str, float]:
    vals, n = np.unique(v, return_counts=True)
    return {f"{x:g}": int(c) for x, c in zip(vals, n, strict=True)}


def _trivial(head: str, metric: str, train_target: np.ndarray, y_scored: np.ndarray, n_classes: int) -> float:
    """The task's trivial baseline: chance AUC / balanced accuracy, or the MAE of predicting the train mean."""
    if metric == "mae":
        return float(np.mean(np.abs(y_scored - np.mean(train_target[:, 0]))))
    return 0.5 if metric == "auc" else 1.0 / n_classes


def _fmt(v, digits: int = 3) -> str:
    est, lo, hi = v
    if not math.isfinite(est):
        return "nan"
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(lo) and math.isfinite(hi) else " [n/a]"
    return f"{est:.{digits}f}{ci}"


def wins(cell: dict, higher_is_better: bool) -> bool:
    """The pretrained − random interval lies wholly on the better side of 0."""
    _, lo, hi = cell["diff"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    return lo > 0 if higher_is_better else hi < 0


# ----------------------------------------------------------------------------------------------------------------------
# Output


def write_markdown(path: Path, meta: dict, results: dict, regimes: list[str]) -> str:
    rows = ["| task | metric | regime | pretrained | random init | pretrained − random | interval excludes 0 |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for task in meta["tasks"]:
        r = results.get(task)
        if r is None or "error" in r or r.get("head") == "none":
            why = r["error"] if r and "error" in r else OUT_OF_PROTOCOL
            rows.append(f"| {task} | – | all | n/a | n/a | n/a ({why}) | – |")
            continue
        arrow = "↑" if r["higher_is_better"] else "↓"
        for regime in regimes:
            c = r["regimes"].get(regime)
            if c is None:
                continue
            digits = 1 if r["metric"] == "mae" else 3
            won = wins(c, r["higher_is_better"])
            rows.append(f"| {task} | {r['metric']} {arrow} | {regime} | {_fmt(c['pretrained'], digits)} | "
                        f"{_fmt(c['random'], digits)} | {_fmt(c['diff'], digits)} | "
                        f"{'**yes**' if won else 'no'} |")  # fmt: skip
    scored = [t for t in meta["tasks"] if t in results and results[t].get("regimes", {}).get(K5)]
    won = [t for t in scored if wins(results[t]["regimes"][K5], results[t]["higher_is_better"])]
    lost = [t for t in meta["tasks"] if t not in won]
    counts = []
    for t in meta["tasks"]:
        r = results.get(t, {})
        if "counts" in r:
            c = r["counts"]
            per = c.get("scored_subjects_per_class")
            counts.append(f"| {t} | {r['head']} | {c['train_cases']} / {c['train_subjects']} | "
                          f"{c['scored_cases']} / {c['scored_subjects']} | "
                          f"{', '.join(f'{k}: {v}' for k, v in per.items()) if per else '–'} | "
                          f"{r['trivial']:.3g} |")  # fmt: skip
    pre = meta.get("pretrain") or {}
    text = [
        f"# Few-shot: pretrained encoder vs the same architecture at random init ({meta['date']})",
        "",
        f"Generated by `bench/fewshot.py` (`{meta['command']}`) on {meta['host']}: this invocation took "
        f"{meta['seconds'] / 60:.1f} min (stages, s: {meta['stage_seconds']}; a stage found in the `--work` cache "
        f"costs ~0); pretraining itself took {pre.get('seconds', float('nan')):.0f} s when it ran.",
        "",
        "**Protocol** (issue #19): frozen encoder features from the `embed` job; heads fitted on cached features "
        "(ridge / logistic, one-vs-rest for several classes / Cox, the L2 penalty chosen per draw by grouped-by-subject CV inside the "
        f"training draw; draws too small to cross-validate use λ = {stats.DEFAULT_LAMBDA:g}); {meta['draws']} seeded, "
        "class-stratified draws per few-shot / fraction regime from the train split (`full` is one draw); every draw "
        "scored on all val + test subjects (never a training subject). Cell = mean over draws of the task's select "
        f"metric [95 % interval: {meta['n_boot']} subject-clustered, class-stratified bootstrap resamples of the "
        "scored subjects, the mean over draws recomputed on each]; the difference is paired (same resamples). "
        f"Bootstrap: `{meta['bootstrap']}`.",
        "",
        f"**Encoders**: {meta['backbone']}; pretrained by the `pretrain` job ({meta['pretrain_config']}) for "
        f"{pre.get('steps', meta['pretrain_steps'])} steps (final NT-Xent loss {pre.get('final_loss')}, held-out "
        f"retrieval top-1 {pre.get('eval_top1')} vs {pre.get('eval_top1_random')} at init); random init = the same "
        "backbone config at the job's initial weights (`torch.manual_seed(cfg.seed)`).",
        "",
        f"**Cohort**: `brainiac synth --preset {meta['synth_preset']} --subjects {meta['subjects']}`, ingested and "
        f"preprocessed (`-c {meta['preprocess_config']}`).",
        "",
        *([f"**Reduced run**: {meta['reduced']}", ""] if meta.get("reduced") else []),
        "## Results",
        "",
        *rows,
        "",
        f"**Pretrained beats random init (interval of the difference excludes 0) on {len(won)} of 7 tasks at K = 5**"
        + (f": {', '.join(won)}." if won else ".")
        + f" Aim of issue #19 (≥ 5 of 7): {'met' if len(won) >= 5 else 'not met'}.",
        "",
        "Not won at K = 5: " + (", ".join(lost) if lost else "none") + ".",
        "",
        "## Cohort per task",
        "",
        "| task | head | train cases / subjects | scored cases / subjects | scored subjects per class | trivial |",
        "|---|---|---|---|---|---|",
        *counts,
        "",
        "`trivial`: chance (AUC 0.5, balanced accuracy 1/C) or the MAE of predicting the train-split mean.",
        "",
        "Not run here: full fine-tuning and from-scratch training through `brainiac finetune` on a subset of cells "
        "(the issue's optional arm); segmentation (out of this protocol, above).",
        "",
    ]
    if meta.get("notes"):
        text += ["## Why tasks fail", "", *meta["notes"], ""]
    md = "\n".join(text)
    path.write_text(md)
    return md


def plot(path: Path, meta: dict, results: dict, regimes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in meta["tasks"] if t in results and results[t].get("regimes")]
    cols = min(3, max(1, len(tasks)))
    nrows = max(1, math.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        r = results[task]
        for k, (enc, colour) in enumerate((("pretrained", "tab:blue"), ("random", "tab:grey"))):
            xs, ys, lo, hi = [], [], [], []
            for j, regime in enumerate(regimes):
                c = r["regimes"].get(regime)
                if not c:
                    continue
                est, low, high = c[enc]
                if math.isfinite(est):
                    xs.append(j + (k - 0.5) * 0.25)
                    ys.append(est)
                    lo.append(max(0.0, est - low) if math.isfinite(low) else 0.0)
                    hi.append(max(0.0, high - est) if math.isfinite(high) else 0.0)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, color=colour, label=enc)
        ax.axhline(r["trivial"], color="tab:red", lw=0.8, ls="--", label="trivial")
        ax.set_xticks(range(len(regimes)), regimes, fontsize=8)
        ax.set_title(f"{task}: {r['metric']} {'↑' if r['higher_is_better'] else '↓'}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"Mean over draws of the test metric, 95 % subject bootstrap ({meta['date']}; segmentation: out of "
                 "protocol)", fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--work", type=Path, required=True, help="cache folder: cohort, catalog, encoders, runs, MLflow")
    ap.add_argument("--out", type=Path, help="where STEM.md/.png/.json go (default WORK/out)")
    ap.add_argument("--stem", default="fewshot", help="file name stem of the outputs")
    ap.add_argument("--subjects", type=int, help="synthetic subjects (preset's by default)")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--draws", type=int, help="seeded draws per few-shot / fraction regime")
    ap.add_argument("--n-boot", type=int, help="bootstrap resamples")
    ap.add_argument("--tasks", help=f"comma-separated (default all: {','.join(ALL_TASKS)})")
    ap.add_argument("--regimes", help=f"comma-separated shots=K | fraction=F | full (default {','.join(ALL_REGIMES)})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cohort, the draws and the bootstrap")
    ap.add_argument("--pretrain-set", action="append", default=[], help="extra pretraining config KEY=VALUE")
    ap.add_argument("--reduced", default="", help="a sentence saying what this run reduced from the preset, and why")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    args.subjects = args.subjects or preset["subjects"]
    args.pretrain_steps = args.pretrain_steps or preset["pretrain_steps"]
    args.draws = args.draws or preset["draws"]
    args.n_boot = args.n_boot or preset["n_boot"]
    args.pretrain_config = preset["pretrain_config"]
    args.pretrain_set = [*preset["pretrain_set"], *args.pretrain_set]
    tasks = args.tasks.split(",") if args.tasks else list(ALL_TASKS)
    regimes = args.regimes.split(",") if args.regimes else list(ALL_REGIMES)
    started = time.perf_counter()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    out = (args.out or args.work / "out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{args.work / 'mlflow.db'}"

    from brainiac.platform.cluster import configure_ray_environment

    configure_ray_environment()
    print(f"catalog: building what is missing under {args.work}", flush=True)
    catalog, build_seconds = build_catalog(args.work, args.subjects, preset["synth_preset"],
                                           preset["preprocess_config"], args.seed, preset.get("preprocess_set", []))  # fmt: skip
    t = time.perf_counter()
    pre, rnd, pretrain_info = encoders(args, catalog, tracking_uri)
    pretrain_seconds = round(time.perf_counter() - t, 1)

    from brainiac.jobs.config import load_config
    from brainiac.models.export import load_encoder
    from brainiac.models.tasks.spec import load_specs

    cfg = load_config(preset["preprocess_config"], [f"catalog.uri={catalog}", f"tracking.uri={tracking_uri}",
                                                    "catalog.allowed_access=[open,registered,restricted]"])  # fmt: skip
    t = time.perf_counter()
    feats, embed_info = {}, {}
    for name, ref in (("pretrained", pre), ("random", rnd)):
        feats[name], embed_info[name] = features(catalog, cfg, ref)
        print(f"embeddings {name}: {len(feats[name])} volumes ({embed_info[name]['written']} new, "
              f"dim {embed_info[name]['dim'] or len(next(iter(feats[name].values())))})", flush=True)  # fmt: skip
    embed_seconds = round(time.perf_counter() - t, 1)
    _, backbone = load_encoder(str(pre))
    import torch

    # The heads are thousands of small batched solves: one thread. Several intra-op threads spin-wait against each
    # other on a loaded machine (the smoke preset's heads: 99 s with the default threads, 6 s with one).
    torch.set_num_threads(1)
    specs = load_specs()
    results: dict[str, dict] = {}
    t = time.perf_counter()
    for task in tasks:
        spec = specs[task]
        if head_of(spec) == "none":
            results[task] = {"task": task, "head": "none"}
            continue
        try:
            results[task] = run_task(args, catalog, cfg, spec, feats, regimes)
        except Exception as exc:  # one task's failure (e.g. too few cases) must not stop the others
            import traceback

            traceback.print_exc(limit=4)
            results[task] = {"task": task, "error": " ".join(str(exc).split())[:200].replace("|", "/")}
    heads_seconds = round(time.perf_counter() - t, 1)
    meta = {
        "date": dt.date.today().isoformat(), "preset": args.preset, "command": " ".join(sys.argv[1:]),
        "host": f"{os.cpu_count()} CPUs", "seconds": time.perf_counter() - started,
        "tasks": tasks, "regimes": regimes, "draws": args.draws, "n_boot": args.n_boot, "seed": args.seed,
        "subjects": args.subjects, "synth_preset": preset["synth_preset"],
        "preprocess_config": preset["preprocess_config"], "pretrain_config": args.pretrain_config,
        "pretrain_steps": args.pretrain_steps, "pretrain": pretrain_info, "embed": embed_info,
        "backbone": f"{backbone.kind} {backbone.img_size}³ width {backbone.hidden_size} depth {backbone.num_layers}",
        "bootstrap": stats.bootstrap_source(), "reduced": args.reduced,
        "stage_seconds": {**build_seconds, "pretrain": pretrain_seconds, "embed": embed_seconds, "heads": heads_seconds},
    }  # fmt: skip
    notes_file = out / f"{args.stem}.notes.md"  # hand-written analysis of a finished run, kept across re-renders
    meta["notes"] = notes_file.read_text().splitlines() if notes_file.is_file() else []
    (out / f"{args.stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    md = write_markdown(out / f"{args.stem}.md", meta, results, regimes)
    plot(out / f"{args.stem}.png", meta, results, regimes)
    print("\n" + md)
    print(f"wrote {out / args.stem}.md/.png/.json in {meta['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
