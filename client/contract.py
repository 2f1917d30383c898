"""The family-independent part of the request contract: the tensor spec, the user id and where it
travels, the cache path output.

One request is one user and N candidates. No tensor carries a batch dimension: N lives on the
candidate axis, never on Triton's batch axis, so the user's history is sent (and encoded) once.
A family's own features, state and outputs are its declaration (client/split_contract.py; the
reference model's names are in export/reference_features.py). Pure Python + numpy so that the
client can use it without torch.
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


# The returning-user path (ranker_cached): who the user is.
USER_ID = "user_id"
# The gRPC metadata key that carries the same user id on every request that has one, so that a
# load balancer can keep a user on the replica holding their K/V (nginx `hash $http_user_id
# consistent`, ingress-nginx `upstream-hash-by`). One constant for the client and every
# balancer config; HTTP/2 header names are lower case.
USER_ID_HEADER = "user-id"
# ranker_cached's optional second output: which path served the request (hit, append, miss)
CACHE_PATH = "cache_path"


def user_id_spec() -> TensorSpec:
    return TensorSpec(USER_ID, "INT64", (1,),
                      "the user's id: the key of the user K/V cache (ranker_cached) [1]")


def cache_path_spec() -> TensorSpec:
    return TensorSpec(CACHE_PATH, "BYTES", (1,),
                      "the path user_cache took for this request: hit, append or miss [1]")


def nginx_variable(header: str = USER_ID_HEADER) -> str:
    """nginx's variable for a request header: `user-id` -> `$http_user_id` (lower case, dashes
    to underscores), as the balancer configs name it."""
    return "$http_" + header.lower().replace("-", "_")
