"""Imports flow one way: foundation (``brainiac.platform``) → ingestion | models → jobs → CLI (``brainiac.platform.cli``).

The contract is checked on the source with :mod:`ast` (every ``import`` and ``from … import`` of a ``brainiac`` module,
inside functions too; imports under ``if TYPE_CHECKING:`` are annotations only and do not count). Ingestion and models
are siblings: neither imports the other. No module imports a private (``_``) name from another top-level package. A
string literal that names a ``brainiac`` module (``"brainiac.jobs.configs"``, read with :mod:`importlib.resources`) is
a dependency too and follows the same rule; docstrings and comments are prose and do not count.
docs/architecture.md#layer-breaks states the same rule. :data:`KNOWN_BREAKS` is empty: the test fails on any break, and
on a listed one that is gone (so the list could only shrink).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("platform", "ingestion", "models", "jobs")
LAYER = {"platform": 0, "ingestion": 1, "models": 1, "jobs": 2, "cli": 3}
_MODULE_NAME = re.compile(r"brainiac(?:\.[A-Za-z_]\w*)+")

KNOWN_BREAKS: set[tuple[str, str]] = set()
"""(importer, imported) pairs that break the rule today, each to be fixed; empty since issue #22, and it may only
shrink: a new break is fixed, not listed."""


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return "brainiac." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer_package(module: str) -> str:
    parts = module.split(".")
    return "cli" if parts[1:3] == ["platform", "cli"] else parts[1]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                inside.update(id(n) for n in ast.walk(node))
    return inside


def imports_of(source: str, module: str) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` of every runtime import of a ``brainiac`` module in ``source``."""
    tree = ast.parse(source)
    skip = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("brainiac."):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("brainiac.")]
    return found


def strings_of(source: str) -> list[str]:
    """The ``brainiac`` module names that string literals in ``source`` start with (``"brainiac.jobs.configs"``);
    docstrings (a string that is a statement of its own) are prose and left out."""
    tree = ast.parse(source)
    prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            match = _MODULE_NAME.match(node.value)
            if match:
                found.append(match.group())
    return found


def _breaks(src: str, dst: str) -> bool:
    return dst in LAYER and (LAYER[dst] > LAYER[src] or (LAYER[dst] == LAYER[src] and dst != src))


def violations(source: str, module: str) -> list[tuple[str, str, str]]:
    """``(importer, imported, why)`` for each import in ``source`` (the text of ``module``), and each module a string
    literal names, that breaks the rule."""
    out = []
    src = _layer_package(module)
    for imported, names in imports_of(source, module):
        dst = _layer_package(imported)
        if dst not in LAYER:
            continue
        if _breaks(src, dst):
            out.append((module, imported, f"{src} may not import {dst}"))
        elif dst != src and any(n.startswith("_") for n in names):
            out.append((module, imported, f"private name of {dst}: {', '.join(n for n in names if n.startswith('_'))}"))
    for named in strings_of(source):
        dst = _layer_package(named)
        if _breaks(src, dst):
            out.append((module, named, f"{src} may not name {dst} (a string literal)"))
    return out


def _sources() -> list[tuple[str, str]]:
    return [
        (_module_name(path, REPO_ROOT), path.read_text())
        for package in PACKAGES
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
    ]


def _all_violations() -> list[tuple[str, str, str]]:
    return [v for module, source in _sources() for v in violations(source, module)]


def test_imports_flow_one_way_except_the_listed_breaks():
    found = _all_violations()
    new = sorted({v for v in found if (v[0], v[1]) not in KNOWN_BREAKS})
    assert not new, "imports against the layering (docs/architecture.md#layers):\n" + "\n".join(map(str, new))
    gone = sorted(KNOWN_BREAKS - {(v[0], v[1]) for v in found})
    assert not gone, f"fixed breaks still listed in KNOWN_BREAKS (remove them): {gone}"
    # The walks saw the code (a broken walk would find nothing at all, and so no break either).
    sources = dict(_sources())
    assert len(sources) > 100 and "brainiac.platform.config" in sources
    jobs_config = sources["brainiac.jobs.config"]
    assert any(m == "brainiac.platform.config" and "load_typed" in n for m, n in imports_of(jobs_config, ""))
    assert "brainiac.jobs.configs" in strings_of(jobs_config)


def test_a_planted_upward_import_or_private_name_is_caught():
    planted = "from brainiac.jobs.finetune.engine import predict\n"
    assert violations(planted, "brainiac.platform.storage") == [
        ("brainiac.platform.storage", "brainiac.jobs.finetune.engine", "platform may not import jobs")
    ]
    assert violations("def f():\n    import brainiac.platform.cli.main\n", "brainiac.jobs.embed")[0][2] == (
        "jobs may not import cli"
    )
    assert violations("from brainiac.models.config import X\n", "brainiac.ingestion.prepare")  # siblings
    assert violations("from brainiac.models.config import _bounds\n", "brainiac.jobs.embed")[0][2].startswith("private")
    assert not violations("from brainiac.platform.catalog import Catalog\n", "brainiac.jobs.embed")
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from brainiac.jobs.embed import X\n"
    assert not violations(typing_only, "brainiac.platform.catalog")


def test_a_planted_string_naming_an_upper_package_is_caught():
    """A package named as data (``importlib.resources.files("brainiac.jobs.configs")``) depends on it as an import
    does; prose that mentions it does not."""
    planted = 'CONFIG_PACKAGE = "brainiac.jobs.configs"\n'
    assert violations(planted, "brainiac.platform.config") == [
        ("brainiac.platform.config", "brainiac.jobs.configs", "platform may not name jobs (a string literal)")
    ]
    assert violations('def f():\n    return files("brainiac.models.tasks/specs.yaml")\n', "brainiac.platform.x")
    assert violations('NAME = "brainiac.ingestion.datasets"\n', "brainiac.models.tasks.spec")  # siblings
    assert violations('x = {"a": "brainiac.platform.cli.main"}\n', "brainiac.jobs.embed")[0][2].startswith("jobs")
    prose = '"""Loads :mod:`brainiac.jobs.config`."""\n\nX = 1\n"""brainiac.jobs.configs holds the YAML."""\n'
    assert not violations(prose, "brainiac.platform.config")
    assert not violations('PKG = "brainiac.jobs.configs"\n', "brainiac.jobs.config")  # its own layer
    assert not violations('PKG = "brainiac.jobs.configs"\n', "brainiac.platform.cli.pretrain_cmd")  # the CLI
    assert not violations('TAG = "brainiac.job"\nTXN = "brainiac.preprocess/v1"\n', "brainiac.platform.x")  # no package
