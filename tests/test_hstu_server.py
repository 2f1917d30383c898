"""The HSTU family served by a real tritonserver through its `ranker` ensemble, from its
declaration: export/split_repository.py's repository pair, the local flavour built from its
production configs unchanged, raw tritonclient gRPC requests built from the declared features.
split (`ranker`) == naive (`ranker_naive`) within 1e-5 over an L x N grid with the edge cases; a
request whose lengths disagree is refused with the guard's name, and the server stays exact."""

from __future__ import annotations

import numpy as np
import pytest

from export.hstu import HSTUConfig, build_hstu, hstu_contract
from export.hstu_export import write_hstu_repositories
from export.native_rules import check_repositories
from export.repositories import evaluation_beside
from export.split_fuzz import max_diff
from export.split_fuzz import random_request as fuzz_request
from tests.split_serving import infer, refused_by_name_then_exact, serving
from tests.test_hstu import TOLERANCE

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
    """(contract, gRPC client) of a local tritonserver serving the HSTU repository pair; the
    server is stopped by PID at the end of the module."""
    model = build_hstu(CFG)
    serving_repository = tmp_path_factory.mktemp("hstu") / "model_repository_hstu"
    write_hstu_repositories(model, serving_repository, graphs=SERVED,
                            source="tests/test_hstu_server.py")
    assert not [v for found in check_repositories(serving_repository).values() for v in found]
    assert sorted(p.name for p in serving_repository.iterdir()) == ["ranker", "target_fusion",
                                                                    "user_encoder"]
    assert [p.name for p in evaluation_beside(serving_repository).iterdir()] == ["ranker_naive"]
    with serving(serving_repository) as client:
        yield model.contract(), client


def random_request(rng: np.random.Generator, length: int, n: int) -> dict[str, np.ndarray]:
    return fuzz_request(hstu_contract(CFG), rng, length, n)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("n", CANDIDATE_COUNTS)
def test_ranker_equals_naive(served, length: int, n: int) -> None:
    contract, client = served
    request = random_request(np.random.default_rng(100 * length + n), length, n)
    split = infer(client, contract, "ranker", request)
    naive = infer(client, contract, "ranker_naive", request)
    assert split.shape == (n, CFG.num_tasks)
    assert np.isfinite(split).all()
    assert max_diff(split, naive) <= TOLERANCE


def test_bad_lengths_refused_by_name_then_exact(served) -> None:
    contract, client = served
    request = random_request(np.random.default_rng(9), 30, 5)
    refused_by_name_then_exact(client, contract, request, "history_dwell_seconds", 3, TOLERANCE)
