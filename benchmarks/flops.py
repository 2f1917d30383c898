"""FLOP and memory model of the ranking transformer from its config: the algorithmic FLOPs of the
matrix products (multiply-add = 2). The formulas, and what the exported graphs do beyond them:
benchmarks/README.md, "FLOP model"."""

from __future__ import annotations

from dataclasses import dataclass

from export.config import ModelConfig

FP32_BYTES = 4


@dataclass(frozen=True)
class FlopModel:
    d: int
    d_ff: int
    heads: int
    layers: int
    head_hidden: int
    tasks: int
    profile_dim: int

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> FlopModel:
        return cls(cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_layers, cfg.head_hidden,
                   cfg.num_tasks, cfg.profile_dim)

    @property
    def head_dim(self) -> int:
        return self.d // self.heads

    # ------------------------------------------------------------------ building blocks
    def token_projections(self) -> int:
        """qkv + out + FFN of one token in one layer: 8d^2 + 4 d d_ff."""
        return 8 * self.d**2 + 4 * self.d * self.d_ff

    def attention(self, queries: int, keys: int) -> int:
        """Q K^T and P V of `queries` tokens over `keys` keys: 4 T S d."""
        return 4 * queries * keys * self.d

    def encode(self, tokens: int) -> int:
        """One full layer over `tokens` tokens: T(8d^2 + 4 d d_ff) + 4 T^2 d."""
        return tokens * self.token_projections() + self.attention(tokens, tokens)

    def kv_only(self, tokens: int) -> int:
        """K and V projections only (the user encoder's last layer): 4 T d^2."""
        return 4 * tokens * self.d**2

    def head_per_candidate(self) -> int:
        return 2 * self.d * self.head_hidden + 2 * self.head_hidden * self.tasks

    def head_profile(self) -> int:
        return 2 * self.profile_dim * self.head_hidden

    # ------------------------------------------------------------------ whole models
    def naive(self, n: int, length: int) -> int:
        """ranker_naive: every candidate re-encodes [history, target] (L+1 tokens)."""
        per_candidate = self.layers * self.encode(length + 1) + self.head_per_candidate()
        return n * per_candidate + self.head_profile()

    def user(self, length: int) -> int:
        """user_encoder: l-1 full layers over L tokens + K/V only in the last layer."""
        return (self.layers - 1) * self.encode(length) + self.kv_only(length)

    def fusion(self, n: int, length: int) -> int:
        """target_fusion: N one-token passes against L cached keys (+ its own key)."""
        per_layer = self.token_projections() + self.attention(1, length + 1)
        return n * (self.layers * per_layer + self.head_per_candidate()) + self.head_profile()

    def split(self, n: int, length: int) -> int:
        return self.user(length) + self.fusion(n, length)

    def base(self, n: int) -> int:
        """ranker_base: the head only."""
        return n * self.head_per_candidate() + self.head_profile()

    def bound(self, n: int, length: int) -> float:
        """FLOP-bound speedup of the split over the naive model."""
        return self.naive(n, length) / self.split(n, length)

    # ------------------------------------------------------------------ memory
    def user_kv_bytes(self, length: int) -> int:
        """The shared user K/V of one request: layers x 2 x H x L x dh x 4 bytes."""
        return self.layers * 2 * self.heads * length * self.head_dim * FP32_BYTES

    def naive_kv_bytes(self, n: int, length: int) -> int:
        """The K/V the naive model materialises: N copies of (L+1) tokens."""
        return n * self.user_kv_bytes(length + 1)

    def naive_attention_bytes(self, n: int, length: int) -> int:
        """Lower bound of the naive model's peak working set: the score matrix and its softmax
        [N, H, L+1, L+1] (fp32) alive together in one layer."""
        return 2 * n * self.heads * (length + 1) ** 2 * FP32_BYTES


def seeds_model_speedup(n: float, ratio: float = 0.15) -> float:
    """The fixed-ratio cost model: Speedup(N) = N / (1 + (N-1) r) = N / ((1-r) + r N)."""
    return n / ((1 - ratio) + ratio * n)


# LONGER (ByteDance, RecSys 2025) in production: the long-sequence module cost 40 % throughput...
SEEDS_NAIVE_DROP = 0.40
SEEDS_SHARED_DROP = 0.068  # ...and 6.8 % with the shared user K/V


def drop(throughput: float, base_throughput: float) -> float:
    """Throughput drop from adding the sequence module: 1 - thr(model) / thr(base)."""
    return 1.0 - throughput / base_throughput


def sequence_cost_ratio(thr_shared: float, thr_naive: float, thr_base: float) -> float:
    """r = cost of the sequence module with the shared K/V / its cost in the naive scheme, from
    per-request costs 1/throughput: r = (1/thr_shared - 1/thr_base) / (1/thr_naive - 1/thr_base)."""
    return (1 / thr_shared - 1 / thr_base) / (1 / thr_naive - 1 / thr_base)


def seeds_scaled_drop(ratio: float, naive_drop: float = SEEDS_NAIVE_DROP) -> float:
    """The shared-K/V drop a base model would see whose naive drop is `naive_drop` (the seeds'
    40 %), given the measured sequence-cost ratio r.

    naive drop D: cost_naive = cost_base / (1 - D), so the sequence module costs
    s = cost_base (1/(1-D) - 1); with the shared K/V it costs r s, hence
    drop_shared = 1 - 1 / (1 + r (1/(1-D) - 1)).  (D = 0.4 and 6.8 % correspond to r = 0.11.)"""
    extra = 1 / (1 - naive_drop) - 1
    return 1 - 1 / (1 + ratio * extra)
