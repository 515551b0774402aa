"""Data: in-memory datasets, position-deterministic batched augmentation, resumable batch iteration.

Quick start::

    from vmoe.data import AugmentConfig, BatchAugment, BatchIterator, load_dataset

    train, test, info = load_dataset("digits")  # or "cifar10", a .npz, a CIFAR dir, an image folder
    it = BatchIterator(train, 128, shuffle=True, seed=0, drop_last=True, device="cuda")
    aug = BatchAugment(AugmentConfig(hflip=info.default_hflip), info.mean, info.std)
    for images_u8, labels, indices in it.epoch(epoch=0):
        x = aug(images_u8, indices, epoch=0, seed=0)  # float (B, C, H, W), normalised
"""

from .augment import (
    RANDAUGMENT_OPS,
    AugmentConfig,
    BatchAugment,
    eval_transform,
    flip_mask,
    mixup,
    mixup_lambdas,
    mixup_partners,
    normalize,
    one_hot,
    pad_crop_offsets,
    randaugment,
)
from .datasets import (
    BUILTIN_DATASETS,
    DatasetInfo,
    ImageDataset,
    compute_mean_std,
    find_cifar10_npz,
    load_dataset,
    resize_images,
    stratified_split,
    verify_sha256,
)
from .loader import (
    Batch,
    BatchIterator,
    EpochBatchSampler,
    TorchImageDataset,
    epoch_permutation,
    global_batch_indices,
    iterate_batches,
    make_dataloader,
    num_batches,
)
from .rng import hash_bits, hash_uniform, splitmix64, splitmix64_int
from .synthetic import make_synthetic

__all__ = [
    "BUILTIN_DATASETS",
    "RANDAUGMENT_OPS",
    "AugmentConfig",
    "Batch",
    "BatchAugment",
    "BatchIterator",
    "DatasetInfo",
    "EpochBatchSampler",
    "ImageDataset",
    "TorchImageDataset",
    "compute_mean_std",
    "epoch_permutation",
    "eval_transform",
    "find_cifar10_npz",
    "flip_mask",
    "global_batch_indices",
    "hash_bits",
    "hash_uniform",
    "iterate_batches",
    "load_dataset",
    "make_dataloader",
    "make_synthetic",
    "mixup",
    "mixup_lambdas",
    "mixup_partners",
    "normalize",
    "num_batches",
    "one_hot",
    "pad_crop_offsets",
    "randaugment",
    "resize_images",
    "splitmix64",
    "splitmix64_int",
    "stratified_split",
    "verify_sha256",
]
