#!/usr/bin/env bash
# Set up the environment and run the furthest end-to-end path that exists today on the embedded defaults.
# Each capability that lands moves this forward; the goal is `brainiac quickstart`.
set -euo pipefail
cd "$(dirname "$0")/../.."
infra/local/setup.sh
B=.venv/bin/brainiac
$B stack up
$B stack status
$B stack down
