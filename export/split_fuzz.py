"""Requests built from a declaration, and a family's exported graphs run in ONNX Runtime: what
the conformance check (`python -m export.check`) and the tests share.

Request values come from the declared dtype and axis alone, so any family gets them: integer
ids over the whole range of their dtype (both extremes in every tensor of two entries or more,
the cases a hash table or a cast gets wrong), floats from a normal distribution (negative values
included), booleans at random. One hint is read from the names: an integer feature whose name
ends in `timestamp` or `timestamps` holds unix seconds, so its values are drawn as a real
history is - non-decreasing along the history, the request's (and candidates') time at or after
the newest event - with gaps from 0 seconds to weeks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from export.runtime import make_session
from export.split_contract import CANDIDATES, HISTORY, Feature, SplitContract
from export.split_export import graph_io, graphs_for

TIMESTAMP_SUFFIXES = ("timestamp", "timestamps")
# Seconds between consecutive events: same second, seconds, minutes, an hour, a day, weeks.
GAPS = (0, 1, 5, 70, 3_600, 90_000, 2_000_000)
EPOCH = 1_600_000_000
_NUMPY = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP16": np.float16,
          "BOOL": np.bool_}


def is_timestamp(feature: Feature) -> bool:
    """Whether a feature holds unix seconds (the naming hint above)."""
    return feature.dtype in ("INT64", "INT32") and feature.name.endswith(TIMESTAMP_SUFFIXES)


def _ids(rng: np.random.Generator, size: Sequence[int], dtype: str) -> np.ndarray:
    info = np.iinfo(_NUMPY[dtype])
    out = rng.integers(info.min, info.max, size, dtype=_NUMPY[dtype], endpoint=True)
    flat = out.reshape(-1)
    flat[:2] = (info.min, info.max)[:flat.size]
    return out


def random_request(contract: SplitContract, rng: np.random.Generator, length: int, n: int,
                   gaps: Sequence[int] = GAPS) -> dict[str, np.ndarray]:
    """One request of `length` history events and `n` candidates, every declared feature."""
    sizes = {HISTORY: length, CANDIDATES: n}
    history_times = EPOCH + np.cumsum(rng.choice(gaps, size=length)).astype(np.int64)
    newest = int(history_times[-1]) if length else EPOCH
    request: dict[str, np.ndarray] = {}
    for f in contract.features:
        size = [sizes[f.axis], *f.shape] if f.axis in sizes else list(f.shape)
        if is_timestamp(f):
            if f.axis == HISTORY:
                values = np.broadcast_to(history_times.reshape(-1, *([1] * len(f.shape))), size)
            else:
                values = newest + rng.integers(0, 10_000, size)
            request[f.name] = np.array(values, dtype=_NUMPY[f.dtype])  # a writable copy
        elif f.dtype in ("INT64", "INT32"):
            request[f.name] = _ids(rng, size, f.dtype)
        elif f.dtype == "BOOL":
            request[f.name] = rng.random(size) < 0.5
        else:
            request[f.name] = (rng.standard_normal(size) * 3).astype(_NUMPY[f.dtype])
    return request


def as_torch(request: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in request.items()}


def history_slice(contract: SplitContract, request: dict[str, np.ndarray],
                  part: slice) -> dict[str, np.ndarray]:
    """The request's history features cut to `part` (e.g. the cached prefix, the new events)."""
    return {f.name: request[f.name][part] for f in contract.history_features}


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference (float64); NaN when either side has one (fails any `<=`)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))


class SplitGraphs:
    """A family's exported graphs (directory/<graph>/1/model.onnx) run with the project's ONNX
    Runtime settings; inputs are picked from a request by the declaration's names."""

    def __init__(self, contract: SplitContract, directory: Path,
                 graphs: Sequence[str] | None = None) -> None:
        self.contract = contract
        self.directory = Path(directory)
        self.sessions = {g: make_session(self.directory / g / "1" / "model.onnx")
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
        """user_encoder_append: the cached state plus the new events' history features."""
        feeds = {s.cached_name: t for s, t in zip(self.contract.state, cached, strict=True)}
        return self.run("user_encoder_append", {**feeds, **new_events})
