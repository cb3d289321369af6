"""Datasets for the experiments: a strict IDX reader, MNIST-format directories, sklearn digits.

NumPy only: nothing here imports JAX, and scikit-learn is imported only by
:func:`load_digits_dataset`. No function downloads anything; a missing or malformed file is
a ``ValueError`` (or ``FileNotFoundError``) that says what was expected and how to get it.

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/) is a 4-byte magic number
``0x00 0x00 <type code> <number of dimensions>``, then one big-endian uint32 per dimension,
then the values, big-endian, in C order. MNIST, Fashion-MNIST, KMNIST and EMNIST all ship in
it, usually gzipped.
"""

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "Dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_mnist_format",
    "read_idx",
    "write_idx",
]

# IDX type code -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DTYPE_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package puts its gzipped IDX files."""

_HOW_TO_GET = (
    "Get Fashion-MNIST with `make fashion-mnist` (Debian: `apt-get update && apt-get install "
    "-y dataset-fashion-mnist`), or pass a directory of MNIST-format IDX files such as the "
    "original train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
)

# Sanity bound on the header: 2**31 values is far above any IDX dataset in use and keeps a
# corrupted header from asking for an absurd allocation before the length check.
_MAX_VALUES = 2**31


class Dataset(NamedTuple):
    """A train/test split of images and integer labels.

    Attributes:
      x_train: float32 images in ``[0, 1]``, shape ``(n_train, height, width, 1)``.
      y_train: int32 labels, shape ``(n_train,)``.
      x_test: float32 images in ``[0, 1]``, shape ``(n_test, height, width, 1)``.
      y_test: int32 labels, shape ``(n_test,)``.
      name: a short name for reports, e.g. ``"digits"``.
      source: where the data came from (a directory, or ``sklearn.datasets.load_digits``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    source: str


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":  # the gzip magic number
            try:
                with gzip.GzipFile(fileobj=f) as g:
                    return g.read()
            except (OSError, EOFError) as e:
                raise ValueError(
                    f"read_idx: {path} starts like a gzip file but cannot be decompressed "
                    f"({e}); the file is truncated or corrupted. {_HOW_TO_GET}"
                ) from e
        return f.read()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file, gzipped or raw, checking its header against its length.

    Args:
      path: the file; gzip is detected from its first bytes, not from its name.

    Returns:
      A NumPy array of the header's shape, in native byte order (uint8 for images and
      labels of MNIST-style datasets).

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if the magic number, type code or dimensions are malformed, or the
        payload is not exactly as long as the header says (a truncated or padded file).

    Examples:
      >>> import tempfile, os, numpy as np
      >>> from experiments.datasets import read_idx, write_idx
      >>> path = os.path.join(tempfile.mkdtemp(), "x-idx2-ubyte.gz")
      >>> write_idx(path, np.arange(6, dtype=np.uint8).reshape(2, 3))
      >>> read_idx(path)
      array([[0, 1, 2],
             [3, 4, 5]], dtype=uint8)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_idx: no file at {path}. {_HOW_TO_GET}")
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(
            f"read_idx: {path} holds {len(data)} bytes, fewer than the 4-byte IDX magic "
            f"number; it is truncated or not an IDX file. {_HOW_TO_GET}"
        )
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"read_idx: {path} does not start with the IDX magic 0x00 0x00 <type> <ndim>; it "
            f"starts with {data[:4].hex(' ')}. It is not an IDX file. {_HOW_TO_GET}"
        )
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X} ({d.name})" for c, d in _IDX_DTYPES.items())
        raise ValueError(
            f"read_idx: {path} has IDX type code 0x{code:02X}; expected one of {known}. "
            f"The file is corrupted or not an IDX file. {_HOW_TO_GET}"
        )
    if ndim == 0:
        raise ValueError(f"read_idx: {path} declares 0 dimensions; expected at least 1.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"read_idx: {path} declares {ndim} dimensions, so its header is {header} bytes, "
            f"but the file holds only {len(data)} bytes: it is truncated. {_HOW_TO_GET}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    count = 1
    for d in shape:
        count *= d
    if count > _MAX_VALUES:
        raise ValueError(
            f"read_idx: {path} declares shape {shape} ({count} values), more than the "
            f"{_MAX_VALUES} this reader accepts; the header is corrupted."
        )
    dtype = _IDX_DTYPES[code]
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"read_idx: {path} declares shape {shape} of {dtype.name} (type 0x{code:02X}), "
            f"which needs exactly {expected} bytes (after decompression), but it holds "
            f"{len(data)}: the file is {what}. {_HOW_TO_GET}"
        )
    values = np.frombuffer(data, dtype, count=count, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends with ``.gz``.

    Args:
      path: the file to write.
      array: an array of uint8, int8, int16, int32, float32 or float64, of 1 to 255
        dimensions.

    Raises:
      ValueError: if the dtype has no IDX type code or the number of dimensions is out of
        range.
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _DTYPE_CODES:
        raise ValueError(
            f"write_idx: dtype {array.dtype} has no IDX type code; use one of "
            f"{sorted(d.name for d in _DTYPE_CODES)}."
        )
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx: IDX holds 1 to 255 dimensions, got {array.ndim}.")
    code = _DTYPE_CODES[native]
    payload = (
        bytes([0, 0, code, array.ndim])
        + np.asarray(array.shape, ">u4").tobytes()
        + np.ascontiguousarray(array, _IDX_DTYPES[code]).tobytes()
    )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


# train-images-idx3-ubyte(.gz), train-images.idx3-ubyte (MNIST as some mirrors unpack it),
# emnist-digits-train-images-idx3-ubyte.gz, ...
_FILE_RE = re.compile(
    r"^(?:.*[-_])?(?P<split>train|t10k|test)[-_](?P<kind>images|labels)[-.]"
    r"idx(?P<ndim>[13])-ubyte(?:\.gz)?$"
)


def _find_files(data_dir: Path) -> dict[tuple[str, str], Path]:
    found: dict[tuple[str, str], list[Path]] = {}
    for p in sorted(data_dir.iterdir()):
        m = _FILE_RE.match(p.name)
        if m and p.is_file():
            split = "train" if m["split"] == "train" else "test"
            found.setdefault((split, m["kind"]), []).append(p)
    out = {}
    for key, paths in found.items():
        # Prefer the gzipped file when both a .gz and its unpacked twin are present.
        paths.sort(key=lambda p: (not p.name.endswith(".gz"), p.name))
        out[key] = paths[0]
    return out


def load_mnist_format(data_dir: str | os.PathLike, *, name: str | None = None) -> Dataset:
    """Load a directory of MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, ...).

    The directory must hold the four files ``train-images``, ``train-labels``,
    ``t10k-images`` and ``t10k-labels`` (``test-`` is accepted for ``t10k-``), named as the
    original distributions name them: ``train-images-idx3-ubyte.gz``,
    ``train-images.idx3-ubyte``, ``emnist-digits-train-images-idx3-ubyte.gz``...

    Args:
      data_dir: the directory.
      name: the dataset's name in reports; defaults to the directory's name.

    Returns:
      A :class:`Dataset` with images scaled to ``[0, 1]`` and a trailing channel axis.

    Raises:
      FileNotFoundError: if the directory or one of the four files is missing.
      ValueError: if a file is malformed, or images and labels disagree in count, or labels
        are not 1-D / images not 3-D.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"load_mnist_format: {data_dir} is not a directory. {_HOW_TO_GET}")
    files = _find_files(data_dir)
    missing = [
        f"{'t10k' if s == 'test' else s}-{k}-idx{3 if k == 'images' else 1}-ubyte(.gz)"
        for s in ("train", "test")
        for k in ("images", "labels")
        if (s, k) not in files
    ]
    if missing:
        raise FileNotFoundError(
            f"load_mnist_format: {data_dir} lacks {', '.join(missing)}. {_HOW_TO_GET}"
        )
    arrays = {}
    for (split, kind), path in files.items():
        a = read_idx(path)
        want = 3 if kind == "images" else 1
        if a.ndim != want:
            raise ValueError(
                f"load_mnist_format: {path} holds an array of shape {a.shape}; {kind} must "
                f"have {want} dimension(s)."
            )
        arrays[split, kind] = a
    for split in ("train", "test"):
        ni, nl = len(arrays[split, "images"]), len(arrays[split, "labels"])
        if ni != nl:
            raise ValueError(
                f"load_mnist_format: {split} has {ni} images but {nl} labels in {data_dir}."
            )

    def images(a: np.ndarray) -> np.ndarray:
        scale = 255.0 if a.dtype == np.uint8 else max(float(np.abs(a).max()), 1.0)
        return (a.astype(np.float32) / scale)[..., None]

    return Dataset(
        x_train=images(arrays["train", "images"]),
        y_train=arrays["train", "labels"].astype(np.int32),
        x_test=images(arrays["test", "images"]),
        y_test=arrays["test", "labels"].astype(np.int32),
        name=name or data_dir.name,
        source=str(data_dir),
    )


def _dpkg_fashion_dir() -> Path | None:
    if shutil.which("dpkg") is None:
        return None
    try:
        out = subprocess.run(
            ["dpkg", "-L", "dataset-fashion-mnist"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.endswith("train-images-idx3-ubyte.gz"):
            return Path(line).parent
    return None


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; 60,000 train and 10,000 test images).

    Looks in ``data_dir`` when given, else in Debian's install path
    ``/usr/share/datasets/fashion-mnist``, else wherever ``dpkg -L dataset-fashion-mnist``
    says the package put its files.

    Args:
      data_dir: a directory of Fashion-MNIST IDX files, or ``None`` to find Debian's.

    Returns:
      A :class:`Dataset` named ``"fashion-mnist"``.

    Raises:
      FileNotFoundError: if no copy is found; the message says how to install it.
      ValueError: if a file is malformed.
    """
    if data_dir is not None:
        return load_mnist_format(data_dir, name="fashion-mnist")
    for candidate in (FASHION_MNIST_DIR, _dpkg_fashion_dir()):
        if candidate is not None and candidate.is_dir() and len(_find_files(candidate)) == 4:
            return load_mnist_format(candidate, name="fashion-mnist")
    raise FileNotFoundError(
        f"load_fashion_mnist: Fashion-MNIST is not installed (looked in {FASHION_MNIST_DIR} "
        "and asked `dpkg -L dataset-fashion-mnist`). Run `make fashion-mnist`, which runs "
        "`apt-get update && apt-get install -y dataset-fashion-mnist`, or pass "
        "--data-dir DIR with the four IDX files."
    )


def load_digits_dataset(*, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, shipped inside scikit-learn), split in two.

    Args:
      test_fraction: the share held out for testing, stratified by class.
      split_seed: seed of the split; fixed by default so that every training seed is tested
        on the same images.

    Returns:
      A :class:`Dataset` named ``"digits"`` with images scaled to ``[0, 1]``.

    Raises:
      ValueError: if ``test_fraction`` is not in ``(0, 1)``.
      ImportError: if scikit-learn is not installed.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"load_digits_dataset: test_fraction must lie in (0, 1), got {test_fraction}."
        )
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "load_digits_dataset needs scikit-learn: pip install 'fisher-optax[examples]'."
        ) from e
    x, y = load_digits(return_X_y=True)
    x = (x.astype(np.float32) / 16.0).reshape(-1, 8, 8, 1)
    y = y.astype(np.int32)
    rng = np.random.default_rng(split_seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, round(test_fraction * len(idx)), replace=False)] = True
    return Dataset(x[~test], y[~test], x[test], y[test], "digits", "sklearn.datasets.load_digits")
