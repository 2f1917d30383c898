"""Long user histories: the split against its peers and the naive oracle, L up to 16k.

One run, side by side on the same weights (a `long` config, max_history 16384):
* in-process ONNX Runtime per graph: user_encoder (L), target_fusion (N, L), the split (their
  sum), M-FALCON single pass, replicated K/V (user_encoder + an N-copies fusion), naive;
* every method's scores checked against the naive oracle where it runs, else against the split;
* peak memory per graph, each in a fresh process (benchmarks/memory.py);
* `ranker` through a real local tritonserver (gRPC, concurrency 1): latency and throughput;
* export time and model file size (no constant grows with max_history^2).
Where a method cannot run (memory or time), the row says why. ranker_naive refuses N x (L+1)^2
above naive_max_work in its graph; the naive time is then measured on one slice of candidates
that fits and scaled by the number of slices (the same total work; labelled so).

    PYTHONPATH=. .venv/bin/python -m benchmarks.long_history --help
    PYTHONPATH=. .venv/bin/python -m benchmarks.long_history --out benchmarks/results/long_history
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.peers import MFALCON, PEERS, REPLICATED_FUSION, export_peer
from benchmarks.state import Progress
from export import reference_features as c
from export.config import CONFIG_DIR, ModelConfig
from export.model import build_model
from export.onnx_export import graphs_for
from export.reference_features import reference_generator
from export.repositories import MODEL_REPOSITORY, onnx_path
from export.runtime import make_session
from export.triton_configs import config_source

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LONG = CONFIG_DIR / "ranker_causal_long.json"
METHODS = ("split", "mfalcon", "replicated", "naive")
FUSION_INPUTS = (*c.CANDIDATE_INPUTS, c.REQUEST_TIMESTAMP, c.USER_PROFILE)


@dataclass
class Run:
    cfg: ModelConfig
    repository: Path
    peers_dir: Path
    out: Path
    progress: Progress
    repeats: int
    budget_bytes: int
    max_seconds: float
    rows: list[dict[str, object]] = field(default_factory=list)
    memory: list[dict[str, object]] = field(default_factory=list)
    triton: list[dict[str, object]] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)


def timed(fn: Callable[[], object], repeats: int, max_seconds: float) -> tuple[float, object]:
    """Median seconds of `repeats` runs after one warm-up; a run slower than max_seconds ends
    the repetitions (its time is kept)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    if first > max_seconds:
        return first, result
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def export_all(cfg_path: Path, repository: Path, peers_dir: Path) -> dict[str, object]:
    """The Triton repository of the long config (python -m export) and the two peers."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "export", "--config", str(cfg_path),
                           "--output", str(repository)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"export failed: {proc.stderr[-2000:]}")
    export_s = time.perf_counter() - start
    cfg = ModelConfig.load(cfg_path)
    model = build_model(cfg)
    for peer in PEERS:
        export_peer(model, peer, peers_dir / peer / "1" / "model.onnx")
    sizes = {g: onnx_path(repository, g).stat().st_size for g in graphs_for(cfg)}
    return {"export_s": round(export_s, 1),
            "model_mib": {g: round(s / 2**20, 1) for g, s in sizes.items()}}


def method_fits(run: Run, method: str, n: int, length: int) -> str:
    """'' when `method` may run at (N, L) within the memory budget, else why not."""
    cfg, kept = run.cfg, min(length, run.cfg.max_history)
    h, d, b = cfg.num_heads, cfg.d_model, 4
    need = {
        "split": 0,
        # dense [H, L+N, L+N] scores, a few live copies (scores, probabilities, mask)
        "mfalcon": 4 * h * (kept + n) ** 2 * b,
        # N copies of K and V per layer, plus the concatenated own key
        "replicated": 3 * n * (kept + 1) * d * 2 * b,
        # one slice of candidates within naive_max_work: [slice, H, L+1, L+1], a few copies
        "naive": 4 * h * min(cfg.naive_max_work, n * (kept + 1) ** 2) * b,
    }[method]
    if method == "naive" and (kept + 1) ** 2 > cfg.naive_max_work:
        return f"one candidate is above naive_max_work={cfg.naive_max_work} (its graph refuses)"
    if need > run.budget_bytes:
        return f"needs ~{need / 2**30:.1f} GiB > budget {run.budget_bytes / 2**30:.1f} GiB"
    return ""


def measure_point(run: Run, sessions: dict, request: dict[str, np.ndarray], n: int,
                  length: int, encoded: tuple[float, list[np.ndarray]]) -> None:
    ue_s, (user_kv, last_ts) = encoded
    fusion = {**{k: request[k] for k in FUSION_INPUTS}, c.USER_KV: user_kv,
              c.LAST_EVENT_TIMESTAMP: last_ts}
    tf_s, split = timed(lambda: sessions["target_fusion"].run(None, fusion)[0], run.repeats,
                        run.max_seconds)
    scores: dict[str, np.ndarray] = {"split": split}
    seconds: dict[str, float] = {"split": ue_s + tf_s}
    notes: dict[str, str] = {m: "" for m in METHODS}
    run.rows.append(_row(length, n, "user_encoder", ue_s, "", ""))
    run.rows.append(_row(length, n, "target_fusion", tf_s, "", ""))
    if not (why := method_fits(run, "mfalcon", n, length)):
        seconds["mfalcon"], scores["mfalcon"] = timed(
            lambda: sessions[MFALCON].run(None, request)[0], run.repeats, run.max_seconds)
    else:
        notes["mfalcon"] = why
    if not (why := method_fits(run, "replicated", n, length)):
        rep_s, scores["replicated"] = timed(
            lambda: sessions[REPLICATED_FUSION].run(None, fusion)[0], run.repeats,
            run.max_seconds)
        seconds["replicated"] = ue_s + rep_s
    else:
        notes["replicated"] = why
    if not (why := method_fits(run, "naive", n, length)):
        tokens = min(length, run.cfg.max_history) + 1
        per_call = max(1, min(n, run.cfg.naive_max_work // tokens**2))
        part = {**request, **{k: request[k][:per_call] for k in c.CANDIDATE_INPUTS}}
        naive_s, naive_part = timed(lambda: sessions["ranker_naive"].run(None, part)[0],
                                    max(1, run.repeats // 2), run.max_seconds / 4)
        slices = math.ceil(n / per_call) if n else 1
        seconds["naive"] = naive_s * slices
        if slices > 1:
            notes["naive"] = f"{slices} slices of {per_call}: one measured, x{slices}"
        scores["naive"] = naive_part  # the oracle for the first per_call candidates
    else:
        notes["naive"] = why
    for method in METHODS:
        if method not in seconds:
            run.rows.append(_row(length, n, method, None, "", notes[method]))
            continue
        ref_name = "naive" if "naive" in scores else "split"
        ref = scores[ref_name]
        got = scores[method][: ref.shape[0]]
        diff = float(np.abs(got - ref).max()) if ref.size else 0.0
        run.rows.append(_row(length, n, method, seconds[method],
                             f"{diff:.2e} vs {ref_name}" if method != ref_name else "oracle",
                             notes[method]))


def _row(length: int, n: int, method: str, seconds: float | None, exact: str,
         note: str) -> dict[str, object]:
    return {"L": length, "N": n, "method": method,
            "p50_ms": None if seconds is None else round(seconds * 1e3, 3),
            "max_diff": exact, "note": note}


def in_process(run: Run, lengths: list[int], ns: list[int], seed: int) -> None:
    sessions = {g: make_session(onnx_path(run.repository, g))
                for g in ("user_encoder", "target_fusion", "ranker_naive")}
    sessions.update({p: make_session(run.peers_dir / p / "1" / "model.onnx") for p in PEERS})
    gen = reference_generator(seed=seed, profile_dim=run.cfg.profile_dim)
    for length in lengths:
        history = gen.request(length, 0).as_inputs()
        encoded = timed(lambda h=history: sessions["user_encoder"].run(
            None, {k: h[k] for k in c.HISTORY_INPUTS}), run.repeats, run.max_seconds)
        for n in ns:
            run.progress(f"in-process L={length} N={n}")
            request = {**history, **{k: v for k, v in gen.request(1, n).as_inputs().items()
                                     if k in FUSION_INPUTS}}
            measure_point(run, sessions, request, n, length, encoded)


def peak_memory(run: Run, points: list[tuple[str, int, int]]) -> None:
    """Each (graph, N, L) once in a fresh process: peak RSS of the run above the RSS before."""
    for graph, n, length in points:
        run.progress(f"memory {graph} N={n} L={length}")
        repository = run.peers_dir if graph in PEERS else run.repository
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", "--model", graph, "--n", str(n),
             "--length", str(length), "--repository", str(repository),
             "--config", str(run.facts["config"])],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            run.memory.append({"graph": graph, "N": n, "L": length, "peak_mib": None,
                               "note": proc.stderr.strip().splitlines()[-1][:200]})
            continue
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        run.memory.append({"graph": graph, "N": n, "L": length,
                           "peak_mib": round(data["peak_delta"] / 2**20, 1),
                           "note": data["method"]})


def through_triton(run: Run, lengths: list[int], ns: list[int], seed: int) -> None:
    from client.api import RankerClient
    from local_server.triton import free_port, start_server

    run.progress("starting the local tritonserver on the long repository")
    server = start_server(grpc_port=free_port(), repository=run.repository, timeout_s=300)
    try:
        gen = reference_generator(seed=seed + 1, profile_dim=run.cfg.profile_dim)
        with RankerClient(server.grpc_url, timeout_s=600) as client:
            for length in lengths:
                for n in ns:
                    req = gen.request(length, n)
                    client.score(req)  # warm-up
                    times = []
                    deadline = time.monotonic() + max(run.max_seconds, 5.0)
                    while len(times) < run.repeats and (not times or time.monotonic() < deadline):
                        times.append(client.score_with_latency(req)[1])
                    p50 = float(np.median(times))
                    run.progress(f"ranker through Triton L={length} N={n}: {p50 * 1e3:.1f} ms")
                    run.triton.append({"L": length, "N": n, "requests": len(times),
                                       "p50_ms": round(p50 * 1e3, 3),
                                       "infer_per_s": round(len(times) / sum(times), 2)})
            # Bad input: a history far longer than max_history is truncated to the newest events.
            long_req = gen.request(100_000, 50)
            newest = long_req.replace(**{
                k: getattr(long_req, k)[-run.cfg.max_history:] for k in c.HISTORY_INPUTS})
            diff = float(np.abs(client.score(long_req) - client.score(newest)).max())
            run.facts["L=100000 vs newest max_history events (ranker)"] = f"max diff {diff:.1e}"
    finally:
        server.stop()


def write(run: Run) -> None:
    from benchmarks.bench import write_csv
    from benchmarks.long_report import report

    run.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("long_history.csv", run.rows), ("long_memory.csv", run.memory),
                       ("long_triton.csv", run.triton)):
        if rows:
            write_csv(run.out / name, rows)
    (run.out / "long_facts.json").write_text(json.dumps(run.facts, indent=2) + "\n")
    (run.out / "long_history.md").write_text(report(run.rows, run.memory, run.triton,
                                                     run.facts, run.out))
    run.progress(f"wrote {run.out}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_history",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_LONG, help="default: %(default)s")
    p.add_argument("--lengths", default="256,1024,2048,4096,8192,16384")
    p.add_argument("--ns", default="1,50,1000")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point")
    p.add_argument("--max-seconds", type=float, default=8.0,
                   help="a run slower than this is not repeated")
    p.add_argument("--budget-gib", type=float, default=6.0,
                   help="skip a method whose estimated working set exceeds this")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton measurements")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peaks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: build/bench/long_<timestamp>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress()
    cfg = ModelConfig.load(args.config)
    stem = args.config.stem
    out = args.out or REPO_ROOT / "build" / "bench" / f"long_{time.strftime('%Y%m%d_%H%M%S')}"
    run = Run(cfg, REPO_ROOT / "build" / "long" / stem, REPO_ROOT / "build" / "long" /
              f"{stem}_peers", out.resolve(), progress, args.repeats,
              int(args.budget_gib * 2**30), args.max_seconds)
    lengths = [int(v) for v in args.lengths.split(",")]
    ns = [int(v) for v in args.ns.split(",")]
    progress(f"exporting {args.config} (and the peers) into {run.repository}")
    run.facts.update(export_all(args.config, run.repository, run.peers_dir))
    run.facts["config"] = config_source(args.config)
    default_sizes = {g: round(onnx_path(MODEL_REPOSITORY, g).stat().st_size / 2**20, 1)
                     for g in ("user_encoder", "target_fusion")
                     if onnx_path(MODEL_REPOSITORY, g).exists()}
    run.facts["default_config_model_mib"] = default_sizes
    from benchmarks.bench import machine_info

    run.facts["machine"] = machine_info("tritonserver 2.51 (nvidia-pytriton 0.7.0)")
    run.facts["gpu"] = "none: no GPU was lent to this run; CUDA EP figures are not measured"
    in_process(run, lengths, ns, args.seed)
    if not args.no_memory:
        points = [("user_encoder", 1, length) for length in lengths]
        points += [("target_fusion", n, length) for length in lengths for n in ns]
        points += [(g, n, length) for length in lengths for n in ns
                   for g, m in ((MFALCON, "mfalcon"), (REPLICATED_FUSION, "replicated"))
                   if not method_fits(run, m, n, length)]
        peak_memory(run, points)
    if not args.no_triton:
        through_triton(run, lengths, ns, args.seed)
    write(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
