"""AdamW implementations on V-MoE models, in one process (benchmarks/RESULTS.md, training throughput).

    python benchmarks/optimizer_step.py [--models vit_ti vmoe_ti:8 vmoe_ti:32] [--steps 8] [--json out.json]

For each model (32px, patch 4, 10 classes, batch 64, fp32, on the CPU):
  1. the optimizer step alone over its parameters (random gradients): torch's default AdamW, ``foreach``,
     and ``fused`` (what ``vmoe.train.loop.adamw`` picks where torch has the kernel), median of 10;
  2. whole training steps (forward, backward, AdamW) of two copies of the model, one with the default
     AdamW and one with ``vmoe.train.loop.adamw``, alternating (the order swaps every step), median of
     ``--steps`` each, as images/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import vmoe
from vmoe.train.loop import adamw


def _model(spec: str) -> torch.nn.Module:
    name, _, experts = spec.partition(":")
    kw: dict[str, Any] = {"patch_size": 4}
    if experts:
        kw["num_experts"] = int(experts)
    torch.manual_seed(0)
    return vmoe.create_model(name, image_size=32, num_classes=10, **kw)


def _median_ms(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def optimizer_only(spec: str) -> dict[str, float]:
    params = list(_model(spec).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    out = {}
    for name, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-4, **kw)
        for _ in range(3):
            opt.step()
        out[f"step_ms_{name}"] = _median_ms(opt.step, 10)
    out["params_m"] = sum(p.numel() for p in params) / 1e6
    return out


def training_steps(spec: str, steps: int, batch: int = 64) -> dict[str, float]:
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def make(optimizer: Any) -> Any:
        model = _model(spec)
        opt = optimizer([{"params": list(model.parameters())}], lr=1e-4)

        def step() -> None:
            logits, aux = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y) + aux.get("aux_loss", 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    runs = {"default": make(torch.optim.AdamW), "vmoe": make(adamw)}
    for fn in runs.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(steps):
        for k in ("default", "vmoe") if i % 2 else ("vmoe", "default"):
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    return {f"images_per_s_{k}": batch / statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_ti", "vmoe_ti:8", "vmoe_ti:32"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--json")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="capacity rounding")
    rows = {m: {**optimizer_only(m), **training_steps(m, a.steps)} for m in a.models}
    print(f"AdamW on the CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    head = ("params M", "default ms", "foreach ms", "fused ms", "img/s default", "img/s vmoe", "change")
    print(f"{'model':12s} " + " ".join(f"{h:>13s}" for h in head))
    for m, r in rows.items():
        change = r["images_per_s_vmoe"] / r["images_per_s_default"] - 1
        vals = (
            r["params_m"],
            r["step_ms_default"],
            r["step_ms_foreach"],
            r["step_ms_fused"],
            r["images_per_s_default"],
            r["images_per_s_vmoe"],
        )
        print(f"{m:12s} " + " ".join(f"{v:13.1f}" for v in vals) + f" {change:+12.1%}")
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "results": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
