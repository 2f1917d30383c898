"""ranker_cached through a real tritonserver: the user K/V cache (user_cache, a python-backend
model calling user_encoder / user_encoder_append through BLS) answers every path exactly like
ranker_naive; each response says which path served it (the `cache_path` output), and Triton's
own inference statistics agree.

Paths: hit (the kept history equals the cached events: no encoder runs), append (the cached
events are a strict prefix and the total fits max_history: user_encoder_append on the new events
only), miss (anything else: user_encoder). The small causal model has max_history 300 and the
server's cache is bounded at SMALL_CACHE_BYTES (about 13 users at full history), so the eviction
test can fill it. The restart test kills and restarts the module's server; the version tests
(staging a folder, a rollout under explicit model control) come after it, the rollout on a
server of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from client.api import RankerClient
from client.metrics import fetch_cache_stats
from client.request import RankingRequest
from client.traffic import RequestGenerator
from export import reference_features as c
from export.reference_features import reference_generator
from tests.conftest import SMALL, SMALL_CACHE_BYTES
from tests.test_bad_input import REJECTED, infer, with_

pytestmark = pytest.mark.server
TOLERANCE = 1e-5
MAX_HISTORY = SMALL["max_history"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(cache_server):
    with RankerClient(cache_server.grpc_url, timeout_s=120) as cl:
        yield cl


def gen(seed: int) -> RequestGenerator:
    return reference_generator(seed=seed, profile_dim=SMALL["profile_dim"], num_items=50_000)


def visit(client: RankerClient, user_id: int, request: RankingRequest) -> tuple[str, float]:
    """One ranker_cached request: (the path user_cache took, max |scores - ranker_naive|)."""
    scores, path, _ = client.score_cached(request, user_id)
    naive = client.score(request, "ranker_naive")
    assert scores.shape == naive.shape == (request.num_candidates, SMALL["num_tasks"])
    assert np.isfinite(scores).all()
    return path, float(np.abs(scores - naive).max()) if scores.size else 0.0


def rewrite_middle(request: RankingRequest, at: int) -> RankingRequest:
    items = request.history_item_ids.copy()
    items[at] += 1
    return request.replace(history_item_ids=items)


def test_every_path_equals_naive_and_reports_its_path(client) -> None:
    g = gen(1)
    user = g.user_id()
    first = g.request(120, 10)
    story = [("first visit", first, "miss")]
    story.append(("repeat, new candidates", g.returning(first, 0), "hit"))
    req = story[-1][1]
    for added in (1, 7, 100):  # 121, 128, 228 events: every append fits max_history 300
        req = g.returning(req, added)
        story.append((f"append {added}", req, "append"))
    story.append(("ΔL = 0, new candidates", g.returning(req, 0), "hit"))
    req = g.returning(req, 100)  # 328 > 300: positions shift, append cannot be exact
    story.append(("append crossing max_history", req, "miss"))
    story.append(("repeat past max_history", g.returning(req, 0), "hit"))
    story.append(("grown past max_history", g.returning(req, 3), "miss"))
    req = rewrite_middle(g.returning(first, 20), 60)
    story.append(("history rewritten in the middle", req, "miss"))
    req = g.returning(req, 5)
    story.append(("append after the rewrite", req, "append"))
    story.append(("rewritten in the middle and grown", rewrite_middle(g.returning(req, 10), 30),
                  "miss"))
    story.append(("shorter history (another device)", first.replace(
        history_item_ids=first.history_item_ids[:50],
        history_action_ids=first.history_action_ids[:50],
        history_timestamps=first.history_timestamps[:50]), "miss"))
    for name, request, expected in story:
        path, diff = visit(client, user, request)
        assert diff <= TOLERANCE, f"{name}: differs from ranker_naive by {diff:.2e}"
        assert path == expected, f"{name}: path {path}, expected {expected}"


def test_the_statistics_agree_with_the_reported_path(client) -> None:
    """A hit runs no encoder, an append only user_encoder_append (Triton's own statistics: an
    encoder's response lands before user_cache answers, so no waiting is needed)."""
    g = gen(2)
    user = g.user_id()
    first = g.request(80, 5)
    client.score(first, "ranker_cached", user)

    def executions() -> dict[str, int]:
        return {m: client.inference_count(m)[1] for m in ("user_encoder", "user_encoder_append")}

    counts = executions()
    assert client.score_cached(g.returning(first, 0), user)[1] == "hit"
    assert executions() == counts
    assert client.score_cached(g.returning(first, 4), user)[1] == "append"
    assert executions() == {**counts, "user_encoder_append": counts["user_encoder_append"] + 1}


def test_empty_history_and_append_from_nothing(client) -> None:
    g = gen(3)
    user = g.user_id()
    empty = g.request(0, 6)
    assert visit(client, user, empty)[0] == "miss"
    assert visit(client, user, g.returning(empty, 0))[0] == "hit"
    grown = g.returning(empty, 5)  # P = 0 cached events, 5 new
    path, diff = visit(client, user, grown)
    assert (path, diff <= TOLERANCE) == ("append", True), (path, diff)


def test_many_new_events_re_encode_instead_of_appending(client) -> None:
    """More than max_append_events new events: user_encoder (memory linear in L) instead of
    user_encoder_append, whose [ΔL, P + ΔL] attention would grow quadratically."""
    from export.triton_configs import MAX_APPEND_EVENTS

    g = gen(7)
    user = g.user_id()
    first = g.request(20, 4)
    assert visit(client, user, first)[0] == "miss"
    path, diff = visit(client, user, g.returning(first, MAX_APPEND_EVENTS + 1))
    assert (path, diff <= TOLERANCE) == ("miss", True), (path, diff)
    assert visit(client, user, first)[0] == "miss"  # 20 cached events again
    path, diff = visit(client, user, g.returning(first, MAX_APPEND_EVENTS))
    assert (path, diff <= TOLERANCE) == ("append", True), (path, diff)


def test_two_users_with_identical_histories_keep_their_own_entries(client) -> None:
    g = gen(4)
    alice, bob = g.user_id(), g.user_id()
    shared = g.request(90, 8)
    assert visit(client, alice, shared)[0] == "miss"
    assert visit(client, bob, shared)[0] == "miss"  # never another user's entry
    changed = rewrite_middle(shared, 10)
    path, diff = visit(client, alice, changed)
    assert (path, diff <= TOLERANCE) == ("miss", True)
    path, diff = visit(client, bob, g.returning(shared, 0))
    assert (path, diff <= TOLERANCE) == ("hit", True)


def test_concurrent_requests_of_one_user_with_different_histories(client) -> None:
    g = gen(5)
    user = g.user_id()
    base = g.request(150, 6)
    variants = [base, g.returning(base, 1), g.returning(base, 30), rewrite_middle(base, 75),
                g.returning(rewrite_middle(base, 3), 9), g.request(40, 6), g.returning(base, 0)]
    expected = [client.score(r, "ranker_naive") for r in variants]
    order = [i % len(variants) for i in range(42)]
    np.random.default_rng(0).shuffle(order)

    def one(i: int) -> float:
        with RankerClient(client.url, timeout_s=120) as own:
            return float(np.abs(own.score(variants[i], "ranker_cached", user)
                                - expected[i]).max())

    with ThreadPoolExecutor(max_workers=8) as pool:
        diffs = list(pool.map(one, order))
    assert max(diffs) <= TOLERANCE, max(diffs)


def test_eviction_under_a_tiny_cache_stays_exact(client, cache_server) -> None:
    metrics = f"127.0.0.1:{cache_server.metrics_port}"
    g = gen(6)
    users = [g.user_id() for _ in range(20)]
    requests = [g.request(MAX_HISTORY, 4) for _ in users]
    before = fetch_cache_stats(metrics)
    for user, request in zip(users, requests, strict=True):
        client.score(request, "ranker_cached", user)
    stats = fetch_cache_stats(metrics)
    assert stats.evictions - before.evictions >= 20 - SMALL_CACHE_BYTES // (MAX_HISTORY * 536)
    assert 0 < stats.bytes_held <= stats.capacity_bytes == SMALL_CACHE_BYTES
    # the oldest user was evicted: a miss again, exact; the newest is still held: a hit
    path, diff = visit(client, users[0], g.returning(requests[0], 0))
    assert (path, diff <= TOLERANCE) == ("miss", True), (path, diff)
    path, diff = visit(client, users[-1], g.returning(requests[-1], 0))
    assert (path, diff <= TOLERANCE) == ("hit", True), (path, diff)


VALID = {**gen(7).request(40, 6).as_inputs(), c.USER_ID: np.array([42], np.int64)}
BAD_USER_ID = {
    "missing user_id": with_(VALID, user_id=None),
    "user_id int32": with_(VALID, user_id=np.array([42], np.int32)),
    "user_id float32": with_(VALID, user_id=np.array([42], np.float32)),
    "user_id of shape [2]": with_(VALID, user_id=np.array([42, 43], np.int64)),
    "user_id of rank 2": with_(VALID, user_id=np.array([[42]], np.int64)),
}


def assert_still_exact(url: str) -> None:
    request = gen(8).request(60, 5).as_inputs()
    cached = infer(url, "ranker_cached", {**request, c.USER_ID: np.array([7], np.int64)})
    assert float(np.abs(cached - infer(url, "ranker_naive", request)).max()) <= TOLERANCE


@pytest.mark.parametrize("case", sorted(BAD_USER_ID))
def test_bad_user_id_is_invalid_argument_naming_it(cache_server, case: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer(cache_server.grpc_url, "ranker_cached", BAD_USER_ID[case])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    assert c.USER_ID in info.value.message(), info.value.message()
    assert_still_exact(cache_server.grpc_url)


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_the_bad_input_table_holds_for_ranker_cached(cache_server, case: str) -> None:
    """As for ranker: Triton's checks, then the guards (lengths that disagree reach
    user_encoder's guard through user_cache, nothing cached; the candidate rules are
    target_fusion's). Twice: a cached user must not turn a refusal into an answer."""
    request, named, status = REJECTED[case]
    for _ in range(2):
        with pytest.raises(InferenceServerException) as info:
            infer(cache_server.grpc_url, "ranker_cached",
                  {**request, c.USER_ID: np.array([6], np.int64)})
        assert info.value.status() == status, info.value
        assert named in info.value.message(), info.value.message()
    assert_still_exact(cache_server.grpc_url)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_returning_user_and_cache_stats(cache_server) -> None:
    result = run_cli("--url", cache_server.grpc_url, "returning-user", "--history-length",
                     "100", "--new-events", "4", "--num-candidates", "8", "--seed", "9")
    assert result.returncode == 0, result.stdout + result.stderr
    paths = [line.split()[-4] for line in result.stdout.splitlines()[2:5]]
    assert paths == ["miss", "append", "hit"], result.stdout
    assert "PASS" in result.stdout
    stats = run_cli("cache-stats", "--metrics-url", f"127.0.0.1:{cache_server.metrics_port}")
    assert stats.returncode == 0, stats.stderr
    assert " hits, " in stats.stdout and " evictions" in stats.stdout, stats.stdout


def test_restart_gives_a_cold_cache_and_stays_exact(client, cache_server) -> None:
    g = gen(10)
    user = g.user_id()
    request = g.request(200, 6)
    visit(client, user, request)
    assert visit(client, user, g.returning(request, 0))[0] == "hit"
    cache_server.restart(timeout_s=240)
    client.wait_ready(["ranker_cached", "ranker_naive"], 60)
    stats = fetch_cache_stats(f"127.0.0.1:{cache_server.metrics_port}")
    assert (stats.hits, stats.appends, stats.misses, stats.users) == (0, 0, 0, 0)
    path, diff = visit(client, user, g.returning(request, 0))
    assert (path, diff <= TOLERANCE) == ("miss", True), (path, diff)


def stage_version(srv, version: str, weights_seed: int | None, tmp_path: Path) -> list[str]:
    """Write version `version` of every ONNX model into the served repositories (serving and
    evaluation), as an operator or a sync job would: new weights when `weights_seed` is given
    (written aside, then moved in whole), else a copy of version 1. Nothing is loaded. Returns
    the models staged."""
    import shutil

    from export.model import build_model
    from export.onnx_export import export_graph, graphs_for, write_model_card
    from local_server.repository import install_local_backend
    from tests.conftest import small_config

    cfg = small_config("causal", seed=weights_seed if weights_seed is not None else SMALL["seed"])
    graphs = graphs_for(cfg)
    model = build_model(cfg) if weights_seed is not None else None
    for graph in graphs:
        staging = tmp_path / f"{graph}_{version}"
        if model is None:
            shutil.copytree(srv.local_model_dir(graph) / "1", staging, symlinks=True)
        else:
            export_graph(model, graph, staging / "model.onnx")
            write_model_card(staging / "model_card.json", cfg, model, [graph], False, None)
            install_local_backend(staging)
        staging.rename(srv.local_model_dir(graph) / version)
    return graphs


def test_staging_a_version_folder_that_is_not_loaded_changes_nothing(client, cache_server,
                                                                     tmp_path: Path) -> None:
    """Model control none: a version 2 folder appears next to version 1 (what an operator does
    before a restart). Triton never loads it, so the cache must not look at it: hits stay hits
    and appends appends, all exact."""
    import shutil

    g = gen(12)
    user, request = g.user_id(), g.request(70, 5)
    visit(client, user, request)
    graphs = stage_version(cache_server, "2", None, tmp_path)
    try:
        assert visit(client, user, g.returning(request, 0))[0] == "hit"
        grown = g.returning(request, 3)
        path, diff = visit(client, user, grown)
        assert (path, diff <= TOLERANCE) == ("append", True), (path, diff)
        path, diff = visit(client, user, g.returning(grown, 0))
        assert (path, diff <= TOLERANCE) == ("hit", True), (path, diff)
    finally:
        for graph in graphs:
            shutil.rmtree(cache_server.local_model_dir(graph) / "2")


def test_a_rollout_under_explicit_model_control(small_repository: Path, tmp_path: Path) -> None:
    """New weights arrive as version 2 of every ONNX model: first staged (nothing changes),
    then loaded through the model control API while clients keep sending repeats and appends.
    No request fails during the switch; afterwards every user cached before it misses once and
    is exact against the new ranker_naive, and no user ever gets K/V that mixes the weights (an
    append across the switch would otherwise extend v1 K/V with v2 events)."""
    import threading
    import time

    from local_server.triton import free_port, start_server

    srv = start_server(grpc_port=free_port(), repository=small_repository, timeout_s=240,
                       model_control="explicit")
    try:
        with RankerClient(srv.grpc_url, timeout_s=120) as cl:
            g = gen(11)
            idle = {g.user_id(): g.request(60, 5) for _ in range(3)}  # untouched until the end
            busy = {g.user_id(): g.request(40, 5) for _ in range(3)}  # appending throughout
            old = {u: cl.score(r, "ranker_cached", u) for u, r in {**idle, **busy}.items()}
            graphs = stage_version(srv, "2", SMALL["seed"] + 1, tmp_path)
            for user, request in idle.items():  # staged, not loaded: still hits on v1
                assert cl.score_cached(g.returning(request, 0), user)[1] == "hit"

            errors: list[str] = []
            stop = threading.Event()

            def keep_appending(user: int) -> None:
                own_gen = gen(user % 1000)  # generators are not shared between threads
                with RankerClient(srv.grpc_url, timeout_s=120) as own:
                    while not stop.is_set():
                        grown = busy[user].history_length < MAX_HISTORY - 50
                        busy[user] = (own_gen.returning(busy[user], 2) if grown
                                      else own_gen.request(40, 5))
                        try:
                            own.score(busy[user], "ranker_cached", user)
                        except Exception as e:  # every failure is the finding
                            errors.append(f"{type(e).__name__}: {e}")

            threads = [threading.Thread(target=keep_appending, args=(u,)) for u in busy]
            for thread in threads:
                thread.start()
            try:
                for graph in graphs:
                    cl._client.load_model(graph)
                deadline = time.monotonic() + 180
                while any(cl._client.get_model_metadata(m).versions != ["2"] for m in graphs):
                    assert time.monotonic() < deadline, "version 2 never replaced version 1"
                    time.sleep(0.5)
                time.sleep(1.0)  # a few more appends on the new weights
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=120)
            assert not errors, errors[:3]
            for user, request in idle.items():
                repeat = g.returning(request, 0)
                path, diff = visit(cl, user, repeat)
                assert (path, diff <= TOLERANCE) == ("miss", True), (path, diff)
                assert float(np.abs(cl.score(repeat, "ranker_naive") - old[user]).max()) > 1e-3
            for user, request in busy.items():  # the entry after the switch: pure v2
                path, diff = visit(cl, user, g.returning(request, 0))
                assert (path, diff <= TOLERANCE) == ("hit", True), (user, path, diff)
                path, diff = visit(cl, user, g.returning(request, 2))
                assert (path, diff <= TOLERANCE) == ("append", True), (user, path, diff)
    finally:
        srv.stop()


# ------------------------------------------------------------------ no server needed
def test_generated_configs_of_the_cache() -> None:
    from client.split_contract import CONTRACT_PARAMETER, contract_from_json
    from export.triton_configs import build_configs, to_flavour
    from tests.conftest import small_config

    causal = build_configs(small_config("causal"))
    bidirectional = build_configs(small_config("bidirectional"))
    params = {k: v.string_value for k, v in causal["user_cache"].parameters.items()}
    assert params["append_model"] == "user_encoder_append"
    declared = contract_from_json(params[CONTRACT_PARAMETER])  # what the cache serves from
    assert declared.max_history == MAX_HISTORY and declared.appendable
    assert bidirectional["user_cache"].parameters["append_model"].string_value == ""
    assert "user_encoder_append" not in bidirectional and "ranker_cached" in bidirectional
    assert to_flavour(causal["user_cache"], "local") == causal["user_cache"]
    steps = [s.model_name for s in causal["ranker_cached"].ensemble_scheduling.step]
    assert steps == ["user_cache", "target_fusion"]
    assert causal["ranker_cached"].input[0].name == c.USER_ID
    assert [i.name for i in causal["ranker"].input] == [
        s.name for s in c.request_inputs(SMALL["profile_dim"])]
    cached = build_configs(small_config("causal"), response_cache=True)
    assert [n for n, cfg in cached.items() if cfg.response_cache.enable] == ["user_encoder"]
    assert not any(cfg.response_cache.enable for cfg in causal.values())


def test_returning_users_grow_at_the_end_with_later_times() -> None:
    g = gen(11)
    first = g.request(50, 7)
    for added in (0, 1, 25):
        back = g.returning(first, added)
        assert back.history_length == 50 + added and back.num_candidates == 7
        for name in c.HISTORY_INPUTS:
            np.testing.assert_array_equal(getattr(back, name)[:50], getattr(first, name))
        assert (np.diff(back.history_timestamps) >= 0).all()
        assert back.request_timestamp[0] > max(first.request_timestamp[0],
                                               back.history_timestamps[-1])
        np.testing.assert_array_equal(back.user_profile, first.user_profile)
        assert not np.array_equal(back.candidate_item_ids, first.candidate_item_ids)
