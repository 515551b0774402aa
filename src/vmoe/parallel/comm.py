"""The expert-parallel all-to-all: capacity buffers travel to the ranks that hold their experts.

Layout: the E experts are split into P contiguous shards; EP rank j holds experts
``[j * E/P, (j+1) * E/P)``. Every rank of an EP group has (E, R, D) buffers (R rows per
expert, the same R on every rank because capacity buffers are static). ``dispatch`` sends rows
``[j * E/P, (j+1) * E/P)`` of the buffer to EP rank j, which concatenates what it receives from
EP ranks 0..P-1 along the row axis: (E/P, P * R, D), source rank i's rows at ``[i*R, (i+1)*R)``.
``combine`` is the exact inverse. Both are one ``all_to_all_single`` with equal splits (no host
synchronisation), differentiable: the backward of an equal-split all-to-all is the same all-to-all
applied to the gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["AllToAllExpertComm", "all_to_all"]


def _a2a(x: torch.Tensor, group: Any) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0; its adjoint is the same all-to-all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _a2a(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _a2a(grad, ctx.group), None


def all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` with equal splits: chunk i of dim 0 goes to group rank i,
    and chunk i of the result came from group rank i. ``x.shape[0]`` must be a multiple of the
    group size."""
    return _AllToAll.apply(x, group)


class AllToAllExpertComm:
    """:class:`vmoe.moe.layer.ExpertComm` over ``torch.distributed`` (NCCL on GPU, gloo on CPU).

    Args:
        group: the expert-parallel process group (P ranks, in EP-rank order).
        ep_size: P.
        num_experts: E (global); must be divisible by P.

    The object is stateless (shapes are read from the tensors), so one instance may serve
    several layers and re-entrant calls (activation checkpointing).
    """

    def __init__(self, group: Any, ep_size: int, num_experts: int) -> None:
        if ep_size < 1 or num_experts % ep_size:
            raise ValueError(
                f"the number of experts (E={num_experts}) must be divisible by the expert-parallel "
                f"size (P={ep_size})"
            )
        self.group = group
        self.ep_size = ep_size
        self.num_experts = num_experts
        self.num_local = num_experts // ep_size

    def dispatch(
        self, buffers: torch.Tensor, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(E, R, D) buffers (+ (E, R) row ids) -> (E/P, P*R, D) buffers of the local experts."""
        if buffers.dim() != 3 or buffers.shape[0] != self.num_experts:
            raise ValueError(f"expected ({self.num_experts}, R, D) buffers, got {tuple(buffers.shape)}")
        _, R, D = buffers.shape
        P, El = self.ep_size, self.num_local
        recv = all_to_all(buffers.reshape(P, El, R, D), self.group)  # (P source ranks, El, R, D)
        local = recv.transpose(0, 1).reshape(El, P * R, D)
        local_rows = None
        if rows is not None:
            with torch.no_grad():
                r = _a2a(rows.reshape(P, El, R), self.group)
                local_rows = r.transpose(0, 1).reshape(El, P * R)
        return local, local_rows

    def combine(self, outputs: torch.Tensor) -> torch.Tensor:
        """(E/P, P*R, D) expert outputs -> (E, R, D) outputs for this rank's buffers."""
        P, El = self.ep_size, self.num_local
        if outputs.dim() != 3 or outputs.shape[0] != El or outputs.shape[1] % P:
            raise ValueError(f"expected ({El}, {P}*R, D) expert outputs, got {tuple(outputs.shape)}")
        _, PR, D = outputs.shape
        R = PR // P
        send = outputs.reshape(El, P, R, D).transpose(0, 1)  # (P destination ranks, El, R, D)
        return all_to_all(send, self.group).reshape(self.num_experts, R, D)

    def __repr__(self) -> str:
        return f"AllToAllExpertComm(ep_size={self.ep_size}, num_experts={self.num_experts})"
