"""Processes of a local tritonserver, read with psutil: its python-backend stubs, their shared
memory, their resident memory; and the clean-up a crash needs.

A stub blocked in its IPC with a tritonserver that died never exits by itself, and a stub killed
with SIGKILL cannot remove its /dev/shm region: LocalServer.stop() uses these helpers so that
nothing outlives a server, and its watchdog uses them to notice a dead stub.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

STUB_MARKER = "triton_python_backend_stub"
MAX_TREE = 4096  # processes followed under the server, at most


def cmdline(pid: int) -> list[str] | None:
    """argv of `pid` (None if it does not exist; [] for a zombie or a kernel thread)."""
    try:
        return psutil.Process(pid).cmdline()
    except psutil.ZombieProcess:
        return []
    except psutil.Error:  # gone, or not ours to read
        return None


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.ZombieProcess:
        return False
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False


def rss_bytes(pid: int) -> int:
    """Resident set of one process in bytes; 0 if it is gone or a zombie."""
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (at most MAX_TREE)."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    return [pid, *(c.pid for c in descendants)][:MAX_TREE]


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
                psutil.Process(pid).kill()
                killed.append(pid)
            except psutil.NoSuchProcess:
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
