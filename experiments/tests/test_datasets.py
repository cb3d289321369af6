"""Tests of experiments/datasets.py (the IDX reader and the loaders), on small files written here.

The module is part of the experiments, not of the package: it imports as
``experiments.datasets`` from the repository root, which pytest puts on ``sys.path`` (the
root conftest.py).
"""

import doctest
import gzip
import struct

import numpy as np
import pytest

from experiments import datasets
from experiments.datasets import load_digits_dataset, load_mnist_format, read_idx, write_idx


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An independent IDX encoder (struct, not write_idx) to test the reader against."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_matches_independent_encoder(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
    raw = _idx_bytes(a, CODES[dtype])
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize("name", ["x-idx1-ubyte", "x-idx1-ubyte.gz"])
@pytest.mark.parametrize("shape", [(7,), (2, 3), (2, 1, 3, 1)])
def test_write_read_roundtrip(tmp_path, name, shape):
    a = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    write_idx(tmp_path / name, a)
    # gzip is detected from the content, not the name.
    assert (tmp_path / name).read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b"\0\0")
    np.testing.assert_array_equal(read_idx(tmp_path / name), a)


def test_empty_dimension_roundtrips(tmp_path):
    a = np.zeros((0, 28, 28), np.uint8)
    write_idx(tmp_path / "e.idx", a)
    assert read_idx(tmp_path / "e.idx").shape == (0, 28, 28)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload(tmp_path, gz):
    raw = _idx_bytes(np.ones((4, 5), np.uint8), 0x08)[:-3]
    path = tmp_path / "t.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match=r"needs exactly 32 bytes.*holds 29.*truncated"):
        read_idx(path)


def test_too_long_payload(tmp_path):
    path = tmp_path / "t.idx"
    path.write_bytes(_idx_bytes(np.ones((4, 5), np.uint8), 0x08) + b"\0")
    with pytest.raises(ValueError, match="longer than its header says"):
        read_idx(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "t.idx"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 1]))
    with pytest.raises(ValueError, match=r"header is 16 bytes.*only 8 bytes"):
        read_idx(path)
    path.write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="fewer than the 4-byte IDX magic"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "t.idx.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.ones((40, 50), np.uint8), 0x08))[:-12])
    with pytest.raises(ValueError, match="cannot be decompressed"):
        read_idx(path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "w.idx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match=r"IDX magic.*89 50 4e 47.*make fashion-mnist"):
        read_idx(path)


def test_unknown_type_code(tmp_path):
    path = tmp_path / "w.idx"
    path.write_bytes(bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(ValueError, match="type code 0x0A"):
        read_idx(path)


def test_zero_dimensions(tmp_path):
    path = tmp_path / "w.idx"
    path.write_bytes(bytes([0, 0, 8, 0]))
    with pytest.raises(ValueError, match="0 dimensions"):
        read_idx(path)


def test_huge_header_is_refused_before_allocating(tmp_path):
    path = tmp_path / "w.idx"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**20, 2**20, 2**20) + bytes(10))
    with pytest.raises(ValueError, match="header is corrupted"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="make fashion-mnist"):
        read_idx(tmp_path / "nope.gz")


def test_write_rejects_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="no IDX type code"):
        write_idx(tmp_path / "a.idx", np.zeros(3, np.complex64))


def _write_mnist_dir(d, n_train=6, n_test=4, naming="{split}-{kind}-idx{nd}-ubyte.gz"):
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 5, 7), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(d / naming.format(split=split, kind="images", nd=3), images)
        write_idx(d / naming.format(split=split, kind="labels", nd=1), labels)
        out[split] = images, labels
    return out


@pytest.mark.parametrize(
    "naming",
    [
        "{split}-{kind}-idx{nd}-ubyte.gz",  # MNIST / Fashion-MNIST
        "{split}-{kind}-idx{nd}-ubyte",  # unpacked
        "{split}-{kind}.idx{nd}-ubyte",  # MNIST as some mirrors unpack it
        "emnist-digits-{split}-{kind}-idx{nd}-ubyte.gz",  # EMNIST
    ],
)
def test_load_mnist_format(tmp_path, naming):
    ref = _write_mnist_dir(tmp_path, naming=naming)
    (tmp_path / "README").write_text("not an IDX file")
    ds = load_mnist_format(tmp_path, name="toy")
    assert ds.name == "toy"
    assert ds.x_train.shape == (6, 5, 7, 1) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (4, 5, 7, 1) and ds.y_test.dtype == np.int32
    np.testing.assert_allclose(ds.x_train[..., 0], ref["train"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, ref["t10k"][1])


def test_load_mnist_format_missing_file(tmp_path):
    _write_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-labels-idx1-ubyte.*make fashion"):
        load_mnist_format(tmp_path)


def test_load_mnist_format_count_mismatch(tmp_path):
    _write_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="train has 6 images but 5 labels"):
        load_mnist_format(tmp_path)


def test_load_mnist_format_wrong_rank(tmp_path):
    _write_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((6, 2), np.uint8))
    with pytest.raises(ValueError, match="labels must have 1 dimension"):
        load_mnist_format(tmp_path)


def test_load_mnist_format_not_a_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_mnist_format(tmp_path / "nope")


def test_load_fashion_mnist_explicit_dir(tmp_path):
    _write_mnist_dir(tmp_path)
    assert datasets.load_fashion_mnist(tmp_path).name == "fashion-mnist"


def test_load_fashion_mnist_not_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setattr(datasets, "_dpkg_fashion_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="make fashion-mnist"):
        datasets.load_fashion_mnist()


def test_load_digits_dataset():
    ds = load_digits_dataset()
    assert ds.x_train.shape[1:] == (8, 8, 1)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    # Stratified: every class in the test set, with 35 to 37 images each.
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # The split is fixed by split_seed, and differs with it.
    np.testing.assert_array_equal(load_digits_dataset().y_test, ds.y_test)
    other = load_digits_dataset(split_seed=1)
    assert not np.array_equal(other.x_test, ds.x_test)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_dataset(test_fraction=1.0)


def test_docstring_examples_run():
    # experiments/ is outside pytest's doctest paths: run the module's examples here.
    result = doctest.testmod(datasets, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0


def test_not_in_the_package():
    import importlib

    import fisher_optax

    assert not hasattr(fisher_optax, "load_digits_dataset")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fisher_optax.datasets")
