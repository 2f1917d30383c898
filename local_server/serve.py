"""Start the local tritonserver (local flavour of model_repository/ and evaluation_repository/)
in the foreground.

Waits until the server and every model are ready and says so; stops the server cleanly on
SIGINT/SIGTERM. Run it through scripts/serve.sh.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from export.repositories import EVALUATION_OPTION_HELP
from local_server.processes import stop_on_signals
from local_server.triton import (
    BUILD_DIR,
    MODEL_CONTROL_MODES,
    MODEL_REPOSITORY,
    ServerError,
    start_server,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/serve.sh",
        description="Serve model_repository/ (the serving models) and evaluation_repository/ "
        "(ranker_naive, ranker_base) with a real tritonserver (from the nvidia-pytriton "
        "wheel, no Docker, CPU): ONNX models run with ONNX Runtime in python-backend models, the "
        "`ranker` ensemble config is the production one. Binds 127.0.0.1; gRPC only unless "
        "--http-port/--metrics-port are given; model control API off unless --model-control "
        "explicit. Run `python -m export` first.",
    )
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default %(default)s)")
    p.add_argument("--http-port", type=int, default=None, help="enable HTTP on this port")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="enable Prometheus metrics on this port")
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY,
                   help="serving model repository (default %(default)s)")
    p.add_argument("--evaluation-repository", type=Path, default=None,
                   help=EVALUATION_OPTION_HELP + ", served beside it")
    p.add_argument("--no-evaluation", action="store_true",
                   help="serve the serving repository only, as production does (no "
                        "ranker_naive, ranker_base)")
    p.add_argument("--log-file", type=Path, default=None,
                   help="server log (default build/logs/tritonserver_<grpc-port>.log)")
    p.add_argument("--cache-bytes", type=int, default=0,
                   help="enable Triton's local response cache with this many bytes")
    p.add_argument("--cache-config", action="append", default=[], metavar="CACHE,KEY=VALUE",
                   help="passed to tritonserver as --cache-config (repeatable), e.g. "
                        "local,size=268435456: the response cache that models with "
                        "response_cache enabled use (python -m export.triton_configs "
                        "--response-cache puts it on user_encoder)")
    p.add_argument("--model-control", choices=MODEL_CONTROL_MODES, default="none",
                   help="none (default, as production): models fixed at start, no load/unload "
                        "API. explicit: every model is loaded at start and Triton's model "
                        "control API (load/unload over gRPC, and HTTP if --http-port) is open on "
                        "127.0.0.1, as Model Analyzer's remote mode and version reloads need; "
                        "the stub watchdog is then off (an unloaded model's stub exits by "
                        "design). Never on a server taking traffic: a client can unload models")
    p.add_argument("--ready-timeout", type=float, default=180.0,
                   help="seconds to wait for every model to be ready (default %(default)s)")
    p.add_argument("--watchdog-interval", type=float, default=None,
                   help="seconds between checks that every python-backend stub is alive; a "
                        "dead stub (Triton 2.51 never relaunches one, and the model stays "
                        "'ready' while failing every request) restarts the server on the same "
                        "ports; 0 turns the watchdog off (default 2, and 0 with --model-control "
                        "explicit)")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="give up after this many watchdog restarts (default %(default)s)")
    args = p.parse_args(argv)
    if args.watchdog_interval is None:
        args.watchdog_interval = 0.0 if args.model_control == "explicit" else 2.0
    elif args.watchdog_interval and args.model_control == "explicit":
        p.error("--watchdog-interval needs --model-control none: under explicit model control "
                "a stub exits whenever its model is unloaded or reloaded, which the watchdog "
                "cannot tell from a crash")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = stop_on_signals()
    print(f"serve: starting tritonserver on 127.0.0.1:{args.grpc_port} (gRPC)", flush=True)
    try:
        server = start_server(
            grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
            repository=args.repository, evaluation=args.evaluation_repository,
            with_evaluation=not args.no_evaluation, build_dir=BUILD_DIR, log_file=args.log_file,
            cache_bytes=args.cache_bytes, timeout_s=args.ready_timeout,
            extra_args=[f"--cache-config={value}" for value in args.cache_config],
            model_control=args.model_control,
        )
    except ServerError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    control = ("; model control API open (explicit)" if args.model_control == "explicit"
               else "")
    print(f"serve: ready: grpc {server.grpc_url}, models {', '.join(server.models)}{control}; "
          f"tritonserver pid {server.pid}; log {server.log_file}", flush=True)
    next_check = time.monotonic() + args.watchdog_interval
    while not stop.is_set():
        time.sleep(0.2)
        if server.process.poll() is not None:
            problem = f"tritonserver exited with code {server.process.returncode}"
        elif args.watchdog_interval and time.monotonic() >= next_check:
            next_check = time.monotonic() + args.watchdog_interval
            dead = server.dead_stubs()
            problem = f"python-backend stub died: {', '.join(dead)}" if dead else ""
        else:
            continue
        if not problem or stop.is_set():
            continue
        if not args.watchdog_interval or server.restarts >= args.max_restarts:
            print(f"serve: error: {problem}; log tail:\n{server.log_tail()}", file=sys.stderr)
            server.stop()
            return 1
        print(f"serve: {problem}; restarting tritonserver on the same ports "
              f"(restart {server.restarts + 1} of at most {args.max_restarts})", flush=True)
        try:
            server.restart(args.ready_timeout)
        except ServerError as e:
            print(f"serve: error: restart failed: {e}", file=sys.stderr)
            return 1
        print(f"serve: ready again: tritonserver pid {server.pid}", flush=True)
    code = server.stop()
    print(f"serve: stopped tritonserver (exit code {code})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
