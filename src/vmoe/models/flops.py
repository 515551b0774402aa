"""Analytic forward compute per image (SPEC 1.3.8: report per image FLOPs).

Conventions: a multiply-add is 2 FLOPs. Counted: every matmul / convolution (patch embedding,
attention q/k/v/out projections, ``Q K^T`` and ``A V``, dense MLPs, router logits, expert MLPs,
MAP pooling, pre-logits, head). **Not counted**: biases, LayerNorm, softmax, GELU/tanh, residual
adds, dropout, the position embedding add, pooling means, and routing bookkeeping (top-k, sorting,
dispatch/combine gathers).

Experts are counted as the capacity buffers run: per MoE layer and image,
``E * C_cap * 2 * (2 * D * M) / images_per_group`` where ``C_cap`` is the capacity of a *full*
routing group (``group_size`` images, ``S = group_size * T`` tokens) after rounding; empty buffer
slots are computed too, so this is the cost of the static-shape implementation. With dropless
routing (``capacity_factor=None``) every assignment runs: ``k * T`` rows per image.
:func:`realized_flops_per_image` counts instead the (token, expert) pairs actually kept, per
image, from a forward's metrics; with BPR and C < 1 it differs from image to image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vmoe.config import ModelConfig, RouterConfig
from vmoe.config import replace as cfg_replace
from vmoe.models.routing import UNSET
from vmoe.moe import effective_capacity

__all__ = [
    "expert_rows_per_image",
    "flops_breakdown",
    "flops_per_image",
    "gflops_per_image",
    "realized_flops_per_image",
    "realized_gflops_per_image",
]


def _routing_setup(
    model_or_cfg: nn.Module | ModelConfig,
) -> tuple[ModelConfig, dict[int, tuple[RouterConfig, int]]]:
    """(model config, {MoE block: (router config, group size in images)}), live configs for a model."""
    if isinstance(model_or_cfg, ModelConfig):
        cfg = model_or_cfg
        layers = {i: (cfg.moe.router, cfg.moe.group_size) for i in cfg.moe_block_indices} if cfg.moe else {}
        return cfg, layers
    cfg = getattr(model_or_cfg, "cfg", None)
    if not isinstance(cfg, ModelConfig) or not hasattr(model_or_cfg, "moe_layers"):
        raise ValueError(f"expected a vmoe model or a ModelConfig, got {type(model_or_cfg).__name__}")
    layers = {i: (layer.cfg.router, layer.cfg.group_size) for i, layer in model_or_cfg.moe_layers()}
    return cfg, layers


def expert_rows_per_image(router: RouterConfig, tokens_per_image: int, group_size: int) -> float:
    """Expert MLP rows run per image in one MoE layer: ``E * C_cap / group_size`` (dropless: ``k*T``)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1 image, got {group_size}")
    if router.capacity_factor is None:
        return float(router.num_selected * tokens_per_image)
    cap = effective_capacity(group_size * tokens_per_image, router, warn=False)
    return router.num_experts * cap / group_size


def flops_breakdown(
    model_or_cfg: nn.Module | ModelConfig,
    *,
    capacity_factor: float | None = UNSET,
    num_selected: int = UNSET,
) -> dict[str, float]:
    """Forward FLOPs per image by part: ``patch_embed``, ``attention``, ``mlp`` (dense blocks),
    ``router``, ``experts``, ``head`` (pooling + pre-logits + head), and ``total``.

    For a model, each MoE layer's current router config is used (so :func:`vmoe.routing_overrides`
    is honoured); ``capacity_factor`` / ``num_selected`` override every layer.
    """
    cfg, layers = _routing_setup(model_or_cfg)
    changes = {
        k: v
        for k, v in (("capacity_factor", capacity_factor), ("num_selected", num_selected))
        if v is not UNSET
    }
    if changes:
        layers = {i: (cfg_replace(r, **changes), g) for i, (r, g) in layers.items()}
    D, M, L = cfg.hidden_size, cfg.mlp_dim, cfg.num_layers
    (ph, pw), (gh, gw) = cfg.patch_hw, cfg.grid
    P = gh * gw
    T = cfg.num_tokens
    out = dict.fromkeys(("patch_embed", "attention", "mlp", "router", "experts", "head"), 0.0)
    out["patch_embed"] = 2.0 * P * (cfg.in_chans * ph * pw) * D
    # q, k, v, out projections (4 * T * D * D MACs) + QK^T and AV (2 * T * T * D MACs).
    out["attention"] = L * (2.0 * 4 * T * D * D + 2.0 * 2 * T * T * D)
    mlp_one = 2.0 * 2 * D * M  # two matmuls of a D -> M -> D MLP, per row
    out["mlp"] = (L - len(layers)) * T * mlp_one
    for router, group in layers.values():
        out["router"] += 2.0 * T * D * router.num_experts
        out["experts"] += expert_rows_per_image(router, T, group) * mlp_one
    head = 0.0
    if cfg.classifier == "map":
        # MACs: probe query 1xDxD, key/value 2xTxDxD, QK^T and AV 2xTxD, out DxD; then the MLP on 1 row.
        head += 2.0 * (D * D + 2 * T * D * D + 2 * T * D + D * D) + mlp_one
    F = D
    if cfg.representation_size is not None:
        head += 2.0 * D * cfg.representation_size
        F = cfg.representation_size
    head += 2.0 * F * cfg.num_classes
    out["head"] = head
    out["total"] = sum(out.values())
    return out


def flops_per_image(
    model_or_cfg: nn.Module | ModelConfig,
    *,
    capacity_factor: float | None = UNSET,
    num_selected: int = UNSET,
) -> float:
    """Total analytic forward FLOPs per image (see :func:`flops_breakdown`)."""
    return flops_breakdown(model_or_cfg, capacity_factor=capacity_factor, num_selected=num_selected)["total"]


def gflops_per_image(
    model_or_cfg: nn.Module | ModelConfig,
    *,
    capacity_factor: float | None = UNSET,
    num_selected: int = UNSET,
) -> float:
    """:func:`flops_per_image` in GFLOPs (1e9)."""
    return flops_per_image(model_or_cfg, capacity_factor=capacity_factor, num_selected=num_selected) / 1e9


def realized_flops_per_image(
    model: nn.Module, aux: dict[str, Any], *, batch_size: int | None = None
) -> torch.Tensor:
    """FLOPs each image of a forward actually used: (B,) float64.

    Everything but the experts as :func:`flops_breakdown` (with the model's current routing
    configs), plus for each MoE layer ``assignments_per_image * 2 * 2 * D * M`` (the kept
    (token, expert) pairs of that image, from ``aux["layers"][i]``). A dense model gives the
    static count for each of the ``aux["num_images"]`` (or ``batch_size``) images.
    """
    parts = flops_breakdown(model)
    cfg = model.cfg
    base = parts["total"] - parts["experts"]
    mlp_one = 2.0 * 2 * cfg.hidden_size * cfg.mlp_dim
    layers = aux.get("layers") or {}
    if not layers:
        n = batch_size if batch_size is not None else aux.get("num_images")
        if n is None:
            raise ValueError("aux has no MoE layers and no num_images: pass batch_size=")
        device = aux["aux_loss"].device if torch.is_tensor(aux.get("aux_loss")) else None
        return torch.full((int(n),), base, dtype=torch.float64, device=device)
    rows = None
    for metrics in layers.values():
        a = metrics["assignments_per_image"].detach().to(torch.float64)
        rows = a if rows is None else rows + a
    assert rows is not None
    return base + rows * mlp_one


def realized_gflops_per_image(model: nn.Module, aux: dict[str, Any]) -> torch.Tensor:
    """:func:`realized_flops_per_image` in GFLOPs, (B,) float64."""
    return realized_flops_per_image(model, aux) / 1e9
