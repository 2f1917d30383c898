"""HSTU's pointwise attention with its relative bias, exact and with memory linear in L, in eager
torch and as one ONNX Loop (ONNX Runtime 1.19, opset 17).

For query i and key j of head h (keys are the history events 0..Lk-1, in order):

    w_ij = SiLU(q_i . k_j + pos_bias[h, pb(pos_i - j)] + time_bias[h, tb(t_i - t_j)]) / norm
    out_i = sum over visible j of w_ij v_j        (causal: visible iff j <= pos_i)

with q already scaled. No softmax: nothing normalises over the keys, so attention over blocks
of keys or of query rows simply adds up, and no log-sum-exp merge is needed (the reference
model's export/attention.py needs its "sink" for that). `norm` is a length constant
(max_history), as HSTU divides by its maximum sequence length.

Buckets, the same integers on every runtime (a bucket that flips between torch and ONNX Runtime
would move a score far past any tolerance):
* pb(r) = clamp(r, 0, P - 1): the relative position, one learned value per distance up to P-1
  (computed in float32 in the graph: exact for positions below 2^24);
* tb(dt) = 0 for dt = 0, else 1 + floor(log2(min(|dt|, 2^(T-2)))): log-spaced time buckets,
  dt = float64(t_i) - float64(t_j) (exact for |t| < 2^53, so for any unix-seconds timestamp;
  beyond, the rounding is IEEE's and identical everywhere). The value reaching the log is an
  integer in [1, 2^29]; float64's error in log(x)/log(2) is ~1e-14, while log2 of an integer
  below 2^29 that is not a power of two lies at least 2.7e-9 below the next integer, so
  floor(... + 1e-10) is the integer floor(log2) on any libm.
The two tables are added into one [H, P*T] table and read with one Gather per block.

Memory: queries run in blocks of at most `block` rows (balanced, at least one block: the rows
padded, the padding dropped), each over the keys it may see: O(block x L) per head, never
[L, L]. The same blocking runs in eager torch (so the torch model's memory is linear too).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from export.attention import _onnx_const

MAX_TIME_BUCKETS = 31  # 2^(T-2) <= 2^29 keeps the float64 log exact (module docstring)
_LOG2_SCALE = 1.0 / math.log(2.0)
_LOG2_EPS = 1e-10


def position_bucket(rel: Tensor, buckets: int) -> Tensor:
    """int64 relative positions -> [0, buckets)."""
    return rel.clamp(0, buckets - 1)


def time_bucket(dt: Tensor, buckets: int) -> Tensor:
    """float64 time differences (seconds) -> float64 buckets in [0, buckets): 0 for no gap,
    then log2-spaced."""
    d = dt.abs().clamp(max=2 ** (buckets - 2))
    lg = torch.floor(torch.log(d.clamp(min=1)) * _LOG2_SCALE + _LOG2_EPS)
    return lg + d.clamp(max=1)  # d = 0: log2(1) + 0 = bucket 0


def combined_table(pos_table: Tensor, time_table: Tensor) -> Tensor:
    """[H, P] and [H, T] -> [H, P*T], entry p*T + t = pos_table[p] + time_table[t]: one Gather
    per block instead of two (Gather is the attention's costliest op in ONNX Runtime)."""
    return (pos_table[:, :, None] + time_table[:, None, :]).reshape(pos_table.shape[0], -1)


def relative_bias(q_pos: Tensor, q_time: Tensor, k_pos: Tensor, k_time: Tensor,
                  pos_table: Tensor, time_table: Tensor) -> Tensor:
    """Queries [M] x keys [K] -> bias [H, M, K] from the tables [H, P] and [H, T]."""
    buckets = time_table.shape[1]
    pb = position_bucket(q_pos[:, None] - k_pos[None, :], pos_table.shape[1])
    tb = time_bucket(q_time.double()[:, None] - k_time.double()[None, :], buckets)
    return combined_table(pos_table, time_table)[:, pb * buckets + tb.long()]


def _eager(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, q_time: Tensor, k_time: Tensor,
           pos_table: Tensor, time_table: Tensor, norm: float, block: int,
           causal: bool, shared: bool) -> Tensor:
    """The blocked computation in torch: [H, M, a] queries -> [H, M, b]."""
    m, length = q.shape[1], k.shape[1]
    out = []
    for s in range(0, m, block):
        e = min(s + block, m)
        rows = slice(s, s + 1) if shared else slice(s, e)  # shared: one bias row for all
        pos = q_pos[rows]
        lim = min(length, int(pos.max()) + 1) if causal else length
        k_pos = torch.arange(lim)
        z = q[:, s:e] @ k[:, :lim].transpose(1, 2) + relative_bias(
            pos, q_time[rows], k_pos, k_time[:lim], pos_table, time_table)
        w = torch.nn.functional.silu(z)
        if causal:
            w = w * (k_pos[None, :] <= pos[:, None]).to(w.dtype)
        out.append((w @ v[:, :lim]) / norm)
    if not out:
        return q.new_zeros((q.shape[0], 0, v.shape[2]))
    return torch.cat(out, dim=1)


class _PointwiseAttention(torch.autograd.Function):
    """Eager: `_eager`. ONNX: one Loop over query blocks (`_loop`). Non-tensor arguments are
    plain Python values: they become graph constants."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, q_time, k_time, pos_table, time_table, norm: float,
                block: int, causal: bool, shared: bool):
        return _eager(q, k, v, q_pos, q_time, k_time, pos_table, time_table, norm, block, causal,
                      shared)

    @staticmethod
    def symbolic(g, q, k, v, q_pos, q_time, k_time, pos_table, time_table, norm, block,
                 causal, shared):
        return _loop(g, q, k, v, q_pos, q_time, k_time, pos_table, time_table, norm, block,
                     causal, shared)


def _tables_buckets(table) -> int:
    """Static bucket count of a [H, B] table parameter in the traced graph."""
    return table.type().sizes()[1]


def _time_bucket_graph(b, dt, buckets: int):
    """tb(dt) in ONNX ops on float64, the same arithmetic as `time_bucket`."""
    c = lambda value: _onnx_const(b, value, torch.float64)  # noqa: E731
    d = b.op("Min", b.op("Abs", dt), c(2.0 ** (buckets - 2)))
    lg = b.op("Floor", b.op("Add", b.op("Mul", b.op("Log", b.op("Max", d, c(1.0))),
                                        c(_LOG2_SCALE)), c(_LOG2_EPS)))
    return b.op("Add", lg, b.op("Min", d, c(1.0)))


def _loop(g, q, k, v, q_pos, q_time, k_time, pos_table, time_table, norm: float, block: int,
          causal: bool, shared: bool):
    """[H, M, a] -> [H, M, b] as an ONNX Loop over nb = max(1, ceil(M / block)) blocks of
    bs = ceil(M / nb) rows; padded rows (position 0, time 0) are computed and dropped. With
    `shared` the bias and mask come from each block's first row (a real one whenever M > 0)."""
    c = lambda value, dtype=torch.int64: _onnx_const(g, value, dtype)  # noqa: E731
    pos_buckets, time_buckets = _tables_buckets(pos_table), _tables_buckets(time_table)
    zero, one = c([0]), c([1])
    m = g.op("Shape", q, start_i=1, end_i=2)  # [1]
    length = g.op("Shape", k, start_i=1, end_i=2)
    nb = g.op("Max", g.op("Div", g.op("Add", m, c([block - 1])), c([block])), one)
    bs = g.op("Max", g.op("Div", g.op("Sub", g.op("Add", m, nb), one), nb), one)
    pad = g.op("Sub", g.op("Mul", nb, bs), m)
    qp = g.op("Pad", q, g.op("Concat", zero, zero, zero, zero, pad, zero, axis_i=0))
    pos_p = g.op("Pad", q_pos, g.op("Concat", zero, pad, axis_i=0))  # int64: the key limit
    # Bucket arithmetic in floating point, where ONNX Runtime's elementwise kernels are
    # vectorised (its int64 ones are several times slower): positions in float32 (exact below
    # 2^24), times in float64 (exact for |t| < 2^53; see the module docstring).
    # (Cast before Pad: ORT's optimiser warns when it cannot reorder a Cast read by the loop.)
    rows = g.op("Concat", zero, pad, axis_i=0)
    pos_f = g.op("Pad", g.op("Cast", q_pos, to_i=1), rows)  # 1: FLOAT
    time_p = g.op("Pad", g.op("Cast", q_time, to_i=11), rows)  # 11: DOUBLE
    k_time_d = g.op("Cast", k_time, to_i=11)  # 11: DOUBLE
    kt = g.op("Transpose", k, perm_i=[0, 2, 1])  # [H, a, Lk]
    table = g.op("Reshape", g.op("Add", g.op("Unsqueeze", pos_table, c([2])),
                                 g.op("Unsqueeze", time_table, c([1]))),
                 c([0, -1]))  # [H, P*T], as combined_table
    loop = g.op("Loop", g.op("Squeeze", nb, zero), c(True, torch.bool), outputs=1)
    body = loop.node().addBlock()
    b = dataclasses.replace(g, block=body)
    cb = lambda value, dtype=torch.int64: _onnx_const(b, value, dtype)  # noqa: E731
    it = body.addInputToBlock()
    cond = body.addInputToBlock()
    s = b.op("Mul", b.op("Unsqueeze", it, cb([0])), bs)
    e = b.op("Add", s, bs)
    qb = b.op("Slice", qp, s, e, cb([1]))  # [H, bs, a]
    e_bias = b.op("Add", s, cb([1])) if shared else e  # the rows the bias is computed for
    pos = b.op("Slice", pos_p, s, e_bias, cb([0]))  # [bs] (shared: [1])
    times = b.op("Slice", time_p, s, e_bias, cb([0]))
    if causal:  # keys up to the block's last visible one
        lim = b.op("Min", b.op("Add", b.op("ReduceMax", pos, keepdims_i=1), cb([1])), length)
    else:
        lim = length
    f32 = lambda value: _onnx_const(b, value, torch.float32)  # noqa: E731
    k_pos = b.op("Range", f32(0.0), b.op("Cast", b.op("Squeeze", lim, cb([0])), to_i=1),
                 f32(1.0))  # [lim], float32
    z = b.op("MatMul", qb, b.op("Slice", kt, cb([0]), lim, cb([2])))  # [H, bs, lim]
    rel = b.op("Sub", b.op("Unsqueeze", b.op("Slice", pos_f, s, e_bias, cb([0])), cb([1])),
               b.op("Unsqueeze", k_pos, cb([0])))  # [bs, lim]
    pb = b.op("Min", b.op("Max", rel, f32(0.0)), f32(float(pos_buckets - 1)))
    dt = b.op("Sub", b.op("Unsqueeze", times, cb([1])),
              b.op("Unsqueeze", b.op("Slice", k_time_d, cb([0]), lim, cb([0])), cb([0])))
    tb = b.op("Cast", _time_bucket_graph(b, dt, time_buckets), to_i=1)
    index = b.op("Cast", b.op("Add", b.op("Mul", pb, f32(float(time_buckets))), tb), to_i=7)
    z = b.op("Add", z, b.op("Gather", table, index, axis_i=1))
    w = b.op("Mul", z, b.op("Sigmoid", z))  # SiLU (no SiLU op at opset 17)
    if causal:  # a 0/1 factor: cheaper than Where in ONNX Runtime, and exact
        w = b.op("Mul", w, b.op("Cast", b.op("GreaterOrEqual", rel, f32(0.0)), to_i=1))
    vb = b.op("Slice", v, cb([0]), lim, cb([1]))
    ob = b.op("Div", b.op("MatMul", w, vb), cb(float(norm), torch.float32))  # [H, bs, b]
    body.registerOutput(b.op("Identity", cond))
    body.registerOutput(ob)
    heads = g.op("Shape", q, start_i=0, end_i=1)
    dv = g.op("Shape", v, start_i=2, end_i=3)
    out = g.op("Transpose", loop, perm_i=[1, 0, 2, 3])  # [H, nb, bs, b]
    out = g.op("Reshape", out, g.op("Concat", heads, g.op("Mul", nb, bs), dv, axis_i=0))
    return g.op("Slice", out, zero, m, one)


def pointwise_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, q_time: Tensor,
                        k_time: Tensor, pos_table: Tensor, time_table: Tensor, norm: float,
                        block: int, causal: bool, shared: bool = False) -> Tensor:
    """Queries q [H, M, a] (scaled) at positions q_pos [M] (non-decreasing) and times q_time [M]
    against keys k [H, Lk, a], values v [H, Lk, b] of events 0..Lk-1 at times k_time [Lk]
    -> [H, M, b]. pos_table [H, P], time_table [H, T] (T <= MAX_TIME_BUCKETS). Exact, memory
    O(block x Lk) (module docstring). `shared`: every query has the same position and time
    (M-FALCON candidates), so one bias row serves them all."""
    if time_table.shape[1] > MAX_TIME_BUCKETS:
        raise ValueError(f"at most {MAX_TIME_BUCKETS} time buckets (exact float64 log2)")
    return _PointwiseAttention.apply(q, k, v, q_pos, q_time, k_time, pos_table, time_table,
                                     float(norm), int(block), bool(causal), bool(shared))
