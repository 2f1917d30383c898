"""Peak memory of one ONNX model run at one (N, L), in a fresh process (one JSON line out).

The peak is the kernel's high-water mark (VmHWM) reset right before the run: getrusage's
ru_maxrss keeps the model-loading peak and, after vfork + exec, the parent's (benchmarks/README.md,
Method); it is reported too, and is the flagged fallback where clear_refs is not writable."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.feeds import fusion_feeds, history_feeds, stand_in_state
from client.split_contract import SplitContract
from client.traffic import RequestGenerator
from export.config import ModelConfig
from export.reference_features import reference_contract
from export.repositories import onnx_path
from export.runtime import make_session

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = ("user_encoder", "target_fusion", "ranker_naive", "ranker_base",
          "mfalcon", "replicated_fusion")  # the last two: benchmarks/peers.py


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def peak_rss_bytes() -> int | None:
    """VmHWM of this process from /proc/self/status (None where unavailable). Read by hand:
    psutil (7.2) gives the current RSS but not the kernel's peak-RSS mark."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0; psutil has no
    equivalent)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def feeds(model: str, n: int, length: int, contract: SplitContract,
          seed: int) -> dict[str, np.ndarray]:
    inputs = RequestGenerator(contract, seed=seed).request(length, n).as_inputs()
    if model == "user_encoder":
        return history_feeds(contract, inputs)
    if model in ("target_fusion", "replicated_fusion"):
        # a stand-in state: running user_encoder here would count its session in the peak
        state = stand_in_state(contract, length, np.random.default_rng(seed))
        return fusion_feeds(contract, inputs, state)
    return inputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory",
                                description="Peak RSS of one ONNX model run (fresh process).")
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, default=None,
                   help="model config the ONNX files were exported from (default: the default)")
    args = p.parse_args(argv)
    contract = reference_contract(ModelConfig.load(args.config))
    session = make_session(onnx_path(args.repository, args.model))
    inputs = feeds(args.model, args.n, args.length, contract, args.seed)
    before = maxrss_bytes()
    hwm_ok = reset_peak()
    rss_before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    session.run(None, inputs)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    after = maxrss_bytes()
    if hwm_ok and peak is not None:
        method, delta = "VmHWM reset", peak - rss_before
    else:  # masked by the load peak (and the parent's) where the run's peak is smaller
        method, delta = "ru_maxrss (may be masked)", after - before
    print(json.dumps({"model": args.model, "n": args.n, "length": args.length,
                      "rss_before": rss_before, "peak_rss": peak, "peak_delta": delta,
                      "method": method, "maxrss_before": before, "maxrss_after": after,
                      "run_s": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
