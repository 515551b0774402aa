"""Small building blocks shared by the MoE layer and the models: activations, dropout, MLP."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vmoe import rng

__all__ = [
    "Activation",
    "Mlp",
    "activation",
    "activation_backward",
    "compute_dtype",
    "dropout",
    "prefer_static_shapes",
    "xavier_uniform_",
]

Activation = Literal["gelu_tanh", "gelu", "relu"]


def activation(x: torch.Tensor, kind: Activation) -> torch.Tensor:
    """GELU with the tanh approximation (Flax's default, V-MoE's), exact GELU, or ReLU."""
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "gelu":
        return F.gelu(x)
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {kind!r}; expected 'gelu_tanh', 'gelu' or 'relu'")


def activation_backward(g: torch.Tensor, x: torch.Tensor, kind: Activation) -> torch.Tensor:
    """The gradient of :func:`activation` at its input ``x`` for the output gradient ``g`` (the
    kernels autograd runs: ``gelu_backward``; for ReLU ``threshold_backward``, zero where x <= 0)."""
    if kind == "gelu_tanh":
        return torch.ops.aten.gelu_backward(g, x, approximate="tanh")
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(g, x)
    if kind == "relu":
        return torch.ops.aten.threshold_backward(g, x, 0)
    raise ValueError(f"unknown activation {kind!r}; expected 'gelu_tanh', 'gelu' or 'relu'")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype when autocast is on, else ``x.dtype``."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):  # the device-type forms exist from torch 2.4
        return torch.get_autocast_dtype(kind)
    return x.dtype


def prefer_static_shapes(device: torch.device) -> bool:
    """Whether MoE code on ``device`` should avoid host synchronisation and data-dependent shapes.

    True off the CPU (a sync stalls the GPU's queue; static shapes allow CUDA graphs) and inside
    ``torch.compile``; on the CPU a sync is free, and skipping empty capacity slots pays.
    """
    return device.type != "cpu" or torch.compiler.is_compiling()


def dropout(
    x: torch.Tensor, p: float, training: bool, *, stream: int, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverted dropout whose mask, inside :func:`vmoe.rng.positional_rng`, depends on position.

    Args:
        x: (..., W).
        p: drop probability.
        stream: the calling module's random stream id.
        rows: int64 tensor of ``x.shape[:-1]``, the global id of each row (negative ids: rows that
            do not matter, e.g. empty buffer slots). Without a positional context, or without
            ``rows``, torch's generator is used.
    """
    if not training or p <= 0:
        return x
    keep = None if rows is None else rng.positional_keep_mask(stream, rows, x.shape[-1], p)
    if keep is None:
        return F.dropout(x, p, training=True)
    return x * keep.to(x.dtype) / (1.0 - p)


def xavier_uniform_(t: torch.Tensor, fan_in: int, fan_out: int) -> torch.Tensor:
    """Xavier/Glorot uniform init of ``t`` with explicit fans (works for stacked expert kernels)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return t.uniform_(-bound, bound)


class Mlp(nn.Module):
    """Dense transformer MLP: Linear(D, M) -> act -> Dropout -> Linear(M, D) -> Dropout.

    Init as the official ViT MlpBlock: xavier-uniform kernels, biases N(0, 1e-6).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        act: Activation = "gelu_tanh",
        dropout: float = 0.0,
        stream: int = 0,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = act
        self.p = dropout
        self.stream = stream
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.fc1, self.fc2):
            xavier_uniform_(lin.weight, lin.in_features, lin.out_features)
            nn.init.normal_(lin.bias, std=1e-6)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) -> (..., D). ``rows``: global row ids of ``x.shape[:-1]`` for positional dropout."""
        h = dropout(activation(self.fc1(x), self.act), self.p, self.training, stream=self.stream, rows=rows)
        return dropout(self.fc2(h), self.p, self.training, stream=self.stream + 1, rows=rows)
