"""Look inside a trained V-MoE: where patches go, what BPR keeps, which classes use which experts."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vmoe.eval.evaluate import check_count
from vmoe.moe.router import CapacityRoundingWarning

__all__ = ["analyze", "collect_routing"]


@torch.no_grad()
def collect_routing(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 256
) -> dict[int, dict[str, torch.Tensor]]:
    """Run ``model`` on normalised images (N, C, H, W) and return each MoE layer's routing.

    Returns ``{block: {"expert_index": (N, T, K), "kept": (N, T, K), "gates": (N, T, E)}}``.
    Routing groups follow the model's ``group_size`` within each batch of ``batch_size``.
    """
    layers = model.moe_layers()
    for _, layer in layers:
        layer.record_routing = True
    out: dict[int, dict[str, list[torch.Tensor]]] = {
        i: {"expert_index": [], "kept": [], "gates": []} for i, _ in layers
    }
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            model(images[start : start + batch_size])
            for i, layer in layers:
                assert layer.last_routing is not None
                for k, v in layer.last_routing.items():
                    out[i][k].append(v.cpu())
    finally:
        for _, layer in layers:
            layer.record_routing = False
            layer.last_routing = None
    return {i: {k: torch.cat(v) for k, v in d.items()} for i, d in out.items()}


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.cfg
    (ih, iw), (ph, pw) = cfg.image_hw, cfg.patch_hw
    prefix = 1 if cfg.classifier == "token" else 0
    return ih // ph, iw // pw, prefix


def analyze(
    model: nn.Module,
    dataset: Any,
    info: Any,
    out_dir: str | os.PathLike[str],
    *,
    capacity_factor: float = 0.5,
    num_samples: int = 8,
    max_images: int = 2000,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Write routing pictures and a markdown summary into ``out_dir``.

    - ``routing_examples.png``: for ``num_samples`` test images, the top-1 expert of every patch in each
      MoE layer, and the patches BPR keeps at ``capacity_factor`` (dropped ones greyed out);
    - ``expert_class_layer{i}.png``: expert x class heatmap (share of each class's patches whose top-1
      choice is the expert), per MoE layer;
    - ``expert_load.png``: per-expert share of assignments and drop rate, at the model's own capacity
      and at ``capacity_factor`` with BPR;
    - ``analysis.md`` and ``analysis.json``: the numbers.
    """
    import vmoe
    from vmoe.data import eval_transform

    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model = model.to(device).eval()
    if not model.moe_layers():
        raise ValueError("analyze needs a model with MoE layers; this one is dense")
    check_count("max_images", max_images)
    n = min(len(dataset), max_images)
    raw = torch.from_numpy(dataset.images[:n]).permute(0, 3, 1, 2)
    labels = torch.from_numpy(dataset.labels[:n]).long()
    x = eval_transform(raw.to(device), info.mean, info.std)
    gh, gw, prefix = _grid(model)
    classes = list(info.classes)

    base = collect_routing(model, x, batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CapacityRoundingWarning)  # a small test-time C is rounded on purpose
        with vmoe.routing_overrides(model, capacity_factor=capacity_factor, batch_priority=True):
            bpr = collect_routing(model, x, batch_size=batch_size)
        with vmoe.routing_overrides(model, capacity_factor=capacity_factor, batch_priority=False):
            vanilla = collect_routing(model, x, batch_size=batch_size)
    layer_ids = sorted(base)
    E = base[layer_ids[0]]["gates"].shape[-1]

    # 1. Examples: image, then per layer the expert map and the BPR keep mask.
    ns = min(num_samples, n)
    cmap = plt.get_cmap("tab10" if E <= 10 else "tab20")
    cols = 1 + 2 * len(layer_ids)
    fig, axes = plt.subplots(ns, cols, figsize=(1.9 * cols, 1.9 * ns), squeeze=False)
    for r in range(ns):
        img = raw[r].permute(1, 2, 0).numpy()
        img = img[..., 0] if img.shape[-1] == 1 else img
        axes[r][0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r][0].set_title(classes[int(labels[r])], fontsize=7)
        for j, i in enumerate(layer_ids):
            top1 = base[i]["expert_index"][r, prefix:, 0].reshape(gh, gw).numpy()
            ax = axes[r][1 + 2 * j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, gw, gh, 0))
            ax.imshow(
                top1,
                cmap=cmap,
                vmin=0,
                vmax=cmap.N - 1,
                alpha=0.55,
                extent=(0, gw, gh, 0),
                interpolation="nearest",
            )
            if r == 0:
                ax.set_title(f"block {i}: expert", fontsize=7)
            # Share of each patch's k assignments that BPR keeps: 1 = all, 0 = dropped entirely.
            kept = bpr[i]["kept"][r, prefix:].float().mean(-1).reshape(gh, gw).numpy()
            ax = axes[r][2 + 2 * j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, gw, gh, 0))
            shade = np.zeros((gh, gw, 4))
            shade[..., 0] = (
                0.85  # patches that lost all assignments are covered in red, partly dropped ones lightly
            )
            shade[..., 3] = np.where(kept == 0, 0.8, np.where(kept < 1, 0.2, 0.0))
            ax.imshow(shade, extent=(0, gw, gh, 0), interpolation="nearest")
            if r == 0:
                ax.set_title(f"block {i}: BPR keeps\n(C={capacity_factor})", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "routing_examples.png", dpi=110)
    plt.close(fig)

    # 2. Expert x class heatmaps (those of an earlier analysis of another model in `out` go first).
    for stale in out.glob("expert_class_layer*.png"):
        if re.fullmatch(r"expert_class_layer\d+\.png", stale.name) and stale.name not in {
            f"expert_class_layer{i}.png" for i in layer_ids
        }:
            stale.unlink()
    summary: dict[str, Any] = {"capacity_factor": capacity_factor, "num_images": n, "layers": {}}
    heat_files = []
    for i in layer_ids:
        top1 = base[i]["expert_index"][:, prefix:, 0]  # (N, P)
        mat = np.zeros((len(classes), E))
        for c in range(len(classes)):
            sel = top1[labels == c].reshape(-1)
            if sel.numel():
                mat[c] = np.bincount(sel.numpy(), minlength=E)[:E] / sel.numel()
        fig, ax = plt.subplots(figsize=(0.5 * E + 2.5, 0.35 * len(classes) + 1.6))
        im = ax.imshow(mat, cmap="viridis", aspect="auto", vmin=0)
        ax.set_xticks(range(E))
        ax.set_yticks(range(len(classes)))
        ax.set_yticklabels(classes, fontsize=7)
        ax.set_xlabel("expert (top-1 choice)")
        ax.set_ylabel("class")
        ax.set_title(f"block {i}: share of each class's patches per expert", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        name = f"expert_class_layer{i}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        heat_files.append(name)

        def rates(rt: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, float]:
            e = rt["expert_index"].reshape(-1)
            k = rt["kept"].reshape(-1).float()
            req = torch.bincount(e, minlength=E).float()
            kept_n = torch.zeros(E).scatter_add_(0, e, k)
            return (
                (kept_n / kept_n.sum().clamp(min=1)).numpy(),
                (1 - kept_n / req.clamp(min=1)).numpy(),
                float(1 - k.mean()),
            )

        load_b, drop_b, d_b = rates(base[i])
        load_p, drop_p, d_p = rates(bpr[i])
        _, _, d_v = rates(vanilla[i])
        tokens_b = bpr[i]["kept"].any(-1)[:, prefix:].float().sum(-1)
        summary["layers"][str(i)] = {
            "expert_load": load_b.round(4).tolist(),
            "expert_drop_rate": drop_b.round(4).tolist(),
            "dropped_fraction": round(d_b, 4),
            "expert_load_at_c": load_p.round(4).tolist(),
            "expert_drop_rate_at_c": drop_p.round(4).tolist(),
            "dropped_fraction_at_c_bpr": round(d_p, 4),
            "dropped_fraction_at_c_vanilla": round(d_v, 4),
            "patches_kept_per_image_at_c_bpr": {
                "mean": float(tokens_b.mean()),
                "min": float(tokens_b.min()),
                "max": float(tokens_b.max()),
                "of": gh * gw,
            },
            "class_expert_share": mat.round(4).tolist(),
        }

    # 3. Per-expert load and drop rates.
    fig, axes = plt.subplots(len(layer_ids), 2, figsize=(10, 2.6 * len(layer_ids)), squeeze=False)
    for r, i in enumerate(layer_ids):
        s = summary["layers"][str(i)]
        xs = np.arange(E)
        axes[r][0].bar(xs - 0.2, s["expert_load"], 0.4, label="model's capacity")
        axes[r][0].bar(xs + 0.2, s["expert_load_at_c"], 0.4, label=f"C={capacity_factor}, BPR")
        axes[r][0].axhline(1.0 / E, color="k", lw=0.8, ls=":")
        axes[r][0].set_title(f"block {i}: share of kept assignments", fontsize=9)
        axes[r][1].bar(xs - 0.2, s["expert_drop_rate"], 0.4, label="model's capacity")
        axes[r][1].bar(xs + 0.2, s["expert_drop_rate_at_c"], 0.4, label=f"C={capacity_factor}, BPR")
        axes[r][1].set_title(f"block {i}: drop rate per expert", fontsize=9)
        axes[r][1].set_ylim(0, 1)
        for ax in axes[r]:
            ax.set_xlabel("expert")
            ax.set_xticks(xs)
    # One legend above the plots, where no bar can be under it.
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(out / "expert_load.png", dpi=110)
    plt.close(fig)

    (out / "analysis.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "# Routing analysis",
        "",
        f"{n} test images; test-time capacity factor C = {capacity_factor} for the keep/drop masks.",
        "",
        "![routing examples](routing_examples.png)",
        "",
        "Left: test image. Then, per MoE block: the top-1 expert of each patch (colour), and the patches",
        f"that batch-prioritized routing keeps at C = {capacity_factor}: a patch covered in red lost all its",
        "expert assignments (only the residual carries it), a light red one lost some of them.",
        "",
        "| block | dropped (model C) | dropped at C, BPR | dropped at C, vanilla | patches kept / image at C (BPR) |",
        "|---|---|---|---|---|",
    ]
    for i in layer_ids:
        s = summary["layers"][str(i)]
        pk = s["patches_kept_per_image_at_c_bpr"]
        lines.append(
            f"| {i} | {s['dropped_fraction']:.3f} | {s['dropped_fraction_at_c_bpr']:.3f} | "
            f"{s['dropped_fraction_at_c_vanilla']:.3f} | {pk['mean']:.1f} (min {pk['min']:.0f}, max {pk['max']:.0f})"
            f" of {pk['of']} |"
        )
    lines += ["", "![expert load](expert_load.png)", ""]
    lines += [f"![expert x class, block {f}]({f})" for f in heat_files]
    (out / "analysis.md").write_text("\n".join(lines) + "\n")
    summary["files"] = [
        "routing_examples.png",
        "expert_load.png",
        *heat_files,
        "analysis.md",
        "analysis.json",
    ]
    return summary
