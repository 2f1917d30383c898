"""Fleet benchmark: returning-user traffic to ranker_cached through nginx in front of 1, 2, 3
local replicas (local_server.fleet), consistent hashing on the user id vs round robin. Writes
fleet.csv and fleet.json, and fleet.md from them alone (--report-only DIR). Method:
benchmarks/README.md. Needs nginx (scripts/setup.sh) and an export (python -m export)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import analysis as an
from benchmarks.cpu import external_cores, snapshot
from benchmarks.load_test import TOLERANCE, Job, drive
from client.api import RankerClient
from client.contract import USER_ID_HEADER, nginx_variable
from client.split_contract import SplitContract
from client.traffic import RequestGenerator, returning_traffic
from local_server.fleet import Fleet, start_fleet
from local_server.triton import MODEL_REPOSITORY, free_port

MODEL = "ranker_cached"
TRAFFIC = {"history_lengths": [200, 500, 900], "num_candidates": 50, "check": 2}
log = an.Progress("fleet", sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY, help="every replica's")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3], help="ascending")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--users", type=int, default=64, help="users per run")
    p.add_argument("--visits", type=int, default=6, help="visits per user")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fleet"), help="folder")
    p.add_argument("--report-only", type=Path, metavar="DIR", help="rebuild DIR's fleet.md")
    args = p.parse_args(argv)
    if args.replicas != sorted(args.replicas) or args.replicas[0] < 1:
        p.error("--replicas must be ascending counts >= 1")
    return args


def warm_up(fleet: Fleet, contract: SplitContract) -> None:
    """Every path (miss, append, hit) once per replica, directly: no run pays ORT's first calls."""
    gen = RequestGenerator(contract, seed=999)
    for server in fleet.replicas:
        jobs = []
        for length in TRAFFIC["history_lengths"]:
            user, first = gen.user_id(), gen.request(length, TRAFFIC["num_candidates"])
            jobs += [Job(req, model=MODEL, user=user) for req in (
                first, gen.returning(first, 5), gen.returning(first, 0))]
        drive(server.grpc_url, [jobs])


def measure(fleet: Fleet, k: int, balance: str, settings: dict, seed: int) -> dict:
    """One run: each user's visits from one client thread, in order; paths from the replicas'
    user_cache counters; a few responses scored by ranker_naive after the run."""
    fleet.nginx.reload([s.grpc_url for s in fleet.replicas], balance=balance)
    traffic = returning_traffic(RequestGenerator(settings["contract"], seed=seed),
                                settings["users"], settings["visits"],
                                TRAFFIC["history_lengths"], TRAFFIC["num_candidates"])
    users = list(dict.fromkeys(user for user, _ in traffic))
    checks = np.random.default_rng(seed).choice(len(traffic), TRAFFIC["check"], replace=False)
    work: list[list[Job]] = [[] for _ in range(settings["concurrency"])]
    for i, (user, req) in enumerate(traffic):
        work[users.index(user) % len(work)].append(Job(req, i, i in checks, MODEL, user))
    before, start = fleet.cache_stats(), snapshot()
    run = drive(fleet.url, work, checks_after=True, name=f"K={k} {balance}")
    cores = external_cores(start).get("ext_cpu_cores")
    counts = {c: sum(getattr(a, c) - getattr(b, c) for a, b in zip(
        fleet.cache_stats(), before, strict=True)) for c in ("hits", "appends", "misses")}
    done = run.requests[run.requests.status == "ok"].seconds * 1e3
    row = {"replicas": k, "balance": balance, "requests": len(traffic),
           "failed": len(traffic) - len(done) + int((run.checks.status == "error").sum()),
           "throughput_rps": len(done) / run.wall_s, "p50_ms": done.quantile(0.5),
           "p99_ms": done.quantile(0.99), "full_encodes_per_request": counts["misses"]
           / max(sum(counts.values()), 1), **counts, "checked_vs_naive": len(run.checks),
           "max_abs_diff_vs_naive": run.checks.max_abs_diff.astype(float).max(),
           "others_cpu_cores": cores}
    log(", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return row


def report(folder: Path) -> str:
    """fleet.md from fleet.csv and fleet.json."""
    rows, run = an.read_csv(folder / "fleet.csv"), json.loads((folder / "fleet.json").read_text())
    s, by = run["settings"], rows.pivot(index="replicas", columns="balance")
    ratios = pd.DataFrame({
        "throughput hash / round robin": by.throughput_rps.hash / by.throughput_rps["round-robin"],
        "p50 round robin / hash": by.p50_ms["round-robin"] / by.p50_ms.hash,
        "full encodes round robin / hash": by.full_encodes_per_request["round-robin"]
        / by.full_encodes_per_request.hash})
    return "\n".join([
        "# Fleet: affinity vs round robin through nginx", "", f"`python -m benchmarks.fleet` "
        f"({run['date']}): `{MODEL}` behind nginx (1.22, `scripts/fleet.sh`'s config) over K local"
        f" tritonservers, `hash {nginx_variable(USER_ID_HEADER)} consistent` (the client's "
        f"`{USER_ID_HEADER}` header) vs round robin; {s['users']} new users per run x "
        f"{s['visits']} visits (first history of {s['history_lengths']} events, then repeats or "
        f"+1..10 events), N = {s['num_candidates']}, {s['concurrency']} client threads, "
        f"{s['check']} responses per run checked against `ranker_naive`. The 2 cores are shared "
        "by every replica, nginx and the client: throughput cannot scale with replicas here.", "",
        "## Machine", "", an.machine_table(run["machine"]), "", "## Results", "",
        an.table(rows, formats={"throughput_rps": "{:.1f}", "p50_ms": "{:.1f}",
                                "p99_ms": "{:.1f}", "full_encodes_per_request": "{:.3f}",
                                "max_abs_diff_vs_naive": "{:.2g}", "others_cpu_cores": "{:.2f}"},
                 missing="-"), "", "## Hash vs round robin at the same K", "",
        an.table(ratios.rename_axis("K").reset_index(), formats={c: "{:.2f}x" for c in ratios}),
        "", f"The floor of full encodes per request is one per user: 1/{s['visits']} = "
        f"{1 / s['visits']:.3f}. p99 comes from {s['users'] * s['visits']} requests per run.", ""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.report_only:
        log(f"starting 1 replica and nginx ({args.repository})")
        fleet = start_fleet(1, free_port(), args.repository, ready_timeout_s=600)
        settings = {"users": args.users, "visits": args.visits, **TRAFFIC,
                    "concurrency": args.concurrency}
        rows = []
        try:
            with RankerClient(fleet.url) as client:
                contract = client.model_info(MODEL).contract
            for k in args.replicas:
                while len(fleet.replicas) < k:
                    fleet.add_replica()
                warm_up(fleet, contract)
                for balance in ("hash", "round-robin") if k % 2 else ("round-robin", "hash"):
                    rows.append(measure(fleet, k, balance, {**settings, "contract": contract},
                                        k * 10 + (balance == "hash")))
            machine = an.machine(**an.LOCAL_SERVER, nginx="1.22 (Debian), one worker")
        finally:
            fleet.stop()
        args.report_only = args.out
        args.out.mkdir(parents=True, exist_ok=True)
        rows = pd.DataFrame(rows).sort_values(["replicas", "balance"])
        an.write_csv(args.out / "fleet.csv", rows)
        (args.out / "fleet.json").write_text(json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "settings": settings, "machine": machine},
            indent=2) + "\n")
    (args.report_only / "fleet.md").write_text(report(args.report_only))
    log(f"wrote {args.report_only}/fleet.md")
    bad = an.read_csv(args.report_only / "fleet.csv").query(f"failed > 0 or not "
                                                            f"max_abs_diff_vs_naive <= {TOLERANCE}")
    return int(len(bad) > 0)


if __name__ == "__main__":
    sys.exit(main())
