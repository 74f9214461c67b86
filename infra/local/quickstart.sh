#!/usr/bin/env bash
# Set up the environment (first time: a few minutes) and run `brainiac quickstart` on the embedded defaults: a synthetic
# multi-site cohort -> Delta Lake catalog -> preprocessing -> SimCLR pretraining -> fine-tuning sweeps -> evaluation ->
# registry promotion -> prediction -> ./brainiac-quickstart/report.html. Extra arguments go to the command, e.g. --fast,
# --resume or --workdir DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
infra/local/setup.sh
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED=0 MPLBACKEND="${MPLBACKEND:-Agg}"
exec .venv/bin/brainiac quickstart "$@"
