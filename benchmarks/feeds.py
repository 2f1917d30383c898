"""The feeds of the split graphs, by the declaration's names: what the benchmarks send
user_encoder and target_fusion (user_encoder_append reads `SplitContract.cached_reads`), so that
no benchmark names a family's features or state (the argument orders: client/split_contract.py).
Torch-free."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from client.request import NUMPY_DTYPES
from client.split_contract import FLOATS, SplitContract


def history_feeds(contract: SplitContract,
                  request: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """user_encoder's inputs: the request's history features."""
    return {f.name: request[f.name] for f in contract.history_features}


def named_state(contract: SplitContract, state: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """user_encoder's outputs (the state tensors, in declaration order) by name."""
    return dict(zip((s.name for s in contract.state), state, strict=True))


def fusion_feeds(contract: SplitContract, request: Mapping[str, np.ndarray],
                 state: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """target_fusion's inputs: the request's candidate and per-request features, then the user
    state (user_encoder's outputs, in declaration order)."""
    tensors = {**request, **named_state(contract, state)}
    return {name: tensors[name] for name in contract.fusion_inputs}


def stand_in_state(contract: SplitContract, length: int, rng: np.random.Generator | None = None,
                   half: bool = False) -> list[np.ndarray]:
    """A user state of the declared shapes after `length` events (an "L" dim: the kept length,
    min(length, max_history)) without running user_encoder: float tensors N(0, 1) from `rng`
    (zeros without one), fp16 with `half` (an fp16 export's served state), integer ones zeros.
    For what depends on the state's shapes only: memory, the guards."""
    kept = min(length, contract.max_history)
    state = []
    for s in contract.state:
        shape = tuple(kept if d == "L" else d for d in s.dims)
        dtype = np.dtype(np.float16) if half and s.dtype == "FP32" else NUMPY_DTYPES[s.dtype]
        if s.dtype in FLOATS and rng is not None:
            state.append(rng.standard_normal(shape).astype(dtype))
        else:
            state.append(np.zeros(shape, dtype))
    return state
