"""The reference model's request and state names: its side of the split contract.

`RankingTransformer`'s features, user state and outputs by name, as its declaration,
benchmarks and tests use them, and `reference_features` (its request features with their roles)
and `reference_contract`, its whole declaration, built from them. Torch-free, so that tools and
tests build reference requests without loading the model. The family-independent names (the
tensor spec, the user id and its metadata header, the cache path) live in client/contract.py and
are re-exported here, so that reference code imports one module.

A client needs none of this: it reads any family's declaration from the server's config
(client/split_contract.py); `reference_request` and `reference_generator` are the reference
model's named constructors over the generic client request and traffic generator.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from client.contract import (  # noqa: F401  (re-exported: the reference code's one import)
    CACHE_PATH,
    USER_ID,
    USER_ID_HEADER,
    TensorSpec,
    cache_path_spec,
    nginx_variable,
    user_id_spec,
)
from client.request import Declared, RankingRequest, features_of
from client.split_contract import (
    CANDIDATES,
    HISTORY,
    REQUEST,
    Feature,
    Output,
    SplitContract,
    StateTensor,
)
from client.traffic import RequestGenerator

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

# The returning-user path (ranker_cached): what user_encoder_append reads from the cache (the
# K/V and newest timestamp of the events already encoded) and what it returns.
CACHED_USER_KV = "cached_user_kv"
CACHED_LAST_EVENT_TIMESTAMP = "cached_last_event_timestamp"
NEW_USER_KV = "new_user_kv"  # user_encoder_append's output: the K/V of the new events only

HISTORY_INPUTS = (HISTORY_ITEM_IDS, HISTORY_ACTION_IDS, HISTORY_TIMESTAMPS)
CANDIDATE_INPUTS = (CANDIDATE_ITEM_IDS, CANDIDATE_CATEGORY_IDS)

# What each request feature means (client/split_contract.ROLES): how a generic client generates
# and checks the reference model's requests.
ROLES = {
    HISTORY_ITEM_IDS: "item", HISTORY_ACTION_IDS: "action", HISTORY_TIMESTAMPS: "timestamp",
    CANDIDATE_ITEM_IDS: "item", CANDIDATE_CATEGORY_IDS: "category",
    REQUEST_TIMESTAMP: "timestamp", USER_PROFILE: "dense",
}


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


def reference_features(profile_dim: int) -> tuple[Feature, ...]:
    """The request features as the split declaration states them (axis, event, role)."""
    axis = {**dict.fromkeys(HISTORY_INPUTS, HISTORY), **dict.fromkeys(CANDIDATE_INPUTS,
                                                                       CANDIDATES)}
    return tuple(
        Feature(s.name, s.dtype, axis.get(s.name, REQUEST),
                () if s.name in axis else tuple(s.dims), event=s.name in HISTORY_INPUTS,
                doc=s.doc, role=ROLES[s.name])
        for s in request_inputs(profile_dim))


def reference_request(**named: Any) -> RankingRequest:
    """A RankingRequest from the reference model's named fields (history_item_ids, ...,
    user_profile), kept as given (not converted): `client.validation.validate_request` says what
    is wrong with a bad one. P is the length of `user_profile`."""
    profile = named.get(USER_PROFILE)
    profile_dim = int(np.shape(profile)[0]) if np.ndim(profile) else 0
    return RankingRequest(reference_features(profile_dim), named)


def reference_generator(seed: int = 0, profile_dim: int = 16, num_items: int = 1_000_000,
                        num_categories: int = 5_000) -> RequestGenerator:
    """The traffic generator for the reference model's requests (P = profile_dim)."""
    return RequestGenerator(reference_features(profile_dim), seed=seed, num_items=num_items,
                            num_categories=num_categories)


def profile_dim_of(declared: Declared) -> int:
    """P, the length of `user_profile`, in a reference declaration (a served model's contract
    or a generator's layout)."""
    return int(next(f for f in features_of(declared) if f.name == USER_PROFILE).shape[0])


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


def reference_contract(cfg) -> SplitContract:
    """The reference `RankingTransformer` (export/model.py) as one declaration, built from the
    names and specs it is served with (this module), so the two cannot drift apart.

    `cfg` is its export.config.ModelConfig. The mask "full" is described too (a naive-only
    model); `check_contract` refuses it with the reason. Torch-free: benchmarks and tools read
    the names they feed from it without loading the model."""
    features = reference_features(cfg.profile_dim)
    kv = user_kv_spec(cfg.num_layers, cfg.num_heads, cfg.head_dim)
    last = last_event_timestamp_spec()
    scores = scores_output(cfg.num_tasks)
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
