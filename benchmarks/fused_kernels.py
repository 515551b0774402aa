"""The fused Triton kernels of vmoe.moe.fused against the stock ops they replace, with bandwidth.

Each row is timed in the same run (interleaved rounds, median), at V-MoE-B/16 sizes on CUDA (bf16;
E=8: E*R = 106,496 buffer rows, 50,432 tokens, D 768, M 3072). ``GB/s`` counts the bytes the row must
move at least (each tensor read or written once), ``of copy`` divides that by the bandwidth of a plain
device-to-device copy measured in the same run: how close a memory-bound pass is to the memory's speed.

    PYTHONPATH=src python benchmarks/fused_kernels.py --device cuda --json out.json
    PYTHONPATH=src python benchmarks/fused_kernels.py --device cpu --small   # quick self-test (stock ops;
        # the fused rows too under TRITON_INTERPRET=1 VMOE_FUSED_INTERPRET=1)

Rows:
    copy                   dst.copy_(src) of the (E, R, M) hidden activations: the bandwidth reference
    bias_act_fwd           fused bias + tanh-GELU forward       | stock: gelu(h + b)
    bias_act_fwd_bwd       the same, forward and backward       | stock: autograd of gelu(h + b), bias gradient
    combine_bwd            the combine's backward (grad_y, row dots) | stock: index_select, float32 dots, mul_
    bmm / baddbmm          the first expert matmul without / with the bias in the GEMM (what the fused
                           path saves besides the elementwise passes: baddbmm's bias copy and read)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vmoe.moe import fused
from vmoe.moe.dispatch import _row_dots


def _stock_combine_backward(g: torch.Tensor, y: torch.Tensor, src: torch.Tensor, w: torch.Tensor) -> Any:
    """What ``_Combine.backward`` runs without the kernel (grad_y and the row dots)."""
    g_rows = g.index_select(0, src)
    dots = _row_dots(y, g_rows)
    return g_rows.mul_(w.unsqueeze(1)), dots


def build(
    device: torch.device, small: bool
) -> tuple[dict[str, tuple[Callable[[], Any], int]], dict[str, Any]]:
    """name -> (step, bytes it must move at least), and the shapes."""
    dtype = torch.bfloat16 if device.type == "cuda" or small else torch.float32
    E, R, D, M, N = (2, 40, 24, 64, 48) if small else (8, 13312, 768, 3072, 50432)
    torch.manual_seed(0)
    el = torch.finfo(dtype).bits // 8
    h = torch.randn(E, R, M, device=device, dtype=dtype)
    b = torch.randn(E, M, device=device, dtype=dtype)
    hq = h.clone().requires_grad_(True)
    bq = b.clone().requires_grad_(True)
    gh = torch.randn_like(h)
    dst = torch.empty_like(h)
    x = torch.randn(E, R, D, device=device, dtype=dtype)
    w1 = torch.randn(E, D, M, device=device, dtype=dtype) * D**-0.5
    rows = E * R
    y = torch.randn(rows, D, device=device, dtype=dtype)
    g = torch.randn(N, D, device=device, dtype=dtype)
    src = torch.randint(0, N, (rows,), device=device)
    w = torch.rand(rows, device=device, dtype=dtype)
    size = h.numel() * el  # bytes of one (E, R, M) tensor
    ysize = y.numel() * el

    def act(t: torch.Tensor) -> torch.Tensor:
        return F.gelu(t, approximate="tanh")

    def fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], Any]:
        def step() -> Any:
            out = fn()
            return torch.autograd.grad(out, (hq, bq), gh)

        return step

    steps: dict[str, tuple[Callable[[], Any], int]] = {
        "copy": (lambda: dst.copy_(h), 2 * size),
        "bmm": (lambda: torch.bmm(x, w1), 0),
        "baddbmm": (lambda: torch.baddbmm(b.unsqueeze(1), x, w1), 0),
        "bias_act_fwd[stock]": (lambda: act(h + b.unsqueeze(1)), 2 * size),
        "bias_act_fwd_bwd[stock]": (fwd_bwd(lambda: act(hq + bq.unsqueeze(1))), 5 * size),
        "combine_bwd[stock]": (lambda: _stock_combine_backward(g, y, src, w), 3 * ysize),
    }
    if fused.fused_bias_act_usable(h, "gelu_tanh"):
        steps["bias_act_fwd[fused]"] = (lambda: fused.bias_act(h, b, "gelu_tanh"), 2 * size)
        steps["bias_act_fwd_bwd[fused]"] = (fwd_bwd(lambda: fused.bias_act(hq, bq, "gelu_tanh")), 5 * size)
        steps["combine_bwd[fused]"] = (lambda: fused.combine_backward(g, y, src, w), 3 * ysize)
    shapes = {"E": E, "R": R, "D": D, "M": M, "N": N, "dtype": str(dtype).removeprefix("torch.")}
    return steps, shapes


def check(device: torch.device) -> dict[str, float]:
    """The fused rows against the stock ones (relative errors; raises above bf16 tolerance)."""
    steps, _ = build(device, small=True)
    errs: dict[str, float] = {}
    for name in ("bias_act_fwd", "bias_act_fwd_bwd", "combine_bwd"):
        if f"{name}[fused]" not in steps:
            continue
        a, b = steps[f"{name}[fused]"][0](), steps[f"{name}[stock]"][0]()
        a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
        for i, (u, v) in enumerate(zip(a, b)):
            err = float((u.double() - v.double()).norm() / v.double().norm())
            if not err <= 2e-2:
                raise AssertionError(f"{name}[fused] output {i} differs from the stock ops by {err:.2e}")
            errs[f"{name}_{i}"] = err
    return errs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes: a quick self-test of the script")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (median); default 20 (3 --small)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    errs = check(device)
    print(
        "fused vs stock:",
        ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) or "fused kernels not usable here",
    )
    steps, shapes = build(device, a.small)
    repeats = a.repeats or (3 if a.small else 20)
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(repeats + 2):  # two warm-up rounds (the first compiles the kernels)
        for name, (fn, _) in steps.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            if r >= 2:
                times[name].append(ms)
    copy_gbs = steps["copy"][1] / statistics.median(times["copy"]) / 1e6
    rows = []
    print(f"{'row':<28}{'ms':>10}{'GB/s':>10}{'of copy':>9}")
    for name, (_, nbytes) in steps.items():
        ms = statistics.median(times[name])
        gbs = nbytes / ms / 1e6 if nbytes else float("nan")
        rows.append({"name": name, "ms": ms, "min_bytes": nbytes, "gb_s": gbs, "of_copy": gbs / copy_gbs})
        print(f"{name:<28}{ms:>10.3f}{gbs:>10.0f}{gbs / copy_gbs:>9.2f}")
    result = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__,
        "fused": fused.fused_usable(torch.empty(1, device=device, dtype=torch.bfloat16)),
        "shapes": shapes,
        "checks": errs,
        "repeats": repeats,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "results": rows,
    }
    if a.json:
        with open(f"{a.json}.tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(f"{a.json}.tmp", a.json)
    return result


if __name__ == "__main__":
    main()
