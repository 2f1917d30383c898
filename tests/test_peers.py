"""The benchmark's peers (benchmarks/peers.py) score exactly what the naive oracle scores, for
both masks, so the long-history benchmark compares costs of equal answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.peers import MFALCON, PEERS, REPLICATED_FUSION, export_peer
from export import reference_features as c
from export.model import build_model
from export.onnx_export import export_graph
from tests.conftest import OnnxModels, random_request, small_config


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
def test_peers_equal_the_oracle(tmp_path: Path, mask: str) -> None:
    cfg = small_config(mask)
    model = build_model(cfg)
    graphs = ["user_encoder", "ranker_naive"]
    for graph in graphs:
        export_graph(model, graph, tmp_path / graph / "model.onnx")
    for peer in PEERS:
        export_peer(model, peer, tmp_path / peer / "model.onnx")
    models = OnnxModels(tmp_path, [*graphs, *PEERS])
    rng = np.random.default_rng(4)
    for length, n in [(0, 3), (1, 1), (40, 7), (cfg.max_history + 50, 4)]:
        request = random_request(rng, cfg, length, n)
        naive = models.naive(request)
        user_kv, last_ts = models.run("user_encoder", request)
        replicated = models.run(REPLICATED_FUSION, {**request, c.USER_KV: user_kv,
                                                    c.LAST_EVENT_TIMESTAMP: last_ts})[0]
        for name, scores in ((MFALCON, models.run(MFALCON, request)[0]),
                             (REPLICATED_FUSION, replicated)):
            assert scores.shape == naive.shape, name
            assert float(np.abs(scores - naive).max(initial=0.0)) <= 1e-5, (name, length, n)
