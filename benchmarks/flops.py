"""FLOP and memory model of the ranking transformer from its config, and LONGER's throughput-drop
form: the formulas, and what the graphs do beyond them, in benchmarks/README.md."""

from __future__ import annotations

from dataclasses import dataclass

from export.config import ModelConfig

# LONGER (ByteDance, RecSys 2025): the sequence module cost 40 % throughput, 6.8 % with shared K/V
SEEDS_NAIVE_DROP = 0.40
SEEDS_SHARED_DROP = 0.068


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

    def token_projections(self) -> int:
        """qkv + out + FFN of one token in one layer (8 d^2 + 4 d d_ff)."""
        return 8 * self.d**2 + 4 * self.d * self.d_ff

    def encode(self, tokens: int) -> int:
        """One full layer over `tokens` tokens, full T x T scores as ONNX Runtime runs it."""
        return tokens * self.token_projections() + 4 * tokens**2 * self.d

    def head(self, n: int) -> int:
        """The scoring head: per candidate, and the user profile once per request."""
        per_candidate = 2 * self.d * self.head_hidden + 2 * self.head_hidden * self.tasks
        return n * per_candidate + 2 * self.profile_dim * self.head_hidden

    def naive(self, n: int, length: int) -> int:
        """ranker_naive: every candidate re-encodes [history, target] (L+1 tokens)."""
        return n * self.layers * self.encode(length + 1) + self.head(n)

    def user(self, length: int) -> int:
        """user_encoder: l-1 full layers over L tokens, K and V only in the last one."""
        return (self.layers - 1) * self.encode(length) + 4 * length * self.d**2

    def fusion(self, n: int, length: int) -> int:
        """target_fusion: N one-token passes against L cached keys (+ its own key)."""
        per_layer = self.token_projections() + 4 * (length + 1) * self.d
        return n * self.layers * per_layer + self.head(n)

    def split(self, n: int, length: int) -> int:
        return self.user(length) + self.fusion(n, length)

    def base(self, n: int) -> int:  # ranker_base: the head only
        return self.head(n)

    def bound(self, n: int, length: int) -> float:
        """FLOP-bound speedup of the split over the naive model."""
        return self.naive(n, length) / self.split(n, length)

    def user_kv_bytes(self, length: int) -> int:
        """The shared user K/V of one request: layers x 2 x L x d_model fp32 values."""
        return self.layers * 2 * length * self.d * 4

    def naive_kv_bytes(self, n: int, length: int) -> int:
        """The K/V the naive model materialises: N copies of (L+1) tokens."""
        return n * self.user_kv_bytes(length + 1)

    def naive_attention_bytes(self, n: int, length: int) -> int:
        """A floor of the naive peak: fp32 scores and softmax [N, H, L+1, L+1] in one layer."""
        return 2 * n * self.heads * (length + 1) ** 2 * 4


def seeds_model_speedup(n: float, ratio: float = 0.15) -> float:
    """The fixed-ratio cost model: Speedup(N) = N / (1 + (N-1) r) = N / ((1-r) + r N)."""
    return n / ((1 - ratio) + ratio * n)


def sequence_cost_ratio(thr_shared: float, thr_naive: float, thr_base: float) -> float:
    """r = the sequence module's cost with the shared K/V over its naive cost, per request."""
    return (1 / thr_shared - 1 / thr_base) / (1 / thr_naive - 1 / thr_base)


def seeds_scaled_drop(ratio: float, naive_drop: float = SEEDS_NAIVE_DROP) -> float:
    """The shared-K/V drop of a base model whose naive drop is `naive_drop`, given r."""
    return 1 - 1 / (1 + ratio * (1 / (1 - naive_drop) - 1))
