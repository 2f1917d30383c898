"""perf_analyzer benchmark: `ranker` (shared user K/V) vs `ranker_naive` and `ranker_base` across
N and L through a local tritonserver, the same ONNX files timed in process (model time without
Triton) and the FLOP bound (scripts/bench.sh; the method: benchmarks/README.md). Writes the run's
CSVs and run.json; benchmarks/report.py turns them into the report."""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks import analysis as an
from benchmarks import cpu, memory, report
from benchmarks import perf_analyzer as pa
from benchmarks.feeds import fusion_feeds, history_feeds
from benchmarks.flops import FlopModel
from benchmarks.state import FULL, MODELS, QUICK, REPO_ROOT, SMOKE, Mode
from client.traffic import RequestGenerator
from export.config import DEFAULT_CONFIG, ModelConfig
from export.reference_features import reference_contract
from export.repositories import MODEL_REPOSITORY, onnx_path
from export.runtime import make_session

GRAPHS = ("user_encoder", "target_fusion", "ranker_naive", "ranker_base")
OVERHEAD_US = {"ranker": 1500.0, "ranker_naive": 1000.0, "ranker_base": 1000.0}  # rough, for K
HEAVY_S = 1.0  # heavier requests: one warm-up, 2 timed runs at least, K >= 3 and <= 8 windows
MEMORY_SHARE = 0.5  # naive is skipped where its attention working set exceeds this share
Row = dict[str, Any]
Request = dict[str, np.ndarray]


@dataclass
class Bench:
    """One run: its settings, the in-process sessions, the rows of its CSVs (report.CSVS)."""

    mode: Mode
    cfg: ModelConfig
    repository: Path
    config: Path
    out: Path
    log: an.Progress = field(default_factory=an.Progress)
    sessions: dict[str, Any] = field(default_factory=dict)
    inputs: dict[tuple[int, int], tuple[list[Request], Path]] = field(default_factory=dict)
    naive_s: dict[tuple[int, int], float] = field(default_factory=dict)  # (N, L) -> seconds
    rows: dict[str, list[Row]] = field(default_factory=lambda: {n: [] for n in report.CSVS})

    def __post_init__(self) -> None:
        self.flops = FlopModel.from_config(self.cfg)
        self.contract = reference_contract(self.cfg)

    def run_graph(self, graph: str, request: Request) -> tuple[list[float], np.ndarray]:
        """Seconds (the split: user_encoder, target_fusion, both) and scores of one request."""
        t0 = time.perf_counter()
        if graph != "split":
            scores = self.sessions[graph].run(None, request)[0]
            return [time.perf_counter() - t0], scores
        state = self.sessions["user_encoder"].run(None, history_feeds(self.contract, request))
        t1 = time.perf_counter()
        feeds = fusion_feeds(self.contract, request, state)
        scores = self.sessions["target_fusion"].run(None, feeds)[0]
        t2 = time.perf_counter()
        return [t1 - t0, t2 - t1, t2 - t0], scores

    def time_graph(self, graph: str, requests: Sequence[Request],
                   budget_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Seconds [run, part] round-robin after a warm-up, and the first run's scores."""
        est = self.run_graph(graph, requests[0])[0][-1]
        for request in requests[1:] if est <= HEAVY_S else []:  # heavy: that one warm-up only
            est = min(est, self.run_graph(graph, request)[0][-1])
        reps = int(max(2 if est > HEAVY_S else 3, min(500, budget_s // est)))
        runs = [self.run_graph(graph, requests[i % len(requests)]) for i in range(reps)]
        return np.array([seconds for seconds, _ in runs]), runs[0][1]

    def naive_skip(self, n: int, length: int, concurrency: int) -> str:
        """Why ranker_naive is not run at this point, "" where it is."""
        cfg, fm = self.cfg, self.flops
        if n * (min(length, cfg.max_history) + 1) ** 2 > cfg.naive_max_work:
            return (f"skipped: N x (L+1)^2 above naive_max_work={cfg.naive_max_work}, which "
                    "ranker_naive's graph refuses (bench a repository exported with a larger "
                    "naive_max_work to measure the unbounded baseline)")
        known = {k[0]: t for k, t in self.naive_s.items() if k[1] == length}  # latest last
        n_ref = n if n in known else next(reversed(known), n)
        est = known.get(n_ref, 0.0) * fm.naive(n, length) / fm.naive(n_ref, length)
        if est * concurrency > self.mode.naive_limit_s:
            return (f"skipped: est. {est * concurrency:.1f} s per request"
                    + (f" x concurrency {concurrency}" if concurrency > 1 else "")
                    + f" (limit {self.mode.naive_limit_s:g} s)")
        need, free = fm.naive_attention_bytes(n, length), psutil.virtual_memory().available
        if need > MEMORY_SHARE * free:
            return (f"skipped: est. >= {need / 2**30:.1f} GiB attention working set "
                    f"({free / 2**30:.1f} GiB available)")
        return ""

    def run_direct(self, n: int, length: int, naive_skip: str) -> dict[str, float]:
        """In-process timings at one point into direct.csv; p50 (us) per graph."""
        fm, p50, scores = self.flops, {}, {}
        flop = {"user_encoder": fm.user(length), "target_fusion": fm.fusion(n, length),
                "split": fm.split(n, length), "ranker_naive": fm.naive(n, length),
                "ranker_base": fm.base(n)}
        for graph in ("split", "ranker_naive", "ranker_base"):
            if graph == "ranker_naive" and naive_skip:
                self.rows["direct"].append({"model": graph, "n": n, "length": length,
                                            "status": naive_skip})
                continue
            snap = cpu.snapshot()
            seconds, scores[graph] = self.time_graph(graph, self.inputs[(n, length)][0],
                                                     self.mode.direct_budget_s)
            load = cpu.external_cores(snap)
            names = ("user_encoder", "target_fusion", "split") if graph == "split" else (graph,)
            for name, us in zip(names, seconds.T * 1e6, strict=True):
                p50[name] = float(np.percentile(us, 50))
                self.rows["direct"].append({
                    "model": name, "n": n, "length": length, "status": "ok",
                    "p50_us": round(p50[name], 1), "p90_us": round(np.percentile(us, 90), 1),
                    "reps": len(us), "gflop": flop[name] / 1e9,
                    "gflops": flop[name] / 1e3 / p50[name], **load})
            if graph == "ranker_naive":
                self.naive_s[(n, length)] = p50[graph] / 1e6
                diff = np.max(np.abs(scores[graph] - scores["split"]))
                self.rows["direct"][-1]["max_abs_diff"] = float(diff)
        self.log(f"N={n} L={length} in process: "
                 + ", ".join(f"{g} {v / 1e3:.2f} ms" for g, v in p50.items()))
        return p50

    def run_pa(self, url: str, model: str, n: int, length: int, c: int, service_us: float,
               skip: str, step: str) -> None:
        """One perf_analyzer run into points.csv (`ranker`'s: ensemble_breakdown.csv too)."""
        point = {"model": model, "n": n, "length": length, "concurrency": c}
        label = f"{step} {model:<12} N={n} L={length} c={c}"
        if skip:
            self.log(f"{label}: {skip}")
            self.rows["points"].append({**point, "status": skip})
            return
        m, service_s = self.mode, service_us / 1e6
        heavy = service_s > HEAVY_S
        k = max(3 if heavy else m.k_min, math.ceil(m.window_s / max(service_s, 1e-6)))
        trials = min(m.max_trials, 8) if heavy else m.max_trials
        timeout = 60 + 2 * (trials + 1) * (max(1.0, k * service_s) + c * service_s)
        s = pa.Settings(k, m.stability, trials, c, timeout)
        self.log(f"{label}: perf_analyzer K={k} -s {m.stability:g} -r {trials} ...")
        res = pa.run(model, url, self.inputs[(n, length)][1], self.out / "perf_analyzer", s,
                     f"{model}_N{n}_L{length}_c{c}")
        r = res.row
        self.log(f"{label}: {r['status']}, p50 {an.ms(r['p50_us'])} ms, {an.fmt(r['throughput'])}"
                 f"/s, {r['wall_s']} s, others used {an.fmt(r.get('ext_cpu_cores'))} cores "
                 + str(r["message"]))
        self.rows["points"].append({**point, **r})
        if model == "ranker" and res.stats:  # the client's view and Triton's, per model
            parts = {"client_p50": r["p50_us"], "client_avg_grpc": res.avg_grpc_us}
            for name, stats in res.stats.items():
                prefix = "ensemble" if name == "ranker" else name
                parts |= {f"{prefix}_{part}": us for part, us in stats.items()}
            self.rows["ensemble_breakdown"] += [
                {"n": n, "length": length, "concurrency": c, "status": r["status"],
                 "part": part, "us": us} for part, us in parts.items() if us is not None]

    def measure(self, seed: int) -> dict[str, str]:
        """The grid at concurrency 1, then the sweep at its point; returns the machine."""
        from local_server.triton import free_port, start_server

        m = self.mode
        work = [(n, length, 1) for length in m.lengths for n in m.ns]
        work += [(*m.sweep_point, c) for c in m.sweep_concurrency
                 if m.sweep_point and (*m.sweep_point, c) not in work]
        gen = RequestGenerator(self.contract, seed=seed)
        (self.out / "inputs").mkdir()
        for n, length in dict.fromkeys((n, length) for n, length, _ in work):
            reqs = [gen.request(length, n).as_inputs() for _ in range(m.requests_per_point)]
            self.inputs[(n, length)] = reqs, self.out / "inputs" / f"N{n}_L{length}.json"
            pa.write_input_data(self.inputs[(n, length)][1], reqs)
        self.sessions = {g: make_session(onnx_path(self.repository, g)) for g in GRAPHS}
        server = start_server(grpc_port=free_port(), http_port=None, repository=self.repository,
                              log_file=self.out / "tritonserver.log")
        self.log(f"tritonserver pid {server.pid} ready on {server.grpc_url}")
        try:
            p50: dict[tuple[int, int], dict[str, float]] = {}
            for i, (n, length, c) in enumerate(work):
                if length not in {k[1] for k in self.naive_s}:  # one naive request at N=1
                    req = RequestGenerator(self.contract, seed=12345).request(length, 1)
                    seconds = self.time_graph("ranker_naive", [req.as_inputs()], 0.0)[0]
                    self.naive_s[(1, length)] = float(np.median(seconds))
                skip = self.naive_skip(n, length, c)
                if (n, length) not in p50:
                    p50[(n, length)] = self.run_direct(n, length, skip)
                for j, model in enumerate(MODELS):
                    service = p50[(n, length)].get("split" if model == "ranker" else model, 0.0)
                    self.run_pa(server.grpc_url, model, n, length, c,
                                service + OVERHEAD_US[model], skip if model == "ranker_naive"
                                else "", f"[{i * 3 + j + 1}/{len(work) * 3}]")
        finally:
            self.log(f"stopped tritonserver pid {server.pid} (exit code {server.stop()})")
            self.sessions.clear()
        return an.machine(**an.LOCAL_SERVER, perf_analyzer=pa.perf_analyzer_version())

    def run_memory(self) -> None:
        """Peak memory of one run per graph into memory.csv, each in a fresh process."""
        fm = self.flops
        for model, n, length in self.mode.memory_points:
            row = {"model": model, "n": n, "length": length,
                   "user_kv_bytes": fm.user_kv_bytes(length),
                   "naive_kv_bytes": fm.naive_kv_bytes(n, length),
                   "naive_attention_est_bytes": fm.naive_attention_bytes(n, length),
                   "status": self.naive_skip(n, length, 1) if model == "ranker_naive" else ""}
            if not row["status"]:
                spawn = multiprocessing.get_context("spawn")
                try:
                    with ProcessPoolExecutor(1, mp_context=spawn) as fresh:
                        row |= {"status": "ok", **fresh.submit(
                            memory.probe, model, n, length, self.repository, self.config).result()}
                except Exception as e:  # the probe's own error, or its process died (memory)
                    row["status"] = f"error: {type(e).__name__}: {e}"
            peak = row.get("peak_delta_bytes")
            self.log(f"memory {model} N={n} L={length}: {row['status']}"
                     + (f", peak +{peak / 2**20:.1f} MiB" if peak is not None else ""))
            self.rows["memory"].append(row)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: stop tritonserver, perf_analyzer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench.sh", description=__doc__ + " Full run: N "
                                "in {1,5,10,50,100,1000} x L in {256,1000} + a concurrency sweep "
                                "(15-30 min on 2 cores).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="N in {1,10,50}, L in {256,1000}, short windows, naive only where a "
                      "request takes <= 5 s, so the headline point L=1000, N=50 is in (~4 min)")
    size.add_argument("--smoke", action="store_true",
                      help="one tiny point (N=5, L=64), for CI (seconds)")
    p.add_argument("--out", type=Path, help="output folder (default: build/bench/<timestamp>; "
                   "the committed full run is benchmarks/results)")
    p.add_argument("--seed", type=int, default=0, help="request generator seed")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="model config the ONNX files were exported from (FLOP model)")
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY,
                   help="model repository with the exported ONNX files")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    mode = SMOKE if args.smoke else QUICK if args.quick else FULL
    repository, config = args.repository.resolve(), args.config.resolve()
    missing = [g for g in GRAPHS if not onnx_path(repository, g).exists()]
    if missing:
        p.error(f"no ONNX model for {missing}: run `python -m export` first")
    try:
        pa.perf_analyzer_version()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        p.error(f"perf_analyzer does not run: {e}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO_ROOT / "build" / "bench" / stamp).resolve()
    for stale in ("perf_analyzer", "inputs"):  # a previous run's per-run files
        shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(mode, ModelConfig.load(config), repository, config, out)
    bench.log(f"mode {mode.name}: N {list(mode.ns)}, L {list(mode.lengths)}, "
              f"{mode.requests_per_point} requests per point -> {out}")
    machine = bench.measure(args.seed)
    bench.run_memory()
    for name, rows in bench.rows.items():
        an.write_csv(out / f"{name}.csv", rows)
    total_s = time.monotonic() - bench.log.t0
    (out / "run.json").write_text(json.dumps({
        "mode": mode.name, "naive_limit_s": mode.naive_limit_s, "seed": args.seed,
        "config": str(config.relative_to(REPO_ROOT) if config.is_relative_to(REPO_ROOT)
                      else config), "total_s": round(total_s, 1), "machine": machine}, indent=1))
    report.write(out)
    shutil.rmtree(out / "inputs")  # the same --seed regenerates them
    bench.log(f"done in {total_s / 60:.1f} min: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
