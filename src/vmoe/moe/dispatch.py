"""Dispatch and combine: moving tokens into expert capacity buffers and back.

Every backend implements the same interface (no parameters, not an ``nn.Module``):

    dispatch(x: (N, D)) -> buffers (E, R, D)
    combine(y: (E, R, D)) -> (N, D),   y[token] = sum over kept (e, slot) of weight * y[e, row]

where the N tokens are the concatenation of one or more *chunks* of routing groups (a chunk of
full groups, and possibly a smaller last group), and ``R = sum_c G_c * C_c`` rows per expert:
chunk c's group g, slot j lives in row ``O_c + g * C_c + j`` (``O_c`` = rows of earlier chunks).
Both backends produce identical buffers, so an expert-parallel all-to-all can sit between
``dispatch`` and ``combine`` regardless of the backend.

- :class:`EinsumDispatcher`: GShard-style one-hot einsum, (G, S, E, C) tensors. The reference.
- :class:`IndexDispatcher`: gather rows into the buffers, weighted gather back (forward and
  backward are gathers only). No tensor of size S x E x C; the fast path. The per-token sums over
  K rows (combine, and the dispatch's adjoint) are one fused weighted gather (``embedding_bag``)
  in which a dropped assignment reads a real row with weight 0 (exact for finite values).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from vmoe.layers import prefer_static_shapes
from vmoe.moe.experts import Slab, expert_slabs
from vmoe.moe.fused import combine_backward
from vmoe.moe.routing import Routing

__all__ = ["Dispatcher", "EinsumDispatcher", "IndexDispatcher", "make_dispatcher"]


class Dispatcher(Protocol):
    """The interface every dispatch backend implements."""

    num_experts: int
    rows_per_expert: int
    num_tokens: int

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) tokens -> (E, R, D) expert buffers (zeros in empty slots)."""
        ...

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """(E, R, D) expert outputs -> (N, D) weighted sums over each token's kept assignments."""
        ...

    def buffer_tokens(self) -> torch.Tensor:
        """(E, R) int64: the token in each buffer row, -1 where the slot is empty."""
        ...


def _layout(routings: Sequence[Routing]) -> tuple[int, int, list[int]]:
    if not routings:
        raise ValueError("at least one routing chunk is needed")
    num_experts = routings[0].num_experts
    offsets, rows = [], 0
    for r in routings:
        if r.expert_index.dim() != 3:
            raise ValueError(f"routing fields must be (G, S, K), got {tuple(r.expert_index.shape)}")
        if r.num_experts != num_experts:
            raise ValueError("all routing chunks must have the same number of experts")
        offsets.append(rows)
        rows += r.expert_index.shape[0] * r.capacity
    return num_experts, rows, offsets


def _positions(routings: Sequence[Routing], rows: int, offsets: list[int]) -> torch.Tensor:
    """(N, K) flat row ``e * R + row`` of every assignment; ``E * R`` (a zero row) where dropped."""
    out = []
    for r, off in zip(routings, offsets):
        G, S, K = r.expert_index.shape
        group = torch.arange(G, device=r.slot.device, dtype=torch.int64).view(G, 1, 1)
        pos = r.expert_index * rows + off + group * r.capacity + r.slot
        pos = torch.where(r.kept, pos, torch.full_like(pos, r.num_experts * rows))
        out.append(pos.reshape(G * S, K))
    return torch.cat(out, dim=0) if len(out) > 1 else out[0]


def _sources(positions: torch.Tensor, num_experts: int, rows: int) -> torch.Tensor:
    """(E * R,) the token of each buffer row, ``N`` (a zero row) where empty."""
    K = positions.shape[1]
    return torch.div(_row_assignments(positions, num_experts * rows), K, rounding_mode="floor")


def _row_assignments(positions: torch.Tensor, total_rows: int) -> torch.Tensor:
    """(E * R,) the assignment ``n * K + k`` held in each buffer row, ``N * K`` where empty."""
    N, K = positions.shape
    assign = torch.full((total_rows + 1,), N * K, dtype=torch.int64, device=positions.device)
    ids = torch.arange(N * K, device=positions.device, dtype=torch.int64)
    assign.scatter_(0, positions.reshape(-1), ids)  # dropped ones all land on the spare last row
    return assign[:-1]


class _RowMap:
    """``out[i] = src[index[i]]``, or a zero row where ``index[i] == len(src)`` (the sentinel).

    Two exact implementations of :meth:`gather`: ``pad`` gathers from ``src`` with a zero row appended
    (no host synchronisation; the default off the CPU), otherwise the sentinel rows are gathered from
    row 0 and then zero-filled, which saves copying ``src`` (the indices of those rows are found once,
    with a host synchronisation that costs nothing on the CPU).
    """

    def __init__(self, index: torch.Tensor, sentinel: int, pad: bool) -> None:
        self.pad = pad
        self.sentinel = sentinel
        self.raw = index
        missing = index == sentinel
        self.index = index.masked_fill(missing, 0)  # sentinel rows read row 0 (then zeroed, or weighted 0)
        self.empty: torch.Tensor | None = None
        if not pad:
            empty = missing.nonzero().squeeze(1)
            self.empty = empty if empty.numel() else None

    def gather(self, src: torch.Tensor) -> torch.Tensor:
        """(len(src), D) -> (len(index), D), exact zeros on the sentinel rows."""
        if self.pad:
            return F.pad(src, (0, 0, 0, 1)).index_select(0, self.raw)
        out = src.index_select(0, self.index)
        if self.empty is not None:
            out.index_fill_(0, self.empty, 0)
        return out


def _row_dots(a: torch.Tensor, b: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """(R, D), (R, D) -> (R,) row-wise dot products; float32 products and sums for bf16/fp16 inputs
    (the router's gradient stays accurate), converted ``chunk`` rows at a time so that no float32
    copy of a whole (R, D) tensor is ever held (it would add to the peak memory of the backward)."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        return torch.linalg.vecdot(a, b)
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    for start in range(0, a.shape[0], chunk):
        end = start + chunk
        torch.linalg.vecdot(a[start:end].float(), b[start:end].float(), out=out[start:end])
    return out


def _slab_order(
    counts: list[int], slabs: list[Slab], device: torch.device
) -> tuple[torch.Tensor | None, tuple[list[int], list[int]]]:
    """Where the rows of ``slabs`` come from in the expert-major packed rows.

    Returns ``order`` ((F,) int64: the expert-major row of each slab row; None when the slabs are
    expert-major) and the runs of one expert's rows in slab order, ``(experts, lengths)``.
    """
    begin = [0] * len(counts)  # next expert-major row of each expert
    for e in range(1, len(counts)):
        begin[e] = begin[e - 1] + counts[e - 1]
    experts, starts, lengths = [], [], []
    for slab in slabs:
        for e in slab.members():
            experts.append(e)
            starts.append(begin[e])
            lengths.append(slab.rows)
            begin[e] += slab.rows
    if all(s == t for s, t in zip(starts, itertools.accumulate(lengths, initial=0))):
        return None, (experts, lengths)  # already expert-major
    length = torch.tensor(lengths, dtype=torch.int64, device=device)
    shift = torch.tensor(starts, dtype=torch.int64, device=device) - (torch.cumsum(length, 0) - length)
    order = torch.repeat_interleave(shift, length) + torch.arange(sum(lengths), device=device)
    return order, (experts, lengths)


class _Dispatch(torch.autograd.Function):
    """buffers = tokens gathered into rows; its adjoint is again a gather (each token's K rows)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, d: IndexDispatcher) -> torch.Tensor:  # (N, D) -> (E*R, D)
        ctx.d = d
        return d._to_rows.gather(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # (E*R, D) -> (N, D)
        d: IndexDispatcher = ctx.d
        return d.weighted_sum(g, d.kept_scale(g.dtype)), None


class _Combine(torch.autograd.Function):
    """``out[n] = sum_k w[n, k] * y[pos[n, k]]``; both adjoints are gathers too (no scatter-add).

    The weights are 0 on dropped assignments, so no gather here needs a zero row (no copy of ``y``).
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, w: torch.Tensor, d: IndexDispatcher) -> torch.Tensor:
        # y (E*R, D), w (N, K) -> (N, D)
        out = d.weighted_sum(y, w)
        ctx.d = d
        ctx.save_for_backward(y, w)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        y, w = ctx.saved_tensors
        d: IndexDispatcher = ctx.d
        # Row r holds assignment (n, k): grad_y[r] = w[n, k] * g[n]; empty rows get 0 (w_rows = 0).
        w_rows = F.pad(w.reshape(-1), (0, 1)).index_select(0, d.row_assign)  # (E*R,)
        want_y, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if d.fused and (want_y or want_w):
            # One Triton pass on CUDA: gathers g's rows once, no (E*R, D) float32 copies.
            grad_y, dots = combine_backward(g, y, d._to_rows.index, w_rows, grad_y=want_y, dots=want_w)
            if grad_y is not None or dots is not None:
                grad_w = F.pad(dots, (0, 1))[d.positions].to(w.dtype) if dots is not None else None
                return grad_y, grad_w, None
        w_rows = w_rows.unsqueeze(1)  # (E*R, 1)
        g_rows = g.index_select(0, d._to_rows.index)  # (E*R, D): g[token of r]; arbitrary on empty rows
        grad_w = grad_y = None
        if ctx.needs_input_grad[1]:
            # grad_w[n, k] = <g[n], y[pos[n, k]]> = dots[pos[n, k]]; 0 where dropped (the spare entry;
            # the dots of empty rows are never read).
            dots = _row_dots(y, g_rows)
            grad_w = F.pad(dots, (0, 1))[d.positions].to(w.dtype)  # (N, K)
        if ctx.needs_input_grad[0]:
            grad_y = g_rows.mul_(w_rows)
        return grad_y, grad_w, None


class IndexDispatcher:
    """Gather dispatch into capacity buffers (the fast path).

    Forward and backward are row gathers only (``index_select``): the adjoint of "token -> its K
    rows" is "row -> its token" and vice versa, so no scatter-add (slow and serial on the CPU,
    non-deterministic on CUDA) is ever run.

    With ``packed=True`` the rows are only the *filled* buffer rows: ``dispatch`` returns (F, D)
    with ``counts[e]`` rows for expert e and ``combine`` takes (F, D). The same tokens are kept in
    the same slots; the empty capacity slots are simply never materialised (finding them costs one
    host synchronisation). The rows are laid out in ``slabs`` (:func:`vmoe.moe.expert_slabs` with
    ``slab_width`` and ``slab_by_count``; width 1: expert-major), each expert's in buffer order.

    With ``static=True`` (implies packed) the filled rows come first in a tensor of a fixed
    ``min(E*R, N*K)`` rows (rounded up to a multiple of 8), expert-major, and ``offsets`` (E,)
    int32 on the device holds the cumulative row counts (the ``offs`` of ``torch._grouped_mm``):
    no host synchronisation. Rows from ``offsets[-1]`` on belong to no token; what an expert
    computes there is never read.

    Args:
        routings: the chunks' routing plans, each with fields (G_c, S_c, K), in token order.
        pad: how empty rows are made zero (see :class:`_RowMap`); default: pad off the CPU, or when
            compiled.
        packed: keep only the filled rows (see above).
        static: packed rows in a fixed-size tensor, with device offsets (see above).
        slab_width: experts per slab of packed rows (``packed`` only; see
            :meth:`vmoe.moe.Experts.slab_width`).
        slab_by_count: pair the experts of nearest counts (``slab_width`` 2; for inference).
    """

    def __init__(
        self,
        routings: Sequence[Routing],
        *,
        pad: bool | None = None,
        packed: bool = False,
        static: bool = False,
        slab_width: int = 1,
        slab_by_count: bool = False,
    ) -> None:
        self.num_experts, self.rows_per_expert, _offsets = _layout(routings)
        self.packed = packed or static
        positions = _positions(routings, self.rows_per_expert, _offsets)  # (N, K), E*R where dropped
        self.weights = torch.cat([r.weights.reshape(-1, r.num_selected) for r in routings], dim=0)  # (N, K)
        self.num_tokens, K = positions.shape
        total = self.num_experts * self.rows_per_expert
        row_assign = _row_assignments(positions, total)  # (E*R,), N*K where empty
        self.counts: list[int] | None = None
        self.slabs: list[Slab] | None = None
        self._runs: tuple[list[int], list[int]] | None = None  # (expert, rows) of each run of packed rows
        self.offsets: torch.Tensor | None = None
        if self.packed:
            filled = row_assign < self.num_tokens * K  # (E*R,)
            rank = torch.cumsum(filled, 0) - 1  # buffer row -> packed row (for the filled ones)
            if static:
                # A fixed number of rows (no host sync): at most min(E*R, N*K) rows can be filled.
                # A multiple of 8 rows: the (8, rows) and (W, rows) operands of the gradients' grouped
                # products stay 16-byte aligned in any layout a compiler gives them.
                size = -(-min(total, self.num_tokens * K) // 8) * 8
                per_expert = filled.view(self.num_experts, -1).sum(1)
                self.offsets = torch.cumsum(per_expert, 0).to(torch.int32)  # (E,) on the device
                dest = torch.where(filled, rank, torch.full_like(rank, size))  # empty rows -> spare slot
                spare = torch.full((size + 1,), total, dtype=torch.int64, device=rank.device)
                keep = spare.scatter_(0, dest, torch.arange(total, device=rank.device))[:size]
                row_assign = F.pad(row_assign, (0, 1), value=self.num_tokens * K).index_select(0, keep)
            else:
                keep = filled.nonzero().squeeze(1)  # (F,): the filled rows, expert-major (host sync)
                self.counts = filled.view(self.num_experts, -1).sum(1).tolist()
                self.slabs = expert_slabs(self.counts, slab_width, by_count=slab_by_count)
                size = keep.numel()
                order, self._runs = _slab_order(self.counts, self.slabs, keep.device)
                if order is not None:  # expert-major packed row of each slab row
                    keep = keep.index_select(0, order)
                    to_slab = torch.empty_like(order).index_copy_(
                        0, order, torch.arange(size, device=order.device)
                    )
                    rank = to_slab.index_select(0, rank.clamp(min=0))  # (an empty row's rank is never read)
                row_assign = row_assign.index_select(0, keep)
            rank = torch.cat([rank, rank.new_full((1,), size)])  # dropped (E*R) -> size
            positions = rank[positions]
            total = size
        #: Whether the combine's backward may run the fused Triton kernel (:func:`vmoe.moe.fused.combine_backward`;
        #: CUDA only, stock ops elsewhere). :class:`~vmoe.moe.MoEMlp` sets it from its ``fused``.
        self.fused = True
        self.positions = positions  # (N, K) row of each assignment, ``total_rows`` where dropped
        self.total_rows = total
        self.row_assign = row_assign  # (total_rows,) assignment n * K + k of each row, N*K where empty
        self.sources = torch.div(row_assign, K, rounding_mode="floor")  # (total_rows,), N where empty
        if pad is None:  # the host-sync-free form off the CPU, and under torch.compile (static shapes)
            pad = prefer_static_shapes(self.positions.device)
        self._to_rows = _RowMap(self.sources, self.num_tokens, pad)
        # Each token's K rows; dropped assignments read row 0 and are weighted by 0.
        self._bag = self.positions.masked_fill(self.positions == total, 0)  # (N, K)

    def weighted_sum(self, src: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(total_rows, D), (N, K) -> (N, D): ``sum_k weights[n, k] * src[row of (n, k)]``.

        One fused gather-multiply-add (``embedding_bag``); ``weights`` must be 0 on dropped
        assignments (they read row 0; exact for finite ``src``).
        """
        return F.embedding_bag(self._bag, src, mode="sum", per_sample_weights=weights.to(src.dtype))

    def kept_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """(N, K) 1 for kept assignments, 0 for dropped ones, in ``dtype``."""
        return (self.positions < self.total_rows).to(dtype)

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (E, R, D) buffers, or (F, D) filled rows when packed."""
        if x.dim() != 2 or x.shape[0] != self.num_tokens:
            raise ValueError(f"dispatch expects ({self.num_tokens}, D) tokens, got {tuple(x.shape)}")
        out = _Dispatch.apply(x, self)
        return out if self.packed else out.view(self.num_experts, self.rows_per_expert, x.shape[1])

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """(E, R, D) expert outputs, or (F, D) when packed -> (N, D)."""
        E, R = self.num_experts, self.rows_per_expert
        want = (self.total_rows,) if self.packed else (E, R)
        if y.dim() != len(want) + 1 or tuple(y.shape[:-1]) != want:
            raise ValueError(
                f"combine expects ({', '.join(map(str, want))}, D) expert outputs, got {tuple(y.shape)}"
            )
        return _Combine.apply(y.reshape(self.total_rows, y.shape[-1]), self.weights.to(y.dtype), self)

    def row_tokens(self) -> torch.Tensor:
        """(total_rows,) int64: the token in each row (buffer or packed), -1 where the slot is empty."""
        src = self.sources
        return torch.where(src == self.num_tokens, torch.full_like(src, -1), src)

    def row_experts(self) -> torch.Tensor:
        """(total_rows,) int64: the expert each row belongs to."""
        E = self.num_experts
        device = self.sources.device
        if self.offsets is not None:  # rows past the last offset (no token) are given to the last expert
            rows = torch.arange(self.total_rows, device=device, dtype=torch.int32)
            return torch.searchsorted(self.offsets, rows, right=True).clamp_(max=E - 1)
        if self._runs is not None:
            experts, lengths = self._runs
            return torch.repeat_interleave(
                torch.tensor(experts, device=device, dtype=torch.int64),
                torch.tensor(lengths, device=device, dtype=torch.int64),
            )
        return torch.arange(E, device=device).repeat_interleave(self.rows_per_expert)

    def buffer_tokens(self) -> torch.Tensor:
        """(E, R) int64: the token in each buffer row, -1 where the slot is empty (not when packed)."""
        if self.packed:
            raise ValueError("a packed dispatcher has no (E, R) buffers; use row_tokens()")
        return self.row_tokens().view(self.num_experts, self.rows_per_expert)


class EinsumDispatcher:
    """One-hot einsum dispatch (GShard / official ``EinsumDispatcher``): the reference backend.

    Builds (G, S, E, C) dispatch and combine tensors per chunk; memory and time grow with
    S x E x C, so keep it for tests and small models.
    """

    def __init__(self, routings: Sequence[Routing]) -> None:
        self.num_experts, self.rows_per_expert, _offsets = _layout(routings)
        self.routings = list(routings)
        self.num_tokens = sum(r.expert_index.shape[0] * r.expert_index.shape[1] for r in routings)
        self._combine = [r.dense_combine() for r in routings]  # (G, S, E, C) each
        self._dispatch = [r.dense_dispatch() for r in routings]

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) tokens -> (E, R, D) buffers (zeros in empty slots), by one-hot einsums."""
        if x.dim() != 2 or x.shape[0] != self.num_tokens:
            raise ValueError(f"dispatch expects ({self.num_tokens}, D) tokens, got {tuple(x.shape)}")
        bufs, start = [], 0
        for mask in self._dispatch:
            G, S, E, C = mask.shape
            xc = x[start : start + G * S].view(G, S, -1)
            start += G * S
            bufs.append(torch.einsum("gsec,gsd->egcd", mask.to(x.dtype), xc).reshape(E, G * C, -1))
        return torch.cat(bufs, dim=1) if len(bufs) > 1 else bufs[0]

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """(E, R, D) expert outputs -> (N, D) weighted sums over each token's kept assignments."""
        E, R = self.num_experts, self.rows_per_expert
        if y.dim() != 3 or tuple(y.shape[:2]) != (E, R):
            raise ValueError(f"combine expects ({E}, {R}, D) expert outputs, got {tuple(y.shape)}")
        outs, start = [], 0
        for comb in self._combine:
            G, S, E, C = comb.shape
            yc = y[:, start : start + G * C].reshape(E, G, C, -1)
            start += G * C
            outs.append(torch.einsum("gsec,egcd->gsd", comb.to(y.dtype), yc).reshape(G * S, -1))
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]

    def buffer_tokens(self) -> torch.Tensor:
        """(E, R) int64: the token in each buffer row, -1 where the slot is empty."""
        _, rows, offsets = _layout(self.routings)
        positions = _positions(self.routings, rows, offsets)
        src = _sources(positions, self.num_experts, rows).view(self.num_experts, rows)
        return torch.where(src == self.num_tokens, torch.full_like(src, -1), src)


def make_dispatcher(backend: str, routings: Sequence[Routing]) -> Dispatcher:
    """Build the dispatcher named ``backend`` (``"index"`` or ``"einsum"``)."""
    if backend == "index":
        return IndexDispatcher(routings)
    if backend == "einsum":
        return EinsumDispatcher(routings)
    raise ValueError(f"unknown dispatch backend {backend!r}; expected 'index' or 'einsum'")
