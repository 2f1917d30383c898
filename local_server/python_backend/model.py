"""Triton python-backend model that runs one ONNX model with ONNX Runtime (local flavour).

The nvidia-pytriton wheel's tritonserver has no onnxruntime backend, so locally each ONNX model
is served by this file next to the very same model.onnx the production `onnxruntime` backend
loads. It is a stand-in, and deliberately a thin one: every serving rule (equal lengths, the
candidate limit, ranker_naive's memory bound) lives in the graph (export/guards.py), so what is
tested here is what the native backend enforces. Like the native backend, an ONNX Runtime failure
comes back as INTERNAL with ONNX Runtime's text, which quotes the failing guard node's name.

It reads the same ONNX Runtime thread parameters as the native backend (`intra_op_thread_count`,
`inter_op_thread_count`) from the model config. Every failure becomes an error response for that
request only: the stub must never die, or the model stays broken while the server still reports
it ready.


It imports nothing of the project by module name: export/runtime.py (the session options every
part of the project shares) is copied beside it as ranker_ort.py (local_server/repository.py)
and loaded from this file's own folder, so a local repository runs whatever directory
tritonserver starts in and whatever PYTHONPATH it has (Model Analyzer's local launch mode).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _load_beside(name: str) -> object:
    """The module `name`.py from this file's folder, by path."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ort = _load_beside("ranker_ort")
THREADS_ENV, make_session = _ort.THREADS_ENV, _ort.make_session


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        intra = int(os.environ.get(THREADS_ENV) or params.get("intra_op_thread_count", "0"))
        inter = int(params.get("inter_op_thread_count", "1")) or 1
        self.session = make_session(version_dir / "model.onnx", intra, inter)
        self.input_names = [i["name"] for i in config["input"]]
        self.outputs = [
            (o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]
        ]

    def _run(self, request: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
        feeds = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:  # Triton checks this first; kept for direct python-backend use
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{self.name}: missing input '{name}'", pb_utils.TritonError.INVALID_ARG))
            feeds[name] = tensor.as_numpy()
        results = self.session.run([n for n, _ in self.outputs], feeds)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=dtype))
            for (name, dtype), value in zip(self.outputs, results, strict=True)
        ])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request))
            except Exception as e:  # ONNX Runtime refused the request: report it, stay alive
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{self.name}: onnx runtime error: {e}", pb_utils.TritonError.INTERNAL)))
        return responses
