"""A ranking model written outside the package, to show that one can be served split without
editing the repository: its config (byom_ranker.json) names it as "byom_ranker:build", and the
folder holding this file goes on PYTHONPATH.

Deliberately unlike the two shipped families: history = item ids + a float rating per event,
candidates = item id + a float price, per request = a small dense context vector; a
BIDIRECTIONAL history (every event sees every other event, never a candidate) with softmax
attention, so it cannot append; one score per candidate. Tiny, for tests. Its features declare
roles (item, dense), so the project's client builds, generates and checks its requests; both
history features are events, so `ranker_cached` holds its state per user and serves a repeated
history as a hit (any other history is a miss: re-encoded, never appended).

The split: the history's per-layer K and V (`user_k`, `user_v`) are the user state. Each
candidate is one token that attends to the history's K/V and to its own key in one softmax;
candidates never see each other. `forward` is the naive oracle: [history..., candidate] encoded
whole for every candidate, the history masked from the candidate.

No tensor may have a zero-length axis that feeds a matrix product: ONNX Runtime 1.19.2 fuses
Transpose + MatMul into com.microsoft FusedMatMul (graph optimisation level "extended" and
above, the default), and that kernel dies with SIGFPE - taking the process with it - when the
batch dim it transposes is 0. So a dummy event (L = 0) and a dummy candidate (N = 0) ride in
front and are dropped, as `python -m export.check` showed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from export.family import SERVING_KEYS
from export.split_contract import (
    CANDIDATES,
    HISTORY,
    REQUEST,
    Feature,
    Output,
    SplitContract,
    StateTensor,
)


@dataclass(frozen=True)
class ByomConfig:
    d_model: int = 16
    num_heads: int = 2
    num_layers: int = 2
    max_history: int = 24
    item_buckets: int = 101
    context_dim: int = 3
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _heads(x: Tensor, h: int, e: int) -> Tensor:
    """[..., T, H*e] -> [..., H, T, e]. The new dims are model constants: a -1 (or a size the
    exporter turns into one) cannot be inferred when T = 0."""
    return x.reshape(*x.shape[:-1], h, e).transpose(-3, -2)


def _merge(x: Tensor, d: int) -> Tensor:
    """[..., H, T, e] -> [..., T, d = H*e]."""
    x = x.transpose(-3, -2)
    return x.reshape(*x.shape[:-2], d)


def _with_dummy(items: Tensor, prices: Tensor) -> tuple[Tensor, Tensor]:
    """One dummy candidate in front (dropped from the scores): N = 0 stays a non-empty batch."""
    return (torch.cat([torch.zeros(1, dtype=items.dtype), items]),
            torch.cat([torch.zeros(1, dtype=prices.dtype), prices]))


class Block(nn.Module):
    """Pre-LN transformer block: softmax attention, GELU feed-forward."""

    def __init__(self, cfg: ByomConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.h, self.e, self.d = cfg.num_heads, cfg.head_dim, d
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        return (_heads(q * self.scale, self.h, self.e), _heads(k, self.h, self.e),
                _heads(v, self.h, self.e))

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        x = x + self.out(_merge(attn, self.d))
        return x + self.ffn(self.norm2(x))


class ByomRanker(nn.Module):
    def __init__(self, cfg: ByomConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = nn.Embedding(cfg.item_buckets, d)
        self.recency_emb = nn.Embedding(cfg.max_history, d)
        self.rating_vec = nn.Parameter(torch.randn(d) * 0.5)
        self.price_vec = nn.Parameter(torch.randn(d) * 0.5)
        self.candidate_vec = nn.Parameter(torch.randn(d) * 0.5)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d + cfg.context_dim, 1)

    def contract(self) -> SplitContract:
        cfg = self.cfg
        kv = (cfg.num_layers, cfg.num_heads, "L", cfg.head_dim)
        return SplitContract(
            family="byom_bidirectional",
            # roles (client/split_contract.ROLES) tell the project's client what each feature
            # means, so that it can generate and check this model's requests
            features=(
                Feature("history_item_ids", "INT64", HISTORY, event=True, role="item"),
                Feature("history_ratings", "FP32", HISTORY, event=True, role="dense"),
                Feature("candidate_item_ids", "INT64", CANDIDATES, role="item"),
                Feature("candidate_prices", "FP32", CANDIDATES, role="dense"),
                Feature("user_context", "FP32", REQUEST, shape=(cfg.context_dim,),
                        role="dense"),
            ),
            state=(StateTensor("user_k", "FP32", kv), StateTensor("user_v", "FP32", kv)),
            outputs=(Output("scores", "FP32", ("N", 1)),),
            history_mask="bidirectional",
            appendable=False,
            max_history=cfg.max_history,
        )

    def _history(self, items: Tensor, ratings: Tensor) -> Tensor:
        """The newest max_history events as tokens [L', d]; the stack refuses unequal lengths
        in torch instead of broadcasting a length-1 feature (the exported graph has a guard)."""
        ratings = torch.stack([ratings, items.to(ratings.dtype)])[0][-self.cfg.max_history:]
        items = items[-self.cfg.max_history:]
        recency = torch.arange(items.shape[0]).flip(0)  # 0: the newest event
        return (self.item_emb(torch.remainder(items, self.cfg.item_buckets))
                + ratings[:, None] * self.rating_vec + self.recency_emb(recency))

    def _candidates(self, items: Tensor, prices: Tensor) -> Tensor:
        prices = torch.stack([prices, items.to(prices.dtype)])[0]
        return (self.item_emb(torch.remainder(items, self.cfg.item_buckets))
                + prices[:, None] * self.price_vec + self.candidate_vec)

    def _score(self, x: Tensor, context: Tensor) -> Tensor:
        ctx = context.reshape(1, self.cfg.context_dim).expand(x.shape[0], self.cfg.context_dim)
        return torch.sigmoid(self.head(torch.cat([self.final_norm(x), ctx], dim=-1)))

    def forward(self, history_item_ids: Tensor, history_ratings: Tensor,
                candidate_item_ids: Tensor, candidate_prices: Tensor,
                user_context: Tensor) -> Tensor:
        """Naive oracle: [history..., candidate] per candidate, history masked from it."""
        hist = self._history(history_item_ids, history_ratings)
        cands = self._candidates(*_with_dummy(candidate_item_ids, candidate_prices))
        n, length, d = cands.shape[0], hist.shape[0], hist.shape[1]
        x = torch.cat([hist.unsqueeze(0).expand(n, length, d), cands[:, None]], dim=1)
        pos = torch.arange(length + 1)
        # history rows see the history only; the candidate row (the last) sees everything
        visible = (pos[None, :] < length) | (pos[:, None] == length)
        for block in self.blocks:
            q, k, v = block.project(x)
            logits = (q @ k.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
            x = block.finish(x, F.softmax(logits, dim=-1) @ v)
        return self._score(x[1:, -1], user_context)

    def encode_user(self, history_item_ids: Tensor,
                    history_ratings: Tensor) -> tuple[Tensor, Tensor]:
        """History -> user_k, user_v [layers, H, L', head_dim]. A dummy event rides in front,
        hidden from every real event (its key column is -inf, exp gives exactly 0) and dropped,
        so that no tensor has a zero-length axis at L = 0."""
        hist = self._history(history_item_ids, history_ratings)
        x = torch.cat([torch.zeros(1, self.cfg.d_model), hist])
        pos = torch.arange(x.shape[0])
        visible = (pos[None, :] > 0) | (pos[:, None] == 0)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            q, k, v = block.project(x)
            ks.append(k[:, 1:])
            vs.append(v[:, 1:])
            if i < len(self.blocks) - 1:  # the last layer's output is never read
                logits = (q @ k.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
                x = block.finish(x, F.softmax(logits, dim=-1) @ v)
        return torch.stack(ks), torch.stack(vs)

    def score_candidates(self, candidate_item_ids: Tensor, candidate_prices: Tensor,
                         user_context: Tensor, user_k: Tensor, user_v: Tensor) -> Tensor:
        """All candidates in one pass: each attends to the shared K/V and to its own key."""
        x = self._candidates(*_with_dummy(candidate_item_ids, candidate_prices))
        for i, block in enumerate(self.blocks):
            q, k, v = block.project(x)  # [H, N, e]
            logits = torch.cat([q @ user_k[i].transpose(-1, -2), (q * k).sum(-1, keepdim=True)],
                               dim=-1)
            w = F.softmax(logits, dim=-1)
            attn = w[..., :-1] @ user_v[i] + w[..., -1:] * v
            x = block.finish(x, attn)
        return self._score(x, user_context)[1:]

    def encode_append(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError("a bidirectional history cannot be appended to")


def build(config: dict[str, Any], checkpoint: str | None = None) -> ByomRanker:
    """The factory export.family calls: the config's keys (the serving ones are export's),
    an optional state_dict checkpoint."""
    cfg = ByomConfig(**{k: v for k, v in config.items() if k not in SERVING_KEYS})
    torch.manual_seed(cfg.seed)
    model = ByomRanker(cfg)
    if checkpoint:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()
