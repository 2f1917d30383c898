"""The user-state cache as a plain module: no Triton in here, so every decision is unit-tested
(tests/test_kv_cache.py) and the python-backend model (model.py beside it) is a thin adapter.

It serves any split family from its declaration (the `split_contract` JSON the export writes
into user_cache's config; `Layout` reads what the cache needs of it): per user it holds the
declared state tensors and the declared event features (`event=True`) of the events they
describe, and never names a family's tensors.

What it decides, per request of one user:

* hit:    the request's kept history (the newest max_history events) equals the cached events;
* append: the cached events are a strict prefix of the history, appending is allowed (a causal,
          appendable family, an append model served at the encoder's version), the whole
          history fits max_history and at most `max_append` events are new;
* miss:   anything else (first visit, evicted, rewritten or shorter history, a total past
          max_history where every position shifts, an entry of other weights).

Events are compared by content (every event feature, byte for byte), never by id or hash alone.

Weights: every entry carries the tag of the weights that produced it (`Weights`, the encoder
version Triton reports ready). An entry of another tag is a miss, and `commit_append` refuses to
extend an entry with state of other weights (`MixedWeightsError`): the caller answers that
request as a full miss on the new weights.

Memory: each state tensor with an "L" dim lives in a buffer that grows along that dim, so an
append writes only the new events' part (O(ΔL)), which is all the append returns; a tensor
without one is replaced by the append's new value. A miss leaves room for the next append
(`headroom`), so the first append after it writes in place too. The LRU is bounded by the bytes
the buffers hold (capacity, not length), so growth can evict other users.

Concurrency: the orchestration (`UserStateCache.serve`) is a coroutine. Requests of different
users run concurrently (one user's miss never holds another's hit); requests of one user run one
after another (`asyncio.Lock` per user), so each gets its own history's state and no entry is
read while it is being extended.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PATHS = ("hit", "append", "miss")
GROWTH = 1.25  # an append past a buffer's capacity grows it by at least this factor
# The declaration's naming of the append graph's tensors (client/split_contract.py: the cached
# state read back, and the new events' part of a state tensor with an "L" dim). This module
# cannot import the client package (a python-backend model directory is all it has);
# tests/test_kv_cache.py holds the two against each other.
CACHED_PREFIX, NEW_PREFIX = "cached_", "new_"

Arrays = dict[str, np.ndarray]


class DeclarationError(ValueError):
    """user_cache's config carries no declaration it can serve (the message says why)."""


class MixedWeightsError(RuntimeError):
    """State of one set of weights was about to be appended to an entry of another."""


class WeightsChangedError(RuntimeError):
    """The encoder version a call was pinned to is no longer served: resolve and re-plan."""


@dataclass(frozen=True)
class StateLayout:
    """One declared state tensor as the cache holds it: `axis` is its "L" dim (its buffer grows
    along it; None: no such dim, the append's value replaces it); `all_but_last`: the append
    reads it without the last entry of its first dim."""

    name: str
    axis: int | None
    all_but_last: bool = False

    @property
    def cached_name(self) -> str:
        return CACHED_PREFIX + self.name

    @property
    def new_name(self) -> str:
        return NEW_PREFIX + self.name if self.axis is not None else self.name

    def valid(self, value: np.ndarray, length: int) -> np.ndarray:
        """The first `length` positions along its "L" dim (a view); the value itself if none."""
        if self.axis is None:
            return value
        return value[(slice(None),) * self.axis + (slice(0, length),)]

    def in_buffer(self, value: np.ndarray, capacity: int) -> np.ndarray:
        """A new buffer with `capacity` positions along the "L" dim, `value` in the first ones."""
        shape = list(value.shape)
        shape[self.axis] = capacity
        buffer = np.empty(shape, value.dtype)
        buffer[(slice(None),) * self.axis + (slice(0, value.shape[self.axis]),)] = value
        return buffer


@dataclass(frozen=True)
class Layout:
    """What the cache needs of a family's declaration: the history features (all go to the
    encoders), the event features among them (compared to choose the path), the state tensors,
    max_history and whether the family appends."""

    history: tuple[str, ...]
    events: tuple[str, ...]
    state: tuple[StateLayout, ...]
    max_history: int
    appendable: bool

    @classmethod
    def from_declaration(cls, declaration: str | Mapping[str, Any]) -> Layout:
        """From the `split_contract` JSON (text or parsed), as client/split_contract.py's
        `contract_to_json` writes it after `check_contract`; a declaration the cache cannot
        serve (no event feature, no state) is refused with the reason."""
        try:
            data = json.loads(declaration) if isinstance(declaration, str) else declaration
            history = tuple(f["name"] for f in data["features"] if f["axis"] == "history")
            events = tuple(f["name"] for f in data["features"] if f.get("event"))
            state = tuple(StateLayout(s["name"], list(s["dims"]).index("L")
                                      if "L" in s["dims"] else None,
                                      s.get("append_reads", "all") == "all_but_last")
                          for s in data["state"])
            layout = cls(history, events, state, int(data["max_history"]),
                         bool(data["appendable"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DeclarationError(f"not a split contract declaration: {e!r}") from e
        if not layout.events:
            raise DeclarationError("the declaration marks no history feature event=True: "
                                   "nothing tells the cache whether a user's history changed")
        if not any(s.axis is not None for s in layout.state):
            raise DeclarationError("the declaration has no state tensor with an 'L' dim: "
                                   "nothing the cache could hold per event")
        return layout


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


def history_length(history: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(history.values())))


def same_events(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """Equal content, byte for byte (a NaN equals the same NaN; -0.0 differs from 0.0: at worst
    a miss, never a wrong hit)."""
    return all(a[n].shape == b[n].shape and a[n].dtype == b[n].dtype
               and a[n].tobytes() == b[n].tobytes() for n in a)


class Entry:
    """One user's cached state. `events` (one buffer [capacity, ...] per event feature) and the
    state tensors with an "L" dim (buffers of `capacity` positions along it) hold `length` valid
    positions; the others are whole values; `weights` is the tag of the weights that produced
    the state."""

    def __init__(self, layout: Layout, events: Arrays, state: Arrays, weights: str,
                 capacity: int | None = None, adopt: bool = False) -> None:
        """Copy `events` ([L, ...] each) and `state` (the L valid positions of each growing
        tensor, or more) into buffers of `capacity` (>= L); with `adopt`, the growing tensors
        are already such buffers (their first L positions valid, every one of the same
        capacity) and are kept as they are, without a copy."""
        self.layout = layout
        length = history_length(events)
        growing = [s for s in layout.state if s.axis is not None]
        if adopt:
            capacity = state[growing[0].name].shape[growing[0].axis]
            assert all(state[s.name].shape[s.axis] == capacity for s in growing)
            assert capacity >= length
            self.state = {s.name: state[s.name] if s.axis is not None
                          else np.array(state[s.name]) for s in layout.state}
        else:
            capacity = max(length, capacity or length)
            self.state = {s.name: s.in_buffer(s.valid(state[s.name], length), capacity)
                          if s.axis is not None else np.array(state[s.name])
                          for s in layout.state}
        self.events = {}
        for name, value in events.items():
            self.events[name] = np.empty((capacity, *value.shape[1:]), value.dtype)
            self.events[name][:length] = value
        self.length = length
        self.weights = weights

    @property
    def capacity(self) -> int:
        return len(next(iter(self.events.values())))

    @property
    def nbytes(self) -> int:
        """Bytes held: the buffers' capacity, not their valid length."""
        return (sum(v.nbytes for v in self.events.values())
                + sum(v.nbytes for v in self.state.values()))

    def valid_events(self) -> Arrays:
        return {n: v[:self.length] for n, v in self.events.items()}

    def valid_state(self) -> Arrays:
        """Every state tensor as served: views (contiguous only when length == capacity)."""
        return {s.name: s.valid(self.state[s.name], self.length) for s in self.layout.state}

    def append_inputs(self) -> Arrays:
        """What the append model reads, by its input names (`cached_<name>`): each state tensor,
        without the last entry of its first dim where the declaration says so. Views."""
        return {s.cached_name: (v[:-1] if s.all_but_last else v)
                for s, v in zip(self.layout.state, self.valid_state().values(), strict=True)}

    def extend(self, events: Arrays, new: Arrays, max_capacity: int) -> None:
        """Append ΔL events and the append's output (`new`, by state name: the new events' part
        of each growing tensor, the new value of the others) in place, growing the buffers (by
        GROWTH, at most to max_capacity) when they are full."""
        start, stop = self.length, self.length + history_length(events)
        if stop > self.capacity:
            capacity = min(max(stop, int(self.capacity * GROWTH) + 1), max(max_capacity, stop))
            grown = Entry(self.layout, self.valid_events(), self.valid_state(), self.weights,
                          capacity)
            self.events, self.state = grown.events, grown.state
        for name, value in events.items():
            self.events[name][start:stop] = value
        for s in self.layout.state:
            if s.axis is None:
                self.state[s.name] = np.array(new[s.name])
            else:
                self.state[s.name][(slice(None),) * s.axis + (slice(start, stop),)] = new[s.name]
        self.length = stop


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
    """The decision for one request: its path, the entry it reads (hit, append), the events it
    will store and, for an append, the new events' history features."""

    path: str
    kept: Arrays  # the event features of the newest max_history events
    entry: Entry | None = None
    new_history: Arrays | None = None  # append: every history feature of the ΔL new events


@dataclass
class Encoders:
    """What the cache needs from the serving side, as coroutines:
    `resolve()` -> the Weights served now (raises when no encoder version is ready);
    `encode(weights, history, capacity)` -> the state of the request's history (every history
    feature, [L] each), by state name: each growing tensor in a buffer of `capacity` positions
    along its "L" dim (`StateLayout.in_buffer`, the L' kept ones valid), so the encoder's output
    is copied once, straight into the entry's buffer;
    `append(weights, cached, new_history)` -> the append model's output by state name (the new
    events' part of each growing tensor, the new value of the others), from `cached` (its
    inputs by name, `Entry.append_inputs`) and the ΔL new events' history features.
    Each call runs at the version of `weights` and raises WeightsChangedError when that version
    is no longer served."""

    resolve: Callable[[], Awaitable[Weights]]
    encode: Callable[[Weights, Arrays, int], Awaitable[Arrays]]
    append: Callable[[Weights, Arrays, Arrays], Awaitable[Arrays]]


@dataclass
class Answer:
    """What a request gets: every state tensor by name (views into the cache's buffers or the
    encoder's output), the path it took and the weights tag of its state."""

    state: Arrays
    path: str
    weights: str


@dataclass
class UserStateCache:
    """Path decisions + LRU + the per-user orchestration (see the module docstring)."""

    layout: Layout
    capacity_bytes: int
    max_append: int
    store: LruStore = field(init=False)
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.store = LruStore(self.capacity_bytes)
        self.counts = dict.fromkeys(PATHS, 0)
        self._locks: dict[int, list] = {}  # user_id -> [lock, requests holding or awaiting it]
        self.retries = 0  # requests re-planned because the weights changed under them

    @property
    def max_history(self) -> int:
        return self.layout.max_history

    # ------------------------------------------------------------------ decisions
    def headroom(self, length: int) -> int:
        """Room a miss leaves after its L events, so that the next append (most returning users
        come back with a few new events) writes in place instead of growing the buffer: an
        eighth of L plus 16 events, at most max_append and never past max_history. None for a
        family that never appends."""
        if not self.layout.appendable:
            return 0
        return max(0, min(self.max_append, 16 + length // 8, self.max_history - length))

    def plan(self, user_id: int, history: Mapping[str, np.ndarray], weights: Weights) -> Plan:
        """Which path serves `history` (every history feature, of one length) for `user_id`
        under `weights` (no side effect but the LRU's recency)."""
        total = history_length(history)
        first = max(0, total - self.max_history)
        kept = {n: history[n][first:] for n in self.layout.events}
        entry = self.store.get(user_id)
        if entry is None or entry.weights != weights.tag:
            return Plan("miss", kept)
        cached = entry.valid_events()
        if entry.length == total - first and same_events(cached, kept):
            return Plan("hit", kept, entry)
        prefix = entry.length
        if (self.layout.appendable and weights.can_append and prefix < total <= self.max_history
                and total - prefix <= self.max_append
                and same_events(cached, {n: history[n][:prefix] for n in self.layout.events})):
            return Plan("append", kept, entry, {n: history[n][prefix:] for n in history})
        return Plan("miss", kept)

    def commit_miss(self, user_id: int, kept: Arrays, state: Arrays, weights: Weights) -> Entry:
        """Store a miss: `state` is the encoder's output, growing tensors in their buffers (the
        first len(kept) positions valid), adopted without a copy."""
        entry = Entry(self.layout, kept, state, weights.tag, adopt=True)
        self.store.put(user_id, entry)
        return entry

    def commit_append(self, user_id: int, plan: Plan, new: Arrays, weights: Weights) -> Entry:
        """Extend the planned entry with the append's output, computed under `weights`. Refuses
        (MixedWeightsError) state of weights other than the entry's, and an output whose new
        part does not hold exactly the new events (ValueError)."""
        entry = plan.entry
        assert entry is not None and plan.new_history is not None
        if weights.tag != entry.weights:
            raise MixedWeightsError(f"refusing to append state of weights {weights.tag} to an "
                                    f"entry of weights {entry.weights}")
        count = history_length(plan.new_history)
        for s in self.layout.state:
            if s.axis is not None and new[s.name].shape[s.axis] != count:
                raise ValueError(f"append returned {s.new_name} of {new[s.name].shape[s.axis]} "
                                 f"events for {count} new ones")
        entry.extend({n: plan.new_history[n] for n in self.layout.events}, new,
                     self.max_history)
        self.store.put(user_id, entry)
        return entry

    # ------------------------------------------------------------------ orchestration
    async def serve(self, user_id: int, history: Mapping[str, np.ndarray],
                    encoders: Encoders) -> Answer:
        """Answer one request (its history features, of one length): plan, call the encoder the
        path needs, store. Requests of one user are serialised; a change of weights under a call
        re-plans it once on the new weights (an append then becomes a full miss: its entry is
        of the old weights)."""
        # the lock lives while requests of this user hold or await it (a released lock is
        # briefly unlocked before its next waiter runs, so `locked()` cannot tell)
        held = self._locks.setdefault(user_id, [asyncio.Lock(), 0])
        held[1] += 1
        try:
            async with held[0]:
                return await self._serve(user_id, history, encoders)
        finally:
            held[1] -= 1
            if not held[1]:
                del self._locks[user_id]

    async def _serve(self, user_id: int, history: Mapping[str, np.ndarray],
                     encoders: Encoders) -> Answer:
        for attempt in (0, 1):
            weights = await encoders.resolve()
            plan = self.plan(user_id, history, weights)
            try:
                answer = await self._run(user_id, plan, history, weights, encoders)
            except (WeightsChangedError, MixedWeightsError):
                if attempt:
                    raise
                self.retries += 1
                self.store.drop(user_id)  # whatever it held is of the old weights
                continue
            self.counts[answer.path] += 1
            return answer
        raise AssertionError("unreachable")

    async def _run(self, user_id: int, plan: Plan, history: Mapping[str, np.ndarray],
                   weights: Weights, encoders: Encoders) -> Answer:
        if plan.path == "hit":
            entry = plan.entry
            return Answer(entry.valid_state(), "hit", entry.weights)
        if plan.path == "append":
            new = await encoders.append(weights, plan.entry.append_inputs(), plan.new_history)
            entry = self.commit_append(user_id, plan, new, weights)
            return Answer(entry.valid_state(), "append", entry.weights)
        length = history_length(plan.kept)
        state = await encoders.encode(weights, dict(history), length + self.headroom(length))
        entry = self.commit_miss(user_id, plan.kept, state, weights)
        return Answer(entry.valid_state(), "miss", weights.tag)


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
