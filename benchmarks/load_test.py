"""Load test through a real tritonserver: concurrent clients, exactness under load, server memory.

scripts/load_test.sh; what it does and its committed figures: docs/robustness.md. --clients
threads, each with its own RankerClient, send --requests requests to `ranker` (L uniform in
0..max_history, N in 1..--max-candidates, client i's from the traffic generator of the served
model's declaration, seeded seed + i); every --check-every-th is scored by `ranker_naive` in
--checkers threads beside the clients (the oracle is far slower: the clients keep the ensemble
loaded) and must match within 1e-5. Memory: RSS of
tritonserver and its descendants (psutil) after a warm-up (the largest shape first), every second
during the run and at the end; growth = end - after warm-up. Exit 0 when nothing failed, 1 on
errors, mismatches, requests not sent or memory growth above --max-growth-pct, 2 without a server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks import analysis as an
from client.api import RankerClient, RankerError
from client.request import Declared, RankingRequest
from client.split_contract import SplitContract
from client.traffic import RequestGenerator
from local_server.processes import process_label, process_tree, rss_bytes
from local_server.triton import MODEL_REPOSITORY, LocalServer, ServerError, free_port, start_server

MODEL, ORACLE = "ranker", "ranker_naive"
TOLERANCE = 1e-5
MIB = 1024 * 1024
MAX_SAMPLES = 100  # error / mismatch examples kept for the report


@dataclass
class MemorySample:
    t: float
    total_bytes: int
    by_process: dict[str, int]

    @property
    def total_mib(self) -> float:
        return self.total_bytes / MIB


def sample_memory(server_pid: int) -> MemorySample:
    """RSS of tritonserver and every descendant, summed (and per process label)."""
    by_process: dict[str, int] = {}
    for pid in process_tree(server_pid):
        label = "tritonserver" if pid == server_pid else process_label(pid)
        by_process[label] = by_process.get(label, 0) + rss_bytes(pid)
    return MemorySample(time.monotonic(), sum(by_process.values()), by_process)


def find_server_pid(url: str) -> int | None:
    """PID of the local tritonserver listening on `url`'s port (by its command line)."""
    host, _, port = url.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "[::1]", "0.0.0.0"):
        return None  # a remote server: its memory is not this machine's to read
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if argv and Path(argv[0]).name == "tritonserver" and f"--grpc-port={port}" in argv:
            return proc.pid
    return None


def stop_server(server: LocalServer, timeout_s: float = 60.0) -> dict[str, Any]:
    """Stop `server` by PID and report what its clean-up had to do (LocalServer.stop)."""
    return {"exit_code": server.stop(timeout_s), **server.cleanup}


@dataclass
class Job:
    index: int  # global index within its phase
    request: RankingRequest
    check: bool


@dataclass
class Stats:
    """Counters of one phase (all updates under the lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    completed: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    error_samples: list[dict[str, Any]] = field(default_factory=list)
    checks: int = 0
    mismatches: int = 0
    mismatch_samples: list[dict[str, Any]] = field(default_factory=list)
    max_abs_diff: float = 0.0
    not_sent: int = 0
    checks_skipped: int = 0
    ranker_wall_s: float = 0.0
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    check_latencies: list[float] = field(default_factory=list)

    def error(self, job: Job, model: str, e: BaseException) -> None:
        code = (e.code if isinstance(e, RankerError) else type(e).__name__) or "CLIENT"
        with self.lock:
            self.errors += 1
            self.error_codes[code] = self.error_codes.get(code, 0) + 1
            if len(self.error_samples) < MAX_SAMPLES:
                self.error_samples.append({
                    "index": job.index, "model": model, "code": code, "message": str(e)[:500],
                    "L": job.request.history_length, "N": job.request.num_candidates})

    def summary(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "completed", "errors", "error_codes", "error_samples", "not_sent", "checks",
            "checks_skipped", "mismatches", "mismatch_samples", "max_abs_diff")}


def plan(count: int, clients: int, seed: int, declared: Declared, max_history: int,
         max_candidates: int, check_every: int, largest_first: bool) -> list[list[Job]]:
    """Jobs per client: job j goes to client j % clients, drawn from client i's own generator
    and RNG; every check_every-th job is checked (none if 0); with `largest_first` each client's
    first request has the largest shape. `declared`: the served model's declaration (or its
    features), which the requests follow."""
    per_client: list[list[Job]] = [[] for _ in range(clients)]
    gens = [RequestGenerator(declared, seed=seed + i) for i in range(clients)]
    rngs = [np.random.default_rng([seed, i]) for i in range(clients)]
    for j in range(count):
        i = j % clients
        if largest_first and not per_client[i]:
            length, n = max_history, max_candidates
        else:
            length = int(rngs[i].integers(0, max_history + 1))
            n = int(rngs[i].integers(1, max_candidates + 1))
        per_client[i].append(Job(j, gens[i].request(length, n),
                                 check_every > 0 and j % check_every == 0))
    return per_client


def _client(jobs: list[Job], args: argparse.Namespace, stats: Stats, deadline: float,
            checks: queue.Queue) -> None:
    with RankerClient(args.url, model=MODEL, timeout_s=args.timeout, retries=0) as ranker:
        for position, job in enumerate(jobs):
            if time.monotonic() > deadline:
                with stats.lock:
                    stats.not_sent += len(jobs) - position
                return
            try:
                scores, latency = ranker.score_with_latency(job.request)
            except Exception as e:  # every failure is counted, none stops the run
                stats.error(job, MODEL, e)
                continue
            with stats.lock:
                stats.completed += 1
                stats.latencies.append(latency)
            if job.check:
                checks.put((job, scores))


def _checker(args: argparse.Namespace, stats: Stats, deadline: float,
             checks: queue.Queue) -> None:
    with RankerClient(args.url, model=ORACLE, timeout_s=args.check_timeout,
                      retries=0) as oracle:
        while (item := checks.get()) is not None:
            job, scores = item
            if time.monotonic() > deadline:
                with stats.lock:
                    stats.checks_skipped += 1
                continue
            try:
                expected, latency = oracle.score_with_latency(job.request)
            except Exception as e:
                stats.error(job, ORACLE, e)
                continue
            finite, same = bool(np.isfinite(scores).all()), scores.shape == expected.shape
            diff = (float(np.abs(scores - expected).max()) if same and scores.size
                    else 0.0 if same else math.inf)
            with stats.lock:
                stats.checks += 1
                stats.check_latencies.append(latency)
                if finite and same:
                    stats.max_abs_diff = max(stats.max_abs_diff, diff)
                if not (finite and same and diff <= TOLERANCE):
                    stats.mismatches += 1
                    if len(stats.mismatch_samples) < MAX_SAMPLES:
                        stats.mismatch_samples.append({
                            "index": job.index, "L": job.request.history_length,
                            "N": job.request.num_candidates, "max_abs_diff": diff,
                            "finite": finite, "shape": list(scores.shape),
                            "expected_shape": list(expected.shape)})


def run_phase(name: str, per_client: list[list[Job]], args: argparse.Namespace,
              deadline: float, tick: Any = None) -> Stats:
    """One thread per client and --checkers oracle threads beside them; `tick(elapsed)` about
    every 0.2 s. Every call is bounded by its timeout, so is the wait for the threads."""
    stats, checks = Stats(), queue.Queue()
    clients = [threading.Thread(target=_client, args=(jobs, args, stats, deadline, checks),
                                daemon=True) for jobs in per_client]
    checkers = [threading.Thread(target=_checker, args=(args, stats, deadline, checks),
                                 daemon=True) for _ in range(args.checkers)]
    start = last = time.monotonic()
    for t in clients + checkers:
        t.start()
    join_by = deadline + max(args.timeout, args.check_timeout) + 60
    while (alive := [t for t in clients if t.is_alive()]) and time.monotonic() < join_by:
        alive[0].join(0.2)  # wakes as soon as that client is done
        if tick:
            tick(time.monotonic() - start)
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            print(f"load_test: [{name}] {stats.completed + stats.errors}/"
                  f"{sum(map(len, per_client))} done, {stats.errors} errors, {stats.checks} "
                  f"checked ({checks.qsize()} queued), {last - start:.0f} s", flush=True)
    stats.ranker_wall_s = time.monotonic() - start
    for _ in checkers:
        checks.put(None)
    for t in checkers:
        t.join(max(0.0, join_by - time.monotonic()))
    stats.wall_s = time.monotonic() - start
    hung = sum(t.is_alive() for t in clients + checkers)
    if hung:  # cannot happen with bounded calls; reported rather than waited for
        stats.errors += hung
        stats.error_codes["HUNG_THREAD"] = hung
    return stats


def percentiles_ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {**{f"p{q}": round(an.percentile_ms(values, q), 2) for q in (50, 90, 99)},
            "max": round(max(values) * 1e3, 2), "mean": round(1e3 * float(np.mean(values)), 2)}


def memory_figures(after_warmup: MemorySample | None, end: MemorySample | None,
                   peak: MemorySample | None, max_growth_pct: float,
                   server_pid: int | None) -> dict[str, Any]:
    if after_warmup is None or end is None:
        return {"measured": False, "server_pid": server_pid,
                "reason": "no local tritonserver PID (pass --server-pid)"}
    growth = end.total_bytes - after_warmup.total_bytes
    peak_bytes = max(peak.total_bytes if peak else 0, end.total_bytes, after_warmup.total_bytes)
    labels = sorted(set(end.by_process) | set(after_warmup.by_process))

    def mib(sample: MemorySample) -> dict[str, float]:
        return {k: round(v / MIB, 1) for k, v in sorted(sample.by_process.items())}

    return {"measured": True, "server_pid": server_pid,
            "after_warmup_mib": round(after_warmup.total_mib, 1),
            "end_mib": round(end.total_mib, 1), "max_mib": round(peak_bytes / MIB, 1),
            "growth_mib": round(growth / MIB, 1),
            "growth_pct": round(100.0 * growth / after_warmup.total_bytes, 2),
            "max_growth_pct": max_growth_pct, "after_warmup_by_process_mib": mib(after_warmup),
            "end_by_process_mib": mib(end),
            "growth_by_process_mib": {k: round((end.by_process.get(k, 0)
                                                - after_warmup.by_process.get(k, 0)) / MIB, 1)
                                      for k in labels},
            "processes": len(end.by_process)}


def verdict(f: dict[str, Any]) -> list[str]:
    """Why the run failed (empty when it passed)."""
    failures = []
    if f["errors"]:
        failures.append(f"{f['errors']} errors ({f['error_codes']})")
    if f["mismatches"]:
        failures.append(f"{f['mismatches']} mismatches against {ORACLE} "
                        f"(max abs diff {f['max_abs_diff']:.3g} > {TOLERANCE:g})")
    if f["not_sent"] or f["checks_skipped"]:
        failures.append(f"{f['not_sent']} requests not sent and {f['checks_skipped']} checks "
                        "skipped: time limit reached")
    w = f["warmup"]
    if w["errors"] or w["mismatches"] or w["not_sent"] or w["checks_skipped"]:
        failures.append(f"warm-up: {w['errors']} errors, {w['mismatches']} mismatches, "
                        f"{w['not_sent']} not sent, {w['checks_skipped']} checks skipped")
    mem = f["memory"]
    if mem.get("measured") and mem["growth_pct"] > mem["max_growth_pct"]:
        failures.append(f"server memory grew {mem['growth_pct']:.1f} % after the warm-up "
                        f"(> {mem['max_growth_pct']:g} %)")
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/load_test.sh",
        description="Load test of the `ranker` ensemble through a real tritonserver: concurrent "
        f"clients, a sample checked against `{ORACLE}` (max abs diff <= {TOLERANCE:g}), "
        "latency, throughput and the server's memory (tritonserver + stubs). Starts its own "
        "local server on free ports unless --url is given. Exit 0 when nothing failed, 1 on "
        "errors, mismatches or memory growth, 2 when no server.")
    p.add_argument("--url", default=None, help="gRPC host:port of a running server")
    p.add_argument("--server-pid", type=int, default=None,
                   help="PID of the server behind --url (default: found by its --grpc-port)")
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY,
                   help="model repository to serve (default %(default)s)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--requests", type=int, default=800, help="measured requests (default 800)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up requests, the largest shape first (default 2 per client)")
    p.add_argument("--check-every", type=int, default=20,
                   help=f"score every k-th request with {ORACLE} too (0: never; default 20)")
    p.add_argument("--checkers", type=int, default=1, help="oracle threads (default 1)")
    p.add_argument("--max-history", type=int, default=None,
                   help="largest L (default: max_history of the repository's model card)")
    p.add_argument("--max-candidates", type=int, default=200, help="largest N (default 200)")
    p.add_argument("--seed", type=int, default=0, help="client i uses seed + i (default 0)")
    p.add_argument("--timeout", type=float, default=60.0, help=f"s per {MODEL} call (60)")
    p.add_argument("--check-timeout", type=float, default=300.0, help=f"s per {ORACLE} call")
    p.add_argument("--max-growth-pct", type=float, default=20.0,
                   help="fail above this memory growth after the warm-up (default 20)")
    p.add_argument("--time-limit", type=float, default=1800.0,
                   help="seconds for the run; requests not sent by then fail it (default 1800)")
    p.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    args = p.parse_args(argv)
    if min(args.clients, args.requests, args.max_candidates, args.checkers) < 1:
        p.error("--clients, --requests, --max-candidates and --checkers must be >= 1")
    if args.check_every < 0 or (args.warmup is not None and args.warmup < 0):
        p.error("--check-every and --warmup must be >= 0")
    args.warmup = 2 * args.clients if args.warmup is None else args.warmup
    if args.max_history is None:
        card = args.repository / "user_encoder" / "1" / "model_card.json"
        if not card.exists():
            p.error(f"no model card in {card.parent}: pass --max-history")
        args.max_history = int(json.loads(card.read_text())["config"]["max_history"])
    return args


def measure(args: argparse.Namespace, contract: SplitContract, pid: int | None,
            deadline: float) -> dict[str, Any]:
    shape = dict(clients=args.clients, declared=contract, max_history=args.max_history,
                 max_candidates=args.max_candidates, check_every=args.check_every)
    warm_jobs = plan(args.warmup, seed=args.seed + 100_000, largest_first=True, **shape)
    if args.warmup:  # the oracle sees the largest shape once too
        warm_jobs[0][0].check = args.check_every > 0
    print(f"load_test: warm-up: {args.warmup} requests (largest shape L={args.max_history}, "
          f"N={args.max_candidates} first)", flush=True)
    warm = run_phase("warm-up", warm_jobs, args, deadline)
    after = sample_memory(pid) if pid else None
    peak: list[MemorySample] = []
    last = [-1.0]  # seconds into the phase of the last sample (one a second)
    timeline: list[tuple[float, float]] = []  # (s, MiB) every 5 s, thinned below 400 points

    def tick(elapsed: float) -> None:
        if pid and elapsed - last[0] >= 1.0:
            last[0], sample = elapsed, sample_memory(pid)
            peak[:] = [max([*peak, sample], key=lambda s: s.total_bytes)]
            if not timeline or elapsed - timeline[-1][0] >= 5.0:
                timeline.append((round(elapsed, 1), round(sample.total_mib, 1)))
                timeline[:] = timeline[::2] if len(timeline) >= 400 else timeline

    print(f"load_test: measuring: {args.requests} requests, {args.clients} clients", flush=True)
    stats = run_phase("measure", plan(args.requests, seed=args.seed, largest_first=False,
                                      **shape), args, deadline, tick)
    end = sample_memory(pid) if pid else None
    return {"url": args.url, "repository": str(args.repository), "model": MODEL,
            "oracle": ORACLE, "clients": args.clients, "requests": args.requests,
            "max_history": args.max_history, "max_candidates": args.max_candidates,
            "check_every": args.check_every, "tolerance": TOLERANCE, **stats.summary(),
            "ranker_wall_s": round(stats.ranker_wall_s, 2), "wall_s": round(stats.wall_s, 2),
            "throughput_rps": round(stats.completed / stats.ranker_wall_s, 2)
            if stats.ranker_wall_s > 0 else None,
            "latency_ms": percentiles_ms(stats.latencies),
            "check_latency_ms": percentiles_ms(stats.check_latencies),
            "warmup": {"requests": args.warmup, **warm.summary(), "wall_s": round(warm.wall_s, 2)},
            "memory": {**memory_figures(after, end, peak[0] if peak else None,
                                        args.max_growth_pct, pid), "timeline": timeline},
            "host": {"cpus": os.cpu_count(), "machine": an.machine()}}


def print_report(f: dict[str, Any]) -> None:
    """The figures as a markdown table (the --json file holds all of them), then the verdict."""
    lat, mem = f["latency_ms"] or {}, f["memory"]
    rows = [["requests", f"{f['requests']} ({f['clients']} clients), completed {f['completed']},"
                         f" errors {f['errors']}, not sent {f['not_sent']}"],
            [f"checked against {ORACLE}", f"{f['checks']}, mismatches {f['mismatches']}, "
                                          f"max abs diff {f['max_abs_diff']:.3g}"],
            ["throughput", f"{f['throughput_rps']} req/s over {f['ranker_wall_s']} s (oracle "
                           f"checks alongside; last check done at {f['wall_s']} s)"],
            ["latency ms", ", ".join(f"{k} {lat.get(k)}" for k in ("p50", "p90", "p99", "max"))],
            ["server memory MiB", f"after warm-up {mem['after_warmup_mib']}, end "
             f"{mem['end_mib']}, max {mem['max_mib']}, growth {mem['growth_mib']} MiB "
             f"({mem['growth_pct']} %, limit {mem['max_growth_pct']} %)"
             if mem.get("measured") else f"not measured ({mem.get('reason')})"]]
    print(an.table(rows, ["figure", "value"]))
    for line in f["failures"]:
        print(f"FAIL: {line}")
    for sample in (f["error_samples"] + f["warmup"]["error_samples"])[:5]:
        print(f"error example: {sample}")
    print(f"load_test: {'PASS' if f['ok'] else 'FAIL'}", flush=True)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # stop the server in main's finally


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    server: LocalServer | None = None
    stopped: dict[str, Any] | None = None
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.url is None:
            print(f"load_test: starting tritonserver with {args.repository}", flush=True)
            try:
                server = start_server(grpc_port=free_port(), repository=args.repository)
            except ServerError as e:
                print(f"load_test: error: {e}", file=sys.stderr)
                return 2
            args.url, args.server_pid = server.grpc_url, server.pid
        args.server_pid = args.server_pid or find_server_pid(args.url)
        try:
            with RankerClient(args.url, timeout_s=30.0, retries=3) as probe:
                probe.wait_ready([MODEL, ORACLE], timeout_s=60.0)
                contract = probe.model_info(MODEL).contract
        except RankerError as e:
            print(f"load_test: error: {e}", file=sys.stderr)
            return 2
        figures = measure(args, contract, args.server_pid, started + args.time_limit)
    except KeyboardInterrupt:
        print("load_test: interrupted", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            stopped = stop_server(server)
            print(f"load_test: stopped tritonserver pid {server.pid} "
                  f"(exit code {stopped['exit_code']})", flush=True)
    figures.update(server_started=server is not None, server_stop=stopped,
                   total_s=round(time.monotonic() - started, 1))
    figures["failures"] = verdict(figures)
    figures["ok"] = not figures["failures"]
    print_report(figures)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
