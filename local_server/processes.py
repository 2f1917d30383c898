"""Processes of a local tritonserver, read from /proc: its python-backend stubs, their shared
memory, their resident memory; and the clean-up a crash needs.

A stub blocked in its IPC with a tritonserver that died never exits by itself, and a stub killed
with SIGKILL cannot remove its /dev/shm region: LocalServer.stop() uses these helpers so that
nothing outlives a server, and its watchdog uses them to notice a dead stub.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

STUB_MARKER = "triton_python_backend_stub"
MAX_TREE = 4096  # processes followed under the server, at most


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def cmdline(pid: int) -> list[str] | None:
    """argv of `pid` (None if it does not exist; [] for a zombie or a kernel thread)."""
    raw = _read(f"/proc/{pid}/cmdline")
    return None if raw is None else [a for a in raw.split("\0") if a]


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    status = _read(f"/proc/{pid}/status")
    if status is None:
        return False
    for line in status.splitlines():
        if line.startswith("State:"):
            return "zombie" not in line and "\tZ" not in line
    return True


def rss_bytes(pid: int) -> int:
    """VmRSS of one process in bytes; 0 if it is gone or a zombie."""
    status = _read(f"/proc/{pid}/status") or ""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    """Direct children of `pid`, over all its threads (/proc/<pid>/task/*/children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        text = _read(f"/proc/{pid}/task/{tid}/children") or ""
        out.extend(int(c) for c in text.split())
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (breadth first; at most MAX_TREE)."""
    seen: list[int] = []
    queue = [pid]
    while queue and len(seen) < MAX_TREE:
        current = queue.pop(0)
        if current in seen:
            continue
        seen.append(current)
        queue.extend(children(current))
    return seen


def process_label(pid: int) -> str:
    """`tritonserver`, `stub:<model>` for a python-backend stub, else the program name."""
    argv = cmdline(pid) or []
    if not argv:
        return f"pid{pid}"
    if STUB_MARKER in argv[0] and len(argv) > 1:
        model_py = Path(argv[1])  # <repo>/<model>/<version>/model.py
        return f"stub:{model_py.parent.parent.name}"
    return Path(argv[0]).name


def stub_pids(server_pid: int, model: str | None = None) -> list[int]:
    """The python-backend stubs under `server_pid` (those serving `model` only, if given)."""
    out = []
    for pid in process_tree(server_pid)[1:]:
        argv = cmdline(pid) or []
        if argv and STUB_MARKER in argv[0] and (
            model is None or any(f"/{model}/" in a for a in argv[1:2])
        ):
            out.append(pid)
    return out


def shm_regions(pids: Iterable[int]) -> list[str]:
    """/dev/shm regions named on the stubs' command lines (the python backend's IPC memory)."""
    names = []
    for pid in pids:
        for arg in cmdline(pid) or []:
            if arg.startswith("triton_python_backend_shm_region"):
                names.append(arg)
    return names


def kill_lingering(pids: Iterable[int], marker: str = STUB_MARKER) -> list[int]:
    """SIGKILL those of `pids` still running whose command line contains `marker` (so a PID
    reused by an unrelated process is left alone). Returns the PIDs killed."""
    killed = []
    for pid in pids:
        argv = cmdline(pid)
        if argv and any(marker in a for a in argv) and is_running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def wait_gone(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Poll until none of `pids` is running (zombies count as gone); returns those left."""
    pending = list(pids)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if is_running(p)]
        if pending:
            time.sleep(0.1)
    return [p for p in pending if is_running(p)]


def remove_shm_regions(names: Iterable[str]) -> list[str]:
    """Unlink those of the python backend's /dev/shm regions `names` that still exist (a stub
    killed with SIGKILL cannot remove its own). Returns the names removed."""
    removed = []
    for name in names:
        path = Path("/dev/shm") / name
        if name.startswith("triton_python_backend_shm_region") and path.exists():
            path.unlink(missing_ok=True)
            removed.append(name)
    return removed


def stop_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set: the foreground commands (serve, fleet) poll it,
    then stop what they started, by PID."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop
