"""Official google-research/vmoe checkpoints: read the sharded msgpack files, convert the Flax tree.

On-disk layout (``vmoe.checkpoints.partitioned`` in the official repository), for a prefix ``P``:

* ``P.index``: msgpack of ``{"shard_count": n, "index": tree[, "version": v]}`` where ``tree`` is
  the nested parameter dict whose leaves are ``IndexInfo`` records (msgpack extension 8: global
  shape and dtype, the global slices of the array's chunks, and the shard holding each chunk).
* ``P.data-{shard:05d}-of-{n:05d}``: msgpack of ``{"__msgpack_array_chunk_a87ca2__": True,
  "<leaf>": [[subchunks, global_slice], ...], ...}``; ``<leaf>`` is the position of the array in
  the index tree flattened with sorted keys (JAX's order), ``subchunks`` are flat numpy arrays
  (extension 1: ``(shape, dtype name, raw bytes)``) to concatenate, ``global_slice`` a tuple of
  ``(start, stop, step)`` slices (extensions 6 and 5).

The Flax names and layouts (SPEC 4) map onto our timm-style state dict as in the table of
:mod:`vmoe.models.vit`. Reading needs the optional ``msgpack`` package (``pip install msgpack``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vmoe.config import ModelConfig
from vmoe.models.vit import VisionTransformer

__all__ = [
    "OfficialCheckpointError",
    "convert_official_checkpoint",
    "flax_to_state_dict",
    "load_official",
    "read_official_checkpoint",
    "state_dict_to_flax",
    "write_official_checkpoint",
]

_MAGIC = "__msgpack_array_chunk_a87ca2__"
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR, _EXT_SHAPED, _EXT_SLICE, _EXT_SLICE_ND, _EXT_INDEX_INFO = (
    1,
    2,
    3,
    4,
    5,
    6,
    8,
)


class OfficialCheckpointError(ValueError):
    """A missing, corrupt or inconsistent official checkpoint file (the message names the file)."""


# ----------------------------------------------------------------------------- msgpack codec
def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:
        raise ImportError(
            "reading/writing official V-MoE checkpoints needs the 'msgpack' package: "
            "pip install msgpack (or pip install 'vmoe[interop]')"
        ) from None
    return msgpack


class _IndexInfo:
    __slots__ = ("dtype", "shape", "shards", "slices")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, slices: list[tuple], shards: list[int]):
        self.shape, self.dtype, self.slices, self.shards = shape, dtype, slices, shards


def _dtype(name: bytes | str) -> np.dtype:
    name = name.decode() if isinstance(name, bytes) else name
    if name == "bfloat16":
        return np.dtype("float32")  # decoded by widening; see _array_from_bytes
    return np.dtype(name)


def _array_from_bytes(data: bytes) -> np.ndarray:
    m = _msgpack()
    shape, dtype_name, buf = m.unpackb(data, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
    if name == "bfloat16":  # no numpy bfloat16: widen the upper 16 bits into float32
        u16 = np.frombuffer(buf, dtype=np.uint16)
        return (u16.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(buf, dtype=np.dtype(name)).reshape(shape).copy()


def _slice_from_bytes(data: bytes) -> tuple[int | None, int | None, int | None]:
    start, stop, step = _msgpack().unpackb(data, raw=True)
    return (start, stop, step)


def _slice_nd_from_bytes(data: bytes) -> tuple:
    return tuple(_slice_from_bytes(b) for b in _msgpack().unpackb(data, raw=True))


def _ext_hook(code: int, data: bytes) -> Any:
    m = _msgpack()
    if code == _EXT_NDARRAY:
        return _array_from_bytes(data)
    if code == _EXT_NPSCALAR:
        return _array_from_bytes(data)[()]
    if code == _EXT_COMPLEX:
        re_, im = m.unpackb(data)
        return complex(re_, im)
    if code == _EXT_SHAPED:
        shape, dtype_name, *_ = m.unpackb(data, raw=True)  # (shape, dtype, weak_type[, named_shape])
        return (tuple(shape), _dtype(dtype_name))
    if code == _EXT_SLICE:
        return _slice_from_bytes(data)
    if code == _EXT_SLICE_ND:
        return _slice_nd_from_bytes(data)
    if code == _EXT_INDEX_INFO:
        shaped, slices, shards = m.unpackb(data, raw=True)
        shape, dtype = _ext_hook(_EXT_SHAPED, shaped)
        return _IndexInfo(shape, dtype, [_slice_nd_from_bytes(s) for s in slices], list(shards))
    return m.ExtType(code, data)


def _unpack(path: Path) -> Any:
    m = _msgpack()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OfficialCheckpointError(f"{path}: missing or unreadable ({e.strerror or e})") from None
    try:
        return m.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several exception types on truncated / garbage input
        raise OfficialCheckpointError(f"{path}: corrupt msgpack data ({type(e).__name__}: {e})") from None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(slash-joined path, leaf) pairs in JAX's flattening order (sorted keys, depth first)."""
    out: list[tuple[str, Any]] = []
    for k in sorted(tree, key=str):
        v = tree[k]
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.extend(_flatten(v, path + "/"))
        else:
            out.append((path, v))
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _prefix(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    return p[: -len(".index")] if p.endswith(".index") else p


def _shard_path(prefix: str, shard: int, count: int) -> Path:
    return Path(f"{prefix}.data-{shard:05d}-of-{count:05d}")


def _slices(gslice: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    if len(gslice) != len(shape):
        raise ValueError(f"slice {gslice} has {len(gslice)} axes, array has {len(shape)}")
    out = []
    for (start, stop, step), n in zip(gslice, shape):
        start = 0 if start is None else start
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n or step not in (None, 1):
            raise ValueError(f"slice {gslice} out of bounds for shape {shape}")
        out.append(slice(start, stop))
    return tuple(out)


def read_official_checkpoint(prefix: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an official sharded checkpoint into a nested dict of numpy arrays.

    Args:
        prefix: the checkpoint prefix (``.../vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012``)
            or its ``.index`` file.
    Raises:
        ImportError: ``msgpack`` is not installed.
        OfficialCheckpointError: (a ValueError) a missing or corrupt index or data shard, or a
            shard that lacks chunks the index promises; the message names the file.
    """
    prefix = _prefix(prefix)
    index_path = Path(prefix + ".index")
    index = _unpack(index_path)
    if not isinstance(index, Mapping) or "index" not in index or "shard_count" not in index:
        raise OfficialCheckpointError(
            f"{index_path}: not a V-MoE checkpoint index (no 'index'/'shard_count')"
        )
    count = int(index["shard_count"])
    leaves = _flatten(index["index"]) if isinstance(index["index"], Mapping) else []
    if not leaves or not all(isinstance(v, _IndexInfo) for _, v in leaves):
        raise OfficialCheckpointError(f"{index_path}: index tree has no/invalid array entries")
    arrays = [np.zeros(info.shape, dtype=info.dtype) for _, info in leaves]
    needed: dict[int, set[tuple[int, tuple]]] = {}
    for i, (_, info) in enumerate(leaves):
        for s, shard in zip(info.slices, info.shards):
            needed.setdefault(int(shard), set()).add((i, tuple(s)))
    for shard in sorted(needed):
        path = _shard_path(prefix, shard, count)
        if not path.exists():
            raise OfficialCheckpointError(f"{path}: missing checkpoint shard {shard} of {count}")
        content = _unpack(path)
        if not isinstance(content, Mapping) or not content.get(_MAGIC):
            raise OfficialCheckpointError(f"{path}: not a V-MoE checkpoint data shard")
        found: set[tuple[int, tuple]] = set()
        for key, chunks in content.items():
            if key == _MAGIC:
                continue
            try:
                i = int(key)
                target = arrays[i]
                for subchunks, gslice in chunks:
                    sl = _slices(tuple(gslice), target.shape)
                    flat = np.concatenate([np.ravel(c) for c in subchunks]) if subchunks else np.zeros(0)
                    target[sl] = flat.reshape(target[sl].shape)
                    found.add((i, tuple(gslice)))
            except (ValueError, TypeError, IndexError) as e:
                raise OfficialCheckpointError(f"{path}: bad chunk for array {key!r} ({e})") from None
        lost = needed[shard] - found
        if lost:
            names = sorted({leaves[i][0] for i, _ in lost})
            raise OfficialCheckpointError(f"{path}: missing chunks of {names[:5]} that {index_path} lists")
    return _unflatten({path: a for (path, _), a in zip(leaves, arrays)})


def write_official_checkpoint(
    tree: Mapping[str, Any], prefix: str | os.PathLike[str], *, num_shards: int = 1
) -> list[Path]:
    """Write a nested dict of numpy arrays in the official sharded layout (see module docstring).

    With ``num_shards > 1`` arrays with a leading axis of size >= 2 are split in two chunks along
    it and the chunks are spread round-robin over the shards. Returns the files written.
    """
    m = _msgpack()
    prefix = _prefix(prefix)

    def ext_slice_nd(sl: tuple[tuple[int, int], ...]) -> bytes:
        return m.packb(tuple(m.packb((a, b, None), use_bin_type=True) for a, b in sl), use_bin_type=True)

    def ext_array(a: np.ndarray) -> Any:
        a = np.ascontiguousarray(a)
        return m.ExtType(_EXT_NDARRAY, m.packb((a.shape, a.dtype.name, a.tobytes()), use_bin_type=True))

    leaves = _flatten(tree)
    shards: list[dict[str, Any]] = [{_MAGIC: True} for _ in range(num_shards)]
    index_flat: dict[str, Any] = {}
    nxt = 0
    for i, (path, a) in enumerate(leaves):
        a = np.asarray(a)
        full = tuple((0, n) for n in a.shape)
        if num_shards > 1 and a.ndim >= 1 and a.shape[0] >= 2:
            h = a.shape[0] // 2
            parts = [((0, h), *full[1:]), ((h, a.shape[0]), *full[1:])]
        else:
            parts = [full]
        slices, owners = [], []
        for sl in parts:
            chunk = a[tuple(slice(s, e) for s, e in sl)]
            shard = nxt % num_shards
            nxt += 1
            shards[shard].setdefault(str(i), []).append(
                [[ext_array(chunk.ravel())], m.ExtType(_EXT_SLICE_ND, ext_slice_nd(sl))]
            )
            slices.append(ext_slice_nd(sl))
            owners.append(shard)
        shaped = m.packb((a.shape, a.dtype.name, False, {}), use_bin_type=True)
        info = m.packb((shaped, tuple(slices), tuple(owners)), use_bin_type=True)
        index_flat[path] = m.ExtType(_EXT_INDEX_INFO, info)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    files = [Path(prefix + ".index")]
    files[0].write_bytes(
        m.packb({"shard_count": num_shards, "index": _unflatten(index_flat)}, use_bin_type=True)
    )
    for s, content in enumerate(shards):
        p = _shard_path(prefix, s, num_shards)
        p.write_bytes(m.packb(content, use_bin_type=True))
        files.append(p)
    return files


# ----------------------------------------------------------------------------- name mapping
def _cfg(cfg_or_model: ModelConfig | VisionTransformer) -> ModelConfig:
    if isinstance(cfg_or_model, VisionTransformer):
        return cfg_or_model.cfg
    if isinstance(cfg_or_model, ModelConfig):
        return cfg_or_model
    raise ValueError(f"expected a ModelConfig or a VisionTransformer, got {type(cfg_or_model).__name__}")


def _flat_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if "params" in params and isinstance(params["params"], Mapping) and "Encoder" not in params:
        params = params["params"]  # a {"params": ...} variables dict
    flat = dict(_flatten(params)) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
    return {k: np.asarray(v) for k, v in flat.items()}


def _layer_norm(flax: str, ours: str) -> list[tuple[str, str, str]]:
    return [(f"{flax}/scale", f"{ours}.weight", "id"), (f"{flax}/bias", f"{ours}.bias", "id")]


def _dense(flax: str, ours: str) -> list[tuple[str, str, str]]:
    return [(f"{flax}/kernel", f"{ours}.weight", "t"), (f"{flax}/bias", f"{ours}.bias", "id")]


def _simple_mapping(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(Flax path, our key, transform) for everything except the fused attention q|k|v."""
    if cfg.classifier == "map":
        raise ValueError("classifier='map' (MapHead) is not supported by the official-checkpoint converter")
    m: list[tuple[str, str, str]] = [
        ("embedding/kernel", "patch_embed.proj.weight", "conv"),
        ("embedding/bias", "patch_embed.proj.bias", "id"),
        ("Encoder/posembed_input/pos_embedding", "pos_embed", "id"),
    ]
    if cfg.classifier == "token":
        m.append(("cls", "cls_token", "id"))
    moe = set(cfg.moe_block_indices)
    for i in range(cfg.num_layers):
        f, o = f"Encoder/encoderblock_{i}", f"blocks.{i}"
        m += _layer_norm(f"{f}/LayerNorm_0", f"{o}.norm1") + _layer_norm(f"{f}/LayerNorm_1", f"{o}.norm2")
        m += _dense(f"{f}/SelfAttention/out", f"{o}.attn.proj")  # kernel (H, hd, D): see "t" handling
        if i in moe:
            m += [
                (f"{f}/Moe/Mlp/Dense_0/kernel", f"{o}.mlp.experts.w1", "id"),
                (f"{f}/Moe/Mlp/Dense_0/bias", f"{o}.mlp.experts.b1", "id"),
                (f"{f}/Moe/Mlp/Dense_1/kernel", f"{o}.mlp.experts.w2", "id"),
                (f"{f}/Moe/Mlp/Dense_1/bias", f"{o}.mlp.experts.b2", "id"),
                (f"{f}/Moe/Router/dense/kernel", f"{o}.mlp.router.weight", "t"),
            ]
        else:
            m += _dense(f"{f}/Mlp/Dense_0", f"{o}.mlp.fc1") + _dense(f"{f}/Mlp/Dense_1", f"{o}.mlp.fc2")
    m += _layer_norm("Encoder/encoder_norm", "norm")
    if cfg.representation_size is not None:
        m += _dense("pre_logits", "pre_logits_fc")
    if cfg.num_classes > 0:
        m += _dense("head", "head")
    return m


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def flax_to_state_dict(
    params: Mapping[str, Any], cfg: ModelConfig | VisionTransformer, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Convert an official Flax parameter tree into our state dict for ``cfg``.

    Args:
        params: nested dict (``{"Encoder": {"encoderblock_0": ...}, "embedding": ...}``) or flat
            ``"Encoder/encoderblock_0/..."`` dict of numpy arrays; a ``{"params": ...}`` wrapper is
            removed. Layouts as SPEC 4: Dense kernels (in, out), attention q/k/v kernels
            (D, heads, head_dim) with biases (heads, head_dim), out kernel (heads, head_dim, D),
            MoE kernels with a leading E axis, patch-embedding kernel (ph, pw, C, D).
        cfg: the target config (or model), e.g. ``vmoe.models.registry.get_config("vmoe_b16_e8")``.
        strict: unused Flax parameters raise (else they are ignored).
    Returns:
        {our key: float tensor}, loadable with ``model.load_state_dict(sd)``.
    Raises:
        ValueError: missing or unused parameters, or shape mismatches (naming both names).
    """
    cfg = _cfg(cfg)
    flat = _flat_params(params)
    want = _expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    def get(path: str) -> np.ndarray | None:
        if path not in flat:
            missing.append(path)
            return None
        used.add(path)
        return flat[path]

    def put(key: str, path: str, a: np.ndarray) -> None:
        t = torch.from_numpy(np.array(a, copy=True))
        if tuple(t.shape) != want[key]:
            raise ValueError(
                f"shape mismatch: Flax {path} converts to {tuple(t.shape)} but {key} expects {want[key]}"
            )
        out[key] = t

    for path, key, how in _simple_mapping(cfg):
        a = get(path)
        if a is None:
            continue
        if how == "t":
            a = a.reshape(-1, a.shape[-1]).T if a.ndim >= 2 else a  # (..., out) -> (out, in)
        elif how == "conv":
            a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a  # (ph, pw, C, D) -> (D, C, ph, pw)
        put(key, path, a)
    for i in range(cfg.num_layers):
        f = f"Encoder/encoderblock_{i}/SelfAttention"
        ws, bs = [], []
        for name in ("query", "key", "value"):
            w, b = get(f"{f}/{name}/kernel"), get(f"{f}/{name}/bias")
            if w is not None:
                ws.append(w.reshape(w.shape[0], -1).T)  # (D, H, hd) -> (H*hd, D)
            if b is not None:
                bs.append(b.reshape(-1))
        if len(ws) == 3:
            put(f"blocks.{i}.attn.qkv.weight", f"{f}/{{query,key,value}}/kernel", np.concatenate(ws, 0))
        if len(bs) == 3:
            put(f"blocks.{i}.attn.qkv.bias", f"{f}/{{query,key,value}}/bias", np.concatenate(bs, 0))
    unused = sorted(set(flat) - used)
    if missing:
        raise ValueError(f"Flax parameters missing for config {cfg.name or ''}: {missing[:8]}")
    if unused and strict:
        raise ValueError(
            f"Flax parameters not used by config {cfg.name or ''}: {unused[:8]}"
            f"{' ...' if len(unused) > 8 else ''} (wrong model config? pass strict=False to ignore)"
        )
    return out


def state_dict_to_flax(
    state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig | VisionTransformer
) -> dict[str, Any]:
    """Inverse of :func:`flax_to_state_dict`: our state dict -> nested Flax tree of numpy arrays."""
    cfg = _cfg(cfg)
    H = cfg.num_heads
    D = cfg.hidden_size
    hd = D // H
    sd = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
    flat: dict[str, np.ndarray] = {}
    for path, key, how in _simple_mapping(cfg):
        a = sd[key]
        if how == "t":
            a = a.T
            if path.endswith("SelfAttention/out/kernel"):
                a = a.reshape(H, hd, D)
        elif how == "conv":
            a = a.transpose(2, 3, 1, 0)
        flat[path] = np.ascontiguousarray(a)
    for i in range(cfg.num_layers):
        f = f"Encoder/encoderblock_{i}/SelfAttention"
        w, b = sd[f"blocks.{i}.attn.qkv.weight"], sd[f"blocks.{i}.attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            flat[f"{f}/{name}/kernel"] = np.ascontiguousarray(w[j * D : (j + 1) * D].T.reshape(D, H, hd))
            flat[f"{f}/{name}/bias"] = b[j * D : (j + 1) * D].reshape(H, hd).copy()
    return _unflatten(flat)


# ----------------------------------------------------------------------------- end to end
def _resolve_cfg(model: str | ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    from vmoe.config import replace as cfg_replace
    from vmoe.models.registry import get_config

    if isinstance(model, ModelConfig):
        return cfg_replace(model, **overrides) if overrides else model
    return get_config(model, **overrides)


def load_official(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    model: str | ModelConfig,
    *,
    strict: bool = True,
    **overrides: Any,
) -> VisionTransformer:
    """Build ``model`` (a registry name such as ``"vmoe_s32_last2_e8"`` / ``"vmoe_b16_e8"`` or a
    ModelConfig, with ``overrides``) with the weights of an official checkpoint prefix or an
    in-memory Flax tree; returned in eval mode.
    """
    cfg = _resolve_cfg(model, overrides)
    params = checkpoint if isinstance(checkpoint, Mapping) else read_official_checkpoint(checkpoint)
    sd = flax_to_state_dict(params, cfg, strict=strict)
    net = VisionTransformer(cfg)
    net.load_state_dict(sd, strict=True)
    return net.eval()


def convert_official_checkpoint(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    model: str | ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    strict: bool = True,
    step: int = 0,
    **overrides: Any,
) -> Path:
    """Convert an official checkpoint into a vmoe checkpoint under ``out_dir`` (``vmoe.load``-able)."""
    from vmoe.train.checkpoint import save_checkpoint

    net = load_official(checkpoint, model, strict=strict, **overrides)
    return save_checkpoint(out_dir, step, net.state_dict(), model_config=net.cfg.to_dict())
