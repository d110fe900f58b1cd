#!/usr/bin/env bash
# The paper's 7B model (random weights, full depth) on one CUDA GPU: 20 training steps at batch 16 with
# LoRA r=128 in bf16 (tokens/s, MFU, peak memory) and detect_keypoints latency at K = 17 against one
# generate() per keypoint. No download; budgeted at 8 minutes on one H100/H200 (killed after that).
# Fails with exit status 3 when no CUDA GPU is visible: there is no CPU fallback.
#
#   bash benchmarks/gpu_check.sh                       # writes benchmarks/results/gpu_check.json
#   bash benchmarks/gpu_check.sh --steps 5 --output ''  # flags go to python -m benchmarks.gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1  # everything is built in code: a download attempt is a bug
exec timeout --signal=TERM 480 python -m benchmarks.gpu_check "$@"
