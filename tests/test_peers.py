"""The benchmark's peers (the models' own `mfalcon` and `replicated_fusion` forwards, exported by
benchmarks/long_history.py as the graphs they stand in for) score exactly what the naive oracle
scores, for both masks and for the HSTU family's single pass, so the long-history benchmark
compares costs of equal answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.long_history import PEERS, export_peers
from export import reference_features as c
from export.hstu import build_hstu
from export.hstu_export import export_hstu
from export.model import build_model
from export.onnx_export import export_graph
from export.runtime import make_session
from export.split_contract import ReferenceSplitModel, naive_scores
from export.split_fuzz import as_torch, max_diff
from tests.conftest import OnnxModels, random_request, small_config
from tests.test_hstu import CFG, REPO_ROOT, TOLERANCE
from tests.test_hstu import random_request as hstu_request


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
def test_peers_equal_the_oracle(tmp_path: Path, mask: str) -> None:
    """The reference model's peer forwards against its naive forward, in torch and exported."""
    cfg = small_config(mask)
    model = build_model(cfg)
    graphs = ["user_encoder", "ranker_naive"]
    for graph in graphs:
        export_graph(model, graph, tmp_path / graph / "model.onnx")
    assert export_peers(ReferenceSplitModel(model), tmp_path) == tuple(PEERS)
    models = OnnxModels(tmp_path, [*graphs, *(f"{peer}/1" for peer in PEERS)])
    contract = c.reference_contract(cfg)
    rng = np.random.default_rng(4)
    for length, n in [(0, 3), (1, 1), (40, 7), (cfg.max_history + 50, 4)]:
        request = random_request(rng, cfg, length, n)
        naive = models.naive(request)
        user_kv, last_ts = models.run("user_encoder", request)
        state = {c.USER_KV: user_kv, c.LAST_EVENT_TIMESTAMP: last_ts}
        tensors = as_torch({**request, **state})
        with torch.no_grad():
            in_torch = {
                "mfalcon": model.mfalcon(*(tensors[f.name] for f in contract.features)),
                "replicated_fusion": model.replicated_fusion(
                    *(tensors[name] for name in contract.fusion_inputs))}
        for name, scores in (("mfalcon", models.run("mfalcon/1", request)[0]),
                             ("replicated_fusion",
                              models.run("replicated_fusion/1", {**request, **state})[0]),
                             *((f"torch {p}", s.numpy()) for p, s in in_torch.items())):
            assert scores.shape == naive.shape, name
            assert float(np.abs(scores - naive).max(initial=0.0)) <= 1e-5, (name, length, n)


def test_hstu_single_pass_equals_the_oracle(tmp_path: Path) -> None:
    """HSTU's M-FALCON single pass (export/hstu.py `mfalcon`), in torch and exported, against
    the torch naive forward and the exported ranker_naive: history past one attention block and
    past max_history, candidates in several blocks of the single pass, N = 0 and N = 1."""
    model = build_hstu(CFG)
    assert export_peers(model, tmp_path) == ("mfalcon",)
    export_hstu(model, tmp_path, ("ranker_naive",))
    contract = model.contract()
    single = make_session(tmp_path / "mfalcon" / "1" / "model.onnx")
    naive = make_session(tmp_path / "ranker_naive" / "1" / "model.onnx")
    for length, n in [(0, 3), (1, 0), (1, 1), (65, 17), (CFG.max_history + 41, 130)]:
        request = hstu_request(np.random.default_rng(7 * length + n), length, n)
        with torch.no_grad():
            oracle = naive_scores(model, as_torch(request)).numpy()
            torch_single = model.mfalcon(*(as_torch(request)[f.name]
                                           for f in contract.features)).numpy()
        assert oracle.shape == (n, CFG.num_tasks)
        for name, scores in (("torch", torch_single), ("onnx", single.run(None, request)[0]),
                             ("onnx naive", naive.run(None, request)[0])):
            diff = max_diff(scores, oracle)
            assert diff <= TOLERANCE, f"{name} single pass at L={length}, N={n}: {diff:.2e}"


@pytest.mark.parametrize("family", ["reference", "hstu"])
def test_long_history_benchmark_runs_any_family(tmp_path: Path, family: str) -> None:
    """benchmarks/long_history.py on a small config of each family, from the declaration alone:
    every method that ran scored within 1e-5 of the oracle, HSTU's append equals a full encode,
    the fresh-process peaks and the report were written."""
    config = tmp_path / f"long_{family}_{tmp_path.name}.json"
    if family == "hstu":
        config.write_text(json.dumps({"model": CFG.factory, **CFG.to_dict()}))
    else:
        config.write_text(json.dumps(small_config("causal").to_dict()))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.long_history", "--config", str(config), "--lengths",
         "0,70", "--ns", "1,5", "--repeats", "1", "--memory-lengths", "70", "--no-triton",
         "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pd.read_csv(out / "long_history.csv", keep_default_na=False)
    diffs = rows[rows.max_diff.str.contains(" vs naive")]
    methods = {"split", "mfalcon", "naive"} | ({"replicated"} if family == "reference" else set())
    assert set(diffs.method) | {"naive"} == methods and len(diffs) == 4 * (len(methods) - 1)
    assert (diffs.max_diff.str.split().str[0].astype(float) <= TOLERANCE).all(), diffs
    if family == "hstu":
        append = pd.read_csv(out / "long_append.csv")
        assert (append.max_diff.str.split().str[0].astype(float) <= TOLERANCE).all(), append
    memory = pd.read_csv(out / "long_memory.csv")
    assert memory.peak_mib.notna().all() and {"user_encoder", "mfalcon"} <= set(memory.graph)
    assert "## In-process p50 (ms)" in (out / "long_history.md").read_text()
