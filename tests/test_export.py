"""Export contract: the full mask is refused, causal K/V is append-only, target_fusion never
replicates user_kv, the committed Triton configs are what the generator writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import reference_features as c
from export.config import CONFIG_DIR, DEFAULT_CONFIG, ConfigError, ModelConfig
from export.model import SplitNotExactError, build_model
from export.onnx_export import OPSET, export_graph
from export.repositories import EVALUATION_MODELS, EVALUATION_REPOSITORY
from export.triton_configs import (
    MODEL_REPOSITORY,
    SERVING_MODELS,
    build_configs,
    config_source,
    parse,
    stale_configs,
    to_flavour,
    write_configs,
)
from tests.conftest import as_torch, random_request, small_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ the full (BST) mask
def test_full_mask_split_is_refused(tmp_path: Path) -> None:
    model = build_model(small_config("full"))
    with pytest.raises(SplitNotExactError, match="attend to the target"):
        export_graph(model, "user_encoder", tmp_path / "ue.onnx")
    with pytest.raises(SplitNotExactError, match="wrong"):
        model.encode_user(*(torch.zeros(3, dtype=torch.int64) for _ in range(3)))


def test_full_mask_cli_refuses_with_clear_message(tmp_path: Path) -> None:
    result = run_export("--config", str(CONFIG_DIR / "ranker_full_bst.json"),
                        "--output", str(tmp_path))
    assert result.returncode == 2
    assert "refusing to export" in result.stderr and "attend to the target" in result.stderr
    assert not list(tmp_path.rglob("*.onnx"))


def test_full_mask_split_would_be_wrong(exported) -> None:
    """Why the refusal matters: a shared K/V computed without the target differs from naive."""
    model, onnx_models = exported("full")
    request = random_request(np.random.default_rng(3), model.cfg, 30, 8)
    tensors = as_torch(request)
    with torch.no_grad():
        user_kv, last_ts = model._encode_history(*tensors[:3])
        cached = model.score_candidates(*tensors[3:5], tensors[5], tensors[6], user_kv, last_ts)
        naive = model(*tensors)
    assert float((cached - naive).abs().max()) > 1e-4
    np.testing.assert_allclose(onnx_models.naive(request), naive.numpy(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ K/V semantics
def test_causal_kv_of_earlier_positions_ignores_later_events(exported) -> None:
    model, onnx_models = exported("causal")
    request = random_request(np.random.default_rng(4), model.cfg, 50, 1)
    changed = {k: v.copy() for k, v in request.items()}
    changed[c.HISTORY_ITEM_IDS][40:] += 12345
    changed[c.HISTORY_ACTION_IDS][40:] += 1
    kv_a = onnx_models.run("user_encoder", request)[0]
    kv_b = onnx_models.run("user_encoder", changed)[0]
    np.testing.assert_array_equal(kv_a[..., :40, :], kv_b[..., :40, :])
    assert np.abs(kv_a[..., 40:, :] - kv_b[..., 40:, :]).max() > 1e-3


def test_bidirectional_kv_sees_the_whole_history(exported) -> None:
    model, onnx_models = exported("bidirectional")
    request = random_request(np.random.default_rng(4), model.cfg, 50, 1)
    changed = {k: v.copy() for k, v in request.items()}
    changed[c.HISTORY_ITEM_IDS][45:] += 12345
    kv_a = onnx_models.run("user_encoder", request)[0]
    kv_b = onnx_models.run("user_encoder", changed)[0]
    # layer 1's K/V depend on the token alone; from layer 2 on every position sees the change
    assert np.abs(kv_a[1, :, :, :40] - kv_b[1, :, :, :40]).max() > 1e-4


# ------------------------------------------------------------------ graph structure
VIEW_OPS = {"Gather", "Slice", "Transpose", "Squeeze", "Identity", "Cast", "Reshape"}


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes of a graph and of its If/Loop subgraphs (which read outer tensors by name)."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += all_nodes(attr.g)
    return out


def test_target_fusion_never_replicates_user_kv(tmp_path: Path) -> None:
    """Every path from user_kv goes through views (slice/transpose/reshape) and, on the
    MultiHeadAttention branch, the sink's widening (a zero pad of the head dim, one sink row in
    front along L) into a MatMul of the plain branch (head-major [H,N,dh] x [H,dh,L], one
    product per head) or the key/value inputs of a MultiHeadAttention with batch 1: no
    Expand/Tile of the K/V along N, no per-candidate products, in both branches of every
    layer."""
    cfg = small_config("causal")
    path = tmp_path / "tf.onnx"
    export_graph(build_model(cfg), "target_fusion", path)
    nodes = all_nodes(onnx.load(str(path)).graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    views, frontier, matmuls, attention = {c.USER_KV}, [c.USER_KV], [], []
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in (*VIEW_OPS, "Pad", "Concat"):
                if node.op_type == "Concat":  # only the sink row, along the key axis
                    assert node.attribute[0].i == 0 and len(node.input) == 2, node.name
                for out in node.output:
                    if out not in views:
                        views.add(out)
                        frontier.append(out)
            elif node.op_type == "MatMul":
                matmuls.append(node)
            elif node.op_type == "MultiHeadAttention":
                attention.append(node)
                assert node.domain == "com.microsoft"
                assert node.input[0] not in views  # K/V never reach the query input
            elif node.op_type != "Shape":
                pytest.fail(f"user_kv reaches a {node.op_type} node ({node.name})")
    assert len({n.name for n in attention}) == cfg.num_layers
    assert len({n.name for n in matmuls}) == 2 * cfg.num_layers  # Q K^T and P V, plain branch
    assert not any(n.op_type in ("Expand", "Tile") for n in nodes)


def test_opset_and_dynamic_axes(exported, tmp_path: Path) -> None:
    path = tmp_path / "ue.onnx"
    export_graph(build_model(small_config("causal")), "user_encoder", path)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == OPSET <= 20
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in [*model.graph.input, *model.graph.output]}
    assert dims[c.HISTORY_ITEM_IDS] == ["L"]
    assert dims[c.USER_KV][3] == "L_kept"


# ------------------------------------------------------------------ configs and cards
def test_committed_triton_configs_match_the_generator() -> None:
    cfg = ModelConfig.load(DEFAULT_CONFIG)
    assert stale_configs(cfg, MODEL_REPOSITORY, config_source(DEFAULT_CONFIG)) == []
    assert sorted(p.parent.name for p in MODEL_REPOSITORY.glob("*/config.pbtxt")) == sorted(
        SERVING_MODELS)
    assert sorted(p.parent.name for p in EVALUATION_REPOSITORY.glob("*/config.pbtxt")) == sorted(
        EVALUATION_MODELS)


def test_serving_repository_holds_no_oracle(tmp_path: Path) -> None:
    """The production repository holds only what ranker and ranker_cached need: no folder of
    ranker_naive or ranker_base, committed or generated, and --check refuses one put there."""
    assert set(EVALUATION_MODELS) == {"ranker_naive", "ranker_base"}
    for name in EVALUATION_MODELS:
        assert not (MODEL_REPOSITORY / name).exists(), name
    for ensemble in ("ranker", "ranker_cached"):
        steps = build_configs(ModelConfig.load(DEFAULT_CONFIG))[ensemble].ensemble_scheduling.step
        assert {s.model_name for s in steps} <= set(SERVING_MODELS), ensemble
    cfg = small_config("causal")
    written = write_configs(cfg, tmp_path / "serving", "test", tmp_path / "evaluation")
    assert {p.parent.name for p in written if p.parent.parent == tmp_path / "serving"} == set(
        SERVING_MODELS)
    assert sorted(p.name for p in (tmp_path / "evaluation").iterdir()) == sorted(
        EVALUATION_MODELS)
    (tmp_path / "evaluation" / "ranker_naive").rename(tmp_path / "serving" / "ranker_naive")
    stale = stale_configs(cfg, tmp_path / "serving", "test", tmp_path / "evaluation")
    assert stale == ["ranker_naive", "ranker_naive (in the serving repository)"]


def test_local_flavour_differs_only_in_backend_lines() -> None:
    cfg = ModelConfig.load(DEFAULT_CONFIG)
    production, local = build_configs(cfg, "production"), build_configs(cfg, "local")
    for name, config in production.items():
        assert to_flavour(config, "local") == local[name]
        strip_p, strip_l = to_flavour(config, "local"), local[name]
        for field in ("input", "output", "ensemble_scheduling", "parameters", "max_batch_size"):
            assert getattr(strip_p, field) == getattr(config, field), (name, field)
            assert getattr(strip_l, field) == getattr(config, field), (name, field)
    assert production["ranker"] == local["ranker"]
    assert production["user_encoder"].backend == "onnxruntime"
    assert local["user_encoder"].backend == "python"


def test_export_cli_writes_models_cards_and_configs(tmp_path: Path) -> None:
    config = tmp_path / "tiny_bidirectional.json"
    config.write_text(json.dumps({**small_config("bidirectional").to_dict(), "max_history": 64}))
    result = run_export("--config", str(config), "--output", str(tmp_path / "repo"))
    assert result.returncode == 0, result.stderr
    for name in ("user_encoder", "target_fusion", "ranker_naive", "ranker_base"):
        repo = tmp_path / ("repo_evaluation" if name in EVALUATION_MODELS else "repo")
        card = json.loads((repo / name / "1" / "model_card.json").read_text())
        assert card["opset"] == OPSET and card["config"]["mask"] == "bidirectional"
        assert len(card["weight_sha256"]) == 64
        assert (repo / name / "config.pbtxt").exists()
    assert (tmp_path / "repo" / "ranker" / "config.pbtxt").exists()
    # the serving repository holds no oracle: the evaluation one has exactly the two
    assert not any((tmp_path / "repo" / name).exists() for name in EVALUATION_MODELS)
    assert sorted(p.name for p in (tmp_path / "repo_evaluation").iterdir()) == sorted(
        EVALUATION_MODELS)


def test_export_cli_graphs_and_config_options(tmp_path: Path) -> None:
    """--graphs exports only the graphs named, with the configs that go with them (`ranker`,
    user_cache without append, ranker_cached; no append graph, no baseline); --response-cache and
    --tensorrt-fp16 reach the configs; an unknown graph is refused before anything is written."""
    config = tmp_path / "tiny_causal.json"
    config.write_text(json.dumps({**small_config("causal").to_dict(), "max_history": 64}))
    repo = tmp_path / "repo"
    bad = run_export("--config", str(config), "--output", str(repo), "--graphs", "ranker")
    assert bad.returncode == 2 and "unknown graphs ['ranker']" in bad.stderr
    assert not repo.exists()
    result = run_export("--config", str(config), "--output", str(repo), "--graphs",
                        "user_encoder", "target_fusion", "ranker_naive", "--response-cache",
                        "--tensorrt-fp16")
    assert result.returncode == 0, result.stderr
    assert sorted(p.parent.parent.name for p in tmp_path.rglob("model.onnx")) == [
        "ranker_naive", "target_fusion", "user_encoder"]
    assert sorted(p.parent.name for p in tmp_path.rglob("config.pbtxt")) == sorted(
        ["user_encoder", "target_fusion", "ranker_naive", "ranker", "user_cache",
         "ranker_cached"])
    written = {p.parent.name: parse(p.read_text()) for p in repo.glob("*/config.pbtxt")}
    configs = {name: to_flavour(config, "production", True) for name, config in written.items()}
    assert written["user_encoder"].response_cache.enable
    assert not written["target_fusion"].response_cache.enable
    assert written["target_fusion"] == configs["target_fusion"]  # TensorRT lines in
    assert written["user_cache"].parameters["append_model"].string_value == ""


def test_checkpoint_round_trip_and_mismatch(tmp_path: Path) -> None:
    cfg = small_config("causal")
    model = build_model(cfg)
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    other = build_model(small_config("causal", seed=99), str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
    torch.save(build_model(small_config("causal", d_model=16)).state_dict(), path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_model(cfg, str(path))


def test_bad_configs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mask"):
        small_config("all-ones")
    with pytest.raises(ConfigError, match="divisible"):
        small_config("causal", d_model=30)
    bad = tmp_path / "bad.json"
    bad.write_text('{"mask": "causal", "dmodel": 3}')
    result = run_export("--config", str(bad), "--output", str(tmp_path))
    assert result.returncode == 2 and "unknown model config keys" in result.stderr


@pytest.mark.parametrize("name", ["ranker_causal.json", "ranker_bidirectional.json"])
def test_shipped_configs_are_realistic(name: str) -> None:
    cfg = ModelConfig.load(CONFIG_DIR / name)
    assert name.split("_")[1].split(".")[0] == cfg.mask
    assert cfg.max_history >= 1024 and cfg.d_model >= 128 and cfg.num_heads >= 4
    assert 2 <= cfg.num_layers <= 4


def test_fp16_export_halves_user_kv_and_stays_close(tmp_path: Path) -> None:
    """The GPU option: fp16 weights and user_kv. ONNX Runtime's CPU kernels run it too, so its
    accuracy against the fp32 oracle is checked here (fp16 tolerance, not 1e-5)."""
    from tests.conftest import OnnxModels

    cfg = small_config("causal")
    model = build_model(cfg)
    half = build_model(cfg).half()
    for graph in ("user_encoder", "target_fusion"):
        export_graph(half, graph, tmp_path / graph / "model.onnx", fp16=True)
    onnx_models = OnnxModels(tmp_path, ["user_encoder", "target_fusion"])
    request = random_request(np.random.default_rng(9), cfg, 120, 33)
    user_kv = onnx_models.run("user_encoder", request)[0]
    assert user_kv.dtype == np.float16
    with torch.no_grad():
        reference = model(*as_torch(request)).numpy()
    assert float(np.abs(onnx_models.split(request) - reference).max()) < 5e-3
