"""report.md, summary.csv and speedup.png of a benchmark run, from the run's CSVs alone.

benchmarks/bench.py measures and writes points.csv, direct.csv, ensemble_breakdown.csv,
memory.csv, ort_profile.csv and run.json (mode, seed, config, machine, wall time); this module
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
CSVS = ("points", "direct", "ensemble_breakdown", "memory", "ort_profile")


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
    profile: list[Row]

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
                   frames["direct"], frames["ensemble_breakdown"], frames["memory"],
                   frames["ort_profile"])


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
        "numbers below are measured in this run unless marked as a bound or a model.", "",
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
        _method(m), "",
        "## Targets", "",
        an.table([[t["target"], t["point"], t["measured"], f"**{t['verdict']}**", t["margin"],
                t["note"]] for t in tg],
              ["target", "point", "measured", "verdict", "margin", "note"]), "",
        "## Headline (L = 1000, concurrency 1)" if 1000 in m.lengths else "## Headline", "",
        an.table([r for r in c1 if r["length"] == (1000 if 1000 in m.lengths else m.lengths[-1])],
              {"N": "n", "speedup": "speedup_p50", "FLOP bound": "flop_bound",
               "speedup / bound": "speedup_over_bound",
               "ensemble / direct": "ensemble_over_direct", "drop naive": "drop_naive",
               "drop shared": "drop_shared"},
              {"drop_naive": an.pct, "drop_shared": an.pct}), "",
        "## Speedup vs the FLOP bound (concurrency 1)", "",
        "Speedup = naive p50 latency / `ranker` p50 latency (perf_analyzer, gRPC); throughput "
        "ratio = `ranker` infer/s / naive infer/s; bound = C_naive / (C_user + C_fusion) from "
        "the FLOP model below; ensemble/direct = `ranker` p50 over the in-process "
        "user_encoder + target_fusion p50 on the same requests. target_fusion GFLOP/s = "
        "C_fusion / in-process fusion p50.", "",
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
        "## Files", "",
        "- `points.csv`: one row per model x point x concurrency: status (ok | unstable | "
        "timeout | error | skipped: reason), p50/p90/p95/p99 latency (us), throughput (infer/s), "
        "requests measured, windows, perf_analyzer settings (K, -s, -r), server queue/compute. "
        "An `unstable` row carries the last window's throughput and p50 only.",
        "- `summary.csv`: one row per point: speedup, throughput ratio, FLOP bound, speedup/bound, "
        "in-process speedup, ensemble/direct, drops, sequence-cost ratio, seeds-scaled drop, "
        "fusion GFLOP/s, split-vs-naive max abs diff.",
        "- `direct.csv`: in-process ORT p50/p90 per graph and point, with GFLOP and GFLOP/s.",
        "- `ensemble_breakdown.csv`: the per-composing-model breakdown of `ranker`.",
        "- `memory.csv`, `ort_profile.csv`, `speedup.png`, `perf_analyzer/` (every "
        "perf_analyzer command line and output, its CSV where it finished), `tritonserver.log`"
        + (", `inputs/` (the perf_analyzer input files)." if info.get("keep_inputs") else
           f". The perf_analyzer input files were deleted at the end; `--seed {info['seed']}` "
           "regenerates the same requests."), "",
    ]
    return "\n".join(parts)


def _method(m: Mode) -> str:
    return "\n".join([
        "## Method", "",
        f"- Points: N in {list(m.ns)} x L in {list(m.lengths)}, concurrency 1"
        + (f"; concurrency sweep {list(m.sweep_concurrency)} at N={m.sweep_point[0]}, "
           f"L={m.sweep_point[1]}" if m.sweep_point else "")
        + ". Per point the three models run in turn (`ranker`, `ranker_naive`, `ranker_base`), "
        "then the next point, so drift hits all alike.",
        f"- Requests: {m.requests_per_point} distinct requests per point from "
        "`client.traffic.RequestGenerator` (seeded; sessions, Zipf popularity, huge int64 ids), "
        "written as a perf_analyzer `--input-data` JSON with a `shape` for every tensor and sent "
        "round-robin; all three models get the same file.",
        f"- perf_analyzer 2.51: `-i grpc --concurrency-range C --measurement-mode count_windows "
        f"--measurement-request-count K -s {m.stability:g} -r {m.max_trials} --percentile 50 -v "
        f"-f`. K is sized so one window lasts about {m.window_s:g} s (at least {m.k_min}; "
        f"requests over 1 s: K = 3 and at most 8 windows); windows never last under 1 s "
        "(perf_analyzer's count-window floor). Stability is judged on p50 and throughput over "
        "the last 3 windows. When perf_analyzer gives up (exit 2), the row keeps the last "
        "window's throughput and p50, flagged `unstable`; p90/p99 are then left empty.",
        f"- `ranker_naive` is skipped where one request is estimated above "
        f"{m.naive_limit_s:g} s (x concurrency in the sweep): the estimate scales the latest "
        "naive time measured at the same L (or one timed request at N=1) by the FLOP model's "
        "C_naive(N, L) / C_naive(N_ref, L); or where its attention working set "
        "(2 x N x H x (L+1)^2 x 4 bytes) would exceed half the available memory.",
        "- In-process timings: the same model.onnx files with `export.runtime.make_session` "
        "(the Python backend's session options), one warm-up per request (a single one for "
        "requests over 1 s), then round-robin over the point's requests for about "
        f"{m.direct_budget_s:g} s per graph (at least 3 runs, 2 for requests over 1 s); p50 "
        "reported. user_encoder and target_fusion are timed back to back per request; their "
        "sum is the ensemble's model time (`direct`).",
        "- Noise: the machine is shared. For every measurement the report gives the CPU that "
        "other processes used meanwhile (machine CPU time from /proc/stat minus the CPU time of "
        "the benchmark's own process tree: itself, tritonserver and its stubs, perf_analyzer), "
        f"in cores; a point is flagged `contended` where it exceeded {CONTENDED_CORES} cores "
        "for any of its measurements. Ratios that mix two measurements (speedup, "
        "ensemble/direct) are only as good as the quieter of the two. Independently of that "
        "figure, a point is flagged `inconsistent` where Triton's latency and the in-process one "
        "of the same graph disagree beyond what Triton's overhead can explain (ranker "
        f"Triton/direct < {CONSISTENT_RANKER[0]}, naive Triton/direct outside "
        f"{CONSISTENT_NAIVE[0]}-{CONSISTENT_NAIVE[1]}): one of the two caught noise that the "
        "CPU figure does not see (other VMs on the host, memory bandwidth)."
        + (" A contended perf_analyzer run (under 30 s) or in-process timing of the split or "
           "the base is measured once more if a 1 s probe shows the machine calm again, and the "
           "attempt with less outside CPU use is kept (chosen by the contention figure, never by "
           "the result); persistent contention is recorded, not waited out."
           if m.retry_contended else ""),
        "- Memory: each graph once in a fresh Python process (`python -m benchmarks.memory`): "
        "session loaded and inputs built, the kernel's peak-RSS mark reset (`/proc/self/"
        "clear_refs`), one run, then peak RSS (VmHWM) minus RSS before the run. ru_maxrss "
        "(getrusage) is recorded too but cannot be the measure: it keeps the model-loading peak "
        "and, after vfork + exec, starts at the parent's high-water mark.",
    ])


def _seeds_r() -> float:
    return (1 / (1 - SEEDS_SHARED_DROP) - 1) / (1 / (1 - SEEDS_NAIVE_DROP) - 1)


def _seeds_section(m: Mode, summary: list[Row]) -> str:
    out = [
        "## In LONGER's form (throughput drop)", "",
        "Throughput drop from adding the long-sequence module: drop = 1 - thr(model) / "
        "thr(ranker_base), at concurrency 1 (throughput = perf_analyzer infer/s). Our base is "
        "tiny (the head alone, well under a millisecond of model time), so both drops are large "
        "here; LONGER's production base was heavy enough that the naive module cost 40 %. "
        "The column *shared, seeds-scaled* answers: with a base like theirs, what would our "
        "shared-K/V drop be? With per-request costs 1/thr, the measured sequence-cost ratio is "
        "r = (1/thr_ranker - 1/thr_base) / (1/thr_naive - 1/thr_base); a base whose naive drop is "
        f"D = {SEEDS_NAIVE_DROP:.0%} spends s = 1/(1-D) - 1 = {1 / (1 - SEEDS_NAIVE_DROP) - 1:.3f} "
        "base-costs on the naive sequence module, so the shared module costs r s and "
        "drop_shared = 1 - 1/(1 + r s). (LONGER's 6.8 % corresponds to r = "
        f"{_seeds_r():.3f}, a {1 / _seeds_r():.1f}x cheaper sequence module.)", "",
    ]
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
           f"user_kv per request = layers x 2 x H x L x dh x 4 bytes = {fm.layers} x 2 x "
           f"{fm.heads} x L x {fm.head_dim} x 4 = {fm.user_kv_bytes(1)} L bytes: "
           + ", ".join(f"{fm.user_kv_bytes(L) / 2**20:.2f} MiB at L={L}" for L in run.mode.lengths)
           + ". The naive model holds N such K/V sets (one per candidate) plus N score matrices "
           "[H, L+1, L+1] per layer.", "",
           an.table([[r["model"], r["n"], r["length"], _mib(r.get("peak_delta_bytes"), 1),
                   _mib(r["naive_attention_est_bytes"], 0) if r["model"] == "ranker_naive"
                   else "", f"{float(r['user_kv_bytes']) / 2**20:.2f}",  # type: ignore[arg-type]
                   _mib(r["naive_kv_bytes"], 1), r.get("method") or "", r.get("status")]
                  for r in run.memory],
                 ["graph", "N", "L", "peak RSS delta MiB (measured)", "naive attention est. MiB",
                  "user_kv MiB", "naive K/V copies MiB", "method", "status"])]
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
    if notes:
        out += ["", *notes]
    out += ["", "ORT keeps its CPU arena after a run, so a server process's resident memory stays "
            "near the largest request's peak."]
    return "\n".join(out)


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
                f"(tensors into and out of the Python-backend stubs, user_kv "
                f"{run.flops.user_kv_bytes(length) / 2**20:.2f} MiB included) {an.fmt(comp_io, 0)} "
                "us; the rest is the stubs' own per-call cost inside compute infer and noise.", ""]
    if run.profile:
        n, length = run.mode.profile_point
        out += [f"### ORT profile at N={n}, L={length} (kernel time per op type, "
                "first run excluded)", ""]
        for graph in ("user_encoder", "target_fusion"):
            rows = [r for r in run.profile if r["graph"] == graph]
            total = sum(float(r["us_per_run"]) for r in rows)  # type: ignore[arg-type]
            out += [f"{graph} ({total / 1e3:.2f} ms of kernels per run):", "",
                    an.table(rows[:8], {"op type": "op_type", "us per run": "us_per_run",
                                     "share": "share", "nodes": "nodes_per_run"},
                          {"us_per_run": lambda v: an.fmt(v, 0), "share": an.pct,
                           "nodes_per_run": lambda v: an.fmt(v, 0)}), ""]
    rows = [r for r in summary if r["concurrency"] == 1 and an.num(r["speedup_over_bound"])]
    if rows:
        out += [
            "### Measured speedup vs the bound, decomposed", "",
            "With in-process times t = C / R (C the FLOP count, R the FLOP rate reached), the "
            "in-process speedup is bound x R_split / R_naive exactly, and Triton multiplies it "
            "by (naive Triton/direct) / (ranker Triton/direct). So speedup / bound = "
            "(R_split / R_naive) x (overhead_naive / overhead_ranker): above 1 when the naive "
            "graph runs at a lower FLOP rate than the split (its N score matrices [H, L+1, L+1] "
            "and their softmax are memory-bound), below 1 when the split is the less efficient "
            "one (small N: target_fusion's GEMMs are skinny) or when Triton's fixed per-call "
            "cost, paid twice by the ensemble, is large next to the model time.", ""]
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
    out += ["### Missed targets and next steps", ""]
    missed = [t for t in tg if t["verdict"] == "missed"]
    if not missed:
        out.append("No target missed in this run.")
    for t in missed:
        out.append(f"- **{t['target']}** at {t['point']}: {t['measured']} ({t['margin']}).")
        name = str(t["target"])
        if name.startswith("ensemble latency"):
            out.append(
                "  The gap is Triton's per-request cost, roughly constant per call, so it weighs "
                "most where the model time is small (short L). In the local flavour each ONNX "
                "model runs in a Python-backend stub: request tensors and user_kv are copied into "
                "and out of shared memory, and the ensemble makes two such calls. Next steps: "
                "measure the production flavour (native onnxruntime backend, no stub); halve the "
                "user_kv transfer with an fp16 user_kv (`python -m export --fp16`); on GPU keep "
                "user_kv in Triton's CUDA pool; or serve the split as one model when the "
                "two-step ensemble is not needed.")
        elif name.startswith("Speedup(N=1)"):
            out.append(
                "  At N=1 the split does the same work as the naive model (the bound is ~1.8 only "
                "because the user encoder's last layer computes K/V alone), but the ensemble "
                "pays two Triton model calls instead of one. Next steps: cut the per-call cost "
                "(native backend), or route N=1 requests to a single-graph model.")
        elif name.startswith("Speedup(N=50"):
            out.append("  " + _bound_miss(summary, 50, 1000))
    out += ["", _profile_notes(run)]
    return "\n".join(out)


def _bound_miss(summary: list[Row], n: int, length: int) -> str:
    """Where a speedup/bound miss comes from: model FLOP rates vs Triton overheads."""
    r = an.pick(summary, n=n, length=length, concurrency=1)
    if r is None:
        return ""
    model = an.ratio(r["direct_speedup"], r["flop_bound"])
    over_n, over_r = an.num(r["naive_over_direct"]), an.num(r["ensemble_over_direct"])
    triton = an.ratio(over_n, over_r)
    if model is None or triton is None or over_r is None or over_n is None:
        return "Not decomposable: the in-process naive timing is missing at this point."
    text = (f"Decomposed: in-process the split reaches {model:.2f} x bound (its FLOP rate vs the "
            f"naive graph's); Triton then multiplies by {triton:.2f} (ranker {over_r:.2f} x its "
            f"model time, naive {over_n:.2f} x), giving {model * triton:.2f}. ")
    if triton < model:
        return text + ("The larger loss is Triton's: the ensemble pays two Python-backend calls "
                       "and moves user_kv through shared memory twice, the naive model one call. "
                       "Next steps: the production flavour (native onnxruntime backend), an fp16 "
                       "user_kv, fewer tensors crossing the ensemble boundary.")
    return text + ("The larger loss is the model's: the split's graphs run at a lower FLOP rate "
                   "than the naive graph (see the profile below). Next steps: a fused attention "
                   "kernel for the history (com.microsoft.MultiHeadAttention), the causal mask "
                   "built once, target_fusion reading user_kv without copies.")


OP_HINTS = {
    "Softmax": "Softmax over the [H, L, L] scores: a fused attention kernel "
               "(com.microsoft.MultiHeadAttention, causal) would not materialise them",
    "Where": "Where builds the causal mask on every call: a constant mask sliced to L",
    "Add": "the Adds include the [H, L, L] mask bias: gone with a fused causal attention",
    "Split": "Split copies user_kv into per-layer K and V: per-layer inputs or a layout that "
             "slices without copying",
    "Slice": "Slices of user_kv and of the padded candidate rows are copies in ORT",
    "Concat": "Concat of the history scores with each candidate's own score (one extra column)",
}


def _profile_notes(run: Run) -> str:
    if not run.profile:
        return ""
    top = {g: [r for r in run.profile if r["graph"] == g][:3]
           for g in ("user_encoder", "target_fusion")}
    tops = {g: ", ".join(f"{r['op_type']} {an.pct(r['share'])}" for r in rows)
            for g, rows in top.items()}
    hints = [f"- {OP_HINTS[str(r['op_type'])]} ({r['graph']}: {an.pct(r['share'])})."
             for rows in top.values() for r in rows if str(r["op_type"]) in OP_HINTS]
    return "\n".join([
        f"Model-side next steps, from the profile: user_encoder's top op types are "
        f"{tops['user_encoder']}; target_fusion's are {tops['target_fusion']}. Where the "
        "non-GEMM time goes:", "", *hints])


def _formulas(run: Run) -> str:
    fm = run.flops
    d, dff, h, layers = fm.d, fm.d_ff, fm.heads, fm.layers
    one = {L: ((fm.naive(1, L) - fm.head_profile()), (fm.fusion(1, L) - fm.head_profile()))
           for L in run.mode.lengths}
    return "\n".join([
        "Algorithmic FLOPs of the matrix products (multiply-add = 2), d = d_model, f = d_ff, "
        "l = layers, h = head_hidden, t = tasks, P = profile dim; norms, GELU, softmax, biases "
        "and gathers left out:", "", "```",
        "per token per layer, projections: qkv 6d^2 + out 2d^2 + FFN 4df = 8d^2 + 4df"
        + ("   (= 24 d^2 since f = 4d)" if dff == 4 * d else ""),
        "attention, T queries over S keys:  4 T S d        (QK^T 2TSd + PV 2TSd)",
        "encode(T)  = T (8d^2 + 4df) + 4 T^2 d   per layer (full T x T scores, as ORT runs it)",
        "kv_only(T) = 4 T d^2                    (the user encoder's last layer: K and V only)",
        "head       = 2 d h + 2 h t per candidate, + 2 P h once per request", "",
        "C_naive(N, L)  = N [ l encode(L+1) + head ] + 2Ph",
        "C_user(L)      = (l-1) encode(L) + kv_only(L)",
        "C_fusion(N, L) = N [ l (8d^2 + 4df + 4 (L+1) d) + head ] + 2Ph",
        "bound(N, L)    = C_naive(N, L) / (C_user(L) + C_fusion(N, L))", "```", "",
        f"With d={d}, f={dff}, H={h}, l={layers}: " + "; ".join(
            f"L={L}: C_user = {fm.user(L) / 1e9:.3f} GFLOP, one naive candidate = "
            f"{nv / 1e9:.3f} GFLOP, one fused candidate = {fu / 1e6:.2f} MFLOP, "
            f"bound(N -> inf) = {nv / fu:.0f}" for L, (nv, fu) in one.items()) + ".", "",
        "The exported graphs do slightly more than this (the last layer's fused qkv Linear also "
        "computes the unused Q, +2 L d^2; target_fusion carries one padding candidate); the "
        "bound is the algorithm's.",
    ])


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
