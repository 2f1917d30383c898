"""How much CPU others used while a benchmark measured (a shared, noisy machine): the machine's
CPU time minus that of the benchmark's own process tree (children's times included, so exited
ones stay counted), over the wall time, in cores (psutil); steal on its own."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

CONTENDED_CORES = 0.3  # others' CPU use (cores) above which a measurement counts as contended


@dataclass
class Snapshot:
    wall: float
    busy: float
    steal: float
    ours: float


def _tree_cpu() -> float:
    """CPU seconds of this process and its descendants (reaped ones via their parents')."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # exited meanwhile: its parent's children times hold it once reaped
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def snapshot() -> Snapshot | None:
    try:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq
        return Snapshot(time.monotonic(), busy, t.steal, _tree_cpu())
    except (OSError, psutil.Error):
        return None


def external_cores(start: Snapshot | None, end: Snapshot | None = None) -> dict[str, float]:
    """{'ext_cpu_cores', 'steal_cores'} between two snapshots (empty where unavailable)."""
    end = end or snapshot()
    if start is None or end is None or end.wall <= start.wall:
        return {}
    dt = end.wall - start.wall
    ext = (end.busy - start.busy) - (end.ours - start.ours)
    return {"ext_cpu_cores": max(0.0, ext / dt), "steal_cores": (end.steal - start.steal) / dt}
