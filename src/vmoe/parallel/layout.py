"""Process layout (expert-parallel x data-parallel), process-group setup and small collectives.

World = dp x ep. Rank ``r`` has ``ep_rank = r % ep`` and ``dp_rank = r // ep``: the ranks of an
expert-parallel group are consecutive (so with ``ep <= GPUs per node`` the all-to-alls stay on
NVLink), and the data-parallel group of a rank holds the ranks with the same ``ep_rank`` (the
replicas of its expert shard).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "Layout",
    "all_reduce_mean",
    "barrier",
    "check_consistent",
    "setup",
    "shutdown",
    "single_process",
]


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the run.

    Attributes:
        rank, world_size: global rank and number of processes (W = ep_size * dp_size).
        ep_size, dp_size: expert-parallel size P and data-parallel size.
        ep_rank, dp_rank: ``rank % ep_size`` and ``rank // ep_size``.
        device: this process's device.
        ep_group, dp_group: ``torch.distributed`` process groups (None in a single process).
    """

    rank: int
    world_size: int
    ep_size: int
    dp_size: int
    ep_rank: int
    dp_rank: int
    device: torch.device
    ep_group: Any = None
    dp_group: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when collectives are needed (a process group is set up)."""
        return self.ep_group is not None

    def local_batch(self, global_batch: int) -> int:
        """Images per process; ValueError unless ``global_batch`` is divisible by the world size."""
        if global_batch < 1 or global_batch % self.world_size:
            raise ValueError(
                f"global batch size {global_batch} must be a positive multiple of the world size "
                f"{self.world_size}"
            )
        return global_batch // self.world_size

    def image_offset(self, global_batch: int) -> int:
        """Index in the global batch of this process's first image (contiguous slices by rank)."""
        return self.rank * self.local_batch(global_batch)


def single_process(device: torch.device | str = "cpu") -> Layout:
    """The layout of a run without ``torch.distributed``."""
    return Layout(
        rank=0, world_size=1, ep_size=1, dp_size=1, ep_rank=0, dp_rank=0, device=torch.device(device)
    )


def setup(expert_parallel: int = 1, *, backend: str | None = None, timeout_s: float = 300.0) -> Layout:
    """Initialise ``torch.distributed`` from the ``torchrun`` environment and build the layout.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` through
    ``env://``). Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) returns :func:`single_process`
    on ``cuda`` if available, else ``cpu``. If the default process group already exists it is
    reused (so ``setup`` may be called again to build another layout on the same world).

    Args:
        expert_parallel: P, the expert-parallel size; must divide the world size.
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout_s: timeout of initialisation and of every collective: a rank that dies or hangs
            makes the others raise after at most this long (gloo: always; NCCL: set
            ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (default in recent torch) so the watchdog tears
            the process down, or ``TORCH_NCCL_BLOCKING_WAIT=1`` to raise in the calling thread).
    """
    if not isinstance(expert_parallel, int) or expert_parallel < 1:
        raise ValueError(f"expert_parallel must be a positive integer, got {expert_parallel!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        if expert_parallel != 1:
            raise ValueError(
                f"expert_parallel={expert_parallel} needs a multi-process run (launch with torchrun "
                f"--nproc_per_node {expert_parallel}); WORLD_SIZE is {world}"
            )
        return single_process("cuda" if torch.cuda.is_available() else "cpu")
    if backend is None:
        if dist.is_initialized():
            backend = str(dist.get_backend())
        else:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "nccl" in backend:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % expert_parallel:
        raise ValueError(f"expert_parallel={expert_parallel} must divide the world size {world}")
    ep, dp = expert_parallel, world // expert_parallel
    ep_groups = [[d * ep + j for j in range(ep)] for d in range(dp)]
    dp_groups = [[d * ep + j for d in range(dp)] for j in range(ep)]
    ep_group, _ = dist.new_subgroups_by_enumeration(ep_groups, timeout=timeout, backend=backend)
    dp_group, _ = dist.new_subgroups_by_enumeration(dp_groups, timeout=timeout, backend=backend)
    return Layout(
        rank=rank,
        world_size=world,
        ep_size=ep,
        dp_size=dp,
        ep_rank=rank % ep,
        dp_rank=rank // ep,
        device=device,
        ep_group=ep_group,
        dp_group=dp_group,
    )


def barrier(layout: Layout) -> None:
    """Wait for every rank (no-op in a single process)."""
    if layout.distributed:
        if layout.device.type == "cuda":
            dist.barrier(device_ids=[layout.device.index])
        else:
            dist.barrier()


def shutdown(layout: Layout) -> None:
    """Destroy the process groups (no-op in a single process)."""
    if layout.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Mean of ``t`` over all ranks (a new, detached tensor; for logging metrics)."""
    out = t.detach().clone()
    if layout.distributed and layout.world_size > 1:
        moved = out.to(layout.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        out = (moved / layout.world_size).to(t.device)
    return out


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def check_consistent(obj: dict[str, Any], layout: Layout) -> None:
    """Check that every rank passed an equal JSON-able dict (e.g. the run config).

    Raises ValueError on *every* rank, naming the differing (dotted) keys and the ranks that
    differ from rank 0, when they do not match. Single process: only checks JSON-ability.
    """
    try:
        text = json.dumps(obj, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"check_consistent needs a JSON-able dict: {e}") from e
    if not layout.distributed or layout.world_size == 1:
        return
    texts: list[Any] = [None] * layout.world_size
    dist.all_gather_object(texts, text)
    if all(t == texts[0] for t in texts):
        return
    ref = _flatten(json.loads(texts[0]))
    keys: set[str] = set()
    bad_ranks = []
    for r, t in enumerate(texts):
        if t == texts[0]:
            continue
        bad_ranks.append(r)
        other = _flatten(json.loads(t))
        keys |= {k for k in ref.keys() | other.keys() if ref.get(k, _MISSING) != other.get(k, _MISSING)}
    raise ValueError(
        f"configuration differs across ranks: keys {sorted(keys)} differ between rank 0 and "
        f"rank(s) {bad_ranks}"
    )


_MISSING = object()
