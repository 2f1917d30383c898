"""ONNX Runtime thread policy for the two ensemble steps, measured in one process (README,
"Production (NGC container, GPU)"): user_encoder and target_fusion alternate, per-session pools
with spinning (the native backend's default) or without (the local stand-in), at 1 and all
intra-op threads, interleaved so the machine's noise hits every policy alike.

    PYTHONPATH=. .venv/bin/python -m benchmarks.threads --out benchmarks/results/threads.csv
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks import analysis as an
from benchmarks.direct import model_path
from benchmarks.feeds import fusion_feeds, history_feeds
from client.split_contract import SplitContract
from client.traffic import RequestGenerator
from export.config import DEFAULT_CONFIG, ModelConfig
from export.reference_features import reference_contract
from export.runtime import session_options

REPO_ROOT = Path(__file__).resolve().parent.parent


def sessions(repository: Path, threads: int, spinning: bool) -> dict[str, ort.InferenceSession]:
    out = {}
    for name in ("user_encoder", "target_fusion"):
        out[name] = ort.InferenceSession(str(model_path(repository, name)),
                                         session_options(threads, spinning=spinning),
                                         providers=["CPUExecutionProvider"])
    return out


def ranker_once(s: dict[str, ort.InferenceSession], contract: SplitContract,
                request: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    state = s["user_encoder"].run(None, history_feeds(contract, request))
    s["target_fusion"].run(None, fusion_feeds(contract, request, state))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__.split(
        "\n\n")[0] + " Prints p50 latency per policy and point.")
    p.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--points", default="256x50,1000x50,1000x1000",
                   help="LxN points (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=60, help="timed requests per policy and point")
    p.add_argument("--out", type=Path, default=None, help="CSV to write")
    args = p.parse_args(argv)
    if not model_path(args.repository, "user_encoder").exists():
        print(f"no exported models in {args.repository}: run `python -m export` first",
              file=sys.stderr)
        return 2
    contract = reference_contract(ModelConfig.load(args.config))
    cores = os.cpu_count() or 1
    policies = {f"threads={t} spinning={'on' if s else 'off'}": sessions(args.repository, t, s)
                for t in (1, cores) for s in (True, False)}
    gen = RequestGenerator(contract, seed=0)
    rows = []
    for point in args.points.split(","):
        length, n = (int(v) for v in point.split("x"))
        requests = [gen.request(length, n).as_inputs() for _ in range(8)]
        times: dict[str, list[float]] = {name: [] for name in policies}
        for s in policies.values():  # warm-up
            ranker_once(s, contract, requests[0])
        for i in range(args.rounds):  # policies interleaved: the machine's noise hits them all
            for name, s in policies.items():
                times[name].append(ranker_once(s, contract, requests[i % len(requests)]))
        for name, values in times.items():
            p50 = an.percentile_ms(values, 50)
            rows.append({"L": length, "N": n, "policy": name, "p50_ms": round(p50, 3),
                         "p90_ms": round(an.percentile_ms(values, 90), 3)})
            print(f"L={length:<5} N={n:<5} {name:<26} p50 {p50:8.2f} ms", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        an.write_csv(args.out, rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
