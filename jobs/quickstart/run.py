"""``brainiac quickstart``: the whole platform on the embedded defaults, in one command, ending in a report.

synth → ingest → preprocess (+ splits) → pretrain → finetune (a Tune sweep per task, some also from scratch) → evaluate
→ promote (a first candidate must beat its task's trivial baseline and pass its absolute gates, then scratch vs
pretrained by the paired gate) → predict on held-out scans with each task's champion → ``report.html``. A task whose
candidates were all refused has no champion and gets no prediction: the tour says so, with the reasons, instead of
printing a refused model's output as a result. Everything lives under one work directory: ``cohort/``, ``catalog/``
(Delta tables), ``mlflow.db``, ``runs/`` (Train/Tune checkpoints), ``predictions/``, ``report.html`` and ``state.json``.

``state.json`` records each finished stage with its summary, written atomically after the stage, so ``--resume`` skips
what is done and an interruption never leaves a half-written record; the stages themselves are already idempotent or
transactional (ingest and preprocess add nothing new on a re-run, Delta commits are atomic, pretraining resumes from
its last checkpoint under the same run name).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from brainiac.jobs.config import Config
from brainiac.platform.config import config_to_dict
from brainiac.platform.errors import UserError

__all__ = ["STAGES", "QuickstartResult", "quickstart"]

STAGES = ("synth", "ingest", "preprocess", "pretrain", "finetune", "evaluate", "promote", "predict", "report")


@dataclass
class QuickstartResult:
    """Where the tour's outputs are and what each stage reported."""

    workdir: Path
    report: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    summary: list[str] = field(default_factory=list)


def workdir_config(cfg: Config, workdir: Path) -> Config:
    """``cfg`` with its catalog, MLflow store and run storage inside ``workdir``: the tour is self-contained, and never
    writes into a catalog or registry the user already has."""
    runs = str(workdir / "runs")
    return replace(
        cfg,
        catalog=replace(cfg.catalog, uri=str(workdir / "catalog")),
        tracking=replace(cfg.tracking, uri=f"sqlite:///{workdir / 'mlflow.db'}"),
        pretrain=replace(cfg.pretrain, storage_path=runs),
        finetune=replace(cfg.finetune, storage_path=runs),
    )


class _State:
    """``state.json``: finished stages and their summaries, rewritten atomically (temp file + rename)."""

    def __init__(self, path: Path, recipe: str) -> None:
        self.path = path
        self.recipe = recipe
        self.data: dict[str, Any] = {"recipe": recipe, "stages": {}}

    def load(self) -> None:
        if not self.path.exists():
            return
        data = json.loads(self.path.read_text())
        if data.get("recipe") != self.recipe:
            raise UserError(
                f"{self.path.parent} was made with another quickstart config; use a new --workdir or drop --resume"
            )
        self.data = data

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def record(self, stage: str, summary: dict[str, Any], seconds: float) -> None:
        self.data["stages"][stage] = {"summary": summary, "seconds": round(seconds, 1)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _recipe(cfg: Config) -> str:
    """Hash of the config minus locations, so a resumed run is the same recipe."""
    data = config_to_dict(cfg, redact=True)
    for section, key in (
        ("catalog", "uri"),
        ("tracking", "uri"),
        ("pretrain", "storage_path"),
        ("finetune", "storage_path"),
    ):
        data[section].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def quickstart(
    cfg: Config, workdir: str | Path | None = None, *, resume: bool = False, progress: bool = True,
    echo: Callable[[str], None] = print,
) -> QuickstartResult:  # fmt: skip
    """Run the tour described by ``cfg`` (``quickstart`` section and every job's section) under ``workdir``.

    Raises:
        UserError: ``--resume`` on a work directory made with another config, or a stage's own user errors.
    """
    started = time.perf_counter()
    workdir = Path(workdir or cfg.quickstart.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir_config(cfg, workdir)
    state = _State(workdir / "state.json", _recipe(cfg))
    if resume:
        state.load()
    result = QuickstartResult(workdir=workdir, report=workdir / "report.html")
    ctx = _Context(cfg, workdir, progress, echo, result)
    for i, stage in enumerate(STAGES, 1):
        previous = state.done(stage) if resume else None
        if previous is not None:
            echo(f"[{i}/{len(STAGES)}] {stage}: done earlier ({previous['seconds']} s), skipped")
            result.stages[stage] = previous["summary"]
            ctx.stage_seconds[stage] = previous["seconds"]
            result.skipped.append(stage)
            continue
        echo(f"[{i}/{len(STAGES)}] {stage} ...")
        t0 = time.perf_counter()
        summary = getattr(ctx, stage)()
        seconds = time.perf_counter() - t0
        result.stages[stage] = summary
        ctx.stage_seconds[stage] = round(seconds, 1)
        state.record(stage, summary, seconds)
        echo(f"[{i}/{len(STAGES)}] {stage}: {ctx.one_line(stage, summary)} ({seconds:.0f} s)")
    result.seconds = time.perf_counter() - started
    result.summary = ctx.summary_lines()
    return result


class _Context:
    """The stages, each a method returning a JSON-able summary; later stages read earlier summaries from the result."""

    def __init__(self, cfg: Config, workdir: Path, progress: bool, echo, result: QuickstartResult) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.progress = progress
        self.echo = echo
        self.result = result
        self.stage_seconds: dict[str, float] = {}

    def _stage(self, name: str) -> dict[str, Any]:
        return self.result.stages.get(name) or {}

    # -- data -------------------------------------------------------------------------------------------------------
    def synth(self) -> dict[str, Any]:
        from brainiac.jobs.synth import run

        out = self.workdir / "cohort"
        marker = out / "_truth" / "cohort.json"
        if marker.exists():  # deterministic generator: the same recipe wrote the same bytes already
            return json.loads(marker.read_text())
        s = run(self.cfg, out, progress=self.progress)
        summary = {"out_dir": str(s.out_dir), "cohorts": s.cohorts, "subjects": s.n_subjects, "scans": s.n_scans,
                   "files": s.n_files, "truth": str(s.truth)}  # fmt: skip
        marker.write_text(json.dumps(summary))
        return summary

    def ingest(self) -> dict[str, Any]:
        from brainiac.ingestion.ingest import ingest

        cohort = self._stage("synth")
        sources = [str(Path(cohort["out_dir"]) / folder) for folder in cohort["cohorts"].values()]
        return _plain(ingest(self.cfg, sources, progress=self.progress))

    def preprocess(self) -> dict[str, Any]:
        from brainiac.ingestion.prepare import preprocess

        return _plain(preprocess(self.cfg, progress=self.progress))

    # -- models -----------------------------------------------------------------------------------------------------
    def _pinned(self) -> Config:
        version = self._stage("preprocess").get("preprocess_version") or self.cfg.preprocess.version()
        return replace(self.cfg, patches=replace(self.cfg.patches, preprocess_version=version))

    def pretrain(self) -> dict[str, Any]:
        from brainiac.jobs.pretrain.run import pretrain

        q = self.cfg.quickstart
        cfg = self._pinned()
        cfg = replace(cfg, pretrain=replace(cfg.pretrain, max_steps=q.pretrain_steps, run_name="quickstart-encoder"))
        return pretrain(cfg, progress=self.progress).as_dict()

    def _finetune_cfg(self, task: str, init: str, alias: str) -> Config:
        q = self.cfg.quickstart
        cfg = self._pinned()
        strategy: Literal["scratch", "full"] = "scratch" if not init else "full"
        return replace(cfg, finetune=replace(
            cfg.finetune, task=task, strategy=strategy, init=init, trials=q.trials, max_epochs=q.max_epochs,
            bootstrap=q.bootstrap, alias=alias, max_concurrent_trials=1))  # fmt: skip

    def finetune(self) -> dict[str, Any]:
        from brainiac.jobs.finetune.run import finetune

        q = self.cfg.quickstart
        encoder = self._stage("pretrain")["model_uri"]
        runs = []
        for task in q.tasks:
            self.echo(f"  finetune {task} from the pretrained encoder")
            runs.append(finetune(self._finetune_cfg(task, encoder, "challenger"), progress=self.progress).as_dict())
            if task in q.scratch_tasks:
                self.echo(f"  finetune {task} from scratch (baseline)")
                runs.append(finetune(self._finetune_cfg(task, "", "scratch"), progress=self.progress).as_dict())
        return {"runs": runs}

    def evaluate(self) -> dict[str, Any]:
        from brainiac.jobs.finetune.evaluate import evaluate

        q = self.cfg.quickstart
        out = []
        for task in q.tasks:
            s = evaluate(self._pinned(), f"models:/brainiac-{task}@challenger", saliency_cases=q.saliency_cases,
                         bootstrap=q.bootstrap, artifacts=q.robustness_artifacts or None)  # fmt: skip
            out.append(_plain(s))
        return {"evaluations": out}

    def promote(self) -> dict[str, Any]:
        from brainiac.jobs.promote.run import promote

        q = self.cfg.quickstart
        decisions = []
        for task in q.tasks:
            for candidate in ["@challenger", *(["@scratch"] if task in q.scratch_tasks else [])]:
                cfg = self._pinned()
                cfg = replace(cfg, promote=replace(
                    cfg.promote, candidate=candidate, gates=list(q.gates.get(task, [])), bootstrap=q.bootstrap,
                    robustness_artifacts=list(q.robustness_artifacts)))  # fmt: skip
                d = promote(cfg, f"brainiac-{task}")
                verdict = (
                    "promoted" if d.promoted else "REFUSED: " + "; ".join(f"{c.name} ({c.detail})" for c in d.failed)
                )
                self.echo(f"  brainiac-{task} v{d.candidate_version} ({candidate}): {verdict}")
                decisions.append(_plain(d))
        return {"decisions": decisions}

    def predict(self) -> dict[str, Any]:
        from brainiac.jobs.predict import predict_scans
        from brainiac.jobs.quickstart.heldout import heldout_inputs

        out, refused = [], []
        folder = self.workdir / "predictions"
        for task in self.cfg.quickstart.tasks:
            uri = _serving_uri(self.cfg, task)
            if uri is None:
                why = _no_champion(task, self._stage("promote").get("decisions", []))
                self.echo(f"  {task}: NO PREDICTION: {why}")
                refused.append({"task": task, "model": f"brainiac-{task}", "reason": why,
                                "text": f"{task}: no prediction ({why})"})  # fmt: skip
                continue
            inputs = heldout_inputs(self._pinned(), task)
            if inputs is None:
                continue
            # Held-out catalog scans have known sequences; the check guards users' own files, not these.
            for p in predict_scans(self.cfg, uri, inputs, out_dir=folder, sequence_check=False):
                record = _plain(p)
                self.echo(f"  {task}: {record['headline']}")
                out.append(record)
        return {"predictions": out, "refused": refused}

    def report_inputs(self, stage_seconds: dict[str, float]):
        """What the report and the terminal summary show, from the stage summaries."""
        from brainiac.jobs.quickstart.report import ReportInputs

        stages = self.result.stages
        return ReportInputs(
            title="BrainIAC quickstart",
            workdir=str(self.workdir),
            catalog_uri=self.cfg.catalog.uri,
            tracking_uri=self.cfg.tracking.uri,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            stage_seconds=stage_seconds,
            total_seconds=sum(stage_seconds.values()),
            pretrain=stages.get("pretrain"),
            finetune=(stages.get("finetune") or {}).get("runs", []),
            evaluations=(stages.get("evaluate") or {}).get("evaluations", []),
            promotions=(stages.get("promote") or {}).get("decisions", []),
            predictions=[
                *(stages.get("predict") or {}).get("predictions", []),
                *(stages.get("predict") or {}).get("refused", []),
            ],
            commands=self.commands(),
        )

    def report(self) -> dict[str, Any]:
        from brainiac.jobs.quickstart.report import write_report

        path = write_report(self.result.report, self.report_inputs(self.stage_seconds))
        return {"report": str(path), "bytes": path.stat().st_size}

    # -- presentation ----------------------------------------------------------------------------------------------
    def commands(self) -> list[tuple[str, str]]:
        """The exact commands that redo each stage by hand."""
        q, w = self.cfg.quickstart, self.workdir
        cat = f"--catalog {w / 'catalog'}"
        env = f"MLFLOW_TRACKING_URI=sqlite:///{w / 'mlflow.db'}"
        version = self._stage("preprocess").get("preprocess_version", "")
        pin = f"--set patches.preprocess_version={version}" if version else ""
        cohort = self._stage("synth").get("cohorts", {})
        cmds = [
            ("synth", f"brainiac synth {w / 'cohort'} --preset {self.cfg.synth.preset} --subjects "
                      f"{self.cfg.synth.subjects} --seed {self.cfg.seed}"),
            ("ingest", f"brainiac ingest {' '.join(str(w / 'cohort' / f) for f in cohort.values())} {cat}"),
            ("preprocess", f"brainiac preprocess {cat} --config tiny"),
            ("pretrain", f"{env} brainiac pretrain {cat} --config tiny --max-steps {q.pretrain_steps} {pin}"),
        ]  # fmt: skip
        encoder = (self._stage("pretrain") or {}).get("model_uri", "models:/brainiac-encoder@candidate")
        for task in q.tasks:
            cmds.append(("finetune", f"{env} brainiac finetune {cat} --config tiny --task {task} --strategy full "
                                     f"--init {encoder} --trials {q.trials} {pin}"))  # fmt: skip
            cmds.append(("evaluate", f"{env} brainiac evaluate {cat} --config tiny --model "
                                     f"models:/brainiac-{task}@challenger"))  # fmt: skip
            gates = " ".join(f"--gate '{g}'" for g in q.gates.get(task, []))
            cmds.append(("promote", f"{env} brainiac promote brainiac-{task} {cat} --config tiny {gates}"))
        cmds.append(("predict", f"{env} brainiac predict --model models:/brainiac-brain_age@champion SCAN.nii.gz"))
        return cmds

    @staticmethod
    def one_line(stage: str, s: dict[str, Any]) -> str:
        if stage == "synth":
            return f"{s.get('subjects')} subjects, {s.get('scans')} scans"
        if stage == "ingest":
            quarantined = sum((s.get("quarantined") or {}).values())
            return f"{s.get('inserted')} new scans, {s.get('unchanged')} unchanged, {quarantined} quarantined"
        if stage == "preprocess":
            return f"{s.get('processed')} volumes ({s.get('already_done')} already done), splits {s.get('splits')}"
        if stage == "pretrain":
            return f"{s.get('steps')} steps, loss {s.get('final_loss') or float('nan'):.3f}, {s.get('model_uri')}"
        if stage == "finetune":
            return ", ".join(f"{r['task']}/{r['strategy']} v{r['model_version']}" for r in s["runs"])
        if stage == "promote":
            return ", ".join(f"{d['model_name']} v{d['candidate_version']} {'✓' if d['promoted'] else '✗'}"
                             for d in s["decisions"])  # fmt: skip
        if stage == "predict":
            refused = [r["task"] for r in s.get("refused", [])]
            return f"{len(s['predictions'])} predictions" + (
                f"; none for {', '.join(refused)} (no champion)" if refused else ""
            )
        if stage == "report":
            return s["report"]
        return "done"

    def summary_lines(self) -> list[str]:
        from brainiac.jobs.quickstart.report import summary_lines

        return summary_lines(self.report_inputs(self.stage_seconds))


def _serving_uri(cfg: Config, task: str) -> str | None:
    """``@champion`` of the task, or ``None`` when no version was promoted: a refused candidate never serves (as in
    ``brainiac predict``, which refuses any version that is not the champion)."""
    import mlflow

    from brainiac.jobs.predict import CHAMPION_ALIAS
    from brainiac.platform.tracking import use_tracking

    uri = use_tracking(cfg.tracking)
    aliases = mlflow.MlflowClient(uri, registry_uri=uri).get_registered_model(f"brainiac-{task}").aliases
    return f"models:/brainiac-{task}@{CHAMPION_ALIAS}" if CHAMPION_ALIAS in aliases else None


def _no_champion(task: str, decisions: list[dict[str, Any]]) -> str:
    """Why ``task`` has no champion, from this tour's promotion decisions: each refused version with its failed gates."""
    refused = [
        f"v{d.get('candidate_version')} refused: "
        + "; ".join(f"{c.get('name')}: {c.get('detail')}" for c in d.get("checks", []) if not c.get("passed"))
        for d in decisions
        if d.get("task") == task and not d.get("promoted")
    ]
    return f"brainiac-{task} has no champion" + (f" ({' | '.join(refused)})" if refused else "")


def _plain(obj: Any) -> dict[str, Any]:
    """A summary dataclass as JSON-able data (paths and other objects as strings)."""
    data = obj.as_dict() if hasattr(obj, "as_dict") else dict(vars(obj))
    return json.loads(json.dumps(data, default=str))
