"""Training throughput (images/s) of V-MoE models against a dense ViT of similar FLOPs, same run.

    python benchmarks/train_throughput.py --device cpu --json out.json
    PYTHONPATH=src python benchmarks/train_throughput.py --device cuda --json $OUT/train_throughput.json

One optimizer step = forward + backward + AdamW on random images and labels (the data pipeline
is not timed). Rows: our models (``vmoe_*`` and the dense ``vit_*`` of the same family), and timm's
ViT when timm is importable (the reference implementation of dense ViT). The goal of the
performance issue: V-MoE images/s >= 0.85 x (dense ViT images/s x FLOPs(ViT) / FLOPs(V-MoE)),
i.e. the MoE model converts FLOPs into throughput at least 85% as well as the dense one.

Defaults: CUDA — ViT-B/16 vs V-MoE-B/16 (every 2, k=2, C=1.05, E=8 and E=32), 224px, batch 256,
bf16 autocast; CPU — ViT-Ti/4 vs V-MoE-Ti/4 (E=8), 32px, batch 64, fp32.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import vmoe
from vmoe.models.flops import flops_per_image
from vmoe.train.loop import adamw


def _timm_model(name: str, image_size: int, num_classes: int, **kw: Any) -> Any:
    try:
        import timm
    except Exception:
        return None
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=image_size, **kw)
    except Exception as e:  # pragma: no cover - depends on timm version
        print(f"timm {name} unavailable: {e}", file=sys.stderr)
        return None


def _timm_kwargs(name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """timm ViT overrides that give the architecture of our dense model ``name`` (depth, width,
    heads, MLP ratio, patch): timm's ``vit_tiny`` has 12 blocks, our ``vit_ti`` 6, for example."""
    from vmoe.models import get_config

    cfg = get_config(name, **kw)
    return {
        "depth": cfg.num_layers,
        "embed_dim": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_dim / cfg.hidden_size,
        "patch_size": cfg.patch_size,
    }


def _step_fn(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: Any
) -> Any:
    def step() -> None:
        with amp():
            out = model(x)
            logits, aux = out if isinstance(out, tuple) else (out, None)
            loss = F.cross_entropy(logits.float(), y)
            if aux is not None:
                loss = loss + aux["aux_loss"].float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_steps(step: Any, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--small", action="store_true", help="tiny shapes (to check the script itself)")
    p.add_argument(
        "--impls",
        default="",
        help="comma-separated experts implementations (bmm, loop, packed, grouped_mm) to time as extra "
        "rows of every V-MoE model, next to the default (auto)",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    torch.backends.cuda.matmul.allow_tf32 = True

    if cuda and not args.small:
        image, batch, classes = 224, args.batch_size or 256, 1000
        ours = [
            ("vit_b16", {}),
            ("vmoe_b16", {"num_experts": 8, "representation_size": None}),
            ("vmoe_b16", {"num_experts": 32, "representation_size": None}),
        ]
        timm_name = "vit_base_patch16_224"
    else:
        image, batch, classes = (
            (16, args.batch_size or 8, 10) if args.small else (32, args.batch_size or 64, 10)
        )
        small = {"num_layers": 2, "hidden_size": 64, "mlp_dim": 128, "num_heads": 2} if args.small else {}
        ours = [
            ("vit_ti", {"patch_size": 4, **small}),
            ("vmoe_ti", {"patch_size": 4, "num_experts": 8, **small}),
            ("vmoe_ti", {"patch_size": 4, "num_experts": 32, **small}),
        ]
        timm_name = "vit_tiny_patch16_224"

    impls = [i for i in args.impls.split(",") if i]
    extra = [
        (name, {**kw, "experts_impl": impl}) for impl in impls for name, kw in ours if "num_experts" in kw
    ]
    cfg = {
        "image_size": image,
        "batch_size": batch,
        "num_classes": classes,
        "device": str(device),
        "dtype": "bf16 autocast" if cuda else "fp32",
        "torch": torch.__version__,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "impls": impls,
    }
    rows: list[dict[str, Any]] = []

    def run(name: str, kw: dict[str, Any]) -> None:
        torch.manual_seed(0)
        label = name if "num_experts" not in kw else f"{name}_e{kw['num_experts']}"
        label += f"[{kw['experts_impl']}]" if "experts_impl" in kw else ""
        try:
            with torch.device(device):  # parameters made and initialised on the device
                model = vmoe.create_model(name, image_size=image, num_classes=classes, **kw)
            rows.append(
                _bench(label, model, flops_per_image(model), device, batch, image, classes, amp, args)
            )
        except Exception as exc:  # an extra row that fails is reported, the others still run
            if "experts_impl" not in kw:
                raise
            print(f"{label} left out: {exc!r}", file=sys.stderr)
        model = None
        if cuda:
            torch.cuda.empty_cache()
        _report(rows, cfg, args.json)  # after every row: a run cut short keeps what it measured

    for name, kw in ours:
        run(name, kw)
    if not args.small:  # the reference right after our default rows, before the extra implementations
        tm = _timm_model(timm_name, image, classes, **_timm_kwargs(*ours[0]))
        if tm is not None:  # the architecture of our dense row, so the same FLOPs
            ref = next(r for r in rows if r["name"].startswith("vit_"))
            gflops = ref["gflops_per_image"] * 1e9
            rows.append(
                _bench(f"timm_{timm_name}", tm.to(device), gflops, device, batch, image, classes, amp, args)
            )
            tm = None
            if cuda:
                torch.cuda.empty_cache()
            _report(rows, cfg, args.json)
    for name, kw in extra:
        run(name, kw)
    print(f"train throughput, {cfg['dtype']}, batch {batch}, {image}px, torch {torch.__version__}, {device}")
    print(f"{'name':32s} {'img/s':>10s} {'GFLOP/img':>10s} {'eff. vs dense':>14s} {'peak MiB':>10s}")
    for r in rows:
        print(
            f"{r['name']:32s} {r['images_per_s']:10.1f} {r['gflops_per_image']:10.3f} "
            f"{r['efficiency_vs_dense']:14.3f} {r.get('peak_mib') or 0:10.0f}"
        )
    return 0


def _report(rows: list[dict[str, Any]], cfg: dict[str, Any], path: str | None) -> None:
    """Efficiency of every row against the dense reference (timm's when measured), and the JSON file."""
    dense = next((r for r in rows if r["name"].startswith("vit_")), None)
    if dense is None:
        return
    dense_ref = next((r for r in rows if r["name"].startswith("timm_")), dense)
    for r in rows:
        flop_ratio = dense_ref["gflops_per_image"] / r["gflops_per_image"]
        r["target_images_per_s"] = dense_ref["images_per_s"] * flop_ratio
        r["efficiency_vs_dense"] = r["images_per_s"] / r["target_images_per_s"]
    cfg["reference"] = dense_ref["name"]
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps({"device": cfg["device"], "config": cfg, "results": rows}, indent=1))
        tmp.replace(path)


def _bench(
    label: str,
    model: torch.nn.Module,
    flops: float,
    device: torch.device,
    batch: int,
    image: int,
    classes: int,
    amp: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    model.train()
    fwd = torch.compile(model) if args.compile else model
    # vmoe train's AdamW (fused where torch has the kernel), for our models and timm's alike.
    opt = adamw([{"params": list(model.parameters())}], lr=1e-4)
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(_step_fn(fwd, opt, x, y, amp), device, args.warmup, args.repeats)
    med = statistics.median(times)
    row = {
        "name": label,
        "images_per_s": batch / med,
        "step_ms": med * 1e3,
        "gflops_per_image": flops / 1e9,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


if __name__ == "__main__":
    raise SystemExit(main())
