"""The ``vmoe`` command line. Nothing imports this module."""

from __future__ import annotations

import argparse
import sys

import torch


def _demo(args: argparse.Namespace) -> int:
    from vmoe.moe.routing import compute_capacity, top_experts_per_item

    torch.manual_seed(args.seed)
    S, E, k = 16, 4, 2
    gates = torch.softmax(torch.randn(S, E) * 2, dim=-1)
    for c in (1.0, 0.5):
        cap = compute_capacity(S, E, k, c, multiple_of=1)
        for bpr in (False, True):
            r = top_experts_per_item(gates, k, cap, batch_priority=bpr)
            kept = r.kept.any(-1)
            print(f"C={c} capacity={cap} {'BPR    ' if bpr else 'vanilla'} kept tokens: "
                  + "".join("#" if t else "." for t in kept.tolist())
                  + f"  mean top-1 gate of dropped: {gates.max(-1).values[~kept].mean().item() if (~kept).any() else float('nan'):.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmoe", description="Sparse Vision Mixture-of-Experts in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="show vanilla vs batch-prioritized routing on random gates")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
