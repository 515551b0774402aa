"""Evaluation: accuracy, loss and realised compute on a test split, and the capacity sweep."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vmoe.moe.router import CapacityRoundingWarning

__all__ = ["DEFAULT_CAPACITIES", "evaluate", "rank_images", "routing_unit", "sweep"]

DEFAULT_CAPACITIES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


def check_count(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``value`` unless it is an integer >= 1 (or None when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        hint = " (or None: all)" if optional else ""
        raise ValueError(f"{name} must be an integer >= 1{hint}, got {value!r}")


def routing_unit(model: nn.Module) -> int:
    """Images whose routing groups never straddle a boundary at its multiples: the least common
    multiple of the MoE layers' ``group_size`` (1 for a dense model)."""
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    return math.lcm(*(layer.cfg.group_size for _, layer in layers)) if layers else 1


def rank_images(batch: int, world: int, rank: int, unit: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a batch of ``batch`` images for evaluation over ``world`` ranks.

    The batch splits, as in one process, into ``q = batch // unit`` whole units (``unit`` images:
    one or more whole routing groups) and a remainder of ``batch % unit`` images routed as in one
    process too. Each rank takes ``ceil(q / world)`` consecutive units (padded with whole units of
    copies of image 0 where it runs out) and then a remainder-sized tail: the real remainder on the
    last rank, copies elsewhere. Every rank thus has the same number of images (equal buffer shapes
    for an expert-parallel all-to-all), every real image shares its routing groups with exactly the
    images it would share them with in one process, and no copy shares a group with a real image.

    Returns:
        ``(index (L,) int64 into the batch, valid (L,) bool)``; ``valid`` is False on the copies.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid rank {rank} for world size {world}")
    if unit < 1:
        raise ValueError(f"unit must be >= 1 image, got {unit}")
    q, rem = divmod(batch, unit)
    per_rank = -(-q // world)
    first = min(q, rank * per_rank)
    last = min(q, (rank + 1) * per_rank)
    real = torch.arange(first * unit, last * unit)
    pad = (per_rank - (last - first)) * unit
    tail = torch.arange(q * unit, batch) if rank == world - 1 else torch.zeros(0, dtype=torch.int64)
    index = torch.cat([real, torch.zeros(pad, dtype=torch.int64), tail])
    valid = torch.cat([torch.ones(len(real), dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
    if rem:
        index = torch.cat([index, torch.zeros(rem - len(tail), dtype=torch.int64)])
        valid = torch.cat([valid, torch.full((rem,), rank == world - 1)])
    return index, valid


def _autocast(device: torch.device, precision: str):  # type: ignore[no-untyped-def]
    from vmoe.train.loop import autocast_for

    return autocast_for(device, precision)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    info: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    layout: Any = None,
    max_images: int | None = None,
    per_image: bool = False,
) -> dict[str, Any]:
    """Accuracy (a fraction in [0, 1]) and mean cross-entropy of ``model`` on ``dataset``.

    Images are taken in dataset order in batches of ``batch_size`` (an integer >= 1; the last batch
    partial), so the routing groups are the same on every call. With a distributed ``layout`` every
    rank evaluates whole routing groups of each batch (:func:`rank_images`): every image is routed
    with the same other images as in one process, so the results are the same; the padding that
    gives all ranks equal shapes forms groups of its own and is not counted.

    Returns:
        ``accuracy``, ``loss``, ``num_images``, ``gflops_per_image`` (realised: expert work of the
        (token, expert) assignments actually processed), ``dropped_fraction`` (share of the
        images' (token, expert) assignments dropped, mean over MoE layers), and with
        ``per_image`` the (N,) tensors ``correct``, ``gflops``, ``assignments``.
    """
    from vmoe.data import eval_transform
    from vmoe.models.flops import realized_flops_per_image

    check_count("batch_size", batch_size)
    check_count("max_images", max_images, optional=True)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    world = layout.world_size if layout is not None else 1
    rank = layout.rank if layout is not None else 0
    unit = routing_unit(model)
    images_all = torch.from_numpy(dataset.images[:n]).permute(0, 3, 1, 2)
    labels_all = torch.from_numpy(dataset.labels[:n]).long()
    # Sums over this rank's real images: loss, correct, flops, and per MoE layer kept / asked assignments.
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    kept_asked: torch.Tensor | None = None  # (L, 2)
    per: dict[str, list[torch.Tensor]] = {"correct": [], "gflops": [], "assignments": []}
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        local, valid = rank_images(stop - start, world, rank, unit)
        valid = valid.to(device)
        idx = start + local
        x = eval_transform(images_all[idx].to(device), info.mean, info.std)
        y = labels_all[idx].to(device)
        with _autocast(device, precision):
            logits, aux = model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, reduction="none")
        correct = (logits.argmax(-1) == y).double()
        flops = realized_flops_per_image(model, aux).double().to(device)
        v = valid.double()
        tot += torch.stack([(loss.double() * v).sum(), (correct * v).sum(), (flops * v).sum()])
        layers = aux.get("layers", {})
        if layers:
            ka = torch.stack(
                [
                    torch.stack(
                        [(m["assignments_per_image"].double() * v).sum(), v.sum() * m["selected_per_image"]]
                    )
                    for m in layers.values()
                ]
            )
            kept_asked = ka if kept_asked is None else kept_asked + ka
        if per_image:
            per["correct"].append(correct[valid].cpu())
            per["gflops"].append(flops[valid].cpu() / 1e9)
            if layers:
                per["assignments"].append(
                    torch.stack([m["assignments_per_image"] for m in layers.values()], dim=1)[valid].cpu()
                )
    if layout is not None and world > 1:
        from vmoe import parallel

        tot = parallel.all_reduce_mean(tot, layout) * world
        if kept_asked is not None:
            kept_asked = parallel.all_reduce_mean(kept_asked, layout) * world
    dropped = 0.0 if kept_asked is None else float((1.0 - kept_asked[:, 0] / kept_asked[:, 1]).mean())
    if was_training:
        model.train()
    out: dict[str, Any] = {
        "accuracy": float(tot[1] / n),
        "loss": float(tot[0] / n),
        "num_images": n,
        "gflops_per_image": float(tot[2] / n / 1e9),
        "dropped_fraction": dropped,
    }
    if per_image:
        out["correct"] = torch.cat(per["correct"])
        out["gflops"] = torch.cat(per["gflops"])
        if per["assignments"]:
            out["assignments"] = torch.cat(per["assignments"])
    return out


def sweep(
    model: nn.Module,
    dataset: Any,
    info: Any,
    *,
    capacities: Sequence[float] = DEFAULT_CAPACITIES,
    ks: Sequence[int] = (1, 2),
    bpr: Sequence[bool] = (False, True),
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    layout: Any = None,
    max_images: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate under every (capacity factor, k, BPR) test-time routing setting (no retraining).

    Returns one row per setting: ``capacity_factor, num_selected, batch_priority, accuracy, loss,
    gflops_per_image`` (realised mean), ``gflops_per_image_max`` (capacity-bound analytic) and
    ``dropped_fraction``.
    """
    import vmoe
    from vmoe.models.flops import flops_per_image

    check_count("batch_size", batch_size)
    if not model.moe_layers():
        raise ValueError("the capacity sweep needs a model with MoE layers; this one is dense")
    num_experts = min(layer.num_experts for _, layer in model.moe_layers())
    settings = [(c, k, b) for k in ks for b in bpr for c in capacities if k <= num_experts]
    from tqdm.auto import tqdm

    from vmoe._progress import bar_kwargs

    rows = []
    bar = tqdm(settings, desc="capacity sweep", unit="setting", disable=not progress, **bar_kwargs())
    for c, k, b in bar:
        with (
            vmoe.routing_overrides(model, capacity_factor=c, num_selected=k, batch_priority=b),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", CapacityRoundingWarning)  # small C is rounded on purpose
            res = evaluate(
                model,
                dataset,
                info,
                batch_size=batch_size,
                device=device,
                precision=precision,
                layout=layout,
                max_images=max_images,
            )
            bound = flops_per_image(model, capacity_factor=c, num_selected=k)
        rows.append(
            {
                "capacity_factor": c,
                "num_selected": k,
                "batch_priority": b,
                "accuracy": res["accuracy"],
                "loss": res["loss"],
                "gflops_per_image": res["gflops_per_image"],
                "gflops_per_image_max": bound / 1e9,
                "dropped_fraction": res["dropped_fraction"],
            }
        )
    return rows
