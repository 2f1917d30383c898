"""perf_analyzer `--input-data` JSON for every served model at one (L, N) (README, "Tuning with
Model Analyzer"): random data cannot drive these models (lengths must agree, target_fusion needs
the real user state of its user_encoder), so each `<out>/<model>.json` comes from the seeded
traffic generator, with the inputs that model's config.pbtxt declares."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.feeds import history_feeds, named_state
from benchmarks.perf_analyzer import write_input_data
from client.contract import USER_ID
from client.traffic import RequestGenerator
from export.config import DEFAULT_CONFIG, ModelConfig
from export.reference_features import reference_contract
from export.repositories import MODEL_REPOSITORY, evaluation_beside, onnx_path
from export.runtime import make_session
from export.triton_configs import USER_ENCODER_APPEND, parse


def write_inputs(out: Path, repositories: list[Path], cfg: ModelConfig, length: int, n: int,
                 count: int, new_events: int, seed: int,
                 only: list[str] | None = None) -> dict[str, Path]:
    """`<out>/<model>.json` for every served model (or those in `only`), `count` entries each.
    An entry holds what its model's config declares of one request's tensors: the declared
    features, user_id, the user state and what the append reads of the state of all but the last
    `new_events` events (user_encoder_append gets those events as its history)."""
    models = {}
    for path in (p for r in repositories for p in sorted(r.glob("*/config.pbtxt"))):
        config = parse(path.read_text())
        models[config.name or path.parent.name] = [i.name for i in config.input]
    unknown = sorted(set(only or []) - set(models))
    if unknown:
        raise ValueError(f"no such model in {[str(r) for r in repositories]}: {unknown}")
    encoder = make_session(onnx_path(repositories[0], "user_encoder"))
    contract = reference_contract(cfg)
    gen = RequestGenerator(contract, seed=seed)
    entries: dict[str, list[dict[str, np.ndarray]]] = {m: [] for m in only or models}
    cut = max(length - new_events, 0)
    for _ in range(count):
        request = gen.request(length, n).as_inputs()
        history = history_feeds(contract, request)
        tensors = {**request, USER_ID: np.array([gen.user_id()], dtype=np.int64),
                   **named_state(contract, encoder.run(None, history))}
        tensors.update(contract.cached_reads(encoder.run(None, {k: v[:cut] for k, v in
                                                                  history.items()})))
        appended = {**tensors, **{k: v[cut:] for k, v in history.items()}}
        for model, rows in entries.items():
            source = appended if model == USER_ENCODER_APPEND else tensors
            rows.append({name: source[name] for name in models[model]})
    out.mkdir(parents=True, exist_ok=True)
    for model, rows in entries.items():
        write_input_data(out / f"{model}.json", rows)
    return {model: out / f"{model}.json" for model in entries}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_inputs", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON files")
    p.add_argument("--length", type=int, default=1000, help="history events L")
    p.add_argument("--candidates", type=int, default=50, help="candidates N")
    p.add_argument("--new-events", type=int, default=10, help="ΔL of user_encoder_append's entries")
    p.add_argument("--requests", type=int, default=2, help="distinct entries per file, sent "
                   "round-robin (a user K/V entry is layers x 2 x L x d_model floats of JSON)")
    p.add_argument("--models", default="", help="comma-separated models (default: all served)")
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY, help="serving "
                   "repository (its user_encoder computes the user state), the evaluation "
                   "repository beside it")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="model config the repository was exported from")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.length < 0 or args.candidates < 0 or args.requests < 1 or args.new_events < 1:
        p.error("--length and --candidates must be >= 0, --requests and --new-events >= 1")
    if not onnx_path(args.repository, "user_encoder").exists():
        p.error(f"no {onnx_path(args.repository, 'user_encoder')}: run `python -m export` first")
    repositories = [r for r in (args.repository, evaluation_beside(args.repository)) if r.is_dir()]
    try:
        written = write_inputs(args.out, repositories, ModelConfig.load(args.config),
                               args.length, args.candidates, args.requests, args.new_events,
                               args.seed, [m for m in args.models.split(",") if m])
    except ValueError as e:
        p.error(str(e))
    for model, path in written.items():
        print(f"{model}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
