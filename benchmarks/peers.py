"""The peers the split is measured against, built from the same weights (benchmark only).

* **M-FALCON single pass** (Meta's generative recommenders): one forward over
  [history; N candidates] with a mask: history tokens see the history (causal or bidirectional),
  each candidate sees the history and itself, never another candidate; every candidate carries
  the same (target) position, so it is scored exactly as alone. Written here as a dense masked
  forward in plain ONNX ops (what ONNX Runtime offers on CPU; Meta's implementation uses jagged,
  block-sparse kernels on GPU): its attention is [H, L+N, L+N].
* **Replicated K/V** (the `np.repeat` pattern of Merlin-style pipelines): the same user_encoder,
  then a fusion that broadcasts user_kv to doc granularity literally, N copies of [H, L, dh], and
  runs one attention per candidate.

Both score exactly what the naive oracle scores (tested against it in the benchmark run and in
tests/test_peers.py); only their cost differs.

Another family (export/split_contract.py) brings its own single pass as a `mfalcon` method beside
its forwards (HSTU: export/hstu.py, blocked, memory linear in L); `export_peers` exports what a
model has, under the same names.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from export.model import RankingTransformer
from export.onnx_export import DYNAMIC_AXES, OPSET, example_inputs
from export.reference_features import reference_contract
from export.split_contract import ReferenceSplitModel, SplitModel
from export.split_export import _Graph, declare_io_shapes, graph_io, tensor_dims
from export.split_export import example_inputs as declared_inputs

MFALCON = "mfalcon"
REPLICATED_FUSION = "replicated_fusion"
PEERS = (MFALCON, REPLICATED_FUSION)
# Which graph's inputs a peer reads: the request (a single pass) or target_fusion's (after the
# same user_encoder, whose time is added to the peer's).
READS = {MFALCON: "ranker_naive", REPLICATED_FUSION: "target_fusion"}


class MFalcon(nn.Module):
    """One masked forward over [history; candidates] -> scores [N, T]."""

    def __init__(self, model: RankingTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, hist_items: Tensor, hist_actions: Tensor, hist_ts: Tensor,
                cand_items: Tensor, cand_cats: Tensor, request_ts: Tensor,
                profile: Tensor) -> Tensor:
        m = self.model
        history, last_ts = m.embed_history(hist_items, hist_actions, hist_ts)
        length = history.shape[0]
        candidates = m.embed_candidates(cand_items, cand_cats, request_ts, last_ts,
                                        torch.tensor(length) > 0)
        x = torch.cat([history, candidates]).unsqueeze(0)  # [1, L + N, d]
        pos = torch.arange(x.shape[1], dtype=torch.int64)
        q, k = pos[:, None], pos[None, :]
        history_sees = (k <= q) if m.cfg.mask == "causal" else (k < length)
        is_history = q < length
        allowed = (is_history & history_sees & (k < length)) | (
            ~is_history & ((k < length) | (k == q)))
        bias = torch.where(allowed, 0.0, float("-inf"))
        for block in m.blocks:
            x, _, _ = block(x, bias)
        return m.head(x[0, length:], profile)


class ReplicatedFusion(nn.Module):
    """target_fusion's contract, but user_kv is copied N times and each candidate attends alone."""

    def __init__(self, model: RankingTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, cand_items: Tensor, cand_cats: Tensor, request_ts: Tensor, profile: Tensor,
                user_kv: Tensor, last_ts: Tensor) -> Tensor:
        m = self.model
        x = m.embed_candidates(cand_items, cand_cats, request_ts, last_ts,
                               torch.tensor(user_kv.shape[3]) > 0)
        n = x.shape[0]
        for i, block in enumerate(m.blocks):
            q, k, v = (block._split_heads(t).transpose(0, 1).unsqueeze(2)
                       for t in block.qkv(block.ln1(x)).chunk(3, dim=-1))  # [N, H, 1, dh]
            keys = torch.cat([user_kv[i, 0].repeat(n, 1, 1, 1), k], dim=2)  # [N, H, L+1, dh]
            values = torch.cat([user_kv[i, 1].repeat(n, 1, 1, 1), v], dim=2)
            probs = torch.softmax((q * block.scale) @ keys.transpose(-1, -2), dim=-1)
            attn = (probs @ values).squeeze(2)  # [N, H, dh]
            x = x + block.out(attn.reshape(n, block.num_heads * block.head_dim))
            x = block._ffn(x)
        return m.head(x, profile)


def export_peer(model: RankingTransformer, name: str, path: Path) -> None:
    """Trace one peer into `path` (dynamic L and N, the project's opset)."""
    contract = reference_contract(model.cfg)  # the names, from the model's declaration
    module, inputs = (MFalcon(model), [f.name for f in contract.features]) if name == MFALCON \
        else (ReplicatedFusion(model), list(contract.fusion_inputs))
    scores = contract.outputs[0].name
    example = example_inputs(model.cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), tuple(example[n] for n in inputs), str(path), dynamo=False,
            opset_version=OPSET, input_names=inputs, output_names=[scores],
            dynamic_axes={n: DYNAMIC_AXES[n] for n in [*inputs, scores] if n in DYNAMIC_AXES},
        )
    onnx.checker.check_model(str(path))


def export_family_mfalcon(model: SplitModel, path: Path) -> None:
    """Trace a family's `mfalcon` method into `path`: the naive graph's inputs and outputs, names
    and dims from the declaration (dynamic L and N)."""
    contract = model.contract()
    inputs, outputs = graph_io(contract, "ranker_naive")
    dims = tensor_dims(contract, "ranker_naive")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Graph(model, "mfalcon").eval(), declared_inputs(contract, "ranker_naive", model),
            str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
            output_names=outputs, dynamic_axes={n: {i: d for i, d in enumerate(dims[n])
                                                    if isinstance(d, str)}
                                                for n in inputs + outputs})
    proto = onnx.load(str(path))
    declare_io_shapes(proto, dims)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))


def export_peers(model: SplitModel, directory: Path) -> tuple[str, ...]:
    """The peers `model` has, each into directory/<peer>/1/model.onnx: both for the reference
    model, the single pass for a family with a `mfalcon` method."""
    if isinstance(model, ReferenceSplitModel):
        for peer in PEERS:
            export_peer(model.model, peer, directory / peer / "1" / "model.onnx")
        return PEERS
    if hasattr(model, MFALCON):
        export_family_mfalcon(model, directory / MFALCON / "1" / "model.onnx")
        return (MFALCON,)
    return ()
