"""Through a real tritonserver (local flavour): a config whose max_history (1100) is past the
plain-attention thresholds, so the blocked causal Loop, the MultiHeadAttention sink merge and
both branches of every attention If run through Triton, and the ensemble still equals
ranker_naive.

Which path a request takes is set by its size (export/attention.py): L <= 512 plain causal
attention, L > 512 the Loop; N x (L+1) <= 2^20 plain candidate scores, above it the sink.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.api import RankerClient
from export.attention import PLAIN_CAUSAL_MAX, PLAIN_FUSION_MAX_CELLS
from export.model import build_model
from export.onnx_export import export_graph, graphs_for
from export.reference_features import reference_generator
from export.repositories import onnx_path
from export.triton_configs import write_configs
from tests.conftest import SMALL, small_config

pytestmark = [pytest.mark.server, pytest.mark.slow]
MAX_HISTORY = 1100
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def long_server(tmp_path_factory: pytest.TempPathFactory):
    from local_server.triton import free_port, start_server

    cfg = small_config("causal", max_history=MAX_HISTORY)
    model = build_model(cfg)
    repo = tmp_path_factory.mktemp("long_repository")
    for graph in graphs_for(cfg):
        export_graph(model, graph, onnx_path(repo, graph))
    write_configs(cfg, repo, "tests/test_server_long.py")
    srv = start_server(grpc_port=free_port(), repository=Path(repo), timeout_s=240)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize(("length", "n"), [
    (300, 5),  # plain causal, plain candidates
    (PLAIN_CAUSAL_MAX + 1, 7),  # the Loop from its threshold: three blocks of 171
    (601, 6),  # the Loop: three blocks of 201, the last padded by 2 rows
    (1000, 40),  # the Loop, four blocks of 250
    (1000, PLAIN_FUSION_MAX_CELLS // 1001 + 1),  # the Loop and the sink candidates
    (1500, 3),  # truncated to the newest 1100 events: the Loop over 5 blocks of 220
])
def test_long_paths_through_triton_equal_naive(long_server, length: int, n: int) -> None:
    request = reference_generator(seed=length + n, profile_dim=SMALL["profile_dim"]).request(
        length, n)
    with RankerClient(long_server.grpc_url) as client:
        split = client.score(request, model="ranker")
        assert split.shape == (n, SMALL["num_tasks"]) and np.isfinite(split).all()
        # Candidates never see each other: the oracle checks a sample of them (its cost is
        # N x (L+1)^2), the first and last 8 here.
        picked = np.r_[0:min(n, 8), max(n - 8, 0):n]
        sample = request.replace(candidate_item_ids=request.candidate_item_ids[picked],
                                 candidate_category_ids=request.candidate_category_ids[picked])
        naive = client.score(sample, model="ranker_naive")
    diff = float(np.abs(split[picked] - naive).max())
    assert diff <= TOLERANCE, f"L={length}, N={n}: ensemble differs from naive by {diff:.2e}"
