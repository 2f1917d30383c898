"""Factories that go wrong in the ways export.family and export.check must explain, next to the
working model (byom_ranker.py): each is named by import path from a test config."""

from __future__ import annotations

import dataclasses
from typing import Any

from byom_ranker import ByomRanker, build
from torch import Tensor

from export.family import reference_model
from export.split_contract import ReferenceSplitModel, SplitContract

not_callable = 3


def not_a_model(config: dict[str, Any], checkpoint: str | None = None) -> object:
    return {"weights": []}


def refuses(config: dict[str, Any], checkpoint: str | None = None) -> ByomRanker:
    raise ValueError("d_model must be even")


class FullMask(ByomRanker):
    """Declares that its history sees the candidate (BST-style): not splittable."""

    def contract(self) -> SplitContract:
        return dataclasses.replace(super().contract(), history_mask="full")


def full_mask(config: dict[str, Any], checkpoint: str | None = None) -> ByomRanker:
    return FullMask(build(config, checkpoint).cfg).eval()


class OffByABit(ByomRanker):
    """A split that is not exact: score_candidates drifts 1e-4 from the naive forward."""

    def score_candidates(self, *inputs: Tensor) -> Tensor:
        return super().score_candidates(*inputs) + 1e-4


def off_by_a_bit(config: dict[str, Any], checkpoint: str | None = None) -> ByomRanker:
    model = build(config, checkpoint)
    broken = OffByABit(model.cfg)
    broken.load_state_dict(model.state_dict())
    return broken.eval()


class DoubleScores(ByomRanker):
    """Exact, but its scores come out float64 where the declaration says FP32: Triton's native
    backend would refuse the graph against its config."""

    def forward(self, *features: Tensor) -> Tensor:
        return super().forward(*features).double()

    def score_candidates(self, *inputs: Tensor) -> Tensor:
        return super().score_candidates(*inputs).double()


def double_scores(config: dict[str, Any], checkpoint: str | None = None) -> ByomRanker:
    model = build(config, checkpoint)
    broken = DoubleScores(model.cfg)
    broken.load_state_dict(model.state_dict())
    return broken.eval()


class AppendOffByABit(ReferenceSplitModel):
    """The causal reference model with an append that is not exact: the new events' K/V drift
    1e-4 from a full encode (its split stays exact)."""

    def encode_append(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        new_kv, last_timestamp = super().encode_append(*inputs)
        return new_kv + 1e-4, last_timestamp


def append_off_by_a_bit(config: dict[str, Any],
                        checkpoint: str | None = None) -> AppendOffByABit:
    return AppendOffByABit(reference_model(config, checkpoint).model).eval()
