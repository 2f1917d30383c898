"""Export a split model family's ONNX graphs with every name, shape and guard taken from its
declaration (export/split_contract.py): user_encoder, target_fusion, ranker_naive and, for an
appendable family, user_encoder_append.

Every family goes through here, the reference model included (`python -m export`): opset 17
(what the production container's ONNX Runtime 1.19 runs), the legacy TorchScript exporter
(dynamo=False), one self-contained file per graph, dynamic L and N (zero included), no batch
axis, the declared shapes written on the graph's inputs and outputs, and serving guards in the
graph (export/guards.py: a string Reshape named after the rule, so every execution provider
enforces it on the host). A family may add evaluation graphs with ranker_naive's inputs and
outputs (the reference model's `ranker_base` baseline): the model's `evaluation_graphs` maps
each name to the method traced. Nothing here names a family's features.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn
from tritonclient.grpc import model_config_pb2 as mc

from client.contract import TensorSpec
from export.attention import export_target
from export.config_parts import _inputs, _outputs, _set_backend
from export.guards import add_guards
from export.split_contract import SplitContract, SplitModel, check_contract

OPSET = 17  # LayerNormalization is a single op from 17; <= 20 keeps NGC 24.10 happy.

GRAPHS = ("user_encoder", "target_fusion", "ranker_naive", "user_encoder_append")
# Names of the dynamic axes in the graphs: the request's L and N, the kept history of a state
# (user_encoder's output, L' = min(L, max_history)), the cached events P of the append's inputs
# and the new events ΔL of its outputs ("new_L").
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


def evaluation_graphs(model: SplitModel) -> dict[str, str]:
    """A model's extra evaluation graphs (name -> method), each with ranker_naive's inputs and
    outputs: an optional `evaluation_graphs` attribute of the model (default: none)."""
    return dict(getattr(model, "evaluation_graphs", {}))


def graph_io(contract: SplitContract, graph: str) -> tuple[list[str], list[str]]:
    """(input names, output names) of one graph, from the declaration. A graph that is not one
    of GRAPHS is an evaluation graph: ranker_naive's inputs and outputs."""
    state = [s.name for s in contract.state]
    outputs = [o.name for o in contract.outputs]
    return {
        "user_encoder": ([f.name for f in contract.history_features], state),
        "target_fusion": (list(contract.fusion_inputs), outputs),
        "user_encoder_append": (list(contract.append_inputs), list(contract.append_outputs)),
    }.get(graph, ([f.name for f in contract.features], outputs))


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
        dims[s.new_name] = ["new_L" if d == "L" else d for d in s.dims]
    return dims


def graph_specs(contract: SplitContract, graph: str,
                state_dtypes: Mapping[str, str] | None = None,
                ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs as the request contract's TensorSpecs (-1: variable).
    `state_dtypes` overrides declared state dtypes as served (an fp16 export's state)."""
    dims = tensor_dims(contract, graph)
    dtypes = {f.name: f.dtype for f in contract.features}
    dtypes.update({o.name: o.dtype for o in contract.outputs})
    for s in contract.state:
        dtype = (state_dtypes or {}).get(s.name, s.dtype)
        dtypes[s.name] = dtypes[s.cached_name] = dtypes[s.new_name] = dtype
    docs = {t.name: t.doc for t in (*contract.features, *contract.state, *contract.outputs)}
    docs.update({s.cached_name: f"cached {s.name}" for s in contract.state})
    docs.update({s.new_name: f"{s.name} of the new events only" for s in contract.state
                 if s.grows})

    def spec(name: str) -> TensorSpec:
        return TensorSpec(name, dtypes[name], tuple(-1 if isinstance(d, str) else d
                                                    for d in dims[name]), docs[name])

    inputs, outputs = graph_io(contract, graph)
    return [spec(n) for n in inputs], [spec(n) for n in outputs]


def native_model_config(contract: SplitContract, graph: str, *, flavour: str = "production",
                        tensorrt_fp16: bool = False,
                        state_dtypes: Mapping[str, str] | None = None) -> mc.ModelConfig:
    """The graph's Triton config, derived from the declaration: by default for the native
    onnxruntime backend (GPU instance, no batch axis), what export/native_rules.py holds against
    the graph; `flavour` and `tensorrt_fp16` as export/triton_configs.py's `_set_backend`."""
    inputs, outputs = graph_specs(contract, graph, state_dtypes)
    config = mc.ModelConfig(name=graph, max_batch_size=0, input=_inputs(inputs),
                            output=_outputs(outputs))
    _set_backend(config, flavour, tensorrt_fp16=tensorrt_fp16)
    return config


def _torch_dtype(dtype: str) -> torch.dtype:
    return {"INT64": torch.int64, "INT32": torch.int32, "FP32": torch.float32,
            "FP16": torch.float16, "BOOL": torch.bool}[dtype]


def example_feeds(model: SplitModel, state: bool = True) -> dict[str, Tensor]:
    """Small tracing inputs by name (every variable axis is exported dynamic): the request
    features (L = 6, N = 3) and, with `state`, the state of the whole history and what the
    append reads of the state of its first 4 events. The state comes from the model itself, so
    a trace runs real values (and a naive-only model, whose encode_user refuses, needs none)."""
    contract = model.contract()
    g = torch.Generator().manual_seed(0)
    request: dict[str, Tensor] = {}
    for f in contract.features:
        size = [{"L": 6, "N": 3}.get(d, d) if isinstance(d, str) else d for d in f.dims]
        if f.dtype == "INT64":
            request[f.name] = torch.randint(0, 1000, size, generator=g) + 1_700_000_000
        else:
            request[f.name] = torch.rand(size, generator=g, dtype=_torch_dtype(f.dtype)) * 10
    if not state:
        return request
    history = [request[f.name] for f in contract.history_features]
    with torch.no_grad():
        state = model.encode_user(*history)
        prefix = model.encode_user(*(t[:4] for t in history))
    return {**request, **{s.name: t for s, t in zip(contract.state, state, strict=True)},
            **contract.cached_reads(prefix)}


def example_inputs(contract: SplitContract, graph: str, model: SplitModel) -> tuple[Tensor, ...]:
    """One graph's tracing inputs, in its input order (`example_feeds`; the append's new events
    are the last 2 of the history)."""
    named = example_feeds(model, state=graph in ("target_fusion", "user_encoder_append"))
    if graph == "user_encoder_append":
        named.update({f.name: named[f.name][4:] for f in contract.history_features})
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


SPLIT_GRAPHS = ("user_encoder", "target_fusion", "user_encoder_append")


def graphs_for(contract: SplitContract, evaluation: Sequence[str] = (),
               naive_only: bool = False) -> tuple[str, ...]:
    """The graphs a declaration exports: the append graph only for an appendable family, then
    the `evaluation` graphs (ranker_naive's IO); with `naive_only`, none of the split's (a
    declaration that does not split is refused by export_graph, with check_contract's
    reason, unless so)."""
    return tuple(g for g in (*GRAPHS, *evaluation)
                 if (contract.appendable or g != "user_encoder_append")
                 and not (naive_only and g in SPLIT_GRAPHS))


def export_graph(model: SplitModel, graph: str, path: Path, *, max_candidates: int,
                 naive_max_work: int, target: str = "cpu") -> None:
    """Trace one graph of `model` into `path` (one self-contained .onnx file), tuned for `target`
    ("cpu" or "gpu": the attention's head padding where a family uses export/attention.py), with
    the serving limits written in as guards (candidates per request; the naive graph's
    N x (L'+1)^2)."""
    contract = model.contract()
    if graph in SPLIT_GRAPHS:  # the declaration must split exactly
        check_contract(contract)
    methods = {**_METHODS, **evaluation_graphs(model)}
    known = graphs_for(contract, tuple(evaluation_graphs(model)))
    if graph not in known:
        raise ValueError(f"unknown graph {graph!r} for {contract.family}: one of {known}")
    proto = trace(model, methods[graph], graph, path, target)
    add_guards(proto, graph, contract, max_candidates, naive_max_work)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))


def trace(model: SplitModel, method: str, graph: str, path: Path,
          target: str = "cpu") -> onnx.ModelProto:
    """Trace `model.<method>` with `graph`'s inputs and outputs (names, dynamic and declared
    dims from the declaration) into `path`; the graph back, to be guarded and saved (a
    benchmark's peer forward is traced so as the graph it stands in for)."""
    contract = model.contract()
    inputs, outputs = graph_io(contract, graph)
    dims = tensor_dims(contract, graph)
    dynamic = {name: {i: d for i, d in enumerate(dims[name]) if isinstance(d, str)}
               for name in inputs + outputs}
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _Graph(model, method).eval()
    args = example_inputs(contract, graph, model)
    with warnings.catch_warnings(), torch.no_grad(), export_target(target):
        warnings.simplefilter("ignore")  # tracer warnings about shape-to-int conversions
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=dynamic)
    proto = onnx.load(str(path))
    declare_io_shapes(proto, dims)
    return proto


def export_all(model: SplitModel, directory: Path, *, max_candidates: int, naive_max_work: int,
               graphs: tuple[str, ...] | None = None, target: str = "cpu",
               progress: bool = False) -> list[Path]:
    """The graphs (default: all the declaration has, the model's evaluation graphs included)
    into directory/<graph>/1/model.onnx, the model repository layout."""
    paths = []
    for graph in graphs or graphs_for(model.contract(), tuple(evaluation_graphs(model))):
        path = directory / graph / "1" / "model.onnx"
        if progress:
            print(f"exporting {graph} -> {path}", flush=True)
        export_graph(model, graph, path, max_candidates=max_candidates,
                     naive_max_work=naive_max_work, target=target)
        paths.append(path)
    return paths
