#!/usr/bin/env bash
# Set up the environment and run the furthest end-to-end path that exists today on the embedded defaults:
# a synthetic multi-site cohort -> the Delta Lake catalog -> model-ready volumes and splits. Each capability that lands moves this
# forward; the goal is `brainiac quickstart`. Everything goes under ./brainiac-data (override: BRAINIAC_DATA).
set -euo pipefail
cd "$(dirname "$0")/../.."
infra/local/setup.sh
B=.venv/bin/brainiac
DATA="${BRAINIAC_DATA:-brainiac-data}"
$B synth "$DATA/cohort" --preset small --subjects 40 --seed 0
$B ingest "$DATA"/cohort/synth-* --catalog "$DATA/catalog"
$B catalog query "SELECT dataset, sequence, count(*) AS scans FROM scans WHERE status = 'current' GROUP BY 1, 2 ORDER BY 1, 2" --catalog "$DATA/catalog"
$B catalog stats --catalog "$DATA/catalog" --plot "$DATA/catalog-overview.png"
# The synthetic hospital DICOM cohort is marked `restricted` like real hospital data: this run says it may read it.
$B preprocess --catalog "$DATA/catalog" --set "catalog.allowed_access=[open, registered, restricted]"
$B catalog query "SELECT v.dataset, count(*) AS volumes, avg(v.registration_metric) AS mattes_mi, sum(CAST(v.qc_pass AS INT)) AS qc_pass FROM volumes v GROUP BY 1 ORDER BY 1" --catalog "$DATA/catalog"
