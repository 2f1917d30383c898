"""The exported graphs on a GPU: exact on its execution providers, and how fast and how large.

`scripts/gpu_check.sh` (README, "Production (NGC container, GPU)"): per provider (CUDA, TensorRT
where offered) `python -m export.check --provider P --target gpu [--fp16]` checks the graphs
(scores at every (L, N) within 1e-4, fp16 5e-3; each guard's refusal), then they are timed here,
with the user state's bytes and the GPU's memory. `--cpu`: all on the CPU EP, for CI."""

from __future__ import annotations

import argparse
import functools
import itertools
import shutil
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks import analysis as an
from client.traffic import random_features
from export.config import DEFAULT_CONFIG
from export.family import load_family
from export.runtime import PROVIDERS
from export.split_fuzz import SplitGraphs


def timings(args: argparse.Namespace, folder: Path, provider: str) -> list[dict[str, object]]:
    """The graphs' p50 at every (L, N) (target_fusion on user_encoder's state of that L)."""
    contract = load_family(args.config).contract
    graphs = SplitGraphs(contract, folder, ("user_encoder", "target_fusion"), provider)
    rng, rows = np.random.default_rng(3), []
    for length, n in itertools.product(args.lengths, args.candidates):
        request = random_features(contract, length, n, rng)
        state = graphs.state(request)
        row = {"provider": graphs.sessions["user_encoder"].get_providers()[0], "L": length,
               "N": n, "fp16": args.fp16, "user_kv_mib": sum(a.nbytes for a in state) / 2**20}
        for graph in graphs.sessions:  # the first run warms up
            run = functools.partial(graphs.run, graph, {**request, **graphs.named_state(state)})
            seconds = timeit.repeat(run, number=1, repeat=args.repeats + 1)[1:]
            row[f"{graph}_p50_ms"] = an.percentile_ms(seconds, 50)
        if shutil.which("nvidia-smi"):  # the first GPU's: in a container, no per-process list
            query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
            row["gpu_memory_mib"] = float(subprocess.check_output(query).split()[0])
        print(f"gpu_check: {row}", flush=True)
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="family config")
    p.add_argument("--fp16", action="store_true", help="export and check fp16 graphs")
    p.add_argument("--cpu", action="store_true", help="on the CPU EP: checks the script only")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192], help="L")
    p.add_argument("--candidates", type=int, nargs="+", default=[50, 1000], help="N")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per graph and point")
    p.add_argument("--machine", default="none", help="a note on the machine (GPU: detected)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu"))
    args = p.parse_args(argv)
    offered = [k for k, chain in PROVIDERS.items() if chain[0] in ort.get_available_providers()]
    args.providers = ["cpu"] if args.cpu else [k for k in ("cuda", "tensorrt") if k in offered]
    if not args.cpu and ("cuda" not in args.providers or not shutil.which("nvidia-smi")):
        p.error(f"no CUDA GPU here (onnxruntime offers {', '.join(offered)}; nvidia-smi: "
                f"{shutil.which('nvidia-smi')}): run on one, or --cpu to check the script")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, rows, verdicts = Path(args.out), [], []
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "export.check", "--config", args.config, "--target", "gpu",
               *(["--fp16"] if args.fp16 else []), "--tolerance", "5e-3" if args.fp16 else "1e-4",
               "--lengths", *map(str, args.lengths), "--candidates", *map(str, args.candidates),
               "--max-length", str(max(args.lengths))]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        for provider in args.providers:  # export.check in its own process: its GPU memory too
            report = f"export_check_{provider}.txt"
            proc = subprocess.run([*command, "--provider", provider, "--output", folder],
                                  stdout=subprocess.PIPE, text=True, check=False)
            print(proc.stdout, flush=True)
            (out / report).write_text(proc.stdout)
            verdicts.append(f"{report}: {'FAILED' if proc.returncode else 'passed'}")
            rows += timings(args, Path(folder), provider)
    an.write_csv(out / "gpu_check.csv", rows)
    (out / "gpu_check.md").write_text("\n\n".join([
        "# GPU check", f"Config `{args.config}`, fp16={args.fp16}.", *verdicts, an.table(rows),
        "## Machine", an.machine_table(an.machine(note=args.machine)), ""]))
    print(f"gpu_check: results in {out}")
    return 1 if any("FAILED" in v for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
