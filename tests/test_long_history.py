"""The long configs (max_history 16384): they export, their configs pass the native backend's
rules, no graph constant grows with max_history^2, the split equals the naive oracle at a long L,
an over-long history is truncated to the newest events, and the bad-input guards hold."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export import reference_features as c
from export.config import CONFIG_DIR, ModelConfig
from export.guards import length_rule, limit_rule
from export.model import build_model
from export.native_rules import check_model
from export.onnx_export import export_graph, graphs_for
from export.triton_configs import build_configs
from tests.conftest import OnnxModels, random_request

pytestmark = pytest.mark.slow
LONG = {mask: CONFIG_DIR / f"ranker_{mask}_long.json" for mask in ("causal", "bidirectional")}


@pytest.fixture(scope="module")
def long_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple]:
    cache: dict[str, tuple[ModelConfig, Path, OnnxModels]] = {}

    def get(mask: str) -> tuple[ModelConfig, Path, OnnxModels]:
        if mask not in cache:
            cfg = ModelConfig.load(LONG[mask])
            model = build_model(cfg)
            directory = tmp_path_factory.mktemp(f"long_{mask}")
            graphs = [g for g in graphs_for(cfg) if g != "ranker_base"]
            for graph in graphs:
                export_graph(model, graph, directory / graph / "model.onnx")
            cache[mask] = (cfg, directory, OnnxModels(directory, graphs))
        return cache[mask]

    return get


def constants(graph: onnx.GraphProto) -> list[np.ndarray]:
    """Initializers and Constant node values, subgraphs (If/Loop bodies) included."""
    out = [numpy_helper.to_array(t) for t in graph.initializer]
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                out.append(numpy_helper.to_array(attr.t))
            if attr.type == onnx.AttributeProto.GRAPH:
                out += constants(attr.g)
    return out


@pytest.mark.parametrize("mask", sorted(LONG))
def test_no_constant_grows_with_max_history_squared(long_export, mask: str) -> None:
    cfg, directory, _ = long_export(mask)
    for graph in graphs_for(cfg):
        if graph == "ranker_base":
            continue
        largest = max(a.size for a in constants(onnx.load(str(directory / graph /
                                                              "model.onnx")).graph))
        # the item table (100003 x 128) is the largest; a quadratic mask would be 268M
        assert largest < cfg.max_history**2 // 16, (graph, largest)
        assert (directory / graph / "model.onnx").stat().st_size < 80 * 2**20


@pytest.mark.parametrize("mask", sorted(LONG))
def test_long_configs_pass_the_native_backend_rules(long_export, mask: str) -> None:
    cfg, directory, _ = long_export(mask)
    configs = build_configs(cfg)
    for graph in graphs_for(cfg):
        if graph != "ranker_base":
            assert check_model(configs[graph], directory / graph / "model.onnx") == []


@pytest.mark.parametrize("mask", sorted(LONG))
def test_split_equals_naive_at_a_long_history(long_export, mask: str) -> None:
    """L = 2500 (the plain branch ends at 512, the blocked Loop and MultiHeadAttention run),
    two candidates: the oracle's [N, H, L+1, L+1] still fits."""
    cfg, _, models = long_export(mask)
    request = random_request(np.random.default_rng(11), cfg, 2500, 2)
    diff = np.abs(models.split(request) - models.naive(request)).max()
    assert diff <= 1e-5, diff


def test_over_long_history_is_truncated_to_the_newest_events(long_export) -> None:
    cfg, _, models = long_export("causal")
    request = random_request(np.random.default_rng(12), cfg, 100_000, 4)
    newest = {k: v[-cfg.max_history:] if k in c.HISTORY_INPUTS else v
              for k, v in request.items()}
    kv_long, last_long = models.run("user_encoder", request)
    kv_new, last_new = models.run("user_encoder", newest)
    assert kv_long.shape[3] == cfg.max_history
    np.testing.assert_array_equal(kv_long, kv_new)
    np.testing.assert_array_equal(last_long, last_new)
    np.testing.assert_array_equal(models.split(request), models.split(newest))


def test_guards_and_empty_parts_hold_for_the_long_config(long_export) -> None:
    cfg, _, models = long_export("causal")
    rng = np.random.default_rng(13)
    for length, n in [(0, 0), (0, 3), (9000, 0)]:
        request = random_request(rng, cfg, length, n)
        assert models.split(request).shape == (n, cfg.num_tasks)
    request = random_request(rng, cfg, 40, 5)
    request[c.HISTORY_ACTION_IDS] = request[c.HISTORY_ACTION_IDS][:1]
    with pytest.raises(Exception, match="must have the same length") as info:
        models.run("user_encoder", request)
    assert length_rule(list(c.HISTORY_INPUTS), "L") in str(info.value)
    request = random_request(rng, cfg, 10, cfg.max_candidates + 1)
    kv, last = models.run("user_encoder", request)
    with pytest.raises(Exception, match="running Reshape node") as info:
        models.run("target_fusion", {**request, c.USER_KV: kv, c.LAST_EVENT_TIMESTAMP: last})
    assert limit_rule(cfg.max_candidates) in str(info.value)
