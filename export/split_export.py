"""Export a split model family's ONNX graphs with every name, shape and guard taken from its
declaration (export/split_contract.py): user_encoder, target_fusion, ranker_naive and, for an
appendable family, user_encoder_append.

Same rules as the reference model's export (export/onnx_export.py): opset 17, the legacy
TorchScript exporter (dynamo=False), one self-contained file per graph, dynamic L and N (zero
included), no batch axis, the declared shapes written on the graph's inputs and outputs, and
serving guards in the graph (export/guards.py's mechanism: a string Reshape named after the rule,
so every execution provider enforces it on the host). Nothing here names a family's features.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn
from tritonclient.grpc import model_config_pb2 as mc

from client.contract import TensorSpec
from export.guards import (
    _attach,
    _Builder,
    _lengths_differ,
    append_rule,
    length_rule,
    limit_rule,
    naive_rule,
)
from export.onnx_export import OPSET
from export.split_contract import SplitContract, SplitModel, check_contract
from export.triton_configs import _inputs, _outputs, _set_backend

GRAPHS = ("user_encoder", "target_fusion", "ranker_naive", "user_encoder_append")
# Names of the dynamic axes in the graphs: the request's L and N, the kept history of a state
# (user_encoder's output, L' = min(L, max_history)), the cached events P of the append's inputs
# and the new events ΔL of its outputs ("new").
_REQUEST_AXES = {"L": "L", "N": "N"}


class _Graph(nn.Module):
    def __init__(self, model: SplitModel, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        return getattr(self.model, self.method)(*inputs)


_METHODS = {"user_encoder": "encode_user", "target_fusion": "score_candidates",
            "ranker_naive": "forward", "user_encoder_append": "encode_append"}


def graph_io(contract: SplitContract, graph: str) -> tuple[list[str], list[str]]:
    """(input names, output names) of one graph, from the declaration."""
    state = [s.name for s in contract.state]
    outputs = [o.name for o in contract.outputs]
    return {
        "user_encoder": ([f.name for f in contract.history_features], state),
        "target_fusion": (list(contract.fusion_inputs), outputs),
        "ranker_naive": ([f.name for f in contract.features], outputs),
        "user_encoder_append": (list(contract.append_inputs), list(contract.append_outputs)),
    }[graph]


def tensor_dims(contract: SplitContract, graph: str) -> dict[str, list[int | str]]:
    """Every graph tensor's dims, symbols renamed to the graph's axis names."""
    dims: dict[str, list[int | str]] = {}
    for f in contract.features:
        dims[f.name] = [_REQUEST_AXES.get(d, d) if isinstance(d, str) else d for d in f.dims]
    for o in contract.outputs:
        dims[o.name] = list(o.dims)
    for s in contract.state:
        dims[s.name] = ["L_kept" if d == "L" else d for d in s.dims]
        dims[s.cached_name] = ["P" if d == "L" else d for d in s.cached_dims]
        dims[s.new_name] = ["new" if d == "L" else d for d in s.dims]
    return dims


def graph_specs(contract: SplitContract, graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs as the request contract's TensorSpecs (-1: variable)."""
    dims = tensor_dims(contract, graph)
    dtypes = {f.name: f.dtype for f in contract.features}
    dtypes.update({o.name: o.dtype for o in contract.outputs})
    for s in contract.state:
        dtypes[s.name] = dtypes[s.cached_name] = dtypes[s.new_name] = s.dtype
    docs = {t.name: t.doc for t in (*contract.features, *contract.state, *contract.outputs)}
    docs.update({s.cached_name: f"cached {s.name}" for s in contract.state})
    docs.update({s.new_name: f"{s.name} of the new events only" for s in contract.state
                 if s.grows})

    def spec(name: str) -> TensorSpec:
        return TensorSpec(name, dtypes[name], tuple(-1 if isinstance(d, str) else d
                                                    for d in dims[name]), docs[name])

    inputs, outputs = graph_io(contract, graph)
    return [spec(n) for n in inputs], [spec(n) for n in outputs]


def native_model_config(contract: SplitContract, graph: str) -> mc.ModelConfig:
    """The graph's Triton config for the native onnxruntime backend (GPU instance, no batch
    axis), derived from the declaration: what export/native_rules.py holds against the graph."""
    inputs, outputs = graph_specs(contract, graph)
    config = mc.ModelConfig(name=graph, max_batch_size=0, input=_inputs(inputs),
                            output=_outputs(outputs))
    _set_backend(config, "production", tensorrt_fp16=False)
    return config


def _torch_dtype(dtype: str) -> torch.dtype:
    return {"INT64": torch.int64, "INT32": torch.int32, "FP32": torch.float32,
            "FP16": torch.float16, "BOOL": torch.bool}[dtype]


def example_inputs(contract: SplitContract, graph: str, model: SplitModel) -> tuple[Tensor, ...]:
    """Small tracing inputs (every variable axis is exported dynamic): the state inputs come from
    the model itself, so the trace runs real values."""
    g = torch.Generator().manual_seed(0)
    request: dict[str, Tensor] = {}
    for f in contract.features:
        size = [{"L": 6, "N": 3}.get(d, d) if isinstance(d, str) else d for d in f.dims]
        if f.dtype == "INT64":
            request[f.name] = torch.randint(0, 1000, size, generator=g) + 1_700_000_000
        else:
            request[f.name] = torch.rand(size, generator=g, dtype=_torch_dtype(f.dtype)) * 10
    history = [request[f.name] for f in contract.history_features]
    with torch.no_grad():
        state = model.encode_user(*history)
        prefix = model.encode_user(*(t[:4] for t in history))
    named = {**request, **{s.name: t for s, t in zip(contract.state, state, strict=True)},
             **contract.cached_reads(prefix)}
    if graph == "user_encoder_append":
        named.update({f.name: request[f.name][4:] for f in contract.history_features})
    return tuple(named[n] for n in graph_io(contract, graph)[0])


def declare_io_shapes(proto: onnx.ModelProto, dims: dict[str, list[int | str]]) -> None:
    """Write the declared shapes onto the graph's inputs and outputs (fixed dims as numbers,
    variable ones by axis name): Triton's native backend compares its config against them."""
    for value in [*proto.graph.input, *proto.graph.output]:
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for d in dims[value.name]:
            dim = shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d


def add_contract_guards(proto: onnx.ModelProto, graph: str, contract: SplitContract,
                        max_candidates: int, naive_max_work: int) -> list[str]:
    """The serving guards of export/guards.py, derived from a declaration instead of named
    tensors: one L for the history features, one N for the candidate features, N <=
    max_candidates, the naive graph's work bound, and the append's P + ΔL <= max_history.
    Returns the rules added."""
    inputs = [i.name for i in proto.graph.input]
    b = _Builder(proto.graph)
    rules: list[str] = []
    history = [f.name for f in contract.history_features if f.name in inputs]
    candidates = [f.name for f in contract.candidate_features if f.name in inputs]
    history_zeros: list[str] = []
    candidate_zeros: list[str] = []
    for names, axis, zeros in ((history, "L", history_zeros),
                               (candidates, "N", candidate_zeros)):
        if len(names) > 1:
            rules.append(length_rule(names, axis))
            zeros.append(b.fail_if(_lengths_differ(b, names), rules[-1]))
    if candidates:
        n = b.length(candidates[0])
        rules.append(limit_rule(max_candidates))
        candidate_zeros.append(b.fail_if(b.flag(b.op("Greater", [n, b.const(max_candidates)])),
                                         rules[-1]))
        if graph == "ranker_naive" and history:
            kept = b.op("Min", [b.length(history[0]), b.const(contract.max_history)])
            tokens = b.op("Add", [kept, b.const(1)])
            work = b.op("Mul", [n, b.op("Mul", [tokens, tokens])])
            rules.append(naive_rule(naive_max_work))
            candidate_zeros.append(b.fail_if(
                b.flag(b.op("Greater", [work, b.const(naive_max_work)])), rules[-1]))
    if graph == "user_encoder_append":
        # The cached length: the "L" dim of the first state tensor that has one.
        state = next(s for s in contract.state if s.grows)
        axis = list(state.cached_dims).index("L")
        cached = b.op("Shape", [state.cached_name], start=axis, end=axis + 1)
        total = b.op("Add", [cached, b.length(history[0])])
        rules.append(append_rule(contract.max_history))
        history_zeros.append(b.fail_if(
            b.flag(b.op("Greater", [total, b.const(contract.max_history)])), rules[-1]))
    # The zeros gate the group's first integer tensor (an Add of int64 zeros).
    int_inputs = {f.name for f in contract.features if f.dtype == "INT64"}
    for names, zeros in ((history, history_zeros), (candidates, candidate_zeros)):
        if zeros:
            _attach(b, next(n for n in names if n in int_inputs), zeros)
    existing = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(b.nodes + existing)
    return rules


def graphs_for(contract: SplitContract) -> tuple[str, ...]:
    """The graphs a declaration exports: the append graph only for an appendable family."""
    return tuple(g for g in GRAPHS if contract.appendable or g != "user_encoder_append")


def export_graph(model: SplitModel, graph: str, path: Path, *, max_candidates: int,
                 naive_max_work: int) -> None:
    """Trace one graph of `model` into `path` (one self-contained .onnx file), with the serving
    limits written in as guards (candidates per request; the naive graph's N x (L'+1)^2)."""
    contract = model.contract()
    if graph != "ranker_naive":  # a split graph: the declaration must split exactly
        check_contract(contract)
    if graph not in graphs_for(contract):
        raise ValueError(f"unknown graph {graph!r} for {contract.family}: one of "
                         f"{graphs_for(contract)}")
    inputs, outputs = graph_io(contract, graph)
    dims = tensor_dims(contract, graph)
    dynamic = {name: {i: d for i, d in enumerate(dims[name]) if isinstance(d, str)}
               for name in inputs + outputs}
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _Graph(model, _METHODS[graph]).eval()
    args = example_inputs(contract, graph, model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-to-int conversions
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=dynamic)
    proto = onnx.load(str(path))
    declare_io_shapes(proto, dims)
    add_contract_guards(proto, graph, contract, max_candidates, naive_max_work)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))


def export_all(model: SplitModel, directory: Path, *, max_candidates: int, naive_max_work: int,
               graphs: tuple[str, ...] | None = None, progress: bool = False) -> list[Path]:
    """The graphs (default: all the declaration has) into directory/<graph>/1/model.onnx, the
    model repository layout."""
    paths = []
    for graph in graphs or graphs_for(model.contract()):
        path = directory / graph / "1" / "model.onnx"
        if progress:
            print(f"exporting {graph} -> {path}", flush=True)
        export_graph(model, graph, path, max_candidates=max_candidates,
                     naive_max_work=naive_max_work)
        paths.append(path)
    return paths
