"""The main job: train a V-MoE on built-in data, sweep test-time routing, look inside, write a report."""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["main_job", "reproduce_command"]


def reproduce_command(out: Path | str, recipe: str = "default", overrides: list[str] | None = None) -> str:
    """The ``vmoe demo`` command line that reruns a job: its --out, --recipe and --set arguments."""
    import shlex

    argv = ["vmoe", "demo", "--out", str(out), "--recipe", recipe]
    if overrides:
        argv += ["--set", *overrides]
    return shlex.join(argv)


def main_job(
    out: Path, *, recipe: str = "default", overrides: list[str] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train ``recipe`` into ``out/run``, run the capacity sweep and the routing analysis, and write
    ``out/README.md`` (numbers, the sweep plot, routing pictures). Returns the numbers."""
    import vmoe
    from vmoe.eval.analyze import analyze
    from vmoe.eval.evaluate import sweep
    from vmoe.eval.plots import SWEEP_COLUMNS, format_table, plot_sweep
    from vmoe.train.config import apply_overrides
    from vmoe.train.loop import Trainer
    from vmoe.train.recipes import get_recipe

    t0 = time.perf_counter()
    cfg = apply_overrides(get_recipe(recipe), overrides or [])
    out = Path(out)
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)  # the demo always starts from scratch
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[vmoe demo] {msg}", file=sys.stderr, flush=True)

    log(f"1/3 training {cfg.model} on {cfg.data} (recipe {recipe!r}) into {run}")
    trainer = Trainer(cfg, run, progress=progress)
    res = trainer.fit()
    t_train = time.perf_counter() - t0
    model, test, info, device = trainer.model, trainer.test_set, trainer.info, trainer.device
    params = sum(p.numel() for p in model.parameters())

    log("2/3 capacity sweep: C x k x {vanilla, BPR} at test time")
    rows = sweep(model, test, info, batch_size=cfg.eval_batch_size, device=device, progress=progress)
    (out / "sweep.json").write_text(json.dumps({"results": rows}, indent=1) + "\n")
    plot_sweep(rows, out / "sweep.png", title=f"{cfg.model} on {info.name}: accuracy vs compute at test time")

    log("3/3 routing analysis")
    analysis = analyze(model, test, info, out / "analysis", capacity_factor=0.5, device=device)
    elapsed = time.perf_counter() - t0

    def acc(c: float, k: int, b: bool) -> float:
        return next(
            r["accuracy"]
            for r in rows
            if r["capacity_factor"] == c and r["num_selected"] == k and r["batch_priority"] == b
        )

    ks = sorted({r["num_selected"] for r in rows})
    low = [c for c in sorted({r["capacity_factor"] for r in rows}) if c < 1.0]
    chance = 1.0 / info.num_classes
    compare = [
        {
            "capacity_factor": c,
            "k": k,
            "vanilla": acc(c, k, False),
            "BPR": acc(c, k, True),
            "BPR - vanilla": acc(c, k, True) - acc(c, k, False),
        }
        for k in ks
        for c in low
    ]
    summary = {
        "recipe": recipe,
        "model": cfg.model,
        "data": info.name,
        "params": params,
        "test_accuracy": res.accuracy,
        "chance": chance,
        "train_seconds": round(t_train, 1),
        "total_seconds": round(elapsed, 1),
        "steps": res.step,
        "bpr_minus_vanilla_below_c1": {
            f"k{r['k']}_c{r['capacity_factor']}": round(r["BPR - vanilla"], 4) for r in compare
        },
        "torch": torch.__version__,
        "device": str(device),
        "machine": platform.machine(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    cols = list(SWEEP_COLUMNS)
    md = [
        f"# vmoe main job: {cfg.model} on {info.name}",
        "",
        f"- data: {info.name} ({info.source}; {info.license}); {len(trainer.train_set)} train / {len(test)} test "
        f"images, {info.image_size}x{info.image_size}x{info.channels} as trained"
        f"{f' (the recipe sets image_size={cfg.image_size})' if cfg.image_size else ''}, "
        f"{info.num_classes} classes",
        f"- model: `{cfg.model}` with {json.dumps(cfg.model_overrides)}; {params / 1e6:.3f}M parameters; "
        f"MoE blocks {[i for i, _ in model.moe_layers()]}",
        f"- training: {res.step} steps of {cfg.batch_size} images, AdamW lr {cfg.lr}, {cfg.schedule} schedule, "
        f"BPR off (as in the paper); {t_train:.0f} s on {device} (torch {torch.__version__})",
        f"- **held-out test accuracy: {res.accuracy:.4f}** (chance {chance:.2f}) at the training capacity "
        f"C={model.moe_layers()[0][1].cfg.router.capacity_factor}",
        f"- whole job: {elapsed:.0f} s. Reproduce: `{reproduce_command(out, recipe, overrides)}`",
        "",
        "## Test-time compute: capacity factor C, k, and batch-prioritized routing",
        "",
        "![accuracy vs GFLOPs](sweep.png)",
        "",
        "Below C = 1, vanilla routing fills expert buffers in patch order and drops whatever comes last;",
        "BPR fills them by router confidence and drops the least confident patches first.",
        "",
        format_table(compare, ["capacity_factor", "k", "vanilla", "BPR", "BPR - vanilla"], markdown=True),
        "",
        "<details><summary>all sweep rows</summary>",
        "",
        format_table(rows, cols, markdown=True),
        "",
        "</details>",
        "",
        "## Where the patches go",
        "",
        "![routing examples](analysis/routing_examples.png)",
        "",
        "![expert load](analysis/expert_load.png)",
        "",
    ]
    md += [f"![expert x class](analysis/{f})" for f in analysis["files"] if f.startswith("expert_class")]
    md += [
        "",
        "Training curve: `run/metrics.jsonl`; checkpoint: `run/checkpoints/`; "
        "load it with `vmoe.load('" + str(run) + "')`.",
        "",
    ]
    (out / "README.md").write_text("\n".join(md))
    log(f"done in {elapsed:.0f} s: test accuracy {res.accuracy:.4f}; report {out / 'README.md'}")
    print(json.dumps(summary))
    _ = vmoe  # the package is imported for its registry
    return summary
