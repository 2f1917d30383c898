"""A seeded sweep of the exported attention paths against an fp64 reference.

export/attention.py routes each request through one of several paths: plain masked attention
(L <= 512), the blocked causal Loop with the MultiHeadAttention sink merge (L > 512, blocks of
<= 256 rows, padded rows in the last block), flash MultiHeadAttention for a bidirectional
history, and for the candidates an If between plain scores (N x (L+1) <= 2^20) and the sink
formulation. The sweep sits on every boundary: L across block and threshold edges, N x (L+1) at
2^20 - 1, 2^20 and 2^20 + 1, both masks, logits large enough to saturate the softmax, the gpu
target's sink padding, and an fp16 export.

The reference is the same model in float64, eager torch: plain softmax attention over blocks of
query rows (`_eager_attention`), which shares no code with the graphs' Loop, sink or If.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from export import reference_features as c
from export.model import RankingTransformer, build_model
from export.onnx_export import export_graph
from tests.conftest import OnnxModels, as_torch, random_request, small_config

# The tolerances the docs state (export/attention.py, README), against fp64: user_kv relative to
# its largest |value|, scores (probabilities) absolute. Measured on this sweep (2026-12, ORT 1.19
# CPU): user_kv <= 5.4e-6, scores <= 1.8e-7; with logits in the hundreds, scores <= 1.1e-5 (a
# logit of size s carries s x 6e-8 of fp32 rounding before any attention math); fp16 <= 6e-4.
FP32_KV_REL = 1e-5
FP32_SCORE_ABS = 1e-6
EXTREME_SCORE_ABS = 5e-5
FP16_KV_REL = 5e-3
FP16_SCORE_ABS = 5e-3

BOUNDARY_L = [0, 1, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 2049, 4097]
# (L, N) with N x (L + 1) at the candidate path's threshold 2^20: below, at, above.
THRESHOLD_LN = [(1024, 1023), (1023, 1024), (16, 61681)]
GRAPHS = ["user_encoder", "target_fusion", "ranker_naive"]
FUZZ = dict(max_history=4200, max_candidates=1 << 16)


def _fuzz_model(mask: str, extreme: bool = False) -> RankingTransformer:
    model = build_model(small_config(mask, **FUZZ))
    if extreme:  # q and k x 12: attention logits in the hundreds, softmax near one-hot
        with torch.no_grad():
            for block in model.blocks:
                d = block.qkv.weight.shape[1]
                block.qkv.weight[: 2 * d] *= 12.0
    return model


class Exported:
    """One model exported to ONNX next to its float64 twin."""

    def __init__(self, model: RankingTransformer, directory: Path, fp16: bool = False,
                 target: str = "cpu") -> None:
        self.cfg = model.cfg
        self.fp16 = fp16
        self.reference = copy.deepcopy(model).double()
        exported = model.half() if fp16 else model
        for graph in GRAPHS:
            export_graph(exported, graph, directory / graph / "model.onnx", fp16=fp16,
                         target=target)
        self.onnx = OnnxModels(directory, GRAPHS)

    def user_kv(self, request: dict) -> tuple[np.ndarray, np.ndarray]:
        got = self.onnx.run("user_encoder", request)[0].astype(np.float64)
        with torch.no_grad():
            want = self.reference.encode_user(*as_torch(request)[:3])[0].numpy()
        return got, want

    def scores(self, request: dict) -> tuple[np.ndarray, np.ndarray]:
        """target_fusion on the reference's user_kv (so only the candidate path is compared)."""
        args = as_torch(request)
        with torch.no_grad():
            user_kv, last_ts = self.reference.encode_user(*args[:3])
            want = self.reference.score_candidates(*args[3:6], args[6].double(), user_kv,
                                                   last_ts).numpy()
        feeds = {**request, c.USER_KV: user_kv.numpy().astype(np.float16 if self.fp16
                                                             else np.float32),
                 c.LAST_EVENT_TIMESTAMP: last_ts.numpy()}
        return self.onnx.run("target_fusion", feeds)[0], want


@pytest.fixture(scope="module")
def export_for(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Exported]:
    cache: dict[tuple, Exported] = {}

    def get(mask: str, extreme: bool = False, fp16: bool = False,
            target: str = "cpu") -> Exported:
        key = (mask, extreme, fp16, target)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"fuzz_{mask}_{extreme}_{fp16}_{target}")
            cache[key] = Exported(_fuzz_model(mask, extreme), directory, fp16, target)
        return cache[key]

    return get


def _request(exported: Exported, length: int, n: int, seed: int) -> dict[str, np.ndarray]:
    return random_request(np.random.default_rng(seed), exported.cfg, length, n)


def _kv_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    if not want.size:
        return 0.0
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def _score_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and np.isfinite(got).all()
    return float(np.abs(got - want).max()) if want.size else 0.0


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
@pytest.mark.parametrize("length", BOUNDARY_L)
def test_history_paths_match_fp64(export_for: Callable[..., Exported], mask: str,
                                  length: int) -> None:
    """user_encoder at every block/threshold edge of L, then the candidates on its K/V."""
    exported = export_for(mask)
    request = _request(exported, length, 5, seed=length)
    assert _kv_error(*exported.user_kv(request)) <= FP32_KV_REL
    assert _score_error(*exported.scores(request)) <= FP32_SCORE_ABS


@pytest.mark.parametrize(("length", "n"), THRESHOLD_LN)
def test_candidate_threshold_matches_fp64(export_for: Callable[..., Exported], length: int,
                                          n: int) -> None:
    """N x (L+1) at 2^20 - 1, 2^20 (plain scores) and 2^20 + 1 (the sink path)."""
    exported = export_for("causal")
    request = _request(exported, length, n, seed=n)
    assert _score_error(*exported.scores(request)) <= FP32_SCORE_ABS


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
@pytest.mark.parametrize(("length", "n"), [(257, 4), (1025, 4), (1024, 1023), (1023, 1024)])
def test_extreme_logits_match_fp64(export_for: Callable[..., Exported], mask: str, length: int,
                                   n: int) -> None:
    """Attention logits in the hundreds: the sink's log-sum-exp merge stays exact."""
    exported = export_for(mask, extreme=True)
    request = _request(exported, length, n, seed=7 + length)
    assert _kv_error(*exported.user_kv(request)) <= FP32_KV_REL
    assert _score_error(*exported.scores(request)) <= EXTREME_SCORE_ABS


@pytest.mark.parametrize("length", [1, 513, 1025, 2049])
def test_naive_oracle_matches_fp64(export_for: Callable[..., Exported], length: int) -> None:
    exported = export_for("causal")
    request = _request(exported, length, 3, seed=length + 1)
    with torch.no_grad():
        args = as_torch(request)
        want = exported.reference(*args[:6], args[6].double()).numpy()
    assert _score_error(exported.onnx.naive(request), want) <= FP32_SCORE_ABS


@pytest.mark.parametrize(("length", "n"), [(513, 5), (1025, 5), (2049, 3), (1024, 1023),
                                           (16, 61681)])
def test_gpu_target_is_exact_too(export_for: Callable[..., Exported], length: int,
                                 n: int) -> None:
    """The gpu target pads the sink to head sizes in multiples of 8: other shapes, same math."""
    exported = export_for("causal", target="gpu")
    request = _request(exported, length, n, seed=length)
    assert _kv_error(*exported.user_kv(request)) <= FP32_KV_REL
    assert _score_error(*exported.scores(request)) <= FP32_SCORE_ABS


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
@pytest.mark.parametrize(("length", "n"), [(255, 5), (513, 5), (2049, 5), (1024, 1023)])
def test_fp16_export_within_its_tolerance(export_for: Callable[..., Exported], mask: str,
                                          length: int, n: int) -> None:
    """fp16 weights and user_kv (the gpu target): within FP16_SCORE_ABS of fp64."""
    exported = export_for(mask, fp16=True, target="gpu")
    request = _request(exported, length, n, seed=length)
    assert _kv_error(*exported.user_kv(request)) <= FP16_KV_REL
    assert _score_error(*exported.scores(request)) <= FP16_SCORE_ABS
