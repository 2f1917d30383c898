"""summary.csv rows, speedup.png and report.md of a benchmark run (scripts/bench.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scripts.bench_cpu import CONTENDED_CORES
from scripts.bench_flops import (
    SEEDS_NAIVE_DROP,
    SEEDS_SHARED_DROP,
    drop,
    seeds_model_speedup,
    seeds_scaled_drop,
    sequence_cost_ratio,
)

if TYPE_CHECKING:
    from scripts.bench import State

Row = dict[str, object]

TARGET_BOUND_SHARE = 0.8  # Speedup(N=50, L=1000) >= 0.8 x FLOP bound
TARGET_N1 = 0.9  # Speedup(N=1) >= 0.9
TARGET_ENSEMBLE = 1.3  # ensemble latency <= 1.3 x direct ORT at N=50
# Plausible Triton/in-process latency ratios; outside them a point is flagged `inconsistent`.
CONSISTENT_RANKER = (0.9, math.inf)
CONSISTENT_NAIVE = (0.85, 1.6)


# --------------------------------------------------------------------------- lookups

def _num(v: object) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def pa_row(st: State, model: str, n: int, length: int, c: int = 1) -> Row | None:
    for row in st.points:
        if (row["model"], row["n"], row["length"], row["concurrency"]) == (model, n, length, c):
            return row
    return None


def direct_row(st: State, model: str, n: int, length: int) -> Row | None:
    for row in st.direct:
        if (row["model"], row["n"], row["length"]) == (model, n, length):
            return row
    return None


def _value(row: Row | None, key: str) -> float | None:
    return _num(row.get(key)) if row else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def point_keys(st: State) -> list[tuple[int, int, int]]:
    keys: list[tuple[int, int, int]] = []
    for row in st.points:
        key = (int(row["n"]), int(row["length"]), int(row["concurrency"]))  # type: ignore[arg-type]
        if key not in keys:
            keys.append(key)
    return keys


# --------------------------------------------------------------------------- summary.csv

def summarise(st: State) -> list[Row]:
    rows = []
    for n, length, c in point_keys(st):
        r, nv, b = (pa_row(st, m, n, length, c) for m in ("ranker", "ranker_naive", "ranker_base"))
        p50 = {m: _value(x, "p50_us") for m, x in (("ranker", r), ("naive", nv), ("base", b))}
        thr = {m: _value(x, "throughput") for m, x in (("ranker", r), ("naive", nv), ("base", b))}
        bound = st.flops.bound(n, length)
        speedup = _ratio(p50["naive"], p50["ranker"])
        d_split = _value(direct_row(st, "split", n, length), "p50_us")
        d_naive = _value(direct_row(st, "ranker_naive", n, length), "p50_us")
        d_base = _value(direct_row(st, "ranker_base", n, length), "p50_us")
        fusion = direct_row(st, "target_fusion", n, length)
        row: Row = {
            "n": n, "length": length, "concurrency": c,
            "ranker_p50_us": p50["ranker"], "naive_p50_us": p50["naive"],
            "base_p50_us": p50["base"],
            "ranker_thr": thr["ranker"], "naive_thr": thr["naive"], "base_thr": thr["base"],
            "speedup_p50": speedup,
            "throughput_ratio": _ratio(thr["ranker"], thr["naive"]),
            "flop_bound": bound,
            "speedup_over_bound": _ratio(speedup, bound),
            "throughput_ratio_over_bound": _ratio(_ratio(thr["ranker"], thr["naive"]), bound),
            "direct_split_p50_us": d_split, "direct_naive_p50_us": d_naive,
            "direct_speedup": _ratio(d_naive, d_split),
            "ensemble_over_direct": _ratio(p50["ranker"], d_split),
            "naive_over_direct": _ratio(p50["naive"], d_naive),
            "base_over_direct": _ratio(p50["base"], d_base),
            "fusion_gflops": _value(fusion, "gflops"),
            "drop_naive": drop(thr["naive"], thr["base"]) if thr["naive"] and thr["base"] else None,
            "drop_shared": drop(thr["ranker"], thr["base"])
            if thr["ranker"] and thr["base"] else None,
        }
        if thr["ranker"] and thr["naive"] and thr["base"]:
            ratio = sequence_cost_ratio(thr["ranker"], thr["naive"], thr["base"])
            row["seq_cost_ratio"] = ratio
            row["drop_shared_seeds_scaled"] = seeds_scaled_drop(ratio)
        else:
            row["seq_cost_ratio"] = row["drop_shared_seeds_scaled"] = None
        row["max_abs_diff"] = st.exactness.get((n, length)) if c == 1 else None
        flags = [f"{m}: {x['status']}" for m, x in (("ranker", r), ("naive", nv), ("base", b))
                 if x and x.get("status") != "ok"]
        loads = [_value(x, "ext_cpu_cores") for x in (r, nv, b)]
        if c == 1:
            loads += [_value(direct_row(st, g, n, length), "ext_cpu_cores")
                      for g in ("split", "ranker_naive", "ranker_base")]
        # Triton runs the same ORT graphs with the same options, so a Triton latency well below
        # the in-process one, or a naive Triton/direct far above its small overhead, means one of
        # the two measurements caught noise.
        over_r, over_n = _num(row["ensemble_over_direct"]), _num(row["naive_over_direct"])
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

def plot(st: State, summary: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 6))
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    ns_all = [int(r["n"]) for r in summary] or [1]  # type: ignore[arg-type]
    grid = np.unique(np.round(np.logspace(0, math.log10(max(1000, max(ns_all))), 200)))
    for i, length in enumerate(st.mode.lengths):
        colour = colours[i % len(colours)]
        ax.plot(grid, [st.flops.bound(int(n), length) for n in grid], "-", color=colour, lw=1.5,
                label=f"FLOP bound, L={length}")
        rows = [r for r in summary if r["length"] == length and r["concurrency"] == 1]
        ok = [r for r in rows if r["speedup_p50"] is not None and r["status"] == "ok"]
        flagged = [r for r in rows if r["speedup_p50"] is not None and r["status"] != "ok"]
        if ok:
            ax.plot([r["n"] for r in ok], [r["speedup_p50"] for r in ok], "o", color=colour,
                    ms=8, label=f"measured (Triton p50), L={length}")
        if flagged:
            ax.plot([r["n"] for r in flagged], [r["speedup_p50"] for r in flagged], "o",
                    mfc="none", color=colour, ms=8,
                    label=f"measured, flagged (see report), L={length}")
        dr = [r for r in rows if r["direct_speedup"] is not None]
        if dr:
            ax.plot([r["n"] for r in dr], [r["direct_speedup"] for r in dr], "x", color=colour,
                    ms=7, label=f"in-process ORT, L={length}")
    ax.plot(grid, [seeds_model_speedup(float(n)) for n in grid], "--", color="black",
            label="design notes' model N/(0.85+0.15N)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N candidates per request")
    ax.set_ylabel("speedup = naive latency / shared-K/V latency")
    ax.set_title(f"ranker (shared user K/V) vs ranker_naive, concurrency 1 "
                 f"({st.mode.name} run)\n{st.machine.get('cpu', '')}, "
                 f"{st.machine.get('cores', '?')} cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- report.md

def f(v: object, digits: int = 2, unit: str = "") -> str:
    x = _num(v)
    if x is None:
        return "–"
    if abs(x) >= 100:
        s = f"{x:,.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.{digits}f}"
    return s + unit


def ms(v: object) -> str:
    x = _num(v)
    return "–" if x is None else f(x / 1e3, 2)


def pct(v: object) -> str:
    x = _num(v)
    return "–" if x is None else f"{100 * x:.1f} %"


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def status_of(row: Row | None) -> str:
    if row is None:
        return "not run"
    s = str(row.get("status", ""))
    return s


def summary_row(summary: list[Row], n: int, length: int, c: int = 1) -> Row | None:
    for r in summary:
        if (r["n"], r["length"], r["concurrency"]) == (n, length, c):
            return r
    return None


def breakdown(st: State, n: int, length: int) -> dict[str, float]:
    return {str(r["part"]): float(r["us"]) for r in st.breakdown  # type: ignore[arg-type]
            if (r["n"], r["length"], r["concurrency"]) == (n, length, 1)}


def targets(st: State, summary: list[Row]) -> list[Row]:
    out: list[Row] = []

    def add(name: str, point: str, value: float | None, threshold: float, higher: bool,
            shown: str, note: str = "") -> None:
        if value is None:
            out.append({"target": name, "point": point, "measured": "not measured",
                        "verdict": "not measured", "margin": "–", "note": note})
            return
        met = value >= threshold if higher else value <= threshold
        margin = (value / threshold - 1) if higher else (threshold / value - 1)
        out.append({"target": name, "point": point, "measured": shown,
                    "verdict": "met" if met else "missed",
                    "margin": (f"+{100 * margin:.0f} % headroom" if met else
                               f"short by {100 * abs(margin):.0f} %"), "note": note})

    r = summary_row(summary, 50, 1000)
    value = _num(r["speedup_over_bound"]) if r else None
    add(f"Speedup(N=50, L=1000) >= {TARGET_BOUND_SHARE} x FLOP bound", "N=50, L=1000",
        value, TARGET_BOUND_SHARE, True,
        f"{f(r['speedup_p50'], 1)}x vs bound {f(r['flop_bound'], 1)}x = "
        f"{f(value, 2)} x bound" if r and value is not None else "",
        "" if not r or r["status"] == "ok" else f"flags: {r['status']}")
    for length in st.mode.lengths:
        r = summary_row(summary, 1, length)
        value = _num(r["speedup_p50"]) if r else None
        add(f"Speedup(N=1) >= {TARGET_N1}", f"N=1, L={length}", value, TARGET_N1, True,
            f"{f(value, 2)}x" if value is not None else "",
            "" if not r or r["status"] == "ok" else f"flags: {r['status']}")
    for length in st.mode.lengths:
        r = summary_row(summary, 50, length)
        value = _num(r["ensemble_over_direct"]) if r else None
        add(f"ensemble latency <= {TARGET_ENSEMBLE} x direct ORT at N=50", f"N=50, L={length}",
            value, TARGET_ENSEMBLE, False,
            f"{ms(r['ranker_p50_us'])} ms / {ms(r['direct_split_p50_us'])} ms = "
            f"{f(value, 2)}" if r and value is not None else "")
    return out


def report(st: State, summary: list[Row]) -> str:
    m = st.mode
    cfg = st.cfg
    fm = st.flops
    lines: list[str] = []
    add = lines.append
    add(f"# Benchmark: shared user K/V (`ranker`) vs naive vs base — {m.name} run")
    add("")
    add("Generated by `scripts/bench.sh"
        + {"full": "", "quick": " --quick", "smoke": " --smoke"}[m.name]
        + (f" --seed {st.seed}" if st.seed else "")
        + f"` on {st.machine.get('date', '?')} in {st.wall.get('total_s', 0) / 60:.1f} min. "
        "All numbers below are measured in this run unless marked as a bound or a model.")
    add("")
    add("## Machine and versions")
    add("")
    add(table(["item", "value"], [[k, v] for k, v in st.machine.items()]))
    add("")
    add(f"Model config: d_model {cfg.d_model}, {cfg.num_heads} heads (dh {cfg.head_dim}), "
        f"{cfg.num_layers} layers, d_ff {cfg.d_ff}, head_hidden {cfg.head_hidden}, "
        f"{cfg.num_tasks} tasks, profile {cfg.profile_dim}, mask {cfg.mask}, "
        f"max_history {cfg.max_history}. The server is the local flavour (tritonserver 2.51 from "
        "the nvidia-pytriton wheel): every ONNX model runs with ONNX Runtime (CPU) inside a "
        "Python-backend model, the `ranker` ensemble config is the production one. "
        "perf_analyzer, the server and both ORT sessions share the same cores.")
    add("")
    add(_method(st))
    add("")
    add("## Targets")
    add("")
    tg = targets(st, summary)
    add(table(["target", "point", "measured", "verdict", "margin", "note"],
              [[str(t["target"]), str(t["point"]), str(t["measured"]), f"**{t['verdict']}**",
                str(t["margin"]), str(t["note"])] for t in tg]))
    add("")
    add(_headline(st, summary))
    add("")
    add("## Speedup vs the FLOP bound (concurrency 1)")
    add("")
    add("Speedup = naive p50 latency / `ranker` p50 latency (perf_analyzer, gRPC); throughput "
        "ratio = `ranker` infer/s / naive infer/s; bound = C_naive / (C_user + C_fusion) from "
        "the FLOP model below; ensemble/direct = `ranker` p50 over the in-process "
        "user_encoder + target_fusion p50 on the same requests. target_fusion GFLOP/s = "
        "C_fusion / in-process fusion p50.")
    add("")
    rows = [r for r in summary if r["concurrency"] == 1]
    add(table(
        ["L", "N", "ranker p50 ms", "naive p50 ms", "base p50 ms", "speedup", "thr. ratio",
         "FLOP bound", "speedup / bound", "thr. ratio / bound", "in-process speedup",
         "ensemble / direct", "fusion GFLOP/s", "max |split-naive|", "flags"],
        [[str(r["length"]), str(r["n"]), ms(r["ranker_p50_us"]), ms(r["naive_p50_us"]),
          ms(r["base_p50_us"]), f(r["speedup_p50"], 2), f(r["throughput_ratio"], 2),
          f(r["flop_bound"], 2), f(r["speedup_over_bound"], 2),
          f(r["throughput_ratio_over_bound"], 2), f(r["direct_speedup"], 2),
          f(r["ensemble_over_direct"], 2), f(r["fusion_gflops"], 1),
          (f"{r['max_abs_diff']:.1e}" if _num(r["max_abs_diff"]) is not None else "–"),
          str(r["status"]) if r["status"] != "ok" else ""] for r in rows]))
    add("")
    add("![speedup vs N](speedup.png)")
    add("")
    add(_seeds_section(st, summary))
    add("")
    add(_latency_section(st))
    add("")
    add(_sweep_section(st, summary))
    add("")
    add(_direct_section(st))
    add("")
    add(_memory_section(st))
    add("")
    add(_where_time_goes(st, summary, tg))
    add("")
    add("## FLOP model (formulas)")
    add("")
    add(_formulas(st))
    add("")
    add("## Files")
    add("")
    add("- `points.csv`: one row per model x point x concurrency: status (ok | unstable | "
        "timeout | error | skipped: reason), p50/p90/p95/p99 latency (us), throughput (infer/s), "
        "requests measured, windows, perf_analyzer settings (K, -s, -r), server queue/compute. "
        "An `unstable` row carries the last window's throughput and p50 only.")
    add("- `summary.csv`: one row per point: speedup, throughput ratio, FLOP bound, speedup/bound, "
        "in-process speedup, ensemble/direct, drops, sequence-cost ratio, seeds-scaled drop, "
        "fusion GFLOP/s, split-vs-naive max abs diff.")
    add("- `direct.csv`: in-process ORT p50/p90 per graph and point, with GFLOP and GFLOP/s.")
    add("- `ensemble_breakdown.csv`: perf_analyzer's per-composing-model breakdown of `ranker`.")
    add("- `memory.csv`, `ort_profile.csv`, `speedup.png`, `perf_analyzer/` (every "
        "perf_analyzer command line and output, its CSV where it finished), `tritonserver.log`"
        + (", `inputs/` (the perf_analyzer input files)." if st.keep_inputs else
           f". The perf_analyzer input files were deleted at the end; `--seed {st.seed}` "
           "regenerates the same requests."))
    add("")
    _ = fm
    return "\n".join(lines) + "\n"


def _method(st: State) -> str:
    m = st.mode
    return "\n".join([
        "## Method",
        "",
        f"- Points: N in {list(m.ns)} x L in {list(m.lengths)}, concurrency 1"
        + (f"; concurrency sweep {list(m.sweep_concurrency)} at N={m.sweep_point[0]}, "
           f"L={m.sweep_point[1]}" if m.sweep_point else "")
        + ". Per point the three models run in turn (`ranker`, `ranker_naive`, `ranker_base`), "
        "then the next point, so drift hits all alike.",
        f"- Requests: {m.requests_per_point} distinct requests per point from "
        "`client.requests.RequestGenerator` (seeded; sessions, Zipf popularity, huge int64 ids), "
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
        "- Memory: each graph once in a fresh Python process (`python -m scripts.bench_memory`): "
        "session loaded and inputs built, the kernel's peak-RSS mark reset (`/proc/self/"
        "clear_refs`), one run, then peak RSS (VmHWM) minus RSS before the run. ru_maxrss "
        "(getrusage) is recorded too but cannot be the measure: it keeps the model-loading peak "
        "and, after vfork + exec, starts at the parent's high-water mark.",
    ])


def _headline(st: State, summary: list[Row]) -> str:
    out = ["## Headline (L = 1000, concurrency 1)" if 1000 in st.mode.lengths else
           "## Headline", ""]
    length = 1000 if 1000 in st.mode.lengths else st.mode.lengths[-1]
    rows = [r for r in summary if r["length"] == length and r["concurrency"] == 1]
    out.append(table(
        ["N", "speedup", "FLOP bound", "speedup / bound", "ensemble / direct",
         "drop naive", "drop shared"],
        [[str(r["n"]), f(r["speedup_p50"], 2), f(r["flop_bound"], 2),
          f(r["speedup_over_bound"], 2), f(r["ensemble_over_direct"], 2),
          pct(r["drop_naive"]), pct(r["drop_shared"])] for r in rows]))
    return "\n".join(out)


def _seeds_section(st: State, summary: list[Row]) -> str:
    out = [
        "## In the design notes' form",
        "",
        "Throughput drop from adding the long-sequence module: drop = 1 - thr(model) / "
        "thr(ranker_base), at concurrency 1 (throughput = perf_analyzer infer/s). Our base is "
        "tiny (the head alone, well under a millisecond of model time), so both drops are large "
        "here; the notes' production base was heavy enough that the naive module cost 40 %. "
        "The column *shared, seeds-scaled* answers: with a base like theirs, what would our "
        "shared-K/V drop be? With per-request costs 1/thr, the measured sequence-cost ratio is "
        "r = (1/thr_ranker - 1/thr_base) / (1/thr_naive - 1/thr_base); a base whose naive drop is "
        f"D = {SEEDS_NAIVE_DROP:.0%} spends s = 1/(1-D) - 1 = {1 / (1 - SEEDS_NAIVE_DROP) - 1:.3f} "
        "base-costs on the naive sequence module, so the shared module costs r s and "
        "drop_shared = 1 - 1/(1 + r s). (The notes' 6.8 % corresponds to r = "
        f"{_seeds_r():.3f}, a {1 / _seeds_r():.1f}x cheaper sequence module.)",
        "",
    ]
    for length in st.mode.lengths:
        rows = [r for r in summary if r["length"] == length and r["concurrency"] == 1]
        out.append(f"L = {length}:")
        out.append("")
        out.append(table(
            ["N", "speedup (measured)", "notes' model N/(0.85+0.15N)", "drop naive",
             "drop shared", "r = seq. cost shared / naive", "shared, seeds-scaled (naive 40 %)"],
            [[str(r["n"]), f(r["speedup_p50"], 2),
              f(seeds_model_speedup(float(r["n"])), 2),  # type: ignore[arg-type]
              pct(r["drop_naive"]), pct(r["drop_shared"]), f(r["seq_cost_ratio"], 4),
              pct(r["drop_shared_seeds_scaled"])] for r in rows]))
        out.append("")
    out.append(f"The notes reported {SEEDS_NAIVE_DROP:.0%} -> {SEEDS_SHARED_DROP:.1%}.")
    return "\n".join(out)


def _seeds_r() -> float:
    s = 1 / (1 - SEEDS_NAIVE_DROP) - 1
    return (1 / (1 - SEEDS_SHARED_DROP) - 1) / s


def _latency_section(st: State) -> str:
    out = ["## Latency and throughput per model (perf_analyzer, concurrency 1)", ""]
    rows = []
    for row in st.points:
        if row["concurrency"] != 1:
            continue
        rows.append([str(row["length"]), str(row["n"]), str(row["model"]),
                     ms(row.get("p50_us")), ms(row.get("p90_us")), ms(row.get("p99_us")),
                     f(row.get("throughput"), 2), str(row.get("requests") or "–"),
                     str(row.get("windows") or "–"), f(row.get("ext_cpu_cores"), 2),
                     status_of(row)])
    out.append(table(["L", "N", "model", "p50 ms", "p90 ms", "p99 ms", "infer/s", "requests",
                      "windows", "others' CPU (cores)", "status"], rows))
    return "\n".join(out)


def _sweep_section(st: State, summary: list[Row]) -> str:
    m = st.mode
    if not m.sweep_point:
        return "## Concurrency sweep\n\nNot run in this mode."
    n, length = m.sweep_point
    out = [f"## Concurrency sweep (N={n}, L={length})", "",
           "Concurrency 1 is the grid's row at this point. One model instance per graph: "
           "concurrency overlaps the client, gRPC and the two ensemble steps, not two "
           "requests of the same graph.", ""]
    rows = []
    for c in m.sweep_concurrency:
        for model in ("ranker", "ranker_naive", "ranker_base"):
            row = pa_row(st, model, n, length, c)
            rows.append([str(c), model, f(_value(row, "throughput"), 2), ms(_value(row, "p50_us")),
                         ms(_value(row, "p99_us")), status_of(row)])
    out.append(table(["concurrency", "model", "infer/s", "p50 ms", "p99 ms", "status"], rows))
    out.append("")
    srows = [r for r in summary if (r["n"], r["length"]) == (n, length)]
    out.append(table(["concurrency", "throughput ratio ranker/naive", "drop naive", "drop shared"],
                     [[str(r["concurrency"]), f(r["throughput_ratio"], 2), pct(r["drop_naive"]),
                       pct(r["drop_shared"])] for r in srows]))
    return "\n".join(out)


def _direct_section(st: State) -> str:
    out = ["## In-process ONNX Runtime (model time without Triton)", "",
           "p50 per graph on the same requests; GFLOP/s = the FLOP model's count / p50.", ""]
    rows = []
    for row in st.direct:
        if row.get("status") != "ok":
            rows.append([str(row["length"]), str(row["n"]), str(row["model"]), "–", "–", "–",
                         "–", str(row.get("status"))])
            continue
        rows.append([str(row["length"]), str(row["n"]), str(row["model"]), ms(row["p50_us"]),
                     ms(row["p90_us"]), f(row["gflop"], 3), f(row["gflops"], 1),
                     str(row["reps"]), f(row.get("ext_cpu_cores"), 2)])
    out.append(table(["L", "N", "graph", "p50 ms", "p90 ms", "GFLOP", "GFLOP/s", "runs",
                      "others' CPU (cores)"], rows))
    return "\n".join(out)


def _memory_section(st: State) -> str:
    fm = st.flops
    out = ["## Memory", "",
           f"user_kv per request = layers x 2 x H x L x dh x 4 bytes = {fm.layers} x 2 x "
           f"{fm.heads} x L x {fm.head_dim} x 4 = {fm.user_kv_bytes(1)} L bytes: "
           + ", ".join(f"{fm.user_kv_bytes(L) / 2**20:.2f} MiB at L={L}"
                       for L in st.mode.lengths)
           + ". The naive model holds N such K/V sets (one per candidate) plus N score matrices "
           "[H, L+1, L+1] per layer.", ""]
    rows = []
    for r in st.memory:
        rows.append([str(r["model"]), str(r["n"]), str(r["length"]),
                     (f"{float(r['peak_delta_bytes']) / 2**20:,.1f}"  # type: ignore[arg-type]
                      if _num(r.get("peak_delta_bytes")) is not None else "–"),
                     f"{float(r['naive_attention_est_bytes']) / 2**20:,.0f}"  # type: ignore[arg-type]
                     if r["model"] == "ranker_naive" else "",
                     f"{float(r['user_kv_bytes']) / 2**20:.2f}",  # type: ignore[arg-type]
                     f"{float(r['naive_kv_bytes']) / 2**20:,.1f}",  # type: ignore[arg-type]
                     str(r.get("method") or ""), str(r.get("status"))])
    out.append(table(["graph", "N", "L", "peak RSS delta MiB (measured)",
                      "naive attention est. MiB", "user_kv MiB", "naive K/V copies MiB",
                      "method", "status"], rows))
    pairs = {}
    for r in st.memory:
        if _num(r.get("peak_delta_bytes")) is not None:
            pairs[(r["model"], r["n"], r["length"])] = float(r["peak_delta_bytes"])  # type: ignore[arg-type]
    notes = []
    for (model, n, length), naive_peak in pairs.items():
        if model != "ranker_naive":
            continue
        fusion = pairs.get(("target_fusion", n, length))
        enc = max((v for (mm, _, ll), v in pairs.items() if mm == "user_encoder" and ll == length),
                  default=None)
        if fusion is not None:
            split_peak = max(fusion, enc or 0.0)
            notes.append(f"At N={n}, L={length}: naive peak {naive_peak / 2**20:,.1f} MiB vs "
                         f"target_fusion {fusion / 2**20:,.1f} MiB"
                         + (f" (user_encoder {enc / 2**20:,.1f} MiB; the split's peak is the "
                            f"larger of the two, {naive_peak / max(split_peak, 1):,.0f}x less "
                            "than naive)" if enc is not None else "") + ".")
    if notes:
        out += ["", *notes]
    out.append("")
    out.append("ORT keeps its CPU arena after a run, so a server process's resident memory stays "
               "near the largest request's peak.")
    return "\n".join(out)


def _where_time_goes(st: State, summary: list[Row], tg: list[Row]) -> str:
    out = ["## Where the time goes", ""]
    missed = [t for t in tg if t["verdict"] == "missed"]
    # 1. Ensemble overhead at N=50 (and wherever the breakdown exists).
    for length in st.mode.lengths:
        for n in (50, *st.mode.ns):
            parts = breakdown(st, n, length)
            if parts:
                break
        else:
            continue
        s = summary_row(summary, n, length)
        d_enc = _value(direct_row(st, "user_encoder", n, length), "p50_us")
        d_fus = _value(direct_row(st, "target_fusion", n, length), "p50_us")
        out.append(f"### `ranker` ensemble at N={n}, L={length} (perf_analyzer's composing-model "
                   "breakdown, averages in us)")
        out.append("")
        rows = [["client p50 (perf_analyzer)", f(parts.get("client_p50"), 0)],
                ["client avg gRPC time", f(parts.get("client_avg_grpc"), 0)],
                ["ensemble server avg request latency",
                 f(parts.get("ensemble_avg_request_latency"), 0)]]
        for model, d in (("user_encoder", d_enc), ("target_fusion", d_fus)):
            for part in ("queue", "compute_input", "compute_infer", "compute_output"):
                rows.append([f"{model}: {part.replace('_', ' ')}",
                             f(parts.get(f"{model}_{part}"), 0)])
            rows.append([f"{model}: in-process ORT p50 (direct)", f(d, 0)])
            infer = parts.get(f"{model}_compute_infer")
            if infer is not None and d is not None:
                rows.append([f"{model}: compute infer - direct (Python stub + noise)",
                             f(infer - d, 0)])
        out.append(table(["part", "us"], rows))
        out.append("")
        if s and _num(s["ensemble_over_direct"]) is not None:
            client = parts.get("client_p50", 0.0)
            direct_total = _num(s["direct_split_p50_us"]) or 0.0
            overhead = client - direct_total
            server = parts.get("ensemble_avg_request_latency")
            grpc = parts.get("client_avg_grpc")
            comp_io = sum(parts.get(f"{mm}_{p}", 0.0) for mm in ("user_encoder", "target_fusion")
                          for p in ("compute_input", "compute_output"))
            queue = sum(parts.get(f"{mm}_queue", 0.0) for mm in ("user_encoder", "target_fusion"))
            out.append(
                f"Triton adds {overhead / 1e3:.2f} ms to {direct_total / 1e3:.2f} ms of model time "
                f"(ensemble/direct {f(s['ensemble_over_direct'], 2)}): of the averages, "
                + (f"gRPC + client marshalling {f((grpc or 0) - (server or 0), 0)} us, "
                   if grpc is not None and server is not None else "")
                + f"the composing models' queues {f(queue, 0)} us, their compute input + output "
                f"(tensors into and out of the Python-backend stubs, user_kv "
                f"{st.flops.user_kv_bytes(length) / 2**20:.2f} MiB included) {f(comp_io, 0)} us; "
                "the rest is the stubs' own per-call cost inside compute infer and noise.")
            out.append("")
    # 2. ORT profile of the split's graphs.
    if st.profile:
        n, length = st.mode.profile_point
        out.append(f"### ORT profile at N={n}, L={length} (kernel time per op type, "
                   "first run excluded)")
        out.append("")
        for graph in ("user_encoder", "target_fusion"):
            rows = [r for r in st.profile if r["graph"] == graph][:8]
            total = sum(float(r["us_per_run"]) for r in st.profile  # type: ignore[arg-type]
                        if r["graph"] == graph)
            out.append(f"{graph} ({total / 1e3:.2f} ms of kernels per run):")
            out.append("")
            out.append(table(["op type", "us per run", "share", "nodes"],
                             [[str(r["op_type"]), f(r["us_per_run"], 0), pct(r["share"]),
                               f(r["nodes_per_run"], 0)] for r in rows]))
            out.append("")
    # 3. Bound vs measured: FLOP rates and Triton overheads.
    rows = [r for r in summary if r["concurrency"] == 1 and _num(r["speedup_over_bound"])]
    if rows:
        out.append("### Measured speedup vs the bound, decomposed")
        out.append("")
        out.append(
            "With in-process times t = C / R (C the FLOP count, R the FLOP rate reached), the "
            "in-process speedup is bound x R_split / R_naive exactly, and Triton multiplies it "
            "by (naive Triton/direct) / (ranker Triton/direct). So speedup / bound = "
            "(R_split / R_naive) x (overhead_naive / overhead_ranker): above 1 when the naive "
            "graph runs at a lower FLOP rate than the split (its N score matrices [H, L+1, L+1] "
            "and their softmax are memory-bound), below 1 when the split is the less efficient "
            "one (small N: target_fusion's GEMMs are skinny) or when Triton's fixed per-call "
            "cost, paid twice by the ensemble, is large next to the model time.")
        out.append("")
        trs = []
        for r in rows:
            n, length = int(r["n"]), int(r["length"])  # type: ignore[arg-type]
            nv = _value(direct_row(st, "ranker_naive", n, length), "gflops")
            sp = _value(direct_row(st, "split", n, length), "gflops")
            over_n, over_r = _num(r["naive_over_direct"]), _num(r["ensemble_over_direct"])
            trs.append([str(length), str(n), f(r["speedup_over_bound"], 2), f(sp, 1), f(nv, 1),
                        f(_ratio(sp, nv), 2), f(over_n, 2), f(over_r, 2),
                        f(_ratio(over_n, over_r), 2)])
        out.append(table(["L", "N", "speedup / bound", "R_split GFLOP/s", "R_naive GFLOP/s",
                          "R_split / R_naive", "naive Triton/direct", "ranker Triton/direct",
                          "overhead ratio"], trs))
        out.append("")
    # 4. Missed targets and next steps.
    out.append("### Missed targets and next steps")
    out.append("")
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
            out.append("  " + _bound_miss(st, summary, 50, 1000))
    out.append("")
    out.append(_profile_notes(st))
    return "\n".join(out)


def _bound_miss(st: State, summary: list[Row], n: int, length: int) -> str:
    """Where a speedup/bound miss comes from: model FLOP rates vs Triton overheads."""
    r = summary_row(summary, n, length)
    if r is None:
        return ""
    model = _ratio(_num(r["direct_speedup"]), _num(r["flop_bound"]))
    over_n, over_r = _num(r["naive_over_direct"]), _num(r["ensemble_over_direct"])
    triton = _ratio(over_n, over_r)
    if model is None or triton is None:
        return "Not decomposable: the in-process naive timing is missing at this point."
    text = (f"Decomposed: in-process the split reaches {model:.2f} x bound (its FLOP rate vs the "
            f"naive graph's); Triton then multiplies by {triton:.2f} (ranker {over_r:.2f} x its "
            f"model time, naive {over_n:.2f} x), giving {model * triton:.2f}. ")
    if triton < model:
        text += ("The larger loss is Triton's: the ensemble pays two Python-backend calls and "
                 "moves user_kv through shared memory twice, the naive model one call. Next "
                 "steps: the production flavour (native onnxruntime backend), an fp16 user_kv, "
                 "fewer tensors crossing the ensemble boundary.")
    else:
        text += ("The larger loss is the model's: the split's graphs run at a lower FLOP rate "
                 "than the naive graph (see the profile below). Next steps: a fused attention "
                 "kernel for the history (com.microsoft.MultiHeadAttention), the causal mask "
                 "built once, target_fusion reading user_kv without copies.")
    return text


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


def _profile_notes(st: State) -> str:
    if not st.profile:
        return ""
    enc = [r for r in st.profile if r["graph"] == "user_encoder"][:3]
    fus = [r for r in st.profile if r["graph"] == "target_fusion"][:3]
    tops = ", ".join(f"{r['op_type']} {pct(r['share'])}" for r in enc)
    ftops = ", ".join(f"{r['op_type']} {pct(r['share'])}" for r in fus)
    hints = [f"- {OP_HINTS[str(r['op_type'])]} ({r['graph']}: {pct(r['share'])})."
             for r in (*enc, *fus) if str(r["op_type"]) in OP_HINTS]
    return "\n".join([
        f"Model-side next steps, from the profile: user_encoder's top op types are {tops}; "
        f"target_fusion's are {ftops}. Where the non-GEMM time goes:", "", *hints])


def _formulas(st: State) -> str:
    fm = st.flops
    d, dff, h, layers = fm.d, fm.d_ff, fm.heads, fm.layers
    lines = [
        "Algorithmic FLOPs of the matrix products (multiply-add = 2), d = d_model, f = d_ff, "
        "l = layers, h = head_hidden, t = tasks, P = profile dim; norms, GELU, softmax, biases "
        "and gathers left out:",
        "",
        "```",
        "per token per layer, projections: qkv 6d^2 + out 2d^2 + FFN 4df = 8d^2 + 4df"
        + ("   (= 24 d^2 since f = 4d)" if dff == 4 * d else ""),
        "attention, T queries over S keys:  4 T S d        (QK^T 2TSd + PV 2TSd)",
        "encode(T)  = T (8d^2 + 4df) + 4 T^2 d   per layer (full T x T scores, as ORT runs it)",
        "kv_only(T) = 4 T d^2                    (the user encoder's last layer: K and V only)",
        "head       = 2 d h + 2 h t per candidate, + 2 P h once per request",
        "",
        "C_naive(N, L)  = N [ l encode(L+1) + head ] + 2Ph",
        "C_user(L)      = (l-1) encode(L) + kv_only(L)",
        "C_fusion(N, L) = N [ l (8d^2 + 4df + 4 (L+1) d) + head ] + 2Ph",
        "bound(N, L)    = C_naive(N, L) / (C_user(L) + C_fusion(N, L))",
        "```",
        "",
        f"With d={d}, f={dff}, H={h}, l={layers}: " + "; ".join(
            f"L={L}: C_user = {fm.user(L) / 1e9:.3f} GFLOP, one naive candidate = "
            f"{(fm.naive(1, L) - fm.head_profile()) / 1e9:.3f} GFLOP, one fused candidate = "
            f"{(fm.fusion(1, L) - fm.head_profile()) / 1e6:.2f} MFLOP, bound(N -> inf) = "
            f"{(fm.naive(1, L) - fm.head_profile()) / (fm.fusion(1, L) - fm.head_profile()):.0f}"
            for L in st.mode.lengths) + ".",
        "",
        "The exported graphs do slightly more than this (the last layer's fused qkv Linear also "
        "computes the unused Q, +2 L d^2; target_fusion carries one padding candidate); the "
        "bound is the algorithm's.",
    ]
    return "\n".join(lines)
