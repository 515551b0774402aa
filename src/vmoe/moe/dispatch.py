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
- :class:`IndexDispatcher`: gather rows into the buffers, weighted gather back. No tensor of size
  S x E x C; the fast path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

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
    N, K = positions.shape
    src = torch.full((num_experts * rows + 1,), N, dtype=torch.int64, device=positions.device)
    tokens = torch.arange(N, device=positions.device, dtype=torch.int64).repeat_interleave(K)
    src.scatter_(0, positions.reshape(-1), tokens)  # dropped ones all land on the spare last row
    return src[:-1]


class IndexDispatcher:
    """Gather/scatter dispatch into capacity buffers (the fast path).

    Args:
        routings: the chunks' routing plans, each with fields (G_c, S_c, K), in token order.
    """

    def __init__(self, routings: Sequence[Routing]) -> None:
        self.num_experts, self.rows_per_expert, _offsets = _layout(routings)
        self.positions = _positions(routings, self.rows_per_expert, _offsets)  # (N, K)
        self.weights = torch.cat([r.weights.reshape(-1, r.num_selected) for r in routings], dim=0)  # (N, K)
        self.num_tokens = self.positions.shape[0]
        self.sources = _sources(self.positions, self.num_experts, self.rows_per_expert)  # (E*R,)

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] != self.num_tokens:
            raise ValueError(f"dispatch expects ({self.num_tokens}, D) tokens, got {tuple(x.shape)}")
        x_pad = F.pad(x, (0, 0, 0, 1))  # row N is the zero row for empty slots
        return x_pad.index_select(0, self.sources).view(self.num_experts, self.rows_per_expert, x.shape[1])

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        E, R = self.num_experts, self.rows_per_expert
        if y.dim() != 3 or y.shape[0] != E or y.shape[1] != R:
            raise ValueError(f"combine expects ({E}, {R}, D) expert outputs, got {tuple(y.shape)}")
        y_pad = F.pad(y.reshape(E * R, y.shape[2]), (0, 0, 0, 1))  # row E*R is zero: dropped
        w = self.weights.to(y.dtype)
        out = None
        for k in range(self.positions.shape[1]):
            term = y_pad.index_select(0, self.positions[:, k]) * w[:, k : k + 1]
            out = term if out is None else out + term
        assert out is not None
        return out

    def buffer_tokens(self) -> torch.Tensor:
        N = self.num_tokens
        src = self.sources.view(self.num_experts, self.rows_per_expert)
        return torch.where(src == N, torch.full_like(src, -1), src)


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
        outs, start = [], 0
        for comb in self._combine:
            G, S, E, C = comb.shape
            yc = y[:, start : start + G * C].reshape(E, G, C, -1)
            start += G * C
            outs.append(torch.einsum("gsec,egcd->gsd", comb.to(y.dtype), yc).reshape(G * S, -1))
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]

    def buffer_tokens(self) -> torch.Tensor:
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
