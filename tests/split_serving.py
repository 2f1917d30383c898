"""Serving a split family in tests: a local tritonserver on a repository pair, and raw
tritonclient gRPC requests built from the family's declaration (every declared feature, with its
declared dtype, in declaration order). Shared by the HSTU and the bring-your-own-model server
tests, so both send requests the same way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from export.guards import length_rule
from export.split_contract import SplitContract
from export.split_fuzz import max_diff


@contextmanager
def serving(repository: Path, timeout_s: float = 240) -> Iterator[grpcclient.InferenceServerClient]:
    """A gRPC client of a local tritonserver serving `repository` and the evaluation repository
    beside it, on free localhost ports; the server is stopped by PID on exit."""
    from local_server.triton import free_port, start_server

    server = start_server(grpc_port=free_port(), repository=repository, timeout_s=timeout_s)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        yield client
    finally:
        client.close()
        server.stop()


def infer(client: grpcclient.InferenceServerClient, contract: SplitContract, model: str,
          request: dict[str, np.ndarray]) -> np.ndarray:
    """One raw gRPC request: every declared feature, with its declared dtype, in order; the
    first declared output back."""
    assert set(request) == {f.name for f in contract.features}
    inputs = []
    for feature in contract.features:
        value = request[feature.name]
        tensor = grpcclient.InferInput(feature.name, list(value.shape), feature.dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(o.name) for o in contract.outputs]
    return client.infer(model, inputs, outputs=outputs).as_numpy(contract.outputs[0].name)


def refused_by_name_then_exact(client: grpcclient.InferenceServerClient,
                               contract: SplitContract, request: dict[str, np.ndarray],
                               feature: str, keep: int, tolerance: float) -> None:
    """A copy of `request` whose history feature `feature` keeps only `keep` events is refused by
    `ranker` and `ranker_naive`, each quoting the guard's rule; then `request` itself (valid)
    is served, split == naive within `tolerance`."""
    short = {**request, feature: request[feature][:keep]}
    rule = length_rule([f.name for f in contract.history_features], "L")
    for model in ("ranker", "ranker_naive"):
        with pytest.raises(InferenceServerException) as info:
            infer(client, contract, model, short)
        assert rule in str(info.value), str(info.value)
    split = infer(client, contract, "ranker", request)
    n = len(request[contract.candidate_features[0].name])
    assert split.shape == (n, *contract.outputs[0].dims[1:])
    assert max_diff(split, infer(client, contract, "ranker_naive", request)) <= tolerance
