"""V-MoE vs dense ViT on CIFAR-10: the paper's four claims at small scale, one command, one process.

    .venv/bin/python experiments/cifar10.py --scale cpu --out runs/cifar10_cpu --threads 1 --publish docs
    PYTHONPATH=src python experiments/cifar10.py --scale gpu --out $OUT/cifar10      # (H200, bf16)
    .venv/bin/python experiments/cifar10.py --scale smoke --out /tmp/smoke            # seconds, synthetic data

What it does, in this order (``results.json`` is rewritten after every phase, so a run cut short
keeps what it finished):

1. trains the dense ViT and the V-MoE (E=8, k=2, every second block) for every seed;
2. the capacity sweep of each swept V-MoE k=2 model: C in {0.1,...,2.0} x k in {1,2} x {vanilla, BPR}
   (test-time knobs, no retraining), with the dense models as reference points;
3. per-image compute under BPR at C=0.5, k=2: histogram, and the images with most / fewest patches;
4. trains the V-MoE k=1 for every seed (the FLOP-matched sparse model);
5. the auxiliary-loss ablation: V-MoE k=2 with ``importance_weight=0, load_weight=0`` against the
   default k=2 run of the same seed: expert load, importance, drop rate, accuracy;
6. on CUDA with timm importable: training throughput of timm's ViT of the same shape, ours and V-MoE.

Outputs in ``--out``: ``results.json``, ``results.md`` (a markdown section), PNG figures, and
``runs/<name>/`` (each run's config, metrics.jsonl and final checkpoint; an existing finished run is
reused, not retrained). ``--publish DIR`` also copies the PNGs into ``DIR/figures`` (prefixed
``cifar10_<scale>_``) and writes ``results_docs.md`` with links relative to ``DIR``.

Scales (see ``SCALES``): ``cpu`` = 20k-image train subset, full 10k test set, 32px, patch 8, D 128,
4 blocks, 3 epochs, batch 128 (about 20-25 min on 2 CPU cores with ``--threads 1``); ``gpu`` = the full 50k / 10k split, the
recipes' ViT-Ti/4 size (6 x 192), bf16; ``smoke`` = synthetic data, a few steps (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vmoe
from vmoe.train.config import TrainConfig, apply_overrides
from vmoe.train.recipes import get_recipe

CAPACITIES = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
PER_IMAGE_C = 0.5

# Overrides applied on top of the recipes cifar10_vit / cifar10_vmoe / cifar10_vmoe_k1 (which hold the
# GPU-scale model: ViT-Ti/4, 6 x 192, and the shared data/augmentation/optimiser settings).
SCALES: dict[str, dict[str, Any]] = {
    "smoke": {
        "overrides": [
            "data=synthetic",
            "image_size=16",
            "max_train=256",
            "max_test=64",
            "steps=6",
            "batch_size=32",
            "eval_batch_size=32",
            "log_every=2",
            "model.patch_size=4",
            "model.num_layers=2",
            "model.hidden_size=32",
            "model.mlp_dim=64",
            "model.num_heads=2",
        ],
        "seeds": [0],
        "sweep_seeds": "first",
        "describe": "synthetic 16px images (256 train / 64 test), 2 x 32 model, 6 steps: a plumbing check only",
    },
    "cpu": {
        "overrides": [
            "max_train=20000",
            "max_test=None",
            "epochs=3",
            "batch_size=128",
            "eval_batch_size=256",
            "log_every=10",
            "model.patch_size=8",
            "model.num_layers=4",
            "model.hidden_size=128",
            "model.mlp_dim=512",
            "model.num_heads=4",
        ],
        "seeds": [0, 1],
        "sweep_seeds": "first",
        "describe": (
            "CIFAR-10, 20k-image train subset (seeded random, fixed across runs), full 10k test set, 32px, patch 8 "
            "(16 patches + class token), 4 blocks x D 128 (MLP 512, 4 heads), 3 epochs, batch 128, fp32"
        ),
    },
    "gpu": {
        "overrides": ["epochs=10", "batch_size=256", "eval_batch_size=1000", "log_every=20"],
        "seeds": [0, 1],
        "sweep_seeds": "all",
        "describe": (
            "CIFAR-10, full 50k train / 10k test, 32px, patch 4 (64 patches + class token), "
            "ViT-Ti size 6 x D 192 (MLP 768, 3 heads), 10 epochs, batch 256, bf16 autocast"
        ),
    },
}

KINDS = {  # name -> (recipe, extra overrides)
    "vit": ("cifar10_vit", []),
    "vmoe_k2": ("cifar10_vmoe", []),
    "vmoe_k1": ("cifar10_vmoe_k1", []),
    "vmoe_k2_noaux": ("cifar10_vmoe", ["model.importance_weight=0", "model.load_weight=0"]),
}
LABELS = {
    "vit": "dense ViT",
    "vmoe_k2": "V-MoE k=2",
    "vmoe_k1": "V-MoE k=1",
    "vmoe_k2_noaux": "V-MoE k=2, no aux losses",
}


# ----------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        if cpu:
            info["cpu"] = cpu[0].split(":", 1)[1].strip()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        ).stdout.strip()
    return info


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def make_config(kind: str, scale: str, seed: int, device: str, extra: list[str]) -> TrainConfig:
    recipe, kind_over = KINDS[kind]
    cfg = get_recipe(recipe)
    return apply_overrides(
        cfg, [*SCALES[scale]["overrides"], *kind_over, *extra, f"seed={seed}", f"device={device}"]
    )


def params_of(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"total": total, "experts": expert}


def _median_throughput(metrics_path: Path) -> float | None:
    vals = []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            rec = json.loads(line)
            if "images_per_s" in rec:
                vals.append(rec["images_per_s"])
    if len(vals) > 1:
        vals = vals[1:]  # the first window includes start-up
    return float(statistics.median(vals)) if vals else None


def train_one(kind: str, seed: int, args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], Any]:
    from vmoe.models.flops import flops_per_image
    from vmoe.train.loop import Trainer

    name = f"{kind}_s{seed}"
    run_dir = Path(args.runs_dir or out / "runs") / name
    cfg = make_config(kind, args.scale, seed, args.device, args.set)
    done = run_dir / "run.json"
    if done.is_file():
        prev = json.loads(done.read_text())
        if prev.get("config") == cfg.to_dict():
            trainer = Trainer(cfg, run_dir, resume=True, progress=False, log=lambda m: None)
            if trainer.step >= trainer.total_steps:
                log(f"{name}: reusing the finished run in {run_dir}")
                prev["reused"] = True
                return prev, trainer
        shutil.rmtree(run_dir)
    elif run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run: start it over (simpler than resuming mid-phase)
    log(f"{name}: training ({cfg.model}, {cfg.model_overrides})")
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, progress=args.progress, log=lambda m: log(f"{name}: {m}"))
    t_setup = time.perf_counter() - t0
    res = trainer.fit()
    wall = time.perf_counter() - t0
    model = trainer.model
    final = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "accuracy" in rec:
            final = rec
    moe = bool(model.moe_layers())
    rec = {
        "name": name,
        "kind": kind,
        "label": LABELS[kind],
        "seed": seed,
        "model": cfg.model,
        "num_selected": model.moe_layers()[0][1].cfg.router.num_selected if moe else None,
        "capacity_factor": model.moe_layers()[0][1].cfg.router.capacity_factor if moe else None,
        "accuracy": res.accuracy,
        "eval_loss": final.get("eval_loss"),
        "final_train_loss": res.final_loss,
        "gflops_per_image": flops_per_image(model) / 1e9,
        "gflops_per_image_realised": final.get("gflops_per_image"),
        "params": params_of(model),
        "steps": res.step,
        "epochs": res.step / trainer.steps_per_epoch,
        "train_images": len(trainer.train_set),
        "test_images": len(trainer.test_set),
        "train_images_per_s": _median_throughput(run_dir / "metrics.jsonl"),
        "wall_s": round(wall, 1),
        "setup_s": round(t_setup, 1),
        "run_dir": str(run_dir),
        "config": cfg.to_dict(),
    }
    done.write_text(json.dumps(rec, indent=1, default=list) + "\n")
    log(
        f"{name}: accuracy {res.accuracy:.4f}, {rec['gflops_per_image']:.4f} GFLOPs/img, "
        f"{rec['train_images_per_s'] or 0:.0f} img/s, {wall:.0f} s"
    )
    return rec, trainer


def mean_std(vals: list[float]) -> dict[str, Any]:
    return {
        "mean": float(np.mean(vals)),
        "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
        "min": float(np.min(vals)),
        "max": float(np.max(vals)),
        "n": len(vals),
        "values": [float(v) for v in vals],
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS:
        rs = [r for r in runs if r["kind"] == kind]
        if not rs:
            continue
        tp = [r["train_images_per_s"] for r in rs if r["train_images_per_s"]]
        out[kind] = {
            "label": LABELS[kind],
            "accuracy": mean_std([r["accuracy"] for r in rs]),
            "gflops_per_image": rs[0]["gflops_per_image"],
            "gflops_per_image_realised": float(np.mean([r["gflops_per_image_realised"] or 0 for r in rs])),
            "params": rs[0]["params"],
            "train_images_per_s": float(np.mean(tp)) if tp else None,
            "wall_s": float(np.sum([r["wall_s"] for r in rs])),
            "seeds": [r["seed"] for r in rs],
        }
    return out


def _capacity_of(model: torch.nn.Module, c: float, k: int) -> dict[str, Any]:
    """Buffer slots per expert for a full routing group at (C, k), and the C that they amount to."""
    from vmoe.config import replace as cfg_replace
    from vmoe.moe import effective_capacity

    layer = model.moe_layers()[0][1]
    tokens = layer.cfg.group_size * model.cfg.num_tokens
    router = cfg_replace(layer.cfg.router, capacity_factor=c, num_selected=k)
    cap = effective_capacity(tokens, router, warn=False)
    return {
        "group_tokens": tokens,
        "capacity": cap,
        "effective_capacity_factor": cap * router.num_experts / (tokens * k),
    }


# ----------------------------------------------------------------------------- routing statistics
@torch.no_grad()
def routing_stats(
    model: torch.nn.Module, test_set: Any, info: Any, device: torch.device, batch_size: int
) -> dict[str, Any]:
    """Per MoE layer, on the test set (eval mode, the model's trained routing): expert load, importance, drops."""
    from vmoe.data import eval_transform
    from vmoe.eval.analyze import collect_routing

    x = eval_transform(torch.from_numpy(test_set.images).permute(0, 3, 1, 2).to(device), info.mean, info.std)
    rt = collect_routing(model, x, batch_size=batch_size)
    out = {}
    for i, d in sorted(rt.items()):
        e, kept, gates = d["expert_index"], d["kept"].float(), d["gates"].float()
        E = gates.shape[-1]
        req = torch.bincount(e.reshape(-1), minlength=E).float()
        load = req / req.sum()
        top1 = torch.bincount(e[..., 0].reshape(-1), minlength=E).float()
        top1 = top1 / top1.sum()
        imp = gates.sum((0, 1))
        imp = imp / imp.sum()
        kept_n = torch.zeros(E).scatter_add_(0, e.reshape(-1).cpu(), kept.reshape(-1).cpu())
        out[str(i)] = {
            "expert_load": [
                round(float(v), 4) for v in load
            ],  # share of (token, choice) assignments requested
            "expert_top1_share": [round(float(v), 4) for v in top1],
            "expert_importance": [round(float(v), 4) for v in imp],  # share of summed softmax gates
            "load_cv": float(load.std(correction=0) / load.mean()),
            "importance_cv": float(imp.std(correction=0) / imp.mean()),
            "max_load_over_uniform": float(load.max() * E),
            "experts_unused": int((load < 0.01 / E).sum()),
            "expert_drop_rate": [round(float(v), 4) for v in 1 - kept_n / req.clamp(min=1)],
            "dropped_fraction": float(1 - kept.mean()),
        }
    return out


# ----------------------------------------------------------------------------- per-image compute
@torch.no_grad()
def per_image_compute(
    model: torch.nn.Module, trainer: Any, out: Path, tag: str, capacity: float = PER_IMAGE_C
) -> dict[str, Any]:
    from vmoe.data import eval_transform
    from vmoe.eval.analyze import collect_routing
    from vmoe.eval.evaluate import evaluate
    from vmoe.models.flops import flops_per_image

    plt = _plt()
    test, info, device = trainer.test_set, trainer.info, trainer.device
    bs = trainer.cfg.eval_batch_size
    with vmoe.routing_overrides(model, capacity_factor=capacity, num_selected=2, batch_priority=True):
        ev = evaluate(
            model, test, info, batch_size=bs, device=device, precision=trainer.cfg.precision, per_image=True
        )
        raw = torch.from_numpy(test.images).permute(0, 3, 1, 2)
        rt = collect_routing(model, eval_transform(raw.to(device), info.mean, info.std), batch_size=bs)
        bound = flops_per_image(model) / 1e9
    full = flops_per_image(model, capacity_factor=None, num_selected=2) / 1e9  # every assignment kept
    prefix = model.num_prefix_tokens
    gh, gw = model.cfg.grid
    layers = sorted(rt)
    k = rt[layers[0]]["kept"].shape[-1]
    # kept assignments per patch, summed over MoE layers and choices: (N, P) in [0, layers * k]
    kept_patch = sum(rt[i]["kept"][:, prefix:, :].float().sum(-1) for i in layers)
    processed = torch.stack(
        [rt[i]["kept"][:, prefix:, :].any(-1).float().sum(-1) for i in layers], 1
    )  # (N, L)
    g = ev["gflops"].double().numpy()
    assign = ev["assignments"].sum(1).double().numpy()
    correct = ev["correct"].numpy()
    labels = test.labels
    n = len(g)
    order = np.argsort(assign, kind="stable")
    dec = max(1, n // 10)
    lo, hi = order[:dec], order[-dec:]
    classes = list(info.classes)

    def class_counts(idx: np.ndarray) -> dict[str, int]:
        c = np.bincount(labels[idx], minlength=len(classes))
        return {classes[j]: int(c[j]) for j in np.argsort(-c)[:4]}

    res = {
        "capacity_factor": capacity,
        "num_selected": 2,
        "batch_priority": True,
        "model": tag,
        "num_images": n,
        "accuracy": ev["accuracy"],
        "gflops_per_image": {
            "mean": float(g.mean()),
            "std": float(g.std()),
            "min": float(g.min()),
            "p10": float(np.percentile(g, 10)),
            "median": float(np.median(g)),
            "p90": float(np.percentile(g, 90)),
            "max": float(g.max()),
            "capacity_bound": bound,
            "all_assignments_kept": full,
        },
        "assignments_per_image": {
            "mean": float(assign.mean()),
            "min": float(assign.min()),
            "max": float(assign.max()),
            "of": int(len(layers) * k * (gh * gw + prefix)),
        },
        "patches_processed_per_layer": {
            str(i): {
                "mean": float(processed[:, j].mean()),
                "min": float(processed[:, j].min()),
                "max": float(processed[:, j].max()),
                "of": gh * gw,
            }
            for j, i in enumerate(layers)
        },
        "fewest_decile": {
            "accuracy": float(correct[lo].mean()),
            "mean_assignments": float(assign[lo].mean()),
            "top_classes": class_counts(lo),
        },
        "most_decile": {
            "accuracy": float(correct[hi].mean()),
            "mean_assignments": float(assign[hi].mean()),
            "top_classes": class_counts(hi),
        },
        "figures": [f"per_image_hist_{tag}.png", f"per_image_examples_{tag}.png"],
    }

    # Histogram.
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.hist(g * 1e3, bins=40, color="tab:orange", alpha=0.85)
    ax.axvline(g.mean() * 1e3, color="k", lw=1, label=f"mean {g.mean() * 1e3:.2f}")
    ax.axvline(full * 1e3, color="tab:red", ls="--", lw=1, label=f"all assignments kept {full * 1e3:.2f}")
    ax.set_xlabel("MFLOPs per image (realised forward)")
    ax.set_ylabel("test images")
    ax.set_title(f"Per-image compute, BPR, C={capacity}, k=2 ({n} test images)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / res["figures"][0], dpi=100)
    plt.close(fig)

    # Example grid: 8 fewest, 8 most.
    ns = 8
    picks = [("fewest", order[:ns]), ("most", order[::-1][:ns])]
    fig, axes = plt.subplots(2, ns, figsize=(1.5 * ns, 4.3), squeeze=False)
    denom = float(len(layers) * k)
    for r, (what, idx) in enumerate(picks):
        for c, i in enumerate(idx):
            ax = axes[r][c]
            img = test.images[i]
            img = img[..., 0] if img.shape[-1] == 1 else img
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, gw, gh, 0))
            frac = (kept_patch[i] / denom).reshape(gh, gw).numpy()
            ax.imshow(
                np.zeros((gh, gw)),
                cmap="gray",
                vmin=0,
                vmax=1,
                alpha=0.8 * (1 - frac),
                extent=(0, gw, gh, 0),
                interpolation="nearest",
            )
            ax.set_title(f"{classes[int(labels[i])]}\n{int(assign[i])} asg", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(f"{what}", fontsize=8)
    fig.suptitle(
        f"BPR at C={capacity}: images with the fewest (top) / most (bottom) expert assignments; "
        "darker = fewer of the patch's assignments kept",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out / res["figures"][1], dpi=100)
    plt.close(fig)
    return res


# ----------------------------------------------------------------------------- plots
def plot_accuracy(runs: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    colors = {"vit": "black", "vmoe_k2": "tab:orange", "vmoe_k1": "tab:blue", "vmoe_k2_noaux": "tab:gray"}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for kind in KINDS:
        rs = [r for r in runs if r["kind"] == kind]
        if not rs:
            continue
        xs = [r["gflops_per_image"] * 1e3 for r in rs]
        ys = [r["accuracy"] for r in rs]
        ax.scatter(xs, ys, color=colors[kind], alpha=0.5, s=25)
        ax.errorbar(
            [np.mean(xs)],
            [np.mean(ys)],
            yerr=[np.std(ys, ddof=1) if len(ys) > 1 else 0],
            fmt="D",
            color=colors[kind],
            capsize=4,
            label=f"{LABELS[kind]} (n={len(rs)})",
        )
    ax.set_xlabel("MFLOPs per image (analytic forward, trained C)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("CIFAR-10: accuracy vs inference compute (points = seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(rows: list[dict[str, Any]], refs: list[dict[str, Any]], path: Path, title: str) -> None:
    from vmoe.eval.plots import plot_sweep as _plot

    _plot(rows, path, title=title, reference=refs, unit="M", dpi=100)


def plot_ablation(with_aux: dict[str, Any], without: dict[str, Any], path: Path) -> None:
    plt = _plt()
    layers = sorted(with_aux, key=int)
    fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 3.4), squeeze=False)
    for j, i in enumerate(layers):
        ax = axes[0][j]
        a, b = with_aux[i]["expert_load"], without[i]["expert_load"]
        xs = np.arange(len(a))
        ax.bar(xs - 0.2, a, 0.4, label=f"default aux (drop {with_aux[i]['dropped_fraction']:.1%})")
        ax.bar(xs + 0.2, b, 0.4, label=f"no aux losses (drop {without[i]['dropped_fraction']:.1%})")
        ax.axhline(1 / len(a), color="k", lw=0.8, ls=":")
        ax.set_xticks(xs)
        ax.set_xlabel("expert")
        ax.set_ylabel("share of assignments")
        ax.set_title(f"block {i}: expert load on the test set", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    colors = {"vit": "black", "vmoe_k2": "tab:orange", "vmoe_k1": "tab:blue", "vmoe_k2_noaux": "tab:gray"}
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r in runs:
        recs = [json.loads(ln) for ln in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        recs = [x for x in recs if "loss" in x]
        ax.plot(
            [x["step"] for x in recs],
            [x["loss"] for x in recs],
            color=colors[r["kind"]],
            alpha=0.7,
            lw=1,
            label=f"{r['label']} s{r['seed']}",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (cross-entropy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- timm throughput
def throughput_benchmark(cfg: TrainConfig, device: torch.device, batch: int) -> dict[str, Any]:
    """Training images/s of timm's ViT with our dense model's shape, our ViT and V-MoE (synthetic batches)."""

    from vmoe.models.flops import flops_per_image

    if device.type != "cuda":
        return {"skipped": "only measured on CUDA (the per-run training throughput above is the CPU number)"}
    try:
        import timm
    except Exception as e:
        return {"skipped": f"timm not importable ({type(e).__name__}: {e})"}
    mo = cfg.model_overrides
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    bench = _throughput_benchmark()
    common = {k: mo[k] for k in ("patch_size", "num_layers", "hidden_size", "mlp_dim", "num_heads")}
    models = {}
    try:  # timm's ViT with our dense model's depth, width, heads, MLP ratio and patch
        models["timm vit (same shape)"] = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            num_classes=10,
            img_size=32,
            **bench._timm_kwargs("vit_ti", common),
        )
    except Exception as e:
        return {"skipped": f"timm model failed: {e}"}
    models["vmoe vit_ti"] = vmoe.create_model("vit_ti", num_classes=10, image_size=32, **common)
    models["vmoe vmoe_ti k=2"] = vmoe.create_model(
        "vmoe_ti",
        num_classes=10,
        image_size=32,
        num_experts=8,
        num_selected=2,
        capacity_factor=1.05,
        **common,
    )
    models["vmoe vmoe_ti k=1"] = vmoe.create_model(
        "vmoe_ti",
        num_classes=10,
        image_size=32,
        num_experts=8,
        num_selected=1,
        capacity_factor=1.05,
        **common,
    )
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    rows = {}
    for name, m in models.items():
        m = m.to(device).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        times = bench.time_steps(bench._step_fn(m, opt, x, y, amp), device, warmup=10, repeats=40)
        dt = statistics.median(times)
        gf = flops_per_image(m) / 1e9 if hasattr(m, "moe_layers") else None
        rows[name] = {
            "images_per_s": batch / dt,
            "gflops_per_image": gf,
            "params": sum(p.numel() for p in m.parameters()),
        }
        del m, opt
    rows["timm vit (same shape)"]["gflops_per_image"] = rows["vmoe vit_ti"]["gflops_per_image"]
    return {"batch": batch, "precision": "bf16 autocast", "timm": timm.__version__, "rows": rows}


def _throughput_benchmark() -> Any:
    """benchmarks/train_throughput.py as a module: the same timed training step as the benchmark."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("vmoe_train_throughput", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- markdown
def render_markdown(R: dict[str, Any], fig: str = "") -> str:
    m = R["meta"]
    L = []
    L.append(f"### CIFAR-10, scale `{m['scale']}`")
    L.append("")
    L.append(f"- Command: `{m['command']}`")
    mach = m["machine"]
    L.append(
        f"- Machine: {mach.get('gpu') or mach.get('cpu', '?')} ({mach['cpu_count']} CPUs visible, "
        f"{mach['torch_threads']} torch threads, device {mach['device']}); torch {mach['torch']}, "
        f"Python {mach['python']}; load average at start/end {m.get('loadavg_start')} / {m.get('loadavg_end')}"
    )
    L.append(
        f"- Wall time: {m['wall_s'] / 60:.1f} min total ({m.get('status', '')}); setup: {SCALES[m['scale']]['describe']}"
    )
    L.append(f"- Seeds: {m['seeds']}")
    L.append("")
    S = R.get("summary", {})
    if S:
        L.append(
            "**Dense vs V-MoE** (test accuracy: mean ± sample std over seeds, [min, max]; FLOPs: analytic "
            "forward per image at the trained C=1.05, capacity buffers counted in full):"
        )
        L.append("")
        L.append(
            "| model | seeds | test accuracy | GFLOPs/img | vs dense | params (experts) | train img/s | train wall |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        dense_gf = S.get("vit", {}).get("gflops_per_image")
        for s in S.values():
            a = s["accuracy"]
            rel = f"{s['gflops_per_image'] / dense_gf:.2f}x" if dense_gf else ""
            tp = f"{s['train_images_per_s']:.0f}" if s["train_images_per_s"] else "-"
            L.append(
                f"| {s['label']} | {len(s['seeds'])} | {a['mean']:.4f} ± {a['std']:.4f} [{a['min']:.4f}, {a['max']:.4f}] | "
                f"{s['gflops_per_image']:.4f} | {rel} | {s['params']['total'] / 1e6:.2f}M ({s['params']['experts'] / 1e6:.2f}M) | "
                f"{tp} | {s['wall_s'] / 60:.1f} min |"
            )
        L.append("")
        L.append(f"![accuracy vs compute]({fig}accuracy.png)")
        L.append("")
    sw = R.get("sweep")
    if sw:
        L.append(
            f"**Test-time capacity sweep** of the V-MoE k=2 model(s) {sw['models']} (mean over them; no retraining). "
            "Accuracy, with realised GFLOPs per image in parentheses:"
        )
        L.append("")
        caps = sorted({r["capacity_factor"] for r in sw["mean"]})
        L.append("| k, routing | " + " | ".join(f"C={c}" for c in caps) + " |")
        L.append("|---|" + "---|" * len(caps))
        for k in (1, 2):
            sel = {
                r["capacity_factor"]: r for r in sw["mean"] if r["num_selected"] == k and r["batch_priority"]
            }
            if sel and all("capacity" in sel[c] for c in caps):
                L.append(
                    f"| k={k}: buffer slots / expert (effective C) | "
                    + " | ".join(
                        f"{sel[c]['capacity']} ({sel[c]['effective_capacity_factor']:.2f})" for c in caps
                    )
                    + " |"
                )
        for k in (1, 2):
            for b in (False, True):
                sel = {
                    r["capacity_factor"]: r
                    for r in sw["mean"]
                    if r["num_selected"] == k and r["batch_priority"] == b
                }
                if sel:
                    L.append(
                        f"| k={k}, {'BPR' if b else 'vanilla'} | "
                        + " | ".join(
                            f"{sel[c]['accuracy']:.3f} ({sel[c]['gflops_per_image']:.4f})" for c in caps
                        )
                        + " |"
                    )
        L.append("")
        L.append(f"![capacity sweep]({fig}sweep.png)")
        L.append("")
    pi = R.get("per_image")
    if pi:
        g = pi["gflops_per_image"]
        L.append(
            f"**Per-image compute** under BPR at C={pi['capacity_factor']}, k=2 ({pi['num_images']} test images, "
            f"model {pi['model']}): accuracy {pi['accuracy']:.4f}; GFLOPs/image mean {g['mean']:.4f}, "
            f"std {g['std']:.4f}, min {g['min']:.4f}, p10 {g['p10']:.4f}, median {g['median']:.4f}, "
            f"p90 {g['p90']:.4f}, max {g['max']:.4f} (capacity bound {g['capacity_bound']:.4f}; all "
            f"assignments kept {g['all_assignments_kept']:.4f}). Kept (token, expert) assignments per image: "
            f"{pi['assignments_per_image']['min']:.0f} to {pi['assignments_per_image']['max']:.0f} "
            f"(mean {pi['assignments_per_image']['mean']:.1f}) of {pi['assignments_per_image']['of']}."
        )
        L.append(
            f"Fewest-compute decile: accuracy {pi['fewest_decile']['accuracy']:.3f}, classes "
            f"{pi['fewest_decile']['top_classes']}; most-compute decile: accuracy "
            f"{pi['most_decile']['accuracy']:.3f}, classes {pi['most_decile']['top_classes']}."
        )
        L.append("")
        L.append(f"![per-image compute]({fig}{pi['figures'][0]})")
        L.append(f"![fewest / most]({fig}{pi['figures'][1]})")
        L.append("")
    ab = R.get("ablation")
    if ab:
        L.append(
            f"**Auxiliary-loss ablation** (V-MoE k=2, seed {ab['seed']}; routing measured on the test set at the "
            "trained C=1.05, eval mode). Load = share of requested (token, choice) assignments per expert; "
            "CV = std/mean over experts (0 = perfectly balanced):"
        )
        L.append("")
        L.append(
            "| run | accuracy | block | load CV | importance CV | max load / uniform | dropped at C=1.05 | acc. C=0.5 BPR | acc. C=0.5 vanilla |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|")
        for key in ("with_aux", "without_aux"):
            a = ab[key]
            for i, s in a["routing"].items():
                L.append(
                    f"| {a['label']} | {a['accuracy']:.4f} | {i} | {s['load_cv']:.3f} | {s['importance_cv']:.3f} | "
                    f"{s['max_load_over_uniform']:.2f} | {s['dropped_fraction']:.3f} | "
                    f"{a['accuracy_c0.5_bpr']:.4f} | {a['accuracy_c0.5_vanilla']:.4f} |"
                )
        L.append("")
        L.append(f"![expert load]({fig}ablation_load.png)")
        L.append("")
    tp = R.get("throughput_timm")
    if tp:
        if "skipped" in tp:
            L.append(f"Throughput against timm: skipped — {tp['skipped']}.")
        else:
            L.append(
                f"**Training throughput, synthetic batches** (batch {tp['batch']}, {tp['precision']}, timm {tp['timm']}):"
            )
            L.append("")
            L.append("| model | images/s | GFLOPs/img | params |")
            L.append("|---|---|---|---|")
            for name, r in tp["rows"].items():
                gf = f"{r['gflops_per_image']:.4f}" if r["gflops_per_image"] else "-"
                L.append(f"| {name} | {r['images_per_s']:.0f} | {gf} | {r['params'] / 1e6:.2f}M |")
        L.append("")
    L.append(f"![training loss]({fig}train_loss.png)")
    L.append("")
    L.append("Phase wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in m.get("phase_s", {}).items()))
    return "\n".join(L) + "\n"


def publish(R: dict[str, Any], out: Path, pub: Path, scale: str) -> None:
    (pub / "figures").mkdir(parents=True, exist_ok=True)
    prefix = f"cifar10_{scale}_"
    for f in R.get("figures", []):
        shutil.copy(out / f, pub / "figures" / (prefix + f))
    (out / "results_docs.md").write_text(render_markdown(R, fig=f"figures/{prefix}"))


def render_only(args: argparse.Namespace) -> int:
    """Re-render the markdown of a finished run (adds fields that older versions of this script lacked)."""
    from vmoe.config import ModelConfig
    from vmoe.models.vit import build_model

    out = Path(args.out)
    R = json.loads((out / "results.json").read_text())
    scale = SCALES[R["meta"]["scale"]]
    if R.get("setup", {}).get("overrides") == scale["overrides"]:
        R["setup"]["describe"] = scale["describe"]  # the current wording of the same setup
    sw = R.get("sweep")
    if sw and any("capacity" not in r for r in sw["mean"]):
        run = next(r for r in R["runs"] if r["name"] == sw["models"][0])
        mcfg = json.loads((Path(run["run_dir"]) / "config.json").read_text())["model"]
        model = build_model(ModelConfig.from_dict(mcfg))
        for r in sw["mean"]:
            r.update(_capacity_of(model, r["capacity_factor"], r["num_selected"]))
        (out / "results.json").write_text(json.dumps(R, indent=1, default=list) + "\n")
    (out / "results.md").write_text(render_markdown(R))
    if args.publish:
        publish(R, out, Path(args.publish), R["meta"]["scale"])
    log(f"rendered {out / 'results.md'}")
    return 0


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", help="default: the scale's (0 1; smoke: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra TrainConfig override for every run (e.g. epochs=5); recorded in results.json",
    )
    p.add_argument(
        "--sweep-seeds", choices=("first", "all"), help="sweep the k=2 model of the first or of all seeds"
    )
    p.add_argument(
        "--skip", nargs="*", default=[], choices=("k1", "ablation", "sweep", "per_image", "throughput")
    )
    p.add_argument("--publish", help="copy figures to PUBLISH/figures and write results_docs.md linking them")
    p.add_argument("--progress", action="store_true", help="tqdm progress bars")
    p.add_argument("--runs-dir", help="where the runs' checkpoints and metrics go (default OUT/runs)")
    p.add_argument(
        "--budget-s",
        type=float,
        help="skip a training run (recorded in results.json) when the elapsed time plus that run's "
        "estimated time (the longest finished run of the same model) would pass this many seconds",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="re-render results.md (and with --publish the docs copy) from OUT/results.json; trains nothing",
    )
    args = p.parse_args(argv)
    if args.render_only:
        return render_only(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="capacity rounding")
    scale = SCALES[args.scale]
    seeds = args.seeds if args.seeds is not None else scale["seeds"]
    sweep_mode = args.sweep_seeds or scale["sweep_seeds"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from vmoe.train.loop import resolve_device

    device = resolve_device(args.device)
    t_start = time.perf_counter()
    cmd = (
        " ".join(
            [
                Path(sys.executable).name if "python" in Path(sys.executable).name else sys.executable,
                *[a if " " not in a else repr(a) for a in sys.argv],
            ]
        )
        if argv is None
        else "experiments/cifar10.py " + " ".join(argv)
    )
    R: dict[str, Any] = {
        "meta": {
            "command": cmd,
            "scale": args.scale,
            "seeds": seeds,
            "extra_overrides": args.set,
            "machine": machine_info(device),
            "loadavg_start": loadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "phase_s": {},
            "status": "running",
        },
        "setup": {
            "describe": scale["describe"],
            "overrides": scale["overrides"],
            "recipes": {k: v[0] for k, v in KINDS.items()},
            "kind_overrides": {k: v[1] for k, v in KINDS.items()},
        },
        "runs": [],
    }
    figures: list[str] = []

    def save(status: str = "running") -> None:
        R["meta"]["wall_s"] = time.perf_counter() - t_start
        R["meta"]["loadavg_end"] = loadavg()
        R["meta"]["status"] = status
        R["figures"] = figures
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(R, indent=1, default=list) + "\n")
        os.replace(tmp, out / "results.json")
        (out / "results.md").write_text(render_markdown(R))

    def phase(name: str, t0: float) -> None:
        R["meta"]["phase_s"][name] = R["meta"]["phase_s"].get(name, 0.0) + time.perf_counter() - t0
        save()

    log(
        f"scale {args.scale}, seeds {seeds}, device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    trainers: dict[str, Any] = {}

    def run(kind: str, seed: int) -> None:
        t0 = time.perf_counter()
        if args.budget_s:
            same = [r["wall_s"] for r in R["runs"] if r["kind"] == kind.replace("_noaux", "")]
            est = max(same or [r["wall_s"] for r in R["runs"]] or [0.0])
            if t0 - t_start + est > args.budget_s:
                R.setdefault("skipped_runs", []).append(
                    {
                        "name": f"{kind}_s{seed}",
                        "reason": f"--budget-s {args.budget_s:.0f}: elapsed "
                        f"{t0 - t_start:.0f} s + estimated {est:.0f} s",
                    }
                )
                log(f"{kind}_s{seed}: skipped (time budget)")
                save()
                return
        rec, tr = train_one(kind, seed, args, out)
        R["runs"].append(rec)
        trainers[rec["name"]] = tr
        R["summary"] = summarize(R["runs"])
        phase("train", t0)

    # 1. main comparison.
    for seed in seeds:
        run("vit", seed)
        run("vmoe_k2", seed)
    figures.append("accuracy.png")
    plot_accuracy(R["runs"], out / "accuracy.png")

    # 2. capacity sweep.
    if "sweep" not in args.skip and f"vmoe_k2_s{seeds[0]}" in trainers:
        from vmoe.eval.evaluate import sweep

        t0 = time.perf_counter()
        names = [f"vmoe_k2_s{s}" for s in (seeds if sweep_mode == "all" else seeds[:1])]
        names = [n for n in names if n in trainers]
        per_model = {}
        for name in names:
            tr = trainers[name]
            log(f"sweep {name}: {len(CAPACITIES) * 4} settings on {len(tr.test_set)} images")
            per_model[name] = sweep(
                tr.model,
                tr.test_set,
                tr.info,
                capacities=CAPACITIES,
                ks=(1, 2),
                bpr=(False, True),
                batch_size=tr.cfg.eval_batch_size,
                device=tr.device,
                precision=tr.cfg.precision,
                progress=args.progress,
            )
        mean_rows = []
        for j, row in enumerate(per_model[names[0]]):
            mr = dict(row)
            for key in ("accuracy", "loss", "gflops_per_image", "dropped_fraction"):
                mr[key] = float(np.mean([per_model[n][j][key] for n in names]))
            mr["accuracy_values"] = [per_model[n][j]["accuracy"] for n in names]
            mr.update(_capacity_of(trainers[names[0]].model, mr["capacity_factor"], mr["num_selected"]))
            mean_rows.append(mr)
        R["sweep"] = {
            "models": names,
            "capacities": list(CAPACITIES),
            "per_model": per_model,
            "mean": mean_rows,
        }
        refs = []
        S = R["summary"]
        if "vit" in S:
            refs.append(
                {
                    "label": f"dense ViT (mean of {S['vit']['accuracy']['n']})",
                    "accuracy": S["vit"]["accuracy"]["mean"],
                    "gflops_per_image": S["vit"]["gflops_per_image"],
                    "color": "black",
                }
            )
        plot_sweep(
            mean_rows,
            refs,
            out / "sweep.png",
            f"V-MoE k=2 (trained C=1.05), test-time C x k x routing; mean of {len(names)} model(s)",
        )
        figures.append("sweep.png")
        phase("sweep", t0)

    # 3. per-image compute under BPR.
    if "per_image" not in args.skip and f"vmoe_k2_s{seeds[0]}" in trainers:
        t0 = time.perf_counter()
        name = f"vmoe_k2_s{seeds[0]}"
        R["per_image"] = per_image_compute(trainers[name].model, trainers[name], out, name)
        figures.extend(R["per_image"]["figures"])
        phase("per_image", t0)

    # 4. k=1 models.
    if "k1" not in args.skip:
        for seed in seeds:
            run("vmoe_k1", seed)
        plot_accuracy(R["runs"], out / "accuracy.png")
        if "sweep" in R and "vmoe_k1" in R["summary"]:
            s1 = R["summary"]["vmoe_k1"]
            refs.append(
                {
                    "label": "V-MoE trained k=1 (C=1.05)",
                    "accuracy": s1["accuracy"]["mean"],
                    "gflops_per_image": s1["gflops_per_image_realised"] or s1["gflops_per_image"],
                    "color": "tab:blue",
                    "marker": "P",
                }
            )
            plot_sweep(
                R["sweep"]["mean"],
                refs,
                out / "sweep.png",
                f"V-MoE k=2 (trained C=1.05), test-time C x k x routing; mean of {len(R['sweep']['models'])} model(s)",
            )
        save()

    # 5. aux-loss ablation.
    if "ablation" not in args.skip:
        seed = seeds[0]
        run("vmoe_k2_noaux", seed)
    if "ablation" not in args.skip and f"vmoe_k2_noaux_s{seeds[0]}" in trainers:
        t0 = time.perf_counter()
        ab: dict[str, Any] = {"seed": seed}
        for key, name in (("with_aux", f"vmoe_k2_s{seed}"), ("without_aux", f"vmoe_k2_noaux_s{seed}")):
            tr = trainers[name]
            rec = next(r for r in R["runs"] if r["name"] == name)
            entry = {
                "label": rec["label"],
                "run": name,
                "accuracy": rec["accuracy"],
                "routing": routing_stats(tr.model, tr.test_set, tr.info, tr.device, tr.cfg.eval_batch_size),
            }
            for b in (True, False):
                with vmoe.routing_overrides(tr.model, capacity_factor=PER_IMAGE_C, batch_priority=b):
                    ev = tr.evaluate()
                entry[f"accuracy_c0.5_{'bpr' if b else 'vanilla'}"] = ev["accuracy"]
            metrics = [
                json.loads(ln) for ln in (Path(rec["run_dir"]) / "metrics.jsonl").read_text().splitlines()
            ]
            tl = [x for x in metrics if "dropped_fraction" in x]
            entry["train_dropped_fraction_last"] = tl[-1]["dropped_fraction"] if tl else None
            entry["train_aux_loss_last"] = tl[-1]["aux_loss"] if tl else None
            ab[key] = entry
        R["ablation"] = ab
        plot_ablation(ab["with_aux"]["routing"], ab["without_aux"]["routing"], out / "ablation_load.png")
        figures.append("ablation_load.png")
        phase("ablation_eval", t0)

    # 6. throughput against timm (CUDA only).
    if "throughput" not in args.skip and args.scale != "smoke":
        t0 = time.perf_counter()
        cfg0 = make_config("vit", args.scale, seeds[0], args.device, args.set)
        try:
            R["throughput_timm"] = throughput_benchmark(cfg0, device, cfg0.batch_size)
        except Exception as e:  # never lose the run for a benchmark
            R["throughput_timm"] = {"skipped": f"failed: {type(e).__name__}: {e}"}
        phase("throughput", t0)
    else:
        R["throughput_timm"] = {
            "skipped": "--skip throughput" if "throughput" in args.skip else "smoke scale"
        }

    plot_curves(R["runs"], out / "train_loss.png")
    figures.append("train_loss.png")
    save("complete")
    if args.publish:
        publish(R, out, Path(args.publish), args.scale)
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
