"""Hold each Triton config against its ONNX graph with the rules of the native onnxruntime backend.

Why: the local server runs our ONNX files on the *python* backend, which checks none of the
config-vs-graph rules below, so a config the production backend (NGC tritonserver 24.10,
onnxruntime_backend r24.10) refuses at model load can pass every local test. This module applies
the same rules offline, from the config and the ONNX file only (no ONNX Runtime session, no
server, no GPU), so CI catches such a config before a deployment does.

What was confirmed at the source (triton-inference-server/onnxruntime_backend, the copies of
`src/onnxruntime.cc` and `src/onnxruntime_utils.cc` held by the code search; the exact r24.10
commit could not be pinned there, but these checks have had this shape for years):

* `ModelInstanceState` (constructor, src/onnxruntime.cc) computes the expected input count as
  the number of config inputs, minus those marked `optional`, plus the `batch_input` entries
  (plus sequence controls and states, which this checker does not model: no model of ours uses
  `sequence_batching`). It then calls `ValidateInputs` and `ValidateOutputs`; the first error
  fails the load, so the backend reports one problem at a time where this checker lists all.
* `ValidateInputs`: the session's input count (ONNX Runtime's session inputs are the graph
  inputs that have no initializer) must equal that expected count; this is a count, not a set
  comparison. Graph inputs that *do* have an initializer ("overridable initializers", IR >= 4)
  are then merged into the allowed names. Each config input must be one of those names
  (`CheckAllowedModelInput`, backend_common: "unexpected inference input ..."), its data type
  must map (`ModelConfigDataTypeToOnnxDataType`, src/onnxruntime_utils.cc; e.g. TYPE_BF16 maps
  to nothing and is "unsupported") to the graph's element type, an `optional` input is refused
  when max_batch_size != 0, a `reshape` replaces `dims` in the comparison, a ragged input
  (`allow_ragged_batch`) needs graph shape [-1], a rank-0 graph tensor needs every config dim
  to be 1, and otherwise the dims go through `CompareDimsSupported` with compare_exact = false.
* `ValidateOutputs`: the same name (`CheckAllowedModelOutput`) and data-type checks; graph
  outputs missing from the config are fine (there is no count check); outputs named by a
  `batch_output` skip the shape comparison; dims go through `CompareDimsSupported` with
  compare_exact = true.
* `CompareDimsSupported` (src/onnxruntime_utils.cc): ONNX Runtime reports a dynamic graph dim
  (dim_param or unset) as -1. Ranks must match. With compare_exact = false (inputs) only the
  graph's fixed dims are compared and must equal the config's; with compare_exact = true
  (outputs) every dim is compared, so a dynamic graph dim needs -1 and a fixed one its number.
  With max_batch_size > 0 the graph must have at least one dim, its first dim must be -1, and
  the config's dims are compared with an implicit leading -1.
* Every graph input and output must be a tensor (`InputOutputInitializerInfos`: "Unsupported
  ONNX Type ..."), whether or not the config names it.

The messages below follow the backend's own wording (shapes printed like its `ShapeToString`,
"[-1,2]"), each prefixed with the model and tensor so a report names both.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from tritonclient.grpc import model_config_pb2 as mc

from export.repositories import (
    EVALUATION_MODELS,
    EVALUATION_OPTION_HELP,
    MODEL_REPOSITORY,
    evaluation_beside,
)
from export.triton_configs import parse

ONNX_FILENAME = "model.onnx"
_TENSOR = "tensor_type"

# ModelConfigDataTypeToOnnxDataType (src/onnxruntime_utils.cc): config type -> ONNX elem type.
# Any config type not listed (TYPE_BF16, TYPE_INVALID) is "unsupported" by the backend.
_CONFIG_TO_ONNX: dict[int, int] = {
    mc.TYPE_BOOL: onnx.TensorProto.BOOL,
    mc.TYPE_UINT8: onnx.TensorProto.UINT8,
    mc.TYPE_UINT16: onnx.TensorProto.UINT16,
    mc.TYPE_UINT32: onnx.TensorProto.UINT32,
    mc.TYPE_UINT64: onnx.TensorProto.UINT64,
    mc.TYPE_INT8: onnx.TensorProto.INT8,
    mc.TYPE_INT16: onnx.TensorProto.INT16,
    mc.TYPE_INT32: onnx.TensorProto.INT32,
    mc.TYPE_INT64: onnx.TensorProto.INT64,
    mc.TYPE_FP16: onnx.TensorProto.FLOAT16,
    mc.TYPE_FP32: onnx.TensorProto.FLOAT,
    mc.TYPE_FP64: onnx.TensorProto.DOUBLE,
    mc.TYPE_STRING: onnx.TensorProto.STRING,
}

# ConvertFromOnnxDataType + TRITONSERVER_DataTypeString: how the backend names the graph's type
# in its "model provides TYPE_..." messages.
_ONNX_TO_TRITON_NAME: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.STRING: "BYTES",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
}


@dataclass(frozen=True)
class GraphTensor:
    """One graph input or output as ONNX Runtime reports it to the backend."""

    name: str
    onnx_type: str  # the value's kind: "tensor_type", "sequence_type", "map_type", ...
    elem_type: int = onnx.TensorProto.UNDEFINED
    dims: tuple[int, ...] = ()  # -1 where the graph's dim is dynamic (dim_param or unset)


@dataclass(frozen=True)
class GraphIO:
    """The parts of an ONNX graph the backend's load-time validation looks at."""

    inputs: dict[str, GraphTensor] = field(default_factory=dict)  # session inputs (required)
    overridable: dict[str, GraphTensor] = field(default_factory=dict)  # initializers as inputs
    outputs: dict[str, GraphTensor] = field(default_factory=dict)


def _graph_tensor(value: onnx.ValueInfoProto) -> GraphTensor:
    kind = value.type.WhichOneof("value")
    if kind != _TENSOR:
        return GraphTensor(value.name, kind or "unknown")
    tensor = value.type.tensor_type
    # A missing shape reads as rank 0 here, as ONNX Runtime reports it (GetDimensionsCount 0).
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return GraphTensor(value.name, kind, tensor.elem_type, dims)


def read_graph(onnx_path: Path | str) -> GraphIO:
    """Graph inputs/outputs of an ONNX file, split the way an ONNX Runtime session splits them.

    Only the graph's signature matters, so external weight data is never loaded.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    initializers |= {t.values.name for t in model.graph.sparse_initializer}
    inputs, overridable = {}, {}
    for value in model.graph.input:
        if value.name not in initializers:
            inputs[value.name] = _graph_tensor(value)
        elif model.ir_version >= 4:  # before IR 4 an initializer input is a constant, not a name
            overridable[value.name] = _graph_tensor(value)
    outputs = {v.name: _graph_tensor(v) for v in model.graph.output}
    return GraphIO(inputs, overridable, outputs)


def shape_to_string(dims: Iterable[int]) -> str:
    """The backend's ShapeToString: "[-1,2]" (comma, no space)."""
    return "[" + ",".join(str(d) for d in dims) + "]"


def compare_dims(model: str, tensor: str, graph_dims: tuple[int, ...], dims: list[int],
                 max_batch_size: int, compare_exact: bool) -> str | None:
    """CompareDimsSupported: None when the config's dims fit the graph's, else the message."""
    prefix = f"model '{model}', tensor '{tensor}': "
    if max_batch_size > 0:
        if not graph_dims or graph_dims[0] != -1:
            return (prefix + "for the model to support batching the shape should have at least "
                    "1 dimension and the first dimension must be -1; but shape expected by the "
                    f"model is {shape_to_string(graph_dims)}")
        dims = [-1, *dims]
    ok = len(graph_dims) == len(dims) and all(
        g == d for g, d in zip(graph_dims, dims, strict=False) if compare_exact or g != -1
    )
    if ok:
        return None
    expected = (f"{prefix}the model expects {len(graph_dims)} dimensions "
                f"(shape {shape_to_string(graph_dims)}) but the model configuration specifies "
                f"{len(dims)} dimensions ")
    if max_batch_size > 0:
        return expected + ("(an initial batch dimension because max_batch_size > 0 followed by "
                           f"the explicit tensor shape, making complete shape "
                           f"{shape_to_string(dims)})")
    return expected + f"(shape {shape_to_string(dims)})"


def _dtype_violation(model: str, io: mc.ModelInput | mc.ModelOutput, kind: str,
                     tensor: GraphTensor) -> str | None:
    config_type = mc.DataType.Name(io.data_type)
    onnx_type = _CONFIG_TO_ONNX.get(io.data_type)
    prefix = f"model '{model}', tensor '{io.name}': "
    if onnx_type is None:
        return prefix + f"unsupported datatype {config_type} for {kind} '{io.name}'"
    if onnx_type != tensor.elem_type:
        provided = _ONNX_TO_TRITON_NAME.get(tensor.elem_type, "INVALID")
        return (prefix + f"configuration expects datatype {config_type} for {kind} "
                f"'{io.name}', model provides TYPE_{provided}")
    return None


def _scalar_violation(model: str, name: str, dims: list[int]) -> str | None:
    """A rank-0 graph tensor: the backend skips CompareDimsSupported and wants only 1s."""
    if all(d == 1 for d in dims):
        return None
    return (f"model '{model}', tensor '{name}': scalar tensor '{name}', should only provide 1 in "
            "the model configuration when the model doesn't support batching. Model "
            f"configuration provided: {shape_to_string(dims)}.")


def _config_dims(io: mc.ModelInput | mc.ModelOutput) -> list[int]:
    """A reshape, when given, is what the backend compares with the graph."""
    return list(io.reshape.shape) if io.HasField("reshape") else list(io.dims)


def _not_tensors(model: str, graph: GraphIO) -> list[str]:
    every = [*graph.inputs.values(), *graph.overridable.values(), *graph.outputs.values()]
    return [f"model '{model}', tensor '{t.name}': Unsupported ONNX Type '{t.onnx_type}' for "
            f"I/O '{t.name}', expected a tensor" for t in every if t.onnx_type != _TENSOR]


def _check_inputs(config: mc.ModelConfig, graph: GraphIO) -> list[str]:
    model, out = config.name, []
    expected = sum(1 for io in config.input if not io.optional) + len(config.batch_input)
    if len(graph.inputs) != expected:
        missing = sorted(set(graph.inputs) - {io.name for io in config.input})
        note = (" (graph inputs missing from the configuration: "
                + ", ".join(f"'{n}'" for n in missing) + ")") if missing else ""
        out.append(f"model '{model}': configuration expects {expected} inputs, model provides "
                   f"{len(graph.inputs)}{note}")
    allowed = {**graph.inputs, **graph.overridable}
    for io in config.input:
        prefix = f"model '{model}', tensor '{io.name}': "
        if io.optional and config.max_batch_size != 0:
            out.append(prefix + f"optional input '{io.name}' is not supported for models that "
                       "support batching")
        tensor = allowed.get(io.name)
        if tensor is None:
            out.append(prefix + f"unexpected inference input '{io.name}', allowed inputs are: "
                       + ", ".join(sorted(allowed)))
            continue
        if tensor.onnx_type != _TENSOR:
            continue  # already reported by _not_tensors
        problem = _dtype_violation(model, io, "input", tensor)
        if problem:
            out.append(problem)
        dims = _config_dims(io)
        if io.allow_ragged_batch:
            if tensor.dims != (-1,):
                out.append(prefix + "configuration expects model provides input with shape "
                           f"[-1] for ragged input '{io.name}', model provides "
                           f"{shape_to_string(tensor.dims)}")
        elif tensor.dims:
            problem = compare_dims(model, io.name, tensor.dims, dims, config.max_batch_size,
                                   compare_exact=False)
            if problem:
                out.append(problem)
        elif problem := _scalar_violation(model, io.name, dims):
            out.append(problem)
    return out


def _check_outputs(config: mc.ModelConfig, graph: GraphIO) -> list[str]:
    model, out = config.name, []
    batch_outputs = {name for bo in config.batch_output for name in bo.target_name}
    for io in config.output:
        tensor = graph.outputs.get(io.name)
        if tensor is None:
            out.append(f"model '{model}', tensor '{io.name}': unexpected inference output "
                       f"'{io.name}', allowed outputs are: " + ", ".join(sorted(graph.outputs)))
            continue
        if tensor.onnx_type != _TENSOR:
            continue
        problem = _dtype_violation(model, io, "output", tensor)
        if problem:
            out.append(problem)
        if io.name in batch_outputs:
            continue  # the backend does not compare a batch output's shape
        dims = _config_dims(io)
        if tensor.dims:
            problem = compare_dims(model, io.name, tensor.dims, dims, config.max_batch_size,
                                   compare_exact=True)
        else:
            problem = _scalar_violation(model, io.name, dims)
        if problem:
            out.append(problem)
    return out


def check_graph(config: mc.ModelConfig, graph: GraphIO) -> list[str]:
    """Every load-time violation of `config` against `graph`; empty when the backend loads it."""
    return [*_not_tensors(config.name, graph), *_check_inputs(config, graph),
            *_check_outputs(config, graph)]


def check_model(config: mc.ModelConfig, onnx_path: Path | str) -> list[str]:
    """Hold one onnxruntime-backend config against its ONNX file; empty = the backend accepts."""
    return check_graph(config, read_graph(onnx_path))


def is_onnxruntime(config: mc.ModelConfig) -> bool:
    """Served by the native onnxruntime backend (the python-backend local flavour is not)."""
    return config.backend == "onnxruntime" or config.platform == "onnxruntime_onnx"


def model_file(model_dir: Path, config: mc.ModelConfig) -> Path | None:
    """The file Triton would load by default: the highest numeric version folder's model file."""
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        return None
    latest = max(versions, key=lambda p: int(p.name))
    return latest / (config.default_model_filename or ONNX_FILENAME)


def check_repository(repository: Path) -> dict[str, list[str]]:
    """model name -> violations, for every onnxruntime model of a repository (ensembles and
    other backends are skipped). A missing model file is a violation: Triton cannot load it."""
    results: dict[str, list[str]] = {}
    for config_path in sorted(Path(repository).glob("*/config.pbtxt")):
        model_dir = config_path.parent
        config = parse(config_path.read_text())
        if config.platform == "ensemble" or not is_onnxruntime(config):
            continue
        if not config.name:
            config.name = model_dir.name  # Triton names a model after its folder by default
        path = model_file(model_dir, config)
        if path is None or not path.is_file():
            where = path or model_dir / "<version>" / ONNX_FILENAME
            results[config.name] = [f"model '{config.name}': no model file at {where} "
                                    "(export it first: python -m export)"]
            continue
        results[config.name] = check_model(config, path)
    return results


def check_repositories(serving: Path, evaluation: Path | None = None) -> dict[str, list[str]]:
    """`check_repository` over the serving repository and its evaluation repository (default:
    the one beside it), plus the layout: an oracle or baseline in the serving repository, or no
    evaluation repository at all, is a violation."""
    evaluation = Path(evaluation) if evaluation is not None else evaluation_beside(serving)
    results = check_repository(serving)
    for name in EVALUATION_MODELS:
        if name in results or (Path(serving) / name).exists():
            results.setdefault(name, []).append(
                f"model '{name}': in the serving repository {serving}; it belongs in the "
                f"evaluation repository ({evaluation})")
    if not evaluation.is_dir():
        results["(evaluation repository)"] = [
            f"no evaluation repository at {evaluation} (export it: python -m export)"]
        return results
    for name, violations in check_repository(evaluation).items():
        results.setdefault(name, []).extend(violations)
    return results


def export_verdict(serving: Path, evaluation: Path | None, prog: str = "export") -> int:
    """After an export: every violation on stderr, 1 if any, else one line saying all passed (0).
    A repository the native backend would refuse is never left looking done."""
    violations = [v for found in check_repositories(serving, evaluation).values() for v in found]
    for v in violations:
        print(f"{prog}: error: the onnxruntime backend would refuse this: {v}", file=sys.stderr)
    if violations:
        return 1
    print(f"{prog}: every config passes the native onnxruntime backend's load-time rules")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.native_rules",
        description="Check every onnxruntime model config of the serving model repository and "
                    "of its evaluation repository against its ONNX file with the load-time rules "
                    "of Triton's native onnxruntime backend (r24.10). Exits 1 on any violation.",
    )
    p.add_argument("--repository", default=str(MODEL_REPOSITORY),
                   help="serving model repository (default: %(default)s)")
    p.add_argument("--evaluation-repository", default=None,
                   help=EVALUATION_OPTION_HELP)
    args = p.parse_args(argv)
    results = check_repositories(Path(args.repository), args.evaluation_repository)
    if not results:
        print(f"no onnxruntime models in {args.repository}")
        return 1
    failed = False
    for name, violations in results.items():
        if violations:
            failed = True
            print(f"FAIL {name}")
            for v in violations:
                print(f"  {v}")
        else:
            print(f"OK   {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
