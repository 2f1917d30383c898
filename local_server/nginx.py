"""nginx as the local fleet's gRPC balancer: its config, generated here, and its process.

The config is built from directives in Python (never a hand-copied template) out of the same
sources the production Ingress uses: the client's user-id header (consistent hashing on
`$http_user_id`) and deploy.production.EDGE_RPCS (the only gRPC methods forwarded; every other
path is answered PERMISSION_DENIED by nginx itself). A replica that refuses the connection or
does not connect in time is marked failed and skipped for the next one on the hash ring
(`grpc_next_upstream`). A request already sent to a replica that then dies is not passed on:
nginx's gRPC proxy streams request bodies (it sets request_body_no_buffering), so it answers
HTTP 502, which a gRPC client sees as UNAVAILABLE and RankerClient retries. Requests without a
user id have an empty hash key, for which nginx's hash balancer falls back to round robin:
they are spread evenly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.contract import USER_ID_HEADER, nginx_variable
from deploy.production import edge_paths
from local_server.processes import process_tree, wait_gone

BALANCES = ("hash", "round-robin")
FAIL_TIMEOUT_S = 10  # a replica that failed is skipped this long before it is tried again
MAX_REQUEST_BYTES = 64 << 20  # gRPC requests of long histories and many candidates
DENIED_MESSAGE = "only inference, metadata and health RPCs pass this balancer"
PERMISSION_DENIED = 7  # gRPC status code
LOG_FIELDS = ("msec", "user_id", "upstream_addr", "status", "grpc_status", "uri")

# A directive: (name, *args), or (name, [args], [children]) for a block.
Directive = tuple


class NginxError(RuntimeError):
    """nginx is missing, refuses the config, or did not start (the message says why)."""


def find_nginx() -> str:
    """The nginx binary: $NGINX_BINARY (a name or a path, default `nginx`) on PATH or in
    /usr/sbin, where Debian's package puts it."""
    name = os.environ.get("NGINX_BINARY", "nginx")
    search = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"))
    found = shutil.which(name, path=search)
    if not found:
        raise NginxError(f"nginx ({name}) is not installed: run scripts/setup.sh (it installs "
                         "Debian's nginx package) or `apt-get install -y nginx`")
    return found


def _word(arg: str) -> str:
    return arg if re.fullmatch(r"[^\s;{}'\"#]+", arg) else '"' + arg.replace('"', '\\"') + '"'


def render(directives: Sequence[Directive], depth: int = 0) -> str:
    """nginx config text of `directives`, one per line, blocks indented."""
    pad, out = "    " * depth, []
    for d in directives:
        if len(d) == 3 and isinstance(d[1], list) and isinstance(d[2], list):
            head = " ".join([d[0], *map(_word, d[1])])
            out.append(f"{pad}{head} {{\n{render(d[2], depth + 1)}{pad}}}\n")
        else:
            out.append(pad + " ".join([d[0], *map(_word, d[1:])]) + ";\n")
    return "".join(out)


def balancer_directives(listen_port: int, upstreams: Sequence[str], workdir: Path,
                        balance: str = "hash") -> list[Directive]:
    """The whole nginx config: listen on 127.0.0.1:listen_port (HTTP/2, gRPC), balance over
    `upstreams` (host:port) by consistent hash of the user-id header or round robin."""
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    if not upstreams:
        raise ValueError("the balancer needs at least one upstream")
    hashing = [("hash", nginx_variable(USER_ID_HEADER), "consistent")] if balance == "hash" else []
    servers = [("server", a, "max_fails=1", f"fail_timeout={FAIL_TIMEOUT_S}s") for a in upstreams]
    forward = [("grpc_pass", "grpc://triton")]
    deny = [("default_type", "application/grpc"),
            ("add_header", "grpc-status", str(PERMISSION_DENIED), "always"),
            ("add_header", "grpc-message", DENIED_MESSAGE, "always"),
            ("return", "200")]
    values = ("$msec", nginx_variable(USER_ID_HEADER), "$upstream_addr", "$status",
              "$upstream_trailer_grpc_status", "$uri")
    log = "{" + ",".join(f'"{k}":"{v}"' for k, v in zip(LOG_FIELDS, values, strict=True)) + "}"
    temp = [(f"{kind}_temp_path", str(workdir / "temp" / kind))
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")]
    return [
        ("daemon", "off"),
        ("worker_processes", "1"),
        ("pid", str(workdir / "nginx.pid")),
        ("error_log", str(workdir / "error.log"), "warn"),
        ("events", [], [("worker_connections", "1024")]),
        ("http", [], [
            ("log_format", "fleet", "escape=json", log),
            ("access_log", str(workdir / "access.log"), "fleet"),
            *temp,
            ("client_max_body_size", str(MAX_REQUEST_BYTES)),
            ("grpc_next_upstream", "error", "timeout"),
            ("grpc_next_upstream_tries", str(len(upstreams))),
            ("grpc_connect_timeout", "2s"),
            ("grpc_read_timeout", "300s"),
            ("grpc_send_timeout", "300s"),
            ("upstream", ["triton"], [*hashing, *servers, ("keepalive", "32")]),
            ("server", [], [
                ("listen", f"127.0.0.1:{listen_port}", "http2"),
                *[("location", ["=", path], forward) for path in edge_paths()],
                ("location", ["/"], deny),
            ]),
        ]),
    ]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Nginx:
    """An nginx master (foreground, `daemon off`) with its config and logs in `workdir`."""

    workdir: Path
    listen_port: int
    upstreams: list[str]
    balance: str = "hash"
    process: subprocess.Popen | None = None
    binary: str = field(default_factory=find_nginx)

    @property
    def conf(self) -> Path:
        return self.workdir / "nginx.conf"

    @property
    def pid(self) -> int:
        return self.process.pid

    def write_config(self) -> None:
        """Write nginx.conf from balancer_directives and have nginx test it (`nginx -t`)."""
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.workdir / "temp" / kind).mkdir(parents=True, exist_ok=True)
        text = render(balancer_directives(self.listen_port, self.upstreams, self.workdir,
                                          self.balance))
        self.conf.write_text("# Generated by local_server/nginx.py; do not edit.\n" + text)
        test = subprocess.run(self._command("-t", "-q"), capture_output=True, text=True)
        if test.returncode:
            raise NginxError(f"nginx refuses {self.conf}:\n{test.stderr.strip()}")

    def _command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.workdir), "-c", str(self.conf),
                "-e", str(self.workdir / "error.log"), *extra]

    def error_tail(self, lines: int = 20) -> str:
        log = self.workdir / "error.log"
        text = log.read_text(errors="replace").splitlines() if log.exists() else []
        return "\n".join(text[-lines:]) or "(empty nginx error log)"

    def start(self, timeout_s: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in ("access.log", "error.log"):
            (self.workdir / name).unlink(missing_ok=True)
        self.write_config()
        self.process = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.listen_port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise NginxError(f"nginx did not start on 127.0.0.1:{self.listen_port}; its "
                                 f"error log says:\n{self.error_tail()}")
            time.sleep(0.05)

    def workers(self) -> list[int]:
        return process_tree(self.pid)[1:] if self.process else []

    def reload(self, upstreams: list[str], balance: str | None = None,
               timeout_s: float = 30.0) -> None:
        """New upstreams without dropping the port: nginx's own reload (SIGHUP), which starts
        workers on the new config; returns once the old workers have exited."""
        old = self.workers()
        self.upstreams, self.balance = list(upstreams), balance or self.balance
        self.write_config()
        self.process.send_signal(signal.SIGHUP)
        left = wait_gone(old, timeout_s)
        if left or not self.workers():
            raise NginxError(f"nginx reload did not finish in {timeout_s:g}s (old workers "
                             f"{left}); error log:\n{self.error_tail()}")

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Fast shutdown (SIGTERM), SIGKILL after `timeout_s`; its workers are gone after."""
        if self.process is None:
            return None
        workers = self.workers()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        wait_gone(workers, timeout_s)
        return self.process.returncode

    def access_log(self) -> list[dict[str, str]]:
        """One dict per request (LOG_FIELDS; "" where nginx has no value), oldest first: which
    replica served each request (`upstream_addr`, several when it passed one on)."""
        log = self.workdir / "access.log"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line]
