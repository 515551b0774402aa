"""The noisy top-k router of V-MoE: logits in float32, noise, softmax, top-k, auxiliary losses."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vmoe import rng
from vmoe.config import RouterConfig
from vmoe.moe.routing import (
    Routing,
    compute_capacity,
    gshard_loss,
    importance_loss,
    load_loss,
    top_experts_per_item,
    z_loss,
)

__all__ = ["CapacityRoundingWarning", "RouterOutput", "TopKRouter", "effective_capacity"]


class CapacityRoundingWarning(UserWarning):
    """Rounding the capacity (ceil, multiple of 4) moved the effective capacity factor by > 10%."""


_warned: set[tuple[int, int, int, float]] = set()


def effective_capacity(group_tokens: int, cfg: RouterConfig, *, warn: bool = True) -> int:
    """Capacity for a group of ``group_tokens`` tokens under ``cfg`` (dropless: all tokens).

    Warns once per setting when rounding moves the effective capacity factor by more than 10%.
    """
    if cfg.capacity_factor is None:
        return group_tokens
    cap = compute_capacity(
        group_tokens,
        cfg.num_experts,
        cfg.num_selected,
        float(cfg.capacity_factor),
        multiple_of=cfg.capacity_multiple_of,
        rounding=cfg.capacity_rounding,
    )
    if warn and not torch.compiler.is_compiling():  # (a warning is not traceable)
        eff = cap * cfg.num_experts / (group_tokens * cfg.num_selected)
        key = (group_tokens, cfg.num_experts, cfg.num_selected, float(cfg.capacity_factor))
        if abs(eff - cfg.capacity_factor) > 0.1 * cfg.capacity_factor and key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"capacity rounding: S={group_tokens}, E={cfg.num_experts}, k={cfg.num_selected}, "
                f"C={cfg.capacity_factor} gives capacity {cap}, an effective C of {eff:.3g}",
                CapacityRoundingWarning,
                stacklevel=3,
            )
    return cap


@dataclass
class RouterOutput:
    """What the router returns for one chunk of G groups.

    Attributes:
        routing: the routing plan, fields (G, S, K).
        aux_loss: (G,) weighted auxiliary loss of each group.
        gates: (G, S, E) the gates used for routing (noisy in training).
        metrics: (G,) unweighted, detached metrics under the keys ``importance_loss``,
            ``load_loss`` (0 when no noise was added, i.e. in evaluation), ``gshard_loss`` and
            ``z_loss``.
    """

    routing: Routing
    aux_loss: torch.Tensor
    gates: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class TopKRouter(nn.Module):
    """Noisy top-k router (paper Sec. 2.1 and App. A).

    ``logits = x W`` (bias-free, float32 even under autocast); in training
    ``noisy = logits + eps, eps ~ N(0, (noise_std/E)^2)``; ``gates = softmax(noisy)``; top-k after
    the softmax, gates never renormalised. The importance loss uses the clean softmax; the load
    loss the clean logits against the k-th noisy logit.

    Args:
        dim: D, token width.
        cfg: the router's settings (its knobs may be changed at test time).
        stream: id of this router's random stream (unique per layer; see :mod:`vmoe.rng`).
    """

    def __init__(self, dim: int, cfg: RouterConfig, *, stream: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.stream = stream
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))  # (E, D), torch Linear layout
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Flax Dense default (lecun_normal): truncated normal, std sqrt(1/fan_in) before truncation.
        std = math.sqrt(1.0 / self.weight.shape[1]) / 0.87962566103423978
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., E) router logits in float32 (float64 inputs stay float64)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype))

    def forward(
        self, x: torch.Tensor, *, first_image: int = 0, tokens_per_image: int | None = None
    ) -> RouterOutput:
        """Route G groups of S tokens.

        Args:
            x: (G, S, D) tokens; groups are consecutive images.
            first_image: index (in this process's batch) of the first image of ``x``; used only
                for positional noise.
            tokens_per_image: T, to map tokens to images for positional noise (default S).
        """
        _, finish = self.route(x, first_image=first_image, tokens_per_image=tokens_per_image)
        return finish()

    def route(
        self, x: torch.Tensor, *, first_image: int = 0, tokens_per_image: int | None = None
    ) -> tuple[Routing, Callable[[], RouterOutput]]:
        """:meth:`forward` in two steps: the routing plan now, the auxiliary losses when ``finish()``
        is called (same values, same random noise). :class:`~vmoe.moe.MoEMlp` calls ``finish`` after
        the experts' matmuls have been issued: on a GPU the losses' ~26 small kernels then queue
        behind the matmuls instead of delaying them. Arguments as :meth:`forward`.
        """
        if x.dim() != 3:
            raise ValueError(f"router input must be (G, S, D), got {tuple(x.shape)}")
        cfg = self.cfg
        S = x.shape[1]
        E, k = cfg.num_experts, cfg.num_selected
        if k > E:
            raise ValueError(f"num_selected (k={k}) must be <= num_experts (E={E})")
        capacity = effective_capacity(S, cfg)
        logits = self.logits(x)  # (G, S, E)
        gates_clean = torch.softmax(logits, dim=-1)
        sigma = cfg.noise_std / E
        noisy = self.training and sigma > 0
        if noisy:
            T = tokens_per_image or S
            noise = rng.positional_normal(
                self.stream,
                tuple(logits.shape),
                items_per_image=T * E,
                device=logits.device,
                first_image=first_image,
                dtype=logits.dtype,
            )
            noise = (torch.randn_like(logits) if noise is None else noise) * sigma
            noisy_logits = logits + noise
            gates = torch.softmax(noisy_logits, dim=-1)
        else:
            noisy_logits = logits
            gates = gates_clean
        routing = top_experts_per_item(
            gates, k, capacity, batch_priority=cfg.batch_priority, priority=cfg.priority
        )

        def finish() -> RouterOutput:
            return self._losses(routing, logits, noisy_logits, gates_clean, gates, sigma if noisy else 0.0)

        return routing, finish

    def _losses(
        self,
        routing: Routing,
        logits: torch.Tensor,
        noisy_logits: torch.Tensor,
        gates_clean: torch.Tensor,
        gates: torch.Tensor,
        sigma: float,
    ) -> RouterOutput:
        """The auxiliary losses and metrics of one routed chunk (``sigma`` 0: no noise was added)."""
        cfg = self.cfg
        k = cfg.num_selected
        noisy = sigma > 0
        imp = importance_loss(gates_clean)  # (G,)
        aux = cfg.importance_weight * imp
        zero = torch.zeros_like(imp)
        load = load_loss(logits, noisy_logits, sigma, k) if noisy else zero
        if noisy:
            aux = aux + cfg.load_weight * load
        gsh = gshard_loss(gates) if cfg.gshard_weight > 0 else zero
        if cfg.gshard_weight > 0:
            aux = aux + cfg.gshard_weight * gsh
        zl = z_loss(logits) if cfg.z_loss_weight > 0 else zero
        if cfg.z_loss_weight > 0:
            aux = aux + cfg.z_loss_weight * zl
        metrics = {
            "importance_loss": imp.detach(),
            "load_loss": load.detach(),
            "gshard_loss": gsh.detach(),
            "z_loss": zl.detach(),
        }
        return RouterOutput(routing=routing, aux_loss=aux, gates=gates, metrics=metrics)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"dim={self.weight.shape[1]}, num_experts={c.num_experts}, k={c.num_selected}, "
            f"C={c.capacity_factor}, bpr={c.batch_priority}"
        )
