#!/usr/bin/env bash
# ViT-B 96³ SimCLR pretraining on one GPU (bench/gpu_pretrain.py): pairs/s and MFU (vs the card's dense bf16 peak),
# eager and torch.compile'd, a torch.profiler step breakdown, and the data-wait fraction of a CPU loader and, with
# --catalog URI (needs ray + deltalake), of the pretraining job's Ray Data stream.
#
# Self-contained, for a bare GPU machine with python3 + torch (CUDA), numpy, einops, pyarrow, pyyaml and no network:
# MONAI comes from the wheel carried in .whl/ (installed into /tmp/site), and the brainiac packages are imported from
# this checkout without installing it. At most 450 s for the benchmark itself (it budgets 420 s and skips what won't fit).
#
#   bash bench/gpu.sh                 # full run on the GPU machine; writes $OUT/gpu.txt (and $OUT/gpu_sh.log) if OUT is set
#   bash bench/gpu.sh --tiny --steps 3   # CPU check of the same path (tiny config, fp32)
#   bash bench/gpu.sh --batches 128,256 --catalog /path/to/catalog   # also the Ray Data stream
#   PYTHON=.venv/bin/python bash bench/gpu.sh --tiny --steps 3
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
SITE="${BRAINIAC_SITE:-/tmp/site}"

log() { if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT" && tee -a "$OUT/gpu_sh.log"; else cat; fi; }

{
  echo "== machine =="
  nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
  echo "cpus: $(nproc)   /dev/shm: $(df -h /dev/shm 2>/dev/null | awk 'NR==2 {print $4 " free of " $2}')"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| gpu available", torch.cuda.is_available())'
} 2>&1 | log

if ! "$PY" -c 'import monai' >/dev/null 2>&1; then
  wheel=$(ls .whl/monai-*.whl 2>/dev/null | head -n 1)
  if [[ -z "$wheel" ]]; then
    echo "monai is not importable and no .whl/monai-*.whl was carried; stopping" | log
    exit 2
  fi
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel" 2>&1 | log; then
    # No pip: a py3-none-any wheel is a zip of the package, so unpacking it is an install.
    "$PY" -m zipfile -e "$wheel" "$SITE"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import monai; print("monai", monai.__version__, "from", monai.__file__)' 2>&1 | log

timeout 450 "$PY" bench/gpu_pretrain.py "$@" 2>&1 | log
rc=${PIPESTATUS[0]}
[[ $rc -eq 124 ]] && echo "gpu_pretrain.py hit the 450 s timeout; lines above (and \$OUT/gpu.txt) hold what it measured" | log
exit "$rc"
