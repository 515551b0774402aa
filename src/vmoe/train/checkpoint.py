"""Checkpoints: safetensors weights + JSON configs + training state, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_00000100/`` holding

    model.safetensors    the single-process state dict (all experts), loadable at any world size
    model_config.json    ``ModelConfig.to_dict()``: enough to rebuild the model
    train_config.json    the resolved :class:`TrainConfig`
    data_info.json       dataset metadata (classes, normalisation statistics)
    train_state.pt       optimizer state, step, RNG states (absent in weights-only exports)
    COMPLETE             written last

It is written into a temporary sibling directory and renamed into place, so an interrupted
write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "list_checkpoints",
    "load",
    "load_checkpoint",
    "load_model_weights",
    "resolve_checkpoint",
    "save_checkpoint",
]


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint (the message names the path)."""


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    state_dict: dict[str, torch.Tensor],
    *,
    model_config: dict[str, Any],
    train_config: dict[str, Any] | None = None,
    data_info: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` atomically and return its path.

    Older checkpoints beyond the newest ``keep`` are removed afterwards.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=root))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"step": str(step), "format": "vmoe"})
        _write_json(tmp / "model_config.json", model_config)
        if train_config is not None:
            _write_json(tmp / "train_config.json", train_config)
        if data_info is not None:
            _write_json(tmp / "data_info.json", data_info)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        (tmp / "COMPLETE").write_text(f"{step}\n")
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "COMPLETE").exists()
    ]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory from a checkpoint or a run directory (its newest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint or run directory")
    if (p / "model.safetensors").exists():
        if not (p / "COMPLETE").exists() and not (p / "model_config.json").exists():
            raise CheckpointError(f"{p}: incomplete checkpoint (no COMPLETE marker)")
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p}: no complete checkpoint found (expected {p}/checkpoints/step_*/)")
    return latest


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint (or a run's newest) into a dict.

    Keys: ``path``, ``state_dict``, ``model_config``, ``train_config`` (or None), ``data_info``
    (or None), ``train_state`` (or None), ``step``.

    Raises :class:`CheckpointError` naming the file for a missing or corrupt file, and for an
    optimizer state in ``train_state.pt`` that does not fit the model of ``model_config.json``.
    """
    ckpt = resolve_checkpoint(path)
    try:
        state = load_file(str(ckpt / "model.safetensors"), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt / 'model.safetensors'}: corrupt or unreadable weights ({e})") from None
    out: dict[str, Any] = {
        "path": ckpt,
        "state_dict": state,
        "model_config": _read_json(ckpt / "model_config.json"),
        "train_config": _read_json(ckpt / "train_config.json")
        if (ckpt / "train_config.json").exists()
        else None,
        "data_info": _read_json(ckpt / "data_info.json") if (ckpt / "data_info.json").exists() else None,
        "train_state": None,
    }
    ts = ckpt / "train_state.pt"
    if ts.exists():
        try:
            out["train_state"] = torch.load(ts, map_location=map_location, weights_only=False)
        except Exception as e:  # corrupt pickle / zip
            raise CheckpointError(f"{ts}: corrupt training state ({e})") from None
        _check_optimizer_state(ts, out["train_state"], out["model_config"])
    step_txt = (ckpt / "COMPLETE").read_text().strip() if (ckpt / "COMPLETE").exists() else ""
    out["step"] = int(step_txt) if step_txt.isdigit() else (out["train_state"] or {}).get("step", 0)
    return out


def load(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a run directory or checkpoint, with its weights, in eval mode.

    Example::

        model = vmoe.load("runs/digits")      # the newest checkpoint of the run
        logits, aux = model(images)
    """
    from vmoe.config import ModelConfig
    from vmoe.models import build_model

    ck = load_checkpoint(path, map_location=map_location)
    try:
        cfg = ModelConfig.from_dict(ck["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ck['path'] / 'model_config.json'}: invalid model config ({e})") from None
    model = build_model(cfg).to(map_location)
    load_model_weights(model, ck["state_dict"], ck["path"] / "model.safetensors")
    model.eval()
    return model


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape)


def load_model_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike[str]
) -> None:
    """``model.load_state_dict(state_dict)`` (strict), raising :class:`CheckpointError` naming
    ``path`` (the weights file) and the first offending tensors when the weights do not fit: a
    shape mismatch (expected vs found), or a missing or unexpected key."""
    expected = model.state_dict()
    mismatched = [  # in the model's order
        f"{k} expected {_shape(t)}, found {_shape(state_dict[k])}"
        for k, t in expected.items()
        if k in state_dict and _shape(state_dict[k]) != _shape(t)
    ]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if mismatched:
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        problems.append(f"shape mismatch: {'; '.join(mismatched[:3])}{more}")
    if missing:
        problems.append(f"missing {missing[:5]}" + (f" (of {len(missing)})" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(
            f"unexpected {unexpected[:5]}" + (f" (of {len(unexpected)})" if len(unexpected) > 5 else "")
        )
    if problems:
        raise CheckpointError(
            f"{os.fspath(path)}: weights do not fit the model config ({', '.join(problems)})"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # anything the checks above did not anticipate
        msg = str(e).replace("\n", " ").replace("\t", "")
        raise CheckpointError(f"{os.fspath(path)}: weights do not fit the model config ({msg})") from None


def _check_optimizer_state(ts: Path, train_state: Any, model_config: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming ``ts`` when the optimizer state in ``train_state``
    cannot be loaded into an optimizer over the model ``model_config`` describes (e.g. a
    ``train_state.pt`` copied in from another run): the checks ``Optimizer.load_state_dict`` makes
    (number of parameter groups, parameters per group), plus the shapes of per-parameter state."""
    if not isinstance(train_state, dict) or "optimizer" not in train_state:
        return  # not written by the training loop; nothing to compare
    opt = train_state["optimizer"]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    states = opt.get("state", {}) if isinstance(opt, dict) else None
    if (
        not isinstance(groups, list)
        or not isinstance(states, dict)
        or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise CheckpointError(
            f"{ts}: corrupt training state ('optimizer' must be an optimizer state dict with "
            f"'state' and 'param_groups', got {type(opt).__name__})"
        )
    try:  # the model's parameters, without allocating them
        from vmoe.config import ModelConfig
        from vmoe.models import build_model
        from vmoe.train.loop import param_groups

        with torch.device("meta"):
            model = build_model(ModelConfig.from_dict(model_config))
        names = {id(p): n for n, p in model.named_parameters()}
        want = [[(names[id(p)], _shape(p)) for p in g["params"]] for g in param_groups(model, 0.0)]
    except Exception:  # an invalid model config is reported by load(); skip the comparison
        return
    found = [len(g["params"]) for g in groups]
    expected = [len(g) for g in want]
    if found != expected:
        raise CheckpointError(
            f"{ts}: optimizer state does not fit the model in model_config.json (from another run?): "
            f"expected {len(expected)} parameter groups of {expected} parameters, found "
            f"{len(found)} of {found}"
        )
    flat = [pid for g in groups for pid in g["params"]]
    params = [x for g in want for x in g]
    for pid, (name, shape) in zip(flat, params):
        for k, v in (states.get(pid) or {}).items():
            if k != "step" and isinstance(v, torch.Tensor) and v.ndim > 0 and _shape(v) != shape:
                raise CheckpointError(
                    f"{ts}: optimizer state does not fit the model in model_config.json (from another "
                    f"run?): {k} of {name} expected {shape}, found {_shape(v)}"
                )
