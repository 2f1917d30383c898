"""Shared fixtures: small model configs, exported ONNX models, random requests; a time-bounded
reader of a child process's output."""

from __future__ import annotations

import queue
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from export import reference_features as c
from export.config import ModelConfig
from export.model import RankingTransformer, build_model
from export.onnx_export import export_graph, graphs_for
from export.runtime import make_session, run_in_chunks


class Output:
    """A child's stdout read in a thread, so that every read in a test has a time bound: a hung
    server fails its test with the output so far instead of blocking on a pipe."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.seen = proc, []
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")  # end of output

    def readline(self, timeout_s: float) -> str:
        """The next line ("" at the end of the output); fails after `timeout_s` without one."""
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(f"no output line within {timeout_s:g} s; so far:\n{''.join(self.seen)}")
        self.seen.append(line)
        return line

    def rest(self, timeout_s: float) -> str:
        """Wait (at most `timeout_s`) for the process to exit; the output not yet read."""
        self.proc.wait(timeout=timeout_s)
        self._thread.join(timeout=10)
        lines = []
        while not self._lines.empty():
            lines.append(self._lines.get_nowait())
        return "".join(lines)


INT64_MIN, INT64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max

# Small enough for a 2-core CI machine, large enough for L in {256, max_history, beyond}.
SMALL = dict(
    d_model=32, num_heads=4, num_layers=2, d_ff=64, max_history=300, num_tasks=2,
    task_names=("click", "like"), profile_dim=5, item_buckets=1009, action_buckets=7,
    category_buckets=101, gap_buckets=12, head_hidden=16, seed=3,
)


def small_config(mask: str, **overrides: object) -> ModelConfig:
    return ModelConfig(**{**SMALL, "mask": mask, **overrides})


def random_request(
    rng: np.random.Generator, cfg: ModelConfig, length: int, n: int
) -> dict[str, np.ndarray]:
    """Contract tensors with ids over the whole int64 range (extremes included)."""
    def ids(size: int) -> np.ndarray:
        out = rng.integers(INT64_MIN, INT64_MAX, size, dtype=np.int64, endpoint=True)
        if size >= 2:
            out[:2] = (INT64_MIN, INT64_MAX)
        return out

    gaps = rng.choice([0, 1, 5, 70, 3_600, 90_000, 2_000_000], size=length)
    timestamps = 1_600_000_000 + np.cumsum(gaps).astype(np.int64)
    last = int(timestamps[-1]) if length else 1_600_000_000
    return {
        c.HISTORY_ITEM_IDS: ids(length),
        c.HISTORY_ACTION_IDS: rng.integers(-3, 10, length).astype(np.int64),
        c.HISTORY_TIMESTAMPS: timestamps,
        c.CANDIDATE_ITEM_IDS: ids(n),
        c.CANDIDATE_CATEGORY_IDS: rng.integers(-10**15, 10**15, n).astype(np.int64),
        c.REQUEST_TIMESTAMP: np.array([last + int(rng.integers(0, 10_000))], dtype=np.int64),
        c.USER_PROFILE: rng.standard_normal(cfg.profile_dim).astype(np.float32),
    }


def as_torch(request: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(request[s.name]) for s in c.request_inputs(1)]


def in_chunks(fn: Callable[[dict], np.ndarray], request: dict, chunk: int = 100) -> np.ndarray:
    """Run a naive scorer over candidate chunks (export.runtime.run_in_chunks): only bounds the
    test's memory (N x (L+1)^2 attention scores)."""
    return run_in_chunks(lambda part: [fn(part)], request, chunk)[0]


class OnnxModels:
    """The exported graphs of one model, run with the project's ONNX Runtime settings."""

    def __init__(self, directory: Path, graphs: list[str]) -> None:
        self.sessions = {g: make_session(directory / g / "model.onnx") for g in graphs}

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self.sessions[graph]
        names = [i.name for i in session.get_inputs()]
        return session.run(None, {n: feeds[n] for n in names})

    def split(self, request: dict[str, np.ndarray]) -> np.ndarray:
        user_kv, last_ts = self.run("user_encoder", request)
        feeds = {**request, c.USER_KV: user_kv, c.LAST_EVENT_TIMESTAMP: last_ts}
        return self.run("target_fusion", feeds)[0]

    def naive(self, request: dict[str, np.ndarray]) -> np.ndarray:
        return self.run("ranker_naive", request)[0]


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple]:
    """mask -> (torch model, OnnxModels), exported once per session."""
    cache: dict[str, tuple[RankingTransformer, OnnxModels]] = {}

    def get(mask: str) -> tuple[RankingTransformer, OnnxModels]:
        if mask not in cache:
            model = build_model(small_config(mask))
            directory = tmp_path_factory.mktemp(f"onnx_{mask}")
            graphs = graphs_for(model.cfg)
            for graph in graphs:
                export_graph(model, graph, directory / graph / "model.onnx")
            cache[mask] = (model, OnnxModels(directory, graphs))
        return cache[mask]

    return get


@pytest.fixture(scope="session")
def small_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A serving repository exported from the small causal config (all graphs + configs), with
    ranker_naive and ranker_base in its evaluation repository beside it, as `python -m export`
    writes them."""
    from export.repositories import onnx_path
    from export.triton_configs import write_configs

    cfg = small_config("causal")
    model = build_model(cfg)
    repo = tmp_path_factory.mktemp("model_repository")
    for graph in graphs_for(cfg):
        export_graph(model, graph, onnx_path(repo, graph))
    write_configs(cfg, repo, "tests/conftest.py SMALL")
    return repo


@pytest.fixture(scope="session")
def server(small_repository: Path):
    """A real tritonserver on free localhost ports serving `small_repository`; stopped by PID.
    Fails (never skips) when it cannot start."""
    from local_server.triton import free_port, start_server

    srv = start_server(grpc_port=free_port(), repository=small_repository, timeout_s=240)
    try:
        yield srv
    finally:
        srv.stop()


# user_cache's LRU bound for the cache tests: about 13 users at the small model's full history
# (300 events x 512 B of user_kv + 24 B of events each), so a few dozen users evict.
SMALL_CACHE_BYTES = 2 << 20


@pytest.fixture(scope="session")
def cache_repository(small_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`small_repository` with user_cache bounded at SMALL_CACHE_BYTES."""
    from export.repositories import copy_repositories
    from export.triton_configs import write_configs

    repo = copy_repositories(small_repository, tmp_path_factory.mktemp("cache_repository"))
    write_configs(small_config("causal"), repo, "tests/conftest.py SMALL",
                  user_cache_bytes=SMALL_CACHE_BYTES)
    return repo


@pytest.fixture(scope="session")
def cache_server(cache_repository: Path):
    """A real tritonserver serving `cache_repository`, with the metrics endpoint on (the cache's
    counters are custom metrics); stopped by PID. Fails (never skips) when it cannot start."""
    from local_server.triton import free_port, start_server

    srv = start_server(grpc_port=free_port(), metrics_port=free_port(),
                       repository=cache_repository, timeout_s=240)
    try:
        yield srv
    finally:
        srv.stop()
