"""The split contract: what a model family declares so that it can be served split.

A ranking model is served split when its history can be encoded once per request into a *user
state* that every candidate then reads. The serving side (export, Triton configs, guards, cache,
client) needs to know, for each family, exactly which tensors cross which boundary. This module
is that declaration, in one place. It is pure Python so that the client can read it: the export
writes it, as JSON, into the configs of the models a client calls (config parameter
`split_contract`), so a client needs no model code to build and check a family's requests. The
forwards a model implements (the `SplitModel` protocol) are in export/split_contract.py.

Argument order conventions (what the export and the generic helpers rely on):

* `forward(*features)`: every request feature, in declaration order -> the outputs (naive
  oracle: the history re-encoded for each candidate);
* `encode_user(*history)`: the history features, in declaration order -> the state tensors, in
  declaration order. The user encoder reads the history features only, so the user state is a
  function of the user's events alone: what makes a state cached per user exact;
* `score_candidates(*candidates, *request, *state)`: candidate features, then per-request
  features, then the state tensors -> the outputs, all candidates in one pass;
* `encode_append(*cached, *history)` (appendable families only): what the append reads of the
  state of the P events already encoded (each state tensor as its `append_reads` says, named
  `cached_<name>`), then the history features of ΔL new events -> one tensor per state tensor,
  in declaration order: for a tensor with an "L" dim, the ΔL new events' part only (named
  `new_<name>`; the cache concatenates it after the cached part along L), for one without, its
  new value (named `<name>`; it replaces the cached one). The cached part followed by the new
  part equals `encode_user` on the whole history while P + ΔL <= max_history. So an append moves
  O(ΔL) bytes back, and what it does not attend to (typically the last layer's K/V) never goes in.

In state dims, "L" stands for the *kept* history length, min(L, max_history): a history longer
than max_history keeps its newest events. In feature and output dims, "L" and "N" are the
request's history length and candidate count.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Triton dtype names, as client/contract.TensorSpec uses them.
DTYPES = ("INT64", "INT32", "FP32", "FP16", "BOOL")
HISTORY, CANDIDATES, REQUEST = "history", "candidates", "request"
AXES = {HISTORY: "L", CANDIDATES: "N", REQUEST: None}
# How history tokens may attend: "full" (history sees the candidate, BST-style) cannot be split.
HISTORY_MASKS = ("causal", "bidirectional", "full")
CACHED_PREFIX = "cached_"  # encode_append's inputs: the cached state, renamed
NEW_PREFIX = "new_"  # encode_append's outputs for state tensors with an "L" dim: new events only
# How much of a state tensor encode_append reads: all of it, or all but the last entry of its
# first dim (e.g. every layer's K/V but the last, which no later event of the encoder attends to).
APPEND_READS = ("all", "all_but_last")
# What a feature means, so that a client can generate, edge-case and check any family's requests
# (client/traffic.py, client/validation.py) without knowing its names. role -> (dtypes, axes):
# item: item ids (history: the events' items, candidates: the items to score); category: the
# category of the item on the same axis (needs an item feature there); action: the event type
# of each history event; timestamp: unix seconds (history: non-decreasing, oldest first;
# request: shape (1,), the request time, never before an event); duration: seconds, >= 0 (e.g.
# dwell time); dense: real-valued features. "" declares nothing (the generator fills it by dtype).
INTEGERS, FLOATS = ("INT64", "INT32"), ("FP32", "FP16")
ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "item": (INTEGERS, (HISTORY, CANDIDATES)),
    "category": (INTEGERS, (HISTORY, CANDIDATES)),
    "action": (INTEGERS, (HISTORY,)),
    "timestamp": (INTEGERS, (HISTORY, REQUEST)),
    "duration": (INTEGERS + FLOATS, (HISTORY, CANDIDATES)),
    "dense": (FLOATS, (HISTORY, CANDIDATES, REQUEST)),
}
# Roles that at most one feature per axis may take (the generator and the checks pair them).
SINGLE_ROLES = ("item", "category", "action", "timestamp")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ContractError(ValueError):
    """A declaration the serving stack cannot serve exactly; the message says why."""


@dataclass(frozen=True)
class Feature:
    """One request tensor the client sends.

    `axis` says what its first dim is: HISTORY (one entry per past event, L), CANDIDATES (one
    per item to score, N) or REQUEST (one per request: then `shape` is its whole fixed shape).
    For HISTORY and CANDIDATES features `shape` is the trailing fixed shape (usually empty).
    `event` marks the history features that define a user's events: the user-state cache
    compares these to decide whether a cached state still describes the user. `role` says what
    the feature means (ROLES), so that generic clients can fill and check it."""

    name: str
    dtype: str
    axis: str
    shape: tuple[int, ...] = ()
    event: bool = False
    doc: str = ""
    role: str = ""

    @property
    def dims(self) -> tuple[int | str, ...]:
        """Symbolic dims: ("L",) / ("N",) plus the trailing shape, or the fixed shape."""
        symbol = AXES.get(self.axis)
        return (symbol, *self.shape) if symbol else self.shape


@dataclass(frozen=True)
class StateTensor:
    """One tensor of the user state: produced by encode_user (and encode_append), read by
    score_candidates. `dims` are model constants (positive ints) and at most one "L" (the kept
    history length); a state never depends on N, or it could not be shared by the candidates.

    `append_reads` (appendable families): how much of the cached tensor encode_append reads, one
    of APPEND_READS. "all_but_last" drops the last entry of the first dim, which must then be a
    constant >= 2 (e.g. [layers, ...] K/V: later events never attend to the last layer's)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    doc: str = ""
    append_reads: str = "all"

    @property
    def cached_name(self) -> str:
        """Its name as an input of the append graph (the state read back from the cache)."""
        return CACHED_PREFIX + self.name

    @property
    def grows(self) -> bool:
        """Whether it has an "L" dim: the append returns the new events' part, concatenated
        after the cached one; else the append returns its new value, which replaces it."""
        return "L" in self.dims

    @property
    def new_name(self) -> str:
        """Its name as an output of the append graph: `new_<name>` (the new events' part) when
        it grows, else its own name (its new value)."""
        return NEW_PREFIX + self.name if self.grows else self.name

    @property
    def cached_dims(self) -> tuple[int | str, ...]:
        """The dims of what the append reads."""
        if self.append_reads == "all_but_last":
            return (self.dims[0] - 1, *self.dims[1:])  # type: ignore[operator]
        return self.dims


@dataclass(frozen=True)
class Output:
    """One tensor the model returns per candidate: dims ("N", constants...)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    doc: str = ""


@dataclass(frozen=True)
class SplitContract:
    """A model family's whole serving declaration.

    `history_mask` says what history tokens attend to: "causal" (earlier events only) and
    "bidirectional" (the whole history, never a candidate) split exactly; "full" (history also
    sees the candidate) does not and is refused by `check_contract`. `appendable` means
    `encode_append` exists: exact only under a causal mask, where an event's state never
    depends on later events."""

    family: str
    features: tuple[Feature, ...]
    state: tuple[StateTensor, ...]
    outputs: tuple[Output, ...]
    history_mask: str
    appendable: bool
    max_history: int
    doc: str = ""

    def _on(self, axis: str) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.axis == axis)

    @property
    def history_features(self) -> tuple[Feature, ...]:
        return self._on(HISTORY)

    @property
    def candidate_features(self) -> tuple[Feature, ...]:
        return self._on(CANDIDATES)

    @property
    def request_features(self) -> tuple[Feature, ...]:
        return self._on(REQUEST)

    @property
    def event_features(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.event)

    @property
    def fusion_inputs(self) -> tuple[str, ...]:
        """score_candidates' argument names, in order."""
        return (*(f.name for f in self.candidate_features),
                *(f.name for f in self.request_features), *(s.name for s in self.state))

    @property
    def append_inputs(self) -> tuple[str, ...]:
        """encode_append's argument names, in order (what it reads of the cached state, then the
        new events)."""
        return (*(s.cached_name for s in self.state),
                *(f.name for f in self.history_features))

    def cached_reads(self, state: Sequence[Any]) -> dict[str, Any]:
        """encode_append's cached inputs, by name, from a whole state (one array or tensor per
        state tensor, in declaration order), each cut as its `append_reads` says."""
        return {s.cached_name: value[:-1] if s.append_reads == "all_but_last" else value
                for s, value in zip(self.state, state, strict=True)}

    @property
    def append_outputs(self) -> tuple[str, ...]:
        """encode_append's output names, in state order (new parts, new values)."""
        return tuple(s.new_name for s in self.state)


def _check_dtype(kind: str, name: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ContractError(f"{kind} {name!r}: unknown dtype {dtype!r}; one of {DTYPES}")


def _check_constants(kind: str, name: str, dims: Sequence[int | str],
                     symbols: tuple[str, ...]) -> None:
    for d in dims:
        if isinstance(d, str):
            if d not in symbols:
                allowed = " or ".join(repr(s) for s in symbols) if symbols else "none"
                raise ContractError(
                    f"{kind} {name!r}: dim {d!r} is not a known symbol (allowed here: {allowed}; "
                    "every other dim is a positive model constant)")
        elif isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ContractError(f"{kind} {name!r}: dim {d!r} must be a positive int or a symbol")


def _check_role(f: Feature) -> None:
    if f.role == "":
        return
    if f.role not in ROLES:
        raise ContractError(f"feature {f.name!r}: unknown role {f.role!r}; one of "
                            f"{tuple(ROLES)} or '' (none)")
    dtypes, axes = ROLES[f.role]
    if f.dtype not in dtypes or f.axis not in axes:
        raise ContractError(f"feature {f.name!r}: role {f.role!r} needs dtype in {dtypes} and "
                            f"axis in {axes}, not {f.dtype} on {f.axis}")
    if f.role in SINGLE_ROLES and f.axis != REQUEST and f.shape:
        raise ContractError(f"feature {f.name!r}: role {f.role!r} is one value per "
                            f"{'event' if f.axis == HISTORY else 'candidate'}, so no trailing "
                            f"shape {tuple(f.shape)}")
    if f.role == "timestamp" and f.axis == REQUEST and tuple(f.shape) != (1,):
        raise ContractError(f"feature {f.name!r}: a request timestamp has shape (1,), not "
                            f"{tuple(f.shape)}")


def check_contract(contract: SplitContract) -> SplitContract:
    """Refuse a declaration the serving stack could not serve exactly; returns it unchanged.

    Checks: names are valid tensor names and unique (the append graph's `cached_` names too);
    every feature has a known axis and dtype, REQUEST features a fixed shape; there is at least
    one history and one candidate feature (L and N must come from somewhere) and one output;
    event features are history features; roles fit their dtype and axis (ROLES), at most one
    item/category/action/timestamp per axis, a category beside an item; state dims are
    constants and at most one "L" (never "N"); `append_reads` is known and "all_but_last" has a
    constant first dim >= 2; outputs are per candidate ("N" first); the history mask splits
    exactly; appending is declared only for a causal mask and then needs event features (what
    the cache compares) and a state tensor with an "L" dim (how the append knows P)."""
    c = contract
    if not _NAME.match(c.family):
        raise ContractError(f"family {c.family!r} must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")
    if isinstance(c.max_history, bool) or not isinstance(c.max_history, int) or c.max_history < 1:
        raise ContractError(f"max_history must be a positive int, got {c.max_history!r}")
    names = [f.name for f in c.features] + [s.name for s in c.state] + [o.name for o in c.outputs]
    if c.appendable:
        names += [s.cached_name for s in c.state]
        names += [s.new_name for s in c.state if s.grows]
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ContractError(f"tensor name {name!r} is not a valid name "
                                "([A-Za-z_][A-Za-z0-9_]*)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ContractError(f"tensor names must be unique across features, state and outputs "
                            f"(and the append graph's cached_ inputs and new_ outputs): "
                            f"{duplicates} repeat")
    for f in c.features:
        if f.axis not in AXES:
            raise ContractError(f"feature {f.name!r}: unknown axis {f.axis!r}; one of "
                                f"{tuple(AXES)}")
        _check_dtype("feature", f.name, f.dtype)
        _check_constants("feature", f.name, f.shape, ())
        if f.axis == REQUEST and not f.shape:
            raise ContractError(f"feature {f.name!r}: a per-request feature needs a fixed shape "
                                "(for one value: (1,))")
        if f.event and f.axis != HISTORY:
            raise ContractError(f"feature {f.name!r}: only history features can define a user's "
                                f"events, not a {f.axis} feature")
        _check_role(f)
    for axis in AXES:
        for role in SINGLE_ROLES:
            taken = [f.name for f in c.features if f.axis == axis and f.role == role]
            if len(taken) > 1:
                raise ContractError(f"features {taken}: at most one {axis} feature may have "
                                    f"role {role!r}")
        if any(f.role == "category" for f in c._on(axis)) and \
                not any(f.role == "item" for f in c._on(axis)):
            raise ContractError(f"a {axis} feature has role 'category' but no {axis} feature "
                                "has role 'item' (a category is the category of an item)")
    if not c.history_features:
        raise ContractError("no history feature: nothing defines L or the user state")
    if not c.candidate_features:
        raise ContractError("no candidate feature: nothing defines N, the candidates to score")
    if not c.state:
        raise ContractError("no user state tensor: encode_user must produce something that "
                            "score_candidates reads")
    for s in c.state:
        _check_dtype("state tensor", s.name, s.dtype)
        if "N" in s.dims:
            raise ContractError(f"state tensor {s.name!r} depends on N: the user state is "
                                "computed once per user and shared by every candidate")
        _check_constants("state tensor", s.name, s.dims, ("L",))
        if list(s.dims).count("L") > 1:
            raise ContractError(f"state tensor {s.name!r}: at most one dim may be 'L'")
        if s.append_reads not in APPEND_READS:
            raise ContractError(f"state tensor {s.name!r}: append_reads {s.append_reads!r}; one "
                                f"of {APPEND_READS}")
        if s.append_reads == "all_but_last" and not (
                s.dims and isinstance(s.dims[0], int) and s.dims[0] >= 2):
            raise ContractError(
                f"state tensor {s.name!r}: append_reads 'all_but_last' drops the last entry of "
                f"the first dim, which must be a constant >= 2 (dims {s.dims}); read 'all' "
                "instead")
    if not c.outputs:
        raise ContractError("no output: score_candidates must return per-candidate scores")
    for o in c.outputs:
        _check_dtype("output", o.name, o.dtype)
        if not o.dims or o.dims[0] != "N":
            raise ContractError(f"output {o.name!r}: dims {o.dims} must start with 'N' "
                                "(one row per candidate)")
        _check_constants("output", o.name, o.dims[1:], ())
    if c.history_mask not in HISTORY_MASKS:
        raise ContractError(f"history_mask {c.history_mask!r}: one of {HISTORY_MASKS}")
    if c.history_mask == "full":
        raise ContractError(
            f"{c.family}: history_mask 'full' lets history tokens attend to the candidate, so "
            "from the second layer on every history state depends on which candidate is scored: "
            "a user state computed once and shared by all candidates would give different "
            "(wrong) scores from the naive model. Restrict history attention to the history "
            "(causal or bidirectional), or serve the naive model only.")
    if c.appendable and c.history_mask != "causal":
        raise ContractError(
            f"{c.family}: appendable needs a causal history mask, not {c.history_mask!r}: with "
            "a bidirectional history every event's state depends on later events, so new "
            "events cannot be appended to a cached state")
    if c.appendable and not c.event_features:
        raise ContractError(f"{c.family}: appendable but no history feature is marked event=True "
                            "(the cache compares them to find what is new)")
    if c.appendable and not any(s.grows for s in c.state):
        raise ContractError(f"{c.family}: appendable but no state tensor has an 'L' dim, so "
                            "nothing tells the append how many events are cached (P: the new "
                            "events' positions, and the max_history bound)")
    return contract


# The config parameter that carries a model's declaration (JSON) to clients and the cache.
CONTRACT_PARAMETER = "split_contract"


def contract_to_json(contract: SplitContract) -> str:
    """The declaration as compact JSON (what the export writes into config parameters)."""
    return json.dumps(asdict(contract), separators=(",", ":"), sort_keys=True)


def contract_from_dict(data: dict[str, Any]) -> SplitContract:
    """The inverse of `asdict`: tuples restored, then checked (a bad declaration is refused with
    check_contract's reason, whoever wrote it)."""
    try:
        features = tuple(Feature(**{**f, "shape": tuple(f.get("shape", ()))})
                         for f in data["features"])
        state = tuple(StateTensor(**{**s, "dims": tuple(s["dims"])}) for s in data["state"])
        outputs = tuple(Output(**{**o, "dims": tuple(o["dims"])}) for o in data["outputs"])
        rest = {k: v for k, v in data.items() if k not in ("features", "state", "outputs")}
        return check_contract(SplitContract(features=features, state=state, outputs=outputs,
                                            **rest))
    except (KeyError, TypeError) as e:
        raise ContractError(f"not a split contract declaration: {e}") from e


def contract_from_json(text: str) -> SplitContract:
    """A declaration read back from `contract_to_json`'s text."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ContractError(f"split contract is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ContractError("split contract JSON must be an object")
    return contract_from_dict(data)
