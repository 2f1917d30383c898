#!/usr/bin/env bash
# perf_analyzer benchmark: ranker (shared user K/V) vs ranker_naive vs ranker_base across N and L,
# against the FLOP bound. Starts and stops its own local tritonserver; see --help.
set -euo pipefail
cd "$(dirname "$0")/.."
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/python -m benchmarks.bench "$@"
