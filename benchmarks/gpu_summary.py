"""Issue 6's goals against what one run of ``benchmarks/gpu_check.sh`` measured, as Markdown.

    python benchmarks/gpu_summary.py $OUT                 # the folder gpu_check.sh wrote
    python benchmarks/gpu_summary.py $OUT --json summary.json

Reads ``moe_layer.json``, ``train_throughput.json`` and, when present, ``fused_kernels.json``,
``moe_layer_dropless.json``, ``env.txt`` and ``gpu_tests.txt``. Prints one table per goal (shared PERF.md):
the layer's fwd+bwd time <= 1.15x the floor at every E, faster than every peer in the same run, peak memory
<= 1.3x the floor's, the experts' implementations side by side (to choose the CUDA default), where the
layer's time goes (``--breakdown`` rows), the end-to-end FLOP-adjusted efficiency >= 0.85, and the fused
kernels' bandwidth. gpu_check.sh runs it last, so the summary also ends the run's printed output.
Missing files or rows are reported as missing, never as met.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

LAYER_GOAL = 1.15  # our layer's fwd+bwd time / the floor's, at every E
MEMORY_GOAL = 1.3  # peak memory of a layer training step / the floor's
EFFICIENCY_GOAL = 0.85  # V-MoE images/s / (dense images/s x FLOP ratio)
ERROR_GOAL = 1e-2  # relative error of the fast path against the float32 reference
PEERS = ("loop", "vmoe_einsum", "fairscale", "tutel", "tutel_bpr")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        print(f"could not read {path}: {exc}", file=sys.stderr)
        return None


def _verdict(ok: bool | None) -> str:
    return "missing" if ok is None else ("met" if ok else "NOT met")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out


def summarize(out_dir: Path) -> tuple[str, dict[str, Any]]:
    """(Markdown, verdicts) for the files ``gpu_check.sh`` wrote into ``out_dir``."""
    md: list[str] = []
    verdict: dict[str, Any] = {}
    layer = _load(out_dir / "moe_layer.json")
    train = _load(out_dir / "train_throughput.json")
    kernels = _load(out_dir / "fused_kernels.json")
    dropless = _load(out_dir / "moe_layer_dropless.json")
    cfg = (layer or {}).get("config", {})
    where = cfg.get("gpu") or (layer or {}).get("device") or "unknown device"
    md.append(f"## GPU check summary: {where}, torch {cfg.get('torch', '?')}, {cfg.get('date', '?')}")
    md.append("")
    env = out_dir / "env.txt"
    if env.exists():
        md += [f"- environment: {line}" for line in env.read_text().splitlines() if line.strip()]
    tests = out_dir / "gpu_tests.txt"
    lines = tests.read_text().splitlines() if tests.exists() else []
    md.append(f"- CUDA unit tests (`-m gpu`): {lines[-1].strip() if lines else 'no record'}")
    md.append(f"- fused Triton kernels: {cfg.get('fused_kernels', 'unknown')}")
    md.append("")

    if layer is None:
        md.append("**moe_layer.json is missing: no layer results.**")
        verdict["layer"] = verdict["peers"] = verdict["memory"] = verdict["exactness"] = None
    else:
        rows: dict[int, dict[str, dict[str, Any]]] = {}
        for r in layer.get("results", []):
            rows.setdefault(r["num_experts"], {})[r["name"]] = r
        checks = cfg.get("checks", {})
        errs = [c.get("max_rel_err") for c in checks.values()]
        exact = bool(checks) and all(e is not None and e <= ERROR_GOAL for e in errs)
        verdict["exactness"] = exact if checks else None
        md.append(
            f"### The layer, {cfg.get('dtype', '?')}, {cfg.get('batch')} images x {cfg.get('tokens')} tokens, "
            f"D {cfg.get('dim')}, M {cfg.get('hidden')} (ratios to the floor in the same run)"
        )
        md.append("")
        head = [
            "E",
            "vmoe",
            f"<= {LAYER_GOAL}",
            "vmoe_fwd",
            "peak mem",
            f"<= {MEMORY_GOAL}",
            "checks max err",
        ]
        body, layer_ok, mem_ok = [], [], []
        for E, named in sorted(rows.items()):
            v = named.get("vmoe", {})
            ratio, mem = v.get("ratio_to_floor"), v.get("mem_ratio_to_floor")
            layer_ok.append(None if ratio is None else ratio <= LAYER_GOAL)
            mem_ok.append(None if mem is None else mem <= MEMORY_GOAL)
            e_errs = [
                c.get("max_rel_err") for k, c in checks.items() if k == f"E{E}" or k.startswith(f"E{E}_")
            ]
            worst = max((e for e in e_errs if e is not None), default=None)
            fwd = named.get("vmoe_fwd", {}).get("ratio_to_floor")
            body.append([E, ratio, _verdict(layer_ok[-1]), fwd, mem, _verdict(mem_ok[-1]), worst])
        md += _table(head, body)
        verdict["layer"] = None if not layer_ok or None in layer_ok else all(layer_ok)
        verdict["memory"] = None if not mem_ok or None in mem_ok else all(mem_ok)
        md.append("")
        md.append(
            f"Layer goal: **{_verdict(verdict['layer'])}**; memory goal: **{_verdict(verdict['memory'])}**; "
            f"exactness (every check <= {ERROR_GOAL}): **{_verdict(verdict['exactness'])}**."
        )
        md.append("")

        md.append("### Peers (ratio to the floor; `vmoe` must be faster than each)")
        md.append("")
        body, peers_ok = [], []
        for E, named in sorted(rows.items()):
            ours = named.get("vmoe", {}).get("ratio_to_floor")
            present = {p: named[p]["ratio_to_floor"] for p in PEERS if p in named}
            ok = ours is not None and bool(present) and all(ours < t for t in present.values())
            peers_ok.append(ok)
            body.append([E, ours, *(present.get(p) for p in PEERS), _verdict(ok)])
        md += _table(["E", "vmoe", *PEERS, "faster than all"], body)
        verdict["peers"] = bool(peers_ok) and all(peers_ok)
        md.append("")

        impls = sorted(
            {n for named in rows.values() for n in named if n.startswith("vmoe_")}
            - {"vmoe_einsum", "vmoe_bpr", "vmoe_experts", "vmoe_routing"}
        )
        train_impls = ["vmoe", "vmoe_bpr"] + [n for n in impls if not n.endswith("_fwd")]
        md.append(
            "### Experts implementations (to choose the CUDA default; fwd+bwd / forward only / peak memory)"
        )
        md.append("")
        body = []
        for E, named in sorted(rows.items()):
            for n in train_impls:
                if n in named:
                    r, f = named[n], named.get(f"{n}_fwd", {})
                    body.append(
                        [E, n, r.get("ratio_to_floor"), f.get("ratio_to_floor"), r.get("mem_ratio_to_floor")]
                    )
        md += _table(["E", "row", "fwd+bwd", "forward", "peak mem"], body)
        md.append("")

        md.append("### Where the layer's time goes (`--breakdown`; shares of the floor)")
        md.append("")
        body = []
        for E, named in sorted(rows.items()):
            for suffix, mode in (("", "fwd+bwd"), ("_fwd", "forward")):
                ex, rt = named.get(f"vmoe_experts{suffix}"), named.get(f"vmoe_routing{suffix}")
                if ex and rt:
                    a, b = ex["ratio_to_floor"], rt["ratio_to_floor"]
                    body.append([E, mode, a, b, a + b, named.get(f"vmoe{suffix}", {}).get("ratio_to_floor")])
        md += _table(["E", "mode", "experts", "router, losses, dispatch, combine", "sum", "vmoe"], body)
        md.append("")

    md.append("### End to end: training images/s and FLOP-adjusted efficiency")
    md.append("")
    if train is None:
        md.append("**train_throughput.json is missing.**")
        verdict["end_to_end"] = None
    else:
        ref = train.get("config", {}).get("reference", "?")
        body, eff_ok = [], []
        for r in train.get("results", []):
            eff = r.get("efficiency_vs_dense")
            moe = r["name"].startswith("vmoe_")
            ok = None if not moe or eff is None else eff >= EFFICIENCY_GOAL
            if moe and "[" not in r["name"]:  # the default rows carry the goal
                eff_ok.append(ok)
            body.append([r["name"], r.get("images_per_s"), eff, "" if ok is None else _verdict(ok)])
        md += _table(["model", "images/s", f"efficiency vs {ref}", f">= {EFFICIENCY_GOAL}"], body)
        verdict["end_to_end"] = None if not eff_ok or None in eff_ok else all(eff_ok)
        md.append("")
        md.append(f"End-to-end goal (default rows): **{_verdict(verdict['end_to_end'])}**.")
    md.append("")

    if kernels is not None:
        md.append(
            f"### Fused kernels alone (fused: {kernels.get('fused')}; GB/s and the share of a device copy's)"
        )
        md.append("")
        md += _table(
            ["kernel", "ms", "GB/s", "of copy"],
            [[r["name"], r.get("ms"), r.get("gb_s"), r.get("of_copy")] for r in kernels.get("results", [])],
        )
        md.append("")
    if dropless is not None:
        md.append("### Dropless routing (ratio to the floor over k*N rows)")
        md.append("")
        md += _table(
            ["E", "row", "ratio"],
            [[r["num_experts"], r["name"], r["ratio_to_floor"]] for r in dropless.get("results", [])],
        )
        md.append("")
    return "\n".join(md), verdict


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the folder benchmarks/gpu_check.sh wrote ($OUT)")
    p.add_argument("--json", default=None, help="also write the verdicts here")
    a = p.parse_args(argv)
    out_dir = Path(a.out_dir)
    if not out_dir.is_dir():
        p.error(f"{out_dir} is not a folder (expected the OUT folder of benchmarks/gpu_check.sh)")
    text, verdict = summarize(out_dir)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(verdict, indent=1))
    return verdict


if __name__ == "__main__":
    main()
