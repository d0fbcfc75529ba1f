"""Datasets: deterministic train / validation / test splits held on the device.

Sources (the ``name`` of :func:`load`, the ``data`` config key):

- ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, embedded, no network);
- ``mnist``, ``fashion_mnist``, ``kmnist``, ``cifar10``: read with ``tfds.data_source``
  (ArrayRecord files; reading imports no TensorFlow); tfds downloads and prepares them
  the first time on a machine with network (``pip install -e ".[tfds]"``);
- ``idx:DIR``: a folder of MNIST-format files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte`` and/or ``t10k-...``, plain or ``.gz``);
- ``npz:FILE``: arrays ``x``/``y``, or ``x_train``/``y_train`` with optional
  ``x_test``/``y_test``.

A source with its own test split (tfds, ``t10k`` files, ``x_test``) keeps it as the test
split; train and validation come from its training part. A source without one is cut
into all three. The cut depends only on the seed and the sizes, so the same arrays give
the same split from any source.
"""

from __future__ import annotations

import gzip
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from hypergrad.messages import clip, show

MAX_CLASSES = 10_000
"""The most classes a dataset may have: a larger label is a marker or a corrupt file, and
would make a head that size."""


class Dataset(NamedTuple):
    """Three splits, each ``(x, y)`` with x ``float[n, H, W, C]`` in [0, 1], y ``int32[n]``."""

    train: tuple[Any, Any]
    val: tuple[Any, Any]
    test: tuple[Any, Any]
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. ``(8, 8, 1)``."""
        return tuple(self.train[0].shape[1:])


class DataError(ValueError):
    """A dataset cannot be loaded as asked; the message says why and what to do."""


class _Part(NamedTuple):
    """One split of a source: its size and ``read(indices) -> (images, labels)``."""

    size: int
    read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class _Source(NamedTuple):
    train: _Part
    test: _Part | None  # the source's own test split, if it has one
    num_classes: int


def _digits(data_dir: str | None = None) -> _Source:
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download

    bunch = load_digits()
    x = (bunch.images / 16.0)[..., None]
    y = bunch.target.astype(np.int32)
    return _Source(_Part(len(x), lambda i: (x[i], y[i])), None, int(y.max()) + 1)


SOURCES = {"digits": _digits}
TFDS = ("mnist", "fashion_mnist", "kmnist", "cifar10")
PREFIXES = ("idx:", "npz:")
INSTALL_TFDS = 'pip install -e ".[tfds]"'


def check_name(name: str) -> None:
    """Raise :class:`DataError` unless ``name`` names a source :func:`load` knows."""
    if name in SOURCES or name in TFDS:
        return
    prefix = next((p for p in PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        if not name[len(prefix):]:
            what = "DIR" if prefix == "idx:" else "FILE"
            raise DataError(f"data {show(name)} names no path; write {prefix}{what}")
        return
    names = ", ".join([*SOURCES, *TFDS])
    raise DataError(f"unknown dataset {show(name)}; available: {names}, idx:DIR (MNIST-format "
                    "files) or npz:FILE")


def _cut(n: int, seed: int, train_size: int, val_size: int,
         test_size: int | None) -> list[np.ndarray]:
    """Index arrays of train / validation / test in a pool of ``n`` examples."""
    if test_size is None and train_size + val_size >= n:
        what = "exceeds" if train_size + val_size > n else "leaves no test split of"
        raise DataError(f"train_size + val_size = {train_size + val_size} {what} the {n} "
                        "examples available; lower train_size or val_size")
    test_size = n - train_size - val_size if test_size is None else test_size
    sizes = {"train_size": train_size, "val_size": val_size, "test_size": test_size}
    for name, size in sizes.items():
        if size < 1:
            raise DataError(f"{name} must be at least 1 (the dataset has {n} examples)")
    if train_size + val_size + test_size > n:
        raise DataError(
            f"train_size + val_size + test_size = {train_size + val_size + test_size} "
            f"exceeds the {n} examples available"
        )
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([train_size, val_size, test_size])
    return np.split(order, cuts)[:3]


def _cut_with_test(n_train: int, n_test: int, seed: int, train_size: int, val_size: int,
                   test_size: int | None) -> list[np.ndarray]:
    """Train and validation from a pool of ``n_train``; test from the own ``n_test``."""
    for name, size in {"train_size": train_size, "val_size": val_size,
                       "test_size": 1 if test_size is None else test_size}.items():
        if size < 1:
            raise DataError(f"{name} must be at least 1")
    if train_size + val_size > n_train:
        raise DataError(f"train_size + val_size = {train_size + val_size} exceeds the "
                        f"{n_train} training examples available")
    if test_size is not None and test_size > n_test:
        raise DataError(f"test_size {test_size} exceeds the {n_test} test examples available")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_train)
    test = np.arange(n_test) if test_size is None else rng.permutation(n_test)[:test_size]
    return [order[:train_size], order[train_size:train_size + val_size], test]


def split(
    x: np.ndarray, y: np.ndarray, *, seed: int, train_size: int, val_size: int,
    test_size: int | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Shuffle with ``seed`` and cut into train / validation / test (the rest by default)."""
    parts = _cut(len(x), seed, train_size, val_size, test_size)
    return tuple((x[p], y[p]) for p in parts)


def load(
    name: str = "digits", *, seed: int = 0, train_size: int = 1000, val_size: int = 400,
    test_size: int | None = None, data_dir: str | None = None, dtype: Any = jnp.float32,
) -> Dataset:
    """Load a dataset and split it deterministically by ``seed``; arrays go to the device.

    Only the examples the split needs are read and converted to floats.

    Args:
      name: ``digits``, a tfds name in :data:`TFDS`, ``idx:DIR`` or ``npz:FILE``.
      seed: decides the split.
      train_size, val_size, test_size: split sizes. By default the test split is the
        source's own test split if it has one, else the rest (digits: 1000 / 400 / 397).
      data_dir: where tfds keeps its prepared datasets (``None``: tfds's default,
        ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).
      dtype: the images' floating dtype.
    """
    check_name(name)
    if name in SOURCES:
        source = SOURCES[name](data_dir)
    elif name in TFDS:
        source = _tfds(name, data_dir)
    elif name.startswith("idx:"):
        source = _idx(Path(name[4:]).expanduser())
    else:
        source = _npz(Path(name[4:]).expanduser())
    if source.test is None:
        parts = _cut(source.train.size, seed, train_size, val_size, test_size)
        reads = [source.train.read] * 3
    else:
        parts = _cut_with_test(source.train.size, source.test.size, seed, train_size,
                               val_size, test_size)
        reads = [source.train.read, source.train.read, source.test.read]
    splits = []
    for read, index in zip(reads, parts, strict=True):
        x, y = read(index)
        splits.append((jnp.asarray(_images(x, clip(name), dtype)),
                       jnp.asarray(_labels(y, clip(name)))))
    train, val, test = splits
    return Dataset(train, val, test, source.num_classes, name)


def _images(x: np.ndarray, name: str, dtype: Any) -> np.ndarray:
    """Channels-last floats in [0, 1]: uint8 / 255; floats are taken as they are."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{name}: images must be [n, H, W] or [n, H, W, C], got shape "
                        f"{tuple(x.shape)}")
    dtype = np.dtype(dtype)
    if x.dtype == np.uint8:
        return np.asarray(x, dtype) / dtype.type(255)
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not (x.min() >= 0 and x.max() <= 1):
            raise DataError(f"{name}: float images must lie in [0, 1], got values in "
                            f"[{x.min():g}, {x.max():g}]; give uint8 pixels or scale them")
        return np.asarray(x, dtype)
    raise DataError(f"{name}: images must be uint8 or floats in [0, 1], got {x.dtype}")


def _labels(y: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise DataError(f"{name}: labels must be integers of shape [n], got {y.dtype} "
                        f"{tuple(y.shape)}")
    if y.size and y.min() < 0:
        raise DataError(f"{name}: labels must be >= 0, got {y.min()}")
    return y.astype(np.int32)


def _in_memory(x: np.ndarray, y: np.ndarray, where: str) -> _Part:
    """A part from arrays (``x`` may be a memory map: indexing reads only those rows)."""
    if x.ndim not in (3, 4) or 0 in x.shape[1:]:
        raise DataError(f"{where}: images must be [n, H, W] or [n, H, W, C] with every "
                        f"size at least 1, got shape {tuple(x.shape)}")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{where} holds 0 examples")
    return _Part(len(x), lambda i: (np.asarray(x[np.asarray(i)]), np.asarray(y[i])))


def _num_classes(labels: dict[str, np.ndarray]) -> int:
    """One more than the largest label, checked to be a sane class count: at most
    :data:`MAX_CLASSES`, and, given at least as many examples as classes, at least half of
    the classes present (a label of 255 among digits is a marker, not a 256-class
    problem). ``labels`` maps a file to its labels."""
    top = {where: int(y.max()) for where, y in labels.items()}
    where = max(top, key=top.__getitem__)
    classes = top[where] + 1
    if classes > MAX_CLASSES:
        raise DataError(f"{where}: a label of {top[where]} would make {classes} classes (at "
                        f"most {MAX_CLASSES}); labels must be 0 .. classes - 1")
    every = np.concatenate([np.asarray(y) for y in labels.values()])
    present = len(np.unique(every))
    if len(every) >= classes and present < classes / 2:
        raise DataError(f"{where}: labels run to {top[where]} but only {present} of the "
                        f"{classes} classes 0 .. {top[where]} occur; labels must be "
                        "0 .. classes - 1 (is a large label a marker for missing ones?)")
    return classes


def _is(path: Path, where: str, test: Callable[[Path], bool]) -> bool:
    """``test(path)``, or a :class:`DataError` when the path cannot even be looked up (a
    name too long, a folder without permission)."""
    try:
        return test(path)
    except OSError as e:
        raise DataError(f"{where}: cannot look it up ({e.strerror or e})") from None


# --- MNIST-format (IDX) files -------------------------------------------------------------

_IDX_KIND = {"images": 3, "labels": 1}  # dimensions; the magic number is 0x0000080N


def _idx_array(path: Path, kind: str) -> np.ndarray:
    """The uint8 array in an IDX file; a plain file is memory-mapped, not read."""
    ndim = _IDX_KIND[kind]
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                raw = f.read()
            header = raw[:4 + 4 * ndim]
        else:
            with open(path, "rb") as f:
                header = f.read(4 + 4 * ndim)
            raw = None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: truncated or not gzip ({e})") from None
    magic = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
    if magic != 0x800 + ndim:
        found = "too short" if magic is None else f"magic number 0x{magic:08x}"
        raise DataError(f"{path} is not an IDX {kind} file ({found}; expected "
                        f"0x{0x800 + ndim:08x})")
    if len(header) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated (its header is incomplete)")
    dims = tuple(int.from_bytes(header[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims))
    size = len(raw) if raw is not None else path.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: its header says {'x'.join(map(str, dims))} "
                        f"({expected} bytes), the {'data' if raw else 'file'} has {size} bytes")
    if raw is not None:
        return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)
    if kind == "labels":
        return np.fromfile(path, np.uint8, offset=offset)
    return np.memmap(path, np.uint8, mode="r", offset=offset, shape=dims)


def _idx_files(folder: Path) -> dict[str, dict[str, Path]]:
    """``{prefix: {"images": path, "labels": path}}``; plain files win over ``.gz``."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.suffix == ".gz"):
        name = path.name.removesuffix(".gz")
        for kind, ndim in _IDX_KIND.items():
            for sep in ("-", "."):
                tail = f"{kind}{sep}idx{ndim}-ubyte"
                if name.endswith(tail):
                    prefix = name[: -len(tail)].rstrip("-.")
                    found.setdefault(prefix, {}).setdefault(kind, path)
    return found


def _idx(folder: Path) -> _Source:
    where = f"idx:{clip(str(folder))}"
    if not _is(folder, where, Path.is_dir):
        raise DataError(f"{where}: no such folder")
    try:
        found = _idx_files(folder)
    except OSError as e:
        raise DataError(f"{where}: cannot list the folder ({e.strerror or e})") from None
    for prefix, pair in found.items():
        if len(pair) < 2:
            have, want = next(iter(pair.items())), ({"images", "labels"} - set(pair)).pop()
            raise DataError(f"{where}: {have[1].name} has no matching {want} file "
                            f"({prefix}-{want}-idx{_IDX_KIND[want]}-ubyte[.gz])")
    is_test = {p: p.lower().endswith(("t10k", "test")) for p in found}
    train = [p for p in found if not is_test[p]]
    test = [p for p in found if is_test[p]]
    if not found:
        raise DataError(f"{where}: no MNIST-format files (NAME-images-idx3-ubyte[.gz] with "
                        "NAME-labels-idx1-ubyte[.gz])")
    if len(train) > 1 or len(test) > 1:
        raise DataError(f"{where}: several sets of files ({', '.join(sorted(found))}); "
                        "keep one training set (train-) and one test set (t10k-)")
    parts, labels = [], {}
    for prefix in (train or test) + (test if train else []):
        x = _idx_array(found[prefix]["images"], "images")
        y = _idx_array(found[prefix]["labels"], "labels")
        parts.append(_in_memory(x, y, f"{where} ({prefix})"))
        labels[str(found[prefix]["labels"])] = y
    return _Source(parts[0], parts[1] if len(parts) > 1 else None, _num_classes(labels))


# --- npz files ----------------------------------------------------------------------------

def _npz(path: Path) -> _Source:
    where = f"npz:{clip(str(path))}"
    if not _is(path, where, Path.is_file):
        raise DataError(f"{where}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if {"x_train", "y_train"} <= keys:
                names = ["x_train", "y_train"]
                if {"x_test", "y_test"} & keys:
                    names += ["x_test", "y_test"]
            else:
                names = ["x", "y"]
            if not set(names) <= keys:
                raise DataError(f"{where} has arrays {', '.join(sorted(keys)) or 'none'}; "
                                "expected x and y, or x_train, y_train (and x_test, y_test)")
            arrays = [f[k] for k in names]
    except DataError:
        raise
    except (OSError, EOFError, TypeError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{where} is not a readable .npz file ({e})") from None
    if len(arrays) == 4 and len(arrays[2]) == len(arrays[3]) == 0:
        raise DataError(f"{where}: x_test and y_test hold 0 examples; leave them out to cut "
                        "the test split from x_train, y_train")
    parts = [_in_memory(arrays[k], arrays[k + 1], f"{where} ({names[k]}, {names[k + 1]})")
             for k in range(0, len(arrays), 2)]
    num_classes = _num_classes({f"{where} ({n})": _labels(a, where)
                                for n, a in zip(names[1::2], arrays[1::2], strict=True)})
    return _Source(parts[0], parts[1] if len(parts) > 1 else None, num_classes)


# --- tensorflow-datasets ------------------------------------------------------------------

def _tfds(name: str, data_dir: str | None) -> _Source:
    try:
        import tensorflow_datasets as tfds  # only here: it is an optional, heavy import
    except ImportError:
        raise DataError(f"dataset {name!r} is read with tensorflow-datasets, which is not "
                        f"installed: {INSTALL_TFDS}") from None
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # tfds logs warnings to stderr; our errors are one line
    try:
        # data_source reads ArrayRecord files only; tfds prepares TFRecord unless told.
        kwargs = {"file_format": "array_record"}
        builder = tfds.builder(name, data_dir=data_dir, **kwargs)
        if not builder.is_prepared():
            try:
                builder.download_and_prepare()
            except Exception as e:  # no network, no TensorFlow, a broken download, ...
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
                raise DataError(
                    f"{name} is not prepared in {where} and could not be downloaded "
                    f"({type(e).__name__}: {reason}); prepare it on a machine with network "
                    f"(`{INSTALL_TFDS}` then `tfds build {name} --file_format=array_record "
                    "--data_dir DIR`), copy DIR "
                    "here and --set data.data_dir=DIR, or use data=idx:DIR with "
                    "MNIST-format files") from None
        try:
            train, test = tfds.data_source(name, split=["train", "test"], data_dir=data_dir,
                                           builder_kwargs=kwargs, download=False)
        except (NotImplementedError, ValueError) as e:  # prepared as TFRecord only
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DataError(
                f"{name} in {builder.data_dir} cannot be read with random access ({reason}); "
                f"prepare it again with `tfds build {name} --file_format=array_record` "
                "into another --data_dir") from None
        num_classes = builder.info.features["label"].num_classes
    finally:
        absl.setLevel(level)

    def part(source) -> _Part:
        def read(index):
            examples = [source[int(i)] for i in index]
            return (np.stack([e["image"] for e in examples]),
                    np.asarray([e["label"] for e in examples], dtype=np.int64))
        return _Part(len(source), read)

    return _Source(part(train), part(test), num_classes)
