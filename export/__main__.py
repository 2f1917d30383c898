"""`python -m export`: write the reference model's ONNX models, their model cards and the Triton
configs, through the export path every family takes (export/split_export.py for the graphs,
export/split_repository.py for the configs), from the reference model's serving plan
(export/split_contract.reference_plan: its declaration, limits, `ranker_base`, fp16 state)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from export.attention import TARGETS
from export.config import DEFAULT_CONFIG, ConfigError, ModelConfig
from export.model import SplitNotExactError, build_model, full_mask_refusal
from export.native_rules import export_verdict
from export.onnx_export import write_model_card
from export.repositories import (
    EVALUATION_OPTION_HELP,
    MODEL_REPOSITORY,
    evaluation_beside,
    onnx_path,
)
from export.split_contract import ReferenceSplitModel
from export.split_export import export_graph, graphs_for
from export.triton_configs import DEFAULT_USER_CACHE_BYTES, config_source, write_configs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export the ranking transformer into two Triton model repositories: the "
        "serving one (user_encoder: history -> user_kv, once per request; target_fusion: N "
        "candidates + user_kv -> scores; user_encoder_append and user_cache for ranker_cached; "
        "the `ranker` and `ranker_cached` ensembles) and the evaluation one (ranker_naive, the "
        "exactness oracle, and ranker_base, the benchmark baseline: never for production "
        "traffic), with the Triton configs generated from the same model config.",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="model config JSON (default: %(default)s); see export/configs/")
    p.add_argument("--output", default=str(MODEL_REPOSITORY),
                   help="serving model repository to write into (default: %(default)s)")
    p.add_argument("--evaluation-output", default=None,
                   help=EVALUATION_OPTION_HELP)
    p.add_argument("--checkpoint", default=None,
                   help="PyTorch state_dict to load (default: seeded random init)")
    p.add_argument("--fp16", action="store_true",
                   help="export fp16 weights and user_kv (for GPU serving; I/O stays int64/fp32)")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="device the graphs are tuned for: the attention sink's head padding "
                   "(gpu: head sizes in multiples of 8 for the fused CUDA kernels; cpu: the "
                   "fastest on CPU). Exact either way. Default: gpu with --fp16, else cpu")
    p.add_argument("--naive-only", action="store_true",
                   help="skip the user_encoder/target_fusion split (a `full`-mask model has none)")
    p.add_argument("--graphs", nargs="+", default=None, metavar="GRAPH",
                   help="graphs to export (default: every graph of the config: user_encoder, "
                   "target_fusion, ranker_naive, user_encoder_append where the model appends, "
                   "ranker_base); configs are written for these, with `ranker`, user_cache and "
                   "`ranker_cached` when user_encoder and target_fusion are among them")
    p.add_argument("--tensorrt-fp16", action="store_true",
                   help="configs with the TensorRT execution accelerator at FP16 precision (GPU)")
    p.add_argument("--response-cache", action="store_true",
                   help="turn Triton's response cache on for user_encoder (serve with "
                   "--cache-config local,size=BYTES); see README 'ranker_cached' for its limits")
    p.add_argument("--user-cache-bytes", type=int, default=DEFAULT_USER_CACHE_BYTES,
                   help="user_cache's LRU bound in bytes (default %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = ModelConfig.load(args.config)
        if cfg.mask == "full" and not args.naive_only:
            raise SplitNotExactError(
                "refusing to export the user_encoder/target_fusion split: "
                + full_mask_refusal(cfg.mask)
            )
        plan = cfg.serving_plan(fp16=args.fp16)
        known = graphs_for(plan.contract, plan.evaluation_graphs, args.naive_only)
        graphs = args.graphs or list(known)
        unknown = [g for g in graphs if g not in known]
        if unknown:
            raise ValueError(f"unknown graphs {unknown} for this config: one of {list(known)}")
        model = build_model(cfg, args.checkpoint)
    except (ConfigError, SplitNotExactError, ValueError, FileNotFoundError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    if args.fp16:
        model = model.half()
    split = ReferenceSplitModel(model)
    target = args.target or ("gpu" if args.fp16 else "cpu")
    out = Path(args.output)
    evaluation = Path(args.evaluation_output or evaluation_beside(out))
    print(f"export: mask={cfg.mask} d_model={cfg.d_model} layers={cfg.num_layers} "
          f"heads={cfg.num_heads} max_history={cfg.max_history} target={target} -> {out} "
          f"(serving), {evaluation} (evaluation)")
    for name in graphs:
        t0 = time.perf_counter()
        path = onnx_path(out, name, evaluation)
        export_graph(split, name, path, max_candidates=plan.max_candidates,
                     naive_max_work=plan.naive_max_work, target=target)
        write_model_card(path.parent / "model_card.json", cfg, model, [name], args.fp16,
                         args.checkpoint, target)
        size_mb = path.stat().st_size / 2**20
        print(f"export: wrote {path} ({size_mb:.1f} MiB) in {time.perf_counter() - t0:.1f}s")
    if not args.naive_only:
        for path in write_configs(plan, out, config_source(Path(args.config)), evaluation,
                                  graphs=graphs, tensorrt_fp16=args.tensorrt_fp16,
                                  response_cache=args.response_cache,
                                  user_cache_bytes=args.user_cache_bytes):
            print(f"export: wrote {path}")
        # The production configs against their graphs, with the native onnxruntime backend's
        # load-time rules: a repository that backend would refuse is never left looking done.
        if export_verdict(out, evaluation):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
