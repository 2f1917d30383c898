#!/usr/bin/env bash
# Start K local tritonservers behind nginx (consistent hashing on the user id); see --help.
set -euo pipefail
cd "$(dirname "$0")/.."
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/python -m local_server.fleet "$@"
