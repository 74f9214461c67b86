#!/usr/bin/env bash
# Set up the environment and run the whole test suite (lint included). This is the README's test command and what
# .ci/run executes. Fails if no test ran: pytest's exit code 5 (nothing collected) and an all-skipped run are failures.
#   infra/local/test.sh                 # everything (CI): ruff and mypy, then every tier
#   infra/local/test.sh --quick         # day-to-day: ruff and mypy, then the unit tier only (no Ray, no servers,
#                                       # no end-to-end jobs; tiers are derived in tests/conftest.py), a few minutes
#   infra/local/test.sh tests/models    # extra arguments go to pytest
set -euo pipefail
TIER=()
if [[ "${1:-}" == "--quick" ]]; then
  TIER=(-m unit)
  shift
fi
cd "$(dirname "$0")/../.."
infra/local/setup.sh --dev
export RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg  # Ray runs with token auth (brainiac.platform.cluster)
echo "[test] ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "[test] mypy"
infra/local/mypy.sh
mkdir -p test-results
echo "[test] pytest"
set +e
.venv/bin/pytest --junitxml=test-results/junit.xml --durations=15 "${TIER[@]}" "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "[test] FAIL: pytest collected no tests" >&2
  exit 1
fi
if [[ $rc -ne 0 ]]; then
  exit $rc
fi
.venv/bin/python - <<'PY'
import sys
import xml.etree.ElementTree as ET

root = ET.parse("test-results/junit.xml").getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
ran = tests - skipped
print(f"[test] {ran} tests ran, {skipped} skipped")
sys.exit(0 if ran > 0 else 1)
PY
