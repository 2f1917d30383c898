"""The production command from one source (deploy/production.py): the README's docker line is
its output, a real tritonserver 2.51 accepts its flags and exposes what it says, and the
Kubernetes manifests (deploy/k8s/, rendered offline by `kubectl kustomize`, validated against
Kubernetes' schemas) run exactly that command and route on the client's user-id header."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from client.contract import USER_ID_HEADER, nginx_variable
from deploy import manifests
from deploy import production as prod
from local_server import nginx
from local_server.nginx import Nginx
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


# --------------------------------------------------------------------------- deploy/k8s
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (scripts/setup.sh installs Debian's "
                            "kubernetes-client where it is absent)")
K8S_VERSION = "1.32.0"  # the kubectl on these machines


def kustomize(directory: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objects: list[dict]) -> dict[str, dict]:
    kinds = {o["kind"]: o for o in objects}
    assert len(kinds) == len(objects), "one object per kind"
    return kinds


def test_committed_manifests_equal_the_generator() -> None:
    assert manifests.main(["--check"]) == 0


@needs_kubectl
@pytest.mark.parametrize("overlay", ["base", "prometheus-operator", "s3"])
def test_kustomize_renders_and_objects_validate(overlay: str) -> None:
    objects = kustomize(manifests.K8S_DIR / overlay)
    unchecked = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.append(obj["kind"])
    # The Prometheus operator's CRD is not a Kubernetes schema; everything else is validated.
    assert unchecked == (["ServiceMonitor"] if overlay == "prometheus-operator" else [])
    kinds = by_kind(objects)
    assert {"Deployment", "Service", "Ingress", "HorizontalPodAutoscaler"} <= set(kinds)
    [container] = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    repository = manifests.S3_REPOSITORY if overlay == "s3" else prod.MODEL_REPOSITORY
    assert [*container["command"], *container["args"]] == prod.tritonserver_args(
        f"$({prod.ADMIN_KEY_ENV})", repository)
    assert ("PersistentVolumeClaim" in kinds) == (overlay != "s3")


def test_schema_validation_can_fail() -> None:
    bad = manifests.deployment()
    bad["spec"]["template"]["spec"]["containers"][0]["argz"] = ["--oops"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = manifests.deployment()
    bad["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@needs_kubectl
def test_rendered_manifests_run_the_production_command_and_route_on_the_client_header() -> None:
    kinds = by_kind(kustomize(manifests.K8S_DIR / "base"))
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == prod.IMAGE
    assert [*container["command"], *container["args"]] == prod.tritonserver_args(
        f"$({prod.ADMIN_KEY_ENV})")
    [env] = container["env"]
    assert env["name"] == prod.ADMIN_KEY_ENV and "secretKeyRef" in env["valueFrom"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": prod.HTTP_PORT, "grpc": prod.GRPC_PORT,
                     "metrics": prod.METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        # the HTTP endpoints the production flags leave open (tested on the binary above)
        assert get["port"] == "http" and get["path"] in ("/v2/health/ready", "/v2/health/live")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert prod.MODEL_REPOSITORY in mounts and "/dev/shm" in mounts
    annotations = kinds["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(prod.METRICS_PORT)

    service_ports = {p["name"]: p["port"] for p in kinds["Service"]["spec"]["ports"]}
    assert service_ports == {"grpc": prod.GRPC_PORT, "metrics": prod.METRICS_PORT}

    ingress = kinds["Ingress"]
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/upstream-hash-by"] == nginx_variable(USER_ID_HEADER)
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    [rule] = ingress["spec"]["rules"]
    paths = rule["http"]["paths"]
    assert [p["path"] for p in paths] == prod.edge_paths()
    assert {p["pathType"] for p in paths} == {"Exact"}
    assert {p["backend"]["service"]["name"] for p in paths} == {kinds["Service"]["metadata"]
                                                                ["name"]}
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]


@pytest.mark.parametrize("command", [
    ["scripts/fleet.sh"], [sys.executable, "-m", "deploy.production"],
    [sys.executable, "-m", "deploy.manifests"], [sys.executable, "-m", "benchmarks.fleet"],
])
def test_fleet_and_deploy_commands_have_help(command: list[str]) -> None:
    result = subprocess.run([*command, "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


# --------------------------------------------------------------------------- the local balancer
@pytest.mark.parametrize("balance", ["hash", "round-robin"])
def test_nginx_config_comes_from_the_shared_sources(balance: str, tmp_path: Path) -> None:
    """The local balancer's config: hashing on the client's header (or not), exactly the edge
    RPCs forwarded, everything else refused; and Debian's nginx accepts it (`nginx -t`)."""
    upstreams = ["127.0.0.1:1", "127.0.0.1:2"]
    server = Nginx(tmp_path, free_port(), upstreams, balance)
    text = nginx.render(nginx.balancer_directives(server.listen_port, upstreams, tmp_path,
                                                  balance))
    hashing = f"hash {nginx_variable(USER_ID_HEADER)} consistent;"
    assert (hashing in text) == (balance == "hash")
    forwarded = re.findall(r"location = (\S+) \{\n\s+grpc_pass grpc://triton;", text)
    assert forwarded == prod.edge_paths()
    assert f"grpc-status {nginx.PERMISSION_DENIED} always" in text
    server.write_config()  # runs `nginx -t` on the written file; NginxError if refused
    assert server.conf.read_text().endswith(text)
    with pytest.raises(ValueError, match="balance"):
        nginx.balancer_directives(8001, ["127.0.0.1:1"], tmp_path, "random")
    with pytest.raises(ValueError, match="upstream"):
        nginx.balancer_directives(8001, [], tmp_path, balance)
