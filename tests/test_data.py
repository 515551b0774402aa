"""Tests for vmoe.data: loaders for every format, error paths, augmentation determinism, batching."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vmoe.data import (
    AugmentConfig,
    BatchAugment,
    BatchIterator,
    ImageDataset,
    eval_transform,
    flip_mask,
    global_batch_indices,
    hash_uniform,
    iterate_batches,
    load_dataset,
    make_dataloader,
    make_synthetic,
    mixup,
    mixup_partners,
    num_batches,
    one_hot,
    pad_crop_offsets,
    splitmix64,
    splitmix64_int,
    verify_sha256,
)
from vmoe.data.datasets import _load_jpeg_npz

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CIFAR_NPZ = SHARED_DATA / "cifar10_jpeg_bytes.npz"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write decode caches to the user's home during tests."""
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "vmoe_cache"))


# ------------------------------------------------------------------------------------------- rng


def test_splitmix64_tensor_matches_python():
    xs = [0, 1, 7, 2**62 + 3, -5, -(2**63), 2**63 - 1]
    got = splitmix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    want = [splitmix64_int(x & (2**64 - 1)) for x in xs]
    want = [w - 2**64 if w >= 2**63 else w for w in want]
    assert got == want
    assert splitmix64_int(0) == 0xE220A8397B1DCDAF  # reference splitmix64 output for state 0


def test_hash_uniform_range_and_keys():
    idx = torch.arange(10000)
    u = hash_uniform(idx, 0, 0, 1, n=3)
    assert u.shape == (10000, 3) and u.dtype == torch.float32
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(u, hash_uniform(idx, 0, 0, 1, n=3))
    assert not torch.equal(u, hash_uniform(idx, 0, 1, 1, n=3))
    assert not torch.equal(u, hash_uniform(idx, 1, 0, 1, n=3))
    # a subset of indices gets the same values as in the full call
    sub = torch.tensor([9999, 5, 42])
    assert torch.equal(hash_uniform(sub, 0, 0, 1, n=3), u[sub])


# -------------------------------------------------------------------------------------- digits


def test_digits_default_dataset():
    train, test, info = load_dataset("digits")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64
    assert info.classes == [str(i) for i in range(10)] and info.num_classes == 10
    assert info.channels == 1 and info.image_size == 8
    assert train.images.max() == 255 and train.images.min() == 0
    assert info.default_hflip is False
    assert "CC BY 4.0" in info.license and "BSD" in info.license
    assert len(info.mean) == 1 and 0 < info.mean[0] < 1
    np.testing.assert_allclose(info.mean[0], train.images.mean() / 255, rtol=1e-6)
    np.testing.assert_allclose(info.std[0], (train.images / 255.0).std(), rtol=1e-6)
    # stratified: each class's test count is round(0.2 * its total)
    for c in range(10):
        total = (train.labels == c).sum() + (test.labels == c).sum()
        assert (test.labels == c).sum() == round(0.2 * total)
    # deterministic split, seed changes it
    train2, _, _ = load_dataset("digits")
    assert np.array_equal(train.images, train2.images)
    train3, _, _ = load_dataset("digits", seed=1)
    assert not np.array_equal(train.labels, train3.labels)


def test_digits_upscale_and_subsample():
    train, test, info = load_dataset("digits", image_size=16, max_train=100, max_test=50)
    assert train.images.shape == (100, 16, 16, 1) and test.images.shape == (50, 16, 16, 1)
    assert info.image_size == 16 and info.num_train == 100


# ---------------------------------------------------------------------------------- file formats


def _keras_npz(path: Path, shape_train, shape_test, n_cls=3, **extra):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, shape_train, dtype=np.uint8)
    x_te = rng.integers(0, 256, shape_test, dtype=np.uint8)
    y_tr = np.arange(shape_train[0]) % n_cls
    y_te = np.arange(shape_test[0]) % n_cls
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, **extra)
    return x_tr, y_tr, x_te, y_te


def test_keras_npz_grayscale(tmp_path):
    p = tmp_path / "mnistlike.npz"
    x_tr, y_tr, _, _ = _keras_npz(p, (12, 6, 6), (5, 6, 6))
    train, test, info = load_dataset(str(p))
    assert train.images.shape == (12, 6, 6, 1) and test.images.shape == (5, 6, 6, 1)
    assert np.array_equal(train.images[..., 0], x_tr) and np.array_equal(train.labels, y_tr)
    assert info.num_classes == 3 and info.channels == 1 and info.name == "mnistlike"


def test_keras_npz_rgb_with_column_labels(tmp_path):
    p = tmp_path / "rgb.npz"
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    np.savez(p, x_train=x, y_train=np.arange(8).reshape(8, 1) % 2, x_test=x[:2], y_test=np.array([[0], [1]]))
    train, test, info = load_dataset(p)
    assert train.images.shape == (8, 4, 4, 3) and np.array_equal(train.images, x)
    assert train.labels.shape == (8,) and info.channels == 3 and len(info.mean) == 3
    assert test.labels.tolist() == [0, 1]


@pytest.mark.parametrize("chans", [1, 3])
def test_keras_npz_channels_first_is_transposed(tmp_path, chans):
    p = tmp_path / "nchw.npz"
    x_tr, y_tr, x_te, _ = _keras_npz(p, (6, chans, 16, 16), (4, chans, 16, 16))
    train, test, info = load_dataset(p)
    assert train.images.shape == (6, 16, 16, chans) and test.images.shape == (4, 16, 16, chans)
    assert np.array_equal(train.images, x_tr.transpose(0, 2, 3, 1))
    assert np.array_equal(test.images, x_te.transpose(0, 2, 3, 1))
    assert info.channels == chans and info.image_size == 16 and np.array_equal(train.labels, y_tr)
    # non-square channel-first images are read as HxW too (image_size= then squares them)
    q = tmp_path / "nchw_rect.npz"
    x_tr, _, _, _ = _keras_npz(q, (4, 3, 10, 12), (2, 3, 10, 12))
    train, _, info = load_dataset(q, image_size=8)
    assert train.images.shape == (4, 8, 8, 3) and info.channels == 3
    with pytest.raises(ValueError, match=r"10x12 with 3 channel"):
        load_dataset(q)


@pytest.mark.parametrize(
    "shape",
    [(4, 8, 8, 2), (4, 8, 8, 5), (4, 4, 4, 4), (4, 3, 3, 3), (4, 4, 6, 3), (4, 3, 5, 4), (4, 16, 16, 16)],
)
def test_keras_npz_other_shapes_stay_channels_last(tmp_path, shape):
    # Only clear channel-first arrays are transposed; everything else reads channels-last, as before
    # (2 or 5 channels, tiny or non-square images); a data_format entry overrides the guess.
    p = tmp_path / "x.npz"
    x_tr, _, _, _ = _keras_npz(p, shape, (2, *shape[1:]))
    side = max(shape[1], shape[2])
    train, _, info = load_dataset(p, image_size=side)
    assert info.channels == shape[3] and train.images.shape == (4, side, side, shape[3])
    if shape[1:3] == (side, side):
        assert np.array_equal(train.images, x_tr)
    if shape == (4, 3, 5, 4):
        _keras_npz(p, shape, (2, *shape[1:]), data_format="channels_first")
        train, _, info = load_dataset(p, image_size=5)
        assert info.channels == 3 and train.images.shape == (4, 5, 5, 3)
        _keras_npz(p, shape, (2, *shape[1:]), data_format="sideways")
        with pytest.raises(ValueError, match=r"data_format.*sideways"):
            load_dataset(p)


def test_keras_npz_labels_must_be_integral_and_in_range(tmp_path):
    p = tmp_path / "lab.npz"
    x = np.zeros((4, 4, 4, 3), np.uint8)
    np.savez(p, x_train=x, y_train=np.array(["0", "1", "2", "1"]), x_test=x[:2], y_test=np.array(["1", "0"]))
    assert load_dataset(p)[0].labels.tolist() == [0, 1, 2, 1]  # numbers stored as text load as before
    np.savez(
        p, x_train=x, y_train=np.array(["cat", "dog", "cat", "dog"]), x_test=x[:2], y_test=np.array([1, 0])
    )
    with pytest.raises(ValueError, match=r"'y_train'.*integers.*'cat'"):
        load_dataset(p)
    np.savez(p, x_train=x, y_train=np.array([0.0, 1.0, 2.0, 1.0]), x_test=x[:2], y_test=np.array([1.0, 0.0]))
    train, _, info = load_dataset(p)  # integral floats are fine
    assert train.labels.tolist() == [0, 1, 2, 1] and train.labels.dtype == np.int64 and info.num_classes == 3
    np.savez(p, x_train=x, y_train=np.array([0.0, 1.5, 2.0, 1.0]), x_test=x[:2], y_test=np.array([1, 0]))
    with pytest.raises(ValueError, match=re.escape(str(p)) + r".*'y_train'.*integers.*1\.5"):
        load_dataset(p)
    np.savez(p, x_train=x, y_train=np.array([0, 1, 2, 1]), x_test=x[:2], y_test=np.array([np.nan, 0]))
    with pytest.raises(ValueError, match=r"'y_test'.*integers.*nan"):
        load_dataset(p)
    np.savez(p, x_train=x, y_train=np.array([0, -1, 2, 1]), x_test=x[:2], y_test=np.array([1, 0]))
    with pytest.raises(ValueError, match=r"'y_train'.*>= 0.*-1"):
        load_dataset(p)
    np.savez(
        p,
        x_train=x,
        y_train=np.array([0, 1, 2, 1]),
        x_test=x[:2],
        y_test=np.array([3, 0]),
        classes=np.array(["a", "b", "c"]),
    )
    with pytest.raises(ValueError, match=r"'y_test'.*label 3.*3 classes"):
        load_dataset(p)
    with pytest.raises(ValueError, match=r"labels.*integers.*0\.5"):
        ImageDataset(x[:2], np.array([0.0, 0.5]), ["a", "b"])


def test_jpeg_npz_and_cifar_labels_checked(tmp_path):
    p = tmp_path / "tiny_jpeg.npz"
    arrays = _jpeg_bytes_npz(p, 3, 2)
    arrays["y_train"] = np.array([0.0, 1.25, 1.0])
    np.savez(p, **arrays)
    with pytest.raises(ValueError, match=re.escape(str(p)) + r".*'y_train'.*1\.25"):
        load_dataset(p)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    _cifar_batch(root / "data_batch_1", 3, b"labels", 10, 0)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1.5, 2.0]}, f)
    with pytest.raises(ValueError, match=re.escape(str(root / "test_batch")) + r".*1\.5"):
        load_dataset(root)


def _cifar_batch(path: Path, n: int, label_key: bytes, n_cls: int, seed: int):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, n_cls, n)]
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key: labels, b"batch_label": b"x"}, f)
    return data, labels


def test_cifar10_python_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    parts = [_cifar_batch(root / f"data_batch_{i}", 4, b"labels", 10, i) for i in range(1, 6)]
    _, y_te = _cifar_batch(root / "test_batch", 3, b"labels", 10, 9)
    names = [f"c{i}".encode() for i in range(10)]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    train, test, info = load_dataset(str(root))
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (3, 32, 32, 3)
    assert info.classes == [f"c{i}" for i in range(10)] and info.name == "cifar10"
    # row layout: 1024 R, 1024 G, 1024 B, row-major
    d0 = parts[0][0][0]
    assert np.array_equal(train.images[0, :, :, 0], d0[:1024].reshape(32, 32))
    assert np.array_equal(train.images[0, :, :, 2], d0[2048:].reshape(32, 32))
    assert train.labels.tolist() == [v for p in parts for v in p[1]]
    assert test.labels.tolist() == y_te


def test_cifar100_python(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _cifar_batch(root / "train", 10, b"fine_labels", 100, 0)
    _, y_te = _cifar_batch(root / "test", 4, b"fine_labels", 100, 1)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f)
    train, test, info = load_dataset(root)
    assert info.num_classes == 100 and info.name == "cifar100" and info.classes[5] == "f5"
    assert train.images.shape == (10, 32, 32, 3) and test.labels.tolist() == y_te


def _write_images(folder: Path, n: int, size, mode: str, ext: str, seed: int):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i:03d}{ext}")


def test_image_folder_flat_grayscale_png(tmp_path):
    root = tmp_path / "shapes"
    for c, name in enumerate(["circle", "square"]):
        _write_images(root / name, 10, (8, 8), "L", ".png", c)
    (root / "circle" / "notes.txt").write_text("ignored")
    train, test, info = load_dataset(str(root), test_fraction=0.2, seed=3)
    assert info.classes == ["circle", "square"] and info.channels == 1
    assert len(train) == 16 and len(test) == 4
    assert sorted(test.labels.tolist()) == [0, 0, 1, 1]
    # PNG is lossless: every decoded image equals one of the files
    files = {np.asarray(Image.open(f)).tobytes() for f in sorted(root.rglob("*.png"))}
    assert all(img[..., 0].tobytes() in files for img in train.images)


def test_image_folder_train_val_jpeg_crop_resize(tmp_path):
    root = tmp_path / "pets"
    for c, name in enumerate(["cat", "dog"]):
        _write_images(root / "train" / name, 3, (12, 10), "RGB", ".jpg", c)
        _write_images(root / "val" / name, 2, (12, 10), "RGB", ".jpeg", 10 + c)
    train, test, info = load_dataset(root, image_size=6)
    assert train.images.shape == (6, 6, 6, 3) and test.images.shape == (4, 6, 6, 3)
    assert info.image_size == 6 and info.classes == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.labels.tolist() == [0, 0, 1, 1]
    # default size is the first image's centre-cropped square (10x10)
    train2, _, info2 = load_dataset(root)
    assert train2.images.shape[1:] == (10, 10, 3) and info2.image_size == 10
    with Image.open(root / "train" / "cat" / "000.jpg") as im:
        want = np.asarray(im.convert("RGB").crop((1, 0, 11, 10)))
    assert np.array_equal(train2.images[0], want)


def _jpeg_bytes_npz(path: Path, n_train: int, n_test: int) -> dict:
    rng = np.random.default_rng(0)
    out: dict = {"classes": np.array(["a", "b"])}
    for split, n in (("train", n_train), ("test", n_test)):
        blobs = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        out[f"{split}_jpeg_data"] = np.concatenate(blobs)
        out[f"{split}_jpeg_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(
            np.int64
        )
        out[f"y_{split}"] = np.arange(n, dtype=np.int64) % 2
    np.savez(path, **out)
    return out


def test_jpeg_bytes_npz_small_and_cache(tmp_path, monkeypatch):
    p = tmp_path / "tiny_jpeg.npz"
    arrays = _jpeg_bytes_npz(p, 6, 3)
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache"))
    train, test, info = load_dataset(str(p))
    assert train.images.shape == (6, 32, 32, 3) and test.images.shape == (3, 32, 32, 3)
    assert info.classes == ["a", "b"]
    o = arrays["train_jpeg_offsets"]
    ref = np.asarray(Image.open(io.BytesIO(arrays["train_jpeg_data"][o[1] : o[2]].tobytes())).convert("RGB"))
    assert np.array_equal(train.images[1], ref)
    cached = sorted(x.name for x in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and all(x.endswith(".npy") for x in cached)
    train2, _, _ = load_dataset(str(p))  # from the cache
    assert np.array_equal(train.images, train2.images)


def test_checksum_mismatch_names_file(tmp_path):
    p = tmp_path / "fake.npz"
    _jpeg_bytes_npz(p, 2, 1)
    good = verify_sha256(p, __import__("hashlib").sha256(p.read_bytes()).hexdigest())
    assert len(good) == 64
    with pytest.raises(ValueError, match=r"checksum mismatch.*fake\.npz"):
        verify_sha256(p, "0" * 64)
    with pytest.raises(ValueError, match=re.escape(str(p))):
        _load_jpeg_npz(p, expected_sha="f" * 64)


@pytest.fixture(scope="module")
def cifar10_shared(tmp_path_factory):
    if not CIFAR_NPZ.is_file():
        pytest.skip(f"shared CIFAR-10 npz not found at {CIFAR_NPZ} (../shared/data absent)")
    mp = pytest.MonkeyPatch()
    mp.setenv("VMOE_CACHE_DIR", str(tmp_path_factory.mktemp("cifar_cache")))
    mp.setenv("VMOE_DATA_DIR", str(SHARED_DATA))
    try:
        yield load_dataset("cifar10")
    finally:
        mp.undo()


def test_cifar10_shared_npz(cifar10_shared):
    train, test, info = cifar10_shared
    assert train.images.shape == (50000, 32, 32, 3) and test.images.shape == (10000, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [5000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert info.classes[0] == "airplane" and info.classes[-1] == "truck" and info.default_hflip
    with np.load(CIFAR_NPZ) as z:
        o = z["train_jpeg_offsets"]
        first = np.asarray(Image.open(io.BytesIO(z["train_jpeg_data"][o[0] : o[1]].tobytes())).convert("RGB"))
    assert np.array_equal(train.images[0], first)
    assert all(0.4 < m < 0.52 for m in info.mean) and all(0.2 < s < 0.3 for s in info.std)


# --------------------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path):
    p = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(p))):
        load_dataset(str(p))


def test_error_unknown_name_lists_builtins():
    with pytest.raises(ValueError, match=r"imagenet_zz.*digits.*cifar10"):
        load_dataset("imagenet_zz")


def test_error_missing_key(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2))
    with pytest.raises(ValueError, match=re.escape(str(p)) + ".*x_test"):
        load_dataset(str(p))


def test_error_mismatched_lengths(tmp_path):
    p = tmp_path / "len.npz"
    z = np.zeros((3, 4, 4), np.uint8)
    np.savez(p, x_train=z, y_train=np.zeros(2), x_test=z, y_test=np.zeros(3))
    with pytest.raises(ValueError, match=re.escape(str(p)) + ".*x_train"):
        load_dataset(str(p))


def test_error_corrupt_npz(tmp_path):
    p = tmp_path / "corrupt.npz"
    p.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(ValueError, match=re.escape(str(p))):
        load_dataset(str(p))


def test_error_corrupt_and_malicious_pickle(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "data_batch_1").write_bytes(b"\x80\x04garbage")
    (root / "test_batch").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(root / "data_batch_1"))):
        load_dataset(str(root))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ValueError, match=r"data_batch_1.*refusing"):
        load_dataset(str(root))


def test_error_empty_folder(tmp_path):
    root = tmp_path / "empty"
    (root / "class_a").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(str(root)) + ".*no images"):
        load_dataset(str(root))


def test_error_empty_test_split_image_folder(tmp_path):
    root = tmp_path / "few"
    for c, name in enumerate(["a", "b"]):
        _write_images(root / name, 2, (4, 4), "L", ".png", c)
    with pytest.raises(
        ValueError, match=re.escape(str(root)) + r".*test split is empty.*4 images.*a: 2.*train/<class>"
    ):
        load_dataset(root)  # 2 per class: round(2 * 0.2) = 0 test images
    train, test, _ = load_dataset(root, test_fraction=0.5)
    assert len(train) == 2 and len(test) == 2
    with pytest.raises(ValueError, match=r"train split is empty"):
        load_dataset(root, test_fraction=0.9)


def test_error_empty_split_npz_and_digits(tmp_path):
    p = tmp_path / "notest.npz"
    x = np.zeros((4, 4, 4, 3), np.uint8)
    np.savez(p, x_train=x, y_train=np.arange(4) % 2, x_test=x[:0], y_test=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match=re.escape(str(p)) + r".*test split is empty.*4 train, 0 test"):
        load_dataset(p)
    with pytest.raises(ValueError, match=r"digits.*test split is empty.*test_fraction"):
        load_dataset("digits", test_fraction=0.0)


@pytest.mark.parametrize("spec", ["synthetic", "digits"])
@pytest.mark.parametrize("key", ["max_train", "max_test"])
@pytest.mark.parametrize("value", [0, -3])
def test_error_max_train_test_not_positive(spec, key, value):
    with pytest.raises(ValueError, match=rf"{key} must be a positive.*got {value}"):
        load_dataset(spec, **{key: value})


def test_synthetic_max_counts():
    train, test, info = load_dataset("synthetic", max_train=7, max_test=3, image_size=4)
    assert len(train) == 7 and len(test) == 3 and info.num_train == 7
    with pytest.raises(ValueError, match=r"num_train=0"):
        make_synthetic(0, 5)


def test_error_corrupt_image(tmp_path):
    root = tmp_path / "imgs"
    _write_images(root / "a", 2, (4, 4), "RGB", ".png", 0)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ValueError, match=re.escape(str(root / "a" / "broken.jpg"))):
        load_dataset(str(root))


def test_error_corrupt_jpeg_in_npz(tmp_path):
    p = tmp_path / "badjpeg.npz"
    arrays = _jpeg_bytes_npz(p, 2, 1)
    arrays["train_jpeg_data"] = arrays["train_jpeg_data"].copy()
    arrays["train_jpeg_data"][:20] = 7
    np.savez(p, **arrays)
    with pytest.raises(ValueError, match=re.escape(str(p)) + ".*train image 0"):
        load_dataset(str(p))


# ------------------------------------------------------------------------ cifar10 location, progress


@pytest.fixture
def fake_cifar_tree(tmp_path, monkeypatch):
    """cwd ``tmp/work/proj`` with a loadable fake ``cifar10_jpeg_bytes.npz`` in ``tmp/work/shared/data``
    (the ``../shared/data`` fallback); returns that file."""
    from vmoe.data import datasets

    cwd = tmp_path / "work" / "proj"
    cwd.mkdir(parents=True)
    shared = tmp_path / "work" / "shared" / "data"
    shared.mkdir(parents=True)
    _jpeg_bytes_npz(shared / datasets.CIFAR10_JPEG_NPZ, 4, 2)
    monkeypatch.delitem(datasets.KNOWN_CHECKSUMS, datasets.CIFAR10_JPEG_NPZ)  # a fake file
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("VMOE_DATA_DIR", raising=False)
    return shared / datasets.CIFAR10_JPEG_NPZ


def test_cifar10_fallback_without_env(fake_cifar_tree):
    train, test, info = load_dataset("cifar10", progress=False)
    assert len(train) == 4 and len(test) == 2 and str(fake_cifar_tree) in info.source


def test_cifar10_env_dir_without_file_is_an_error(fake_cifar_tree, tmp_path, monkeypatch):
    empty = tmp_path / "mydata"
    empty.mkdir()
    monkeypatch.setenv("VMOE_DATA_DIR", str(empty))
    # the copy in ../shared/data must not be used silently instead
    with pytest.raises(FileNotFoundError, match=re.escape(f"$VMOE_DATA_DIR={empty}")) as ei:
        load_dataset("cifar10")
    assert "cifar10_jpeg_bytes.npz" in str(ei.value)
    assert str(empty / "cifar10_jpeg_bytes.npz") in str(ei.value)
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("VMOE_DATA_DIR", str(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(f"$VMOE_DATA_DIR={missing} does not exist")):
        load_dataset("cifar10")
    # and with the file there, that copy is the one loaded
    (empty / "cifar10_jpeg_bytes.npz").write_bytes(fake_cifar_tree.read_bytes())
    monkeypatch.setenv("VMOE_DATA_DIR", str(empty))
    _, _, info = load_dataset("cifar10", progress=False)
    assert str(empty / "cifar10_jpeg_bytes.npz") in info.source


def test_cifar10_not_found_lists_every_location(tmp_path, monkeypatch):
    from vmoe.data.datasets import _cifar10_search_paths

    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("VMOE_DATA_DIR", raising=False)
    searched = _cifar10_search_paths()
    if any(c.is_file() for c in searched):
        pytest.skip("a cifar10_jpeg_bytes.npz exists above the temporary directory")
    with pytest.raises(FileNotFoundError) as ei:
        load_dataset("cifar10")
    msg = str(ei.value)
    assert "VMOE_DATA_DIR" in msg
    for c in [tmp_path / "a" / "shared" / "data", cwd / "shared" / "data", Path("/shared/data"), *searched]:
        assert str(c) in msg, (c, msg)


def _count_bars(monkeypatch) -> list:
    import tqdm.auto

    made = []
    real = tqdm.auto.tqdm

    def spy(*args, **kwargs):
        made.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    return made


def test_progress_false_shows_no_decoding_bars(tmp_path, monkeypatch):
    root = tmp_path / "shapes"
    for c, name in enumerate(["circle", "square"]):
        _write_images(root / name, 3, (8, 8), "L", ".png", c)
    p = tmp_path / "tiny_jpeg.npz"
    _jpeg_bytes_npz(p, 2, 1)
    made = _count_bars(monkeypatch)
    load_dataset(root, progress=False)
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache1"))
    load_dataset(p, progress=False)
    assert made == []
    load_dataset(root)  # the default shows them
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache2"))
    load_dataset(p)
    assert made == ["decoding images", "decoding train JPEGs", "decoding test JPEGs"]


# ---------------------------------------------------------------------------------- augmentation


def _batch(n=16, c=3, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8), torch.arange(100, 100 + n)


CONFIGS = [
    AugmentConfig(),
    AugmentConfig(pad_mode="zero", pad=2),
    AugmentConfig(crop="rrc"),
    AugmentConfig(crop="none"),
    AugmentConfig(crop="rrc", randaugment=(2, 9)),
    AugmentConfig(randaugment=(3, 5), hflip=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_augment_deterministic_by_position(cfg):
    x, idx = _batch()
    aug = BatchAugment(cfg, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    out = aug(x, idx, epoch=3, seed=7)
    assert out.shape == x.shape and out.dtype == torch.float32
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(1))
    out_p = aug(x[perm], idx[perm], epoch=3, seed=7)
    torch.testing.assert_close(out_p, out[perm], rtol=0, atol=1e-5)
    # a different batch composition (subset + other images) leaves shared images unchanged
    x2, idx2 = _batch(seed=5)
    mixed_x = torch.cat([x[:5], x2[:3]])
    mixed_i = torch.cat([idx[:5], idx2[:3] + 1000])
    torch.testing.assert_close(aug(mixed_x, mixed_i, epoch=3, seed=7)[:5], out[:5], rtol=0, atol=1e-5)
    # epochs and seeds change the augmentation
    if cfg.crop != "none" or cfg.randaugment:
        assert not torch.allclose(aug(x, idx, epoch=4, seed=7), out)
        assert not torch.allclose(aug(x, idx, epoch=3, seed=8), out)


def test_flip_really_flips():
    x, idx = _batch(n=64)
    aug = BatchAugment(AugmentConfig(crop="none", hflip=True), (0.0,) * 3, (1.0,) * 3)
    out = aug(x, idx, epoch=0, seed=0)
    flip = flip_mask(idx, 0, 0)
    assert 10 < flip.sum() < 54
    xf = x.float() / 255
    torch.testing.assert_close(out[flip], torch.flip(xf[flip], dims=[3]))
    torch.testing.assert_close(out[~flip], xf[~flip])
    assert not torch.equal(flip_mask(idx, 1, 0), flip)


@pytest.mark.parametrize("mode", ["reflect", "zero"])
def test_pad_crop_is_shifted_window(mode):
    x, idx = _batch(n=32, s=16)
    pad = 3
    aug = BatchAugment(AugmentConfig(crop="pad", pad=pad, pad_mode=mode, hflip=False), (0.0,) * 3, (1.0,) * 3)
    out = aug(x, idx, epoch=2, seed=1)
    padded = F.pad(x.float() / 255, (pad,) * 4, mode="reflect" if mode == "reflect" else "constant")
    off = pad_crop_offsets(idx, 2, 1, pad)
    assert off.min() >= 0 and off.max() <= 2 * pad and len(torch.unique(off[:, 0])) > 2
    for b in range(len(idx)):
        oy, ox = off[b].tolist()
        torch.testing.assert_close(out[b], padded[b, :, oy : oy + 16, ox : ox + 16])


def test_pad_default_and_rrc_range():
    aug = BatchAugment(AugmentConfig())
    assert aug.pad_for(32) == 4 and aug.pad_for(8) == 1
    x, idx = _batch()
    out = BatchAugment(AugmentConfig(crop="rrc"), (0.0,) * 3, (1.0,) * 3)(x, idx, 0, 0)
    assert out.min() >= 0 and out.max() <= 1


def test_randaugment_output_range():
    x, idx = _batch(n=128)
    out = BatchAugment(AugmentConfig(crop="none", hflip=False, randaugment=(2, 10)), (0.0,) * 3, (1.0,) * 3)(
        x, idx, 0, 0
    )
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    changed = (out - x.float() / 255).abs().flatten(1).amax(1) > 1e-3
    assert 0.5 < changed.float().mean() < 1.0  # most, not all (identity op exists)


def test_eval_transform_hand_computed():
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    out = eval_transform(x, (0.2,), (0.5,))
    want = torch.tensor([[[[-0.4, 1.6], [0.0, 0.4]]]])
    torch.testing.assert_close(out, want)
    train, _, info = load_dataset("digits")
    t = torch.from_numpy(train.images).permute(0, 3, 1, 2)
    z = eval_transform(t, info.mean, info.std)
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-3


def test_mixup_deterministic_and_soft_targets():
    x, idx = _batch(n=8)
    xf = x.float()
    y = one_hot(torch.arange(8) % 4, 4)
    m1, t1 = mixup(xf, y, 0.4, idx, epoch=0, seed=0)
    m2, t2 = mixup(xf, y, 0.4, idx, epoch=0, seed=0)
    assert torch.equal(m1, m2) and torch.equal(t1, t2)
    torch.testing.assert_close(t1.sum(1), torch.ones(8))
    partner = mixup_partners(idx, 0, 0)
    assert sorted(partner.tolist()) == list(range(8)) and not (partner == torch.arange(8)).any()
    same, same_t = mixup(xf, y, 0.0, idx, 0, 0)
    assert same is xf and same_t is y
    aug = BatchAugment(AugmentConfig(mixup=0.2))
    xm, tm = aug.mix(xf, torch.arange(8) % 4, 4, idx, 0, 0)
    assert tm.shape == (8, 4) and xm.shape == xf.shape


def test_mixup_blocks_pair_the_same_in_any_split():
    """Partners stay inside blocks: a batch cut into whole blocks (ranks) pairs as the whole batch."""
    idx = torch.randperm(1000)[:24]
    whole = mixup_partners(idx, 3, 7, block=4)
    assert (whole // 4 == torch.arange(24) // 4).all()  # never across a block
    assert not (whole == torch.arange(24)).any() and sorted(whole.tolist()) == list(range(24))
    halves = torch.cat(
        [mixup_partners(idx[:12], 3, 7, block=4), mixup_partners(idx[12:], 3, 7, block=4) + 12]
    )
    assert torch.equal(whole, halves)
    assert torch.equal(mixup_partners(idx, 3, 7), mixup_partners(idx, 3, 7, block=24))  # None: one block
    assert not torch.equal(
        mixup_partners(idx, 3, 7),
        torch.cat([mixup_partners(idx[:12], 3, 7), mixup_partners(idx[12:], 3, 7) + 12]),
    )
    last = mixup_partners(idx[:10], 0, 0, block=4)  # a shorter last block pairs within itself
    assert set(last[8:].tolist()) == {8, 9}
    with pytest.raises(ValueError, match="block must be >= 1 image, got 0"):
        mixup_partners(idx, 0, 0, block=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_cuda_matches_cpu():
    x, idx = _batch(n=32)
    aug = BatchAugment(AugmentConfig(randaugment=(2, 9)), (0.5,) * 3, (0.25,) * 3)
    cpu = aug(x, idx, 1, 2)
    gpu = aug(x.cuda(), idx.cuda(), 1, 2).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)


# -------------------------------------------------------------------------------------- batching


def _toy(n=23):
    rng = np.random.default_rng(0)
    return ImageDataset(rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8), np.arange(n) % 3, ["a", "b", "c"])


def test_num_batches():
    assert num_batches(23, 5, drop_last=False) == 5 and num_batches(23, 5, drop_last=True) == 4
    assert num_batches(20, 5, drop_last=False) == 4


@pytest.mark.parametrize("drop_last", [False, True])
def test_iterate_covers_every_index_once(drop_last):
    ds = _toy()
    batches = list(iterate_batches(ds, 5, shuffle=True, seed=0, epoch=0, drop_last=drop_last))
    idx = torch.cat([b[2] for b in batches])
    sizes = [len(b[2]) for b in batches]
    if drop_last:
        assert sizes == [5] * 4 and len(set(idx.tolist())) == 20
    else:
        assert sizes == [5, 5, 5, 5, 3] and sorted(idx.tolist()) == list(range(23))
    for images, labels, ix in batches:
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 4, 4)
        assert torch.equal(images, torch.from_numpy(ds.images[ix.numpy()]).permute(0, 3, 1, 2))
        assert torch.equal(labels, torch.from_numpy(ds.labels[ix.numpy()]))
    other = torch.cat([b[2] for b in iterate_batches(ds, 5, shuffle=True, seed=0, epoch=1, drop_last=False)])
    assert not torch.equal(other, idx[: len(other)])
    unshuffled = torch.cat(
        [b[2] for b in iterate_batches(ds, 5, shuffle=False, seed=0, epoch=0, drop_last=False)]
    )
    assert unshuffled.tolist() == list(range(23))


def test_start_batch_resumes_same_sequence():
    ds = _toy()
    full = [b[2] for b in iterate_batches(ds, 4, shuffle=True, seed=3, epoch=2, drop_last=False)]
    resumed = [
        b[2] for b in iterate_batches(ds, 4, shuffle=True, seed=3, epoch=2, start_batch=3, drop_last=False)
    ]
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_concatenate_to_global_batch(world_size):
    ds = _toy()
    single = list(iterate_batches(ds, 8, shuffle=True, seed=1, epoch=0, drop_last=False))
    per_rank = [
        list(
            iterate_batches(
                ds, 8, shuffle=True, seed=1, epoch=0, drop_last=False, rank=r, world_size=world_size
            )
        )
        for r in range(world_size)
    ]
    assert all(len(p) == len(single) for p in per_rank)
    for step, (images, labels, idx) in enumerate(single):
        assert torch.equal(torch.cat([p[step][2] for p in per_rank]), idx)
        assert torch.equal(torch.cat([p[step][0] for p in per_rank]), images)
        assert torch.equal(torch.cat([p[step][1] for p in per_rank]), labels)
    assert len(per_rank[0][0][2]) == 8 // world_size
    with pytest.raises(ValueError, match="divisible"):
        list(iterate_batches(ds, 6, shuffle=True, seed=1, epoch=0, drop_last=False, world_size=4))


def test_batch_iterator_reuse_and_dataloader_match():
    ds = _toy()
    it = BatchIterator(ds, 6, shuffle=True, seed=5, drop_last=False)
    assert len(it) == 4
    ref = [b[2] for b in it.epoch(1)]
    assert all(torch.equal(a, b[2]) for a, b in zip(ref, it.epoch(1)))
    for workers in (0, 1):
        dl = make_dataloader(ds, 6, shuffle=True, seed=5, epoch=1, drop_last=False, num_workers=workers)
        got = list(dl)
        assert len(got) == len(ref)
        for (images, labels, idx), r in zip(got, ref):
            assert torch.equal(idx, r) and labels.dtype == torch.int64
            assert torch.equal(images, it.images[r])
    assert [
        b.tolist() for b in global_batch_indices(23, 6, shuffle=True, seed=5, epoch=1, drop_last=False)
    ] == [r.tolist() for r in ref]


# ------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_learnable():
    from sklearn.linear_model import LogisticRegression

    train, test, info = make_synthetic(400, 200, image_size=8, channels=3, num_classes=5, seed=0)
    assert train.images.shape == (400, 8, 8, 3) and test.images.shape == (200, 8, 8, 3)
    assert info.num_classes == 5 and np.bincount(train.labels).tolist() == [80] * 5
    t2, _, _ = make_synthetic(400, 200, image_size=8, channels=3, num_classes=5, seed=0)
    assert np.array_equal(train.images, t2.images)
    clf = LogisticRegression(max_iter=500).fit(train.images.reshape(400, -1) / 255.0, train.labels)
    assert clf.score(test.images.reshape(200, -1) / 255.0, test.labels) > 0.9
    one_ch, _, _ = make_synthetic(10, 5, image_size=6, channels=1, num_classes=2, seed=1)
    assert one_ch.images.shape == (10, 6, 6, 1)
