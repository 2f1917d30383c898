"""The production tritonserver command line and what the edge forwards, from one source.

The README's docker line, the Kubernetes Deployment (deploy/k8s/, written by deploy.manifests)
and the local fleet's replicas take their flags from here; tests check the README and the
rendered manifests against these functions, so they cannot drift.

What is exposed where (Triton's "Secure Deployment Considerations" page is the anchor):
- gRPC (8001): inference, metadata, model config and health for every caller. Shared memory,
  the model repository API (load/unload), statistics, trace and logging only with the admin key:
  Triton 2.51 expects it in the header `triton-grpc-protocol-<ADMIN_KEY>` and answers
  UNAVAILABLE "This protocol is restricted" without it.
- HTTP (8000): health only, for the kubelet's probes; every other API answers 403 without the
  admin key header (`<ADMIN_KEY>` itself on HTTP).
- metrics (8002): Prometheus text (Triton's and user_cache's), scraped in-cluster, never routed
  by the Ingress.
- The balancer (nginx locally, the Ingress in Kubernetes) forwards EDGE_RPCS only: an admin RPC
  never reaches a replica from outside, with a key or without.

`python -m deploy.production --help` prints the docker line or the argument list.
"""

from __future__ import annotations

import argparse
import shlex
import sys

IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
BINARY = "tritonserver"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
MODEL_REPOSITORY = "/models"
# Triton's CUDA memory pool for user_kv between the two GPU ensemble steps (README, Production).
CUDA_MEMORY_POOL_BYTES = 256 << 20

# The key of the restricted protocols and where its value comes from: an environment variable
# (a Kubernetes Secret in deploy/k8s/), never a literal in a command line that is committed.
ADMIN_KEY = "admin-key"
ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"
GRPC_RESTRICTED = ("shared-memory", "model-repository", "statistics", "trace", "logging")
HTTP_RESTRICTED = ("inference", "metadata", "model-config", "shared-memory", "model-repository",
                   "statistics", "trace", "logging")

# gRPC methods the edge forwards, by Triton's protocol group. ModelConfig belongs to Triton's
# "model-config" group: the client reads the task names and the request limits from it, and it
# tells no more than the metadata does.
_TRITON = "/inference.GRPCInferenceService/"
EDGE_RPCS: dict[str, tuple[str, ...]] = {
    "health": (_TRITON + "ServerLive", _TRITON + "ServerReady", _TRITON + "ModelReady",
               "/grpc.health.v1.Health/Check"),
    "metadata": (_TRITON + "ServerMetadata", _TRITON + "ModelMetadata", _TRITON + "ModelConfig"),
    "inference": (_TRITON + "ModelInfer", _TRITON + "ModelStreamInfer"),
}


def edge_paths() -> list[str]:
    """Every gRPC method path the balancer forwards (HTTP/2 `:path` = /package.Service/Method)."""
    return [path for group in EDGE_RPCS.values() for path in group]


def grpc_admin_header(key: str = ADMIN_KEY) -> str:
    """The gRPC metadata key Triton 2.51 checks for a restricted protocol."""
    return f"triton-grpc-protocol-{key}"


def grpc_restriction(admin_key: str) -> str:
    """`--grpc-restricted-protocol=<protocols>:<key>=<value>`. Triton 2.51's --help writes a
    comma before the key, but its parser splits on the colon: with a comma it exits at start."""
    return f"--grpc-restricted-protocol={','.join(GRPC_RESTRICTED)}:{ADMIN_KEY}={admin_key}"


def http_restriction(admin_key: str) -> str:
    return f"--http-restricted-api={','.join(HTTP_RESTRICTED)}:{ADMIN_KEY}={admin_key}"


def tritonserver_args(admin_key: str, repository: str = MODEL_REPOSITORY) -> list[str]:
    """The production command, `tritonserver` first. `admin_key` is the value as the launcher
    expands it: "$TRITON_ADMIN_KEY" in a shell, "$(TRITON_ADMIN_KEY)" in a Kubernetes spec."""
    return [
        BINARY,
        f"--model-repository={repository}",
        "--model-control-mode=none",
        f"--grpc-port={GRPC_PORT}",
        grpc_restriction(admin_key),
        "--allow-http=true",
        f"--http-port={HTTP_PORT}",
        http_restriction(admin_key),
        "--allow-metrics=true",
        f"--metrics-port={METRICS_PORT}",
        "--backend-config=onnxruntime,enable-global-threadpool=true",
        f"--cuda-memory-pool-byte-size=0:{CUDA_MEMORY_POOL_BYTES}",
    ]


def kubernetes_args() -> list[str]:
    """The container's args (after `tritonserver`): the key from the pod's environment."""
    return tritonserver_args(f"$({ADMIN_KEY_ENV})")[1:]


def _shell_word(arg: str) -> str:
    """Quote for a POSIX shell, leaving `$VAR` to the shell (double quotes)."""
    return f'"{arg}"' if "$" in arg else shlex.quote(arg)


def docker_command(width: int = 98) -> str:
    """The README's docker line: the same arguments, the key from $TRITON_ADMIN_KEY. Lines
    wrap between words (an option and its value stay together) with a shell continuation."""
    units = ["docker run --gpus=1 --rm --shm-size=1g", f"-p 127.0.0.1:{GRPC_PORT}:{GRPC_PORT}",
             f"-p 127.0.0.1:{METRICS_PORT}:{METRICS_PORT}",
             f'-v "$PWD/model_repository:{MODEL_REPOSITORY}"', IMAGE]
    units += [_shell_word(a) for a in tritonserver_args(f"${ADMIN_KEY_ENV}")]
    lines = [units[0]]
    for unit in units[1:]:
        if len(lines[-1]) + 1 + len(unit) <= width:
            lines[-1] += " " + unit
        else:
            lines.append("    " + unit)
    return " \\\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deploy.production",
        description="Print the production tritonserver command (the one source of the README's "
                    "docker line and of deploy/k8s/).")
    p.add_argument("--args", action="store_true",
                   help="one tritonserver argument per line (Kubernetes form) instead of the "
                        "docker line")
    args = p.parse_args(argv)
    print("\n".join(kubernetes_args()) if args.args else docker_command())
    return 0


if __name__ == "__main__":
    sys.exit(main())
