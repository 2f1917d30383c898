"""The user K/V cache as a plain module: no Triton in here, so every decision is unit-tested
(tests/test_kv_cache.py) and the python-backend model (model.py beside it) is a thin adapter.

What it decides, per request of one user:

* hit:    the request's kept history (the newest max_history events) equals the cached events;
* append: the cached events are a strict prefix of the history, appending is allowed (causal
          mask, an append model served at the encoder's version), the whole history fits
          max_history and at most `max_append` events are new;
* miss:   anything else (first visit, evicted, rewritten or shorter history, a total past
          max_history where every position shifts, an entry of other weights).

Events are compared by content (item, action, timestamp), never by id or hash alone.

Weights: every entry carries the tag of the weights that produced it (`Weights`, the encoder
version Triton reports ready). An entry of another tag is a miss, and `commit_append` refuses to
extend an entry with K/V of other weights (`MixedWeightsError`): the caller answers that request
as a full miss on the new weights.

Memory: each user's K/V lives in a buffer that grows along the history axis, so an append writes
only the new events' K/V (O(ΔL)); a miss leaves room for the next append (`headroom`), so the
first append after it writes in place too. The LRU is bounded by the bytes the buffers hold
(capacity, not length), so growth can evict other users.

Concurrency: the orchestration (`UserKvCache.serve`) is a coroutine. Requests of different users
run concurrently (one user's miss never holds another's hit); requests of one user run one after
another (`asyncio.Lock` per user), so each gets its own history's K/V and no entry is read while
it is being extended.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

PATHS = ("hit", "append", "miss")
EVENT_COLUMNS = 3  # item, action, timestamp
GROWTH = 1.25  # an append past a buffer's capacity grows it by at least this factor


class MixedWeightsError(RuntimeError):
    """K/V of one set of weights was about to be appended to an entry of another."""


class WeightsChangedError(RuntimeError):
    """The encoder version a call was pinned to is no longer served: resolve and re-plan."""


@dataclass(frozen=True)
class Weights:
    """Which weights serve now: the encoder's version, and whether the append model is served at
    the same version (one export writes both, so the same version number means the same
    weights; any other pairing disables appends)."""

    encoder_version: int
    append_version: int | None = None

    @property
    def tag(self) -> str:
        return f"v{self.encoder_version}"

    @property
    def can_append(self) -> bool:
        return self.append_version == self.encoder_version


class Entry:
    """One user's cached state. `events` [capacity, 3] and `kv` [layers, 2, H, capacity, dh] are
    buffers of which the first `length` positions are valid; `last_ts` [1] is the newest event's
    timestamp; `weights` the tag of the weights that produced the K/V."""

    def __init__(self, events: np.ndarray, kv: np.ndarray, last_ts: np.ndarray, weights: str,
                 capacity: int | None = None, adopt: bool = False) -> None:
        """Copy `events` [L, 3] and `kv` [..., L, dh] into buffers of `capacity` (>= L); with
        `adopt`, `kv` is already such a buffer ([..., capacity, dh], its first L positions
        valid) and is kept as it is, without a copy."""
        length = events.shape[0]
        if adopt:
            capacity = kv.shape[3]
            assert capacity >= length
            self.kv = kv
        else:
            capacity = max(length, capacity or length)
            self.kv = in_buffer(kv[:, :, :, :length], capacity)
        self.events = np.empty((capacity, EVENT_COLUMNS), np.int64)
        self.events[:length] = events
        self.last_ts = np.array(last_ts, np.int64).reshape(1)
        self.length = length
        self.weights = weights

    @property
    def capacity(self) -> int:
        return self.events.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: the buffers' capacity, not their valid length."""
        return self.events.nbytes + self.kv.nbytes + self.last_ts.nbytes

    def valid_events(self) -> np.ndarray:
        return self.events[:self.length]

    def user_kv(self) -> np.ndarray:
        """[layers, 2, H, length, dh], a view (contiguous only when length == capacity)."""
        return self.kv[:, :, :, :self.length]

    def extend(self, events: np.ndarray, new_kv: np.ndarray, last_ts: np.ndarray,
               max_capacity: int) -> None:
        """Append ΔL events and their K/V [layers, 2, H, ΔL, dh] in place, growing the buffers
        (by GROWTH, at most to max_capacity) when they are full."""
        start, stop = self.length, self.length + events.shape[0]
        if stop > self.capacity:
            capacity = min(max(stop, int(self.capacity * GROWTH) + 1), max(max_capacity, stop))
            grown = Entry(self.valid_events(), self.user_kv(), self.last_ts, self.weights,
                          capacity)
            self.events, self.kv = grown.events, grown.kv
        self.events[start:stop] = events
        self.kv[:, :, :, start:stop] = new_kv
        self.last_ts = np.array(last_ts, np.int64).reshape(1)
        self.length = stop


def in_buffer(kv: np.ndarray, capacity: int) -> np.ndarray:
    """A new buffer [layers, 2, H, capacity, dh] whose first kv.shape[3] positions hold `kv`."""
    buffer = np.empty((*kv.shape[:3], capacity, kv.shape[4]), kv.dtype)
    buffer[:, :, :, :kv.shape[3]] = kv
    return buffer


class LruStore:
    """user_id -> Entry, least recently used first out, bounded by the bytes its entries hold.
    An entry larger than the whole bound is not kept (it would evict everyone for nothing)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        # bytes accounted per user when it was put: an entry grows in place before it is put
        # again, and the books must subtract what they added
        self._held: dict[int, int] = {}
        self.bytes = 0
        self.evictions = 0

    def get(self, user_id: int) -> Entry | None:
        entry = self.entries.get(user_id)
        if entry is not None:
            self.entries.move_to_end(user_id)
        return entry

    def drop(self, user_id: int) -> None:
        old = self.entries.pop(user_id, None)
        if old is not None:
            self.bytes -= self._held.pop(user_id)

    def put(self, user_id: int, entry: Entry) -> None:
        """Insert or re-account `user_id` (after its entry grew), evicting the least recently
        used others until it fits."""
        self.drop(user_id)
        size = entry.nbytes
        if size > self.capacity:
            return
        while self.entries and self.bytes + size > self.capacity:
            evicted, _ = self.entries.popitem(last=False)
            self.bytes -= self._held.pop(evicted)
            self.evictions += 1
        self.entries[user_id] = entry
        self._held[user_id] = size
        self.bytes += size


@dataclass
class Plan:
    """The decision for one request: its path, the entry it reads (hit, append) and the events
    it will store."""

    path: str
    kept: np.ndarray  # [L', 3]: the newest max_history events
    entry: Entry | None = None
    new_events: np.ndarray | None = None  # append: the ΔL events past the entry


def stack_events(item_ids: np.ndarray, action_ids: np.ndarray,
                 timestamps: np.ndarray) -> np.ndarray:
    """[L, 3] events; lengths must agree (the caller sends disagreeing ones to the encoder's
    guard, which names them)."""
    return np.stack([item_ids, action_ids, timestamps], axis=1).astype(np.int64, copy=False)


@dataclass
class Encoders:
    """What the cache needs from the serving side, as coroutines:
    `resolve()` -> the Weights served now (raises when no encoder version is ready);
    `encode(weights, events [L, 3], capacity)` -> (user_kv of the L' kept events in a buffer
    [layers, 2, H, capacity, dh] (`in_buffer`), last_ts [1]): the encoder's output is copied
    once, straight into the entry's buffer;
    `append(weights, cached_kv, cached_last_ts, new_events [ΔL, 3])` -> (K/V of the new events
    only [layers, 2, H, ΔL, dh], last_ts [1]).
    Each call runs at the version of `weights` and raises WeightsChangedError when that version
    is no longer served."""

    resolve: Callable[[], Awaitable[Weights]]
    encode: Callable[[Weights, np.ndarray, int], Awaitable[tuple[np.ndarray, np.ndarray]]]
    append: Callable[[Weights, np.ndarray, np.ndarray, np.ndarray],
                     Awaitable[tuple[np.ndarray, np.ndarray]]]


@dataclass
class Answer:
    """What a request gets: user_kv (a view into the cache's buffer or the encoder's output),
    last_ts, the path it took and the weights tag of its K/V."""

    user_kv: np.ndarray
    last_ts: np.ndarray
    path: str
    weights: str


@dataclass
class UserKvCache:
    """Path decisions + LRU + the per-user orchestration (see the module docstring)."""

    capacity_bytes: int
    max_history: int
    max_append: int
    store: LruStore = field(init=False)
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.store = LruStore(self.capacity_bytes)
        self.counts = dict.fromkeys(PATHS, 0)
        self._locks: dict[int, list] = {}  # user_id -> [lock, requests holding or awaiting it]
        self.retries = 0  # requests re-planned because the weights changed under them

    # ------------------------------------------------------------------ decisions
    def headroom(self, length: int) -> int:
        """Room a miss leaves after its L events, so that the next append (most returning users
        come back with a few new events) writes in place instead of growing the buffer: an
        eighth of L plus 16 events, at most max_append and never past max_history."""
        return max(0, min(self.max_append, 16 + length // 8, self.max_history - length))

    def plan(self, user_id: int, events: np.ndarray, weights: Weights) -> Plan:
        """Which path serves `events` [L, 3] for `user_id` under `weights` (no side effect but
        the LRU's recency)."""
        kept = events[-self.max_history:] if self.max_history else events[:0]
        entry = self.store.get(user_id)
        if entry is None or entry.weights != weights.tag:
            return Plan("miss", kept)
        cached = entry.valid_events()
        if entry.length == len(kept) and np.array_equal(cached, kept):
            return Plan("hit", kept, entry)
        prefix, total = entry.length, len(events)
        if (weights.can_append and prefix < total <= self.max_history
                and total - prefix <= self.max_append
                and np.array_equal(cached, events[:prefix])):
            return Plan("append", kept, entry, events[prefix:])
        return Plan("miss", kept)

    def commit_miss(self, user_id: int, kept: np.ndarray, user_kv: np.ndarray,
                    last_ts: np.ndarray, weights: Weights) -> Entry:
        """Store a miss: `user_kv` is the encoder's output in its buffer ([..., capacity, dh],
        the first len(kept) positions valid), adopted without a copy."""
        entry = Entry(kept, user_kv, last_ts, weights.tag, adopt=True)
        self.store.put(user_id, entry)
        return entry

    def commit_append(self, user_id: int, plan: Plan, new_kv: np.ndarray, last_ts: np.ndarray,
                      weights: Weights) -> Entry:
        """Extend the planned entry with the new events' K/V, computed under `weights`. Refuses
        (MixedWeightsError) K/V of weights other than the entry's."""
        entry = plan.entry
        assert entry is not None and plan.new_events is not None
        if weights.tag != entry.weights:
            raise MixedWeightsError(f"refusing to append K/V of weights {weights.tag} to an "
                                    f"entry of weights {entry.weights}")
        if new_kv.shape[3] != len(plan.new_events):
            raise ValueError(f"append returned K/V of {new_kv.shape[3]} events for "
                             f"{len(plan.new_events)} new ones")
        entry.extend(plan.new_events, new_kv, last_ts, self.max_history)
        self.store.put(user_id, entry)
        return entry

    # ------------------------------------------------------------------ orchestration
    async def serve(self, user_id: int, events: np.ndarray, encoders: Encoders) -> Answer:
        """Answer one request: plan, call the encoder the path needs, store. Requests of one user
        are serialised; a change of weights under a call re-plans it once on the new weights
        (an append then becomes a full miss: its entry is of the old weights)."""
        # the lock lives while requests of this user hold or await it (a released lock is
        # briefly unlocked before its next waiter runs, so `locked()` cannot tell)
        held = self._locks.setdefault(user_id, [asyncio.Lock(), 0])
        held[1] += 1
        try:
            async with held[0]:
                return await self._serve(user_id, events, encoders)
        finally:
            held[1] -= 1
            if not held[1]:
                del self._locks[user_id]

    async def _serve(self, user_id: int, events: np.ndarray, encoders: Encoders) -> Answer:
        for attempt in (0, 1):
            weights = await encoders.resolve()
            plan = self.plan(user_id, events, weights)
            try:
                answer = await self._run(user_id, plan, events, weights, encoders)
            except (WeightsChangedError, MixedWeightsError):
                if attempt:
                    raise
                self.retries += 1
                self.store.drop(user_id)  # whatever it held is of the old weights
                continue
            self.counts[answer.path] += 1
            return answer
        raise AssertionError("unreachable")

    async def _run(self, user_id: int, plan: Plan, events: np.ndarray, weights: Weights,
                   encoders: Encoders) -> Answer:
        if plan.path == "hit":
            entry = plan.entry
            return Answer(entry.user_kv(), entry.last_ts, "hit", entry.weights)
        if plan.path == "append":
            entry = plan.entry
            new_kv, last_ts = await encoders.append(weights, entry.user_kv(), entry.last_ts,
                                                    plan.new_events)
            entry = self.commit_append(user_id, plan, new_kv, last_ts, weights)
            return Answer(entry.user_kv(), entry.last_ts, "append", entry.weights)
        capacity = len(plan.kept) + self.headroom(len(plan.kept))
        user_kv, last_ts = await encoders.encode(weights, events, capacity)
        entry = self.commit_miss(user_id, plan.kept, user_kv, last_ts, weights)
        return Answer(entry.user_kv(), entry.last_ts, "miss", weights.tag)


def resolve_version(is_ready: Callable[[int], bool], pinned: int | None,
                    window: int) -> int | None:
    """The version to pin: `pinned` while it is ready (the usual case: one readiness question per
    request), else the highest ready version within `window` of it (of 1 when nothing is
    pinned yet). Triton's default version policy serves the newest version, and a new export
    goes into the next version folder, so the window covers every rollout that numbers
    versions 1, 2, 3, ...; None when nothing in it is ready."""
    if pinned is not None and is_ready(pinned):
        return pinned
    centre = pinned or 1
    for version in range(centre + window, max(centre - window, 1) - 1, -1):
        if version != pinned and is_ready(version):
            return version
    return None
