"""The split is an optimisation, never an approximation: PyTorch naive == PyTorch split ==
ONNX split == ONNX naive, for both cacheable masks, across N and L (edge cases included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import reference_features as c
from tests.conftest import SMALL, as_torch, in_chunks, random_request

TOLERANCE = 1e-5
MAX_HISTORY = SMALL["max_history"]
LENGTHS = [0, 1, 7, 256, MAX_HISTORY, MAX_HISTORY + 41]
CANDIDATES = [1, 2, 17, 1000]


def oracle_rows(n: int) -> np.ndarray:
    """The candidates the naive oracles score: all of them up to 100, else the first, the last
    and every 20th. A candidate's naive score depends only on itself and the history (see
    test_each_candidate_scored_as_if_alone), so a spread of rows checks the broadcast over all N
    without re-encoding the history 1000 times per graph."""
    return np.arange(n) if n <= 100 else np.unique(np.r_[np.arange(0, n, 20), n - 1])


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("n", CANDIDATES)
def test_naive_split_onnx_agree(exported, mask: str, length: int, n: int) -> None:
    model, onnx_models = exported(mask)
    rng = np.random.default_rng(1000 * length + n)
    request = random_request(rng, model.cfg, length, n)
    rows = oracle_rows(n)
    subset = {**request, **{name: request[name][rows] for name in c.CANDIDATE_INPUTS}}

    def torch_naive(req: dict) -> np.ndarray:
        with torch.no_grad():
            return model(*as_torch(req)).numpy()

    with torch.no_grad():
        torch_split = model.split_forward(*as_torch(request)).numpy()
    onnx_split = onnx_models.split(request)
    assert onnx_split.shape == torch_split.shape == (n, model.cfg.num_tasks)
    assert float(np.abs(onnx_split - torch_split).max(initial=0.0)) <= TOLERANCE
    reference = in_chunks(torch_naive, subset)
    onnx_naive = in_chunks(onnx_models.naive, subset)
    assert np.isfinite(reference).all()
    for name, scores in (("torch split", torch_split[rows]), ("onnx split", onnx_split[rows]),
                         ("onnx naive", onnx_naive)):
        assert scores.shape == reference.shape, name
        diff = float(np.abs(scores - reference).max(initial=0.0))
        assert diff <= TOLERANCE, f"{name} differs from torch naive by {diff:.2e}"


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
def test_history_beyond_max_keeps_most_recent(exported, mask: str) -> None:
    """Only the newest max_history events count: dropping older ones changes nothing."""
    model, onnx_models = exported(mask)
    request = random_request(np.random.default_rng(7), model.cfg, MAX_HISTORY + 50, 9)
    recent = dict(request)
    for name in c.HISTORY_INPUTS:
        recent[name] = request[name][-MAX_HISTORY:]
    np.testing.assert_array_equal(onnx_models.split(request), onnx_models.split(recent))
    np.testing.assert_array_equal(onnx_models.naive(request), onnx_models.naive(recent))


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
def test_empty_request_parts(exported, mask: str) -> None:
    """N = 0 gives empty scores; L = 0 gives finite scores (candidates see only themselves)."""
    model, onnx_models = exported(mask)
    rng = np.random.default_rng(5)
    empty = random_request(rng, model.cfg, 12, 0)
    assert onnx_models.split(empty).shape == (0, model.cfg.num_tasks)
    assert onnx_models.naive(empty).shape == (0, model.cfg.num_tasks)
    no_history = random_request(rng, model.cfg, 0, 4)
    scores = onnx_models.split(no_history)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, onnx_models.naive(no_history), atol=TOLERANCE, rtol=0)


def test_each_candidate_scored_as_if_alone(exported) -> None:
    """A candidate's score does not depend on the other candidates in the request."""
    model, onnx_models = exported("causal")
    request = random_request(np.random.default_rng(11), model.cfg, 40, 25)
    together = onnx_models.split(request)
    for i in (0, 13, 24):
        alone = dict(request)
        for name in c.CANDIDATE_INPUTS:
            alone[name] = request[name][i : i + 1]
        np.testing.assert_allclose(onnx_models.split(alone)[0], together[i], atol=TOLERANCE,
                                   rtol=0)


def test_non_finite_profile_never_gives_nan(exported) -> None:
    model, onnx_models = exported("causal")
    request = random_request(np.random.default_rng(2), model.cfg, 10, 3)
    request[c.USER_PROFILE][:3] = [np.nan, np.inf, -np.inf]
    assert np.isfinite(onnx_models.split(request)).all()
    assert np.isfinite(onnx_models.naive(request)).all()
