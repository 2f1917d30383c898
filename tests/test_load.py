"""The load test (benchmarks/load_test.py), short: 16 concurrent clients through a real tritonserver
on the small repository, no errors, no mismatches against ranker_naive, memory figures reported.

The script starts and stops its own server (free localhost ports, stopped by PID); the helpers
that read the process tree's memory are checked on a process tree of the test's own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import load_test as lt
from export.reference_features import reference_features
from local_server import processes
from tests.conftest import SMALL, Output

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.server
def test_load_small_repository(small_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    clients, per_client = 16, 10
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.load_test", "--repository", str(small_repository),
         "--max-history", str(SMALL["max_history"]), "--clients", str(clients),
         "--requests", str(clients * per_client), "--check-every", "5",
         "--time-limit", "120", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["ok"] and figures["failures"] == []
    assert figures["completed"] == clients * per_client
    assert figures["errors"] == 0 and figures["not_sent"] == 0
    assert figures["checks"] == clients * per_client // 5
    assert figures["mismatches"] == 0 and figures["max_abs_diff"] <= lt.TOLERANCE
    assert figures["warmup"]["errors"] == 0 and figures["warmup"]["mismatches"] == 0
    assert figures["throughput_rps"] > 0
    assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p90"] <= (
        figures["latency_ms"]["p99"])
    memory = figures["memory"]
    assert memory["measured"]
    # tritonserver + one stub per ONNX model (user_encoder, target_fusion, naive, base, and
    # user_encoder_append in a causal repository) + user_cache's (the user K/V cache)
    assert memory["processes"] == 7
    assert set(memory["end_by_process_mib"]) == {
        "tritonserver", "stub:user_encoder", "stub:target_fusion", "stub:ranker_naive",
        "stub:ranker_base", "stub:user_encoder_append", "stub:user_cache"}
    assert 0 < memory["after_warmup_mib"] <= memory["max_mib"]
    assert memory["end_mib"] <= memory["max_mib"]
    assert memory["growth_pct"] <= memory["max_growth_pct"]
    assert figures["server_started"] and figures["server_stop"]["exit_code"] == 0
    assert figures["server_stop"]["lingering_stubs_killed"] == []
    assert "| server memory MiB | after warm-up " in proc.stdout  # the figures table


def test_help() -> None:
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "load_test.sh"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--clients", "--requests", "--check-every", "--max-growth-pct", "--json",
                 "--repository", "--url"):
        assert flag in proc.stdout


def test_process_tree_memory_of_own_children() -> None:
    """tree RSS = root + children + grandchildren; a killed process counts 0; stop by PID."""
    script = ("import subprocess, time; c = subprocess.Popen(['sleep', '30']); "
              "print(c.pid, flush=True); time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(Output(parent).readline(30))
        deadline = time.monotonic() + 10  # until the grandchild has exec'd `sleep`
        while processes.cmdline(grandchild) != ["sleep", "30"] and time.monotonic() < deadline:
            time.sleep(0.01)
        tree = processes.process_tree(os.getpid())
        assert tree[0] == os.getpid()
        assert parent.pid in tree and grandchild in tree
        assert processes.process_tree(parent.pid) == [parent.pid, grandchild]
        sample = lt.sample_memory(parent.pid)
        assert set(sample.index) == {"tritonserver", "sleep"}  # the root is the server
        assert sample["sleep"] > 0  # (exact value: it may still be paging in)
        assert sample["tritonserver"] > 0
        assert processes.kill_lingering([grandchild], marker="python") == []  # not its command line
        assert processes.kill_lingering([grandchild], marker="sleep") == [grandchild]
        assert processes.wait_gone([grandchild], 5.0) == []
        assert processes.rss_bytes(grandchild) == 0  # a zombie until its parent reaps it, or gone
        assert lt.sample_memory(parent.pid).get("sleep", 0) == 0
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)


def test_verdict_and_figures() -> None:
    def sample(total: int) -> pd.Series:
        return pd.Series({"tritonserver": total - lt.MIB, "stub:x": lt.MIB}, dtype=float)

    mem = lt.memory_figures(sample(100 * lt.MIB), sample(130 * lt.MIB), 140 * lt.MIB, 20.0)
    assert (mem["growth_mib"], mem["growth_pct"], mem["max_mib"]) == (30.0, 30.0, 140.0)
    assert mem["growth_by_process_mib"] == {"stub:x": 0.0, "tritonserver": 30.0}
    base = {"errors": 0, "error_codes": {}, "mismatches": 0, "max_abs_diff": 0.0,
            "not_sent": 0, "checks_skipped": 0, "memory": mem,
            "warmup": {"errors": 0, "mismatches": 0, "not_sent": 0, "checks_skipped": 0}}
    assert lt.verdict(base) == ["server memory grew 30.0 % after the warm-up (> 20 %)"]
    ok = {**base, "memory": lt.memory_figures(sample(100 * lt.MIB), sample(110 * lt.MIB), 0.0,
                                              20.0)}
    assert lt.verdict(ok) == []
    bad = {**ok, "errors": 2, "error_codes": {"INTERNAL": 2}, "mismatches": 1,
           "max_abs_diff": 1e-3}
    assert len(lt.verdict(bad)) == 2
    assert lt.memory_figures(None, None, 0.0, 20.0)["measured"] is False
    assert lt.percentiles_ms([0.001, 0.002, 0.003])["p50"] == 2.0
    assert lt.percentiles_ms([]) is None


def test_plan_is_seeded_and_checks_every_kth() -> None:
    jobs = lt.plan(20, clients=4, seed=3, declared=reference_features(5), max_history=50,
                   max_candidates=7, check_every=5, largest_first=True)
    again = lt.plan(20, clients=4, seed=3, declared=reference_features(5), max_history=50,
                    max_candidates=7, check_every=5, largest_first=True)
    assert [len(j) for j in jobs] == [5, 5, 5, 5]
    flat = sorted((job for client in jobs for job in client), key=lambda j: j.index)
    assert [j.index for j in flat] == list(range(20))
    assert [j.index for j in flat if j.check] == [0, 5, 10, 15]
    for client in jobs:
        assert (client[0].request.history_length, client[0].request.num_candidates) == (50, 7)
    for job in flat:
        assert 0 <= job.request.history_length <= 50 and 1 <= job.request.num_candidates <= 7
    same = sorted((job for client in again for job in client), key=lambda j: j.index)
    for a, b in zip(flat, same, strict=True):
        assert (a.request.candidate_item_ids == b.request.candidate_item_ids).all()
