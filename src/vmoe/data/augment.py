"""Batched, position-deterministic data augmentation on tensors (CPU or CUDA).

Every random choice for the image with global dataset index ``i`` in epoch ``e`` is a function of
``(seed, e, i)`` only (see :mod:`vmoe.data.rng`), never of batch composition, process rank or call
order: shuffling a batch permutes the outputs the same way, and a resumed or data-parallel run
augments each image exactly as a single uninterrupted process does. (The one exception is
:func:`mixup`, whose *partners* come from the same batch; see its docstring.)

Pipeline of :class:`BatchAugment` (all vectorised over the batch, no per-image Python loop):

1. crop: ``"pad"`` (pad by ``pad`` pixels, reflect or zero, take a random HxW window; done as one
   gather on uint8, so it is exact), ``"rrc"`` (random-resized crop via ``F.grid_sample`` with
   per-image affine parameters), or ``"none"``;
2. horizontal flip with probability 1/2 (fused into the crop);
3. optional RandAugment (``num_ops`` ops per image, fixed ``magnitude`` in 0..10) from: identity,
   autocontrast, brightness, contrast, solarize, posterize, rotate (≤30°), shear_x/shear_y (≤0.3),
   translate_x/translate_y (≤45% of the side). Geometric ops fill with black (0). Magnitudes follow
   torchvision's RandAugment (stronger = more distortion; solarize inverts pixels >= 1 - M/10), not
   the TF EfficientNet code the official configs call, whose solarize is a no-op at M=10 and whose
   op set differs (equalize, invert, color, sharpness, cutout; grey fill; per-op probability);
4. conversion to float in [0, 1] and normalisation ``(x - mean) / std``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .rng import (
    STREAM_CROP,
    STREAM_FLIP,
    STREAM_MIXUP,
    STREAM_RANDAUGMENT,
    STREAM_RRC,
    hash_bits,
    hash_uniform,
)

__all__ = [
    "RANDAUGMENT_OPS",
    "AugmentConfig",
    "BatchAugment",
    "eval_transform",
    "mixup",
    "normalize",
    "one_hot",
    "randaugment",
]

RANDAUGMENT_OPS = (
    "identity",
    "autocontrast",
    "brightness",
    "contrast",
    "solarize",
    "posterize",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


@dataclass
class AugmentConfig:
    """Training augmentation options.

    Attributes:
        crop: ``"pad"`` pad-and-random-crop, ``"rrc"`` random-resized crop, ``"none"``.
        pad: padding for ``"pad"``; ``None`` means ``max(1, H // 8)`` (4 for 32 px, 1 for 8 px).
        pad_mode: ``"reflect"`` or ``"zero"``.
        rrc_scale: area fraction range of the random-resized crop.
        rrc_ratio: aspect ratio range of the random-resized crop.
        hflip: random horizontal flips (use ``DatasetInfo.default_hflip``; False for digits).
        randaugment: ``(num_ops, magnitude)`` with magnitude in 0..10, or None.
        mixup: Beta(alpha, alpha) mixup alpha; 0 disables. Applied by :meth:`BatchAugment.mix`.
    """

    crop: Literal["pad", "rrc", "none"] = "pad"
    pad: int | None = None
    pad_mode: Literal["reflect", "zero"] = "reflect"
    rrc_scale: tuple[float, float] = (0.35, 1.0)
    rrc_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: bool = True
    randaugment: tuple[int, int] | None = None
    mixup: float = 0.0


def _stats(values: Sequence[float] | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=x.device)
    return t.reshape(1, -1, 1, 1)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel; x float (B, C, H, W) in [0, 1]."""
    return (x - _stats(mean, x)) / _stats(std, x)


def eval_transform(images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Deterministic evaluation transform: uint8 (B, C, H, W) -> float32 (B, C, H, W),
    ``(x / 255 - mean) / std``."""
    return normalize(images_u8.to(torch.float32) / 255.0, mean, std)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 (B,) -> float32 (B, num_classes)."""
    return F.one_hot(labels.long(), num_classes).to(torch.float32)


# ----------------------------------------------------------------------------------- crop + flip


def flip_mask(indices: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """bool (B,): whether image ``indices[b]`` is flipped in ``epoch``."""
    return hash_uniform(indices, seed, epoch, STREAM_FLIP)[:, 0] < 0.5


def pad_crop_offsets(indices: torch.Tensor, epoch: int, seed: int, pad: int) -> torch.Tensor:
    """int64 (B, 2): (row, col) offset in [0, 2*pad] of each crop window in the padded image."""
    u = hash_uniform(indices, seed, epoch, STREAM_CROP, n=2)
    return (u * (2 * pad + 1)).floor().long().clamp_(0, 2 * pad)


def _pad_crop_flip(
    x: torch.Tensor,
    offsets: torch.Tensor | None,
    flip: torch.Tensor | None,
    pad: int,
    mode: str,
) -> torch.Tensor:
    """One gather implementing pad + crop + flip on any dtype; x (B, C, H, W)."""
    B, _C, H, W = x.shape
    dev = x.device
    rows = torch.arange(H, device=dev).expand(B, H)
    cols = torch.arange(W, device=dev).expand(B, W)
    if offsets is not None:
        rows = rows + offsets[:, :1] - pad
        cols = cols + offsets[:, 1:] - pad
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    valid = None
    if mode == "reflect":
        rows = torch.where(rows < 0, -rows, rows)
        rows = torch.where(rows >= H, 2 * (H - 1) - rows, rows)
        cols = torch.where(cols < 0, -cols, cols)
        cols = torch.where(cols >= W, 2 * (W - 1) - cols, cols)
        rows = rows.clamp(0, H - 1)
        cols = cols.clamp(0, W - 1)
    else:
        valid = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
        rows = rows.clamp(0, H - 1)
        cols = cols.clamp(0, W - 1)
    b = torch.arange(B, device=dev)[:, None, None]
    out = x[b, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    if valid is not None:
        out = out * valid[..., None].to(out.dtype)
    return out.permute(0, 3, 1, 2).contiguous()


def _rrc(
    x: torch.Tensor,
    indices: torch.Tensor,
    epoch: int,
    seed: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: torch.Tensor | None,
) -> torch.Tensor:
    """Random-resized crop (+ flip) of float x (B, C, H, W) with per-image affine grids."""
    B = x.shape[0]
    u = hash_uniform(indices, seed, epoch, STREAM_RRC, n=4).to(x.device)
    area = scale[0] + u[:, 0] * (scale[1] - scale[0])
    log_r = math.log(ratio[0]) + u[:, 1] * (math.log(ratio[1]) - math.log(ratio[0]))
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fraction of the width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - w)  # normalised centre, crop stays inside the image
    cy = (2 * u[:, 3] - 1) * (1 - h)
    sx = w if flip is None else torch.where(flip, -w, w)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ------------------------------------------------------------------------------------ randaugment


def _gray_mean(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).reshape(1, 3, 1, 1)
        g = (x * w).sum(1, keepdim=True)
    else:
        g = x.mean(1, keepdim=True)
    return g.mean(dim=(2, 3), keepdim=True)


def randaugment(
    x: torch.Tensor,
    indices: torch.Tensor,
    epoch: int,
    seed: int,
    num_ops: int,
    magnitude: float,
) -> torch.Tensor:
    """RandAugment on float x (B, C, H, W) in [0, 1]; returns the same shape, in [0, 1].

    For each of ``num_ops`` rounds every image draws one op of :data:`RANDAUGMENT_OPS` and a sign from
    its hash; ``magnitude`` (0..10) scales all ops. Each op is computed for the whole batch and selected
    with ``torch.where`` (no host sync, no per-image loop).
    """
    B = x.shape[0]
    m = max(0.0, min(float(magnitude), 10.0)) / 10.0
    n_ops = len(RANDAUGMENT_OPS)
    u = hash_uniform(indices, seed, epoch, STREAM_RANDAUGMENT, n=2 * num_ops).to(x.device)
    op_id = {name: k for k, name in enumerate(RANDAUGMENT_OPS)}
    for r in range(num_ops):
        op = (u[:, 2 * r] * n_ops).long().clamp(max=n_ops - 1)
        sign = torch.where(u[:, 2 * r + 1] < 0.5, -1.0, 1.0).to(x.dtype)

        def sel(name: str, op: torch.Tensor = op) -> torch.Tensor:
            return (op == op_id[name]).reshape(B, 1, 1, 1)

        out = x
        # colour ops
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        auto = torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
        out = torch.where(sel("autocontrast"), auto, out)
        f = (1.0 + sign * 0.9 * m).reshape(B, 1, 1, 1)
        out = torch.where(sel("brightness"), (x * f).clamp(0, 1), out)
        mu = _gray_mean(x)
        out = torch.where(sel("contrast"), ((x - mu) * f + mu).clamp(0, 1), out)
        thr = 1.0 - m
        out = torch.where(sel("solarize"), torch.where(x >= thr, 1.0 - x, x), out)
        q = float(2 ** round(4 * m))  # drop up to 4 of the 8 bits
        post = torch.floor(torch.round(x * 255.0) / q) * q / 255.0
        out = torch.where(sel("posterize"), post, out)
        # geometric ops: one affine grid for the whole batch (identity for the others)
        theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        ang = sign * (m * math.pi / 6)
        is_rot = op == op_id["rotate"]
        theta[:, 0, 0] = torch.where(is_rot, torch.cos(ang), theta[:, 0, 0])
        theta[:, 0, 1] = torch.where(is_rot, -torch.sin(ang), theta[:, 0, 1])
        theta[:, 1, 0] = torch.where(is_rot, torch.sin(ang), theta[:, 1, 0])
        theta[:, 1, 1] = torch.where(is_rot, torch.cos(ang), theta[:, 1, 1])
        shear = sign * 0.3 * m
        theta[:, 0, 1] = torch.where(op == op_id["shear_x"], shear, theta[:, 0, 1])
        theta[:, 1, 0] = torch.where(op == op_id["shear_y"], shear, theta[:, 1, 0])
        shift = sign * 0.45 * m * 2.0  # normalised coordinates span 2
        theta[:, 0, 2] = torch.where(op == op_id["translate_x"], shift, theta[:, 0, 2])
        theta[:, 1, 2] = torch.where(op == op_id["translate_y"], shift, theta[:, 1, 2])
        geo = torch.zeros(B, dtype=torch.bool, device=x.device)
        for name in _GEOMETRIC:
            geo |= op == op_id[name]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = torch.where(geo.reshape(B, 1, 1, 1), warped, out)
    return x


# ------------------------------------------------------------------------------------------ mixup


def mixup_partners(indices: torch.Tensor, epoch: int, seed: int, block: int | None = None) -> torch.Tensor:
    """int64 (B,): position in the batch of each image's mixup partner.

    The batch is cut into consecutive blocks of ``block`` images (None: one block; the last may be
    shorter). Within a block, images are ordered by a hash of their index and each is paired with
    the next one in that order (cyclically), so nobody is paired with itself in a block of > 1.
    Pairs never cross a block, so a batch split across ranks in whole blocks pairs as it would whole.
    """
    B = indices.shape[0]
    block = B if block is None else int(block)
    if block < 1:
        raise ValueError(f"mixup block must be >= 1 image, got {block}")
    keys = hash_bits(indices, seed, epoch, STREAM_MIXUP, n=1)[:, 0]
    blocks = torch.arange(B, device=indices.device) // block
    order = torch.argsort(keys, stable=True)
    order = order[torch.argsort(blocks[order], stable=True)]  # by block, then by hash
    j = torch.arange(B, device=indices.device)
    start = (j // block) * block
    end = torch.clamp(start + block, max=B)
    nxt = torch.where(j + 1 < end, j + 1, start)  # the next in the block, cyclically
    partner = torch.empty_like(order)
    partner[order] = order[nxt]
    return partner


def mixup_lambdas(indices: torch.Tensor, epoch: int, seed: int, alpha: float) -> torch.Tensor:
    """float32 (B,): per-image mixing weight ~ Beta(alpha, alpha), from the image's hash."""
    from scipy.special import betaincinv

    u = hash_uniform(indices, seed, epoch, STREAM_MIXUP, n=2)[:, 1]
    u = u.detach().cpu().double().clamp(1e-7, 1 - 1e-7).numpy()
    lam = torch.from_numpy(betaincinv(alpha, alpha, u)).to(torch.float32)
    return lam.to(indices.device)


def mixup(
    images: torch.Tensor,
    labels_onehot: torch.Tensor,
    alpha: float,
    indices: torch.Tensor,
    epoch: int,
    seed: int,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup with per-image weights: ``x_i' = lam_i x_i + (1 - lam_i) x_p(i)`` and the same for targets.

    Args:
        images: float (B, C, H, W).
        labels_onehot: float (B, K) (one-hot or already soft).
        alpha: Beta(alpha, alpha) parameter; ``alpha <= 0`` returns the inputs unchanged.
        indices: int64 (B,) global dataset indices; ``lam_i`` depends on (seed, epoch, index) only.
        block: partners are chosen within consecutive blocks of this many images
            (:func:`mixup_partners`; None: the whole batch).

    Returns:
        (mixed images (B, C, H, W), soft targets (B, K)).

    The partner ``p(i)`` depends on which images share its block. The trainer uses blocks of the
    routing group size, so any layout whose per-rank slices are whole groups (the condition for
    identical routing too) mixes exactly as a single process does.
    """
    if alpha <= 0:
        return images, labels_onehot
    partner = mixup_partners(indices, epoch, seed, block).to(images.device)
    lam = mixup_lambdas(indices, epoch, seed, alpha).to(images.device, images.dtype)
    lam_x = lam.reshape(-1, *([1] * (images.ndim - 1)))
    mixed = lam_x * images + (1 - lam_x) * images[partner]
    lam_y = lam.reshape(-1, 1).to(labels_onehot.dtype)
    targets = lam_y * labels_onehot + (1 - lam_y) * labels_onehot[partner]
    return mixed, targets


# ------------------------------------------------------------------------------------ the module


class BatchAugment:
    """Training transform: uint8 (B, C, H, W) + global indices -> normalised float32 (B, C, H, W).

    Example::

        aug = BatchAugment(AugmentConfig(hflip=info.default_hflip), info.mean, info.std)
        x = aug(images_u8, indices, epoch=epoch, seed=seed)
        x, y = aug.mix(x, labels, info.num_classes, indices, epoch=epoch, seed=seed)
    """

    def __init__(
        self,
        config: AugmentConfig | None = None,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ) -> None:
        self.config = config or AugmentConfig()
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if self.config.crop not in ("pad", "rrc", "none"):
            raise ValueError(f"crop must be 'pad', 'rrc' or 'none', got {self.config.crop!r}")

    def pad_for(self, height: int) -> int:
        """Padding used for images of this height."""
        return self.config.pad if self.config.pad is not None else max(1, height // 8)

    def __call__(self, images_u8: torch.Tensor, indices: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
        """Augment a batch. images_u8: uint8 (B, C, H, W); indices: int64 (B,) global dataset indices."""
        cfg = self.config
        if images_u8.ndim != 4:
            raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(images_u8.shape)}")
        indices = indices.to(images_u8.device)
        H = images_u8.shape[2]
        flip = flip_mask(indices, epoch, seed) if cfg.hflip else None
        x = images_u8
        if cfg.crop == "pad":
            pad = self.pad_for(H)
            if cfg.pad_mode == "reflect" and pad >= min(images_u8.shape[2:]):
                raise ValueError(f"reflect padding {pad} must be smaller than the image side")
            offsets = pad_crop_offsets(indices, epoch, seed, pad)
            x = _pad_crop_flip(x, offsets, flip, pad, cfg.pad_mode).to(torch.float32) / 255.0
        elif cfg.crop == "rrc":
            x = x.to(torch.float32) / 255.0
            x = _rrc(x, indices, epoch, seed, cfg.rrc_scale, cfg.rrc_ratio, flip)
        else:
            if flip is not None:
                x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(3), x)
            x = x.to(torch.float32) / 255.0
        if cfg.randaugment is not None:
            x = randaugment(x, indices, epoch, seed, cfg.randaugment[0], cfg.randaugment[1])
        return normalize(x, self.mean, self.std)

    def mix(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        indices: torch.Tensor,
        epoch: int,
        seed: int,
        block: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One-hot the labels and apply :func:`mixup` with ``config.mixup`` (identity when 0).

        Returns (images (B, C, H, W), soft targets float32 (B, num_classes))."""
        targets = one_hot(labels.to(images.device), num_classes)
        return mixup(images, targets, self.config.mixup, indices.to(images.device), epoch, seed, block)
