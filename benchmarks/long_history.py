"""Long user histories: a model family's split against its peers (its own `mfalcon` and
`replicated_fusion` forwards, where it has them) and its naive oracle, from its declaration.
The method: benchmarks/README.md."""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import product
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import psutil

from benchmarks import analysis as an
from benchmarks import cpu
from benchmarks.feeds import named_state
from benchmarks.memory import peak_rss_bytes, reset_peak
from client.api import RankerClient
from client.split_contract import SplitContract
from client.traffic import random_features
from export.config import CONFIG_DIR
from export.family import Family, FamilyError, load_family
from export.family import main as export_family
from export.repositories import onnx_path
from export.runtime import make_session
from export.split_contract import ReferenceSplitModel, SplitModel
from export.split_export import graph_io, graphs_for, trace
from export.split_fuzz import appended
from export.triton_configs import config_source
from local_server.triton import free_port, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent
# A peer forward -> the graph it stands in for (replicated K/V: after the same user_encoder)
PEERS = {"mfalcon": "ranker_naive", "replicated_fusion": "target_fusion"}
LABELS = {"replicated_fusion": "replicated", "ranker_naive": "naive"}  # as the CSVs name them
TABLES = ("history", "append", "memory", "triton")  # long_<name>.csv
APPEND_EVENTS = 10
WARM_S = 0.5  # timed() warms a function faster than this right before each timed run
MAX_SECONDS = 8.0  # a run slower than this is not repeated
log = an.Progress("long_history")


@dataclass
class Run:
    family: Family  # export/family.py: the model, its declaration, its serving limits
    config: Path
    repeats: int = 5
    budget_bytes: int = 6 * 2**30
    peers: tuple[str, ...] = ()
    naive_bytes: float = 64.0  # per candidate and (L+1)^2: a fresh-process peak at L=1024
    sessions: dict = field(default_factory=dict)  # graph -> (session, its input names)
    tables: dict[str, list[dict]] = field(default_factory=lambda: {t: [] for t in TABLES})
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def contract(self) -> SplitContract:
        return self.family.contract

    @property
    def repository(self) -> Path:
        return REPO_ROOT / "build" / "long" / self.config.stem

    @property
    def peers_dir(self) -> Path:
        return self.repository.with_name(f"{self.repository.name}_peers")

    def session(self, graph: str) -> tuple[object, list[str]]:
        if graph not in self.sessions:
            path = onnx_path(self.peers_dir if graph in PEERS else self.repository, graph)
            self.sessions[graph] = (make_session(path),
                                    graph_io(self.contract, PEERS.get(graph, graph))[0])
        return self.sessions[graph]

    def run(self, graph: str, values: dict[str, np.ndarray]) -> list[np.ndarray]:
        session, names = self.session(graph)
        return session.run(None, {n: values[n] for n in names})


def timed(fns: dict[str, Callable[[], object]], repeats: int,
          max_seconds: float = MAX_SECONDS) -> dict[str, tuple[float, object]]:
    """Each function's median seconds and last result over `repeats` rounds in turns after a
    warm-up round (one under WARM_S warmed again before each; one over max_seconds: no more)."""
    times, results = {name: [] for name in fns}, {}
    for _ in range(repeats + 1):  # the first round warms up; its time counts only if alone
        for name, fn in fns.items():
            if times[name] and times[name][0] > max_seconds:
                continue
            if times[name] and times[name][0] < WARM_S:
                fn()
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(t[1:] or t)), results[name]) for name, t in times.items()}


def bytes_needed(run: Run, graph: str, n: int, kept: int) -> int:
    """Estimated working set: naive's as measured, the reference model's dense peers'."""
    if graph == "ranker_naive":
        return int(run.naive_bytes * n * (kept + 1) ** 2)
    if graph not in PEERS or not isinstance(run.family.model, ReferenceSplitModel):
        return 0
    cfg = run.family.model.model.cfg
    return (16 * cfg.num_heads * (kept + n) ** 2 if graph == "mfalcon"
            else 24 * n * (kept + 1) * cfg.d_model)


def naive_slice(run: Run, n: int, kept: int) -> tuple[int, str]:
    """Candidates per naive call (within naive_max_work and the budget), or 0 and why not."""
    work, tokens = run.family.plan.naive_max_work, (kept + 1) ** 2
    if tokens > work:
        return 0, f"one candidate is above naive_max_work={work} (its graph refuses)"
    if (one := bytes_needed(run, "ranker_naive", 1, kept)) > run.budget_bytes:
        return 0, f"one candidate needs ~{one / 2**30:.1f} GiB > budget"
    return max(1, min(n, work // tokens, run.budget_bytes // one)), ""


def measure_point(run: Run, values: dict[str, np.ndarray], n: int, length: int) -> None:
    """Every method at one (N, L), timed in turns, and its scores against the oracle."""
    kept, graphs, notes = min(length, run.contract.max_history), [], {}
    for graph in ("user_encoder", "target_fusion", *run.peers):
        if (need := bytes_needed(run, graph, n, kept)) > run.budget_bytes:
            notes[graph] = f"needs ~{need / 2**30:.1f} GiB > budget"
        else:
            graphs.append(graph)
    out = timed({g: partial(run.run, g, values) for g in graphs}, run.repeats)
    per_call, notes["ranker_naive"] = naive_slice(run, n, kept)
    if per_call:  # (a copy of the scores: ORT's output would keep the session's arena alive)
        part = {**values, **{f.name: values[f.name][:per_call]
                             for f in run.contract.candidate_features}}
        seconds, scores = timed({"naive": lambda: [run.run("ranker_naive", part)[0].copy()]},
                                max(1, run.repeats // 2), MAX_SECONDS / 4)["naive"]
        del run.sessions["ranker_naive"]  # its arena, grown to the slice's size, freed
        slices = math.ceil(n / per_call) if n else 1
        out["ranker_naive"] = (seconds * slices, scores)
        if slices > 1:
            notes["ranker_naive"] = f"{slices} slices of {per_call}: one measured, x{slices}"
    ue_s = out["user_encoder"][0]  # split and replicated K/V run after user_encoder
    out.update({g: (s + ue_s, r) for g, (s, r) in out.items() if PEERS.get(g) == "target_fusion"},
               split=(ue_s + out["target_fusion"][0], out["target_fusion"][1]))
    oracle, name = ("ranker_naive", "naive") if per_call else ("split", "split")
    ref = out[oracle][1][0]
    for i, graph in enumerate(("user_encoder", "target_fusion", "split", *run.peers,
                               "ranker_naive")):
        seconds, result = out.get(graph, (None, None))
        diff = "" if i < 2 or result is None else "oracle" if graph == oracle else (
            f"{np.abs(result[0][: len(ref)] - ref).max(initial=0.0):.2e} vs {name}")
        run.tables["history"].append(dict(
            L=length, N=n, method=LABELS.get(graph, graph), max_diff=diff,
            p50_ms=None if seconds is None else round(seconds * 1e3, 3), note=notes.get(graph, "")))


def measure_append(run: Run, history: dict[str, np.ndarray], length: int) -> None:
    """ΔL = APPEND_EVENTS new events onto L cached ones vs a full encode of L + ΔL events."""
    cached = run.run("user_encoder", {k: v[:length] for k, v in history.items()})
    feeds = {**run.contract.cached_reads(cached), **{k: v[length:] for k, v in history.items()}}
    out = timed({"append": partial(run.run, "user_encoder_append", feeds),
                 "full": partial(run.run, "user_encoder", history)}, run.repeats)
    (append_s, new), (full_s, full) = out["append"], out["full"]
    whole = appended(run.contract, cached, new)  # the cached state, then the new events'
    diff = max(float(np.abs(a - b).max(initial=0)) for a, b in zip(whole, full, strict=True))
    run.tables["append"].append({
        "L": length, "new_events": APPEND_EVENTS, "append_ms": round(append_s * 1e3, 3),
        "full_encode_ms": round(full_s * 1e3, 3), "full/append": round(full_s / append_s, 1),
        "max_diff": f"{diff:.2e} vs full encode"})


def in_process(run: Run, lengths: list[int], ns: list[int]) -> None:
    rng, start = np.random.default_rng(0), cpu.snapshot()
    for length in lengths:
        request = random_features(run.contract, length + APPEND_EVENTS, max(ns), rng)
        history = {f.name: request[f.name] for f in run.contract.history_features}
        if run.contract.appendable and length + APPEND_EVENTS <= run.contract.max_history:
            log(f"append L={length} + {APPEND_EVENTS}")
            measure_append(run, history, length)
        values = {**request, **{k: v[:length] for k, v in history.items()}}
        values.update(named_state(run.contract, run.run("user_encoder", values)))
        for n in ns:
            log(f"in-process L={length} N={n}")
            measure_point(run, {**values, **{f.name: values[f.name][:n]
                                             for f in run.contract.candidate_features}}, n, length)
    run.facts["others' CPU during the in-process timings (cores)"] = {
        k: round(v, 2) for k, v in cpu.external_cores(start).items()}


def probe(config: Path, graph: str, n: int, length: int) -> dict[str, object]:
    """One run of `graph` at (N, L) in this fresh process: its peak RSS above the RSS before."""
    run = Run(load_family(config), config)
    values = random_features(run.contract, length, n, np.random.default_rng(0))
    if PEERS.get(graph, graph) == "target_fusion":
        values.update(named_state(run.contract, run.run("user_encoder", values)))
    run.session(graph)
    if not reset_peak():
        raise SystemExit("cannot reset the peak RSS mark (/proc/self/clear_refs)")
    before = psutil.Process().memory_info().rss
    run.run(graph, values)
    return {"graph": graph, "N": n, "L": length,
            "peak_mib": round(((peak_rss_bytes() or 0) - before) / 2**20, 1)}


def fresh_probe(config: Path, graph: str, n: int, length: int) -> dict[str, object]:
    """`probe` in a fresh process: its row, or why it failed."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(probe, config, graph, n, length).result()
        except Exception as e:  # the probe failed, or its process was killed (memory)
            return {"graph": graph, "N": n, "L": length, "peak_mib": None, "note": repr(e)[:200]}


def through_triton(run: Run, lengths: list[int], ns: list[int]) -> None:
    """`ranker` through a local tritonserver (gRPC, concurrency 1) at every point."""
    rng = np.random.default_rng(1)
    log(f"starting tritonserver on {run.repository}")
    server = start_server(grpc_port=free_port(), repository=run.repository, timeout_s=300)
    try:
        with RankerClient(server.grpc_url, timeout_s=600, validate=False) as client:
            for length, n in product(lengths, ns):
                score = partial(client.score, random_features(run.contract, length, n, rng))
                seconds = timed({"ranker": score}, run.repeats)["ranker"][0]
                log(f"ranker through Triton L={length} N={n}: {seconds * 1e3:.1f} ms")
                run.tables["triton"].append(dict(L=length, N=n, p50_ms=round(seconds * 1e3, 3)))
    finally:
        server.stop()


def export_peers(model: SplitModel, directory: Path) -> tuple[str, ...]:
    """The peer forwards `model` has, each traced as the graph it stands in for."""
    peers = tuple(p for p in PEERS if hasattr(model, p))
    for peer in peers:
        path = onnx_path(directory, peer)
        onnx.save(trace(model, peer, PEERS[peer], path), path)
        onnx.checker.check_model(path)
    return peers


def write_report(out: Path) -> None:
    """long_history.md from the run's CSVs and long_facts.json in `out`."""
    facts = json.loads((out / "long_facts.json").read_text())
    info, family = facts["machine"], load_family(REPO_ROOT / facts["config"]).contract.family
    frames = {t: an.read_csv(path) for t in TABLES if (path := out / f"long_{t}.csv").exists()}
    rows = frames["history"].fillna({"max_diff": "", "note": ""})
    p50 = rows.pivot_table(index=["L", "N"], columns="method", values="p50_ms", sort=False)
    methods = [m for m in rows.method.unique()[2:] if m in p50]  # after user_encoder, fusion
    rows["cell"] = [f"not run: {r.note}" if an.num(r.p50_ms) is None else an.fmt(r.p50_ms) + (
        f" [{'; '.join(t for t in (r.max_diff, r.note) if t)}]" if r.max_diff else "")
        for r in rows.itertuples()]
    cells = rows.pivot(index=["L", "N"], columns="method", values="cell")
    ratios = pd.DataFrame({f"{m} / split": p50[m] / p50.split for m in methods[1:]})
    lines = [
        f"# Long user histories ({family}): split vs peers vs naive", "",
        f"`python -m benchmarks.long_history --config {facts['config']}` on {info['date']}, "
        f"{info['cpu']} ({info['cores']} cores, shared), ONNX Runtime {info['onnxruntime']} on "
        "CPU: every figure from this run, side by side on the same weights; [the max |score "
        "difference| from the naive oracle where it ran, else from the split].", "",
        "## In-process p50 (ms)", "",
        an.table(cells[["user_encoder", "target_fusion", *methods]].reset_index()), "",
        "## Ratios (p50 / split p50; > 1: the split is faster)", "",
        an.table(ratios.reset_index(), formats=dict.fromkeys(ratios.columns, "{:.2f}")), ""]
    titles = {"append": f"Append: {APPEND_EVENTS} new events onto L cached vs a full encode",
              "memory": "Peak memory per graph (MiB above the RSS before the run, fresh process)",
              "triton": "`ranker` through Triton (local tritonserver 2.51, gRPC, concurrency 1)"}
    for table, title in titles.items():
        lines += [f"## {title}", "", an.table(frames[table]), ""] if table in frames else []
    lines += ["## Facts", "", *(f"- {k}: {v}" for k, v in facts.items() if k != "machine"),
              "", "## Machine", "", an.machine_table(info), ""]
    (out / "long_history.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_history", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=CONFIG_DIR / "ranker_causal_long.json",
                   help="a family's model config (reference or HSTU)")
    p.add_argument("--lengths", default="256,1024,2048,4096,8192,16384", help="history lengths L")
    p.add_argument("--ns", default="1,50,1000", help="candidate counts N")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point")
    p.add_argument("--budget-gib", type=float, default=6.0, help="max estimated working set")
    p.add_argument("--memory-lengths", help="L of the fresh-process peaks (default: --lengths)")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton measurements")
    p.add_argument("--report-only", type=Path, metavar="DIR",
                   help="rewrite DIR's long_history.md from its CSVs and facts, no run")
    p.add_argument("--out", type=Path, help="results folder (default: build/bench/long_<time>)")
    args = p.parse_args(argv)
    if args.report_only:
        if not (args.report_only / "long_facts.json").exists():
            p.error(f"{args.report_only / 'long_facts.json'} not found: not a long_history run")
        write_report(args.report_only)
        return 0
    try:
        run = Run(load_family(args.config), args.config, args.repeats, int(args.budget_gib * 2**30))
    except FamilyError as e:
        raise SystemExit(str(e)) from None
    out = args.out or REPO_ROOT / "build" / "bench" / f"long_{time.strftime('%Y%m%d_%H%M%S')}"
    lengths, ns = ([int(v) for v in s.split(",")] for s in (args.lengths, args.ns))
    log(f"exporting {args.config} (and the peers) into {run.repository}")
    start = time.perf_counter()  # the family's repository pair, as `python -m export.family`
    if export_family(["--config", str(args.config), "--output", str(run.repository)]):
        raise SystemExit("export failed")
    run.facts["export_s"] = round(time.perf_counter() - start, 1)
    run.peers = export_peers(run.family.model, run.peers_dir)
    run.facts.update(peers=list(run.peers), model_mib={
        g: round(onnx_path(run.peers_dir if g in PEERS else run.repository, g).stat().st_size
                 / 2**20, 1) for g in (*graphs_for(run.contract), *run.peers)},
        config=config_source(args.config),
        machine=an.machine(tritonserver="2.51 (nvidia-pytriton 0.7.0)", gpu="none"))
    naive_peak = fresh_probe(run.config, "ranker_naive", 1, 1024)["peak_mib"] or 0
    run.naive_bytes = naive_peak * 2**20 / (min(1024, run.contract.max_history) + 1) ** 2 or 64.0
    run.facts["naive bytes per candidate x (L+1)^2"] = f"{run.naive_bytes:.0f} (L=1024)"
    in_process(run, lengths, ns)
    for length in [int(v) for v in (args.memory_lengths or args.lengths).split(",")]:
        for graph, n in [("user_encoder", 1), ("ranker_naive", 1),
                         *((g, n) for n in ns for g in ("target_fusion", *run.peers))]:
            if not (naive_slice(run, 1, length)[1] if graph == "ranker_naive"
                    else bytes_needed(run, graph, n, length) > run.budget_bytes):
                log(f"memory {graph} N={n} L={length}")
                run.tables["memory"].append(fresh_probe(args.config, graph, n, length))
    if not args.no_triton:
        through_triton(run, lengths, ns)
    out.mkdir(parents=True, exist_ok=True)
    for table, rows in run.tables.items():
        if rows:
            an.write_csv(out / f"long_{table}.csv", rows)
    (out / "long_facts.json").write_text(json.dumps(run.facts, indent=2) + "\n")
    write_report(out)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
