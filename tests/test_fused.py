"""The fused bias+activation kernels (vmoe.moe.fused): interpreter checks, stock-op fallback, CUDA."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vmoe.layers import activation
from vmoe.moe import Experts, fused

HAS_TRITON = importlib.util.find_spec("triton") is not None
ACTS = ["gelu_tanh", "gelu", "relu"]


def _reference(h: torch.Tensor, b: torch.Tensor, act: str, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float64 stock ops: output and the gradients of h and b for the output gradient g."""
    h64 = h.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    y = activation(h64 + b64.unsqueeze(1), act)
    return (y.detach(), *torch.autograd.grad(y, (h64, b64), g.double()))


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[dev]' installs it)")
def test_kernels_match_float64_in_the_triton_interpreter():
    """The kernels themselves, run by Triton's interpreter on the CPU (a subprocess: TRITON_INTERPRET
    must be set before Triton compiles them): every activation, float32 and bf16, ragged tiles, a
    frozen bias, inference_mode, and Experts / MoEMlp with the fused path equal to stock ops."""
    script = Path(__file__).with_name("fused_interpreter_check.py")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "VMOE_FUSED_INTERPRET": "1",
        "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all fused kernel checks passed" in proc.stdout
    assert "kernels (2, 130, 264) gelu_tanh torch.bfloat16" in proc.stdout  # the checks ran, not skipped


def _triton_36() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    return triton.__version__.startswith("3.6")


@pytest.mark.skipif(
    not _triton_36(), reason="the ahead-of-time compile API used here is Triton 3.6's (the dev pin)"
)
def test_kernels_compile_for_sm90_with_tritons_cuda_backend():
    """No GPU needed: Triton's real CUDA code generation (not the lenient interpreter) compiles every
    kernel to sm_90 machine code for every activation and dtype, with 16-byte vector loads and stores
    when the pointers and sizes are 16-aligned, as they are at V-MoE shapes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vmoe.moe import _triton_kernels as k

    meta = {
        "R": "i32",
        "M": "i32",
        "n_rb": "i32",
        "n_mb": "i32",
        "ACT": "constexpr",
        "BR": "constexpr",
        "BM": "constexpr",
    }
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(8)}
    for dt in ("bf16", "fp32", "fp16"):
        for act in range(3):
            consts = {"ACT": act, "BR": fused._BLOCK_R, "BM": fused._BLOCK_M}
            fwd = {"h_ptr": f"*{dt}", "b_ptr": f"*{dt}", "out_ptr": f"*{dt}", **meta}
            bwd = {
                "g_ptr": f"*{dt}",
                "h_ptr": f"*{dt}",
                "b_ptr": f"*{dt}",
                "gh_ptr": f"*{dt}",
                "part_ptr": "*fp32",
                **meta,
            }
            with_bias = {**bwd, "BIAS_GRAD": "constexpr"}
            kernels = [
                (k.bias_act_fwd, fwd, consts),
                (k.bias_act_bwd, with_bias, {**consts, "BIAS_GRAD": True}),
                (k.bias_act_bwd, with_bias, {**consts, "BIAS_GRAD": False}),
            ]
            combine = {
                "g_ptr": f"*{dt}",
                "y_ptr": f"*{dt}",
                "src_ptr": "*i64",
                "w_ptr": f"*{dt}",
                "gy_ptr": f"*{dt}",
                "dot_ptr": "*fp32",
                "rows": "i32",
                **dict.fromkeys(("D", "BR", "BD", "GRAD_Y", "DOTS"), "constexpr"),
            }
            cc = {"D": 768, "BR": fused._COMBINE_ROWS, "BD": fused._COMBINE_COLS}
            kernels += [
                (k.combine_bwd, combine, {**cc, "GRAD_Y": gy, "DOTS": dots})
                for gy, dots in ((True, True), (False, True), (True, False))
            ]
            for fn, sig, constexprs in kernels:
                src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
                warps = 4 if fn is k.combine_bwd else 8  # as launched
                out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                assert len(out.asm["cubin"]) > 1000
                assert "ld.global.v4.b32" in out.asm["ptx"]
                assert "st.global.v4.b32" in out.asm["ptx"] or not constexprs.get("GRAD_Y", True)


@pytest.mark.parametrize("act", ACTS)
def test_bias_act_runs_stock_ops_off_cuda(act, monkeypatch):
    # TRITON_INTERPRET alone is Triton's switch for any kernel: vmoe's CPU experts stay on stock ops.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("VMOE_FUSED_INTERPRET", raising=False)
    torch.manual_seed(0)
    h = torch.randn(2, 5, 6, requires_grad=True)
    b = torch.randn(2, 6, requires_grad=True)
    assert not fused.fused_bias_act_usable(h, act)
    y = fused.bias_act(h, b, act)
    g = torch.randn_like(y)
    y64, gh64, gb64 = _reference(h, b, act, g)
    gh, gb = torch.autograd.grad(y, (h, b), g)
    assert _rel(y, y64) < 1e-6 and _rel(gh, gh64) < 1e-6 and _rel(gb, gb64) < 1e-6


def test_vmoe_fused_0_turns_the_kernels_off_for_the_process(monkeypatch):
    monkeypatch.setattr(fused, "_interpreting", lambda: True)  # CPU tensors would count as usable
    h = torch.zeros(2, 3, 4)
    if HAS_TRITON:
        assert fused.fused_usable(h)
    monkeypatch.setenv("VMOE_FUSED", "0")
    assert not fused.fused_usable(h) and not fused.fused_bias_act_usable(h, "gelu_tanh")
    assert fused.combine_backward(
        torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(3)
    ) == (None, None)


@pytest.mark.parametrize("act", ACTS)
def test_activation_backward_is_autograds_gradient(act):
    """vmoe.layers.activation_backward (the stock backward of the fused path and of the experts'
    hand-written Functions) against autograd, with a NaN and an exact 0 among the inputs."""
    from vmoe.layers import activation_backward

    x = torch.tensor([float("nan"), -2.0, -0.5, 0.0, 0.3, 4.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    (ref,) = torch.autograd.grad(activation(x, act), x, g)
    torch.testing.assert_close(activation_backward(g, x.detach(), act), ref, equal_nan=True)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        activation_backward(g, x.detach(), "swish")  # type: ignore[arg-type]


def test_bias_act_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"expects \(E, R, M\) and \(E, M\), got \(2, 5, 6\) and \(2, 5\)"):
        fused.bias_act(torch.zeros(2, 5, 6), torch.zeros(2, 5), "gelu_tanh")
    assert not fused.fused_bias_act_usable(torch.zeros(2, 5, 6), "swish")


class _Kernel:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` calls ``fn(*args)``."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **meta: self.fn(*args)


def _fail(*args):
    raise RuntimeError("no kernel for this GPU")


def _fake_fwd(h, b, out, *rest):
    out.copy_(activation(h + b.unsqueeze(1), "gelu_tanh"))


@pytest.mark.parametrize("failing", ["forward", "backward"])
def test_a_failing_kernel_warns_once_and_stock_ops_take_over(failing, monkeypatch):
    """A Triton that cannot compile or launch (an old GPU, a broken install) must not stop training:
    one warning with the cause, the same results from stock ops, and no further attempts."""
    monkeypatch.setattr(fused, "_disabled", None)
    monkeypatch.setattr(fused, "_interpreting", lambda: True)  # CPU tensors count as usable
    fwd = _Kernel(_fail if failing == "forward" else _fake_fwd)
    monkeypatch.setattr(fused, "_kernels", lambda: (fwd, _Kernel(_fail), _Kernel(_fail)))
    torch.manual_seed(0)
    h = torch.randn(3, 7, 10, requires_grad=True)
    b = torch.randn(3, 10, requires_grad=True)
    assert fused.fused_bias_act_usable(h, "gelu_tanh")
    g = torch.randn(3, 7, 10)
    with pytest.warns(RuntimeWarning, match="fused Triton kernels failed .*no kernel for this GPU"):
        y = fused.bias_act(h, b, "gelu_tanh")
        gh, gb = torch.autograd.grad(y, (h, b), g)
    y64, gh64, gb64 = _reference(h, b, "gelu_tanh", g)
    assert _rel(y, y64) < 1e-6 and _rel(gh, gh64) < 1e-6 and _rel(gb, gb64) < 1e-6
    assert not fused.fused_bias_act_usable(h, "gelu_tanh")  # off for the rest of the process


def test_out_of_memory_is_raised_and_leaves_the_kernels_on(monkeypatch):
    """Running out of memory is the caller's error (e.g. a batch-size search), not a broken Triton."""
    monkeypatch.setattr(fused, "_disabled", None)
    monkeypatch.setattr(fused, "_interpreting", lambda: True)

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fused, "_kernels", lambda: (_Kernel(oom),) * 3)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fused.bias_act(torch.randn(2, 3, 4), torch.randn(2, 4), "gelu_tanh")
    assert fused._disabled is None


def test_experts_fused_flag_defaults_on_and_the_cpu_path_is_unchanged(monkeypatch):
    """Off CUDA the bmm experts keep baddbmm exactly, whatever the flag says."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    ex = Experts(3, 8, 12, init="independent", impl="bmm")
    assert ex.fused_bias_act
    x = torch.randn(3, 5, 8)
    y_on = ex(x)
    ex.fused_bias_act = False
    assert torch.equal(y_on, ex(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("act", "dtype"),  # each pair compiles 4 kernels (fwd/bwd x 2 alignments): the GPU script's time is short
    [
        ("gelu_tanh", torch.bfloat16),
        ("gelu_tanh", torch.float32),
        ("gelu", torch.bfloat16),
        ("relu", torch.bfloat16),
    ],
)
def test_cuda_kernels_match_float64(act, dtype):
    """On the GPU: the compiled kernels run (no fallback) and match float64 at a V-MoE-B/16 expert
    shape and a ragged one."""
    assert HAS_TRITON, "Triton should be on a CUDA machine: the fused path would silently be off"
    torch.manual_seed(0)
    for shape in [(8, 1664, 3072), (3, 70, 136)]:
        E, R, M = shape
        h = (torch.randn(E, R, M, device="cuda") * 2).to(dtype).requires_grad_(True)
        b = torch.randn(E, M, device="cuda").to(dtype).requires_grad_(True)
        assert fused.fused_bias_act_usable(h, act), fused._disabled
        y = fused.bias_act(h, b, act)
        g = torch.randn_like(y)
        gh, gb = torch.autograd.grad(y, (h, b), g)
        y64, gh64, gb64 = _reference(h, b, act, g)
        tol = 2e-6 if dtype == torch.float32 else 8e-3
        errs = (_rel(y, y64), _rel(gh, gh64), _rel(gb, gb64))
        assert max(errs) < tol, (shape, errs)
    assert fused._disabled is None, fused._disabled


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bmm_experts_fused_match_stock_ops_in_bf16(monkeypatch):
    torch.manual_seed(0)
    ex = Experts(8, 256, 1024, init="independent", impl="bmm").cuda()
    with torch.no_grad():
        ex.b1.normal_()
    x = torch.randn(8, 300, 256, device="cuda", requires_grad=True)
    outs = []
    calls = []
    apply = fused._BiasAct.apply
    monkeypatch.setattr(fused._BiasAct, "apply", lambda *a: calls.append(1) or apply(*a))
    for on in (True, False):
        ex.fused_bias_act = on
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = ex(x)
        outs.append((y, *torch.autograd.grad(y, (x, *ex.parameters()), torch.ones_like(y))))
    for a, ref in zip(*outs):
        assert _rel(a, ref.double()) < 1e-2
    assert calls == [1]  # the fused path ran (once: the second pass was the stock ops)
    assert fused._disabled is None, fused._disabled


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_combine_backward_matches_float64(dtype):
    torch.manual_seed(0)
    N, rows, D = 6000, 13000, 768
    g = torch.randn(N, D, device="cuda").to(dtype)
    y = torch.randn(rows, D, device="cuda").to(dtype)
    src = torch.randint(0, N, (rows,), device="cuda")
    w = torch.rand(rows, device="cuda").to(dtype)
    w[::5] = 0
    gy, dots = fused.combine_backward(g, y, src, w)
    assert gy is not None and dots is not None, fused._disabled
    assert torch.equal(gy, g[src] * w[:, None])  # one rounding of the same product as the stock ops
    tol = 2e-6 if dtype == torch.float32 else 8e-3
    assert _rel(gy, w.double()[:, None] * g.double()[src]) < tol
    assert _rel(dots, (y.double() * g.double()[src]).sum(1)) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:capacity rounding")
@pytest.mark.parametrize("impl", ["bmm", "grouped_mm"])
def test_cuda_layer_with_fused_kernels_matches_stock_ops_in_bf16(impl, monkeypatch):
    """The whole layer, fused (both kernels) against MoEMlp.fused = False, bf16 autocast training step."""
    from vmoe.config import MoEConfig, RouterConfig
    from vmoe.moe import MoEMlp
    from vmoe.moe import dispatch as dispatch_mod

    combine_calls = []
    combine = fused.combine_backward

    def counted(*args, **kw):
        out = combine(*args, **kw)
        combine_calls.append(out[0] is not None and out[1] is not None)  # the kernel ran, no fallback
        return out

    monkeypatch.setattr(dispatch_mod, "combine_backward", counted)
    cfg = MoEConfig(
        router=RouterConfig(num_experts=8, num_selected=2, capacity_factor=1.05),
        group_size=4,
        expert_init="independent",
        experts_impl=impl,
    )
    torch.manual_seed(0)
    layer = MoEMlp(256, 1024, cfg).cuda().eval()  # eval: no router noise, both runs route alike
    x = torch.randn(16, 65, 256, device="cuda", requires_grad=True)
    outs = []
    for on in (True, False):
        layer.fused = on
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux = layer(x)
        loss = y.float().square().mean() + aux["aux_loss"]
        outs.append((y, *torch.autograd.grad(loss, (x, *layer.parameters()))))
    for a, ref in zip(*outs):
        assert _rel(a, ref.double()) < 1e-2
    assert combine_calls == [True]
    assert fused._disabled is None, fused._disabled
