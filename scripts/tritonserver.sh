#!/usr/bin/env bash
# The local tritonserver (nvidia-pytriton wheel) with its libraries and backends, for tools that
# launch tritonserver themselves (Model Analyzer's local mode). Runs in the caller's working
# directory; every argument goes to tritonserver (e.g. --model-repository=DIR written by
# `python -m local_server.repository --out DIR`). Binds 127.0.0.1 unless told otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec "$ROOT/.venv/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1])
from local_server.triton import exec_tritonserver
exec_tritonserver(sys.argv[2:])' "$ROOT" "$@"
