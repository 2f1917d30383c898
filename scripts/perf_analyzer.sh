#!/usr/bin/env bash
# perf_analyzer from the tritonclient wheel with the libcudart.so.12 it links (even on CPU) on
# its library path; every argument goes to perf_analyzer. Model Analyzer's perf_analyzer_path.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec "$ROOT/.venv/bin/python" -c 'import os, sys; sys.path.insert(0, sys.argv[1])
from benchmarks.perf_analyzer import perf_analyzer_env, perf_analyzer_path
binary = str(perf_analyzer_path())
os.execve(binary, [binary, *sys.argv[2:]], perf_analyzer_env())' "$ROOT" "$@"
