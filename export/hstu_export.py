"""Export the HSTU family: its ONNX graphs (export/split_export.py does the work, from the
family's declaration) and, from the command line, a servable pair of Triton repositories
(export/split_repository.py). The attention is one ONNX Loop over query blocks
(export/hstu_attention.py): memory linear in L at every size.

`python -m export.hstu_export --config CONFIG --output DIR` writes the serving repository DIR
(user_encoder, target_fusion, the `ranker` ensemble, user_encoder_append, the user-state cache
user_cache and the `ranker_cached` ensemble) and the evaluation repository DIR_evaluation
(ranker_naive), with production configs (native onnxruntime backend) checked against the graphs
by export/native_rules.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.hstu import HSTUConfig, HSTURanker, build_hstu
from export.native_rules import export_verdict
from export.repositories import EVALUATION_OPTION_HELP, evaluation_beside
from export.split_export import GRAPHS, export_all
from export.split_repository import write_split_repositories
from export.triton_configs import config_source


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
                                    command="python -m export.hstu_export", progress=progress)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.hstu_export",
        description="Export the HSTU family into two Triton model repositories: the serving one "
                    "(user_encoder, target_fusion, the `ranker` ensemble, user_encoder_append, "
                    "the user-state cache user_cache and the `ranker_cached` ensemble) "
                    "and the evaluation one (ranker_naive, the exactness oracle), with "
                    "production configs derived from the family's declaration.")
    p.add_argument("--config", type=Path, required=True, help="HSTU config JSON")
    p.add_argument("--checkpoint", default=None, help="PyTorch state_dict (default: seeded init)")
    p.add_argument("--output", type=Path, required=True, help="serving model repository")
    p.add_argument("--evaluation-output", type=Path, default=None, help=EVALUATION_OPTION_HELP)
    p.add_argument("--graphs", nargs="+", choices=GRAPHS, default=list(GRAPHS),
                   help="graphs to export (default: all); `ranker`, user_cache and "
                        "`ranker_cached` are written with user_encoder and target_fusion")
    args = p.parse_args(argv)
    try:
        cfg = HSTUConfig.load(args.config)
        model = build_hstu(cfg, args.checkpoint)
    except ValueError as e:
        p.error(str(e))
    evaluation = args.evaluation_output or evaluation_beside(args.output)
    write_hstu_repositories(model, args.output, evaluation, tuple(args.graphs),
                            config_source(args.config), progress=True)
    return export_verdict(args.output, evaluation)

if __name__ == "__main__":
    sys.exit(main())
