#!/usr/bin/env bash
# Type-check the package with mypy ([tool.mypy] in pyproject.toml). The top-level folders are installed as `brainiac.*`
# through setuptools' editable import hook, which mypy cannot follow, and checking them by path would name them
# `platform`, `models`, ... (and `platform` would shadow the standard library). So build/mypy/brainiac links to them
# and mypy checks the package `brainiac` from there; error paths are printed relative to the repo root.
#   infra/local/mypy.sh            # extra arguments go to mypy
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p build/mypy/brainiac
for d in platform ingestion models jobs; do
  ln -sfn "../../../$d" "build/mypy/brainiac/$d"
done
.venv/bin/mypy "$@" | sed 's#^build/mypy/brainiac/##'
