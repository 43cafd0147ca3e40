#!/usr/bin/env bash
# One command on a machine with one CUDA GPU (at most 8 minutes): the CUDA test subset, FP8 GEMM
# numerics vs the emulation, grouped-GEMM experts, a 16B-width training step (bf16, fp8) and bf16 decode,
# ending in one summary table. See benchmarks/gpu_check.py and benchmarks/README.md.
# Without a CUDA device it stops at once with a one-line message (exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    echo "gpu_check: no CUDA GPU on this machine (nvidia-smi finds none); run it where one is" >&2
    exit 2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=INT 480 python benchmarks/gpu_check.py --device cuda "$@"
