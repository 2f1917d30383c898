"""The user-state cache's logic without Triton (model_repository/user_cache/1/kv_cache.py): the
layout it reads from each family's declaration, LRU order and byte accounting, growable buffers,
path decisions (event features compared by content, floats included), max_history truncation,
weights tags and the refusal to mix weights, version resolution, and the per-request
orchestration with real encoders for both families (the exported small models in ONNX Runtime,
and a second set of weights in torch) including a weights switch between reading an entry and
the encoder call, no head-of-line blocking between users and per-user serialisation."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client.split_contract import contract_to_json
from export import reference_features as c
from export.model import build_model
from export.split_contract import reference_contract
from tests.conftest import SMALL, random_request, small_config
from tests.test_hstu import hstu  # noqa: F401  (the exported HSTU graphs, a module fixture)

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "kv_cache", ROOT / "model_repository" / "user_cache" / "1" / "kv_cache.py")
kv = importlib.util.module_from_spec(_spec)
sys.modules["kv_cache"] = kv
_spec.loader.exec_module(kv)

LAYERS, HEADS, DH = SMALL["num_layers"], SMALL["num_heads"], SMALL["d_model"] // SMALL["num_heads"]
MAX_HISTORY = SMALL["max_history"]
V1, V2 = kv.Weights(1, 1), kv.Weights(2, 2)
# The reference family's layout, read from its declaration as user_cache reads its config.
LAYOUT = kv.Layout.from_declaration(contract_to_json(reference_contract(small_config("causal"))))


def fake_kv(length: int, value: float = 0.0) -> np.ndarray:
    return np.full((LAYERS, 2, HEADS, length, DH), value, np.float32)


def fake_state(length: int, value: float = 0.0, last: int = 1) -> dict[str, np.ndarray]:
    return {c.USER_KV: fake_kv(length, value), c.LAST_EVENT_TIMESTAMP: np.array([last])}


def events_of(length: int, start: int = 0) -> dict[str, np.ndarray]:
    idx = np.arange(start, start + length, dtype=np.int64)
    return dict(zip(c.HISTORY_INPUTS, (idx * 7 + 1, idx % 5, 1_600_000_000 + idx * 10),
                    strict=True))


def cut(history: dict[str, np.ndarray], stop: int | None, start: int = 0) -> dict:
    return {n: v[start:stop] for n, v in history.items()}


def entry(length: int, value: float = 0.0, last: int = 1, **kwargs: object) -> kv.Entry:
    return kv.Entry(LAYOUT, events_of(length), fake_state(length, value, last), "v1", **kwargs)


def entry_bytes(capacity: int) -> int:
    return capacity * 24 + fake_kv(capacity).nbytes + 8


# ------------------------------------------------------------------ the declaration
def test_the_layout_follows_each_familys_declaration() -> None:
    """The cache reads the declaration's JSON itself (no client package in a python-backend
    model directory): its history, events, growing axes and append names agree with
    client/split_contract.py for both families; a declaration it cannot serve is refused."""
    from export.hstu import hstu_contract
    from tests.test_hstu import CFG as HSTU_CFG

    for contract in (reference_contract(small_config("causal")), hstu_contract(HSTU_CFG),
                     reference_contract(small_config("bidirectional"))):
        layout = kv.Layout.from_declaration(contract_to_json(contract))
        assert layout.history == tuple(f.name for f in contract.history_features)
        assert layout.events == tuple(f.name for f in contract.event_features)
        assert (layout.max_history, layout.appendable) == (contract.max_history,
                                                           contract.appendable)
        for s, declared in zip(layout.state, contract.state, strict=True):
            assert s.name == declared.name
            assert s.axis == (declared.dims.index("L") if declared.grows else None)
            assert (s.cached_name, s.new_name) == (declared.cached_name, declared.new_name)
            assert s.all_but_last == (declared.append_reads == "all_but_last")
    assert not kv.Layout.from_declaration(contract_to_json(
        reference_contract(small_config("bidirectional")))).appendable
    with pytest.raises(kv.DeclarationError, match="not a split contract"):
        kv.Layout.from_declaration("{}")
    data = json.loads(contract_to_json(hstu_contract(HSTU_CFG)))
    for f in data["features"]:
        f["event"] = False
    with pytest.raises(kv.DeclarationError, match="event=True"):
        kv.Layout.from_declaration(data)


# ------------------------------------------------------------------ LRU and buffers
def test_lru_evicts_least_recently_used_first_and_counts_bytes() -> None:
    store = kv.LruStore(3 * entry_bytes(10))
    for user in (1, 2, 3):
        store.put(user, entry(10))
    assert store.bytes == 3 * entry_bytes(10) and store.evictions == 0
    store.get(1)  # 2 is now the least recently used
    store.put(4, entry(10))
    assert list(store.entries) == [3, 1, 4] and store.evictions == 1
    assert store.bytes == 3 * entry_bytes(10)
    store.put(5, entry(20))  # needs two slots
    assert list(store.entries) == [4, 5] and store.evictions == 3
    assert store.bytes == entry_bytes(10) + entry_bytes(20)
    store.put(6, entry(40))  # above the bound
    assert 6 not in store.entries and store.bytes == entry_bytes(10) + entry_bytes(20)
    store.drop(4)
    assert list(store.entries) == [5] and store.bytes == entry_bytes(20)


def test_growth_in_place_is_re_accounted_and_can_evict() -> None:
    store = kv.LruStore(entry_bytes(10) + entry_bytes(15))
    grower = entry(10, 1.0, 5)
    store.put(1, grower)
    store.put(2, entry(10))
    grower.extend(events_of(3, 10), fake_state(3, 2.0, 9), MAX_HISTORY)
    assert grower.capacity == 13 and grower.length == 13  # 10 * 1.25 + 1
    store.put(1, grower)
    assert store.bytes == entry_bytes(13) + entry_bytes(10)
    grower.extend(events_of(2, 13), fake_state(2, 3.0, 11), MAX_HISTORY)
    assert grower.capacity == 17 and grower.length == 15  # grew past 13: 13 * 1.25 + 1
    store.put(1, grower)  # 17 + 10 > 10 + 15: user 2 goes
    assert list(store.entries) == [1] and store.bytes == entry_bytes(17)
    for name, value in grower.valid_events().items():
        np.testing.assert_array_equal(value, events_of(15)[name])
    user_kv = grower.valid_state()[c.USER_KV]
    np.testing.assert_array_equal(user_kv[..., :10, :], 1.0)
    np.testing.assert_array_equal(user_kv[..., 10:13, :], 2.0)
    np.testing.assert_array_equal(user_kv[..., 13:, :], 3.0)
    assert grower.valid_state()[c.LAST_EVENT_TIMESTAMP].tolist() == [11]  # replaced


def test_a_view_handed_out_never_changes_when_the_entry_grows() -> None:
    grower = entry(4, 1.0, 1, capacity=10)
    served = grower.valid_state()
    grower.extend(events_of(3, 4), fake_state(3, 2.0, 2), MAX_HISTORY)
    grower.extend(events_of(5, 7), fake_state(5, 3.0, 3), MAX_HISTORY)  # regrows
    assert served[c.USER_KV].shape[3] == 4 and (served[c.USER_KV] == 1.0).all()
    assert served[c.LAST_EVENT_TIMESTAMP].tolist() == [1]


def test_growth_stops_at_max_history() -> None:
    grower = entry(280)
    grower.extend(events_of(5, 280), fake_state(5), MAX_HISTORY)
    assert grower.capacity == MAX_HISTORY


def test_the_append_reads_what_the_declaration_says() -> None:
    """The reference declares append_reads 'all_but_last' for user_kv: the cached K/V of every
    layer but the last goes to the append model, under its cached_ name."""
    reads = entry(6, 1.0, 4).append_inputs()
    assert sorted(reads) == [c.CACHED_LAST_EVENT_TIMESTAMP, c.CACHED_USER_KV]
    assert reads[c.CACHED_USER_KV].shape == (LAYERS - 1, 2, HEADS, 6, DH)
    assert reads[c.CACHED_LAST_EVENT_TIMESTAMP].tolist() == [4]


# ------------------------------------------------------------------ decisions
def cache(max_append: int = 256, capacity: int = 1 << 30,
          layout: kv.Layout = LAYOUT) -> kv.UserStateCache:
    return kv.UserStateCache(layout=layout, capacity_bytes=capacity, max_append=max_append)


def stored(cache_: kv.UserStateCache, user: int, events: dict[str, np.ndarray],
           weights: kv.Weights = V1) -> None:
    kept = cut(events, None, max(0, len(events[c.HISTORY_ITEM_IDS]) - MAX_HISTORY))
    state = fake_state(len(kept[c.HISTORY_ITEM_IDS]), last=int(kept[c.HISTORY_TIMESTAMPS][-1]))
    cache_.commit_miss(user, kept, state, weights)


def test_paths() -> None:
    cc = cache(max_append=20)
    first = events_of(100)
    assert cc.plan(1, first, V1).path == "miss"  # first visit
    stored(cc, 1, first)
    assert cc.plan(1, first, V1).path == "hit"
    grown = events_of(110)
    plan = cc.plan(1, grown, V1)
    assert plan.path == "append"
    for name, value in plan.new_history.items():
        np.testing.assert_array_equal(value, events_of(10, 100)[name])
    assert cc.plan(1, events_of(121), V1).path == "miss"  # 21 new > max_append
    assert cc.plan(1, events_of(120), V1).path == "append"  # 20 new
    for name in c.HISTORY_INPUTS:  # any event feature rewritten
        rewritten = dict(grown)
        rewritten[name] = grown[name].copy()
        rewritten[name][50] += 1
        assert cc.plan(1, rewritten, V1).path == "miss", name
    assert cc.plan(1, events_of(60), V1).path == "miss"  # shorter (another device)
    assert cc.plan(2, first, V1).path == "miss"  # another user, same history
    assert cc.plan(1, first, V2).path == "miss"  # other weights: even a repeat misses
    assert cc.plan(1, grown, kv.Weights(1, None)).path == "miss"  # no append model
    assert cc.plan(1, grown, kv.Weights(1, 2)).path == "miss"  # append model of other weights
    bidirectional = kv.Layout.from_declaration(contract_to_json(
        reference_contract(small_config("bidirectional"))))
    cb = cache(layout=bidirectional)
    stored(cb, 1, first)
    assert cb.plan(1, first, V1).path == "hit"
    assert cb.plan(1, grown, V1).path == "miss"  # a family that never appends
    assert cb.headroom(100) == 0


def test_float_events_compare_by_content() -> None:
    """A float event feature (HSTU's dwell time): the same NaN is the same event; another
    value, or -0.0 for 0.0, is not (at worst a miss, never a wrong hit)."""
    from export.hstu import hstu_contract
    from tests.test_hstu import CFG as HSTU_CFG

    layout = kv.Layout.from_declaration(contract_to_json(hstu_contract(HSTU_CFG)))
    dwell = "history_dwell_seconds"
    events = {**events_of(4), dwell: np.array([1.5, np.nan, 0.0, 2.0], np.float32)}
    assert set(events) == set(layout.history)
    state = {s.name: np.zeros([4 if d == "L" else d for d in declared.dims], np.float32)
             for s, declared in zip(layout.state, hstu_contract(HSTU_CFG).state, strict=True)}
    cc = cache(layout=layout)
    cc.commit_miss(1, {n: events[n] for n in layout.events}, state, V1)
    assert cc.plan(1, {**events, dwell: events[dwell].copy()}, V1).path == "hit"
    for changed in ([1.5, np.nan, -0.0, 2.0], [1.5, 0.0, 0.0, 2.0], [1.5, np.nan, 0.0, 2.5]):
        assert cc.plan(1, {**events, dwell: np.array(changed, np.float32)}, V1).path == "miss"


def test_max_history_truncation() -> None:
    cc = cache()
    long = events_of(MAX_HISTORY + 40)
    plan = cc.plan(1, long, V1)
    assert plan.path == "miss"
    for name, value in plan.kept.items():  # the newest max_history
        np.testing.assert_array_equal(value, long[name][-MAX_HISTORY:])
    stored(cc, 1, long)
    assert cc.store.get(1).length == MAX_HISTORY
    assert cc.plan(1, long, V1).path == "hit"  # an over-long repeat still hits
    assert cc.plan(1, events_of(MAX_HISTORY + 41), V1).path == "miss"  # positions shift
    cc2 = cache()
    stored(cc2, 1, events_of(MAX_HISTORY - 5))
    assert cc2.plan(1, events_of(MAX_HISTORY), V1).path == "append"  # fits exactly
    assert cc2.plan(1, events_of(MAX_HISTORY + 1), V1).path == "miss"  # crosses it


def test_a_miss_leaves_room_for_the_next_append() -> None:
    import dataclasses

    cc = cache(layout=dataclasses.replace(LAYOUT, max_history=16384))
    assert cc.headroom(0) == 16 and cc.headroom(800) == 116  # L / 8 + 16
    assert cc.headroom(4000) == 256  # at most max_append
    assert cc.headroom(16384 - 5) == 5 and cc.headroom(16384) == 0  # never past max_history


def test_mixed_weights_are_refused() -> None:
    cc = cache()
    stored(cc, 1, events_of(30))
    plan = cc.plan(1, events_of(35), V1)
    with pytest.raises(kv.MixedWeightsError, match="v2"):
        cc.commit_append(1, plan, fake_state(5), V2)
    assert cc.store.get(1).length == 30  # untouched
    with pytest.raises(ValueError, match="new_user_kv of 4 events for 5"):
        cc.commit_append(1, plan, fake_state(4), V1)


def test_resolve_version() -> None:
    ready = {3}
    assert kv.resolve_version(ready.__contains__, 3, 16) == 3
    assert kv.resolve_version(ready.__contains__, None, 16) == 3  # first look, from 1 up
    ready = {4, 5}  # 3 unloaded, 4 and 5 served: the newest
    assert kv.resolve_version(ready.__contains__, 3, 16) == 5
    ready = {2}  # a rollback
    assert kv.resolve_version(ready.__contains__, 5, 16) == 2
    assert kv.resolve_version(set().__contains__, 5, 16) is None
    assert kv.resolve_version({40}.__contains__, 5, 16) is None  # outside the window
    asked = []
    kv.resolve_version(lambda v: asked.append(v) or True, 7, 16)
    assert asked == [7]  # the usual request: one question


# ------------------------------------------------------------------ orchestration, real encoders
class RealEncoders:
    """Encoders of two weights for one family: version 1 its exported graphs in ONNX Runtime
    (`run(graph, feeds)`), version 2 the same architecture with other weights in torch.
    `served` is what Triton would report ready; a call at a version no longer served raises
    WeightsChangedError, as BLS fails. Everything by the declared names."""

    def __init__(self, contract: object, run: object, v2: torch.nn.Module) -> None:
        self.contract, self.run, self.v2 = contract, run, v2
        self.layout = kv.Layout.from_declaration(contract_to_json(contract))
        self.served = V1
        self.calls: list[tuple[str, int]] = []
        self.before_call = None  # an async hook run before each encoder call

    async def resolve(self) -> kv.Weights:
        return self.served

    async def _enter(self, kind: str, weights: kv.Weights) -> None:
        self.calls.append((kind, weights.encoder_version))
        if self.before_call is not None:
            await self.before_call(kind)
        if weights != self.served:
            raise kv.WeightsChangedError(f"version {weights.encoder_version} unloaded")

    def full(self, weights: kv.Weights, history: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """user_encoder on the whole history: the state by name."""
        history = {n: np.ascontiguousarray(v) for n, v in history.items()}
        if weights.encoder_version == 1:
            state = self.run("user_encoder", history)
        else:
            with torch.no_grad():
                state = [t.numpy() for t in self.v2.encode_user(
                    *(torch.from_numpy(history[f.name]) for f in self.contract.history_features))]
        return {s.name: v for s, v in zip(self.contract.state, state, strict=True)}

    async def encode(self, weights: kv.Weights, history: dict[str, np.ndarray], capacity: int):
        await self._enter("encode", weights)
        state = self.full(weights, history)
        return {s.name: state[s.name] if s.axis is None else s.in_buffer(state[s.name], capacity)
                for s in self.layout.state}

    async def append(self, weights: kv.Weights, cached: dict[str, np.ndarray],
                     new_history: dict[str, np.ndarray]):
        await self._enter("append", weights)
        assert weights.encoder_version == 1, "the test appends under version 1 only"
        assert sorted(cached) == sorted(s.cached_name for s in self.contract.state)
        new = self.run("user_encoder_append", {
            **{n: np.ascontiguousarray(v) for n, v in {**cached, **new_history}.items()}})
        return {s.name: v for s, v in zip(self.contract.state, new, strict=True)}

    def interface(self) -> kv.Encoders:
        return kv.Encoders(resolve=self.resolve, encode=self.encode, append=self.append)


def history(seed: int, length: int) -> dict[str, np.ndarray]:
    req = random_request(np.random.default_rng(seed), small_config("causal"), length, 1)
    return {n: req[n] for n in c.HISTORY_INPUTS}


@pytest.fixture
def encoders(exported) -> RealEncoders:
    """The reference family: the exported small causal model, and other weights in torch."""
    return RealEncoders(reference_contract(small_config("causal")), exported("causal")[1].run,
                        build_model(small_config("causal", seed=SMALL["seed"] + 1)))


@pytest.fixture
def hstu_encoders(request: pytest.FixtureRequest) -> RealEncoders:
    """The HSTU family: tests/test_hstu.py's exported graphs, and other weights in torch."""
    import dataclasses

    from export.hstu import build_hstu
    from tests.test_hstu import CFG as HSTU_CFG

    model, graphs = request.getfixturevalue("hstu")
    return RealEncoders(model.contract(), graphs.run,
                        build_hstu(dataclasses.replace(HSTU_CFG, seed=HSTU_CFG.seed + 1)))


def hstu_history(seed: int, length: int) -> dict[str, np.ndarray]:
    from tests.test_hstu import random_request as hstu_request

    req = hstu_request(np.random.default_rng(seed), length, 1)
    return {n: req[n] for n in req if n.startswith("history_")}


def assert_state_equal(answer: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(answer) == list(want)
    for name, value in want.items():
        assert answer[name].shape == value.shape, name
        assert float(np.abs(answer[name] - value).max(initial=0.0)) <= 1e-5, name


@pytest.mark.parametrize("family", ["reference", "hstu"])
def test_every_path_equals_a_full_encode(request, family: str) -> None:
    """Each family from its own declaration: every state tensor the cache answers (held,
    appended along L, or replaced) equals user_encoder on the whole history."""
    enc = request.getfixturevalue("encoders" if family == "reference" else "hstu_encoders")
    cc = cache(layout=enc.layout)
    full = (history if family == "reference" else hstu_history)(1, 200)

    async def story() -> None:
        for length, expected in ((120, "miss"), (120, "hit"), (121, "append"), (160, "append"),
                                 (160, "hit"), (200, "append")):
            answer = await cc.serve(7, cut(full, length), enc.interface())
            if length == 121:  # the first append wrote into the miss's headroom, in place
                assert cc.store.get(7).capacity == 120 + cc.headroom(120)
            assert answer.path == expected, (length, answer.path)
            assert_state_equal(answer.state, enc.full(V1, cut(full, length)))

        entry = cc.store.get(7)
        assert entry.capacity == 237  # 120 + 31 of headroom, grown by 1.25x twice: 189, 237

    asyncio.run(story())
    assert cc.counts == {"hit": 2, "append": 3, "miss": 1}


def test_a_weights_switch_between_entry_and_append_is_a_full_miss_on_new_weights(
        encoders: RealEncoders) -> None:
    """The race: the entry (v1) is read, then v2 replaces v1 before the append runs. The append
    at v1 fails; the request is re-planned as a miss on v2 and never stores v1 state extended by
    anything; the next repeat is a hit of pure v2 state."""
    cc = cache()
    full = history(2, 90)

    async def switch(kind: str) -> None:
        if kind == "append" and encoders.served == V1:
            encoders.served = V2

    async def story() -> None:
        await cc.serve(3, cut(full, 80), encoders.interface())  # v1 miss
        encoders.before_call = switch
        answer = await cc.serve(3, full, encoders.interface())
        want = encoders.full(V2, full)
        assert (answer.path, answer.weights) == ("miss", "v2")
        assert_state_equal(answer.state, want)
        again = await cc.serve(3, full, encoders.interface())
        assert again.path == "hit"
        assert_state_equal(again.state, want)

    asyncio.run(story())
    assert encoders.calls == [("encode", 1), ("append", 1), ("encode", 2)]
    assert cc.retries == 1


def test_one_users_miss_does_not_hold_another_users_hit(encoders: RealEncoders) -> None:
    """User A's miss waits inside its encoder until user B's hit has been answered: if B queued
    behind A, this would deadlock (bounded by a timeout)."""
    cc = cache()
    b_served = asyncio.Event()

    async def hold_misses(kind: str) -> None:
        if kind == "encode" and len(encoders.calls) > 1:
            await b_served.wait()

    async def story() -> None:
        await cc.serve(2, history(4, 50), encoders.interface())  # B's entry
        encoders.before_call = hold_misses
        miss = asyncio.create_task(cc.serve(1, history(3, 100), encoders.interface()))
        await asyncio.sleep(0)
        hit = await asyncio.wait_for(cc.serve(2, history(4, 50), encoders.interface()), 10)
        assert hit.path == "hit" and not miss.done()
        b_served.set()
        assert (await asyncio.wait_for(miss, 30)).path == "miss"

    asyncio.run(story())


def test_never_two_requests_of_one_user_at_once(encoders: RealEncoders) -> None:
    """Requests of one user arrive while others of that user hold or await its lock (new
    arrivals land exactly when a holder releases it): at most one is ever past the lock."""
    cc = cache()
    inside, most = [0], [0]
    base = history(7, 30)

    async def crowd(kind: str) -> None:
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        for _ in range(3):
            await asyncio.sleep(0)
        inside[0] -= 1

    async def arrive(delay: int, length: int) -> None:
        for _ in range(delay):
            await asyncio.sleep(0)
        await cc.serve(5, cut(base, length), encoders.interface())

    async def story() -> None:
        encoders.before_call = crowd
        await asyncio.gather(*(arrive(d, 10 + d % 20) for d in range(40)))

    asyncio.run(story())
    assert most[0] == 1, most[0]
    assert not cc._locks


def test_one_users_requests_are_serialised_and_each_gets_its_own_history(
        encoders: RealEncoders) -> None:
    cc = cache()
    base = history(5, 60)
    more = history(6, 5)
    variants = [base, cut(base, 40), {n: np.concatenate([base[n], more[n]]) for n in base},
                cut(base, 59)]
    variants[3][c.HISTORY_ITEM_IDS] = variants[3][c.HISTORY_ITEM_IDS].copy()
    variants[3][c.HISTORY_ITEM_IDS][10] += 1  # rewritten

    async def story() -> None:
        answers = await asyncio.gather(*(cc.serve(9, v, encoders.interface())
                                         for v in variants * 3))
        for v, answer in zip(variants * 3, answers, strict=True):
            assert_state_equal(answer.state, encoders.full(V1, v))
        assert not cc._locks  # released once nobody waits

    asyncio.run(story())
