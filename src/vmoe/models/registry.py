"""Named model configurations: ``create_model(name, **overrides)`` and ``list_models()``.

Sizes (SPEC 1.2): Ti 6 x 192 (MLP 768, 3 heads), S 8 x 512 (V-MoE's S, not DeiT's),
B 12 x 768, L 24 x 1024, H 32 x 1280, 15B 48 x 1408 (MLP 6400, 16 heads, patch 14).

- Dense ``vit_*``: ImageNet-1k head, no pre-logits (timm / AugReg convention).
- Paper ``vmoe_*``: E=32, k=2, C=1.05, every 2 unless named, routing groups of 8 images,
  ``representation_size = D`` and head bias ``-log(num_classes)`` as the official
  ``vmoe/configs/vmoe_paper/common.py``. Pass ``num_classes=18291`` for the paper's JFT head.
- Released official configs: ``vmoe_s32_last2_e8`` (IN-1k from scratch: E=8, last 2,
  pre-logits 512, expert dropout 0.2; evaluate it at C=4.0 via :func:`vmoe.routing_overrides`),
  ``vmoe_b16_e8`` (IN-21k ``randaug_strong`` / its fine-tunes: E=8, every 2, no pre-logits,
  head bias -10; the official fine-tune routes groups of 4 images, here ``group_size`` 8 unless
  overridden).
- Tiny CPU models ``vit_ti`` / ``vmoe_ti`` default to 32px images, patch 4 (64 patches + class
  token), 10 classes (CIFAR-sized); ``vmoe_ti`` has E=8, k=2, every 2.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from vmoe.config import ModelConfig, MoEConfig, RouterConfig, moe_layer_indices
from vmoe.config import replace as cfg_replace
from vmoe.models.vit import VisionTransformer, build_model

__all__ = ["create_model", "get_config", "list_models", "override_keys", "register_model"]

_SIZES: dict[str, dict[str, int]] = {
    "Ti": dict(num_layers=6, hidden_size=192, mlp_dim=768, num_heads=3),
    "S": dict(num_layers=8, hidden_size=512, mlp_dim=2048, num_heads=8),
    "B": dict(num_layers=12, hidden_size=768, mlp_dim=3072, num_heads=12),
    "L": dict(num_layers=24, hidden_size=1024, mlp_dim=4096, num_heads=16),
    "H": dict(num_layers=32, hidden_size=1280, mlp_dim=5120, num_heads=16),
    "15B": dict(num_layers=48, hidden_size=1408, mlp_dim=6400, num_heads=16),
}

_REGISTRY: dict[str, Callable[[], ModelConfig]] = {}

_ROUTER_KEYS = tuple(f.name for f in dataclasses.fields(RouterConfig))
_MOE_KEYS = tuple(f.name for f in dataclasses.fields(MoEConfig) if f.name != "router")
_MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "name")


def override_keys() -> list[str]:
    """Every keyword :func:`create_model` accepts."""
    return sorted({*_MODEL_KEYS, *_ROUTER_KEYS, *_MOE_KEYS})


def register_model(name: str, fn: Callable[[], ModelConfig]) -> None:
    """Register a config factory under ``name`` (an existing name raises ``ValueError``)."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = fn


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` filters with ``fnmatch`` (e.g. ``"vmoe_*"``)."""
    names = sorted(_REGISTRY)
    if pattern is not None:
        import fnmatch

        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def _unknown_model(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown model {name!r}{hint} (available: {', '.join(sorted(_REGISTRY))})")


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a registered model, with ``overrides`` applied.

    Overrides are ModelConfig fields (``num_classes``, ``image_size``, ``patch_size``,
    ``in_chans``, ``classifier``, ``representation_size``, ``dropout``, ``moe_dropout``,
    ``act``, ``moe_layers``, ...), MoEConfig fields (``group_size``, ``dispatch``,
    ``expert_init``) and RouterConfig fields (``num_experts``, ``num_selected``,
    ``capacity_factor``, ``noise_std``, ``batch_priority``, ``priority``, ...).
    MoE/router keys on a dense model add MoE layers only when ``num_experts`` or ``moe_layers``
    is among them (default placement every 2, RouterConfig defaults); otherwise they raise.

    Raises:
        ValueError: unknown model name (with close names), unknown override keys (listing the
            valid ones), or any invalid value (from the config validation).
    """
    if name not in _REGISTRY:
        raise _unknown_model(name)
    cfg = _REGISTRY[name]()
    valid = set(override_keys())
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for model {name!r}; valid keys: {sorted(valid)}")
    router_kw = {k: v for k, v in overrides.items() if k in _ROUTER_KEYS}
    moe_kw = {k: v for k, v in overrides.items() if k in _MOE_KEYS}
    model_kw = {k: v for k, v in overrides.items() if k in _MODEL_KEYS}
    moe = model_kw.pop("moe", cfg.moe)
    # On a dense model, num_experts= or a placement with MoE blocks (moe_layers=) adds MoE layers.
    places = "moe_layers" in model_kw and bool(
        moe_layer_indices(model_kw["moe_layers"], model_kw.get("num_layers", cfg.num_layers))
    )
    if moe is None and ("num_experts" in router_kw or places):
        moe = MoEConfig()
    elif moe is None and (router_kw or moe_kw):
        raise ValueError(
            f"model {name!r} is dense; MoE options {sorted({*router_kw, *moe_kw})} need "
            "num_experts= or moe_layers= to add MoE layers"
        )
    if moe is not None and (router_kw or moe_kw):
        if isinstance(moe, dict):
            moe = MoEConfig(**moe)
        router = cfg_replace(moe.router, **router_kw) if router_kw else moe.router
        moe = cfg_replace(moe, router=router, **moe_kw)
    return cfg_replace(cfg, moe=moe, **model_kw)


def create_model(name: str, **overrides: Any) -> VisionTransformer:
    """Build a registered model (see :func:`get_config` for ``overrides``)."""
    return build_model(get_config(name, **overrides))


# ----------------------------------------------------------------------------- registrations
def _dense(name: str, size: str, patch: int, **kw: Any) -> None:
    def fn() -> ModelConfig:
        return ModelConfig(name=name, patch_size=patch, **_SIZES[size], **kw)

    register_model(name, fn)


def _vmoe(
    name: str,
    size: str,
    patch: int,
    *,
    num_experts: int = 32,
    num_selected: int = 2,
    moe_layers: str = "every:2",
    pre_logits: bool = True,
    **kw: Any,
) -> None:
    def fn() -> ModelConfig:
        dims = _SIZES[size]
        moe = MoEConfig(
            router=RouterConfig(num_experts=num_experts, num_selected=num_selected, capacity_factor=1.05),
            group_size=8,
        )
        return ModelConfig(
            name=name,
            patch_size=patch,
            representation_size=dims["hidden_size"] if pre_logits else None,
            moe=moe,
            moe_layers=moe_layers,
            **dims,
            **kw,
        )

    register_model(name, fn)


_TINY = dict(image_size=32, num_classes=10)

_dense("vit_ti", "Ti", 4, **_TINY)
_dense("vit_s32", "S", 32)
_dense("vit_b32", "B", 32)
_dense("vit_b16", "B", 16)
_dense("vit_l16", "L", 16)
_dense("vit_h14", "H", 14)

_vmoe("vmoe_ti", "Ti", 4, num_experts=8, pre_logits=False, **_TINY)
_vmoe("vmoe_s32", "S", 32)
_vmoe("vmoe_b32", "B", 32)
_vmoe("vmoe_b16", "B", 16)
_vmoe("vmoe_l16", "L", 16)
_vmoe("vmoe_h14_last5", "H", 14, moe_layers="last:5")
_vmoe("vmoe_h14", "H", 14)
_vmoe("vmoe_15b", "15B", 14)
_vmoe("vmoe_s32_last2_e8", "S", 32, num_experts=8, moe_layers="last:2", moe_dropout=0.2)
_vmoe("vmoe_b16_e8", "B", 16, num_experts=8, pre_logits=False, head_bias_init=-10.0)
