"""The HSTU family served by a real tritonserver through its `ranker` ensemble, from its
declaration: export/split_repository.py's repository pair, the local flavour built from its
production configs unchanged, requests sent by the project's client, which knows the family only
from the declaration the server publishes. split (`ranker`) == naive (`ranker_naive`) within
1e-5 over an L x N grid with the edge cases; a request whose lengths disagree is refused by the
client naming the features and, sent anyway, by the server with the guard's name, and the server
stays exact; `python -m client validate` and `score` work against it unchanged."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from client.api import RankerClient, RankerError
from client.request import RequestError
from export.guards import length_rule
from export.hstu import HSTUConfig, build_hstu
from export.hstu_export import write_hstu_repositories
from export.native_rules import check_repositories
from export.repositories import evaluation_beside
from tests.test_hstu import TOLERANCE, max_diff, random_request

pytestmark = pytest.mark.server

# Small: two attending layers, max_history 48, query blocks of 16 rows (a 40-event history and
# 20 candidates each run several blocks of the attention's Loop).
CFG = HSTUConfig(d_model=32, num_heads=2, num_layers=3, attention_dim=8, hidden_dim=8,
                 max_history=48, item_buckets=1009, action_buckets=7, position_buckets=32,
                 time_buckets=20, head_hidden=16, attention_block=16, max_candidates=500,
                 seed=5)
LENGTHS = [0, 1, 40, 75]  # 40 > attention_block; 75 > max_history (the newest 48 kept)
CANDIDATE_COUNTS = [0, 1, 20]
SERVED = ("user_encoder", "target_fusion", "ranker_naive")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(the model's declaration, gRPC url) of a local tritonserver serving the HSTU repository
    pair; the server is stopped by PID at the end of the module."""
    from local_server.triton import free_port, start_server

    model = build_hstu(CFG)
    serving = tmp_path_factory.mktemp("hstu") / "model_repository_hstu"
    write_hstu_repositories(model, serving, graphs=SERVED, source="tests/test_hstu_server.py")
    assert not [v for found in check_repositories(serving).values() for v in found]
    assert sorted(p.name for p in serving.iterdir()) == ["ranker", "target_fusion",
                                                         "user_encoder"]
    assert [p.name for p in evaluation_beside(serving).iterdir()] == ["ranker_naive"]
    server = start_server(grpc_port=free_port(), repository=serving, timeout_s=240)
    try:
        yield model.contract(), server.grpc_url
    finally:
        server.stop()


def test_client_reads_the_family_from_the_server(served) -> None:
    contract, url = served
    with RankerClient(url) as client:
        for model in ("ranker", "ranker_naive"):
            info = client.model_info(model)
            assert info.contract == contract
            assert (info.num_tasks, info.task_names) == (CFG.num_tasks, CFG.task_names)
            assert info.max_history == CFG.max_history


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("n", CANDIDATE_COUNTS)
def test_ranker_equals_naive(served, length: int, n: int) -> None:
    _, url = served
    request = random_request(np.random.default_rng(100 * length + n), length, n)
    with RankerClient(url) as client:  # a feature dict, built and checked from the declaration
        split = client.score(request, "ranker")
        naive = client.score(request, "ranker_naive")
    assert split.shape == (n, CFG.num_tasks)
    assert np.isfinite(split).all()
    assert max_diff(split, naive) <= TOLERANCE


def test_bad_lengths_refused_by_name_then_exact(served) -> None:
    contract, url = served
    request = random_request(np.random.default_rng(9), 30, 5)
    short = {**request, "history_dwell_seconds": request["history_dwell_seconds"][:3]}
    rule = length_rule([f.name for f in contract.history_features], "L")
    with RankerClient(url) as client, pytest.raises(RequestError) as refused:
        client.score(short, "ranker")
    assert "history_item_ids has 30 but history_dwell_seconds has 3" in str(refused.value)
    with RankerClient(url, validate=False) as raw:  # sent anyway: the server's guards refuse
        for model in ("ranker", "ranker_naive"):
            with pytest.raises(RankerError) as info:
                raw.score(short, model)
            assert rule in str(info.value), str(info.value)
        split = raw.score(request, "ranker")
        assert split.shape == (5, CFG.num_tasks)
        assert max_diff(split, raw.score(request, "ranker_naive")) <= TOLERANCE


def test_a_feature_dict_of_lists_as_in_the_readme(served) -> None:
    _, url = served
    values = {"history_item_ids": [11, 12], "history_action_ids": [1, 2],
              "history_timestamps": [1_700_000_000, 1_700_000_050],
              "history_dwell_seconds": [3.5, 20.0], "candidate_item_ids": [7, 8, 9],
              "request_timestamp": [1_700_000_100]}
    with RankerClient(url) as client:
        scores = client.score(values)
        outputs = client.infer(values, "ranker_naive")
        ranked = client.rank(values, task="like")
    assert scores.shape == (3, CFG.num_tasks) and list(outputs) == ["scores"]
    assert max_diff(scores, outputs["scores"]) <= TOLERANCE
    assert sorted(item for item, _ in ranked) == [7, 8, 9]


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client", "--url", url, *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_validate_and_score(served, tmp_path) -> None:
    """The command line knows nothing of HSTU: generated requests (from the declared roles) and
    the generic edge cases (L = 0, N = 1, L past max_history, extreme ids) through ranker and
    ranker_naive; a saved request replays to the same ranking."""
    _, url = served
    validate = run_cli(url, "validate", "--count", "6")
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "family hstu, max_history 48" in validate.stderr
    assert "PASS" in validate.stdout
    assert "oracle skipped: 0, failed: 0" in validate.stdout  # every request compared
    assert "max_candidates = 500, not sent: candidates_1000" in validate.stdout
    saved = tmp_path / "hstu_request.json"
    score = run_cli(url, "score", "--history-length", "60", "--num-candidates", "8", "--top",
                    "3", "--save-request", str(saved))
    assert score.returncode == 0, score.stdout + score.stderr
    assert "candidate_item_ids" in score.stdout and "click" in score.stdout
    again = run_cli(url, "score", "--request", str(saved), "--top", "3")
    assert again.returncode == 0, again.stderr
    rows = [[line for line in out.splitlines() if line.strip()[:1].isdigit()]
            for out in (score.stdout, again.stdout)]
    assert len(rows[0]) == 3 and rows[0] == rows[1]
