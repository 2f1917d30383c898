"""perf_analyzer (tritonclient 2.51 wheel) as the benchmark runs it: binary, input files, one
run, its figures from its own CSV (`-f --verbose-csv`) and Triton's statistics API. A run that
gives up stabilising writes no CSV: it keeps the last window's `Pass` line, flagged `unstable`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import analysis as an


def site_packages() -> Path:
    import tritonclient

    return Path(tritonclient.__file__).resolve().parent.parent


def perf_analyzer_path() -> Path:
    """The wheel installs the binary as <venv>/bin/perf_analyzer (its RECORD entry is
    ../../../bin/perf_analyzer); older layouts kept it in tritonclient/bin."""
    for candidate in (Path(sys.executable).parent / "perf_analyzer",
                      site_packages() / "tritonclient" / "bin" / "perf_analyzer"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("perf_analyzer not found: is tritonclient[all]==2.51.0 installed?")


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 even on CPU: the nvidia-cuda-runtime wheel has it."""
    env = dict(os.environ)
    cudart = site_packages() / "nvidia" / "cuda_runtime" / "lib"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def perf_analyzer_version() -> str:
    out = subprocess.run([str(perf_analyzer_path()), "--version"], env=perf_analyzer_env(),
                         capture_output=True, text=True, timeout=30)
    text = (out.stdout + out.stderr).strip()
    if out.returncode != 0:
        raise RuntimeError(f"perf_analyzer --version failed ({out.returncode}): {text}")
    return text


def write_input_data(path: Path, requests: Sequence[Mapping[str, np.ndarray]]) -> None:
    """perf_analyzer --input-data JSON: one entry per request with content + shape of every
    tensor; perf_analyzer sends the entries round-robin."""
    data = [{name: {"content": np.asarray(a).reshape(-1).tolist(), "shape": list(np.shape(a))}
             for name, a in request.items()} for request in requests]
    path.write_text(json.dumps({"data": data}))


@dataclass(frozen=True)
class Settings:
    """perf_analyzer stabilisation settings of one run."""

    request_count: int  # --measurement-request-count K
    stability: float  # -s, percent
    max_trials: int  # -r
    concurrency: int = 1
    timeout_s: float = 600.0


@dataclass
class Result:
    model: str
    status: str  # ok | unstable | error | timeout
    settings: Settings
    throughput: float | None = None
    p50_us: float | None = None
    p90_us: float | None = None
    p95_us: float | None = None
    p99_us: float | None = None
    avg_grpc_us: float | None = None  # client side: (un)marshalling + response wait
    server: dict[str, float] = field(default_factory=dict)  # the CSV's server-side columns (us)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # Triton's, per model
    passes: int = 0
    wall_s: float = 0.0
    message: str = ""
    command: list[str] = field(default_factory=list)


def command(model: str, url: str, input_file: Path, csv_file: Path, s: Settings) -> list[str]:
    return [
        str(perf_analyzer_path()), "-m", model, "-i", "grpc", "-u", url,
        "--input-data", str(input_file), "--concurrency-range", str(s.concurrency),
        "--measurement-mode", "count_windows", "--measurement-request-count", str(s.request_count),
        "-s", str(s.stability), "-r", str(s.max_trials),
        # stabilise on p50 (robust to the odd slow request) and print it for every window
        "--percentile", "50", "-v", "-f", str(csv_file), "--verbose-csv",
    ]


_PASS = re.compile(r"Pass \[\d+\] throughput: ([\d.eE+-]+) infer/sec\. p50 latency: (\d+) usec")


def model_stats(url: str) -> dict[str, dict[str, float]]:
    """Triton's cumulative statistics per model: request count and total ns of success, queue
    and compute input/infer/output."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(url) as client:
            stats = client.get_inference_statistics(as_json=True)
    except InferenceServerException:  # the server is gone: perf_analyzer's own error says why
        return {}
    out: dict[str, dict[str, float]] = {}
    for m in stats.get("model_stats", []):
        parts = m.get("inference_stats", {})
        out[m["name"]] = {k: float(parts.get(k, {}).get("ns", 0)) for k in
                          ("success", "queue", "compute_input", "compute_infer", "compute_output")}
        out[m["name"]]["count"] = float(parts.get("success", {}).get("count", 0))
    return out


def stats_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
                ) -> dict[str, dict[str, float]]:
    """Per model that served requests in between: the count and the average of each part (us);
    `overhead` is what the request latency holds beyond queue and compute."""
    out: dict[str, dict[str, float]] = {}
    for name, a in after.items():
        b = before.get(name, {})
        count = a["count"] - b.get("count", 0.0)
        if count <= 0:
            continue
        avg = {k: (a[k] - b.get(k, 0.0)) / count / 1e3 for k in a if k != "count"}
        compute = avg["compute_input"] + avg["compute_infer"] + avg["compute_output"]
        out[name] = {"inference_count": count, "avg_request_latency": avg["success"],
                     "overhead": avg["success"] - avg["queue"] - compute, "queue": avg["queue"],
                     "compute": compute, **{k: avg[k] for k in
                                            ("compute_input", "compute_infer", "compute_output")}}
    return out


def run(model: str, url: str, input_file: Path, work_dir: Path, s: Settings,
        tag: str) -> Result:
    """Run perf_analyzer once (one concurrency level). Never raises for a failed measurement."""
    work_dir.mkdir(parents=True, exist_ok=True)
    csv_file = work_dir / f"{tag}.csv"
    csv_file.unlink(missing_ok=True)
    cmd = command(model, url, input_file, csv_file, s)
    result = Result(model=model, status="error", settings=s, command=cmd)
    before = model_stats(url)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=perf_analyzer_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timed_out = False
    try:
        stdout, _ = proc.communicate(timeout=s.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own perf_analyzer, by its process group
        stdout, _ = proc.communicate()
        timed_out = True
    except BaseException:  # interrupted (SIGTERM/Ctrl-C): never leave perf_analyzer running
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    result.wall_s = time.monotonic() - t0
    stdout = stdout or ""
    (work_dir / f"{tag}.log").write_text(" ".join(cmd) + "\n\n" + stdout)
    result.stats = stats_delta(before, model_stats(url))
    passes = [(float(a), float(b)) for a, b in _PASS.findall(stdout)]
    result.passes = len(passes)
    if proc.returncode == 0 and csv_file.exists() and not timed_out:
        row = an.pick(an.read_csv(csv_file)) or {}
        result.status = "ok"
        result.throughput = row.get("Inferences/Second")
        for q in (50, 90, 95, 99):
            setattr(result, f"p{q}_us", row.get(f"p{q} latency"))
        if "response wait" in row:
            result.avg_grpc_us = row["response wait"] + row.get("request/response", 0.0)
        result.server = {k: float(v) for k, v in row.items() if k.startswith("Server")}
        return result
    if passes:  # unstable (or killed): the last window's numbers, flagged
        result.throughput, result.p50_us = passes[-1]
    if timed_out:
        result.status = "timeout"
        result.message = f"killed after {s.timeout_s:.0f}s ({len(passes)} windows done)"
    elif "Failed to obtain stable measurement" in stdout:
        result.status = "unstable"
        result.message = (f"not stable within {s.max_trials} windows at -s {s.stability}%: "
                          "last window reported")
    else:
        tail = " | ".join(line.strip() for line in stdout.strip().splitlines()[-4:])
        result.message = f"perf_analyzer exit {proc.returncode}: {tail}"
    return result
