"""Vision Transformer backbone with optional sparse MoE MLPs (V-MoE, SPEC 1.1-1.2).

Module names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp}``, ``norm``, ``head``) so dense timm checkpoints
map over directly; the official Flax names map as

=================================================  ==========================================
Flax (official)                                     here
=================================================  ==========================================
``embedding/{kernel,bias}``                         ``patch_embed.proj.{weight,bias}``
``cls``                                             ``cls_token``
``Encoder/posembed_input/pos_embedding``            ``pos_embed``
``Encoder/encoderblock_i/LayerNorm_0``              ``blocks.i.norm1``
``.../SelfAttention/{query,key,value}``             ``blocks.i.attn.qkv`` (fused, q|k|v rows)
``.../SelfAttention/out``                           ``blocks.i.attn.proj``
``.../LayerNorm_1``                                 ``blocks.i.norm2``
``.../Mlp/Dense_{0,1}``                             ``blocks.i.mlp.fc{1,2}``
``.../Moe/Mlp/Dense_{0,1}``                         ``blocks.i.mlp.experts.{w1,b1,w2,b2}``
``.../Moe/Router/dense/kernel``                     ``blocks.i.mlp.router.weight``
``Encoder/encoder_norm``                            ``norm``
``MapHead/{probe,MultiHeadDotProductAttention,..}`` ``attn_pool.{latent,q,kv,proj,norm,mlp}``
``pre_logits``                                      ``pre_logits_fc``
``head``                                            ``head``
=================================================  ==========================================

Initialisation follows the official Flax code: patch embedding and pre-logits kernels
lecun-normal (truncated normal, std ``sqrt(1/fan_in)`` before truncation at 2 std), zero biases;
attention q/k/v/out kernels xavier-uniform with fans (D, D), zero biases; MLPs as
:class:`vmoe.layers.Mlp`; class token zeros; position embedding normal(0.02); LayerNorm ones/zeros
with eps 1e-6; head kernel zeros and bias ``cfg.head_bias`` (``-log(num_classes)`` by default).
All init code runs on the ``meta`` device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vmoe import rng
from vmoe.config import ModelConfig, MoEConfig
from vmoe.config import replace as cfg_replace
from vmoe.layers import Mlp, dropout, xavier_uniform_
from vmoe.moe import MoEMlp

__all__ = [
    "Attention",
    "Block",
    "MAPHead",
    "PatchEmbed",
    "VisionTransformer",
    "build_model",
    "resize_pos_embed",
]

LN_EPS = 1e-6
STREAMS_PER_BLOCK = 16


def lecun_normal_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Flax's default kernel init: truncated normal at +-2 std, variance 1/fan_in after truncation."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


def block_stream(block: int) -> int:
    """First random-stream id of block ``block``; a block owns ids ``[s, s + 16)``.

    Layout inside a block: +0 attention-output dropout, +2/+3 dense MLP dropouts, +4 router
    noise, +5/+6 expert dropouts. Ids 1-15 are the embedding's (+1: position-embedding dropout).
    """
    return STREAMS_PER_BLOCK * (block + 1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q|k|v projection and ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        D = self.proj.in_features
        with torch.no_grad():
            for i in range(3):  # q, k, v each xavier with fans (D, D), as Flax DenseGeneral
                xavier_uniform_(self.qkv.weight[i * D : (i + 1) * D], D, D)
            xavier_uniform_(self.proj.weight, D, D)
            nn.init.zeros_(self.qkv.bias)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class MAPHead(nn.Module):
    """Multi-head attention pooling (big_vision / official vmoe ``MapHead``).

    A learned probe (xavier-uniform init) attends over the tokens; then
    ``x = x + Mlp(LayerNorm(x))``; returns the probe's output (B, D). No dropout (as official).
    """

    def __init__(self, dim: int, mlp_dim: int, num_heads: int, *, act: str = "gelu_tanh") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.empty(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim, act=act)  # type: ignore[arg-type]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        D = self.q.in_features
        with torch.no_grad():
            xavier_uniform_(self.latent, 1, D)  # Flax fans of a (1, 1, D) param: (1, D)
            xavier_uniform_(self.q.weight, D, D)
            for i in range(2):
                xavier_uniform_(self.kv.weight[i * D : (i + 1) * D], D, D)
            xavier_uniform_(self.proj.weight, D, D)
            for lin in (self.q, self.kv, self.proj):
                nn.init.zeros_(lin.bias)
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens -> (B, D) the probe's output."""
        B, T, D = x.shape
        H = self.num_heads
        q = self.q(self.latent.expand(B, -1, -1)).view(B, 1, H, D // H).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)
        y = self.proj(y)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


class Block(nn.Module):
    """Pre-LN encoder block: ``x += Dropout(MHA(LN(x)))``; ``x += MLP_or_MoE(LN(x))``."""

    def __init__(
        self,
        dim: int,
        mlp_dim: int,
        num_heads: int,
        *,
        moe: MoEConfig | None = None,
        act: str = "gelu_tanh",
        dropout: float = 0.0,
        moe_dropout: float = 0.0,
        stream: int = 0,
    ) -> None:
        super().__init__()
        self.p = dropout
        self.stream = stream
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp: nn.Module
        if moe is None:
            self.mlp = Mlp(dim, mlp_dim, act=act, dropout=dropout, stream=stream + 2)  # type: ignore[arg-type]
        else:
            self.mlp = MoEMlp(dim, mlp_dim, moe, act=act, dropout=moe_dropout, stream=stream + 4)  # type: ignore[arg-type]

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoEMlp)

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """(B, T, D) -> ((B, T, D), the MoE layer's aux or None for a dense block).

        ``rows``: optional (B, T) global token ids for positional dropout.
        """
        y = self.attn(self.norm1(x))
        x = x + dropout(y, self.p, self.training, stream=self.stream, rows=rows)
        h = self.norm2(x)
        if isinstance(self.mlp, MoEMlp):
            y, aux = self.mlp(h)
            return x + y, aux
        return x + self.mlp(h, rows), None


def resize_pos_embed(
    posemb: torch.Tensor,
    new_grid: tuple[int, int] | int,
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resize a learned position embedding to another patch grid (SPEC 2, fine-tuning).

    The first ``num_prefix_tokens`` rows (the class token) are kept as they are; the grid part is
    interpolated bilinearly in 2-D (``align_corners=False``, no antialiasing), in float32.

    Args:
        posemb: (1, P + h*w, D).
        new_grid: (h', w') or an int for a square grid.
        num_prefix_tokens: P, 1 with a class token, else 0.
        old_grid: (h, w) of ``posemb``; default: square.
    Returns:
        (1, P + h'*w', D), same dtype and device. Identical (a copy) when the grid is unchanged.
    """
    if posemb.dim() != 3 or posemb.shape[0] != 1:
        raise ValueError(f"posemb must be (1, T, D), got {tuple(posemb.shape)}")
    nh, nw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    n = grid.shape[1]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"posemb has {n} grid tokens (after {num_prefix_tokens} prefix tokens), not a square; "
                "pass old_grid=(h, w)"
            )
        old_grid = (side, side)
    oh, ow = old_grid
    if oh * ow != n:
        raise ValueError(f"old_grid {oh}x{ow} does not match the {n} grid tokens of posemb")
    if nh < 1 or nw < 1:
        raise ValueError(f"new_grid must be positive, got {(nh, nw)}")
    if (oh, ow) == (nh, nw):
        return posemb.clone()
    D = posemb.shape[-1]
    g = grid.reshape(1, oh, ow, D).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(nh, nw), mode="bilinear", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, nh * nw, D).to(posemb.dtype)
    return torch.cat([prefix, g], dim=1)


class PatchEmbed(nn.Module):
    """Conv patch embedding, kernel = stride = patch; (B, C, H, W) -> (B, h*w, D)."""

    def __init__(self, in_chans: int, dim: int, patch: tuple[int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        w = self.proj.weight
        lecun_normal_(w, w.shape[1] * w.shape[2] * w.shape[3])
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, P, D) patch embeddings, P = (H / ph) * (W / pw)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT / V-MoE image classifier built from a :class:`~vmoe.config.ModelConfig`.

    ``forward(images) -> (logits, aux)`` with ``aux["aux_loss"]`` (0-dim tensor, the sum over MoE
    layers of each layer's weighted auxiliary loss; zero for dense models), ``aux["layers"]``
    (block index -> that MoE layer's metrics dict) and ``aux["num_images"]`` (B, an int).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.num_prefix_tokens = 1 if cfg.classifier == "token" else 0
        self.patch_embed = PatchEmbed(cfg.in_chans, D, cfg.patch_hw)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.classifier == "token" else None
        gh, gw = cfg.grid
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_prefix_tokens + gh * gw, D))
        moe_blocks = set(cfg.moe_block_indices)
        self.blocks = nn.ModuleList(
            Block(
                D,
                cfg.mlp_dim,
                cfg.num_heads,
                # Each MoE layer gets its own config objects, so per-layer overrides stay local.
                moe=cfg_replace(cfg.moe, router=cfg_replace(cfg.moe.router))
                if (i in moe_blocks and cfg.moe is not None)
                else None,
                act=cfg.act,
                dropout=cfg.dropout,
                moe_dropout=cfg.expert_dropout,
                stream=block_stream(i),
            )
            for i in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(D, eps=LN_EPS)
        self.attn_pool = (
            MAPHead(D, cfg.mlp_dim, cfg.num_heads, act=cfg.act) if cfg.classifier == "map" else None
        )
        R = cfg.representation_size
        self.pre_logits_fc = nn.Linear(D, R) if R is not None else None
        self.num_features = R if R is not None else D
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else None
        self._init_own_parameters()
        self._register_load_state_dict_pre_hook(self._resize_pos_embed_hook, with_module=False)

    def _init_own_parameters(self) -> None:
        with torch.no_grad():
            if self.cls_token is not None:
                nn.init.zeros_(self.cls_token)
            nn.init.normal_(self.pos_embed, std=0.02)
            if self.pre_logits_fc is not None:
                lecun_normal_(self.pre_logits_fc.weight, self.pre_logits_fc.in_features)
                nn.init.zeros_(self.pre_logits_fc.bias)
            if self.head is not None:
                nn.init.zeros_(self.head.weight)
                nn.init.constant_(self.head.bias, self.cfg.head_bias)

    # ----------------------------------------------------------------- structure
    def moe_layers(self) -> list[tuple[int, MoEMlp]]:
        """(block index, MoE layer) of every MoE block, in order."""
        return [(i, b.mlp) for i, b in enumerate(self.blocks) if isinstance(b.mlp, MoEMlp)]

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_tokens

    # ----------------------------------------------------------------- image size
    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Change the input resolution, resizing the position embedding (2-D bilinear)."""
        new_cfg = cfg_replace(self.cfg, image_size=image_size)  # validates divisibility
        if new_cfg.grid != self.cfg.grid:
            new = resize_pos_embed(self.pos_embed.data, new_cfg.grid, self.num_prefix_tokens, self.cfg.grid)
            self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)
        self.cfg = new_cfg

    def _resize_pos_embed_hook(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        key = prefix + "pos_embed"
        pe = state_dict.get(key)
        if pe is None or pe.shape == self.pos_embed.shape:
            return
        state_dict[key] = resize_pos_embed(pe, self.cfg.grid, self.num_prefix_tokens)

    # ----------------------------------------------------------------- forward
    def _check_images(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        if x.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        ih, iw = cfg.image_hw
        if c != cfg.in_chans:
            raise ValueError(f"images have {c} channels but the model expects in_chans={cfg.in_chans}")
        if (h, w) != (ih, iw):
            ph, pw = cfg.patch_hw
            hint = (
                f"; call model.set_image_size(({h}, {w})) to resize the position embedding"
                if h % ph == 0 and w % pw == 0
                else f"; {h}x{w} is also not divisible by patch_size {ph}x{pw}"
            )
            raise ValueError(f"images are {h}x{w} but the model expects image_size {ih}x{iw}{hint}")
        if b < 1:
            raise ValueError("empty batch: need at least one image")

    def _rows(self, B: int, T: int, device: torch.device) -> torch.Tensor | None:
        """Global token ids (B, T) for positional dropout, or None when not needed."""
        if not self.training or self.cfg.dropout <= 0:
            return None
        offset = rng.image_offset()
        if offset is None:
            return None
        img = torch.arange(B, device=device, dtype=torch.int64) + offset
        return img[:, None] * T + torch.arange(T, device=device, dtype=torch.int64)

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, C, H, W) -> (tokens (B, T, D) after the final LayerNorm, aux)."""
        self._check_images(images)
        x = self.patch_embed(images)
        B = x.shape[0]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        T = x.shape[1]
        rows = self._rows(B, T, x.device)
        x = dropout(x, self.cfg.dropout, self.training, stream=1, rows=rows)
        aux_loss = torch.zeros((), device=x.device, dtype=torch.float32)
        layers: dict[int, dict[str, Any]] = {}
        for i, block in enumerate(self.blocks):
            x, metrics = block(x, rows)
            if metrics is not None:
                layers[i] = metrics
                aux_loss = aux_loss + metrics["aux_loss"]
        return self.norm(x), {"aux_loss": aux_loss, "layers": layers, "num_images": B}

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, T, D) encoded tokens -> logits (B, num_classes), or pre-logit features."""
        if self.cfg.classifier == "token":
            x = tokens[:, 0]
        elif self.cfg.classifier == "gap":
            x = tokens.mean(dim=1)
        else:
            assert self.attn_pool is not None
            x = self.attn_pool(tokens)
        if self.pre_logits_fc is not None:
            x = torch.tanh(self.pre_logits_fc(x))
        if pre_logits or self.head is None:
            return x
        return self.head(x)

    def pre_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_features): the features few-shot linear evaluation uses."""
        tokens, _ = self.forward_features(images)
        return self.forward_head(tokens, pre_logits=True)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, C, H, W) -> (logits (B, num_classes), aux)."""
        tokens, aux = self.forward_features(images)
        return self.forward_head(tokens), aux

    def extra_repr(self) -> str:
        c = self.cfg
        moe = c.moe_block_indices
        return (
            f"name={c.name}, image_size={c.image_hw}, patch_size={c.patch_hw}, layers={c.num_layers}, "
            f"dim={c.hidden_size}, mlp_dim={c.mlp_dim}, heads={c.num_heads}, classifier={c.classifier}, "
            f"moe_blocks={list(moe)}"
        )


def build_model(cfg: ModelConfig) -> VisionTransformer:
    """The model a :class:`~vmoe.config.ModelConfig` describes (on the current default device)."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"build_model expects a ModelConfig, got {type(cfg).__name__}")
    return VisionTransformer(cfg)
