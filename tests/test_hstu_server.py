"""The HSTU family served by a real tritonserver through its `ranker` and `ranker_cached`
ensembles, from its declaration: export/split_repository.py's repository pair, the local flavour
built from its production configs unchanged, raw tritonclient gRPC requests built from the
declared features. split (`ranker`) == naive (`ranker_naive`) within 1e-5 over an L x N grid with
the edge cases; returning users through the user-state cache (`ranker_cached`: the declared
state tensors user_k, user_v and user_timestamps held per user, the four event features
compared) take every path - miss, hit, append, a rewritten past event, past max_history - each
answer equal to ranker_naive and its `cache_path` the expected one; a request whose lengths
disagree is refused with the guard's name by all three, and the server stays exact."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from export.guards import length_rule
from export.hstu import HSTUConfig, build_hstu
from export.hstu_export import write_hstu_repositories
from export.native_rules import check_repositories
from export.repositories import evaluation_beside
from export.split_contract import SplitContract
from export.split_export import GRAPHS
from tests.test_hstu import TOLERANCE, max_diff, random_request

# Small: two attending layers, max_history 48, query blocks of 16 rows (a 40-event history and
# 20 candidates each run several blocks of the attention's Loop).
CFG = HSTUConfig(d_model=32, num_heads=2, num_layers=3, attention_dim=8, hidden_dim=8,
                 max_history=48, item_buckets=1009, action_buckets=7, position_buckets=32,
                 time_buckets=20, head_hidden=16, attention_block=16, max_candidates=500,
                 seed=5)
LENGTHS = [0, 1, 40, 75]  # 40 > attention_block; 75 > max_history (the newest 48 kept)
CANDIDATE_COUNTS = [0, 1, 20]
USER_ID = "user_id"  # client/contract.py's: the cache's key, not a declared feature


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(contract, gRPC client) of a local tritonserver serving the HSTU repository pair; the
    server is stopped by PID at the end of the module."""
    from local_server.triton import free_port, start_server

    model = build_hstu(CFG)
    serving = tmp_path_factory.mktemp("hstu") / "model_repository_hstu"
    write_hstu_repositories(model, serving, graphs=GRAPHS, source="tests/test_hstu_server.py")
    assert not [v for found in check_repositories(serving).values() for v in found]
    assert sorted(p.name for p in serving.iterdir()) == [
        "ranker", "ranker_cached", "target_fusion", "user_cache", "user_encoder",
        "user_encoder_append"]
    assert [p.name for p in evaluation_beside(serving).iterdir()] == ["ranker_naive"]
    server = start_server(grpc_port=free_port(), repository=serving, timeout_s=240)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        yield model.contract(), client
    finally:
        client.close()
        server.stop()


def _inputs(contract: SplitContract, request: dict[str, np.ndarray]) -> list:
    """Every declared feature, with its declared dtype, in order."""
    assert set(request) == {f.name for f in contract.features}
    inputs = []
    for feature in contract.features:
        value = request[feature.name]
        tensor = grpcclient.InferInput(feature.name, list(value.shape), feature.dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def infer(client: grpcclient.InferenceServerClient, contract: SplitContract, model: str,
          request: dict[str, np.ndarray]) -> np.ndarray:
    """One raw gRPC request of the declared features."""
    outputs = [grpcclient.InferRequestedOutput(o.name) for o in contract.outputs]
    return client.infer(model, _inputs(contract, request),
                        outputs=outputs).as_numpy(contract.outputs[0].name)


def infer_cached(client: grpcclient.InferenceServerClient, contract: SplitContract,
                 request: dict[str, np.ndarray], user_id: int) -> tuple[np.ndarray, str]:
    """One raw ranker_cached request (the declared features + user_id): (scores, cache_path)."""
    user = grpcclient.InferInput(USER_ID, [1], "INT64")
    user.set_data_from_numpy(np.array([user_id], np.int64))
    outputs = [grpcclient.InferRequestedOutput(n) for n in (contract.outputs[0].name,
                                                             "cache_path")]
    result = client.infer("ranker_cached", [user, *_inputs(contract, request)], outputs=outputs)
    path = result.as_numpy("cache_path").reshape(-1)[0]
    return result.as_numpy(contract.outputs[0].name), path.decode()


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("n", CANDIDATE_COUNTS)
def test_ranker_equals_naive(served, length: int, n: int) -> None:
    contract, client = served
    request = random_request(np.random.default_rng(100 * length + n), length, n)
    split = infer(client, contract, "ranker", request)
    naive = infer(client, contract, "ranker_naive", request)
    assert split.shape == (n, CFG.num_tasks)
    assert np.isfinite(split).all()
    assert max_diff(split, naive) <= TOLERANCE


def test_bad_lengths_refused_by_name_then_exact(served) -> None:
    contract, client = served
    request = random_request(np.random.default_rng(9), 30, 5)
    short = {**request, "history_dwell_seconds": request["history_dwell_seconds"][:3]}
    rule = length_rule([f.name for f in contract.history_features], "L")
    for model in ("ranker", "ranker_naive", "ranker_cached"):
        for _ in range(2):  # twice: a cached user must not turn a refusal into an answer
            with pytest.raises(InferenceServerException) as info:
                if model == "ranker_cached":
                    infer_cached(client, contract, short, user_id=99)
                else:
                    infer(client, contract, model, short)
            assert rule in str(info.value), str(info.value)
    naive = infer(client, contract, "ranker_naive", request)
    split = infer(client, contract, "ranker", request)
    assert split.shape == (5, CFG.num_tasks)
    assert max_diff(split, naive) <= TOLERANCE
    cached, path = infer_cached(client, contract, request, user_id=99)
    assert (path, max_diff(cached, naive) <= TOLERANCE) == ("miss", True)


def visit(history: dict[str, np.ndarray], length: int, seed: int,
          rewrite: int | None = None) -> dict[str, np.ndarray]:
    """A request of the user whose events are `history`: its first `length` events (with event
    `rewrite`'s item changed), new candidates and a request time after the newest event."""
    rng = np.random.default_rng(seed)
    request = {n: v[:length].copy() for n, v in history.items()}
    if rewrite is not None:
        request["history_item_ids"][rewrite] += 1
    newest = int(request["history_timestamps"][-1]) if length else 1_600_000_000
    request["candidate_item_ids"] = rng.integers(0, 10**12, 7)
    request["request_timestamp"] = np.array([newest + int(rng.integers(1, 5000))], np.int64)
    return request


def test_returning_users_through_the_cache_equal_naive(served) -> None:
    """One user's story through ranker_cached (max_history 48): every answer equals
    ranker_naive within 1e-5 and reports the path it took. Dwell times include a NaN (the
    event comparison is by content: the same NaN is the same event)."""
    contract, client = served
    full = {n: v for n, v in random_request(np.random.default_rng(21), 80, 1).items()
            if n.startswith("history_")}
    full["history_dwell_seconds"][4] = np.nan
    story = [(20, None, "miss"), (20, None, "hit"), (23, None, "append"),  # ΔL = 3
             (40, None, "append"), (40, None, "hit"), (48, None, "append"),  # fills it exactly
             (52, None, "miss"),  # past max_history: the oldest drop, every position shifts
             (52, None, "hit"),  # an over-long repeat: the same newest 48 events
             (53, None, "miss"),  # grown past max_history
             (30, 10, "miss"),  # a past event changed (and shorter)
             (31, 10, "append"),  # then one new event after the rewrite
             (31, 3, "miss"),  # another past event changed
             (0, None, "miss"), (0, None, "hit"), (5, None, "append")]  # from no history
    for step, (length, rewrite, expected) in enumerate(story):
        request = visit(full, length, step, rewrite)
        scores, path = infer_cached(client, contract, request, user_id=7)
        naive = infer(client, contract, "ranker_naive", request)
        assert scores.shape == naive.shape == (7, CFG.num_tasks)
        diff = max_diff(scores, naive)
        assert (path, diff <= TOLERANCE) == (expected, True), (step, length, path, diff)
    request = visit(full, 5, 99)  # another user with user 7's events: never user 7's entry
    scores, path = infer_cached(client, contract, request, user_id=8)
    assert path == "miss"
    assert max_diff(scores, infer(client, contract, "ranker_naive", request)) <= TOLERANCE
