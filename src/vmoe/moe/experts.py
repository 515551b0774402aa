"""Stacked expert MLPs: E identical-architecture MLPs applied to their capacity buffers at once."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vmoe.layers import Activation, activation, compute_dtype, dropout, xavier_uniform_

__all__ = ["Experts"]


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

    def forward(self, buffers: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(E, R, D) -> (E, R, D).

        Args:
            buffers: the capacity buffers of the experts held here.
            rows: optional (E, R) int64 global ids of the buffer rows, for positional dropout.
        """
        if buffers.dim() != 3 or buffers.shape[0] != self.num_experts:
            raise ValueError(f"experts expect ({self.num_experts}, R, D) buffers, got {tuple(buffers.shape)}")
        dtype = compute_dtype(buffers)
        w1, b1, w2, b2 = (t.to(dtype) for t in (self.w1, self.b1, self.w2, self.b2))
        h = torch.baddbmm(b1.unsqueeze(1), buffers.to(dtype), w1)  # (E, R, M)
        h = dropout(activation(h, self.act), self.p, self.training, stream=self.stream, rows=rows)
        out = torch.baddbmm(b2.unsqueeze(1), h, w2)  # (E, R, D)
        return dropout(out, self.p, self.training, stream=self.stream + 1, rows=rows)

    def extra_repr(self) -> str:
        E, D, M = self.w1.shape
        return f"num_experts={E}, dim={D}, hidden_dim={M}, act={self.act}, init={self.init}"
