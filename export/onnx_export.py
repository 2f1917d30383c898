"""Export the three ONNX graphs (user_encoder, target_fusion, ranker_naive) from one model.

Every graph has dynamic L and N (zero included), no batch axis, and is written at an opset the
production container's ONNX Runtime (1.19 in NGC 24.10, opset <= 21) runs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from export import reference_features as c
from export.attention import export_target
from export.config import ModelConfig
from export.guards import add_guards
from export.model import RankingTransformer, SplitNotExactError, full_mask_refusal

OPSET = 17  # LayerNormalization is a single op from 17; <= 20 keeps NGC 24.10 happy.
REQUEST_NAMES = [s.name for s in c.request_inputs(1)]


class _Graph(nn.Module):
    """One exported graph of `model`. The user profile enters in the weights' dtype (fp16
    exports), the scores leave as fp32: the request contract never changes."""

    def __init__(self, model: RankingTransformer) -> None:
        super().__init__()
        self.model = model

    def _profile(self, profile: Tensor) -> Tensor:
        return profile.to(self.model.item_emb.weight.dtype)


class UserEncoder(_Graph):
    """History -> user_kv, last_event_timestamp. Once per request."""

    def forward(self, items: Tensor, actions: Tensor, timestamps: Tensor) -> tuple[Tensor, Tensor]:
        user_kv, last_ts = self.model.encode_user(items, actions, timestamps)
        return user_kv.to(self.model.item_emb.weight.dtype), last_ts


class UserEncoderAppend(_Graph):
    """Cached K/V of P events (every layer but the last) + ΔL new events -> the K/V of the ΔL
    new events only (causal only): an append moves O(ΔL) bytes out, and the last layer's O(P)
    K/V, which nothing attends to here, never comes in."""

    def forward(self, prefix_kv: Tensor, last_ts: Tensor, items: Tensor, actions: Tensor,
                timestamps: Tensor) -> tuple[Tensor, Tensor]:
        new, last = self.model.encode_append(prefix_kv, last_ts, items, actions, timestamps)
        return new.to(self.model.item_emb.weight.dtype), last


class TargetFusion(_Graph):
    """N candidates + the shared user_kv -> scores [N, T], all candidates in one pass."""

    def forward(
        self, cand_items: Tensor, cand_cats: Tensor, request_ts: Tensor, profile: Tensor,
        user_kv: Tensor, last_ts: Tensor,
    ) -> Tensor:
        return self.model.score_candidates(
            cand_items, cand_cats, request_ts, self._profile(profile), user_kv, last_ts
        ).float()


class NaiveRanker(_Graph):
    """The whole request contract -> scores, the history re-encoded for every candidate."""

    def forward(self, *request: Tensor) -> Tensor:
        *ids, profile = request
        return self.model(*ids, self._profile(profile)).float()


class BaseRanker(_Graph):
    """The request contract -> scores without the sequence module (benchmark reference)."""

    def forward(self, *request: Tensor) -> Tensor:
        *ids, profile = request
        return self.model.forward_base(*ids, self._profile(profile)).float()


@dataclass(frozen=True)
class GraphSpec:
    name: str
    module: type[nn.Module]
    inputs: list[str]
    outputs: list[str]


GRAPHS = {
    "user_encoder": GraphSpec(
        "user_encoder", UserEncoder, list(c.HISTORY_INPUTS), [c.USER_KV, c.LAST_EVENT_TIMESTAMP]
    ),
    "target_fusion": GraphSpec(
        "target_fusion", TargetFusion,
        [*c.CANDIDATE_INPUTS, c.REQUEST_TIMESTAMP, c.USER_PROFILE, c.USER_KV,
         c.LAST_EVENT_TIMESTAMP],
        [c.SCORES],
    ),
    "ranker_naive": GraphSpec("ranker_naive", NaiveRanker, REQUEST_NAMES, [c.SCORES]),
    "user_encoder_append": GraphSpec(
        "user_encoder_append", UserEncoderAppend,
        [c.CACHED_USER_KV, c.CACHED_LAST_EVENT_TIMESTAMP, *c.HISTORY_INPUTS],
        [c.NEW_USER_KV, c.LAST_EVENT_TIMESTAMP],
    ),
    "ranker_base": GraphSpec("ranker_base", BaseRanker, REQUEST_NAMES, [c.SCORES]),
}
SPLIT_GRAPHS = ("user_encoder", "target_fusion", "user_encoder_append")
# Graphs that only a causal model has (appending is exact only under a causal mask).
CAUSAL_ONLY_GRAPHS = ("user_encoder_append",)


def graphs_for(cfg: ModelConfig, naive_only: bool = False) -> list[str]:
    """The graphs a model of this config exports: no split for the `full` mask (or with
    naive_only), no append graph unless the model can append (`ModelConfig.appends`)."""
    return [g for g in GRAPHS
            if not ((naive_only or cfg.mask == "full") and g in SPLIT_GRAPHS)
            and not (not cfg.appends and g in CAUSAL_ONLY_GRAPHS)]

# Which axis of each tensor is dynamic, and its name in the ONNX graph. user_kv holds the kept
# history (at most max_history events), not the L events sent.
DYNAMIC_AXES = {
    **{n: {0: "L"} for n in c.HISTORY_INPUTS},
    **{n: {0: "N"} for n in c.CANDIDATE_INPUTS},
    c.USER_KV: {3: "L_kept"},
    c.CACHED_USER_KV: {3: "P"},
    c.NEW_USER_KV: {3: "new_L"},
    c.SCORES: {0: "N"},
}


def contract_specs(cfg: ModelConfig, fp16: bool = False) -> dict[str, c.TensorSpec]:
    """Every tensor any graph reads or writes, as the Triton configs declare it."""
    specs = [*c.request_inputs(cfg.profile_dim), c.scores_output(cfg.num_tasks),
             c.user_kv_spec(cfg.num_layers, cfg.num_heads, cfg.head_dim,
                            "FP16" if fp16 else "FP32"),
             c.last_event_timestamp_spec(),
             *c.cached_specs(cfg.num_layers, cfg.num_heads, cfg.head_dim,
                             "FP16" if fp16 else "FP32"),
             c.new_user_kv_spec(cfg.num_layers, cfg.num_heads, cfg.head_dim,
                                "FP16" if fp16 else "FP32")]
    return {s.name: s for s in specs}


def declare_io_shapes(model: onnx.ModelProto, specs: dict[str, c.TensorSpec]) -> None:
    """Write the contract's shapes onto the graph's inputs and outputs: a fixed dim as that number,
    a variable one under its axis name. Triton's onnxruntime backend compares a config against
    these declarations (outputs exactly), and the tracer leaves some of them symbolic where the
    value is in fact fixed (last_event_timestamp is always [1])."""
    for value in [*model.graph.input, *model.graph.output]:
        spec = specs[value.name]
        shape = value.type.tensor_type.shape
        axes = DYNAMIC_AXES.get(value.name, {})
        del shape.dim[:]
        for axis, size in enumerate(spec.dims):
            dim = shape.dim.add()
            if size == -1:
                dim.dim_param = axes[axis]
            else:
                dim.dim_value = size


def example_inputs(cfg: ModelConfig, length: int = 5, n: int = 3) -> dict[str, Tensor]:
    """Small tracing inputs. Sizes only seed the trace: every variable axis is exported dynamic."""
    g = torch.Generator().manual_seed(0)
    return {
        c.HISTORY_ITEM_IDS: torch.randint(0, 1000, (length,), generator=g),
        c.HISTORY_ACTION_IDS: torch.randint(0, 4, (length,), generator=g),
        c.HISTORY_TIMESTAMPS: torch.arange(length, dtype=torch.int64) * 60 + 1_700_000_000,
        c.CANDIDATE_ITEM_IDS: torch.randint(0, 1000, (n,), generator=g),
        c.CANDIDATE_CATEGORY_IDS: torch.randint(0, 50, (n,), generator=g),
        c.REQUEST_TIMESTAMP: torch.tensor([1_700_000_600]),
        c.USER_PROFILE: torch.randn(cfg.profile_dim, generator=g),
        c.USER_KV: torch.randn(cfg.num_layers, 2, cfg.num_heads, length, cfg.head_dim),
        c.LAST_EVENT_TIMESTAMP: torch.tensor([1_700_000_000 + 60 * (length - 1)]),
        c.CACHED_USER_KV: torch.randn(cfg.num_layers - 1, 2, cfg.num_heads, 2 * length,
                                      cfg.head_dim),
        c.CACHED_LAST_EVENT_TIMESTAMP: torch.tensor([1_699_999_000]),
    }


def export_graph(
    model: RankingTransformer, name: str, path: Path, fp16: bool = False, target: str = "cpu"
) -> None:
    """Trace one graph of `model` into `path` (a single self-contained .onnx file), tuned for
    `target` ("cpu" or "gpu": the attention sink's padding, export/attention.py)."""
    spec = GRAPHS[name]
    if name in SPLIT_GRAPHS and model.cfg.mask == "full":
        raise SplitNotExactError(full_mask_refusal(model.cfg.mask))
    module = spec.module(model).eval()
    inputs = example_inputs(model.cfg)
    if fp16:
        inputs[c.USER_KV] = inputs[c.USER_KV].half()
        inputs[c.CACHED_USER_KV] = inputs[c.CACHED_USER_KV].half()
    args = tuple(inputs[n] for n in spec.inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad(), export_target(target):
        warnings.simplefilter("ignore")  # tracer warnings about shape-to-int conversions
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=OPSET,
            input_names=spec.inputs, output_names=spec.outputs,
            dynamic_axes={n: DYNAMIC_AXES[n] for n in spec.inputs + spec.outputs
                          if n in DYNAMIC_AXES},
        )
    graph = onnx.load(str(path))
    declare_io_shapes(graph, contract_specs(model.cfg, fp16))
    add_guards(graph, name, model.cfg)
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path))


def weight_hash(model: nn.Module) -> str:
    """sha256 over the state_dict (names, shapes, bytes): which weights a model file carries."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_model_card(path: Path, cfg: ModelConfig, model: nn.Module, graphs: list[str],
                     fp16: bool, checkpoint: str | None, target: str = "cpu") -> None:
    card = {
        "config": cfg.to_dict(),
        "opset": OPSET,
        "precision": "fp16" if fp16 else "fp32",
        "target": target,
        "weights": checkpoint or f"seeded random init (seed {cfg.seed})",
        "weight_sha256": weight_hash(model),
        "graphs": graphs,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }
    path.write_text(json.dumps(card, indent=2) + "\n")
