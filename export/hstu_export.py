"""Export the HSTU family: its ONNX graphs (export/split_export.py does the work, from the
family's declaration) and a servable pair of Triton repositories (export/split_repository.py).
The attention is one ONNX Loop over query blocks (export/hstu_attention.py): memory linear in L
at every size.

The command is the generic one, `python -m export.family --config export/configs/hstu_causal.json
--output DIR` (the config names its factory, export.hstu:from_config): it writes the serving
repository DIR (user_encoder, target_fusion, the `ranker` ensemble, user_encoder_append, the
user-state cache user_cache and the `ranker_cached` ensemble) and the evaluation repository
DIR_evaluation (ranker_naive), with production configs (native onnxruntime backend) checked
against the graphs by export/native_rules.py. `python -m export.hstu_export` is the same command,
reading a config that names no model as an HSTU config.
"""

from __future__ import annotations

import sys
from pathlib import Path

from export.family import COMMAND
from export.family import main as family_main
from export.hstu import HSTUConfig, HSTURanker
from export.split_export import GRAPHS, export_all
from export.split_repository import write_split_repositories

FACTORY = HSTUConfig.factory


def export_hstu(model: HSTURanker, directory: Path, graphs: tuple[str, ...] = GRAPHS,
                progress: bool = False) -> list[Path]:
    """The HSTU graphs into directory/<graph>/1/model.onnx (one folder, no configs), its
    config's serving limits as guards."""
    return export_all(model, directory, max_candidates=model.cfg.max_candidates,
                      naive_max_work=model.cfg.naive_max_work, graphs=graphs, progress=progress)


def write_hstu_repositories(model: HSTURanker, serving: Path, evaluation: Path | None = None,
                            graphs: tuple[str, ...] = GRAPHS, source: str = "",
                            progress: bool = False) -> list[Path]:
    """The servable repository pair (serving + evaluation beside it), its config's serving
    limits as guards and as config parameters."""
    cfg = model.cfg
    return write_split_repositories(model, serving, max_candidates=cfg.max_candidates,
                                    naive_max_work=cfg.naive_max_work,
                                    task_names=cfg.task_names, evaluation=evaluation,
                                    graphs=graphs, source=source,
                                    command=COMMAND, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """`python -m export.family` for configs that name no model: read as HSTU configs."""
    return family_main(argv, prog="python -m export.hstu_export", default_model=FACTORY)


if __name__ == "__main__":
    sys.exit(main())
