"""ONNX Runtime sessions as the project runs them: in the local Triton python backend, in the
benchmarks' in-process timings and in the tests, so all three measure the same thing."""

from __future__ import annotations

import os
from collections.abc import Mapping
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
