"""Plots (matplotlib, Agg backend) and small text tables for results."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SWEEP_COLUMNS", "format_table", "plot_sweep"]

# The columns of a capacity sweep's table (``vmoe eval --sweep`` and the main job's report).
SWEEP_COLUMNS = (
    "capacity_factor",
    "num_selected",
    "batch_priority",
    "accuracy",
    "gflops_per_image",
    "dropped_fraction",
)


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, markdown: bool = False) -> str:
    """Rows as an aligned text table (or a markdown table)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    if markdown:
        out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(out)
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def plot_sweep(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    x: str = "gflops_per_image",
    reference: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    unit: str = "G",
    dpi: int = 110,
) -> Path:
    """Accuracy against FLOPs per image, one line per (k, BPR): the paper's adaptive-compute figure.

    Left: accuracy vs realised FLOPs per image (``rows[i][x]`` in GFLOPs; ``unit="M"`` plots MFLOPs);
    right: accuracy vs the test-time capacity factor. ``reference``: one or more extra points, e.g.
    dense baselines, ``{"label", "gflops_per_image", "accuracy"}`` (optional ``"color"``, ``"marker"``),
    drawn as a star on the left and a dotted accuracy line on the right.
    """
    plt = _plt()
    scale = {"G": 1.0, "M": 1e3}[unit]
    refs = [] if reference is None else [reference] if isinstance(reference, dict) else list(reference)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {1: "tab:blue", 2: "tab:orange", 3: "tab:green", 4: "tab:red"}
    for k in sorted({r["num_selected"] for r in rows}):
        for b in (False, True):
            sel = sorted(
                (r for r in rows if r["num_selected"] == k and r["batch_priority"] == b),
                key=lambda r: r["capacity_factor"],
            )
            if not sel:
                continue
            kw = {
                "linestyle": "-" if b else "--",
                "color": colors.get(k),
                "marker": "o" if b else "s",
                "label": f"k={k}, {'BPR' if b else 'vanilla'}",
            }
            axes[0].plot([r[x] * scale for r in sel], [r["accuracy"] for r in sel], **kw)
            axes[1].plot([r["capacity_factor"] for r in sel], [r["accuracy"] for r in sel], **kw)
    for ref in refs:
        color = ref.get("color", "black")
        axes[0].scatter(
            [ref["gflops_per_image"] * scale],
            [ref["accuracy"]],
            marker=ref.get("marker", "*"),
            s=130,
            color=color,
            label=ref.get("label", "reference"),
            zorder=5,
        )
        axes[1].axhline(ref["accuracy"], color=color, lw=0.8, ls=":")
    axes[0].set_xlabel(f"{unit}FLOPs per image (realised, forward)")
    axes[1].set_xlabel("capacity factor C (test time)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        title or "Accuracy vs compute with test-time capacity (vanilla vs batch-prioritized routing)"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
