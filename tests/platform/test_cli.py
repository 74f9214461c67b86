"""The `brainiac` command: help on every command, --version, and user errors as one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from brainiac.platform.cli.main import app, main

IMPLEMENTED = {
    "stack",
    "config",
    "synth",
    "ingest",
    "catalog",
    "preprocess",
    "pretrain",
    "finetune",
    "evaluate",
    "embed",
    "predict",
    "submit",
    "jobs",
    "promote",
    "quickstart",
}
"""Commands that exist today. A command the project does not have yet must not be registered (no placeholders)."""


def _commands(group) -> dict:
    return getattr(group, "commands", {})


def test_registered_commands_are_exactly_the_implemented_ones():
    root = typer.main.get_command(app)
    assert set(_commands(root)) <= IMPLEMENTED
    assert {"stack", "config"} <= set(_commands(root))


def test_every_command_has_help(capsys):
    root = typer.main.get_command(app)
    paths = [[]]
    for name, cmd in _commands(root).items():
        paths.append([name])
        paths.extend([name, sub] for sub in _commands(cmd))
    for path in paths:
        assert main([*path, "--help"]) == 0, path
        out = capsys.readouterr().out
        assert "Usage:" in out and len(out.strip().splitlines()) > 3, path


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("brainiac ")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["no-such-command"], "No such command"),
        (["config", "show", "--set", "cluster.num_cpu=2"], "unknown config key 'cluster.num_cpu'"),
        (["config", "show", "--config", "missing-config"], "unknown config 'missing-config'"),
        (["config", "show", "--bogus-flag"], "No such option"),
        (["stack", "up", "nonexistent-service"], "unknown service"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err
    assert len(err.splitlines()) == 1, err


def test_console_script_exit_status_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "brainiac.platform.cli.main", "config", "show", "--set", "seed=-1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "'seed' must be >= 0" in proc.stderr


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", "-c", "tiny", "--catalog", "s3://lake/cat", "-s", "cluster.num_cpus=6"]) == 0
    out = capsys.readouterr().out
    assert "uri: s3://lake/cat" in out and "num_cpus: 6" in out
