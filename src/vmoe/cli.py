"""The ``vmoe`` command line: train, eval, analyze, demo (the main job), list. Nothing imports this.

Errors a user can fix (unknown model, recipe or key, a value of the wrong type, a missing path)
print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


# ----------------------------------------------------------------------------- train
def _saved_train_config(out: Path) -> Any:
    """The training config a run directory was started with (its config.json), or None."""
    from vmoe.train.config import TrainConfig

    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        return TrainConfig.from_dict(json.loads(path.read_text())["train"])
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a vmoe run config ({e})") from e


def _train_config(args: argparse.Namespace) -> Any:
    from vmoe.train.config import apply_overrides
    from vmoe.train.recipes import get_recipe

    # `--resume` without --recipe continues with the run's own settings (its config.json); flags and
    # --set change single keys of them. With --recipe, the command builds the config as it did at the
    # start (the trainer refuses a different model and logs changed settings).
    saved = _saved_train_config(Path(args.out)) if args.resume and args.recipe is None else None
    cfg = saved if saved is not None else get_recipe(args.recipe or "default")
    pairs: list[str] = []
    simple = {
        "model": args.model,
        "data": args.data,
        "epochs": args.epochs,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "seed": args.seed,
        "log_every": args.log_every,
        "checkpoint_every": args.checkpoint_every,
        "lr": args.lr,
        "device": args.device,
        "expert_parallel": args.expert_parallel,
        "eval_every": args.eval_every,
    }
    for k, v in simple.items():
        if v is not None:
            pairs.append(f"{k}={v}")
    if (
        args.data is not None
        and args.data != cfg.data
        and args.image_size is None
        and cfg.image_size is not None
    ):
        # The recipe's image size was chosen for its own data: other data keeps its native size.
        pairs.insert(0, "image_size=none")
    if args.compile:
        pairs.append("compile=true")
    if args.model is not None and args.model != cfg.model and args.num_experts is None:
        # A dense model in place of the recipe's V-MoE: drop the recipe's MoE settings, which
        # would otherwise turn the dense model into a V-MoE.
        import dataclasses

        from vmoe.config import MoEConfig, RouterConfig
        from vmoe.models.registry import get_config

        if get_config(args.model).moe is None:
            moe_keys = (
                {f.name for f in dataclasses.fields(RouterConfig)}
                | {f.name for f in dataclasses.fields(MoEConfig)}
                | {"moe_layers", "moe", "moe_dropout"}
            )
            kept = {k: v for k, v in cfg.model_overrides.items() if k not in moe_keys}
            cfg = dataclasses.replace(cfg, model_overrides=kept)
    for k, v in (("patch_size", args.patch_size), ("num_experts", args.num_experts)):
        if v is not None:
            pairs.append(f"model.{k}={v}")
    if saved is not None and args.expert_parallel is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        pairs.insert(0, "expert_parallel=1")  # the layout is the launch's, not the run's: one process here
    pairs += args.set or []
    return apply_overrides(cfg, pairs)


def _cmd_train(args: argparse.Namespace) -> int:
    import vmoe
    from vmoe.train.loop import train

    cfg = _train_config(args)
    vmoe.create_model  # noqa: B018 - fail early on a broken install
    res = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    if res.accuracy is not None and int(os.environ.get("RANK", "0")) == 0:  # one line under torchrun
        print(
            json.dumps(
                {
                    "step": res.step,
                    "loss": res.final_loss,
                    "accuracy": res.accuracy,
                    "checkpoint": str(res.checkpoint),
                }
            )
        )
    return 0


# ----------------------------------------------------------------------------- eval
def _load_for_eval(
    checkpoint: str, data: str | None, device: str, max_images: int | None = None, progress: bool = True
) -> tuple:
    from vmoe.data import DatasetInfo, load_dataset
    from vmoe.train.checkpoint import load, load_checkpoint
    from vmoe.train.loop import resolve_device

    dev = resolve_device(device)
    ck = load_checkpoint(checkpoint)
    model = load(ck["path"], map_location=dev)
    tc = ck["train_config"] or {}
    spec = data or tc.get("data")
    if spec is None:
        raise ValueError(f"{ck['path']}: no --data given and the checkpoint does not name its training data")
    image_size = model.cfg.image_hw[0]
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {max_images}")
    # The training run's split: max_train too (a synthetic dataset draws its test images after them).
    _, test, info = load_dataset(
        spec,
        image_size=image_size,
        max_train=tc.get("max_train") if spec == tc.get("data") else None,
        max_test=max_images if max_images is not None else tc.get("max_test"),
        progress=progress,
    )
    if ck["data_info"] is not None and spec == tc.get("data"):
        # Normalise with the statistics the model was trained with.
        d = ck["data_info"]
        info = DatasetInfo(
            **{
                **{k: v for k, v in d.items() if k in DatasetInfo.__dataclass_fields__},
                "mean": tuple(d["mean"]),
                "std": tuple(d["std"]),
            }
        )
    if test.channels != model.cfg.in_chans:
        raise ValueError(
            f"{spec}: images have {test.channels} channels, the model expects {model.cfg.in_chans}"
        )
    if info.num_classes > model.cfg.num_classes:
        raise ValueError(f"{spec}: {info.num_classes} classes, the model has {model.cfg.num_classes} outputs")
    return model, test, info, dev, ck


def _cmd_eval(args: argparse.Namespace) -> int:
    from vmoe.eval.evaluate import DEFAULT_CAPACITIES, evaluate, sweep
    from vmoe.eval.plots import SWEEP_COLUMNS, format_table, plot_sweep

    model, test, info, dev, ck = _load_for_eval(
        args.checkpoint, args.data, args.device, args.max_images, progress=not args.no_progress
    )
    t0 = time.perf_counter()
    res = evaluate(model, test, info, batch_size=args.batch_size, device=dev)
    result: dict[str, Any] = {
        "checkpoint": str(ck["path"]),
        "step": ck["step"],
        **res,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(
        f"accuracy {res['accuracy']:.4f}  loss {res['loss']:.4f}  on {res['num_images']} images  "
        f"({res['gflops_per_image']:.4f} GFLOPs/image)"
    )
    if args.sweep:
        caps = args.capacities or list(DEFAULT_CAPACITIES)
        rows = sweep(
            model,
            test,
            info,
            capacities=caps,
            batch_size=args.batch_size,
            device=dev,
            progress=not args.no_progress,
        )
        cols = list(SWEEP_COLUMNS)
        print(format_table(rows, cols))
        plot = (
            Path(args.plot)
            if args.plot
            else (
                Path(args.json).with_suffix(".png")
                if args.json
                else Path(ck["path"]).parent.parent / "sweep.png"
            )
        )
        plot_sweep(rows, plot, title=f"{model.cfg.name}: accuracy vs compute (test-time C, k, BPR)")
        print(f"plot: {plot}")
        result = {**result, "results": rows, "plot": str(plot)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


# ----------------------------------------------------------------------------- analyze
def _cmd_analyze(args: argparse.Namespace) -> int:
    from vmoe.eval.analyze import analyze

    model, test, info, dev, ck = _load_for_eval(args.checkpoint, args.data, args.device)
    out = Path(args.out) if args.out else Path(ck["path"]).parent.parent / "analysis"
    summary = analyze(
        model,
        test,
        info,
        out,
        capacity_factor=args.capacity,
        num_samples=args.num_samples,
        max_images=args.max_images,
        device=dev,
    )
    print(f"wrote {', '.join(summary['files'])} to {out}")
    return 0


# ----------------------------------------------------------------------------- demo (the main job)
def _cmd_demo(args: argparse.Namespace) -> int:
    from vmoe import report

    report.main_job(
        Path(args.out), recipe=args.recipe, overrides=args.set or [], progress=not args.no_progress
    )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    import vmoe
    from vmoe.train.recipes import list_recipes

    print("models: " + ", ".join(vmoe.list_models()))
    print("recipes: " + ", ".join(list_recipes()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vmoe", description="Sparse Vision Mixture-of-Experts (V-MoE) in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (a named recipe, overridden by flags)")
    t.add_argument(
        "--recipe", help="named recipe (see `vmoe list`; default: default, or the run's own with --resume)"
    )
    t.add_argument("--model", help="registered model name, e.g. vmoe_ti, vit_ti")
    t.add_argument("--data", help="built-in dataset (digits, cifar10, synthetic) or a path")
    t.add_argument("--out", required=True, help="run directory")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float)
    g.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--image-size", type=int)
    t.add_argument("--patch-size", type=int)
    t.add_argument("--num-experts", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--log-every", type=int)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--expert-parallel", type=int, help="expert-parallel size (under torchrun)")
    t.add_argument(
        "--set", nargs="*", metavar="KEY=VALUE", help="override config keys; model.KEY=VALUE for the model"
    )
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint; --sweep for the capacity x k x BPR sweep")
    e.add_argument("--checkpoint", required=True, help="run directory (its newest checkpoint) or checkpoint")
    e.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    e.add_argument("--sweep", action="store_true")
    e.add_argument("--capacities", type=float, nargs="+")
    e.add_argument("--json", help="write the results here")
    e.add_argument("--plot", help="sweep plot path (default: next to --json, or in the run directory)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--max-images", type=int)
    e.add_argument("--device", default="auto")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_eval)

    a = sub.add_parser("analyze", help="routing pictures: patch->expert maps, BPR masks, expert x class")
    a.add_argument("--checkpoint", required=True)
    a.add_argument("--data")
    a.add_argument("--out", help="output directory (default: RUN/analysis)")
    a.add_argument("--capacity", type=float, default=0.5, help="test-time capacity factor for the BPR masks")
    a.add_argument("--num-samples", type=int, default=8)
    a.add_argument("--max-images", type=int, default=2000)
    a.add_argument("--device", default="auto")
    a.set_defaults(func=_cmd_analyze)

    d = sub.add_parser("demo", help="the main job: train on built-in data, sweep, analyze, write a report")
    d.add_argument("--out", default="report")
    d.add_argument("--recipe", default="default")
    d.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_demo)

    sub.add_parser("list", help="list models and recipes").set_defaults(func=_cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vmoe.train.checkpoint import CheckpointError
    from vmoe.train.loop import TrainingInterrupted

    try:
        return int(args.func(args))
    except TrainingInterrupted as e:
        hint = (
            f"; resume with `vmoe train --out {e.path.parent.parent} --resume`"
            if args.command == "train"
            else "; the demo always starts afresh: run it again"
        )
        print(f"vmoe: {e}{hint}", file=sys.stderr)
        return 128 + e.signum
    except (ValueError, FileNotFoundError, CheckpointError, NotADirectoryError, IsADirectoryError) as e:
        if os.environ.get("VMOE_TRACEBACK"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"vmoe: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vmoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
