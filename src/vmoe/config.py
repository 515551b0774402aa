"""Typed configuration dataclasses, validated when built.

Only numbers and choices live here; the modules that use them are elsewhere. Every user-facing
value is checked in ``__post_init__`` and a bad one raises ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["MoEConfig", "RouterConfig", "replace"]

DispatchBackend = Literal["index", "einsum"]


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(kw_only=True)
class RouterConfig:
    """The noisy top-k router of V-MoE (SPEC 1.3), with its test-time knobs.

    Attributes:
        num_experts: E.
        num_selected: k, experts per token (the paper uses 2).
        capacity_factor: C; capacity per expert per group is ``ceil(k*S*C/E)`` rounded up to
            ``capacity_multiple_of``. ``None`` means dropless (capacity = S, nothing dropped).
        noise_std: the router noise is N(0, (noise_std / E)^2), training only.
        batch_priority: Batch Prioritized Routing (off in training in the official configs).
        priority: BPR score, ``"max"`` (top-1 gate) or ``"sum"`` (sum of the top-k gates).
        capacity_multiple_of: 4 as in the official code; 0 or 1 disables the rounding.
        importance_weight, load_weight: the paper's auxiliary-loss weights (0.005 each).
        gshard_weight, z_loss_weight: optional extra losses, off by default.
    """

    num_experts: int = 8
    num_selected: int = 2
    capacity_factor: float | None = 1.05
    noise_std: float = 1.0
    batch_priority: bool = False
    priority: Literal["max", "sum"] = "max"
    capacity_multiple_of: int = 4
    capacity_rounding: Literal["ceil", "round"] = "ceil"
    importance_weight: float = 0.005
    load_weight: float = 0.005
    gshard_weight: float = 0.0
    z_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        _positive_int("num_experts", self.num_experts)
        _positive_int("num_selected", self.num_selected)
        if self.num_selected > self.num_experts:
            raise ValueError(
                f"num_selected (k={self.num_selected}) must be <= num_experts (E={self.num_experts})"
            )
        if self.capacity_factor is not None and (
            not isinstance(self.capacity_factor, (int, float))
            or not math.isfinite(self.capacity_factor)
            or self.capacity_factor <= 0
        ):
            raise ValueError(f"capacity_factor must be a number > 0 (or None for dropless), got {self.capacity_factor!r}")
        _non_negative("noise_std", self.noise_std)
        if self.priority not in ("max", "sum"):
            raise ValueError(f"priority must be 'max' or 'sum', got {self.priority!r}")
        if self.capacity_rounding not in ("ceil", "round"):
            raise ValueError(f"capacity_rounding must be 'ceil' or 'round', got {self.capacity_rounding!r}")
        if not isinstance(self.capacity_multiple_of, int) or self.capacity_multiple_of < 0:
            raise ValueError(f"capacity_multiple_of must be an integer >= 0, got {self.capacity_multiple_of!r}")
        for name in ("importance_weight", "load_weight", "gshard_weight", "z_loss_weight"):
            _non_negative(name, getattr(self, name))


@dataclass(kw_only=True)
class MoEConfig:
    """An MoE MLP layer: router, routing groups, experts and dispatch backend.

    Attributes:
        router: the router's settings.
        group_size: images per routing group (default 8, as the official ``8 x tokens``).
            A batch of fewer images, or a last partial group, is routed as a smaller group.
        expert_init: ``"identical"`` (official configs: every expert starts equal) or
            ``"independent"``.
        dispatch: ``"index"`` (gather/scatter into capacity buffers, the fast path) or
            ``"einsum"`` (GShard-style one-hot einsum; the reference for tests).
    """

    router: RouterConfig = field(default_factory=RouterConfig)
    group_size: int = 8
    expert_init: Literal["identical", "independent"] = "identical"
    dispatch: DispatchBackend = "index"

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = RouterConfig(**self.router)
        _positive_int("group_size", self.group_size)
        if self.expert_init not in ("identical", "independent"):
            raise ValueError(f"expert_init must be 'identical' or 'independent', got {self.expert_init!r}")
        if self.dispatch not in ("index", "einsum"):
            raise ValueError(f"dispatch must be 'index' or 'einsum', got {self.dispatch!r}")


def replace(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that re-runs validation (a typed copy with some fields changed)."""
    return dataclasses.replace(obj, **changes)
