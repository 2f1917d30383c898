"""The numbers of a benchmark run (benchmarks/bench.py): summary.csv rows, the targets table,
speedup.png and the small formatting helpers the report (benchmarks/report.py) writes them with."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.cpu import CONTENDED_CORES
from benchmarks.flops import (
    drop,
    seeds_model_speedup,
    seeds_scaled_drop,
    sequence_cost_ratio,
)

if TYPE_CHECKING:
    from benchmarks.state import State

Row = dict[str, object]

TARGET_BOUND_SHARE = 0.8  # Speedup(N=50, L=1000) >= 0.8 x FLOP bound
TARGET_N1 = 0.9  # Speedup(N=1) >= 0.9
TARGET_ENSEMBLE = 1.3  # ensemble latency <= 1.3 x direct ORT at N=50
# Plausible Triton/in-process latency ratios; outside them a point is flagged `inconsistent`.
CONSISTENT_RANKER = (0.9, math.inf)
CONSISTENT_NAIVE = (0.85, 1.6)


# --------------------------------------------------------------------------- lookups

def as_number(v: object) -> float | None:
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


def value_of(row: Row | None, key: str) -> float | None:
    return as_number(row.get(key)) if row else None


def ratio_of(a: float | None, b: float | None) -> float | None:
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
        p50 = {m: value_of(x, "p50_us") for m, x in (("ranker", r), ("naive", nv), ("base", b))}
        thr = {m: value_of(x, "throughput") for m, x in (("ranker", r), ("naive", nv), ("base", b))}
        bound = st.flops.bound(n, length)
        speedup = ratio_of(p50["naive"], p50["ranker"])
        d_split = value_of(direct_row(st, "split", n, length), "p50_us")
        d_naive = value_of(direct_row(st, "ranker_naive", n, length), "p50_us")
        d_base = value_of(direct_row(st, "ranker_base", n, length), "p50_us")
        fusion = direct_row(st, "target_fusion", n, length)
        row: Row = {
            "n": n, "length": length, "concurrency": c,
            "ranker_p50_us": p50["ranker"], "naive_p50_us": p50["naive"],
            "base_p50_us": p50["base"],
            "ranker_thr": thr["ranker"], "naive_thr": thr["naive"], "base_thr": thr["base"],
            "speedup_p50": speedup,
            "throughput_ratio": ratio_of(thr["ranker"], thr["naive"]),
            "flop_bound": bound,
            "speedup_over_bound": ratio_of(speedup, bound),
            "throughput_ratio_over_bound": ratio_of(ratio_of(thr["ranker"], thr["naive"]), bound),
            "direct_split_p50_us": d_split, "direct_naive_p50_us": d_naive,
            "direct_speedup": ratio_of(d_naive, d_split),
            "ensemble_over_direct": ratio_of(p50["ranker"], d_split),
            "naive_over_direct": ratio_of(p50["naive"], d_naive),
            "base_over_direct": ratio_of(p50["base"], d_base),
            "fusion_gflops": value_of(fusion, "gflops"),
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
        loads = [value_of(x, "ext_cpu_cores") for x in (r, nv, b)]
        if c == 1:
            loads += [value_of(direct_row(st, g, n, length), "ext_cpu_cores")
                      for g in ("split", "ranker_naive", "ranker_base")]
        # Triton runs the same ORT graphs with the same options, so a Triton latency well below
        # the in-process one, or a naive Triton/direct far above its small overhead, means one of
        # the two measurements caught noise.
        over_r, over_n = as_number(row["ensemble_over_direct"]), as_number(row["naive_over_direct"])
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
            label="fixed-ratio model N/(0.85+0.15N)")
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
    x = as_number(v)
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
    x = as_number(v)
    return "–" if x is None else f(x / 1e3, 2)


def pct(v: object) -> str:
    x = as_number(v)
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
    value = as_number(r["speedup_over_bound"]) if r else None
    add(f"Speedup(N=50, L=1000) >= {TARGET_BOUND_SHARE} x FLOP bound", "N=50, L=1000",
        value, TARGET_BOUND_SHARE, True,
        f"{f(r['speedup_p50'], 1)}x vs bound {f(r['flop_bound'], 1)}x = "
        f"{f(value, 2)} x bound" if r and value is not None else "",
        "" if not r or r["status"] == "ok" else f"flags: {r['status']}")
    for length in st.mode.lengths:
        r = summary_row(summary, 1, length)
        value = as_number(r["speedup_p50"]) if r else None
        add(f"Speedup(N=1) >= {TARGET_N1}", f"N=1, L={length}", value, TARGET_N1, True,
            f"{f(value, 2)}x" if value is not None else "",
            "" if not r or r["status"] == "ok" else f"flags: {r['status']}")
    for length in st.mode.lengths:
        r = summary_row(summary, 50, length)
        value = as_number(r["ensemble_over_direct"]) if r else None
        add(f"ensemble latency <= {TARGET_ENSEMBLE} x direct ORT at N=50", f"N=50, L={length}",
            value, TARGET_ENSEMBLE, False,
            f"{ms(r['ranker_p50_us'])} ms / {ms(r['direct_split_p50_us'])} ms = "
            f"{f(value, 2)}" if r and value is not None else "")
    return out
