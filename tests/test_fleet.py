"""A fleet through the real balancer: nginx (Debian's) in front of 3 real tritonservers serving
the small causal model, returning-user traffic from client/traffic.py, sampled responses
checked against ranker_naive.

Which replica served a request is nginx's own record (its access log: `$upstream_addr` per
request); which path user_cache took is each replica's Prometheus counters
(`user_cache_requests_total{path=...}`). One fleet serves the whole module; each test leaves
it with its 3 replicas, except the last, which kills one.
"""

from __future__ import annotations

import bisect
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.__main__ import main as client_main
from client.api import RankerClient, RankerError
from client.contract import USER_ID_HEADER
from client.metrics import CacheStats
from client.request import RankingRequest
from client.traffic import returning_traffic
from deploy.production import grpc_restriction
from export.reference_features import reference_generator
from local_server.fleet import Fleet, FleetError, start_fleet
from local_server.triton import REPO_ROOT, free_port
from tests.conftest import SMALL, Output

pytestmark = [pytest.mark.server, pytest.mark.slow]

P = SMALL["profile_dim"]
TOLERANCE = 1e-5
INFER = "/inference.GRPCInferenceService/ModelInfer"
CHECK_EVERY = 5  # every 5th response is compared with ranker_naive


@pytest.fixture(scope="module")
def fleet(small_repository: Path) -> Iterator[Fleet]:
    f = start_fleet(3, free_port(), small_repository, ready_timeout_s=240)
    try:
        yield f
    finally:
        f.stop()


def totals(stats: list[CacheStats | None]) -> Counter:
    out: Counter = Counter()
    for s in stats:
        if s is not None:
            out.update(hit=s.hits, append=s.appends, miss=s.misses)
    return out


def paths_of(fleet: Fleet, before: list[CacheStats | None]) -> Counter:
    """Paths taken since `before` on the replicas still running."""
    after = fleet.cache_stats()
    out: Counter = Counter()
    for b, a in zip(before, after, strict=True):
        if a is not None and b is not None:
            out.update(hit=a.hits - b.hits, append=a.appends - b.appends,
                       miss=a.misses - b.misses)
    return out


def reuse_share(paths: Counter) -> float:
    served = paths["hit"] + paths["append"] + paths["miss"]
    return (paths["hit"] + paths["append"]) / served


def check_against_naive(client: RankerClient, req: RankingRequest, scores: np.ndarray) -> None:
    expected = client.score(req, "ranker_naive")
    assert float(np.max(np.abs(scores - expected))) <= TOLERANCE


def send(url: str, traffic: list[tuple[int, RankingRequest]], retries: int = 6) -> None:
    """Every request through ranker_cached, every CHECK_EVERY-th checked against naive."""
    with RankerClient(url, model="ranker_cached", retries=retries) as client:
        for i, (user, req) in enumerate(traffic):
            scores = client.score(req, user_id=user)
            if i % CHECK_EVERY == 0:
                check_against_naive(client, req, scores)


def routes(fleet: Fleet, since: int = 0, uri: str = INFER) -> dict[str, list[str]]:
    """user id -> the replicas (host:port, the last one tried) that served its requests, in
    order, from nginx's access log entries after the first `since`."""
    time.sleep(0.2)  # nginx writes the entry just after the response
    out: dict[str, list[str]] = {}
    for entry in fleet.nginx.access_log()[since:]:
        if entry["uri"] == uri and entry["user_id"]:
            out.setdefault(entry["user_id"], []).append(entry["upstream_addr"].split(", ")[-1])
    return out


# --------------------------------------------------------------------------- the edge
def test_only_inference_metadata_and_health_pass(fleet: Fleet) -> None:
    """Through nginx a shared-memory registration and a trace setting are refused by the
    balancer; on a replica directly Triton refuses them without the admin key (the
    production command's restriction) and accepts them with it; inference passes."""
    edge = grpcclient.InferenceServerClient(fleet.url)
    direct = grpcclient.InferenceServerClient(fleet.replicas[0].grpc_url)
    try:
        for client, code, words in ((edge, "PERMISSION_DENIED", "only inference"),
                                    (direct, "UNAVAILABLE", "restricted")):
            with pytest.raises(InferenceServerException) as shm:
                client.register_system_shared_memory("fleet_test", "/fleet_test", 64)
            with pytest.raises(InferenceServerException) as trace:
                client.update_trace_settings(settings={"trace_rate": "1"})
            for e in (shm.value, trace.value):
                assert e.status() == f"StatusCode.{code}" and words in e.message(), e
        with pytest.raises(InferenceServerException, match="only inference"):
            edge.update_trace_settings(settings={"trace_rate": "1"}, headers=fleet.admin_header)
        direct.update_trace_settings(settings={"trace_rate": "1000"}, headers=fleet.admin_header)
        assert edge.is_server_live() and edge.is_model_ready("ranker_cached")
        with grpc.insecure_channel(fleet.url) as channel:  # the standard gRPC health check
            check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                        request_serializer=bytes, response_deserializer=bytes)
            assert check(b"", timeout=10) == b"\x08\x01"  # status: SERVING
    finally:
        edge.close()
        direct.close()
    assert grpc_restriction(fleet.admin_key) in fleet.replicas[0].args
    # RankerClient does not retry a restricted protocol's UNAVAILABLE: asking again cannot help
    with RankerClient(fleet.replicas[0].grpc_url, retries=6) as client, \
            pytest.raises(RankerError, match="restricted") as refused:
        client.repository_index()
    assert "attempts" not in str(refused.value)
    # the CLI's health check through the edge: the named models; the index is not exposed
    assert client_main(["--url", fleet.url, "health", "--model", "ranker_cached"]) == 0
    assert client_main(["--url", fleet.url, "--timeout", "5", "health"]) == 2
    gen = reference_generator(seed=31, profile_dim=P)
    with RankerClient(fleet.url, retries=0) as client:
        req = gen.request(40, 7)
        check_against_naive(client, req, client.score(req, "ranker_cached", gen.user_id()))
        check_against_naive(client, req, client.score(req, "ranker"))


def test_requests_without_user_id_spread_evenly(fleet: Fleet) -> None:
    start = len(fleet.nginx.access_log())
    gen = reference_generator(seed=32, profile_dim=P)
    with RankerClient(fleet.url, retries=0) as client:
        for _ in range(30):
            client.score(gen.request(10, 3), "ranker")
    time.sleep(0.2)
    served = Counter(e["upstream_addr"] for e in fleet.nginx.access_log()[start:]
                     if e["uri"] == INFER)
    assert sorted(served) == sorted(s.grpc_url for s in fleet.replicas)
    assert max(served.values()) - min(served.values()) <= 2, served


# --------------------------------------------------------------------------- affinity
def test_affinity_keeps_one_servers_hit_rate(fleet: Fleet) -> None:
    """The same kind of returning-user traffic (24 users x 5 visits, new users per run)
    through one replica directly, through nginx hashing on the user id, and through nginx in
    round robin, side by side: hashing keeps one server's share of requests served without a
    full encode (within 5 points); round robin loses what affinity saves."""
    shares = {}
    for mode, seed in (("one server", 41), ("hash", 42), ("round robin", 43)):
        traffic = returning_traffic(reference_generator(seed=seed, profile_dim=P), 24, 5)
        url = fleet.replicas[0].grpc_url if mode == "one server" else fleet.url
        if mode == "round robin":
            fleet.nginx.reload([s.grpc_url for s in fleet.replicas], balance="round-robin")
        before = fleet.cache_stats()
        try:
            send(url, traffic)
        finally:
            if mode == "round robin":
                fleet.nginx.reload([s.grpc_url for s in fleet.replicas], balance="hash")
        paths = paths_of(fleet, before)
        assert sum(paths.values()) == len(traffic), paths
        shares[mode] = reuse_share(paths)
    print(f"share of requests without a full encode: {shares}")
    assert abs(shares["hash"] - shares["one server"]) <= 0.05, shares
    assert shares["round robin"] < shares["hash"] - 0.15, shares


def test_added_replica_moves_only_its_share_of_users(fleet: Fleet) -> None:
    """3 -> 4 replicas: nginx's routing of 1000 user ids (health RPCs carrying the header,
    routed like inference) before and after; at most 1/4 + 5 points move, all of them to the
    new replica. 30 of them send real requests: those that moved miss once on the new replica,
    the others keep hitting."""
    probe = [str(u) for u in np.random.default_rng(5).integers(-2**63, 2**63 - 1, 1000)]
    gen = reference_generator(seed=51, profile_dim=P)
    real = {int(u): gen.request(30, 4) for u in probe[:30]}

    def route_all() -> dict[str, str]:
        start = len(fleet.nginx.access_log())
        client = grpcclient.InferenceServerClient(fleet.url)
        try:
            for u in probe:
                assert client.is_model_ready("ranker_cached", headers={USER_ID_HEADER: u})
        finally:
            client.close()
        return {u: r[-1] for u, r in routes(fleet, start, "/inference.GRPCInferenceService/"
                                                          "ModelReady").items()}

    before = route_all()
    send(fleet.url, [(u, r) for u, r in real.items()])
    new = fleet.add_replica()
    try:
        after = route_all()
        moved = {u for u in probe if before[u] != after[u]}
        share = len(moved) / len(probe)
        print(f"3 -> 4 replicas: {share:.1%} of 1000 users moved")
        assert {after[u] for u in moved} == {new.grpc_url}
        # nginx's ring, rebuilt from its algorithm, predicts every route exactly: the routing is
        # consistent hashing (only the new replica's arc moves), whatever the ports drawn.
        ring = [ketama_ring([s.grpc_url for s in fleet.replicas[:n]]) for n in (3, 4)]
        assert before == {u: ketama_route(ring[0], u) for u in probe}
        assert after == {u: ketama_route(ring[1], u) for u in probe}
        # The share that moves is the new replica's arc: 1/4 on average, wider or narrower by
        # the 160 points per server that nginx draws from the addresses. The bound holds for
        # this fleet's addresses, or else for 95 % of address draws (a 4-replica ring with random
        # ports exceeds 1/4 + 5 points about 1 % of the time: then this fleet drew such ports).
        within = share <= 1 / 4 + 0.05 or ketama_bound_rate(probe) >= 0.95
        assert within, share
        stats = fleet.cache_stats()
        send(fleet.url, [(u, gen.returning(r, 0)) for u, r in real.items()])
        paths = [paths_of_one(b, a) for b, a in zip(stats, fleet.cache_stats(), strict=True)]
        moved_real = sum(str(u) in moved for u in real)
        assert paths[-1] == Counter(miss=moved_real), paths  # the new replica: one miss each
        assert sum((p for p in paths[:-1]), Counter()) == Counter(hit=len(real) - moved_real)
    finally:
        fleet.remove_replica(len(fleet.replicas) - 1)
    assert len(fleet.replicas) == 3


def ketama_ring(upstreams: list[str]) -> list[tuple[int, str]]:
    """nginx's `hash ... consistent` ring (ngx_http_upstream_init_chash): 160 points per server
    of weight 1, point j = crc32(host, NUL, port, point j-1 as 4 little-endian bytes)."""
    points = []
    for address in upstreams:
        host, port = address.rsplit(":", 1)
        previous = 0
        for _ in range(160):
            previous = zlib.crc32(host.encode() + b"\0" + port.encode()
                                  + struct.pack("<I", previous))
            points.append((previous, address))
    return sorted(points)


def ketama_route(ring: list[tuple[int, str]], key: str) -> str:
    """The server of the first point at or after crc32(key), wrapping around."""
    i = bisect.bisect_left(ring, (zlib.crc32(key.encode()), ""))
    return ring[i % len(ring)][1]


def ketama_bound_rate(keys: list[str], draws: int = 400) -> float:
    """Share of random 4-replica address draws where adding the 4th moves <= 1/4 + 5 points."""
    rng = np.random.default_rng(0)
    ok = 0
    for _ in range(draws):
        ports = rng.choice(np.arange(20000, 60000), 4, replace=False)
        three, four = (ketama_ring([f"127.0.0.1:{p}" for p in ports[:n]]) for n in (3, 4))
        moved = sum(ketama_route(three, k) != ketama_route(four, k) for k in keys)
        ok += moved / len(keys) <= 1 / 4 + 0.05
    return ok / draws


def paths_of_one(before: CacheStats, after: CacheStats) -> Counter:
    return +Counter(hit=after.hits - before.hits, append=after.appends - before.appends,
                    miss=after.misses - before.misses)


# --------------------------------------------------------------------------- replica loss
def test_replica_killed_under_load(fleet: Fleet) -> None:
    """4 client threads send returning-user traffic while one replica is SIGKILLed: no
    request fails at the client; only the dead replica's users change replica and miss once
    there; everyone hits again afterwards. nginx passes a request on to the next replica when
    connecting fails, but its gRPC proxy streams request bodies, so the requests that were
    already on the dead replica come back UNAVAILABLE (HTTP 502) and RankerClient's retry of
    UNAVAILABLE sends them again: the balancer now skips the dead replica. Leaves the fleet
    with a dead replica (the last fleet test of the module)."""
    gen = reference_generator(seed=61, profile_dim=P)
    users = {gen.user_id(): gen.request(int(length), 5)
             for length in np.random.default_rng(6).integers(15, 60, 12)}
    start = len(fleet.nginx.access_log())
    send(fleet.url, list(users.items()), retries=0)
    home = {u: r[-1] for u, r in routes(fleet, start).items()}
    victim_url = Counter(home.values()).most_common(1)[0][0]
    victim = fleet.replica_of(victim_url)
    moved = {int(u) for u, r in home.items() if r == victim_url}
    assert moved and len(moved) < len(users)

    before = fleet.cache_stats()
    before[victim] = None  # its counters die with it
    failures: list[str] = []
    done = Counter()
    lock = threading.Lock()
    mine = [list(users)[i::4] for i in range(4)]
    generators = [reference_generator(seed=70 + i, profile_dim=P) for i in range(4)]

    def worker(index: int) -> None:
        with RankerClient(fleet.url, model="ranker_cached") as client:
            for visit in range(6):
                for user in mine[index]:
                    req = generators[index].returning(users[user], (visit % 2) * 3)
                    try:
                        scores = client.score(req, user_id=user)
                        if visit == 5:
                            check_against_naive(client, req, scores)
                        users[user] = req
                    except (RankerError, AssertionError) as e:
                        with lock:
                            failures.append(repr(e))
                    with lock:
                        done["requests"] += 1

    load_start = len(fleet.nginx.access_log())
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while done["requests"] < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    fleet.kill_replica(victim)
    for t in threads:
        t.join(120)
    assert not failures, failures[:3]
    assert done["requests"] == 72
    time.sleep(0.2)
    answered_502 = [e for e in fleet.nginx.access_log()[load_start:] if e["status"] == "502"]
    print(f"replica killed under load: 0 of 72 requests failed at the client; "
          f"{len(answered_502)} in flight on it came back 502 and were retried by the client")
    assert {e["upstream_addr"] for e in answered_502} <= {victim_url}

    # afterwards, one more visit each, sequentially: every user hits (or appends)
    stats = fleet.cache_stats()
    for user in users:
        send(fleet.url, [(user, gen.returning(users[user], 0))], retries=0)
    after_paths = paths_of(fleet, stats)
    assert after_paths["miss"] == 0 and after_paths["hit"] == len(users), after_paths

    # only the dead replica's users changed replica, each to one survivor, and missed once
    served = routes(fleet, load_start)
    for user, replicas in served.items():
        survivors = [r for r in replicas if r != victim_url]
        if int(user) in moved:
            assert len(set(survivors)) == 1, (user, replicas)
        else:
            assert set(replicas) == {home[user]}, (user, replicas)
    misses = paths_of(fleet, before)["miss"]
    assert misses == len(moved), (misses, moved)


# --------------------------------------------------------------------------- scripts/fleet.sh
def _run_fleet_sh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO_ROOT / "scripts" / "fleet.sh"), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_fleet_sh_refuses_missing_nginx_and_taken_port(tmp_path: Path) -> None:
    missing = _run_fleet_sh("--replicas", "1", "--grpc-port", str(free_port()),
                            env={"NGINX_BINARY": str(tmp_path / "no-nginx")})
    assert missing.returncode == 1
    assert "nginx" in missing.stderr and "not installed" in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _run_fleet_sh("--replicas", "1", "--grpc-port", str(port))
    assert busy.returncode == 1 and f"port {port}" in busy.stderr and "in use" in busy.stderr
    with pytest.raises(FleetError, match="replicas"):
        start_fleet(0, free_port())


def test_fleet_sh_serves_until_stopped(small_repository: Path) -> None:
    """The command itself: one ready line, a scored request through its port, SIGINT stops
    nginx and the replica (their PIDs are gone)."""
    port = free_port()
    proc = subprocess.Popen(
        ["bash", str(REPO_ROOT / "scripts" / "fleet.sh"), "--replicas", "1", "--grpc-port",
         str(port), "--repository", str(small_repository)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Output(proc)
    try:
        ready = ""
        while not ready.startswith("fleet: ready"):
            ready = output.readline(240)
            assert ready, "fleet.sh exited: " + "".join(output.seen)
        assert f"grpc 127.0.0.1:{port}" in ready and "hash $http_user_id consistent" in ready
        pids = [int(p) for p in re.findall(r"pid (\d+)", ready)]
        gen = reference_generator(seed=81, profile_dim=P)
        with RankerClient(f"127.0.0.1:{port}", retries=0) as client:
            req = gen.request(12, 3)
            check_against_naive(client, req, client.score(req, "ranker_cached", 7))
    finally:
        proc.send_signal(signal.SIGINT)
        out = output.rest(60)
    assert proc.returncode == 0, out
    assert "stopped nginx and every replica" in out
    assert len(pids) >= 2 and not [p for p in pids if Path(f"/proc/{p}").exists()], pids
