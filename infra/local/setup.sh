#!/usr/bin/env bash
# Create ./.venv (if missing) and install brainiac with the exact pins of constraints.txt. Idempotent: a second run
# only re-checks. Usage: infra/local/setup.sh [--dev]   (--dev adds tests, lint and notebook tools)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
EXTRAS=""
[[ "${1:-}" == "--dev" ]] && EXTRAS="[dev]"
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
STAMP=".venv/.brainiac-installed${EXTRAS}"
HASH="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
echo "[setup] installing brainiac${EXTRAS} with pinned dependencies (first time: a few minutes)"
# torch first and alone: `torch==2.13.0` takes the local CPU wheel; moto and s3fs in one command keep botocore in range.
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".${EXTRAS}"
echo "$HASH" > "$STAMP"
echo "[setup] done: $(.venv/bin/brainiac --version)"
