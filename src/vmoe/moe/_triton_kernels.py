"""Triton kernels of :func:`vmoe.moe.fused.bias_act` (imported only where Triton is installed).

Triton resolves the functions a kernel calls among its module's globals, so they live here, at module
level. ``TRITON_INTERPRET=1`` must be set before this module is imported for the interpreter to run them.
"""

import triton
import triton.language as tl


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:  # tanh-GELU: 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
        return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACT == 1:  # exact GELU
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:  # NaN stays NaN, as torch.relu (plain max would return 0 on the GPU)
        return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 0:  # s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2), s = sigmoid(2u)
        s = tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        return s + 1.5957691216057308 * x * s * (1.0 - s) * (1.0 + 0.134145 * x * x)
    elif ACT == 1:  # Phi(x) + x phi(x)
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + 0.3989422804014327 * x * tl.exp(-0.5 * x * x)
    else:  # torch's threshold_backward: zero where x <= 0, so a NaN input passes its gradient on
        return tl.where(x <= 0.0, 0.0, 1.0)


@triton.jit
def _tile(pid, R, M, n_rb, n_mb, BR: tl.constexpr, BM: tl.constexpr):
    """Program ``pid`` -> (expert, row block, flat offsets, mask, columns, column mask); columns fastest."""
    mb = pid % n_mb
    rest = pid // n_mb
    rb = rest % n_rb
    e = rest // n_rb
    rows = rb * BR + tl.arange(0, BR)
    cols = mb * BM + tl.arange(0, BM)
    cmask = cols < M
    mask = (rows < R)[:, None] & cmask[None, :]
    offs = (e.to(tl.int64) * R + rows[:, None].to(tl.int64)) * M + cols[None, :]
    return e, rb, offs, mask, cols, cmask


@triton.jit
def bias_act_fwd(
    h_ptr, b_ptr, out_ptr, R, M, n_rb, n_mb, ACT: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr
):
    e, _rb, offs, mask, cols, cmask = _tile(tl.program_id(0), R, M, n_rb, n_mb, BR, BM)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + e * M + cols, mask=cmask, other=0.0).to(tl.float32)
    y = _act(h + b[None, :], ACT)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_act_bwd(
    g_ptr, h_ptr, b_ptr, gh_ptr, part_ptr, R, M, n_rb, n_mb,
    ACT: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BIAS_GRAD: tl.constexpr,
):  # fmt: skip
    e, rb, offs, mask, cols, cmask = _tile(tl.program_id(0), R, M, n_rb, n_mb, BR, BM)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + e * M + cols, mask=cmask, other=0.0).to(tl.float32)
    gh = tl.where(mask, g * _act_grad(h + b[None, :], ACT), 0.0)
    tl.store(gh_ptr + offs, gh.to(gh_ptr.dtype.element_ty), mask=mask)
    if BIAS_GRAD:  # this tile's share of the bias gradient, summed over its rows in float32
        part = (e.to(tl.int64) * n_rb + rb) * M + cols
        tl.store(part_ptr + part, tl.sum(gh, axis=0), mask=cmask)


@triton.jit
def combine_bwd(
    g_ptr, y_ptr, src_ptr, w_ptr, gy_ptr, dot_ptr, rows,
    D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, GRAD_Y: tl.constexpr, DOTS: tl.constexpr,
):  # fmt: skip
    """Rows ``r`` of a BR-row block: gy[r] = w[r] * g[src[r]], dot[r] = <y[r], g[src[r]]> (float32).
    D (the model width) is a compile-time constant: one compile per width, a loop of known length."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = r < rows
    src = tl.load(src_ptr + r, mask=rmask, other=0).to(tl.int64)
    w = tl.load(w_ptr + r, mask=rmask, other=0.0).to(tl.float32)
    at = r.to(tl.int64) * D
    acc = tl.zeros((BR,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        mask = rmask[:, None] & (cols < D)[None, :]
        gv = tl.load(g_ptr + src[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if DOTS:
            yv = tl.load(y_ptr + at[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(yv * gv, axis=1)
        if GRAD_Y:
            tl.store(
                gy_ptr + at[:, None] + cols[None, :], (gv * w[:, None]).to(gy_ptr.dtype.element_ty), mask=mask
            )
    if DOTS:
        tl.store(dot_ptr + r, acc, mask=rmask)
