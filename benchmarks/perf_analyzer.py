"""perf_analyzer (tritonclient 2.51 wheel) as the benchmark runs it: input files, command lines
and the parsing of its CSV and stdout.

An unstable measurement (perf_analyzer exits non-zero after -r windows) keeps the numbers of its
last window, parsed from the verbose `Pass [i]` lines, with status `unstable`; nothing is
filled in that perf_analyzer did not print.
"""

from __future__ import annotations

import csv
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

REPO_ROOT = Path(__file__).resolve().parent.parent


def venv_bin() -> Path:
    return Path(sys.executable).parent


def site_packages() -> Path:
    import tritonclient

    return Path(tritonclient.__file__).resolve().parent.parent


def perf_analyzer_path() -> Path:
    """The wheel installs the binary as <venv>/bin/perf_analyzer (its RECORD entry is
    ../../../bin/perf_analyzer); older layouts kept it in tritonclient/bin."""
    for candidate in (venv_bin() / "perf_analyzer",
                      site_packages() / "tritonclient" / "bin" / "perf_analyzer"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("perf_analyzer not found: is tritonclient[all]==2.51.0 installed?")


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 even on CPU: the nvidia-cuda-runtime wheel has it."""
    env = dict(os.environ)
    cudart = site_packages() / "nvidia" / "cuda_runtime" / "lib"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p
    )
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
    data = [
        {name: {"content": np.asarray(a).reshape(-1).tolist(), "shape": list(np.shape(a))}
         for name, a in request.items()}
        for request in requests
    ]
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
    avg_us: float | None = None
    request_count: int | None = None
    passes: int = 0
    wall_s: float = 0.0
    message: str = ""
    server: dict[str, float] = field(default_factory=dict)  # CSV's server-side columns (us)
    composing: dict[str, dict[str, float]] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)

    @property
    def has_numbers(self) -> bool:
        return self.throughput is not None and self.p50_us is not None


def command(model: str, url: str, input_file: Path, csv_file: Path, s: Settings) -> list[str]:
    return [
        str(perf_analyzer_path()), "-m", model, "-i", "grpc", "-u", url,
        "--input-data", str(input_file),
        "--concurrency-range", str(s.concurrency),
        "--measurement-mode", "count_windows",
        "--measurement-request-count", str(s.request_count),
        "-s", str(s.stability), "-r", str(s.max_trials),
        # stabilise on p50 (robust to the odd slow request) and print it for every window
        "--percentile", "50",
        "-v", "-f", str(csv_file),
    ]


_PASS = re.compile(r"Pass \[(\d+)\] throughput: ([\d.eE+-]+) infer/sec\. p50 latency: (\d+) usec")
_COMPOSING_HEADER = re.compile(r"^\s*(\S+), version: \S+\s*$")
_AVG_LATENCY = re.compile(
    r"Avg request latency: (\d+) usec \((?P<parts>[^)]*)\)"
)
_PART = re.compile(r"([a-z][a-z ]*?) (\d+) usec")
_CLIENT_COUNT = re.compile(r"Request count: (\d+)")
_AVG_CLIENT = re.compile(r"Avg gRPC time: (\d+) usec")


def parse_passes(stdout: str) -> list[tuple[float, float]]:
    """(throughput infer/s, p50 us) of every measurement window, in order."""
    return [(float(m.group(2)), float(m.group(3))) for m in _PASS.finditer(stdout)]


def parse_composing(stdout: str) -> dict[str, dict[str, float]]:
    """Per composing model of an ensemble: avg request latency and its parts (us) and the
    inference count, from perf_analyzer's 'Composing models:' block."""
    if "Composing models:" not in stdout:
        return {}
    block = stdout.split("Composing models:", 1)[1]
    out: dict[str, dict[str, float]] = {}
    current: str | None = None
    for line in block.splitlines():
        header = _COMPOSING_HEADER.match(line)
        if header:
            current = header.group(1)
            out[current] = {}
            continue
        if current is None:
            continue
        if "Inference count:" in line:
            out[current]["inference_count"] = float(line.split(":")[1])
        latency = _AVG_LATENCY.search(line)
        if latency:
            out[current]["avg_request_latency"] = float(latency.group(1))
            for name, value in _PART.findall(latency.group("parts")):
                out[current][name.strip().replace(" ", "_")] = float(value)
        if line.startswith("Inferences/Second vs."):
            break
    return out


def parse_server_total(stdout: str) -> dict[str, float]:
    """The ensemble's (or model's) own 'Server: Avg request latency' line, first one printed."""
    if "Server:" not in stdout:
        return {}
    block = stdout.split("Server:", 1)[1].split("Composing models:", 1)[0]
    m = _AVG_LATENCY.search(block)
    if not m:
        return {}
    out = {"avg_request_latency": float(m.group(1))}
    for name, value in _PART.findall(m.group("parts")):
        out[name.strip().replace(" ", "_")] = float(value)
    return out


def parse_csv(path: Path) -> dict[str, float]:
    """The single row of perf_analyzer's -f CSV (one concurrency level per run)."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k.strip(): float(v) for k, v in rows[0].items() if k and v not in (None, "")}


def run(model: str, url: str, input_file: Path, work_dir: Path, s: Settings,
        tag: str) -> Result:
    """Run perf_analyzer once (one concurrency level). Never raises for a failed measurement."""
    work_dir.mkdir(parents=True, exist_ok=True)
    csv_file = work_dir / f"{tag}.csv"
    log_file = work_dir / f"{tag}.log"
    csv_file.unlink(missing_ok=True)
    cmd = command(model, url, input_file, csv_file, s)
    result = Result(model=model, status="error", settings=s, command=cmd)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=perf_analyzer_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=s.timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own perf_analyzer, by its process group
        stdout, _ = proc.communicate()
        timed_out = True
    except BaseException:  # interrupted (SIGTERM/Ctrl-C): never leave perf_analyzer running
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    result.wall_s = time.monotonic() - t0
    log_file.write_text(" ".join(cmd) + "\n\n" + (stdout or ""))
    stdout = stdout or ""
    passes = parse_passes(stdout)
    result.passes = len(passes)
    result.composing = parse_composing(stdout)
    result.server = parse_server_total(stdout)
    count = _CLIENT_COUNT.search(stdout)
    if proc.returncode == 0 and csv_file.exists() and not timed_out:
        row = parse_csv(csv_file)
        result.status = "ok"
        result.throughput = row.get("Inferences/Second")
        for q in (50, 90, 95, 99):
            setattr(result, f"p{q}_us", row.get(f"p{q} latency"))
        for key in ("Client Send", "Network+Server Send/Recv", "Server Queue",
                    "Server Compute Input", "Server Compute Infer", "Server Compute Output",
                    "Client Recv"):
            if key in row:
                result.server[key] = row[key]
        result.request_count = int(count.group(1)) if count else None
        avg = _AVG_CLIENT.search(stdout)
        result.avg_us = float(avg.group(1)) if avg else None
        return result
    if passes:  # unstable (or killed): the last window's numbers, flagged
        result.throughput, result.p50_us = passes[-1]
    if timed_out:
        result.status = "timeout"
        result.message = f"killed after {s.timeout_s:.0f}s ({len(passes)} windows done)"
    elif "Failed to obtain stable measurement" in stdout:
        result.status = "unstable"
        result.message = (f"not stable within {s.max_trials} windows at -s {s.stability}%: "
                          f"last window reported")
    else:
        tail = " | ".join(line.strip() for line in stdout.strip().splitlines()[-4:])
        result.message = f"perf_analyzer exit {proc.returncode}: {tail}"
    return result
