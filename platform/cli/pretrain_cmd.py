"""``brainiac pretrain``: SimCLR contrastive pretraining of the encoder on Ray Train, fed by Ray Data from the catalog."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from brainiac.jobs.config import CONFIG_PACKAGE
from brainiac.platform.cli.common import (
    CatalogOption,
    ConfigOption,
    DatasetOption,
    SetOption,
    build_config,
    report_access,
)
from brainiac.platform.config import shipped_yaml_names

JOB_CONFIG_PREFIX = "pretrain/"


def job_config_name(name: str | None) -> str | None:
    """``tiny`` → ``pretrain/tiny`` when the pretrain job ships a config of that name; paths and other names unchanged."""
    plain = bool(name and "/" not in name and not name.endswith((".yaml", ".yml")))
    if plain and f"{JOB_CONFIG_PREFIX}{name}" in shipped_yaml_names(CONFIG_PACKAGE):
        return f"{JOB_CONFIG_PREFIX}{name}"
    return name


def pretrain(
    catalog: CatalogOption = None,
    dataset: DatasetOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Ray Train workers (pretrain.num_workers).")] = None,
    gpus_per_worker: Annotated[
        float | None, typer.Option("--gpus-per-worker", help="GPUs per worker; > 0 puts every worker on a GPU.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimiser steps in total.")] = None,
    run_name: Annotated[
        str | None, typer.Option("--run-name", help="Name of the run; the same name again resumes it.")
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster (auto, host:port, ray://…). Default: a local Ray.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Pretrain the encoder with SimCLR: two differently augmented crops of the [b]same brain location[/b] are pulled
    together, crops of other places and brains pushed apart (NT-Xent, negatives gathered across all workers).

    Ray Data streams view pairs from the catalog's [b]volumes[/b] (train split only) to Ray Train workers; checkpoints
    go to [b]pretrain.storage_path/RUN_NAME[/b] every [b]pretrain.checkpoint_every[/b] steps, a lost worker restarts
    from the last one, and the same [b]--run-name[/b] resumes a stopped run. Metrics and the config go to MLflow; the
    encoder is registered as [b]brainiac-encoder[/b] (alias [b]candidate[/b]) with its data provenance.

    Configs: [b]tiny[/b] (2 CPU workers, 32³ tiny ViT, seconds), [b]vit-b[/b] (BrainIAC V2, 96³ ViT-B, GPUs),
    [b]resnet50[/b] (BrainIAC V1), or a YAML path.

      [b]brainiac pretrain --catalog ./brainiac-data/catalog --config tiny --workers 2 --max-steps 60[/b]
      [b]brainiac pretrain --catalog s3://lake/catalog --config vit-b --workers 64 --gpus-per-worker 1 --address auto[/b]
    """
    from rich.console import Console

    from brainiac.jobs.pretrain.run import pretrain as run

    flags: dict[str, Any] = {"pretrain.num_workers": workers, "pretrain.max_steps": max_steps, "pretrain.run_name": run_name,
             "cluster.address": address}  # fmt: skip
    if gpus_per_worker is not None:
        flags["pretrain.use_gpu"] = gpus_per_worker > 0
        if gpus_per_worker > 0:
            flags["pretrain.gpus_per_worker"] = gpus_per_worker
    cfg = build_config(job_config_name(config), set_, flags=flags, catalog=catalog, datasets=dataset)
    report_access(cfg)  # an unknown or forbidden --dataset stops here; say what the access levels leave out
    s = run(cfg, progress=not quiet)
    console = Console()

    def num(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    console.print(f"[b]pretrain[/b] {s.run_name} — {s.steps} steps in {s.seconds:.1f} s"
                  + (f", resumed from step {s.resumed_from_step}" if s.resumed_from_step else "")
                  + (f", survived {s.failures} worker failure(s)" if s.failures else ""))  # fmt: skip
    console.print(
        f"final loss {num(s.final_loss, '.4f')} · {num(s.samples_per_s, '.1f')} pairs/s · "
        f"data-wait {num(s.data_wait_fraction, '.0%')} · batch top-1 {num(s.train_top1, '.2f')}"
    )
    console.print(
        f"held-out retrieval top-1 on {s.eval_pairs} pairs: pretrained {num(s.eval_top1, '.3f')} vs random init "
        f"{num(s.eval_top1_random, '.3f')}"
    )
    nodes = sorted({w.get("node_id", "?")[:8] for w in s.workers})
    console.print(f"workers {len(s.workers)} on {len(nodes)} node(s) · data {s.selection.get('datasets')}")
    console.print(f"checkpoint {s.checkpoint}")
    console.print(f"model      {s.model_uri} (version {s.model_version}) · MLflow run {s.mlflow_run_id}")
