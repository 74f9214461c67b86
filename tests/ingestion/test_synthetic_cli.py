"""``brainiac synth`` and ``python -m brainiac.jobs.synth``: flags map to config keys, help teaches, errors are one line."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from brainiac.jobs import synth as synth_job
from brainiac.platform.cli import synth_cmd
from brainiac.platform.errors import UserError


def _app() -> typer.Typer:
    app = typer.Typer(rich_markup_mode="rich", pretty_exceptions_enable=False)
    app.command("synth")(synth_cmd.synth)

    @app.callback()
    def root() -> None:  # makes "synth" a sub-command, as in brainiac.platform.cli.main
        """test app"""

    return app


def test_help_teaches():
    result = CliRunner().invoke(_app(), ["synth", "--help"], env={"COLUMNS": "160", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    for word in ("--subjects", "--seed", "--preset", "--anatomy-variation", "_truth", "synth-brats", "tiny"):
        assert word in result.output, word


def test_cli_writes_cohort_and_summary(tmp_path):
    out = tmp_path / "synth"
    args = [
        "synth",
        str(out),
        "--subjects",
        "2",
        "--seed",
        "3",
        "--preset",
        "tiny",
        "--set",
        "synth.cohorts=[adni, stroke]",
    ]
    result = CliRunner().invoke(_app(), args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert (out / "synth-adni" / "manifest.csv").is_file() and (out / "synth-stroke-bids").is_dir()
    assert (out / "_truth" / "scans.csv").is_file()
    assert "2 subjects" in result.output and "synth-adni" in result.output and str(out) in result.output
    assert json.loads((out / "_truth" / "synth.json").read_text())["anatomy_variation"] == 1.0  # the preset's
    # running again into the same folder replaces the previous output, here with the template's anatomy
    again = CliRunner().invoke(_app(), [*args, "--anatomy-variation", "0"], env={"COLUMNS": "160"})
    assert again.exit_code == 0, again.output
    assert json.loads((out / "_truth" / "synth.json").read_text())["anatomy_variation"] == 0.0


def test_cli_user_errors(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    app = _app()
    with pytest.raises(UserError, match="not a previous"):
        app(
            ["synth", str(tmp_path / "busy"), "--subjects", "1", "--set", "synth.cohorts=[adni]"], standalone_mode=False
        )
    with pytest.raises(UserError, match="unknown preset"):
        app(["synth", str(tmp_path / "new"), "--preset", "huge"], standalone_mode=False)
    with pytest.raises(UserError, match=r"synth\.subjects"):
        app(["synth", str(tmp_path / "new"), "--set", "synth.subjects=0"], standalone_mode=False)
    with pytest.raises(UserError, match=r"synth\.anatomy_variation"):
        app(["synth", str(tmp_path / "new"), "--set", "synth.anatomy_variation=5"], standalone_mode=False)


def test_job_entry_point(tmp_path, capsys):
    rc = synth_job.main(
        [str(tmp_path / "o"), "--set", "synth.subjects=1", "--set", "synth.cohorts=[adni]", "-s", "seed=2"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "synth-adni" in out and "1 subjects" in out
    assert synth_job.main([str(tmp_path / "o2"), "--set", "synth.preset=huge"]) == 2
