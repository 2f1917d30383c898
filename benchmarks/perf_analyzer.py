"""perf_analyzer (tritonclient 2.51 wheel) as the benchmarks run it: binary, input files, one
run, its figures from its own CSV (`-f --verbose-csv`) and Triton's statistics API. A run that
gives up stabilising writes no CSV: it keeps the last window's `Pass` line, flagged `unstable`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import analysis as an
from benchmarks import cpu

PARTS = ("success", "queue", "compute_input", "compute_infer", "compute_output")
COMPUTE = PARTS[2:]
_PASS = re.compile(r"Pass \[\d+\] throughput: ([\d.eE+-]+) infer/sec\. p50 latency: (\d+) usec")


def perf_analyzer_path() -> Path:
    """The wheel installs the binary beside the interpreter (<venv>/bin/perf_analyzer)."""
    path = Path(sys.executable).parent / "perf_analyzer"
    if not path.exists():
        raise FileNotFoundError(f"no {path}: is tritonclient[all]==2.51.0 installed?")
    return path


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 even on CPU: the nvidia-cuda-runtime wheel has it."""
    import tritonclient

    lib = Path(tritonclient.__file__).resolve().parents[1] / "nvidia" / "cuda_runtime" / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH"))
                                             if p)
    return env


def perf_analyzer_version() -> str:
    """Its version ("2.51.0 (commit ...)"); raises where the binary does not run."""
    out = subprocess.run([str(perf_analyzer_path()), "--version"], env=perf_analyzer_env(),
                         capture_output=True, text=True, timeout=30)
    text = (out.stdout + out.stderr).strip()
    if out.returncode != 0:
        raise RuntimeError(f"perf_analyzer --version failed ({out.returncode}): {text}")
    return text.replace("Perf Analyzer Version ", "")


def write_input_data(path: Path, requests: Sequence[Mapping[str, np.ndarray]]) -> None:
    """--input-data JSON: content and shape of every tensor, one entry per request (sent
    round-robin)."""
    data = [{name: {"content": np.asarray(a).reshape(-1).tolist(), "shape": list(np.shape(a))}
             for name, a in request.items()} for request in requests]
    path.write_text(json.dumps({"data": data}))


@dataclass(frozen=True)
class Settings:
    request_count: int  # --measurement-request-count K
    stability: float  # -s, percent
    max_trials: int  # -r
    concurrency: int
    timeout_s: float


@dataclass
class Result:
    row: dict[str, object]  # points.csv's columns from status on
    stats: dict[str, dict[str, float]]  # Triton's, per model, over the run (stats_delta)
    avg_grpc_us: float | None  # client side: (un)marshalling + response wait


def model_stats(url: str) -> dict[str, dict[str, float]]:
    """Triton's cumulative statistics per model: the request count and total ns per part."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(url) as client:
            stats = client.get_inference_statistics(as_json=True).get("model_stats", [])
    except InferenceServerException:  # the server is gone: perf_analyzer's own error says why
        return {}
    columns = {f"inference_stats.{p}.ns": p for p in PARTS} | {
        "inference_stats.success.count": "count"}
    frame = pd.json_normalize(stats).set_index("name").reindex(columns=list(columns))
    return frame.rename(columns=columns).astype(float).fillna(0.0).to_dict("index")


def stats_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
                ) -> dict[str, dict[str, float]]:
    """Per model that served requests in between: the count and the average of each part (us);
    `overhead` is what the request latency holds beyond queue and compute."""
    if not after:  # the server is gone
        return {}
    delta = pd.DataFrame(after).T.sub(pd.DataFrame(before).T, fill_value=0.0)
    delta = delta[delta["count"] > 0]
    avg = delta[list(PARTS)].div(delta["count"], axis=0) / 1e3
    avg["compute"] = avg[list(COMPUTE)].sum(axis=1)
    avg["overhead"] = avg["success"] - avg["queue"] - avg["compute"]
    avg["inference_count"] = delta["count"]
    avg = avg.rename(columns={"success": "avg_request_latency"})
    return avg[["inference_count", "avg_request_latency", "overhead", "queue", "compute",
                *COMPUTE]].to_dict("index")


def run(model: str, url: str, input_file: Path, work_dir: Path, s: Settings, tag: str) -> Result:
    """One perf_analyzer run (one concurrency level) and the CPU others used meanwhile; never
    raises for a failed measurement."""
    work_dir.mkdir(parents=True, exist_ok=True)
    csv_file = work_dir / f"{tag}.csv"
    csv_file.unlink(missing_ok=True)
    cmd = [str(perf_analyzer_path()), "-m", model, "-i", "grpc", "-u", url,
           "--input-data", str(input_file), "--concurrency-range", str(s.concurrency),
           "--measurement-mode", "count_windows", "--measurement-request-count",
           str(s.request_count), "-s", str(s.stability), "-r", str(s.max_trials),
           # stabilise on p50 (robust to the odd slow request) and print it for every window
           "--percentile", "50", "-v", "-f", str(csv_file), "--verbose-csv"]
    before, snap, t0 = model_stats(url), cpu.snapshot(), time.monotonic()
    try:  # subprocess.run kills perf_analyzer on a timeout or an interrupt (SIGTERM, Ctrl-C)
        proc = subprocess.run(cmd, env=perf_analyzer_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=s.timeout_s)
        stdout, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout, code = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "", None
    wall_s, load = time.monotonic() - t0, cpu.external_cores(snap)
    (work_dir / f"{tag}.log").write_text(" ".join(cmd) + "\n\n" + stdout)
    stats = stats_delta(before, model_stats(url))
    passes = _PASS.findall(stdout)
    found = code == 0 and csv_file.exists()
    csv: dict[str, float] = (an.pick(an.read_csv(csv_file)) if found else None) or {}
    # without a CSV (unstable, killed, failed): the last window's Pass line, flagged by the status
    throughput, p50 = (float(v) for v in passes[-1]) if passes else (None, None)
    status, message = "ok", ""
    if csv:
        throughput, p50 = csv.get("Inferences/Second"), csv.get("p50 latency")
    elif code is None:
        status, message = "timeout", f"killed after {s.timeout_s:.0f}s ({len(passes)} windows done)"
    elif "Failed to obtain stable measurement" in stdout:
        status, message = "unstable", (f"not stable within {s.max_trials} windows at -s "
                                       f"{s.stability}%: last window reported")
    else:
        tail = " | ".join(line.strip() for line in stdout.strip().splitlines()[-4:])
        status, message = "error", f"perf_analyzer exit {code}: {tail}"
    row = {"status": status, "p50_us": p50, **{f"p{q}_us": csv.get(f"p{q} latency")
                                               for q in (90, 95, 99)},
           "throughput": throughput, "requests": stats.get(model, {}).get("inference_count"),
           "windows": len(passes), "request_count_k": s.request_count,
           "stability_pct": s.stability, "max_trials": s.max_trials, "wall_s": round(wall_s, 1),
           "server_queue_us": csv.get("Server Queue"),
           "server_compute_infer_us": csv.get("Server Compute Infer"), **load, "attempts": 1,
           "message": message}
    grpc = csv.get("response wait")
    return Result(row, stats, None if grpc is None else grpc + csv.get("request/response", 0.0))
