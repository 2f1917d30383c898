"""A model from outside the package, served end to end: tests/byom/byom_ranker.py (its own
features, a bidirectional history) is exported by the real command, `python -m export.family`,
with only its folder on PYTHONPATH, then served by a real tritonserver (local flavour) through
its `ranker` ensemble. split (`ranker`) == naive (`ranker_naive`) == the model's own torch
forward within 1e-5 over an L x N grid with the edge cases; a request whose history lengths
disagree is refused with the guard's name and the next valid request is still exact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.family import load_family
from export.split_contract import naive_scores
from export.split_fuzz import as_torch, max_diff, random_request
from tests.split_serving import infer, refused_by_name_then_exact, serving

REPO_ROOT = Path(__file__).resolve().parent.parent
BYOM_DIR = REPO_ROOT / "tests" / "byom"
CONFIG = BYOM_DIR / "byom_ranker.json"
TOLERANCE = 1e-5
LENGTHS = [0, 1, 10, 30]  # 30 > max_history = 24: the newest 24 kept
CANDIDATE_COUNTS = [0, 1, 5]

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module):
    """(family, gRPC client): the repository pair written by the real export command, served by
    a local tritonserver that is stopped by PID at the end of the module."""
    repository = tmp_path_factory.mktemp("byom") / "model_repository_byom"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(BYOM_DIR)])}
    result = subprocess.run([sys.executable, "-m", "export.family", "--config", str(CONFIG),
                             "--output", str(repository)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "family byom_bidirectional from byom_ranker:build" in result.stdout
    assert "passes the native onnxruntime backend's load-time rules" in result.stdout
    # bidirectional: no append graph; the oracle in the evaluation repository beside it
    assert sorted(p.name for p in repository.iterdir()) == ["ranker", "target_fusion",
                                                            "user_encoder"]
    assert [p.name for p in repository.with_name(f"{repository.name}_evaluation").iterdir()] \
        == ["ranker_naive"]
    monkeypatch_module.syspath_prepend(str(BYOM_DIR))  # the torch model, for the oracle
    family = load_family(CONFIG)
    with serving(repository) as client:
        yield family, client


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("n", CANDIDATE_COUNTS)
def test_ranker_equals_naive(served, length: int, n: int) -> None:
    family, client = served
    request = random_request(family.contract, np.random.default_rng(100 * length + n), length, n)
    split = infer(client, family.contract, "ranker", request)
    naive = infer(client, family.contract, "ranker_naive", request)
    with torch.no_grad():
        oracle = naive_scores(family.model, as_torch(request)).numpy()
    assert split.shape == (n, 1) and np.isfinite(split).all()
    assert max_diff(split, naive) <= TOLERANCE
    assert max_diff(split, oracle) <= TOLERANCE


def test_bad_lengths_refused_by_name_then_exact(served) -> None:
    family, client = served
    request = random_request(family.contract, np.random.default_rng(9), 12, 4)
    refused_by_name_then_exact(client, family.contract, request, "history_ratings", 1, TOLERANCE)
