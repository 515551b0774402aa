"""Test-time routing control (SPEC 1.3.8): capacity, k, BPR, per layer, without retraining.

Each chosen MoE layer gets a validated copy of its router config (``vmoe.config.replace``),
assigned to both ``layer.cfg.router`` and ``layer.router.cfg`` (the same object). The model's
``cfg`` (what checkpoints save) is left unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from vmoe.config import replace as cfg_replace
from vmoe.moe import MoEMlp

__all__ = ["UNSET", "routing_overrides", "set_routing"]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Marks a knob left as it is (``None`` is a real value: dropless capacity)."""


def _moe_layers(model: nn.Module) -> list[tuple[int, MoEMlp]]:
    """(block index, layer) of every MoE layer; a wrapped model (DDP, compile, a user's module)
    is searched for the model that numbers its blocks, else the layers are numbered in order."""
    for mod in (model, *model.modules()):
        if callable(getattr(mod, "moe_layers", None)):
            return list(mod.moe_layers())
    found = [mod for mod in model.modules() if isinstance(mod, MoEMlp)]
    return list(enumerate(found))


def _select(model: nn.Module, layers: Iterable[int] | None) -> list[tuple[int, MoEMlp]]:
    all_layers = _moe_layers(model)
    if layers is None:
        return all_layers
    by_index = dict(all_layers)
    wanted = list(layers)
    bad = [i for i in wanted if i not in by_index]
    if bad:
        raise ValueError(f"layers {bad} are not MoE blocks; MoE blocks are {sorted(by_index)}")
    return [(i, by_index[i]) for i in wanted]


def _changes(**knobs: Any) -> dict[str, Any]:
    return {k: v for k, v in knobs.items() if v is not UNSET}


def set_routing(
    model: nn.Module,
    *,
    capacity_factor: float | None = UNSET,
    num_selected: int = UNSET,
    batch_priority: bool = UNSET,
    priority: str = UNSET,
    layers: Iterable[int] | None = None,
) -> None:
    """Permanently change routing knobs of MoE layers (all, or the blocks in ``layers``).

    ``capacity_factor`` may be < 1 (tokens are dropped; BPR decides which) or None (dropless).
    Raises ``ValueError`` for invalid values (validated by :class:`~vmoe.config.RouterConfig`,
    e.g. k > E) or for block indices that are not MoE blocks; nothing changes then.
    """
    changes = _changes(
        capacity_factor=capacity_factor,
        num_selected=num_selected,
        batch_priority=batch_priority,
        priority=priority,
    )
    chosen = _select(model, layers)
    new = [(layer, cfg_replace(layer.cfg.router, **changes)) for _, layer in chosen]  # validate all first
    for layer, router_cfg in new:
        _assign(layer, router_cfg)


def _assign(layer: MoEMlp, router_cfg: Any) -> None:
    layer.cfg = cfg_replace(layer.cfg, router=router_cfg)
    layer.router.cfg = router_cfg


@contextlib.contextmanager
def routing_overrides(
    model: nn.Module,
    *,
    capacity_factor: float | None = UNSET,
    num_selected: int = UNSET,
    batch_priority: bool = UNSET,
    priority: str = UNSET,
    layers: Iterable[int] | None = None,
) -> Iterator[nn.Module]:
    """Context manager: :func:`set_routing` on entry, the previous configs restored on exit.

    Example::

        with vmoe.routing_overrides(model, capacity_factor=0.5, batch_priority=True):
            logits, aux = model(images)
    """
    saved = [(layer, layer.cfg, layer.router.cfg) for _, layer in _moe_layers(model)]
    set_routing(
        model,
        capacity_factor=capacity_factor,
        num_selected=num_selected,
        batch_priority=batch_priority,
        priority=priority,
        layers=layers,
    )
    try:
        yield model
    finally:
        for layer, cfg, router_cfg in saved:
            layer.cfg = cfg
            layer.router.cfg = router_cfg
