"""Imports flow one way: foundation (``brainiac.platform``) → ingestion | models → jobs → CLI (``brainiac.platform.cli``).

The contract is checked on the source with :mod:`ast` (every ``import`` and ``from … import`` of a ``brainiac`` module,
inside functions too; imports under ``if TYPE_CHECKING:`` are annotations only and do not count). Ingestion and models
are siblings: neither imports the other. No module imports a private (``_``) name from another top-level package.
docs/architecture.md#layers states the same rule; the breaks it lists as "to fix" are :data:`KNOWN_BREAKS` here, and
the test fails both on a new break and on a listed one that is gone (so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("platform", "ingestion", "models", "jobs")
LAYER = {"platform": 0, "ingestion": 1, "models": 1, "jobs": 2, "cli": 3}

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


def violations(source: str, module: str) -> list[tuple[str, str, str]]:
    """``(importer, imported, why)`` for each import in ``source`` (the text of ``module``) that breaks the rule."""
    out = []
    src = _layer_package(module)
    for imported, names in imports_of(source, module):
        dst = _layer_package(imported)
        if dst not in LAYER:
            continue
        if LAYER[dst] > LAYER[src] or (LAYER[dst] == LAYER[src] and dst != src):
            out.append((module, imported, f"{src} may not import {dst}"))
        elif dst != src and any(n.startswith("_") for n in names):
            out.append((module, imported, f"private name of {dst}: {', '.join(n for n in names if n.startswith('_'))}"))
    return out


def _all_violations() -> list[tuple[str, str, str]]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            found += violations(path.read_text(), _module_name(path, REPO_ROOT))
    return found


def test_imports_flow_one_way_except_the_listed_breaks():
    found = _all_violations()
    new = sorted({v for v in found if (v[0], v[1]) not in KNOWN_BREAKS})
    assert not new, "imports against the layering (docs/architecture.md#layers):\n" + "\n".join(map(str, new))
    gone = sorted(KNOWN_BREAKS - {(v[0], v[1]) for v in found})
    assert not gone, f"fixed breaks still listed in KNOWN_BREAKS (remove them): {gone}"
    assert len(found) >= len(KNOWN_BREAKS)  # the walk saw the code (a broken walk would find nothing at all)


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
