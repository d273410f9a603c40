#!/usr/bin/env bash
# GPU readiness of fedtune, on a CUDA machine: the demo in bf16 on the GPU, QLoRA 4-bit,
# a full fine-tuning step of an OPT-350M-sized model and two clients sharing one GPU.
#   bash bench/gpu_check.sh            # after installing the CUDA build of torch 2.13.0
# bitsandbytes is installed if missing (QLoRA); HF_HUB_OFFLINE=1: only offline assets run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! command -v nvidia-smi >/dev/null; then
  echo "gpu_check: no nvidia-smi here: this check needs a CUDA machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import bitsandbytes" 2>/dev/null || "$PY" -m pip install --quiet bitsandbytes
HF_HUB_OFFLINE=1 "$PY" bench/gpu_check.py --json "${OUT:-/tmp}/gpu_check.json" "$@"
