"""Export the HSTU family's ONNX graphs (export/split_export.py does the work, from the
family's declaration). The attention is one ONNX Loop over query blocks
(export/hstu_attention.py): memory linear in L at every size.

`python -m export.hstu_export --config CONFIG --output DIR` writes DIR/<graph>/1/model.onnx.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.hstu import HSTUConfig, HSTURanker, build_hstu
from export.split_export import GRAPHS, export_all


def export_hstu(model: HSTURanker, directory: Path, graphs: tuple[str, ...] = GRAPHS,
                progress: bool = False) -> list[Path]:
    """The HSTU graphs into directory/<graph>/1/model.onnx, its config's serving limits as
    guards."""
    return export_all(model, directory, max_candidates=model.cfg.max_candidates,
                      naive_max_work=model.cfg.naive_max_work, graphs=graphs, progress=progress)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.hstu_export",
                                description="Export the HSTU family's ONNX graphs.")
    p.add_argument("--config", type=Path, required=True, help="HSTU config JSON")
    p.add_argument("--checkpoint", default=None, help="PyTorch state_dict (default: seeded init)")
    p.add_argument("--output", type=Path, required=True, help="model repository directory")
    p.add_argument("--graphs", nargs="+", choices=GRAPHS, default=list(GRAPHS))
    args = p.parse_args(argv)
    try:
        cfg = HSTUConfig.load(args.config)
        model = build_hstu(cfg, args.checkpoint)
    except ValueError as e:
        p.error(str(e))
    export_hstu(model, args.output, tuple(args.graphs), progress=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
