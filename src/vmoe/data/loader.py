"""Deterministic, resumable, rank-sliced batch iteration over an in-memory :class:`ImageDataset`.

The epoch permutation is a function of ``(seed, epoch)`` only (a hash sort, see :mod:`vmoe.data.rng`),
``start_batch`` skips already-consumed global batches, and with ``world_size > 1`` each rank gets a
contiguous slice of every *global* batch, so the ranks of one step together hold exactly the
single-process batch, in the same order.

The fast path (:class:`BatchIterator`) keeps the whole uint8 dataset as one tensor (optionally on the
GPU) and slices batches from it; :func:`make_dataloader` offers the same triples through a
``torch.utils.data.DataLoader`` with worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import ImageDataset
from .rng import STREAM_PERMUTATION, hash_bits

__all__ = [
    "Batch",
    "BatchIterator",
    "EpochBatchSampler",
    "TorchImageDataset",
    "epoch_permutation",
    "global_batch_indices",
    "iterate_batches",
    "make_dataloader",
    "num_batches",
]

#: (images uint8 (b, C, H, W), labels int64 (b,), global indices int64 (b,))
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Number of global batches per epoch for ``n`` examples."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """int64 (n,) on CPU: the order of dataset indices in ``epoch``; depends on (seed, epoch) only."""
    idx = torch.arange(n, dtype=torch.int64)
    if not shuffle:
        return idx
    keys = hash_bits(idx, seed, epoch, STREAM_PERMUTATION)[:, 0]
    return torch.argsort(keys, stable=True)


def _local_slice(b: int, rank: int, world_size: int) -> tuple[int, int]:
    return rank * b // world_size, (rank + 1) * b // world_size


def global_batch_indices(
    n: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Yield, for each global batch from ``start_batch``, this rank's int64 dataset indices (CPU).

    Rank ``r`` gets ``[r*b/ws, (r+1)*b/ws)`` of each global batch of size ``b`` (a partial last batch
    is split the same way, so slices may differ in size by one, or be empty).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    if batch_size % world_size:
        raise ValueError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")
    total = num_batches(n, batch_size, drop_last)
    if start_batch < 0 or start_batch > total:
        raise ValueError(f"start_batch {start_batch} out of range [0, {total}]")
    perm = epoch_permutation(n, seed, epoch, shuffle)
    for k in range(start_batch, total):
        g = perm[k * batch_size : (k + 1) * batch_size]
        lo, hi = _local_slice(len(g), rank, world_size)
        yield g[lo:hi]


class BatchIterator:
    """Holds the dataset as tensors (on ``device``) and yields batches for any epoch.

    Args:
        dataset: the split to iterate.
        batch_size: *global* batch size (must be divisible by ``world_size``).
        shuffle: permute per epoch (by ``(seed, epoch)``); else dataset order.
        seed: shuffling seed.
        drop_last: drop the final partial global batch.
        rank, world_size: data-parallel slice of every global batch.
        device: where the dataset tensors live; batches are sliced there (fast path).

    ``len(it)`` is the number of global batches per epoch; ``it.epoch(e, start_batch)`` yields
    ``(images uint8 (b, C, H, W), labels int64 (b,), indices int64 (b,))`` on ``device``.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")
        self.n = len(dataset)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.images = torch.from_numpy(np.ascontiguousarray(dataset.images.transpose(0, 3, 1, 2))).to(
            self.device
        )
        self.labels = torch.from_numpy(dataset.labels.astype(np.int64)).to(self.device)

    def __len__(self) -> int:
        return num_batches(self.n, self.batch_size, self.drop_last)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield this rank's batches of ``epoch``, starting at global batch ``start_batch``."""
        for idx in global_batch_indices(
            self.n,
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
            drop_last=self.drop_last,
            start_batch=start_batch,
            rank=self.rank,
            world_size=self.world_size,
        ):
            idx_d = idx.to(self.device, non_blocking=True)
            yield self.images[idx_d], self.labels[idx_d], idx_d


def iterate_batches(
    dataset: ImageDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    drop_last: bool,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> Iterator[Batch]:
    """One epoch of ``(images uint8 (b, C, H, W), labels int64 (b,), indices int64 (b,))``.

    Convenience wrapper around :class:`BatchIterator` (which moves the dataset to ``device`` once;
    construct it yourself to reuse it across epochs).
    """
    it = BatchIterator(
        dataset,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        device=device,
    )
    yield from it.epoch(epoch, start_batch)


class TorchImageDataset(Dataset):
    """``torch.utils.data.Dataset`` view: item ``i`` -> (uint8 (C, H, W), label int, index int)."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.dataset.images[i].transpose(2, 0, 1)))
        return img, int(self.dataset.labels[i]), int(i)


class EpochBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding the same per-rank index lists as :func:`global_batch_indices`."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int,
        drop_last: bool,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.kw = dict(
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            drop_last=drop_last,
            start_batch=start_batch,
            rank=rank,
            world_size=world_size,
        )
        self.n = n
        self.batch_size = batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.kw["epoch"] = epoch
        self.kw["start_batch"] = start_batch

    def __len__(self) -> int:
        return num_batches(self.n, self.batch_size, bool(self.kw["drop_last"])) - int(self.kw["start_batch"])

    def __iter__(self) -> Iterator[list[int]]:
        for idx in global_batch_indices(self.n, self.batch_size, **self.kw):  # type: ignore[arg-type]
            if len(idx):
                yield idx.tolist()


def make_dataloader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` yielding the same ``(images, labels, indices)`` batches as :func:`iterate_batches`
    (on CPU). Call ``loader.batch_sampler.set_epoch(e)`` to move to another epoch."""
    sampler = EpochBatchSampler(
        len(dataset),
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        drop_last=drop_last,
        start_batch=start_batch,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        TorchImageDataset(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
