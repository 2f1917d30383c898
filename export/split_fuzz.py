"""Requests built from a declaration, and a family's exported graphs run in ONNX Runtime: what
the conformance check (`python -m export.check`) and the tests share.

Requests come from the client's generator (`client.traffic.random_features`): every declared
feature filled from its role (client/split_contract.ROLES) - item ids from a Zipf catalogue,
action codes, non-decreasing history timestamps with the request after the newest event,
durations, dense values - or, without a role, from its dtype. So any family gets valid requests
and nothing here names a feature. On top, the values a fuzz needs and the traffic model never
draws: every integer feature but timestamps and durations carries its dtype's extreme ids
(`client.traffic.extreme_ids`: both ends of the range, -1, 0, 1, +-2^53 + 1, ...) in its first
entries, the cases a hash table, a modulo or a cast gets wrong; `gaps` draws the history's
timestamps from given gaps instead (e.g. at powers of two, where a log-bucketed time bias would
flip a bucket).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from client.split_contract import INTEGERS, Feature
from client.traffic import extreme_ids, random_features
from export.runtime import make_session
from export.split_contract import HISTORY, SplitContract
from export.split_export import graph_io, graphs_for

# Roles whose integers are quantities, not ids: no extreme ids there (a timestamp must not run
# backwards, a duration is >= 0).
QUANTITY_ROLES = ("timestamp", "duration")


def _with_extremes(f: Feature, values: np.ndarray) -> np.ndarray:
    """`values` with the dtype's extreme ids in its first entries: a quarter of them, at least
    two (both ends of the range) where there are two."""
    out = np.array(values)  # a writable copy
    flat = out.reshape(-1)
    extremes = extreme_ids(f.dtype)
    k = min(flat.size, len(extremes), max(2, flat.size // 4))
    flat[:k] = extremes[:k]
    return out


def _retimed(contract: SplitContract, request: dict[str, np.ndarray], rng: np.random.Generator,
             gaps: Sequence[int]) -> dict[str, np.ndarray]:
    """The timestamp features redrawn from `gaps`: the history's events that many seconds apart
    (oldest first), the request a little after the newest event."""
    length = len(request[contract.history_features[0].name])
    history = 1_600_000_000 + np.cumsum(rng.choice(np.asarray(gaps, np.int64), size=length))
    newest = int(history[-1]) if length else 1_600_000_000
    now = newest + int(rng.integers(0, 10_000))
    return {f.name: (history if f.axis == HISTORY else np.full(f.shape, now)).astype(
                request[f.name].dtype)
            for f in contract.features if f.role == "timestamp"}


def random_request(contract: SplitContract, rng: np.random.Generator, length: int, n: int,
                   gaps: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """One request of `length` history events and `n` candidates, every declared feature, drawn
    from `rng` (module docstring): the client's traffic, extreme ids in every id feature, the
    history's timestamps from `gaps` when given."""
    request = {k: np.array(v) for k, v in random_features(contract, length, n, rng).items()}
    for f in contract.features:
        if f.dtype in INTEGERS and f.role not in QUANTITY_ROLES:
            request[f.name] = _with_extremes(f, request[f.name])
    if gaps is not None:
        request.update(_retimed(contract, request, rng, gaps))
    return request


def as_torch(request: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in request.items()}


def history_slice(contract: SplitContract, request: dict[str, np.ndarray],
                  part: slice) -> dict[str, np.ndarray]:
    """The request's history features cut to `part` (e.g. the cached prefix, the new events)."""
    return {f.name: request[f.name][part] for f in contract.history_features}


def appended(contract: SplitContract, cached: Sequence[np.ndarray],
             new: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The whole state after an append, as the user cache builds it: a state tensor with an "L"
    dim is the cached part followed by the new events' part (encode_append's output), another
    is the append's new value."""
    return [np.concatenate([c, n], axis=s.dims.index("L")) if s.grows else np.asarray(n)
            for s, c, n in zip(contract.state, cached, new, strict=True)]


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference (float64); NaN when either side has one (fails any `<=`)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))


class SplitGraphs:
    """A family's exported graphs (directory/<graph>/1/model.onnx) run with the project's ONNX
    Runtime settings on `provider` (export.runtime.PROVIDERS); inputs are picked from a request
    by the declaration's names."""

    def __init__(self, contract: SplitContract, directory: Path,
                 graphs: Sequence[str] | None = None, provider: str | None = None) -> None:
        self.contract = contract
        self.directory = Path(directory)
        self.sessions = {g: make_session(self.directory / g / "1" / "model.onnx",
                                         provider=provider)
                         for g in (graphs or graphs_for(contract))}

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = graph_io(self.contract, graph)[0]
        return self.sessions[graph].run(None, {n: feeds[n] for n in names})

    def state(self, request: dict[str, np.ndarray]) -> list[np.ndarray]:
        """user_encoder's outputs, in declaration order."""
        return self.run("user_encoder", request)

    def named_state(self, state: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip((s.name for s in self.contract.state), state, strict=True))

    def split(self, request: dict[str, np.ndarray]) -> np.ndarray:
        """user_encoder then target_fusion: what the `ranker` ensemble computes."""
        return self.run("target_fusion", {**request, **self.named_state(self.state(request))})[0]

    def naive(self, request: dict[str, np.ndarray]) -> np.ndarray:
        return self.run("ranker_naive", request)[0]

    def append(self, cached: Sequence[np.ndarray],
               new_events: dict[str, np.ndarray]) -> list[np.ndarray]:
        """user_encoder_append on a whole cached state (each tensor cut as its `append_reads`
        says) and the new events' history features: per state tensor, in declaration order, the
        new events' part (a tensor with an "L" dim) or the new value (the others)."""
        return self.run("user_encoder_append",
                        {**self.contract.cached_reads(cached), **new_events})
