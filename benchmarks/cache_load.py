"""The user K/V cache under concurrent traffic, one server: the append cost (one client), head-of-
line blocking (3 clients of hits, alone and beside a 4th sending first visits) and a mixed
8-client returning-user load checked against ranker_naive and the cache's own counters."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import analysis as an
from benchmarks.cpu import Snapshot, snapshot
from benchmarks.user_cache import header, log, serving
from client.api import RankerClient
from client.metrics import fetch_cache_stats
from client.request import RankingRequest
from client.traffic import RequestGenerator
from export.config import ModelConfig
from export.reference_features import reference_contract
from export.triton_configs import install_python_models

REPO_ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cache_load", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(REPO_ROOT / "export/configs/ranker_causal_long.json"),
                   help="model config of the export")
    p.add_argument("--repository", type=Path, default=REPO_ROOT / "build" / "long",
                   help="its exported repository")
    p.add_argument("--length", type=int, default=8192, help="L of append and head-of-line")
    p.add_argument("--delta", type=int, default=10, help="appended events ΔL")
    p.add_argument("--num-candidates", type=int, default=50, help="N")
    p.add_argument("--requests", type=int, default=8, help="timed requests per path (append)")
    p.add_argument("--hol-seconds", type=float, default=30.0, help="each head-of-line phase")
    p.add_argument("--mixed-seconds", type=float, default=120.0, help="the mixed load")
    p.add_argument("--mixed-clients", type=int, default=8, help="clients of the mixed load")
    p.add_argument("--mixed-min-length", type=int, default=500, help="its shortest first visit")
    p.add_argument("--mixed-max-length", type=int, default=4000, help="its longest first visit")
    p.add_argument("--mixed-candidates", type=int, default=20, help="its N")
    p.add_argument("--samples", type=int, default=16, help="mixed-load responses checked")
    p.add_argument("--seed", type=int, default=0, help="traffic seed")
    p.add_argument("--out", type=Path, help="output folder",
                   default=REPO_ROOT / "benchmarks" / "results" / "user_cache_concurrency")
    return p.parse_args(argv)


@dataclass
class Record:
    """Latencies by path, errors, and what the server said each request took."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {"hit": [], "append": [],
                                                                     "miss": []})
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, path: str, seconds: float) -> None:
        with self.lock:
            self.seconds[path].append(seconds)

    def count(self) -> int:
        return sum(len(v) for v in self.seconds.values())


def visit(client: RankerClient, user: int, req: RankingRequest, record: Record) -> str | None:
    try:
        _, path, seconds = client.score_cached(req, user)
    except Exception as e:  # every failure is a finding of the run
        with record.lock:
            record.errors.append(f"{type(e).__name__}: {e}")
        return None
    record.add(path, seconds)
    return path


def append_cost(client: RankerClient, gen: RequestGenerator, args: argparse.Namespace) -> dict:
    log(f"append cost at L={args.length}, ΔL={args.delta}, {args.requests} requests per path")
    record = Record()
    n = args.num_candidates
    for _ in range(args.requests):
        user, req = gen.user_id(), gen.request(args.length, n)
        visit(client, user, req, record)  # miss
        visit(client, user, gen.returning(req, 0), record)  # hit
        user, req = gen.user_id(), gen.request(args.length - args.delta, n)
        client.score(req, "ranker_cached", user)
        visit(client, user, gen.returning(req, args.delta), record)  # append
    hit, append, miss = (an.percentile_ms(record.seconds[p], 50) for p in ("hit", "append", "miss"))
    return {"hit_p50_ms": hit, "append_p50_ms": append, "miss_p50_ms": miss,
            "append_share": (append - hit) / (miss - hit), "errors": len(record.errors),
            "counts": {p: len(v) for p, v in record.seconds.items()}}


def run_clients(workers: list, seconds: float) -> None:
    stop = time.monotonic() + seconds
    threads = [threading.Thread(target=w, args=(stop,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def head_of_line(url: str, gen: RequestGenerator, args: argparse.Namespace) -> dict:
    n, length = args.num_candidates, args.length
    users = {gen.user_id(): gen.request(length, n) for _ in range(3)}
    with RankerClient(url, timeout_s=600) as client:
        for user, req in users.items():
            client.score(req, "ranker_cached", user)
    out = {}
    for phase in ("alone", "with misses"):
        log(f"head-of-line, hits {phase}: {args.hol_seconds:.0f} s")
        record = Record()

        def repeats(stop: float, user: int, record: Record = record) -> None:
            own = RequestGenerator(gen.layout, seed=user % 10_000)
            with RankerClient(url, timeout_s=600) as client:
                while time.monotonic() < stop:
                    visit(client, user, own.returning(users[user], 0), record)

        def first_visits(stop: float, record: Record = record) -> None:
            own = RequestGenerator(gen.layout, seed=gen.seed + 99)
            with RankerClient(url, timeout_s=600) as client:
                while time.monotonic() < stop:
                    visit(client, own.user_id(), own.request(length, n), record)

        workers = [lambda stop, u=u: repeats(stop, u) for u in users]
        if phase == "with misses":
            workers.append(first_visits)
        run_clients(workers, args.hol_seconds)
        out[phase] = record
    alone, busy = out["alone"], out["with misses"]
    hit_alone = an.percentile_ms(alone.seconds["hit"], 50)
    return {"hit_p50_alone_ms": hit_alone,
            "hit_p90_alone_ms": an.percentile_ms(alone.seconds["hit"], 90),
            "hit_p50_with_misses_ms": an.percentile_ms(busy.seconds["hit"], 50),
            "hit_p90_with_misses_ms": an.percentile_ms(busy.seconds["hit"], 90),
            "miss_p50_ms": an.percentile_ms(busy.seconds["miss"], 50),
            "hits_alone": len(alone.seconds["hit"]), "hits_with_misses": len(busy.seconds["hit"]),
            "misses": len(busy.seconds["miss"]),
            "unexpected_paths": len(alone.seconds["miss"]) + len(alone.seconds["append"])
            + len(busy.seconds["append"]),
            "errors": len(alone.errors) + len(busy.errors)}


def mixed_load(url: str, metrics: str, gen: RequestGenerator, args: argparse.Namespace) -> dict:
    log(f"mixed load: {args.mixed_clients} clients, {args.mixed_seconds:.0f} s")
    record = Record()
    samples: list[tuple[RankingRequest, np.ndarray]] = []
    sample_every = 7

    def client_loop(stop: float, index: int) -> None:
        own = RequestGenerator(gen.layout, seed=args.seed * 1000 + index)
        rng = np.random.default_rng(index)
        users: dict[int, RankingRequest] = {}
        sent = 0
        with RankerClient(url, timeout_s=600) as client:
            while time.monotonic() < stop:
                roll = rng.random()
                if not users or roll < 0.2:
                    user = own.user_id()
                    length = int(rng.integers(args.mixed_min_length, args.mixed_max_length + 1))
                    req = own.request(length, args.mixed_candidates)
                else:
                    user = list(users)[int(rng.integers(len(users)))]
                    grow = 0 if roll < 0.6 else int(rng.integers(1, 11))
                    req = own.returning(users[user], grow)
                try:
                    scores, path, seconds = client.score_cached(req, user)
                except Exception as e:  # every failure is a finding of the run
                    with record.lock:
                        record.errors.append(f"{type(e).__name__}: {e}")
                    continue
                record.add(path, seconds)
                users[user] = req
                sent += 1
                if sent % sample_every == 0:
                    with record.lock:
                        samples.append((req, scores))

    before = fetch_cache_stats(metrics)
    run_clients([lambda stop, i=i: client_loop(stop, i) for i in range(args.mixed_clients)],
                args.mixed_seconds)
    after = fetch_cache_stats(metrics)
    counters = {"hit": after.hits - before.hits, "append": after.appends - before.appends,
                "miss": after.misses - before.misses}
    sent = {p: len(v) for p, v in record.seconds.items()}
    rng = np.random.default_rng(args.seed)
    chosen = [samples[i] for i in rng.choice(len(samples), min(args.samples, len(samples)),
                                             replace=False)]
    log(f"checking {len(chosen)} sampled responses against ranker_naive")
    worst = 0.0
    with RankerClient(url, timeout_s=600) as client:
        for req, scores in chosen:
            worst = max(worst, float(np.abs(client.score(req, "ranker_naive") - scores).max()))
    return {"requests": record.count(), "errors": len(record.errors),
            "first_errors": record.errors[:3], "paths_reported": sent,
            "counters": counters, "counters_add_up": counters == sent and not record.errors,
            "sampled": len(chosen), "max_abs_diff_vs_naive": worst,
            "p50_ms": {p: an.percentile_ms(v, 50) for p, v in record.seconds.items()},
            "p90_ms": {p: an.percentile_ms(v, 90) for p, v in record.seconds.items()}}


def markdown(args: argparse.Namespace, cfg: ModelConfig, start: Snapshot | None, cost: dict,
             hol: dict, mixed: dict) -> str:
    hol_ratio = hol["hit_p90_with_misses_ms"] / hol["miss_p50_ms"]
    slow = hol["hit_p50_with_misses_ms"] / hol["hit_p50_alone_ms"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    lines = [
        *header("ranker_cached under concurrent traffic", "cache_load", args.config, cfg, start,
                "gRPC client latency, one run, one server."),
        "## Targets", "",
        an.table([
            [f"append, L = {args.length}, ΔL = {args.delta}, N = {args.num_candidates}",
             "(append p50 - hit p50) <= 5 % of (miss p50 - hit p50)",
             f"({cost['append_p50_ms']:.1f} - {cost['hit_p50_ms']:.1f}) / "
             f"({cost['miss_p50_ms']:.1f} - {cost['hit_p50_ms']:.1f}) = "
             f"{cost['append_share']:.1%}", verdict(cost["append_share"] <= 0.05)],
            [f"head-of-line, L = {args.length}: 3 clients of repeats + 1 of first visits",
             "hit p90 <= 0.3 x miss p50", f"{hol['hit_p90_with_misses_ms']:.1f} / "
             f"{hol['miss_p50_ms']:.1f} = {hol_ratio:.2f}", verdict(hol_ratio <= 0.3)],
            ["same", "hit p50 with misses <= 2 x hit p50 alone",
             f"{hol['hit_p50_with_misses_ms']:.1f} / {hol['hit_p50_alone_ms']:.1f} = {slow:.2f}",
             verdict(slow <= 2)],
            [f"mixed load, {args.mixed_clients} clients, {args.mixed_seconds:.0f} s, L in "
             f"[{args.mixed_min_length}, {args.mixed_max_length}], N = {args.mixed_candidates}",
             "0 errors", f"{mixed['errors']} errors in {mixed['requests']} requests",
             verdict(mixed["errors"] == 0)],
            ["same", "every sampled response equals ranker_naive", f"{mixed['sampled']} sampled, "
             f"max abs diff {mixed['max_abs_diff_vs_naive']:.2e}",
             verdict(mixed["max_abs_diff_vs_naive"] <= TOLERANCE and mixed["sampled"] > 0)],
            ["same", "the cache's counters add up to the requests sent",
             f"counters {mixed['counters']}, responses {mixed['paths_reported']}",
             verdict(mixed["counters_add_up"])]],
            ["measurement", "target", "measured", "verdict"]), "",
        "## Details", "",
        f"- Append measurement (one client, {args.requests} requests per path): paths "
        f"{cost['counts']}, {cost['errors']} errors.",
        f"- Head-of-line: hit p50 / p90 alone {hol['hit_p50_alone_ms']:.1f} / "
        f"{hol['hit_p90_alone_ms']:.1f} ms ({hol['hits_alone']} hits); with misses "
        f"{hol['hit_p50_with_misses_ms']:.1f} / {hol['hit_p90_with_misses_ms']:.1f} ms "
        f"({hol['hits_with_misses']} hits, {hol['misses']} misses, miss p50 "
        f"{hol['miss_p50_ms']:.1f} ms); other paths where only hits were expected: "
        f"{hol['unexpected_paths']}; errors {hol['errors']}.",
        f"- Mixed load p50 (ms): {fmt(mixed['p50_ms'])}; p90: {fmt(mixed['p90_ms'])}.",
        "",
    ]
    return "\n".join(lines)


def fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in values.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = ModelConfig.load(args.config)
    if args.length > cfg.max_history or not cfg.appends:
        log(f"this benchmark needs a causal config with max_history >= {args.length}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    install_python_models(args.repository)  # serve the user_cache code of this checkout
    gen = RequestGenerator(reference_contract(cfg), seed=args.seed)
    start = snapshot()
    with serving(args.repository) as (server, metrics):
        with RankerClient(server.grpc_url, timeout_s=600) as client:
            for _ in range(2):  # ONNX Runtime's first calls of each model
                user, req = gen.user_id(), gen.request(args.length - args.delta, 4)
                client.score(req, "ranker_cached", user)
                client.score(gen.returning(req, args.delta), "ranker_cached", user)
            cost = append_cost(client, gen, args)
        hol = head_of_line(server.grpc_url, gen, args)
        mixed = mixed_load(server.grpc_url, metrics, gen, args)
    rows = {"append": {**{k: v for k, v in cost.items() if k != "counts"},
                       **{f"{p}_count": v for p, v in cost["counts"].items()}},
            "head_of_line": hol,
            "mixed": {"requests": mixed["requests"], "errors": mixed["errors"],
                      "sampled": mixed["sampled"],
                      "max_abs_diff_vs_naive": mixed["max_abs_diff_vs_naive"],
                      "counters_add_up": mixed["counters_add_up"],
                      **{f"{p}_p50_ms": v for p, v in mixed["p50_ms"].items()},
                      **{f"{p}_p90_ms": v for p, v in mixed["p90_ms"].items()},
                      **{f"{p}_responses": v for p, v in mixed["paths_reported"].items()},
                      **{f"{p}_counter": v for p, v in mixed["counters"].items()}}}
    an.write_csv(args.out / "cache_load.csv", [
        {"measurement": measurement, "quantity": k, "value": v}
        for measurement, values in rows.items() for k, v in values.items()])
    (args.out / "cache_load.md").write_text(markdown(args, cfg, start, cost, hol, mixed))
    log(f"wrote {args.out / 'cache_load.md'}")
    ok = (mixed["errors"] == 0 and mixed["counters_add_up"]
          and mixed["max_abs_diff_vs_naive"] <= TOLERANCE and not hol["errors"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
