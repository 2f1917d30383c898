"""Through a real tritonserver (local flavour) over gRPC: the ensemble equals ranker_naive, and
user_encoder runs once per ensemble request whatever N is.

The server is started on free localhost ports by the `server` fixture (tests/conftest.py)
and stopped by PID. These tests never skip: a server that cannot start fails them.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from client.api import RankerClient
from client.traffic import edge_case_requests
from export.reference_features import profile_dim_of, reference_generator
from tests.conftest import SMALL

pytestmark = pytest.mark.server
TOLERANCE = 1e-5


def test_all_models_ready(server) -> None:
    with RankerClient(server.grpc_url) as client:
        assert client.is_live()
        for model in ("ranker", "ranker_naive", "ranker_base", "user_encoder", "target_fusion"):
            assert client.is_ready(model), model
        info = client.model_info("ranker")
        assert info.contract.family == "reference"
        assert profile_dim_of(info.contract) == SMALL["profile_dim"]
        assert list(info.task_names) == list(SMALL["task_names"])


def test_ensemble_equals_naive(server) -> None:
    gen = reference_generator(seed=21, profile_dim=SMALL["profile_dim"])
    requests = [("random", gen.request(length, n)) for length, n in
                [(1, 1), (7, 2), (64, 17), (256, 50), (SMALL["max_history"], 5), (420, 9)]]
    requests += edge_case_requests(gen, SMALL["max_history"])
    with RankerClient(server.grpc_url) as client:
        for name, request in requests:
            split = client.score(request, model="ranker")
            naive = client.score(request, model="ranker_naive")
            assert split.shape == (request.num_candidates, SMALL["num_tasks"]), name
            assert np.isfinite(split).all(), name
            diff = float(np.abs(split - naive).max()) if split.size else 0.0
            assert diff <= TOLERANCE, f"{name}: ensemble differs from naive by {diff:.2e}"


def test_user_encoder_runs_once_per_request(server) -> None:
    gen = reference_generator(seed=5, profile_dim=SMALL["profile_dim"])
    with RankerClient(server.grpc_url) as client:
        before = {m: client.inference_count(m) for m in ("ranker", "user_encoder",
                                                          "target_fusion")}
        sizes = [1, 10, 100, 1000]
        for n in sizes:
            client.score(gen.request(200, n), model="ranker")
        # Triton records a request's statistics just after its response is sent: poll briefly.
        deadline = time.monotonic() + 10
        while True:
            after = {m: client.inference_count(m) for m in before}
            done = all(after[m][0] - before[m][0] >= len(sizes) for m in before)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    for model in before:
        inferences = after[model][0] - before[model][0]
        executions = after[model][1] - before[model][1]
        assert inferences == len(sizes), (model, inferences)
        assert executions == len(sizes), (model, executions)


def test_rank_orders_by_task(server) -> None:
    gen = reference_generator(seed=8, profile_dim=SMALL["profile_dim"])
    request = gen.request(100, 30)
    with RankerClient(server.grpc_url) as client:
        scores = client.score(request)
        ranked = client.rank(request, task="like")
    like = scores[:, 1]
    assert [score for _, score in ranked] == sorted(like.tolist(), reverse=True)
    assert sorted(item for item, _ in ranked) == sorted(request.candidate_item_ids.tolist())


def test_client_cli_validate_and_score(server, tmp_path) -> None:
    url = ["--url", server.grpc_url]
    validate = subprocess.run(
        [sys.executable, "-m", "client", *url, "validate", "--count", "8",
         "--max-history", str(SMALL["max_history"])],
        capture_output=True, text=True, timeout=600,
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "max |ranker - ranker_naive|" in validate.stdout and "PASS" in validate.stdout
    saved = tmp_path / "request.json"
    score = subprocess.run(
        [sys.executable, "-m", "client", *url, "score", "--history-length", "50",
         "--num-candidates", "12", "--top", "3", "--save-request", str(saved)],
        capture_output=True, text=True, timeout=120,
    )
    assert score.returncode == 0, score.stdout + score.stderr
    again = subprocess.run(
        [sys.executable, "-m", "client", *url, "score", "--request", str(saved), "--top", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert again.returncode == 0, again.stderr
    def ranked_rows(out: str) -> list[str]:
        return [line for line in out.splitlines() if line.strip()[:1].isdigit()]

    assert len(ranked_rows(score.stdout)) == 3
    assert ranked_rows(score.stdout) == ranked_rows(again.stdout)


def test_client_refuses_above_the_served_limit(server) -> None:
    """The client reads max_candidates from the served config and refuses before sending."""
    from client.validation import RequestError

    gen = reference_generator(seed=2, profile_dim=SMALL["profile_dim"])
    with RankerClient(server.grpc_url) as client:
        assert client.model_info("ranker").max_candidates == 20_000
        with pytest.raises(RequestError, match="exceed the served limit of 20000"):
            client.score(gen.request(10, 20_001))
