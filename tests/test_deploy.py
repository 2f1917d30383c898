"""The production command from one source (deploy/production.py): the README's docker line is
its output, and a real tritonserver 2.51 accepts its flags and exposes what it says."""

from __future__ import annotations

import re
import shlex
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy import production as prod
from local_server.triton import REPO_ROOT, free_port, start_server


def readme_docker_block() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "docker run" in b]
    assert len(blocks) == 1, "one docker line in README.md"
    block = blocks[0]
    return block[block.index("docker run"):].rstrip("\n")


def test_readme_docker_line_is_the_production_command() -> None:
    block = readme_docker_block()
    assert block == prod.docker_command()
    words = shlex.split(block.replace("\\\n", " "))
    start = words.index("tritonserver")
    assert words[start:] == prod.tritonserver_args(f"${prod.ADMIN_KEY_ENV}")
    assert prod.IMAGE in words and f"127.0.0.1:{prod.GRPC_PORT}:{prod.GRPC_PORT}" in words


def test_restrictions_cover_the_admin_protocols() -> None:
    for protocol in ("shared-memory", "model-repository", "trace", "logging"):
        assert protocol in prod.GRPC_RESTRICTED and protocol in prod.HTTP_RESTRICTED
    assert not {"inference", "metadata", "health"} & set(prod.GRPC_RESTRICTED)
    assert "health" not in prod.HTTP_RESTRICTED  # the kubelet's probes
    assert prod.grpc_restriction("k") == (
        "--grpc-restricted-protocol=shared-memory,model-repository,statistics,trace,logging"
        ":admin-key=k")
    edge = prod.edge_paths()
    assert len(edge) == len(set(edge)) and all(p.startswith("/") for p in edge)
    assert "/inference.GRPCInferenceService/ModelInfer" in edge
    assert not [p for p in edge if re.search(r"SharedMemory|Repository|Trace|Log|Statistics", p)]


@pytest.mark.server
def test_tritonserver_takes_the_production_flags(small_repository: Path) -> None:
    """The production arguments (ports and repository aside, which start_server sets) on the
    real 2.51 binary: it starts; HTTP answers health and nothing else without the key; gRPC
    refuses the restricted protocols without the key, serves them with it."""
    key = "test-key"
    own = ("--model-repository", "--model-control-mode", "--grpc-port", "--http-port",
           "--metrics-port", "--allow-http", "--allow-metrics")
    extra = [a for a in prod.tritonserver_args(key)[1:] if not a.startswith(own)]
    assert len(extra) == 4, extra  # the two restrictions, the backend config, the CUDA pool
    http = free_port()
    server = start_server(grpc_port=free_port(), http_port=http, metrics_port=free_port(),
                          repository=small_repository, extra_args=extra, timeout_s=240)
    try:
        def get(path: str, headers: dict[str, str] | None = None) -> int:
            request = urllib.request.Request(f"http://127.0.0.1:{http}{path}",
                                             headers=headers or {})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        assert get("/v2/health/live") == 200 and get("/v2/health/ready") == 200
        assert get("/v2/models/ranker") == 403 and get("/v2/models/stats") == 403
        assert get("/v2/models/ranker", {prod.ADMIN_KEY: key}) == 200
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_log_settings()
            assert client.get_log_settings(headers={prod.grpc_admin_header(): key})
            assert client.is_model_ready("ranker") and client.get_model_config("ranker")
        finally:
            client.close()
    finally:
        server.stop()
