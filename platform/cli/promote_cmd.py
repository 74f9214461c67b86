"""``brainiac promote``: move a task model's ``champion`` alias only when the candidate passes every gate; roll back."""

from __future__ import annotations

from typing import Annotated

import typer

from brainiac.platform.cli.common import CatalogOption, ConfigOption, SetOption, build_config


def promote(
    model: Annotated[str, typer.Argument(help="Registered model name, e.g. [b]brainiac-idh[/b].", show_default=False)],
    candidate: Annotated[
        str | None, typer.Option("--candidate", help="Version number or [b]@alias[/b]. Default: @challenger.")
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option("--gate", metavar="METRIC>=X", help="Absolute gate on the candidate's test metric. Repeatable."),
    ] = None,
    min_delta: Annotated[
        float | None,
        typer.Option("--min-delta", help="Lower CI bound the primary metric's improvement must reach. Default 0."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Evaluate and decide, but write and move nothing.")
    ] = False,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="Give champion back to the version that held it before.")
    ] = False,
    catalog: CatalogOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> int:
    """Judge a candidate version against the current [b]champion[/b] on the same frozen test split and move the alias
    only if every gate passes:

    - [b]improvement[/b]: the primary metric (the task's selection metric, or promote.primary_metric) must improve;
      the lower bound of its 95 % paired-bootstrap CI must reach --min-delta;
    - [b]robustness[/b]: under no imaging artifact may the candidate be worse than promote.robustness_tolerance;
    - [b]lineage[/b]: same task spec and the same preprocess_version as the champion;
    - [b]access[/b]: trained only on data levels this deployment allows (catalog.allowed_access);
    - [b]baseline[/b]: a first promotion (no champion yet) must beat the task's trivial baseline (chance, the training
      mean, a constant risk, an empty mask) by the same paired bootstrap (promote.baseline_gate, on by default);
    - [b]--gate[/b] thresholds on the candidate's test metrics.

    The old champion keeps the alias [b]previous[/b]; the decision, both models' metrics and the reasons go to version
    tags and a model card. A failed gate exits 1 with a table of why.

      [b]brainiac promote brainiac-idh --candidate @challenger --gate auc>=0.7 --min-delta 0.01[/b]
      [b]brainiac promote brainiac-idh --rollback[/b]
    """
    from rich.console import Console
    from rich.table import Table

    from brainiac.jobs.promote.run import promote as run_promote
    from brainiac.jobs.promote.run import rollback as run_rollback

    flags = {"promote.candidate": candidate, "promote.gates": list(gate) if gate else None,
             "promote.min_delta": min_delta}  # fmt: skip
    cfg = build_config(config, set_, flags=flags, catalog=catalog)
    console = Console()
    if rollback:
        r = run_rollback(cfg, model)
        console.print(
            f"[b]rollback[/b] {r.model_name}: {cfg.promote.champion_alias} {r.from_version} → {r.to_version}"
            + (f" ({cfg.promote.previous_alias} = {r.previous_version})" if r.previous_version else "")
        )
        return 0
    d = run_promote(cfg, model, dry_run=dry_run)
    against = f"champion v{d.champion_version}" if d.champion_version else "no champion (first promotion)"
    console.print(f"[b]promote[/b] {d.model_name} v{d.candidate_version} vs {against} · task {d.task} · "
                  f"{d.test_cases} test cases · tables {d.table_versions}")  # fmt: skip
    reference = "baseline" if "baseline" in d.metrics else "champion"
    metrics = Table("metric", "candidate", reference, title="test metrics (95 % CI)")
    for name, v in d.metrics["candidate"].items():
        c = d.metrics.get(reference, {}).get(name)
        metrics.add_row(name, f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]",
                        f"{c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}]" if c else "–")  # fmt: skip
    console.print(metrics)
    gates = Table("gate", "result", "why", title="gates")
    for check in d.checks:
        gates.add_row(check.name, "[green]pass[/green]" if check.passed else "[red]FAIL[/red]", check.detail)
    console.print(gates)
    if d.promoted:
        console.print(f"[green]promoted[/green]: {d.model_name}@{cfg.promote.champion_alias} = v{d.candidate_version}"
                      + (f", {cfg.promote.previous_alias} = v{d.champion_version}" if d.champion_version else "")
                      + f" · MLflow run {d.mlflow_run_id} · {d.seconds:.1f} s")  # fmt: skip
        return 0
    if d.dry_run:
        console.print(f"dry run: would {'promote' if d.passed else 'reject'}; nothing was written ({d.seconds:.1f} s)")
        return 0 if d.passed else 1
    console.print(f"[red]rejected[/red]: {len(d.failed)} gate(s) failed; {d.model_name}@{cfg.promote.champion_alias} "
                  f"unchanged · MLflow run {d.mlflow_run_id}")  # fmt: skip
    return 1
