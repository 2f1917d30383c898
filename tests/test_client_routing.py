"""The client puts the user id on the wire as gRPC metadata (USER_ID_HEADER) for the balancer.

A plain gRPC server in this process records what arrives (method and metadata), answers the
model metadata/config calls the client makes first with a minimal model, and inference with
UNIMPLEMENTED: it checks what the client sends, not Triton's behaviour (tests/test_fleet.py
checks the routing through the real nginx and real replicas)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from tritonclient.grpc import model_config_pb2, service_pb2

from client.api import RankerClient, RankerError
from client.contract import USER_ID_HEADER, nginx_variable
from client.request import INT64_MAX, INT64_MIN
from client.split_contract import (
    CONTRACT_PARAMETER,
    Output,
    SplitContract,
    StateTensor,
    contract_to_json,
)
from export.reference_features import reference_features, reference_generator

_SERVICE = "/inference.GRPCInferenceService/"
_CONTRACT = SplitContract(
    family="reference", features=reference_features(4),
    state=(StateTensor("user_kv", "FP32", (1, 2, 1, "L", 4)),),
    outputs=(Output("scores", "FP32", ("N", 2)),), history_mask="causal", appendable=False,
    max_history=64)
_MODEL = service_pb2.ModelMetadataResponse(
    name="ranker_cached",
    inputs=[service_pb2.ModelMetadataResponse.TensorMetadata(name=n, datatype="INT64", shape=s)
            for n, s in (("user_id", [1]), *((f.name, [-1]) for f in _CONTRACT.features))],
    outputs=[service_pb2.ModelMetadataResponse.TensorMetadata(name="scores", datatype="FP32",
                                                              shape=[-1, 2])],
)
# The model config carries the family's declaration, as the export writes it.
_CONFIG = service_pb2.ModelConfigResponse(config=model_config_pb2.ModelConfig(
    name="ranker_cached", parameters={CONTRACT_PARAMETER: model_config_pb2.ModelParameter(
        string_value=contract_to_json(_CONTRACT))}))
_ANSWERS = {"ModelMetadata": (service_pb2.ModelMetadataRequest, _MODEL),
            "ModelConfig": (service_pb2.ModelConfigRequest, _CONFIG)}


class _Recorder(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        self.calls.append((details.method, dict(details.invocation_metadata)))
        name = details.method.removeprefix(_SERVICE)
        if name not in _ANSWERS:
            return None  # no handler: the call ends UNIMPLEMENTED
        request_type, answer = _ANSWERS[name]
        return grpc.unary_unary_rpc_method_handler(
            lambda _request, _context: answer,
            request_deserializer=request_type.FromString,
            response_serializer=type(answer).SerializeToString,
        )

    def infer_metadata(self) -> list[dict[str, str]]:
        return [m for method, m in self.calls if method == _SERVICE + "ModelInfer"]


@pytest.fixture()
def recorder() -> Iterator[tuple[_Recorder, str]]:
    handler = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield handler, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.mark.parametrize("user_id", [42, -7, 0, INT64_MIN, INT64_MAX])
def test_user_id_travels_as_metadata(recorder: tuple[_Recorder, str], user_id: int) -> None:
    handler, url = recorder
    req = reference_generator(seed=1, profile_dim=4).request(5, 3)
    with RankerClient(url, model="ranker_cached", retries=0) as client, \
            pytest.raises(RankerError, match="UNIMPLEMENTED"):
        client.score(req, user_id=user_id)
    [metadata] = handler.infer_metadata()
    assert metadata[USER_ID_HEADER] == str(user_id)


def test_no_user_id_no_header(recorder: tuple[_Recorder, str]) -> None:
    handler, url = recorder
    req = reference_generator(seed=1, profile_dim=4).request(5, 3)
    with RankerClient(url, model="ranker_cached", validate=False, retries=0) as client, \
            pytest.raises(RankerError, match="UNIMPLEMENTED"):
        client.score(req)
    [metadata] = handler.infer_metadata()
    assert USER_ID_HEADER not in metadata


def test_header_and_nginx_variable() -> None:
    assert USER_ID_HEADER.lower() == USER_ID_HEADER  # HTTP/2 header names are lower case
    assert nginx_variable() == "$http_user_id"
    assert nginx_variable("X-Tenant-Id") == "$http_x_tenant_id"
