"""History attention whose memory is linear in L, exact, exportable to ONNX Runtime 1.19.

Plain attention materialises [H, L, L] scores: at L = 8192 the user encoder took 6 s and +5 GiB.
Here:

* bidirectional history: one `com.microsoft.MultiHeadAttention` (ORT contrib op, present in the
  production container's ONNX Runtime on CPU and CUDA): unmasked, it runs ORT's flash-attention
  kernel on CPU, with no [L, L] buffer;
* causal history: one ONNX `Loop` over query blocks of at most CAUSAL_BLOCK rows. Each block's
  diagonal part (the only part that needs the mask) runs in plain ops over [H, block, block];
  all earlier keys go through MultiHeadAttention, unmasked;
* candidates (target_fusion): one MultiHeadAttention over the shared history K/V, each
  candidate's own key merged in exactly (below). Nothing grows with N x L.

The "sink" trick merges two partial attentions although MultiHeadAttention returns only the
normalised output, not its softmax normaliser: the extra part enters as ONE extra key, the sink,
placed first. Every key gets `sink_pad` zero dims appended, the sink key is (0..0, 1, 0..), and each
query gets its wanted sink score c_i in that dim, so the sink scores exactly c_i. The sink's
value is (0..0, 1, 0..): column head_dim of the output is the sink's probability p_i, the first
head_dim columns the other keys' part, already normalised over [keys, sink]. Then
out_i = o_i[:head_dim] + p_i * u_i, where u_i is the normalised output of the part the sink
stands for and c_i its log-sum-exp:
  * candidates: the sink is the candidate's own key: c_i = q_i.k_i, u_i = v_i;
  * causal history: per query block, the sink is the masked diagonal block: c_i = its LSE,
    u_i = its (plain-op) attention output.
Exact to float rounding: against an fp64 reference, user_kv within 1e-5 of its largest value
and scores within 1e-6 (5e-5 with attention logits in the hundreds, fp32's own rounding of
such logits), fp16 exports within 5e-3, on a seeded sweep across every block and threshold
edge (tests/test_attention_fuzz.py). No graph constant depends on max_history (the diagonal
triangle comes from a Range).

ONNX Runtime 1.19 pitfalls handled here: MultiHeadAttention kills the process (SIGFPE) on zero
queries, so a dummy query row rides along where L or N can be 0; 0 keys with >= 1 query is fine.
Non-tensor arguments of the autograd Functions must be plain Python ints/floats (traced shapes
arrive in `symbolic` as graph values). Eager torch runs the same math blockwise
(`_eager_attention`), so the torch model and the ONNX graphs agree and the torch model's memory is
linear too.

The sink's extra head dims depend on the target (`sink_pad`, chosen at export by
`export_target`): on CPU one dim (head size 33 for head_dim 32), measured 10-20 % faster than 8
at L >= 8192; on GPU the fused CUDA kernels of MultiHeadAttention (flash / memory-efficient
attention) want head sizes in multiples of 8, so the gpu target pads to the next multiple of 8
(head size 40 for head_dim 32). Both are exact; only the speed differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor

CAUSAL_BLOCK = 256  # max history query rows per causal block. Memory: O(L) + [H, 256, 256].
TARGETS = ("cpu", "gpu")  # what an export is tuned for (the sink's padding, module docstring)
_target = "cpu"


def sink_pad(head_dim: int, target: str) -> int:
    """Extra MultiHeadAttention head dims for the sink: >= 1 (the sink's score and probability
    ride in the first); on gpu enough to make the head size a multiple of 8."""
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}: one of {', '.join(TARGETS)}")
    return 1 if target == "cpu" else 8 - head_dim % 8


@contextlib.contextmanager
def export_target(target: str) -> Iterator[None]:
    """Trace graphs for `target` inside this block (the symbolic functions read it)."""
    global _target
    sink_pad(8, target)  # validates
    previous, _target = _target, target
    try:
        yield
    finally:
        _target = previous
# Small requests take plain ops instead (an ONNX If on the size): below these sizes the Loop and
# MultiHeadAttention calls cost more than the [H, L, L] / [H, N, L] scores they avoid, which stay
# small here (measured: user_encoder 2.0 vs 2.7 ms at L = 256; target_fusion 1.4 vs 2.4 ms at
# N = 50, L = 1000). The plain causal path slices a constant [PLAIN_CAUSAL_MAX]^2 mask: its size
# is fixed, it does not grow with max_history.
PLAIN_CAUSAL_MAX = 512
PLAIN_FUSION_MAX_CELLS = 1 << 20  # N x (L + 1) score cells per head


# --------------------------------------------------------------------------- symbolic helpers
def _onnx_const(g, value, dtype=torch.int64):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _float_dtype(value) -> torch.dtype:
    """torch dtype of a symbolic value (fp32 / fp16 exports)."""
    return {"Half": torch.float16, "BFloat16": torch.bfloat16}.get(
        value.type().scalarType(), torch.float32)


def _eager_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                     block: int = CAUSAL_BLOCK) -> Tensor:
    """Eager torch reference, [H, L, dh] -> [H, L, dh], memory O(block x L): blocks of query
    rows, each over its visible keys."""
    n = q.shape[-2]
    if n == 0:
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    outs = []
    for s in range(0, n, block):
        e = min(s + block, n)
        kk, vv = (k[..., :e, :], v[..., :e, :]) if causal else (k, v)
        scores = (q[..., s:e, :] * scale) @ kk.transpose(-1, -2)
        if causal:
            pos = torch.arange(e)
            scores = scores.masked_fill(pos[None, :] > pos[s:e, None], float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ vv)
    return torch.cat(outs, dim=-2)


def _with_sink(g, x, h: int, dh: int, dt: torch.dtype):
    """Keys or values x [T, H, dh] -> [1, 1+T, H*(dh+pad)] for MultiHeadAttention: the sink
    row (0..0, 1, 0..) first, then x with `sink_pad` zero dims appended (module docstring)."""
    pad = sink_pad(dh, _target)
    sink = torch.zeros(1, h, dh + pad, dtype=dt)
    sink[..., dh] = 1.0
    widened = g.op("Pad", x, _onnx_const(g, [0, 0, 0, 0, 0, pad]))
    return g.op("Reshape", g.op("Concat", g.op("Constant", value_t=sink), widened, axis_i=0),
                _onnx_const(g, [1, -1, h * (dh + pad)]))


# --------------------------------------------------------------------------- MHA contrib op
class _MultiHeadAttention(torch.autograd.Function):
    """com.microsoft.MultiHeadAttention(q [1,S,H*a], k [1,T,H*a], v [1,T,H*b]) -> [1,S,H*b],
    unmasked. Eager: the same math in torch. ORT 1.19 CPU: flash attention, memory O(S + T)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float) -> Tensor:
        def split(x: Tensor) -> Tensor:  # [1, T, H*a] -> [H, T, a]; T may be 0
            return x[0].reshape(x.shape[1], num_heads, x.shape[2] // num_heads).transpose(0, 1)

        o = _eager_attention(split(q), split(k), split(v), scale, causal=False)
        return o.transpose(0, 1).reshape(1, q.shape[1], v.shape[2])

    @staticmethod
    def symbolic(g, q, k, v, num_heads, scale):
        return g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads,
                    scale_f=scale)


def bidirectional_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                            scale: float) -> Tensor:
    """Unmasked self-attention, q, k, v [L, d] -> [L, d], through MultiHeadAttention.

    One zero query row rides at the end and is dropped: ORT 1.19's MHA kills the process
    (SIGFPE) on 0 queries (L = 0); 0 keys with >= 1 query is fine (the row comes out 0)."""
    q = torch.cat([q, q.new_zeros(1, q.shape[1])])
    o = _MultiHeadAttention.apply(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), num_heads, scale)
    return o[0, :-1]


# --------------------------------------------------------------------------- causal history
class _CausalAttention(torch.autograd.Function):
    """Causal self-attention q, k, v [L, d] -> [L, d] as ONE ONNX Loop over
    nb = max(1, ceil(L / block)) query blocks of bs = ceil(L / nb) <= block rows (balanced;
    the rows padded with zeros). Block [s, e): its diagonal [bs, bs] scores in plain ops, masked
    by a [bs, bs] triangle built once per request
    -> max, sum, LSE and the normalised diagonal output; keys [0, s) through MultiHeadAttention
    with a sink scored at that LSE (see the module docstring). Padded rows/keys sit after every
    real one, so causality hides them from real queries. Memory O(L + block^2): MHA's CPU path
    for an unmasked call is flash attention (no [rows, keys] buffer)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, num_heads: int, head_dim: int,
                scale: float, block: int) -> Tensor:
        n = q.shape[0]
        split = lambda x: x.reshape(n, num_heads, head_dim).transpose(0, 1)  # noqa: E731
        o = _eager_attention(split(q), split(k), split(v), scale, causal=True, block=block)
        return o.transpose(0, 1).reshape(n, num_heads * head_dim)

    @staticmethod
    def symbolic(g, q, k, v, num_heads, head_dim, scale, block):
        """If 1 <= L <= PLAIN_CAUSAL_MAX: plain masked attention, else the blocked Loop."""
        c = lambda value, dtype=torch.int64: _onnx_const(g, value, dtype)  # noqa: E731
        n = g.op("Shape", q, start_i=0, end_i=1)
        small = g.op("And", g.op("Greater", n, c([0])),
                     g.op("LessOrEqual", n, c([PLAIN_CAUSAL_MAX])))
        return _if_else(
            g, small, q,
            lambda b: _plain_causal(b, q, k, v, num_heads, head_dim, scale),
            lambda b: _blocked_causal(b, q, k, v, num_heads, head_dim, scale, block))


def _if_else(g, condition, like, then_branch, else_branch):
    """ONNX If on a [1] bool: each branch builds its ops in its own block (it may read outer
    tensors by name) and returns one tensor of `like`'s type."""
    c = lambda value, dtype=torch.int64: _onnx_const(g, value, dtype)  # noqa: E731
    branch = g.op("If", g.op("Squeeze", condition, c([0])), outputs=1)
    for build in (then_branch, else_branch):
        block = branch.node().addBlock()
        block.registerOutput(build(dataclasses.replace(g, block=block)))
    branch.setType(like.type())
    return branch


def _plain_causal(g, q, k, v, h: int, dh: int, scale: float):
    """[L, d] -> [L, d] with [H, L, L] scores and the constant mask sliced to [L, L]."""
    c = lambda value, dtype=torch.int64: _onnx_const(g, value, dtype)  # noqa: E731
    dt = _float_dtype(q)
    n = g.op("Shape", q, start_i=0, end_i=1)
    as_heads = g.op("Concat", n, c([h, dh]), axis_i=0)
    qh = g.op("Transpose", g.op("Reshape", g.op("Mul", q, c(scale, dt)), as_heads),
              perm_i=[1, 0, 2])  # [H, L, dh]
    kt = g.op("Transpose", g.op("Reshape", k, as_heads), perm_i=[1, 2, 0])  # [H, dh, L]
    vh = g.op("Transpose", g.op("Reshape", v, as_heads), perm_i=[1, 0, 2])  # [H, L, dh]
    pos = torch.arange(PLAIN_CAUSAL_MAX)
    mask = torch.where(pos[None, :] <= pos[:, None], 0.0, float("-inf")).to(dt)
    bias = g.op("Slice", g.op("Constant", value_t=mask), g.op("Concat", c([0]), c([0]), axis_i=0),
                g.op("Concat", n, n, axis_i=0), c([0, 1]))  # [L, L]
    probs = g.op("Softmax", g.op("Add", g.op("MatMul", qh, kt), bias), axis_i=-1)
    out = g.op("Transpose", g.op("MatMul", probs, vh), perm_i=[1, 0, 2])  # [L, H, dh]
    return g.op("Reshape", out, g.op("Concat", n, c([h * dh]), axis_i=0))


def _blocked_causal(g, q, k, v, h: int, dh: int, scale: float, block: int):
    """[L, d] -> [L, d] through the Loop over query blocks (see _CausalAttention)."""
    pad = sink_pad(dh, _target)
    hx = dh + pad
    c = lambda value, dtype=torch.int64: _onnx_const(g, value, dtype)  # noqa: E731
    dt = _float_dtype(q)
    zero, one = c([0]), c([1])
    n = g.op("Shape", q, start_i=0, end_i=1)  # [1] = L
    nb = g.op("Max", g.op("Div", g.op("Add", n, c([block - 1])), c([block])), one)
    bs = g.op("Max", g.op("Div", g.op("Sub", g.op("Add", n, nb), one), nb), one)
    padded = g.op("Mul", nb, bs)
    rows = g.op("Concat", zero, zero, g.op("Sub", padded, n), zero, axis_i=0)
    as_heads = g.op("Concat", padded, c([h, dh]), axis_i=0)
    qp = g.op("Reshape", g.op("Pad", g.op("Mul", q, c(scale, dt)), rows), as_heads)
    kp = g.op("Reshape", g.op("Pad", k, rows), as_heads)  # [Lp, H, dh]
    vp = g.op("Reshape", g.op("Pad", v, rows), as_heads)
    kx, vx = (_with_sink(g, t, h, dh, dt) for t in (kp, vp))  # [1, 1+Lp, H*hx]
    qh = g.op("Transpose", qp, perm_i=[1, 0, 2])  # [H, Lp, dh]
    kth = g.op("Transpose", kp, perm_i=[1, 2, 0])  # [H, dh, Lp]
    vh = g.op("Transpose", vp, perm_i=[1, 0, 2])  # [H, Lp, dh]
    r = g.op("Range", c(0), g.op("Squeeze", bs, zero), c(1))
    tri = g.op("LessOrEqual", g.op("Unsqueeze", r, zero), g.op("Unsqueeze", r, one))  # [bs, bs]
    cond = c(True, torch.bool)
    loop = g.op("Loop", g.op("Squeeze", nb, zero), cond, outputs=1)
    body = loop.node().addBlock()
    b = dataclasses.replace(g, block=body)
    cb = lambda value, dtype=torch.int64: _onnx_const(b, value, dtype)  # noqa: E731
    it = body.addInputToBlock()  # iteration number
    body.addInputToBlock()  # cond_in
    s = b.op("Mul", b.op("Unsqueeze", it, cb([0])), bs)
    e = b.op("Add", s, bs)
    qb = b.op("Slice", qh, s, e, cb([1]))  # [H, bs, dh]
    sd = b.op("MatMul", qb, b.op("Slice", kth, s, e, cb([2])))  # [H, bs, bs]
    sd = b.op("Where", tri, sd, cb(float("-inf"), dt))
    md = b.op("ReduceMax", sd, axes_i=[-1], keepdims_i=1)  # finite: the diagonal is visible
    ed = b.op("Exp", b.op("Sub", sd, md))
    zd = b.op("ReduceSum", ed, cb([-1]), keepdims_i=1)  # [H, bs, 1]
    od = b.op("Div", b.op("MatMul", ed, b.op("Slice", vh, s, e, cb([1]))), zd)  # [H, bs, dh]
    lse = b.op("Pad", b.op("Add", md, b.op("Log", zd)), cb([0, 0, 0, 0, 0, pad - 1]))
    qx = b.op("Reshape", b.op("Transpose", b.op("Concat", qb, lse, axis_i=2), perm_i=[1, 0, 2]),
              cb([1, -1, h * hx]))  # [1, bs, H*hx]
    s1 = b.op("Add", s, cb([1]))  # the sink + keys [0, s)
    o = b.op("com.microsoft::MultiHeadAttention", qx, b.op("Slice", kx, cb([0]), s1, cb([1])),
             b.op("Slice", vx, cb([0]), s1, cb([1])), num_heads_i=h, scale_f=1.0)
    o = b.op("Reshape", o, cb([-1, h, hx]))  # [bs, H, hx]
    o_prefix = b.op("Slice", o, cb([0]), cb([dh]), cb([2]))
    p_diag = b.op("Slice", o, cb([dh]), cb([dh + 1]), cb([2]))
    ob = b.op("Add", o_prefix, b.op("Mul", p_diag, b.op("Transpose", od, perm_i=[1, 0, 2])))
    body.registerOutput(b.op("Identity", cond))
    body.registerOutput(ob)  # scan output: [nb, bs, H, dh]
    out = g.op("Reshape", loop, g.op("Concat", padded, c([h * dh]), axis_i=0))
    return g.op("Slice", out, zero, n, zero)  # [L, d]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, head_dim: int,
                     scale: float, block: int = CAUSAL_BLOCK) -> Tensor:
    """Causal self-attention q, k, v [L, d] -> [L, d], exact, memory O(L + block^2)."""
    return _CausalAttention.apply(q, k, v, num_heads, head_dim, scale, block)


class _CandidateAttention(torch.autograd.Function):
    """N candidates against the shared history K/V (see candidate_attention). In the graph: an
    If on N x (L + 1): small requests take the plain formulation (one [H, N, L+1] score block
    per head, the own key's score appended as a column, one softmax), large ones the sink
    formulation through MultiHeadAttention (no score block of the whole request). L = 0 always
    takes the sink path (ORT 1.19 fuses the plain MatMul into a kernel that fails on empty
    keys)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, k_hist: Tensor, v_hist: Tensor,
                num_heads: int, head_dim: int) -> Tensor:
        parts = []
        for s in range(0, max(q.shape[0], 1), 1024):  # eager memory: O(1024 x L)
            qh = q[s:s + 1024].transpose(0, 1)  # [H, n, dh]
            own = (q[s:s + 1024] * k[s:s + 1024]).sum(-1).transpose(0, 1).unsqueeze(-1)
            probs = torch.softmax(torch.cat([qh @ k_hist.transpose(-1, -2), own], -1), -1)
            attn = probs[..., :-1] @ v_hist + probs[..., -1:] * v[s:s + 1024].transpose(0, 1)
            parts.append(attn.transpose(0, 1))
        return torch.cat(parts)[: q.shape[0]]

    @staticmethod
    def symbolic(g, q, k, v, k_hist, v_hist, num_heads, head_dim):
        c = lambda value, dtype=torch.int64: _onnx_const(g, value, dtype)  # noqa: E731
        n = g.op("Shape", q, start_i=0, end_i=1)
        length = g.op("Shape", k_hist, start_i=1, end_i=2)
        cells = g.op("Mul", n, g.op("Add", length, c([1])))
        small = g.op("And", g.op("Greater", length, c([0])),
                     g.op("LessOrEqual", cells, c([PLAIN_FUSION_MAX_CELLS])))
        return _if_else(
            g, small, q,
            lambda b: _plain_candidates(b, q, k, v, k_hist, v_hist, length),
            lambda b: _sink_candidates(b, q, k, v, k_hist, v_hist, num_heads, head_dim))


def _plain_candidates(g, q, k, v, k_hist, v_hist, length):
    """[N, H, dh] -> [N, H, dh]: head-major [H,N,dh] x [H,dh,L] scores, own key as a column."""
    c = lambda value, dtype=torch.int64: _onnx_const(g, value, dtype)  # noqa: E731
    qh = g.op("Transpose", q, perm_i=[1, 0, 2])  # [H, N, dh]
    scores = g.op("MatMul", qh, g.op("Transpose", k_hist, perm_i=[0, 2, 1]))  # [H, N, L]
    own = g.op("Transpose", g.op("ReduceSum", g.op("Mul", q, k), c([-1]), keepdims_i=1),
               perm_i=[1, 0, 2])  # [H, N, 1]
    probs = g.op("Softmax", g.op("Concat", scores, own, axis_i=2), axis_i=-1)
    hist = g.op("Slice", probs, c([0]), length, c([2]))
    self_p = g.op("Slice", probs, length, g.op("Add", length, c([1])), c([2]))
    attn = g.op("Add", g.op("MatMul", hist, v_hist),
                g.op("Mul", self_p, g.op("Transpose", v, perm_i=[1, 0, 2])))  # [H, N, dh]
    return g.op("Transpose", attn, perm_i=[1, 0, 2])


def _sink_candidates(g, q, k, v, k_hist, v_hist, h: int, dh: int):
    """[N, H, dh] -> [N, H, dh]: one MultiHeadAttention over [sink; history], the sink being
    the own key (module docstring)."""
    c = lambda value, dtype=torch.int64: _onnx_const(g, value, dtype)  # noqa: E731
    dt = _float_dtype(q)
    pad = sink_pad(dh, _target)
    hx = dh + pad
    own = g.op("ReduceSum", g.op("Mul", q, k), c([-1]), keepdims_i=1)  # [N, H, 1]
    qx = g.op("Concat", q, g.op("Pad", own, c([0, 0, 0, 0, 0, pad - 1])), axis_i=2)
    qx = g.op("Reshape", qx, c([1, -1, h * hx]))  # [1, N, H*hx]
    kx, vx = (_with_sink(g, g.op("Transpose", t, perm_i=[1, 0, 2]), h, dh, dt)
              for t in (k_hist, v_hist))  # [1, 1+L, H*hx]
    o = g.op("com.microsoft::MultiHeadAttention", qx, kx, vx, num_heads_i=h, scale_f=1.0)
    o = g.op("Reshape", o, c([-1, h, hx]))  # [N, H, hx]
    return g.op("Add", g.op("Slice", o, c([0]), c([dh]), c([2])),
                g.op("Mul", g.op("Slice", o, c([dh]), c([dh + 1]), c([2])), v))


def candidate_attention(q: Tensor, k: Tensor, v: Tensor, k_hist: Tensor, v_hist: Tensor,
                        num_heads: int, head_dim: int) -> Tensor:
    """N candidate queries q [N, H, dh] (already scaled), their own keys/values k, v [N, H, dh],
    and the shared history K/V [H, L, dh] -> [N, H, dh].

    Each candidate attends to all L history keys and to its own key, never to another
    candidate. The history K/V enters once: never N copies; above PLAIN_FUSION_MAX_CELLS, never
    an [N, L] score block of the whole request at once. N must be >= 1 (score_candidates' dummy
    candidate). num_heads and head_dim are plain ints: traced shapes cannot reach the op's
    attributes."""
    return _CandidateAttention.apply(q, k, v, k_hist, v_hist, num_heads, head_dim)
