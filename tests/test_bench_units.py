"""The benchmark's FLOP model and perf_analyzer output parsing (no server)."""

from __future__ import annotations

import pytest

from benchmarks import perf_analyzer as pa
from benchmarks.flops import (
    FlopModel,
    seeds_model_speedup,
    seeds_scaled_drop,
    sequence_cost_ratio,
)
from export.config import ModelConfig

CFG = ModelConfig.load()


def test_projection_flops_are_24_d_squared_when_d_ff_is_4d() -> None:
    fm = FlopModel.from_config(CFG)
    assert fm.d_ff == 4 * fm.d
    assert fm.token_projections() == 24 * fm.d**2
    assert fm.encode(10) == 10 * 24 * fm.d**2 + 4 * 100 * fm.d


def test_bound_matches_the_cost_model() -> None:
    fm = FlopModel.from_config(CFG)
    # one candidate vs one full encode: roughly 1/(L+1) of it, so bound(N) ~ N (L+1) / (N + L)
    for length in (256, 1000):
        for n in (5, 50):
            approx = n * (length + 1) / (n + length)
            assert 0.8 * approx < fm.bound(n, length) < 2.5 * approx
    assert fm.bound(50, 1000) == pytest.approx(fm.naive(50, 1000) / fm.split(50, 1000))
    assert fm.bound(1000, 1000) > fm.bound(50, 1000) > fm.bound(1, 1000) > 1


def test_user_kv_bytes() -> None:
    fm = FlopModel.from_config(CFG)
    assert fm.user_kv_bytes(1000) == CFG.num_layers * 2 * CFG.num_heads * 1000 * CFG.head_dim * 4
    assert fm.naive_kv_bytes(10, 99) == 10 * fm.user_kv_bytes(100)


def test_seeds_formulas() -> None:
    assert seeds_model_speedup(50) == pytest.approx(50 / (0.85 + 0.15 * 50))
    assert seeds_model_speedup(1) == pytest.approx(1.0)
    # LONGER's 40 % -> 6.8 % is a sequence module ~9x cheaper
    assert seeds_scaled_drop(0.1095) == pytest.approx(0.068, abs=1e-3)
    assert seeds_scaled_drop(1.0) == pytest.approx(0.40)
    # costs 1/thr: base 1 ms, naive 11 ms, shared 2 ms -> r = 1/10
    assert sequence_cost_ratio(1 / 2e-3, 1 / 11e-3, 1 / 1e-3) == pytest.approx(0.1)


STDOUT = """
Request concurrency: 1
  Pass [1] throughput: 236.777 infer/sec. p50 latency: 3945 usec
  Pass [2] throughput: 232.26 infer/sec. p50 latency: 4202 usec
  Pass [3] throughput: 225.534 infer/sec. p50 latency: 4366 usec
  Client:
    Request count: 691
    Throughput: 229.716 infer/sec
    p50 latency: 4277 usec
    Avg gRPC time: 4319 usec (marshal 4 usec + response wait 4313 usec + unmarshal 2 usec)
  Server:
    Inference count: 691
    Avg request latency: 4087 usec (overhead 0 usec + queue 85 usec + compute 4121 usec)

  Composing models:
  target_fusion, version: 1
      Inference count: 691
      Avg request latency: 1164 usec (overhead 2 usec + queue 48 usec + compute input 50 usec + compute infer 864 usec + compute output 199 usec)

  user_encoder, version: 1
      Inference count: 690
      Avg request latency: 3047 usec (overhead 3 usec + queue 37 usec + compute input 20 usec + compute infer 2769 usec + compute output 217 usec)

Inferences/Second vs. Client p50 Batch Latency
"""  # noqa: E501


def test_parse_passes_and_composing() -> None:
    assert pa.parse_passes(STDOUT)[-1] == (225.534, 4366.0)
    comp = pa.parse_composing(STDOUT)
    assert set(comp) == {"target_fusion", "user_encoder"}
    assert comp["user_encoder"]["compute_infer"] == 2769
    assert comp["target_fusion"]["compute_output"] == 199
    assert comp["target_fusion"]["inference_count"] == 691
    server = pa.parse_server_total(STDOUT)
    assert server["avg_request_latency"] == 4087 and server["queue"] == 85
