"""Client-side request checks: refuse a bad request with a message that names the tensor.

The server would reject most of these too, but with an opaque ONNX Runtime or ensemble error, or
worse, accept them and return plausible scores (decreasing timestamps, events after the request).
Nothing here fixes input: a request is either sent as it is or refused.
"""

from __future__ import annotations

import numpy as np

from client.contract import (
    CANDIDATE_INPUTS,
    HISTORY_INPUTS,
    HISTORY_TIMESTAMPS,
    REQUEST_TIMESTAMP,
    USER_PROFILE,
    request_inputs,
)
from client.request import RankingRequest, RequestError

# How far a request timestamp may run ahead of the caller's clock (clock skew between hosts).
MAX_FUTURE_SKEW_S = 300

_DTYPES: dict[str, np.dtype] = {s.name: np.dtype(s.np_dtype) for s in request_inputs(1)}


def validate_request(
    req: RankingRequest, profile_dim: int | None = None, now: int | None = None,
    max_candidates: int | None = None,
) -> None:
    """Raise RequestError for the first contract violation in `req`; return None if it is valid.

    `profile_dim` (P of the served model) enables the user_profile length check; `now` (unix
    seconds) enables the "request timestamp not in the future" check (now + MAX_FUTURE_SKEW_S).
    """
    arrays: dict[str, np.ndarray] = {}
    for name, dtype in _DTYPES.items():
        value = getattr(req, name)
        if not isinstance(value, np.ndarray):
            raise RequestError(f"{name}: expected a numpy array, got {type(value).__name__}")
        if value.dtype != dtype:
            raise RequestError(f"{name}: dtype must be {dtype} exactly, got {value.dtype}")
        if name == REQUEST_TIMESTAMP and value.shape != (1,):
            raise RequestError(
                f"{name}: shape must be [1] (one timestamp), got {list(value.shape)}"
            )
        if value.ndim != 1:
            raise RequestError(f"{name}: must be 1-D, got shape {list(value.shape)}")
        arrays[name] = value

    _same_length(arrays, HISTORY_INPUTS, "history")
    _same_length(arrays, CANDIDATE_INPUTS, "candidate")
    n = arrays[CANDIDATE_INPUTS[0]].shape[0]
    if max_candidates is not None and n > max_candidates:
        raise RequestError(
            f"{CANDIDATE_INPUTS[0]}: {n} candidates exceed the served limit of {max_candidates} "
            "per request (parameter max_candidates); split the request"
        )

    profile = arrays[USER_PROFILE]
    if profile_dim is not None and len(profile) != profile_dim:
        raise RequestError(
            f"{USER_PROFILE}: length must be {profile_dim} (the model's profile_dim), "
            f"got {len(profile)}"
        )
    bad = np.flatnonzero(~np.isfinite(profile))
    if len(bad):
        i = int(bad[0])
        raise RequestError(
            f"{USER_PROFILE}: values must be finite, got {profile[i]} at index {i}"
            + (f" ({len(bad)} non-finite values)" if len(bad) > 1 else "")
        )

    timestamps = arrays[HISTORY_TIMESTAMPS]
    request_ts = int(arrays[REQUEST_TIMESTAMP][0])
    drops = np.flatnonzero(timestamps[1:] < timestamps[:-1])
    if len(drops):
        i = int(drops[0]) + 1
        raise RequestError(
            f"{HISTORY_TIMESTAMPS}: must be non-decreasing (oldest first), but "
            f"{HISTORY_TIMESTAMPS}[{i}] = {timestamps[i]} < "
            f"{HISTORY_TIMESTAMPS}[{i - 1}] = {timestamps[i - 1]}"
        )
    late = np.flatnonzero(timestamps > request_ts)
    if len(late):
        i = int(late[0])
        raise RequestError(
            f"{HISTORY_TIMESTAMPS}: event {i} at {timestamps[i]} is after "
            f"{REQUEST_TIMESTAMP} = {request_ts} ({len(late)} such events)"
        )
    if now is not None and request_ts > now + MAX_FUTURE_SKEW_S:
        raise RequestError(
            f"{REQUEST_TIMESTAMP}: {request_ts} is {request_ts - now} s in the future "
            f"(now = {now}, allowed clock skew {MAX_FUTURE_SKEW_S} s)"
        )


def _same_length(arrays: dict[str, np.ndarray], names: tuple[str, ...], group: str) -> None:
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
    "validate_request",
]
