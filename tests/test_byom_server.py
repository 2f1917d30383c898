"""A model from outside the package, served end to end: tests/byom/byom_ranker.py (its own
features, a bidirectional history) is exported by the real command, `python -m export.family`,
with only its folder on PYTHONPATH, then served by a real tritonserver (local flavour) and
driven by the project's client, which knows the model only from the declaration the server
publishes. split (`ranker`) == naive (`ranker_naive`) == the model's own torch forward within
1e-5 over an L x N grid with the edge cases; a request whose history lengths disagree is refused
by the client naming the features and, sent anyway, by every ensemble with the guard's rule, and
the next valid request is exact; `python -m client validate` passes against it; `ranker_cached`
serves it with hits and misses only (bidirectional: no append), each answer equal to
ranker_naive."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client.api import RankerClient
from export.family import load_family
from export.split_contract import naive_scores
from export.split_fuzz import as_torch, max_diff, random_request
from tests.split_serving import refused_by_name_then_exact, serving

REPO_ROOT = Path(__file__).resolve().parent.parent
BYOM_DIR = REPO_ROOT / "tests" / "byom"
CONFIG = BYOM_DIR / "byom_ranker.json"
TOLERANCE = 1e-5
LENGTHS = [0, 1, 10, 30]  # 30 > max_history = 24: the newest 24 kept
CANDIDATE_COUNTS = [0, 1, 5]

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module):
    """(family, gRPC url): the repository pair written by the real export command, served by a
    local tritonserver that is stopped by PID at the end of the module."""
    repository = tmp_path_factory.mktemp("byom") / "model_repository_byom"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(BYOM_DIR)])}
    result = subprocess.run([sys.executable, "-m", "export.family", "--config", str(CONFIG),
                             "--output", str(repository)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "family byom_bidirectional from byom_ranker:build" in result.stdout
    assert "passes the native onnxruntime backend's load-time rules" in result.stdout
    # bidirectional: the user cache without an append graph; the oracle in the evaluation
    # repository beside it
    assert sorted(p.name for p in repository.iterdir()) == [
        "ranker", "ranker_cached", "target_fusion", "user_cache", "user_encoder"]
    assert [p.name for p in repository.with_name(f"{repository.name}_evaluation").iterdir()] \
        == ["ranker_naive"]
    monkeypatch_module.syspath_prepend(str(BYOM_DIR))  # the torch model, for the oracle
    family = load_family(CONFIG)
    with serving(repository) as url:
        yield family, url


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_client_reads_the_model_from_the_server(served) -> None:
    family, url = served
    with RankerClient(url) as client:
        for model in ("ranker", "ranker_naive", "ranker_cached"):
            info = client.model_info(model)
            assert info.contract == family.contract, model
            assert (info.num_tasks, info.task_names) == (1, ("buy",)), model
            assert info.max_candidates == family.plan.max_candidates, model
        assert client.model_info("ranker_cached").needs_user_id


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("n", CANDIDATE_COUNTS)
def test_ranker_equals_naive(served, length: int, n: int) -> None:
    family, url = served
    request = random_request(family.contract, np.random.default_rng(100 * length + n), length, n)
    with RankerClient(url) as client:  # a feature dict, built and checked from the declaration
        split = client.score(request, "ranker")
        naive = client.score(request, "ranker_naive")
    with torch.no_grad():
        oracle = naive_scores(family.model, as_torch(request)).numpy()
    assert split.shape == (n, 1) and np.isfinite(split).all()
    assert max_diff(split, naive) <= TOLERANCE
    assert max_diff(split, oracle) <= TOLERANCE


def test_bad_lengths_refused_by_name_then_exact(served) -> None:
    family, url = served
    request = random_request(family.contract, np.random.default_rng(9), 12, 4)
    refused_by_name_then_exact(url, family.contract, request, "history_ratings", 1, TOLERANCE)


def test_cli_validate(served) -> None:
    """The command line knows nothing of this model: generated requests from its declared
    roles and the generic edge cases, ranker against ranker_naive."""
    _, url = served
    result = subprocess.run([sys.executable, "-m", "client", "--url", url, "validate",
                             "--count", "4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "family byom_bidirectional, max_history 24" in result.stderr
    assert "oracle skipped: 0, failed: 0" in result.stdout  # every request compared
    assert "max_candidates = 64, not sent: candidates_1000" in result.stdout
    assert result.stdout.rstrip().endswith("PASS")


def test_cached_hits_and_misses_equal_naive(served) -> None:
    """One user through ranker_cached: the same history again is a hit; a longer one, a
    changed event or a history past max_history is a miss (a bidirectional history is
    re-encoded, never appended); every answer equals ranker_naive within 1e-5."""
    family, url = served
    contract = family.contract
    user = random_request(contract, np.random.default_rng(31), 40, 0)
    events = {f.name: user[f.name] for f in contract.history_features}
    story = [(10, None, "miss"), (10, None, "hit"),
             (12, None, "miss"),  # two new events: a causal model would append
             (12, None, "hit"),
             (12, 5, "miss"),  # a past event's rating changed
             (30, None, "miss"), (30, None, "hit"),  # past max_history: the newest 24 kept
             (0, None, "miss"), (0, None, "hit")]
    with RankerClient(url) as client:
        for step, (length, rewrite, expected) in enumerate(story):
            request = random_request(contract, np.random.default_rng(step), length, 6)
            request.update({name: v[:length].copy() for name, v in events.items()})
            if rewrite is not None:
                request["history_ratings"][rewrite] += 1.0
            scores, path, _ = client.score_cached(request, user_id=5)
            naive = client.score(request, "ranker_naive")
            diff = max_diff(scores, naive)
            assert (path, diff <= TOLERANCE) == (expected, True), (step, length, path, diff)
