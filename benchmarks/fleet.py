"""Fleet benchmark: returning-user traffic to ranker_cached through nginx in front of 1, 2, 3
local replicas (local_server.fleet), consistent hashing on the user id vs round robin, side by
side: throughput, client p50/p99, full encodes per request (user_cache's counters over the
replicas), a few responses checked against ranker_naive. Replicas share this machine's cores, so
throughput cannot scale here; the cache figures do not depend on cores."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import analysis as an
from benchmarks.cpu import external_cores, snapshot
from client.api import RankerClient, RankerError
from client.contract import USER_ID_HEADER, nginx_variable
from client.request import RankingRequest
from client.split_contract import SplitContract
from client.traffic import RequestGenerator, returning_traffic
from local_server.fleet import Fleet, start_fleet
from local_server.triton import MODEL_REPOSITORY, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "ranker_cached"
TOLERANCE = 1e-5


log = an.Progress("fleet", sys.stderr)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__ + " Needs "
                                "nginx (scripts/setup.sh) and an export (python -m export).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY,
                   help="model repository every replica serves")
    p.add_argument("--replicas", type=_ints, default="1,2,3", help="replica counts, ascending")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--users", type=int, default=64, help="users per run")
    p.add_argument("--visits", type=int, default=6, help="visits per user")
    p.add_argument("--history-lengths", type=_ints, default="200,500,900",
                   help="first-visit history lengths, drawn per user (later visits add 0-10)")
    p.add_argument("--num-candidates", type=int, default=50, help="N")
    p.add_argument("--check", type=int, default=2, help="responses per run checked vs naive")
    p.add_argument("--seed", type=int, default=0, help="traffic seed")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "fleet",
                   help="results directory")
    args = p.parse_args(argv)
    if not args.replicas or args.replicas != sorted(args.replicas) or args.replicas[0] < 1:
        p.error("--replicas must be ascending counts >= 1")
    if min(args.concurrency, args.users, args.visits, args.num_candidates) < 1:
        p.error("--concurrency, --users, --visits and --num-candidates must be >= 1")
    return args


def warm_up(fleet: Fleet, contract: SplitContract, lengths: list[int], n: int) -> None:
    """Every path (miss, append, hit) of every model once per replica, directly, so that no
    run pays ONNX Runtime's first calls."""
    gen = RequestGenerator(contract, seed=999)
    for server in fleet.replicas:
        with RankerClient(server.grpc_url, model=MODEL, timeout_s=300) as client:
            for length in lengths:
                user, first = gen.user_id(), gen.request(length, n)
                for req in (first, gen.returning(first, 5), gen.returning(first, 0)):
                    client.score(req, user_id=user)


def run(fleet: Fleet, traffic: list[tuple[int, RankingRequest]], concurrency: int,
        checks: set[int]) -> dict:
    """Send `traffic` from `concurrency` threads; per-request latency, wall time, failures and
    the scores of the requests at the indices in `checks`."""
    users = list(dict.fromkeys(u for u, _ in traffic))
    owner = {u: i % concurrency for i, u in enumerate(users)}
    work: list[list[int]] = [[] for _ in range(concurrency)]
    for index, (user, _) in enumerate(traffic):
        work[owner[user]].append(index)
    latencies: list[float] = []
    failures: list[str] = []
    kept: dict[int, np.ndarray] = {}
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def worker(indices: list[int]) -> None:
        with RankerClient(fleet.url, model=MODEL, timeout_s=300) as client:
            client.model_info()
            start.wait()
            for index in indices:
                user, req = traffic[index]
                try:
                    scores, seconds = client.score_with_latency(req, user_id=user)
                except RankerError as e:
                    with lock:
                        failures.append(str(e))
                    continue
                with lock:
                    latencies.append(seconds)
                    if index in checks:
                        kept[index] = scores

    threads = [threading.Thread(target=worker, args=(w,)) for w in work]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - began, "latencies": latencies,
            "failures": failures, "scores": kept}


def measure(fleet: Fleet, k: int, balance: str, args: argparse.Namespace, contract: SplitContract,
            seed: int) -> dict:
    urls = [s.grpc_url for s in fleet.replicas]
    fleet.nginx.reload(urls, balance=balance)
    gen = RequestGenerator(contract, seed=seed)
    traffic = returning_traffic(gen, args.users, args.visits, args.history_lengths,
                                args.num_candidates)
    rng = np.random.default_rng(seed)
    checks = set(rng.choice(len(traffic), size=min(args.check, len(traffic)), replace=False)
                 .tolist())
    before = fleet.cache_stats()
    snap = snapshot()
    result = run(fleet, traffic, args.concurrency, checks)
    contention = external_cores(snap)
    after = fleet.cache_stats()
    hits = sum(a.hits - b.hits for a, b in zip(after, before, strict=True))
    appends = sum(a.appends - b.appends for a, b in zip(after, before, strict=True))
    misses = sum(a.misses - b.misses for a, b in zip(after, before, strict=True))
    worst = 0.0
    with RankerClient(fleet.url, timeout_s=600) as client:
        for index, scores in result["scores"].items():
            expected = client.score(traffic[index][1], "ranker_naive")
            worst = max(worst, float(np.max(np.abs(scores - expected))))
    served = hits + appends + misses
    row = {
        "replicas": k, "balance": balance, "requests": len(traffic),
        "failed": len(result["failures"]),
        "throughput_rps": len(result["latencies"]) / result["wall_s"],
        "p50_ms": an.percentile_ms(result["latencies"], 50),
        "p99_ms": an.percentile_ms(result["latencies"], 99),
        "full_encodes_per_request": misses / served if served else float("nan"),
        "hits": hits, "appends": appends, "misses": misses,
        "checked_vs_naive": len(result["scores"]), "max_abs_diff_vs_naive": worst,
        "others_cpu_cores": contention.get("ext_cpu_cores"),
    }
    log(f"K={k} {balance}: {row['throughput_rps']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, "
        f"p99 {row['p99_ms']:.1f} ms, full encodes/request "
        f"{row['full_encodes_per_request']:.3f} ({hits} hits, {appends} appends, {misses} "
        f"misses), failed {row['failed']}, max |diff| vs naive {worst:.2g}")
    if result["failures"]:
        log("first failure: " + result["failures"][0])
    return row


def markdown(args: argparse.Namespace, rows: list[dict], info: dict[str, str]) -> str:
    lines = [
        "# Fleet: affinity vs round robin through nginx", "",
        f"`python -m benchmarks.fleet` ({time.strftime('%Y-%m-%d')}): `ranker_cached` behind "
        f"nginx (Debian's 1.22, `scripts/fleet.sh`'s config) over K local tritonservers; "
        f"`hash` = `hash {nginx_variable(USER_ID_HEADER)} consistent` (the client's "
        f"`{USER_ID_HEADER}` header), `round-robin` = the same replicas without it. "
        f"Returning-user traffic (`client.traffic.returning_traffic`): {args.users} new users "
        f"per run x {args.visits} visits, first history of {args.history_lengths} events, "
        f"each later visit a repeat or +1..10 events, N = {args.num_candidates}, "
        f"{args.concurrency} client threads; latency is one RPC at the client. "
        f"{args.check} responses per run checked against `ranker_naive`.", "",
        "## Machine", "", an.machine_table(info), "",
        "**This machine has 2 cores, shared by every replica** (and nginx, and the client), so "
        "throughput cannot scale with replicas here: more replicas only add processes competing "
        "for the same cores. Read the throughput and latency columns as hash vs round robin at "
        "the same K; the cache column does not depend on cores.", "",
        "## Results", "",
        an.table(rows, {"K": "replicas", "balance": "balance", "requests": "requests",
                     "failed": "failed", "req/s": "throughput_rps", "p50 ms": "p50_ms",
                     "p99 ms": "p99_ms", "full encodes / request": "full_encodes_per_request",
                     "hits": "hits", "appends": "appends", "misses": "misses",
                     "max abs diff vs naive": "max_abs_diff_vs_naive",
                     "others' CPU (cores)": "others_cpu_cores"},
              {"throughput_rps": "{:.1f}", "p50_ms": "{:.1f}", "p99_ms": "{:.1f}",
               "full_encodes_per_request": "{:.3f}", "max_abs_diff_vs_naive": "{:.2g}",
               "others_cpu_cores": "{:.2f}"}, missing="-"),
        "", "## Hash vs round robin at the same K", "",
    ]
    pairs = []
    for k in sorted({r["replicas"] for r in rows}):
        pair = {r["balance"]: r for r in rows if r["replicas"] == k}
        if {"hash", "round-robin"} <= set(pair):
            h, rr = pair["hash"], pair["round-robin"]
            pairs.append([k, f"{h['throughput_rps'] / rr['throughput_rps']:.2f}x",
                          f"{rr['p50_ms'] / h['p50_ms']:.2f}x",
                          f"{rr['full_encodes_per_request'] / h['full_encodes_per_request']:.2f}x"])
    lines.append(an.table(pairs, ["K", "throughput hash / round robin", "p50 round robin / hash",
                               "full encodes round robin / hash"]))
    lines += ["", "With K = 1 both rules send everything to the one replica (the same paths): "
              "there the columns show this machine's noise. Two replicas can keep both cores "
              "busy, a third cannot add any.",
              "", f"The floor of full encodes per request is one per user: 1/{args.visits} = "
              f"{1 / args.visits:.3f}. p99 comes from {args.users * args.visits} requests per "
              f"run (about the {max(1, round(args.users * args.visits / 100))} slowest).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log(f"starting 1 replica and nginx ({args.repository})")
    fleet = start_fleet(1, free_port(), args.repository, ready_timeout_s=600)
    rows = []
    try:
        with RankerClient(fleet.url) as client:
            contract = client.model_info(MODEL).contract
        for k in args.replicas:
            while len(fleet.replicas) < k:
                log(f"adding replica {len(fleet.replicas) + 1}")
                fleet.add_replica()
            log(f"K={k}: warming up every replica")
            warm_up(fleet, contract, args.history_lengths, args.num_candidates)
            order = ("hash", "round-robin") if k % 2 else ("round-robin", "hash")
            for balance in order:
                seed = args.seed * 1000 + k * 10 + (balance == "hash")
                rows.append(measure(fleet, k, balance, args, contract, seed))
        info = an.machine(**an.LOCAL_SERVER, nginx="1.22 (Debian), one worker")
    finally:
        fleet.stop()
    rows.sort(key=lambda r: (r["replicas"], r["balance"] != "hash"))
    args.out.mkdir(parents=True, exist_ok=True)
    an.write_csv(args.out / "fleet.csv", rows)
    (args.out / "fleet.md").write_text(markdown(args, rows, info))
    log(f"wrote {args.out / 'fleet.csv'} and {args.out / 'fleet.md'}")
    bad = [r for r in rows if r["failed"] or r["max_abs_diff_vs_naive"] > TOLERANCE]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
