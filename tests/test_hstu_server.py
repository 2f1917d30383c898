"""The HSTU family served by a real tritonserver through its `ranker` and `ranker_cached`
ensembles, from its declaration: export/split_repository.py's repository pair, the local flavour
built from its production configs unchanged, requests sent by the project's client, which knows
the family only from the declaration the server publishes. split (`ranker`) == naive
(`ranker_naive`) within 1e-5 over an L x N grid with the edge cases; returning users through the
user-state cache (`ranker_cached`: the declared state tensors user_k, user_v and user_timestamps
held per user, the four event features compared) take every path - miss, hit, append, a
rewritten past event, past max_history - each answer equal to ranker_naive and its `cache_path`
the expected one; a request whose lengths disagree is refused by the client naming the features
and, sent anyway, by all three ensembles with the guard's name, and the server stays exact;
`python -m client validate` and `score` work against it unchanged."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from client.api import RankerClient
from export.hstu import HSTUConfig, build_hstu
from export.hstu_export import write_hstu_repositories
from export.native_rules import check_repositories
from export.repositories import evaluation_beside
from export.split_export import GRAPHS
from tests.split_serving import refused_by_name_then_exact, serving
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


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(the model's declaration, gRPC url) of a local tritonserver serving the HSTU repository
    pair; the server is stopped by PID at the end of the module."""
    model = build_hstu(CFG)
    repository = tmp_path_factory.mktemp("hstu") / "model_repository_hstu"
    write_hstu_repositories(model, repository, graphs=GRAPHS,
                            source="tests/test_hstu_server.py")
    assert not [v for found in check_repositories(repository).values() for v in found]
    assert sorted(p.name for p in repository.iterdir()) == [
        "ranker", "ranker_cached", "target_fusion", "user_cache", "user_encoder",
        "user_encoder_append"]
    assert [p.name for p in evaluation_beside(repository).iterdir()] == ["ranker_naive"]
    with serving(repository) as url:
        yield model.contract(), url


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
    refused_by_name_then_exact(url, contract, request, "history_dwell_seconds", 3, TOLERANCE)


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


def visit(history: dict[str, np.ndarray], length: int, seed: int,
          rewrite: int | None = None) -> dict[str, np.ndarray]:
    """A request of the user whose events are `history`: its first `length` events (with event
    `rewrite`'s item changed), new candidates and a request time after the newest event."""
    rng = np.random.default_rng(seed)
    request = {n: v[:length].copy() for n, v in history.items()}
    if rewrite is not None:
        request["history_item_ids"][rewrite] += 1
    newest = int(request["history_timestamps"][-1]) if length else 1_600_000_000
    request["candidate_item_ids"] = rng.integers(0, 10**12, 7)
    request["request_timestamp"] = np.array([newest + int(rng.integers(1, 5000))], np.int64)
    return request


def test_returning_users_through_the_cache_equal_naive(served) -> None:
    """One user's story through ranker_cached (max_history 48): every answer equals
    ranker_naive within 1e-5 and reports the path it took. Dwell times include a NaN (the
    event comparison is by content: the same NaN is the same event)."""
    _, url = served
    full = {n: v for n, v in random_request(np.random.default_rng(21), 80, 1).items()
            if n.startswith("history_")}
    full["history_dwell_seconds"][4] = np.nan
    story = [(20, None, "miss"), (20, None, "hit"), (23, None, "append"),  # ΔL = 3
             (40, None, "append"), (40, None, "hit"), (48, None, "append"),  # fills it exactly
             (52, None, "miss"),  # past max_history: the oldest drop, every position shifts
             (52, None, "hit"),  # an over-long repeat: the same newest 48 events
             (53, None, "miss"),  # grown past max_history
             (30, 10, "miss"),  # a past event changed (and shorter)
             (31, 10, "append"),  # then one new event after the rewrite
             (31, 3, "miss"),  # another past event changed
             (0, None, "miss"), (0, None, "hit"), (5, None, "append")]  # from no history
    # validate=False: the client refuses non-finite floats; the graph reads a NaN dwell as 0
    with RankerClient(url, validate=False) as client:
        for step, (length, rewrite, expected) in enumerate(story):
            request = visit(full, length, step, rewrite)
            scores, path, _ = client.score_cached(request, user_id=7)
            naive = client.score(request, "ranker_naive")
            assert scores.shape == naive.shape == (7, CFG.num_tasks)
            diff = max_diff(scores, naive)
            assert (path, diff <= TOLERANCE) == (expected, True), (step, length, path, diff)
        request = visit(full, 5, 99)  # another user with user 7's events: never user 7's entry
        scores, path, _ = client.score_cached(request, user_id=8)
        assert path == "miss"
        assert max_diff(scores, client.score(request, "ranker_naive")) <= TOLERANCE
