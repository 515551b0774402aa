"""One readable training loop: data -> model -> loss + aux loss -> AdamW, with exact resume.

Every random draw of a step is a function of (seed, step, global image index): augmentation by
:mod:`vmoe.data` hashing, router noise and dropout through :func:`vmoe.rng.positional_rng`.
So a run resumed from a checkpoint, or laid out over several processes, computes the same
losses as one uninterrupted single-process run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vmoe import rng
from vmoe._progress import bar_kwargs
from vmoe.models.registry import get_config
from vmoe.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    load_optimizer_state,
    save_checkpoint,
)
from vmoe.train.config import TrainConfig

__all__ = ["TrainResult", "Trainer", "TrainingInterrupted", "lr_at", "train"]


class TrainingInterrupted(RuntimeError):
    """Raised after a checkpoint was written because SIGTERM/SIGINT arrived."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        super().__init__(f"stopped by signal {signum} after step {step}; checkpoint {path}")
        self.signum = signum
        self.step = step
        self.path = path


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    final_loss: float
    accuracy: float | None
    checkpoint: Path


def lr_at(step: int, total: int, warmup: int, peak: float, end: float, schedule: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine/linear decay."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return peak + (end - peak) * frac


def _is_kernel(name: str, p: torch.Tensor) -> bool:
    """Weight decay applies to kernels only (matrices of linear/conv/expert/router layers)."""
    leaf = name.rsplit(".", 1)[-1]
    if p.ndim < 2 or "norm" in name or leaf in ("pos_embed", "cls_token", "probe"):
        return False
    return leaf in ("weight", "w1", "w2", "in_proj_weight")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if _is_kernel(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


#: Optimizer settings that choose an implementation, not the math: a resumed run keeps its own.
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def adamw(groups: list[dict[str, Any]], **kw: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``groups``, fused where torch has the kernel for the parameters'
    device (CPU from torch 2.4, CUDA): one pass over each parameter's state per step instead of
    several. On 2 CPU cores, 30M parameters (V-MoE-Ti, E=32): 82 ms per step -> 16 ms. Same update
    rule; results agree to float rounding. Falls back to the default implementation elsewhere."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    if (
        params
        and len(devices) == 1
        and devices <= {"cpu", "cuda"}
        and all(p.is_floating_point() for p in params)
    ):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, ValueError):  # this torch has no fused kernel for these parameters
            pass
    return torch.optim.AdamW(groups, **kw)


def with_implementation_of(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (an optimizer state dict) with ``optimizer``'s implementation choices (fused,
    foreach, ...) in its param groups, so that loading it does not switch the running optimizer to
    the implementation of the run that saved it (which may not exist here)."""
    groups = [
        {**saved, **{k: g[k] for k in _IMPLEMENTATION_KEYS if k in g}}
        for saved, g in zip(state["param_groups"], optimizer.param_groups)
    ]
    return {**state, "param_groups": groups + state["param_groups"][len(groups) :]}


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, kind: str, smoothing: float = 0.0
) -> torch.Tensor:
    """Mean loss over the batch. ``targets``: int64 (B,) or soft float (B, classes)."""
    logits = logits.float()
    num_classes = logits.shape[-1]
    if targets.dtype in (torch.int64, torch.int32):
        soft = F.one_hot(targets.long(), num_classes).float()
    else:
        soft = targets.float()
    if smoothing > 0:
        soft = soft * (1 - smoothing) + smoothing / num_classes
    if kind == "softmax":
        return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, soft, reduction="none").sum(-1).mean()
    raise ValueError(f"unknown loss {kind!r}; expected 'softmax' or 'sigmoid'")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def autocast_for(device: torch.device, precision: str):  # type: ignore[no-untyped-def]
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


class _SignalFlag:
    """Records SIGTERM/SIGINT so the loop can checkpoint and stop between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed), and the numbers to TensorBoard
    (``tensorboard/`` next to it) when tensorboard is installed.

    ``purge_step``: TensorBoard hides the events of earlier attempts from this step on (0: a fresh
    start; after a resume, the steps that run again), as ``metrics.jsonl`` is truncated.
    """

    def __init__(
        self, path: Path, enabled: bool, tensorboard: bool = True, purge_step: int | None = None
    ) -> None:
        self.path = path
        self.enabled = enabled
        self.fh = open(path, "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed
                return
            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self.fh is None:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _truncate_metrics(path: Path, last_step: int, *, final: bool = False) -> float:
    """Drop records logged after ``last_step`` (a crash after the last checkpoint) atomically.

    ``final``: ``last_step`` is the run's last step, whose evaluation runs again on resume; its
    record is dropped too (no duplicate). Returns the last logged training loss kept (NaN if none).
    """
    if not path.exists():
        return float("nan")
    keep = []
    loss = float("nan")
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        step = int(rec.get("step", 0))
        if step > last_step or (final and step == last_step and "accuracy" in rec):
            continue
        keep.append(line)
        if "loss" in rec:
            loss = float(rec["loss"])
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)
    return loss


class Trainer:
    """Holds the pieces of a run; :meth:`fit` runs it. Most users call :func:`train`."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | os.PathLike[str],
        *,
        resume: bool = False,
        layout: Any = None,
        progress: bool = True,
        log: Any = None,
    ) -> None:
        import vmoe
        from vmoe.data import AugmentConfig, BatchAugment, BatchIterator, load_dataset

        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.device = resolve_device(cfg.device) if layout is None else layout.device
        if layout is None:
            if cfg.expert_parallel != 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
                from vmoe import parallel

                layout = parallel.setup(cfg.expert_parallel)
                self.device = layout.device
            else:
                layout = None
        self.layout = layout
        self.rank = layout.rank if layout is not None else 0
        self.world = layout.world_size if layout is not None else 1
        self.is_main = self.rank == 0

        # Data: the split is fixed (seed 0) so runs with different seeds see the same test set.
        self.train_set, self.test_set, self.info = load_dataset(
            cfg.data,
            image_size=cfg.image_size,
            max_train=cfg.max_train,
            max_test=cfg.max_test,
            progress=progress and self.is_main,
        )
        hflip = self.info.default_hflip if cfg.hflip is None else cfg.hflip
        self.augment = BatchAugment(
            AugmentConfig(crop=cfg.crop, hflip=hflip, randaugment=cfg.randaugment, mixup=cfg.mixup),
            self.info.mean,
            self.info.std,
        )
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {self.world}")
        self.batches = BatchIterator(
            self.train_set,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
            rank=self.rank,
            world_size=self.world,
            device=self.device,
        )
        self.steps_per_epoch = len(self.batches)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size {cfg.batch_size} is larger than the training set ({len(self.train_set)} images)"
            )
        self.total_steps = cfg.total_steps(self.steps_per_epoch)
        self.warmup = cfg.warmup(self.total_steps)

        # Model.
        overrides = dict(cfg.model_overrides)
        from_data = {
            "num_classes": self.info.num_classes,
            "in_chans": self.info.channels,
            "image_size": self.info.image_size,
        }
        for key, value in from_data.items():
            if key in overrides and _as_size(overrides[key]) != _as_size(value):
                hint = " (set image_size= to resize the data)" if key == "image_size" else ""
                raise ValueError(
                    f"model.{key}={overrides[key]!r} conflicts with the data ({cfg.data}: {key} {value!r}); "
                    f"the model takes it from the data{hint}"
                )
        overrides.update(from_data)
        if cfg.batch_priority and get_config(cfg.model, **overrides).moe is not None:
            # In the model's own config, so that checkpoints (vmoe eval, vmoe.load) route as trained.
            overrides["batch_priority"] = True
        torch.manual_seed(cfg.seed)
        self.model = vmoe.create_model(cfg.model, **overrides)
        self.model.to(self.device)
        self.model_config = self.model.cfg.to_dict()
        self.step = 0
        self.checkpoint_path: Path | None = None
        self.resumed_loss = float("nan")  # the last training loss logged before a resume
        self.purge_step = 0  # TensorBoard: events of earlier attempts from this step on are hidden

        ckpt = latest_checkpoint(self.out) if self.out.exists() else None
        state = None
        if resume:
            if ckpt is None:
                self.log(f"--resume: no checkpoint in {self.out}, starting fresh")
            else:
                try:
                    state = load_checkpoint(ckpt, map_location="cpu")
                except CheckpointError as e:
                    older = list_checkpoints(self.out)[:-1]
                    if not older:
                        raise
                    raise CheckpointError(
                        f"{e}; an older complete checkpoint exists ({older[-1].name}): move {ckpt} out of "
                        f"{ckpt.parent} to resume from it"
                    ) from None
                _check_resumable(ckpt, state, self.model_config, cfg.to_dict(), self.log)
                load_model_weights(self.model, state["state_dict"], ckpt / "model.safetensors")
                self.step = int(state["step"])
                self.log(f"resuming from {ckpt} (step {self.step})")
        elif ckpt is not None:
            raise ValueError(
                f"{self.out} already holds checkpoints (newest {ckpt.name}): pass --resume to continue it, "
                "or choose another --out"
            )

        moe = self.model.cfg.moe
        per_rank = cfg.batch_size // self.world
        # Mixup partners within routing groups (8 images for a dense model): the same in any layout
        # whose rank slices are whole groups.
        self.mixup_block = moe.group_size if moe is not None else 8
        split_groups = self.world > 1 and moe is not None and per_rank % moe.group_size != 0
        if split_groups and self.is_main and self.model.moe_layers():
            self.log(
                f"warning: {per_rank} images per rank is not a multiple of group_size {moe.group_size}: "
                "routing groups differ from a single-process run of the same batch (and so do results)"
            )
        if layout is not None:
            from vmoe import parallel

            parallel.check_consistent({"train": cfg.to_dict(), "model": self.model_config}, layout)
            self.model = parallel.parallelize(self.model, layout)
            if state is not None:
                parallel.load_full_state_dict(self.model, state["state_dict"], layout)
        self.optimizer = adamw(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)
        )
        if state is not None and state["train_state"] is not None:
            opt_state = with_implementation_of(self.optimizer, state["train_state"]["optimizer"])
            if layout is not None:
                from vmoe import parallel

                parallel.load_full_optimizer_state_dict(self.model, self.optimizer, opt_state, layout)
            else:
                load_optimizer_state(self.optimizer, opt_state, state["path"] / "train_state.pt")
            rng_state = state["train_state"].get("torch_rng")
            if rng_state is not None:
                torch.set_rng_state(rng_state)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if state is not None:
                final = self.step >= self.total_steps
                self.resumed_loss = _truncate_metrics(self.out / "metrics.jsonl", self.step, final=final)
                self.purge_step = self.step if final else self.step + 1  # (the final evaluation runs again)
            else:  # a fresh start: no records of an earlier attempt that left no checkpoint
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            (self.out / "config.json").write_text(
                json.dumps(
                    {"train": cfg.to_dict(), "model": self.model_config, "data": self._data_info()},
                    indent=2,
                    default=list,
                )
                + "\n"
            )

    # ------------------------------------------------------------------ pieces
    def _data_info(self) -> dict[str, Any]:
        d = asdict(self.info)
        d["mean"], d["std"] = list(self.info.mean), list(self.info.std)
        return d

    def _state_dict(self) -> dict[str, torch.Tensor]:
        if self.layout is not None:
            from vmoe import parallel

            return parallel.full_state_dict(self.model, self.layout)
        return self.model.state_dict()

    def _optimizer_state(self) -> dict[str, Any]:
        if self.layout is not None:
            from vmoe import parallel

            return parallel.full_optimizer_state_dict(self.model, self.optimizer, self.layout)
        return self.optimizer.state_dict()

    def save(self) -> Path:
        """Checkpoint the current step (every rank takes part; rank 0 writes)."""
        sd = self._state_dict()
        opt = self._optimizer_state()
        path = self.out / "checkpoints" / f"step_{self.step:08d}"
        if self.is_main:
            path = save_checkpoint(
                self.out,
                self.step,
                sd,
                model_config=self.model_config,
                train_config=self.cfg.to_dict(),
                data_info=self._data_info(),
                train_state={
                    "optimizer": opt,
                    "step": self.step,
                    "torch_rng": torch.get_rng_state(),
                    "total_steps": self.total_steps,
                },
                keep=self.cfg.keep_checkpoints,
            )
        if self.layout is not None:
            from vmoe import parallel

            parallel.barrier(self.layout)
        self.checkpoint_path = path
        return path

    def _stop_requested(self, flag: _SignalFlag) -> bool:
        """Whether any rank got SIGTERM/SIGINT: all ranks stop (and checkpoint) at the same step.

        A signal delivered to one rank only (a scheduler, a Ctrl-C in one terminal) would otherwise
        leave it waiting in the checkpoint's collectives while the others train on. Across ranks the
        flag is agreed on at logging steps (where the metrics are reduced anyway: no extra sync).
        """
        local = flag.signum is not None
        if self.layout is None or self.world == 1:
            return local
        if self.step % self.cfg.log_every and self.step != self.total_steps:
            return False
        return bool(self._reduce(torch.tensor(float(local))) > 0)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.layout is None:
            return t
        from vmoe import parallel

        return parallel.all_reduce_mean(t, self.layout)

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, step: int
    ) -> dict[str, Any]:
        """One optimizer step on this rank's slice of the global batch; returns detached metrics."""
        cfg = self.cfg
        epoch = step // self.steps_per_epoch
        lr = lr_at(step, self.total_steps, self.warmup, cfg.lr, cfg.end_lr, cfg.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        x = self.augment(images, indices, epoch=epoch, seed=cfg.seed)
        if cfg.mixup > 0:
            x, targets = self.augment.mix(
                x, labels, self.info.num_classes, indices, epoch=epoch, seed=cfg.seed, block=self.mixup_block
            )
        else:
            targets = labels
        local = x.shape[0]
        micro = local // cfg.grad_accum if local % cfg.grad_accum == 0 else local
        offset = self.rank * local
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        dropped = torch.zeros((), device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for start in range(0, local, micro):
            xb, tb = x[start : start + micro], targets[start : start + micro]
            with (
                rng.positional_rng(rng.mix_seed(cfg.seed, step), image_offset=offset + start),
                autocast_for(self.device, cfg.precision),
            ):
                logits, aux = self.forward(xb)
                main = classification_loss(logits, tb, cfg.loss, cfg.label_smoothing)
                aux_loss = aux["aux_loss"].float()
            ((main + aux_loss) * (xb.shape[0] / local)).backward()
            loss_sum += main.detach() * (xb.shape[0] / local)
            aux_sum += aux_loss.detach() * (xb.shape[0] / local)
            layers = aux.get("layers", {})
            if layers:
                dropped += torch.stack([m["dropped_fraction"] for m in layers.values()]).mean() * (
                    xb.shape[0] / local
                )
        if self.layout is not None:
            from vmoe import parallel

            parallel.sync_gradients(self.model, self.layout)
        if cfg.grad_clip <= 0:
            grad_norm = torch.zeros(())
        elif self.layout is not None:
            from vmoe import parallel

            grad_norm = parallel.clip_grad_norm_(self.model, cfg.grad_clip, self.layout)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        return {
            "loss": loss_sum,
            "aux_loss": aux_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            "dropped_fraction": dropped,
            "epoch": epoch,
        }

    def evaluate(self) -> dict[str, Any]:
        from vmoe.eval.evaluate import evaluate

        return evaluate(
            self.model,
            self.test_set,
            self.info,
            batch_size=self.cfg.eval_batch_size,
            device=self.device,
            precision=self.cfg.precision,
            layout=self.layout,
        )

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        writer = MetricsWriter(self.out / "metrics.jsonl", enabled=self.is_main, purge_step=self.purge_step)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.progress and self.is_main),
            desc=f"train {cfg.model}",
            **bar_kwargs(),
        )
        last_loss = self.resumed_loss
        accuracy = None
        t_log, images_since = time.perf_counter(), 0
        try:
            with _SignalFlag() as flag:
                while self.step < self.total_steps:
                    epoch, batch = divmod(self.step, self.steps_per_epoch)
                    for images, labels, indices in self.batches.epoch(epoch, start_batch=batch):
                        metrics = self.train_step(images, labels, indices, self.step)
                        self.step += 1
                        images_since += cfg.batch_size
                        bar.update(1)
                        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                            now = time.perf_counter()
                            loss = float(self._reduce(metrics["loss"]))
                            aux = float(self._reduce(metrics["aux_loss"]))
                            rec = {
                                "step": self.step,
                                "epoch": metrics["epoch"],
                                "loss": loss,
                                "aux_loss": aux,
                                "lr": metrics["lr"],
                                "grad_norm": float(metrics["grad_norm"]),
                                "dropped_fraction": float(self._reduce(metrics["dropped_fraction"])),
                                "images_per_s": images_since / max(now - t_log, 1e-9),
                            }
                            writer.write(rec)
                            last_loss = loss
                            bar.set_postfix(
                                loss=f"{loss:.4f}",
                                aux=f"{aux:.4f}",
                                lr=f"{metrics['lr']:.2e}",
                                img_s=f"{rec['images_per_s']:.0f}",
                            )
                            t_log, images_since = now, 0
                        if (
                            cfg.eval_every
                            and self.step % cfg.eval_every == 0
                            and self.step < self.total_steps
                        ):
                            ev = self.evaluate()
                            writer.write(
                                {"step": self.step, "accuracy": ev["accuracy"], "eval_loss": ev["loss"]}
                            )
                        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                            self.save()
                        if self._stop_requested(flag):
                            path = self.save()
                            bar.close()
                            raise TrainingInterrupted(flag.signum or signal.SIGTERM, self.step, path)
                        if self.step >= self.total_steps:
                            break
                # Still under the signal flag: a SIGTERM/first Ctrl-C now waits for the checkpoint and
                # the final evaluation (a second Ctrl-C stops at once). The save comes first, so an
                # interrupt during the evaluation loses nothing (--resume then only evaluates).
                if self.checkpoint_path is None or self.checkpoint_path.name != f"step_{self.step:08d}":
                    self.save()
                ev = self.evaluate()
                accuracy = ev["accuracy"]
                writer.write(
                    {
                        "step": self.step,
                        "accuracy": ev["accuracy"],
                        "eval_loss": ev["loss"],
                        "gflops_per_image": ev.get("gflops_per_image"),
                    }
                )
        finally:
            bar.close()
            writer.close()
        if self.is_main:
            self.log(
                f"done: step {self.step}, loss {last_loss:.4f}, test accuracy {accuracy:.4f}; "
                f"checkpoint {self.checkpoint_path}"
            )
        assert self.checkpoint_path is not None
        return TrainResult(self.out, self.step, last_loss, accuracy, self.checkpoint_path)


def _as_size(v: Any) -> Any:
    """A size as a comparable value: ints and (h, w) pairs alike (16 == (16, 16))."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
        return v[0]
    return v


# Model-config keys that may differ when a run is resumed (the weights fit either way).
_MODEL_KEYS_IGNORED_ON_RESUME = ("name",)


def _without_routing_knobs(model_config: dict[str, Any]) -> dict[str, Any]:
    """The config without ``batch_priority``: a routing choice, not a part of the weights (and runs of
    the previous version saved it as false even when they trained with it)."""
    router = (model_config.get("moe") or {}).get("router")
    if not isinstance(router, dict) or "batch_priority" not in router:
        return model_config
    router = {k: v for k, v in router.items() if k != "batch_priority"}
    return {**model_config, "moe": {**model_config["moe"], "router": router}}


def _check_resumable(
    ckpt: Path,
    state: dict[str, Any],
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    log: Any,
) -> None:
    """Refuse to resume ``ckpt`` into a different model; log changed training settings."""
    saved = _without_routing_knobs(state.get("model_config") or {})
    model_config = _without_routing_knobs(model_config)
    diff = sorted(
        k
        for k in set(saved) | set(model_config)
        if k not in _MODEL_KEYS_IGNORED_ON_RESUME and saved.get(k) != model_config.get(k)
    )
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {model_config.get(k)!r}" for k in diff[:4])
        raise ValueError(
            f"{ckpt} holds a different model than this configuration ({shown}"
            f"{', ...' if len(diff) > 4 else ''}); resume with the run's own settings "
            "(`vmoe train --out RUN --resume` reads them from RUN/config.json) or choose another --out"
        )
    old = state.get("train_config") or {}
    changed = [k for k in sorted(train_config) if k in old and old[k] != train_config[k]]
    if changed:
        log(
            "resuming with changed settings: "
            + ", ".join(f"{k} {old[k]!r} -> {train_config[k]!r}" for k in changed)
        )


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    layout: Any = None,
) -> TrainResult:
    """Train ``cfg`` into ``out_dir`` (config.json, metrics.jsonl, checkpoints/)."""
    return Trainer(cfg, out_dir, resume=resume, progress=progress, layout=layout).fit()
