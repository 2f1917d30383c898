"""A local fleet: K tritonservers (local flavour) behind nginx on one gRPC port, the way a
Kubernetes Service and an ingress-nginx Ingress put replicas behind one address.

nginx keeps each user on one replica (consistent hashing on the client's user-id header), so
the replica's user K/V cache (user_cache) sees the user's next request; a replica that dies is
skipped and its users go to the next replica on the ring; adding one moves only its share of
users. Every replica runs with the production command's restricted protocols
(deploy.production), and nginx forwards inference, metadata and health RPCs only.

`scripts/fleet.sh --help` runs it in the foreground; tests and benchmarks use `start_fleet`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from client.contract import USER_ID_HEADER, nginx_variable
from client.metrics import CacheStats, fetch_cache_stats
from deploy.production import ADMIN_KEY_ENV, grpc_admin_header, grpc_restriction
from local_server.nginx import BALANCES, Nginx, NginxError, find_nginx
from local_server.processes import stop_on_signals
from local_server.triton import (
    BUILD_DIR,
    MODEL_REPOSITORY,
    LocalServer,
    ServerError,
    free_port,
    port_is_free,
    start_server,
)


class FleetError(RuntimeError):
    """The fleet could not start (nginx missing, a port taken, a replica failing)."""


@dataclass
class Fleet:
    """Running replicas behind a running nginx. `stop()` ends every process it started."""

    grpc_port: int
    repository: Path
    admin_key: str
    nginx: Nginx
    replicas: list[LocalServer] = field(default_factory=list)
    ready_timeout_s: float = 240.0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_header(self) -> dict[str, str]:
        """The metadata that unlocks the restricted protocols on a replica (direct only)."""
        return {grpc_admin_header(): self.admin_key}

    def replica_of(self, address: str) -> int:
        """Index of the replica at host:port (as nginx logs `$upstream_addr`)."""
        for i, server in enumerate(self.replicas):
            if server.grpc_url == address:
                return i
        raise KeyError(address)

    def _start_replica(self) -> LocalServer:
        return start_server(grpc_port=free_port(), metrics_port=free_port(),
                            repository=self.repository, wait=False,
                            extra_args=[grpc_restriction(self.admin_key)])

    def add_replica(self) -> LocalServer:
        """Start one more replica, wait until it is ready, then put it behind nginx (reload:
        the port stays open, requests in flight finish on the old workers)."""
        server = self._start_replica()
        self.replicas.append(server)
        server.wait_ready(self.ready_timeout_s)
        self.nginx.reload([s.grpc_url for s in self.replicas])
        return server

    def remove_replica(self, index: int) -> None:
        """Scale down by one, gracefully: nginx stops routing to the replica (reload), then it
        is stopped. Its users move to the next replicas on the ring and miss once there."""
        server = self.replicas.pop(index)
        self.nginx.reload([s.grpc_url for s in self.replicas])
        server.stop()

    def cache_stats(self) -> list[CacheStats | None]:
        """user_cache's counters of each replica, from its metrics endpoint (None for a
        replica that is not running: its counters died with it)."""
        return [fetch_cache_stats(f"127.0.0.1:{s.metrics_port}")
                if s.process.poll() is None else None for s in self.replicas]

    def kill_replica(self, index: int) -> None:
        """SIGKILL replica `index`'s tritonserver (a crash): it stays in nginx's upstreams, as
        a pod does until its endpoint is removed, and nginx routes around it."""
        self.replicas[index].process.kill()
        self.replicas[index].process.wait()

    def stop(self) -> None:
        errors = []
        try:
            self.nginx.stop()
        except Exception as e:  # keep stopping the replicas whatever happened
            errors.append(f"nginx: {e}")
        for server in self.replicas:
            try:
                server.stop()
            except Exception as e:
                errors.append(f"{server.grpc_url}: {e}")
        if errors:
            raise FleetError("stopping the fleet: " + "; ".join(errors))


def start_fleet(replicas: int, grpc_port: int, repository: Path = MODEL_REPOSITORY,
                balance: str = "hash", admin_key: str | None = None,
                ready_timeout_s: float = 240.0, workdir: Path | None = None) -> Fleet:
    """Start `replicas` tritonservers on free ports (in parallel) and nginx on
    127.0.0.1:grpc_port in front of them; returns once every model of every replica is ready
    and nginx listens. Refuses before starting anything when nginx is missing or the port is
    taken; stops what it started when something fails."""
    if replicas < 1:
        raise FleetError(f"--replicas must be >= 1, got {replicas}")
    try:
        find_nginx()
    except NginxError as e:
        raise FleetError(str(e)) from None
    if not port_is_free(grpc_port):
        raise FleetError(f"port {grpc_port} on 127.0.0.1 is already in use; choose another "
                         f"with --grpc-port")
    workdir = workdir or BUILD_DIR / f"fleet_{grpc_port}"
    nginx = Nginx(workdir, grpc_port, [], balance)
    fleet = Fleet(grpc_port, repository, admin_key or secrets.token_hex(16), nginx,
                  ready_timeout_s=ready_timeout_s)
    try:
        for _ in range(replicas):
            fleet.replicas.append(fleet._start_replica())
        for server in fleet.replicas:
            server.wait_ready(ready_timeout_s)
        nginx.upstreams = [s.grpc_url for s in fleet.replicas]
        nginx.start()
    except (ServerError, NginxError, OSError) as e:
        fleet.stop()
        raise FleetError(str(e)) from None
    except BaseException:
        fleet.stop()
        raise
    return fleet


# --------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/fleet.sh",
        description="Serve model_repository/ from K local tritonservers (free localhost ports, "
        "each with the production command's restricted protocols and metrics on) behind nginx "
        f"on 127.0.0.1:<grpc-port>, which keeps each user on one replica by consistent hashing "
        f"on the gRPC header {USER_ID_HEADER!r} ({nginx_variable()}), passes a request to the "
        "next replica when one is down, spreads requests without a user id evenly and forwards "
        "only inference, metadata and health RPCs. Foreground until SIGINT/SIGTERM; stops "
        "everything it started. Run `python -m export` first; needs nginx (scripts/setup.sh).",
    )
    p.add_argument("--replicas", type=int, default=3, help="tritonservers (default %(default)s)")
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="nginx's gRPC port, the fleet's one address (default %(default)s)")
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY,
                   help="model repository every replica serves (default %(default)s)")
    p.add_argument("--balance", choices=BALANCES, default="hash",
                   help="hash: consistent hashing on the user id (default); round-robin: the "
                        "baseline that ignores it")
    p.add_argument("--ready-timeout", type=float, default=240.0,
                   help="seconds to wait for every replica to be ready (default %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = stop_on_signals()
    admin_key = os.environ.get(ADMIN_KEY_ENV)
    print(f"fleet: starting {args.replicas} tritonservers and nginx on "
          f"127.0.0.1:{args.grpc_port}", flush=True)
    try:
        fleet = start_fleet(args.replicas, args.grpc_port, args.repository, args.balance,
                            admin_key, args.ready_timeout)
    except FleetError as e:
        print(f"fleet: error: {e}", file=sys.stderr)
        return 1
    rule = (f"hash {nginx_variable()} consistent" if args.balance == "hash" else "round robin")
    replicas = ", ".join(f"{s.grpc_url} (pid {s.pid}, metrics 127.0.0.1:{s.metrics_port})"
                         for s in fleet.replicas)
    key = f"${ADMIN_KEY_ENV}" if admin_key else f"generated: {fleet.admin_key}"
    print(f"fleet: ready: grpc {fleet.url} (nginx pid {fleet.nginx.pid}, {rule}, log "
          f"{fleet.nginx.workdir}) -> {len(fleet.replicas)} replicas: {replicas}; admin RPCs "
          f"only directly on a replica with header {grpc_admin_header()} ({key})", flush=True)
    reported: set[int] = set()
    code = 0
    while not stop.is_set():
        time.sleep(0.2)
        if fleet.nginx.process.poll() is not None:
            print(f"fleet: error: nginx exited with code {fleet.nginx.process.returncode}:\n"
                  f"{fleet.nginx.error_tail()}", file=sys.stderr)
            code = 1
            break
        for server in fleet.replicas:
            if server.process.poll() is not None and server.pid not in reported:
                reported.add(server.pid)
                print(f"fleet: replica {server.grpc_url} exited with code "
                      f"{server.process.returncode}; nginx sends its users to the next replica",
                      flush=True)
    try:
        fleet.stop()
    except FleetError as e:
        print(f"fleet: error: {e}", file=sys.stderr)
        return 1
    print("fleet: stopped nginx and every replica", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
