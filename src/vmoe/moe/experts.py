"""Stacked expert MLPs: E identical-architecture MLPs applied to their capacity buffers at once."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from vmoe.layers import Activation, activation, compute_dtype, dropout, xavier_uniform_

__all__ = ["Experts"]


class _PackRows(torch.autograd.Function):
    """``src[index]`` for distinct indices; the adjoint is an ``index_copy`` (no serial scatter-add)."""

    @staticmethod
    def forward(ctx: Any, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.num_rows = src.shape[0]
        return src.index_select(0, index)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return g.new_zeros(ctx.num_rows, g.shape[1]).index_copy_(0, index, g), None


class Experts(nn.Module):
    """E MLPs ``Linear(D, M) -> act -> Dropout -> Linear(M, D) -> Dropout`` with stacked weights.

    Kernels are stored (in, out) with a leading E axis, as the official checkpoints:
    ``w1`` (E, D, M), ``b1`` (E, M), ``w2`` (E, M, D), ``b2`` (E, D). The forward is two batched
    matmuls over the (E, R, D) buffers (bias fused into ``baddbmm``). ``num_local`` < E holds only
    a shard of the experts (expert parallelism); the buffers then carry that shard.

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
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.act = act
        self.p = dropout
        self.init = init
        self.stream = stream
        self.pack_rows: bool | None = None  # compute only filled rows: None = auto (see _pack)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

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

    def forward(
        self, buffers: torch.Tensor, rows: torch.Tensor | None = None, *, filled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(E, R, D) -> (E, R, D).

        Args:
            buffers: the capacity buffers of the experts held here.
            rows: optional (E, R) int64 global ids of the buffer rows, for positional dropout.
            filled: optional (E, R) bool, the rows that hold a token. When packing is on (see
                ``pack_rows``) only those rows are computed (per-expert matmuls over the packed
                rows; the other output rows are 0), skipping the empty capacity slots. Otherwise
                every row is computed with two batched matmuls (static shapes, no host sync).
        """
        if buffers.dim() != 3 or buffers.shape[0] != self.num_experts:
            raise ValueError(f"experts expect ({self.num_experts}, R, D) buffers, got {tuple(buffers.shape)}")
        dtype = compute_dtype(buffers)
        w1, b1, w2, b2 = (t.to(dtype) for t in (self.w1, self.b1, self.w2, self.b2))
        if filled is not None and self._pack(buffers):
            E, R = buffers.shape[:2]
            index = filled.reshape(E * R).nonzero().squeeze(1)  # rows holding a token, expert-major
            if index.numel() < E * R:
                return self._forward_packed(buffers, rows, index, filled.sum(1).tolist(), (w1, b1, w2, b2))
        h = torch.baddbmm(b1.unsqueeze(1), buffers.to(dtype), w1)  # (E, R, M)
        h = dropout(activation(h, self.act), self.p, self.training, stream=self.stream, rows=rows)
        out = torch.baddbmm(b2.unsqueeze(1), h, w2)  # (E, R, D)
        return dropout(out, self.p, self.training, stream=self.stream + 1, rows=rows)

    def _pack(self, buffers: torch.Tensor) -> bool:
        if self.pack_rows is not None:
            return self.pack_rows
        # Auto: on the CPU, outside torch.compile (packed rows are data-dependent shapes). Packing
        # skips the ~7-13% empty capacity slots at C=1.05 at the price of ~8 small ops per expert.
        # On a quiet 2-core machine it is 6-16% faster with 1 or 2 threads; on a heavily shared one
        # the small ops' thread barriers can cost more than that (benchmarks/RESULTS.md).
        return buffers.device.type == "cpu" and not torch.compiler.is_compiling()

    def _forward_packed(
        self,
        buffers: torch.Tensor,
        rows: torch.Tensor | None,
        index: torch.Tensor,
        counts: list[int],
        weights: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        """The filled rows only: (E, R, D) -> pack (F, D) -> per-expert MLP -> (E, R, D), 0 elsewhere."""
        E, R, D = buffers.shape
        w1, b1, w2, b2 = weights
        x = _PackRows.apply(buffers.reshape(E * R, D), index).to(w1.dtype)  # (F, D), expert-major
        ids = rows.reshape(E * R).index_select(0, index) if rows is not None else None  # (F,)
        # unbind: one backward op per weight (indexing w1[e] would add E full-size zero gradients)
        w1s, b1s, w2s, b2s = (t.unbind(0) for t in (w1, b1, w2, b2))
        outs = []
        start = 0
        for e, (xe, n) in enumerate(zip(x.split(counts), counts)):
            r = ids[start : start + n] if ids is not None else None
            start += n
            h = activation(torch.addmm(b1s[e], xe, w1s[e]), self.act)  # (n, M)
            h = dropout(h, self.p, self.training, stream=self.stream, rows=r)
            outs.append(
                dropout(torch.addmm(b2s[e], h, w2s[e]), self.p, self.training, stream=self.stream + 1, rows=r)
            )
        out = torch.cat(outs)  # (F, D)
        return out.new_zeros(E * R, out.shape[1]).index_copy(0, index, out).view(E, R, -1)

    def extra_repr(self) -> str:
        E, D, M = self.w1.shape
        return f"num_experts={E}, dim={D}, hidden_dim={M}, act={self.act}, init={self.init}"
