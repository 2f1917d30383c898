"""The serving guards live in the ONNX graphs (export/guards.py): a bare ONNX Runtime session,
which is all Triton's native onnxruntime backend runs, refuses what the contract forbids and names
the rule, and the limits it enforces are the ones the Triton configs advertise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from export import reference_features as c
from export.guards import GUARD_DATA, append_rule, length_rule, limit_rule, naive_rule
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
    with pytest.raises(Exception, match="running Reshape node") as info:
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


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    found = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = node.attribute[0].t
    return found


def test_no_guard_relies_on_an_out_of_range_gather(guarded: OnnxModels,
                                                   tmp_path: Path) -> None:
    """Statically, in every exported graph: each rule is a Reshape of the one-element *string*
    constant, so only the CPU EP can run it (no CUDA kernel and no TensorRT type for strings,
    export/guards.py) and its refusal is decided on the host; no guard node is a Gather.
    The CUDA Gather kernel writes 0 for an out-of-range index instead of failing."""
    cfg = guarded.cfg
    rules = {length_rule(list(c.HISTORY_INPUTS), "L"), length_rule(list(c.CANDIDATE_INPUTS), "N"),
             limit_rule(cfg.max_candidates), naive_rule(cfg.naive_max_work),
             append_rule(cfg.max_history)}
    model = build_model(cfg)
    seen: set[str] = set()
    for graph_name in graphs_for(cfg):
        path = tmp_path / graph_name / "model.onnx"
        export_graph(model, graph_name, path)
        graph = onnx.load(str(path)).graph
        constants = _constants(graph)
        guard_nodes = [n for n in graph.node if n.name in rules or n.name.startswith("guard/")]
        assert guard_nodes, graph_name
        assert not [n.name for n in guard_nodes if n.op_type == "Gather"], graph_name
        for node in graph.node:
            if node.name not in rules:
                continue
            seen.add(node.name)
            assert node.op_type == "Reshape", (graph_name, node.name, node.op_type)
            data = constants[node.input[0]]
            assert data.data_type == TensorProto.STRING, (graph_name, node.name)
            assert list(data.string_data) == [GUARD_DATA]
            readers = [n for n in graph.node if node.output[0] in n.input]
            assert [(r.op_type, r.attribute[0].i) for r in readers] == [
                ("Cast", TensorProto.INT64)], (graph_name, node.name)
    assert seen == rules  # every rule was found in some graph
