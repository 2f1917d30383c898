"""The forwards a split-served model family implements (`SplitModel`), and the reference model
seen through them. The declaration itself (what crosses each boundary) is torch-free and lives in
client/split_contract.py, re-exported here for the export's convenience."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from client.split_contract import (  # noqa: F401  (re-exported)
    APPEND_READS,
    AXES,
    CACHED_PREFIX,
    CANDIDATES,
    CONTRACT_PARAMETER,
    DTYPES,
    HISTORY,
    HISTORY_MASKS,
    NEW_PREFIX,
    REQUEST,
    ContractError,
    Feature,
    Output,
    SplitContract,
    StateTensor,
    check_contract,
    contract_from_json,
    contract_to_json,
)


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
        """What the append reads of the cached state + the new events' history features -> per
        state tensor the new events' part (tensors with an "L" dim) or the new value (the
        others). Families that are not appendable raise instead."""
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
    names and specs it is served with (export/reference_features.py), so the two cannot drift
    apart.

    `cfg` is its export.config.ModelConfig. The mask "full" is described too (a naive-only
    model); `check_contract` refuses it with the reason."""
    from export import reference_features as cc

    features = cc.reference_features(cfg.profile_dim)
    kv = cc.user_kv_spec(cfg.num_layers, cfg.num_heads, cfg.head_dim)
    last = cc.last_event_timestamp_spec()
    scores = cc.scores_output(cfg.num_tasks)
    return SplitContract(
        family="reference",
        features=features,
        state=(StateTensor(kv.name, kv.dtype, tuple("L" if d == -1 else d for d in kv.dims),
                           kv.doc,
                           append_reads="all_but_last" if cfg.num_layers >= 2 else "all"),
               StateTensor(last.name, last.dtype, tuple(last.dims), last.doc)),
        outputs=(Output(scores.name, scores.dtype, ("N", *scores.dims[1:]), scores.doc),),
        history_mask=cfg.mask,
        # Its append graph (user_encoder_append) reads the cached K/V of every layer but the last
        # (append_reads "all_but_last") and the newest cached timestamp, and returns only the
        # new events' K/V (`new_user_kv`) and the new newest timestamp: O(ΔL) bytes back.
        appendable=cfg.appends,
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
        """cached_user_kv (every layer but the last), cached_last_event_timestamp, the new
        events -> new_user_kv (the new events' K/V only), last_event_timestamp. Refused
        (SplitNotExactError) unless the mask is causal."""
        return self.model.encode_append(*inputs)
