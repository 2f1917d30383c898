#!/usr/bin/env bash
# Load test of the ranker ensemble through a real tritonserver: concurrent clients, exactness
# against ranker_naive, latency, throughput and server memory. Starts and stops its own local
# tritonserver unless --url is given; see --help.
set -euo pipefail
cd "$(dirname "$0")/.."
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/python -m benchmarks.load_test "$@"
