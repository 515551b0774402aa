"""Sparse upcycling (Komatsuzaki et al. 2022): initialise a V-MoE from a dense ViT.

Every non-MoE weight is copied by name; each MoE block's experts all start as copies of the dense
block's MLP (``fc1``/``fc2``, transposed into the experts' (in, out) layout); routers keep their
fresh initialisation. With uniform gates (router weight 0), ``k = E`` and no token dropped, the
upcycled model computes exactly the dense model, since ``sum_e (1/E) MLP(x) = MLP(x)``.

Sources: one of our ``vit_*`` models (or its state dict), a vmoe checkpoint / run directory, or a
timm ``VisionTransformer`` state dict (same module names; ``pre_logits.fc`` is renamed to
``pre_logits_fc``, ``fc_norm`` is handled as described in :func:`upcycle`).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vmoe.models.vit import VisionTransformer
from vmoe.models.vit import resize_pos_embed as _resize_pos_embed

__all__ = ["load_dense_state_dict", "upcycle", "upcycle_checkpoint"]

_EXPERT_KEY = re.compile(r"^blocks\.(\d+)\.mlp\.experts\.(w1|b1|w2|b2)$")
_ROUTER_KEY = re.compile(r"^blocks\.(\d+)\.mlp\.router\.")
# expert parameter -> (dense key suffix, transpose?)
_EXPERT_SOURCE = {
    "w1": ("fc1.weight", True),
    "b1": ("fc1.bias", False),
    "w2": ("fc2.weight", True),
    "b2": ("fc2.bias", False),
}
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "state_dict_ema", "model_ema")


def _to_tensor(key: str, v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, np.ndarray) or np.isscalar(v):
        return torch.from_numpy(np.asarray(v))
    raise ValueError(f"{key}: expected a tensor or array, got {type(v).__name__}")


def _source_state_dict(dense: nn.Module | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict in our naming from a module or (possibly wrapped) state dict."""
    if isinstance(dense, nn.Module):
        sd: Mapping[str, Any] = dense.state_dict()
    elif isinstance(dense, Mapping):
        sd = dense
        # training-script wrappers: {"state_dict": {...}}, {"model": {...}, "optimizer": ...}
        for w in _WRAPPER_KEYS:
            if (
                w in sd
                and isinstance(sd[w], Mapping)
                and not any(isinstance(v, (torch.Tensor, np.ndarray)) for v in sd.values())
            ):
                sd = sd[w]
                break
    else:
        raise ValueError(f"dense must be an nn.Module or a state dict, got {type(dense).__name__}")
    out = {k: _to_tensor(k, v) for k, v in sd.items()}
    if out and all(k.startswith("module.") for k in out):  # DistributedDataParallel prefix
        out = {k[len("module.") :]: v for k, v in out.items()}
    # timm names that differ from ours
    for suffix in ("weight", "bias"):
        old = f"pre_logits.fc.{suffix}"
        if old in out:
            out[f"pre_logits_fc.{suffix}"] = out.pop(old)
    return out


def _is_skipped(key: str, skip: Sequence[str]) -> bool:
    return any(key == s or key.startswith(s + ".") for s in skip)


def _check_shape(key: str, src_key: str, got: tuple[int, ...], want: tuple[int, ...], hint: str = "") -> None:
    if got != want:
        where = key if src_key == key else f"{key} (from dense {src_key})"
        raise ValueError(
            f"shape mismatch for {where}: dense checkpoint has {tuple(got)}, target model expects "
            f"{tuple(want)}{hint}"
        )


def upcycle(
    dense: nn.Module | Mapping[str, Any],
    target: VisionTransformer,
    *,
    strict: bool = True,
    skip_head: bool = False,
    skip: Sequence[str] = (),
    resize_pos_embed: bool = True,
    source_act: str | None = None,
) -> VisionTransformer:
    """Copy a dense ViT's weights into a V-MoE of the same shape, in place, and return it.

    Args:
        dense: our dense ``vit_*`` model, its state dict, or a timm ``VisionTransformer`` model /
            state dict (a ``{"state_dict": ...}``/``{"model": ...}`` wrapper and a ``module.``
            prefix are removed; ``pre_logits.fc`` becomes ``pre_logits_fc``). Numpy arrays are
            accepted as values.
        target: the V-MoE to initialise (e.g. ``vmoe.create_model("vmoe_ti")``).
        strict: every target weight (except routers and ``skip``) must come from ``dense`` and
            every ``dense`` weight must be used; else ``ValueError`` listing the offenders. With
            ``strict=False`` they are reported in a warning and the target keeps its own init.
        skip_head: keep the target's fresh head (e.g. when ``num_classes`` differ); the dense
            head is ignored. Same as adding ``"head"`` to ``skip``.
        skip: key prefixes (``"pre_logits_fc"``, ``"head"``, ``"blocks.3"``, ...) left at the
            target's init and ignored in ``dense``.
        resize_pos_embed: when the dense position embedding is for another patch grid, resize it
            (2-D bilinear, :func:`vmoe.resize_pos_embed`); if False, that is a shape mismatch.
        source_act: the dense model's activation when ``dense`` is a state dict or another
            library's module (read from ``dense`` when it is a vmoe model). A mismatch with the
            target's, or an unknown one, warns: the upcycled model would not compute the same function.

    timm's ``fc_norm`` (a LayerNorm after average pooling, used by ``global_pool="avg"`` models
    instead of ``norm``) has no exact counterpart here (our ``gap`` classifier normalises before
    pooling): ``strict`` raises; otherwise it is loaded into ``norm`` with a warning.

    Raises:
        ValueError: a shape mismatch (naming the key and both shapes), a target that is not a
            :class:`VisionTransformer`, or (``strict``) missing / unused weights.
    """
    if not isinstance(target, VisionTransformer):
        raise ValueError(f"target must be a vmoe VisionTransformer, got {type(target).__name__}")
    skip = tuple(skip) + (("head",) if skip_head else ())
    src = _source_state_dict(dense)
    if isinstance(dense, VisionTransformer):
        source_act = dense.cfg.act
    if source_act is None:
        warnings.warn(
            f"the dense weights do not say which activation their MLPs used (a state dict, or another "
            f"library's model); the target uses act={target.cfg.act!r}, timm's ViTs exact GELU: build the "
            "target with act='gelu' for those (or pass source_act= to silence this)",
            stacklevel=2,
        )
    elif source_act != target.cfg.act:
        warnings.warn(
            f"dense model uses act={source_act!r} but the target uses act={target.cfg.act!r}; "
            "the upcycled model will not compute the same function",
            stacklevel=2,
        )
    if "fc_norm.weight" in src and "norm.weight" not in src:
        msg = (
            "dense checkpoint has timm's fc_norm (LayerNorm after average pooling) and no norm; "
            "vmoe normalises before pooling, so there is no exact equivalent"
        )
        if strict:
            raise ValueError(msg + "; pass strict=False to load fc_norm into norm as an approximation")
        warnings.warn(msg + "; loading fc_norm into norm", stacklevel=2)
        for suffix in ("weight", "bias"):
            if f"fc_norm.{suffix}" in src:
                src[f"norm.{suffix}"] = src.pop(f"fc_norm.{suffix}")

    moe_blocks = {i for i, _ in target.moe_layers()}
    tgt = target.state_dict()
    used: set[str] = set()
    missing: list[str] = []
    updates: dict[str, torch.Tensor] = {}
    for key, t in tgt.items():
        if _is_skipped(key, skip) or _ROUTER_KEY.match(key):
            continue
        want = tuple(t.shape)
        m = _EXPERT_KEY.match(key)
        if m and int(m.group(1)) in moe_blocks and key not in src:
            suffix, transpose = _EXPERT_SOURCE[m.group(2)]
            src_key = f"blocks.{m.group(1)}.mlp.{suffix}"
            if src_key not in src:
                missing.append(f"{key} (from {src_key})")
                continue
            v = src[src_key]
            v = v.t() if transpose and v.dim() == 2 else v
            _check_shape(key, src_key, tuple(v.shape), want[1:])
            updates[key] = v.unsqueeze(0).expand(want)
            used.add(src_key)
            continue
        if key not in src:
            missing.append(key)
            continue
        v = src[key]
        used.add(key)
        if (
            key == "pos_embed"
            and resize_pos_embed
            and tuple(v.shape) != want
            and v.dim() == 3
            and v.shape[0] == 1
            and v.shape[2] == want[2]
        ):
            # not a square grid after the prefix tokens: the mismatch is reported below
            with contextlib.suppress(ValueError):
                v = _resize_pos_embed(v.float(), target.grid, target.num_prefix_tokens)
        hint = ""
        if key.startswith("head."):
            hint = " (different num_classes? pass skip_head=True to keep the target's fresh head)"
        elif key == "pos_embed":
            hint = " (different image size or classifier?)"
        _check_shape(key, key, tuple(v.shape), want, hint)
        updates[key] = v
    unused = sorted(k for k in src if k not in used and not _is_skipped(k, skip) and not _ROUTER_KEY.match(k))
    if missing or unused:
        msg = (
            f"upcycle: {len(missing)} target weight(s) not in the dense checkpoint {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; {len(unused)} dense weight(s) unused {unused[:8]}"
            f"{' ...' if len(unused) > 8 else ''}"
        )
        if strict:
            raise ValueError(
                msg + "; pass skip=(prefix, ...) / skip_head=True for parts to leave at their init, "
                "or strict=False"
            )
        warnings.warn(msg + "; missing ones keep the target's init", stacklevel=2)
    with torch.no_grad():
        for key, v in updates.items():
            tgt[key].copy_(v.to(dtype=tgt[key].dtype, device=tgt[key].device))
    return target


def load_dense_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights of a dense model from disk, and what is known about it.

    ``path`` is a vmoe run or checkpoint directory, a ``.safetensors`` file, or a torch
    ``.pt``/``.pth``/``.bin`` file (loaded with ``weights_only=True``). Returns
    ``(state_dict, info)`` with ``info`` holding ``model_config`` and ``data_info`` (dicts or None).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint, run directory or weights file")
    if p.is_dir():
        from vmoe.train.checkpoint import load_checkpoint

        ck = load_checkpoint(p, train_state=False)  # the weights only
        return ck["state_dict"], {"model_config": ck["model_config"], "data_info": ck["data_info"]}
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p)), {"model_config": None, "data_info": None}
        except Exception as e:
            raise ValueError(f"{p}: corrupt or unreadable safetensors file ({e})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{p}: not a readable torch weights file ({e})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p}: expected a state dict, got {type(obj).__name__}")
    return _source_state_dict(obj), {"model_config": None, "data_info": None}


def upcycle_checkpoint(
    dense: str | os.PathLike[str] | nn.Module | Mapping[str, Any],
    model_name: str,
    out_dir: str | os.PathLike[str],
    *,
    strict: bool = True,
    skip_head: bool = False,
    skip: Sequence[str] = (),
    resize_pos_embed: bool = True,
    step: int = 0,
    **overrides: Any,
) -> Path:
    """Upcycle a dense model into ``create_model(model_name, **overrides)`` and save it.

    Writes a vmoe checkpoint ``out_dir/checkpoints/step_{step:08d}/`` (weights, model config and,
    from a vmoe source, its ``data_info.json``), loadable with ``vmoe.load(out_dir)``. ``dense``
    is a vmoe run / checkpoint directory, a weights file (see :func:`load_dense_state_dict`), a
    module or a state dict. The other keywords are as in :func:`upcycle`. Returns the checkpoint
    directory.
    """
    from vmoe.models.registry import create_model
    from vmoe.train.checkpoint import save_checkpoint

    info: dict[str, Any] = {"model_config": None, "data_info": None}
    if isinstance(dense, (str, os.PathLike)):
        src, info = load_dense_state_dict(dense)
    else:
        src = _source_state_dict(dense)
        if isinstance(dense, VisionTransformer):
            info["model_config"] = dense.cfg.to_dict()
    target = create_model(model_name, **overrides)
    upcycle(
        src,
        target,
        strict=strict,
        skip_head=skip_head,
        skip=skip,
        resize_pos_embed=resize_pos_embed,
        source_act=(info["model_config"] or {}).get("act"),
    )
    return save_checkpoint(
        out_dir,
        step,
        target.state_dict(),
        model_config=target.cfg.to_dict(),
        data_info=info["data_info"],
    )
