"""The training configuration: one typed dataclass, built by named recipes, overridden by flags."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["TrainConfig", "apply_overrides", "parse_value"]


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run needs; saved as ``config.json`` in the run directory.

    Model:
        model: registered model name (``vmoe.list_models()``).
        model_overrides: keyword overrides for ``vmoe.create_model`` (num_experts, patch_size, ...).
            ``num_classes``, ``in_chans`` and ``image_size`` are filled from the dataset.
    Data:
        data: a built-in dataset name (``digits``, ``cifar10``, ``synthetic``) or a path.
        image_size: resize images once at load time (None: the dataset's size).
        max_train, max_test: use a seeded subset of at most this many images.
        crop, hflip, randaugment, mixup: augmentation (hflip None: the dataset's default).
    Schedule:
        steps or epochs (steps wins when both are set): optimizer steps to run.
        batch_size: the global batch per optimizer step; grad_accum splits it into micro-batches.
        lr: peak learning rate; warmup_steps (None: ``warmup_fraction`` of the run, at most 10%).
        schedule: ``cosine`` or ``linear`` decay to ``end_lr`` after warmup.
        weight_decay: decoupled AdamW weight decay, applied to kernels only.
        grad_clip: global-norm clipping (0: off).
        loss: ``softmax`` cross-entropy or ``sigmoid`` (binary cross-entropy per class, as the paper's pre-training).
        label_smoothing: for the softmax loss.
    Routing during training:
        batch_priority: BPR in training (off, as the paper; a test-time knob).
    Run:
        seed, log_every, eval_every (0: at the end only), checkpoint_every (0: at the end only),
        keep_checkpoints (how many to keep), precision (``auto``: bf16 autocast on GPU, fp32 on CPU),
        compile (torch.compile the model), device (``auto``, ``cpu``, ``cuda``), expert_parallel.
    """

    model: str = "vmoe_ti"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    image_size: int | None = None
    max_train: int | None = None
    max_test: int | None = None
    crop: Literal["pad", "rrc", "none"] = "pad"
    hflip: bool | None = None
    randaugment: tuple[int, int] | None = None
    mixup: float = 0.0
    steps: int | None = None
    epochs: float | None = 10
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    end_lr: float = 1e-5
    warmup_steps: int | None = None
    warmup_fraction: float = 0.05
    schedule: Literal["cosine", "linear"] = "cosine"
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    loss: Literal["softmax", "sigmoid"] = "softmax"
    label_smoothing: float = 0.0
    batch_priority: bool = False
    eval_batch_size: int = 256
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    device: str = "auto"
    expert_parallel: int = 1

    def __post_init__(self) -> None:
        def pos(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for n in (
            "batch_size",
            "grad_accum",
            "eval_batch_size",
            "log_every",
            "keep_checkpoints",
            "expert_parallel",
        ):
            pos(n)
        for n in ("steps", "image_size", "max_train", "max_test"):
            pos(n, allow_none=True)
        for n in ("eval_every", "checkpoint_every"):
            v = getattr(self, n)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{n} must be an integer >= 0, got {v!r}")
        if self.steps is None and (self.epochs is None or not self.epochs > 0):
            raise ValueError(f"epochs must be > 0 when steps is not set, got {self.epochs!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}"
            )
        for n in ("lr", "end_lr", "weight_decay", "grad_clip", "mixup", "label_smoothing", "warmup_fraction"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{n} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps is not None and (
            not isinstance(self.warmup_steps, int) or self.warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        choices = {
            "crop": ("pad", "rrc", "none"),
            "schedule": ("cosine", "linear"),
            "loss": ("softmax", "sigmoid"),
            "precision": ("auto", "fp32", "bf16"),
        }
        for n, allowed in choices.items():
            if getattr(self, n) not in allowed:
                raise ValueError(f"{n} must be one of {', '.join(allowed)}; got {getattr(self, n)!r}")
        if self.randaugment is not None:
            self.randaugment = tuple(int(v) for v in self.randaugment)  # type: ignore[assignment]
            if len(self.randaugment) != 2:
                raise ValueError(f"randaugment must be (num_ops, magnitude), got {self.randaugment!r}")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a dict, got {self.model_overrides!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}")
        d = dict(d)
        if d.get("randaugment") is not None:
            d["randaugment"] = tuple(d["randaugment"])
        return cls(**d)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return max(1, math.ceil(self.epochs * steps_per_epoch))

    def warmup(self, total: int) -> int:
        """Warmup steps: explicit, else ``warmup_fraction`` of the run, capped at 10% of it."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total)
        return int(min(self.warmup_fraction, 0.1) * total)


def _field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[name]


def parse_value(text: str, typ: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``typ`` (for ``--set key=value``); ValueError names the key."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(text, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: cannot parse {text!r}")
    if origin is Literal:
        if text not in args:
            raise ValueError(f"{key} must be one of {', '.join(map(str, args))}; got {text!r}")
        return text
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects a boolean (true/false), got {text!r}")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key} expects an integer, got {text!r}") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key} expects a number, got {text!r}") from None
    if typ is str:
        return text
    # tuples, dicts, Any: JSON
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if typ is Any:
            return text
        raise ValueError(f"{key} expects a JSON value, got {text!r}") from None
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{key} expects a list like [2, 10], got {text!r}")
        return tuple(value)
    if origin is dict and not isinstance(value, dict):
        raise ValueError(f"{key} expects a JSON object, got {text!r}")
    return value


def _auto_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _model_value(key: str, text: str) -> Any:
    """A ``model.KEY=`` value: JSON, else the text; ``none`` is None where the model's, MoE's or
    router's field ``KEY`` may be None (``capacity_factor=none``: dropless), and text elsewhere
    (``moe_layers=none``: no MoE blocks)."""
    if text.strip().lower() == "none":
        from vmoe.config import ModelConfig, MoEConfig, RouterConfig

        for cls in (RouterConfig, MoEConfig, ModelConfig):
            if key in {f.name for f in dataclasses.fields(cls)}:
                typ = _field_type(cls, key)
                if type(None) in typing.get_args(typ):
                    return None
                break
    return _auto_value(text)


def apply_overrides(cfg: TrainConfig, pairs: list[str]) -> TrainConfig:
    """Apply ``key=value`` overrides; ``model.KEY=value`` sets a model override.

    The run's length is ``steps`` or ``epochs``: setting one (and not the other) clears the other,
    so ``epochs=3`` on a recipe that counts steps runs 3 epochs.

    Raises:
        ValueError: a malformed pair, an unknown key, or a value of the wrong type.
    """
    d = cfg.to_dict()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given: set[str] = set()
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, text = pair.split("=", 1)
        key = key.strip()
        if key.startswith("model."):
            name = key[len("model.") :]
            d["model_overrides"] = {**d["model_overrides"], name: _model_value(name, text)}
            continue
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"unknown config key {key!r}{hint}; expected one of {', '.join(sorted(fields - {'model_overrides'}))}, "
                "or model.KEY=value for the model"
            )
        d[key] = parse_value(text, _field_type(TrainConfig, key), key)
        given.add(key)
    for length, other in (("steps", "epochs"), ("epochs", "steps")):
        if length in given and other not in given:
            if d[length] is None:
                raise ValueError(f"{length}=none needs {other}= to say how long to train")
            d[other] = None
    return TrainConfig.from_dict(d)
