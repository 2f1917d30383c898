"""report.md, summary.csv and speedup.png of a benchmark run from its CSVs and run.json alone
(`python -m benchmarks.report DIR`; scripts/bench.sh calls `write` at the end of a run). How each
figure is measured and what a flag means: benchmarks/README.md, section Method."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import analysis as an
from benchmarks import flops
from benchmarks.cpu import CONTENDED_CORES
from benchmarks.state import MODES, REPO_ROOT, Mode
from export.config import ModelConfig

TARGET_BOUND_SHARE = 0.8  # Speedup(N=50, L=1000) >= 0.8 x FLOP bound
TARGET_N1 = 0.9  # Speedup(N=1) >= 0.9
TARGET_ENSEMBLE = 1.3  # ensemble latency <= 1.3 x direct ORT at N=50
# Plausible Triton/in-process latency ratios; outside them a point is flagged `inconsistent`.
CONSISTENT = {"ensemble_over_direct": ("ranker", 0.9, np.inf),
              "naive_over_direct": ("naive", 0.85, 1.6)}
CSVS = ("points", "direct", "ensemble_breakdown", "memory")
EMPTY = ["model", "part", "us"]  # the columns of a CSV with no rows that the report reads
KEYS = ["n", "length", "concurrency"]
MODELS = {"ranker": "ranker", "ranker_naive": "naive", "ranker_base": "base"}  # -> summary name
# Table headers other than the column's name, formats other than _table's rules and an.fmt
HEADERS = {"n": "N", "length": "L", "ext_cpu_cores": "others' CPU (cores)", "reps": "runs"}
FORMATS = {"max_abs_diff": an.sci, "fusion_gflops": partial(an.fmt, digits=1),
           "gflops": partial(an.fmt, digits=1), "gflop": partial(an.fmt, digits=3),
           "seq_cost_ratio": partial(an.fmt, digits=4), "reps": an.count}


def write(out: Path) -> None:
    """summary.csv, speedup.png and report.md from the run's files in `out`."""
    info = json.loads((out / "run.json").read_text())
    mode = replace(MODES[info["mode"]], naive_limit_s=info["naive_limit_s"])
    cfg = ModelConfig.load(REPO_ROOT / info["config"])  # relative to the repository, or absolute
    csv = {name: an.read_csv(out / f"{name}.csv") if (out / f"{name}.csv").exists() and (
        out / f"{name}.csv").read_text().strip() else pd.DataFrame(columns=[*KEYS, *EMPTY])
        for name in CSVS}
    summary = summarise(csv, flops.FlopModel.from_config(cfg))
    an.write_csv(out / "summary.csv", summary)
    plot(mode, info, flops.FlopModel.from_config(cfg), summary, out / "speedup.png")
    (out / "report.md").write_text(report(mode, cfg, info, csv, summary))


def _wide(frame: pd.DataFrame, index: list[str], prefix: str) -> pd.DataFrame:
    """One row per `index`, a column "<prefix><model>.<column>" per model and column."""
    wide = frame.set_index([*index, "model"]).unstack("model")
    wide.columns = [f"{prefix}{model}.{column}" for column, model in wide.columns]
    return wide.reset_index()


def summarise(csv: dict[str, pd.DataFrame], fm: flops.FlopModel) -> pd.DataFrame:
    """summary.csv: one row per (N, L, concurrency) of points.csv, in its order."""
    points, direct = csv["points"], csv["direct"]
    s = points[KEYS].drop_duplicates().merge(_wide(points, KEYS, ""), on=KEYS, how="left").merge(
        _wide(direct, ["n", "length"], "direct."), on=["n", "length"], how="left")
    p50 = {short: s[f"{model}.p50_us"].astype(float) for model, short in MODELS.items()}
    thr = {short: s[f"{model}.throughput"].astype(float) for model, short in MODELS.items()}
    split, naive = s["direct.split.p50_us"], s["direct.ranker_naive.p50_us"]
    bound = pd.Series(map(fm.bound, s.n.tolist(), s.length.tolist()))
    r, c1 = flops.sequence_cost_ratio(thr["ranker"], thr["naive"], thr["base"]), s.concurrency == 1
    loads = [s[f"{model}.ext_cpu_cores"] for model in MODELS] + [
        s[f"direct.{graph}.ext_cpu_cores"].where(c1) for graph in ("split", *list(MODELS)[1:])]
    summary = pd.DataFrame({
        **{key: s[key] for key in KEYS}, **{f"{short}_p50_us": p50[short] for short in p50},
        **{f"{short}_thr": thr[short] for short in thr},
        "speedup_p50": p50["naive"] / p50["ranker"],
        "throughput_ratio": thr["ranker"] / thr["naive"], "flop_bound": bound,
        "speedup_over_bound": p50["naive"] / p50["ranker"] / bound,
        "throughput_ratio_over_bound": thr["ranker"] / thr["naive"] / bound,
        "direct_split_p50_us": split, "direct_naive_p50_us": naive,
        "direct_speedup": naive / split, "ensemble_over_direct": p50["ranker"] / split,
        "naive_over_direct": p50["naive"] / naive,
        "base_over_direct": p50["base"] / s["direct.ranker_base.p50_us"],
        "fusion_gflops": s["direct.target_fusion.gflops"],
        "drop_naive": 1.0 - thr["naive"] / thr["base"],  # LONGER's form, benchmarks/README.md
        "drop_shared": 1.0 - thr["ranker"] / thr["base"],
        "seq_cost_ratio": r, "drop_shared_seeds_scaled": flops.seeds_scaled_drop(r),
        "max_abs_diff": s["direct.ranker_naive.max_abs_diff"].where(c1),
        "max_ext_cpu_cores": pd.concat(loads, axis=1).max(axis=1)})
    summary["status"] = pd.concat([s.filter(like=".status"), summary], axis=1).apply(_flags, axis=1)
    return summary


def _flags(row: pd.Series) -> str:
    """benchmarks/README.md, Noise."""
    out = [f"{short}: {row[f'{model}.status']}" for model, short in MODELS.items()
           if isinstance(row[f"{model}.status"], str) and row[f"{model}.status"] != "ok"]
    for column, (model, low, high) in CONSISTENT.items():
        if row["concurrency"] == 1 and (row[column] < low or row[column] > high):  # NaN: no
            out.append(f"inconsistent: {model} Triton/direct {row[column]:.2f}")
    if row["max_ext_cpu_cores"] > CONTENDED_CORES:
        out.append(f"contended (others used up to {row['max_ext_cpu_cores']:.1f} cores)")
    return "; ".join(out) or "ok"


def plot(mode: Mode, info: dict, fm: flops.FlopModel, summary: pd.DataFrame, path: Path) -> None:
    """speedup.png: the measured and in-process speedups per L against the FLOP bound."""
    grid = np.unique(np.round(np.logspace(0, np.log10(max(1000, summary.n.max())), 200)))
    c1 = summary[summary.concurrency == 1]
    with an.figure(path, size=(8.5, 6), dpi=120) as (ax,):
        for i, length in enumerate(mode.lengths):
            at, colour = c1[c1.length == length], f"C{i}"
            ax.plot(grid, [fm.bound(int(n), length) for n in grid], "-", color=colour, lw=1.5,
                    label=f"FLOP bound, L={length}")
            ax.scatter(at.n, at.speedup_p50, s=64, edgecolors=colour,
                       facecolors=np.where(at.status == "ok", colour, "none"),
                       label=f"measured (Triton p50; hollow: flagged), L={length}")
            ax.plot(at.n, at.direct_speedup, "x", color=colour, ms=7,
                    label=f"in-process ORT, L={length}")
        ax.plot(grid, flops.seeds_model_speedup(grid), "--", color="black",
                label="fixed-ratio model N/(0.85+0.15N)")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        an.loglog(ax, "N candidates per request", "speedup = naive latency / shared-K/V latency",
                  f"concurrency 1, {mode.name} run, {info['machine']['cpu']}")


def targets(mode: Mode, summary: pd.DataFrame) -> list[list[str]]:
    """The targets: point, measured, verdict, margin and the point's flags."""
    at = summary[summary.concurrency == 1].set_index(["n", "length"])
    checks = [(f"Speedup(N=50, L=1000) >= {TARGET_BOUND_SHARE} x FLOP bound", 50, 1000,
               "speedup_over_bound", TARGET_BOUND_SHARE, " of the bound")]
    checks += [(f"Speedup(N=1) >= {TARGET_N1}", 1, length, "speedup_p50", TARGET_N1, "")
               for length in mode.lengths]
    checks += [(f"ensemble latency <= {TARGET_ENSEMBLE} x direct ORT at N=50", 50, length,
                "ensemble_over_direct", TARGET_ENSEMBLE, " direct ORT") for length in mode.lengths]
    rows = []
    for name, n, length, column, threshold, of in checks:
        r = at.loc[(n, length)] if (n, length) in at.index else None
        value = None if r is None else an.num(r[column])
        verdict, margin = an.check(value, threshold, higher=column != "ensemble_over_direct")
        measured = "not measured" if value is None else f"{an.fmt(value)}x{of}"
        note = "" if r is None or r["status"] == "ok" else f"flags: {r['status']}"
        rows.append([name, f"N={n}, L={length}", measured, f"**{verdict}**", margin, note])
    return rows


def _table(frame: pd.DataFrame, names: str) -> str:
    """The space-separated columns `names` of `frame` (_us in ms, _bytes in MiB, drop_* in %)."""
    columns = names.split()
    formats = {c: an.ms if c.endswith("_us") else an.pct if c.startswith("drop") else
               FORMATS.get(c) for c in columns}
    headers = {HEADERS.get(c, c.replace("_us", " ms").replace("_bytes", " MiB").replace("_", " ")):
               c for c in columns}
    return an.table(frame, headers, {c: f for c, f in formats.items() if f})


def report(mode: Mode, cfg: ModelConfig, info: dict, csv: dict[str, pd.DataFrame],
           summary: pd.DataFrame) -> str:
    c1 = summary[summary.concurrency == 1]
    direct, memory, parts = csv["direct"], csv["memory"], csv["ensemble_breakdown"]
    longer_r = flops.sequence_cost_ratio(1 - flops.SEEDS_SHARED_DROP, 1 - flops.SEEDS_NAIVE_DROP, 1)
    n, length = mode.sweep_point or (None, None)  # the concurrency sweep's point
    sweep = csv["points"][(csv["points"].n == n) & (csv["points"].length == length)]
    at = 50 if 50 in mode.ns else mode.ns[0]  # the breakdown's N
    breakdown = parts.query("n == @at and concurrency == 1 and not part.str.endswith('_count')")
    breakdown = breakdown.pivot(index="part", columns="length", values="us").add_prefix("L=")
    return "\n".join([
        f"# Benchmark: shared user K/V (`ranker`) vs naive vs base — {mode.name} run", "",
        f"{mode.name} run of `scripts/bench.sh` (seed {info['seed']}, {info['total_s'] / 60:.1f} "
        "min); measured unless a bound or model. Method and flags: benchmarks/README.md.", "",
        "## Machine and versions", "", an.machine_table(info["machine"]), "",
        f"Model config (`{info['config']}`): "
        + ", ".join(f"{k} {v}" for k, v in cfg.to_dict().items()) + ".", "",
        "## Run settings", "", an.machine_table(asdict(mode)), "",
        "## Targets", "", an.table(targets(mode, summary), [
            "target", "point", "measured", "verdict", "margin", "note"]), "",
        "## Speedup vs the FLOP bound (concurrency 1)", "",
        _table(c1.assign(status=c1.status.replace("ok", "")), "length n ranker_p50_us "
               "naive_p50_us base_p50_us speedup_p50 throughput_ratio flop_bound speedup_over_bound"
               " throughput_ratio_over_bound direct_speedup ensemble_over_direct fusion_gflops "
               "max_abs_diff status"), "", "![speedup vs N](speedup.png)", "",
        "## In LONGER's form (throughput drop)", "",
        f"LONGER (ByteDance, RecSys 2025) reported {flops.SEEDS_NAIVE_DROP:.0%} -> "
        f"{flops.SEEDS_SHARED_DROP:.1%}, r = {longer_r:.3f} (formulas: benchmarks/README.md).", "",
        _table(c1.assign(fixed_ratio_model=flops.seeds_model_speedup(c1.n.astype(float))),
               "length n speedup_p50 fixed_ratio_model drop_naive drop_shared seq_cost_ratio "
               "drop_shared_seeds_scaled"), "",
        "## Concurrency sweep" + (f" (N={n}, L={length})" if mode.sweep_point else ""), "",
        _table(sweep.sort_values("concurrency", kind="stable"), "concurrency model throughput "
               "p50_us p99_us status") if mode.sweep_point else "Not run in this mode.", "",
        "## In-process ONNX Runtime (model time without Triton)", "",
        _table(direct, "length n model p50_us p90_us gflop gflops reps ext_cpu_cores status"), "",
        "## Memory", "",
        _table(memory.assign(**memory.filter(like="_bytes") / 2**20), "model n length "
               "peak_delta_bytes naive_attention_est_bytes user_kv_bytes naive_kv_bytes method "
               "status"), "",
        f"## Where the time goes: `ranker` at N={at}, concurrency 1, us per L", "",
        an.table(breakdown.reset_index(), formats=dict.fromkeys(breakdown.columns,
                                                                partial(an.fmt, digits=0))), ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("python -m benchmarks.report", description="Rebuild a run's "
                                "summary.csv, speedup.png and report.md from its CSVs.")
    p.add_argument("out", type=Path, help="the run's folder (e.g. benchmarks/results)")
    out = p.parse_args(argv).out
    if not (out / "run.json").exists():
        p.error(f"{out / 'run.json'} not found: not a benchmark run's folder")
    write(out)
    print(f"wrote summary.csv, speedup.png and report.md in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
