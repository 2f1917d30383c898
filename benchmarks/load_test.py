"""The traffic driver of the traffic benchmarks (user_cache.py, fleet.py), and the load test
behind scripts/load_test.sh (its method and figures: docs/robustness.md)."""

from __future__ import annotations

import argparse
import json
import math
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import analysis as an
from client.api import RankerClient, RankerError
from client.request import Declared, RankingRequest
from client.traffic import RequestGenerator
from local_server.processes import process_label, process_tree, rss_bytes
from local_server.triton import MODEL_REPOSITORY, LocalServer, ServerError, free_port, start_server

MODEL, ORACLE, TOLERANCE, MIB = "ranker", "ranker_naive", 1e-5, 1024 * 1024
COLUMNS = ["client", "index", "tag", "model", "user", "L", "N", "path", "seconds", "status",
           "code", "message", "max_abs_diff", "scores"]


@dataclass
class Job:
    """One request of a client; `user` is ranker_cached's key, `check` asks the oracle too."""

    request: RankingRequest
    index: int = 0
    check: bool = False
    model: str = MODEL
    user: int | None = None
    tag: str = ""

    def row(self, **values: Any) -> dict[str, Any]:
        return {"index": self.index, "tag": self.tag, "model": self.model, "user": self.user,
                "L": self.request.history_length, "N": self.request.num_candidates, **values}

    def failed(self, e: BaseException) -> dict[str, Any]:
        code = (e.code if isinstance(e, RankerError) else type(e).__name__) or "CLIENT"
        return self.row(status="error", code=code, message=str(e)[:500])


@dataclass
class Traffic:
    requests: pd.DataFrame  # a row per job sent (COLUMNS; status ok or error)
    checks: pd.DataFrame  # a row per checked job (status ok, mismatch, error or skipped)
    wall_s: float  # the clients' wall time


def max_abs_diff(scores: np.ndarray, expected: np.ndarray) -> float:
    """max |scores - expected|; inf where the shapes differ or a score is not finite."""
    if scores.shape != expected.shape or not np.isfinite(scores).all():
        return math.inf
    return float(np.abs(scores - expected).max()) if scores.size else 0.0


def drive(url: str, work: Sequence[Iterable[Job]], *, checks_after: bool = False,
          max_checks: int | None = None, deadline: float = math.inf, name: str = "traffic",
          tick: Callable[[float], None] | None = None) -> Traffic:
    """One thread and RankerClient per job source (a list or a generator) until its jobs or the
    deadline run out; checked jobs' scores go to an ORACLE thread, alongside the clients or after
    them (then at most `max_checks`, drawn at random); `tick(elapsed)` about 5 times a second."""
    rows: list[dict] = []
    checked: list[dict] = []
    pending: queue.Queue = queue.Queue()

    def client(number: int, jobs: Iterable[Job]) -> None:
        with RankerClient(url, timeout_s=300, retries=0) as ranker:
            for job in jobs:
                if time.monotonic() > deadline:
                    return
                try:
                    if job.user is None:
                        scores, seconds = ranker.score_with_latency(job.request, job.model)
                        path = ""
                    else:
                        scores, path, seconds = ranker.score_cached(job.request, job.user,
                                                                    job.model)
                except Exception as e:  # every failure is counted, none stops the run
                    rows.append({"client": number, **job.failed(e)})
                    continue
                rows.append({"client": number, **job.row(status="ok", path=path,
                                                         seconds=seconds, scores=scores)})
                if job.check:
                    pending.put((job, scores))

    def checker() -> None:
        with RankerClient(url, model=ORACLE, timeout_s=600, retries=0) as oracle:
            while (item := pending.get()) is not None:
                job = Job(item[0].request, item[0].index, model=ORACLE, tag=item[0].tag)
                if not checks_after and time.monotonic() > deadline:
                    checked.append(job.row(status="skipped"))
                    continue
                try:
                    expected, seconds = oracle.score_with_latency(job.request)
                except Exception as e:
                    checked.append(job.failed(e))
                    continue
                diff = max_abs_diff(item[1], expected)
                checked.append(job.row(status="ok" if diff <= TOLERANCE else "mismatch",
                                       seconds=seconds, max_abs_diff=diff))

    threads = [threading.Thread(target=client, args=a, daemon=True) for a in enumerate(work)]
    check = threading.Thread(target=checker, daemon=True)
    for t in threads if checks_after else [*threads, check]:
        t.start()
    start = last = time.monotonic()
    while alive := [t for t in threads if t.is_alive()]:
        alive[0].join(0.2)
        if tick:
            tick(time.monotonic() - start)
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            print(f"[{name} {last - start:.0f} s] {len(rows)} sent, {len(checked)} checked "
                  f"({pending.qsize()} queued)", flush=True)
    wall = time.monotonic() - start
    if checks_after:
        items = [pending.get() for _ in range(pending.qsize())]
        for i in sorted(np.random.default_rng(0).permutation(len(items))[:max_checks]):
            pending.put(items[i])
        check.start()
    pending.put(None)
    check.join()
    return Traffic(pd.DataFrame(rows, columns=COLUMNS), pd.DataFrame(checked, columns=COLUMNS),
                   wall)


def plan(count: int, clients: int, seed: int, declared: Declared, max_history: int,
         max_candidates: int, check_every: int, largest_first: bool) -> list[list[Job]]:
    """Job j to client j % clients, from client i's own generator and RNG (L in 0..max_history,
    N in 1..max_candidates), every check_every-th checked; with `largest_first` each client
    starts with the largest shape."""
    per_client: list[list[Job]] = [[] for _ in range(clients)]
    gens = [RequestGenerator(declared, seed=seed + i) for i in range(clients)]
    rngs = [np.random.default_rng([seed, i]) for i in range(clients)]
    for j in range(count):
        i = j % clients
        shape = ((max_history, max_candidates) if largest_first and not per_client[i] else
                 (int(rngs[i].integers(0, max_history + 1)),
                  int(rngs[i].integers(1, max_candidates + 1))))
        per_client[i].append(Job(gens[i].request(*shape), j,
                                 check_every > 0 and j % check_every == 0))
    return per_client


def percentiles_ms(seconds: Sequence[float] | pd.Series) -> dict[str, float] | None:
    """p50/p90/p99, max and mean of latencies in seconds, in ms (None for none)."""
    ms = pd.Series(seconds, dtype=float).dropna() * 1e3
    return None if ms.empty else {**{f"p{q}": round(ms.quantile(q / 100), 2) for q in (50, 90, 99)},
                                  "max": round(ms.max(), 2), "mean": round(ms.mean(), 2)}


def summary(t: Traffic, planned: int) -> dict[str, Any]:
    """A phase's counts: requests, errors (the clients' and the oracle's), checks."""
    failed = pd.concat([f for f in (t.requests, t.checks) if len(f)] or [t.requests])
    failed = failed[failed.status == "error"]
    done = t.checks[t.checks.status.isin(["ok", "mismatch"])]
    finite = pd.to_numeric(done.max_abs_diff).replace(math.inf, np.nan).dropna()
    return {"completed": int((t.requests.status == "ok").sum()), "errors": len(failed),
            "error_codes": {k: int(v) for k, v in failed.code.value_counts().items()},
            "error_samples": an.records(failed[COLUMNS[1:-2]].head(100)),
            "not_sent": planned - len(t.requests), "checks": len(done),
            "checks_skipped": int((t.checks.status == "skipped").sum()),
            "mismatches": int((done.status == "mismatch").sum()),
            "mismatch_samples": an.records(done.query("status == 'mismatch'")[COLUMNS[1:-1]]),
            "max_abs_diff": float(finite.max()) if len(finite) else 0.0}


def sample_memory(server_pid: int) -> pd.Series:
    """RSS bytes of tritonserver and every descendant, by process label."""
    labels = {pid: "tritonserver" if pid == server_pid else process_label(pid)
              for pid in process_tree(server_pid)}
    return pd.Series({pid: rss_bytes(pid) for pid in labels}, dtype=float).groupby(labels).sum()


def stop_server(server: LocalServer, timeout_s: float = 60.0) -> dict[str, Any]:
    """Stop `server` by PID and report what its clean-up had to do (LocalServer.stop)."""
    return {"exit_code": server.stop(timeout_s), **server.cleanup}


def memory_figures(after: pd.Series | None, end: pd.Series | None, peak_bytes: float,
                   max_growth_pct: float) -> dict[str, Any]:
    """Server memory after the warm-up, at the end and at its peak (MiB), and the growth."""
    if after is None or end is None:
        return {"measured": False, "reason": "no local tritonserver PID (pass --server-pid)"}
    growth = end.sum() - after.sum()
    by_process = {"after_warmup": after, "end": end, "growth": end.sub(after, fill_value=0)}
    return {"measured": True, "after_warmup_mib": round(after.sum() / MIB, 1),
            "end_mib": round(end.sum() / MIB, 1),
            "max_mib": round(max(peak_bytes, end.sum(), after.sum()) / MIB, 1),
            "growth_mib": round(growth / MIB, 1),
            "growth_pct": round(100.0 * growth / after.sum(), 2), "max_growth_pct": max_growth_pct,
            **{f"{k}_by_process_mib": (v / MIB).round(1).to_dict() for k, v in by_process.items()},
            "processes": len(end)}


def verdict(f: dict[str, Any]) -> list[str]:
    """Why the run failed (empty when it passed)."""
    w, mem = f["warmup"], f["memory"]
    return [text for failed, text in [
        (f["errors"], f"{f['errors']} errors ({f['error_codes']})"),
        (f["mismatches"], f"{f['mismatches']} mismatches against {ORACLE} "
                          f"(max abs diff {f['max_abs_diff']:.3g} > {TOLERANCE:g})"),
        (f["not_sent"] or f["checks_skipped"], f"{f['not_sent']} requests not sent and "
         f"{f['checks_skipped']} checks skipped: time limit reached"),
        (w["errors"] or w["mismatches"] or w["not_sent"] or w["checks_skipped"],
         f"warm-up: {w['errors']} errors, {w['mismatches']} mismatches, {w['not_sent']} not "
         f"sent, {w['checks_skipped']} checks skipped"),
        (mem["measured"] and mem["growth_pct"] > mem["max_growth_pct"],
         f"server memory grew {mem.get('growth_pct', 0):.1f} % after the warm-up "
         f"(> {mem.get('max_growth_pct', 0):g} %)")] if failed]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/load_test.sh", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"Load test of `{MODEL}` through a real tritonserver (its own on free ports "
        f"unless --url): concurrent clients, a sample checked against `{ORACLE}` (max abs diff "
        f"<= {TOLERANCE:g}), latency, throughput, the server's memory. Exit 0 when nothing "
        "failed, 1 on errors, mismatches, requests not sent or memory growth, 2 without server.")
    p.add_argument("--url", help="gRPC host:port of a running server")
    p.add_argument("--server-pid", type=int, help="PID of the server behind --url (memory)")
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY, help="model repository")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=800, help="measured requests")
    p.add_argument("--warmup", type=int, help="warm-up requests, the largest shape first "
                   "(default 2 per client)")
    p.add_argument("--check-every", type=int, default=20,
                   help=f"score every k-th request with {ORACLE} too (0: never)")
    p.add_argument("--max-history", type=int, help="largest L (default: the model card's)")
    p.add_argument("--max-candidates", type=int, default=200, help="largest N")
    p.add_argument("--seed", type=int, default=0, help="client i uses seed + i")
    p.add_argument("--max-growth-pct", type=float, default=20.0,
                   help="fail above this memory growth after the warm-up")
    p.add_argument("--time-limit", type=float, default=1800.0,
                   help="seconds for the run; requests not sent by then fail it")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    args = p.parse_args(argv)
    if min(args.clients, args.requests, args.max_candidates) < 1 or min(
            args.check_every, args.warmup or 0) < 0:
        p.error("--clients, --requests, --max-candidates must be >= 1, --check-every and "
                "--warmup >= 0")
    args.warmup = 2 * args.clients if args.warmup is None else args.warmup
    card = args.repository / "user_encoder" / "1" / "model_card.json"
    if args.max_history is None and not card.exists():
        p.error(f"no model card in {card.parent}: pass --max-history")
    if args.max_history is None:
        args.max_history = int(json.loads(card.read_text())["config"]["max_history"])
    return args


def measure(args: argparse.Namespace, declared: Declared, deadline: float) -> dict[str, Any]:
    """The warm-up (the largest shape first, once to the oracle too), the server's memory, the
    measured run with memory sampled every second."""
    pid, shape = args.server_pid, dict(
        clients=args.clients, declared=declared, max_history=args.max_history,
        max_candidates=args.max_candidates, check_every=args.check_every)
    warm_jobs = plan(args.warmup, seed=args.seed + 100_000, largest_first=True, **shape)
    if args.warmup:
        warm_jobs[0][0].check = args.check_every > 0
    print(f"load_test: warm-up: {args.warmup} requests, the largest shape first", flush=True)
    warm = drive(args.url, warm_jobs, deadline=deadline, name="warm-up")
    after = sample_memory(pid) if pid else None
    samples = [(-1.0, 0.0)]  # (seconds into the run, bytes)

    def tick(elapsed: float) -> None:
        if pid and elapsed - samples[-1][0] >= 1.0:
            samples.append((elapsed, sample_memory(pid).sum()))

    print(f"load_test: measuring: {args.requests} requests, {args.clients} clients", flush=True)
    started = time.monotonic()
    run = drive(args.url, plan(args.requests, seed=args.seed, largest_first=False, **shape),
                deadline=deadline, name="measure", tick=tick)
    wall, end = time.monotonic() - started, sample_memory(pid) if pid else None
    memory = pd.DataFrame(samples[1:], columns=["s", "bytes"])
    timeline = memory.groupby(memory.s // 5).first()  # every 5 s, at most 400 points
    timeline = timeline.iloc[:: math.ceil(len(timeline) / 400) or 1]
    done = run.requests[run.requests.status == "ok"]
    return {**{k: getattr(args, k) for k in ("url", "clients", "requests", "max_history",
                                              "max_candidates", "check_every")},
            "repository": str(args.repository), "model": MODEL, "oracle": ORACLE,
            "tolerance": TOLERANCE, **summary(run, args.requests),
            "ranker_wall_s": round(run.wall_s, 2), "wall_s": round(wall, 2),
            "throughput_rps": round(len(done) / run.wall_s, 2),
            "latency_ms": percentiles_ms(done.seconds),
            "check_latency_ms": percentiles_ms(run.checks.seconds),
            "warmup": {"requests": args.warmup, **summary(warm, args.warmup)},
            "memory": {**memory_figures(after, end, max(b for _, b in samples),
                                        args.max_growth_pct),
                       "timeline": (timeline / [1, MIB]).round(1).values.tolist()},
            "machine": an.machine(**an.LOCAL_SERVER)}


def report(f: dict[str, Any]) -> str:
    """The figures as a markdown table (the --json file holds all of them), then the verdict."""
    lat, mem = f["latency_ms"] or {}, f["memory"]
    rows = {"requests": f"{f['requests']} ({f['clients']} clients), completed {f['completed']},"
                        f" errors {f['errors']}, not sent {f['not_sent']}",
            f"checked against {ORACLE}": f"{f['checks']}, mismatches {f['mismatches']}, max abs "
                                         f"diff {f['max_abs_diff']:.3g}",
            "throughput": f"{f['throughput_rps']} req/s over {f['ranker_wall_s']} s (oracle "
                          f"checks alongside; last check done at {f['wall_s']} s)",
            "latency ms": ", ".join(f"{k} {lat.get(k)}" for k in ("p50", "p90", "p99", "max")),
            "server memory MiB": f"after warm-up {mem['after_warmup_mib']}, end {mem['end_mib']}, "
            f"max {mem['max_mib']}, growth {mem['growth_mib']} MiB ({mem['growth_pct']} %, limit "
            f"{mem['max_growth_pct']} %)" if mem["measured"] else f"not measured ({mem['reason']})"}
    examples = (f["error_samples"] + f["warmup"]["error_samples"])[:5]
    return "\n".join([an.table(list(rows.items()), ["figure", "value"]),
                      *[f"FAIL: {line}" for line in f["failures"]],
                      *[f"error example: {e}" for e in examples],
                      f"load_test: {'PASS' if f['ok'] else 'FAIL'}"])


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # stop the server in main's finally


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, server, stopped = time.monotonic(), None, None
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.url is None:
            print(f"load_test: starting tritonserver with {args.repository}", flush=True)
            server = start_server(grpc_port=free_port(), repository=args.repository)
            args.url, args.server_pid = server.grpc_url, server.pid
        with RankerClient(args.url, timeout_s=30.0, retries=3) as probe:
            probe.wait_ready([MODEL, ORACLE], timeout_s=60.0)
            declared = probe.model_info(MODEL).contract
        figures = measure(args, declared, started + args.time_limit)
    except (ServerError, RankerError) as e:
        print(f"load_test: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("load_test: interrupted", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            stopped = stop_server(server)
            print(f"load_test: stopped tritonserver pid {server.pid}: {stopped}", flush=True)
    figures.update(server_started=server is not None, server_stop=stopped,
                   total_s=round(time.monotonic() - started, 1))
    figures["failures"] = verdict(figures)
    figures["ok"] = not figures["failures"]
    print(report(figures), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
