"""A/B of the packed experts' slab layouts, in one process (benchmarks/RESULTS.md, CPU section).

    python benchmarks/slab_ab.py --num-experts 8 32 [--dropless] [--rounds 16] [--json out.json]

One V-MoE-Ti layer (64 images x 65 tokens, D 192, M 768, k 2, groups of 8 images) with packed
experts, timed with three layouts of the packed rows, plus the floor (one dense MLP over k*C*N rows):

    per_expert   one slab per expert (``slab_width`` 1: what the CPU ran before the slab layout)
    pairs        neighbouring experts in pairs (``slab_width`` 2: the CPU default with >= 2 threads)
    by_count     experts of nearest row counts in pairs (the default without gradients)

for a training step (fwd+bwd, router noise) and for inference (eval, ``inference_mode``). Each round
runs the floor and then the layouts in an order that rotates from round to round (whichever runs
right after another layout finds the shared input in cache); the table gives the median over rounds
of ``layout_ms / floor_ms`` of the same round. All three layouts compute the same function.
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

import vmoe.moe.layer as layer_mod
from vmoe.config import MoEConfig, RouterConfig
from vmoe.moe import MoEMlp

LAYOUTS = ("per_expert", "pairs", "by_count")


def _layout_policy(name: str) -> tuple[int, bool]:
    """(slab width, pairs by count) for a layout name."""
    return {"per_expert": (1, False), "pairs": (2, False), "by_count": (2, True)}[name]


class _Dispatcher(layer_mod.IndexDispatcher):
    """The layer's packed dispatcher with the layout under test forced."""

    layout = "pairs"

    def __init__(self, *args: Any, **kw: Any) -> None:
        if kw.get("packed") and not kw.get("static"):
            kw["slab_width"], kw["slab_by_count"] = _layout_policy(self.layout)
        super().__init__(*args, **kw)


def run(num_experts: int, dropless: bool, rounds: int) -> dict[str, float]:
    B, T, D, M, k = 64, 65, 192, 768, 2
    C = None if dropless else 1.05
    cfg = MoEConfig(
        router=RouterConfig(num_experts=num_experts, num_selected=k, capacity_factor=C),
        group_size=8,
        expert_init="independent",
        experts_impl="packed",
    )
    torch.manual_seed(0)
    layer = MoEMlp(D, M, cfg)
    x = torch.randn(B, T, D, requires_grad=True)
    gy = torch.randn(B, T, D)
    fc1, fc2 = torch.nn.Linear(D, M), torch.nn.Linear(M, D)
    xr = torch.randn(round(k * (C or 1.0) * B * T), D, requires_grad=True)
    gr = torch.randn_like(xr)
    params = [xr, *fc1.parameters(), *fc2.parameters()]

    def floor(train: bool) -> None:
        if train:
            y = fc2(torch.nn.functional.gelu(fc1(xr), approximate="tanh"))
            torch.autograd.grad(y, params, gr)
        else:
            with torch.inference_mode():
                fc2(torch.nn.functional.gelu(fc1(xr), approximate="tanh"))

    def step(name: str, train: bool) -> None:
        _Dispatcher.layout = name
        if train:
            layer.train()
            y, aux = layer(x)
            torch.autograd.grad([y, aux["aux_loss"]], [x, *layer.parameters()], [gy, torch.ones(())])
        else:
            layer.eval()
            with torch.inference_mode():
                layer(x.detach())

    out: dict[str, float] = {}
    for train in (True, False):
        for name in LAYOUTS:  # warm-up
            step(name, train)
        floor(train)
        ratios: dict[str, list[float]] = {n: [] for n in LAYOUTS}
        for r in range(rounds):
            t0 = time.perf_counter()
            floor(train)
            f = time.perf_counter() - t0
            order = LAYOUTS[r % 3 :] + LAYOUTS[: r % 3]
            for name in order:
                t0 = time.perf_counter()
                step(name, train)
                ratios[name].append((time.perf_counter() - t0) / f)
        for name in LAYOUTS:
            out[f"{name}{'' if train else '_fwd'}"] = statistics.median(ratios[name])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-experts", type=int, nargs="+", default=[8, 32])
    p.add_argument("--dropless", action="store_true", help="no capacity limit (k*N floor rows)")
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if torch.get_num_threads() < 2:
        print("note: 1 thread, so pairs cannot run side by side; expect no difference", file=sys.stderr)
    warnings.filterwarnings("ignore", message="capacity rounding")
    original = layer_mod.IndexDispatcher
    layer_mod.IndexDispatcher = _Dispatcher  # type: ignore[misc]
    try:
        results = {E: run(E, a.dropless, a.rounds) for E in a.num_experts}
    finally:
        layer_mod.IndexDispatcher = original  # type: ignore[misc]
    cols = [*LAYOUTS, *(f"{n}_fwd" for n in LAYOUTS)]
    print(
        f"ratio to the floor, median of {a.rounds} rounds, {torch.get_num_threads()} threads, "
        f"{'dropless' if a.dropless else 'C=1.05'}, torch {torch.__version__}"
    )
    print(f"{'E':>3s} " + " ".join(f"{c:>13s}" for c in cols))
    for E, r in results.items():
        print(f"{E:3d} " + " ".join(f"{r[c]:13.3f}" for c in cols))
    report = {
        "config": {
            "threads": torch.get_num_threads(),
            "dropless": a.dropless,
            "rounds": a.rounds,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "results": {str(E): r for E, r in results.items()},
    }
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
