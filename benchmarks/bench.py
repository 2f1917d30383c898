"""perf_analyzer benchmark: `ranker` (shared user K/V) vs `ranker_naive` and `ranker_base` across
N and L, against the FLOP bound (scripts/bench.sh; the method: benchmarks/README.md). Measures,
writes the run's CSVs and run.json, then benchmarks/report.py turns them into the report."""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil

from benchmarks import analysis as an
from benchmarks import cpu, direct, report
from benchmarks import perf_analyzer as pa
from benchmarks.flops import FlopModel
from benchmarks.state import (
    CONTENDED_CORES,
    FULL,
    HEAVY_K,
    HEAVY_MAX_TRIALS,
    HEAVY_S,
    MEMORY_SHARE,
    MODEL_REPOSITORY,
    MODELS,
    OVERHEAD_US,
    QUICK,
    REPO_ROOT,
    RETRY_MAX_S,
    SMOKE,
    Mode,
    Progress,
    State,
)
from client.traffic import RequestGenerator
from export.config import DEFAULT_CONFIG, ModelConfig

T = TypeVar("T")


def mem_available_bytes() -> int:
    return int(psutil.virtual_memory().available)


def machine_info(server_version: str) -> dict[str, str]:
    """analysis.machine() with the server's and perf_analyzer's versions."""
    try:
        pa_version = pa.perf_analyzer_version().replace("Perf Analyzer Version ", "")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        pa_version = f"unavailable ({e})"
    return an.machine(tritonserver=server_version, perf_analyzer=pa_version)


def calm_now(seconds: float = 1.0) -> bool:
    """Whether other processes use less than CONTENDED_CORES right now (a short idle probe):
    a contended measurement is retried only then, persistent contention is not waited out."""
    snap = cpu.snapshot()
    time.sleep(seconds)
    return cpu.external_cores(snap).get("ext_cpu_cores", 1e9) <= CONTENDED_CORES


def measured(st: State, fn: Callable[[], T], retry: Callable[[T], bool] = lambda _: True,
             note: Callable[[str], None] | None = None) -> tuple[T, dict[str, float], int]:
    """fn() with the CPU other processes used meanwhile; in modes that retry, once more when
    that exceeded CONTENDED_CORES and a probe finds the machine calm again, keeping the attempt
    with less outside CPU use (chosen by the contention figure, never by the result); `retry`
    can rule a retry out by the first result (too long a run). Returns (result, load, attempts)."""
    snap = cpu.snapshot()
    result, load = fn(), cpu.external_cores(snap)
    others = load.get("ext_cpu_cores", 0.0)
    if not (st.mode.retry_contended and others > CONTENDED_CORES and retry(result)):
        return result, load, 1
    if not calm_now():
        if note:
            note(f"others used {others:.2f} cores meanwhile and still do: kept")
        return result, load, 1
    if note:
        note(f"others used {others:.2f} cores meanwhile, now calm: measuring once more")
    snap = cpu.snapshot()
    again, load_again = fn(), cpu.external_cores(snap)
    if load_again.get("ext_cpu_cores", 1e9) < others:
        return again, load_again, 2
    return result, load, 2


def grid(mode: Mode) -> list[tuple[int, int]]:
    """(N, L) points, L outer, N ascending (naive's time estimate grows from the previous N)."""
    return [(n, length) for length in mode.lengths for n in mode.ns]


def make_requests(st: State, seed: int) -> None:
    gen = RequestGenerator(st.contract, seed=seed)
    wanted = list(grid(st.mode))
    if st.mode.sweep_point and st.mode.sweep_point not in wanted:
        wanted.append(st.mode.sweep_point)
    inputs_dir = st.out / "inputs"
    inputs_dir.mkdir(parents=True, exist_ok=True)
    for n, length in wanted:
        reqs = [gen.request(length, n).as_inputs() for _ in range(st.mode.requests_per_point)]
        st.requests[(n, length)] = reqs
        path = inputs_dir / f"N{n}_L{length}.json"
        pa.write_input_data(path, reqs)
        st.input_files[(n, length)] = path


def naive_estimate_s(st: State, sessions: direct.Sessions, n: int, length: int) -> float:
    """Seconds for one naive request: the latest naive time measured at this L (at N_ref),
    scaled by the FLOP model's C_naive(N, L) / C_naive(N_ref, L); without one, a single timed
    request at N = 1 first."""
    if length not in st.naive_ref:
        req = RequestGenerator(st.contract, seed=12345).request(length, 1)
        inputs = req.as_inputs()
        sessions.naive(inputs)  # warm-up
        t0 = time.perf_counter()
        sessions.naive(inputs)
        st.naive_ref[length] = (1, time.perf_counter() - t0)
        st.progress(f"  naive calibration at N=1, L={length}: {st.naive_ref[length][1]*1e3:.1f} ms")
    n_ref, t_ref = st.naive_ref[length]
    return t_ref * st.flops.naive(n, length) / st.flops.naive(n_ref, length)


def naive_skip_reason(st: State, est_s: float, n: int, length: int, concurrency: int) -> str:
    tokens = min(length, st.cfg.max_history) + 1
    if n * tokens**2 > st.cfg.naive_max_work:
        return (f"skipped: N x (L+1)^2 above naive_max_work={st.cfg.naive_max_work}, which "
                "ranker_naive's graph refuses (bench a repository exported with a larger "
                "naive_max_work to measure the unbounded baseline)")
    latency = est_s * concurrency
    if latency > st.mode.naive_limit_s:
        conc = f" x concurrency {concurrency}" if concurrency > 1 else ""
        return (f"skipped: est. {latency:.1f} s per request{conc} "
                f"(limit {st.mode.naive_limit_s:g} s)")
    need = st.flops.naive_attention_bytes(n, length)
    free = mem_available_bytes()
    if free and need > MEMORY_SHARE * free:
        return (f"skipped: est. >= {need / 2**30:.1f} GiB attention working set "
                f"({free / 2**30:.1f} GiB available)")
    return ""


def run_direct(st: State, sessions: direct.Sessions, n: int, length: int,
               naive_skip: str, naive_est_s: float) -> dict[str, float]:
    """In-process timings at one point; returns p50 (us) by model for window sizing."""
    reqs = st.requests[(n, length)]
    m = st.mode
    out: dict[str, float] = {}
    split, load, _ = measured(
        st, lambda: direct.time_split(sessions, reqs, m.direct_budget_s, 3, 500))
    flop_of = {"user_encoder": st.flops.user(length), "target_fusion": st.flops.fusion(n, length),
               "split": st.flops.split(n, length)}
    for name, timing in split.items():
        out[name] = timing.p50_us
        st.direct.append({**direct_row(name, n, length, "ok", timing, flop_of[name]), **load})
    if naive_skip:
        st.direct.append({"model": "ranker_naive", "n": n, "length": length,
                          "status": naive_skip})
    else:
        (timing, first), load, _ = measured(st, lambda: direct.time_single(
            "ranker_naive", sessions.naive, reqs, naive_est_s, m.direct_budget_s,
            2 if naive_est_s > HEAVY_S else 3, 500), lambda _: False)  # too slow to repeat
        out["ranker_naive"] = timing.p50_us
        st.naive_ref[length] = (n, timing.p50_us / 1e6)
        st.direct.append({**direct_row("ranker_naive", n, length, "ok", timing,
                                       st.flops.naive(n, length)), **load})
        st.direct[-1]["max_abs_diff"] = float(np.max(np.abs(first - sessions.split(reqs[0]))))
    (timing, _), base_load, _ = measured(st, lambda: direct.time_single(
        "ranker_base", sessions.base, reqs, 1e-4, m.direct_budget_s, 3, 500))
    out["ranker_base"] = timing.p50_us
    st.direct.append({**direct_row("ranker_base", n, length, "ok", timing, st.flops.base(n)),
                      **base_load})
    return out


def direct_row(model: str, n: int, length: int, status: str, t: direct.Timing,
               flop: float) -> dict[str, object]:
    return {"model": model, "n": n, "length": length, "status": status,
            "p50_us": round(t.p50_us, 1), "p90_us": round(t.p90_us, 1), "reps": t.reps,
            "gflop": flop / 1e9, "gflops": flop / 1e9 / (t.p50_us / 1e6)}


def settings_for(st: State, service_us: float, concurrency: int) -> pa.Settings:
    m = st.mode
    service_s = service_us / 1e6
    heavy = service_s > HEAVY_S
    k_min = HEAVY_K if heavy else m.k_min
    trials = min(m.max_trials, HEAVY_MAX_TRIALS) if heavy else m.max_trials
    k = max(k_min, math.ceil(m.window_s / max(service_s, 1e-6)))
    window = max(1.0, k * service_s)
    timeout = 60 + 2 * (trials + 1) * (window + concurrency * service_s)
    return pa.Settings(request_count=k, stability=m.stability, max_trials=trials,
                       concurrency=concurrency, timeout_s=timeout)


def run_pa(st: State, url: str, model: str, n: int, length: int, concurrency: int,
           service_us: float | None, skip: str, step: str) -> pa.Result | None:
    row: dict[str, object] = {"model": model, "n": n, "length": length,
                              "concurrency": concurrency}
    if skip:
        st.progress(f"{step} {model:<12} N={n} L={length} c={concurrency}: {skip}")
        row["status"] = skip
        st.points.append(row)
        return None
    s = settings_for(st, service_us or 1000.0, concurrency)
    tag = f"{model}_N{n}_L{length}_c{concurrency}"
    label = f"{step} {model:<12} N={n} L={length} c={concurrency}"
    st.progress(f"{label}: perf_analyzer K={s.request_count} -s {s.stability:g} "
                f"-r {s.max_trials} ...")
    attempt = iter(range(1, 3))

    def once() -> pa.Result:
        i = next(attempt)
        return pa.run(model, url, st.input_files[(n, length)], st.out / "perf_analyzer", s,
                      tag if i == 1 else f"{tag}_attempt{i}")

    res, load, attempts = measured(st, once, lambda r: r.wall_s < RETRY_MAX_S,
                                   lambda msg: st.progress(f"{label}: {msg}"))
    p50 = f"{res.p50_us / 1e3:.2f} ms" if res.p50_us is not None else "-"
    thr = f"{res.throughput:.2f}/s" if res.throughput is not None else "-"
    ext = f", others used {load['ext_cpu_cores']:.2f} cores" if load else ""
    st.progress(f"{label}: {res.status}, "
                f"p50 {p50}, {thr}, {res.passes} windows, {res.wall_s:.1f} s{ext}"
                + (f" ({res.message})" if res.message else ""))
    row.update({
        "status": res.status, "p50_us": res.p50_us, "p90_us": res.p90_us,
        "p95_us": res.p95_us, "p99_us": res.p99_us, "throughput": res.throughput,
        "requests": res.stats.get(model, {}).get("inference_count"), "windows": res.passes,
        "request_count_k": s.request_count, "stability_pct": s.stability,
        "max_trials": s.max_trials, "wall_s": round(res.wall_s, 1),
        "server_queue_us": res.server.get("Server Queue"),
        "server_compute_infer_us": res.server.get("Server Compute Infer"),
        **load, "attempts": attempts,
        "message": res.message,
    })
    st.points.append(row)
    if model == "ranker" and res.stats:
        record_breakdown(st, res, n, length, concurrency)
    return res


def record_breakdown(st: State, res: pa.Result, n: int, length: int, c: int) -> None:
    """The ensemble's time by part: the client's view (perf_analyzer's CSV) and Triton's
    statistics of `ranker` and its composing models over the run."""
    base = {"n": n, "length": length, "concurrency": c, "status": res.status}
    parts = {"client_p50": res.p50_us, "client_avg_grpc": res.avg_grpc_us}
    for model, values in res.stats.items():
        prefix = "ensemble" if model == "ranker" else model
        for k, v in values.items():
            parts[f"{prefix}_{k}"] = v
    st.breakdown += [{**base, "part": part, "us": value} for part, value in parts.items()
                     if value is not None]


def benchmark_server(st: State, seed: int) -> None:
    from local_server.triton import free_port, start_server

    m, pts = st.mode, grid(st.mode)
    # (N, L, concurrency): the grid at concurrency 1, then the sweep at its point
    work = [(n, length, 1) for n, length in pts] + [
        (*m.sweep_point, c) for c in m.sweep_concurrency
        if m.sweep_point and (c != 1 or m.sweep_point not in pts)]
    st.progress(f"loading ONNX Runtime sessions for the in-process timings ({st.repository})")
    sessions = direct.Sessions(st.repository, st.contract)
    st.progress("starting tritonserver (local flavour, gRPC only, free port)")
    t0 = time.monotonic()
    server = start_server(grpc_port=free_port(), http_port=None, repository=st.repository,
                          log_file=st.out / "tritonserver.log")
    st.progress(f"tritonserver pid {server.pid} ready on {server.grpc_url} in "
                f"{time.monotonic() - t0:.1f} s: models {', '.join(server.models)}")
    try:
        st.machine = machine_info(server_version(server.grpc_url))
        service: dict[tuple[int, int], tuple[dict[str, float], str]] = {}
        for i, (n, length, c) in enumerate(work):
            if (n, length) not in service:
                st.progress(f"point N={n} L={length}: in-process ONNX Runtime timings")
                est = naive_estimate_s(st, sessions, n, length)
                skip = naive_skip_reason(st, est, n, length, 1)
                d = run_direct(st, sessions, n, length, skip, est)
                service[(n, length)] = d, skip
                st.progress(
                    f"point N={n} L={length}: direct p50 split {d['split']/1e3:.2f} ms (encoder "
                    f"{d['user_encoder']/1e3:.2f}, fusion {d['target_fusion']/1e3:.2f}), "
                    + (f"naive {d['ranker_naive']/1e3:.1f} ms, " if "ranker_naive" in d else
                       f"naive {skip}, ") + f"base {d['ranker_base']/1e3:.2f} ms")
            d, skip = service[(n, length)]
            if c > 1:
                st.progress(f"concurrency sweep N={n} L={length}: concurrency {c}")
                est = d.get("ranker_naive", 0.0) / 1e6 or naive_estimate_s(st, sessions, n, length)
                skip = naive_skip_reason(st, est, n, length, c)
            for j, model in enumerate(MODELS):
                svc = d.get("split" if model == "ranker" else model)
                run_pa(st, server.grpc_url, model, n, length, c,
                       None if svc is None else svc + OVERHEAD_US[model],
                       skip if model == "ranker_naive" else "",
                       f"[{i * len(MODELS) + j + 1}/{len(work) * len(MODELS)}]")
    finally:
        code = server.stop()
        st.progress(f"stopped tritonserver pid {server.pid} (exit code {code})")
        del sessions
        gc.collect()


def server_version(url: str) -> str:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        meta = client.get_server_metadata()
        return f"{meta.name} {meta.version}"
    except Exception as e:  # the version is a report detail, never a reason to fail
        return f"unknown ({type(e).__name__})"
    finally:
        client.close()


def run_memory(st: State) -> None:
    for model, n, length in st.mode.memory_points:
        row: dict[str, object] = {"model": model, "n": n, "length": length,
                                  "user_kv_bytes": st.flops.user_kv_bytes(length),
                                  "naive_kv_bytes": st.flops.naive_kv_bytes(n, length),
                                  "naive_attention_est_bytes":
                                      st.flops.naive_attention_bytes(n, length)}
        if model == "ranker_naive":
            ref = st.naive_ref.get(length)
            est = ref[1] * st.flops.naive(n, length) / st.flops.naive(ref[0], length) if ref \
                else 0.0
            skip = naive_skip_reason(st, est, n, length, 1)
            if skip:
                st.progress(f"memory {model} N={n} L={length}: {skip}")
                row["status"] = skip
                st.memory.append(row)
                continue
        st.progress(f"memory {model} N={n} L={length}: fresh subprocess, peak RSS delta ...")
        cmd = [sys.executable, "-m", "benchmarks.memory", "--model", model, "--n", str(n),
               "--length", str(length), "--repository", str(st.repository),
               "--config", str(st.config_path)]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            row["status"] = f"error: exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
        else:
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update({"status": "ok", "peak_delta_bytes": data["peak_delta"],
                        "method": data["method"], "rss_before_bytes": data["rss_before"],
                        "peak_rss_bytes": data["peak_rss"],
                        "ru_maxrss_before_bytes": data["maxrss_before"],
                        "ru_maxrss_after_bytes": data["maxrss_after"],
                        "run_s": round(data["run_s"], 3)})
        st.progress(f"memory {model} N={n} L={length}: {row['status']}"
                    + (f", peak +{row['peak_delta_bytes'] / 2**20:.1f} MiB"
                       if "peak_delta_bytes" in row else ""))
        st.memory.append(row)


# --------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench.sh", description=__doc__ + " Full run: N "
                                "in {1,5,10,50,100,1000} x L in {256,1000} + a concurrency sweep "
                                "(15-30 min on 2 cores).")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="N in {1,10,50}, L in {256,1000}, short windows, naive only where a "
                      "request takes <= 5 s, so the headline point L=1000, N=50 is in (~4 min)")
    size.add_argument("--smoke", action="store_true",
                      help="one tiny point (N=5, L=64), for CI (seconds)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default build/bench/<timestamp>; the committed full run "
                   "is benchmarks/results)")
    p.add_argument("--seed", type=int, default=0, help="request generator seed (default 0)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="model config the ONNX files were exported from (FLOP model)")
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY,
                   help="model repository with the exported ONNX files (default %(default)s)")
    return p.parse_args(argv)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: stop tritonserver, perf_analyzer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    mode = SMOKE if args.smoke else QUICK if args.quick else FULL
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO_ROOT / "build" / "bench" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("perf_analyzer", "inputs"):  # a previous run's per-run files
        shutil.rmtree(out / stale, ignore_errors=True)
    progress = Progress()
    cfg = ModelConfig.load(args.config)
    repository = args.repository.resolve()
    missing = [m for m in direct.MODELS if not direct.model_path(repository, m).exists()]
    if missing:
        print(f"bench: error: no ONNX model for {missing}: run `python -m export` first",
              file=sys.stderr)
        return 2
    try:
        pa.perf_analyzer_version()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"bench: error: perf_analyzer does not run: {e}", file=sys.stderr)
        return 2
    st = State(mode=mode, cfg=cfg, flops=FlopModel.from_config(cfg), out=out, progress=progress,
               repository=repository, config_path=args.config.resolve())
    progress(f"mode {mode.name}: N {list(mode.ns)}, L {list(mode.lengths)}, "
             f"{mode.requests_per_point} requests per point -> {out}")
    progress("generating requests (client.traffic.RequestGenerator) and perf_analyzer inputs")
    make_requests(st, args.seed)
    benchmark_server(st, args.seed)
    run_memory(st)
    progress("writing points.csv, direct.csv, memory.csv, ensemble_breakdown.csv, "
             "run.json; then summary.csv, report.md, speedup.png")
    for name, rows in (("points", st.points), ("direct", st.direct), ("memory", st.memory),
                       ("ensemble_breakdown", st.breakdown)):
        an.write_csv(out / f"{name}.csv", rows)
    config = args.config.resolve()
    total_s = time.monotonic() - progress.t0
    (out / "run.json").write_text(json.dumps({
        "mode": mode.name, "naive_limit_s": mode.naive_limit_s, "seed": args.seed,
        "config": str(config.relative_to(REPO_ROOT) if config.is_relative_to(REPO_ROOT)
                      else config),
        "total_s": round(total_s, 1), "machine": st.machine},
        indent=1))
    report.write(out)
    shutil.rmtree(out / "inputs", ignore_errors=True)  # the same --seed regenerates them
    progress(f"done in {total_s / 60:.1f} min: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
