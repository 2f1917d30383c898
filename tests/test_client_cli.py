"""The command line and the client's behaviour without a server (a closed local port)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.api import RankerClient, RankerError
from export.reference_features import reference_generator

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "client", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=60,
    )


def closed_port() -> str:
    """host:port where nothing listens (bound then released): connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("command", [[], ["score"], ["validate"], ["health"], ["returning-user"],
                                     ["cache-stats"]])
def test_help_exits_zero(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--url" in result.stdout


def test_unreachable_server_is_a_one_line_error_with_exit_2() -> None:
    result = run_cli("health", "--url", closed_port(), "--timeout", "5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "UNAVAILABLE" in lines[0] and "Traceback" not in result.stderr


def test_conflicting_options_are_a_usage_error() -> None:
    result = run_cli("score", "--request", "x.json", "--seed", "3")
    assert result.returncode == 2
    assert "--request cannot be combined" in result.stderr


def test_no_torch_in_the_client() -> None:
    code = ("import sys, client.api, client.request, client.traffic, client.validation, "
            "client.__main__; sys.exit('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          timeout=60).returncode == 0


def test_score_retries_unavailable_then_raises_ranker_error() -> None:
    req = reference_generator(seed=0, profile_dim=16).request(3, 2)
    with RankerClient(closed_port(), retries=2, backoff_s=0.05, validate=False) as client:
        start = time.monotonic()
        with pytest.raises(RankerError) as info:
            client.score(req)
        elapsed = time.monotonic() - start
    assert info.value.code == "UNAVAILABLE"
    assert info.value.status == "StatusCode.UNAVAILABLE"
    assert info.value.server_message
    assert "after 3 attempts" in str(info.value)
    assert elapsed >= 0.05 + 0.1  # two backoff sleeps


def test_backoff_is_capped() -> None:
    """Uncapped, 5 retries from 0.1 s would sleep 3.1 s; capped at 0.15 s they sleep 0.55 s."""
    req = reference_generator(seed=0, profile_dim=16).request(3, 2)
    with RankerClient(closed_port(), retries=5, backoff_s=0.1, max_backoff_s=0.15,
                      validate=False) as client:
        start = time.monotonic()
        with pytest.raises(RankerError, match="after 6 attempts"):
            client.score(req)
        elapsed = time.monotonic() - start
    assert 0.55 <= elapsed < 2.5


def test_wait_ready_times_out_with_a_clear_message() -> None:
    with RankerClient(closed_port()) as client:
        start = time.monotonic()
        with pytest.raises(RankerError, match=r"not ready after 0\.3 s.*ranker"):
            client.wait_ready(["ranker"], timeout_s=0.3)
        assert time.monotonic() - start < 5


def test_closed_client_refuses_calls() -> None:
    client = RankerClient(closed_port())
    client.close()
    client.close()
    with pytest.raises(RankerError, match="closed"):
        client.is_live()


# A metrics page as Triton serves it: HELP/TYPE lines, Triton's own families, the cache's custom
# ones for two models (only `user_cache` is summed, over both versions), an escaped label value.
_METRICS_PAGE = """\
# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="user_cache",version="1"} 99
# HELP user_cache_requests_total Requests by path
# TYPE user_cache_requests_total counter
user_cache_requests_total{model="user_cache",path="hit",version="1"} 7
user_cache_requests_total{model="user_cache",path="hit",version="2"} 1
user_cache_requests_total{model="user_cache",path="append",version="1"} 3
user_cache_requests_total{model="user_cache",path="miss",version="1"} 2
user_cache_requests_total{model="other \\"cache\\"",path="miss",version="1"} 50
# HELP user_cache_evictions_total Users evicted
# TYPE user_cache_evictions_total counter
user_cache_evictions_total{model="user_cache",version="1"} 4
# TYPE user_cache_bytes gauge
user_cache_bytes{model="user_cache",version="1"} 1.048576e+06
# TYPE user_cache_users gauge
user_cache_users{model="user_cache",version="1"} 5
# TYPE user_cache_capacity_bytes gauge
user_cache_capacity_bytes{model="user_cache",version="1"} 4194304
"""


def test_cache_stats_from_a_metrics_page() -> None:
    from client.metrics import CacheStats, MetricsError, cache_stats

    stats = cache_stats(_METRICS_PAGE)
    assert stats == CacheStats(hits=8, appends=3, misses=2, evictions=4, bytes_held=1048576,
                               users=5, capacity_bytes=4194304)
    assert stats.reuse_rate == 11 / 13
    assert cache_stats(_METRICS_PAGE, model='other "cache"').misses == 50
    with pytest.raises(MetricsError, match="no user_cache metrics"):
        cache_stats(_METRICS_PAGE, model="absent")
    with pytest.raises(MetricsError, match="not a Prometheus text page"):
        cache_stats("user_cache_users{model=\"user_cache\" 5\n")
