"""Typed configuration dataclasses, validated when built.

Only numbers and choices live here; the modules that use them are elsewhere. Every user-facing
value is checked in ``__post_init__`` and a bad one raises ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["MoEConfig", "ModelConfig", "RouterConfig", "moe_layer_indices", "replace"]

DispatchBackend = Literal["index", "einsum"]


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        kind = "" if isinstance(value, int) else f" (a {type(value).__name__}; expected an integer)"
        raise ValueError(f"{name} must be a positive integer, got {value!r}{kind}")


def _non_negative(name: str, value: Any) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
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
            or isinstance(self.capacity_factor, bool)
            or not math.isfinite(self.capacity_factor)
            or self.capacity_factor <= 0
        ):
            raise ValueError(
                f"capacity_factor must be a number > 0 (or None for dropless), got {self.capacity_factor!r}"
            )
        _non_negative("noise_std", self.noise_std)
        if not isinstance(self.batch_priority, bool):
            raise ValueError(f"batch_priority must be true or false, got {self.batch_priority!r}")
        if self.priority not in ("max", "sum"):
            raise ValueError(f"priority must be 'max' or 'sum', got {self.priority!r}")
        if self.capacity_rounding not in ("ceil", "round"):
            raise ValueError(f"capacity_rounding must be 'ceil' or 'round', got {self.capacity_rounding!r}")
        if not isinstance(self.capacity_multiple_of, int) or self.capacity_multiple_of < 0:
            raise ValueError(
                f"capacity_multiple_of must be an integer >= 0, got {self.capacity_multiple_of!r}"
            )
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
        experts_impl: how the expert matmuls run: ``"auto"`` (default), ``"bmm"``, ``"loop"``,
            ``"packed"`` or ``"grouped_mm"`` (see :class:`vmoe.moe.Experts`; all compute the same
            function, they differ in speed).
    """

    router: RouterConfig = field(default_factory=RouterConfig)
    group_size: int = 8
    expert_init: Literal["identical", "independent"] = "identical"
    dispatch: DispatchBackend = "index"
    experts_impl: Literal["auto", "bmm", "loop", "packed", "grouped_mm"] = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = RouterConfig(**self.router)
        _positive_int("group_size", self.group_size)
        if self.expert_init not in ("identical", "independent"):
            raise ValueError(f"expert_init must be 'identical' or 'independent', got {self.expert_init!r}")
        if self.dispatch not in ("index", "einsum"):
            raise ValueError(f"dispatch must be 'index' or 'einsum', got {self.dispatch!r}")
        impls = ("auto", "bmm", "loop", "packed", "grouped_mm")
        if self.experts_impl not in impls:
            raise ValueError(f"experts_impl must be one of {', '.join(impls)}; got {self.experts_impl!r}")


def replace(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that re-runs validation (a typed copy with some fields changed)."""
    return dataclasses.replace(obj, **changes)


Classifier = Literal["token", "gap", "map"]
_PLACEMENT = re.compile(r"^\s*(every|last)[\s:_=]*(\d+)\s*$", re.IGNORECASE)


def moe_layer_indices(spec: str | list[int] | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """The 0-indexed blocks whose MLP is an MoE, from a placement spec (SPEC 1.2).

    Args:
        spec: ``"every:n"`` (blocks n-1, 2n-1, ...), ``"last:n"`` (the last n odd blocks, e.g.
            S/32 ``last:2`` = (5, 7)), ``"none"`` / ``""`` (no MoE block), or an explicit list
            of block indices. ``"every 2"``, ``"every2"``, ``"last_5"`` are accepted too.
        num_layers: blocks in the encoder.
    Raises:
        ValueError: an unparsable spec, n < 1, more odd blocks requested than exist, or an
            index outside ``[0, num_layers)``.
    """
    if isinstance(spec, str):
        if spec.strip().lower() in ("", "none"):
            return ()
        m = _PLACEMENT.match(spec)
        if not m:
            raise ValueError(
                f"moe_layers must be 'every:n', 'last:n', 'none' or a list of block indices, got {spec!r}"
            )
        kind, n = m.group(1).lower(), int(m.group(2))
        if n < 1:
            raise ValueError(f"moe_layers {spec!r}: n must be >= 1")
        if kind == "every":
            return tuple(range(n - 1, num_layers, n))
        odd = tuple(range(1, num_layers, 2))
        if n > len(odd):
            raise ValueError(f"moe_layers {spec!r}: only {len(odd)} odd blocks in {num_layers} layers")
        return odd[-n:]
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"moe_layers must be a string or a list of block indices, got {spec!r}")
    out = []
    for i in spec:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers:
            raise ValueError(
                f"moe_layers: block index {i!r} not in [0, {num_layers}) (num_layers={num_layers})"
            )
        out.append(i)
    if len(set(out)) != len(out):
        raise ValueError(f"moe_layers has duplicate block indices: {list(spec)}")
    return tuple(sorted(out))


def _pair(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        h, w = value
    else:
        h = w = value
    for v in (h, w):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer or a pair (h, w) of them, got {value!r}")
    return int(h), int(w)


@dataclass(kw_only=True)
class ModelConfig:
    """A ViT / V-MoE classifier (SPEC 1.1, 1.2); round-trips through JSON (``to_dict``/``from_dict``).

    Attributes:
        name: registry name the config came from (informational).
        num_classes: head outputs; 0 = no head (the model returns pre-logit features).
        image_size: int or (h, w); must be divisible by ``patch_size``.
        patch_size: int or (h, w).
        in_chans: image channels.
        num_layers, hidden_size (D), mlp_dim (M), num_heads: encoder shape.
        classifier: ``"token"`` (class token), ``"gap"`` (mean of tokens) or ``"map"``
            (multi-head attention pooling with a learned probe, as big_vision/vmoe ``MapHead``).
        representation_size: width of the optional ``tanh(Linear)`` pre-logits layer.
        dropout: after the position embedding, after attention, and inside dense MLPs.
        moe_dropout: dropout inside the experts; None = ``dropout`` (as the official code).
        act: MLP activation (``"gelu_tanh"`` default = Flax ``nn.gelu``; ``"gelu"`` exact).
        head_bias_init: head bias; None = ``-log(num_classes)`` (the official V-MoE paper configs,
            ``vmoe/configs/vmoe_paper/common.py``; about -9.8 for JFT's 18291 classes; the
            official fine-tuning configs pass -10.0 explicitly).
        moe: the MoE layers' settings; None = dense ViT.
        moe_layers: placement (see :func:`moe_layer_indices`); ignored when ``moe`` is None.
    """

    name: str | None = None
    num_classes: int = 1000
    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    in_chans: int = 3
    num_layers: int = 12
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    classifier: Classifier = "token"
    representation_size: int | None = None
    dropout: float = 0.0
    moe_dropout: float | None = None
    act: str = "gelu_tanh"
    head_bias_init: float | None = None
    moe: MoEConfig | None = None
    moe_layers: str | tuple[int, ...] = "every:2"

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ValueError(f"moe must be a MoEConfig, a dict or None, got {self.moe!r}")
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        if isinstance(self.patch_size, list):
            self.patch_size = tuple(self.patch_size)
        if isinstance(self.moe_layers, list):
            self.moe_layers = tuple(self.moe_layers)
        if (
            not isinstance(self.num_classes, int)
            or isinstance(self.num_classes, bool)
            or self.num_classes < 0
        ):
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        for name in ("in_chans", "num_layers", "hidden_size", "mlp_dim", "num_heads"):
            _positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        (ih, iw), (ph, pw) = self.image_hw, self.patch_hw
        if ih % ph or iw % pw:
            raise ValueError(f"image_size {ih}x{iw} is not divisible by patch_size {ph}x{pw}")
        if self.classifier not in ("token", "gap", "map"):
            raise ValueError(f"classifier must be 'token', 'gap' or 'map', got {self.classifier!r}")
        if self.representation_size is not None:
            _positive_int("representation_size", self.representation_size)
        for name in ("dropout", "moe_dropout"):
            v = getattr(self, name)
            if v is None and name == "moe_dropout":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
        if self.act not in ("gelu_tanh", "gelu", "relu"):
            raise ValueError(f"act must be 'gelu_tanh', 'gelu' or 'relu', got {self.act!r}")
        if self.head_bias_init is not None and (
            not isinstance(self.head_bias_init, (int, float)) or not math.isfinite(self.head_bias_init)
        ):
            raise ValueError(f"head_bias_init must be a finite number or None, got {self.head_bias_init!r}")
        moe_layer_indices(self.moe_layers, self.num_layers)  # validates

    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair("image_size", self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair("patch_size", self.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per side, (h, w)."""
        (ih, iw), (ph, pw) = self.image_hw, self.patch_hw
        return ih // ph, iw // pw

    @property
    def num_tokens(self) -> int:
        """Tokens per image entering the encoder (patches, plus the class token with ``token``)."""
        h, w = self.grid
        return h * w + (1 if self.classifier == "token" else 0)

    @property
    def moe_block_indices(self) -> tuple[int, ...]:
        """Blocks with an MoE MLP (empty for a dense model)."""
        if self.moe is None:
            return ()
        return moe_layer_indices(self.moe_layers, self.num_layers)

    @property
    def expert_dropout(self) -> float:
        return self.dropout if self.moe_dropout is None else float(self.moe_dropout)

    @property
    def head_bias(self) -> float:
        if self.head_bias_init is not None:
            return float(self.head_bias_init)
        return -math.log(self.num_classes) if self.num_classes > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples as lists, nested MoE/router configs as dicts)."""

        def plain(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v

        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`. Unknown keys raise ``ValueError`` listing the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(valid)}")
        d = dict(d)
        moe = d.get("moe")
        if isinstance(moe, dict):
            moe = dict(moe)
            moe_valid = {f.name for f in dataclasses.fields(MoEConfig)}
            bad = sorted(set(moe) - moe_valid)
            if bad:
                raise ValueError(f"unknown MoEConfig keys {bad}; valid keys: {sorted(moe_valid)}")
            router = moe.get("router")
            if isinstance(router, dict):
                r_valid = {f.name for f in dataclasses.fields(RouterConfig)}
                bad = sorted(set(router) - r_valid)
                if bad:
                    raise ValueError(f"unknown RouterConfig keys {bad}; valid keys: {sorted(r_valid)}")
                moe["router"] = RouterConfig(**router)
            d["moe"] = MoEConfig(**moe)
        return cls(**d)
