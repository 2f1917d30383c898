"""Serving a split family in tests: what the project's client (client.api.RankerClient) does not
do itself. A local tritonserver on a repository pair, and the bad-request story every family's
server test tells the same way: a request whose history lengths disagree is refused by the
client naming the features and, sent anyway, by each ensemble with the guard's rule; the next
valid request is exact. Shared by the HSTU and the bring-your-own-model server tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from client.api import CACHED_MODEL, RankerClient, RankerError
from client.request import RequestError
from export.guards import length_rule
from export.split_contract import SplitContract
from export.split_fuzz import max_diff


@contextmanager
def serving(repository: Path, timeout_s: float = 240) -> Iterator[str]:
    """The gRPC url of a local tritonserver serving `repository` and the evaluation repository
    beside it, on free localhost ports; the server is stopped by PID on exit."""
    from local_server.triton import free_port, start_server

    server = start_server(grpc_port=free_port(), repository=repository, timeout_s=timeout_s)
    try:
        yield server.grpc_url
    finally:
        server.stop()


def refused_by_name_then_exact(url: str, contract: SplitContract,
                               request: dict[str, np.ndarray], feature: str, keep: int,
                               tolerance: float, user_id: int = 99) -> None:
    """A copy of `request` whose history feature `feature` (not the first) keeps only `keep`
    events: the client refuses it naming both features; sent anyway (validate=False), `ranker`,
    `ranker_naive` and `ranker_cached` refuse it quoting the guard's rule, twice each (a cached
    user must not turn a refusal into an answer). Then `request` itself is served: split ==
    naive within `tolerance`, and ranker_cached, a miss for `user_id`, equal to naive too."""
    first = contract.history_features[0].name
    assert feature != first and feature in {f.name for f in contract.history_features}
    length = len(request[first])
    short = {**request, feature: request[feature][:keep]}
    rule = length_rule([f.name for f in contract.history_features], "L")
    with RankerClient(url) as client, pytest.raises(RequestError) as refused:
        client.score(short, "ranker")
    assert f"{first} has {length} but {feature} has {keep}" in str(refused.value)
    with RankerClient(url, validate=False) as raw:
        for model in ("ranker", "ranker_naive", CACHED_MODEL):
            for _ in range(2):
                with pytest.raises(RankerError) as info:
                    if model == CACHED_MODEL:
                        raw.score_cached(short, user_id=user_id)
                    else:
                        raw.score(short, model)
                assert rule in str(info.value), str(info.value)
        split = raw.score(request, "ranker")
        naive = raw.score(request, "ranker_naive")
        n = len(request[contract.candidate_features[0].name])
        assert split.shape == (n, *contract.outputs[0].dims[1:])
        assert max_diff(split, naive) <= tolerance
        cached, path, _ = raw.score_cached(request, user_id=user_id)
        assert (path, max_diff(cached, naive) <= tolerance) == ("miss", True)
