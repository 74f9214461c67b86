"""Packaging: the brainiac namespace mapping, no shadowing of stdlib `platform`, configs shipped as package data."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAPPED = {
    "brainiac.platform": "platform",
    "brainiac.ingestion": "ingestion",
    "brainiac.models": "models",
    "brainiac.jobs": "jobs",
}


def test_stdlib_platform_is_not_shadowed_from_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system()); print(platform.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0] in {"Linux", "Darwin", "Windows"}
    assert not out[1].startswith(str(REPO)), out[1]
    assert not (REPO / "platform" / "__init__.py").exists()


def test_import_names_map_to_top_level_folders():
    import brainiac.ingestion
    import brainiac.jobs
    import brainiac.models
    import brainiac.platform.config

    assert Path(brainiac.platform.config.__file__).parent == REPO / "platform"
    for mod, folder in [(brainiac.ingestion, "ingestion"), (brainiac.models, "models"), (brainiac.jobs, "jobs")]:
        assert Path(mod.__file__).parent == REPO / folder


def test_every_code_folder_is_a_listed_package():
    """A sub-package missing from pyproject's explicit list would be absent from the wheel a cluster installs."""
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert conf["package-dir"] == MAPPED
    listed = set(conf["packages"])
    for pkg, folder in MAPPED.items():
        for d in [REPO / folder, *(p.parent for p in (REPO / folder).rglob("*.py"))]:
            if "__pycache__" in d.parts:
                continue
            rel = d.relative_to(REPO / folder)
            name = ".".join([pkg, *rel.parts]) if rel.parts else pkg
            assert name in listed, f"{name} ({d}) is not in [tool.setuptools] packages"


def test_configs_ship_as_package_data():
    names = {p.name for p in resources.files("brainiac.jobs.configs").iterdir()}
    assert {"default.yaml", "tiny.yaml"} <= names
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "*.yaml" in data["tool"]["setuptools"]["package-data"]["brainiac.jobs.configs"]


def test_torch_is_pinned_on_the_install_path():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text().split()


def test_no_test_folder_shadows_a_stdlib_name():
    assert not list((REPO / "tests").rglob("__init__.py"))
