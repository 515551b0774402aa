"""Stacked expert MLPs: E identical-architecture MLPs applied to their capacity buffers at once."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from vmoe.layers import (
    Activation,
    activation,
    activation_backward,
    compute_dtype,
    dropout,
    prefer_static_shapes,
    xavier_uniform_,
)
from vmoe.moe.fused import bias_act, fused_bias_act_usable

__all__ = ["Experts", "Slab", "expert_slabs"]


class Slab(NamedTuple):
    """A slab of packed rows: ``width`` experts ``expert, expert + stride, ...``, ``rows`` rows each
    (see :func:`expert_slabs`)."""

    expert: int
    width: int
    rows: int
    stride: int = 1

    @property
    def experts(self) -> slice:
        """The slab's experts, as a slice of the stacked weights (E, ...)."""
        return slice(self.expert, self.expert + (self.width - 1) * self.stride + 1, self.stride)

    def members(self) -> range:
        """The slab's expert ids, in order."""
        return range(self.expert, self.expert + self.width * self.stride, self.stride)


def expert_slabs(counts: Sequence[int], width: int = 1, *, by_count: bool = False) -> list[Slab]:
    """The layout of packed rows for the experts: consecutive *slabs*.

    A slab ``(e, w, m, s)`` is ``w * m`` consecutive rows: expert ``e``'s next ``m`` rows, then expert
    ``e + s``'s next ``m``, ... up to expert ``e + (w - 1) s``: a (w, m, D) tensor that one batched
    matmul runs over with the experts' stacked weights ``w1[e : e + (w - 1) s + 1 : s]``. ``width``
    1: one slab per expert, all its rows (expert-major order). ``width`` w > 1: groups of w
    consecutive experts, first a slab of the group's smallest count, then each expert's remaining
    rows in a width-1 slab. On the CPU a batched matmul splits its batch over threads (each product on
    one thread), which runs the few-hundred-row products of many small experts much faster than
    splitting each product (benchmarks/RESULTS.md). Each expert's rows keep their order across its
    slabs; experts without rows appear in none.

    ``by_count`` (width 2 only): pair the experts of nearest counts instead of neighbours, so that
    hardly any rows are left over for width-1 slabs. Their weights are then strided views, which
    cost nothing to read; their weight *gradients* would be strided writes, so use it when no
    gradient is wanted (inference).

    Args:
        counts: rows per expert.
        width: experts per slab, >= 1.
        by_count: pair experts of similar counts (see above).
    """
    if width < 1:
        raise ValueError(f"slab width must be >= 1, got {width}")
    if by_count and width != 2:
        raise ValueError(f"by_count pairs experts: it needs width 2, got {width}")
    E = len(counts)
    if by_count:
        order = sorted(range(E), key=lambda e: (counts[e], e))
        groups = [sorted(order[i : i + 2]) for i in range(0, E, 2)]
        groups.sort()
    else:
        groups = [list(range(first, min(first + width, E))) for first in range(0, E, width)]
    slabs: list[Slab] = []
    for group in groups:
        m = min(counts[e] for e in group) if len(group) > 1 else 0
        if m:
            stride = group[1] - group[0] if len(group) > 1 else 1
            slabs.append(Slab(group[0], len(group), m, stride))
        slabs.extend(Slab(e, 1, counts[e] - m) for e in group if counts[e] > m)
    return slabs


def _slab_totals(slabs: Sequence[Slab], num_experts: int) -> list[int]:
    """Rows per expert that ``slabs`` hold."""
    totals = [0] * num_experts
    for slab in slabs:
        for j in slab.members():
            totals[j] += slab.rows
    return totals


def _check_slabs(slabs: Sequence[Slab], counts: Sequence[int]) -> None:
    """Raise ValueError unless ``slabs`` hold exactly ``counts`` rows per expert, and no slab mixes an
    expert's first rows with another's later ones (the backward writes, then adds, per slab)."""
    E = len(counts)
    started = [False] * E
    for slab in slabs:
        e, w, m, s = slab
        bad = w < 1 or m < 1 or s < 1 or e < 0
        if not bad:
            members = slab.members()
            bad = members[-1] >= E or len({started[j] for j in members}) > 1
        if bad:
            raise ValueError(
                f"bad slab {tuple(slab)} for {E} experts: expected (expert, width >= 1, rows >= 1, "
                "stride >= 1) within range, each expert's first rows in a slab of first rows"
            )
        for j in slab.members():
            started[j] = True
    totals = _slab_totals(slabs, E)
    if totals != list(counts):
        raise ValueError(f"slabs hold {totals} rows per expert, expected the counts {list(counts)}")


_ACT_INPLACE = {
    "gelu_tanh": lambda h: torch.ops.aten.gelu_(h, approximate="tanh"),
    "gelu": lambda h: torch.ops.aten.gelu_(h),
    "relu": lambda h: h.relu_(),
}


class _GroupedMlp(torch.autograd.Function):
    """Per-expert MLPs over the slabs of one packed (F, D) tensor (:func:`expert_slabs`), fused by hand.

    For a slab of w experts ``ex`` and rows ``s``: ``out[s] = act(x[s] @ w1[ex] + b1[ex]) @ w2[ex] + b2[ex]``,
    viewed (w, m, D), batched over its w experts. Forward and backward go slab by slab, so each
    slab's (w, m, M) hidden activations are produced and consumed while they are still in cache, and
    every result is written in place into one preallocated tensor: no per-slab outputs to
    concatenate, no ``stack`` of E weight gradients, ~10 tensor ops per slab in all (the gradients
    of an expert's second slab are accumulated). The matmuls and the activation are the kernels
    autograd would call; only the bookkeeping differs. No dropout (callers fall back to autograd).
    ``inference`` (no gradient wanted): nothing is saved, and one scratch buffer holds each slab's
    hidden activations in turn (on CUDA with width-1 slabs and tanh-GELU, the cuBLASLt epilogue
    applies bias and activation instead).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
        slabs: list[Slab],
        act: Activation,
        inference: bool = False,
    ) -> torch.Tensor:  # x (F, D), w1 (E, D, M), b1 (E, M), w2 (E, M, D), b2 (E, D) -> (F, D)
        D, M = w2.shape[2], w2.shape[1]
        x = x.contiguous()
        out = x.new_empty(x.shape[0], D)
        saved: list[torch.Tensor] = []
        ctx.slabs, ctx.act = slabs, act
        scratch = None
        if inference:  # nothing is saved: no per-slab allocations
            if x.is_cuda and act == "gelu_tanh" and all(s.width == 1 for s in slabs):
                _epilogue_rows(x, w1, b1, w2, b2, slabs, out)
                return out
            # One scratch (w * m, M) buffer for every slab's hidden activations, cache-hot across slabs.
            scratch = x.new_empty(max((s.width * s.rows for s in slabs), default=0), M)
        # A slab's biases, broadcast over its rows: (M,) of one expert, or (w, 1, M) of several.
        b1u, b2u = b1.unsqueeze(1), b2.unsqueeze(1)
        start = 0
        for slab in slabs:
            w, m = slab.width, slab.rows
            i, c1, c2 = (slab.expert, b1, b2) if w == 1 else (slab.experts, b1u, b2u)
            xs, os = _rows(x, start, w, m), _rows(out, start, w, m)
            start += w * m
            if scratch is not None:
                a = _ACT_INPLACE[act](_addmm(c1[i], xs, w1[i], out=_rows(scratch, 0, w, m)))
            else:
                h = _addmm(c1[i], xs, w1[i])  # (m, M), or (w, m, M)
                a = activation(h, act)
                saved += (h, a)
            _addmm(c2[i], a, w2[i], out=os)
        ctx.save_for_backward(x, w1, w2, *saved)  # autograd's own bookkeeping: freed after backward
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w1, w2, *saved = ctx.saved_tensors
        E = w1.shape[0]
        # _rows views both by their strides (and a saved-tensor hook may hand x back laid out otherwise).
        x, g = x.contiguous(), g.contiguous()
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        gx = torch.empty_like(x) if need_x else None
        gw1 = torch.empty_like(w1) if need_w1 else None
        gw2 = torch.empty_like(w2) if need_w2 else None
        gb1 = w1.new_empty(E, w1.shape[2]) if need_b1 else None
        gb2 = w2.new_empty(E, w2.shape[2]) if need_b2 else None
        w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)
        written = [False] * E  # an expert's first slab writes its weight gradients, later ones add
        start = 0
        for k, slab in enumerate(ctx.slabs):
            h, a = saved[2 * k], saved[2 * k + 1]  # (m, M), or (w, m, M)
            w, m = slab.width, slab.rows
            i = slab.expert if w == 1 else slab.experts
            gs = _rows(g, start, w, m)
            first = not written[slab.expert]
            if gw2 is not None:
                _mm_into(gw2[i], a.transpose(-1, -2), gs, first)
            if gb2 is not None:
                _sum_into(gb2[i], gs, first)
            gh = activation_backward(_mm(gs, w2t[i]), h, ctx.act)
            if gw1 is not None:
                _mm_into(gw1[i], _rows(x, start, w, m, transpose=True), gh, first)
            if gb1 is not None:
                _sum_into(gb1[i], gh, first)
            if gx is not None:
                _mm(gh, w1t[i], out=_rows(gx, start, w, m))
            for j in slab.members():
                written[j] = True
            start += w * m
        for e in (j for j, done in enumerate(written) if not done):  # experts without rows: zero gradients
            for t in (gw1, gb1, gw2, gb2):
                if t is not None:
                    t[e].zero_()
        return gx, gw1, gb1, gw2, gb2, None, None, None


def _epilogue_rows(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    slabs: Sequence[Slab],
    out: torch.Tensor,
) -> None:
    """Inference on CUDA over width-1 slabs: bias + tanh-GELU in the cuBLASLt epilogue of each product."""
    start = 0
    for e, _, m, _ in slabs:
        xs = x[start : start + m]
        h = torch._addmm_activation(b1[e], xs, w1[e], use_gelu=True)
        torch.addmm(b2[e], h, w2[e], out=out[start : start + m])
        start += m


# A slab's products: a width-1 slab runs the plain 2-D ops on (m, K) views (on CUDA addmm keeps its
# cuBLASLt bias epilogue; baddbmm would first copy the bias into the output), a wider one the batched ops
# on (w, m, K) views. The per-slab views are single ops (``as_strided``, one expert's weights by
# ``select``, transposes made once): with ~30 slabs a step, each op saved per slab is ~0.1 ms on a CPU.


def _rows(t: torch.Tensor, start: int, w: int, m: int, transpose: bool = False) -> torch.Tensor:
    """Rows ``start : start + w * m`` of a contiguous (F, K) tensor as (m, K), or (w, m, K) for w > 1;
    ``transpose``: (K, m) / (w, K, m). One view op."""
    K = t.shape[1]
    offset = t.storage_offset() + start * K
    if w == 1:
        return t.as_strided((K, m) if transpose else (m, K), (1, K) if transpose else (K, 1), offset)
    if transpose:
        return t.as_strided((w, K, m), (m * K, 1, K), offset)
    return t.as_strided((w, m, K), (m * K, K, 1), offset)


def _addmm(
    bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``a @ b + bias``: (m, K) @ (K, N) + (N,), or batched (w, m, K) @ (w, K, N) + (w, 1, N)."""
    if a.dim() == 2:
        return torch.addmm(bias, a, b, out=out)
    return torch.baddbmm(bias, a, b, out=out)


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b``, 2-D or batched, into ``out`` if given."""
    if a.dim() == 2:
        return torch.mm(a, b, out=out)
    return torch.bmm(a, b, out=out)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, write: bool) -> None:
    """``out = a @ b`` when ``write``, else ``out += a @ b`` (2-D or batched).

    A strided ``out`` (the gradients of a pair by count) gets the product through a contiguous
    temporary: a product written straight into strided memory took ~10% longer per training step."""
    if not out.is_contiguous():
        t = _mm(a, b)
        if write:
            out.copy_(t)
        else:
            out.add_(t)
    elif write:
        _mm(a, b, out=out)
    elif a.dim() == 2:
        out.addmm_(a, b)
    else:
        out.baddbmm_(a, b)


def _sum_into(out: torch.Tensor, t: torch.Tensor, write: bool) -> None:
    """``out = t.sum(-2)`` when ``write``, else ``out += t.sum(-2)``: t (m, W) or (w, m, W)."""
    if write:
        torch.sum(t, -2, out=out)
    else:
        out += t.sum(-2)


#: Columns :meth:`Experts.grouped_rows_input` appends to the tokens: a 1 and 7 zeros.
GROUPED_PAD = 8


def _grouped_mm_op() -> Any:
    op = getattr(torch, "_grouped_mm", None)
    if op is None:
        raise RuntimeError(
            f"experts impl 'grouped_mm' needs torch >= 2.8 (torch._grouped_mm); this is {torch.__version__}"
        )
    return op


def _check_grouped_mm_sizes(dim: int, hidden_dim: int) -> None:
    if dim % 8 or hidden_dim % 8:
        raise ValueError(
            f"experts impl 'grouped_mm' needs dim and hidden_dim multiples of 8, got {dim} and {hidden_dim}"
        )


def _warn_slow_grouped_mm(device: torch.device, dtype: torch.dtype) -> None:
    """torch._grouped_mm's fast CUDA kernel is bf16 only; other dtypes take its fallback (a loop of
    matmuls that reads the offsets back to the host: one sync per call)."""
    if device.type == "cuda" and dtype != torch.bfloat16:
        warnings.warn(
            f"experts impl 'grouped_mm' in {dtype} on CUDA runs torch._grouped_mm's slow fallback "
            "(host syncs, one matmul per expert); its fast kernel needs bfloat16 (autocast). "
            "Use bf16 autocast, or experts_impl 'bmm' / 'loop'.",
            stacklevel=3,
        )


def _with_bias_row(w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """(E, D, M), (E, M) -> (E, D + 8, M): the kernel that multiplies :meth:`Experts.grouped_rows_input`."""
    E, _, M = w1.shape
    return torch.cat([w1, b1.unsqueeze(1), w1.new_zeros(E, GROUPED_PAD - 1, M)], dim=1)


def _segment_sums(g: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(T, W) -> (E, W): the sum of each expert's rows (rows past ``offsets[-1]`` left out), as a
    grouped product with a ones matrix: float32 accumulation in bf16, deterministic, no atomics."""
    ones = g.new_ones(g.shape[0], 8).t()  # (8, T), column-major (16-byte aligned for any T)
    return _grouped_mm_op()(ones, g, offs=offsets)[:, 0]


class _RowBias(torch.autograd.Function):
    """``bias[experts]`` (T, W) for front-packed rows; the gradient is :func:`_segment_sums`."""

    @staticmethod
    def forward(ctx: Any, bias: torch.Tensor, experts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(offsets)
        return bias.index_select(0, experts)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (offsets,) = ctx.saved_tensors
        return _segment_sums(g.contiguous(), offsets), None, None


class _GroupedRowsMlp(torch.autograd.Function):
    """``act(x @ [w1; b1; 0]) @ w2 + b2[expert]`` over front-packed rows, with ``torch._grouped_mm``.

    x (T, D + 8) from :meth:`Experts.grouped_rows_input`; expert e's rows end at ``offsets[e]``
    ((E,) int32); rows past ``offsets[-1]`` are not computed and not read. Versus autograd over the
    same products, the concatenated kernel is rebuilt in the backward instead of being kept (a
    weight-sized copy less), and the first bias's gradient comes out of the first kernel's gradient
    (the row of the ones column). Saves x, the pre-activation and the activation, as a dense MLP.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
        offsets: torch.Tensor,
        experts: torch.Tensor,
        act: Activation,
    ) -> torch.Tensor:  # -> (T, D)
        gmm = _grouped_mm_op()
        h = gmm(x, _with_bias_row(w1, b1), offs=offsets)  # (T, M)
        a = activation(h, act)
        out = gmm(a, w2, offs=offsets)
        if torch.compiler.is_compiling():
            # Out of place when traced: with torch 2.11, an in-place add to this Function's output
            # under torch.compile gives all-zero gradients for every input, silently (any backend).
            out = out + b2.index_select(0, experts)
        else:
            out += b2.index_select(0, experts)
        ctx.act = act
        ctx.save_for_backward(x, h, a, w1, b1, w2, offsets)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, a, w1, b1, w2, offsets = ctx.saved_tensors
        gmm = _grouped_mm_op()
        D = w1.shape[1]
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        g = g.contiguous()
        gx = gw1 = gb1 = gw2 = gb2 = None
        if need_b2:
            gb2 = _segment_sums(g, offsets)
        if need_w2:
            gw2 = gmm(a.t(), g, offs=offsets)  # (E, M, D)
        if need_x or need_w1 or need_b1:
            gh = activation_backward(gmm(g, w2.transpose(1, 2), offs=offsets), h, ctx.act)  # (T, M)
            if need_w1 or need_b1:
                gw1a = gmm(x.t(), gh, offs=offsets)  # (E, D + 8, M): row D is the bias's gradient
                gw1, gb1 = gw1a[:, :D], gw1a[:, D]
            if need_x:
                gx = gmm(gh, _with_bias_row(w1, b1).transpose(1, 2), offs=offsets)  # (T, D + 8)
        return gx, gw1, gb1, gw2, gb2, None, None, None


class _AugmentedMlp(torch.autograd.Function):
    """``act(x @ [w1; b1; 0]) @ w2 + b2`` over (E, R, D + 8) capacity buffers whose tokens carry a
    ones column (:meth:`Experts.grouped_rows_input`), as two batched matmuls.

    Versus ``baddbmm(b1, x, w1)`` under autograd, the first bias rides in the matmul: no copy of the
    broadcast bias into the (E, R, M) output before the product, no read of it by the product
    (beta = 1), and no reduction of the (E, R, M) gradient for the bias's own gradient, which is
    the row of the ones column in the first kernel's gradient: three memory-bound passes over the
    largest activations less per training step. The price: 8 more columns in the first product and
    8 more rows in its weight gradient, which can cost a whole extra GEMM tile when D is a multiple
    of the tile (D 768: 13 K-tiles of 64 instead of 12). On the CPU it measured 3-5% slower than
    ``baddbmm`` (benchmarks/RESULTS.md); on a GPU it is raced by ``benchmarks/gpu_check.sh``
    (row ``vmoe_bmm_ones``), and stays off (``Experts.bias_in_matmul``) until that says otherwise.
    The same function: an empty slot's row has no ones, so its hidden row is 0 rather than
    ``act(b1)``; it is never read by the combine nor reaches a gradient. Saves x, the
    pre-activation, the activation and the kernels as given, as autograd would.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
        act: Activation,
        inference: bool = False,
    ) -> torch.Tensor:  # x (E, R, D + 8), w1 (E, D, M), b1 (E, M), w2 (E, M, D), b2 (E, D) -> (E, R, D)
        w1a = _with_bias_row(w1, b1)  # (E, D + 8, M)
        h = torch.bmm(x, w1a)  # (E, R, M)
        if inference:  # nothing saved: the activation overwrites the pre-activation
            return torch.baddbmm(b2.unsqueeze(1), _ACT_INPLACE[act](h), w2)
        a = activation(h, act)
        ctx.act = act
        ctx.save_for_backward(x, h, a, w1, b1, w2)  # the kernels as given: [w1; b1; 0] is rebuilt
        return torch.baddbmm(b2.unsqueeze(1), a, w2)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, a, w1, b1, w2 = ctx.saved_tensors
        D = w2.shape[2]
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        g = g.contiguous()
        gx = gw1 = gb1 = gw2 = gb2 = None
        if need_b2:
            gb2 = g.sum(1)
        if need_w2:
            gw2 = torch.bmm(a.transpose(1, 2), g)  # (E, M, D)
        if need_x or need_w1 or need_b1:
            gh = activation_backward(torch.bmm(g, w2.transpose(1, 2)), h, ctx.act)  # (E, R, M)
            if need_w1 or need_b1:
                gw1a = torch.bmm(x.transpose(1, 2), gh)  # (E, D + 8, M): row D is the bias's gradient
                gw1, gb1 = gw1a[:, :D], gw1a[:, D]
            if need_x:
                gx = torch.bmm(gh, _with_bias_row(w1, b1).transpose(1, 2))  # (E, R, D + 8)
        return gx, gw1, gb1, gw2, gb2, None, None


def _no_grad(*tensors: torch.Tensor) -> bool:
    """True when no gradient can flow back through ``tensors`` (inference)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


ExpertsImpl = Literal["auto", "bmm", "loop", "packed", "grouped_mm"]
EXPERTS_IMPLS: tuple[str, ...] = ("auto", "bmm", "loop", "packed", "grouped_mm")


class Experts(nn.Module):
    """E MLPs ``Linear(D, M) -> act -> Dropout -> Linear(M, D) -> Dropout`` with stacked weights.

    Kernels are stored (in, out) with a leading E axis, as the official checkpoints:
    ``w1`` (E, D, M), ``b1`` (E, M), ``w2`` (E, M, D), ``b2`` (E, D). The input is the (E, R, D)
    capacity buffers of the experts held here (a shard of them under expert parallelism).

    How the matmuls run (``impl``; every one computes the same function, tests check they agree):

    - ``"bmm"``: two batched matmuls over the buffers, biases by ``baddbmm``; on CUDA the first bias
      and the activation run in one fused Triton kernel instead (``fused_bias_act``, on by default;
      :mod:`vmoe.moe.fused`). Static shapes, no host synchronisation (CUDA graphs, ``torch.compile``).
      With ``bias_in_matmul`` (in :class:`~vmoe.moe.MoEMlp`: index dispatch, experts held here) the
      tokens carry a ones column and the first bias rides in the first matmul
      (:meth:`forward_augmented`).
    - ``"loop"``: per-expert ``addmm`` over each buffer (on CUDA the bias, and in inference the
      tanh-GELU too, run in the cuBLASLt epilogue; on the CPU with two or more threads, experts go
      in pairs, one batched matmul per pair: :meth:`slab_width`), in one hand-written autograd
      Function that writes outputs and weight gradients in place. Static shapes, no host
      synchronisation.
    - ``"packed"``: like ``"loop"``, but :class:`~vmoe.moe.MoEMlp` dispatches only the filled rows
      (:class:`~vmoe.moe.IndexDispatcher` ``packed=True``, skipping the empty capacity slots, ~7-13%
      of the rows at C=1.05) and runs :meth:`forward_rows` on them; needs the row counts on the host
      (one synchronisation). Given (E, R, D) buffers directly, it runs as ``"loop"``.
    - ``"grouped_mm"``: ``torch._grouped_mm`` (one kernel for all experts, CUDA sm90 bf16 fast
      path; needs D and M multiples of 8). In :class:`~vmoe.moe.MoEMlp` it runs over front-packed
      rows (a static :class:`~vmoe.moe.IndexDispatcher`: the filled rows first in a fixed
      ``min(E*R, N*K)`` rows, device offsets): only filled rows are computed, with no host
      synchronisation, dropless included (:meth:`forward_grouped_rows`). Given (E, R, D) buffers
      directly (expert parallelism), it runs over all their rows.
    - ``"auto"`` (default): ``"packed"`` on the CPU outside ``torch.compile``, else ``"bmm"``
      (except when at most half of the buffer rows can be filled, e.g. dropless: ``"packed"``).

    With dropout active in training, ``"loop"`` and ``"packed"`` run their rows through plain
    autograd (same masks: they are a function of the rows' global ids).

    Args:
        num_experts: E (the experts held here).
        dim: D.
        hidden_dim: M.
        init: ``"identical"`` (official configs) or ``"independent"``.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        *,
        act: Activation = "gelu_tanh",
        dropout: float = 0.0,
        init: Literal["identical", "independent"] = "identical",
        stream: int = 0,
        impl: ExpertsImpl = "auto",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.act = act
        self.p = dropout
        self.init = init
        self.stream = stream
        self.impl = impl
        #: ``"bmm"`` in the layer: the first bias rides in the matmul (a ones column of the tokens,
        #: :meth:`forward_augmented`) instead of ``baddbmm``. Off by default: see :class:`_AugmentedMlp`.
        self.bias_in_matmul = False
        #: ``"bmm"`` and ``"grouped_mm"`` over (E, R, D) buffers on CUDA: the first bias and the activation
        #: in one Triton kernel each way (:func:`vmoe.moe.fused.bias_act`) when Triton is importable.
        self.fused_bias_act = True
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    @property
    def impl(self) -> ExpertsImpl:
        return self._impl

    @impl.setter
    def impl(self, value: ExpertsImpl) -> None:
        if value not in EXPERTS_IMPLS:
            raise ValueError(f"unknown experts impl {value!r}; expected one of {', '.join(EXPERTS_IMPLS)}")
        self._impl = value

    def reset_parameters(self) -> None:
        E, D, M = self.w1.shape
        n = 1 if self.init == "identical" else E
        with torch.no_grad():
            for p, (fi, fo) in ((self.w1, (D, M)), (self.w2, (M, D))):
                xavier_uniform_(p[:n], fi, fo)
                if n == 1:
                    p[1:].copy_(p[:1].expand_as(p[1:]))
            for p in (self.b1, self.b2):
                torch.nn.init.normal_(p[:n], std=1e-6)
                if n == 1:
                    p[1:].copy_(p[:1].expand_as(p[1:]))

    def resolved_impl(self, buffers: torch.Tensor, fill: float = 1.0) -> str:
        """The implementation ``impl`` resolves to for these buffers.

        ``"auto"``: packing skips the empty capacity slots at the price of a host sync and
        data-dependent shapes. That is the CPU's choice (benchmarks/RESULTS.md); off the CPU it is
        chosen only when at most half of the buffer rows can hold a token (``fill`` = assignments /
        buffer rows <= 0.5: dropless routing, or a large capacity factor), where the batched
        matmuls would mostly multiply zeros; never under ``torch.compile``.
        """
        if self._impl != "auto":
            return self._impl
        if torch.compiler.is_compiling() or (prefer_static_shapes(buffers.device) and fill > 0.5):
            return "bmm"
        return "packed"

    def wants_packed(self, x: torch.Tensor, fill: float = 1.0) -> bool:
        """Whether the filled rows alone should be computed (callers then use :meth:`forward_rows`).

        ``fill``: assignments per buffer row (an upper bound of the filled share), see :meth:`resolved_impl`.
        """
        return self.resolved_impl(x, fill) == "packed"

    def forward(self, buffers: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(E, R, D) -> (E, R, D).

        Args:
            buffers: the capacity buffers of the experts held here.
            rows: optional (E, R) int64 global ids of the buffer rows, for positional dropout.
        """
        if buffers.dim() != 3 or buffers.shape[0] != self.num_experts:
            raise ValueError(f"experts expect ({self.num_experts}, R, D) buffers, got {tuple(buffers.shape)}")
        E, R, D = buffers.shape
        impl = self.resolved_impl(buffers)
        if impl in ("loop", "packed"):
            flat_rows = rows.reshape(E * R) if rows is not None else None
            slabs = expert_slabs([R] * E, self.slab_width(buffers.device))  # equal counts: expert-major
            return self.forward_rows(buffers.reshape(E * R, D), [R] * E, flat_rows, slabs).view(E, R, -1)
        dtype = compute_dtype(buffers)
        w1, b1, w2, b2 = (t.to(dtype) for t in (self.w1, self.b1, self.w2, self.b2))
        x = buffers.to(dtype)
        if impl == "grouped_mm":
            return self._forward_grouped_mm(x, rows, (w1, b1, w2, b2))
        if self._fuse(x):  # bias + activation in one pass (Triton, CUDA)
            h = bias_act(torch.bmm(x, w1), b1, self.act)
        else:
            h = activation(torch.baddbmm(b1.unsqueeze(1), x, w1), self.act)  # (E, R, M)
        h = dropout(h, self.p, self.training, stream=self.stream, rows=rows)
        out = torch.baddbmm(b2.unsqueeze(1), h, w2)  # (E, R, D)
        return dropout(out, self.p, self.training, stream=self.stream + 1, rows=rows)

    def _forward_grouped_mm(
        self, x: torch.Tensor, rows: torch.Tensor | None, weights: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """``torch._grouped_mm`` over the (E*R, D) rows with offsets R, 2R, ... (static, on device)."""
        grouped_mm = _grouped_mm_op()
        E, R, D = x.shape
        w1, b1, w2, b2 = weights
        M = w1.shape[2]
        _check_grouped_mm_sizes(D, M)
        _warn_slow_grouped_mm(x.device, x.dtype)
        offs = torch.arange(1, E + 1, device=x.device, dtype=torch.int32) * R
        h = grouped_mm(x.reshape(E * R, D), w1, offs=offs).view(E, R, M)
        h = bias_act(h, b1, self.act) if self._fuse(h) else activation(h + b1.unsqueeze(1), self.act)
        h = dropout(h, self.p, self.training, stream=self.stream, rows=rows)
        out = grouped_mm(h.reshape(E * R, M), w2, offs=offs).view(E, R, D) + b2.unsqueeze(1)
        return dropout(out, self.p, self.training, stream=self.stream + 1, rows=rows)

    def grouped_rows_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D + 8): the tokens with a column of ones (the first bias rides in the matmul)
        and 7 of zeros (rows stay 16-byte aligned); dispatched, the input of
        :meth:`forward_grouped_rows` (front-packed rows) or :meth:`forward_augmented` (buffers)."""
        n = x.shape[0]
        return torch.cat([x, x.new_ones(n, 1), x.new_zeros(n, GROUPED_PAD - 1)], dim=1)

    def forward_grouped_rows(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        experts: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(T, D + 8) -> (T, D): ``torch._grouped_mm`` over front-packed rows, no host sync.

        Expert e's rows are ``offsets[e-1]:offsets[e]`` (``offsets`` (E,) int32 on the device, a
        static :class:`~vmoe.moe.IndexDispatcher`'s); rows from ``offsets[-1]`` on are not
        computed and hold arbitrary values. ``x`` comes from :meth:`grouped_rows_input`, so the
        first bias is one more row of the first kernel; the second is added by row (``experts``
        (T,): each row's expert). ``rows``: (T,) global row ids for positional dropout.
        """
        grouped_mm = _grouped_mm_op()
        E, D, M = self.w1.shape
        if x.dim() != 2 or x.shape[1] != D + GROUPED_PAD or offsets.shape != (E,):
            raise ValueError(
                f"forward_grouped_rows expects (T, {D + GROUPED_PAD}) rows and ({E},) offsets, "
                f"got {tuple(x.shape)} and {tuple(offsets.shape)}"
            )
        _check_grouped_mm_sizes(D, M)
        dtype = compute_dtype(x)
        _warn_slow_grouped_mm(x.device, dtype)
        w1, b1, w2, b2 = (t.to(dtype) for t in (self.w1, self.b1, self.w2, self.b2))
        with torch.autocast(x.device.type, enabled=False):  # operands are already in dtype
            x = x.to(dtype)
            if not (self.training and self.p > 0):
                return _GroupedRowsMlp.apply(x, w1, b1, w2, b2, offsets, experts, self.act)
            # Dropout: plain autograd (which also keeps the concatenated first kernel for its backward).
            h = grouped_mm(x, _with_bias_row(w1, b1), offs=offsets)  # (T, M)
            h = dropout(activation(h, self.act), self.p, self.training, stream=self.stream, rows=rows)
            out = grouped_mm(h, w2, offs=offsets) + _RowBias.apply(b2, experts, offsets)  # (T, D)
        return dropout(out, self.p, self.training, stream=self.stream + 1, rows=rows)

    def forward_augmented(self, buffers: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(E, R, D + 8) -> (E, R, D): the ``"bmm"`` experts over buffers dispatched from
        :meth:`grouped_rows_input` tokens (a ones column: the first bias rides in the first batched
        matmul, see :class:`_AugmentedMlp`). Static shapes, no host sync. ``rows``: (E, R) global row
        ids for positional dropout."""
        E, D, _ = self.w1.shape
        if buffers.dim() != 3 or buffers.shape[0] != E or buffers.shape[2] != D + GROUPED_PAD:
            raise ValueError(
                f"forward_augmented expects ({E}, R, {D + GROUPED_PAD}) buffers, got {tuple(buffers.shape)}"
            )
        dtype = compute_dtype(buffers)
        w1, b1, w2, b2 = (t.to(dtype) for t in (self.w1, self.b1, self.w2, self.b2))
        with torch.autocast(buffers.device.type, enabled=False):  # operands are already in dtype
            x = buffers.to(dtype)
            if not (self.training and self.p > 0):
                return _AugmentedMlp.apply(x, w1, b1, w2, b2, self.act, _no_grad(x, w1, b1, w2, b2))
            h = torch.bmm(x, _with_bias_row(w1, b1))  # (E, R, M); dropout: plain autograd
            h = dropout(activation(h, self.act), self.p, self.training, stream=self.stream, rows=rows)
            out = torch.baddbmm(b2.unsqueeze(1), h, w2)  # (E, R, D)
        return dropout(out, self.p, self.training, stream=self.stream + 1, rows=rows)

    def _fuse(self, h: torch.Tensor) -> bool:
        return self.fused_bias_act and fused_bias_act_usable(h, self.act)

    def slab_width(self, device: torch.device) -> int:
        """Experts per slab of packed rows on ``device`` (:func:`expert_slabs`): 2 on the CPU with two
        or more threads (each of a pair's products then runs on its own thread), else 1."""
        return 2 if device.type == "cpu" and torch.get_num_threads() > 1 else 1

    def forward_rows(
        self,
        x: torch.Tensor,
        counts: list[int],
        rows: torch.Tensor | None = None,
        slabs: Sequence[Slab] | None = None,
    ) -> torch.Tensor:
        """(F, D) -> (F, D): each expert's MLP on its ``counts[e]`` rows, laid out in ``slabs``.

        The input of a packed dispatcher (:class:`vmoe.moe.IndexDispatcher` with ``packed=True``,
        whose ``counts`` and ``slabs`` these are). ``slabs``: see :func:`expert_slabs`; default:
        expert-major (``expert_slabs(counts)``). ``rows``: (F,) global row ids for positional dropout.
        """
        if x.dim() != 2 or len(counts) != self.num_experts or sum(counts) != x.shape[0]:
            raise ValueError(
                f"forward_rows expects (sum(counts), D) rows and {self.num_experts} counts, "
                f"got {tuple(x.shape)} and {len(counts)} counts summing to {sum(counts)}"
            )
        slabs = expert_slabs(counts) if slabs is None else [Slab(*s) for s in slabs]
        _check_slabs(slabs, counts)
        dtype = compute_dtype(x)
        w1, b1, w2, b2 = (t.to(dtype) for t in (self.w1, self.b1, self.w2, self.b2))
        x = x.to(dtype)
        if not (self.training and self.p > 0):
            with torch.autocast(x.device.type, enabled=False):  # operands are already in dtype
                return _GroupedMlp.apply(x, w1, b1, w2, b2, slabs, self.act, _no_grad(x, w1, b1, w2, b2))
        # Dropout: plain autograd per expert and slab. unbind: one backward op per weight (indexing
        # w1[e] would add E full-size zero gradients).
        w1s, b1s, w2s, b2s = (t.unbind(0) for t in (w1, b1, w2, b2))
        runs = [(j, s.rows) for s in slabs for j in s.members()] or [(0, 0)]  # (expert, rows) in order
        outs = []
        start = 0
        for e, n in runs:
            xe = x[start : start + n]
            r = rows[start : start + n] if rows is not None else None
            start += n
            h = activation(torch.addmm(b1s[e], xe, w1s[e]), self.act)  # (n, M)
            h = dropout(h, self.p, self.training, stream=self.stream, rows=r)
            outs.append(
                dropout(torch.addmm(b2s[e], h, w2s[e]), self.p, self.training, stream=self.stream + 1, rows=r)
            )
        return torch.cat(outs)  # (F, D)

    def extra_repr(self) -> str:
        E, D, M = self.w1.shape
        return f"num_experts={E}, dim={D}, hidden_dim={M}, act={self.act}, init={self.init}"
