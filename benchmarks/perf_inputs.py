"""perf_analyzer `--input-data` JSON for every served model at one (L, N) (README, "Tuning with
Model Analyzer"): random data cannot drive these models (lengths must agree, target_fusion needs
the real user state of its user_encoder), so each `<out>/<model>.json` comes from the seeded
traffic generator, with the inputs that model's config.pbtxt declares, named by the config's
declaration."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.feeds import history_feeds, named_state
from benchmarks.perf_analyzer import write_input_data
from client.contract import USER_ID
from client.split_contract import SplitContract
from client.traffic import RequestGenerator
from export.config import DEFAULT_CONFIG, ModelConfig
from export.reference_features import reference_contract
from export.repositories import (
    EVALUATION_OPTION_HELP,
    MODEL_REPOSITORY,
    evaluation_beside,
    onnx_path,
)
from export.runtime import make_session
from export.triton_configs import USER_ENCODER_APPEND, parse

DEFAULT_NEW_EVENTS = 10


def served_models(repositories: list[Path]) -> dict[str, list[str]]:
    """model name -> its input names, from every config.pbtxt of the repositories."""
    models = {}
    for repository in repositories:
        for path in sorted(repository.glob("*/config.pbtxt")):
            config = parse(path.read_text())
            models[config.name or path.parent.name] = [i.name for i in config.input]
    return models


def all_tensors(encoder: object, contract: SplitContract, gen: RequestGenerator, length: int,
                n: int, new_events: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every tensor any model takes for one request (the declared features, user_id, the user
    state, what the append reads of the state of all but the last `new_events` events), and the
    append model's own history (the ΔL new events)."""
    request = gen.request(length, n).as_inputs()
    history = history_feeds(contract, request)
    tensors = {**request, USER_ID: np.array([gen.user_id()], dtype=np.int64),
               **named_state(contract, encoder.run(None, history))}
    cut = max(length - new_events, 0)
    cached = encoder.run(None, {k: v[:cut] for k, v in history.items()})
    tensors.update(contract.cached_reads(cached))
    return tensors, {k: v[cut:] for k, v in history.items()}


def write_inputs(out: Path, repositories: list[Path], cfg: ModelConfig, length: int, n: int,
                 count: int, new_events: int, seed: int,
                 only: list[str] | None = None) -> dict[str, Path]:
    """`<out>/<model>.json` for every served model (or those in `only`): `count` entries each."""
    models = served_models(repositories)
    unknown = sorted(set(only or []) - set(models))
    if unknown:
        raise ValueError(f"no such model in {[str(r) for r in repositories]}: {unknown}")
    encoder = make_session(onnx_path(repositories[0], "user_encoder"))
    contract = reference_contract(cfg)
    gen = RequestGenerator(contract, seed=seed)
    rows = [all_tensors(encoder, contract, gen, length, n, new_events) for _ in range(count)]
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for model, inputs in models.items():
        if only and model not in only:
            continue
        entries = []
        for tensors, appended in rows:
            source = {**tensors, **appended} if model == USER_ENCODER_APPEND else tensors
            entries.append({name: source[name] for name in inputs})
        written[model] = out / f"{model}.json"
        write_input_data(written[model], entries)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_inputs",
                                description=__doc__.split("\n\n")[0] + " Writes <out>/<model>"
                                ".json for `perf_analyzer -m MODEL --input-data FILE`.")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON files")
    p.add_argument("--length", type=int, default=1000, help="history events L (default 1000)")
    p.add_argument("--candidates", type=int, default=50, help="candidates N (default 50)")
    p.add_argument("--new-events", type=int, default=DEFAULT_NEW_EVENTS,
                   help="ΔL of user_encoder_append's entries (default %(default)s)")
    p.add_argument("--requests", type=int, default=2,
                   help="distinct entries per file, sent round-robin (default %(default)s; a "
                        "user K/V entry is layers x 2 x L x d_model floats of JSON)")
    p.add_argument("--models", default="",
                   help="comma-separated models (default: every served model)")
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY,
                   help="serving repository (its user_encoder computes the user state; default "
                        "%(default)s)")
    p.add_argument("--evaluation-repository", type=Path, default=None,
                   help=EVALUATION_OPTION_HELP)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="model config the repository was exported from (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.length < 0 or args.candidates < 0 or args.requests < 1 or args.new_events < 1:
        p.error("--length and --candidates must be >= 0, --requests and --new-events >= 1")
    repositories = [args.repository,
                    args.evaluation_repository or evaluation_beside(args.repository)]
    if not onnx_path(args.repository, "user_encoder").exists():
        print(f"perf_inputs: error: no {onnx_path(args.repository, 'user_encoder')}: run "
              "`python -m export` first", file=sys.stderr)
        return 2
    repositories = [r for r in repositories if r.is_dir()]
    try:
        written = write_inputs(args.out, repositories, ModelConfig.load(args.config),
                               args.length, args.candidates, args.requests, args.new_events,
                               args.seed, [m for m in args.models.split(",") if m])
    except ValueError as e:
        print(f"perf_inputs: error: {e}", file=sys.stderr)
        return 2
    for model, path in written.items():
        print(f"perf_inputs: {model}: {path} ({path.stat().st_size / 2**20:.1f} MiB, "
              f"L={args.length} N={args.candidates})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
