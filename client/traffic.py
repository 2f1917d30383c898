"""Seeded synthetic traffic for any declared model family: Zipf item popularity, sessions of
events, a few action types, and the edge-case requests the validation and the tests use. The
declared features' roles (client/split_contract.ROLES) say which tensor carries what.

Pure Python + numpy (no torch, no tritonclient) so that tests, benchmarks and tools can build and
store requests without a server.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from enum import IntEnum

import numpy as np

from client.request import (
    INT64_MAX,
    INT64_MIN,
    NUMPY_DTYPES,
    Declared,
    RankingRequest,
    feature_with,
    features_of,
)
from client.split_contract import CANDIDATES, FLOATS, HISTORY, INTEGERS, REQUEST, Feature


class Action(IntEnum):
    """Integer codes the generator puts in a feature with role "action" (the event type).

    0 is left unused on purpose: it is the usual "unknown/padding" code. The models hash action
    ids (`id mod action_buckets`), so other codes are legal on the wire, just not generated here.
    Frequencies decrease with the code: most events are views, few are purchases.
    """

    VIEW = 1
    CLICK = 2
    LIKE = 3
    PURCHASE = 4



_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer over the int64 bit pattern: a fixed, well-spread hash of any id."""
    z = np.array(ids, dtype=np.int64, ndmin=1).view(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def category_of(item_ids: np.ndarray, num_categories: int = 5_000) -> np.ndarray:
    """The stable category of each item, in [1, num_categories] (0 stays free for "unknown").

    A pure function of the id (no seed), so the same item has the same category in every request,
    generator and process, negative and extreme ids included.
    """
    ids = np.asarray(item_ids, dtype=np.int64)
    cats = (_mix64(ids) % np.uint64(num_categories)).astype(np.int64) + 1
    return cats.reshape(ids.shape)


# Base epoch of generated traffic: 2024-01-01T00:00:00Z, plus up to one year. Always in the past
# of a real clock, so generated requests pass the "not in the future" check.
EPOCH_2024 = 1_704_067_200
ZIPF_EXPONENT = 1.05
ACTION_PROBS = np.array([0.72, 0.20, 0.06, 0.02])  # VIEW, CLICK, LIKE, PURCHASE: fresh items
REPEAT_ACTION_PROBS = np.array([0.35, 0.40, 0.15, 0.10])  # same item again in a session (funnel)
REPEAT_PROB = 0.25  # an event revisits an item seen earlier in the same session
SAME_SECOND_PROB = 0.05  # several events logged within the same second


@functools.lru_cache(maxsize=2)
def _catalogue(
    seed: int, num_items: int, num_categories: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(item ids by rank, their categories, popularity CDF, ranks grouped by category, group
    starts). Cached and read-only: building it sorts a million ids, and generators sharing a seed
    share it."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    # Unique huge sparse ids in [10**15, 2**62): a fixed random map from popularity rank to id.
    ids = rng.integers(10**15, 2**62, size=num_items, dtype=np.int64)
    ordered = np.sort(ids)
    while (ordered[1:] == ordered[:-1]).any():  # about 1e-7 likely for a million ids
        _, first = np.unique(ids, return_index=True)
        dup = np.ones(num_items, dtype=bool)
        dup[first] = False
        ids[dup] = rng.integers(10**15, 2**62, size=int(dup.sum()), dtype=np.int64)
        ordered = np.sort(ids)
    categories = category_of(ids, num_categories)

    cdf = np.cumsum(np.arange(1, num_items + 1, dtype=np.float64) ** -ZIPF_EXPONENT)
    cdf /= cdf[-1]

    # Ranks grouped by category, most popular first inside each category (unique sort keys).
    by_category = np.argsort(categories * num_items + np.arange(num_items))
    starts = np.searchsorted(categories[by_category], np.arange(1, num_categories + 2))
    out = (ids, categories, cdf, by_category, starts)
    for array in out:
        array.flags.writeable = False
    return out


class RequestGenerator:
    """Seeded, deterministic, production-like ranking traffic for any declared family.

    The catalogue has `num_items` items with huge sparse int64 ids (a fixed random map from the
    popularity rank), Zipf-like popularity, and a stable category per item (`category_of`).
    Users browse in sessions (seconds between events, hours or days between sessions), mostly in
    a few favourite categories; actions are `Action` codes. Candidates mix items related to the
    history (same categories, a few re-recommended history items), globally popular items and
    long-tail items, deduplicated and shuffled.

    Which tensor carries what comes from the declared features' roles
    (client/split_contract.ROLES): item and category ids, action codes, timestamps
    (non-decreasing, the request a bit after the last event) come from that one traffic model;
    a per-request "dense" feature gets a few history statistics then a latent taste vector,
    "duration" seconds a log-normal dwell, other "dense" features N(0, 0.5), a feature without
    a role a value by dtype (ids in [0, 1000), N(0, 1) floats, fair booleans). INT32 ids are
    the int64 ids mod 2^31.

    The same seed gives the same catalogue and the same sequence of requests; `rng` draws the
    traffic from a caller's Generator instead (the catalogue still comes from `seed`).
    """

    def __init__(
        self,
        declared: Declared,
        seed: int = 0,
        num_items: int = 1_000_000,
        num_categories: int = 5_000,
        rng: np.random.Generator | None = None,
    ) -> None:
        if num_items < 1 or num_categories < 1:
            raise ValueError("num_items and num_categories must be >= 1")
        self.layout = features_of(declared)
        if not any(f.axis == HISTORY for f in self.layout) or \
                not any(f.axis == CANDIDATES for f in self.layout):
            raise ValueError("a request needs at least one history and one candidate feature")
        self.seed = seed
        self.num_items = num_items
        self.num_categories = num_categories
        traffic_seed = np.random.SeedSequence(seed).spawn(2)[1]
        self._rng = rng if rng is not None else np.random.default_rng(traffic_seed)
        catalogue = _catalogue(seed, num_items, num_categories)
        # item_ids[rank]: rank 0 is the most popular item.
        self.item_ids, self.item_categories, self._cdf, self._by_category, self._cat_start = (
            catalogue
        )

    # ------------------------------------------------------------------ sampling primitives
    def _popular_ranks(self, k: int) -> np.ndarray:
        """k ranks from the Zipf-like popularity law."""
        ranks = np.searchsorted(self._cdf, self._rng.random(k), side="right")
        return np.minimum(ranks, self.num_items - 1)

    def _category_ranks(self, categories: np.ndarray) -> np.ndarray:
        """One rank per requested category, skewed to the category's popular items; a global
        popular item where a category happens to be empty."""
        categories = np.asarray(categories, dtype=np.int64)
        start = self._cat_start[categories - 1]
        size = self._cat_start[categories] - start
        pos = (size * self._rng.random(len(categories)) ** 3).astype(np.int64)
        ranks = self._by_category[np.minimum(start + pos, self.num_items - 1)]
        empty = size == 0
        if empty.any():
            ranks[empty] = self._popular_ranks(int(empty.sum()))
        return ranks

    # ------------------------------------------------------------------ requests
    def request(self, history_length: int, num_candidates: int) -> RankingRequest:
        """One request with L = history_length events and N = num_candidates candidates."""
        if history_length < 0 or num_candidates < 0:
            raise ValueError("history_length and num_candidates must be >= 0")
        if num_candidates > self.num_items:
            raise ValueError(
                f"num_candidates ({num_candidates}) exceeds the catalogue ({self.num_items})"
            )
        rng = self._rng
        length = history_length

        # The user: a few favourite categories (popular ones more likely) and how focused they are.
        favourites = self.item_categories[self._popular_ranks(int(rng.integers(1, 6)))]
        focus = rng.uniform(0.3, 0.8)
        action_probs = rng.dirichlet(50.0 * ACTION_PROBS)

        request_ts = EPOCH_2024 + int(rng.integers(0, 365 * 86_400))
        history_ranks, actions, timestamps = self._history(
            length, favourites, focus, action_probs, request_ts
        )
        cand_ranks = self._candidate_ranks(num_candidates, history_ranks, favourites)
        return RankingRequest(self.layout, self._values(
            history_ranks, actions, timestamps, cand_ranks, request_ts))

    def requests(
        self, count: int, history_lengths: Sequence[int], num_candidates: Sequence[int]
    ) -> Iterator[RankingRequest]:
        """`count` requests, L and N drawn uniformly from the given sequences (seeded)."""
        lengths, sizes = list(history_lengths), list(num_candidates)
        for _ in range(count):
            length = lengths[int(self._rng.integers(len(lengths)))]
            size = sizes[int(self._rng.integers(len(sizes)))]
            yield self.request(int(length), int(size))

    def user_id(self) -> int:
        """A user id over the whole int64 range: a cache key, never arithmetic."""
        return int(self._rng.integers(INT64_MIN, INT64_MAX, dtype=np.int64, endpoint=True))

    def returning(
        self, previous: RankingRequest, new_events: int, num_candidates: int | None = None
    ) -> RankingRequest:
        """The same user back (a refresh, "load more", the next stage): the previous history
        plus `new_events` events at its end (0: the very same history), fresh candidates (N of
        the previous request unless given), the same profile, a later request time.

        New events follow the previous request as a session does (the user acted on what was
        shown): the first some seconds after it, the next ones seconds apart; items lean to the
        categories of the user's recent events. With no new events the request is a refresh a
        few seconds later."""
        if new_events < 0:
            raise ValueError("new_events must be >= 0")
        rng = self._rng
        n = previous.num_candidates if num_candidates is None else num_candidates
        layout = previous.layout
        request_time = feature_with(layout, "timestamp", REQUEST)
        history_time = feature_with(layout, "timestamp", HISTORY)
        event_item = feature_with(layout, "item", HISTORY)
        start = (int(previous.features[request_time.name][0]) if request_time
                 else EPOCH_2024)
        if previous.history_length and history_time:
            start = max(start, int(previous.features[history_time.name][-1]))
        recent = (previous.features[event_item.name][-8:] if event_item
                  else np.zeros(0, np.int64))
        favourites = (category_of(recent, self.num_categories) if len(recent)
                      else self.item_categories[self._popular_ranks(2)])
        ranks = self._popular_ranks(new_events)
        related = rng.random(new_events) < 0.6
        if related.any():
            pref = favourites[rng.integers(0, len(favourites), size=int(related.sum()))]
            ranks[related] = self._category_ranks(np.minimum(pref, self.num_categories))
        codes = np.array([a.value for a in Action], dtype=np.int64)
        actions = codes[rng.choice(len(codes), size=new_events, p=ACTION_PROBS)]
        gaps = np.clip(rng.lognormal(np.log(20.0), 1.0, size=new_events), 0, 1_800)
        gaps[rng.random(new_events) < SAME_SECOND_PROB] = 0
        if new_events:
            gaps[0] = np.clip(rng.lognormal(np.log(30.0), 1.0), 1, 1_800)
        timestamps = start + np.cumsum(gaps.astype(np.int64))
        last = int(timestamps[-1]) if new_events else start
        request_ts = last + int(np.clip(rng.lognormal(np.log(5.0), 1.0), 1, 600))
        cand_ranks = self._candidate_ranks(n, ranks, favourites)
        new = self._values(ranks, actions, timestamps.astype(np.int64), cand_ranks, request_ts,
                           previous)
        return previous.replace(**{
            f.name: np.concatenate([previous.features[f.name], new[f.name]])
            if f.axis == HISTORY else new[f.name] for f in layout})

    def _values(self, history_ranks: np.ndarray, actions: np.ndarray, timestamps: np.ndarray,
                cand_ranks: np.ndarray, request_ts: int,
                previous: RankingRequest | None = None) -> dict[str, np.ndarray]:
        """Every declared feature from one draw of the traffic model, by role: the history
        rows of these events, the candidates, the request's features (a returning user's
        `previous` request keeps its per-request features but the time). Features that need
        draws of their own are drawn last, in declaration order, so that a family's requests
        do not depend on the features it does not have."""
        out: dict[str, np.ndarray] = {}
        later: list[Feature] = []
        for f in self.layout:
            if f.role == "item" and f.axis in (HISTORY, CANDIDATES):
                ranks = history_ranks if f.axis == HISTORY else cand_ranks
                out[f.name] = _cast(f, self.item_ids[ranks])
            elif f.role == "action":
                out[f.name] = _cast(f, actions)
            elif f.role == "timestamp":
                out[f.name] = _cast(f, timestamps if f.axis == HISTORY else
                                    np.array([request_ts], dtype=np.int64))
            elif f.axis == REQUEST and previous is not None:
                out[f.name] = previous.features[f.name]
            elif f.role != "category":
                later.append(f)
        for f in self.layout:
            if f.role == "category":
                item = feature_with(self.layout, "item", f.axis)
                assert item is not None  # check_contract: a category sits beside an item
                out[f.name] = _cast(f, category_of(out[item.name], self.num_categories))
        for f in later:
            rows = len(history_ranks) if f.axis == HISTORY else len(cand_ranks)
            out[f.name] = self._draw(f, rows, actions, timestamps)
        return {f.name: out[f.name] for f in self.layout}

    def _draw(self, f: Feature, rows: int, actions: np.ndarray,
              timestamps: np.ndarray) -> np.ndarray:
        """A feature the event stream does not determine, drawn from its role or dtype."""
        rng = self._rng
        shape = tuple(f.shape) if f.axis == REQUEST else (rows, *f.shape)
        size = math.prod(shape)
        if f.role == "dense" and f.axis == REQUEST:
            values = self._profile(actions, timestamps, size)
        elif f.role == "duration":
            values = np.clip(rng.lognormal(np.log(20.0), 1.0, size=size), 0, 1_800)
            if f.dtype not in FLOATS:
                values = np.rint(values)
        elif f.role == "dense":
            values = rng.normal(0.0, 0.5, size=size)
        elif f.dtype in INTEGERS:
            values = rng.integers(0, 1_000, size=size)
        elif f.dtype in FLOATS:
            values = rng.normal(0.0, 1.0, size=size)
        else:
            values = rng.random(size) < 0.5
        return _cast(f, values.reshape(shape))

    def _history(
        self, length: int, favourites: np.ndarray, focus: float, action_probs: np.ndarray,
        request_ts: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(item ranks, action codes, timestamps) of `length` events in sessions."""
        rng = self._rng
        if length == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty.copy(), empty.copy()

        # Sessions: geometric sizes (mean ~8 events); new_session[i] marks a session's first event.
        sizes = rng.geometric(1 / 8, size=length)
        starts = np.cumsum(sizes) - sizes
        starts = starts[starts < length]
        new_session = np.zeros(length, dtype=bool)
        new_session[starts] = True
        session_start = starts[np.searchsorted(starts, np.arange(length), side="right") - 1]

        # Items: favourite categories with probability `focus`, the global popularity law else.
        ranks = self._popular_ranks(length)
        related = rng.random(length) < focus
        if related.any():
            pref = favourites[rng.integers(0, len(favourites), size=int(related.sum()))]
            ranks[related] = self._category_ranks(pref)
        # Funnels: some events revisit an item seen earlier in the same session.
        repeat = (rng.random(length) < REPEAT_PROB) & ~new_session
        repeat_idx = np.flatnonzero(repeat)
        offsets = rng.random(len(repeat_idx))
        for i, u in zip(repeat_idx, offsets, strict=True):
            start = session_start[i]
            ranks[i] = ranks[start + int(u * (i - start))]
        codes = np.array([a.value for a in Action], dtype=np.int64)
        actions = codes[rng.choice(len(codes), size=length, p=action_probs)]
        actions[repeat] = codes[rng.choice(len(codes), size=len(repeat_idx), p=REPEAT_ACTION_PROBS)]

        # Gaps before each event: seconds inside a session, hours to days between sessions.
        inside = np.clip(rng.lognormal(np.log(20.0), 1.0, size=length), 0, 1_800)
        inside[rng.random(length) < SAME_SECOND_PROB] = 0
        between = np.clip(rng.lognormal(np.log(8 * 3600.0), 1.2, size=length), 1_800, 60 * 86_400)
        gaps = np.where(new_session, between, inside).astype(np.int64)
        gaps[0] = 0
        # The request comes a bit after the last event (same session) or opens a new session.
        if rng.random() < 0.7:
            lead = int(np.clip(rng.lognormal(np.log(30.0), 1.0), 1, 1_800))
        else:
            lead = int(np.clip(rng.lognormal(np.log(8 * 3600.0), 1.2), 1_800, 60 * 86_400))
        last = request_ts - lead
        # timestamps[i] = last - sum of the gaps after event i: non-decreasing by construction.
        after = np.concatenate([np.cumsum(gaps[::-1])[::-1][1:], [0]])
        timestamps = (last - after).astype(np.int64)
        return ranks.astype(np.int64), actions, timestamps

    def _candidate_ranks(
        self, count: int, history_ranks: np.ndarray, favourites: np.ndarray
    ) -> np.ndarray:
        """`count` distinct ranks: related to the history, popular, re-recommended, long tail."""
        rng = self._rng
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        has_history = len(history_ranks) > 0
        # Sources: 0 related (category of a recent history item), 1 popular, 2 history item,
        # 3 long tail (uniform over the catalogue).
        probs = [0.45, 0.35, 0.05, 0.15] if has_history else [0.0, 0.7, 0.0, 0.3]
        chosen: list[int] = []
        seen: set[int] = set()
        for _ in range(8):
            need = count - len(chosen)
            if need == 0:
                break
            draw = 2 * need + 8
            source = rng.choice(4, size=draw, p=probs)
            ranks = self._popular_ranks(draw)
            if has_history:
                # Recent events weigh more: position drawn with a bias towards the end.
                recent = len(history_ranks) - 1 - (
                    len(history_ranks) * rng.random(draw) ** 2
                ).astype(np.int64)
                anchors = history_ranks[np.clip(recent, 0, len(history_ranks) - 1)]
                related = source == 0
                if related.any():
                    ranks[related] = self._category_ranks(self.item_categories[anchors[related]])
                ranks[source == 2] = anchors[source == 2]
            tail = source == 3
            ranks[tail] = rng.integers(0, self.num_items, size=int(tail.sum()))
            for r in ranks.tolist():
                if r not in seen:
                    seen.add(r)
                    chosen.append(r)
                    if len(chosen) == count:
                        break
        if len(chosen) < count:  # tiny catalogues: fill with unused items
            unused = np.setdiff1d(rng.permutation(self.num_items), chosen, assume_unique=True)
            chosen.extend(rng.permutation(unused)[: count - len(chosen)].tolist())
        return rng.permutation(np.array(chosen, dtype=np.int64))

    def _profile(self, actions: np.ndarray, timestamps: np.ndarray, size: int) -> np.ndarray:
        """Dense user features: a few history statistics, then a latent taste vector."""
        length = len(actions)
        span_days = (timestamps[-1] - timestamps[0]) / 86_400 if length else 0.0
        stats = [
            math.log1p(length) / 10,
            float(np.mean(actions == Action.CLICK)) if length else 0.0,
            float(np.mean(actions == Action.PURCHASE)) if length else 0.0,
            math.log1p(span_days) / 5,
        ]
        latent = self._rng.normal(0.0, 0.5, size=max(size - len(stats), 0))
        profile = np.concatenate([stats, latent])[:size]
        return profile.astype(np.float32)


# --------------------------------------------------------------------------- edge cases

EXTREME_IDS = np.array(
    [INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, -1, 0, 1, 2**53 + 1, -(2**53 + 1),
     -(2**62), 2**62, -(10**18) - 7],
    dtype=np.int64,
)


def extreme_ids(dtype: str) -> np.ndarray:
    """EXTREME_IDS for an integer dtype: the int64 ones, or the same pattern within int32."""
    if dtype == "INT64":
        return EXTREME_IDS
    low, high = -(2**31), 2**31 - 1
    return np.array([low, high, low + 1, high - 1, -1, 0, 1, 2**24 + 1, -(2**24 + 1), -(2**30),
                     2**30, -(10**9) - 7], dtype=NUMPY_DTYPES[dtype])


def edge_case_requests(gen: RequestGenerator, max_history: int) -> list[tuple[str, RankingRequest]]:
    """Named valid requests at the contract's corners, for comparing servers and models.

    Covers L = 0, 1, max_history and max_history + 37 (the model keeps the newest max_history
    events), N = 1 and 1000, ids at and near the ends of the id dtype and ±2**53 (values a
    float64 would corrupt) in every item, category and role-less integer feature, all-negative
    item ids, duplicate candidates and events all in one second (from the declared roles:
    client/split_contract.ROLES).
    """
    cases: list[tuple[str, RankingRequest]] = [
        ("empty_history", gen.request(0, 20)),
        ("empty_history_single_candidate", gen.request(0, 1)),
        ("single_event", gen.request(1, 20)),
        (f"history_at_max_{max_history}", gen.request(max_history, 20)),
        (f"history_over_max_{max_history + 37}", gen.request(max_history + 37, 20)),
        ("single_candidate", gen.request(50, 1)),
        ("candidates_1000", gen.request(50, 1000)),
    ]
    layout = gen.layout
    items = {axis: feature_with(layout, "item", axis) for axis in (HISTORY, CANDIDATES)}

    base = gen.request(40, 30)
    changes: dict[str, np.ndarray] = {}
    for f in layout:
        if f.axis == REQUEST or f.dtype not in INTEGERS or f.role not in ("item", ""):
            continue
        values = base.features[f.name].copy()
        extremes = extreme_ids(f.dtype)
        extremes = extremes if f.axis == HISTORY else extremes[::-1]
        values[: len(extremes)] = extremes.reshape(-1, *[1] * len(f.shape))
        changes[f.name] = values
    for f in layout:
        item = items.get(f.axis)
        if f.role == "category" and item is not None:
            values = category_of(changes[item.name], gen.num_categories).astype(
                NUMPY_DTYPES[f.dtype])
            values[:4] = extreme_ids(f.dtype)[[0, 1, 4, 5]]
            changes[f.name] = values
    cases.append(("extreme_ids", base.replace(**changes)))

    base = gen.request(30, 25)
    rng = np.random.default_rng(gen.seed + 1)
    changes = {}
    for axis, item in items.items():
        if item is not None:
            size = base.history_length if axis == HISTORY else base.num_candidates
            low = int(np.iinfo(NUMPY_DTYPES[item.dtype]).min)
            changes[item.name] = rng.integers(low, 0, size=size, dtype=np.int64).astype(
                NUMPY_DTYPES[item.dtype])
    for f in layout:
        item = items.get(f.axis)
        if f.role == "category" and item is not None:
            changes[f.name] = -category_of(changes[item.name], gen.num_categories).astype(
                NUMPY_DTYPES[f.dtype])
    cases.append(("negative_ids", base.replace(**changes)))

    base = gen.request(10, 12)
    cases.append(("duplicate_candidates", base.replace(**{
        f.name: np.repeat(base.features[f.name][:3], 4, axis=0)
        for f in layout if f.axis == CANDIDATES})))

    base = gen.request(16, 10)
    history_time = feature_with(layout, "timestamp", HISTORY)
    request_time = feature_with(layout, "timestamp", REQUEST)
    if history_time is not None:
        times = base.features[history_time.name]
        second = (int(base.features[request_time.name][0]) if request_time is not None
                  else int(times[-1]))
        cases.append(("events_in_request_second", base.replace(
            **{history_time.name: np.full(16, second, dtype=times.dtype)})))
    return cases


def _cast(f: Feature, values: np.ndarray) -> np.ndarray:
    """Generated values as the feature's declared dtype (INT32 ids: mod 2^31)."""
    want = NUMPY_DTYPES[f.dtype]
    values = np.asarray(values)
    if want == np.int32 and f.role in ("item", "category"):
        values = values.astype(np.int64) % 2**31
    return values.astype(want)


def random_features(declared: Declared, history_length: int, num_candidates: int,
                    rng: np.random.Generator, num_items: int = 100_000) -> dict[str, np.ndarray]:
    """One request's features (name -> array) for any declared family, drawn from `rng` with
    the generator's traffic model over a catalogue of `num_items` items: the building block for
    tools that fuzz a family (the generator's roles say what each feature gets)."""
    gen = RequestGenerator(declared, num_items=num_items, rng=rng)
    return gen.request(history_length, num_candidates).features


def returning_traffic(
    gen: RequestGenerator, users: int, visits: int, history_lengths: Sequence[int] = (20, 60),
    num_candidates: int = 5, max_new_events: int = 10,
) -> list[tuple[int, RankingRequest]]:
    """Returning-user traffic: `users` users (random int64 ids) with `visits` requests each,
    interleaved in a seeded random order, as (user id, request). A user's first visit has a
    fresh history of one of `history_lengths` events; each later visit repeats the history
    (half the time: a refresh, "load more") or adds 1..max_new_events events (a session goes
    on), always with new candidates. A user's visits keep their order, so a caller may send
    each user's requests from one thread."""
    if users < 0 or visits < 0 or max_new_events < 1:
        raise ValueError("users and visits must be >= 0, max_new_events >= 1")
    rng = np.random.default_rng(gen.seed + 17)
    ids = [gen.user_id() for _ in range(users)]
    lengths = list(history_lengths)
    latest: dict[int, RankingRequest] = {}
    order = np.repeat(np.arange(users), visits)
    rng.shuffle(order)
    out = []
    for u in order.tolist():
        if u not in latest:
            req = gen.request(int(lengths[int(rng.integers(len(lengths)))]), num_candidates)
        else:
            grow = int(rng.integers(1, max_new_events + 1)) if rng.random() < 0.5 else 0
            req = gen.returning(latest[u], grow)
        latest[u] = req
        out.append((ids[u], req))
    return out
