"""Faults through a real tritonserver: the server killed (SIGKILL) under load and restarted on the
same port, and one python-backend stub killed under a running server.

Each test starts its own servers (free localhost ports; never the session `server` fixture, which
these tests would break) and stops them by PID. The killed servers' stubs are checked to exit
(and killed by PID if they do not), and their /dev/shm regions to be gone (removed if not).

What Triton 2.51 does, measured here:
* tritonserver SIGKILLed: calls in flight and new calls fail with UNAVAILABLE (connection reset
  or refused); the stubs notice their parent is gone and exit within ~2 s, removing their shared
  memory. The client's bounded retries carry the calls over a restart on the same port, so
  nothing is lost when the restart fits in the retry budget.
* one stub SIGKILLed: Triton 2.51's python backend does not relaunch it. Every later request to
  that model fails with INTERNAL "Stub process '<model>_0_0' is not healthy." after ~1 s, while
  the server and the model still report ready; other models keep serving. Only a restart of the
  server brings the model back (model control is off): LocalServer.dead_stubs() detects the
  death from the process table and LocalServer.restart() heals it, which is what serve.sh's
  watchdog does every --watchdog-interval seconds (tests/test_serve.py runs that end to end).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from benchmarks.load_test import stop_server
from client.api import RankerClient, RankerError
from client.request import RankingRequest
from client.traffic import edge_case_requests
from export.reference_features import reference_generator
from export.repositories import evaluation_beside
from export.triton_configs import parse
from local_server.processes import (
    is_running,
    kill_lingering,
    process_label,
    remove_shm_regions,
    shm_regions,
    stub_pids,
    wait_gone,
)
from local_server.triton import LocalServer, free_port, start_server
from tests.conftest import SMALL


def served_models(repository: Path) -> list[str]:
    """The models that get a python-backend stub locally: every model but the ensembles, in the
    serving repository and the evaluation one beside it."""
    return [p.parent.name for r in (repository, evaluation_beside(repository))
            for p in r.glob("*/config.pbtxt") if parse(p.read_text()).platform != "ensemble"]

pytestmark = pytest.mark.server

TOLERANCE = 1e-5
WORKERS = 4
TIMEOUT_S = 10.0  # per attempt
RETRIES = 7
BACKOFF_S = 0.25
# Sleeps between attempts: 0.25, 0.5, ..., 16 s; 31.75 s in all, longer than a restart here.
BACKOFF_TOTAL_S = BACKOFF_S * (2**RETRIES - 1)
# No call may take longer: every attempt times out, plus every backoff, plus slack for the
# client's own work (validation, serialisation) on a loaded 2-core machine.
CALL_BOUND_S = (RETRIES + 1) * TIMEOUT_S + BACKOFF_TOTAL_S + 5.0
STUB_EXIT_S = 5.0  # idle stubs poll their parent's health and go within ~2 s
MAX_CALLS = 10_000  # per worker thread, a bound beside the time limit


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


class _RecordingInfer:
    """Wraps the tritonclient client inside a RankerClient and records every failed attempt
    (time, gRPC status), which RankerClient's retries otherwise hide."""

    def __init__(self, inner: object, log: list[tuple[float, str]]) -> None:
        self._inner = inner
        self._log = log

    def infer(self, *args: object, **kwargs: object) -> object:
        try:
            return self._inner.infer(*args, **kwargs)
        except InferenceServerException as e:
            self._log.append((time.monotonic(), str(e.status())))
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


@dataclass
class Call:
    worker: int
    start: float
    end: float
    outcome: str  # "ok" or the error code
    failed_attempts: int
    request: RankingRequest
    scores: np.ndarray | None


@dataclass
class Worker:
    index: int
    url: str
    stop: threading.Event
    deadline: float
    calls: list[Call] = field(default_factory=list)
    attempts: list[tuple[float, str]] = field(default_factory=list)
    busy_since: float | None = None
    crashed: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # recorded, so that the test fails instead of hiding it
            self.crashed = e

    def _run(self) -> None:
        gen = reference_generator(seed=700 + self.index, profile_dim=SMALL["profile_dim"])
        rng = np.random.default_rng(self.index)
        client = RankerClient(self.url, timeout_s=TIMEOUT_S, retries=RETRIES,
                              max_backoff_s=BACKOFF_S * 2**RETRIES,
                              backoff_s=BACKOFF_S)
        client._client = _RecordingInfer(client._client, self.attempts)
        with client:
            client.model_info()  # read while the server is up; validation needs it later
            for _ in range(MAX_CALLS):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    return
                request = gen.request(int(rng.integers(0, SMALL["max_history"] + 1)),
                                      int(rng.integers(1, 201)))
                before = len(self.attempts)
                self.busy_since = start = time.monotonic()
                scores, outcome = None, "ok"
                try:
                    scores = client.score(request)
                except RankerError as e:
                    outcome = e.code or "CLIENT"
                self.busy_since = None
                self.calls.append(Call(self.index, start, time.monotonic(), outcome,
                                       len(self.attempts) - before, request, scores))


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def test_server_sigkill_under_load_then_restart_on_same_port(small_repository: Path) -> None:
    port = free_port()
    servers: list[LocalServer] = [
        start_server(grpc_port=port, repository=small_repository, timeout_s=240)
    ]
    url = servers[0].grpc_url
    stop = threading.Event()
    hard_deadline = time.monotonic() + 240
    workers = [Worker(i, url, stop, hard_deadline) for i in range(WORKERS)]
    probe: list[tuple[float, str]] = []  # a client without retries: what callers see

    def run_probe() -> None:
        gen = reference_generator(seed=99, profile_dim=SMALL["profile_dim"])
        request = gen.request(20, 5)
        with RankerClient(url, timeout_s=2.0, retries=0) as client:
            client.model_info()
            for _ in range(MAX_CALLS):
                if stop.is_set() or time.monotonic() > hard_deadline:
                    return
                start = time.monotonic()
                try:
                    client.score(request)
                    probe.append((start, "ok"))
                except RankerError as e:
                    probe.append((start, e.code or "CLIENT"))
                time.sleep(0.05)

    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    threads.append(threading.Thread(target=run_probe, daemon=True))
    try:
        stubs = stub_pids(servers[0].pid)
        assert len(stubs) == len(served_models(small_repository)), stubs  # one per model
        regions = shm_regions(stubs)
        assert len(regions) == len(stubs), regions
        for t in threads:
            t.start()
        _wait_for(lambda: all(sum(c.outcome == "ok" for c in w.calls) >= 3 for w in workers),
                  60, "every worker to get 3 answers before the kill")

        # Kill while requests are in the server (the case that matters), within a bound.
        busy_deadline = time.monotonic() + 10
        while (sum(w.busy_since is not None for w in workers) < WORKERS // 2
               and time.monotonic() < busy_deadline):
            time.sleep(0.001)
        in_flight = sum(w.busy_since is not None for w in workers)
        t_kill = time.monotonic()
        os.kill(servers[0].pid, signal.SIGKILL)
        servers[0].process.wait(10)

        # Idle stubs notice that their parent is gone and exit (removing their shared memory);
        # a stub that was serving a request stays blocked in the IPC with its dead parent for
        # good (reparented to init). Those are killed by PID and their /dev/shm regions removed.
        lingering = wait_gone(stubs, STUB_EXIT_S)
        lingering_models = sorted(process_label(p) for p in lingering)
        killed = kill_lingering(lingering)
        assert wait_gone(killed, 5.0) == []
        leaked = remove_shm_regions(regions)
        assert not [p for p in stubs if is_running(p)], "a stub of the killed server survived"
        assert not [r for r in regions if (Path("/dev/shm") / r).exists()]
        assert sorted(killed) == sorted(lingering)

        # Same port: start_server's port check binds with SO_REUSEADDR, as gRPC does, so the
        # killed server's connections in TIME_WAIT do not block the restart.
        t_restart = time.monotonic()  # nothing listens on the port before this
        servers.append(start_server(grpc_port=port, repository=small_repository,
                                    timeout_s=240))
        t_ready = time.monotonic()

        def recovered() -> bool:
            return all(sum(c.outcome == "ok" and c.start >= t_ready for c in w.calls) >= 3
                       for w in workers)

        _wait_for(recovered, CALL_BOUND_S + 30, "every worker to get 3 answers after restart")
        stop.set()
        for t in threads:
            t.join(CALL_BOUND_S + 5)
        assert not any(t.is_alive() for t in threads), "a client thread hung"
        for w in workers:
            assert w.crashed is None, f"worker {w.index} crashed: {w.crashed!r}"
        calls = [c for w in workers for c in w.calls]
        attempts = [a for w in workers for a in w.attempts]

        # Callers without retries see UNAVAILABLE while the server is down, and only that.
        outage = [code for t, code in probe if t_kill <= t < t_restart]
        assert outage and set(outage) == {"UNAVAILABLE"}, sorted(set(outage))
        assert all(code in ("ok", "UNAVAILABLE") for _, code in probe)
        assert any(code == "ok" for t, code in probe if t >= t_ready)

        # The workers' failed attempts were all UNAVAILABLE; their retries crossed the outage.
        assert attempts, "no worker attempt failed: the kill was not observed"
        assert {code for _, code in attempts} == {"StatusCode.UNAVAILABLE"}
        spanning = [c for c in calls if c.failed_attempts and c.outcome == "ok"]
        assert spanning, "no call recovered through its retries"

        # Lost: only calls that exhausted their retries, at most one per client thread (what
        # was in flight at the kill), each UNAVAILABLE. With the retry budget above, and a
        # restart in a few seconds, none is expected.
        lost = [c for c in calls if c.outcome != "ok"]
        assert len(lost) <= WORKERS, [(c.worker, c.outcome) for c in lost]
        assert all(c.outcome == "UNAVAILABLE" for c in lost)

        # No call hung: each returned or raised within the bound from timeout, retries, backoff.
        longest = max(c.end - c.start for c in calls)
        assert longest <= CALL_BOUND_S, f"a call took {longest:.1f} s > {CALL_BOUND_S:.1f} s"
        print(f"\nserver kill: {in_flight} calls in flight at the kill; stubs that did not exit "
              f"within {STUB_EXIT_S:.0f} s (killed by PID): {lingering_models or 'none'}, shm "
              f"regions removed: {len(leaked)}; restarted server ready {t_ready - t_kill:.1f} s "
              f"after the kill; {len(attempts)} failed attempts (all UNAVAILABLE), "
              f"{len(spanning)} calls recovered by retries, {len(lost)} lost, longest call "
              f"{longest:.1f} s (bound {CALL_BOUND_S:.1f} s)")

        # After recovery the ensemble equals the oracle: the answers that crossed the outage,
        # then fresh requests including the contract's edge cases, on the restarted server.
        gen = reference_generator(seed=31, profile_dim=SMALL["profile_dim"])
        with RankerClient(url, timeout_s=60) as client:
            for call in spanning[:8]:
                naive = client.score(call.request, model="ranker_naive")
                assert _max_diff(call.scores, naive) <= TOLERANCE
            for name, request in edge_case_requests(gen, SMALL["max_history"]):
                diff = _max_diff(client.score(request), client.score(request, "ranker_naive"))
                assert diff <= TOLERANCE, f"{name}: {diff:.2e}"
    finally:
        stop.set()
        for server in servers:
            stop_server(server)


def test_killed_python_backend_stub_is_detected_and_healed(small_repository: Path) -> None:
    """SIGKILL the stub that runs target_fusion (second step of the ensemble).

    Triton 2.51 does not relaunch it: every later `ranker` request fails fast with INTERNAL
    "Stub process 'target_fusion_0_0' is not healthy." while the server and the model still
    report ready. Asserted: no request hangs or returns a wrong score, the failure names the
    model, models that do not use the stub keep serving exactly, LocalServer.dead_stubs() sees
    the death that readiness hides, and LocalServer.restart() (what serve.sh's watchdog runs)
    brings the ensemble back, exact, on the same port, with the dead stub's shm removed.
    """
    server = start_server(grpc_port=free_port(), repository=small_repository, timeout_s=240)
    gen = reference_generator(seed=17, profile_dim=SMALL["profile_dim"])
    requests = [gen.request(int(length), int(n)) for length, n in
                [(0, 3), (40, 10), (SMALL["max_history"], 20), (120, 64), (7, 1)]]
    try:
        with RankerClient(server.grpc_url, timeout_s=TIMEOUT_S, retries=0) as client:
            expected = [client.score(r, model="ranker_naive") for r in requests]
            for r, e in zip(requests, expected, strict=True):
                assert _max_diff(client.score(r), e) <= TOLERANCE
            assert server.dead_stubs() == []
            (victim,) = stub_pids(server.pid, "target_fusion")
            regions = shm_regions([victim])
            os.kill(victim, signal.SIGKILL)
            assert wait_gone([victim], 5.0) == []
            assert server.dead_stubs() == ["stub:target_fusion"]

            for r in requests[:3]:
                start = time.monotonic()
                with pytest.raises(RankerError) as info:
                    client.score(r)
                assert time.monotonic() - start <= TIMEOUT_S + 1.0
                assert info.value.code == "INTERNAL" and "target_fusion" in str(info.value)
            # readiness cannot tell (Triton 2.51); the process table can
            assert client.is_ready("ranker") and client.is_ready("target_fusion")
            for r, e in zip(requests, expected, strict=True):
                assert _max_diff(client.score(r, model="ranker_naive"), e) <= TOLERANCE

        port = server.grpc_port
        server.restart(240)
        assert server.grpc_port == port and server.dead_stubs() == []
        assert not [r for r in regions if (Path("/dev/shm") / r).exists()]
        with RankerClient(server.grpc_url, timeout_s=TIMEOUT_S) as client:
            for r, e in zip(requests, expected, strict=True):
                assert _max_diff(client.score(r), e) <= TOLERANCE
    finally:
        stop_server(server)
