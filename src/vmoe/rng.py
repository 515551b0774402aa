"""Counter-based random numbers drawn by *position*, not by call order.

Router noise and dropout normally come from torch's global generator. That makes a result
depend on how the batch is laid out over processes: rank 1 of an expert-parallel run would
draw the noise that the single-process run gives to the first images. To make a run
independent of the layout, the trainer can open a :func:`positional_rng` context. Inside
it, every random draw of a model module is a pure function of

    (context seed, the module's stream id, the global position of the element)

where the global position counts images of the *global* batch (``image_offset`` is the
index of this process's first image). Outside such a context modules use torch's
generator as usual.

The generator is a splitmix64-style integer hash evaluated on int64 tensors (wrap-around
multiplication, logical shifts emulated by masking), so it runs on any device and never
synchronises with the host.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "PositionalRNG",
    "current",
    "hash_normal",
    "hash_uniform",
    "image_offset",
    "logical_rshift",
    "mix_seed",
    "positional_keep_mask",
    "positional_normal",
    "positional_rng",
    "splitmix64",
    "splitmix64_int",
    "to_int64",
]

_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as signed int64
_M2 = -7723592293110705685  # 0x94D049BB133111EB as signed int64
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as signed int64
_MASK64 = (1 << 64) - 1


def to_int64(value: int) -> int:
    """Reinterpret a Python integer modulo 2**64 as a signed int64 value."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_to_i64 = to_int64


def logical_rshift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 values by ``shift`` (1..63) bits."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


_srl = logical_rshift


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on an int64 tensor (bijective on 64-bit words)."""
    x = x ^ _srl(x, 30)
    x = x * _M1
    x = x ^ _srl(x, 27)
    x = x * _M2
    return x ^ _srl(x, 31)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 step (add the golden gamma, then finalise), elementwise on int64 tensors."""
    return _mix(x.to(torch.int64) + _GOLDEN)


def splitmix64_int(x: int) -> int:
    """:func:`splitmix64` on a Python integer; returns an unsigned 64-bit integer."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * (_M1 & _MASK64)) & _MASK64
    z = ((z ^ (z >> 27)) * (_M2 & _MASK64)) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*parts: int) -> int:
    """Combine integers into one well-mixed 64-bit seed (a Python int in int64 range).

    Pure Python (no tensors), so it costs nothing inside compiled code and never syncs.
    """
    acc = 0
    for p in parts:
        acc = splitmix64_int((acc + (int(p) & _MASK64)) & _MASK64)
    return to_int64(acc)


def hash_uniform(seed: int, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers in the open interval (0, 1), one per element of ``index``.

    Args:
        seed: a 64-bit seed (see :func:`mix_seed`).
        index: int64 tensor of element positions, any shape.
    Returns:
        a tensor of ``index.shape`` and ``dtype`` on ``index.device``.
    """
    h = _mix(index.to(torch.int64) * _GOLDEN + _to_i64(seed))
    bits = 53 if dtype == torch.float64 else 24
    top = _srl(h, 64 - bits).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return ((top + 0.5) / float(1 << bits)).to(dtype)


def hash_normal(seed: int, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal numbers (Box-Muller), one per element of ``index``; shape of ``index``."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u1 = hash_uniform(seed, index * 2, work)
    u2 = hash_uniform(seed, index * 2 + 1, work)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)).to(dtype)


@dataclass(frozen=True)
class PositionalRNG:
    """The active positional-randomness context.

    Attributes:
        seed: seed of this step (the trainer derives it from the run seed and the step).
        image_offset: global index of this process's first image in the global batch.
    """

    seed: int
    image_offset: int = 0

    def stream_seed(self, stream: int) -> int:
        """The seed of one module's stream (``stream`` is the module's fixed id)."""
        return mix_seed(self.seed, stream)

    def normal(
        self,
        stream: int,
        shape: tuple[int, ...],
        *,
        items_per_image: int,
        device: torch.device,
        first_image: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Normal noise of ``shape`` for consecutive images of this process.

        The flattened tensor covers ``numel / items_per_image`` images starting at this
        process's image ``first_image``; its element j is global element
        ``(image_offset + first_image) * items_per_image + j``.
        """
        index = self.global_index(shape, items_per_image, device, first_image)
        return hash_normal(self.stream_seed(stream), index, dtype)

    def uniform(
        self,
        stream: int,
        shape: tuple[int, ...],
        *,
        items_per_image: int,
        device: torch.device,
        first_image: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Uniform (0, 1) numbers of ``shape`` by global position (see :meth:`normal`)."""
        index = self.global_index(shape, items_per_image, device, first_image)
        return hash_uniform(self.stream_seed(stream), index, dtype)

    def global_index(
        self, shape: tuple[int, ...], items_per_image: int, device: torch.device, first_image: int = 0
    ) -> torch.Tensor:
        """int64 tensor of ``shape`` holding the global position of each element."""
        numel = math.prod(shape)
        start = (self.image_offset + first_image) * items_per_image
        return torch.arange(start, start + numel, device=device, dtype=torch.int64).view(shape)


_state = threading.local()


# The three functions below are what model code calls. They read the context themselves and are
# hidden from torch.compile (a graph break each): compiled graphs then neither bake in a step's seed
# (which would recompile every step) nor trace the 64-bit integer hashing (which inductor cannot
# index with).


@torch.compiler.disable
def image_offset() -> int | None:
    """The active context's ``image_offset``, or None outside :func:`positional_rng`."""
    ctx = current()
    return None if ctx is None else ctx.image_offset


@torch.compiler.disable
def positional_normal(
    stream: int,
    shape: tuple[int, ...],
    *,
    items_per_image: int,
    device: torch.device,
    first_image: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """:meth:`PositionalRNG.normal` of the active context, or None outside one."""
    ctx = current()
    if ctx is None:
        return None
    return ctx.normal(
        stream, shape, items_per_image=items_per_image, device=device, first_image=first_image, dtype=dtype
    )


@torch.compiler.disable
def positional_keep_mask(stream: int, rows: torch.Tensor, width: int, p: float) -> torch.Tensor | None:
    """Dropout keep mask (bool, ``rows.shape + (width,)``) by global row id, or None outside a context.

    Element ``[..., w]`` is kept when the hash of ``(seed, stream, rows[...] * width + w)`` is >= p;
    negative row ids (rows that do not matter) are treated as 0.
    """
    ctx = current()
    if ctx is None:
        return None
    index = rows.clamp(min=0).unsqueeze(-1) * width + torch.arange(width, device=rows.device)
    return hash_uniform(ctx.stream_seed(stream), index) >= p


def current() -> PositionalRNG | None:
    """The innermost active :func:`positional_rng` context, or None."""
    return getattr(_state, "ctx", None)


@contextlib.contextmanager
def positional_rng(seed: int, image_offset: int = 0) -> Iterator[PositionalRNG]:
    """Make random draws of vmoe modules functions of (seed, stream, global position).

    Example::

        with vmoe.rng.positional_rng(seed=mix_seed(run_seed, step), image_offset=rank * local_batch):
            logits, aux = model(images)
    """
    prev = current()
    ctx = PositionalRNG(seed=int(seed), image_offset=int(image_offset))
    _state.ctx = ctx
    try:
        yield ctx
    finally:
        _state.ctx = prev
