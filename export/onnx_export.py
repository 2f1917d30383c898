"""The reference model's ONNX graphs, through the one export path every family takes
(export/split_export.py, from its declaration: export/split_contract.reference_plan), and the
model card written beside each graph.

`export_graph(model, name, path)` takes a `RankingTransformer` as it is (its fp16 copy
included) and exports it as `ReferenceSplitModel`, with its config's serving limits as guards:
the helpers the tests and benchmarks share. Every graph has dynamic L and N (zero included), no
batch axis, and is written at an opset the production container's ONNX Runtime (1.19 in NGC
24.10, opset <= 21) runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import torch
from torch import nn

from export import split_export
from export.config import ModelConfig
from export.model import RankingTransformer, SplitNotExactError, full_mask_refusal
from export.split_contract import ReferenceSplitModel
from export.split_export import OPSET

__all__ = ["OPSET", "export_graph", "graphs_for", "weight_hash", "write_model_card"]


def graphs_for(cfg: ModelConfig, naive_only: bool = False) -> list[str]:
    """The graphs a model of this config exports: its declaration's (no split for the `full`
    mask or with naive_only, no append graph unless the model can append) and `ranker_base`."""
    plan = cfg.serving_plan()
    return list(split_export.graphs_for(plan.contract, plan.evaluation_graphs,
                                        naive_only or cfg.mask == "full"))


def export_graph(model: RankingTransformer, name: str, path: Path, fp16: bool | None = None,
                 target: str = "cpu") -> None:
    """Trace one graph of `model` into `path` (a single self-contained .onnx file), tuned for
    `target` ("cpu" or "gpu": the attention sink's padding, export/attention.py). An fp16
    export is the model's fp16 copy (`model.half()`); `fp16`, when given, must say so."""
    half = model.item_emb.weight.dtype == torch.float16
    if fp16 is not None and fp16 != half:
        raise ValueError(f"fp16={fp16} but the model's weights are "
                         f"{model.item_emb.weight.dtype}: export model.half() for fp16")
    if name in split_export.SPLIT_GRAPHS and model.cfg.mask == "full":
        raise SplitNotExactError(full_mask_refusal(model.cfg.mask))
    split_export.export_graph(ReferenceSplitModel(model), name, Path(path),
                              max_candidates=model.cfg.max_candidates,
                              naive_max_work=model.cfg.naive_max_work, target=target)


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
