"""The benchmark's run modes (--smoke, --quick, full): everything that differs between them, read
by the measuring side (benchmarks/bench.py) and by the report (benchmarks/report.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = ("ranker", "ranker_naive", "ranker_base")  # the order of every point


@dataclass(frozen=True)
class Mode:
    name: str
    ns: tuple[int, ...]
    lengths: tuple[int, ...]
    requests_per_point: int
    window_s: float  # target length of a perf_analyzer window (sets --measurement-request-count)
    k_min: int  # smallest --measurement-request-count
    stability: float  # -s (%)
    max_trials: int  # -r
    naive_limit_s: float  # skip naive where one request would take longer (x concurrency)
    direct_budget_s: float  # in-process timing budget per graph and point
    sweep_point: tuple[int, int] | None  # (N, L) of the concurrency sweep
    sweep_concurrency: tuple[int, ...]
    memory_points: tuple[tuple[str, int, int], ...]  # (graph, N, L), each in a fresh process


FULL = Mode(
    name="full", ns=(1, 5, 10, 50, 100, 1000), lengths=(256, 1000), requests_per_point=8,
    window_s=2.0, k_min=3, stability=10.0, max_trials=10, naive_limit_s=20.0,
    direct_budget_s=1.5, sweep_point=(50, 1000), sweep_concurrency=(1, 2, 4),
    memory_points=(("user_encoder", 1000, 1000), ("target_fusion", 100, 1000),
                   ("ranker_naive", 100, 1000), ("target_fusion", 1000, 1000),
                   ("ranker_naive", 1000, 1000)))
QUICK = Mode(
    name="quick", ns=(1, 10, 50), lengths=(256, 1000), requests_per_point=4, window_s=1.0,
    k_min=2, stability=15.0, max_trials=5, naive_limit_s=5.0, direct_budget_s=0.4,
    sweep_point=(50, 1000), sweep_concurrency=(1, 2, 4),
    memory_points=(("user_encoder", 1000, 1000), ("target_fusion", 50, 1000),
                   ("ranker_naive", 50, 1000), ("target_fusion", 1000, 1000)))
SMOKE = Mode(
    name="smoke", ns=(5,), lengths=(64,), requests_per_point=2, window_s=1.0, k_min=3,
    stability=50.0, max_trials=3, naive_limit_s=20.0, direct_budget_s=0.2, sweep_point=None,
    sweep_concurrency=(), memory_points=(("user_encoder", 5, 64), ("target_fusion", 5, 64),
                                         ("ranker_naive", 5, 64)))
MODES = {m.name: m for m in (FULL, QUICK, SMOKE)}
