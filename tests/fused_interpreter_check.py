"""Checks of the fused bias+activation kernels in Triton's interpreter, on the CPU.

Run by ``tests/test_fused.py`` in a subprocess: ``TRITON_INTERPRET=1`` has to be set before Triton
compiles (decorates) the kernels, so not in the test process, where other tests may have imported them.
Exits non-zero (an AssertionError) on any mismatch; prints one line per check.
"""

from __future__ import annotations

import os
import warnings

import torch

from vmoe.config import MoEConfig, RouterConfig
from vmoe.layers import activation
from vmoe.moe import Experts, MoEMlp, fused

warnings.filterwarnings("ignore", message="overflow encountered")  # numpy's exp in the interpreter's sigmoid
warnings.filterwarnings("ignore", message="capacity rounding")


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_kernels() -> None:
    """bias_act against float64 stock ops: every activation, float32 and bf16, ragged tiles."""
    torch.manual_seed(0)
    # (E, R, M): R and M off the 64 x 128 tile, a single row, several row and column blocks.
    for shape in [(3, 70, 136), (1, 1, 8), (2, 130, 264)]:
        for act in ("gelu_tanh", "gelu", "relu"):
            for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 8e-3)):
                E, R, M = shape
                h = (torch.randn(E, R, M) * 3).to(dtype).requires_grad_(True)
                b = torch.randn(E, M).to(dtype).requires_grad_(True)
                assert fused.fused_bias_act_usable(h, act)
                y = fused.bias_act(h, b, act)
                g = torch.randn_like(y)
                gh, gb = torch.autograd.grad(y, (h, b), g)
                h64 = h.detach().double().requires_grad_(True)
                b64 = b.detach().double().requires_grad_(True)
                y64 = activation(h64 + b64.unsqueeze(1), act)
                gh64, gb64 = torch.autograd.grad(y64, (h64, b64), g.double())
                errs = (rel(y, y64), rel(gh, gh64), rel(gb, gb64))
                assert y.dtype == gh.dtype == gb.dtype == dtype
                assert max(errs) < tol, (shape, act, dtype, errs)
                print(f"kernels {shape} {act} {dtype}: max rel err {max(errs):.1e}")
    assert fused._disabled is None, fused._disabled


def check_combine_backward() -> None:
    """combine_backward against float64: ragged rows and columns, empty rows, each output alone."""
    torch.manual_seed(4)
    for N, rows, D in [(37, 90, 200), (5, 3, 8), (20, 33, 520)]:
        for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 8e-3)):
            g = torch.randn(N, D).to(dtype)
            y = torch.randn(rows, D).to(dtype)
            src = torch.randint(0, N, (rows,))
            w = torch.rand(rows).to(dtype)
            w[::4] = 0  # empty rows: weight 0 (their dot is never read)
            gy, dots = fused.combine_backward(g, y, src, w)
            ref_gy = w.double()[:, None] * g.double()[src]
            ref_dots = (y.double() * g.double()[src]).sum(1)
            assert gy.dtype == dtype and dots.dtype == torch.float32
            errs = (rel(gy, ref_gy), rel(dots, ref_dots))
            assert max(errs) < tol, (N, rows, D, dtype, errs)
            only_gy = fused.combine_backward(g, y, src, w, dots=False)
            only_dots = fused.combine_backward(g, y, src, w, grad_y=False)
            assert only_gy[1] is None and torch.equal(only_gy[0], gy)
            assert only_dots[0] is None and torch.equal(only_dots[1], dots)
            print(f"combine_backward N={N} rows={rows} D={D} {dtype}: max rel err {max(errs):.1e}")
    assert fused._disabled is None, fused._disabled


def check_relu_nan() -> None:
    """ReLU keeps NaN and passes its gradient on, as torch.relu and its threshold_backward do."""
    h = torch.tensor([[[float("nan"), -1.0, 2.0, 0.0]]], requires_grad=True)
    y = fused.bias_act(h, torch.zeros(1, 4), "relu")
    (gh,) = torch.autograd.grad(y, h, torch.ones_like(y))
    assert torch.isnan(y[0, 0, 0]) and y[0, 0, 1:].tolist() == [0.0, 2.0, 0.0], y
    assert gh.tolist() == [[[1.0, 0.0, 1.0, 0.0]]], gh
    print("relu with NaN: ok")


def check_no_bias_grad_and_inference() -> None:
    """A frozen bias (no bias gradient wanted) and inference_mode run the kernels too."""
    h = torch.randn(2, 9, 16, requires_grad=True)
    b = torch.randn(2, 16)
    y = fused.bias_act(h, b, "gelu_tanh")
    (gh,) = torch.autograd.grad(y, h, torch.ones_like(y))
    ref = torch.ops.aten.gelu_backward(torch.ones_like(y), h.detach() + b.unsqueeze(1), approximate="tanh")
    assert rel(gh, ref.double()) < 1e-6
    with torch.inference_mode():
        y2 = fused.bias_act(h, b, "gelu_tanh")
    assert torch.equal(y2, y.detach())
    assert fused._disabled is None, fused._disabled
    print("frozen bias and inference_mode: ok")


def check_experts() -> None:
    """Experts' bmm and grouped_mm over buffers, and the layer's bmm path: fused == stock ops."""
    calls = []
    apply = fused._BiasAct.apply
    combine = fused.combine_backward

    def counted(*args):
        calls.append(1)
        return apply(*args)

    def counted_combine(*args, **kw):
        out = combine(*args, **kw)
        combine_calls.append(out[0] is not None or out[1] is not None)
        return out

    combine_calls: list[bool] = []
    fused._BiasAct.apply = counted  # the fused paths must be the ones that run
    import vmoe.moe.dispatch

    vmoe.moe.dispatch.combine_backward = counted_combine
    torch.manual_seed(1)
    for impl in ("bmm", "grouped_mm"):
        if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            continue
        ex = Experts(4, 16, 24, init="independent", impl=impl)
        with torch.no_grad():
            ex.b1.normal_()
        x = torch.randn(4, 11, 16, requires_grad=True)
        outs = []
        for on in (True, False):
            ex.fused_bias_act = on
            y = ex(x)
            grads = torch.autograd.grad(y, (x, *ex.parameters()), torch.ones_like(y))
            outs.append((y, *grads))
        errs = [rel(a, b.double()) for a, b in zip(*outs)]
        assert max(errs) < 1e-5, (impl, errs)
        assert len(calls) == 1, calls
        calls.clear()
        print(f"experts {impl}: fused == stock ops, max rel err {max(errs):.1e}")
    for impl in ("bmm", "loop", "packed"):
        cfg = MoEConfig(
            router=RouterConfig(num_experts=4, num_selected=2, capacity_factor=1.0),
            group_size=2,
            expert_init="independent",
            experts_impl=impl,
        )
        torch.manual_seed(2)
        layer = MoEMlp(16, 24, cfg)
        x = torch.randn(4, 5, 16, requires_grad=True)
        outs = []
        calls.clear()
        combine_calls.clear()
        for on in (True, False):
            layer.fused = on
            torch.manual_seed(3)  # the router's noise
            y, aux = layer(x)
            loss = y.square().sum() + aux["aux_loss"]
            outs.append((y, *torch.autograd.grad(loss, (x, *layer.parameters()))))
        errs = [rel(a, b.double()) for a, b in zip(*outs)]
        assert max(errs) < 1e-5, (impl, errs)
        assert len(calls) == (impl == "bmm"), calls  # bias_act: the bmm experts only
        assert combine_calls == [True], combine_calls  # the combine's backward: every layout
        print(f"MoEMlp {impl}: fused == stock ops, max rel err {max(errs):.1e}")
    fused._BiasAct.apply = apply
    vmoe.moe.dispatch.combine_backward = combine
    assert fused._disabled is None, fused._disabled


def check_benchmark() -> None:
    """benchmarks/fused_kernels.py times the fused rows next to the stock ones, after checking them."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fused_kernels

    result = fused_kernels.main(["--device", "cpu", "--small", "--repeats", "1"])
    names = {r["name"] for r in result["results"]}
    assert {"bias_act_fwd[fused]", "bias_act_fwd_bwd[fused]", "combine_bwd[fused]"} <= names, names
    assert result["fused"] is True and len(result["checks"]) == 5, result["checks"]
    print("benchmarks/fused_kernels.py: fused rows checked and timed")


if __name__ == "__main__":
    for var in ("TRITON_INTERPRET", "VMOE_FUSED_INTERPRET"):
        assert os.environ.get(var) == "1", "run with TRITON_INTERPRET=1 VMOE_FUSED_INTERPRET=1"
    check_kernels()
    check_combine_backward()
    check_relu_nan()
    check_no_bias_grad_and_inference()
    check_experts()
    check_benchmark()
    print("all fused kernel checks passed")
