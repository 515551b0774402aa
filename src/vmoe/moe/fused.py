"""Fused Triton kernels for the MoE layer on CUDA: memory-bound passes done in one.

- :func:`bias_act`: between an expert MLP's two matmuls sits ``act(h + b1)`` over the layer's largest
  tensors, (E, R, M). With stock ops on CUDA, ``baddbmm`` first copies the broadcast bias into its
  output and the GEMM reads it back; GELU reads and writes the whole tensor again; in the backward,
  ``gelu_backward`` writes the hidden gradient and a separate reduction reads it again for the bias
  gradient (shared PERF.md: about a quarter of the expert matmuls' time at V-MoE-B/16 shapes). Here
  the forward is one read and one write of (E, R, M), and the backward one kernel that also sums the
  bias gradient (per-tile float32 partial sums, then a small deterministic reduction: no atomics).
  Used by :class:`vmoe.moe.Experts` (``fused_bias_act``) for ``"bmm"`` and ``"grouped_mm"`` buffers.
- :func:`combine_backward`: the backward of the index dispatcher's weighted combine, the weighted
  copy of the output gradient into the expert rows and each row's dot product with it (the router's
  gradient), in one pass that reads each row once, instead of a gathered copy, float32 copies for
  accurate dots, and an in-place multiply.

Both run on CUDA tensors when Triton is importable, except while ``torch.compile`` traces (inductor
then fuses the stock ops itself). They are switched together per layer by :attr:`vmoe.moe.MoEMlp.fused`,
and off for the whole process by ``VMOE_FUSED=0`` in the environment (e.g. to A/B a training run).
Elsewhere, and after any failure to compile or launch them (a one-time warning says why), the same
functions run as stock ops. With ``VMOE_FUSED_INTERPRET=1`` and ``TRITON_INTERPRET=1`` (both, set
before the kernels are first used) they run on CPU tensors too, in Triton's interpreter: how the
tests check them without a GPU.

Like any ``once_differentiable`` Function, the fused paths have no double backward, forward-mode AD or
``torch.func`` transforms; set ``MoEMlp.fused = False`` for those.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from vmoe.layers import Activation, activation, activation_backward

__all__ = ["bias_act", "combine_backward", "fused_bias_act_usable", "fused_usable"]

#: Activations the kernels implement (the names of :data:`vmoe.layers.Activation`).
_ACT_CODES = {"gelu_tanh": 0, "gelu": 1, "relu": 2}
_BLOCK_R, _BLOCK_M = 64, 128  # a tile: 64 rows x 128 columns (8192 elements, 8 warps)
_disabled: str | None = None  # why the kernels are off for this process, once they failed


@functools.cache
def _kernels() -> tuple[Any, Any, Any] | None:
    """The Triton kernels: bias_act forward and backward, the combine's backward (None when Triton
    is not importable)."""
    try:
        from vmoe.moe import _triton_kernels as k
    except Exception:  # not installed, or an install that does not import: stock ops
        return None
    return k.bias_act_fwd, k.bias_act_bwd, k.combine_bwd


def _interpreting() -> bool:
    """Kernels on CPU tensors: vmoe's own opt-in and Triton's interpreter (TRITON_INTERPRET alone is
    Triton's global switch for any kernel; it must not send vmoe's CPU experts through the interpreter)."""
    return os.environ.get("VMOE_FUSED_INTERPRET") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def fused_usable(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``: a CUDA tensor (or any, in the interpreter: see the
    module's docstring) of a floating dtype, Triton importable, not while ``torch.compile`` traces, not
    turned off by ``VMOE_FUSED=0``, and no earlier failure in this process."""
    if _disabled is not None or torch.compiler.is_compiling() or os.environ.get("VMOE_FUSED") == "0":
        return False
    if not (t.is_cuda or _interpreting()) or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return _kernels() is not None


def fused_bias_act_usable(h: torch.Tensor, act: Activation) -> bool:
    """Whether :func:`bias_act` runs the Triton kernels for ``h`` (:func:`fused_usable`, and an
    activation they implement)."""
    return act in _ACT_CODES and fused_usable(h)


def _disable(exc: BaseException) -> None:
    global _disabled
    _disabled = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"vmoe: the fused Triton kernels failed ({_disabled}); the MoE layers use stock torch ops "
        "from now on (same results, a little slower).",
        RuntimeWarning,
        stacklevel=2,
    )


def _launch(kernel: Any, programs: int, device_of: torch.Tensor, *args: Any, **meta: Any) -> bool:
    """Run ``kernel`` on ``programs`` programs; False (and the kernels off from now on) if Triton cannot
    compile or launch it here. Out-of-memory errors are the caller's, raised as they are."""
    try:
        with _on_device(device_of):
            kernel[(programs,)](*args, **meta)
    except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError in newer torch)
        raise
    except Exception as exc:  # a Triton that cannot compile or launch here: stock ops from now on
        _disable(exc)
        return False
    return True


def _on_device(t: torch.Tensor) -> Any:
    """Triton launches on the current CUDA device: make it ``t``'s (a rank whose tensors are not on
    the current device, e.g. no ``torch.cuda.set_device``, would otherwise launch on the wrong GPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _grid(h: torch.Tensor) -> tuple[int, int, int, int]:
    E, R, M = h.shape
    n_rb, n_mb = -(-R // _BLOCK_R), -(-M // _BLOCK_M)
    return E * n_rb * n_mb, R, n_rb, n_mb


class _BiasAct(torch.autograd.Function):
    """``act(h + b[:, None])`` with the Triton kernels; saves ``h`` and ``b`` (not ``h + b``)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, b: torch.Tensor, act: Activation) -> torch.Tensor:
        # h (E, R, M) contiguous, b (E, M) -> (E, R, M)
        ctx.act = act
        ctx.fused = False
        out = torch.empty_like(h)
        if _disabled is None and h.numel():
            programs, R, n_rb, n_mb = _grid(h)
            ctx.fused = _launch(
                _kernels()[0],  # type: ignore[index]
                programs, h, h, b, out, R, h.shape[2], n_rb, n_mb,
                ACT=_ACT_CODES[act], BR=_BLOCK_R, BM=_BLOCK_M, num_warps=8,
            )  # fmt: skip
        if not ctx.fused:
            out = activation(h + b.unsqueeze(1), act)
        ctx.save_for_backward(h, b)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        h, b = ctx.saved_tensors
        g = g.contiguous()
        if ctx.fused and _disabled is None and h.numel():
            gh = torch.empty_like(h)
            bias_grad = ctx.needs_input_grad[1]
            programs, R, n_rb, n_mb = _grid(h)
            E, M = b.shape
            part = torch.empty(E, n_rb, M, device=h.device, dtype=torch.float32) if bias_grad else gh
            if _launch(
                _kernels()[1],  # type: ignore[index]
                programs, h, g, h, b, gh, part, R, M, n_rb, n_mb,
                ACT=_ACT_CODES[ctx.act], BR=_BLOCK_R, BM=_BLOCK_M, BIAS_GRAD=bias_grad, num_warps=8,
            ):  # fmt: skip
                return gh, part.sum(1).to(b.dtype) if bias_grad else None, None
        gh = activation_backward(g, h + b.unsqueeze(1), ctx.act)
        gb = gh.sum(1, dtype=torch.float32).to(b.dtype) if ctx.needs_input_grad[1] else None
        return gh, gb, None


def bias_act(h: torch.Tensor, b: torch.Tensor, act: Activation) -> torch.Tensor:
    """``act(h + b[:, None, :])``: (E, R, M), (E, M) -> (E, R, M), one pass each way when fused.

    Runs the Triton kernels where :func:`fused_bias_act_usable` says so, else stock ops (the same
    function). The fused forward rounds once (``h + b`` and the activation in float32); the stock
    ops round ``h + b`` to ``h``'s dtype first. ``b`` is cast to ``h``'s dtype.
    """
    if h.dim() != 3 or b.shape != (h.shape[0], h.shape[2]):
        raise ValueError(f"bias_act expects (E, R, M) and (E, M), got {tuple(h.shape)} and {tuple(b.shape)}")
    b = b.to(h.dtype)
    if b.device != h.device or not fused_bias_act_usable(h, act):
        return activation(h + b.unsqueeze(1), act)
    return _BiasAct.apply(h.contiguous(), b.contiguous(), act)


_COMBINE_ROWS, _COMBINE_COLS = 16, 256  # a tile of the combine's backward: 16 rows x 256 columns


def combine_backward(
    g: torch.Tensor,
    y: torch.Tensor,
    src: torch.Tensor,
    w_rows: torch.Tensor,
    *,
    grad_y: bool = True,
    dots: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of the weighted combine ``out[n] = sum_k w[n, k] * y[row(n, k)]``, one pass.

    For every row r of ``y`` (its token ``src[r]``, its weight ``w_rows[r]``):
    ``grad_y[r] = w_rows[r] * g[src[r]]`` in ``y``'s dtype, and ``dots[r] = <y[r], g[src[r]]>``
    (float32 products and sum; the gradient of the weight of the assignment held in row r). Rows of
    no token must have weight 0 and any valid ``src`` (their dot is never read).

    Args:
        g: (N, D) the output's gradient.
        y: (rows, D) the combined expert outputs.
        src: (rows,) int64 token of each row.
        w_rows: (rows,) weight of each row, in ``y``'s dtype.
    Returns:
        ``grad_y`` (rows, D) and ``dots`` (rows,) float32, each None when not asked for; (None, None)
        when the kernel is not usable here or failed (the caller then runs stock ops).
    """
    rows, D = y.shape
    same = (
        g.dtype == y.dtype and w_rows.dtype == y.dtype and g.device == src.device == w_rows.device == y.device
    )
    if not (fused_usable(y) and same and src.shape == w_rows.shape == (rows,) and y.numel()):
        return None, None
    g, src, w_rows = g.contiguous(), src.contiguous(), w_rows.contiguous()
    if dots:
        y = y.contiguous()
    gy = torch.empty_like(y) if grad_y else y
    dot = torch.empty(rows, device=y.device, dtype=torch.float32) if dots else w_rows
    ok = _launch(
        _kernels()[2],  # type: ignore[index]
        -(-rows // _COMBINE_ROWS), y, g, y, src, w_rows, gy, dot, rows,
        D=D, BR=_COMBINE_ROWS, BD=_COMBINE_COLS, GRAD_Y=grad_y, DOTS=dots, num_warps=4,
    )  # fmt: skip
    if not ok:
        return None, None
    return (gy if grad_y else None), (dot if dots else None)
