"""Tiny, learnable, class-structured synthetic images for unit tests and smoke runs."""

from __future__ import annotations

import numpy as np

from .datasets import DatasetInfo, ImageDataset, compute_mean_std

__all__ = ["make_synthetic"]


def _render(labels: np.ndarray, image_size: int, channels: int, num_classes: int, proto_seed: int, rng):  # type: ignore[no-untyped-def]
    """Render images (N, S, S, C) uint8 for ``labels``.

    Each class has a fixed colour, stripe orientation/frequency and a blob position (from ``proto_seed``);
    each image gets a random phase, a jittered blob and Gaussian noise (from ``rng``).
    """
    proto = np.random.default_rng([proto_seed, 0x5A7])
    colours = proto.uniform(0.2, 0.8, size=(num_classes, channels))
    angles = proto.uniform(0, np.pi, size=num_classes)
    freqs = proto.uniform(0.15, 0.6, size=num_classes)
    centres = proto.uniform(0.25, 0.75, size=(num_classes, 2))
    n = len(labels)
    s = image_size
    yy, xx = np.meshgrid(np.arange(s, dtype=np.float64), np.arange(s, dtype=np.float64), indexing="ij")
    a = angles[labels][:, None, None]
    f = freqs[labels][:, None, None] * (2 * np.pi * 4.0 / s)  # 0.6..2.4 cycles per image
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    stripes = 0.5 + 0.5 * np.sin(f * (xx * np.cos(a) + yy * np.sin(a)) + phase)  # (N, S, S)
    c = centres[labels] * s + rng.normal(0, 0.08 * s, size=(n, 2))
    r2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
    blob = np.exp(-r2 / (2 * (0.18 * s) ** 2))  # (N, S, S)
    img = colours[labels][:, None, None, :] * (0.5 + 0.5 * stripes[..., None])
    img = img + 0.35 * blob[..., None]
    img = img + rng.normal(0, 0.06, size=img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def make_synthetic(
    num_train: int = 512,
    num_test: int = 128,
    image_size: int = 16,
    channels: int = 3,
    num_classes: int = 10,
    seed: int = 0,
) -> tuple[ImageDataset, ImageDataset, DatasetInfo]:
    """Make a synthetic classification dataset (train, test, info).

    Images are uint8 (N, image_size, image_size, channels): a class-specific colour modulated by
    class-specific stripes (orientation, frequency), plus a class-positioned blob and noise. A small
    CNN/ViT learns it to high accuracy in a few hundred steps. Labels cycle through the classes in a
    seeded random order so every class appears in both splits. Deterministic in ``seed``.
    """
    sizes = {
        "num_train": num_train,
        "num_test": num_test,
        "image_size": image_size,
        "channels": channels,
        "num_classes": num_classes,
    }
    bad = {
        k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
    }
    if bad:
        raise ValueError(
            "make_synthetic: sizes must be positive integers, got "
            + ", ".join(f"{k}={v!r}" for k, v in bad.items())
        )
    rng = np.random.default_rng([seed, 0x51])
    splits = []
    for n in (num_train, num_test):
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        images = _render(labels, image_size, channels, num_classes, seed, rng)
        splits.append(ImageDataset(images, labels, [f"class_{i}" for i in range(num_classes)]))
    mean, std = compute_mean_std(splits[0].images)
    info = DatasetInfo(
        name="synthetic",
        num_classes=num_classes,
        channels=channels,
        image_size=image_size,
        classes=list(splits[0].classes),
        mean=mean,
        std=std,
        source=f"vmoe.data.synthetic.make_synthetic(seed={seed})",
        license="generated (no licence restrictions)",
        num_train=num_train,
        num_test=num_test,
        default_hflip=False,
    )
    return splits[0], splits[1], info
