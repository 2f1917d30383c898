"""report.md, summary.csv and speedup.png of a benchmark run, from the run's CSVs alone.

benchmarks/bench.py measures and writes points.csv, direct.csv, ensemble_breakdown.csv,
memory.csv and run.json (mode, seed, config, machine, wall time); this module
turns them into the summary rows, the targets, the plot and the report, with
benchmarks/analysis.py. `python -m benchmarks.report DIR` regenerates them from a committed run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks import analysis as an
from benchmarks.cpu import CONTENDED_CORES
from benchmarks.flops import (
    SEEDS_NAIVE_DROP,
    SEEDS_SHARED_DROP,
    FlopModel,
    drop,
    seeds_model_speedup,
    seeds_scaled_drop,
    sequence_cost_ratio,
)
from benchmarks.state import MODES, REPO_ROOT, Mode
from export.config import ModelConfig

Row = dict[str, object]
TARGET_BOUND_SHARE = 0.8  # Speedup(N=50, L=1000) >= 0.8 x FLOP bound
TARGET_N1 = 0.9  # Speedup(N=1) >= 0.9
TARGET_ENSEMBLE = 1.3  # ensemble latency <= 1.3 x direct ORT at N=50
# Plausible Triton/in-process latency ratios; outside them a point is flagged `inconsistent`.
CONSISTENT_RANKER = (0.9, math.inf)
CONSISTENT_NAIVE = (0.85, 1.6)
CSVS = ("points", "direct", "ensemble_breakdown", "memory")


@dataclass
class Run:
    """A finished run as its files hold it."""

    mode: Mode
    cfg: ModelConfig
    info: dict  # run.json
    points: list[Row]
    direct: list[Row]
    breakdown: list[Row]
    memory: list[Row]

    @property
    def flops(self) -> FlopModel:
        return FlopModel.from_config(self.cfg)

    @classmethod
    def load(cls, out: Path) -> Run:
        info = json.loads((out / "run.json").read_text())
        mode = replace(MODES[info["mode"]], naive_limit_s=info["naive_limit_s"])
        frames = {n: an.records(an.read_csv(out / f"{n}.csv")) if (out / f"{n}.csv").exists()
                  and (out / f"{n}.csv").read_text().strip() else [] for n in CSVS}
        config = Path(info["config"])  # relative: to the repository root
        return cls(mode, ModelConfig.load(config if config.is_absolute() else REPO_ROOT / config),
                   info, frames["points"],
                   frames["direct"], frames["ensemble_breakdown"], frames["memory"])


def write(out: Path) -> None:
    """summary.csv, speedup.png and report.md from the run's files in `out`."""
    run = Run.load(out)
    summary = summarise(run)
    an.write_csv(out / "summary.csv", summary)
    plot(run, summary, out / "speedup.png")
    (out / "report.md").write_text(report(run, summary))


# --------------------------------------------------------------------------- summary.csv

def summarise(run: Run) -> list[Row]:
    rows = []
    keys = list(dict.fromkeys((r["n"], r["length"], r["concurrency"]) for r in run.points))
    for n, length, c in keys:
        pts = {m: an.pick(run.points, model=f"ranker{s}", n=n, length=length, concurrency=c)
               for m, s in (("ranker", ""), ("naive", "_naive"), ("base", "_base"))}
        p50 = {m: an.num(x and x.get("p50_us")) for m, x in pts.items()}
        thr = {m: an.num(x and x.get("throughput")) for m, x in pts.items()}

        def d(graph: str, col: str = "p50_us", n: int = n, length: int = length) -> object:
            return an.pick(run.direct, col, model=graph, n=n, length=length)

        bound = run.flops.bound(n, length)
        speedup = an.ratio(p50["naive"], p50["ranker"])
        row: Row = {
            "n": n, "length": length, "concurrency": c,
            "ranker_p50_us": p50["ranker"], "naive_p50_us": p50["naive"],
            "base_p50_us": p50["base"], "ranker_thr": thr["ranker"], "naive_thr": thr["naive"],
            "base_thr": thr["base"], "speedup_p50": speedup,
            "throughput_ratio": an.ratio(thr["ranker"], thr["naive"]), "flop_bound": bound,
            "speedup_over_bound": an.ratio(speedup, bound),
            "throughput_ratio_over_bound": an.ratio(an.ratio(thr["ranker"], thr["naive"]), bound),
            "direct_split_p50_us": an.num(d("split")),
            "direct_naive_p50_us": an.num(d("ranker_naive")),
            "direct_speedup": an.ratio(d("ranker_naive"), d("split")),
            "ensemble_over_direct": an.ratio(p50["ranker"], d("split")),
            "naive_over_direct": an.ratio(p50["naive"], d("ranker_naive")),
            "base_over_direct": an.ratio(p50["base"], d("ranker_base")),
            "fusion_gflops": an.num(d("target_fusion", "gflops")),
            "drop_naive": drop(thr["naive"], thr["base"]) if thr["naive"] and thr["base"] else None,
            "drop_shared": drop(thr["ranker"], thr["base"])
            if thr["ranker"] and thr["base"] else None,
            "seq_cost_ratio": None, "drop_shared_seeds_scaled": None,
        }
        if thr["ranker"] and thr["naive"] and thr["base"]:
            r = sequence_cost_ratio(thr["ranker"], thr["naive"], thr["base"])
            row["seq_cost_ratio"], row["drop_shared_seeds_scaled"] = r, seeds_scaled_drop(r)
        row["max_abs_diff"] = an.num(d("ranker_naive", "max_abs_diff")) if c == 1 else None
        flags = [f"{m}: {x['status']}" for m, x in pts.items() if x and x.get("status") != "ok"]
        loads = [an.num(x and x.get("ext_cpu_cores")) for x in pts.values()]
        if c == 1:
            loads += [an.num(d(g, "ext_cpu_cores"))
                      for g in ("split", "ranker_naive", "ranker_base")]
        # Triton runs the same ORT graphs with the same options, so a Triton latency well below
        # the in-process one, or a naive Triton/direct far above its small overhead, means one of
        # the two measurements caught noise.
        over_r, over_n = an.num(row["ensemble_over_direct"]), an.num(row["naive_over_direct"])
        if c == 1 and over_r is not None and over_r < CONSISTENT_RANKER[0]:
            flags.append(f"inconsistent: ranker Triton/direct {over_r:.2f}")
        if c == 1 and over_n is not None and not (
                CONSISTENT_NAIVE[0] <= over_n <= CONSISTENT_NAIVE[1]):
            flags.append(f"inconsistent: naive Triton/direct {over_n:.2f}")
        known = [x for x in loads if x is not None]
        row["max_ext_cpu_cores"] = max(known) if known else None
        if known and max(known) > CONTENDED_CORES:
            flags.append(f"contended (others used up to {max(known):.1f} cores)")
        row["status"] = "; ".join(flags) if flags else "ok"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- speedup.png

def plot(run: Run, summary: list[Row], path: Path) -> None:
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    ns_all = [int(r["n"]) for r in summary] or [1]  # type: ignore[call-overload]
    grid = np.unique(np.round(np.logspace(0, math.log10(max(1000, max(ns_all))), 200)))
    with an.figure(path, size=(8.5, 6), dpi=120) as (ax,):
        for i, length in enumerate(run.mode.lengths):
            colour = colours[i % len(colours)]
            ax.plot(grid, [run.flops.bound(int(n), length) for n in grid], "-", color=colour,
                    lw=1.5, label=f"FLOP bound, L={length}")
            rows = [r for r in summary if r["length"] == length and r["concurrency"] == 1
                    and r["speedup_p50"] is not None]
            for ok, style, label in ((True, {}, "measured (Triton p50)"),
                                     (False, {"mfc": "none"}, "measured, flagged (see report)")):
                pts = [r for r in rows if (r["status"] == "ok") == ok]
                if pts:
                    ax.plot([r["n"] for r in pts], [r["speedup_p50"] for r in pts], "o",
                            color=colour, ms=8, label=f"{label}, L={length}", **style)
            dr = [r for r in summary if r["length"] == length and r["concurrency"] == 1
                  and r["direct_speedup"] is not None]
            if dr:
                ax.plot([r["n"] for r in dr], [r["direct_speedup"] for r in dr], "x",
                        color=colour, ms=7, label=f"in-process ORT, L={length}")
        ax.plot(grid, [seeds_model_speedup(float(n)) for n in grid], "--", color="black",
                label="fixed-ratio model N/(0.85+0.15N)")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="N candidates per request",
               ylabel="speedup = naive latency / shared-K/V latency",
               title=f"ranker (shared user K/V) vs ranker_naive, concurrency 1 "
                     f"({run.mode.name} run)\n{run.info['machine'].get('cpu', '')}, "
                     f"{run.info['machine'].get('cores', '?')} cores")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")


# --------------------------------------------------------------------------- targets

def targets(run: Run, summary: list[Row]) -> list[Row]:
    out: list[Row] = []

    def add(name: str, point: str, value: float | None, threshold: float, higher: bool,
            shown: str, note: str = "") -> None:
        verdict, margin = an.check(value, threshold, higher)
        out.append({"target": name, "point": point, "verdict": verdict, "margin": margin,
                    "measured": shown if value is not None else "not measured", "note": note})

    def flags(r: Row | None) -> str:
        return "" if not r or r["status"] == "ok" else f"flags: {r['status']}"

    r = an.pick(summary, n=50, length=1000, concurrency=1)
    value = an.num(r["speedup_over_bound"]) if r else None
    add(f"Speedup(N=50, L=1000) >= {TARGET_BOUND_SHARE} x FLOP bound", "N=50, L=1000", value,
        TARGET_BOUND_SHARE, True, f"{an.fmt(r['speedup_p50'], 1)}x vs bound "
        f"{an.fmt(r['flop_bound'], 1)}x = {an.fmt(value, 2)} x bound" if r else "", flags(r))
    for length in run.mode.lengths:
        r = an.pick(summary, n=1, length=length, concurrency=1)
        value = an.num(r["speedup_p50"]) if r else None
        add(f"Speedup(N=1) >= {TARGET_N1}", f"N=1, L={length}", value, TARGET_N1, True,
            f"{an.fmt(value, 2)}x", flags(r))
    for length in run.mode.lengths:
        r = an.pick(summary, n=50, length=length, concurrency=1)
        value = an.num(r["ensemble_over_direct"]) if r else None
        add(f"ensemble latency <= {TARGET_ENSEMBLE} x direct ORT at N=50", f"N=50, L={length}",
            value, TARGET_ENSEMBLE, False, f"{an.ms(r['ranker_p50_us'])} ms / "
            f"{an.ms(r['direct_split_p50_us'])} ms = {an.fmt(value, 2)}" if r else "", flags(r))
    return out


# --------------------------------------------------------------------------- report.md

def report(run: Run, summary: list[Row]) -> str:
    m, cfg, info = run.mode, run.cfg, run.info
    tg = targets(run, summary)
    c1 = [r for r in summary if r["concurrency"] == 1]
    default_work = ModelConfig().naive_max_work
    parts = [
        f"# Benchmark: shared user K/V (`ranker`) vs naive vs base — {m.name} run", "",
        "Generated by `scripts/bench.sh" + {"full": "", "quick": " --quick", "smoke": " --smoke"}
        [m.name] + (f" --seed {info['seed']}" if info["seed"] else "")
        + f"` on {info['machine'].get('date', '?')} in {info['total_s'] / 60:.1f} min. All "
        "numbers below are measured in this run unless marked as a bound or a model. How each "
        "is measured, the formulas and what a flag means: benchmarks/README.md, section Method; "
        "the files beside this report: its table of `results/`.", "",
        "## Machine and versions", "", an.machine_table(info["machine"]), "",
        f"Model config: d_model {cfg.d_model}, {cfg.num_heads} heads (dh {cfg.head_dim}), "
        f"{cfg.num_layers} layers, d_ff {cfg.d_ff}, head_hidden {cfg.head_hidden}, "
        f"{cfg.num_tasks} tasks, profile {cfg.profile_dim}, mask {cfg.mask}, "
        f"max_history {cfg.max_history}. The server is the local flavour (tritonserver 2.51 from "
        "the nvidia-pytriton wheel): every ONNX model runs with ONNX Runtime (CPU) inside a "
        "Python-backend model, the `ranker` ensemble config is the production one. "
        "perf_analyzer, the server and both ORT sessions share the same cores."
        + ("" if cfg.naive_max_work == default_work else
           f" ranker_naive was exported with naive_max_work {cfg.naive_max_work} (the shipped "
           f"default, {default_work}, makes its graph refuse N x (L+1)^2 above "
           "it): the baseline runs whole requests, as the traditional scheme would."), "",
        _settings(m), "",
        "## Targets", "",
        an.table([[t["target"], t["point"], t["measured"], f"**{t['verdict']}**", t["margin"],
                t["note"]] for t in tg],
              ["target", "point", "measured", "verdict", "margin", "note"]), "",
        "## Speedup vs the FLOP bound (concurrency 1)", "",
        "Speedup = naive p50 / `ranker` p50 (perf_analyzer, gRPC); bound = C_naive / (C_user + "
        "C_fusion); ensemble/direct = `ranker` p50 / in-process split p50.", "",
        an.table(c1, {"L": "length", "N": "n", "ranker p50 ms": "ranker_p50_us",
                   "naive p50 ms": "naive_p50_us", "base p50 ms": "base_p50_us",
                   "speedup": "speedup_p50", "thr. ratio": "throughput_ratio",
                   "FLOP bound": "flop_bound", "speedup / bound": "speedup_over_bound",
                   "thr. ratio / bound": "throughput_ratio_over_bound",
                   "in-process speedup": "direct_speedup",
                   "ensemble / direct": "ensemble_over_direct", "fusion GFLOP/s": "fusion_gflops",
                   "max |split-naive|": "max_abs_diff", "flags": "status"},
              {"ranker_p50_us": an.ms, "naive_p50_us": an.ms, "base_p50_us": an.ms,
               "max_abs_diff": an.sci,
               "fusion_gflops": lambda v: an.fmt(v, 1),
               "status": lambda s: "" if s == "ok" else str(s)}), "",
        "![speedup vs N](speedup.png)", "",
        _seeds_section(m, summary), "",
        "## Latency and throughput per model (perf_analyzer, concurrency 1)", "",
        an.table([r for r in run.points if r["concurrency"] == 1],
              {"L": "length", "N": "n", "model": "model", "p50 ms": "p50_us", "p90 ms": "p90_us",
               "p99 ms": "p99_us", "infer/s": "throughput", "requests": "requests",
               "windows": "windows", "others' CPU (cores)": "ext_cpu_cores",
               "status": "status"},
              {"p50_us": an.ms, "p90_us": an.ms, "p99_us": an.ms,
               "requests": an.count, "windows": lambda v: an.count(v) if v else "–",
               "status": lambda s: "not run" if s is None else str(s)}), "",
        _sweep_section(run, summary), "",
        _direct_section(run), "",
        _memory_section(run), "",
        _where_time_goes(run, summary, tg), "",
        "## FLOP model (formulas)", "", _formulas(run), "",
    ]
    return "\n".join(parts)


def _settings(m: Mode) -> str:
    """The run's settings; how they are used: benchmarks/README.md, section Method."""
    rows = [["points", f"N in {list(m.ns)} x L in {list(m.lengths)}, concurrency 1"
             + (f"; concurrency sweep {list(m.sweep_concurrency)} at N={m.sweep_point[0]}, "
                f"L={m.sweep_point[1]}" if m.sweep_point else "")],
            ["requests per point", m.requests_per_point],
            ["perf_analyzer windows", f"about {m.window_s:g} s (K >= {m.k_min}), -s {m.stability:g}"
                                      f" -r {m.max_trials}"],
            ["ranker_naive skipped above", f"{m.naive_limit_s:g} s per request (x concurrency)"],
            ["in-process budget per graph", f"{m.direct_budget_s:g} s"],
            ["flagged `contended` above", f"{CONTENDED_CORES} cores used by other processes"],
            ["flagged `inconsistent` when", f"ranker Triton/direct < {CONSISTENT_RANKER[0]}, or "
             f"naive outside {CONSISTENT_NAIVE[0]}-{CONSISTENT_NAIVE[1]}"],
            ["contended measurements retried", "yes, once, when calm again" if m.retry_contended
             else "no"]]
    return "\n".join(["## Run settings", "", an.table(rows, ["setting", "value"])])


def _seeds_r() -> float:
    return (1 / (1 - SEEDS_SHARED_DROP) - 1) / (1 / (1 - SEEDS_NAIVE_DROP) - 1)


def _seeds_section(m: Mode, summary: list[Row]) -> str:
    out = [
        "## In LONGER's form (throughput drop)", "",
        "drop = 1 - thr(model) / thr(ranker_base) at concurrency 1; r = the shared sequence "
        "module's cost over the naive one's; *seeds-scaled* = our shared drop with a base whose "
        f"naive drop is {SEEDS_NAIVE_DROP:.0%}, as LONGER's (formulas: benchmarks/README.md; "
        f"LONGER's {SEEDS_SHARED_DROP:.1%} corresponds to r = {_seeds_r():.3f}).", ""]
    for length in m.lengths:
        rows = [{**r, "model": seeds_model_speedup(float(r["n"]))}  # type: ignore[arg-type]
                for r in summary if r["length"] == length and r["concurrency"] == 1]
        out += [f"L = {length}:", "", an.table(rows, {
            "N": "n", "speedup (measured)": "speedup_p50",
            "fixed-ratio model N/(0.85+0.15N)": "model", "drop naive": "drop_naive",
            "drop shared": "drop_shared", "r = seq. cost shared / naive": "seq_cost_ratio",
            "shared, seeds-scaled (naive 40 %)": "drop_shared_seeds_scaled"},
            {"drop_naive": an.pct, "drop_shared": an.pct, "drop_shared_seeds_scaled": an.pct,
             "seq_cost_ratio": lambda v: an.fmt(v, 4), "model": lambda v: an.fmt(v, 2)}), ""]
    out.append(f"LONGER (ByteDance, RecSys 2025) reported {SEEDS_NAIVE_DROP:.0%} -> "
               f"{SEEDS_SHARED_DROP:.1%}.")
    return "\n".join(out)


def _sweep_section(run: Run, summary: list[Row]) -> str:
    m = run.mode
    if not m.sweep_point:
        return "## Concurrency sweep\n\nNot run in this mode."
    n, length = m.sweep_point
    rows = [an.pick(run.points, model=model, n=n, length=length, concurrency=c) or
            {"concurrency": c, "model": model} for c in m.sweep_concurrency
            for model in ("ranker", "ranker_naive", "ranker_base")]
    return "\n".join([
        f"## Concurrency sweep (N={n}, L={length})", "",
        "Concurrency 1 is the grid's row at this point. One model instance per graph: "
        "concurrency overlaps the client, gRPC and the two ensemble steps, not two "
        "requests of the same graph.", "",
        an.table(rows, {"concurrency": "concurrency", "model": "model", "infer/s": "throughput",
                     "p50 ms": "p50_us", "p99 ms": "p99_us", "status": "status"},
              {"p50_us": an.ms, "p99_us": an.ms,
               "status": lambda s: "not run" if s is None else s}),
        "",
        an.table([r for r in summary if (r["n"], r["length"]) == (n, length)],
              {"concurrency": "concurrency", "throughput ratio ranker/naive": "throughput_ratio",
               "drop naive": "drop_naive", "drop shared": "drop_shared"},
              {"drop_naive": an.pct, "drop_shared": an.pct})])


def _direct_section(run: Run) -> str:
    rows = [r if r.get("status") == "ok" else
            {k: r[k] for k in ("length", "n", "model")} | {"reps": r.get("status")}
            for r in run.direct]
    return "\n".join([
        "## In-process ONNX Runtime (model time without Triton)", "",
        "p50 per graph on the same requests; GFLOP/s = the FLOP model's count / p50.", "",
        an.table(rows, {"L": "length", "N": "n", "graph": "model", "p50 ms": "p50_us",
                     "p90 ms": "p90_us", "GFLOP": "gflop", "GFLOP/s": "gflops", "runs": "reps",
                     "others' CPU (cores)": "ext_cpu_cores"},
              {"p50_us": an.ms, "p90_us": an.ms, "gflop": lambda v: an.fmt(v, 3),
               "gflops": lambda v: an.fmt(v, 1),
               "reps": lambda v: an.count(v) if an.num(v) is not None else str(v)})])


def _mib(v: object, digits: int) -> str:
    x = an.num(v)
    return "–" if x is None else f"{x / 2**20:,.{digits}f}"


def _memory_section(run: Run) -> str:
    fm = run.flops
    out = ["## Memory", "",
           f"user K/V per request = {fm.layers} x 2 x {fm.heads} x L x {fm.head_dim} x 4 = "
           f"{fm.user_kv_bytes(1)} L bytes: "
           + ", ".join(f"{fm.user_kv_bytes(L) / 2**20:.2f} MiB at L={L}" for L in run.mode.lengths)
           + "; the naive model holds N such K/V sets.", "",
           an.table([[r["model"], r["n"], r["length"], _mib(r.get("peak_delta_bytes"), 1),
                   _mib(r["naive_attention_est_bytes"], 0) if r["model"] == "ranker_naive"
                   else "", f"{float(r['user_kv_bytes']) / 2**20:.2f}",  # type: ignore[arg-type]
                   _mib(r["naive_kv_bytes"], 1), r.get("method") or "", r.get("status")]
                  for r in run.memory],
                 ["graph", "N", "L", "peak RSS delta MiB (measured)", "naive attention est. MiB",
                  "user K/V MiB", "naive K/V copies MiB", "method", "status"])]
    peaks = {(r["model"], r["n"], r["length"]): float(r["peak_delta_bytes"])  # type: ignore[arg-type]
             for r in run.memory if an.num(r.get("peak_delta_bytes")) is not None}
    notes = []
    for (model, n, length), naive_peak in peaks.items():
        fusion = peaks.get(("target_fusion", n, length))
        if model != "ranker_naive" or fusion is None:
            continue
        enc = max((v for (mm, _, ll), v in peaks.items() if mm == "user_encoder" and ll == length),
                  default=None)
        notes.append(f"At N={n}, L={length}: naive peak {naive_peak / 2**20:,.1f} MiB vs "
                     f"target_fusion {fusion / 2**20:,.1f} MiB"
                     + (f" (user_encoder {enc / 2**20:,.1f} MiB; the split's peak is the "
                        f"larger of the two, {naive_peak / max(fusion, enc, 1):,.0f}x less "
                        "than naive)" if enc is not None else "") + ".")
    return "\n".join([*out, "", *notes] if notes else out)


def _breakdown_table(run: Run, parts: dict[str, float], n: int, length: int) -> str:
    rows = [["client p50 (perf_analyzer)", parts.get("client_p50")],
            ["client avg gRPC time", parts.get("client_avg_grpc")],
            ["ensemble server avg request latency", parts.get("ensemble_avg_request_latency")]]
    for model in ("user_encoder", "target_fusion"):
        d = an.num(an.pick(run.direct, "p50_us", model=model, n=n, length=length))
        for part in ("queue", "compute_input", "compute_infer", "compute_output"):
            rows.append([f"{model}: {part.replace('_', ' ')}", parts.get(f"{model}_{part}")])
        rows.append([f"{model}: in-process ORT p50 (direct)", d])
        infer = parts.get(f"{model}_compute_infer")
        if infer is not None and d is not None:
            rows.append([f"{model}: compute infer - direct (Python stub + noise)", infer - d])
    return an.table(rows, ["part", "us"], {"us": lambda v: an.fmt(v, 0)})


def _where_time_goes(run: Run, summary: list[Row], tg: list[Row]) -> str:
    out = ["## Where the time goes", ""]
    for length in run.mode.lengths:
        for n in (50, *run.mode.ns):
            parts = {str(r["part"]): float(r["us"]) for r in run.breakdown  # type: ignore[arg-type]
                     if (r["n"], r["length"], r["concurrency"]) == (n, length, 1)}
            if parts:
                break
        else:
            continue
        out += [f"### `ranker` ensemble at N={n}, L={length} (per-composing-model breakdown, "
                "averages in us)", "", _breakdown_table(run, parts, n, length), ""]
        s = an.pick(summary, n=n, length=length, concurrency=1)
        if s and an.num(s["ensemble_over_direct"]) is not None:
            direct_total = an.num(s["direct_split_p50_us"]) or 0.0
            overhead = parts.get("client_p50", 0.0) - direct_total
            server, grpc = parts.get("ensemble_avg_request_latency"), parts.get("client_avg_grpc")
            models = ("user_encoder", "target_fusion")
            comp_io = sum(parts.get(f"{mm}_{p}", 0.0) for mm in models
                          for p in ("compute_input", "compute_output"))
            queue = sum(parts.get(f"{mm}_queue", 0.0) for mm in models)
            out += [
                f"Triton adds {overhead / 1e3:.2f} ms to {direct_total / 1e3:.2f} ms of model time "
                f"(ensemble/direct {an.fmt(s['ensemble_over_direct'], 2)}): of the averages, "
                + (f"gRPC + client marshalling {an.fmt((grpc or 0) - (server or 0), 0)} us, "
                   if grpc is not None and server is not None else "")
                + f"the composing models' queues {an.fmt(queue, 0)} us, their compute input + "
                "output "
                f"(tensors into and out of the Python-backend stubs, user K/V "
                f"{run.flops.user_kv_bytes(length) / 2**20:.2f} MiB included) {an.fmt(comp_io, 0)} "
                "us; the rest is the stubs' own per-call cost inside compute infer and noise.", ""]
    rows = [r for r in summary if r["concurrency"] == 1 and an.num(r["speedup_over_bound"])]
    if rows:
        out += ["### Measured speedup vs the bound, decomposed", "",
                "speedup / bound = (R_split / R_naive) x (naive Triton/direct) / (ranker "
                "Triton/direct), R the FLOP rates reached in-process (benchmarks/README.md).", ""]
        trs = []
        for r in rows:
            n, length = r["n"], r["length"]
            nv = an.pick(run.direct, "gflops", model="ranker_naive", n=n, length=length)
            sp = an.pick(run.direct, "gflops", model="split", n=n, length=length)
            over_n, over_r = r["naive_over_direct"], r["ensemble_over_direct"]
            trs.append([length, n, an.fmt(r["speedup_over_bound"], 2), an.fmt(sp, 1), an.fmt(nv, 1),
                        an.fmt(an.ratio(sp, nv), 2), an.fmt(over_n, 2), an.fmt(over_r, 2),
                        an.fmt(an.ratio(over_n, over_r), 2)])
        out += [an.table(trs, ["L", "N", "speedup / bound", "R_split GFLOP/s", "R_naive GFLOP/s",
                            "R_split / R_naive", "naive Triton/direct", "ranker Triton/direct",
                            "overhead ratio"]), ""]
    out += ["### Missed targets", ""]
    missed = [t for t in tg if t["verdict"] == "missed"]
    if not missed:
        out.append("No target missed in this run.")
    for t in missed:
        out.append(f"- **{t['target']}** at {t['point']}: {t['measured']} ({t['margin']}).")
    if missed:
        out += ["", "Where each miss points and the next steps: benchmarks/README.md, section "
                "Method."]
    return "\n".join(out)


def _formulas(run: Run) -> str:
    fm = run.flops
    one = {L: ((fm.naive(1, L) - fm.head_profile()), (fm.fusion(1, L) - fm.head_profile()))
           for L in run.mode.lengths}
    return (f"C_naive, C_user, C_fusion and the bound as in benchmarks/README.md (`flops.py`). "
            f"With d={fm.d}, f={fm.d_ff}, H={fm.heads}, l={fm.layers}: " + "; ".join(
                f"L={L}: C_user = {fm.user(L) / 1e9:.3f} GFLOP, one naive candidate = "
                f"{nv / 1e9:.3f} GFLOP, one fused candidate = {fu / 1e6:.2f} MFLOP, "
                f"bound(N -> inf) = {nv / fu:.0f}" for L, (nv, fu) in one.items()) + ".")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Regenerate summary.csv, speedup.png and report.md of a benchmark run "
                    "(scripts/bench.sh) from its CSVs and run.json, without measuring again.")
    p.add_argument("out", type=Path, help="the run's folder (e.g. benchmarks/results)")
    args = p.parse_args(argv)
    if not (args.out / "run.json").exists():
        p.error(f"{args.out / 'run.json'} not found: not a benchmark run's folder")
    write(args.out)
    print(f"wrote {args.out / 'summary.csv'}, {args.out / 'speedup.png'}, "
          f"{args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
