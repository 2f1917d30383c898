#!/usr/bin/env bash
# The exported graphs on the GPU's execution providers (CUDA, TensorRT): python -m export.check
# there (scores against the torch model, every guard's refusal), then user_kv memory/latency; see
# --help. Needs an NVIDIA GPU (--cpu runs the same steps on the CPU EP: a check of the script).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then bash scripts/setup.sh; fi
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/python -m benchmarks.gpu_check "$@"
