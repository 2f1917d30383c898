"""RankingRequest, its JSON form and the synthetic traffic generator (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.request import INT64_MAX, INT64_MIN, RankingRequest
from client.traffic import Action, RequestGenerator, category_of, edge_case_requests
from client.validation import RequestError, validate_request
from export import reference_features as c
from export.reference_features import reference_generator

P = 16
MAX_HISTORY = 64


@pytest.fixture(scope="module")
def gen() -> RequestGenerator:
    return reference_generator(seed=11)


@pytest.fixture(scope="module")
def traffic() -> list[RankingRequest]:
    return list(reference_generator(seed=3).requests(300, [20, 100, 300], [50, 200]))


@pytest.fixture(scope="module")
def edge_cases() -> list[tuple[str, RankingRequest]]:
    return edge_case_requests(reference_generator(seed=5), MAX_HISTORY)


# --------------------------------------------------------------------------- generator
def test_same_seed_same_requests_and_different_seed_differs() -> None:
    a = list(reference_generator(seed=7).requests(5, [0, 3, 40], [1, 10]))
    b = list(reference_generator(seed=7).requests(5, [0, 3, 40], [1, 10]))
    other = list(reference_generator(seed=8).requests(5, [0, 3, 40], [1, 10]))
    assert a == b
    assert a != other
    ga, gb = reference_generator(seed=7), reference_generator(seed=7)
    assert ga.request(30, 7) == gb.request(30, 7)


def test_request_shapes_dtypes_and_contract_order(gen: RequestGenerator) -> None:
    req = gen.request(37, 12)
    assert (req.history_length, req.num_candidates) == (37, 12)
    inputs = req.as_inputs()
    specs = c.request_inputs(P)
    assert list(inputs) == [s.name for s in specs]
    for spec in specs:
        array = inputs[spec.name]
        assert array.dtype == np.dtype(spec.np_dtype), spec.name
        assert array.ndim == 1 and array.flags.c_contiguous, spec.name
    assert inputs[c.REQUEST_TIMESTAMP].shape == (1,)
    assert inputs[c.USER_PROFILE].shape == (P,)
    assert np.all(np.isfinite(req.user_profile))
    validate_request(req, now=2_000_000_000)


def test_as_inputs_refuses_to_cast(gen: RequestGenerator) -> None:
    req = gen.request(5, 5)
    bad = req.replace(candidate_item_ids=req.candidate_item_ids.astype(np.float64))
    with pytest.raises(RequestError, match="candidate_item_ids"):
        bad.as_inputs()


def test_timestamps_sessions_and_request_time(traffic: list[RankingRequest]) -> None:
    gaps = []
    for req in traffic:
        ts = req.history_timestamps
        assert np.all(np.diff(ts) >= 0)
        assert ts[-1] < req.request_timestamp[0]  # the request comes a bit after the last event
        assert req.request_timestamp[0] - ts[-1] < 61 * 86_400
        assert ts[0] > 1_700_000_000  # plausible unix seconds
        gaps.append(np.diff(ts))
    gaps = np.concatenate(gaps)
    assert np.mean(gaps < 120) > 0.5  # most gaps are seconds inside a session
    assert np.mean(gaps >= 3_600) > 0.03  # hours or days between sessions
    assert np.any(gaps >= 86_400)
    assert np.any(gaps == 0)  # several events within one second happen


def test_actions_are_documented_codes_with_decreasing_frequency(
    traffic: list[RankingRequest],
) -> None:
    actions = np.concatenate([r.history_action_ids for r in traffic])
    counts = [int(np.sum(actions == a)) for a in Action]
    assert sum(counts) == len(actions)  # only Action codes
    assert counts == sorted(counts, reverse=True) and counts[-1] > 0
    assert (Action.VIEW, Action.CLICK, Action.LIKE, Action.PURCHASE) == (1, 2, 3, 4)


def test_item_popularity_is_zipf_like(traffic: list[RankingRequest]) -> None:
    gen = reference_generator(seed=3)
    top = gen.item_ids[: gen.num_items // 100]  # the 1% most popular items
    events = np.concatenate([r.history_item_ids for r in traffic])
    share = np.isin(events, top).mean()
    assert share > 0.3, share  # uniform popularity would give ~0.01
    assert len(np.unique(events)) > 0.2 * len(events)  # and a long tail


def test_ids_are_huge_sparse_with_stable_categories(traffic: list[RankingRequest]) -> None:
    ids = np.concatenate([r.candidate_item_ids for r in traffic])
    assert ids.min() >= 10**15 and ids.max() > 2**60
    for req in traffic[:20]:
        assert np.array_equal(req.candidate_category_ids, category_of(req.candidate_item_ids))
        assert len(np.unique(req.candidate_item_ids)) == req.num_candidates
    cats = category_of(ids)
    assert cats.min() >= 1 and cats.max() <= 5_000
    # A pure function of the id: same answer for scalars, any seed, negative and extreme ids.
    extremes = np.array([INT64_MIN, -1, 0, INT64_MAX], dtype=np.int64)
    assert category_of(extremes).tolist() == [int(category_of(np.int64(x))) for x in extremes]


def test_candidates_relate_to_history(traffic: list[RankingRequest]) -> None:
    overlap = [
        np.isin(r.candidate_category_ids, category_of(r.history_item_ids)).mean()
        for r in traffic
    ]
    assert np.mean(overlap) > 0.2  # same-category candidates, not just random items


def test_requests_draws_sizes_from_the_sequences() -> None:
    reqs = list(reference_generator(seed=1, profile_dim=4).requests(40, [0, 2, 9], [1, 3]))
    assert len(reqs) == 40
    assert {r.history_length for r in reqs} == {0, 2, 9}
    assert {r.num_candidates for r in reqs} == {1, 3}
    assert all(r.user_profile.shape == (4,) for r in reqs)


def test_small_catalogue_and_bounds() -> None:
    gen = reference_generator(seed=0, profile_dim=2, num_items=50, num_categories=7)
    req = gen.request(10, 50)
    assert sorted(req.candidate_item_ids.tolist()) == sorted(gen.item_ids.tolist())
    with pytest.raises(ValueError, match="exceeds the catalogue"):
        gen.request(1, 51)
    with pytest.raises(ValueError):
        gen.request(-1, 1)


# --------------------------------------------------------------------------- edge cases
def test_edge_cases_cover_the_contract_corners(
    edge_cases: list[tuple[str, RankingRequest]],
) -> None:
    names = [name for name, _ in edge_cases]
    assert len(set(names)) == len(names)
    lengths = {r.history_length for _, r in edge_cases}
    sizes = {r.num_candidates for _, r in edge_cases}
    assert {0, 1, MAX_HISTORY, MAX_HISTORY + 37} <= lengths
    assert {1, 1000} <= sizes
    for name, req in edge_cases:
        validate_request(req)  # edge cases are valid requests
        assert req.as_inputs(), name


def test_edge_cases_include_extreme_and_negative_ids(
    edge_cases: list[tuple[str, RankingRequest]],
) -> None:
    history = np.concatenate([r.history_item_ids for _, r in edge_cases])
    candidates = np.concatenate([r.candidate_item_ids for _, r in edge_cases])
    categories = np.concatenate([r.candidate_category_ids for _, r in edge_cases])
    for ids in (history, candidates):
        assert INT64_MIN in ids and INT64_MAX in ids
        assert np.sum(ids < 0) >= 10
        assert 2**53 + 1 in ids  # not representable in float64
    assert INT64_MIN in categories and INT64_MAX in categories
    assert np.any(categories < 0)


# --------------------------------------------------------------------------- JSON
def test_json_round_trip_is_exact(edge_cases: list[tuple[str, RankingRequest]]) -> None:
    for name, req in edge_cases:
        back = RankingRequest.from_json_dict(
            req.layout, json.loads(json.dumps(req.to_json_dict())))
        assert back == req, name
        for field in c.request_inputs(P):
            assert getattr(back, field.name).dtype == np.dtype(field.np_dtype)


def test_json_keeps_int64_extremes_and_float32_bits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=2000, dtype=np.uint64).astype(np.uint32)
    profile = bits.view(np.float32)
    profile = profile[np.isfinite(profile)]
    profile = np.concatenate([profile, np.float32([np.nan, np.inf, -np.inf, -0.0, 1e-45])])
    ids = np.array([INT64_MIN, INT64_MIN + 1, -(2**53) - 1, 0, 2**53 + 1, INT64_MAX - 1,
                    INT64_MAX], dtype=np.int64)
    req = c.reference_request(
        history_item_ids=ids, history_action_ids=ids[::-1].copy(), history_timestamps=ids,
        candidate_item_ids=ids, candidate_category_ids=ids,
        request_timestamp=np.array([INT64_MAX], dtype=np.int64), user_profile=profile,
    )
    path = tmp_path / "req.json"
    req.save(path)
    back = RankingRequest.load(path, req.layout)
    assert back == req
    assert back.history_item_ids.tolist() == ids.tolist()
    assert np.array_equal(back.user_profile.view(np.uint32), profile.view(np.uint32))
    assert json.loads(path.read_text())["candidate_item_ids"][0] == -(2**63)


def _json(**changes: object) -> dict:
    d = reference_generator(seed=2, profile_dim=3).request(3, 2).to_json_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"history_item_ids": [1, 2.0, 3]}, ["history_item_ids[1]", "integer"]),
        ({"candidate_item_ids": [2**63, 1]}, ["candidate_item_ids[0]", "int64"]),
        ({"candidate_category_ids": [-(2**63) - 1, 1]}, ["candidate_category_ids[0]", "int64"]),
        ({"history_action_ids": [1, True, 2]}, ["history_action_ids[1]"]),
        ({"request_timestamp": 1_700_000_000}, ["request_timestamp", "list"]),
        ({"history_timestamps": [[1], [2], [3]]}, ["history_timestamps[0]"]),
        ({"user_profile": [0.5, "1", 0.0]}, ["user_profile[1]", "number"]),
        ({"user_profile": [0.5, 1e39, 0.0]}, ["user_profile[1]", "float32"]),
        ({"extra": [1]}, ["unknown", "extra"]),
    ],
)
def test_from_json_dict_is_strict(changes: dict, words: list[str]) -> None:
    with pytest.raises(RequestError) as info:
        RankingRequest.from_json_dict(c.reference_features(3), _json(**changes))
    for word in words:
        assert word in str(info.value)


def test_from_json_dict_missing_field_and_bad_file(tmp_path: Path) -> None:
    d = _json()
    del d["user_profile"]
    with pytest.raises(RequestError, match="user_profile"):
        RankingRequest.from_json_dict(c.reference_features(3), d)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RequestError, match="not valid JSON"):
        RankingRequest.load(bad, c.reference_features(3))
