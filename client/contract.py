"""The request contract shared by every model, the ensemble, the client and the benchmarks.

One request is one user and N candidates. No tensor carries a batch dimension: N lives on the
candidate axis, never on Triton's batch axis, so the user's history is sent (and encoded) once.
This module is pure Python + numpy so that the client can use it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of the contract. A dim of -1 is variable (L or N)."""

    name: str
    dtype: str  # Triton dtype name: "INT64", "FP32", "FP16" or "BYTES"
    dims: tuple[int, ...]
    doc: str

    @property
    def np_dtype(self) -> type:
        return {"INT64": np.int64, "FP32": np.float32, "FP16": np.float16,
                "BYTES": np.object_}[self.dtype]


HISTORY_ITEM_IDS = "history_item_ids"
HISTORY_ACTION_IDS = "history_action_ids"
HISTORY_TIMESTAMPS = "history_timestamps"
CANDIDATE_ITEM_IDS = "candidate_item_ids"
CANDIDATE_CATEGORY_IDS = "candidate_category_ids"
REQUEST_TIMESTAMP = "request_timestamp"
USER_PROFILE = "user_profile"
SCORES = "scores"

# Tensors that live only between the two ensemble steps: born in user_encoder, consumed once by
# target_fusion.
USER_KV = "user_kv"
LAST_EVENT_TIMESTAMP = "last_event_timestamp"

# The returning-user path (ranker_cached): who the user is, and what user_encoder_append reads
# from the cache (the K/V and newest timestamp of the events already encoded).
USER_ID = "user_id"
# The gRPC metadata key that carries the same user id on every request that has one, so that a
# load balancer can keep a user on the replica holding their K/V (nginx `hash $http_user_id
# consistent`, ingress-nginx `upstream-hash-by`). One constant for the client and every
# balancer config; HTTP/2 header names are lower case.
USER_ID_HEADER = "user-id"
# ranker_cached's optional second output: which path served the request (hit, append, miss)
CACHE_PATH = "cache_path"
CACHED_USER_KV = "cached_user_kv"
CACHED_LAST_EVENT_TIMESTAMP = "cached_last_event_timestamp"
NEW_USER_KV = "new_user_kv"  # user_encoder_append's output: the K/V of the new events only

HISTORY_INPUTS = (HISTORY_ITEM_IDS, HISTORY_ACTION_IDS, HISTORY_TIMESTAMPS)
CANDIDATE_INPUTS = (CANDIDATE_ITEM_IDS, CANDIDATE_CATEGORY_IDS)


def request_inputs(profile_dim: int) -> list[TensorSpec]:
    """The request tensors, in contract order. `profile_dim` is P from the model config."""
    return [
        TensorSpec(HISTORY_ITEM_IDS, "INT64", (-1,), "items of past events, oldest first [L]"),
        TensorSpec(HISTORY_ACTION_IDS, "INT64", (-1,), "event type per history event [L]"),
        TensorSpec(HISTORY_TIMESTAMPS, "INT64", (-1,), "unix seconds, non-decreasing [L]"),
        TensorSpec(CANDIDATE_ITEM_IDS, "INT64", (-1,), "items to score [N]"),
        TensorSpec(CANDIDATE_CATEGORY_IDS, "INT64", (-1,), "category of each candidate [N]"),
        TensorSpec(REQUEST_TIMESTAMP, "INT64", (1,), "unix seconds of the request [1]"),
        TensorSpec(USER_PROFILE, "FP32", (profile_dim,), "dense user features [P]"),
    ]


def scores_output(num_tasks: int) -> TensorSpec:
    return TensorSpec(SCORES, "FP32", (-1, num_tasks), "probability per candidate and task [N, T]")


def user_kv_spec(num_layers: int, num_heads: int, head_dim: int, dtype: str = "FP32") -> TensorSpec:
    """Per-layer K and V of the history: [layers, 2 (K, V), heads, L, head_dim]."""
    return TensorSpec(
        USER_KV, dtype, (num_layers, 2, num_heads, -1, head_dim),
        "history K/V per layer, computed once per request and shared by all candidates",
    )


def last_event_timestamp_spec() -> TensorSpec:
    return TensorSpec(
        LAST_EVENT_TIMESTAMP, "INT64", (1,),
        "timestamp of the newest history event (0 when L = 0); the candidates' time gap needs it",
    )


def user_id_spec() -> TensorSpec:
    return TensorSpec(USER_ID, "INT64", (1,),
                      "the user's id: the key of the user K/V cache (ranker_cached) [1]")


def new_user_kv_spec(num_layers: int, num_heads: int, head_dim: int,
                     dtype: str = "FP32") -> TensorSpec:
    """user_encoder_append's output: [layers, 2, H, ΔL, head_dim], the new events' K/V only."""
    return TensorSpec(NEW_USER_KV, dtype, (num_layers, 2, num_heads, -1, head_dim),
                      "K/V of the appended events only, to follow the cached ones")


def cache_path_spec() -> TensorSpec:
    return TensorSpec(CACHE_PATH, "BYTES", (1,),
                      "the path user_cache took for this request: hit, append or miss [1]")


def cached_specs(num_layers: int, num_heads: int, head_dim: int,
                 dtype: str = "FP32") -> list[TensorSpec]:
    """user_encoder_append's cached inputs: the K/V of the P events already encoded in every
    layer but the last (the only ones later events attend to), and the newest of them's
    timestamp (0 when P = 0)."""
    return [
        TensorSpec(CACHED_USER_KV, dtype, (num_layers - 1, 2, num_heads, -1, head_dim),
                   "cached K/V of the first P events, every layer but the last"),
        TensorSpec(CACHED_LAST_EVENT_TIMESTAMP, "INT64", (1,),
                   "timestamp of the newest cached event (0 when P = 0)"),
    ]


def nginx_variable(header: str = USER_ID_HEADER) -> str:
    """nginx's variable for a request header: `user-id` -> `$http_user_id` (lower case, dashes
    to underscores), as the balancer configs name it."""
    return "$http_" + header.lower().replace("-", "_")
