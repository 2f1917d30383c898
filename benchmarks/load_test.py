"""Load test through a real tritonserver: concurrent clients, exactness under load, server memory.

`scripts/load_test.sh` starts its own local tritonserver on free localhost ports (or uses the
running one given with --url), then --clients threads, each with its own RankerClient (its own
gRPC channel), send --requests ranking requests in all to the `ranker` ensemble: history lengths L
drawn uniformly from 0..max_history, candidate counts N from 1..--max-candidates, each client from
its own seeded RequestGenerator. Every --check-every-th request is also scored by `ranker_naive`
(the oracle on the same contract) and compared: max abs diff <= 1e-5. The oracle is far slower
(it re-encodes the history once per candidate), so the checks run in --checkers threads of their
own, beside the clients, and the clients keep the ensemble under a constant load; the throughput
is the clients' (first request to last answer), with the checks running alongside.

Memory: the resident set (RSS) of tritonserver plus all its descendants (the python-backend
stubs that run the models), read with psutil, summed. It is sampled once after a warm-up phase
(which sends the largest request shape to the ensemble from every client and to the oracle once,
so that the ONNX Runtime arenas have reached their working size), every second during the
measured phase (for the maximum) and once at the end with the server idle again. The growth is
end minus after-warm-up.

Exit status 0 when there were no errors, no mismatches, every request was sent and the memory
grew by at most --max-growth-pct after the warm-up; 1 otherwise; 2 when the server could not be
started or reached. --json writes every figure.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks import analysis as an
from client.api import RankerClient, RankerError
from client.request import RankingRequest
from export.reference_features import profile_dim_of, reference_generator
from local_server.processes import process_label, process_tree, rss_bytes
from local_server.triton import (
    MODEL_REPOSITORY,
    REPO_ROOT,
    LocalServer,
    ServerError,
    free_port,
    start_server,
)

MODEL = "ranker"
ORACLE = "ranker_naive"
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
        rss = rss_bytes(pid)
        label = "tritonserver" if pid == server_pid else process_label(pid)
        by_process[label] = by_process.get(label, 0) + rss
    return MemorySample(time.monotonic(), sum(by_process.values()), by_process)


def find_server_pid(url: str) -> int | None:
    """PID of the local tritonserver listening on `url`'s port (by its command line)."""
    host, _, port = url.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "[::1]", "0.0.0.0") or not port.isdigit():
        return None
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if argv and Path(argv[0]).name == "tritonserver" and f"--grpc-port={port}" in argv:
            return proc.pid
    return None


def stop_server(server: LocalServer, timeout_s: float = 60.0) -> dict[str, Any]:
    """Stop `server` by PID and report what its clean-up had to do (LocalServer.stop)."""
    code = server.stop(timeout_s)
    return {"exit_code": code, **server.cleanup}


# --------------------------------------------------------------------------- the run

@dataclass
class Job:
    index: int  # global index within its phase
    request: RankingRequest
    check: bool


@dataclass
class Stats:
    """Shared counters of one phase (all updates under the lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    completed: int = 0
    errors: int = 0
    error_samples: list[dict[str, Any]] = field(default_factory=list)
    error_codes: dict[str, int] = field(default_factory=dict)
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
        code = e.code if isinstance(e, RankerError) else type(e).__name__
        code = code or "CLIENT"
        with self.lock:
            self.errors += 1
            self.error_codes[code] = self.error_codes.get(code, 0) + 1
            if len(self.error_samples) < MAX_SAMPLES:
                self.error_samples.append({
                    "index": job.index, "model": model, "code": code, "message": str(e)[:500],
                    "L": job.request.history_length, "N": job.request.num_candidates,
                })


def plan(
    count: int, clients: int, seed: int, profile_dim: int, max_history: int,
    max_candidates: int, check_every: int, largest_first: bool,
) -> list[list[Job]]:
    """Jobs per client: job j goes to client j % clients; client i draws its requests from
    reference_generator(seed + i) and its shapes from its own RNG. Every check_every-th job is
    also scored by the oracle (none if check_every is 0). With `largest_first`, each client's
    first request has the largest shape (max_history, max_candidates)."""
    per_client: list[list[Job]] = [[] for _ in range(clients)]
    gens = [reference_generator(seed=seed + i, profile_dim=profile_dim) for i in range(clients)]
    rngs = [np.random.default_rng([seed, i]) for i in range(clients)]
    for j in range(count):
        i = j % clients
        if largest_first and not per_client[i]:
            length, n = max_history, max_candidates
        else:
            length = int(rngs[i].integers(0, max_history + 1))
            n = int(rngs[i].integers(1, max_candidates + 1))
        check = check_every > 0 and j % check_every == 0
        per_client[i].append(Job(j, gens[i].request(length, n), check))
    return per_client


def _client_loop(
    jobs: list[Job], make_client: Callable[[str, float], RankerClient], args: argparse.Namespace,
    stats: Stats, deadline: float, stop: threading.Event, checks: queue.Queue,
) -> None:
    """One client: its jobs in order on `ranker`; scores to check go to the checker queue."""
    ranker = make_client(MODEL, args.timeout)
    try:
        for position, job in enumerate(jobs):
            if stop.is_set() or time.monotonic() > deadline:
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
    finally:
        ranker.close()


def _checker_loop(
    make_client: Callable[[str, float], RankerClient], args: argparse.Namespace, stats: Stats,
    deadline: float, stop: threading.Event, checks: queue.Queue,
) -> None:
    """Scores queued requests with the oracle and compares (None in the queue: done)."""
    oracle = make_client(ORACLE, args.check_timeout)
    try:
        while True:
            item = checks.get()
            if item is None:
                return
            job, scores = item
            if stop.is_set() or time.monotonic() > deadline:
                with stats.lock:
                    stats.checks_skipped += 1
                continue
            try:
                expected, check_latency = oracle.score_with_latency(job.request)
            except Exception as e:
                stats.error(job, ORACLE, e)
                continue
            finite = bool(np.isfinite(scores).all())
            same_shape = scores.shape == expected.shape
            diff = (float(np.abs(scores - expected).max()) if same_shape and scores.size
                    else (0.0 if same_shape else math.inf))
            with stats.lock:
                stats.checks += 1
                stats.check_latencies.append(check_latency)
                if finite and same_shape:
                    stats.max_abs_diff = max(stats.max_abs_diff, diff)
                if not (finite and same_shape and diff <= TOLERANCE):
                    stats.mismatches += 1
                    if len(stats.mismatch_samples) < MAX_SAMPLES:
                        stats.mismatch_samples.append({
                            "index": job.index, "L": job.request.history_length,
                            "N": job.request.num_candidates, "max_abs_diff": diff,
                            "finite": finite, "shape": list(scores.shape),
                            "expected_shape": list(expected.shape),
                        })
    finally:
        oracle.close()


def run_phase(
    name: str, per_client: list[list[Job]], args: argparse.Namespace, deadline: float,
    stop: threading.Event, on_tick: Callable[[float], None] | None = None,
) -> Stats:
    """Run the jobs, one thread per client, and the oracle checks in --checkers threads beside
    them (so that the slow oracle does not hold the clients back); `on_tick(elapsed)` about
    every 0.2 s. Sets stats.ranker_wall_s (first request to last answer of the clients) and
    stats.wall_s (until the last check)."""
    stats = Stats()
    total = sum(len(j) for j in per_client)
    checks: queue.Queue = queue.Queue()

    def make_client(model: str, timeout_s: float) -> RankerClient:
        return RankerClient(args.url, model=model, timeout_s=timeout_s, retries=args.retries,
                            backoff_s=args.backoff)

    clients = [
        threading.Thread(target=_client_loop, name=f"{name}-client-{i}", daemon=True,
                         args=(jobs, make_client, args, stats, deadline, stop, checks))
        for i, jobs in enumerate(per_client)
    ]
    checkers = [
        threading.Thread(target=_checker_loop, name=f"{name}-checker-{i}", daemon=True,
                         args=(make_client, args, stats, deadline, stop, checks))
        for i in range(args.checkers)
    ]
    start = time.monotonic()
    for t in clients + checkers:
        t.start()
    last_progress = start
    # Every call is bounded (timeout x retries), so the threads end; the wait is bounded too.
    call_bound = max(args.timeout, args.check_timeout) * (args.retries + 1) + args.backoff * (
        2 ** args.retries) + 60
    join_deadline = deadline + call_bound
    sentinels_sent = False
    while time.monotonic() < join_deadline:
        alive = [t for t in clients if t.is_alive()]
        if not alive and not sentinels_sent:
            stats.ranker_wall_s = time.monotonic() - start
            for _ in checkers:
                checks.put(None)
            sentinels_sent = True
        alive += [t for t in checkers if t.is_alive()]
        if not alive:
            break
        alive[0].join(timeout=0.2)
        now = time.monotonic()
        if on_tick is not None:
            on_tick(now - start)
        if now - last_progress >= args.progress_s:
            last_progress = now
            with stats.lock:
                done, errors, checked, bad = (stats.completed, stats.errors, stats.checks,
                                              stats.mismatches)
            print(f"load_test: [{name}] {done + errors}/{total} done, {errors} errors, "
                  f"{checked} checked ({checks.qsize()} queued), {bad} mismatches, "
                  f"{now - start:.0f} s", flush=True)
    stats.wall_s = time.monotonic() - start
    if not sentinels_sent:
        stats.ranker_wall_s = stats.wall_s
    hung = [t.name for t in clients + checkers if t.is_alive()]
    if hung:  # cannot happen with bounded calls; reported rather than waited for
        stop.set()
        with stats.lock:
            stats.errors += len(hung)
            stats.error_codes["HUNG_THREAD"] = len(hung)
    return stats


def percentiles_ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {**{f"p{q}": round(an.percentile_ms(values, q), 2) for q in (50, 90, 99)},
            "max": round(max(values) * 1e3, 2), "mean": round(1e3 * sum(values) / len(values), 2)}


def memory_figures(
    after_warmup: MemorySample | None, end: MemorySample | None, peak: MemorySample | None,
    max_growth_pct: float, server_pid: int | None,
) -> dict[str, Any]:
    if after_warmup is None or end is None:
        return {"measured": False, "server_pid": server_pid,
                "reason": "no local tritonserver PID (pass --server-pid)"}
    growth = end.total_bytes - after_warmup.total_bytes
    peak_bytes = max(peak.total_bytes if peak else 0, end.total_bytes, after_warmup.total_bytes)
    return {
        "measured": True,
        "server_pid": server_pid,
        "after_warmup_mib": round(after_warmup.total_mib, 1),
        "end_mib": round(end.total_mib, 1),
        "max_mib": round(peak_bytes / MIB, 1),
        "growth_mib": round(growth / MIB, 1),
        "growth_pct": round(100.0 * growth / after_warmup.total_bytes, 2),
        "max_growth_pct": max_growth_pct,
        "after_warmup_by_process_mib": {k: round(v / MIB, 1)
                                        for k, v in sorted(after_warmup.by_process.items())},
        "end_by_process_mib": {k: round(v / MIB, 1) for k, v in sorted(end.by_process.items())},
        "growth_by_process_mib": {
            k: round((end.by_process.get(k, 0) - after_warmup.by_process.get(k, 0)) / MIB, 1)
            for k in sorted(set(end.by_process) | set(after_warmup.by_process))
        },
        "processes": len(end.by_process),
    }


def verdict(figures: dict[str, Any]) -> list[str]:
    """Why the run failed (empty when it passed)."""
    failures = []
    if figures["errors"]:
        failures.append(f"{figures['errors']} errors ({figures['error_codes']})")
    if figures["mismatches"]:
        failures.append(f"{figures['mismatches']} mismatches against {ORACLE} "
                        f"(max abs diff {figures['max_abs_diff']:.3g} > {TOLERANCE:g})")
    if figures["not_sent"] or figures["checks_skipped"]:
        failures.append(f"{figures['not_sent']} requests not sent and "
                        f"{figures['checks_skipped']} checks skipped: time limit reached")
    warm = figures["warmup"]
    if warm["errors"] or warm["mismatches"] or warm["not_sent"] or warm["checks_skipped"]:
        failures.append(f"warm-up: {warm['errors']} errors, {warm['mismatches']} mismatches, "
                        f"{warm['not_sent']} not sent, {warm['checks_skipped']} checks skipped")
    mem = figures["memory"]
    if mem.get("measured") and mem["growth_pct"] > mem["max_growth_pct"]:
        failures.append(f"server memory grew {mem['growth_pct']:.1f} % after the warm-up "
                        f"(> {mem['max_growth_pct']:g} %)")
    return failures


def default_max_history(repository: Path) -> int | None:
    """max_history from the exported model card (<repository>/user_encoder/1/model_card.json)."""
    card = repository / "user_encoder" / "1" / "model_card.json"
    try:
        return int(json.loads(card.read_text())["config"]["max_history"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/load_test.sh",
        description="Load test of the `ranker` ensemble through a real tritonserver: concurrent "
        "clients with varied L and N, a sample checked against `ranker_naive` (max abs diff "
        f"<= {TOLERANCE:g}), latency percentiles, throughput and the server's memory "
        "(tritonserver + python-backend stubs) after a warm-up and at the end. Starts its own "
        "local server on free 127.0.0.1 ports unless --url is given. Exit 0 when nothing "
        "failed, 1 on errors, mismatches or memory growth, 2 when no server.",
    )
    p.add_argument("--url", default=None,
                   help="gRPC host:port of a running server (default: start one)")
    p.add_argument("--server-pid", type=int, default=None,
                   help="PID of the tritonserver behind --url, for the memory figures "
                   "(default: found by its --grpc-port on this machine)")
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY,
                   help="model repository to serve (default %(default)s)")
    p.add_argument("--clients", type=int, default=16,
                   help="concurrent clients, one thread and channel each (default %(default)s)")
    p.add_argument("--requests", type=int, default=800,
                   help="requests in the measured phase, all clients together (default "
                   "%(default)s)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up requests before the first memory sample (default 2 per client; "
                   "each client's first one has the largest shape)")
    p.add_argument("--check-every", type=int, default=20,
                   help=f"score every k-th request with {ORACLE} too (0: never; default "
                   "%(default)s)")
    p.add_argument("--checkers", type=int, default=1,
                   help=f"threads scoring the checked requests with {ORACLE}, beside the "
                   "clients (default %(default)s)")
    p.add_argument("--max-history", type=int, default=None,
                   help="largest L (default: max_history of the repository's model card)")
    p.add_argument("--max-candidates", type=int, default=200,
                   help="largest N; N is drawn from 1..this (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="client i uses seed + i (default 0)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help=f"seconds per {MODEL} call (default %(default)s)")
    p.add_argument("--check-timeout", type=float, default=300.0,
                   help=f"seconds per {ORACLE} call (default %(default)s)")
    p.add_argument("--retries", type=int, default=0,
                   help="client retries of UNAVAILABLE (default 0: every failure counts)")
    p.add_argument("--backoff", type=float, default=0.2, help="first retry backoff in seconds")
    p.add_argument("--max-growth-pct", type=float, default=20.0,
                   help="fail if server memory grew more than this after the warm-up "
                   "(default %(default)s)")
    p.add_argument("--time-limit", type=float, default=1800.0,
                   help="seconds for the whole run; requests not sent by then count as "
                   "failures (default %(default)s)")
    p.add_argument("--progress-s", type=float, default=10.0,
                   help="seconds between progress lines (default %(default)s)")
    p.add_argument("--ready-timeout", type=float, default=240.0,
                   help="seconds for a started server to become ready (default %(default)s); with "
                   "--url, at most 60 s for the given server")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    if min(args.clients, args.requests, args.max_candidates, args.checkers) < 1:
        p.error("--clients, --requests, --max-candidates and --checkers must be >= 1")
    if args.check_every < 0 or (args.warmup is not None and args.warmup < 0):
        p.error("--check-every and --warmup must be >= 0")
    if args.warmup is None:
        args.warmup = 2 * args.clients
    if args.max_history is None:
        args.max_history = default_max_history(args.repository)
        if args.max_history is None:
            p.error(f"no model card in {args.repository}/user_encoder/1: pass --max-history")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_time = time.monotonic()
    deadline = start_time + args.time_limit
    stop = threading.Event()
    server: LocalServer | None = None
    server_pid = args.server_pid
    stopped: dict[str, Any] | None = None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(_signum: int, _frame: object) -> None:
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if args.url is None:
            port = free_port()
            print(f"load_test: starting tritonserver on 127.0.0.1:{port} with "
                  f"{args.repository}", flush=True)
            try:
                server = start_server(grpc_port=port, repository=args.repository,
                                      timeout_s=args.ready_timeout)
            except ServerError as e:
                print(f"load_test: error: {e}", file=sys.stderr)
                return 2
            args.url = server.grpc_url
            server_pid = server.pid
            print(f"load_test: ready (tritonserver pid {server.pid})", flush=True)
        elif server_pid is None:
            server_pid = find_server_pid(args.url)
        try:
            with RankerClient(args.url, timeout_s=30.0, retries=3) as probe:
                probe.wait_ready([MODEL, ORACLE], timeout_s=min(60.0, args.ready_timeout))
                profile_dim = profile_dim_of(probe.model_info(MODEL).contract)
        except RankerError as e:
            print(f"load_test: error: {e}", file=sys.stderr)
            return 2
        figures = _run(args, profile_dim, server_pid, deadline, stop)
    except KeyboardInterrupt:
        stop.set()
        print("load_test: interrupted", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            stopped = stop_server(server)
            print(f"load_test: stopped tritonserver pid {server.pid} (exit code "
                  f"{stopped['exit_code']})", flush=True)
            if stopped["lingering_stubs_killed"]:
                print(f"load_test: killed lingering stubs {stopped['lingering_stubs_killed']}",
                      file=sys.stderr)

    figures["server_started"] = server is not None
    figures["server_stop"] = stopped
    figures["total_s"] = round(time.monotonic() - start_time, 1)
    failures = verdict(figures)
    figures["failures"] = failures
    figures["ok"] = not failures
    print_report(figures)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"load_test: figures written to {args.json}")
    return 0 if not failures else 1


def _run(
    args: argparse.Namespace, profile_dim: int, server_pid: int | None, deadline: float,
    stop: threading.Event,
) -> dict[str, Any]:
    shape = dict(clients=args.clients, profile_dim=profile_dim, max_history=args.max_history,
                 max_candidates=args.max_candidates, check_every=args.check_every)
    warmup_jobs = plan(args.warmup, seed=args.seed + 100_000, largest_first=True, **shape)
    jobs = plan(args.requests, seed=args.seed, largest_first=False, **shape)
    if args.warmup:
        # The oracle sees the largest shape once too (the first warm-up job is checked).
        warmup_jobs[0][0].check = args.check_every > 0
        print(f"load_test: warm-up: {args.warmup} requests from {args.clients} clients "
              f"(largest shape L={args.max_history}, N={args.max_candidates} first)", flush=True)
    warm = run_phase("warm-up", warmup_jobs, args, deadline, stop)

    after_warmup = sample_memory(server_pid) if server_pid else None
    if after_warmup:
        print(f"load_test: server memory after warm-up: {after_warmup.total_mib:.1f} MiB "
              f"({len(after_warmup.by_process)} processes)", flush=True)
    peak: list[MemorySample] = []
    last_sample = [0.0]
    # (seconds into the measured phase, MiB): every 5 s, thinned to stay under 400 points
    timeline: list[tuple[float, float]] = []

    def tick(elapsed: float) -> None:
        if server_pid and elapsed - last_sample[0] >= 1.0:
            last_sample[0] = elapsed
            sample = sample_memory(server_pid)
            if not peak or sample.total_bytes > peak[0].total_bytes:
                peak[:] = [sample]
            if not timeline or elapsed - timeline[-1][0] >= 5.0:
                timeline.append((round(elapsed, 1), round(sample.total_mib, 1)))
                if len(timeline) >= 400:
                    timeline[:] = timeline[::2]

    print(f"load_test: measuring: {args.requests} requests, {args.clients} clients, "
          f"L in 0..{args.max_history}, N in 1..{args.max_candidates}, "
          f"every {args.check_every or 'no'}-th checked against {ORACLE}", flush=True)
    stats = run_phase("measure", jobs, args, deadline, stop, on_tick=tick)
    end = sample_memory(server_pid) if server_pid else None

    return {
        "url": args.url,
        "repository": str(args.repository),
        "model": MODEL,
        "oracle": ORACLE,
        "clients": args.clients,
        "requests": args.requests,
        "max_history": args.max_history,
        "max_candidates": args.max_candidates,
        "check_every": args.check_every,
        "tolerance": TOLERANCE,
        "completed": stats.completed,
        "errors": stats.errors,
        "error_codes": stats.error_codes,
        "error_samples": stats.error_samples,
        "not_sent": stats.not_sent,
        "checks": stats.checks,
        "checks_skipped": stats.checks_skipped,
        "mismatches": stats.mismatches,
        "mismatch_samples": stats.mismatch_samples,
        "max_abs_diff": stats.max_abs_diff,
        "ranker_wall_s": round(stats.ranker_wall_s, 2),
        "wall_s": round(stats.wall_s, 2),
        "throughput_rps": (round(stats.completed / stats.ranker_wall_s, 2)
                           if stats.ranker_wall_s > 0 else None),
        "latency_ms": percentiles_ms(stats.latencies),
        "check_latency_ms": percentiles_ms(stats.check_latencies),
        "warmup": {
            "requests": args.warmup, "completed": warm.completed, "errors": warm.errors,
            "error_samples": warm.error_samples, "checks": warm.checks,
            "mismatches": warm.mismatches, "checks_skipped": warm.checks_skipped,
            "not_sent": warm.not_sent,
            "wall_s": round(warm.wall_s, 2),
        },
        "memory": {**memory_figures(after_warmup, end, peak[0] if peak else None,
                                    args.max_growth_pct, server_pid), "timeline": timeline},
        "host": {"cpus": os.cpu_count(), "repo": str(REPO_ROOT)},
    }


def print_report(f: dict[str, Any]) -> None:
    """The figures as a markdown table (the --json file holds all of them), then the verdict."""
    lat, mem = f["latency_ms"] or {}, f["memory"]
    rows = [["requests", f"{f['requests']} ({f['clients']} clients), completed {f['completed']},"
                         f" errors {f['errors']}, not sent {f['not_sent']}"],
            [f"checked against {f['oracle']}", f"{f['checks']}, mismatches {f['mismatches']}, "
                                              f"max abs diff {f['max_abs_diff']:.3g}"],
            ["throughput", f"{f['throughput_rps']} req/s over {f['ranker_wall_s']} s (oracle "
                           f"checks alongside; last check done at {f['wall_s']} s)"]]
    if lat:
        rows.append(["latency ms", ", ".join(f"{k} {lat[k]}" for k in ("p50", "p90", "p99",
                                                                        "max"))])
    rows.append(["server memory MiB", f"after warm-up {mem['after_warmup_mib']}, end "
                 f"{mem['end_mib']}, max {mem['max_mib']}, growth {mem['growth_mib']} MiB "
                 f"({mem['growth_pct']} %, limit {mem['max_growth_pct']} %)"
                 if mem.get("measured") else f"not measured ({mem.get('reason')})"])
    print(an.table(rows, ["figure", "value"]))
    for line in f["failures"]:
        print(f"FAIL: {line}")
    for sample in (f["error_samples"] + f["warmup"]["error_samples"])[:5]:
        print(f"error example: {sample}")
    print(f"load_test: {'PASS' if f['ok'] else 'FAIL'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
