"""What a benchmark run is made of: the run modes (--smoke, --quick, full), the progress printer
and `State`, the one object the orchestration (benchmarks/bench.py) fills while it measures
(the report, benchmarks/report.py, reads the CSVs written from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import cpu
from benchmarks.analysis import Progress
from benchmarks.flops import FlopModel
from client.split_contract import SplitContract
from export.config import DEFAULT_CONFIG, ModelConfig
from export.reference_features import reference_contract

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
MODELS = ("ranker", "ranker_naive", "ranker_base")  # the order of every point


@dataclass(frozen=True)
class Mode:
    """Everything that differs between --smoke, --quick and the full run."""

    name: str
    ns: tuple[int, ...]
    lengths: tuple[int, ...]
    requests_per_point: int
    window_s: float  # target length of a perf_analyzer window (sets --measurement-request-count)
    k_min: int  # smallest --measurement-request-count
    stability: float  # -s (%)
    max_trials: int  # -r
    naive_limit_s: float  # skip naive where one request would take longer (at the concurrency)
    direct_budget_s: float  # in-process timing budget per model and point
    sweep_point: tuple[int, int] | None  # (N, L) of the concurrency sweep
    sweep_concurrency: tuple[int, ...]
    memory_points: tuple[tuple[str, int, int], ...]  # (model, N, L), each in a fresh process
    # Measure again (once) when other processes used more than CONTENDED_CORES meanwhile and the
    # run took under RETRY_MAX_S; the attempt with the least outside CPU use is kept.
    retry_contended: bool = False


FULL = Mode(
    name="full", ns=(1, 5, 10, 50, 100, 1000), lengths=(256, 1000), requests_per_point=8,
    window_s=2.0, k_min=3, stability=10.0, max_trials=10, naive_limit_s=20.0,
    direct_budget_s=1.5, sweep_point=(50, 1000), sweep_concurrency=(1, 2, 4),
    memory_points=(("user_encoder", 1000, 1000), ("target_fusion", 100, 1000),
                   ("ranker_naive", 100, 1000), ("target_fusion", 1000, 1000),
                   ("ranker_naive", 1000, 1000)),
    retry_contended=True,
)
QUICK = Mode(
    name="quick", ns=(1, 10, 50), lengths=(256, 1000), requests_per_point=4,
    window_s=1.0, k_min=2, stability=15.0, max_trials=5, naive_limit_s=5.0,
    direct_budget_s=0.4, sweep_point=(50, 1000), sweep_concurrency=(1, 2, 4),
    memory_points=(("user_encoder", 1000, 1000), ("target_fusion", 50, 1000),
                   ("ranker_naive", 50, 1000), ("target_fusion", 1000, 1000)),
)
SMOKE = Mode(
    name="smoke", ns=(5,), lengths=(64,), requests_per_point=2,
    window_s=1.0, k_min=3, stability=50.0, max_trials=3, naive_limit_s=20.0,
    direct_budget_s=0.2, sweep_point=None, sweep_concurrency=(),
    memory_points=(("user_encoder", 5, 64), ("target_fusion", 5, 64), ("ranker_naive", 5, 64)),
)
MODES = {m.name: m for m in (FULL, QUICK, SMOKE)}
# Rough Triton overhead per request (us) added to the in-process time to size the windows.
OVERHEAD_US = {"ranker": 1500.0, "ranker_naive": 1000.0, "ranker_base": 1000.0}
# Heavy requests (> 1 s): fewer per window, fewer windows; the count-window floor is 1 s anyway.
HEAVY_S = 1.0
HEAVY_K = 3
HEAVY_MAX_TRIALS = 8
# Skip naive where its attention working set would take more than this share of free memory.
MEMORY_SHARE = 0.5
CONTENDED_CORES = cpu.CONTENDED_CORES
RETRY_MAX_S = 30.0


# --------------------------------------------------------------------------- the run

@dataclass
class State:
    mode: Mode
    cfg: ModelConfig
    flops: FlopModel
    out: Path
    progress: Progress
    repository: Path = MODEL_REPOSITORY
    config_path: Path = DEFAULT_CONFIG
    requests: dict[tuple[int, int], list[dict[str, np.ndarray]]] = field(default_factory=dict)
    input_files: dict[tuple[int, int], Path] = field(default_factory=dict)
    points: list[dict[str, object]] = field(default_factory=list)  # points.csv
    direct: list[dict[str, object]] = field(default_factory=list)  # direct.csv
    breakdown: list[dict[str, object]] = field(default_factory=list)  # ensemble_breakdown.csv
    memory: list[dict[str, object]] = field(default_factory=list)  # memory.csv
    naive_ref: dict[int, tuple[int, float]] = field(default_factory=dict)  # L -> (N, seconds)
    machine: dict[str, str] = field(default_factory=dict)

    @property
    def contract(self) -> SplitContract:
        """The declaration of the benchmarked config: the names every feed is built from."""
        return reference_contract(self.cfg)
