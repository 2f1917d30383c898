"""The benchmarks from the declaration alone: no benchmark names a family's features or state,
and what they now build from the declaration is what they sent before (the committed results
were made with those requests and feeds)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from benchmarks.feeds import fusion_feeds, history_feeds, named_state, stand_in_state
from client.traffic import RequestGenerator
from export import reference_features as ref
from export.hstu import HSTUConfig, hstu_contract
from tests.conftest import small_config

ROOT = Path(__file__).resolve().parents[1]
CFG = small_config("causal")
CONTRACT = ref.reference_contract(CFG)


def test_the_benchmarks_name_no_family_feature_or_state() -> None:
    """Every request feature and state tensor of both families (and the append graph's cached_
    and new_ names), and the reference module's constants for them, appear in no benchmark.
    The outputs are left out: both families call theirs `scores`, the word every benchmark
    uses for what a model returns; the benchmarks read the output name from the declaration."""
    names: set[str] = set()
    for contract in (CONTRACT, hstu_contract(HSTUConfig(max_history=64))):
        names |= {f.name for f in contract.features} | {s.name for s in contract.state}
        names |= {s.cached_name for s in contract.state} | {s.new_name for s in contract.state}
    constants = {k for k, v in vars(ref).items() if k.isupper() and (
        (isinstance(v, str) and v in names) or (isinstance(v, tuple) and v and set(v) <= names))}
    assert {"USER_KV", "HISTORY_INPUTS", "CACHED_USER_KV"} <= constants  # the test can fail
    pattern = re.compile(r"\b(" + "|".join(sorted(names | constants)) + r")\b")
    files = sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(files) > 10
    found = [f"{p.name}: {m.group(0)}" for p in files for m in pattern.finditer(p.read_text())]
    assert not found, found


def test_the_declared_generator_is_the_reference_generator() -> None:
    for seed in (0, 9, 12345):
        declared = RequestGenerator(CONTRACT, seed=seed)
        named = ref.reference_generator(seed=seed, profile_dim=CFG.profile_dim)
        for length, n in ((0, 1), (30, 7), (CFG.max_history + 5, 40)):
            a, b = declared.request(length, n), named.request(length, n)
            assert list(a.features) == list(b.features)
            assert all(np.array_equal(a.features[k], b.features[k]) for k in a.features)
        assert declared.user_id() == named.user_id()


def test_feeds_are_the_reference_feeds() -> None:
    """The feeds carry exactly the tensors the benchmarks sent by name before, in that order."""
    request = RequestGenerator(CONTRACT, seed=3).request(12, 5).as_inputs()
    assert list(history_feeds(CONTRACT, request)) == list(ref.HISTORY_INPUTS)
    state = stand_in_state(CONTRACT, 12, np.random.default_rng(7))
    feeds = fusion_feeds(CONTRACT, request, state)
    assert list(feeds) == [*ref.CANDIDATE_INPUTS, ref.REQUEST_TIMESTAMP, ref.USER_PROFILE,
                           ref.USER_KV, ref.LAST_EVENT_TIMESTAMP]
    assert all(feeds[k] is request[k] for k in ref.CANDIDATE_INPUTS)
    # memory.py's former stand-in K/V: the same draw from the same seed
    kv = np.random.default_rng(7).standard_normal(
        (CFG.num_layers, 2, CFG.num_heads, 12, CFG.head_dim)).astype(np.float32)
    assert np.array_equal(feeds[ref.USER_KV], kv)
    assert feeds[ref.LAST_EVENT_TIMESTAMP].dtype == np.int64
    assert named_state(CONTRACT, state)[ref.USER_KV] is state[0]
    # the kept length, and the fp16 export's served state
    long = stand_in_state(CONTRACT, CFG.max_history + 9, half=True)
    assert long[0].shape[3] == CFG.max_history and long[0].dtype == np.float16
    assert not long[0].any() and long[1].dtype == np.int64
    # what the append graph reads of a cached state: every layer's K/V but the last
    cached = CONTRACT.cached_reads(long)
    assert list(cached) == [ref.CACHED_USER_KV, ref.CACHED_LAST_EVENT_TIMESTAMP]
    assert cached[ref.CACHED_USER_KV].shape[0] == CFG.num_layers - 1
