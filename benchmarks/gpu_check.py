"""The exported graphs on a GPU's execution providers, checked against the CPU's scores.

`scripts/gpu_check.sh` (README, "Production (NGC container, GPU)"): exports the gpu-target
graphs (or takes --repository); per provider (CUDA, TensorRT where offered) compares
user_encoder + target_fusion scores with the CPU EP's at every (L, N) (fp32 1e-4, fp16 5e-3),
sends each guard's bad request and checks it is refused by name, times both graphs and records
the user state's bytes and GPU memory. Writes gpu_check.csv and gpu_check.md; `--cpu` runs the
same path on the CPU EP (CI checks the script). Every feed is named by the config's declaration.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks import analysis as an
from benchmarks.feeds import named_state, stand_in_state
from client.traffic import RequestGenerator
from export.config import DEFAULT_CONFIG, ModelConfig
from export.guards import append_rule, length_rule, limit_rule, naive_rule
from export.model import build_model
from export.onnx_export import export_graph
from export.reference_features import reference_contract
from export.runtime import session_options

REPO_ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
             "cpu": "CPUExecutionProvider"}
GRAPHS = ("user_encoder", "target_fusion", "ranker_naive", "user_encoder_append")
TOLERANCE = {False: 1e-4, True: 5e-3}  # fp32, fp16 against the CPU EP's scores


def session(path: Path, provider: str) -> ort.InferenceSession:
    """The project's session options on `provider`, falling back as Triton's backend does
    (TensorRT -> CUDA -> CPU). Errors are this script's to report: ORT's own log stays quiet."""
    providers = [PROVIDERS[provider]]
    if provider == "tensorrt":
        providers.append(PROVIDERS["cuda"])
    if provider != "cpu":
        providers.append(PROVIDERS["cpu"])
    options = session_options()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers)


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})


def gpu_memory_mib() -> float | None:
    """This process's GPU memory (nvidia-smi), None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=30).stdout
    for line in out.splitlines():
        pid, used = (x.strip() for x in line.split(","))
        if pid == str(os.getpid()):
            return float(used)
    return 0.0


def bad_requests(cfg: ModelConfig, fp16: bool) -> list[tuple[str, str, dict[str, np.ndarray]]]:
    """(graph, rule, request) for every guard: each request breaks exactly that rule."""
    contract = reference_contract(cfg)
    gen = RequestGenerator(contract, seed=9)
    ok = gen.request(10, 4).as_inputs()
    base = {**ok, **named_state(contract, stand_in_state(contract, 10, half=fp16))}
    history = [f.name for f in contract.history_features]
    candidates_of = [f.name for f in contract.candidate_features]

    def candidates(request: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        return {**request, **{k: np.resize(request[k], n) for k in candidates_of}}

    long = gen.request(min(1000, cfg.max_history), 4).as_inputs()
    naive_n = cfg.naive_max_work // (min(1000, cfg.max_history) + 1) ** 2 + 1
    cases = [  # the last history / candidate feature one entry long: lengths disagree
        ("user_encoder", length_rule(history, "L"),
         {**base, history[-1]: ok[history[-1]][:1]}),
        ("target_fusion", length_rule(candidates_of, "N"),
         {**base, candidates_of[-1]: ok[candidates_of[-1]][:1]}),
        ("target_fusion", limit_rule(cfg.max_candidates),
         candidates(base, cfg.max_candidates + 1)),
        ("ranker_naive", naive_rule(cfg.naive_max_work), candidates(long, naive_n)),
    ]
    if contract.appendable:
        # a cached state already max_history events long, each tensor cut as the append reads it
        full = stand_in_state(contract, contract.max_history, half=fp16)
        cases.append(("user_encoder_append", append_rule(cfg.max_history),
                      {**base, **contract.cached_reads(full)}))
    return cases


def check(args: argparse.Namespace) -> list[dict[str, object]]:
    cfg = ModelConfig.load(args.config)
    repo = Path(args.repository) if args.repository else Path(tempfile.mkdtemp("gpu_check"))
    graphs = [g for g in GRAPHS if cfg.mask == "causal" or g != "user_encoder_append"]
    if not args.repository:
        model = build_model(cfg)
        model = model.half() if args.fp16 else model
        for g in graphs:
            print(f"gpu_check: exporting {g} (target gpu{', fp16' if args.fp16 else ''})",
                  flush=True)
            export_graph(model, g, repo / g / "1" / "model.onnx", fp16=args.fp16, target="gpu")
    path = {g: repo / g / "1" / "model.onnx" for g in graphs}
    reference = {g: session(path[g], "cpu") for g in ("user_encoder", "target_fusion")}
    rows: list[dict[str, object]] = []
    contract = reference_contract(cfg)
    gen = RequestGenerator(contract, seed=3)
    for provider in args.providers:
        sessions = {g: session(path[g], provider) for g in graphs}
        active = sessions["user_encoder"].get_providers()[0]
        for length in args.lengths:
            for n in args.candidates:
                request = gen.request(length, n).as_inputs()
                scores = {}
                for name, graphs_of in (("cpu", reference), (provider, sessions)):
                    state = run(graphs_of["user_encoder"], request)
                    feeds = {**request, **named_state(contract, state)}
                    scores[name] = run(graphs_of["target_fusion"], feeds)[0]
                timings = {}
                for g in ("user_encoder", "target_fusion"):  # feeds: the provider's state
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        run(sessions[g], feeds)
                        times.append(time.perf_counter() - t0)
                    timings[g] = an.percentile_ms(times, 50)
                diff = float(np.abs(scores[provider] - scores["cpu"]).max())
                rows.append({"provider": provider, "active_provider": active, "check": "scores",
                             "L": length, "N": n, "fp16": args.fp16, "max_abs_diff": diff,
                             "ok": diff <= TOLERANCE[args.fp16],
                             "user_encoder_p50_ms": timings["user_encoder"],
                             "target_fusion_p50_ms": timings["target_fusion"],
                             "user_kv_mib": sum(a.nbytes for a in state) / 2**20,
                             "gpu_memory_mib": gpu_memory_mib()})
                print(f"gpu_check: {provider} L={length} N={n}: max |diff| vs CPU {diff:.2e}, "
                      f"user_encoder {timings['user_encoder']:.2f} ms, target_fusion "
                      f"{timings['target_fusion']:.2f} ms", flush=True)
        for graph, rule, bad in bad_requests(cfg, args.fp16):
            try:
                run(sessions[graph], bad)
                refused, text = False, "served"
            except Exception as e:  # ORT raises its own exception types
                text = str(e)
                refused = f"Name:'{rule}'" in text
            rows.append({"provider": provider, "active_provider": active, "check": "guard",
                         "graph": graph, "rule": rule, "ok": refused,
                         "answer": text.splitlines()[0][:200]})
            print(f"gpu_check: {provider} guard {graph}: {'refused, named' if refused else 'NOT'}"
                  f" ({rule[:60]})", flush=True)
    return rows


def write(rows: list[dict[str, object]], out: Path, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    an.write_csv(out / "gpu_check.csv", rows)
    info = an.machine(**({"note": args.machine} if args.machine else {}))
    lines = ["# GPU check", "", f"Config `{args.config}`, fp16={args.fp16}, providers "
             f"{', '.join(args.providers)}.", "", "## Machine", "", an.machine_table(info), "",
             an.table([r for r in rows if r["check"] == "scores"],
                   {"provider": "active_provider", "L": "L", "N": "N",
                    "max abs diff vs CPU": "max_abs_diff",
                    "user_encoder p50 ms": "user_encoder_p50_ms",
                    "target_fusion p50 ms": "target_fusion_p50_ms", "user state MiB": "user_kv_mib",
                    "GPU MiB": "gpu_memory_mib"},
                   {"max_abs_diff": an.sci, "user_encoder_p50_ms": "{:.2f}",
                    "target_fusion_p50_ms": "{:.2f}", "user_kv_mib": "{:.1f}"}), "",
             an.table([r for r in rows if r["check"] == "guard"],
                   {"provider": "active_provider", "graph": "graph", "rule": "rule",
                    "refused, named": "ok"}), ""]
    (out / "gpu_check.md").write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config (%(default)s)")
    p.add_argument("--repository", help="an exported repository to check instead of exporting")
    p.add_argument("--fp16", action="store_true", help="export and check fp16 graphs")
    p.add_argument("--cpu", action="store_true",
                   help="run on the CPU EP against itself: checks this script, not a GPU")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--candidates", type=int, nargs="+", default=[50, 1000])
    p.add_argument("--repeats", type=int, default=10, help="timed runs per graph and point")
    p.add_argument("--machine", default="",
                   help="a note on the machine beyond what is detected (CPU, GPU via nvidia-smi, "
                        "versions)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "gpu"))
    args = p.parse_args(argv)
    available = ort.get_available_providers()
    if args.cpu:
        args.providers = ["cpu"]
    else:
        args.providers = [k for k in ("cuda", "tensorrt") if PROVIDERS[k] in available]
        if "cuda" not in args.providers or not shutil.which("nvidia-smi"):
            p.error("no CUDA GPU here (onnxruntime offers " + ", ".join(available)
                    + "; nvidia-smi " + ("found" if shutil.which("nvidia-smi") else "missing")
                    + "): run on a GPU machine, or --cpu to check the script itself")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = check(args)
    write(rows, Path(args.out), args)
    failed = [r for r in rows if not r["ok"]]
    print(f"gpu_check: {len(rows) - len(failed)}/{len(rows)} checks passed; results in "
          f"{args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
