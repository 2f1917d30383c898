"""The ranking request: one user and N candidates as numpy arrays, and its exact JSON form.

The request type alone (no generator, no server): the validation, the gRPC client, the traffic
generator and the benchmarks all build on it. Pure Python + numpy.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.contract import USER_PROFILE, request_inputs


class RequestError(ValueError):
    """A request that breaks the contract; the message names the tensor and the problem."""


INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Contract order of the request tensors (the profile dim does not change names or order).
FIELD_ORDER: tuple[str, ...] = tuple(spec.name for spec in request_inputs(1))
FIELD_DTYPES: dict[str, np.dtype] = {
    spec.name: np.dtype(spec.np_dtype) for spec in request_inputs(1)
}


@dataclass(eq=False)
class RankingRequest:
    """One user (history of L events + dense profile) and N candidates to score.

    Fields hold numpy arrays exactly as they go on the wire; nothing is converted on construction,
    so an invalid request stays invalid and `client.validation.validate_request` can say why.
    """

    history_item_ids: np.ndarray  # int64 [L]
    history_action_ids: np.ndarray  # int64 [L]
    history_timestamps: np.ndarray  # int64 [L], unix seconds, non-decreasing
    candidate_item_ids: np.ndarray  # int64 [N]
    candidate_category_ids: np.ndarray  # int64 [N]
    request_timestamp: np.ndarray  # int64 [1], unix seconds
    user_profile: np.ndarray  # float32 [P]

    @property
    def history_length(self) -> int:
        """L, the number of history events."""
        return _length(self.history_item_ids)

    @property
    def num_candidates(self) -> int:
        """N, the number of candidates (rows of the scores)."""
        return _length(self.candidate_item_ids)

    def as_inputs(self) -> dict[str, np.ndarray]:
        """The request tensors by contract name, in contract order, C-contiguous.

        Raises RequestError when a field is not a numpy array of exactly the contract dtype: a
        silent cast could change ids (float64 -> int64) or precision, so it is refused instead.
        """
        out: dict[str, np.ndarray] = {}
        for name in FIELD_ORDER:
            value = getattr(self, name)
            want = FIELD_DTYPES[name]
            if not isinstance(value, np.ndarray):
                raise RequestError(f"{name}: expected a numpy array, got {type(value).__name__}")
            if value.dtype != want:
                raise RequestError(f"{name}: dtype must be {want}, got {value.dtype}")
            out[name] = np.ascontiguousarray(value)
        return out

    def to_json_dict(self) -> dict[str, list[Any]]:
        """JSON-ready dict: int64 tensors as Python ints (exact for every int64), the profile as
        the shortest decimal that reads back to the same float32 (NaN/inf kept as such)."""
        out: dict[str, list[Any]] = {}
        for name in FIELD_ORDER:
            value = np.asarray(getattr(self, name))
            if value.dtype == np.float32 and value.ndim == 1:
                # str() of a float32 is its shortest round-trip decimal: 0.1, not 0.10000000149.
                out[name] = [float(str(v)) for v in value]
            else:  # exact for int64 (Python ints); keeps invalid dtypes/shapes visible as they are
                out[name] = value.tolist()
        return out

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> RankingRequest:
        """Strict inverse of `to_json_dict`: flat lists of ints (int64 range) for the id/time
        tensors and of numbers for `user_profile`. Anything else raises RequestError naming the
        field; nothing is rounded, truncated or guessed."""
        if not isinstance(data, dict):
            raise RequestError(f"a request must be a JSON object, got {type(data).__name__}")
        missing = [name for name in FIELD_ORDER if name not in data]
        if missing:
            raise RequestError(f"request is missing field(s): {', '.join(missing)}")
        unknown = sorted(set(data) - set(FIELD_ORDER))
        if unknown:
            raise RequestError(
                f"request has unknown field(s): {', '.join(unknown)}; "
                f"expected: {', '.join(FIELD_ORDER)}"
            )
        values = {
            name: _float32_array(name, data[name]) if name == USER_PROFILE
            else _int64_array(name, data[name])
            for name in FIELD_ORDER
        }
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write the request as JSON (one object, contract field order)."""
        Path(path).write_text(json.dumps(self.to_json_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RankingRequest:
        """Read a request written by `save` (or by hand). Raises RequestError on bad content."""
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}: not valid JSON: {e}") from None
        return cls.from_json_dict(data)

    def __eq__(self, other: object) -> bool:
        """Same dtypes, shapes and values (NaN equals NaN in the profile)."""
        if not isinstance(other, RankingRequest):
            return NotImplemented
        for name in FIELD_ORDER:
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if a.dtype != b.dtype or a.shape != b.shape:
                return False
            if not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    def replace(self, **changes: np.ndarray) -> RankingRequest:
        """A copy with some tensors replaced (edge cases and tests build on real requests)."""
        return dataclasses.replace(self, **changes)


def _length(value: Any) -> int:
    shape = np.shape(value)
    return int(shape[0]) if shape else 0


def _int64_array(name: str, value: Any) -> np.ndarray:
    if not isinstance(value, list):
        raise RequestError(f"{name}: expected a list of integers, got {type(value).__name__}")
    for i, v in enumerate(value):
        # bool is an int subclass and floats like 1.0 would be silently truncated: refuse both.
        if type(v) is not int:
            raise RequestError(f"{name}[{i}]: expected an integer, got {v!r}")
        if not INT64_MIN <= v <= INT64_MAX:
            raise RequestError(f"{name}[{i}]: {v} is outside the int64 range")
    return np.array(value, dtype=np.int64).reshape(len(value))


def _float32_array(name: str, value: Any) -> np.ndarray:
    if not isinstance(value, list):
        raise RequestError(f"{name}: expected a list of numbers, got {type(value).__name__}")
    for i, v in enumerate(value):
        if type(v) not in (int, float):
            raise RequestError(f"{name}[{i}]: expected a number, got {v!r}")
    wide = np.array(value, dtype=np.float64).reshape(len(value))
    with np.errstate(over="ignore"):
        narrow = wide.astype(np.float32)
    overflow = np.flatnonzero(np.isinf(narrow) & np.isfinite(wide))
    if len(overflow):
        i = int(overflow[0])
        raise RequestError(f"{name}[{i}]: {value[i]!r} overflows float32")
    return narrow
