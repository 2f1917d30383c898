"""scripts/serve.sh as a user runs it: foreground, ready message, clean stop on SIGTERM, clear
errors for a taken port and for a model that fails to load; --help on every command."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from export.repositories import copy_repositories
from local_server.processes import is_running
from local_server.triton import ServerError, free_port, start_server
from tests.conftest import Output

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE = [str(REPO_ROOT / "scripts" / "serve.sh")]


@pytest.mark.server
def test_serve_foreground_ready_and_sigterm(small_repository: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*SERVE, "--grpc-port", str(port), "--repository", str(small_repository)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = Output(proc)
    try:
        ready = output.readline(240)
        while ready and "serve: ready" not in ready:
            ready = output.readline(240)
        assert "serve: ready" in ready, "".join(output.seen)
        assert f"127.0.0.1:{port}" in ready and "ranker_naive" in ready
        server_pid = int(ready.split("tritonserver pid ")[1].split(";")[0])
        assert is_running(server_pid)
        proc.send_signal(signal.SIGTERM)
        out = output.rest(60)
        assert proc.returncode == 0, out
        assert "stopped tritonserver" in out
        assert not is_running(server_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


@pytest.mark.server
def test_serve_watchdog_restarts_after_a_stub_dies(small_repository: Path) -> None:
    """A dead python-backend stub leaves its model failing while 'ready' (Triton 2.51); the
    watchdog of serve.sh notices and restarts the server on the same port: exact again."""
    from client.api import RankerClient, RankerError
    from export.reference_features import reference_generator
    from local_server.processes import stub_pids, wait_gone
    from tests.conftest import SMALL

    port = free_port()
    proc = subprocess.Popen(
        [*SERVE, "--grpc-port", str(port), "--repository", str(small_repository),
         "--watchdog-interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = Output(proc)
    try:
        ready = ""
        while "serve: ready" not in ready:
            ready = output.readline(240)
            assert ready, "serve.sh exited before it was ready"
        server_pid = int(ready.split("tritonserver pid ")[1].split(";")[0])
        request = reference_generator(seed=4, profile_dim=SMALL["profile_dim"]).request(60, 12)
        with RankerClient(f"127.0.0.1:{port}", timeout_s=20, retries=8) as client:
            expected = client.score(request, model="ranker_naive")
            (victim,) = stub_pids(server_pid, "target_fusion")
            os.kill(victim, signal.SIGKILL)
            assert wait_gone([victim], 5.0) == []
            line = output.readline(60)
            assert "stub died: stub:target_fusion; restarting" in line, line
            line = output.readline(240)
            assert "serve: ready again" in line, line
            scores = None
            deadline = time.monotonic() + 60
            while scores is None and time.monotonic() < deadline:
                try:
                    scores = client.score(request)
                except RankerError:
                    time.sleep(0.5)
            assert scores is not None, "no answer after the watchdog restart"
            np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0)
        proc.send_signal(signal.SIGTERM)
        out = output.rest(60)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def test_serve_reports_a_taken_port(small_repository: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*SERVE, "--grpc-port", str(port), "--repository", str(small_repository)],
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert f"gRPC port {port} on 127.0.0.1 is already in use" in result.stderr


@pytest.mark.server
def test_model_that_fails_to_load_shows_the_servers_error(
    small_repository: Path, tmp_path: Path
) -> None:
    broken = copy_repositories(small_repository, tmp_path / "repo")
    (broken / "target_fusion" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    with pytest.raises(ServerError) as info:
        start_server(grpc_port=free_port(), repository=broken, timeout_s=240)
    message = str(info.value)
    assert "target_fusion" in message and "exited" in message, message


def test_serve_needs_exported_models(tmp_path: Path, small_repository: Path) -> None:
    bare = copy_repositories(small_repository, tmp_path / "repo")
    (bare / "user_encoder" / "1" / "model.onnx").unlink()
    with pytest.raises(ServerError, match="run `python -m export` first"):
        start_server(grpc_port=free_port(), repository=bare)


@pytest.mark.parametrize("command", [
    ["scripts/serve.sh"], ["scripts/main.sh"], ["scripts/test.sh"], ["scripts/setup.sh"],
    ["scripts/bench.sh"], [sys.executable, "-m", "export"],
    [sys.executable, "-m", "export.triton_configs"], [sys.executable, "-m", "client"],
    [sys.executable, "-m", "export.native_rules"], ["scripts/load_test.sh"],
    [sys.executable, "-m", "benchmarks.long_history"],
    [sys.executable, "-m", "benchmarks.user_cache"],
    ["scripts/gpu_check.sh"],
    [sys.executable, "-m", "benchmarks.perf_inputs"],
    [sys.executable, "-m", "local_server.repository"],
    [sys.executable, "-m", "benchmarks.report"],
    [sys.executable, "-m", "export.hstu_export"],
    [sys.executable, "-m", "export.family"], [sys.executable, "-m", "export.check"],
])
def test_every_command_has_help(command: list[str]) -> None:
    result = subprocess.run([*command, "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_serve_needs_the_evaluation_repository_unless_told(tmp_path: Path,
                                                          small_repository: Path) -> None:
    """The oracle lives in the evaluation repository beside the serving one: without it the
    local server says where it looked (serve.sh --no-evaluation serves the serving one only)."""
    alone = tmp_path / "serving_only"
    shutil.copytree(small_repository, alone, symlinks=True)
    with pytest.raises(ServerError, match=r"no evaluation repository at .*serving_only_evaluation"):
        start_server(grpc_port=free_port(), repository=alone)
    result = subprocess.run([*SERVE, "--help"], capture_output=True, text=True, timeout=60)
    assert "--no-evaluation" in result.stdout and "--evaluation-repository" in result.stdout


def test_explicit_model_control_turns_the_watchdog_off() -> None:
    """Under explicit model control a stub exits whenever its model is unloaded or reloaded:
    serve.sh refuses a watchdog there instead of restarting the server on every reload."""
    result = subprocess.run([*SERVE, "--model-control", "explicit", "--watchdog-interval", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "--watchdog-interval needs --model-control none" in result.stderr
    with pytest.raises(ServerError, match="model control must be one of"):
        start_server(grpc_port=free_port(), model_control="poll")
