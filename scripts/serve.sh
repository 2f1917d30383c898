#!/usr/bin/env bash
# Start the local tritonserver (no Docker, CPU) on model_repository/ + evaluation_repository/; see --help.
set -euo pipefail
cd "$(dirname "$0")/.."
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/python -m local_server.serve "$@"
