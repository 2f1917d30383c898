"""Client-side request checks: refuse a bad request with a message that names the tensor.

The checks come from the family's declaration (client/split_contract.py): each feature's dtype
and dims (history features one length L, candidate features one length N, per-request features
their fixed shape), and what the roles mean: float features finite, history timestamps
non-decreasing and not after the request timestamp, the request not in the future. The server
would reject most of these too, but with an opaque ONNX Runtime or ensemble error, or worse,
accept them and return plausible scores (decreasing timestamps, events after the request).
Nothing here fixes input: a request is either sent as it is or refused (`build_request`
converts a feature dict to the declared dtypes first, only where no value changes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from client.request import (
    NUMPY_DTYPES,
    Declared,
    RankingRequest,
    RequestError,
    convert_feature,
    feature_with,
    features_of,
)
from client.split_contract import CANDIDATES, HISTORY, REQUEST, Feature

# How far a request timestamp may run ahead of the caller's clock (clock skew between hosts).
MAX_FUTURE_SKEW_S = 300


def build_request(declared: Declared, values: Mapping[str, Any], now: int | None = None,
                  max_candidates: int | None = None) -> RankingRequest:
    """A checked request from a feature dict (name -> array or nested lists): each feature
    converted to its declared dtype where no value changes (convert_feature), then
    `validate_request`. RequestError naming the feature otherwise."""
    layout = features_of(declared)
    RankingRequest(layout, values)  # the names first: a missing feature is named as such
    request = RankingRequest(layout, {f.name: convert_feature(f, values[f.name]) for f in layout})
    validate_request(request, layout, now=now, max_candidates=max_candidates)
    return request


def validate_request(
    req: RankingRequest, declared: Declared | None = None, now: int | None = None,
    max_candidates: int | None = None,
) -> None:
    """Raise RequestError for the first violation of the declaration in `req`; return None if
    it is valid.

    `declared` is the declaration to check against (the served model's; default the request's
    own layout). `now` (unix seconds) enables the "request timestamp not in the future" check
    (now + MAX_FUTURE_SKEW_S), `max_candidates` the served limit on N.
    """
    layout = features_of(declared) if declared is not None else req.layout
    names = [f.name for f in layout]
    missing = [n for n in names if n not in req.features]
    if missing:
        raise RequestError(f"request lacks feature(s) {', '.join(missing)} that the model "
                           f"declares (it takes: {', '.join(names)})")
    extra = [n for n in req.features if n not in names]
    if extra:
        raise RequestError(f"request has feature(s) {', '.join(extra)} that the model does not "
                           f"declare (it takes: {', '.join(names)})")
    arrays: dict[str, np.ndarray] = {}
    for f in layout:
        arrays[f.name] = _checked_array(f, req.features[f.name])

    history = [f.name for f in layout if f.axis == HISTORY]
    candidates = [f.name for f in layout if f.axis == CANDIDATES]
    _same_length(arrays, history, "history")
    _same_length(arrays, candidates, "candidate")
    n = arrays[candidates[0]].shape[0] if candidates else 0
    if max_candidates is not None and n > max_candidates:
        raise RequestError(
            f"{candidates[0]}: {n} candidates exceed the served limit of {max_candidates} "
            "per request (parameter max_candidates); split the request"
        )
    for f in layout:
        if f.dtype in ("FP32", "FP16"):
            _finite(f.name, arrays[f.name])
    _check_times(layout, arrays, now)


def _checked_array(f: Feature, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise RequestError(f"{f.name}: expected a numpy array, got {type(value).__name__}")
    want = NUMPY_DTYPES[f.dtype]
    if value.dtype != want:
        raise RequestError(f"{f.name}: dtype must be {want} exactly, got {value.dtype}")
    dims = f.dims
    fits = value.ndim == len(dims) and all(
        isinstance(d, str) or d == got for d, got in zip(dims, value.shape, strict=True))
    if not fits:
        raise RequestError(f"{f.name}: shape must be [{', '.join(map(str, dims))}] "
                           f"({len(dims)}-D), got {list(value.shape)}")
    return value


def _finite(name: str, values: np.ndarray) -> None:
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        at = tuple(int(i) for i in bad[0])
        where = at[0] if len(at) == 1 else list(at)
        raise RequestError(
            f"{name}: values must be finite, got {values[at]} at index {where}"
            + (f" ({len(bad)} non-finite values)" if len(bad) > 1 else "")
        )


def _check_times(layout: Sequence[Feature], arrays: dict[str, np.ndarray],
                 now: int | None) -> None:
    """The timestamp role: history oldest first, no event after the request, the request not
    in the future."""
    history = feature_with(layout, "timestamp", HISTORY)
    request = feature_with(layout, "timestamp", REQUEST)
    if history is not None:
        timestamps = arrays[history.name]
        drops = np.flatnonzero(timestamps[1:] < timestamps[:-1])
        if len(drops):
            i = int(drops[0]) + 1
            raise RequestError(
                f"{history.name}: must be non-decreasing (oldest first), but "
                f"{history.name}[{i}] = {timestamps[i]} < "
                f"{history.name}[{i - 1}] = {timestamps[i - 1]}"
            )
    if request is None:
        return
    request_ts = int(arrays[request.name][0])
    if history is not None:
        late = np.flatnonzero(arrays[history.name] > request_ts)
        if len(late):
            i = int(late[0])
            raise RequestError(
                f"{history.name}: event {i} at {arrays[history.name][i]} is after "
                f"{request.name} = {request_ts} ({len(late)} such events)"
            )
    if now is not None and request_ts > now + MAX_FUTURE_SKEW_S:
        raise RequestError(
            f"{request.name}: {request_ts} is {request_ts - now} s in the future "
            f"(now = {now}, allowed clock skew {MAX_FUTURE_SKEW_S} s)"
        )


def _same_length(arrays: dict[str, np.ndarray], names: list[str], group: str) -> None:
    if not names:
        return
    first = names[0]
    for name in names[1:]:
        if len(arrays[name]) != len(arrays[first]):
            raise RequestError(
                f"{group} tensors disagree in length: {first} has {len(arrays[first])} "
                f"but {name} has {len(arrays[name])} (all {group} tensors must have the same "
                f"length)"
            )


__all__ = [
    "MAX_FUTURE_SKEW_S",
    "RequestError",
    "build_request",
    "validate_request",
]
