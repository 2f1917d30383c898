"""Bad input through the real server, bypassing the client library: every case gets a clear
error naming the tensor, or a documented handling, the server stays up, and the next valid
request still equals ranker_naive. The README's behaviour table is this file.

Two kinds of refusal: Triton's own checks (dtype, rank, fixed dims, missing or unknown inputs:
INVALID_ARGUMENT, the same in every backend) and the guards written into the ONNX graphs
(export/guards.py: lengths that disagree, the candidate limit, ranker_naive's memory bound).
The local stand-in runs the graph and nothing else, like the native onnxruntime backend, so a
guard's refusal here is what production answers: INTERNAL with ONNX Runtime's text, which quotes
the guard node's name (the rule, naming the tensors)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from export import reference_features as c
from export.config import ModelConfig
from export.reference_features import reference_generator
from tests.conftest import SMALL

SMALL_NAIVE_WORK = ModelConfig().naive_max_work  # the small test model keeps the default

pytestmark = pytest.mark.server
MODELS = ("ranker", "ranker_naive")
TRITON_DTYPES = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32",
                 np.dtype(np.int32): "INT32", np.dtype(np.float64): "FP64"}


def valid_request(seed: int = 0, length: int = 40, n: int = 6) -> dict[str, np.ndarray]:
    gen = reference_generator(seed=seed, profile_dim=SMALL["profile_dim"])
    return gen.request(length, n).as_inputs()


def infer(url: str, model: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """A raw gRPC request: no client-side validation at all."""
    inputs = []
    for name, value in tensors.items():
        tensor = grpcclient.InferInput(name, list(value.shape), TRITON_DTYPES[value.dtype])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(c.SCORES)],
                              client_timeout=120)
    return result.as_numpy(c.SCORES)


@pytest.fixture
def still_exact(server) -> Callable[[], None]:
    """After a bad request: the server is live and a valid request matches the oracle."""
    def check() -> None:
        request = valid_request(seed=99, length=120, n=9)
        split = infer(server.grpc_url, "ranker", request)
        naive = infer(server.grpc_url, "ranker_naive", request)
        assert float(np.abs(split - naive).max()) <= 1e-5
    return check


def with_(request: dict, **changes: np.ndarray | None) -> dict:
    out = dict(request)
    for name, value in changes.items():
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


BASE = valid_request()
REJECTED_BY_TRITON = {
    "wrong dtype": (with_(BASE, history_item_ids=BASE[c.HISTORY_ITEM_IDS].astype(np.int32)),
                    "history_item_ids"),
    "wrong dtype profile": (with_(BASE, user_profile=BASE[c.USER_PROFILE].astype(np.float64)),
                            "user_profile"),
    "wrong rank": (with_(BASE, candidate_item_ids=BASE[c.CANDIDATE_ITEM_IDS].reshape(-1, 1)),
                   "candidate_item_ids"),
    "profile of wrong length": (with_(BASE, user_profile=np.zeros(3, np.float32)),
                                "user_profile"),
    "request_timestamp of wrong shape": (
        with_(BASE, request_timestamp=np.array([1, 2], dtype=np.int64)), "request_timestamp"),
    "missing input": (with_(BASE, user_profile=None), "user_profile"),
    "extra unknown input": (with_(BASE, user_age=np.zeros(1, np.float32)), "user_age"),
}
HISTORY_RULE = "history_item_ids, history_action_ids and history_timestamps must have the same"
CANDIDATE_RULE = "candidate_item_ids and candidate_category_ids must have the same length"
REJECTED_BY_GRAPH = {
    "action ids of length 1 (would broadcast)": (
        with_(BASE, history_action_ids=BASE[c.HISTORY_ACTION_IDS][:1]), HISTORY_RULE),
    "history lengths disagree": (
        with_(BASE, history_timestamps=BASE[c.HISTORY_TIMESTAMPS][:-3]), HISTORY_RULE),
    "categories != candidates": (
        with_(BASE, candidate_category_ids=BASE[c.CANDIDATE_CATEGORY_IDS][:-1]), CANDIDATE_RULE),
    "category of length 1 (would broadcast)": (
        with_(BASE, candidate_category_ids=BASE[c.CANDIDATE_CATEGORY_IDS][:1]), CANDIDATE_RULE),
    "N above max_candidates": (
        with_(BASE, candidate_item_ids=np.arange(SMALL_LIMIT := 20_001, dtype=np.int64),
              candidate_category_ids=np.zeros(SMALL_LIMIT, np.int64)),
        "more candidates than max_candidates=20000"),
}


# Triton's own checks answer INVALID_ARGUMENT; a graph guard, like any ONNX Runtime failure in
# the native backend, INTERNAL. Both name the tensors.
REJECTED = {**{case: (*v, "StatusCode.INVALID_ARGUMENT") for case, v in REJECTED_BY_TRITON.items()},
            **{case: (*v, "StatusCode.INTERNAL") for case, v in REJECTED_BY_GRAPH.items()}}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", sorted(REJECTED))
def test_rejected_naming_the_tensors(server, still_exact, model: str, case: str) -> None:
    request, named, status = REJECTED[case]
    with pytest.raises(InferenceServerException) as info:
        infer(server.grpc_url, model, request)
    assert info.value.status() == status, info.value
    assert named in info.value.message(), info.value.message()
    still_exact()


def test_naive_refuses_work_above_its_memory_bound(server, still_exact) -> None:
    """N x (L+1)^2 above naive_max_work: ranker_naive refuses (in its graph, so in production
    too) instead of growing its memory with N; the ranker serves the same request, and the
    client library scores it against the oracle in slices that fit."""
    from client.api import RankerClient

    n = SMALL_NAIVE_WORK // (SMALL["max_history"] + 1) ** 2 + 1
    request = valid_request(seed=5, length=SMALL["max_history"], n=n)
    with pytest.raises(InferenceServerException) as info:
        infer(server.grpc_url, "ranker_naive", request)
    assert info.value.status() == "StatusCode.INTERNAL", info.value
    assert f"naive_max_work={SMALL_NAIVE_WORK}" in info.value.message()
    split = infer(server.grpc_url, "ranker", request)
    with RankerClient(server.grpc_url, validate=False) as client:
        naive = client.score(request, "ranker_naive")  # a feature dict, as declared
    np.testing.assert_allclose(split, naive, atol=1e-5, rtol=0)
    still_exact()


def test_zero_candidates_give_empty_scores(server, still_exact) -> None:
    for _ in range(3):  # a crashed stub would fail every later request
        for model in MODELS:
            request = with_(BASE, candidate_item_ids=np.zeros(0, np.int64),
                            candidate_category_ids=np.zeros(0, np.int64))
            assert infer(server.grpc_url, model, request).shape == (0, SMALL["num_tasks"])
    still_exact()


def test_empty_history_is_valid(server, still_exact) -> None:
    empty = np.zeros(0, np.int64)
    request = with_(BASE, history_item_ids=empty, history_action_ids=empty,
                    history_timestamps=empty)
    split = infer(server.grpc_url, "ranker", request)
    assert np.isfinite(split).all()
    np.testing.assert_allclose(split, infer(server.grpc_url, "ranker_naive", request), atol=1e-5)
    still_exact()


def test_history_beyond_max_uses_most_recent(server, still_exact) -> None:
    """L = 100 000: served; only the newest max_history events count."""
    long = valid_request(seed=3, length=100_000, n=4)
    recent = dict(long)
    for name in c.HISTORY_INPUTS:
        recent[name] = long[name][-SMALL["max_history"]:]
    for model in MODELS:
        np.testing.assert_array_equal(infer(server.grpc_url, model, long),
                                      infer(server.grpc_url, model, recent))
    still_exact()


def test_max_candidates_is_served(server, still_exact) -> None:
    request = valid_request(seed=4, length=SMALL["max_history"], n=20_000)
    scores = infer(server.grpc_url, "ranker", request)
    assert scores.shape == (20_000, SMALL["num_tasks"]) and np.isfinite(scores).all()
    sample = {**request, c.CANDIDATE_ITEM_IDS: request[c.CANDIDATE_ITEM_IDS][-50:],
              c.CANDIDATE_CATEGORY_IDS: request[c.CANDIDATE_CATEGORY_IDS][-50:]}
    np.testing.assert_allclose(scores[-50:], infer(server.grpc_url, "ranker_naive", sample),
                               atol=1e-5, rtol=0)
    still_exact()


def test_arbitrary_int64_ids_are_hashed(server, still_exact) -> None:
    extremes = np.array([np.iinfo(np.int64).min, -1, 0, 1, np.iinfo(np.int64).max, -(2**62)],
                        dtype=np.int64)
    request = with_(BASE, candidate_item_ids=extremes, candidate_category_ids=extremes[::-1].copy(),
                    history_item_ids=np.resize(extremes, 40),
                    history_action_ids=np.resize(extremes[::-1], 40))
    split = infer(server.grpc_url, "ranker", request)
    np.testing.assert_allclose(split, infer(server.grpc_url, "ranker_naive", request), atol=1e-5)
    still_exact()


@pytest.mark.parametrize("case", ["nan profile", "inf profile", "timestamps out of order",
                                  "events in the future", "request far in the future"])
def test_values_the_client_rejects_never_give_nan(server, still_exact, case: str) -> None:
    """The client refuses these (tests/test_client_validation.py); sent raw, the server still
    answers finite scores: non-finite profile values are zeroed in the graph, negative time gaps
    fall into the smallest gap bucket."""
    request = {k: v.copy() for k, v in BASE.items()}
    if case == "nan profile":
        request[c.USER_PROFILE][:] = np.nan
    elif case == "inf profile":
        request[c.USER_PROFILE][::2] = np.inf
        request[c.USER_PROFILE][1::2] = -np.inf
    elif case == "timestamps out of order":
        request[c.HISTORY_TIMESTAMPS] = request[c.HISTORY_TIMESTAMPS][::-1].copy()
    elif case == "events in the future":
        request[c.HISTORY_TIMESTAMPS] += 10**9
    else:
        request[c.REQUEST_TIMESTAMP] += 10**12
    for model in MODELS:
        assert np.isfinite(infer(server.grpc_url, model, request)).all(), model
    np.testing.assert_allclose(infer(server.grpc_url, "ranker", request),
                               infer(server.grpc_url, "ranker_naive", request), atol=1e-5)
    still_exact()
