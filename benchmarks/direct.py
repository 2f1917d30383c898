"""In-process ONNX Runtime timings of the served ONNX files (the same sessions options as the
Triton python backend: export.runtime.make_session), to tell model time from Triton overhead."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.feeds import fusion_feeds, history_feeds
from client.split_contract import SplitContract
from export.repositories import onnx_path
from export.runtime import make_session

MODELS = ("user_encoder", "target_fusion", "ranker_naive", "ranker_base")


def model_path(repository: Path, name: str) -> Path:
    """The ONNX file of `name`: the oracle and baseline live in the evaluation repository beside
    the serving `repository` (export/repositories.py)."""
    return onnx_path(repository, name)


class Sessions:
    """One ORT session per served ONNX model, fed by the names of the model's declaration."""

    def __init__(self, repository: Path, contract: SplitContract) -> None:
        self.repository = repository
        self.contract = contract
        self.sessions = {name: make_session(model_path(repository, name)) for name in MODELS}

    def encode(self, request: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions["user_encoder"].run(None, history_feeds(self.contract, request))

    def fusion_inputs(self, request: Mapping[str, np.ndarray],
                      encoded: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return fusion_feeds(self.contract, request, encoded)

    def fuse(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.sessions["target_fusion"].run(None, dict(inputs))[0]

    def naive(self, request: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.sessions["ranker_naive"].run(None, dict(request))[0]

    def base(self, request: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.sessions["ranker_base"].run(None, dict(request))[0]

    def split(self, request: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.fuse(self.fusion_inputs(request, self.encode(request)))


@dataclass
class Timing:
    """Latencies (us) of one model at one point, over round-robin requests."""

    model: str
    samples_us: list[float]

    @property
    def reps(self) -> int:
        return len(self.samples_us)

    def pct(self, q: float) -> float:
        return float(np.percentile(self.samples_us, q))

    @property
    def p50_us(self) -> float:
        return self.pct(50)

    @property
    def p90_us(self) -> float:
        return self.pct(90)


def reps_for(est_s: float, budget_s: float, min_reps: int, max_reps: int) -> int:
    if est_s <= 0:
        return max_reps
    return int(max(min_reps, min(max_reps, budget_s // est_s)))


def time_split(s: Sessions, requests: Sequence[Mapping[str, np.ndarray]], budget_s: float,
               min_reps: int, max_reps: int) -> dict[str, Timing]:
    """user_encoder then target_fusion, per request: the encoder, the fusion and their sum
    (the model time of one ensemble request). One untimed warm-up per request."""
    for r in requests:
        s.split(r)
    t0 = time.perf_counter()
    s.split(requests[0])
    reps = reps_for(time.perf_counter() - t0, budget_s, min_reps, max_reps)
    enc, fus, tot = [], [], []
    for i in range(reps):
        r = requests[i % len(requests)]
        t_a = time.perf_counter()
        encoded = s.encode(r)
        t_b = time.perf_counter()
        inputs = s.fusion_inputs(r, encoded)
        t_c = time.perf_counter()
        s.fuse(inputs)
        t_d = time.perf_counter()
        enc.append((t_b - t_a) * 1e6)
        fus.append((t_d - t_c) * 1e6)
        tot.append((t_d - t_a) * 1e6)
    return {"user_encoder": Timing("user_encoder", enc),
            "target_fusion": Timing("target_fusion", fus),
            "split": Timing("split", tot)}


def time_single(name: str, fn: Callable[[Mapping[str, np.ndarray]], object],
                requests: Sequence[Mapping[str, np.ndarray]], est_s: float, budget_s: float,
                min_reps: int, max_reps: int) -> tuple[Timing, object]:
    """One model, round-robin over the requests, after a warm-up: one untimed run per request
    where requests are cheap, a single one where they are heavy (it still grows ORT's arena to
    the point's size: without it the first timed run pays gigabytes of page faults).
    Returns the timing and the output of the first timed run (requests[0])."""
    warm = 1 if est_s >= 1.0 else max(1, min(len(requests), int(budget_s / max(est_s, 1e-4))))
    for r in requests[:warm]:
        fn(r)
    reps = reps_for(est_s, budget_s, min_reps, max_reps)
    samples, first = [], None
    for i in range(reps):
        t0 = time.perf_counter()
        result = fn(requests[i % len(requests)])
        samples.append((time.perf_counter() - t0) * 1e6)
        if i == 0:
            first = result
    return Timing(name, samples), first
