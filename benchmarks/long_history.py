"""Long user histories: a model family's split against its peers and its naive oracle.

Any family with a declaration (export/split_contract.py): requests, graphs and peers come from
it. One run, side by side on the same weights: in-process ONNX Runtime p50 of user_encoder,
target_fusion, the split (their sum), the family's peers (benchmarks/peers.py) and naive, each
checked against the oracle; an appendable family's append of 10 events vs a full encode; peak
memory per graph in a fresh process (`--probe`); `ranker` through a real local tritonserver;
others' CPU use (benchmarks/cpu.py). Where a method cannot run, the row says why; naive above
naive_max_work (or the memory budget) is one measured slice of candidates times the number of
slices (the same work; labelled so).

    PYTHONPATH=. .venv/bin/python -m benchmarks.long_history --help
    PYTHONPATH=. .venv/bin/python -m benchmarks.long_history --out benchmarks/results/long_history
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import analysis as an
from benchmarks import cpu
from benchmarks.peers import MFALCON, READS, REPLICATED_FUSION, export_peers
from benchmarks.state import Progress
from client.split_contract import SplitContract
from client.traffic import random_features
from export.config import CONFIG_DIR
from export.family import Family, FamilyError, load_family
from export.repositories import onnx_path
from export.runtime import make_session
from export.split_contract import ReferenceSplitModel
from export.split_export import graph_io, graphs_for
from export.split_fuzz import appended
from export.triton_configs import config_source

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LONG = CONFIG_DIR / "ranker_causal_long.json"
LABELS = {"split": "split", MFALCON: "mfalcon", REPLICATED_FUSION: "replicated", "naive": "naive"}
APPEND_EVENTS = 10
WARM_S = 0.5  # timed() warms a function faster than this right before each timed run


@dataclass
class Run:
    family: Family  # export/family.py: the model, its declaration, its serving limits
    repository: Path
    peers_dir: Path
    out: Path
    progress: Progress
    repeats: int
    budget_bytes: int
    max_seconds: float
    peers: tuple[str, ...] = ()
    naive_bytes: float = 0.0  # per candidate and (L+1)^2, measured by `calibrate`
    naive_runs: dict = field(default_factory=dict)  # (L, per call) -> (seconds, scores)
    sessions: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # graph -> its input names
    rows: list[dict[str, object]] = field(default_factory=list)
    appends: list[dict[str, object]] = field(default_factory=list)
    memory: list[dict[str, object]] = field(default_factory=list)
    triton: list[dict[str, object]] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def contract(self) -> SplitContract:
        return self.family.contract

    def path(self, graph: str) -> Path:
        if graph in READS:
            return self.peers_dir / graph / "1" / "model.onnx"
        return onnx_path(self.repository, graph)

    def run(self, graph: str, values: dict[str, np.ndarray]) -> list[np.ndarray]:
        if graph not in self.sessions:
            self.sessions[graph] = make_session(self.path(graph))
        if graph not in self.inputs:
            self.inputs[graph] = graph_io(self.contract, READS.get(graph, graph))[0]
        return self.sessions[graph].run(None, {n: values[n] for n in self.inputs[graph]})

    def state(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip((s.name for s in self.contract.state), self.run("user_encoder", values),
                        strict=True))


def draw(contract: SplitContract, length: int, n: int,
         rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One request of the declared features (client.traffic's generator, by feature role)."""
    return {k: np.asarray(v) for k, v in random_features(contract, length, n, rng).items()}


def timed(fns: dict[str, Callable[[], object]], repeats: int,
          max_seconds: float) -> dict[str, tuple[float, object]]:
    """Each function's median seconds over `repeats` rounds after a warm-up round, the functions
    taking turns in every round (a burst of other work on the shared machine hits all alike);
    one under WARM_S runs once more untimed right before its timed run (its caches warm, as
    when timed back to back); one slower than max_seconds in the warm-up is not repeated (that
    time is kept)."""
    first, times, results = {}, {name: [] for name in fns}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        results[name] = fn()
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, fn in fns.items():
            if first[name] <= max_seconds:
                if first[name] < WARM_S:
                    fn()
                start = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(times[name])) if times[name] else first[name], results[name])
            for name in fns}


def bytes_needed(run: Run, method: str, n: int, kept: int) -> int:
    """Estimated working set: dense [H, L+N, L+N] scores for the reference's single pass (the
    HSTU one is blocked: linear), N copies of K/V for replicated (a few live copies each), N
    naive candidates as measured by `calibrate`."""
    model = run.family.model
    if method == "naive":
        return int(run.naive_bytes * n * (kept + 1) ** 2)
    if not isinstance(model, ReferenceSplitModel):  # HSTU's single pass is blocked: linear
        return 0
    cfg = model.model.cfg
    if method == MFALCON:
        return 16 * cfg.num_heads * (kept + n) ** 2
    return 24 * n * (kept + 1) * cfg.d_model if method == REPLICATED_FUSION else 0


def calibrate(run: Run, config: Path, length: int = 1024) -> None:
    """The naive graph's bytes per candidate and (L+1)^2: its peak at one L, fresh process."""
    peak = _probe_process(graph="ranker_naive", n=1, length=length, config=config)["peak_mib"]
    kept = min(length, run.contract.max_history)
    run.naive_bytes = (peak or 0) * 2**20 / (kept + 1) ** 2 or 64.0  # else: 4 heads, 4 copies
    run.facts["naive bytes per candidate x (L+1)^2"] = f"{run.naive_bytes:.0f} (L={length})"


def naive_slice(run: Run, n: int, kept: int) -> tuple[int, str]:
    """Candidates per naive call (within naive_max_work and the budget), or 0 and why not."""
    work, tokens = run.family.plan.naive_max_work, (kept + 1) ** 2
    if tokens > work:
        return 0, f"one candidate is above naive_max_work={work} (its graph refuses)"
    if (one := bytes_needed(run, "naive", 1, kept)) > run.budget_bytes:
        return 0, f"one candidate needs ~{one / 2**30:.1f} GiB > budget"
    return max(1, min(n, work // tokens, run.budget_bytes // one)), ""


def measure_point(run: Run, request: dict[str, np.ndarray], n: int, length: int,
                  state: dict[str, np.ndarray]) -> None:
    values, kept, notes = {**request, **state}, min(length, run.contract.max_history), {}
    fns = {"user_encoder": lambda: run.state(values),
           "target_fusion": lambda: run.run("target_fusion", values)[0]}
    for peer in run.peers:
        if (need := bytes_needed(run, peer, n, kept)) > run.budget_bytes:
            notes[peer] = f"needs ~{need / 2**30:.1f} GiB > budget"
        else:
            fns[peer] = lambda p=peer: run.run(p, values)[0]
    out = timed(fns, run.repeats, run.max_seconds)
    ue_s, tf_s = out.pop("user_encoder")[0], out["target_fusion"][0]
    seconds = {"split": ue_s + tf_s, **{p: s + (ue_s if READS[p] == "target_fusion" else 0.0)
                                        for p, (s, _) in out.items() if p in READS}}
    scores = {"split": out.pop("target_fusion")[1], **{p: r for p, (_, r) in out.items()}}
    run.rows += [_row(length, n, "user_encoder", ue_s), _row(length, n, "target_fusion", tf_s)]
    per_call, notes["naive"] = naive_slice(run, n, kept)
    if per_call:  # the first per_call candidates are the same at every N: measured once
        part = {**request, **{f.name: request[f.name][:per_call]
                              for f in run.contract.candidate_features}}
        if (length, per_call) not in run.naive_runs:
            run.naive_runs[length, per_call] = timed(
                {"naive": lambda: run.run("ranker_naive", part)[0].copy()},
                max(1, run.repeats // 2), run.max_seconds / 4)["naive"]
            # (a copy: ORT's output array would keep the session's arena alive)
            del run.sessions["ranker_naive"]  # its arena, grown to the slice's size, freed
        naive_s, scores["naive"] = run.naive_runs[length, per_call]
        slices = math.ceil(n / per_call) if n else 1
        seconds["naive"] = naive_s * slices
        if slices > 1:
            notes["naive"] = f"{slices} slices of {per_call}: one measured, x{slices}"
    ref_name = "naive" if "naive" in scores else "split"
    for method in ("split", *run.peers, "naive"):
        if method not in seconds:
            run.rows.append(_row(length, n, method, None, "", notes[method]))
            continue
        ref = scores[ref_name]
        diff = float(np.abs(scores[method][: ref.shape[0]] - ref).max(initial=0.0))
        run.rows.append(_row(length, n, method, seconds[method],
                             f"{diff:.2e} vs {ref_name}" if method != ref_name else "oracle",
                             notes.get(method, "")))


def _row(length: int, n: int, method: str, seconds: float | None, exact: str = "",
         note: str = "") -> dict[str, object]:
    return {"L": length, "N": n, "method": LABELS.get(method, method),
            "p50_ms": None if seconds is None else round(seconds * 1e3, 3),
            "max_diff": exact, "note": note}


def measure_append(run: Run, history: dict[str, np.ndarray], length: int) -> None:
    """ΔL = APPEND_EVENTS new events onto L cached ones vs a full encode of L + ΔL events."""
    cached = list(run.state({k: v[:length] for k, v in history.items()}).values())
    feeds = {**run.contract.cached_reads(cached), **{k: v[length:] for k, v in history.items()}}
    out = timed({"append": lambda: run.run("user_encoder_append", feeds),
                 "full": lambda: run.run("user_encoder", history)}, run.repeats, run.max_seconds)
    (append_s, new), (full_s, full) = out["append"], out["full"]
    whole = appended(run.contract, cached, new)  # the cached state, then the new events'
    diff = max(float(np.abs(a - b).max(initial=0)) for a, b in zip(whole, full, strict=True))
    run.appends.append({"L": length, "new_events": APPEND_EVENTS,
                        "append_ms": round(append_s * 1e3, 3),
                        "full_encode_ms": round(full_s * 1e3, 3),
                        "full/append": round(full_s / append_s, 1),
                        "max_diff": f"{diff:.2e} vs full encode"})


def in_process(run: Run, lengths: list[int], ns: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    start = cpu.snapshot()
    for length in lengths:
        request = draw(run.contract, length + APPEND_EVENTS, max(ns), rng)
        history = {f.name: request[f.name] for f in run.contract.history_features}
        if run.contract.appendable and length + APPEND_EVENTS <= run.contract.max_history:
            run.progress(f"append L={length} + {APPEND_EVENTS}")
            measure_append(run, history, length)
        values = {**request, **{k: v[:length] for k, v in history.items()}}
        state = run.state(values)
        for n in ns:
            run.progress(f"in-process L={length} N={n}")
            sliced = {f.name: values[f.name][:n] for f in run.contract.candidate_features}
            measure_point(run, {**values, **sliced}, n, length, state)
    run.facts["others' CPU during the in-process timings (cores)"] = {
        k: round(v, 2) for k, v in cpu.external_cores(start).items()}


def probe(run: Run, graph: str, n: int, length: int) -> dict[str, object]:
    """One run of `graph` at (N, L) in this fresh process: its peak RSS above the RSS before
    (the kernel's high-water mark reset right before it, as benchmarks/memory.py does)."""
    import psutil

    from benchmarks.memory import peak_rss_bytes, reset_peak

    request = draw(run.contract, length, n, np.random.default_rng(0))
    values = {**request, **(run.state(request) if READS.get(graph, graph) == "target_fusion"
                            else {})}
    run.sessions[graph] = make_session(run.path(graph))
    if not reset_peak():
        raise SystemExit("cannot reset the peak RSS mark (/proc/self/clear_refs)")
    before = psutil.Process().memory_info().rss
    run.run(graph, values)
    return {"graph": graph, "N": n, "L": length,
            "peak_mib": round(((peak_rss_bytes() or 0) - before) / 2**20, 1)}


def _probe_process(graph: str, n: int, length: int, config: Path) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.long_history", "--config",
                           str(config), "--probe", graph, str(n), str(length)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if not proc.returncode else {
        "graph": graph, "N": n, "L": length, "peak_mib": None,
        "note": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}


def peak_memory(run: Run, points: list[tuple[str, int, int]], config: Path) -> None:
    for graph, n, length in points:
        run.progress(f"memory {graph} N={n} L={length}")
        run.memory.append(_probe_process(graph, n, length, config))


def through_triton(run: Run, lengths: list[int], ns: list[int], seed: int) -> None:
    import tritonclient.grpc as grpcclient

    from local_server.triton import free_port, start_server

    contract, rng = run.contract, np.random.default_rng(seed + 1)
    outputs = [grpcclient.InferRequestedOutput(o.name) for o in contract.outputs]

    def score(client, request: dict[str, np.ndarray]) -> np.ndarray:
        inputs = []
        for f in contract.features:
            inputs.append(grpcclient.InferInput(f.name, list(request[f.name].shape), f.dtype))
            inputs[-1].set_data_from_numpy(request[f.name])
        return client.infer("ranker", inputs, outputs=outputs, client_timeout=600).as_numpy(
            contract.outputs[0].name)

    run.progress("starting the local tritonserver on the long repository")
    server = start_server(grpc_port=free_port(), repository=run.repository, timeout_s=300)
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for length in lengths:
            for n in ns:
                request = draw(contract, length, n, rng)
                seconds = timed({"ranker": lambda r=request: score(client, r)}, run.repeats,
                                run.max_seconds)["ranker"][0]
                run.progress(f"ranker through Triton L={length} N={n}: {seconds * 1e3:.1f} ms")
                run.triton.append({"L": length, "N": n, "p50_ms": round(seconds * 1e3, 3)})
        # A history far longer than max_history is truncated to the newest events.
        long_req = draw(contract, 100_000, 50, rng)
        newest = {**long_req, **{f.name: long_req[f.name][-contract.max_history:]
                                 for f in contract.history_features}}
        diff = float(np.abs(score(client, long_req) - score(client, newest)).max())
        run.facts["L=100000 vs newest max_history events (ranker)"] = f"max diff {diff:.1e}"
    finally:
        server.stop()


def export_all(run: Run, config: Path) -> None:
    """The family's Triton repository pair (python -m export.family) and its peers."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "export.family", "--config", str(config),
                           "--output", str(run.repository)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"export failed: {proc.stderr[-2000:]}")
    run.facts["export_s"] = round(time.perf_counter() - start, 1)
    run.peers = export_peers(run.family.model, run.peers_dir)
    run.facts["peers"] = list(run.peers)
    run.facts["model_mib"] = {g: round(run.path(g).stat().st_size / 2**20, 1)
                              for g in (*graphs_for(run.contract), *run.peers)}


def report(run: Run, compare: list[Path]) -> str:
    """long_history.md (with `compare`: an earlier run's p50 beside this one's) and
    latency.png, from this run's rows."""
    import pandas as pd

    rows = pd.DataFrame(run.rows)
    p50 = rows.pivot_table(index=["L", "N"], columns="method", values="p50_ms", sort=False)
    methods = [m for m in (LABELS[p] for p in ("split", *run.peers, "naive")) if m in p50]
    rows["cell"] = [f"not run: {r.note}" if an.num(r.p50_ms) is None else an.fmt(r.p50_ms) + (
        f" [{'; '.join(t for t in (r.max_diff, r.note) if t)}]" if r.max_diff else "")
        for r in rows.itertuples()]
    cells = rows.pivot(index=["L", "N"], columns="method", values="cell")
    ratios = pd.DataFrame({f"{m} / split": p50[m] / p50["split"] for m in methods[1:]})
    info = run.facts["machine"]
    lines = [
        f"# Long user histories ({run.contract.family}): split vs peers vs naive", "",
        f"`python -m benchmarks.long_history --config {run.facts['config']}` on {info['date']}: "
        f"{info['cpu']}, {info['cores']} cores shared with other work (others' CPU use in the "
        f"facts), ONNX Runtime {info['onnxruntime']} on CPU, no GPU. Every figure is from this "
        "run, side by side on the same weights; each method's max |score difference| is "
        "against the naive oracle where it ran, else against the split.", "",
        "M-FALCON's single pass encodes the history once inside the pass, as the split does, "
        "so on one request the split saves only what the pass computes beyond that (HSTU: the "
        "last layer's history rows, which only the split knows it may skip, and a bias row per "
        "candidate; the reference model's dense pass: its [L+N, L+N] attention). The split's "
        "lead is reuse: a user state kept between requests takes new events by appending "
        "(below, where the family is appendable) instead of re-encoding.", "",
        "## In-process p50 (ms)", "",
        an.table(cells[["user_encoder", "target_fusion", *methods]].reset_index()), "",
        "## Ratios (p50 / split p50; > 1: the split is faster)", "",
        an.table(ratios.reset_index(), formats=dict.fromkeys(ratios.columns, "{:.2f}")), ""]
    sections = [
        (run.appends, f"Append: {APPEND_EVENTS} new events onto L cached (user_encoder_append) "
                      f"vs a full encode of L + {APPEND_EVENTS} events (user_encoder)"),
        (run.memory, "Peak memory of one run per graph (MiB above the RSS before it, fresh "
                     "process)"),
        (run.triton, "`ranker` through Triton (local tritonserver 2.51, gRPC, concurrency 1)")]
    for data, title in sections:
        lines += [f"## {title}", "", an.table(data), ""] if data else []
    if compare:  # p50 and p50 / split per run: the ratios compare across machines and loads
        def frame(df: pd.DataFrame, i: int) -> pd.DataFrame:
            df = df[["L", "N", "method", "p50_ms"]].dropna()
            df = df.merge(df[df.method == "split"][["L", "N", "p50_ms"]], on=["L", "N"],
                          suffixes=("", "_split"))
            return df.assign(**{f"p{i}": df.p50_ms, f"x{i}": df.p50_ms / df.p50_ms_split})[
                ["L", "N", "method", f"p{i}", f"x{i}"]]

        both = frame(rows, 0)
        for i, path in enumerate(compare, 1):
            both = both.merge(frame(an.read_csv(path), i), on=["L", "N", "method"])
        names = ["this run", *(f"({i})" for i in range(1, len(compare) + 1))]
        lines += ["## This run beside earlier ones", "", "Each method's p50 (ms) and its ratio to "
                  "the split's p50 in the same run: the ratios compare across machines and "
                  "loads, the times do not.", "", *(f"({i}) `{config_source(p)}`  " for i, p in
                                                    enumerate(compare, 1)), "",
                  an.table(both, {"L": "L", "N": "N", "method": "method",
                                  **{f"{n} {k}": f"{c}{i}" for i, n in enumerate(names)
                                     for k, c in (("ms", "p"), ("/ split", "x"))}},
                           {f"x{i}": "{:.2f}" for i in range(len(names))}), ""]
    lines += ["## Facts", "", *(f"- {k}: {v}" for k, v in run.facts.items() if k != "machine"),
              "", "## Machine", "", an.machine_table(info), "", "![latency](latency.png)", ""]
    ns = sorted(rows.N.unique())
    with an.figure(run.out / "latency.png", len(ns), (5 * len(ns), 4.5)) as axes:
        for ax, n in zip(axes, ns, strict=True):
            for method in methods:
                pts = p50.xs(n, level="N")[method].dropna()
                ax.plot(pts.index, pts.values, "o-", label=method)
            an.loglog(ax, "history length L", "p50 ms", f"{run.contract.family}, N = {n}")
    return "\n".join(lines)


def write(run: Run, compare: list[Path]) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("long_history.csv", run.rows), ("long_append.csv", run.appends),
                       ("long_memory.csv", run.memory), ("long_triton.csv", run.triton)):
        if rows:
            an.write_csv(run.out / name, rows)
    (run.out / "long_facts.json").write_text(json.dumps(run.facts, indent=2) + "\n")
    (run.out / "long_history.md").write_text(report(run, compare))
    run.progress(f"wrote {run.out}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_history",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_LONG,
                   help="a family's model config (reference or HSTU; default: %(default)s)")
    p.add_argument("--lengths", default="256,1024,2048,4096,8192,16384")
    p.add_argument("--ns", default="1,50,1000")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point")
    p.add_argument("--max-seconds", type=float, default=8.0,
                   help="a run slower than this is not repeated")
    p.add_argument("--budget-gib", type=float, default=6.0,
                   help="skip a method whose estimated working set exceeds this")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton measurements")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peaks")
    p.add_argument("--memory-lengths", default=None,
                   help="lengths of the fresh-process peaks (default: --lengths)")
    p.add_argument("--compare", type=Path, nargs="*", default=[],
                   help="earlier runs' long_history.csv: their p50 beside this run's")
    p.add_argument("--report-only", type=Path, default=None, metavar="DIR",
                   help="rewrite DIR's long_history.md and latency.png from its CSVs, no run")
    p.add_argument("--probe", nargs=3, metavar=("GRAPH", "N", "L"), default=None,
                   help="internal: one run of GRAPH in this process, its peak memory as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: build/bench/long_<timestamp>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        family = load_family(args.config)
    except FamilyError as e:
        raise SystemExit(str(e)) from None
    stem, build = args.config.stem, REPO_ROOT / "build" / "long"
    out = args.out or REPO_ROOT / "build" / "bench" / f"long_{time.strftime('%Y%m%d_%H%M%S')}"
    run = Run(family, build / stem, build / f"{stem}_peers", out.resolve(), Progress(),
              args.repeats, int(args.budget_gib * 2**30), args.max_seconds)
    if args.probe:
        graph, n, length = args.probe
        print(json.dumps(probe(run, graph, int(n), int(length))))
        return 0
    if args.report_only:
        run.out = args.report_only.resolve()
        run.facts = json.loads((run.out / "long_facts.json").read_text())
        run.peers = tuple(run.facts["peers"])
        run.rows, run.appends, run.memory, run.triton = (
            an.records(an.read_csv(run.out / f"long_{name}.csv"))
            if (run.out / f"long_{name}.csv").exists() else []
            for name in ("history", "append", "memory", "triton"))
        write(run, args.compare)
        return 0
    lengths = [int(v) for v in args.lengths.split(",")]
    ns = [int(v) for v in args.ns.split(",")]
    run.progress(f"exporting {args.config} (and the peers) into {run.repository}")
    export_all(run, args.config)
    run.facts["config"] = config_source(args.config)
    run.facts["machine"] = an.machine(tritonserver="2.51 (nvidia-pytriton 0.7.0)", gpu="none")
    calibrate(run, args.config)
    in_process(run, lengths, ns, args.seed)
    if not args.no_memory:
        mem = [int(v) for v in (args.memory_lengths or args.lengths).split(",")]
        points = [(g, 1, length) for length in mem for g in ("user_encoder", "ranker_naive")
                  if not naive_slice(run, 1, length)[1] or g != "ranker_naive"]
        points += [(g, n, length) for length in mem for n in ns
                   for g in ("target_fusion", *run.peers)
                   if bytes_needed(run, g, n, length) <= run.budget_bytes]
        peak_memory(run, points, args.config)
    if not args.no_triton:
        through_triton(run, lengths, ns, args.seed)
    write(run, args.compare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
