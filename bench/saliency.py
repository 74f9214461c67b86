"""Does a fine-tuned task model look where the synthetic generator put the signal? The saliency mass ratio of
``brainiac evaluate`` per task, next to the same architecture untrained, measured in the same run.

    .venv/bin/python bench/saliency.py --work /tmp/saliency --build                          # small cohort, scratch
    .venv/bin/python bench/saliency.py --work /tmp/saliency --catalog /tmp/sslprobe/catalog \\
        --strategy full --init models:/brainiac-encoder@candidate --tracking-uri sqlite:////tmp/sslprobe/mlflow.db

Data: a catalog of a synthetic cohort, e.g. the ``small`` one that ``bench/ssl_probe.py``'s ``build`` makes (``--build``
makes it under ``WORK`` when missing: 40 subjects, 2 mm voxels, the tiny config's 32³ ``fixed`` cube).

For each task (default ``mci`` and ``idh``):

1. the real fine-tuning job (:func:`brainiac.jobs.finetune.run.finetune`, one trial, ``--strategy scratch`` or
   ``full``/``linear`` from ``--init``), registered under the alias ``saliency-bench``;
2. the real evaluation (:func:`brainiac.jobs.finetune.evaluate.evaluate`, robustness off) with occlusion saliency on up
   to ``--cases`` test cases. The task spec's ``saliency_region`` says where the signal is: the case's whole-tumour
   mask for ``idh``/``survival``, the generator's medial-temporal region (hippocampus) for ``mci``
   (:mod:`brainiac.models.tasks.regions`). The ratio is the saliency mass inside the region over the mean mass in
   100 random translations of it (:func:`brainiac.models.tasks.saliency.mass_ratio`), averaged over cases; 1 = no
   preference, > 1 = the model looks there more than elsewhere.
3. the peer: the same registered model with every layer re-initialised (``torch.manual_seed(0)``), on the same cases,
   maps and regions. An untrained network's occlusion map already prefers some places (bright, high-contrast
   anatomy), so the trained ratio means something only next to it.

Printed per task: region, test cases, cases with a region (n), the evaluate ratio and the per-case range, the peer's
ratio and the test select metric. ``WORK/saliency.json`` keeps everything. No assertions: the table is the evidence.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from brainiac.platform.cluster import configure_ray_environment

configure_ray_environment()

import torch  # noqa: E402

ALIAS = "saliency-bench"


def build_catalog(work: Path, catalog: Path, subjects: int, seed: int) -> None:
    """``catalog`` of the ``small`` cohort (generated under ``WORK/cohort``), built where missing with ssl_probe's
    steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ssl_probe import build  # synth → ingest → preprocess, each only if missing

    build(work, catalog, subjects, seed)


def case_ratios(
    models: dict[str, torch.nn.Module], cfg, model_uri: str, tracking_uri: str, cases: int
) -> dict[str, Any]:
    """Per-case saliency mass ratios of each of ``models`` on the first ``cases`` test cases of the task ``model_uri``
    was trained for, exactly as evaluate computes them (same inputs, occlusion maps, region masks and random seeds).
    The task data and the region masks are read once for all models."""
    from brainiac.jobs.finetune.data import load_task_data
    from brainiac.jobs.finetune.evaluate import REGION_PROVIDERS, region_ratios
    from brainiac.models.export import model_version
    from brainiac.models.tasks.saliency import saliency_maps
    from brainiac.models.tasks.spec import task_spec
    from brainiac.platform.catalog import Catalog

    mv = model_version(model_uri, tracking_uri)
    spec = task_spec(mv.tags["task"])
    catalog = Catalog.open(cfg.catalog.uri, cfg.catalog.storage_options)
    data = load_task_data(catalog, cfg, spec, preprocess_version=mv.tags.get("preprocess_version", ""))
    test = data.indices("test")
    chosen = list(range(min(cases, len(test))))
    if not spec.saliency_region or not chosen:
        return {"ratios": {name: [] for name in models}, "region": spec.saliency_region}
    names = [data.case_ids[test[i]] for i in chosen]
    inputs = data.inputs[test[chosen]]
    masks = REGION_PROVIDERS[spec.saliency_region](catalog, cfg, data, names)
    regions = [masks.get(name) for name in names]
    ratios = {
        name: region_ratios(saliency_maps(model, spec, inputs, method="occlusion"), inputs, regions)
        for name, model in models.items()
    }
    return {"ratios": ratios, "region": spec.saliency_region}


def untrained(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` with fresh weights: every layer with ``reset_parameters`` (linear, conv, norm) re-initialises
    itself; parameters held by other modules (a ViT's position embeddings) are drawn like MONAI draws them
    (truncated normal, sd 0.02). Same architecture, no training."""
    import copy

    torch.manual_seed(seed)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                for param in module.parameters(recurse=False):
                    torch.nn.init.trunc_normal_(param, std=0.02, a=-2.0, b=2.0)
    return fresh.eval()


def run_task(args, catalog: Path, tracking_uri: str, task: str) -> dict[str, Any]:
    import mlflow

    from brainiac.jobs.config import load_config
    from brainiac.jobs.finetune.evaluate import evaluate
    from brainiac.jobs.finetune.run import finetune

    cfg = load_config(args.config, [
        f"catalog.uri={catalog}", f"tracking.uri={tracking_uri}", f"tracking.experiment={args.experiment}",
        f"finetune.task={task}", f"finetune.strategy={args.strategy}", *([f"finetune.init={args.init}"] if args.init
        else []), "finetune.trials=1", f"finetune.max_epochs={args.epochs}", f"finetune.alias={ALIAS}",
        f"finetune.storage_path={args.work / 'runs'}", f"finetune.bootstrap={args.bootstrap}", *args.overrides])  # fmt: skip
    t = time.perf_counter()
    trained = finetune(cfg, progress=False)
    finetune_s = time.perf_counter() - t
    print(f"  {task}: fine-tuned ({args.strategy}, {trained.cases}) in {finetune_s:.0f} s → {trained.model_uri}",
          flush=True)  # fmt: skip
    t = time.perf_counter()
    summary = evaluate(cfg, trained.model_uri, robustness=False, saliency_cases=args.cases, bootstrap=args.bootstrap)
    evaluate_s = time.perf_counter() - t
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    from brainiac.models.export import load_model_artifacts

    model = load_model_artifacts(trained.model_uri, tracking_uri).module
    t = time.perf_counter()
    both = case_ratios(
        {"trained": model, "untrained": untrained(model)}, cfg, trained.model_uri, tracking_uri, args.cases
    )
    mine, peer = both["ratios"]["trained"], both["ratios"]["untrained"]
    peer_s = time.perf_counter() - t
    from brainiac.models.tasks.spec import task_spec

    select = task_spec(task).select_metric
    return {
        "task": task,
        "strategy": args.strategy,
        "model_uri": trained.model_uri,
        "cases": trained.cases,
        "test_cases": summary.test_cases,
        "region": summary.saliency_region or both["region"],
        "n": summary.saliency_region_cases,
        "ratio": summary.saliency_mass_ratio,
        "case_ratios": mine,
        "peer_ratio": float(np.mean(peer)) if peer else None,
        "peer_case_ratios": peer,
        "select_metric": select,
        "test_metric": summary.metrics.get(select),
        "evaluate_run": summary.mlflow_run_id,
        "seconds": {"finetune": round(finetune_s, 1), "evaluate": round(evaluate_s, 1), "peer": round(peer_s, 1)},
    }


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for runs, MLflow and saliency.json")
    ap.add_argument("--catalog", type=Path, help="catalog to read (default WORK/catalog)")
    ap.add_argument("--build", action="store_true", help="synthesize + ingest + preprocess the small cohort if missing")
    ap.add_argument("--subjects", type=int, default=40, help="subjects of the small cohort --build generates")
    ap.add_argument("--cohort-seed", type=int, default=0, help="seed of the cohort --build generates")
    ap.add_argument("--tasks", default="mci,idh", help="comma-separated task specs (default mci,idh)")
    ap.add_argument("--strategy", choices=["scratch", "linear", "full"], default="scratch")
    ap.add_argument("--init", help="pretrained encoder for linear/full (folder or models:/NAME@ALIAS)")
    ap.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs")
    ap.add_argument("--cases", type=int, default=20, help="test cases to explain per task (occlusion maps)")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the test CIs (>= 100)")
    ap.add_argument("--config", default="tiny", help="config the fine-tuning runs start from")
    ap.add_argument("--tracking-uri", help="MLflow URI (default sqlite:///WORK/mlflow.db)")
    ap.add_argument("--experiment", default="brainiac-saliency-bench")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="fine-tuning config KEY=VALUE")
    args = ap.parse_args()
    if args.strategy != "scratch" and not args.init:
        ap.error(f"--strategy {args.strategy} needs --init")
    started = time.perf_counter()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    catalog = args.catalog.resolve() if args.catalog else args.work / "catalog"
    if args.build:
        build_catalog(args.work, catalog, args.subjects, args.cohort_seed)
    tracking_uri = args.tracking_uri or f"sqlite:///{args.work / 'mlflow.db'}"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    print(f"saliency bench: {', '.join(tasks)} · strategy {args.strategy} · catalog {catalog}", flush=True)

    rows, errors = [], {}
    for task in tasks:
        try:
            rows.append(run_task(args, catalog, tracking_uri, task))
        except Exception as exc:  # one task's failure (e.g. no test case) must not lose the others' numbers
            errors[task] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"  {task}: failed — {errors[task]}", flush=True)
    import ray

    ray.shutdown()

    print()
    header = (
        f"{'task':<10} {'region':<12} {'test':>4} {'n':>3} {'ratio':>7} {'per-case range':>15} {'untrained':>9}  metric"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        rng = f"{min(r['case_ratios']):.2f}–{max(r['case_ratios']):.2f}" if r["case_ratios"] else "n/a"
        metric = r["test_metric"] or {}
        print(f"{r['task']:<10} {r['region'] or '-':<12} {r['test_cases']:>4} {r['n']:>3} {_num(r['ratio']):>6}× "
              f"{rng:>15} {_num(r['peer_ratio']):>8}×  {r['select_metric']} {_num(metric.get('mean', metric.get('value')), '.3f')}")  # fmt: skip
    for task, why in errors.items():
        print(f"{task:<10} failed: {why}")
    out = args.work / "saliency.json"
    meta = {"finished": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}", "catalog": str(catalog),
            "seconds": round(time.perf_counter() - started, 1), "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows, "errors": errors}, indent=2, default=str) + "\n")
    print(f"\n{out} · {meta['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
