"""Triton model configs for the whole repository pair, generated from a family's declaration.

One source, built with Triton's own protobuf (`model_config_pb2`) and written with
`text_format`: export/split_repository.py derives every config from the family's declaration
(export/split_contract.py) with the building blocks of export/config_parts.py (model names,
backend lines, text form); this module writes and checks the files and is the command (whose
default family is the reference model of `--config`). Two flavours:

* `production`: native `onnxruntime` backend on GPU instances (NGC tritonserver 24.10+). These
  are the committed `model_repository/*/config.pbtxt` (the serving models) and
  `evaluation_repository/*/config.pbtxt` (the oracle and the baseline, export/repositories.py).
* `local`: the same configs with only the backend lines changed (python backend on CPU
  instances, running ONNX Runtime on the very same model.onnx), for the tritonserver binary of
  the nvidia-pytriton wheel, which ships no onnxruntime backend.

The `ranker` and `ranker_cached` ensembles and the `user_cache` python-backend model (the
cross-request user-state cache, model_repository/user_cache/1/model.py) are identical in both
flavours: the NGC container has the python backend too.

`python -m export.triton_configs --check` exits 1 when the committed configs differ from what
this generator writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tritonclient.grpc import model_config_pb2 as mc

from export.config import DEFAULT_CONFIG, ModelConfig
from export.config_parts import (  # noqa: F401  (re-exported: the names callers import from here)
    ALL_MODELS,
    BASE,
    CACHED_ENSEMBLE,
    CORE_ONNX_MODELS,
    DEFAULT_USER_CACHE_BYTES,
    ENSEMBLE,
    FLAVOURS,
    HEADER,
    MAX_APPEND_EVENTS,
    NAIVE,
    ONNX_MODELS,
    ORT_THREADS,
    PYTHON_MODELS,
    SERVING_MODELS,
    TARGET_FUSION,
    USER_CACHE,
    USER_ENCODER,
    USER_ENCODER_APPEND,
    VERSION_WINDOW,
    install_python_models,
    parse,
    to_flavour,
    to_text,
)
from export.repositories import (
    EVALUATION_MODELS,
    EVALUATION_OPTION_HELP,
    MODEL_REPOSITORY,
    REPO_ROOT,
    evaluation_beside,
    repository_of,
)

if TYPE_CHECKING:
    from export.split_contract import ServingPlan

def serving_plan(family: Any, fp16: bool = False) -> ServingPlan:
    """A family's serving plan (export/split_contract.py): `family` is one already, or a family
    config that builds one (`serving_plan(fp16=...)`, as the reference ModelConfig does)."""
    from export.split_contract import ServingPlan, half_state

    if isinstance(family, ServingPlan):
        if fp16 and not family.state_dtypes:
            return dataclasses.replace(family, state_dtypes=half_state(family.contract))
        return family
    return family.serving_plan(fp16=fp16)


def build_configs(family: Any, flavour: str = "production", fp16: bool = False,
                  tensorrt_fp16: bool = False, response_cache: bool = False,
                  user_cache_bytes: int = DEFAULT_USER_CACHE_BYTES,
                  graphs: Sequence[str] | None = None) -> dict[str, mc.ModelConfig]:
    """All model configs of a family's repository pair, by model name, from its declaration
    (export/split_repository.py's `plan_configs`: the ONNX models, the `ranker` and
    `ranker_cached` ensembles and `user_cache`). `family`: a serving plan or a family config
    (`serving_plan`); `fp16`: its state served in fp16; `response_cache` turns Triton's
    response cache on for user_encoder (the zero-code option for exact repeats)."""
    from export.split_repository import plan_configs

    return plan_configs(serving_plan(family, fp16), graphs=graphs, flavour=flavour,
                        tensorrt_fp16=tensorrt_fp16, response_cache=response_cache,
                        cache_bytes=user_cache_bytes)


def write_configs(family: Any, repository: Path, source: str,
                  evaluation: Path | None = None, **kwargs: Any) -> list[Path]:
    """Every config of `family` (build_configs' first argument, `kwargs` its options) into its
    repository: the serving models into `repository`, the oracle and the baseline into
    `evaluation` (default: the evaluation repository beside it)."""
    written = []
    for name, config in build_configs(family, **kwargs).items():
        path = repository_of(name, repository, evaluation) / name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "1").mkdir(exist_ok=True)
        path.write_text(to_text(config, source))
        written.append(path)
    return written + install_python_models(repository)


def stale_configs(family: Any, repository: Path, source: str,
                  evaluation: Path | None = None) -> list[str]:
    """Names of models whose committed config.pbtxt differs from the generator's output, or
    that sit in the wrong repository of the pair (an oracle in the serving one)."""
    stale = []
    for name, config in build_configs(family).items():
        path = repository_of(name, repository, evaluation) / name / "config.pbtxt"
        if not path.exists() or path.read_text() != to_text(config, source):
            stale.append(name)
    misplaced = [name for name in EVALUATION_MODELS
                 if (Path(repository) / name / "config.pbtxt").exists()]
    return stale + [f"{name} (in the serving repository)" for name in misplaced]


def config_source(path: Path) -> str:
    """How a config file is named in the generated header (repo-relative when possible)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.triton_configs",
        description="Write (or --check) the production Triton configs of every model.",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config JSON")
    p.add_argument("--repository", default=str(MODEL_REPOSITORY),
                   help="serving model repository (default: %(default)s)")
    p.add_argument("--evaluation-repository", default=None,
                   help=EVALUATION_OPTION_HELP)
    p.add_argument("--fp16", action="store_true", help="the user state in fp16 (an --fp16 export)")
    p.add_argument("--tensorrt-fp16", action="store_true",
                   help="add the TensorRT execution accelerator with FP16 precision (GPU)")
    p.add_argument("--response-cache", action="store_true",
                   help="turn Triton's response cache on for user_encoder (serve with "
                        "--cache-config local,size=BYTES): exact repeats of the whole history "
                        "skip the encoder; see README 'ranker_cached' for its limits")
    p.add_argument("--user-cache-bytes", type=int, default=DEFAULT_USER_CACHE_BYTES,
                   help="user_cache's LRU bound in bytes: user-state bytes per user x users to "
                        "keep (default %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="only compare: exit 1 when a committed config differs")
    args = p.parse_args(argv)
    cfg = ModelConfig.load(args.config)
    source = config_source(Path(args.config))
    repo = Path(args.repository)
    evaluation = Path(args.evaluation_repository or evaluation_beside(repo))
    if args.check:
        stale = stale_configs(cfg, repo, source, evaluation)
        if stale:
            print(f"stale Triton configs: {stale}; run `python -m export.triton_configs`")
            return 1
        print(f"Triton configs are up to date ({repo}, {evaluation})")
        return 0
    for path in write_configs(cfg, repo, source, evaluation, fp16=args.fp16,
                              tensorrt_fp16=args.tensorrt_fp16,
                              response_cache=args.response_cache,
                              user_cache_bytes=args.user_cache_bytes):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
