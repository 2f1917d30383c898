"""The ranking transformer: one set of weights, two forwards (and the benchmark's peers).

* `forward` is the naive (traditional) scheme: every candidate gets its own copy of the history and
  the whole [history..., target] sequence is encoded once per candidate. It is the baseline and the
  exactness oracle.
* `encode_user` + `score_candidates` is the split: the history's per-layer K/V (`user_kv`) is
  computed once per request, then all N candidate tokens attend to that single shared K/V in one
  batched pass.

The split is exact because history tokens never attend to the target (causal order, or
bidirectional attention restricted to the history). With the BST-style `full` mask history tokens
do attend to the target, so every history K/V past layer 1 depends on the candidate: `encode_user`
refuses such a model (see `SplitNotExactError`).

Shapes are written without a batch axis: L history events, N candidates, d = d_model,
H heads, dh = d / H, T tasks, P profile features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from export.attention import bidirectional_attention, candidate_attention, causal_attention
from export.config import ModelConfig


class SplitNotExactError(ValueError):
    """The model's mask lets history tokens see the target, so a shared user K/V would be wrong."""


def full_mask_refusal(mask: str) -> str:
    return (
        f"mask '{mask}' lets history tokens attend to the target item, so from layer 2 on every "
        "history K/V depends on the candidate: a user K/V computed once and shared by all "
        "candidates would give different (wrong) scores from the naive model. Use mask 'causal' "
        "or 'bidirectional' (history attends within the history only) to split the model, or "
        "serve only the naive model."
    )


def hash_ids(ids: Tensor, buckets: int) -> Tensor:
    """Map arbitrary int64 ids (huge, sparse, negative) into [0, buckets) by floor modulo."""
    return torch.remainder(ids, buckets)




class Block(nn.Module):
    """Pre-LN transformer block (multi-head attention + GELU FFN) with a cached-K/V forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, cfg.d_ff)
        self.ff2 = nn.Linear(cfg.d_ff, d)

    def _split_heads(self, x: Tensor) -> Tensor:
        """[..., T, d] -> [..., H, T, dh]."""
        x = x.reshape((*x.shape[:-1], self.num_heads, self.head_dim))
        return x.transpose(-3, -2)

    def _merge_heads(self, x: Tensor) -> Tensor:
        """[..., H, T, dh] -> [..., T, d]. The last dim is a constant, never -1: an ONNX Reshape
        with -1 cannot infer it when T = 0."""
        x = x.transpose(-3, -2)
        return x.reshape((*x.shape[:-2], self.num_heads * self.head_dim))

    def _ffn(self, x: Tensor) -> Tensor:
        return x + self.ff2(nn.functional.gelu(self.ff1(self.ln2(x))))

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Only this layer's K and V of x [..., T, d] -> two [..., H, T, dh].

        The last layer of the user encoder needs nothing else from the history."""
        _, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def forward_history(self, x: Tensor, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        """History tokens x [L, d] (no batch axis) -> (x' [L, d], K, V [H, L, dh]), with
        attention whose memory is linear in L (export/attention.py)."""
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        if causal:
            attn = causal_attention(q, k, v, self.num_heads, self.head_dim, self.scale)
        else:
            attn = bidirectional_attention(q, k, v, self.num_heads, self.scale)
        x = x + self.out(attn)
        return self._ffn(x), self._split_heads(k), self._split_heads(v)

    def forward(self, x: Tensor, mask_bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Full forward of x [B, T, d] with an additive mask [T, T]; returns (x', K, V). Plain
        attention, [B, H, T, T] scores: the naive model (the oracle) runs it."""
        q, k, v = (self._split_heads(t) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        scores = (q * self.scale) @ k.transpose(-1, -2)
        if mask_bias is not None:
            scores = scores + mask_bias.to(scores.dtype)
        attn = torch.softmax(scores, dim=-1) @ v
        x = x + self.out(self._merge_heads(attn))
        return self._ffn(x), k, v

    def forward_after_prefix(
        self, x: Tensor, k_prefix: Tensor, v_prefix: Tensor, mask_bias: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Forward of new tokens x [T, d] that follow P cached tokens (their K/V [H, P, dh]):
        each new token attends to the whole prefix and, through `mask_bias` [T, P + T], to the
        new tokens it may see. Returns (x', K, V) of the new tokens only. This is the causal
        append: the prefix's own states never depend on later tokens, so they are not
        recomputed."""
        q, k, v = (self._split_heads(t) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        keys = torch.cat([k_prefix, k], dim=-2)
        values = torch.cat([v_prefix, v], dim=-2)
        scores = (q * self.scale) @ keys.transpose(-1, -2) + mask_bias.to(q.dtype)
        attn = torch.softmax(scores, dim=-1) @ values
        x = x + self.out(self._merge_heads(attn))
        return self._ffn(x), k, v

    def forward_candidates(self, x: Tensor, k_hist: Tensor, v_hist: Tensor) -> Tensor:
        """Cached forward of N >= 1 candidate tokens x [N, d] against the shared history K/V
        [H, L, dh]. Each candidate attends to all L history keys and to its own key, never to
        another candidate; the K/V is never replicated along N and memory is O(N + L)
        (export/attention.candidate_attention)."""
        n, h, dh = x.shape[0], self.num_heads, self.head_dim
        q, k, v = (t.reshape(n, h, dh) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        attn = candidate_attention(q * self.scale, k, v, k_hist, v_hist, h, dh)  # [N,H,dh]
        x = x + self.out(attn.reshape(n, h * dh))
        return self._ffn(x)


class RankingTransformer(nn.Module):
    """Target-item + user-history ranking transformer with multi-task sigmoid head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = nn.Embedding(cfg.item_buckets, d)
        self.action_emb = nn.Embedding(cfg.action_buckets, d)
        self.category_emb = nn.Embedding(cfg.category_buckets, d)
        self.gap_emb = nn.Embedding(cfg.gap_buckets, d)
        self.position_emb = nn.Embedding(cfg.max_history, d)
        # One learned position shared by every candidate: each is scored exactly as if alone.
        self.target_position = nn.Parameter(torch.randn(d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_ln = nn.LayerNorm(d)
        self.head_state = nn.Linear(d, cfg.head_hidden)
        self.head_profile = nn.Linear(cfg.profile_dim, cfg.head_hidden, bias=False)
        self.head_out = nn.Linear(cfg.head_hidden, cfg.num_tasks)
        # Gap bucket b >= 1 counts the power-of-two second thresholds the gap reaches; bucket 0
        # means "no previous event". Integer comparisons keep torch and ONNX Runtime identical.
        boundaries = torch.tensor([2**i for i in range(cfg.gap_buckets - 2)], dtype=torch.int64)
        self.register_buffer("gap_boundaries", boundaries, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Seeded N(0, 1/fan_in) weights: attention sharp enough that the scores really depend on
        which history tokens each token sees, so an exactness test has something to catch."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=0.1)

    # ----------------------------------------------------------------- embeddings
    def _gap_bucket(self, gaps: Tensor) -> Tensor:
        """int64 gaps in seconds -> bucket in [1, gap_buckets). Negative gaps count as 0 s."""
        # One leading dummy gap keeps the tensor non-empty: ONNX Runtime 1.19 mis-shapes a
        # reduction whose leading axis is empty (L = 0).
        padded = torch.cat([torch.zeros(1, dtype=torch.int64), gaps])
        reached = (padded.unsqueeze(-1) >= self.gap_boundaries).to(torch.int64)
        return (reached.sum(dim=-1) + 1)[1:]

    def _embed_events(self, events: Tensor, first_position: Tensor | int,
                      previous_timestamp: Tensor, max_position: int | None = None) -> Tensor:
        """Events [T, 3] (item, action, timestamp) at positions first_position... -> tokens
        [T, d]. The time gap of each event is to the event before it: `previous_timestamp` [1]
        precedes the first one (ignored at position 0, which has no previous event)."""
        item_ids, action_ids, timestamps = events[:, 0], events[:, 1], events[:, 2]
        positions = torch.arange(events.shape[0], dtype=torch.int64) + first_position
        previous = torch.cat([previous_timestamp, timestamps])[:-1]
        gap = torch.where(positions == 0, 0, self._gap_bucket(timestamps - previous))
        if max_position is not None:
            positions = positions.clamp(max=max_position)
        return (
            self.item_emb(hash_ids(item_ids, self.cfg.item_buckets))
            + self.action_emb(hash_ids(action_ids, self.cfg.action_buckets))
            + self.gap_emb(gap)
            + self.position_emb(positions)
        )

    def embed_history(
        self, item_ids: Tensor, action_ids: Tensor, timestamps: Tensor
    ) -> tuple[Tensor, Tensor]:
        """History tensors [L] -> tokens [L', d] (L' = min(L, max_history)) and the newest
        event's timestamp [1] (0 when L = 0).

        Stacking the three tensors first makes a length mismatch an error in torch and in ONNX
        Runtime alike, instead of a silent broadcast of a length-1 tensor."""
        events = self._history_events(item_ids, action_ids, timestamps)
        tokens = self._embed_events(events, 0, torch.zeros(1, dtype=torch.int64))
        return tokens, self._last_timestamp(events[:, 2])

    def _history_events(self, item_ids: Tensor, action_ids: Tensor, timestamps: Tensor) -> Tensor:
        """[L'', 3] most recent max_history events; unequal lengths raise instead of broadcast."""
        events = torch.stack([item_ids, action_ids, timestamps], dim=1)
        return events[-self.cfg.max_history :]

    @staticmethod
    def _last_timestamp(timestamps: Tensor) -> Tensor:
        """Newest event's timestamp [1], 0 for an empty history. The reshape pins the shape to
        [1] in the exported graph (a slice alone leaves it symbolic)."""
        return torch.cat([torch.zeros(1, dtype=torch.int64), timestamps])[-1:].reshape(1)

    def embed_candidates(
        self,
        item_ids: Tensor,
        category_ids: Tensor,
        request_timestamp: Tensor,
        last_event_timestamp: Tensor,
        has_history: Tensor,
    ) -> Tensor:
        """Candidate tensors [N] -> tokens [N, d]. The time gap is request time minus the newest
        history event (bucket 0 when there is no history)."""
        pair = torch.stack([item_ids, category_ids], dim=1)  # length mismatch -> error
        gap = self._gap_bucket(request_timestamp - last_event_timestamp)
        gap = torch.where(has_history, gap, torch.zeros_like(gap))
        return (
            self.item_emb(hash_ids(pair[:, 0], self.cfg.item_buckets))
            + self.category_emb(hash_ids(pair[:, 1], self.cfg.category_buckets))
            + self.gap_emb(gap)
            + self.target_position
        )

    def head(self, state: Tensor, user_profile: Tensor) -> Tensor:
        """Final candidate states [N, d] + user profile [P] -> probabilities [N, T].

        Non-finite profile values are zeroed so the server never returns NaN scores (the client
        rejects them before sending). The profile enters through its own weight matrix, added as a
        [hidden] vector: nothing is replicated N times."""
        profile = torch.nan_to_num(user_profile, nan=0.0, posinf=0.0, neginf=0.0)
        hidden = self.head_state(self.final_ln(state)) + self.head_profile(profile)
        return torch.sigmoid(self.head_out(torch.relu(hidden)))

    # ----------------------------------------------------------------- masks
    def naive_mask_bias(self, length: int | Tensor) -> Tensor | None:
        """Additive mask over [history (L) ..., target], length L + 1, built per request (no
        graph constant grows with max_history). The target (last) sees all tokens; `full` lets
        history see the target too."""
        if self.cfg.mask == "full":
            return None
        pos = torch.arange(length + 1, dtype=torch.int64)
        if self.cfg.mask == "causal":  # the target is last: causal order already fits
            allowed = pos[None, :] <= pos[:, None]
        else:
            allowed = (pos[None, :] < length) | (pos[:, None] == length)
        return torch.where(allowed, 0.0, float("-inf"))

    # ----------------------------------------------------------------- forwards
    def forward(
        self,
        history_item_ids: Tensor,
        history_action_ids: Tensor,
        history_timestamps: Tensor,
        candidate_item_ids: Tensor,
        candidate_category_ids: Tensor,
        request_timestamp: Tensor,
        user_profile: Tensor,
    ) -> Tensor:
        """Naive scores [N, T]: the history is re-encoded with each candidate as the target."""
        history, last_ts = self.embed_history(
            history_item_ids, history_action_ids, history_timestamps
        )
        length = history.shape[0]
        candidates = self.embed_candidates(
            candidate_item_ids, candidate_category_ids, request_timestamp, last_ts,
            torch.tensor(length) > 0,
        )
        n = candidates.shape[0]
        x = torch.cat(
            [history.unsqueeze(0).expand(n, length, history.shape[1]), candidates.unsqueeze(1)],
            dim=1,
        )  # [N, L+1, d]: N copies of the history, the traditional scheme
        bias = self.naive_mask_bias(length)
        for block in self.blocks:
            x, _, _ = block(x, bias)
        return self.head(x[:, -1], user_profile)

    def encode_user(
        self, history_item_ids: Tensor, history_action_ids: Tensor, history_timestamps: Tensor
    ) -> tuple[Tensor, Tensor]:
        """History [L] -> (user_kv [layers, 2, H, L', dh], last_event_timestamp [1]).

        Runs once per request. The last layer computes only K and V."""
        if self.cfg.mask == "full":
            raise SplitNotExactError(full_mask_refusal(self.cfg.mask))
        return self._encode_history(history_item_ids, history_action_ids, history_timestamps)

    def _encode_history(
        self, history_item_ids: Tensor, history_action_ids: Tensor, history_timestamps: Tensor
    ) -> tuple[Tensor, Tensor]:
        x, last_ts = self.embed_history(history_item_ids, history_action_ids, history_timestamps)
        causal = self.cfg.mask == "causal"
        layers = []
        for i, block in enumerate(self.blocks):
            if i < len(self.blocks) - 1:
                x, k, v = block.forward_history(x, causal)
            else:
                k, v = block.kv(x)
            layers.append(torch.stack([k, v]))
        return torch.stack(layers), last_ts

    def encode_append(
        self, prefix_kv: Tensor, last_event_timestamp: Tensor, item_ids: Tensor,
        action_ids: Tensor, timestamps: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The cached forward of a returning user (causal masks only): the K/V of the first P
        events in every layer but the last (`prefix_kv` [layers - 1, 2, H, P, dh]: the last
        layer's K/V are never attended to by later events of the user encoder) and the newest
        of them's timestamp, plus ΔL new events [ΔL] -> (the K/V of the new events only
        [layers, 2, H, ΔL, dh], the newest timestamp [1]). Concatenated after the first P
        events' user_kv along the history axis, they equal `encode_user` on the whole history.
        Costs O(ΔL) tokens instead of O(P + ΔL), and returns O(ΔL) bytes.

        Exact only while P + ΔL <= max_history (beyond it the oldest events drop out and every
        position shifts): the caller must re-encode then. With a bidirectional mask every K/V
        depends on the new events, so appending is refused."""
        if self.cfg.mask != "causal":
            raise SplitNotExactError(
                f"appending to a cached user_kv is exact only with the causal mask, not "
                f"'{self.cfg.mask}': every history K/V depends on later events; re-encode")
        events = torch.stack([item_ids, action_ids, timestamps], dim=1)  # length mismatch: error
        last = torch.cat([last_event_timestamp, timestamps])[-1:].reshape(1)
        # One dummy event rides at the end and is dropped: ONNX Runtime 1.19 kills the process
        # (SIGFPE) on this graph when there are no new events (ΔL = 0). Under the causal mask no
        # real event sees it; its position is clamped into the table.
        dummy = torch.cat([torch.zeros(2, dtype=torch.int64), last]).reshape(1, 3)
        events = torch.cat([events, dummy])
        prefix = prefix_kv.shape[3]
        x = self._embed_events(events, prefix, last_event_timestamp,
                               max_position=self.cfg.max_history - 1)
        tokens = events.shape[0]
        query_pos = torch.arange(tokens, dtype=torch.int64) + prefix
        key_pos = torch.arange(tokens + prefix, dtype=torch.int64)
        bias = torch.where(key_pos[None, :] <= query_pos[:, None], 0.0, float("-inf"))
        layers = []
        for i, block in enumerate(self.blocks):
            if i < len(self.blocks) - 1:
                k_prefix, v_prefix = prefix_kv[i, 0], prefix_kv[i, 1]
                x, k, v = block.forward_after_prefix(x, k_prefix, v_prefix, bias)
            else:
                k, v = block.kv(x)
            layers.append(torch.stack([k[:, :-1], v[:, :-1]]).to(prefix_kv.dtype))
        return torch.stack(layers), last

    def score_candidates(
        self,
        candidate_item_ids: Tensor,
        candidate_category_ids: Tensor,
        request_timestamp: Tensor,
        user_profile: Tensor,
        user_kv: Tensor,
        last_event_timestamp: Tensor,
    ) -> Tensor:
        """All N candidates against the shared user_kv in one pass -> scores [N, T]."""
        has_history = torch.tensor(user_kv.shape[3]) > 0
        # One dummy candidate (id 0) rides in front and is dropped at the end: ONNX Runtime 1.19
        # crashes the process (SIGFPE) on this graph when the candidate axis is empty (N = 0).
        # Candidates never see each other, so the extra row changes no other score.
        pad = torch.zeros(1, dtype=torch.int64)
        x = self.embed_candidates(
            torch.cat([pad, candidate_item_ids]), torch.cat([pad, candidate_category_ids]),
            request_timestamp, last_event_timestamp, has_history,
        )
        for i, block in enumerate(self.blocks):
            x = block.forward_candidates(x, user_kv[i, 0], user_kv[i, 1])
        return self.head(x, user_profile)[1:]

    def forward_base(self, *request: Tensor) -> Tensor:
        """The model without its sequence module (the `ranker_base` benchmark reference): the
        candidate's own features and the user profile through the same head. The history is read
        only for the newest timestamp (the candidates' time gap)."""
        hist_items, hist_actions, hist_ts, cand_items, cand_cats, request_ts, profile = request
        events = self._history_events(hist_items, hist_actions, hist_ts)
        x = self.embed_candidates(
            cand_items, cand_cats, request_ts, self._last_timestamp(events[:, 2]),
            torch.tensor(events.shape[0]) > 0,
        )
        return self.head(x, profile)

    # ----------------------------------------------------------------- the benchmark's peers
    def mfalcon(self, *request: Tensor) -> Tensor:
        """M-FALCON single pass (Meta's generative recommenders), the long-history benchmark's
        peer of the split: one forward over [history; N candidates], request contract in,
        scores [N, T] out, nothing cached. History tokens see the history (causal or
        bidirectional mask), each candidate sees the history and itself, never another
        candidate, at the one target position: scores equal `forward`'s. A dense masked forward
        in plain ONNX ops (what ONNX Runtime offers on CPU; Meta's kernels are jagged and
        block-sparse, on GPU): its attention is [H, L+N, L+N]."""
        hist_items, hist_actions, hist_ts, cand_items, cand_cats, request_ts, profile = request
        history, last_ts = self.embed_history(hist_items, hist_actions, hist_ts)
        length = history.shape[0]
        candidates = self.embed_candidates(cand_items, cand_cats, request_ts, last_ts,
                                           torch.tensor(length) > 0)
        x = torch.cat([history, candidates]).unsqueeze(0)  # [1, L + N, d]
        pos = torch.arange(x.shape[1], dtype=torch.int64)
        q, k = pos[:, None], pos[None, :]
        history_sees = (k <= q) if self.cfg.mask == "causal" else (k < length)
        is_history = q < length
        allowed = (is_history & history_sees & (k < length)) | (
            ~is_history & ((k < length) | (k == q)))
        bias = torch.where(allowed, 0.0, float("-inf"))
        for block in self.blocks:
            x, _, _ = block(x, bias)
        return self.head(x[0, length:], profile)

    def replicated_fusion(self, candidate_item_ids: Tensor, candidate_category_ids: Tensor,
                          request_timestamp: Tensor, user_profile: Tensor, user_kv: Tensor,
                          last_event_timestamp: Tensor) -> Tensor:
        """`score_candidates` with the user K/V replicated to candidate granularity, the
        `np.repeat` pattern of Merlin-style pipelines and the benchmark's other peer: N copies
        of each layer's [H, L, dh], one attention per candidate. Scores equal
        `score_candidates`'."""
        x = self.embed_candidates(candidate_item_ids, candidate_category_ids, request_timestamp,
                                  last_event_timestamp, torch.tensor(user_kv.shape[3]) > 0)
        n = x.shape[0]
        for i, block in enumerate(self.blocks):
            q, k, v = (block._split_heads(t).transpose(0, 1).unsqueeze(2)
                       for t in block.qkv(block.ln1(x)).chunk(3, dim=-1))  # [N, H, 1, dh]
            keys = torch.cat([user_kv[i, 0].repeat(n, 1, 1, 1), k], dim=2)  # [N, H, L+1, dh]
            values = torch.cat([user_kv[i, 1].repeat(n, 1, 1, 1), v], dim=2)
            probs = torch.softmax((q * block.scale) @ keys.transpose(-1, -2), dim=-1)
            attn = (probs @ values).squeeze(2)  # [N, H, dh]
            x = block._ffn(x + block.out(attn.reshape(n, block.num_heads * block.head_dim)))
        return self.head(x, user_profile)

    def split_forward(self, *request: Tensor) -> Tensor:
        """encode_user + score_candidates on the request contract (same argument order as
        `forward`)."""
        hist_items, hist_actions, hist_ts, cand_items, cand_cats, request_ts, profile = request
        user_kv, last_ts = self.encode_user(hist_items, hist_actions, hist_ts)
        return self.score_candidates(cand_items, cand_cats, request_ts, profile, user_kv, last_ts)


def build_model(cfg: ModelConfig, checkpoint: str | None = None) -> RankingTransformer:
    """Seeded random init, or the weights of a PyTorch state_dict checkpoint. Eval mode."""
    torch.manual_seed(cfg.seed)
    model = RankingTransformer(cfg)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {checkpoint} does not match the model config: "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
    return model.eval()
