"""The quickstart report: rendered from hand-built data with no service at all, and gathered on real sources, cheaply (a
small ``scans`` Delta table, a sqlite MLflow with a pretraining-like run — loss and top-1 histories, a saliency PNG — and
a registered ``brainiac-*`` model with aliases; no pipeline)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import mlflow
import pyarrow as pa
import pytest
import torch

from brainiac.jobs.quickstart import report_data
from brainiac.jobs.quickstart.report import SECTIONS, ReportInputs, gather, render, summary_lines, write_report
from brainiac.jobs.quickstart.report_data import (
    CatalogSection,
    Decision,
    Figure,
    Gate,
    Notice,
    OverviewSection,
    Prediction,
    PredictionSection,
    PretrainingSection,
    RegisteredModel,
    RegistrySection,
    ReportData,
    ReproduceSection,
    RobustnessModel,
    RobustnessSection,
    SaliencyModel,
    SaliencySection,
    Table,
)
from brainiac.platform.catalog import SCANS_SCHEMA, Catalog

pytestmark = pytest.mark.timeout(180)

EVIL = "<script>alert(1)</script>"


def _catalog(root) -> str:
    """Six current scans over two datasets (and one superseded row the report must not count)."""
    from deltalake import write_deltalake

    catalog = Catalog.open(str(root / "catalog"))
    catalog.create_if_missing("scans")
    now = datetime.now(UTC)
    rows = [
        {"scan_id": f"s{i}", "dataset": ds, "subject_id": f"sub{i // 2}-{ds}", "sequence": seq, "site": "a",
         "access": "open", "age_years": 30.0 + 9 * i, "sex": "F", "spacing_mm": [1.0, 1.0, 1.0 + 0.5 * i],
         "shape": [64, 64, 40 + i], "image_uri": f"/x/{i}.nii.gz", "status": "current", "ingested_at": now}
        for i, (ds, seq) in enumerate([("synth-a", "T1w"), ("synth-a", "FLAIR"), ("synth-a", "T1w"),
                                       ("synth-b", "T1w"), ("synth-b", "T2w"), ("synth-b", "T2w")])
    ]  # fmt: skip
    rows.append({**rows[0], "scan_id": "old", "status": "superseded"})
    loc = catalog.table_location("scans")
    table = pa.Table.from_pylist(rows, schema=SCANS_SCHEMA)
    write_deltalake(
        loc.uri, table, mode="append", partition_by=["dataset"], storage_options=loc.delta_storage_options()
    )
    return catalog.uri


def _png(path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.subplots().imshow([[0, 1], [1, 0]])
    fig.savefig(path, dpi=50)


def _mlflow(root) -> dict[str, str]:
    """A run with metric histories and a saliency artifact, and brainiac-brain_age v1 (previous) and v2 (champion)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("report", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    for step in range(1, 6):
        client.log_metric(run_id, "train/loss", 4.0 - 0.5 * step, step=step)
        client.log_metric(run_id, "train/top1", 0.1 * step, step=step)
    _png(root / "saliency_0.png")
    client.log_artifact(run_id, str(root / "saliency_0.png"), "saliency")
    client.set_terminated(run_id)
    name = "brainiac-brain_age"
    client.create_registered_model(name)
    mlflow.set_experiment(experiment_id=exp)
    with mlflow.start_run() as model_run:
        info = mlflow.pytorch.log_model(
            torch.nn.Linear(2, 1), name="model", serialization_format="pickle", pip_requirements=["torch"]
        )
    for _ in range(2):
        client.create_model_version(
            name, source=info.model_uri, run_id=model_run.info.run_id, tags={"task": "brain_age"}
        )
    client.set_registered_model_alias(name, "previous", "1")
    client.set_registered_model_alias(name, "champion", "2")
    client.set_model_version_tag(name, "2", "promotion.decision", "promoted")
    client.set_model_version_tag(name, "2", "promotion.reasons", "all gates passed")
    return {"uri": uri, "run_id": run_id}


def _sections(page: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r'<section><h2 id="(\w+)">.*?</h2>(.*?)</section>', page, re.S)}


def _sweep(task: str, init: str, strategy: str, mean: float) -> dict:
    return {"task": task, "strategy": strategy, "regime": "full", "init": init, "cases": {"train": 8, "test": 4},
            "trials": 2, "test": {"mae": {"mean": mean, "low": mean - 1, "high": mean + 1, "seeds": [mean]}},
            "model_uri": f"models:/brainiac-{task}@candidate", "model_version": "2"}  # fmt: skip


def test_report_embeds_every_section_from_real_sources(tmp_path):
    ml = _mlflow(tmp_path)
    rows = [{"artifact": a, "strength": s, "mae": 5.0 + s} for a in ("contrast", "gibbs") for s in (0.0, 0.5)]
    inputs = ReportInputs(
        title="BrainIAC quickstart",
        workdir=str(tmp_path),
        catalog_uri=_catalog(tmp_path),
        tracking_uri=ml["uri"],
        stage_seconds={"synth": 3.0, "ingest": 12.5, "pretrain": 95.0},
        total_seconds=110.5,
        pretrain={"mlflow_run_id": ml["run_id"], "steps": 5, "final_loss": 1.5, "eval_top1": 0.6,
                  "eval_top1_random": 0.2, "eval_pairs": 10, "model_uri": "models:/brainiac-encoder@candidate"},
        finetune=[_sweep("brain_age", "scratch", "scratch", 9.0),
                  _sweep("brain_age", "models:/brainiac-encoder@candidate", "full", 6.0),
                  _sweep(EVIL, "", "scratch", 1.0)],
        evaluations=[
            {"task": "brain_age", "version": "2", "test_cases": 4, "metrics": {"mae": {"value": 6, "low": 5, "high": 7}},
             "robustness": rows, "saliency_pngs": ["saliency/saliency_0.png"], "mlflow_run_id": ml["run_id"]},
            {"task": EVIL, "version": "1", "metrics": {}, "robustness": rows, "saliency_pngs": []},
            # A broken source: no robustness rows and an artifact the run does not hold.
            {"task": "idh", "version": "1", "robustness": [], "saliency_pngs": ["saliency/missing.png"],
             "mlflow_run_id": ml["run_id"]},
        ],
        promotions=[{"model_name": "brainiac-brain_age", "task": "brain_age", "candidate_version": "2",
                     "champion_version": "1", "promoted": True, "passed": True, "primary_metric": "mae",
                     "checks": [{"name": "improvement", "passed": True, "detail": "mae better by 1.2"}],
                     "metrics": {"candidate": {"mae": {"value": 6.0, "low": 5.0, "high": 7.0}},
                                 "champion": {"mae": {"value": 7.2, "low": 6.1, "high": 8.3}}},
                     "improvement": {"value": 1.2, "low": 0.3, "high": 2.0}}],
        predictions=[{"text": "sub-01_T1w.nii.gz: brain age 63.2 years", "model_uri": "models:/brainiac-brain_age@champion",
                      "value": 63.2, "units": "years", "json_path": str(tmp_path / "pred.json")}],
        commands=[("pretrain", "brainiac pretrain --catalog x --config tiny")],
    )  # fmt: skip
    path = write_report(tmp_path / "report.html", inputs)
    page = path.read_text()
    sections = _sections(page)

    assert list(sections) == [sid for sid, _ in SECTIONS]
    errors = re.findall(r'class="error">(.*?)</p>', page)
    assert len(errors) == 1 and errors[0].startswith("artifact saliency/missing.png unavailable"), errors
    assert page.count("data:image/png;base64,") >= 6  # catalog, pretraining, finetuning, 2 robustness, 1 saliency
    assert not re.findall(r'(?:src|href)="(?!data:image/png;base64,|#)', page)  # no external asset of any kind
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("not run") == 1 and "not run — robustness was not evaluated" in sections["robustness"]
    # The catalog counts come from SQL over current rows only.
    assert "6 current scans of 4 pseudonymised subjects in 2 datasets" in sections["catalog"]
    # Scratch vs pretrained side by side: lower MAE is better, so −3 favours the pretrained encoder.
    assert "-3" in sections["finetuning"] and "pretrained better" in sections["finetuning"]
    # Live registry: aliases and the promotion tag; the decision with its gate.
    assert "champion → v2, previous → v1" in sections["registry"] and "promoted to champion" in sections["registry"]
    assert "brain age 63.2 years" in sections["prediction"]
    assert f"mlflow ui --backend-store-uri {ml['uri']}" in sections["reproduce"]
    assert "--catalog" in sections["reproduce"] and "brainiac pretrain --catalog x" in sections["reproduce"]
    assert path.stat().st_size < 2_000_000

    lines = summary_lines(inputs)  # finds report.html in the work directory
    assert any(line.strip().startswith("brain_age: brainiac-brain_age v2 champion · mae 6 [5, 7]") for line in lines)
    assert lines[-2:] == ["prediction: sub-01_T1w.nii.gz: brain age 63.2 years", f"report: {path}"]
    assert any("pretrain" in line and "1 min 35 s" in line for line in lines)


def test_missing_inputs_say_not_run(tmp_path):
    path = write_report(tmp_path, ReportInputs())
    assert path == tmp_path / "report.html"
    sections = _sections(path.read_text())
    assert list(sections) == [sid for sid, _ in SECTIONS]
    for sid in (
        "catalog",
        "pretraining",
        "finetuning",
        "robustness",
        "saliency",
        "registry",
        "prediction",
        "reproduce",
    ):
        assert "not run" in sections[sid], sid
    assert "data:image/png" not in path.read_text()


PNG = "iVBORw0KGgo="  # any base64 text: render embeds it as given


def _hand_built() -> ReportData:
    """Every section filled by hand, with ``EVIL`` planted in text of every kind the page shows."""
    return ReportData(
        title=f"quickstart {EVIL}",
        created_at="2026-01-02 03:04 UTC",
        overview=OverviewSection(
            facts=[("working directory", f"/runs/{EVIL}")],
            stage_times=Table(["stage", "wall time", "share"], [["pretrain", "1 min 35 s", "86 %"]], numeric=(1, 2)),
            glance=["pretraining: 5 steps, final loss 1.5"],
        ),
        catalog=CatalogSection(
            scans=6, subjects=4, datasets=2, table_version=3,
            counts=Table(["dataset", "subjects", "scans"], [[EVIL, "4", "6"]], numeric=(1, 2)),
            overview=Notice(f"overview plot unavailable: ValueError: {EVIL}", "error"),
        ),
        pretraining=PretrainingSection(facts=[("steps", "5")], curves=Figure(PNG, f"alt {EVIL}", f"run {EVIL}")),
        finetuning=Notice("not run — no fine-tuning sweep was given", "not-run"),
        robustness=RobustnessSection([
            RobustnessModel(task="brain_age", version="2", test_cases="4", metrics=None,
                            curves=Figure(PNG, "robustness of brain_age"),
                            worst_drops=Table(["artifact", "strongest setting", "mae", "change from clean"],
                                              [["gibbs", "0.5", "5.5", "+0.5"]], numeric=(1, 2, 3))),
        ]),
        saliency=SaliencySection([
            SaliencyModel(task="idh", version="1", region="tumour", mass_ratio="2.4",
                          overlays=[Figure(PNG, "saliency idh", "saliency/0.png"),
                                    Notice("artifact saliency/1.png unavailable: OSError: gone", "error")]),
        ]),
        registry=RegistrySection(
            live=[RegisteredModel("brainiac-brain_age", "champion → v2", Table(["version"], [["v2"]]), older=3)],
            decisions=[Decision(heading="brainiac-brain_age v2 against champion v1: promoted to champion",
                                gates=[Gate("improvement", True, f"better {EVIL}"), Gate("calibration", False, "off")],
                                metrics=None, primary_metric="mae", improvement="1.2 [0.3, 2]", mlflow_run_id="r1")],
        ),
        prediction=PredictionSection([Prediction(f"sub-01: brain age 63.2 years {EVIL}", [("units", "years")])]),
        reproduce=ReproduceSection(commands=[("pretrain", f"brainiac pretrain --catalog '{EVIL}'")],
                                   mlflow_ui=None, catalog_queries=None),
    )  # fmt: skip


def test_render_needs_no_service_and_escapes_every_text():
    page = render(_hand_built())
    sections = _sections(page)

    assert list(sections) == [sid for sid, _ in SECTIONS]
    assert page.startswith("<!DOCTYPE html>") and page.count('<a href="#') == len(SECTIONS)
    # Every planted string is shown, escaped: title and h1, a fact, a cell, a notice, figure alt and caption, a gate,
    # the headline and a command.
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 10
    assert "6 current scans of 4 pseudonymised subjects in 2 datasets (table version 3)" in sections["catalog"]
    assert '<td class="num">86 %</td>' in sections["overview"] and '<td class="num">+0.5</td>' in sections["robustness"]
    assert re.findall(r'class="error">(.*?)</p>', page) == [
        "overview plot unavailable: ValueError: &lt;script&gt;alert(1)&lt;/script&gt;",
        "artifact saliency/1.png unavailable: OSError: gone",
    ]
    assert sections["finetuning"].strip() == '<p class="not-run">not run — no fine-tuning sweep was given</p>'
    assert page.count(f'src="data:image/png;base64,{PNG}"') == 3
    assert "tumour mass ratio 2.4" in sections["saliency"] and '<div class="gallery">' in sections["saliency"]
    assert '<span class="pass">pass</span>' in sections["registry"] and '<span class="fail">FAIL</span>' in page
    assert "… and 3 older versions." in sections["registry"] and "decision logged in MLflow run r1" in page
    assert "paired improvement on mae: 1.2 [0.3, 2] (positive = candidate better)" in sections["registry"]
    assert "<pre>brainiac pretrain --catalog &#39;&lt;script&gt;" in sections["reproduce"]


def test_a_failing_source_costs_only_its_own_section(monkeypatch):
    def broken(inputs, scratch):
        raise RuntimeError("catalog server gone\nsecond line not shown")

    monkeypatch.setitem(report_data.GATHERERS, "catalog", broken)
    data = gather(ReportInputs(predictions=[{"input": "a.nii.gz", "value": 63.24, "units": "years"}]))

    assert data.catalog == Notice("Catalog unavailable: RuntimeError: catalog server gone", "error")
    assert data.prediction.predictions[0].headline == "a.nii.gz: 63.2 years"
    assert isinstance(data.pretraining, Notice) and data.pretraining.kind == "not-run"
    assert "Catalog unavailable: RuntimeError: catalog server gone" in _sections(render(data))["catalog"]


def test_summary_names_every_task_with_or_without_a_champion():
    inputs = ReportInputs(
        stage_seconds={"synth": 2.0, "finetune": 4000.0},
        total_seconds=4002.0,
        finetune=[_sweep("brain_age", "scratch", "scratch", 9.0), _sweep("mci", "scratch", "scratch", 1.0)],
        promotions=[{"model_name": "brainiac-brain_age", "task": "brain_age", "candidate_version": "1",
                     "champion_version": None, "promoted": False, "passed": False, "primary_metric": "mae",
                     "checks": [{"name": "beats trivial baseline", "passed": False, "detail": "mae 9 > 8"}]}],
    )  # fmt: skip
    assert summary_lines(inputs, report_path="r.html") == [
        "BrainIAC quickstart — 1 h 06 min in all",
        "  synth            2.0 s",
        "  finetune    1 h 06 min",
        "champions:",
        "  brain_age: no champion (candidate v1 rejected: beats trivial baseline: mae 9 > 8)",
        "  mci: fine-tuned, not promoted",
        "report: r.html",
    ]


def test_credentials_in_the_catalog_or_tracking_uri_never_reach_the_page(tmp_path):
    from brainiac.jobs.quickstart.report_data import ReportInputs, _error, _overview, _reproduce

    inputs = ReportInputs(catalog_uri="s3://user:catpw@bucket/catalog", tracking_uri="http://user:trackpw@host:5000")
    shown = repr(_overview(inputs, tmp_path)) + repr(_reproduce(inputs, tmp_path))
    shown += repr(_error("Catalog", RuntimeError("cannot open s3://user:catpw@bucket/catalog")))
    assert "catpw" not in shown and "trackpw" not in shown
    assert "s3://user:***@bucket/catalog" in shown and "http://user:***@host:5000" in shown
