"""`python -m export.check`: is a model family's split exact? A conformance check users run on
their own model before serving it.

It loads the family its config names (export/family.py), exports its graphs into a temporary
folder, and fuzzes requests built from the declaration (export/split_fuzz.py) over a grid of
history lengths L and candidate counts N with the edge cases (L = 0, N = 0, N = 1, L past
max_history, int64 extremes as ids). For every case it compares, against the torch naive
forward (the oracle):

* the torch split (encode_user, then score_candidates),
* the ONNX split (user_encoder, then target_fusion: what the `ranker` ensemble serves),
* the ONNX naive graph (`ranker_naive`; not in --quick),

and, past max_history, the split against the split of the newest max_history events (what the
declaration promises). Where the naive forward would exceed --naive-budget attention cells
(N x (L'+1)^2), the ONNX split is compared with the torch split instead. An appendable family's
append (encode_append, user_encoder_append) is checked in its declared form over splits of a
history into P cached + ΔL new events: it reads what `append_reads` says of the cached state and
returns the new events' part of each state tensor with an "L" dim (exactly ΔL along L) and the
new value of the others; the cached part followed by the new part, as the user cache joins them,
must equal a full encode. The append past max_history must be refused. Every graph
must refuse a request where one feature of an axis has length 1 and the others not (what would
otherwise broadcast into misaligned scores), more candidates than max_candidates, ranker_naive
more work than naive_max_work, and name the guard's rule. Shapes must be the declared ones, and
each graph must meet the native onnxruntime backend's load-time rules against the Triton config
derived from the declaration. `--provider`, `--target gpu` and `--fp16` check the graphs a GPU
serves (scripts/gpu_check.sh): on that execution provider, the fp16 copy against the fp32 model.

One table row per comparison, printed as it is computed; exit 1 if any row fails, 2 if the
config or the declaration is refused (a `full` history mask is, with the reason).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.family import Family, FamilyError, describe, load_family
from export.guards import append_rule, length_rule, limit_rule, naive_rule
from export.native_rules import check_model
from export.runtime import PROVIDERS
from export.split_contract import ServingPlan, SplitContract, half_state
from export.split_export import export_all, graph_io, graphs_for, native_model_config
from export.split_fuzz import SplitGraphs, appended, history_slice, max_diff, random_request

DEFAULT_TOLERANCE = 1e-5
FULL_LENGTHS = (0, 1, 2, 7, 64, 257)  # plus max_history and max_history + 5
QUICK_LENGTHS = (0, 1, 7)  # plus max_history + 2
FULL_CANDIDATES = (0, 1, 2, 17, 100)
QUICK_CANDIDATES = (0, 1, 3)
FULL_MAX_LENGTH = 4096
QUICK_MAX_LENGTH = 1100
# attention cells N x (L'+1)^2 of one naive forward, per layer and head (quick: N = 1 past
# max_history 1024, larger N there against the torch split)
NAIVE_BUDGET = 2**22
QUICK_NAIVE_BUDGET = 2**21
BROADCAST_LENGTH = 5


@dataclass(frozen=True)
class Plan:
    lengths: tuple[int, ...]
    candidates: tuple[int, ...]
    appends: tuple[tuple[int, int], ...]
    naive_graph: bool
    naive_budget: int
    notes: tuple[str, ...]


def plan(contract: SplitContract, limits: ServingPlan, quick: bool,
         lengths: Sequence[int] | None, candidates: Sequence[int] | None,
         max_length: int | None, naive_budget: int) -> Plan:
    """The grid: the given one, else the default (full or quick) with the edge cases; lengths
    capped at `max_length`, candidate counts at max_candidates (a note says what was left
    out)."""
    m = contract.max_history
    cap = max_length or (QUICK_MAX_LENGTH if quick else FULL_MAX_LENGTH)
    wanted = set(lengths or ([*QUICK_LENGTHS, m + 2] if quick else [*FULL_LENGTHS, m, m + 5]))
    counts = set(candidates or (QUICK_CANDIDATES if quick else FULL_CANDIDATES))
    notes = []
    if any(x > cap for x in wanted):
        notes.append(f"lengths {sorted(x for x in wanted if x > cap)} not run: above "
                     f"--max-length {cap} (max_history is {m}; raise --max-length to cover them)")
    if any(n > limits.max_candidates for n in counts):
        notes.append(f"candidate counts {sorted(n for n in counts if n > limits.max_candidates)} "
                     f"not run: above max_candidates={limits.max_candidates}")
    appends: list[tuple[int, int]] = []
    if contract.appendable:
        pairs = ([(0, 1), (3, 4)] if quick else
                 [(0, 0), (0, 1), (0, 7), (1, 0), (5, 3), (m // 2, m - m // 2), (m - 1, 1),
                  (m, 0)])
        appends = sorted({(p, d) for p, d in pairs if p >= 0 and p + d <= cap})
    return Plan(tuple(sorted(x for x in wanted if x <= cap)),
                tuple(sorted(n for n in counts if n <= limits.max_candidates)), tuple(appends),
                not quick, naive_budget, tuple(notes))


@dataclass
class Row:
    case: str
    path: str
    reference: str
    diff: float | None  # None: a refusal row
    verdict: str

    @property
    def failed(self) -> bool:
        return not self.verdict.startswith(("pass", "refused"))


class Table:
    """Rows printed as they come (the progress), failures counted."""

    WIDTHS = (38, 20, 26, 10, 9)

    def __init__(self, tolerance: float, out: Callable[[str], None]) -> None:
        self.tolerance, self.out, self.rows = tolerance, out, []
        header = ("case", "path", "against", "max |diff|", "tolerance", "verdict")
        self.out(self._line(header))
        self.out(self._line([*("-" * w for w in self.WIDTHS), "-" * 7]))

    def _line(self, cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, (*self.WIDTHS, 0), strict=True))

    def add(self, row: Row) -> None:
        self.rows.append(row)
        diff = "-" if row.diff is None else f"{row.diff:.2e}"
        tol = "-" if row.diff is None else f"{self.tolerance:.0e}"
        self.out(self._line((row.case, row.path, row.reference, diff, tol, row.verdict)))

    def compare(self, case: str, path: str, reference: str, get: Callable[[], float]) -> None:
        """A numeric row: `get` returns the max abs diff, or raises (shape, refusal...)."""
        try:
            diff = get()
        except Exception as e:  # the check reports a crash as a failed row and goes on
            self.add(Row(case, path, reference, None, f"FAIL: {_short(e)}"))
            return
        ok = diff <= self.tolerance  # NaN fails
        self.add(Row(case, path, reference, diff, "pass" if ok else "FAIL"))

    @property
    def failures(self) -> int:
        return sum(r.failed for r in self.rows)


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit] + "..."


def _check_state(contract: SplitContract, length: int, state: Sequence) -> None:
    """The declared state shapes, L' = min(L, max_history)."""
    kept = min(length, contract.max_history)
    for spec, tensor in zip(contract.state, state, strict=True):
        want = tuple(kept if d == "L" else d for d in spec.dims)
        if tuple(tensor.shape) != want:
            raise ValueError(f"state {spec.name} has shape {tuple(tensor.shape)}, declared {want}")


def _check_scores(contract: SplitContract, n: int, scores: np.ndarray) -> None:
    """The declared output shape (N, ...)."""
    want = (n, *contract.outputs[0].dims[1:])
    if tuple(scores.shape) != want:
        raise ValueError(f"{contract.outputs[0].name} has shape {tuple(scores.shape)}, "
                         f"declared {want}")


class Checker:
    """The comparisons of one family against its exported graphs."""

    def __init__(self, family: Family, graphs: SplitGraphs, table: Table, seed: int) -> None:
        self.model, self.contract = family.model, family.contract
        self.max_candidates = family.plan.max_candidates
        self.naive_max_work = family.plan.naive_max_work
        self.graphs, self.table, self.seed = graphs, table, seed

    def _request(self, length: int, n: int) -> dict[str, np.ndarray]:
        return random_request(self.contract, np.random.default_rng([self.seed, length, n]),
                              length, n)

    def _torch(self, method: str, *args: np.ndarray | torch.Tensor):
        with torch.no_grad():
            out = getattr(self.model, method)(*(torch.as_tensor(a) for a in args))
        if isinstance(out, tuple | list):
            return [t.numpy() for t in out]
        return out.numpy()

    def torch_state(self, request: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._torch("encode_user", *(request[f.name] for f in
                                            self.contract.history_features))

    def torch_scores(self, request: dict[str, np.ndarray],
                     state: Sequence[np.ndarray]) -> np.ndarray:
        c = self.contract
        return self._torch("score_candidates", *(request[f.name] for f in
                                                 (*c.candidate_features, *c.request_features)),
                           *state)

    def onnx_scores(self, request: dict[str, np.ndarray],
                    state: Sequence[np.ndarray]) -> np.ndarray:
        return self.graphs.run("target_fusion", {**request, **self.graphs.named_state(state)})[0]

    def torch_naive(self, request: dict[str, np.ndarray]) -> np.ndarray:
        return self._torch("forward", *(request[f.name] for f in self.contract.features))

    def length(self, length: int, counts: Sequence[int], naive_budget: int,
               naive_graph: bool) -> None:
        """Every candidate count at one history length: the user state is encoded once (torch
        and ONNX), as the split serves it; each count takes the first n candidates."""
        c, table = self.contract, self.table
        request = self._request(length, max(counts))
        try:
            state = self.torch_state(request)
            _check_state(c, length, state)
            onnx_state = self.graphs.state(request)
            _check_state(c, length, onnx_state)
            newest = None
            if length > c.max_history:
                newest = self.graphs.state(history_slice(c, request,
                                                         slice(-c.max_history, None)))
        except Exception as e:
            table.add(Row(f"L={length}", "encode_user", "declared state", None,
                          f"FAIL: {_short(e)}"))
            return
        for n in counts:
            part = {**request, **{f.name: request[f.name][:n] for f in c.candidate_features}}
            self.scores(f"L={length} N={n}", part, n, state, onnx_state, newest,
                        n * (min(length, c.max_history) + 1) ** 2 <= naive_budget, naive_graph)

    def scores(self, name: str, request: dict[str, np.ndarray], n: int, state: Sequence,
               onnx_state: Sequence, newest: Sequence | None, naive_affordable: bool,
               naive_graph: bool) -> None:
        table = self.table
        try:
            torch_scores = self.torch_scores(request, state)
            _check_scores(self.contract, n, torch_scores)
            onnx_scores = self.onnx_scores(request, onnx_state)
            _check_scores(self.contract, n, onnx_scores)
        except Exception as e:
            table.add(Row(name, "split", "declared shapes", None, f"FAIL: {_short(e)}"))
            return
        if naive_affordable:
            oracle = self.torch_naive(request)
            table.compare(name, "torch split", "torch naive",
                          lambda: max_diff(torch_scores, oracle))
            table.compare(name, "onnx split", "torch naive",
                          lambda: max_diff(onnx_scores, oracle))
            if naive_graph:
                table.compare(name, "onnx naive", "torch naive",
                              lambda: max_diff(self.graphs.naive(request), oracle))
        else:
            table.compare(name, "onnx split", "torch split (no naive)",
                          lambda: max_diff(onnx_scores, torch_scores))
        if newest is not None:
            table.compare(name, "onnx split", "split, newest max_history",
                          lambda: max_diff(onnx_scores, self.onnx_scores(request, newest)))

    def append(self, cached: int, new: int) -> None:
        """A history split into `cached` events, encoded whole, and `new` ones appended in the
        declared form: encode_append reads what `append_reads` says of the cached state and
        returns each growing tensor's new part (exactly `new` events along L) and the others'
        new value; the cached part + the new part (as the user cache concatenates them) must
        equal encode_user on the whole history."""
        c, table = self.contract, self.table
        name = f"append P={cached} dL={new}"
        request = self._request(cached + new, 1)
        prefix = history_slice(c, request, slice(0, cached))
        new_events = history_slice(c, request, slice(cached, None))
        try:
            full = self.torch_state(request)
        except Exception as e:
            table.add(Row(name, "encode_user", "declared state", None, f"FAIL: {_short(e)}"))
            return

        def state_diff(cached_state: Sequence[np.ndarray], part: Sequence[np.ndarray]) -> float:
            for s, x in zip(c.state, part, strict=True):
                if s.grows and x.shape[s.dims.index("L")] != new:
                    raise ValueError(f"{s.new_name} has {x.shape[s.dims.index('L')]} events "
                                     f"along L, not the {new} new ones")
            whole = appended(c, cached_state, part)
            return max(max_diff(a, b) for a, b in zip(whole, full, strict=True))

        def torch_append() -> float:
            cached_state = self.torch_state(prefix)
            reads = c.cached_reads(cached_state).values()
            return state_diff(cached_state, self._torch(
                "encode_append", *reads, *(new_events[f.name] for f in c.history_features)))

        def onnx_append() -> float:
            cached_state = self.graphs.state(prefix)
            return state_diff(cached_state, self.graphs.append(cached_state, new_events))

        table.compare(name, "torch append", "torch encode_user", torch_append)
        table.compare(name, "onnx append", "torch encode_user", onnx_append)

    def native_rules(self, graphs: Sequence[str], fp16: bool) -> None:
        """Each graph against the Triton config derived from the declaration, with the native
        onnxruntime backend's load-time rules (names, dtypes, ranks, fixed dims)."""
        dtypes = half_state(self.contract) if fp16 else None
        for graph in graphs:
            path = self.graphs.directory / graph / "1" / "model.onnx"
            try:
                found = check_model(native_model_config(self.contract, graph,
                                                        state_dtypes=dtypes), path)
            except Exception as e:
                found = [_short(e)]
            verdict = "pass" if not found else f"FAIL: {'; '.join(found)}"
            self.table.add(Row("config vs graph", graph, "native backend rules", None, verdict))

    def refusals(self, graphs: Sequence[str]) -> None:
        """Length-1 broadcasts, N > max_candidates, the naive graph's work bound and the append
        past max_history: each graph must refuse, naming the guard's rule."""
        c = self.contract
        for symbol, features in (("L", c.history_features), ("N", c.candidate_features)):
            if len(features) < 2:
                continue
            rule = length_rule([f.name for f in features], symbol)
            request = self._request(BROADCAST_LENGTH, BROADCAST_LENGTH)
            last = features[-1].name
            case = f"{last} length 1, {symbol}={BROADCAST_LENGTH}"
            try:
                state = self.graphs.named_state(self.graphs.state(request))
            except Exception as e:
                self.table.add(Row(case, "user_encoder", "a valid request first", None,
                                   f"FAIL: {_short(e)}"))
                continue
            feeds = {**request, last: request[last][:1], **state}
            for graph in graphs:
                if graph == "user_encoder_append":
                    continue
                if any(f.name in graph_io(c, graph)[0] for f in features):
                    self._refused(case, graph, feeds, rule)
        limit = self.max_candidates + 1
        request = self._request(BROADCAST_LENGTH, limit)
        try:
            state = self.graphs.named_state(self.graphs.state(request))
        except Exception as e:
            self.table.add(Row(f"N={limit}", "user_encoder", "a valid request first", None,
                               f"FAIL: {_short(e)}"))
        else:
            self._refused(f"N={limit} > max_candidates", "target_fusion", {**request, **state},
                          limit_rule(self.max_candidates))
        n = self.naive_max_work // (c.max_history + 1) ** 2 + 1
        if "ranker_naive" in graphs and n <= self.max_candidates:  # else no N reaches the bound
            self._refused(f"N={n} L={c.max_history} > naive_max_work", "ranker_naive",
                          self._request(c.max_history, n), naive_rule(self.naive_max_work))
        if c.appendable and "user_encoder_append" in graphs:
            request = self._request(c.max_history, 1)
            try:
                cached = self.graphs.state(history_slice(c, request, slice(0, 1)))
            except Exception as e:
                self.table.add(Row("append P=1", "user_encoder", "a valid request first", None,
                                   f"FAIL: {_short(e)}"))
                return
            feeds = {**c.cached_reads(cached), **history_slice(c, request, slice(None))}
            self._refused(f"append P=1 dL={c.max_history}", "user_encoder_append", feeds,
                          append_rule(c.max_history))

    def _refused(self, case: str, graph: str, feeds: dict[str, np.ndarray], rule: str) -> None:
        try:
            self.graphs.run(graph, feeds)
        except Exception as e:
            verdict = ("refused (ok)" if rule in str(e) else
                       f"FAIL: refused without naming the rule: {_short(e)}")
        else:
            verdict = "FAIL: accepted"
        self.table.add(Row(case, graph, "must refuse", None, verdict))


def run_check(family: Family, p: Plan, tolerance: float, seed: int,
              out: Callable[[str], None] = print, provider: str = "cpu", target: str = "cpu",
              fp16: bool = False, output: Path | None = None) -> int:
    """Export (the `target`'s graphs, fp16 ones from the model's fp16 copy) into `output` or a
    temporary folder, run every comparison on `provider`; the number of failed rows."""
    c = family.contract
    graphs = tuple(g for g in graphs_for(c) if p.naive_graph or g != "ranker_naive")
    model = copy.deepcopy(family.model).half() if fp16 else family.model
    with tempfile.TemporaryDirectory(prefix="export_check_") as tmp:
        folder = output or Path(tmp)
        t0 = time.perf_counter()
        out(f"exporting {', '.join(graphs)} (target {target}{', fp16' if fp16 else ''}) into "
            f"{folder if output else 'a temporary folder'}")
        export_all(model, folder, max_candidates=family.plan.max_candidates,
                   naive_max_work=family.plan.naive_max_work, graphs=graphs, target=target)
        out(f"exported in {time.perf_counter() - t0:.1f} s; L in {list(p.lengths)}, N in "
            f"{list(p.candidates)}; ids include the int64 extremes")
        for note in p.notes:
            out(f"note: {note}")
        table = Table(tolerance, out)
        checker = Checker(family, SplitGraphs(c, folder, graphs, provider), table, seed)
        active = checker.graphs.sessions[graphs[0]].get_providers()  # ORT falls back silently
        table.add(Row("execution provider", graphs[0], provider, None, "pass" if active[0] ==
                      PROVIDERS[provider][0] else f"FAIL: ONNX Runtime runs it on {active}"))
        for length in p.lengths:
            # which case runs, in case a graph kills the process (ONNX Runtime can)
            print(f"export.check: running L={length}", file=sys.stderr, flush=True)
            checker.length(length, p.candidates, p.naive_budget, p.naive_graph)
        if p.appends:
            print("export.check: running the appends", file=sys.stderr, flush=True)
        for cached, new in p.appends:
            checker.append(cached, new)
        print("export.check: running the refusals", file=sys.stderr, flush=True)
        checker.refusals(graphs)
        checker.native_rules(graphs, fp16)
    out(f"{len(table.rows)} rows, {table.failures} failed (tolerance {tolerance:g}) in "
        f"{time.perf_counter() - t0:.1f} s")
    return table.failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.check",
        description="Conformance check of a split model family: naive vs split vs append "
                    "(where declared) over grids of history lengths L and candidate counts N with "
                    "the edge cases, in torch and in ONNX Runtime on the exported graphs (exported "
                    "into a temporary folder). Prints one row per comparison; exits 1 when any "
                    "difference is above the tolerance, 2 when the config or its declaration is "
                    "refused (e.g. a `full` history mask).")
    p.add_argument("--config", type=Path, required=True,
                   help='family config JSON ("model": "package.module:factory"; none: the '
                        "reference model)")
    p.add_argument("--checkpoint", default=None, help="checkpoint passed to the factory")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="max abs difference allowed (default: %(default)g)")
    p.add_argument("--quick", action="store_true",
                   help=f"small grid (L in {list(QUICK_LENGTHS)} + max_history+2, N in "
                        f"{list(QUICK_CANDIDATES)}, appends of a few events), the split graphs "
                        "only (no ranker_naive): what CI runs on every shipped config")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="history lengths to run instead of the default grid")
    p.add_argument("--candidates", type=int, nargs="+", default=None,
                   help="candidate counts to run instead of the default grid")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"longest history run (default: {FULL_MAX_LENGTH}, quick "
                        f"{QUICK_MAX_LENGTH}); longer ones are left out with a note")
    p.add_argument("--naive-budget", type=int, default=None,
                   help="attention cells N x (L'+1)^2 above which the torch naive forward is not "
                        "run (the ONNX split is then compared with the torch split) (default: "
                        f"{NAIVE_BUDGET}, quick {QUICK_NAIVE_BUDGET})")
    p.add_argument("--seed", type=int, default=0, help="request seed (default: %(default)s)")
    p.add_argument("--provider", choices=PROVIDERS, default="cpu",
                   help="ONNX Runtime execution provider to run the graphs on; one it falls back "
                        "from fails (default: %(default)s)")
    p.add_argument("--target", choices=("cpu", "gpu"), default="cpu",
                   help="export target, as `python -m export --target` (default: %(default)s)")
    p.add_argument("--fp16", action="store_true",
                   help="export the fp16 copy (against the fp32 torch model: raise --tolerance)")
    p.add_argument("--output", type=Path, default=None,
                   help="export into this folder and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    if args.tolerance <= 0 or any(x < 0 for x in (*(args.lengths or ()),
                                                  *(args.candidates or ()))):
        p.error("--tolerance must be positive, --lengths and --candidates non-negative")
    try:
        family = load_family(args.config, args.checkpoint)
    except FamilyError as e:
        print(f"export.check: refused: {e}", file=sys.stderr)
        return 2
    print(describe(family), flush=True)
    # ONNX Runtime logs every refused request on stderr; the table reports them instead.
    ort.set_default_logger_severity(4)
    grid = plan(family.contract, family.plan, args.quick, args.lengths, args.candidates,
                args.max_length,
                args.naive_budget or (QUICK_NAIVE_BUDGET if args.quick else NAIVE_BUDGET))
    failures = run_check(family, grid, args.tolerance, args.seed,
                         lambda line: print(line, flush=True), args.provider, args.target,
                         args.fp16, args.output)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
