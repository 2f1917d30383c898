"""Triton's own tools on our repository, as a new user runs them: a local repository written
with `--out` and served by the wheel's tritonserver started from another directory with no
PYTHONPATH (Model Analyzer's local launch mode), explicit model control with every model loaded,
and perf_analyzer driving the composing models with the generated --input-data files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.perf_analyzer import perf_analyzer_env, perf_analyzer_path
from benchmarks.perf_inputs import write_inputs
from export.repositories import evaluation_beside
from local_server.triton import LocalServer, free_port
from tests.conftest import small_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def _local_repositories(small_repository: Path, out: Path) -> list[Path]:
    """`python -m local_server.repository --out` from a directory that is not the root."""
    result = subprocess.run(
        [sys.executable, "-m", "local_server.repository", "--out", str(out),
         "--repository", str(small_repository)],
        cwd=out.parent, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr
    return [out, evaluation_beside(out)]


@pytest.mark.server
def test_explicit_server_from_another_directory_and_perf_analyzer(
    small_repository: Path, tmp_path: Path
) -> None:
    import tritonclient.grpc as grpcclient

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    repositories = _local_repositories(small_repository, tmp_path / "local")
    models = sorted(p.parent.name for r in repositories for p in r.glob("*/config.pbtxt"))
    port = free_port()
    args = [str(REPO_ROOT / "scripts" / "tritonserver.sh"),
            *(f"--model-repository={r}" for r in repositories),
            "--model-control-mode=explicit", "--load-model=*", "--strict-readiness=true",
            "--exit-on-error=true", f"--grpc-port={port}", "--allow-http=false",
            "--allow-metrics=false", f"--log-file={tmp_path / 'tritonserver.log'}"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = LocalServer(args, env, port, None, None, tmp_path / "tritonserver.log", models,
                         cwd=elsewhere)
    server.launch()
    try:
        server.wait_ready(240)
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            index = {m.name: m.state for m in client.get_model_repository_index().models}
            assert index == {m: "READY" for m in models}, index
            # explicit mode: the model control API is open (what Model Analyzer's remote mode
            # needs); unload and load one model back
            client.unload_model("ranker_base")
            assert not client.is_model_ready("ranker_base")
            client.load_model("ranker_base")
            assert client.is_model_ready("ranker_base")

        inputs = write_inputs(tmp_path / "inputs", [small_repository,
                                                    evaluation_beside(small_repository)],
                              small_config("causal"), 120, 7, 2, 5, seed=1,
                              only=["target_fusion", "user_encoder_append"])
        for model, path in inputs.items():
            report = tmp_path / f"{model}.csv"
            result = subprocess.run(
                [str(perf_analyzer_path()), "-m", model, "-i", "grpc", "-u", server.grpc_url,
                 "--input-data", str(path), "--measurement-mode", "count_windows",
                 "--measurement-request-count", "5", "-f", str(report),
                 # the check is that perf_analyzer drives the model with these inputs, not a
                 # stable figure on a shared CI machine: any 3 windows count as stable
                 "-s", "1000", "-r", "5"],
                env=perf_analyzer_env(), cwd=elsewhere, capture_output=True, text=True,
                timeout=300)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
            assert "Throughput:" in result.stdout, result.stdout
        # what the files hold: a real user_kv of L = 120 events for target_fusion; the cached
        # state of the first 115 events plus the 5 new ones for user_encoder_append
        fusion = json.loads(inputs["target_fusion"].read_text())["data"][0]
        assert fusion["user_kv"]["shape"][3] == 120 and fusion["candidate_item_ids"]["shape"] == [7]
        append = json.loads(inputs["user_encoder_append"].read_text())["data"][0]
        assert append["cached_user_kv"]["shape"][3] == 115
        assert append["history_item_ids"]["shape"] == [5]
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            stats = client.get_inference_statistics(as_json=True)["model_stats"]
        served = {s["name"]: int(s["inference_stats"]["success"].get("count", 0)) for s in stats}
        assert served["target_fusion"] >= 5 and served["user_encoder_append"] >= 5, served
    finally:
        server.stop()
