"""The test tiers are derived from what each test uses: Ray, servers and end-to-end jobs never reach the quick tier."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = [
    "tests/jobs/test_pretrain.py",  # the session pipeline (Ray) and one CLI-only test
    "tests/models/test_ssl.py",  # pure torch
    "tests/platform/test_stack.py",  # starts the local stack
    "tests/ingestion/test_synthetic_learnability.py",  # builds the learnability cohort
]


def _collect(marker: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marker, *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(180)
def test_quick_tier_holds_pure_tests_and_no_ray_service_or_end_to_end_test(tmp_path: Path) -> None:
    unit = _collect("unit", tmp_path, *SAMPLE)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    ids = [line for line in unit.stdout.splitlines() if "::" in line]
    assert any(i.startswith("tests/models/test_ssl.py::") for i in ids), ids
    # A CLI-only test beside Ray tests stays quick; every test using the pipeline does not.
    assert "tests/jobs/test_pretrain.py::test_cli_errors_are_one_line_and_exit_2" in ids
    assert not any("test_pretrain.py::test_pretrain_registers" in i or "test_stream_settings" in i for i in ids), ids
    assert not any(i.startswith(("tests/platform/test_stack.py", "tests/ingestion/test_synthetic_learn")) for i in ids)

    ray = _collect("ray and slow", tmp_path, *SAMPLE)
    ray_ids = [line for line in ray.stdout.splitlines() if "::" in line]
    assert "tests/jobs/test_pretrain.py::test_pretrain_registers_an_encoder_that_beats_random_init" in ray_ids
    integration = _collect("integration", tmp_path, *SAMPLE)
    assert any(i.startswith("tests/platform/test_stack.py::") for i in integration.stdout.splitlines())
