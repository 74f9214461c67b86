#!/usr/bin/env bash
# Start, stop or inspect the local stack on 127.0.0.1 (Ray head + job server, MLflow server on sqlite, moto S3 server),
# by PID. Same code as `brainiac stack` and the pytest fixtures. Usage: infra/local/stack.sh up|down|status [ray|mlflow|s3]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec .venv/bin/python -m brainiac.platform.stack "$@"
