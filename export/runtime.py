"""ONNX Runtime sessions as the project runs them: in the local Triton python backend, in the
benchmarks' in-process timings and in the tests, so all three measure the same thing."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

THREADS_ENV = "RANKER_ORT_THREADS"


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Full graph optimisation; no spinning: in an ensemble the models take turns on the same
    cores, and an idle model's spinning threads would steal them from the busy one."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(os.environ.get(THREADS_ENV, "0")) if threads is None else threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def make_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    providers = ["CPUExecutionProvider"]
    if os.environ.get("RANKER_ORT_CUDA") == "1":
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), session_options(threads), providers=providers)


class ContractError(ValueError):
    """A request whose tensors cannot belong together (the message names them)."""


def check_lengths(inputs: Mapping[str, np.ndarray]) -> None:
    """Tensors of one group must have equal lengths: all `history_*` ([L]) and all
    `candidate_*` ([N]). ONNX broadcasting would otherwise turn a length-1 tensor into a silent
    misalignment, so this is checked before any model runs."""
    for prefix, axis_name in (("history_", "L"), ("candidate_", "N")):
        group = {n: a.shape[0] for n, a in inputs.items() if n.startswith(prefix) and a.ndim}
        if len(set(group.values())) > 1:
            sizes = ", ".join(f"{n} has {k}" for n, k in group.items())
            raise ContractError(
                f"inputs {sorted(group)} must have the same length ({axis_name}), but {sizes}"
            )


def check_limits(inputs: Mapping[str, np.ndarray], max_candidates: int) -> None:
    """Refuse requests above the served candidate limit (memory and latency stay bounded)."""
    n = max((a.shape[0] for name, a in inputs.items() if name.startswith("candidate_") and a.ndim),
            default=0)
    if max_candidates and n > max_candidates:
        raise ContractError(
            f"{n} candidates exceed the limit of {max_candidates} per request "
            "(model config max_candidates); split the request"
        )


def run_in_chunks(
    run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], inputs: Mapping[str, np.ndarray],
    chunk: int,
) -> list[np.ndarray]:
    """Call `run` (an ONNX Runtime session, or any scorer of the contract) on slices of at most
    `chunk` candidates and concatenate its outputs.

    Candidates never see each other, so slicing changes no score; it bounds the memory of a
    model whose activations grow with N (ranker_naive holds N x (L+1)^2 attention scores)."""
    names = [n for n, a in inputs.items() if n.startswith("candidate_") and a.ndim]
    n = inputs[names[0]].shape[0] if names else 0
    if not chunk or n <= chunk:
        return run(dict(inputs))
    parts = [
        run({**inputs, **{k: inputs[k][start : start + chunk] for k in names}})
        for start in range(0, n, chunk)
    ]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
