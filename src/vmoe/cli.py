"""The ``vmoe`` command line: train, eval, analyze, demo (the main job), list. Nothing imports this.

Errors a user can fix (unknown model, recipe or key, a value of the wrong type, a missing path)
print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _note(msg: str) -> None:
    """A note on stderr (once under torchrun: rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"vmoe: {msg}", file=sys.stderr, flush=True)


def _check_device(name: str) -> None:
    """ValueError for a device string torch does not parse (``foo``, ``cuda:x``)."""
    if name == "auto":
        return
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {name!r} (expected auto, cpu, cuda, cuda:N, mps, ...)") from None


def _check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> None:
    """ValueError when an output directory path names an existing file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p}: exists and is not a directory")


def _absolute_data(spec: str) -> str:
    """``spec`` as an absolute path when it names an existing file or directory (not a built-in name),
    so a run's config still finds its data from another working directory."""
    from vmoe.data import BUILTIN_DATASETS

    if spec in BUILTIN_DATASETS:
        return spec
    p = Path(spec).expanduser()
    return str(p.absolute()) if p.exists() else spec


def _same_data(spec: str, stored: Any) -> bool:
    """Whether the data ``spec`` is the one a run was trained on (``stored``, from its config)."""
    if not isinstance(stored, str):
        return False
    if spec == stored:
        return True
    a, b = Path(spec).expanduser(), Path(stored).expanduser()
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


# Model overrides that follow the data (the trainer fills them from it), kept with another --model.
_DATA_BOUND_KEYS = ("image_size", "num_classes", "in_chans")
# The backbone of a registered model: two models that agree on these are the same size.
_BACKBONE_KEYS = ("num_layers", "hidden_size", "mlp_dim", "num_heads", "patch_size")


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


def _overrides_for_model(cfg: Any, model: str, *, keep_moe: bool) -> Any:
    """``cfg`` with the recipe's model overrides fitted to another registered ``model``.

    The recipe sized its overrides for its own model. When ``model`` has the same backbone (e.g.
    ``vit_ti`` for the recipe's ``vmoe_ti``: its dense counterpart), the size settings carry over
    and only the MoE settings are dropped for a dense model (unless ``keep_moe``: --num-experts asks
    for MoE layers). For any other model all of them are dropped except the data-bound ones
    (image_size, num_classes, in_chans), so ``--model vit_b16`` is a ViT-B/16; ``--set model.KEY=``
    still applies. What is dropped is logged.
    """
    import dataclasses

    from vmoe.config import MoEConfig, RouterConfig
    from vmoe.models.registry import get_config

    new = get_config(model)  # an unknown name raises here, listing close ones
    try:
        old = get_config(cfg.model)
    except ValueError:
        old = None
    same_backbone = old is not None and all(getattr(old, k) == getattr(new, k) for k in _BACKBONE_KEYS)
    overrides = dict(cfg.model_overrides)
    if same_backbone:
        if new.moe is not None or keep_moe:
            return cfg
        moe_keys = (
            {f.name for f in dataclasses.fields(RouterConfig)}
            | {f.name for f in dataclasses.fields(MoEConfig)}
            | {"moe_layers", "moe", "moe_dropout"}
        )
        # A dense model in place of the recipe's V-MoE: the MoE settings would make it a V-MoE.
        dropped = sorted(k for k in overrides if k in moe_keys)
        why = f"{model} is dense"
    else:
        dropped = sorted(k for k in overrides if k not in _DATA_BOUND_KEYS)
        why = f"they were set for {cfg.model}, not {model}"
    if dropped:
        _note(
            f"--model {model}: not applying the recipe's model settings "
            + ", ".join(f"{k}={overrides[k]!r}" for k in dropped)
            + f" ({why}); set any of them with --set model.KEY=VALUE"
        )
    kept = {k: v for k, v in overrides.items() if k not in dropped}
    return dataclasses.replace(cfg, model_overrides=kept)


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
        and not _same_data(args.data, cfg.data)
        and args.image_size is None
        and cfg.image_size is not None
    ):
        # The recipe's image size was chosen for its own data: other data keeps its native size.
        pairs.insert(0, "image_size=none")
    if args.compile:
        pairs.append("compile=true")
    if args.model is not None and args.model != cfg.model and cfg.model_overrides:
        cfg = _overrides_for_model(cfg, args.model, keep_moe=args.num_experts is not None)
    for k, v in (("patch_size", args.patch_size), ("num_experts", args.num_experts)):
        if v is not None:
            pairs.append(f"model.{k}={v}")
    if saved is not None and args.expert_parallel is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        pairs.insert(0, "expert_parallel=1")  # the layout is the launch's, not the run's: one process here
    pairs += args.set or []
    cfg = apply_overrides(cfg, pairs)
    data = _absolute_data(cfg.data)
    if data != cfg.data and (saved is None or args.data is not None or cfg.data != saved.data):
        # Given on this command line (not a resumed run's own setting): stored absolute, so that
        # `vmoe eval --checkpoint RUN` and --resume find the data from any directory.
        import dataclasses

        cfg = dataclasses.replace(cfg, data=data)
    return cfg


def _destroy_process_group() -> None:
    """After a finished run under torchrun: destroy the process groups before the interpreter exits
    (left to its teardown, gloo's threads aborted a finished rank once in CI: "terminate called
    without an active exception"). Only on success: on an error the exception has the floor."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _cmd_train(args: argparse.Namespace) -> int:
    import vmoe
    from vmoe.train.loop import train

    _check_out_dir(args.out)
    cfg = _train_config(args)
    _check_device(cfg.device)
    vmoe.create_model  # noqa: B018 - fail early on a broken install
    res = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    _destroy_process_group()
    if res.accuracy is not None and int(os.environ.get("RANK", "0")) == 0:  # one line under torchrun
        print(
            json.dumps(
                {
                    "step": res.step,
                    "loss": None if math.isnan(res.final_loss) else res.final_loss,  # strict JSON: no NaN
                    "accuracy": res.accuracy,
                    "checkpoint": str(res.checkpoint),
                }
            )
        )
    return 0


# ----------------------------------------------------------------------------- eval
def _checkpoint_json(ck: dict[str, Any], key: str, filename: str) -> dict[str, Any] | None:
    """A checkpoint's JSON file as a dict (None when absent); CheckpointError naming the file otherwise."""
    from vmoe.train.checkpoint import CheckpointError

    value = ck[key]
    if value is not None and not isinstance(value, dict):
        raise CheckpointError(
            f"{Path(ck['path']) / filename}: expected a JSON object, got {type(value).__name__}"
        )
    return value


def _class_names(classes: Any) -> list[str] | None:
    if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    return None


def _map_classes(test: Any, info: Any, trained: list[str], spec: str) -> tuple[Any, Any]:
    """Relabel ``test`` by class name onto the checkpoint's classes ``trained``.

    A dataset's labels index its own class list (an image folder's sorted sub-directories), so data
    missing a class, or listing them in another order, would otherwise be scored against the wrong
    outputs. Classes the model was not trained on are refused. Data whose classes are only numbers
    ``0..n-1`` (an ``.npz`` without names), or a model trained on such data, keeps the labels as they
    are when the names do not match: there are no names to go by.
    """
    import dataclasses

    import numpy as np

    from vmoe.data import ImageDataset

    own = list(test.classes)
    if own == trained:
        return test, info
    index = {c: i for i, c in enumerate(trained)}
    unknown = [c for c in own if c not in index]
    if unknown:

        def anonymous(names: list[str]) -> bool:
            return names == [str(i) for i in range(len(names))]

        if anonymous(own) or anonymous(trained):
            return test, info
        shown = ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise ValueError(
            f"{spec}: classes the model was not trained on: {shown} "
            f"(it knows {len(trained)}: {', '.join(trained[:10])}{', ...' if len(trained) > 10 else ''})"
        )
    lut = np.array([index[c] for c in own], dtype=np.int64)
    test = ImageDataset(test.images, lut[test.labels], list(trained))
    info = dataclasses.replace(info, classes=list(trained), num_classes=len(trained))
    return test, info


def _load_for_eval(
    checkpoint: str, data: str | None, device: str, max_images: int | None = None, progress: bool = True
) -> tuple:
    from vmoe.data import DatasetInfo, load_dataset
    from vmoe.train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
    from vmoe.train.loop import resolve_device

    _check_device(device)
    dev = resolve_device(device)
    ck = load_checkpoint(checkpoint, train_state=False)  # the weights and configs, read once
    tc = _checkpoint_json(ck, "train_config", "train_config.json") or {}
    d = _checkpoint_json(ck, "data_info", "data_info.json")
    model = model_from_checkpoint(ck, dev)
    stored = tc.get("data")
    spec = data or stored
    if spec is None:
        raise ValueError(f"{ck['path']}: no --data given and the checkpoint does not name its training data")
    if not isinstance(spec, str):
        raise CheckpointError(f"{Path(ck['path']) / 'train_config.json'}: 'data' is not a string: {spec!r}")
    same = _same_data(spec, stored)
    image_size = model.cfg.image_hw[0]
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {max_images}")
    # The training run's split: max_train too (a synthetic dataset draws its test images after them).
    _, test, info = load_dataset(
        spec,
        image_size=image_size,
        max_train=tc.get("max_train") if same else None,
        max_test=max_images if max_images is not None else tc.get("max_test"),
        progress=progress,
    )
    if d is not None and same:
        # Normalise with the statistics the model was trained with.
        try:
            info = DatasetInfo(
                **{
                    **{k: v for k, v in d.items() if k in DatasetInfo.__dataclass_fields__},
                    "mean": tuple(float(v) for v in d["mean"]),
                    "std": tuple(float(v) for v in d["std"]),
                }
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{Path(ck['path']) / 'data_info.json'}: invalid data info ({type(e).__name__}: {e})"
            ) from None
    if test.channels != model.cfg.in_chans:
        raise ValueError(
            f"{spec}: images have {test.channels} channels, the model expects {model.cfg.in_chans}"
        )
    trained = _class_names(d.get("classes")) if d is not None else None
    if trained is not None and len(trained) == model.cfg.num_classes and _class_names(test.classes):
        test, info = _map_classes(test, info, trained, spec)
    if info.num_classes > model.cfg.num_classes:
        raise ValueError(f"{spec}: {info.num_classes} classes, the model has {model.cfg.num_classes} outputs")
    # Loaded: which checkpoint (after every check, so that an error stays one line).
    _note_skipped_checkpoints(Path(checkpoint), Path(ck["path"]))
    _note(f"checkpoint {ck['path']} (step {ck['step']})")
    return model, test, info, dev, ck


def _note_skipped_checkpoints(given: Path, chosen: Path) -> None:
    """Say so when a run directory's newest checkpoint directory was passed over (incomplete: an
    interrupted save), so nobody mistakes an older checkpoint's numbers for the newest's."""
    if chosen.parent != given / "checkpoints":
        return
    newer = sorted(
        p.name
        for p in chosen.parent.iterdir()
        if p.is_dir()
        and p.name.startswith("step_")
        and p.name > chosen.name
        and not (p / "COMPLETE").exists()
    )
    if newer:
        _note(f"{', '.join(newer)} in {chosen.parent} incomplete (no COMPLETE marker): using {chosen.name}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from vmoe.eval.evaluate import DEFAULT_CAPACITIES, evaluate, sweep
    from vmoe.eval.plots import SWEEP_COLUMNS, format_table, plot_sweep

    if not args.sweep:
        given = [f for f, v in (("--capacities", args.capacities), ("--plot", args.plot)) if v is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --sweep"
            )
    bad = [c for c in args.capacities or [] if not (c > 0 and c != float("inf"))]
    if bad:
        raise ValueError(f"--capacities must be numbers > 0, got {', '.join(map(str, bad))}")
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

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.out:
        _check_out_dir(args.out)  # before the (slow) loading
    model, test, info, dev, ck = _load_for_eval(args.checkpoint, args.data, args.device)
    out = Path(args.out) if args.out else Path(ck["path"]).parent.parent / "analysis"
    if not args.out:
        _check_out_dir(out)
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

    _check_out_dir(args.out)
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


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help with "(default: X)" after options that have a default worth saying (not None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from vmoe.eval.evaluate import DEFAULT_CAPACITIES

    p = _Parser(prog="vmoe", description="Sparse Vision Mixture-of-Experts (V-MoE) in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fmt = {"formatter_class": _DefaultsFormatter}

    t = sub.add_parser("train", help="train a model (a named recipe, overridden by flags)", **fmt)
    t.add_argument(
        "--recipe", help="named recipe (see `vmoe list`; default: default, or the run's own with --resume)"
    )
    t.add_argument("--model", help="registered model name, e.g. vmoe_ti, vit_ti")
    t.add_argument("--data", help="built-in dataset (digits, cifar10, synthetic) or a path")
    t.add_argument("--out", required=True, help="run directory")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, help="passes over the training set (the recipe's if not given)")
    g.add_argument("--steps", type=int, help="optimizer steps, instead of --epochs")
    t.add_argument("--batch-size", type=int, help="global batch per optimizer step")
    t.add_argument("--image-size", type=int, help="resize images to this side at load time")
    t.add_argument("--patch-size", type=int, help="ViT patch size (model.patch_size)")
    t.add_argument("--num-experts", type=int, help="experts per MoE layer (model.num_experts)")
    t.add_argument("--lr", type=float, help="peak learning rate (AdamW, warmup then cosine)")
    t.add_argument(
        "--seed", type=int, help="seed of initialisation, data order, augmentation and routing noise"
    )
    t.add_argument("--log-every", type=int, help="steps between log lines")
    t.add_argument("--eval-every", type=int, help="steps between test evaluations (0: at the end only)")
    t.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: at the end only)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--expert-parallel", type=int, help="expert-parallel size (under torchrun)")
    t.add_argument(
        "--set",
        nargs="*",
        action="extend",
        metavar="KEY=VALUE",
        help="override config keys; model.KEY=VALUE for the model (repeatable)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint; --sweep for the capacity x k x BPR sweep", **fmt)
    e.add_argument("--checkpoint", required=True, help="run directory (its newest checkpoint) or checkpoint")
    e.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    e.add_argument(
        "--sweep",
        action="store_true",
        help="also sweep test-time capacity C x k x {vanilla, BPR}: table and plot",
    )
    e.add_argument(
        "--capacities",
        type=float,
        nargs="+",
        help="test-time capacity factors (with --sweep; default: "
        + ", ".join(f"{c:g}" for c in DEFAULT_CAPACITIES)
        + ")",
    )
    e.add_argument("--json", help="write the results here")
    e.add_argument("--plot", help="sweep plot path (default: next to --json, or in the run directory)")
    e.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    e.add_argument(
        "--max-images", type=int, help="evaluate on a seeded subset of at most this many test images"
    )
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_eval)

    a = sub.add_parser(
        "analyze", help="routing pictures: patch->expert maps, BPR masks, expert x class", **fmt
    )
    a.add_argument("--checkpoint", required=True, help="run directory (its newest checkpoint) or checkpoint")
    a.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    a.add_argument("--out", help="output directory (default: RUN/analysis)")
    a.add_argument("--capacity", type=float, default=0.5, help="test-time capacity factor for the BPR masks")
    a.add_argument("--num-samples", type=int, default=8, help="test images drawn with their routing maps")
    a.add_argument(
        "--max-images", type=int, default=2000, help="test images for the expert x class statistics"
    )
    a.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    a.set_defaults(func=_cmd_analyze)

    d = sub.add_parser(
        "demo", help="the main job: train on built-in data, sweep, analyze, write a report", **fmt
    )
    d.add_argument("--out", default="report", help="report directory (README.md, plots, the run)")
    d.add_argument("--recipe", default="default", help="training recipe (see `vmoe list`)")
    d.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE", help="as for train (repeatable)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    except (
        ValueError,
        FileNotFoundError,
        CheckpointError,
        NotADirectoryError,
        IsADirectoryError,
        FileExistsError,
    ) as e:
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
