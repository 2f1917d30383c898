#!/usr/bin/env bash
# The main job (README): set-up, export the ONNX models, start the local Triton server, score a
# sample request, validate the ensemble against ranker_naive over random requests, show one
# returning user through ranker_cached (the user K/V cache), stop.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=8001
METRICS_PORT=8002
COUNT=50
CONFIG=export/configs/ranker_causal.json
usage() {
  cat <<USAGE
usage: scripts/main.sh [--grpc-port P] [--metrics-port P] [--count K] [--config FILE]
  export (model_repository/ + evaluation_repository/) -> start tritonserver on both
  (127.0.0.1:P, default $PORT; metrics on $METRICS_PORT) ->
  score one request -> validate K (default $COUNT) random requests + edge cases, ranker vs
  ranker_naive -> one returning user through ranker_cached (first visit, append, repeat: path
  and latency, checked against ranker_naive) and the cache's counters -> stop.
USAGE
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --grpc-port) PORT="$2"; shift 2 ;;
    --metrics-port) METRICS_PORT="$2"; shift 2 ;;
    --count) COUNT="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "main: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=.venv/bin/python
MAX_HISTORY=$($PY -c "from export.config import ModelConfig; print(ModelConfig.load('$CONFIG').max_history)")

echo "== 1/5 export ($CONFIG)"
$PY -m export --config "$CONFIG"

echo "== 2/5 start tritonserver on 127.0.0.1:$PORT"
mkdir -p build/logs
scripts/serve.sh --grpc-port "$PORT" --metrics-port "$METRICS_PORT" > build/logs/main_serve.log 2>&1 &
SERVE_PID=$!
stop_server() {
  if kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -TERM "$SERVE_PID"; wait "$SERVE_PID" || true
    echo "== server stopped"
  fi
}
trap stop_server EXIT
for _ in $(seq 1 600); do
  grep -q "serve: ready" build/logs/main_serve.log 2>/dev/null && break
  if ! kill -0 "$SERVE_PID" 2>/dev/null; then cat build/logs/main_serve.log >&2; exit 1; fi
  sleep 0.5
done
grep "serve: " build/logs/main_serve.log
grep -q "serve: ready" build/logs/main_serve.log || { echo "main: server not ready" >&2; exit 1; }

echo "== 3/5 score one generated request (L=300, N=20) through the ensemble"
$PY -m client --url "127.0.0.1:$PORT" score --history-length 300 --num-candidates 20 --top 5

echo "== 4/5 validate: $COUNT random requests + edge cases, ranker vs ranker_naive"
$PY -m client --url "127.0.0.1:$PORT" --timeout 120 validate --count "$COUNT" --max-history "$MAX_HISTORY"

echo "== 5/5 one returning user through ranker_cached (user K/V cache), checked against ranker_naive"
$PY -m client --url "127.0.0.1:$PORT" --timeout 120 returning-user --history-length 500 \
  --new-events 10 --num-candidates 20
$PY -m client cache-stats --metrics-url "127.0.0.1:$METRICS_PORT"
