"""Counter-based hash random numbers on torch tensors.

Every random value used by the data pipeline is a pure function of integer *keys*
(``seed``, ``epoch``, a stream id, the global dataset index of the image, a slot number), computed
with the splitmix64 finaliser. There is no hidden generator state, so the values do not depend on batch
composition, call order, process rank or device: training resumed mid-epoch and data-parallel runs see
exactly the numbers a single uninterrupted process would.

Tensors are int64; multiplication wraps modulo 2**64 (two's complement), and logical right shifts
are emulated by an arithmetic shift followed by a mask. A pure-Python twin (:func:`splitmix64_int`)
gives the same results for scalars.
"""

from __future__ import annotations

import torch

from vmoe.rng import logical_rshift as _lsr
from vmoe.rng import splitmix64, splitmix64_int
from vmoe.rng import to_int64 as _signed

__all__ = [
    "STREAM_CROP",
    "STREAM_FLIP",
    "STREAM_MIXUP",
    "STREAM_PERMUTATION",
    "STREAM_RANDAUGMENT",
    "STREAM_RRC",
    "hash_bits",
    "hash_key",
    "hash_uniform",
    "splitmix64",
    "splitmix64_int",
]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9

# Stream ids: independent random streams for the different augmentation decisions.
STREAM_PERMUTATION = 1
STREAM_FLIP = 2
STREAM_CROP = 3
STREAM_RRC = 4
STREAM_RANDAUGMENT = 5
STREAM_MIXUP = 6


def hash_key(*keys: int) -> int:
    """Fold a sequence of integers into one 64-bit key (unsigned Python int)."""
    h = 0x5EED
    for k in keys:
        h = splitmix64_int(h ^ (int(k) & _MASK64))
    return h


def hash_bits(indices: torch.Tensor, *keys: int, n: int = 1) -> torch.Tensor:
    """Random 64-bit words, a function of ``(keys, index, slot)`` only.

    Args:
        indices: int64 tensor (B,) of global dataset indices (any device).
        keys: integers such as ``seed, epoch, stream``.
        n: number of independent words per index.

    Returns:
        int64 tensor (B, n).
    """
    key = _signed(hash_key(*keys))
    idx = indices.to(torch.int64).reshape(-1, 1)
    slots = torch.arange(n, device=idx.device, dtype=torch.int64).reshape(1, -1)
    z = splitmix64(idx ^ key)
    return splitmix64(z + slots * _signed(_GOLDEN ^ _M1))


def hash_uniform(indices: torch.Tensor, *keys: int, n: int = 1) -> torch.Tensor:
    """Uniform floats in [0, 1), a function of ``(keys, index, slot)`` only.

    Args:
        indices: int64 tensor (B,) of global dataset indices.
        keys: integers such as ``seed, epoch, stream``.
        n: number of values per index.

    Returns:
        float32 tensor (B, n) with 24 random bits each (exactly representable).
    """
    bits = _lsr(hash_bits(indices, *keys, n=n), 40)  # top 24 bits
    return bits.to(torch.float32) * (1.0 / (1 << 24))
