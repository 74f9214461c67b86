"""BrainIAC's experiment on the ``small`` synthetic cohort: does a pretrained encoder beat training from scratch with few
labels? For each task × strategy (``scratch`` = random init, ``linear`` = frozen pretrained encoder + head, ``full`` =
pretrained encoder fine-tuned) × data regime (K shots per class, or a fraction of the training subjects) the real
fine-tuning job (:func:`brainiac.jobs.finetune.run.finetune`) runs once per seed; the table reports the test metrics'
mean over seeds with the job's 95 % bootstrap interval (of the seed-averaged prediction over test cases).

    # full grid (7 tasks x 3 strategies x K=1, K=5, fraction 0.1 x seeds 0,1,2): for a GPU machine
    .venv/bin/python bench/fewshot.py --work /tmp/fewshot --pretrain-steps 2000 \\
        --set finetune.gpus_per_trial=1 --pretrain-set pretrain.use_gpu=true

    # declared CPU subset (sequence, brain_age, idh, mci at K=5; 3 strategies; 3 seeds): ~60 min on 2 cores
    .venv/bin/python bench/fewshot.py --work /tmp/fewshot --cpu-subset

    # reuse a catalog and an encoder (no build, no pretraining); a smoke run
    .venv/bin/python bench/fewshot.py --work /tmp/fs --catalog /tmp/pt/catalog \\
        --init models:/brainiac-encoder@candidate --tracking-uri sqlite:////tmp/pt/brainiac-data/mlflow.db \\
        --tasks sequence --regimes shots=5 --seeds 0 --epochs 2

Steps:

1. Catalog: ``--catalog`` is read as is; otherwise ``WORK/catalog`` is built where missing, as ``bench/ssl_probe.py``
   does (``brainiac synth --preset small`` → ``ingest -c tiny`` → ``preprocess -c tiny`` at the cohort's 2 mm).
2. Encoder: ``--init`` (checkpoint/export folder or ``models:/…``), or SimCLR pretraining of the tiny ViT
   (``pretrain/tiny``) for ``--pretrain-steps`` steps on the catalog's train split, once for the whole grid.
3. Grid: ``finetune`` with ``trials=1`` (the config's default hyperparameters, identical for every cell), ``--epochs``
   epochs, ``--seeds``, ``register=false``. ``scratch`` builds the same architecture as the encoder (its backbone config).
   A cell that fails (e.g. a task with too few cases in the cohort) is recorded as ``n/a (reason)`` and the grid goes on.

Writes ``OUT/fewshot.md`` (task | regime | metric | scratch | linear | full, and per task whether the better pretrained
strategy beats scratch on the task's ``select_metric``, direction from the spec; "pretrained beats scratch on X of N
tasks at K=5"), ``OUT/fewshot.png`` (one panel per task: select metric by regime and strategy, 95 % CI bars) and
``OUT/fewshot.json`` (every summary and error).

What it does NOT do: no hyperparameter tuning at all (``trials=1``), and nothing is ever chosen on the test split — the
test split is scored once per cell by the job. Validation selection inside ``finetune`` is moot with one trial. The
verdict compares means; overlapping CIs are flagged, not tested. Test splits of the small cohort are a handful of cases,
so the intervals are wide and the verdict is indicative only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

STRATEGIES = ("scratch", "linear", "full")
ALL_TASKS = ("sequence", "brain_age", "idh", "survival", "mci", "stroke_onset", "segmentation")
ALL_REGIMES = ("shots=1", "shots=5", "fraction=0.1")
CPU_SUBSET = {"tasks": ("sequence", "brain_age", "idh", "mci"), "regimes": ("shots=5",), "seeds": (0, 1, 2)}
K5 = "shots=5"


def parse_regime(text: str) -> tuple[str, list[str]]:
    """``shots=5`` / ``fraction=0.1`` / ``full`` → (label as FinetuneSummary.regime spells it, config overrides)."""
    text = text.strip()
    if text == "full":
        return "full", []
    key, _, value = text.partition("=")
    if key == "shots":
        return f"shots={int(value)}", [f"finetune.shots={int(value)}"]
    if key == "fraction":
        return f"fraction={float(value)}", [f"finetune.fraction={float(value)}"]
    raise SystemExit(f"unknown regime {text!r}: use shots=K, fraction=F or full")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.replace("|", "/")[:160]


def _fmt(v: dict[str, Any] | None) -> str:
    if not v or not math.isfinite(v.get("mean", math.nan)):
        return "nan"
    low, high = v.get("low", math.nan), v.get("high", math.nan)
    ci = f" [{low:.3f}, {high:.3f}]" if math.isfinite(low) and math.isfinite(high) else " [n/a]"
    return f"{v['mean']:.3f}{ci}"


# ----------------------------------------------------------------------------------------------------------------------


def build_catalog(work: Path, subjects: int, seed: int) -> Path:
    """``WORK/catalog`` of the ``small`` cohort, built where missing with ssl_probe's steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ssl_probe import build  # synth → ingest → preprocess, each only if missing

    catalog = work / "catalog"
    build(work, catalog, subjects, seed)
    return catalog


def pretrain_encoder(args, catalog: Path, tracking_uri: str) -> tuple[str, dict[str, Any]]:
    from brainiac.jobs.pretrain.run import pretrain
    from brainiac.platform.config import load_config

    cfg = load_config(args.pretrain_config, [
        f"catalog.uri={catalog}", f"pretrain.max_steps={args.pretrain_steps}",
        f"pretrain.num_workers={args.pretrain_workers}", f"pretrain.storage_path={args.work / 'runs'}",
        f"pretrain.run_name=fewshot-pretrain-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}", f"tracking.uri={tracking_uri}",
        *args.pretrain_overrides])  # fmt: skip
    print(f"pretraining {cfg.model.kind} {cfg.model.img_size}³ width {cfg.model.hidden_size} for "
          f"{args.pretrain_steps} steps ...", flush=True)  # fmt: skip
    t = time.perf_counter()
    summary = pretrain(cfg, progress=False)
    import ray

    ray.shutdown()
    print(f"  {summary.steps} steps in {time.perf_counter() - t:.0f} s, final loss {summary.final_loss}, held-out "
          f"retrieval top-1 {summary.eval_top1} vs random {summary.eval_top1_random}; {summary.checkpoint}", flush=True)  # fmt: skip
    return str(summary.checkpoint), summary.as_dict()


def run_cell(args, catalog: Path, tracking_uri: str, init: str, backbone, task: str, strategy: str,
             regime_overrides: list[str], seeds: list[int]):  # fmt: skip
    from brainiac.jobs.finetune.run import finetune
    from brainiac.platform.config import load_config

    cfg = load_config(args.config, [
        f"catalog.uri={catalog}", f"tracking.uri={tracking_uri}", f"tracking.experiment={args.experiment}",
        f"finetune.task={task}", f"finetune.strategy={strategy}", f"finetune.init={init}",
        f"finetune.seeds=[{','.join(map(str, seeds))}]", "finetune.trials=1", f"finetune.max_epochs={args.epochs}",
        "finetune.register=false", f"finetune.storage_path={args.work / 'runs'}",
        f"finetune.bootstrap={args.bootstrap}", *regime_overrides, *args.overrides])  # fmt: skip
    if strategy == "scratch":
        cfg.model = backbone  # the same architecture as the pretrained encoder, randomly initialised
    return finetune(cfg, progress=False)


# ----------------------------------------------------------------------------------------------------------------------


def verdicts(specs, tasks, regimes, cells) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Per task and regime: does the better pretrained strategy beat scratch on the select metric? And the counts."""
    lines, counts = [], {}
    for regime in regimes:
        wins = compared = 0
        for task in tasks:
            spec = specs[task]
            m = spec.select_metric
            got = {s: cells.get((task, regime, s)) for s in STRATEGIES}
            vals = {
                s: c["test"][m] for s, c in got.items() if c and "test" in c and math.isfinite(c["test"][m]["mean"])
            }
            if "scratch" not in vals or not ({"linear", "full"} & vals.keys()):
                why = [f"{s} {'failed' if got[s] is None else f'{m} is nan'}" for s in STRATEGIES if s not in vals]
                n = next((c["cases"] for c in got.values() if c), None)
                lines.append(
                    f"- **{task}** ({regime}): not compared — {', '.join(why)}"
                    + (f" (cases {n}; too few, or a test split with one class)" if n else "")
                )
                continue
            sign = 1.0 if spec.higher_is_better else -1.0
            best = max((s for s in ("linear", "full") if s in vals), key=lambda s: sign * vals[s]["mean"])
            p, s0 = vals[best], vals["scratch"]
            beats = sign * (p["mean"] - s0["mean"]) > 0
            overlap = not (p["high"] < s0["low"] or s0["high"] < p["low"]) if all(
                math.isfinite(x) for x in (p["low"], p["high"], s0["low"], s0["high"])) else True  # fmt: skip
            compared += 1
            wins += beats
            word = "beats" if beats else "does not beat"
            lines.append(
                f"- **{task}** ({regime}): pretrained ({best}) {word} scratch on {m} "
                f"({'higher' if spec.higher_is_better else 'lower'} is better): {p['mean']:.3f} vs {s0['mean']:.3f}"
                + (" — 95 % CIs overlap" if overlap else " — 95 % CIs disjoint")
            )
        counts[regime] = (wins, compared)
    return lines, counts


def write_markdown(out: Path, meta: dict, specs, tasks, regimes, cells, errors) -> str:
    rows = ["| task | regime | metric | scratch | linear | full |", "|---|---|---|---|---|---|"]
    for task in tasks:
        spec = specs.get(task)
        metrics = [spec.select_metric, *[m for m in spec.metrics if m != spec.select_metric]] if spec else ["?"]
        for regime in regimes:
            for metric in metrics:
                row = []
                for s in STRATEGIES:
                    if (task, regime, s) in errors:
                        row.append(f"n/a ({errors[(task, regime, s)]})")
                    else:
                        c = cells.get((task, regime, s))
                        row.append(_fmt(c["test"].get(metric)) if c else "n/a (not run)")
                name = f"{metric} {'↑' if _hib(metric) else '↓'}"
                if spec and metric == spec.select_metric:
                    name += " *"
                rows.append(f"| {task} | {regime} | {name} | " + " | ".join(row) + " |")
    lines, counts = verdicts(specs, tasks, regimes, cells)
    text = [
        "# Few-shot: pretrained encoder vs training from scratch",
        "",
        f"Generated {meta['finished']} by `bench/fewshot.py` in {meta['seconds'] / 60:.1f} min. "
        f"Catalog `{meta['catalog']}`; encoder `{meta['init']}`"
        + (f" (pretrained here for {meta['pretrain']['steps']} steps)" if meta.get("pretrain") else "")
        + ".",
        "",
        f"Seeds {meta['seeds']}; {meta['epochs']} epochs; one fixed hyperparameter config for every cell (no tuning: "
        f"lr {meta['hp']['lr']}, weight decay {meta['hp']['weight_decay']}, dropout {meta['hp']['dropout']}, "
        f"full encoder lr × {meta['hp']['encoder_lr_mult']}); the test split is scored once per cell. "
        "Cells: test mean over seeds [95 % bootstrap CI of the seed-averaged prediction]. `*` = the task's "
        "select metric; ↑/↓ = higher/lower is better.",
        "",
        *rows,
        "",
        "## Does pretraining beat scratch?",
        "",
        *lines,
        "",
    ]
    for regime, (wins, compared) in counts.items():
        label = "K=5" if regime == K5 else regime
        text.append(f"**Pretrained beats scratch on {wins} of {compared} tasks at {label}** "
                    f"({len(tasks)} requested).")  # fmt: skip
        text.append("")
    if K5 in counts:
        wins, compared = counts[K5]
        aim = "met" if wins >= 5 else "not met" if compared >= 7 else f"not measurable here ({compared} tasks compared)"
        text += [f"Aim of issue 7 (≥ 5 of 7 at K=5): {aim}.", ""]
    cases = [f"- {t}: {meta['cases'][t]}" for t in tasks if t in meta["cases"]]
    if cases:
        text += ["Cases per split (train / val / test, before the regime's subset of train):", "", *cases, ""]
    text += [
        "Caveats: a synthetic cohort of a few dozen subjects, test splits of a handful of cases (wide CIs, the verdict "
        "compares means only); a tiny encoder pretrained for a short budget; fixed, untuned hyperparameters shared by "
        "all strategies, which may suit one strategy more than another.",
        "",
    ]
    md = "\n".join(text)
    (out / "fewshot.md").write_text(md)
    return md


def _hib(metric: str) -> bool:
    from brainiac.models.tasks.spec import HIGHER_IS_BETTER

    return HIGHER_IS_BETTER.get(metric, True)


def plot(out: Path, specs, tasks, regimes, cells) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tasks)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    colours = {"scratch": "tab:grey", "linear": "tab:blue", "full": "tab:orange"}
    for ax, task in zip(axes.flat, tasks, strict=False):
        spec = specs.get(task)
        metric = spec.select_metric if spec else "?"
        drawn = False
        for i, s in enumerate(STRATEGIES):
            xs, ys, lo, hi = [], [], [], []
            for j, regime in enumerate(regimes):
                c = cells.get((task, regime, s))
                v = c["test"].get(metric) if c else None
                if v and math.isfinite(v["mean"]):
                    xs.append(j + (i - 1) * 0.22)
                    ys.append(v["mean"])
                    lo.append(max(0.0, v["mean"] - v["low"]) if math.isfinite(v["low"]) else 0.0)
                    hi.append(max(0.0, v["high"] - v["mean"]) if math.isfinite(v["high"]) else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, color=colours[s], label=s)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no finite result\n(see fewshot.md)", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(range(len(regimes)), regimes)
        ax.set_xlim(-0.6, len(regimes) - 0.4)
        arrow = "↑" if spec is None or spec.higher_is_better else "↓"
        ax.set_title(f"{task}: {metric} {arrow}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if not handles:
        for ax in axes.flat:
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                break
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.suptitle("Test metric (mean over seeds, 95 % CI) by strategy and data regime", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(out / "fewshot.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for cohort, catalog, runs and MLflow")
    ap.add_argument("--out", type=Path, help="where fewshot.md/.png/.json go (default WORK/fewshot)")
    ap.add_argument("--catalog", type=Path, help="use this catalog as is (skips the build)")
    ap.add_argument("--subjects", type=int, default=40, help="subjects of the small cohort the build generates")
    ap.add_argument("--cohort-seed", type=int, default=0, help="seed of the synthetic cohort")
    ap.add_argument("--init", help="pretrained encoder (folder or models:/...); skips pretraining")
    ap.add_argument("--tracking-uri", help="MLflow URI (default sqlite:///WORK/mlflow.db)")
    ap.add_argument("--experiment", default="brainiac-fewshot", help="MLflow experiment of the fine-tuning runs")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--pretrain-workers", type=int, default=2)
    ap.add_argument("--pretrain-config", default="pretrain/tiny")
    ap.add_argument("--config", default="tiny", help="config the fine-tuning runs start from")
    ap.add_argument("--cpu-subset", action="store_true",
                    help="declared CPU subset: sequence, brain_age, idh, mci at shots=5, seeds 0,1,2")  # fmt: skip
    ap.add_argument("--tasks", help=f"comma-separated (default all: {','.join(ALL_TASKS)})")
    ap.add_argument("--regimes", help=f"comma-separated shots=K | fraction=F | full (default {','.join(ALL_REGIMES)})")
    ap.add_argument("--seeds", help="comma-separated (default 0,1,2)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test CIs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="fine-tuning config KEY=VALUE")
    ap.add_argument("--pretrain-set", dest="pretrain_overrides", action="append", default=[],
                    help="pretraining config KEY=VALUE")  # fmt: skip
    args = ap.parse_args()
    started = time.perf_counter()

    defaults = CPU_SUBSET if args.cpu_subset else {"tasks": ALL_TASKS, "regimes": ALL_REGIMES, "seeds": (0, 1, 2)}
    tasks = args.tasks.split(",") if args.tasks else list(defaults["tasks"])
    regimes_in = args.regimes.split(",") if args.regimes else list(defaults["regimes"])
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(defaults["seeds"])
    regimes = {label: ov for label, ov in map(parse_regime, regimes_in)}

    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    out = (args.out or args.work / "fewshot").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or f"sqlite:///{args.work / 'mlflow.db'}"

    from brainiac.platform.cluster import configure_ray_environment

    configure_ray_environment()

    if args.catalog:
        catalog = args.catalog.resolve()
    else:
        print(f"catalog: building what is missing under {args.work}", flush=True)
        catalog = build_catalog(args.work, args.subjects, args.cohort_seed)

    pretrain_info = None
    if args.init:
        init = args.init
    else:
        init, pretrain_info = pretrain_encoder(args, catalog, tracking_uri)

    from brainiac.models.export import load_encoder
    from brainiac.models.finetune_config import FinetuneConfig
    from brainiac.models.tasks.spec import load_specs
    from brainiac.platform.errors import UserError

    _, backbone = load_encoder(init, tracking_uri=tracking_uri)
    specs = load_specs()
    unknown = [t for t in tasks if t not in specs]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; known: {sorted(specs)}")

    grid = [(t, r, s) for t in tasks for r in regimes for s in STRATEGIES]
    print(f"grid: {len(tasks)} tasks x {len(regimes)} regimes x 3 strategies = {len(grid)} cells, seeds {seeds}, "
          f"{args.epochs} epochs; encoder {init} ({backbone.kind} {backbone.img_size}³)", flush=True)  # fmt: skip
    cells: dict[tuple, dict] = {}
    errors: dict[tuple, str] = {}
    cases: dict[str, dict] = {}
    for i, (task, regime, strategy) in enumerate(grid, 1):
        t = time.perf_counter()
        try:
            s = run_cell(args, catalog, tracking_uri, init, backbone, task, strategy, regimes[regime], seeds)
        except Exception as exc:  # one bad cell must not stop the grid
            errors[(task, regime, strategy)] = _reason(exc)
            print(f"[{i}/{len(grid)}] {task} {regime} {strategy}: n/a ({_reason(exc)}) "
                  f"{time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
            if not isinstance(exc, UserError):  # an expected refusal needs no traceback; a crash does
                traceback.print_exc(limit=3)
            continue
        cells[(task, regime, strategy)] = s.as_dict()
        cases[task] = s.cases
        m = specs[task].select_metric
        print(f"[{i}/{len(grid)}] {task} {regime} {strategy}: {m} {_fmt(s.test.get(m))} "
              f"cases {s.cases} {s.seconds:.0f} s", flush=True)  # fmt: skip

    hp = FinetuneConfig()
    meta = {
        "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": time.perf_counter() - started, "catalog": str(catalog), "init": init, "pretrain": pretrain_info,
        "tasks": tasks, "regimes": list(regimes), "seeds": seeds, "epochs": args.epochs, "cpu_subset": args.cpu_subset,
        "overrides": args.overrides, "cases": cases,
        "hp": {k: getattr(hp, k) for k in ("lr", "weight_decay", "dropout", "encoder_lr_mult", "freeze_depth")},
    }  # fmt: skip
    for o in args.overrides:  # the fixed hyperparameters actually used
        key, _, value = o.partition("=")
        if key.startswith("finetune.") and key.split(".", 1)[1] in meta["hp"]:
            meta["hp"][key.split(".", 1)[1]] = value
    md = write_markdown(out, meta, specs, tasks, list(regimes), cells, errors)
    plot(out, specs, tasks, list(regimes), cells)
    (out / "fewshot.json").write_text(json.dumps({
        "meta": meta,
        "cells": [{"task": t, "regime": r, "strategy": s, "summary": c} for (t, r, s), c in cells.items()],
        "errors": [{"task": t, "regime": r, "strategy": s, "error": e} for (t, r, s), e in errors.items()],
    }, indent=2, default=str))  # fmt: skip
    print("\n" + md)
    print(f"wrote {out / 'fewshot.md'}, {out / 'fewshot.png'}, {out / 'fewshot.json'}")


if __name__ == "__main__":
    main()
