"""The split contract: what a model family declares so that it can be served split.

A ranking model is served split when its history can be encoded once per request into a *user
state* that every candidate then reads. The serving side (export, Triton configs, guards, cache,
client) needs to know, for each family, exactly which tensors cross which boundary. This module
is that declaration, in one place, plus the `SplitModel` protocol the model's forwards follow.

Argument order conventions (what the export and the generic helpers below rely on):

* `forward(*features)`: every request feature, in declaration order -> the outputs (naive
  oracle: the history re-encoded for each candidate);
* `encode_user(*history)`: the history features, in declaration order -> the state tensors, in
  declaration order. The user encoder reads the history features only, so the user state is a
  function of the user's events alone: what makes a state cached per user exact;
* `score_candidates(*candidates, *request, *state)`: candidate features, then per-request
  features, then the state tensors -> the outputs, all candidates in one pass;
* `encode_append(*state, *history)` (appendable families only): the state of the P events
  already encoded plus the history features of ΔL new events -> the state of all P + ΔL events,
  equal to `encode_user` on the whole history while P + ΔL <= max_history.

In state dims, "L" stands for the *kept* history length, min(L, max_history): a history longer
than max_history keeps its newest events. In feature and output dims, "L" and "N" are the
request's history length and candidate count.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

# Triton dtype names, as client/contract.TensorSpec uses them.
DTYPES = ("INT64", "INT32", "FP32", "FP16", "BOOL")
HISTORY, CANDIDATES, REQUEST = "history", "candidates", "request"
AXES = {HISTORY: "L", CANDIDATES: "N", REQUEST: None}
# How history tokens may attend: "full" (history sees the candidate, BST-style) cannot be split.
HISTORY_MASKS = ("causal", "bidirectional", "full")
CACHED_PREFIX = "cached_"  # encode_append's inputs: the cached state, renamed
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
    compares these to decide whether a cached state still describes the user."""

    name: str
    dtype: str
    axis: str
    shape: tuple[int, ...] = ()
    event: bool = False
    doc: str = ""

    @property
    def dims(self) -> tuple[int | str, ...]:
        """Symbolic dims: ("L",) / ("N",) plus the trailing shape, or the fixed shape."""
        symbol = AXES.get(self.axis)
        return (symbol, *self.shape) if symbol else self.shape


@dataclass(frozen=True)
class StateTensor:
    """One tensor of the user state: produced by encode_user (and encode_append), read by
    score_candidates. `dims` are model constants (positive ints) and at most one "L" (the kept
    history length); a state never depends on N, or it could not be shared by the candidates."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    doc: str = ""

    @property
    def cached_name(self) -> str:
        """Its name as an input of the append graph (the state read back from the cache)."""
        return CACHED_PREFIX + self.name


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
        """encode_append's argument names, in order (cached state, then the new events)."""
        return (*(s.cached_name for s in self.state),
                *(f.name for f in self.history_features))


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


def check_contract(contract: SplitContract) -> SplitContract:
    """Refuse a declaration the serving stack could not serve exactly; returns it unchanged.

    Checks: names are valid tensor names and unique (the append graph's `cached_` names too);
    every feature has a known axis and dtype, REQUEST features a fixed shape; there is at least
    one history and one candidate feature (L and N must come from somewhere) and one output;
    event features are history features; state dims are constants and at most one "L" (never
    "N"); outputs are per candidate ("N" first); the history mask splits exactly; appending is
    declared only for a causal mask and then needs event features (what the cache compares)."""
    c = contract
    if not _NAME.match(c.family):
        raise ContractError(f"family {c.family!r} must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")
    if isinstance(c.max_history, bool) or not isinstance(c.max_history, int) or c.max_history < 1:
        raise ContractError(f"max_history must be a positive int, got {c.max_history!r}")
    names = [f.name for f in c.features] + [s.name for s in c.state] + [o.name for o in c.outputs]
    names += [s.cached_name for s in c.state] if c.appendable else []
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ContractError(f"tensor name {name!r} is not a valid name "
                                "([A-Za-z_][A-Za-z0-9_]*)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ContractError(f"tensor names must be unique across features, state and outputs "
                            f"(and the append graph's cached_ inputs): {duplicates} repeat")
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
    return contract


@runtime_checkable
class SplitModel(Protocol):
    """A model family that can be served split (argument orders: module docstring)."""

    def contract(self) -> SplitContract:
        """The family's declaration (check it with `check_contract`)."""
        ...

    def forward(self, *features: Tensor) -> Tensor:
        """Naive oracle: every request feature in declaration order -> scores."""
        ...

    def encode_user(self, *history: Tensor) -> tuple[Tensor, ...]:
        """History features -> the user state tensors."""
        ...

    def score_candidates(self, *inputs: Tensor) -> Tensor:
        """Candidate features, request features, state tensors -> scores, one pass."""
        ...

    def encode_append(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """Cached state + new events' history features -> the state of all events. Families
        that are not appendable raise instead."""
        ...


def split_scores(model: SplitModel, request: dict[str, Tensor]) -> Tensor:
    """encode_user then score_candidates on a request given by feature name: what the ensemble
    computes, in torch."""
    contract = model.contract()
    state = model.encode_user(*(request[f.name] for f in contract.history_features))
    return model.score_candidates(
        *(request[f.name] for f in (*contract.candidate_features, *contract.request_features)),
        *state)


def naive_scores(model: SplitModel, request: dict[str, Tensor]) -> Tensor:
    """The naive oracle on a request given by feature name."""
    return model.forward(*(request[f.name] for f in model.contract().features))


def reference_contract(cfg) -> SplitContract:
    """The reference `RankingTransformer` (export/model.py) as one declaration, built from the
    request contract it is served with (client/contract.py), so the two cannot drift apart.

    `cfg` is its export.config.ModelConfig. The mask "full" is described too (a naive-only
    model); `check_contract` refuses it with the reason."""
    from client import contract as cc

    axis = {**dict.fromkeys(cc.HISTORY_INPUTS, HISTORY),
            **dict.fromkeys(cc.CANDIDATE_INPUTS, CANDIDATES)}
    features = tuple(
        Feature(s.name, s.dtype, axis.get(s.name, REQUEST),
                () if s.name in axis else tuple(s.dims), event=s.name in cc.HISTORY_INPUTS,
                doc=s.doc)
        for s in cc.request_inputs(cfg.profile_dim))
    kv = cc.user_kv_spec(cfg.num_layers, cfg.num_heads, cfg.head_dim)
    last = cc.last_event_timestamp_spec()
    scores = cc.scores_output(cfg.num_tasks)
    return SplitContract(
        family="reference",
        features=features,
        state=(StateTensor(kv.name, kv.dtype, tuple("L" if d == -1 else d for d in kv.dims),
                           kv.doc),
               StateTensor(last.name, last.dtype, tuple(last.dims), last.doc)),
        outputs=(Output(scores.name, scores.dtype, ("N", *scores.dims[1:]), scores.doc),),
        history_mask=cfg.mask,
        # Its append graph (user_encoder_append) reads the cached K/V of every layer but the last
        # and returns only the new events' K/V, so the cache moves O(ΔL) bytes back: a form this
        # declaration (whole state in, whole state out) does not express yet.
        appendable=False,
        max_history=cfg.max_history,
        doc="target-item + history ranking transformer with softmax attention (export/model.py)",
    )


class ReferenceSplitModel(nn.Module):
    """`RankingTransformer` seen through the SplitModel protocol, its code unchanged: its
    forwards already take the protocol's argument orders; this adds `contract()`. A module
    itself, so that an export traces its weights as weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def contract(self) -> SplitContract:
        return reference_contract(self.model.cfg)

    def forward(self, *features: Tensor) -> Tensor:
        return self.model(*features)

    def encode_user(self, *history: Tensor) -> tuple[Tensor, ...]:
        return self.model.encode_user(*history)

    def score_candidates(self, *inputs: Tensor) -> Tensor:
        return self.model.score_candidates(*inputs)

    def encode_append(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError(
            "the reference model's append returns only the new events' K/V "
            "(RankingTransformer.encode_append); its declaration says appendable=False")
