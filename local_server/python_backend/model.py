"""Triton python-backend model that runs one ONNX model with ONNX Runtime (local flavour).

The nvidia-pytriton wheel's tritonserver has no onnxruntime backend, so locally each ONNX model
is served by this file next to the very same model.onnx the production `onnxruntime` backend
loads. Every failure becomes an error response for that request only: the stub must never die,
or the model stays broken while the server still reports it ready.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from export.runtime import (
    ContractError,
    check_lengths,
    check_limits,
    make_session,
    run_in_chunks,
)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.session = make_session(version_dir / "model.onnx")
        self.input_names = [i["name"] for i in config["input"]]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_candidates = int(params.get("max_candidates", 0))
        self.candidate_chunk = int(params.get("candidate_chunk", 0))
        self.outputs = [
            (o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]
        ]

    def _run(self, request: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
        inputs = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:  # Triton checks this too; kept for direct python-backend use
                raise ContractError(f"{self.name}: missing input '{name}'")
            inputs[name] = tensor.as_numpy()
        check_lengths(inputs)
        check_limits(inputs, self.max_candidates)
        names = [n for n, _ in self.outputs]
        results = run_in_chunks(lambda feeds: self.session.run(names, feeds), inputs,
                                self.candidate_chunk)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=dtype))
            for (name, dtype), value in zip(self.outputs, results, strict=True)
        ])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request))
            except ContractError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{self.name}: {e}", pb_utils.TritonError.INVALID_ARG)))
            except Exception as e:  # ONNX Runtime rejects the tensors: report, stay alive
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{self.name}: {type(e).__name__}: {e}", pb_utils.TritonError.INVALID_ARG)))
        return responses
