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

__all__ = ["DEFAULT_CAPACITIES", "evaluate", "sweep"]

DEFAULT_CAPACITIES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


def check_count(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``value`` unless it is an integer >= 1 (or None when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        hint = " (or None: all)" if optional else ""
        raise ValueError(f"{name} must be an integer >= 1{hint}, got {value!r}")


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
    rank evaluates its slice of each batch (the last batch is padded to a multiple of the world
    size; padded images are not counted).

    Returns:
        ``accuracy``, ``loss``, ``num_images``, ``gflops_per_image`` (realised: expert work of the
        (token, expert) assignments actually processed), ``dropped_fraction`` (mean over MoE
        layers), and with ``per_image`` the (N,) tensors ``correct``, ``gflops``, ``assignments``.
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
    images_all = torch.from_numpy(dataset.images[:n]).permute(0, 3, 1, 2)
    labels_all = torch.from_numpy(dataset.labels[:n]).long()
    tot_loss = torch.zeros((), dtype=torch.float64, device=device)
    tot_correct = torch.zeros((), dtype=torch.float64, device=device)
    tot_flops = torch.zeros((), dtype=torch.float64, device=device)
    tot_dropped = torch.zeros((), dtype=torch.float64, device=device)
    batches = 0
    per: dict[str, list[torch.Tensor]] = {"correct": [], "gflops": [], "assignments": []}
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        idx = torch.arange(start, stop)
        b = stop - start
        if world > 1:  # pad to a multiple of the world size, then take this rank's slice
            padded = math.ceil(b / world) * world
            idx = torch.cat([idx, idx[-1:].expand(padded - b)])
            local = padded // world
            idx = idx[rank * local : (rank + 1) * local]
            valid = (torch.arange(rank * local, (rank + 1) * local) < b).to(device)
        else:
            valid = torch.ones(b, dtype=torch.bool, device=device)
        x = eval_transform(images_all[idx].to(device), info.mean, info.std)
        y = labels_all[idx].to(device)
        with _autocast(device, precision):
            logits, aux = model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, reduction="none")
        correct = (logits.argmax(-1) == y).double()
        flops = realized_flops_per_image(model, aux).double().to(device)
        v = valid.double()
        tot_loss += (loss.double() * v).sum()
        tot_correct += (correct * v).sum()
        tot_flops += (flops * v).sum()
        layers = aux.get("layers", {})
        if layers:
            tot_dropped += torch.stack([m["dropped_fraction"].double() for m in layers.values()]).mean()
        batches += 1
        if per_image:
            per["correct"].append(correct[valid].cpu())
            per["gflops"].append(flops[valid].cpu() / 1e9)
            if layers:
                per["assignments"].append(
                    torch.stack([m["assignments_per_image"] for m in layers.values()], dim=1)[valid].cpu()
                )
    if layout is not None and world > 1:
        from vmoe import parallel

        for t in (tot_loss, tot_correct, tot_flops, tot_dropped):
            t.copy_(parallel.all_reduce_mean(t, layout) * world)
        tot_dropped /= world
    if was_training:
        model.train()
    out: dict[str, Any] = {
        "accuracy": float(tot_correct / n),
        "loss": float(tot_loss / n),
        "num_images": n,
        "gflops_per_image": float(tot_flops / n / 1e9),
        "dropped_fraction": float(tot_dropped / max(batches, 1)),
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

    rows = []
    for c, k, b in tqdm(settings, desc="capacity sweep", unit="setting", disable=not progress):
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
