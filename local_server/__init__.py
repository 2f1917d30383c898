"""The local Triton runtime (no Docker, CPU): the tritonserver binary of the nvidia-pytriton
wheel, a runnable copy of model_repository/ with the python-backend ONNX Runtime stand-in, the
watchdog and the process helpers. Entry point: scripts/serve.sh."""
