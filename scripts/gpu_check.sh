#!/usr/bin/env bash
# The exported graphs on the GPU's execution providers (CUDA, TensorRT) against the CPU's scores,
# every guard's refusal there, and user_kv memory/latency; see --help. Needs an NVIDIA GPU
# (--cpu runs the same steps on the CPU EP: a check of the script, not of a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then bash scripts/setup.sh; fi
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/python -m benchmarks.gpu_check "$@"
