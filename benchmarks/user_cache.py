"""Returning-user benchmarks of ranker_cached (the user K/V cache) through a real tritonserver:
each path at concurrency 1 against `ranker` (user_cache.csv), or with --concurrent the append
cost and head-of-line blocking (cache_load.csv). Every report is made from its CSV and the run's
JSON alone (--report-only DIR). Method: benchmarks/README.md."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from benchmarks import analysis as an
from benchmarks.cpu import CONTENDED_CORES, external_cores, snapshot
from benchmarks.feeds import fusion_feeds, history_feeds
from benchmarks.load_test import TOLERANCE, Job, drive, max_abs_diff
from client.api import RankerClient
from client.metrics import fetch_cache_stats
from client.request import RankingRequest
from client.traffic import RequestGenerator
from export.config import DEFAULT_CONFIG, ModelConfig
from export.reference_features import reference_contract
from export.triton_configs import install_python_models
from local_server.processes import rss_bytes, stub_pids
from local_server.triton import MODEL_REPOSITORY, free_port, start_server

CACHED, PATHS = "ranker_cached", ["hit", "append", "miss"]
NOTES = {"miss": "first visit: user_encoder + store", "repeat": "same history, new candidates: "
         "no encoder", "target_fusion alone": "the floor of a hit",
         "user_encoder alone": "a full encode"}
log = an.Progress("user_cache", sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.user_cache", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config of the export")
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY, help="its export")
    p.add_argument("--lengths", type=int, nargs="+", default=[1000], help="history lengths L")
    p.add_argument("--deltas", type=int, nargs="+", default=[1, 10, 100], help="appended ΔL")
    p.add_argument("--num-candidates", type=int, default=50, help="N")
    p.add_argument("--requests", type=int, default=15, help="timed requests per path and model")
    p.add_argument("--concurrent", action="store_true", help="the append cost (ΔL = 10) and "
                   "head-of-line blocking at the first of --lengths instead (cache_load.csv)")
    p.add_argument("--seconds", type=float, default=30.0, help="each head-of-line phase")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    p.add_argument("--report-only", type=Path, metavar="DIR", help="rebuild DIR's reports")
    return p.parse_args(argv)


def paths(gen: RequestGenerator, length: int, n: int, count: int, deltas: list[int],
          paired: bool) -> Iterator[Job]:
    """Per path `count` ranker_cached requests of new users, each after the visit that fills
    the cache (tag "prime"), with `paired` `ranker` on the same request next."""
    for (path, delta), i in itertools.product([("miss", 0), ("repeat", 0)] + [
            ("append", d) for d in deltas if d < length], range(count)):
        user, req = gen.user_id(), gen.request(length - delta, n)
        if path != "miss":
            yield Job(req, user=user, model=CACHED, tag="prime")
            req = gen.returning(req, delta)
        yield Job(req, i, user=user, model=CACHED, tag=f"{path} {delta}")
        if paired:
            yield Job(req, i, tag=f"{path} {delta}")


def raw(url: str, model: str, tensors: dict[str, np.ndarray], outputs: list[str]
        ) -> tuple[list[np.ndarray], float]:
    """(outputs, seconds) of one request to a composing model."""
    inputs = [grpcclient.InferInput(k, list(v.shape), np_to_triton_dtype(v.dtype))
              for k, v in tensors.items()]
    for tensor, value in zip(inputs, tensors.values(), strict=True):
        tensor.set_data_from_numpy(value)
    with grpcclient.InferenceServerClient(url) as client:
        start = time.perf_counter()
        result = client.infer(model, inputs, client_timeout=300)
        return [result.as_numpy(o) for o in outputs], time.perf_counter() - start


def latencies(name: str, seconds: pd.Series) -> dict[str, float]:
    return {f"{name}_p{q}_ms": round(seconds.quantile(q / 100) * 1e3, 3) for q in (50, 90)}


def per_path(url: str, gen: RequestGenerator, length: int, args: argparse.Namespace,
             deltas: list[int]) -> list[dict]:
    """user_cache.csv's rows at one L, and target_fusion / user_encoder called alone."""
    n, count = args.num_candidates, args.requests
    log(f"L={length}: warm-up, then {count} requests per path and model")
    drive(url, [paths(gen, length, n, 1, [], paired=True)])
    sent = drive(url, [paths(gen, length, n, count, deltas, paired=True)]).requests
    rows = []
    for tag, by in sent[sent.tag != "prime"].groupby("tag", sort=False):
        path, delta = tag.split()
        pairs = by[by.model == CACHED].merge(by[by.model == "ranker"], on="index",
                                             suffixes=("", "_ranker"))
        diff = max(map(max_abs_diff, pairs.scores, pairs.scores_ranker))
        seen = " ".join(f"{k}:{v}" for k, v in sorted(pairs.path.value_counts().items()))
        rows.append({"L": length, "N": n, "path": path, "delta": int(delta),
                     "requests": len(pairs), **latencies("cached", pairs.seconds),
                     **latencies("ranker", pairs.seconds_ranker), "cached_over_ranker_p50": round(
                         pairs.seconds.median() / pairs.seconds_ranker.median(), 3),
                     "paths_seen": seen, "max_abs_diff_vs_ranker": f"{diff:.2e}",
                     "note": NOTES.get(path, f"{length - int(delta)} cached + {delta} new: "
                                       "user_encoder_append")})
    with RankerClient(url) as client:
        contract = client.model_info("ranker").contract
    encoder, fusion = [], []
    for _ in range(count):
        req = gen.request(length, n).as_inputs()
        state, seconds = raw(url, "user_encoder", history_feeds(contract, req),
                             [s.name for s in contract.state])
        encoder.append(seconds)
        fusion.append(raw(url, "target_fusion", fusion_feeds(contract, req, state),
                          [contract.outputs[0].name])[1])
    return rows + [{"L": length, "N": n, "path": path, "delta": "", "requests": count,
                    **latencies("cached", pd.Series(seconds)), "note": NOTES[path]}
                   for path, seconds in (("target_fusion alone", fusion),
                                         ("user_encoder alone", encoder))]


def memory_per_user(url: str, server_pid: int, metrics: str, gen: RequestGenerator,
                    length: int, users: int = 20) -> dict:
    """user_cache's bytes per user (bytes held / users held) and the stub's RSS growth per added
    user (None when users were evicted meanwhile)."""
    stubs = stub_pids(server_pid, "user_cache")
    before, rss = fetch_cache_stats(metrics), sum(map(rss_bytes, stubs))
    drive(url, [[Job(gen.request(length, 1), model=CACHED, user=gen.user_id())
                 for _ in range(users)]])
    after, grown = fetch_cache_stats(metrics), sum(map(rss_bytes, stubs)) - rss
    added, evictions = after.users - before.users, after.evictions - before.evictions
    return {"L": length, "users_added": added, "evictions": evictions,
            "bytes_per_user": after.bytes_held / max(after.users, 1),
            "rss_per_user": grown / added if added and not evictions else None}


def visits(seed: int, gen: RequestGenerator, user: int | None, first: RankingRequest | None,
           length: int, n: int) -> Iterator[Job]:
    """Endless visits of one client: `user` again with `first`'s history, or new users."""
    own = RequestGenerator(gen.layout, seed=seed)
    while True:
        yield Job(own.returning(first, 0) if first else own.request(length, n), model=CACHED,
                  user=user or own.user_id())


def concurrent(url: str, gen: RequestGenerator, length: int, args: argparse.Namespace
               ) -> list[dict]:
    """cache_load.csv's rows: the append cost (one client), then head-of-line blocking: hits of
    3 clients alone, then beside a 4th client sending first visits."""
    n = args.num_candidates
    log(f"append cost at L={length}, ΔL=10, {args.requests} requests per path")
    sent = drive(url, [paths(gen, length, n, args.requests, [10], paired=False)]).requests
    sent = sent[sent.tag != "prime"]
    p50, counts = sent.groupby("path").seconds.median() * 1e3, sent.path.value_counts()
    figures = {"append": {**{f"{p}_p50_ms": p50[p] for p in PATHS},
                          "append_share": (p50.append - p50.hit) / (p50.miss - p50.hit),
                          "errors": int((sent.status != "ok").sum()),
                          **{f"{p}_count": int(counts.get(p, 0)) for p in PATHS}}}
    users = {gen.user_id(): gen.request(length, n) for _ in range(3)}
    drive(url, [[Job(req, model=CACHED, user=user) for user, req in users.items()]])
    phases = {}
    for name in ("alone", "with_misses"):
        log(f"head-of-line, hits {name}: {args.seconds:.0f} s")
        work = [visits(user % 10_000, gen, user, req, length, n) for user, req in users.items()]
        if name == "with_misses":
            work.append(visits(gen.seed + 99, gen, None, None, length, n))
        phases[name] = drive(url, work, deadline=time.monotonic() + args.seconds).requests
    busy, hits = phases["with_misses"], {k: v[v.path == "hit"].seconds * 1e3
                                         for k, v in phases.items()}
    figures["head_of_line"] = {
        **{f"hit_p{q}_{k}_ms": hits[k].quantile(q / 100) for k in phases for q in (50, 90)},
        "miss_p50_ms": busy[busy.path == "miss"].seconds.median() * 1e3,
        **{f"hits_{k}": len(hits[k]) for k in phases}, "misses": int((busy.path == "miss").sum()),
        "unexpected_paths": int((phases["alone"].path != "hit").sum()
                                + (busy.path == "append").sum()),
        "errors": int(sum((v.status != "ok").sum() for v in phases.values()))}
    return [{"measurement": m, "quantity": q, "value": v}
            for m, values in figures.items() for q, v in values.items()]


def header(title: str, run: dict, detail: str) -> list[str]:
    return [f"# {title}", "", f"`{run['command']}` ({run['date']}), config `{run['config']}` "
            f"({run['model']}), {detail}", "", "## Machine", "", an.machine_table(run["machine"]),
            ""]


def paths_report(rows: pd.DataFrame, run: dict) -> str:
    """user_cache.md: the per-path table, the targets the run can judge, memory per user."""
    s, mem, mib, targets = run["settings"], run["memory"], 2**20, []
    for length, by in rows.groupby("L"):
        p50 = {(r.path, r.delta): r.cached_p50_ms for r in by.fillna({"delta": ""}).itertuples()}
        hit, miss = p50["repeat", 0], p50["miss", 0]
        repeat = an.ratio(hit, p50["target_fusion alone", ""])
        ratio = an.pick(by, "cached_over_ranker_p50", path="miss")
        share = an.ratio(p50.get(("append", 10), math.nan) - hit, miss - hit)
        targets += [[length, "a repeat costs <= 1.3x target_fusion alone", an.fmt(repeat, unit="x"),
                     an.check(repeat, 1.3, higher=False)[0]],
                    [length, "a miss costs <= 1.1x ranker", an.fmt(ratio, unit="x"),
                     an.check(ratio, 1.1, higher=False)[0]],
                    [length, "an append of ΔL = 10 costs <= 5 % of a full encode (the target is "
                     "set at L = 8192): (append p50 - repeat p50) / (miss p50 - repeat p50)",
                     an.pct(share), an.check(share, 0.05, higher=False)[0]]]
    rss = (f"the stub's RSS grew {mem['rss_per_user'] / mib:.3f} MiB per user over "
           f"{mem['users_added']} added users" if mem["rss_per_user"] is not None else
           f"RSS growth not measured: the cache was full ({mem['evictions']} evictions while "
           "adding users)")
    return "\n".join([
        *header("ranker_cached: returning-user benchmark", run, f"N = {s['num_candidates']}, "
                f"{s['requests']} timed requests per path and model, gRPC client latency (one "
                "RPC, client side), concurrency 1."), "## Per path (p50 / p90 in ms)", "",
        an.table(rows.drop(columns=["N", "requests", "note"]), missing="", formats={
            **{c: "{:g}" for c in rows.select_dtypes("number")},
            "max_abs_diff_vs_ranker": "{:.2e}"}), "",
        "## Targets", "", an.table(targets, ["L", "target", "measured", "verdict"]), "",
        "## Memory per cached user", "", f"At L = {mem['L']}: user_cache holds "
        f"{mem['bytes_per_user'] / mib:.3f} MiB per user by its own accounting (bytes held / "
        f"users held: user K/V + events); {rss}; the formula `layers x 2 x L x d_model x 4` "
        f"gives {run['kv_bytes_per_event'] * mem['L'] / mib:.3f} MiB of fp32 user K/V.", "",
        *(["## Notes", "", *[f"- {note}" for note in run["notes"]], ""] if run["notes"] else [])])


def load_report(rows: pd.DataFrame, run: dict) -> str:
    """cache_load.md: the targets under concurrency, then every figure of the CSV."""
    v = {(r.measurement, r.quantity): an.num(r.value) for r in rows.itertuples()}
    s, append, hol = run["settings"], v["append", "append_share"], "head_of_line"
    blocking = v[hol, "hit_p90_with_misses_ms"] / v[hol, "miss_p50_ms"]
    slowdown = v[hol, "hit_p50_with_misses_ms"] / v[hol, "hit_p50_alone_ms"]
    targets = [
        [f"append, L = {s['length']}, ΔL = 10, N = {s['num_candidates']}", "(append p50 - hit "
         "p50) <= 5 % of (miss p50 - hit p50)", an.pct(append), an.check(append, 0.05, False)[0]],
        [f"head-of-line, L = {s['length']}: 3 clients of repeats + 1 of first visits",
         "hit p90 <= 0.3 x miss p50", f"{blocking:.2f}", an.check(blocking, 0.3, False)[0]],
        ["same", "hit p50 with misses <= 2 x hit p50 alone", f"{slowdown:.2f}",
         an.check(slowdown, 2, False)[0]]]
    return "\n".join([
        *header("ranker_cached under concurrent traffic", run, "gRPC client latency, one run, "
                "one server."), "## Targets", "",
        an.table(targets, ["measurement", "target", "measured", "verdict"]), "", "## Figures", "",
        an.table(rows, formats={"value": "{:.4g}"}), ""])


def write_reports(folder: Path) -> None:
    """Each report whose CSV is in `folder`, from that CSV and the run's JSON alone."""
    for name, render in (("user_cache", paths_report), ("cache_load", load_report)):
        if (folder / f"{name}.csv").exists():
            run = json.loads((folder / f"{name}.json").read_text())
            (folder / f"{name}.md").write_text(render(an.read_csv(folder / f"{name}.csv"), run))
            log(f"wrote {folder / name}.md")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        write_reports(args.report_only)
        return 0
    cfg = ModelConfig.load(args.config)
    notes = [f"L = {x} skipped: the config's max_history is {cfg.max_history}"
             for x in args.lengths if x > cfg.max_history]
    lengths = [x for x in args.lengths if x <= cfg.max_history]
    if not lengths or (args.concurrent and not cfg.appends):
        log(f"nothing to measure: {notes or 'the config does not append'}")
        return 2
    install_python_models(args.repository)  # serve the user_cache code of this checkout
    gen, start, metrics = RequestGenerator(reference_contract(cfg), seed=0), snapshot(), free_port()
    server = start_server(grpc_port=free_port(), metrics_port=metrics, repository=args.repository,
                          timeout_s=300)
    try:
        if args.concurrent:
            name, rows = "cache_load", concurrent(server.grpc_url, gen, lengths[0], args)
        else:
            deltas = args.deltas if cfg.appends else []
            name, rows = "user_cache", [r for x in lengths for r in per_path(
                server.grpc_url, gen, x, args, deltas)]
            memory = memory_per_user(server.grpc_url, server.pid, f"127.0.0.1:{metrics}", gen,
                                     lengths[-1])
    finally:
        server.stop()
    load = external_cores(start).get("ext_cpu_cores", 0.0)
    if load > CONTENDED_CORES:
        notes.append(f"Contended run: other processes used {load:.2f} cores meanwhile; compare "
                     "ranker_cached and ranker on the same rows rather than absolute times.")
    run = {"command": f"python -m benchmarks.user_cache{' --concurrent' * args.concurrent}",
           "date": time.strftime("%Y-%m-%d"), "config": Path(args.config).name,
           "model": f"d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
           f"max_history {cfg.max_history}, mask {cfg.mask}",
           "settings": {"num_candidates": args.num_candidates, "requests": args.requests,
                        "length": lengths[0], "seconds": args.seconds},
           "machine": an.machine(**an.LOCAL_SERVER, **{
               "other processes' CPU during the run": f"{load:.2f} cores"}),
           "memory": None if args.concurrent else memory, "notes": notes,
           "kv_bytes_per_event": cfg.num_layers * 2 * cfg.d_model * 4}
    args.out.mkdir(parents=True, exist_ok=True)
    an.write_csv(args.out / f"{name}.csv", rows)
    (args.out / f"{name}.json").write_text(json.dumps(run, indent=2) + "\n")
    write_reports(args.out)
    return int(any(float(r.get("max_abs_diff_vs_ranker") or 0) > TOLERANCE
                   or (r.get("quantity") == "errors" and r["value"]) for r in rows))


if __name__ == "__main__":
    sys.exit(main())
