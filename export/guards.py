"""Serving guards written into the exported ONNX graphs, so that both Triton backends enforce them
on every execution provider.

Triton's native onnxruntime backend runs the graph and nothing else: a check that lives only in
the local python-backend stand-in is a check production silently lacks. Each guard here is a few
shape ops computing a flag (0: the request is fine, 1: it breaks the rule), then

    Reshape(data = the one-element *string* constant ["0"], shape = [1 + flag])

named after the rule it enforces, and a Cast of its output to int64. With flag 1 the requested
shape [2] does not hold the one element, the Reshape fails, and ONNX Runtime quotes the failing
node's name, so the client reads, for example,

    Non-zero status code returned while running Reshape node. Name:'candidate_item_ids and
    candidate_category_ids must have the same length (N)' Status Message: ... The input tensor
    cannot be reshaped to the requested shape. Input shape:{1}, requested shape:{2}

Why this holds on every execution provider (onnxruntime sources, release 1.19):
* The decision runs on the host, in the CPU kernel. A string tensor has no CUDA kernel: the CUDA
  EP registers Reshape for fixed-size types only (`DataTypeImpl::AllFixedSizeTensorTypes()`,
  core/providers/cuda/tensor/reshape.cc, every opset) and Cast for numeric and bool inputs only
  (core/providers/cuda/tensor/cast_op.cc, `SPECIALIZE_IMPL`), and TensorRT has no string type,
  so its EP cannot take these two nodes into an engine. ONNX Runtime's partitioner therefore
  assigns them to the CPU EP under every GPU configuration (CPU's Reshape takes all tensor types,
  core/providers/cpu/tensor/reshape.cc), whatever its placement heuristics do with the flag's
  arithmetic (which computes the same integers on any device).
* The CPU Reshape checks the element count on the host before anything is written
  (`ReshapeHelper`, core/providers/cpu/tensor/reshape_helper.h: "The input tensor cannot be
  reshaped to the requested shape"), and the executor wraps a kernel's failure with the node's
  type and name (`ExecuteKernel`, core/framework/sequential_executor.cc: "Non-zero status code
  returned while running <op> node. Name:'<name>'"), which both Triton backends return.
* The earlier mechanism, a Gather on index 1, was not: the CUDA Gather kernel writes 0 for an
  out-of-range index and returns (core/providers/cuda/tensor/gather_impl.cu, `_GatherKernel`),
  and 0 was the guard's "pass" value. `tests/test_guards.py` checks statically that no guard is a
  Gather and every guard is this string Reshape.

The guard's output (a zero) is added to the first integer tensor of its group, so every node that
reads that tensor waits for the guard: nothing of the request runs before the rule is checked.
Cost: a handful of scalar ops per request.

Rules (from the family's declaration, export/split_contract.py; values baked in at export,
mirrored as config parameters for clients):
* the history features have one length L, the candidate features one length N (ONNX would
  otherwise broadcast a length-1 tensor into silently misaligned scores, or fail with a bare
  "Concat" error that names no tensor);
* N <= max_candidates;
* ranker_naive only: N x (min(L, max_history) + 1)^2 <= naive_max_work, its attention cells per
  layer, so that no single request can drive the naive model out of memory;
* user_encoder_append only: P cached + ΔL new events <= max_history (beyond it positions shift
  and appending would be wrong; the caller re-encodes).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from client.split_contract import SplitContract

_PREFIX = "guard/"
GUARD_DATA = b"0"  # the one element every guard reshapes; a string, so no GPU EP can run it


def length_rule(names: list[str], axis: str) -> str:
    listed = " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]
    return f"{listed} must have the same length ({axis})"


def limit_rule(max_candidates: int) -> str:
    return (f"more candidates than max_candidates={max_candidates} per request: "
            "split the request")


def append_rule(max_history: int) -> str:
    return (f"user_encoder_append: cached + new events exceed max_history={max_history}, where "
            "positions shift: re-encode with user_encoder")


def naive_rule(naive_max_work: int) -> str:
    return (f"ranker_naive refuses N x (L+1)^2 above naive_max_work={naive_max_work} "
            "(its memory bound): send fewer candidates per request")


class _Builder:
    """Appends guard nodes to a graph; every tensor it makes is prefixed `guard/`."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def tensor(self, hint: str) -> str:
        self.count += 1
        return f"{_PREFIX}{hint}_{self.count}"

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs: object) -> str:
        out = self.tensor(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name or out, **attrs))
        return out

    def const(self, value: int | bytes) -> str:
        """A [1] constant: int64, or string for bytes."""
        out = self.tensor("const")
        dtype = TensorProto.STRING if isinstance(value, bytes) else TensorProto.INT64
        self.nodes.append(helper.make_node(
            "Constant", [], [out], name=out, value=helper.make_tensor(out, dtype, [1], [value])))
        return out

    def length(self, name: str) -> str:
        """[1] int64: the length of input `name` (its first axis)."""
        return self.op("Shape", [name], start=0, end=1)

    def fail_if(self, flag: str, rule: str) -> str:
        """flag: [1] int64, 0 or 1. Returns a [1] int64 zero; the node named `rule` fails on 1:
        a string Reshape to [1 + flag], which only the CPU EP can run (module docstring)."""
        shape = self.op("Add", [flag, self.const(1)])
        checked = self.op("Reshape", [self.const(GUARD_DATA), shape], name=rule)
        return self.op("Cast", [checked], to=TensorProto.INT64)

    def flag(self, condition: str) -> str:
        """bool [1] -> int64 [1] (0 or 1)."""
        return self.op("Cast", [condition], to=TensorProto.INT64)


def _lengths_differ(b: _Builder, names: list[str]) -> str:
    first = b.length(names[0])
    differ = [b.op("Not", [b.op("Equal", [first, b.length(n)])]) for n in names[1:]]
    flag = differ[0]
    for other in differ[1:]:
        flag = b.op("Or", [flag, other])
    return b.flag(flag)


def _attach(b: _Builder, target: str, zeros: list[str]) -> None:
    """Route every use of input `target` through target + sum(zeros)."""
    total = zeros[0]
    for z in zeros[1:]:
        total = b.op("Add", [total, z])
    checked = f"{_PREFIX}{target}"
    users = list(b.graph.node)  # the model's nodes only: the guards read the raw input
    b.nodes.append(helper.make_node("Add", [target, total], [checked], name=checked))
    for node in users:
        for i, name in enumerate(node.input):
            if name == target:
                node.input[i] = checked


def add_guards(proto: onnx.ModelProto, graph: str, contract: SplitContract,
               max_candidates: int, naive_max_work: int) -> list[str]:
    """Write the serving guards into `proto` (in place), from a family's declaration: one L for
    the history features, one N for the candidate features, N <= max_candidates, ranker_naive's
    work bound, and user_encoder_append's P + ΔL <= max_history. A graph with the naive graph's
    inputs under another name (an extra evaluation graph, e.g. a benchmark baseline) gets every
    rule but the work bound. Returns the rules added, by node name."""
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
    # Guards first: the graph stays topologically sorted (they read only graph inputs).
    existing = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(b.nodes + existing)
    return rules
