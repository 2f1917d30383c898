"""Which Triton model repository holds which model: serving vs evaluation.

Why two: the production repository must hold only what production traffic may reach. The
serving repository (`model_repository/`) holds what `ranker` and `ranker_cached` need
(user_encoder, target_fusion, user_encoder_append, user_cache and the two ensembles). The
oracle and the baseline (`ranker_naive`, which by design may take ~1.8 GiB per request, and
`ranker_base`) live in a separate evaluation repository (`evaluation_repository/`), which the
local server, the main job, the tests and the benchmarks load beside the serving one
(tritonserver accepts several `--model-repository`) and a production server does not.

A serving repository anywhere else (`python -m export --output DIR`) gets its evaluation
repository beside it, `DIR_evaluation`, unless told otherwise, so that every tool that takes one
`--repository` finds both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
EVALUATION_REPOSITORY = REPO_ROOT / "evaluation_repository"
# The models no production traffic should reach: the exactness oracle and the benchmark baseline.
EVALUATION_MODELS = ("ranker_naive", "ranker_base")


# The help text of every command's evaluation-repository option.
EVALUATION_OPTION_HELP = ("evaluation repository of ranker_naive and ranker_base (default: "
                          "evaluation_repository/ beside model_repository/, else "
                          "<serving repository>_evaluation beside it)")


def evaluation_beside(serving: Path) -> Path:
    """The evaluation repository that goes with `serving`: `evaluation_repository/` beside a
    folder named `model_repository`, else `<serving>_evaluation` beside it."""
    serving = Path(serving)
    if serving.name == MODEL_REPOSITORY.name:
        return serving.with_name(EVALUATION_REPOSITORY.name)
    return serving.with_name(f"{serving.name}_evaluation")


def repository_of(name: str, serving: Path, evaluation: Path | None = None) -> Path:
    """The repository that holds model `name` of the pair (`evaluation` defaults to the one
    beside `serving`)."""
    if name in EVALUATION_MODELS:
        return Path(evaluation) if evaluation is not None else evaluation_beside(serving)
    return Path(serving)


def model_dir(serving: Path, name: str, evaluation: Path | None = None) -> Path:
    """`<repository>/<name>` in whichever repository of the pair holds the model."""
    return repository_of(name, serving, evaluation) / name


def copy_repositories(serving: Path, target: Path) -> Path:
    """Copy the serving repository `serving` to `target` and its evaluation repository to the one
    beside `target` (symlinks kept), so that every tool given `target` finds both."""
    pairs = ((serving, target), (evaluation_beside(serving), evaluation_beside(target)))
    for source, dest in pairs:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for model in Path(source).iterdir():
            shutil.copytree(model, dest / model.name, symlinks=True)
    return Path(target)


def onnx_path(serving: Path, name: str, evaluation: Path | None = None) -> Path:
    """The served ONNX file of model `name` (version 1)."""
    return model_dir(serving, name, evaluation) / "1" / "model.onnx"
