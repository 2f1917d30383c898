"""An HSTU-style ranker, the second model family: its own features, pointwise attention, and a
user state that is more than K/V.

The architecture follows the ideas of Meta's HSTU ("Actions Speak Louder than Words", Zhai et
al., ICML 2024; github.com/meta-recsys/generative-recommenders), written from the paper's
equations for this project:

* features: history item, action, timestamp and a float dwell time per event; candidates: item
  only; per request: the request timestamp (the candidates' time, against which the time bias
  measures each event's age); no user profile;
* one layer: n = LayerNorm(x); U, V, Q, K = split(SiLU(Linear(n)));
  A = SiLU(Q K^T + rab) V / max_history (pointwise, causal: no softmax, a length constant);
  x' = x + Linear(LayerNorm(A) * U). rab is a learned per-head bias of the bucketed relative
  position plus the bucketed log time difference (export/hstu_attention.py);
* M-FALCON scoring: every candidate sits at the same position, right after the kept history,
  sees all of it and itself, never another candidate - so each is scored exactly as if alone.

The user state is, per layer, K and V of the kept history, *and* the kept history's timestamps:
the time bias between a candidate and event j needs t_j, which K and V do not carry.

Shapes carry no batch axis: L history events (L' = min(L, max_history) kept, the newest),
N candidates, H heads, a = attention_dim (Q, K per head), b = hidden_dim (U, V per head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from export.family_io import JsonConfig, load_checkpoint
from export.hstu_attention import (
    MAX_TIME_BUCKETS,
    pointwise_attention,
    relative_bias,
)
from export.split_contract import (
    CANDIDATES,
    HISTORY,
    REQUEST,
    Feature,
    Output,
    SplitContract,
    StateTensor,
    check_contract,
)

FAMILY = "hstu"
HISTORY_ITEM_IDS = "history_item_ids"
HISTORY_ACTION_IDS = "history_action_ids"
HISTORY_TIMESTAMPS = "history_timestamps"
HISTORY_DWELL = "history_dwell_seconds"
CANDIDATE_ITEM_IDS = "candidate_item_ids"
REQUEST_TIMESTAMP = "request_timestamp"
USER_K, USER_V, USER_TIMESTAMPS = "user_k", "user_v", "user_timestamps"
SCORES = "scores"


class HSTUConfigError(ValueError):
    """An HSTU config that cannot describe a valid model."""


@dataclass(frozen=True)
class HSTUConfig(JsonConfig):
    """Hyper-parameters. Table sizes are hash buckets (ids map by floor modulo, so any int64
    id, negative or extreme, is valid). `attention_block` is the query rows per attention block:
    memory O(attention_block x L), never [L, L]."""

    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    attention_dim: int = 32
    hidden_dim: int = 32
    max_history: int = 1024
    num_tasks: int = 2
    task_names: tuple[str, ...] = ("click", "like")
    item_buckets: int = 100_003
    action_buckets: int = 31
    position_buckets: int = 256
    time_buckets: int = 24
    head_hidden: int = 128
    attention_block: int = 128
    max_candidates: int = 20_000
    naive_max_work: int = 2**24
    seed: int = 0
    error: ClassVar[type[ValueError]] = HSTUConfigError
    kind: ClassVar[str] = "HSTU"
    factory: ClassVar[str] = "export.hstu:from_config"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "seed" and isinstance(value, int) and value <= 0:
                raise HSTUConfigError(f"{f.name} must be a positive integer, got {value}")
        if self.max_history >= 2**24:
            raise HSTUConfigError(f"max_history must be below 2^24 (positions are exact in "
                                  f"float32 below it), got {self.max_history}")
        if not 2 <= self.time_buckets <= MAX_TIME_BUCKETS:
            raise HSTUConfigError(f"time_buckets must be in [2, {MAX_TIME_BUCKETS}] (bucket 0 "
                                  f"is 'same second'; the log2 stays exact), got "
                                  f"{self.time_buckets}")
        if len(self.task_names) != self.num_tasks:
            raise HSTUConfigError(f"task_names has {len(self.task_names)} names but num_tasks "
                                  f"is {self.num_tasks}")


def hstu_contract(cfg: HSTUConfig) -> SplitContract:
    """The family's declaration (export/split_contract.py)."""
    h, layers = cfg.num_heads, cfg.num_layers
    reads = "all_but_last" if layers >= 2 else "all"
    return check_contract(SplitContract(
        family=FAMILY,
        features=(
            Feature(HISTORY_ITEM_IDS, "INT64", HISTORY, event=True, doc="items of past events, "
                    "oldest first [L]", role="item"),
            Feature(HISTORY_ACTION_IDS, "INT64", HISTORY, event=True, doc="event type [L]",
                    role="action"),
            Feature(HISTORY_TIMESTAMPS, "INT64", HISTORY, event=True, doc="unix seconds [L]",
                    role="timestamp"),
            Feature(HISTORY_DWELL, "FP32", HISTORY, event=True, doc="seconds spent on the item "
                    "[L]; negative and non-finite values count as 0", role="duration"),
            Feature(CANDIDATE_ITEM_IDS, "INT64", CANDIDATES, doc="items to score [N]",
                    role="item"),
            Feature(REQUEST_TIMESTAMP, "INT64", REQUEST, shape=(1,), doc="unix seconds of the "
                    "request: the candidates' time for the time bias [1]", role="timestamp"),
        ),
        # The append reads K/V of every layer but the last (no later event of the encoder
        # attends to the last layer's) and the cached timestamps (the time bias between a new
        # event and a cached one); it returns the new events' K, V and timestamps only.
        state=(
            StateTensor(USER_K, "FP32", (layers, h, "L", cfg.attention_dim),
                        "per-layer keys of the kept history", append_reads=reads),
            StateTensor(USER_V, "FP32", (layers, h, "L", cfg.hidden_dim),
                        "per-layer values of the kept history", append_reads=reads),
            StateTensor(USER_TIMESTAMPS, "INT64", ("L",),
                        "timestamps of the kept history: the time bias needs them"),
        ),
        outputs=(Output(SCORES, "FP32", ("N", cfg.num_tasks),
                        "probability per candidate and task [N, T]"),),
        history_mask="causal",
        appendable=layers >= 2,  # the append reads the K/V of every layer but the last
        max_history=cfg.max_history,
        doc="HSTU-style ranker: pointwise SiLU attention, relative position/time bias, U gate",
    ))


def _heads(x: Tensor, h: int, e: int) -> Tensor:
    """[..., T, H*e] -> [..., H, T, e] (the new dims constants: no -1, which T = 0 breaks)."""
    return x.reshape(*x.shape[:-1], h, e).transpose(-3, -2)


class HSTULayer(nn.Module):
    """One HSTU layer with its own relative-bias tables."""

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        h, a, b = cfg.num_heads, cfg.attention_dim, cfg.hidden_dim
        self.h, self.a, self.b = h, a, b
        self.scale = 1.0 / math.sqrt(a)
        self.norm = float(cfg.max_history)
        self.block = cfg.attention_block
        self.in_norm = nn.LayerNorm(cfg.d_model)
        self.uvqk = nn.Linear(cfg.d_model, h * (2 * b + 2 * a))
        self.out_norm = nn.LayerNorm(h * b)
        self.out = nn.Linear(h * b, cfg.d_model)
        self.pos_bias = nn.Parameter(torch.randn(h, cfg.position_buckets) * 0.5)
        self.time_bias = nn.Parameter(torch.randn(h, cfg.time_buckets) * 0.5)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [..., T, d] -> U [..., T, H*b], V [..., H, T, b], Q (scaled) [..., H, T, a],
        K [..., H, T, a]."""
        h, a, b = self.h, self.a, self.b
        u, v, q, k = F.silu(self.uvqk(self.in_norm(x))).split([h * b, h * b, h * a, h * a], -1)
        return u, _heads(v, h, b), _heads(q * self.scale, h, a), _heads(k, h, a)

    def finish(self, x: Tensor, attn: Tensor, u: Tensor) -> Tensor:
        """Residual output: x + Linear(LayerNorm(attn) * U), attn [..., H, T, b]."""
        merged = attn.transpose(-3, -2).reshape(*x.shape[:-1], self.h * self.b)
        return x + self.out(self.out_norm(merged) * u)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, q_time: Tensor,
               k_time: Tensor, shared: bool = False) -> Tensor:
        """Blocked causal pointwise attention over history keys (linear memory); `shared`:
        all queries at one position and time (the candidates)."""
        return pointwise_attention(q, k, v, q_pos, q_time, k_time, self.pos_bias,
                                   self.time_bias, self.norm, self.block, causal=True,
                                   shared=shared)

    def self_term(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Each candidate's attention to its own key: same position, same time (buckets 0)."""
        z = (q * k).sum(-1, keepdim=True) + (self.pos_bias[:, :1] + self.time_bias[:, :1])[
            :, :, None]
        return F.silu(z) * v / self.norm


class HSTURanker(nn.Module):
    """HSTU-style ranker implementing the SplitModel protocol (export/split_contract.py)."""

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = nn.Embedding(cfg.item_buckets, d)
        self.action_emb = nn.Embedding(cfg.action_buckets, d)
        self.dwell_vec = nn.Parameter(torch.randn(d) * 0.5)
        self.candidate_vec = nn.Parameter(torch.randn(d) * 0.5)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(d)
        self.head_hidden = nn.Linear(d, cfg.head_hidden)
        self.head_out = nn.Linear(cfg.head_hidden, cfg.num_tasks)
        self._init_weights()

    def _init_weights(self) -> None:
        """Seeded N(0, 1/fan_in) weights: sharp enough that an exactness test has a signal."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
                nn.init.normal_(module.bias, std=0.1)

    def contract(self) -> SplitContract:
        return hstu_contract(self.cfg)

    # ---------------------------------------------------------------- features
    @staticmethod
    def _events(items: Tensor, actions: Tensor, timestamps: Tensor,
                dwell: Tensor) -> tuple[Tensor, Tensor]:
        """History features -> ids [L, 3] (item, action, timestamp) and dwell [L]. Stacking
        makes unequal lengths an error (torch and ONNX) instead of a silent broadcast."""
        events = torch.stack([items, actions, timestamps], dim=1)
        return events, torch.stack([dwell, items.to(dwell.dtype)], dim=1)[:, 0]

    def _kept_events(self, *history: Tensor) -> tuple[Tensor, Tensor]:
        """The newest max_history events (see _events)."""
        events, dwell = self._events(*history)
        keep = self.cfg.max_history
        return events[-keep:], dwell[-keep:]

    def _embed_events(self, events: Tensor, dwell: Tensor) -> Tensor:
        """[T, 3] ids + dwell [T] -> tokens [T, d]. No absolute position: order and age enter
        through the relative bias only, so an event's token does not move when events drop."""
        seconds = torch.nan_to_num(dwell, nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0)
        return (self.item_emb(torch.remainder(events[:, 0], self.cfg.item_buckets))
                + self.action_emb(torch.remainder(events[:, 1], self.cfg.action_buckets))
                + torch.log1p(seconds)[:, None] * self.dwell_vec)

    def _embed_candidates(self, items: Tensor) -> Tensor:
        return self.item_emb(torch.remainder(items, self.cfg.item_buckets)) + self.candidate_vec

    def _head(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.head_out(torch.relu(self.head_hidden(self.final_norm(x)))))

    # ---------------------------------------------------------------- forwards
    def forward(self, history_item_ids: Tensor, history_action_ids: Tensor,
                history_timestamps: Tensor, history_dwell_seconds: Tensor,
                candidate_item_ids: Tensor, request_timestamp: Tensor) -> Tensor:
        """Naive oracle, scores [N, T]: for every candidate the sequence [kept history...,
        candidate] is encoded whole, plain masked attention over [L'+1, L'+1]."""
        events, dwell = self._kept_events(history_item_ids, history_action_ids,
                                           history_timestamps, history_dwell_seconds)
        hist = self._embed_events(events, dwell)
        # One dummy candidate rides in front and is dropped: N = 0 stays a non-empty batch.
        cands = self._embed_candidates(torch.cat([torch.zeros(1, dtype=torch.int64),
                                                  candidate_item_ids]))
        n, length = cands.shape[0], hist.shape[0]
        x = torch.cat([hist.unsqueeze(0).expand(n, length, hist.shape[1]), cands[:, None]], 1)
        pos = torch.arange(length + 1)
        times = torch.cat([events[:, 2], request_timestamp.reshape(1)])
        visible = pos[None, :] <= pos[:, None]
        for layer in self.layers:
            bias = relative_bias(pos, times, pos, times, layer.pos_bias, layer.time_bias)
            u, v, q, k = layer.project(x)  # [N, H, T, e]: N copies of the history
            w = torch.where(visible, F.silu(q @ k.transpose(-1, -2) + bias), 0.0)
            x = layer.finish(x, (w @ v) / layer.norm, u)
        return self._head(x[1:, -1])

    def encode_user(self, history_item_ids: Tensor, history_action_ids: Tensor,
                    history_timestamps: Tensor, history_dwell_seconds: Tensor,
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """History [L] -> user_k [layers, H, L', a], user_v [layers, H, L', b],
        user_timestamps [L']. Memory linear in L; the last layer computes only K and V."""
        events, dwell = self._kept_events(history_item_ids, history_action_ids,
                                          history_timestamps, history_dwell_seconds)
        times = events[:, 2]
        x = self._embed_events(events, dwell)
        pos = torch.arange(x.shape[0])
        return self._encode(x, pos, times, None, None, times)

    def _encode(self, x: Tensor, q_pos: Tensor, q_time: Tensor, prefix_k: Tensor | None,
                prefix_v: Tensor | None, k_time: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Events x [T, d] at positions q_pos, after the cached prefix (if any: its K/V of every
        layer but the last, [layers - 1, H, P, e]) -> K, V of these T events only
        [layers, H, T, e], and their times. Every layer but the last attends over prefix + these
        events; the last computes only K and V."""
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            u, v, q, k = layer.project(x)
            ks.append(k)
            vs.append(v)
            if i < len(self.layers) - 1:
                if prefix_k is not None:
                    k = torch.cat([prefix_k[i], k], dim=1)
                    v = torch.cat([prefix_v[i], v], dim=1)
                x = layer.finish(x, layer.attend(q, k, v, q_pos, q_time, k_time), u)
        return torch.stack(ks), torch.stack(vs), q_time

    def encode_append(self, cached_user_k: Tensor, cached_user_v: Tensor,
                      cached_user_timestamps: Tensor, history_item_ids: Tensor,
                      history_action_ids: Tensor, history_timestamps: Tensor,
                      history_dwell_seconds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The cached forward of a returning user: K/V of P cached events in every layer but the
        last ([layers - 1, H, P, e]) and their timestamps [P], plus ΔL new events -> new_user_k
        [layers, H, ΔL, a], new_user_v [layers, H, ΔL, b] and new_user_timestamps [ΔL], the new
        events' state only: concatenated after the cached state along the history axis, equal
        to encode_user on all P + ΔL, at the cost of ΔL query rows and O(ΔL) bytes out. Exact
        only while P + ΔL <= max_history (beyond it the oldest events drop and every later state
        changes): refused there, re-encode instead."""
        prefix = cached_user_timestamps.shape[0]
        new = history_item_ids.shape[0]
        if not torch.jit.is_tracing() and prefix + new > self.cfg.max_history:
            raise ValueError(f"append: {prefix} cached + {new} new events exceed max_history="
                             f"{self.cfg.max_history}: re-encode with encode_user")
        events, dwell = self._events(history_item_ids, history_action_ids, history_timestamps,
                                     history_dwell_seconds)
        x = self._embed_events(events, dwell)
        times = torch.cat([cached_user_timestamps, events[:, 2]])
        q_pos = torch.arange(x.shape[0]) + prefix
        return self._encode(x, q_pos, events[:, 2], cached_user_k, cached_user_v, times)

    def score_candidates(self, candidate_item_ids: Tensor, request_timestamp: Tensor,
                         user_k: Tensor, user_v: Tensor, user_timestamps: Tensor) -> Tensor:
        """All N candidates against the shared state in one pass -> scores [N, T]. Every
        candidate sits at position L' (M-FALCON) and sees the kept history and itself."""
        # One dummy candidate rides in front and is dropped: N = 0 stays a non-empty batch.
        items = torch.cat([torch.zeros(1, dtype=torch.int64), candidate_item_ids])
        x = self._embed_candidates(items)
        length = user_k.shape[2]
        q_pos = torch.zeros_like(items) + length
        q_time = torch.zeros_like(items) + request_timestamp.reshape(1)
        for i, layer in enumerate(self.layers):
            u, v, q, k = layer.project(x)
            hist = layer.attend(q, user_k[i], user_v[i], q_pos, q_time, user_timestamps,
                                shared=True)
            x = layer.finish(x, hist + layer.self_term(q, k, v), u)
        return self._head(x)[1:]

    def mfalcon(self, history_item_ids: Tensor, history_action_ids: Tensor,
                history_timestamps: Tensor, history_dwell_seconds: Tensor,
                candidate_item_ids: Tensor, request_timestamp: Tensor) -> Tensor:
        """M-FALCON single pass, HSTU's own serving scheme (Zhai et al., ICML 2024) and the
        benchmark's peer of the split: one forward over the L' + N tokens [kept history;
        candidates], nothing cached. Every layer runs every token: the history rows causal, each
        candidate at position L' (its time the request's) seeing the history and itself. The
        candidates' own key is the diagonal term (`self_term`), the rest one blocked attention
        over the history keys with a bias row per query. Against the split it also computes the
        last layer's history rows and a bias row per candidate; scores equal `forward`'s."""
        events, dwell = self._kept_events(history_item_ids, history_action_ids,
                                          history_timestamps, history_dwell_seconds)
        # One dummy candidate rides in front and is dropped: N = 0 stays a non-empty batch.
        items = torch.cat([torch.zeros(1, dtype=torch.int64), candidate_item_ids])
        hist = self._embed_events(events, dwell)
        length = hist.shape[0]
        x = torch.cat([hist, self._embed_candidates(items)])
        times = events[:, 2]
        q_pos = torch.cat([torch.arange(length), torch.zeros_like(items) + length])
        q_time = torch.cat([times, torch.zeros_like(items) + request_timestamp.reshape(1)])
        for layer in self.layers:
            u, v, q, k = layer.project(x)  # [H, L' + 1 + N, e]
            k_hist, v_hist = k[:, :length], v[:, :length]
            own = layer.self_term(q[:, length:], k[:, length:], v[:, length:])
            attn = layer.attend(q, k_hist, v_hist, q_pos, q_time, times)
            x = layer.finish(x, attn + torch.cat([torch.zeros_like(v_hist), own], dim=1), u)
        return self._head(x[length:])[1:]


def build_hstu(cfg: HSTUConfig, checkpoint: str | None = None) -> HSTURanker:
    """Seeded random init, or a state_dict checkpoint (names must match). Eval mode."""
    torch.manual_seed(cfg.seed)
    model = HSTURanker(cfg)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model.eval()


def from_config(config: dict[str, Any], checkpoint: str | None = None) -> HSTURanker:
    """The family's factory, named in its config files as "model": "export.hstu:from_config"
    (export/family.py): the config's keys, the optional state_dict checkpoint."""
    return build_hstu(HSTUConfig.from_dict(config), checkpoint)
