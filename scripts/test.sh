#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, lint, config check, the whole pytest suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k exactness.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  echo "usage: scripts/test.sh [PYTEST ARGS]   # setup, ruff, config check, pytest (real tritonserver)"
  exit 0
fi
bash scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "test: ruff"
.venv/bin/ruff check .
echo "test: committed Triton configs == generator"
.venv/bin/python -m export.triton_configs --check
echo "test: committed Kubernetes manifests == generator"
.venv/bin/python -m deploy.manifests --check
echo "test: pytest"
exec .venv/bin/python -m pytest "$@"
