"""Checkpoints: safetensors weights + JSON configs + training state, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_00000100/`` holding

    model.safetensors    the single-process state dict (all experts), loadable at any world size
    model_config.json    ``ModelConfig.to_dict()``: enough to rebuild the model
    train_config.json    the resolved :class:`TrainConfig`
    data_info.json       dataset metadata (classes, normalisation statistics)
    train_state.pt       optimizer state, step, RNG states (absent in weights-only exports)
    SHA256SUMS           checksums of the two binary files (``sha256sum -c SHA256SUMS`` checks them)
    COMPLETE             written last

Loading verifies the checksums (when the file is there; older checkpoints have none), so a
damaged file is an error naming it rather than silently wrong weights.

It is written into a temporary sibling directory and renamed into place, so an interrupted
write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import hashlib
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
    "load_optimizer_state",
    "model_from_checkpoint",
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

    Older checkpoints beyond the newest ``keep`` are removed afterwards, and so are the partial
    ``.step_*`` folders a process killed mid-save left behind.
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
        sums = [f"{_sha256(tmp / n)}  {n}\n" for n in _SUMMED if (tmp / n).exists()]
        (tmp / _SUMS).write_text("".join(sums))
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
    for stale in root.glob(".step_*"):  # partial writes of a process killed mid-save (SIGKILL, power)
        shutil.rmtree(stale, ignore_errors=True)
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


_SUMS = "SHA256SUMS"
_SUMMED = ("model.safetensors", "train_state.pt")  # the binary files (JSON damage is caught by parsing)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _verify(ckpt: Path, name: str) -> None:
    """CheckpointError when ``ckpt/name`` does not match its recorded SHA-256 (if one is recorded)."""
    sums = ckpt / _SUMS
    if not sums.exists():
        return
    for line in sums.read_text().splitlines():
        digest, _, listed = line.partition("  ")
        if listed == name:
            found = _sha256(ckpt / name)
            if found != digest:
                raise CheckpointError(
                    f"{ckpt / name}: checksum mismatch, the file changed after it was written (damaged or "
                    f"replaced): SHA-256 {found[:16]}..., recorded {digest[:16]}... in {sums}"
                )
            return


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", train_state: bool = True
) -> dict[str, Any]:
    """Read a checkpoint (or a run's newest) into a dict.

    Keys: ``path``, ``state_dict``, ``model_config``, ``train_config`` (or None), ``data_info``
    (or None), ``train_state`` (or None; not read with ``train_state=False``: evaluation needs
    the weights only), ``step``.

    Raises :class:`CheckpointError` naming the file for a missing or corrupt file.
    """
    ckpt = resolve_checkpoint(path)
    _verify(ckpt, "model.safetensors")
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
    if train_state and ts.exists():
        _verify(ckpt, ts.name)
        try:
            out["train_state"] = torch.load(ts, map_location=map_location, weights_only=False)
        except Exception as e:  # corrupt pickle / zip
            raise CheckpointError(f"{ts}: corrupt training state ({e})") from None
    step_txt = (ckpt / "COMPLETE").read_text().strip() if (ckpt / "COMPLETE").exists() else ""
    out["step"] = int(step_txt) if step_txt.isdigit() else (out["train_state"] or {}).get("step", 0)
    return out


def load(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a run directory or checkpoint, with its weights, in eval mode.

    Example::

        model = vmoe.load("runs/digits")      # the newest checkpoint of the run
        logits, aux = model(images)
    """
    return model_from_checkpoint(
        load_checkpoint(path, map_location=map_location, train_state=False), map_location
    )


def model_from_checkpoint(ck: dict[str, Any], map_location: str | torch.device = "cpu") -> nn.Module:
    """The model of a checkpoint already read by :func:`load_checkpoint`, with its weights, in eval mode."""
    from vmoe.config import ModelConfig
    from vmoe.models import build_model

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


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, path: str | os.PathLike[str]) -> None:
    """``optimizer.load_state_dict(state)``, raising :class:`CheckpointError` naming ``path`` (the
    ``train_state.pt`` it came from) when the state does not fit the optimizer's parameters (e.g. a
    file copied in from another run): torch's own checks (groups, parameters per group), plus the
    shape of every per-parameter tensor, which torch does not check."""
    where = f"{os.fspath(path)}: optimizer state does not fit the model (from another run?)"
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    names = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            names[p] = len(names)
    for p, i in names.items():
        for k, v in optimizer.state.get(p, {}).items():
            if k != "step" and isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape != p.shape:
                raise CheckpointError(
                    f"{where}: {k} of parameter {i} expected {_shape(p)}, found {_shape(v)}"
                )
