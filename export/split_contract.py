"""The forwards a split-served model family implements (`SplitModel`), and the reference model
seen through them. The declaration itself (what crosses each boundary) is torch-free and lives in
client/split_contract.py, re-exported here for the export's convenience."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch
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
from export.reference_features import reference_contract


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


@dataclass(frozen=True)
class ServingPlan:
    """What an export writes for a family beyond its declaration: the serving limits its graphs'
    guards enforce and its configs advertise (candidates per request, ranker_naive's
    N x (L'+1)^2 work bound), its task names, its extra evaluation graphs (ranker_naive's
    inputs and outputs under another name, e.g. a benchmark baseline; the model's
    `evaluation_graphs` says which method each traces) and the dtypes its state is served in
    where they differ from the declared ones (an fp16 export, `half_state`)."""

    contract: SplitContract
    max_candidates: int
    naive_max_work: int
    task_names: tuple[str, ...] = ()
    evaluation_graphs: tuple[str, ...] = ()
    state_dtypes: Mapping[str, str] = field(default_factory=dict)


def half_state(contract: SplitContract) -> dict[str, str]:
    """The served dtypes of an fp16 export: every FP32 state tensor as FP16 (the request
    features and the outputs keep their declared dtypes)."""
    return {s.name: "FP16" for s in contract.state if s.dtype == "FP32"}


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


def reference_plan(cfg, fp16: bool = False) -> ServingPlan:
    """What `python -m export` writes for the reference model of config `cfg`: its declaration,
    its config's serving limits and task names, its benchmark baseline `ranker_base` as an
    evaluation graph, and with `fp16` its state served in fp16 (fp16 weights; the request and
    the scores stay int64 / fp32)."""
    contract = reference_contract(cfg)
    return ServingPlan(contract, cfg.max_candidates, cfg.naive_max_work, tuple(cfg.task_names),
                       tuple(ReferenceSplitModel.evaluation_graphs),
                       half_state(contract) if fp16 else {})


class ReferenceSplitModel(nn.Module):
    """`RankingTransformer` seen through the SplitModel protocol, its code unchanged: its
    forwards already take the protocol's argument orders; this adds `contract()`, the request's
    contract dtypes at the boundary of an fp16 model (`user_profile` enters in the weights'
    dtype, the scores leave as fp32, the K/V stay in the weights' dtype), its benchmark
    baseline `ranker_base` (`forward_base`, an evaluation graph) and the long-history
    benchmark's peers (`mfalcon`, `replicated_fusion`). A module itself, so that an export
    traces its weights as weights."""

    evaluation_graphs: ClassVar[dict[str, str]] = {"ranker_base": "forward_base"}

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def contract(self) -> SplitContract:
        return reference_contract(self.model.cfg)

    def _dtype(self) -> torch.dtype:
        return self.model.item_emb.weight.dtype

    def forward(self, *features: Tensor) -> Tensor:
        *ids, profile = features
        return self.model(*ids, profile.to(self._dtype())).float()

    def forward_base(self, *features: Tensor) -> Tensor:
        """The request -> scores without the sequence module (the `ranker_base` baseline)."""
        *ids, profile = features
        return self.model.forward_base(*ids, profile.to(self._dtype())).float()

    def encode_user(self, *history: Tensor) -> tuple[Tensor, ...]:
        user_kv, last = self.model.encode_user(*history)
        return user_kv.to(self._dtype()), last

    def score_candidates(self, *inputs: Tensor) -> Tensor:
        *candidates, profile, user_kv, last = inputs
        return self.model.score_candidates(*candidates, profile.to(self._dtype()), user_kv,
                                           last).float()

    def mfalcon(self, *features: Tensor) -> Tensor:
        """The model's M-FALCON single pass (a benchmark peer), at the boundary as `forward`."""
        *ids, profile = features
        return self.model.mfalcon(*ids, profile.to(self._dtype())).float()

    def replicated_fusion(self, *inputs: Tensor) -> Tensor:
        """The model's replicated-K/V fusion (a benchmark peer), as `score_candidates`."""
        *candidates, profile, user_kv, last = inputs
        return self.model.replicated_fusion(*candidates, profile.to(self._dtype()), user_kv,
                                            last).float()

    def encode_append(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """cached_user_kv (every layer but the last), cached_last_event_timestamp, the new
        events -> new_user_kv (the new events' K/V only), last_event_timestamp. Refused
        (SplitNotExactError) unless the mask is causal."""
        new, last = self.model.encode_append(*inputs)
        return new.to(self._dtype()), last
