"""Command line for a ranker on Triton, any model family:
`python -m client {score,validate,health,returning-user,cache-stats} --help`.

Requests are built from the family's declaration, read from the served model's config: a request
file holds its declared features by name, generated requests fill them from their roles.

Exit codes: 0 success; 1 validation mismatch, failed requests or models not ready; 2 usage
error, unreachable server, or a request or server error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from client.api import RankerClient, RankerError
from client.metrics import MetricsError, fetch_cache_stats
from client.request import RankingRequest
from client.traffic import RequestGenerator, edge_case_requests
from client.validation import RequestError

DEFAULT_URL = "127.0.0.1:8001"
VALIDATE_NUM_CANDIDATES = (1, 2, 5, 17, 50, 100, 256, 500, 1000)


def history_length_spread(max_history: int) -> list[int]:
    """History lengths for `validate`: short, typical, around max_history and beyond it (the
    model keeps the newest max_history events, the tail must still match the oracle)."""
    m = max_history
    lengths = {0, 1, 2, 3, 8, 17, 64, 100, 255, m // 4, m // 2, m - 1, m, m + 1, m + 37, m * 3 // 2}
    return sorted(x for x in lengths if x >= 0)


def oracle_tokens(req: RankingRequest, max_history: int) -> int:
    """Tokens the naive oracle encodes for `req`: N sequences of min(L, max_history) + 1. Its
    time grows with this (and more), so validation bounds it instead of N alone."""
    return req.num_candidates * (min(req.history_length, max_history) + 1)


# --------------------------------------------------------------------------- score
def cmd_score(args: argparse.Namespace) -> int:
    generated = any(v is not None for v in (args.seed, args.history_length, args.num_candidates))
    if args.request and generated:
        raise UsageError("--request cannot be combined with --seed/--history-length/"
                         "--num-candidates")
    if args.request and args.save_request:
        raise UsageError("--save-request only applies to a generated request")
    task: str | int = int(args.task) if args.task.isdigit() else args.task
    if args.model is None:
        args.model = "ranker_cached" if args.user_id is not None else "ranker"
    with _client(args) as client:
        info = client.model_info(args.model)
        column = info.task_index(task)
        if args.request:
            req = RankingRequest.load(args.request, info.contract)
        else:
            gen = RequestGenerator(info.contract, seed=args.seed or 0)
            req = gen.request(
                100 if args.history_length is None else args.history_length,
                50 if args.num_candidates is None else args.num_candidates,
            )
            if args.save_request:
                req.save(args.save_request)  # before scoring, so a failure can be replayed
                print(f"request saved to {args.save_request}")
        scores, latency = client.score_with_latency(req, args.model, args.user_id)

    order = np.argsort(-scores[:, column], kind="stable")
    top = order if args.top <= 0 else order[: args.top]
    print(
        f"model {args.model}: L={req.history_length} N={req.num_candidates} "
        f"ranked by {info.task_names[column]}, latency {latency * 1e3:.2f} ms"
    )
    names = "".join(f" {name:>10}" for name in info.task_names)
    ids = req.candidate_ids
    print(f"{'rank':>4} {req.candidate_id_feature.name:>20}{names}")
    for rank, i in enumerate(top, 1):
        cols = "".join(f" {s:>10.6f}" for s in scores[i])
        print(f"{rank:>4} {ids[i].tolist()!s:>20}{cols}")
    return 0


# --------------------------------------------------------------------------- validate
@dataclass
class _Tally:
    total: int = 0
    compared: int = 0
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    max_diff: float = 0.0
    max_diff_at: str = "-"
    model_latency: list[float] = field(default_factory=list)
    oracle_latency: list[float] = field(default_factory=list)
    paired: list[tuple[float, float]] = field(default_factory=list)


def cmd_validate(args: argparse.Namespace) -> int:
    if args.count < 0 or (args.max_history is not None and args.max_history < 1):
        raise UsageError("--count must be >= 0 and --max-history >= 1")
    with _client(args) as client:
        info = client.model_info(args.model)
        oracle = client.model_info(args.oracle)
        mine, theirs = info.contract, oracle.contract
        if (mine.family, mine.features, mine.outputs) != (theirs.family, theirs.features,
                                                           theirs.outputs):
            raise RankerError(
                f"{args.model} ({mine.family}) and {args.oracle} ({theirs.family}) do not "
                "declare the same features and outputs: they do not serve the same model")
        if args.max_history is None:
            args.max_history = mine.max_history
        print(f"{args.model} vs {args.oracle}: family {mine.family}, max_history "
              f"{args.max_history}", file=sys.stderr, flush=True)
        gen = RequestGenerator(mine, seed=args.seed)
        limit = info.max_candidates or VALIDATE_NUM_CANDIDATES[-1]
        sizes = [n for n in VALIDATE_NUM_CANDIDATES if n <= limit] or [limit]
        random = gen.requests(args.count, history_length_spread(args.max_history), sizes)
        named = [(f"random_{i}", r) for i, r in enumerate(random)]
        edges = edge_case_requests(gen, args.max_history)
        named += [(name, r) for name, r in edges if r.num_candidates <= limit]
        beyond = [name for name, r in edges if r.num_candidates > limit]
        if beyond:
            print(f"edge cases above {args.model}'s max_candidates = {limit}, not sent: "
                  + ", ".join(beyond), flush=True)
        tally = _Tally()
        for name, req in named:
            _validate_one(client, args, tally, name, req)
            if tally.total % 10 == 0 or tally.total == len(named):
                print(f"[{tally.total}/{len(named)}] max |diff| so far {tally.max_diff:.3g}, "
                      f"failed {len(tally.failed)}", file=sys.stderr, flush=True)
    return _summary(args, tally)


def _validate_one(
    client: RankerClient, args: argparse.Namespace, tally: _Tally, name: str,
    req: RankingRequest,
) -> None:
    tally.total += 1
    shape = f"L={req.history_length:<5} N={req.num_candidates:<5}"
    try:
        scores, latency = client.score_with_latency(req, args.model)
        tally.model_latency.append(latency)
        too_long = not client.model_info(args.oracle).serves_history(req.history_length)
        if too_long or oracle_tokens(req, args.max_history) > args.max_oracle_tokens:
            why = ("(L+1)^2 above its naive_max_work" if too_long else
                   f"N x (L+1) > --max-oracle-tokens {args.max_oracle_tokens}")
            tally.skipped.append(f"{name} ({why})")
            if args.verbose:
                print(f"{name:<34} {shape} {args.model} {latency * 1e3:8.2f} ms, {args.oracle} "
                      f"skipped ({why})")
            return
        expected, oracle_latency = client.score_with_latency(req, args.oracle)
    except (RankerError, RequestError) as e:
        tally.failed.append(name)
        print(f"FAILED {name} {shape}: {e}", flush=True)
        return
    tally.oracle_latency.append(oracle_latency)
    tally.paired.append((latency, oracle_latency))
    if scores.shape != expected.shape:
        tally.failed.append(name)
        print(f"FAILED {name} {shape}: {args.model} scores {list(scores.shape)} vs "
              f"{args.oracle} {list(expected.shape)}", flush=True)
        return
    diff = float(np.max(np.abs(scores - expected))) if scores.size else 0.0
    if not np.isfinite(diff):  # NaN > tolerance is False: a NaN must not pass as a match
        tally.failed.append(name)
        print(f"FAILED {name} {shape}: non-finite scores", flush=True)
        return
    tally.compared += 1
    if diff > tally.max_diff or tally.max_diff_at == "-":
        tally.max_diff, tally.max_diff_at = diff, name
    if args.verbose:
        print(f"{name:<34} {shape} max|diff| {diff:.2e}  {args.model} {latency * 1e3:8.2f} ms  "
              f"{args.oracle} {oracle_latency * 1e3:8.2f} ms", flush=True)


def _latency_line(label: str, values: Sequence[float]) -> str:
    if not values:
        return f"latency {label}: no successful requests"
    ms = np.asarray(values) * 1e3
    return (f"latency {label}: median {np.median(ms):.2f} ms, p90 {np.percentile(ms, 90):.2f} ms "
            f"({len(ms)} requests)")


def _summary(args: argparse.Namespace, tally: _Tally) -> int:
    print(f"requests: {tally.total} ({args.count} random + edge cases), compared: "
          f"{tally.compared}, oracle skipped: {len(tally.skipped)}, failed: {len(tally.failed)}")
    if tally.skipped:
        print(f"  {args.oracle} skipped: " + ", ".join(tally.skipped))
    if tally.failed:
        print("  failed: " + ", ".join(tally.failed))
    print(f"max |{args.model} - {args.oracle}|: {tally.max_diff:.3g} (at {tally.max_diff_at}), "
          f"tolerance {args.tolerance:g}")
    print(_latency_line(args.model, tally.model_latency))
    print(_latency_line(args.oracle, tally.oracle_latency))
    if tally.paired:
        pairs = np.asarray(tally.paired)
        med = np.median(pairs[:, 1]) / np.median(pairs[:, 0])
        p90 = np.percentile(pairs[:, 1], 90) / np.percentile(pairs[:, 0], 90)
        print(f"{args.oracle} / {args.model} latency on the same requests: median {med:.2f}x, "
              f"p90 {p90:.2f}x")
    ok = not tally.failed and tally.max_diff <= args.tolerance
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


# --------------------------------------------------------------------------- returning user
def cmd_returning_user(args: argparse.Namespace) -> int:
    if args.history_length < 0 or args.new_events < 0 or args.num_candidates < 1:
        raise UsageError("--history-length and --new-events must be >= 0, --num-candidates >= 1")
    with _client(args) as client:
        info = client.model_info(args.model)
        gen = RequestGenerator(info.contract, seed=args.seed)
        user_id = gen.user_id() if args.user_id is None else args.user_id
        first = gen.request(args.history_length, args.num_candidates)
        grown = gen.returning(first, args.new_events)
        visits = [("first visit", first), (f"+{args.new_events} events", grown),
                  ("repeat, new candidates", gen.returning(grown, 0))]
        if not args.no_warmup:  # first calls of each model pay ONNX Runtime's warm-up
            other = gen.user_id()
            for req in (first, grown, gen.returning(grown, 0)):
                client.score(req, args.model, other)
                client.score(req, "ranker")
        print(f"user {user_id}: {args.model} (user K/V cache) vs {args.oracle} and ranker, "
              f"N={args.num_candidates}")
        print(f"{'visit':<24} {'L':>6} {'path':>7} {args.model + ' ms':>18} {'ranker ms':>10} "
              f"{'max|diff|':>10}")
        worst = 0.0
        for label, req in visits:
            scores, path, latency = client.score_cached(req, user_id, args.model)
            _, plain = client.score_with_latency(req, "ranker")
            expected = client.score(req, args.oracle)
            diff = float(np.max(np.abs(scores - expected))) if scores.size else 0.0
            worst = max(worst, diff if np.isfinite(diff) else np.inf)
            print(f"{label:<24} {req.history_length:>6} {path:>7} {latency * 1e3:>18.2f} "
                  f"{plain * 1e3:>10.2f} {diff:>10.2e}", flush=True)
    ok = worst <= args.tolerance
    print(f"max |{args.model} - {args.oracle}| {worst:.3g}, tolerance {args.tolerance:g}: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


# --------------------------------------------------------------------------- cache stats
def cmd_cache_stats(args: argparse.Namespace) -> int:
    stats = fetch_cache_stats(args.metrics_url, args.cache_model, args.timeout)
    print(f"{args.cache_model} at {args.metrics_url}: {stats.requests} requests: "
          f"{stats.hits} hits, {stats.appends} appends, {stats.misses} misses "
          f"(reuse {stats.reuse_rate:.1%}); {stats.users} users, "
          f"{stats.bytes_held / 2**20:.1f} MiB of {stats.capacity_bytes / 2**20:.0f} MiB, "
          f"{stats.evictions} evictions")
    return 0


# --------------------------------------------------------------------------- health
def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        live = client.is_live()
        ready = client.is_ready()
        print(f"server {args.url}: live {_yes(live)}, ready {_yes(ready)}")
        try:
            index = {m["name"]: m for m in client.repository_index()}
        except RankerError as e:
            # A balancer or the production command keeps the repository API from callers
            # (PERMISSION_DENIED at nginx, UNAVAILABLE "restricted" at Triton): the models
            # named with --model can still be checked.
            hidden = e.code == "PERMISSION_DENIED" or "restricted" in (e.server_message or "")
            if not args.model or not hidden:
                raise
            index = None
            print("  (the model repository index is not exposed here; checking the named "
                  "models only)")
        names = args.model or sorted(index or ())
        all_ready = live and ready
        for name in names:
            model_ready = client.is_ready(name)
            all_ready &= model_ready
            entry = index.get(name) if index is not None else None
            state = (entry["state"] if entry else "not in the model repository"
                     if index is not None else "")
            reason = f" ({entry['reason']})" if entry and entry["reason"] else ""
            print(f"  {name:<20} ready {_yes(model_ready):<3} {state}{reason}")
        if not names:
            print("  (no models in the repository)")
    return 0 if all_ready else 1


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# --------------------------------------------------------------------------- wiring
class UsageError(Exception):
    """Bad combination of options (argparse cannot express it)."""


def _client(args: argparse.Namespace) -> RankerClient:
    return RankerClient(url=args.url, timeout_s=args.timeout)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_connection_options(
    parser: argparse.ArgumentParser, url: str, timeout: float | str
) -> None:
    parser.add_argument("--url", default=url,
                        help=f"Triton gRPC endpoint host:port (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=_positive_float, default=timeout,
                        help="seconds allowed per RPC attempt (default 30)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Score, validate and health-check a ranker served by Triton (gRPC), any "
                    "model family: requests follow the declaration the server publishes.",
        epilog="Exit codes: 0 ok; 1 mismatch, failed requests or models not ready; "
               "2 usage error, unreachable server, request or server error.",
    )
    _add_connection_options(parser, DEFAULT_URL, 30.0)
    # The same options after the subcommand too; SUPPRESS keeps them from resetting the values
    # given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_connection_options(common, argparse.SUPPRESS, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("score", parents=[common], help="rank the candidates of one request",
                       description="Score one request (from a JSON file or generated) and print "
                                   "the top candidates with every task's score and the latency.")
    p.add_argument("--request", metavar="FILE.json",
                   help="a request JSON file: {feature name: nested list}, the served model's "
                        "declared features (as --save-request writes them)")
    p.add_argument("--seed", type=int, help="seed of the generated request (default 0)")
    p.add_argument("--history-length", type=int, metavar="L",
                   help="history events of the generated request (default 100)")
    p.add_argument("--num-candidates", type=int, metavar="N",
                   help="candidates of the generated request (default 50)")
    p.add_argument("--save-request", metavar="FILE.json",
                   help="write the generated request as JSON (to replay it with --request)")
    p.add_argument("--model", default=None,
                   help="model to call (default ranker, ranker_cached with --user-id)")
    p.add_argument("--user-id", type=int, default=None, metavar="ID",
                   help="the user's id, for ranker_cached (the key of the user K/V cache); "
                        "also sent as gRPC metadata 'user-id', on which a fleet's balancer "
                        "keeps the user on one replica (scripts/fleet.sh)")
    p.add_argument("--task", default="0",
                   help="task to rank by: name or index (default 0, the first task)")
    p.add_argument("--top", type=int, default=10, metavar="K",
                   help="candidates to print, 0 for all (default 10)")
    p.set_defaults(func=cmd_score, parser=p)

    p = sub.add_parser("validate", parents=[common],
                       help="compare the ranker with the naive oracle",
                       description="Send random requests (varied L and N) and every edge case to "
                                   "the model and to the oracle; compare scores and latency.")
    p.add_argument("--count", type=int, default=50, help="random requests (default 50)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--max-history", type=int, default=None,
                   help="history lengths are spread up to beyond this (default: the served "
                        "model's declared max_history)")
    p.add_argument("--model", default="ranker", help="model under test (default ranker)")
    p.add_argument("--oracle", default="ranker_naive",
                   help="reference model (default ranker_naive)")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="largest allowed |model - oracle| score difference (default 1e-5)")
    p.add_argument("--max-oracle-tokens", type=int, default=150_000, metavar="T",
                   help="skip the oracle on requests where N x (min(L, max_history) + 1) "
                        "exceeds T: the naive model re-encodes the history per candidate "
                        "(default %(default)s, about 15 s at L = 1024 on 2 CPU cores)")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per request")
    p.set_defaults(func=cmd_validate, parser=p)

    p = sub.add_parser("returning-user", parents=[common],
                       help="one returning user through ranker_cached: paths and latency",
                       description="One user three times through ranker_cached: the first visit "
                                   "(miss), a few new events (append on a causal model), the "
                                   "same history again with new candidates (hit). Prints the "
                                   "path user_cache took (its cache_path output), "
                                   "the latency next to ranker's, and the difference to the "
                                   "naive oracle; exits 1 above the tolerance.")
    p.add_argument("--history-length", type=int, default=300, metavar="L",
                   help="events of the first visit (default %(default)s)")
    p.add_argument("--new-events", type=int, default=5, metavar="K",
                   help="events added before the second visit (default %(default)s)")
    p.add_argument("--num-candidates", type=int, default=20, metavar="N",
                   help="candidates per visit (default %(default)s)")
    p.add_argument("--user-id", type=int, default=None,
                   help="user id (default: random); sent as the user_id tensor and as gRPC "
                        "metadata 'user-id' for a balancer")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the warm-up (another user sent through the same visits first)")
    p.add_argument("--model", default="ranker_cached", help="default ranker_cached")
    p.add_argument("--oracle", default="ranker_naive", help="default ranker_naive")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="largest allowed score difference to the oracle (default 1e-5)")
    p.set_defaults(func=cmd_returning_user, parser=p)

    p = sub.add_parser("cache-stats", parents=[common],
                       help="the user K/V cache's counters from the metrics endpoint",
                       description="Read user_cache's custom metrics (hits, appends, misses, "
                                   "evictions, bytes and users held) from Triton's Prometheus "
                                   "endpoint; the server needs --metrics-port.")
    p.add_argument("--metrics-url", default="127.0.0.1:8002",
                   help="Triton metrics endpoint host:port[/metrics] (default %(default)s)")
    p.add_argument("--cache-model", default="user_cache", help="default user_cache")
    p.set_defaults(func=cmd_cache_stats, parser=p)

    p = sub.add_parser("health", parents=[common],
                       help="server liveness/readiness and each model's readiness",
                       description="Print server live/ready and the readiness of each model "
                                   "(all models of the repository unless --model is given).")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="model to check (repeatable; default: every model in the repository)")
    p.set_defaults(func=cmd_health, parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        args.parser.error(str(e))  # exits 2 with the subcommand's usage line
    except (RankerError, RequestError, MetricsError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 2  # unreachable: parser.error exits


if __name__ == "__main__":
    sys.exit(main())
