"""validate_request: every contract violation raises RequestError naming the tensor."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from client.request import RankingRequest
from client.validation import MAX_FUTURE_SKEW_S, RequestError, validate_request
from export.reference_features import (
    reference_features,
    reference_generator,
    reference_request,
)

P = 16
NOW = 1_800_000_000


def make_request() -> RankingRequest:
    """A small valid request built by hand, so each case changes exactly one thing."""
    return reference_request(
        history_item_ids=np.array([11, -5, 2**62, 11, 7], dtype=np.int64),
        history_action_ids=np.array([1, 1, 2, 3, 4], dtype=np.int64),
        history_timestamps=np.array([100, 100, 160, 5_000, 5_030], dtype=np.int64),
        candidate_item_ids=np.array([3, 4, 5], dtype=np.int64),
        candidate_category_ids=np.array([30, 40, 30], dtype=np.int64),
        request_timestamp=np.array([5_040], dtype=np.int64),
        user_profile=np.linspace(-1, 1, P, dtype=np.float32),
    )


def test_valid_requests_pass() -> None:
    validate_request(make_request(), now=NOW)
    validate_request(make_request())  # without the optional checks
    empty = make_request().replace(
        history_item_ids=np.zeros(0, np.int64), history_action_ids=np.zeros(0, np.int64),
        history_timestamps=np.zeros(0, np.int64),
    )
    validate_request(empty, now=NOW)
    gen = reference_generator(seed=4)
    for req in gen.requests(20, [0, 1, 50, 300], [1, 20]):
        validate_request(req, now=NOW)


def _set(**changes: object) -> Callable[[RankingRequest], RankingRequest]:
    return lambda req: req.replace(**changes)


def _with(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable:
    return lambda req: req.replace(**{name: fn(getattr(req, name))})


CASES: list[tuple[str, Callable[[RankingRequest], RankingRequest], list[str]]] = [
    ("history ids int32", _with("history_item_ids", lambda a: a.astype(np.int32)),
     ["history_item_ids", "int64", "int32"]),
    ("timestamps uint64", _with("history_timestamps", lambda a: a.astype(np.uint64)),
     ["history_timestamps", "int64"]),
    ("candidate ids float64", _with("candidate_item_ids", lambda a: a.astype(np.float64)),
     ["candidate_item_ids", "int64", "float64"]),
    ("request ts int32", _with("request_timestamp", lambda a: a.astype(np.int32)),
     ["request_timestamp", "int64"]),
    ("profile float64", _with("user_profile", lambda a: a.astype(np.float64)),
     ["user_profile", "float32", "float64"]),
    ("profile float16", _with("user_profile", lambda a: a.astype(np.float16)),
     ["user_profile", "float32"]),
    ("big-endian ids", _with("candidate_category_ids", lambda a: a.astype(">i8")),
     ["candidate_category_ids", "int64"]),
    ("list not array", _with("candidate_item_ids", lambda a: a.tolist()),
     ["candidate_item_ids", "numpy array"]),
    ("history 2-D", _with("history_action_ids", lambda a: a.reshape(1, -1)),
     ["history_action_ids", "1-D", "[1, 5]"]),
    ("candidates 0-D", _set(candidate_category_ids=np.array(3, dtype=np.int64)),
     ["candidate_category_ids", "1-D"]),
    ("profile 2-D", _with("user_profile", lambda a: a.reshape(4, 4)),
     ["user_profile", "1-D"]),
    ("history lengths", _with("history_action_ids", lambda a: a[:4]),
     ["history_action_ids", "history_item_ids", "5", "4"]),
    ("history timestamps length", _with("history_timestamps", lambda a: a[:3]),
     ["history_timestamps", "5", "3"]),
    ("candidate lengths", _with("candidate_category_ids", lambda a: np.append(a, 9)),
     ["candidate_category_ids", "candidate_item_ids", "3", "4"]),
    ("request ts shape [2]", _set(request_timestamp=np.array([5_040, 5_041], dtype=np.int64)),
     ["request_timestamp", "[1]", "[2]"]),
    ("request ts scalar", _set(request_timestamp=np.array(5_040, dtype=np.int64)),
     ["request_timestamp", "[1]", "[]"]),
    ("request ts empty", _set(request_timestamp=np.zeros(0, dtype=np.int64)),
     ["request_timestamp", "[1]", "[0]"]),
    ("profile length", _with("user_profile", lambda a: a[:8]),
     ["user_profile", "16", "8"]),
    ("profile NaN", _with("user_profile", lambda a: np.where(np.arange(P) == 3, np.nan, a)
                          .astype(np.float32)),
     ["user_profile", "nan", "index 3"]),
    ("profile +inf", _with("user_profile", lambda a: np.append(a[:-1], np.float32(np.inf))),
     ["user_profile", "inf", f"index {P - 1}"]),
    ("profile -inf", _with("user_profile", lambda a: np.append(np.float32(-np.inf), a[1:])),
     ["user_profile", "-inf", "index 0"]),
    ("decreasing timestamps", _set(history_timestamps=np.array([100, 200, 150, 160, 5_000],
                                                                dtype=np.int64)),
     ["history_timestamps", "non-decreasing", "[2] = 150", "[1] = 200"]),
    ("event after request", _set(request_timestamp=np.array([4_000], dtype=np.int64)),
     ["history_timestamps", "request_timestamp", "event 3", "4000"]),
    ("request in the future", _set(request_timestamp=np.array([NOW + 3_600], dtype=np.int64),
                                   history_timestamps=np.full(5, NOW, dtype=np.int64)),
     ["request_timestamp", "future", "3600"]),
]


@pytest.mark.parametrize(("label", "mutate", "words"), CASES, ids=[c[0] for c in CASES])
def test_each_violation_names_the_tensor(
    label: str, mutate: Callable[[RankingRequest], RankingRequest], words: list[str]
) -> None:
    req = mutate(make_request())
    with pytest.raises(RequestError) as info:
        validate_request(req, now=NOW)
    message = str(info.value)
    for word in words:
        assert word in message, f"{label}: {word!r} not in {message!r}"


def test_optional_checks_only_when_asked() -> None:
    short_profile = make_request().replace(user_profile=np.zeros(3, np.float32))
    validate_request(short_profile, reference_features(3))  # a model declaring P = 3
    with pytest.raises(RequestError, match="user_profile"):
        validate_request(short_profile)  # its own declaration: P = 16
    req = make_request()
    ts = int(req.request_timestamp[0])
    validate_request(req, now=ts - MAX_FUTURE_SKEW_S)  # exactly at the allowed skew
    with pytest.raises(RequestError, match="request_timestamp"):
        validate_request(req, now=ts - MAX_FUTURE_SKEW_S - 1)


def test_candidate_limit_only_when_given() -> None:
    req = make_request()
    n = req.num_candidates
    validate_request(req, max_candidates=n)
    with pytest.raises(RequestError, match=f"candidate_item_ids: {n} candidates exceed"):
        validate_request(req, max_candidates=n - 1)


def test_validation_never_changes_the_request() -> None:
    req = make_request().replace(
        user_profile=np.full(P, np.nan, dtype=np.float32),
        history_timestamps=np.array([5, 4, 3, 2, 1], dtype=np.int64),
    )
    before = reference_request(**{k: v.copy() for k, v in req.features.items()})
    for _ in range(2):
        with pytest.raises(RequestError):
            validate_request(req)
    assert req == before


def test_request_error_is_a_value_error() -> None:
    assert issubclass(RequestError, ValueError)
