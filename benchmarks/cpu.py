"""How much CPU others used while the benchmark measured (a shared, noisy machine): the machine's
CPU time minus that of the benchmark's own process tree (children's times included, so exited
ones stay counted), over the wall time, in cores (psutil); steal on its own."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

CONTENDED_CORES = 0.3  # others' CPU use (cores) above which a measurement counts as contended


def _machine_busy_and_steal() -> tuple[float, float]:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq, t.steal


def _tree_cpu(root: int) -> float:
    """CPU seconds of `root` and all its descendants (alive ones, plus reaped ones via the
    children_user / children_system times of their parents)."""
    try:
        tree = [psutil.Process(root)]
        tree += tree[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in tree:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # exited meanwhile: its parent's children times hold it once reaped
            continue
        total += t.user + t.system + t.children_user + t.children_system
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
    except (OSError, psutil.Error):
        return None


def external_cores(start: Snapshot | None, end: Snapshot | None = None) -> dict[str, float]:
    """{'ext_cpu_cores', 'steal_cores'} between two snapshots (empty where unavailable)."""
    end = end or snapshot()
    if start is None or end is None or end.wall - start.wall <= 0:
        return {}
    dt = end.wall - start.wall
    ext = (end.busy - start.busy) - (end.ours - start.ours)
    return {"ext_cpu_cores": max(0.0, ext / dt), "steal_cores": (end.steal - start.steal) / dt}
