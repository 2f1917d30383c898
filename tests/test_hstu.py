"""The HSTU family and the split contract: split == naive and append == full encode (torch and
ONNX Runtime) over an L x N grid with the edge cases; the declaration checker refuses what it
cannot serve; user_encoder's memory stays linear in L."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from export.config import CONFIG_DIR, ModelConfig
from export.guards import append_rule, length_rule
from export.hstu import HSTUConfig, HSTUConfigError, build_hstu, hstu_contract
from export.hstu_attention import time_bucket
from export.hstu_export import export_hstu
from export.model import build_model
from export.native_rules import check_model
from export.runtime import make_session
from export.split_contract import (
    CANDIDATES,
    HISTORY,
    REQUEST,
    ContractError,
    Feature,
    Output,
    ReferenceSplitModel,
    SplitModel,
    StateTensor,
    check_contract,
    naive_scores,
    reference_contract,
    split_scores,
)
from export.split_export import (
    GRAPHS,
    export_all,
    graph_io,
    graph_specs,
    native_model_config,
)
from export.split_fuzz import SplitGraphs, appended, as_torch, max_diff
from export.split_fuzz import random_request as fuzz_request
from tests.conftest import SMALL
from tests.conftest import random_request as reference_request

REPO_ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5
# Three layers (two attend, the last computes only K/V), blocks of 64 query rows: a 300-event
# history runs 5 blocks, 1000 candidates 16.
CFG = HSTUConfig(d_model=32, num_heads=2, num_layers=3, attention_dim=8, hidden_dim=8,
                 max_history=300, item_buckets=1009, action_buckets=7, position_buckets=64,
                 time_buckets=20, head_hidden=16, attention_block=64, seed=3)
LENGTHS = [0, 1, 7, 65, 300, 341]  # 341: past max_history (the newest 300 kept)
CANDIDATE_COUNTS = [0, 1, 17]


CONTRACT = hstu_contract(CFG)


def random_request(rng: np.random.Generator, length: int, n: int,
                   gaps: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """HSTU request tensors from its declaration (export/split_fuzz.py): the client's traffic
    by role, extreme int64 ids, non-decreasing timestamps (from `gaps` when given)."""
    return fuzz_request(CONTRACT, rng, length, n, gaps)


@pytest.fixture(scope="module")
def hstu(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    model = build_hstu(CFG)
    directory = tmp_path_factory.mktemp("hstu")
    export_hstu(model, directory)
    return model, SplitGraphs(model.contract(), directory, GRAPHS)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("n", CANDIDATE_COUNTS)
def test_split_equals_naive(hstu, length: int, n: int) -> None:
    model, graphs = hstu
    request = random_request(np.random.default_rng(1000 * length + n), length, n)
    with torch.no_grad():
        oracle = naive_scores(model, as_torch(request)).numpy()
        torch_split = split_scores(model, as_torch(request)).numpy()
    assert oracle.shape == (n, CFG.num_tasks) and np.isfinite(oracle).all()
    for name, scores in (("torch split", torch_split), ("onnx split", graphs.split(request)),
                         ("onnx naive", graphs.naive(request))):
        diff = max_diff(scores, oracle)
        assert diff <= TOLERANCE, f"{name} differs from the torch naive oracle by {diff:.2e}"


def test_many_candidates_in_blocks(hstu) -> None:
    """1000 candidates run as 16 blocks of the candidate Loop; each scored as if alone."""
    model, graphs = hstu
    request = random_request(np.random.default_rng(3), 40, 1000)
    together = graphs.split(request)
    with torch.no_grad():
        oracle = naive_scores(model, as_torch(request)).numpy()
    assert max_diff(together, oracle) <= TOLERANCE
    for i in (0, 517, 999):
        alone = {**request, "candidate_item_ids": request["candidate_item_ids"][i:i + 1]}
        assert max_diff(graphs.split(alone), together[i:i + 1]) <= 1e-6


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The small causal reference model exported through its declaration (all four graphs)."""
    model = ReferenceSplitModel(build_model(ModelConfig(**{**SMALL, "mask": "causal"})))
    directory = tmp_path_factory.mktemp("reference")
    export_all(model, directory, max_candidates=500, naive_max_work=2**24)
    return model, SplitGraphs(model.contract(), directory, GRAPHS)


APPEND_CASES = [(0, 0), (0, 1), (0, 37), (1, 0), (12, 7), (64, 65), (200, 100), (299, 1),
                (300, 0)]


@pytest.mark.parametrize("family", ["hstu", "reference"])
@pytest.mark.parametrize(("cached", "new"), APPEND_CASES)
def test_append_equals_full_encode(request, family: str, cached: int, new: int) -> None:
    """The declared append form for both families: encode_append reads what `append_reads`
    says of the cached state and returns the new events' part of each growing state tensor (and
    the new value of the others); cached part + new part == encode_user on the whole history,
    in torch and in ONNX Runtime, and the returned part has exactly ΔL events."""
    model, graphs = request.getfixturevalue(family)
    contract = graphs.contract
    rng = np.random.default_rng(cached * 1000 + new)
    req = fuzz_request(contract, rng, cached + new, 1)  # one generator for both families
    history = [f.name for f in contract.history_features]
    full = graphs.run("user_encoder", req)
    prefix = graphs.run("user_encoder", {h: req[h][:cached] for h in history})
    new_part = graphs.append(prefix, {h: req[h][cached:] for h in history})
    with torch.no_grad():
        t = as_torch(req)
        torch_full = [x.numpy() for x in model.encode_user(*(t[h] for h in history))]
        torch_prefix = model.encode_user(*(t[h][:cached] for h in history))
        torch_new = [x.numpy() for x in model.encode_append(
            *contract.cached_reads(torch_prefix).values(), *(t[h][cached:] for h in history))]
    for part in (new_part, torch_new):
        for s, x in zip(contract.state, part, strict=True):
            if s.grows:
                assert x.shape[s.dims.index("L")] == new, s.new_name
    for state, onnx_full, onnx_app, t_full, t_app in zip(
            contract.state, full, appended(contract, prefix, new_part), torch_full,
            appended(contract, [x.numpy() for x in torch_prefix], torch_new), strict=True):
        assert max_diff(onnx_app, onnx_full) <= TOLERANCE, f"onnx {state.name}"
        assert max_diff(t_app, t_full) <= TOLERANCE, f"torch {state.name}"
        assert max_diff(onnx_full, t_full) <= TOLERANCE, f"onnx vs torch {state.name}"


def test_time_buckets_agree_at_powers_of_two(hstu) -> None:
    """Gaps of exactly 2^k and 2^k +- 1 seconds, where a log2 rounding would flip a bucket:
    torch and ONNX Runtime give the same K/V; the bucket is the integer floor(log2) + 1."""
    d = torch.tensor([0, 1, 2, 3, *(v for k in range(2, 30) for v in (2**k - 1, 2**k, 2**k + 1))],
                     dtype=torch.int64)
    buckets = 31
    expected = [min(int(x), 2 ** (buckets - 2)).bit_length() for x in d]
    assert time_bucket(d.double(), buckets).long().tolist() == expected
    assert time_bucket(-d.double(), buckets).long().tolist() == expected
    model, graphs = hstu
    gaps = [v for k in range(0, 23) for v in (2**k - 1, 2**k, 2**k + 1)]
    request = random_request(np.random.default_rng(9), 250, 3, gaps=gaps)
    history = [f.name for f in graphs.contract.history_features]
    with torch.no_grad():
        torch_state = model.encode_user(*(as_torch(request)[h] for h in history))
    for onnx_t, torch_t in zip(graphs.run("user_encoder", request), torch_state, strict=True):
        assert max_diff(onnx_t, torch_t.numpy()) <= TOLERANCE


def test_graphs_meet_the_native_backend_rules(hstu) -> None:
    """Configs derived from the declaration load on Triton's native onnxruntime backend: its
    config-vs-graph rules (export/native_rules.py) hold for all four graphs."""
    model, graphs = hstu
    for graph in GRAPHS:
        config = native_model_config(model.contract(), graph)
        assert check_model(config, graphs.directory / graph / "1" / "model.onnx") == [], graph


# ----------------------------------------------------------------------------- semantics
def test_history_past_max_keeps_newest(hstu) -> None:
    _, graphs = hstu
    request = random_request(np.random.default_rng(5), CFG.max_history + 40, 9)
    newest = {k: (v[-CFG.max_history:] if k.startswith("history_") else v)
              for k, v in request.items()}
    np.testing.assert_array_equal(graphs.split(request), graphs.split(newest))
    np.testing.assert_array_equal(graphs.naive(request), graphs.naive(newest))


def test_scores_depend_on_history_time_and_dwell(hstu) -> None:
    """The exactness tests have something to catch: the history, its timestamps (the time
    bias) and its dwell times all move the scores; non-finite dwell counts as 0."""
    _, graphs = hstu
    request = random_request(np.random.default_rng(6), 80, 5)
    base = graphs.split(request)
    for name, change in (("history_item_ids", lambda a: a[::-1].copy()),
                         ("history_timestamps", lambda a: a - np.arange(len(a)) * 977),
                         ("history_dwell_seconds", lambda a: a * 4.0)):
        changed = {**request, name: change(request[name])}
        assert max_diff(graphs.split(changed), base) > 1e-3, name
    dwell = request["history_dwell_seconds"].copy()
    dwell[:3] = (np.nan, np.inf, -5.0)
    zeroed = dwell.copy()
    zeroed[:3] = 0.0
    np.testing.assert_array_equal(graphs.split({**request, "history_dwell_seconds": dwell}),
                                  graphs.split({**request, "history_dwell_seconds": zeroed}))


def test_bad_inputs_are_refused(hstu) -> None:
    model, graphs = hstu
    request = random_request(np.random.default_rng(7), 20, 3)
    short = {**request, "history_dwell_seconds": request["history_dwell_seconds"][:1]}
    names = [f.name for f in graphs.contract.history_features]
    for graph in ("user_encoder", "ranker_naive"):
        with pytest.raises(Exception, match="running Reshape node") as info:
            graphs.run(graph, short)
        assert length_rule(names, "L") in str(info.value)
    with pytest.raises(RuntimeError), torch.no_grad():  # torch: the stack refuses, no broadcast
        model.encode_user(*(as_torch(short)[h] for h in names))
    prefix = graphs.run("user_encoder", {h: request[h][:10] for h in names})
    big = random_request(np.random.default_rng(8), CFG.max_history, 1)
    with pytest.raises(Exception, match="running Reshape node") as info:
        graphs.run("user_encoder_append", {**graphs.contract.cached_reads(prefix),
                                           **{h: big[h] for h in names}})
    assert append_rule(CFG.max_history) in str(info.value)
    with pytest.raises(ValueError, match="exceed max_history"), torch.no_grad():
        model.encode_append(*(torch.from_numpy(p) for p in
                              graphs.contract.cached_reads(prefix).values()),
                            *(as_torch(big)[h] for h in names))
    assert graphs.split(request).shape == (3, CFG.num_tasks)  # the next request is served


# ----------------------------------------------------------------------------- declarations
def test_both_families_declare_a_valid_contract() -> None:
    hstu_c = check_contract(hstu_contract(CFG))
    assert isinstance(build_hstu(CFG), SplitModel)
    assert [s.name for s in hstu_c.state] == ["user_k", "user_v", "user_timestamps"]
    assert hstu_c.fusion_inputs == ("candidate_item_ids", "request_timestamp", "user_k",
                                    "user_v", "user_timestamps")
    assert hstu_c.appendable and {f.name for f in hstu_c.event_features} == {
        f.name for f in hstu_c.history_features}
    assert hstu_c.append_inputs[:3] == ("cached_user_k", "cached_user_v",
                                        "cached_user_timestamps")
    assert hstu_c.append_outputs == ("new_user_k", "new_user_v", "new_user_timestamps")
    ref = check_contract(reference_contract(ModelConfig(**{**SMALL, "mask": "causal"})))
    assert ref.appendable and [s.name for s in ref.state] == ["user_kv", "last_event_timestamp"]
    assert [s.append_reads for s in ref.state] == ["all_but_last", "all"]
    assert ref.append_outputs == ("new_user_kv", "last_event_timestamp")
    assert not check_contract(reference_contract(
        ModelConfig(**{**SMALL, "mask": "causal", "num_layers": 1}))).appendable
    assert not check_contract(reference_contract(
        ModelConfig(**{**SMALL, "mask": "bidirectional"}))).appendable
    with pytest.raises(ContractError, match="depends on which candidate"):
        check_contract(reference_contract(ModelConfig(**{**SMALL, "mask": "full"})))


@pytest.mark.parametrize(("mask", "fp16"), [("causal", False), ("causal", True),
                                             ("bidirectional", False)])
def test_reference_graphs_keep_their_names(mask: str, fp16: bool) -> None:
    """The reference graphs, exported from the declaration, keep the inputs and outputs (names,
    order, dtypes, Triton dims) that clients, the benchmarks and the committed configs have
    always used; an fp16 export serves user_kv in fp16 and nothing else."""
    from export.split_export import graphs_for

    cfg = ModelConfig(**{**SMALL, "mask": mask})
    plan = cfg.serving_plan(fp16=fp16)
    layers, heads, dh, kv = cfg.num_layers, cfg.num_heads, cfg.head_dim, "FP16" if fp16 else "FP32"
    history = [("history_item_ids", "INT64", (-1,)), ("history_action_ids", "INT64", (-1,)),
               ("history_timestamps", "INT64", (-1,))]
    request = [*history, ("candidate_item_ids", "INT64", (-1,)),
               ("candidate_category_ids", "INT64", (-1,)), ("request_timestamp", "INT64", (1,)),
               ("user_profile", "FP32", (cfg.profile_dim,))]
    scores = [("scores", "FP32", (-1, cfg.num_tasks))]
    user_kv = ("user_kv", kv, (layers, 2, heads, -1, dh))
    last = ("last_event_timestamp", "INT64", (1,))
    expected = {
        "user_encoder": (history, [user_kv, last]),
        "target_fusion": ([*request[3:], user_kv, last], scores),
        "ranker_naive": (request, scores),
        "ranker_base": (request, scores),
        "user_encoder_append": (
            [("cached_user_kv", kv, (layers - 1, 2, heads, -1, dh)),
             ("cached_last_event_timestamp", "INT64", (1,)), *history],
            [("new_user_kv", kv, (layers, 2, heads, -1, dh)), last]),
    }
    graphs = graphs_for(plan.contract, plan.evaluation_graphs)
    assert set(graphs) == set(expected) - (set() if cfg.appends else {"user_encoder_append"})
    for graph in graphs:
        inputs, outputs = graph_specs(plan.contract, graph, plan.state_dtypes)
        assert [(t.name, t.dtype, t.dims) for t in inputs] == expected[graph][0], graph
        assert [(t.name, t.dtype, t.dims) for t in outputs] == expected[graph][1], graph


def test_reference_model_through_the_protocol() -> None:
    """The unchanged reference model, seen through SplitModel: the generic split equals its
    naive oracle, and its declared names are its forwards' argument orders."""
    model = ReferenceSplitModel(build_model(ModelConfig(**{**SMALL, "mask": "causal"})))
    request = reference_request(np.random.default_rng(2), model.model.cfg, 40, 7)
    with torch.no_grad():
        split = split_scores(model, as_torch(request)).numpy()
        naive = naive_scores(model, as_torch(request)).numpy()
    assert max_diff(split, naive) <= TOLERANCE


def test_reference_model_exports_through_its_declaration(tmp_path: Path) -> None:
    """The generic export (export/split_export.py) takes the unchanged reference model through
    its declaration: split == naive in ONNX Runtime; a full-mask
    reference is refused before anything is written."""
    model = ReferenceSplitModel(build_model(ModelConfig(**{**SMALL, "mask": "causal"})))
    contract = model.contract()
    paths = export_all(model, tmp_path, max_candidates=50, naive_max_work=2**24)
    assert [p.parent.parent.name for p in paths] == [*GRAPHS, "ranker_base"]
    sessions = {p.parent.parent.name: make_session(p) for p in paths}

    def run(graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return sessions[graph].run(None, {n: feeds[n] for n in graph_io(contract, graph)[0]})

    for length, n in ((0, 3), (41, 7), (SMALL["max_history"] + 20, 17)):
        request = reference_request(np.random.default_rng(length), model.model.cfg, length, n)
        state = dict(zip((s.name for s in contract.state), run("user_encoder", request),
                         strict=True))
        with torch.no_grad():
            oracle = naive_scores(model, as_torch(request)).numpy()
        assert max_diff(run("target_fusion", {**request, **state})[0], oracle) <= TOLERANCE
        assert max_diff(run("ranker_naive", request)[0], oracle) <= TOLERANCE
    too_many = {**request, "candidate_item_ids": np.zeros(51, np.int64),
                "candidate_category_ids": np.zeros(51, np.int64)}
    with pytest.raises(Exception, match="max_candidates=50"):
        run("target_fusion", {**too_many, **state})
    full_mask = ReferenceSplitModel(build_model(ModelConfig(**{**SMALL, "mask": "full"})))
    with pytest.raises(ContractError, match="depends on which candidate"):
        export_all(full_mask, tmp_path / "full", max_candidates=50, naive_max_work=2**24)
    assert not (tmp_path / "full").exists()


def _bad(**changes) -> object:
    return dataclasses.replace(hstu_contract(CFG), **changes)


_C = hstu_contract(CFG)
BAD_DECLARATIONS = {
    "duplicate name": (_bad(state=(*_C.state, StateTensor("scores", "FP32", ("L",)))),
                       "unique"),
    "cached name clash": (_bad(features=(*_C.features, Feature("cached_user_k", "FP32",
                                                               REQUEST, (1,)))), "unique"),
    "unknown axis": (_bad(features=(*_C.features, Feature("x", "FP32", "session"))),
                     "unknown axis"),
    "unknown dtype": (_bad(features=(*_C.features, Feature("x", "FP64", HISTORY))),
                      "unknown dtype"),
    "request without shape": (_bad(features=(*_C.features, Feature("x", "FP32", REQUEST))),
                              "fixed shape"),
    "event on candidates": (_bad(features=(*_C.features, Feature("x", "INT64", CANDIDATES,
                                                                 event=True))),
                            "only history features"),
    "no candidates": (_bad(features=tuple(f for f in _C.features if f.axis != CANDIDATES)),
                      "no candidate feature"),
    "no history": (_bad(features=tuple(f for f in _C.features if f.axis != HISTORY)),
                   "no history feature"),
    "state on N": (_bad(state=(StateTensor("s", "FP32", ("N", 4)),)), "depends on N"),
    "state dim 0": (_bad(state=(StateTensor("s", "FP32", ("L", 0)),)), "positive int"),
    "state two L": (_bad(state=(StateTensor("s", "FP32", ("L", "L")),)), "at most one"),
    "state unknown symbol": (_bad(state=(StateTensor("s", "FP32", ("T", 4)),)),
                             "not a known symbol"),
    "no state": (_bad(state=()), "no user state"),
    "output not per candidate": (_bad(outputs=(Output("scores", "FP32", (2, "N")),)),
                                 "must start with 'N'"),
    "full mask": (_bad(history_mask="full"), "depends on which candidate"),
    "append without causal": (_bad(history_mask="bidirectional"), "appendable needs a causal"),
    "append without events": (_bad(features=tuple(dataclasses.replace(f, event=False)
                                                  for f in _C.features)), "event=True"),
    "bad tensor name": (_bad(outputs=(Output("scores:0", "FP32", ("N", 2)),)),
                        "not a valid name"),
    "bad max_history": (_bad(max_history=0), "max_history"),
    "unknown append_reads": (_bad(state=(dataclasses.replace(_C.state[0], append_reads="some"),
                                         *_C.state[1:])), "append_reads"),
    "all_but_last of L": (_bad(state=(*_C.state[:2], dataclasses.replace(
        _C.state[2], append_reads="all_but_last"))), "constant >= 2"),
    "all_but_last of 1": (_bad(state=(StateTensor("s", "FP32", (1, "L"), append_reads=
                                                  "all_but_last"),)), "constant >= 2"),
    "append without L state": (_bad(state=(StateTensor("s", "FP32", (4,)),)), "no state tensor "
                               "has an 'L' dim"),
    "new name clash": (_bad(outputs=(Output("new_user_k", "FP32", ("N", 2)),)), "unique"),
}


@pytest.mark.parametrize("case", sorted(BAD_DECLARATIONS))
def test_checker_refuses_bad_declarations(case: str) -> None:
    contract, message = BAD_DECLARATIONS[case]
    with pytest.raises(ContractError, match=message):
        check_contract(contract)


def test_bad_hstu_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(HSTUConfigError, match="unknown HSTU config keys"):
        HSTUConfig.from_dict({"d_model": 8, "dmodel": 8})
    with pytest.raises(HSTUConfigError, match="time_buckets"):
        HSTUConfig(time_buckets=40)
    with pytest.raises(HSTUConfigError, match="task_names"):
        HSTUConfig(num_tasks=3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_heads": 0}))
    result = subprocess.run([sys.executable, "-m", "export.hstu_export", "--config", str(bad),
                             "--output", str(tmp_path / "out")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "num_heads must be a positive integer" in result.stderr


def test_shipped_config_and_checkpoints(tmp_path: Path) -> None:
    """The example config loads; a checkpoint round-trips; another family's is refused."""
    cfg = HSTUConfig.load(CONFIG_DIR / "hstu_causal.json")
    assert cfg.max_history >= 1024 and cfg.d_model >= 128 and cfg.num_heads >= 4
    model = build_hstu(CFG)
    path = tmp_path / "hstu.pt"
    torch.save(model.state_dict(), path)
    loaded = build_hstu(dataclasses.replace(CFG, seed=CFG.seed + 1), str(path))
    request = as_torch(random_request(np.random.default_rng(4), 30, 4))
    with torch.no_grad():
        assert torch.equal(naive_scores(model, request), naive_scores(loaded, request))
    torch.save(build_model(ModelConfig(**{**SMALL, "mask": "causal"})).state_dict(), path)
    with pytest.raises(ValueError, match="does not match"):
        build_hstu(CFG, str(path))


# ----------------------------------------------------------------------------- memory
_MEASURE = r"""
import json, sys
import numpy as np
import psutil
from benchmarks.memory import peak_rss_bytes, reset_peak
from export.runtime import make_session
session = make_session(sys.argv[1], threads=1)
length = int(sys.argv[2])
rng = np.random.default_rng(0)
feeds = {"history_item_ids": rng.integers(0, 10**9, length),
         "history_action_ids": rng.integers(0, 5, length),
         "history_timestamps": 1_600_000_000 + np.cumsum(rng.integers(0, 5000, length)),
         "history_dwell_seconds": rng.exponential(20.0, length).astype(np.float32)}
session.run(None, {k: v[:10] for k, v in feeds.items()})  # warm: the arena's first growth
if not reset_peak():
    sys.exit("cannot reset the peak RSS mark (/proc/self/clear_refs)")
before = psutil.Process().memory_info().rss
session.run(None, feeds)
print(json.dumps({"length": length, "peak_delta": peak_rss_bytes() - before}))
"""


def test_user_encoder_memory_is_linear_in_history(tmp_path: Path) -> None:
    """Peak working set of user_encoder at L = 8192, measured in a fresh process (VmHWM reset
    before the run, as benchmarks/memory.py does): far below one [H, L, L] fp32 score block."""
    length = 8192
    cfg = dataclasses.replace(CFG, num_layers=2, max_history=length)
    export_hstu(build_hstu(cfg), tmp_path, ("user_encoder",))
    path = tmp_path / "user_encoder" / "1" / "model.onnx"
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(length)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = json.loads(result.stdout)["peak_delta"]
    quadratic = cfg.num_heads * length * length * 4  # one layer's [H, L, L] fp32 scores
    print(f"user_encoder L={length}: peak {peak / 2**20:.1f} MiB, one [H, L, L] block "
          f"{quadratic / 2**20:.0f} MiB")
    assert peak < quadratic / 4
