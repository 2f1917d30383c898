"""The serving guards live in the ONNX graphs (export/guards.py): a bare ONNX Runtime session,
which is all Triton's native onnxruntime backend runs, refuses what the contract forbids and names
the rule, and the limits it enforces are the ones the Triton configs advertise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client import contract as c
from export.guards import length_rule, limit_rule, naive_rule
from export.model import build_model
from export.onnx_export import export_graph, graphs_for
from export.triton_configs import build_configs
from tests.conftest import OnnxModels, random_request, small_config

HISTORY_RULE = length_rule(list(c.HISTORY_INPUTS), "L")
CANDIDATE_RULE = length_rule(list(c.CANDIDATE_INPUTS), "N")
LIMIT, WORK = 40, 30 * 301**2


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> OnnxModels:
    cfg = small_config("causal", max_candidates=LIMIT, naive_max_work=WORK)
    model = build_model(cfg)
    directory = tmp_path_factory.mktemp("guarded")
    for graph in graphs_for(cfg):
        export_graph(model, graph, directory / graph / "model.onnx")
    onnx_models = OnnxModels(directory, graphs_for(cfg))
    onnx_models.cfg = cfg
    return onnx_models


def feeds(onnx_models: OnnxModels, length: int, n: int) -> dict[str, np.ndarray]:
    """A valid request plus its user_kv: every graph finds its inputs in it."""
    request = random_request(np.random.default_rng(length + n), onnx_models.cfg, length, n)
    user_kv, last_ts = onnx_models.run("user_encoder", request)
    return {**request, c.USER_KV: user_kv, c.LAST_EVENT_TIMESTAMP: last_ts}


def refused(onnx_models: OnnxModels, graph: str, request: dict, rule: str) -> None:
    with pytest.raises(Exception, match="running Gather node") as info:
        onnx_models.run(graph, request)
    assert f"Name:'{rule}'" in str(info.value), str(info.value)


@pytest.mark.parametrize("graph", ["user_encoder", "ranker_naive", "ranker_base"])
@pytest.mark.parametrize("keep", [1, 7])  # 1: what ONNX would silently broadcast
def test_history_lengths_must_agree(guarded: OnnxModels, graph: str, keep: int) -> None:
    request = feeds(guarded, 10, 4)
    request[c.HISTORY_TIMESTAMPS] = request[c.HISTORY_TIMESTAMPS][:keep]
    refused(guarded, graph, request, HISTORY_RULE)


@pytest.mark.parametrize("graph", ["target_fusion", "ranker_naive", "ranker_base"])
@pytest.mark.parametrize("keep", [1, 3])
def test_candidate_lengths_must_agree(guarded: OnnxModels, graph: str, keep: int) -> None:
    request = feeds(guarded, 10, 6)
    request[c.CANDIDATE_CATEGORY_IDS] = request[c.CANDIDATE_CATEGORY_IDS][:keep]
    refused(guarded, graph, request, CANDIDATE_RULE)


@pytest.mark.parametrize("graph", ["target_fusion", "ranker_base"])
def test_candidate_limit(guarded: OnnxModels, graph: str) -> None:
    assert guarded.run(graph, feeds(guarded, 5, LIMIT))[-1].shape == (LIMIT, 2)
    refused(guarded, graph, feeds(guarded, 5, LIMIT + 1), limit_rule(LIMIT))


def test_naive_work_bound(guarded: OnnxModels) -> None:
    """N x (min(L, max_history) + 1)^2 <= naive_max_work; L beyond max_history counts as kept."""
    assert guarded.naive(feeds(guarded, 300, 30)).shape == (30, 2)
    assert guarded.naive(feeds(guarded, 5_000, 30)).shape == (30, 2)
    refused(guarded, "ranker_naive", feeds(guarded, 300, 31), naive_rule(WORK))
    assert guarded.naive(feeds(guarded, 0, LIMIT)).shape == (LIMIT, 2)  # 40 x 1 cells


def test_valid_requests_are_untouched(guarded: OnnxModels) -> None:
    """The guards add a zero: split == naive as ever, L = 0 and N = 0 included."""
    for length, n in [(0, 0), (0, 3), (12, 0), (300, 20)]:
        request = feeds(guarded, length, n)
        np.testing.assert_allclose(guarded.split(request), guarded.naive(request), atol=1e-5)


def test_configs_advertise_the_limits_the_graphs_enforce() -> None:
    cfg = small_config("causal", max_candidates=LIMIT, naive_max_work=WORK)
    configs = build_configs(cfg)
    for name in ("ranker", "target_fusion", "ranker_naive", "ranker_base"):
        assert configs[name].parameters["max_candidates"].string_value == str(LIMIT)
    naive = configs["ranker_naive"].parameters
    assert naive["naive_max_work"].string_value == str(WORK)
    assert naive["max_history"].string_value == str(cfg.max_history)


def test_fp16_export_is_guarded_too(tmp_path: Path) -> None:
    cfg = small_config("causal", max_candidates=LIMIT)
    model = build_model(cfg).half()
    for graph in ("user_encoder", "target_fusion"):
        export_graph(model, graph, tmp_path / graph / "model.onnx", fp16=True)
    fp16 = OnnxModels(tmp_path, ["user_encoder", "target_fusion"])
    fp16.cfg = cfg
    request = random_request(np.random.default_rng(0), cfg, 10, LIMIT + 1)
    user_kv, last_ts = fp16.run("user_encoder", request)
    refused(fp16, "target_fusion",
            {**request, c.USER_KV: user_kv, c.LAST_EVENT_TIMESTAMP: last_ts}, limit_rule(LIMIT))
