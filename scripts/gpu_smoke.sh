#!/usr/bin/env bash
# GPU smoke test: the tiny recipe on one CUDA GPU - 4-bit (NF4) loading, sampling with the
# transformers engine, a few QLoRA reward-model steps - in well under 5 minutes. Offline.
# CPU CI does not run it.
#
# Needs (already installed; nothing is downloaded):
#   torch (CUDA build), transformers, tokenizers, accelerate, peft, bitsandbytes, pyyaml, tqdm
#   (+ trl, datasets for the almost_utils.reward check, skipped when that module is absent)
#   i.e. pip install -e '.[gpu]' on a machine with a CUDA torch.
#
# Usage: scripts/gpu_smoke.sh [extra args for scripts/gpu_smoke.py]
#        SMOKE_TIMEOUT=300 PYTHON=python3 scripts/gpu_smoke.sh
# Exit status: 0 when every check passed, 1 when one failed, 124 on timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout "${SMOKE_TIMEOUT:-300}" "$PYTHON" scripts/gpu_smoke.py "$@"
