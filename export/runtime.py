"""ONNX Runtime sessions as the project runs them: in the local Triton python backend, in the
benchmarks' in-process timings and in the tests, so all three measure the same thing."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

THREADS_ENV = "RANKER_ORT_THREADS"


def session_options(threads: int | None = None, inter_threads: int = 1) -> ort.SessionOptions:
    """Full graph optimisation; the thread counts of the Triton config (`intra_op_thread_count`,
    `inter_op_thread_count`); no spinning. In an ensemble the models take turns on the same
    cores, and an idle model's spinning threads would steal them from the busy one: production
    shares one ONNX Runtime pool between the models (`--backend-config=onnxruntime,
    enable-global-threadpool=true`), the local stand-in runs each model in its own process, where
    turning spinning off is the equivalent."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(os.environ.get(THREADS_ENV, "0")) if threads is None else threads
    so.inter_op_num_threads = inter_threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


# Execution providers by short name, each falling back as Triton's onnxruntime backend does.
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                          "CPUExecutionProvider"]}


def make_session(path: str | Path, threads: int | None = None, inter_threads: int = 1,
                 provider: str | None = None) -> ort.InferenceSession:
    """A session on `provider` (default: cuda where RANKER_ORT_CUDA=1, else cpu)."""
    provider = provider or ("cuda" if os.environ.get("RANKER_ORT_CUDA") == "1" else "cpu")
    return ort.InferenceSession(str(path), session_options(threads, inter_threads),
                                providers=PROVIDERS[provider])


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
