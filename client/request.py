"""The ranking request of any model family: feature name -> numpy array, laid out by the family's
declared features (client/split_contract.py), and its exact JSON form.

The request type alone (no generator, no server): the validation, the gRPC client, the traffic
generator and the benchmarks all build on it. A client gets the declaration from the server
(RankerClient.model_info(...).contract), so nothing here names a family's features. Pure Python +
numpy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.split_contract import CANDIDATES, HISTORY, Feature, SplitContract


class RequestError(ValueError):
    """A request that breaks the contract; the message names the tensor and the problem."""


INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Declared dtype -> the numpy dtype a request tensor must have exactly.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "INT64": np.dtype(np.int64), "INT32": np.dtype(np.int32), "FP32": np.dtype(np.float32),
    "FP16": np.dtype(np.float16), "BOOL": np.dtype(np.bool_),
}

Declared = SplitContract | Sequence[Feature]


def features_of(declared: Declared) -> tuple[Feature, ...]:
    """The request features of a declaration (a whole SplitContract or its features)."""
    return tuple(declared.features if isinstance(declared, SplitContract) else declared)


def feature_with(layout: Sequence[Feature], role: str, axis: str) -> Feature | None:
    """The feature of `layout` with this role on this axis (roles are unique per axis)."""
    return next((f for f in layout if f.role == role and f.axis == axis), None)


class RankingRequest:
    """One user (the history features, L events, and per-request features) and N candidates.

    `features` holds numpy arrays by name, in declaration order, exactly as they go on the wire;
    nothing is converted on construction, so an invalid request stays invalid and
    `client.validation.validate_request` can say why (`client.validation.build_request`
    converts lists and other dtypes safely first). A feature reads as an attribute too
    (`req.<feature name>`).
    """

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    def __init__(self, declared: Declared, values: Mapping[str, Any]) -> None:
        layout = features_of(declared)
        names = [f.name for f in layout]
        _check_names(names, values)
        self.layout: tuple[Feature, ...] = layout
        self.features: dict[str, Any] = {name: values[name] for name in names}

    def __getattr__(self, name: str) -> Any:
        features = self.__dict__.get("features")
        if features is not None and name in features:
            return features[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or feature {name!r}")

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={list(np.shape(v))}" for k, v in self.features.items())
        return f"RankingRequest({shapes})"

    def _first(self, axis: str) -> Feature:
        return next(f for f in self.layout if f.axis == axis)

    @property
    def history_length(self) -> int:
        """L, the number of history events (length of the first history feature)."""
        return _length(self.features[self._first(HISTORY).name])

    @property
    def num_candidates(self) -> int:
        """N, the number of candidates (rows of the scores)."""
        return _length(self.features[self._first(CANDIDATES).name])

    @property
    def candidate_id_feature(self) -> Feature:
        """What names each candidate: the candidate feature with role "item", else the first
        candidate feature."""
        return feature_with(self.layout, "item", CANDIDATES) or self._first(CANDIDATES)

    @property
    def candidate_ids(self) -> np.ndarray:
        """The values of `candidate_id_feature`, one per candidate."""
        return self.features[self.candidate_id_feature.name]

    def as_inputs(self) -> dict[str, np.ndarray]:
        """The request tensors by name, in declaration order, C-contiguous.

        Raises RequestError when a feature is not a numpy array of exactly the declared dtype: a
        silent cast could change ids (float64 -> int64) or precision, so it is refused instead.
        """
        out: dict[str, np.ndarray] = {}
        for f in self.layout:
            value = self.features[f.name]
            want = NUMPY_DTYPES[f.dtype]
            if not isinstance(value, np.ndarray):
                raise RequestError(f"{f.name}: expected a numpy array, got {type(value).__name__}")
            if value.dtype != want:
                raise RequestError(f"{f.name}: dtype must be {want}, got {value.dtype}")
            out[f.name] = np.ascontiguousarray(value)
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready dict: integers as Python ints (exact for every int64), floats as the
        shortest decimal that reads back to the same float32/float16 (NaN/inf kept as such)."""
        return {name: _json_value(np.asarray(value)) for name, value in self.features.items()}

    @classmethod
    def from_json_dict(cls, declared: Declared, data: Any) -> RankingRequest:
        """Strict inverse of `to_json_dict` for the declared features: nested lists of ints
        (in the dtype's range) for integer features, of numbers for float features, of
        booleans for BOOL ones. Anything else raises RequestError naming the feature; nothing
        is rounded, truncated or guessed."""
        layout = features_of(declared)
        if not isinstance(data, dict):
            raise RequestError(f"a request must be a JSON object, got {type(data).__name__}")
        _check_names([f.name for f in layout], data)
        return cls(layout, {f.name: from_python(f, data[f.name]) for f in layout})

    def save(self, path: str | Path) -> None:
        """Write the request as JSON (one object, declaration order)."""
        Path(path).write_text(json.dumps(self.to_json_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path, declared: Declared) -> RankingRequest:
        """Read a request written by `save` (or by hand) for the declared features. Raises
        RequestError on bad content."""
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}: not valid JSON: {e}") from None
        return cls.from_json_dict(declared, data)

    def __eq__(self, other: object) -> bool:
        """Same feature names, dtypes, shapes and values (NaN equals NaN)."""
        if not isinstance(other, RankingRequest):
            return NotImplemented
        if list(self.features) != list(other.features):
            return False
        for name, value in self.features.items():
            a, b = np.asarray(value), np.asarray(other.features[name])
            if a.dtype != b.dtype or a.shape != b.shape:
                return False
            if not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                return False
        return True

    def replace(self, **changes: Any) -> RankingRequest:
        """A copy with some features replaced (edge cases and tests build on real requests)."""
        unknown = sorted(set(changes) - set(self.features))
        if unknown:
            raise RequestError(f"no such feature(s): {', '.join(unknown)}; the request has: "
                               f"{', '.join(self.features)}")
        return RankingRequest(self.layout, {**self.features, **changes})

    def candidates(self, start: int, stop: int) -> RankingRequest:
        """The same request with candidates [start, stop) only (every candidate feature
        sliced; candidates never see each other, so their scores do not change)."""
        return self.replace(**{f.name: self.features[f.name][start:stop]
                               for f in self.layout if f.axis == CANDIDATES})


def _check_names(names: list[str], values: Mapping[str, Any]) -> None:
    missing = [name for name in names if name not in values]
    if missing:
        raise RequestError(f"request is missing field(s): {', '.join(missing)}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise RequestError(f"request has unknown field(s): {', '.join(unknown)}; "
                           f"expected: {', '.join(names)}")


def _length(value: Any) -> int:
    shape = np.shape(value)
    return int(shape[0]) if shape else 0


def _json_value(value: np.ndarray) -> Any:
    if value.dtype.kind == "f" and value.ndim >= 1:
        # str() of a float32 is its shortest round-trip decimal: 0.1, not 0.10000000149.
        if value.ndim == 1:
            return [float(str(v)) for v in value]
        return [_json_value(row) for row in value]
    return value.tolist()  # exact for integers; keeps invalid dtypes/shapes visible as they are


# --------------------------------------------------------------------------- safe conversion
_WHAT = {"i": ("integer", "integers"), "f": ("number", "numbers"), "b": ("boolean", "booleans")}


def _scalar_ok(kind: str, v: Any) -> bool:
    if kind == "i":  # bool is an int subclass and 1.0 would be truncated silently: refuse both
        return (type(v) is int or isinstance(v, np.integer)) and not isinstance(v, np.bool_)
    if kind == "f":
        return type(v) in (int, float) or isinstance(v, np.integer | np.floating)
    return type(v) is bool or isinstance(v, np.bool_)


def from_python(feature: Feature, value: Any) -> np.ndarray:
    """A feature from nested Python lists (JSON), exactly: as many list levels as its declared
    dims, scalars of its kind, integers in the dtype's range, floats that fit. RequestError
    naming the element otherwise."""
    want = NUMPY_DTYPES[feature.dtype]
    kind = "i" if want.kind in "iu" else want.kind
    one, many = _WHAT[kind]
    ndim = len(feature.dims)

    def walk(v: Any, path: str, depth: int) -> None:
        if depth < ndim:
            if not isinstance(v, list | tuple):
                raise RequestError(f"{feature.name}{path}: expected a list of {many}, got "
                                   f"{type(v).__name__}")
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]", depth + 1)
            return
        if not _scalar_ok(kind, v):
            raise RequestError(f"{feature.name}{path}: expected {'an' if kind == 'i' else 'a'} "
                               f"{one}, got {v!r}")
        if kind == "i" and not int(np.iinfo(want).min) <= int(v) <= int(np.iinfo(want).max):
            raise RequestError(f"{feature.name}{path}: {v} is outside the {want} range")

    walk(value, "", 0)
    trailing = tuple(d for d in feature.dims[1:] if isinstance(d, int))
    if feature.dims and isinstance(feature.dims[0], str) and len(value) == 0:
        return np.zeros((0, *trailing), dtype=want)
    shaped = np.array(value, dtype=object)
    if shaped.ndim != ndim:
        raise RequestError(f"{feature.name}: ragged nested lists, not a {ndim}-D array")
    if kind != "f":
        return np.array(value, dtype=want).reshape(shaped.shape)
    try:
        wide = np.array(value, dtype=np.float64).reshape(shaped.shape)
    except OverflowError:
        raise RequestError(f"{feature.name}: a number too large for {want}") from None
    return _narrow(feature.name, wide, want)


def _narrow(name: str, wide: np.ndarray, want: np.dtype) -> np.ndarray:
    """`wide` as the float dtype `want`; RequestError naming the first finite value that would
    become infinite."""
    with np.errstate(over="ignore"):
        narrow = wide.astype(want)
    overflow = np.argwhere(np.isinf(narrow) & np.isfinite(wide))
    if len(overflow):
        at = tuple(int(i) for i in overflow[0])
        path = "".join(f"[{i}]" for i in at)
        raise RequestError(f"{name}{path}: {wide[at]!r} overflows {want}")
    return narrow


def from_array(feature: Feature, value: np.ndarray) -> np.ndarray:
    """A feature from a numpy array of another dtype, converted only where nothing changes:
    integers to a wider or fitting integer dtype, integers or floats to the declared float
    (overflow refused), booleans to BOOL. Floats are never truncated to ids."""
    want = NUMPY_DTYPES[feature.dtype]
    have = value.dtype
    if have == want:
        return value
    if want.kind in "iu" and have.kind in "iu":
        if value.size:
            low, high = int(value.min()), int(value.max())
            info = np.iinfo(want)
            if low < info.min or high > info.max:
                bad = low if low < info.min else high
                raise RequestError(f"{feature.name}: {bad} is outside the {want} range")
        return value.astype(want)
    if want.kind == "f" and have.kind in "iuf":
        return _narrow(feature.name, value, want)
    if want.kind == "b" and have.kind == "b":
        return value.astype(want)
    raise RequestError(f"{feature.name}: cannot convert {have} to the declared {want} without "
                       "changing values (" + ("a cast would truncate floats to integers"
                                              if have.kind == "f" else "another kind of data")
                       + ")")


def convert_feature(feature: Feature, value: Any) -> np.ndarray:
    """One feature as the declared numpy dtype: from an array (from_array) or nested Python
    lists (from_python)."""
    if isinstance(value, np.ndarray | np.generic):
        return from_array(feature, np.asarray(value))
    return from_python(feature, value)
