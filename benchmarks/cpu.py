"""How much CPU others used while the benchmark measured (a shared, noisy machine).

External CPU = CPU time the whole machine spent (/proc/stat) minus the CPU time of the benchmark's
own process tree (this process, tritonserver and its stubs, perf_analyzer, counted with
utime + stime + cutime + cstime of every member so exited children stay counted), over the
wall-clock time of the measurement, in cores. Hypervisor steal is reported on its own.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
CONTENDED_CORES = 0.3  # others' CPU use (cores) above which a measurement counts as contended


def _machine_busy_and_steal() -> tuple[float, float]:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq) / TICK, steal / TICK


def _tree_cpu(root: int) -> float:
    """CPU seconds of `root` and all its descendants (alive ones, plus reaped ones via cutime)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        rest = text[text.rindex(")") + 2:].split()  # fields after "(comm)"
        pid, ppid = int(entry.name), int(rest[1])
        children.setdefault(ppid, []).append(pid)
        times[pid] = sum(int(x) for x in rest[11:15]) / TICK  # utime stime cutime cstime
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


@dataclass
class Snapshot:
    wall: float
    busy: float
    steal: float
    ours: float


def snapshot() -> Snapshot | None:
    try:
        busy, steal = _machine_busy_and_steal()
        return Snapshot(time.monotonic(), busy, steal, _tree_cpu(os.getpid()))
    except (OSError, ValueError, IndexError):
        return None


def external_cores(start: Snapshot | None, end: Snapshot | None = None) -> dict[str, float]:
    """{'ext_cpu_cores', 'steal_cores'} between two snapshots (empty where unavailable)."""
    end = end or snapshot()
    if start is None or end is None or end.wall - start.wall <= 0:
        return {}
    dt = end.wall - start.wall
    ext = (end.busy - start.busy) - (end.ours - start.ours)
    return {"ext_cpu_cores": max(0.0, ext / dt), "steal_cores": (end.steal - start.steal) / dt}
