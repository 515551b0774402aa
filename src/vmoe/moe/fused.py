"""Bias + activation in one pass over the experts' hidden activations (Triton kernels, CUDA).

Between an expert MLP's two matmuls sits ``act(h + b1)``, over the largest tensors of the layer,
(E, R, M). Done with stock ops on CUDA, ``baddbmm`` first copies the broadcast bias into its output
and the GEMM reads it back; GELU then reads and writes the whole tensor again; in the backward,
``gelu_backward`` writes the hidden gradient and a separate reduction reads it again for the bias
gradient. Those memory-bound passes cost about a quarter of the expert matmuls' time at V-MoE-B/16
shapes (shared PERF.md). :func:`bias_act` does the forward in one read and one write of (E, R, M), and
the backward in one kernel that also sums the bias gradient (per-tile partial sums in float32, then a
small deterministic reduction: no atomics).

Used by :class:`vmoe.moe.Experts` (``fused_bias_act``, on by default) for its ``"bmm"`` and
``"grouped_mm"`` paths on CUDA when Triton is importable, outside ``torch.compile`` (whose own fusion
does the same). Elsewhere, and after any failure to compile or launch the kernels (a one-time warning
says why), the same function runs as stock ops. With ``VMOE_FUSED_INTERPRET=1`` and ``TRITON_INTERPRET=1``
(both, set before the kernels are first used) they run on CPU tensors too, in Triton's interpreter: how
the tests check them without a GPU.

Like any ``once_differentiable`` Function, the fused path has no double backward, forward-mode AD or
``torch.func`` transforms; set ``Experts.fused_bias_act = False`` for those.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["bias_act", "fused_bias_act_usable"]

#: Activations the kernels implement (the names of :data:`vmoe.layers.Activation`).
_ACT_CODES = {"gelu_tanh": 0, "gelu": 1, "relu": 2}
_BLOCK_R, _BLOCK_M = 64, 128  # a tile: 64 rows x 128 columns (8192 elements, 8 warps)
_disabled: str | None = None  # why the kernels are off for this process, once they failed


@functools.cache
def _kernels() -> tuple[Any, Any] | None:
    """The forward and backward Triton kernels (None when Triton is not importable)."""
    try:
        from vmoe.moe import _triton_kernels as k
    except Exception:  # not installed, or an install that does not import: stock ops
        return None
    return k.bias_act_fwd, k.bias_act_bwd


def _interpreting() -> bool:
    """Kernels on CPU tensors: vmoe's own opt-in and Triton's interpreter (TRITON_INTERPRET alone is
    Triton's global switch for any kernel; it must not send vmoe's CPU experts through the interpreter)."""
    return os.environ.get("VMOE_FUSED_INTERPRET") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def fused_bias_act_usable(h: torch.Tensor, act: str) -> bool:
    """Whether :func:`bias_act` runs the Triton kernels for ``h``: a CUDA tensor (or any, in the
    interpreter: see the module's docstring) of a floating dtype, an activation they implement, Triton importable,
    not inside ``torch.compile``, and no earlier failure in this process."""
    if _disabled is not None or act not in _ACT_CODES or torch.compiler.is_compiling():
        return False
    if not (h.is_cuda or _interpreting()) or h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return _kernels() is not None


def _disable(exc: BaseException) -> None:
    global _disabled
    _disabled = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"vmoe: the fused bias+activation kernels failed ({_disabled}); the experts use unfused ops "
        "from now on (same results, a little slower).",
        RuntimeWarning,
        stacklevel=2,
    )


def _launch(kernel: Any, h: torch.Tensor, *args: Any, **meta: Any) -> bool:
    """Run ``kernel`` over ``h``'s tiles; False (and the kernels off from now on) if Triton cannot
    compile or launch it here. Out-of-memory errors are the caller's, raised as they are."""
    programs, R, n_rb, n_mb = _grid(h)
    try:
        with _on_device(h):
            kernel[(programs,)](
                *args, R, h.shape[2], n_rb, n_mb, BR=_BLOCK_R, BM=_BLOCK_M, num_warps=8, **meta
            )
    except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError in newer torch)
        raise
    except Exception as exc:  # a Triton that cannot compile or launch here: stock ops from now on
        _disable(exc)
        return False
    return True


def _act_eager(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.gelu(x) if act == "gelu" else F.relu(x)


def _act_backward_eager(g: torch.Tensor, x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":  # as torch's threshold_backward: zero where x <= 0 (NaN passes)
        return g.masked_fill(x <= 0, 0)
    return torch.ops.aten.gelu_backward(g, x, approximate="tanh" if act == "gelu_tanh" else "none")


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
    def forward(ctx: Any, h: torch.Tensor, b: torch.Tensor, act: str) -> torch.Tensor:
        # h (E, R, M) contiguous, b (E, M) -> (E, R, M)
        ctx.act = act
        ctx.fused = False
        out = torch.empty_like(h)
        if _disabled is None and h.numel():
            fwd, _ = _kernels()  # type: ignore[misc]
            ctx.fused = _launch(fwd, h, h, b, out, ACT=_ACT_CODES[act])
        if not ctx.fused:
            out = _act_eager(h + b.unsqueeze(1), act)
        ctx.save_for_backward(h, b)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        h, b = ctx.saved_tensors
        g = g.contiguous()
        if ctx.fused and _disabled is None and h.numel():
            _, bwd = _kernels()  # type: ignore[misc]
            gh = torch.empty_like(h)
            bias_grad = ctx.needs_input_grad[1]
            E, M = b.shape
            n_rb = _grid(h)[2]
            part = torch.empty(E, n_rb, M, device=h.device, dtype=torch.float32) if bias_grad else gh
            if _launch(bwd, h, g, h, b, gh, part, ACT=_ACT_CODES[ctx.act], BIAS_GRAD=bias_grad):
                return gh, part.sum(1).to(b.dtype) if bias_grad else None, None
        gh = _act_backward_eager(g, h + b.unsqueeze(1), ctx.act)
        gb = gh.sum(1, dtype=torch.float32).to(b.dtype) if ctx.needs_input_grad[1] else None
        return gh, gb, None


def bias_act(h: torch.Tensor, b: torch.Tensor, act: str) -> torch.Tensor:
    """``act(h + b[:, None, :])``: (E, R, M), (E, M) -> (E, R, M), one pass each way when fused.

    Runs the Triton kernels where :func:`fused_bias_act_usable` says so, else stock ops (the same
    function). The fused forward rounds once (``h + b`` and the activation in float32); the stock
    ops round ``h + b`` to ``h``'s dtype first. ``b`` is cast to ``h``'s dtype.
    """
    if h.dim() != 3 or b.shape != (h.shape[0], h.shape[2]):
        raise ValueError(f"bias_act expects (E, R, M) and (E, M), got {tuple(h.shape)} and {tuple(b.shape)}")
    b = b.to(h.dtype)
    if b.device != h.device or not fused_bias_act_usable(h, act):
        return _act_eager(h + b.unsqueeze(1), act)
    return _BiasAct.apply(h.contiguous(), b.contiguous(), act)
