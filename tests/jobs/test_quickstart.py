"""``brainiac quickstart --fast`` end to end on the session's Ray (the ``tour`` fixture): every stage runs, the report
holds every section, a first promotion must beat the trivial baseline, only champions predict (a task without one
says so), predict printed values; ``--resume`` skips finished stages and a re-run of ingest and preprocess adds
nothing."""

from __future__ import annotations

import json

import mlflow
import pytest

from brainiac.jobs.quickstart.run import STAGES, _Context, quickstart, workdir_config
from brainiac.platform.cli.main import main

SECTIONS = ("catalog", "pretraining", "finetuning", "robustness", "saliency", "registry", "prediction", "reproduce")


@pytest.mark.timeout(900)
def test_quickstart_fast_runs_the_whole_platform_and_resumes(tour):
    result, cfg, lines = tour.result, tour.cfg, tour.lines
    assert list(result.stages) == list(STAGES) and not result.skipped

    html = result.report.read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in html, section
    assert html.count("data:image/png;base64,") >= 4

    uri = f"sqlite:///{tour.workdir / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    # A first promotion is judged against the task's trivial baseline; only champions predict, and a task without one
    # says so (the fast recipe's briefly trained models need not beat the baseline, and must not pretend to).
    decisions = result.stages["promote"]["decisions"]
    first = [d for d in decisions if d["champion_version"] is None]
    assert first and all(any(c["name"] == "beats trivial baseline" for c in d["checks"]) for d in first)
    predictions = result.stages["predict"]["predictions"]
    refused = {r["task"]: r for r in result.stages["predict"]["refused"]}
    for task in cfg.quickstart.tasks:
        if "champion" in client.get_registered_model(f"brainiac-{task}").aliases:
            champion = client.get_model_version_by_alias(f"brainiac-{task}", "champion")
            assert champion.tags["promotion.decision"] == "promoted" and task not in refused
            assert any(p["task"] == task and p["model"].endswith(f"/{champion.version}") for p in predictions)
        else:
            assert task in refused and not any(p["task"] == task for p in predictions)
            assert any(f"{task}: NO PREDICTION" in line and "has no champion" in line for line in lines), lines
            assert any(refused[task]["text"] in line for line in result.summary)
    assert all(p["champion"] for p in predictions)
    for age in (p for p in predictions if p["task"] == "brain_age"):
        assert age["value"] is not None and age["units"] == "years" and "years" in age["headline"]
        assert any(age["headline"] in line for line in lines)  # printed, not only stored
    assert any(str(result.report) in line for line in result.summary)

    state = json.loads((tour.workdir / "state.json").read_text())
    assert set(state["stages"]) == set(STAGES)
    more: list[str] = []
    again = quickstart(cfg, tour.workdir, resume=True, progress=False, echo=more.append)
    assert again.skipped == list(STAGES) and again.stages["promote"] == result.stages["promote"]
    assert all("skipped" in line for line in more)

    # Re-running the data stages is idempotent: nothing new is ingested or preprocessed.
    ctx = _Context(workdir_config(cfg, tour.workdir), tour.workdir, False, more.append, again)
    ingest = ctx.ingest()
    assert ingest["inserted"] == 0 and ingest["unchanged"] == result.stages["ingest"]["inserted"]
    assert ctx.preprocess()["processed"] == 0


@pytest.mark.timeout(120)
def test_quickstart_resume_refuses_a_workdir_of_another_recipe(tour, capsys):
    code = main(["quickstart", "--fast", "--resume", "--workdir", str(tour.workdir), "--set", "quickstart.trials=3"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another quickstart config" in err[0]
