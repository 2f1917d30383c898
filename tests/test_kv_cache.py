"""The user K/V cache's logic without Triton (model_repository/user_cache/1/kv_cache.py): LRU
order and byte accounting, growable buffers, path decisions, max_history truncation, weights
tags and the refusal to mix weights, version resolution, and the per-request orchestration with
real encoders (the exported small model in ONNX Runtime, and a second set of weights in torch)
including a weights switch between reading an entry and the encoder call, no head-of-line
blocking between users and per-user serialisation."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export import reference_features as c
from export.model import build_model
from tests.conftest import SMALL, random_request, small_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "kv_cache", ROOT / "model_repository" / "user_cache" / "1" / "kv_cache.py")
kv = importlib.util.module_from_spec(_spec)
sys.modules["kv_cache"] = kv
_spec.loader.exec_module(kv)

LAYERS, HEADS, DH = SMALL["num_layers"], SMALL["num_heads"], SMALL["d_model"] // SMALL["num_heads"]
MAX_HISTORY = SMALL["max_history"]
V1, V2 = kv.Weights(1, 1), kv.Weights(2, 2)


def fake_kv(length: int, value: float = 0.0) -> np.ndarray:
    return np.full((LAYERS, 2, HEADS, length, DH), value, np.float32)


def events_of(length: int, start: int = 0) -> np.ndarray:
    idx = np.arange(start, start + length, dtype=np.int64)
    return np.stack([idx * 7 + 1, idx % 5, 1_600_000_000 + idx * 10], axis=1)


def entry_bytes(capacity: int) -> int:
    return capacity * 24 + fake_kv(capacity).nbytes + 8


# ------------------------------------------------------------------ LRU and buffers
def test_lru_evicts_least_recently_used_first_and_counts_bytes() -> None:
    store = kv.LruStore(3 * entry_bytes(10))
    for user in (1, 2, 3):
        store.put(user, kv.Entry(events_of(10), fake_kv(10), np.array([1]), "v1"))
    assert store.bytes == 3 * entry_bytes(10) and store.evictions == 0
    store.get(1)  # 2 is now the least recently used
    store.put(4, kv.Entry(events_of(10), fake_kv(10), np.array([1]), "v1"))
    assert list(store.entries) == [3, 1, 4] and store.evictions == 1
    assert store.bytes == 3 * entry_bytes(10)
    store.put(5, kv.Entry(events_of(20), fake_kv(20), np.array([1]), "v1"))  # needs two slots
    assert list(store.entries) == [4, 5] and store.evictions == 3
    assert store.bytes == entry_bytes(10) + entry_bytes(20)
    store.put(6, kv.Entry(events_of(40), fake_kv(40), np.array([1]), "v1"))  # above the bound
    assert 6 not in store.entries and store.bytes == entry_bytes(10) + entry_bytes(20)
    store.drop(4)
    assert list(store.entries) == [5] and store.bytes == entry_bytes(20)


def test_growth_in_place_is_re_accounted_and_can_evict() -> None:
    store = kv.LruStore(entry_bytes(10) + entry_bytes(15))
    grower = kv.Entry(events_of(10), fake_kv(10, 1.0), np.array([5]), "v1")
    store.put(1, grower)
    store.put(2, kv.Entry(events_of(10), fake_kv(10), np.array([1]), "v1"))
    grower.extend(events_of(3, 10), fake_kv(3, 2.0), np.array([9]), MAX_HISTORY)
    assert grower.capacity == 13 and grower.length == 13  # 10 * 1.25 + 1
    store.put(1, grower)
    assert store.bytes == entry_bytes(13) + entry_bytes(10)
    grower.extend(events_of(2, 13), fake_kv(2, 3.0), np.array([11]), MAX_HISTORY)
    assert grower.capacity == 17 and grower.length == 15  # grew past 13: 13 * 1.25 + 1
    store.put(1, grower)  # 17 + 10 > 10 + 15: user 2 goes
    assert list(store.entries) == [1] and store.bytes == entry_bytes(17)
    np.testing.assert_array_equal(grower.valid_events(), events_of(15))
    np.testing.assert_array_equal(grower.user_kv()[..., :10, :], 1.0)
    np.testing.assert_array_equal(grower.user_kv()[..., 10:13, :], 2.0)
    np.testing.assert_array_equal(grower.user_kv()[..., 13:, :], 3.0)
    assert grower.last_ts.tolist() == [11]


def test_a_view_handed_out_never_changes_when_the_entry_grows() -> None:
    entry = kv.Entry(events_of(4), fake_kv(4, 1.0), np.array([1]), "v1", capacity=10)
    served = entry.user_kv()
    entry.extend(events_of(3, 4), fake_kv(3, 2.0), np.array([2]), MAX_HISTORY)
    entry.extend(events_of(5, 7), fake_kv(5, 3.0), np.array([3]), MAX_HISTORY)  # regrows
    assert served.shape[3] == 4 and (served == 1.0).all()


def test_growth_stops_at_max_history() -> None:
    entry = kv.Entry(events_of(280), fake_kv(280), np.array([1]), "v1")
    entry.extend(events_of(5, 280), fake_kv(5), np.array([2]), MAX_HISTORY)
    assert entry.capacity == MAX_HISTORY


# ------------------------------------------------------------------ decisions
def cache(max_append: int = 256, capacity: int = 1 << 30) -> kv.UserKvCache:
    return kv.UserKvCache(capacity_bytes=capacity, max_history=MAX_HISTORY,
                          max_append=max_append)


def stored(cache_: kv.UserKvCache, user: int, events: np.ndarray,
           weights: kv.Weights = V1) -> None:
    kept = events[-MAX_HISTORY:]
    cache_.commit_miss(user, kept, fake_kv(len(kept)), np.array([kept[-1, 2]]), weights)


def test_paths() -> None:
    cc = cache(max_append=20)
    first = events_of(100)
    assert cc.plan(1, first, V1).path == "miss"  # first visit
    stored(cc, 1, first)
    assert cc.plan(1, first, V1).path == "hit"
    grown = events_of(110)
    plan = cc.plan(1, grown, V1)
    assert plan.path == "append"
    np.testing.assert_array_equal(plan.new_events, events_of(10, 100))
    assert cc.plan(1, events_of(121), V1).path == "miss"  # 21 new > max_append
    assert cc.plan(1, events_of(120), V1).path == "append"  # 20 new
    rewritten = grown.copy()
    rewritten[50, 0] += 1
    assert cc.plan(1, rewritten, V1).path == "miss"
    assert cc.plan(1, events_of(60), V1).path == "miss"  # shorter (another device)
    assert cc.plan(2, first, V1).path == "miss"  # another user, same history
    assert cc.plan(1, first, V2).path == "miss"  # other weights: even a repeat misses
    assert cc.plan(1, grown, kv.Weights(1, None)).path == "miss"  # no append model
    assert cc.plan(1, grown, kv.Weights(1, 2)).path == "miss"  # append model of other weights


def test_max_history_truncation() -> None:
    cc = cache()
    long = events_of(MAX_HISTORY + 40)
    plan = cc.plan(1, long, V1)
    assert plan.path == "miss"
    np.testing.assert_array_equal(plan.kept, long[-MAX_HISTORY:])  # the newest max_history
    stored(cc, 1, long)
    assert cc.store.get(1).length == MAX_HISTORY
    assert cc.plan(1, long, V1).path == "hit"  # an over-long repeat still hits
    assert cc.plan(1, events_of(MAX_HISTORY + 41), V1).path == "miss"  # positions shift
    cc2 = cache()
    stored(cc2, 1, events_of(MAX_HISTORY - 5))
    assert cc2.plan(1, events_of(MAX_HISTORY), V1).path == "append"  # fits exactly
    assert cc2.plan(1, events_of(MAX_HISTORY + 1), V1).path == "miss"  # crosses it


def test_a_miss_leaves_room_for_the_next_append() -> None:
    cc = kv.UserKvCache(capacity_bytes=1 << 30, max_history=16384, max_append=256)
    assert cc.headroom(0) == 16 and cc.headroom(800) == 116  # L / 8 + 16
    assert cc.headroom(4000) == 256  # at most max_append
    assert cc.headroom(16384 - 5) == 5 and cc.headroom(16384) == 0  # never past max_history


def test_mixed_weights_are_refused() -> None:
    cc = cache()
    stored(cc, 1, events_of(30))
    plan = cc.plan(1, events_of(35), V1)
    with pytest.raises(kv.MixedWeightsError, match="v2"):
        cc.commit_append(1, plan, fake_kv(5), np.array([0]), V2)
    assert cc.store.get(1).length == 30  # untouched
    with pytest.raises(ValueError, match="4 events for 5"):
        cc.commit_append(1, plan, fake_kv(4), np.array([0]), V1)


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
    """Encoders of two weights: version 1 is the exported small model in ONNX Runtime, version 2
    the same architecture with other weights in torch. `served` is what Triton would report
    ready; a call at a version no longer served raises WeightsChangedError, as BLS fails."""

    def __init__(self, onnx_models: object) -> None:
        self.onnx = onnx_models
        self.v2 = build_model(small_config("causal", seed=SMALL["seed"] + 1))
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

    def full(self, weights: kv.Weights, events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        history = {n: np.ascontiguousarray(events[:, i]) for i, n in enumerate(c.HISTORY_INPUTS)}
        if weights.encoder_version == 1:
            user_kv, last = self.onnx.run("user_encoder", history)
            return user_kv, last
        with torch.no_grad():
            user_kv, last = self.v2.encode_user(*(torch.from_numpy(v) for v in history.values()))
        return user_kv.numpy(), last.numpy()

    async def encode(self, weights: kv.Weights, events: np.ndarray, capacity: int):
        await self._enter("encode", weights)
        user_kv, last = self.full(weights, events)
        return kv.in_buffer(user_kv, capacity), last

    async def append(self, weights: kv.Weights, cached_kv: np.ndarray, cached_last: np.ndarray,
                     new_events: np.ndarray):
        await self._enter("append", weights)
        assert weights.encoder_version == 1, "the test appends under version 1 only"
        new = {n: np.ascontiguousarray(new_events[:, i])
               for i, n in enumerate(c.HISTORY_INPUTS)}
        new_kv, last = self.onnx.run("user_encoder_append", {
            c.CACHED_USER_KV: np.ascontiguousarray(cached_kv[:-1]),
            c.CACHED_LAST_EVENT_TIMESTAMP: cached_last, **new})
        return new_kv, last

    def interface(self) -> kv.Encoders:
        return kv.Encoders(resolve=self.resolve, encode=self.encode, append=self.append)


def history(seed: int, length: int) -> np.ndarray:
    req = random_request(np.random.default_rng(seed), small_config("causal"), length, 1)
    return kv.stack_events(*(req[n] for n in c.HISTORY_INPUTS))


@pytest.fixture
def encoders(exported) -> RealEncoders:
    return RealEncoders(exported("causal")[1])


def test_every_path_equals_a_full_encode(encoders: RealEncoders) -> None:
    cc = cache()
    full = history(1, 200)

    async def story() -> None:
        for length, expected in ((120, "miss"), (120, "hit"), (121, "append"), (160, "append"),
                                 (160, "hit"), (200, "append")):
            answer = await cc.serve(7, full[:length], encoders.interface())
            if length == 121:  # the first append wrote into the miss's headroom, in place
                assert cc.store.get(7).capacity == 120 + cc.headroom(120)
            want_kv, want_last = encoders.full(V1, full[:length])
            assert answer.path == expected, (length, answer.path)
            assert answer.user_kv.shape == want_kv.shape
            assert float(np.abs(answer.user_kv - want_kv).max()) <= 1e-5
            assert answer.last_ts.tolist() == want_last.tolist()

        entry = cc.store.get(7)
        assert entry.capacity == 237  # 120 + 31 of headroom, grown by 1.25x twice: 189, 237

    asyncio.run(story())
    assert cc.counts == {"hit": 2, "append": 3, "miss": 1}


def test_a_weights_switch_between_entry_and_append_is_a_full_miss_on_new_weights(
        encoders: RealEncoders) -> None:
    """The race: the entry (v1) is read, then v2 replaces v1 before the append runs. The append
    at v1 fails; the request is re-planned as a miss on v2 and never stores v1 K/V extended by
    anything; the next repeat is a hit of pure v2 K/V."""
    cc = cache()
    full = history(2, 90)

    async def switch(kind: str) -> None:
        if kind == "append" and encoders.served == V1:
            encoders.served = V2

    async def story() -> None:
        await cc.serve(3, full[:80], encoders.interface())  # v1 miss
        encoders.before_call = switch
        answer = await cc.serve(3, full, encoders.interface())
        want, _ = encoders.full(V2, full)
        assert (answer.path, answer.weights) == ("miss", "v2")
        assert float(np.abs(answer.user_kv - want).max()) <= 1e-5
        again = await cc.serve(3, full, encoders.interface())
        assert again.path == "hit" and float(np.abs(again.user_kv - want).max()) <= 1e-5

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
        await cc.serve(5, base[:length], encoders.interface())

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
    variants = [base, base[:40], np.concatenate([base, history(6, 5)]), base[:59]]
    variants[3] = variants[3].copy()
    variants[3][10, 0] += 1  # rewritten

    async def story() -> None:
        answers = await asyncio.gather(*(cc.serve(9, v, encoders.interface())
                                         for v in variants * 3))
        for v, answer in zip(variants * 3, answers, strict=True):
            want, _ = encoders.full(V1, v)
            assert float(np.abs(answer.user_kv - want).max()) <= 1e-5
        assert not cc._locks  # released once nobody waits

    asyncio.run(story())
