"""Peak memory of one ONNX model run at one (N, L), meant for a fresh process (benchmarks/bench.py
spawns one per graph). The peak is the kernel's high-water mark (VmHWM), reset right before the
run: getrusage's ru_maxrss keeps the model-loading peak and, after fork + exec, the parent's; it
is reported too, and is the flagged fallback where clear_refs is not writable. Both are read
from /proc by hand: psutil has neither the peak nor its reset."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.feeds import fusion_feeds, history_feeds, stand_in_state
from client.traffic import RequestGenerator
from export.config import ModelConfig
from export.reference_features import reference_contract
from export.repositories import onnx_path
from export.runtime import make_session


def peak_rss_bytes() -> int | None:
    """VmHWM of this process (None where /proc/self/status lacks it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def probe(model: str, n: int, length: int, repository: Path, config: Path) -> dict[str, object]:
    """memory.csv's measured columns for one run of `model` in this process."""
    contract = reference_contract(ModelConfig.load(config))
    session = make_session(onnx_path(repository, model))
    inputs = RequestGenerator(contract, seed=0).request(length, n).as_inputs()
    if model == "user_encoder":
        inputs = history_feeds(contract, inputs)
    elif model == "target_fusion":  # a stand-in state: user_encoder's session would count
        inputs = fusion_feeds(contract, inputs,
                              stand_in_state(contract, length, np.random.default_rng(0)))
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    reset = reset_peak()
    rss_before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    session.run(None, inputs)
    run_s = time.perf_counter() - t0
    peak = peak_rss_bytes()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if reset and peak is not None:
        method, delta = "VmHWM reset", peak - rss_before
    else:  # masked by the load peak (and the parent's) where the run's peak is smaller
        method, delta = "ru_maxrss (may be masked)", maxrss_after - maxrss_before
    return {"peak_delta_bytes": delta, "method": method, "rss_before_bytes": rss_before,
            "peak_rss_bytes": peak, "ru_maxrss_before_bytes": maxrss_before,
            "ru_maxrss_after_bytes": maxrss_after, "run_s": round(run_s, 3)}
