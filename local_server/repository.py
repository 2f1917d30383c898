"""The local flavour of a model repository: a folder tritonserver (the nvidia-pytriton wheel's,
which has no onnxruntime backend) can serve from any working directory.

Each ONNX model gets the local flavour of its config (only the backend lines change:
export/triton_configs.py), a link to the very same model.onnx (and its model card, which
user_cache reads to tag its entries with the weights) and the python-backend stand-in
(local_server/python_backend/model.py) with `export/runtime.py` copied beside it as
`ranker_ort.py`: the stand-in loads that file by its own path, so no model imports the project's
packages through the working directory or PYTHONPATH. The ensembles and the python-backend
models (user_cache) are copied as they are: they run the same code in production.

`python -m local_server.repository --out DIR` writes such a folder for Triton's own tools
(Model Analyzer's local launch mode, a hand-started tritonserver); it stays until you delete it.
The local server (local_server/triton.py) builds one per run under build/ and removes it on stop.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from export.repositories import (
    EVALUATION_OPTION_HELP,
    MODEL_REPOSITORY,
    REPO_ROOT,
    evaluation_beside,
)
from export.triton_configs import parse, to_flavour, to_text

LOCAL_BACKEND_MODEL = Path(__file__).resolve().parent / "python_backend" / "model.py"
# What the stand-in imports, copied beside it (the name it loads: python_backend/model.py).
LOCAL_BACKEND_FILES = {"model.py": LOCAL_BACKEND_MODEL,
                       "ranker_ort.py": REPO_ROOT / "export" / "runtime.py"}


class ServerError(RuntimeError):
    """The local server or its repository could not be prepared or started (the message says
    why)."""


def install_local_backend(version_dir: Path) -> None:
    """The python-backend stand-in and what it imports, into one model version folder."""
    version_dir.mkdir(parents=True, exist_ok=True)
    for name, source in LOCAL_BACKEND_FILES.items():
        shutil.copy2(source, version_dir / name)


def build_local_repository(repository: Path, target: Path) -> Path:
    """A runnable copy of `repository` at `target` (replaced) with local-flavour configs for
    the ONNX models."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for model_dir in sorted(p for p in repository.iterdir() if (p / "config.pbtxt").exists()):
        config = parse((model_dir / "config.pbtxt").read_text())
        out = target / model_dir.name
        version = out / "1"
        version.mkdir(parents=True)
        if config.platform == "ensemble" or config.backend == "python":
            shutil.copy2(model_dir / "config.pbtxt", out / "config.pbtxt")
            for source in sorted((model_dir / "1").glob("*.py")):
                shutil.copy2(source, version / source.name)
            if config.backend == "python" and not (version / "model.py").exists():
                raise ServerError(f"{model_dir}/1/model.py is missing (python-backend model)")
            continue
        onnx_file = model_dir / "1" / "model.onnx"
        if not onnx_file.exists():
            raise ServerError(
                f"{onnx_file} is missing: run `python -m export` first to write the ONNX models"
            )
        (out / "config.pbtxt").write_text(to_text(to_flavour(config, "local"),
                                                  f"{model_dir}/config.pbtxt, local flavour"))
        install_local_backend(version)
        (version / "model.onnx").symlink_to(onnx_file.resolve())
        card = model_dir / "1" / "model_card.json"
        if card.exists():
            (version / "model_card.json").symlink_to(card.resolve())
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m local_server.repository",
        description="Write the local flavour of the serving repository (and of its evaluation "
                    "repository) into a folder of your choice, for Triton's own tools: "
                    "tritonserver from the nvidia-pytriton wheel serves it from any working "
                    "directory (scripts/tritonserver.sh), Model Analyzer's local launch mode "
                    "profiles it. It stays until you delete it; model.onnx files are links to "
                    "the export, so run `python -m export` first.",
    )
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write (replaced if it exists)")
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY,
                   help="serving repository to read (default %(default)s)")
    p.add_argument("--evaluation-repository", type=Path, default=None,
                   help=EVALUATION_OPTION_HELP + ", to read")
    p.add_argument("--evaluation-out", type=Path, default=None,
                   help="where its local flavour goes (default: the folder beside --out, "
                        "<out>_evaluation)")
    p.add_argument("--no-evaluation", action="store_true",
                   help="write the serving repository only (ranker_naive, ranker_base left out)")
    args = p.parse_args(argv)
    pairs = [(args.repository, args.out)]
    if not args.no_evaluation:
        pairs.append((args.evaluation_repository or evaluation_beside(args.repository),
                      args.evaluation_out or evaluation_beside(args.out)))
    try:
        for source, out in pairs:
            if not source.is_dir():
                raise ServerError(f"no repository at {source}: run `python -m export`")
            written = build_local_repository(source.resolve(), out.resolve())
            models = sorted(d.name for d in written.iterdir())
            print(f"local_server.repository: wrote {written} ({', '.join(models)})")
    except ServerError as e:
        print(f"local_server.repository: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
