"""user_encoder_append, the cached forward of a returning user: from the K/V of P cached events
(every layer but the last) and ΔL new events it returns the new events' K/V only, and the P
cached K/V followed by them equal user_encoder on the whole history (torch and ONNX Runtime),
ΔL = 0 and P = 0 included; it refuses what it cannot do exactly (past max_history, a
bidirectional mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import reference_features as c
from export.guards import append_rule
from export.model import SplitNotExactError, build_model
from tests.conftest import random_request, small_config

CASES = [(0, 0), (0, 1), (0, 37), (1, 0), (12, 1), (12, 7), (40, 100), (200, 100), (299, 1),
         (300, 0), (150, 150)]


def history(request: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {n: request[n][start:stop] for n in c.HISTORY_INPUTS}


@pytest.mark.parametrize(("cached", "new"), CASES)
def test_append_equals_full_encode(exported, cached: int, new: int) -> None:
    model, onnx_models = exported("causal")
    request = random_request(np.random.default_rng(cached * 1000 + new), model.cfg,
                             cached + new, 1)
    full_kv, full_last = onnx_models.run("user_encoder", history(request, 0, cached + new))
    prefix_kv, prefix_last = onnx_models.run("user_encoder", history(request, 0, cached))
    new_kv, last = onnx_models.run("user_encoder_append", {
        c.CACHED_USER_KV: prefix_kv[:-1], c.CACHED_LAST_EVENT_TIMESTAMP: prefix_last,
        **history(request, cached, cached + new)})
    assert new_kv.shape[3] == new and last.tolist() == full_last.tolist()
    kv = np.concatenate([prefix_kv, new_kv], axis=3)
    assert kv.shape == full_kv.shape
    assert float(np.abs(kv - full_kv).max(initial=0.0)) <= 1e-5
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in request.items()}
        names = c.HISTORY_INPUTS
        prefix, prefix_ts = model.encode_user(*(t[n][:cached] for n in names))
        torch_new, _ = model.encode_append(prefix[:-1], prefix_ts,
                                           *(t[n][cached:] for n in names))
        # the cached forward against the full forward, in torch alone
        torch_full, _ = model.encode_user(*(t[n][:cached + new] for n in names))
    assert torch_new.shape[3] == new
    diff = (torch.cat([prefix, torch_new], dim=3) - torch_full).abs()
    assert (float(diff.max()) if diff.numel() else 0.0) <= 1e-5
    diff = (torch_new - torch.from_numpy(full_kv[:, :, :, cached:])).abs()
    assert (float(diff.max()) if diff.numel() else 0.0) <= 1e-5


def test_append_past_max_history_is_refused(exported) -> None:
    model, onnx_models = exported("causal")
    request = random_request(np.random.default_rng(5), model.cfg, 310, 1)
    prefix_kv, prefix_last = onnx_models.run("user_encoder", history(request, 0, 290))
    with pytest.raises(Exception, match="running Reshape node") as info:
        onnx_models.run("user_encoder_append", {
            c.CACHED_USER_KV: prefix_kv[:-1], c.CACHED_LAST_EVENT_TIMESTAMP: prefix_last,
            **history(request, 290, 310)})
    assert append_rule(model.cfg.max_history) in str(info.value)


def test_append_mismatched_lengths_are_refused(exported) -> None:
    model, onnx_models = exported("causal")
    request = random_request(np.random.default_rng(6), model.cfg, 20, 1)
    prefix_kv, prefix_last = onnx_models.run("user_encoder", history(request, 0, 10))
    new = history(request, 10, 20)
    new[c.HISTORY_ACTION_IDS] = new[c.HISTORY_ACTION_IDS][:1]
    with pytest.raises(Exception, match="must have the same length"):
        onnx_models.run("user_encoder_append", {
            c.CACHED_USER_KV: prefix_kv[:-1], c.CACHED_LAST_EVENT_TIMESTAMP: prefix_last,
            **new})


def test_bidirectional_cannot_append() -> None:
    model = build_model(small_config("bidirectional"))
    kv, last = model.encode_user(*(torch.zeros(3, dtype=torch.int64) for _ in range(3)))
    with pytest.raises(SplitNotExactError, match="causal"):
        model.encode_append(kv[:-1], last,
                            *(torch.zeros(2, dtype=torch.int64) for _ in range(3)))
