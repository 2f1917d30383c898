"""The benchmark harness beside its committed results (results/): perf_analyzer through a real
tritonserver, in-process ONNX Runtime timings, peak memory, the FLOP bound, the load test and the
report writer. Entry points: scripts/bench.sh, scripts/load_test.sh."""
