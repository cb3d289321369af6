"""Compressed export of :class:`~fisher_optax.QuantizedParams`: one self-checking binary file.

The streams that carry information (the positions of the kept weights, the width map and
the codes of each ``b``-bit group) are entropy-coded with an order-0 model each: the
symbol frequencies are stored in the file and the symbols are coded with asymmetric
numeral systems (ANS, the ``constriction`` library), so a stream costs its order-0
entropy plus a few bytes. The positions of the kept weights are coded per leaf in whichever
of two ways is shorter: relative indices (Han et al. 2016), or the mask itself, with the
slices that keep nothing (dead units) flagged once per axis and a count of kept weights per
slice along one axis. Leaves that :func:`~fisher_optax.quantize` keeps raw (biases, norm
statistics, step counters, PRNG keys) are stored exactly, with their dtype.

A file is a 24-byte header (magic, version, flags, leaf count, payload size, CRC-32 of the
payload) and a payload of one record per leaf: its path, kind, dtype and shape, then
either its raw bytes or its codebooks and coded streams. The byte-level layout, version
by version, is in ``docs/file_format.md``; the constants below name its fields.

Safety: nothing in the file is executed or unpickled. The payload size and the CRC-32 are
checked before anything is parsed, every size against the bytes left before an array is
made, and all leaves together may declare at most 1024 elements per payload byte, so a
hostile file cannot make the reader allocate or decode more than a fixed multiple of its
own size.
"""

import contextlib
import math
import os
import secrets
import struct
import zlib
from typing import Any, NamedTuple

import constriction
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fisher_optax import _validate
from fisher_optax._tree import is_flax_variable, key_paths, keystr, strip_value
from fisher_optax.quantize import MAX_BITS, QuantizedParams

__all__ = [
    "CompressionReport",
    "LeafReport",
    "StreamReport",
    "compression_report",
    "load_compressed",
    "save_compressed",
]

MAGIC = b"FOQZ"
# The version the writer writes. Version 3 added a per-leaf axis byte (per-slice
# codebooks), version 4 the mask position coding (mode 2); the reader reads all three.
VERSION = 4
_VERSIONS = (2, 3, 4)
# Header, little-endian: magic, version u16, flags u16 (0), num_leaves u32, payload_size
# u64, crc32(payload) u32.
_HEADER = struct.Struct("<4sHHIQI")
# The dtype codes (u8) of leaves and codebooks: a dtype's index in this tuple.
_DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "key",
)
_FLOATS = 4  # the first four codes are float dtypes (codebooks)
_KEY = _DTYPES.index("key")
_QUANTIZED, _RAW = 0, 1  # a leaf record's kind byte
# A path level's kind byte: dict str key, list index, tuple index, dict int key,
# attribute name, flattened index.
_DICT, _LIST, _TUPLE, _INTKEY, _ATTR, _FLAT = 0, 1, 2, 3, 4, 5
_MAX_INDEX_BITS = 16  # the widest relative-index entry (r in 1..16)
_TABLE_TOTAL = 1 << 16  # frequencies are scaled to sum to at most this
_WEIGHTS_PER_BYTE = 1024  # a file declares at most this many elements per payload byte
_ANS = constriction.stream.stack
_MODEL = constriction.stream.model


# --------------------------------------------------------------------------- tree paths


def _tree_paths(treedef) -> list[tuple[tuple[int, Any], ...]]:
    """Per leaf, its path as ``((kind, key), ...)``, read from jax key paths.

    The ``.value`` hop into a Flax Variable is dropped (a user's field named ``value`` is
    kept, told apart by the node's type as :func:`fisher_optax._tree.key_paths` does), so an
    ``nnx.State`` of Variables is recorded as the nested dict of its ``to_pure_dict()``.
    A sequence index is a tuple index when its parent node is a plain tuple, else a list
    index.
    """
    n = treedef.num_leaves
    skeleton = jax.tree.unflatten(treedef, list(range(n)))
    out: list[Any] = [None] * n
    for kpath, leaf in jax.tree_util.tree_flatten_with_path(skeleton)[0]:
        node, path = skeleton, []
        for depth, k in enumerate(kpath):
            parent = node
            node = _follow(node, k)
            if is_flax_variable(parent) and isinstance(k, jax.tree_util.GetAttrKey):
                continue  # the Flax Variable hop: see key_paths
            path.append(_kind_key(k, parent, kpath[:depth]))
        out[leaf] = tuple(path)
    return out


def _follow(node, k):
    """The child of ``node`` at key ``k``, as the pytree registry flattens ``node``.

    No attribute is read, so a Flax Variable's deprecated ``.value`` is never touched.
    """
    children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
    return next((child for path, child in children if path == (k,)), None)


def _kind_key(k, parent, kpath) -> tuple[int, Any]:
    where = keystr(strip_value(kpath))
    if isinstance(k, jax.tree_util.DictKey):
        if isinstance(k.key, str):
            return (_DICT, k.key)
        if isinstance(k.key, int | np.integer) and not isinstance(k.key, bool):
            if not -(2**63) <= int(k.key) < 2**63:
                raise ValueError(f"params has a dict key {k.key} out of int64 range at {where}.")
            return (_INTKEY, int(k.key))
        raise ValueError(
            f"params has a dict key {k.key!r} of type {type(k.key).__name__} at {where}; "
            "the file records str and int dict keys. Rename the key to a str or an int."
        )
    if isinstance(k, jax.tree_util.SequenceKey):
        return (_TUPLE if type(parent) is tuple else _LIST, int(k.idx))
    if isinstance(k, jax.tree_util.GetAttrKey):
        return (_ATTR, k.name)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return (_FLAT, int(k.key))
    raise ValueError(
        f"params has a key {k!r} of type {type(k).__name__} at {where}; the file records "
        "dict keys, sequence indices, attributes and flattened indices."
    )


def _fmt(path) -> str:
    return "".join(f".{k}" if kind == _ATTR else f"[{k!r}]" for kind, k in path) or "<root>"


# dict str keys, int keys and attributes all come back as dict keys; flattened indices as
# list indices.
_NODE = {_DICT: "dict", _INTKEY: "dict", _ATTR: "dict", _LIST: "list", _FLAT: "list"}
_NODE[_TUPLE] = "tuple"


def _build_tree(paths):
    """The nested dict/list/tuple with leaf ``i`` at ``paths[i]``; checks the indices."""
    if len(paths) == 1 and not paths[0]:
        return 0
    if any(not p for p in paths):
        raise ValueError("load_compressed: a root leaf next to other leaves: corrupted file.")

    def build(items):
        kinds = {_NODE[p[0][0]] for p, _ in items}
        if len(kinds) != 1:
            raise ValueError("load_compressed: mixed node kinds at one level: corrupted file.")
        kind = kinds.pop()
        children: dict[Any, list] = {}
        for p, i in items:
            children.setdefault(p[0][1], []).append((p[1:], i))

        def child(group):
            if len(group) == 1 and not group[0][0]:
                return group[0][1]
            if any(not p for p, _ in group):
                raise ValueError("load_compressed: a leaf and a node share a path: corrupted.")
            return build(group)

        if kind == "dict":
            if len({type(k) for k in children}) != 1:
                raise ValueError("load_compressed: str and int keys in one dict: corrupted.")
            return {k: child(g) for k, g in children.items()}
        keys = sorted(children)
        if keys != list(range(len(keys))):
            raise ValueError("load_compressed: list/tuple indices are not 0..n-1: corrupted.")
        seq = [child(children[k]) for k in keys]
        return seq if kind == "list" else tuple(seq)

    return build([(p, i) for i, p in enumerate(paths)])


# --------------------------------------------------------------------------- varints


def _varints(values) -> bytes:
    """LEB128 encoding of non-negative ints below 2^63, vectorised."""
    v = np.asarray(values, np.uint64).reshape(-1)
    if v.size == 0:
        return b""
    shifts = np.arange(9, dtype=np.uint64) * np.uint64(7)
    groups = (v[:, None] >> shifts[None, :]) & np.uint64(127)
    nbytes = 1 + sum((v >= np.uint64(1 << (7 * k))).astype(np.int64) for k in range(1, 9))
    live = np.arange(9)[None, :] < nbytes[:, None]
    more = np.arange(9)[None, :] < (nbytes - 1)[:, None]
    out = (groups.astype(np.uint8) | (more * 128).astype(np.uint8))[live]
    return out.tobytes()


def _varint_sizes(values) -> int:
    v = np.asarray(values, np.int64)
    return int(np.sum(1 + (v >= 1 << 7) + (v >= 1 << 14) + (v >= 1 << 21)))


# --------------------------------------------------------------------------- streams


def _table(counts: np.ndarray) -> np.ndarray:
    """Frequencies stored for ``counts``: the counts, scaled to sum <= 2^16 if needed.

    Every used symbol keeps a frequency of at least 1: the used ones get 1 each and share
    the rest of the total in proportion to their counts, so the sum never exceeds 2^16
    (which the reader refuses), however many rare symbols there are.
    """
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total <= _TABLE_TOTAL:
        return counts
    used = counts > 0
    spare = _TABLE_TOTAL - int(used.sum())  # >= 0: an alphabet holds at most 2^16 symbols
    return np.where(used, 1 + counts * spare // total, 0)


def _entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy of a stream with these symbol counts, in bits (n * H)."""
    c = np.asarray(counts, np.float64)
    c = c[c > 0]
    n = c.sum()
    return max(0.0, float(-(c * np.log2(c / n)).sum())) if n else 0.0


def _model(freq: np.ndarray):
    return _MODEL.Categorical(freq.astype(np.float64), perfect=False)


class _Stream(NamedTuple):
    data: bytes
    table_bytes: int
    symbols: int
    entropy_bits: float


def _table_bytes(freq: np.ndarray) -> bytes:
    """A frequency table: ``0`` then every entry (dense), or ``U`` then ``U`` pairs of
    (index step, frequency) for the used symbols (sparse), whichever is shorter."""
    used = np.flatnonzero(freq)
    dense = _varints(np.concatenate([[0], freq]))
    if used.size == 0:
        return dense
    steps = np.diff(np.concatenate([[-1], used])) - 1
    pairs = np.stack([steps, freq[used]], axis=1).reshape(-1)
    sparse = _varints(np.concatenate([[used.size], pairs]))
    return sparse if len(sparse) < len(dense) else dense


def _encode_stream(symbols: np.ndarray, alphabet: int) -> _Stream:
    symbols = np.asarray(symbols, np.int32)
    counts = np.bincount(symbols, minlength=alphabet)
    freq = _table(counts)
    table = _table_bytes(freq)
    out = table
    if np.count_nonzero(freq) > 1:
        coder = _ANS.AnsCoder()
        coder.encode_reverse(symbols, _model(freq))
        words = coder.get_compressed()
        out += _varints([words.size]) + words.astype("<u4").tobytes()
    return _Stream(out, len(table), int(symbols.size), _entropy_bits(counts))


def _stream_cost(counts: np.ndarray) -> float:
    """Estimated bytes of a stream with these counts: its table and its entropy."""
    freq = _table(counts)
    used = freq[freq > 0]
    dense = _varint_sizes(freq)
    # An empty stream's table is the dense one (the sparse form needs a used symbol).
    table = min(dense, 2 * used.size + _varint_sizes(used)) if used.size else dense
    return table + _entropy_bits(counts) / 8 + 4


# --------------------------------------------------------------------------- positions


def _gap_counts(values: np.ndarray, counts: np.ndarray, tail: int, r: int) -> np.ndarray:
    """Symbol counts of the entries for gaps given as a histogram (``values``, ``counts``)."""
    fill = (1 << r) - 1
    out = np.bincount(values % fill, weights=counts, minlength=fill + 1).astype(np.int64)
    out[fill] += int(np.sum((values // fill) * counts)) + tail // fill
    return out


def _relative_entries(positions: np.ndarray, n: int, r: int) -> np.ndarray:
    """Gap entries (with fillers) for kept ``positions`` of a leaf of ``n`` weights."""
    fill = (1 << r) - 1
    positions = np.asarray(positions, np.int64)
    prev = np.concatenate([[-1], positions[:-1]])
    gaps = positions - prev - 1
    tail = (n - 1) - (int(positions[-1]) if positions.size else -1)
    runs = gaps // fill + 1  # fillers, then the entry of the kept weight
    ends = np.cumsum(runs) - 1
    total = int(ends[-1]) + 1 if positions.size else 0
    entries = np.full(total + tail // fill, fill, np.int64)
    entries[ends] = gaps % fill
    return entries


def _positions_bits(gaps: np.ndarray, tail: int) -> int:
    """The index width r whose stream (table + entropy) is smallest."""
    mean = (gaps.sum() + tail) / max(gaps.size, 1)
    r0 = max(1, math.ceil(math.log2(mean + 2)))
    # Entropy coding makes fillers cheap, so small r often wins: try every r up to r0 + 3.
    candidates = range(1, min(_MAX_INDEX_BITS, r0 + 3) + 1)
    # One histogram of the gaps, then each candidate costs O(distinct gaps), not O(kept).
    small = gaps < 1 << 16
    hist = np.bincount(gaps[small])
    values = np.concatenate([np.flatnonzero(hist), gaps[~small]])
    counts = np.concatenate([hist[hist > 0], np.ones(int((~small).sum()), np.int64)])
    costs = {r: _stream_cost(_gap_counts(values, counts, tail, r)) for r in candidates}
    # Of the widths within 0.5% of the smallest stream, the widest: fewer symbols to
    # decode (a small r turns the stream into a bit map of n symbols).
    best = min(costs.values())
    return max(r for r, c in costs.items() if c <= 1.005 * best + 4)


# Position modes (u8): relative index coding, every weight kept, the mask coded by slices.
_RELATIVE, _ALL_KEPT, _MASK = 0, 1, 2
# The longest slice whose kept weights the mask coding counts: its decoder takes one step
# per position within a slice (all slices at once), so this bounds its Python loop.
_MAX_SLICE = 1 << 14
_COUNT_LENGTHS = 15  # the bit lengths of slice counts, 1..15 (a count is at most 2^14)
# The mask coding is written only where it is at least 1% shorter than relative indices:
# its decoder is the slower of the two (a Python step per position within a slice).
_MASK_GAIN = 0.99
_BERNOULLI = _MODEL.Bernoulli(perfect=False)
_UNIFORM = _MODEL.Uniform()


def _relative_record(kept: np.ndarray, n: int) -> tuple[bytes, _Stream]:
    """The relative-index position record (mode 0) of the kept flat indices ``kept``."""
    prev = np.concatenate([[-1], kept[:-1]])
    gaps = kept - prev - 1
    tail = (n - 1) - (int(kept[-1]) if kept.size else -1)
    r = _positions_bits(gaps, tail)
    entries = _relative_entries(kept, n, r)
    s = _encode_stream(entries, 1 << r)
    return struct.pack("<BBQ", _RELATIVE, r, entries.size) + s.data, s


def _flag_bits(dead: int, length: int) -> float:
    """Bits of ``length`` flags of which ``dead`` are set, coded with p = dead / length."""
    return _entropy_bits(np.array([dead, length - dead]))


def _log2_binomial(m: int, k: np.ndarray) -> float:
    """``sum(log2 C(m, k))``: the exact cost of each slice's bits under the count model."""
    lg = np.vectorize(math.lgamma, otypes=[np.float64])
    k = np.asarray(k, np.float64)
    return float(np.sum(lg(m + 1.0) - lg(k + 1.0) - lg(m - k + 1.0)) / math.log(2))


def _slice_length(live_shape: tuple[int, ...], axis: int) -> int:
    return math.prod(live_shape) // live_shape[axis]


def _bit_lengths(counts: np.ndarray) -> np.ndarray:
    """``int.bit_length`` of each count (all >= 1), in integers."""
    return np.searchsorted(1 << np.arange(_COUNT_LENGTHS + 1), counts, side="right")


def _count_table(lengths: np.ndarray) -> np.ndarray:
    return _table(np.bincount(lengths - 1, minlength=_COUNT_LENGTHS))


def _mask_cost(live: np.ndarray, axis: int | None) -> tuple[float, bool]:
    """Bits of the live sub-mask's counts and elements: one probability when ``axis`` is
    None, else a count per slice along ``axis`` and each slice's bits given its count;
    and whether the counts are cheaper by bit length than uniform in ``1..m``."""
    kept = int(np.count_nonzero(live))
    if axis is None:
        return _flag_bits(kept, live.size), False
    m = _slice_length(live.shape, axis)
    others = tuple(b for b in range(live.ndim) if b != axis)
    counts = np.count_nonzero(live, axis=others)
    uniform = counts.size * math.log2(m)
    lengths = _bit_lengths(counts)
    by_length = (
        8 * len(_table_bytes(_count_table(lengths)))
        + _entropy_bits(np.bincount(lengths))
        + float(np.sum(lengths - 1))
    )
    return min(uniform, by_length) + _log2_binomial(m, counts), by_length < uniform


def _slice_bits(live: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The live sub-mask's elements in decoding order (position within a slice, then
    slice) and the probability of each: the slice's kept weights not yet coded over its
    positions not yet coded, so a slice of length m with k kept costs log2 C(m, k)."""
    slices = np.moveaxis(live, axis, 0).reshape(live.shape[axis], -1)
    m = slices.shape[1]
    bits = slices.T.astype(np.int64)  # (m, slices): step t decodes every slice's t-th bit
    before = np.cumsum(bits, axis=0) - bits
    p = (bits.sum(axis=0)[None, :] - before) / (m - np.arange(m, dtype=np.int64))[:, None]
    return bits.reshape(-1).astype(np.int32), p.reshape(-1)


def _mask_record(
    mask: np.ndarray, limit: float = math.inf
) -> tuple[bytes, float, int | None, int] | None:
    """The mask position record (mode 2): the slices without a kept weight along each
    axis (dead units, unused features) flagged once, then the rest of the mask, with a
    count per slice along the axis where that is shortest. Returns the record, its
    information content in bits, the count axis and the number of coded symbols; or
    ``None``, before any coding, when the information content exceeds ``limit`` bytes."""
    kept = int(np.count_nonzero(mask))
    dead = [
        ~np.any(mask, axis=tuple(b for b in range(mask.ndim) if b != a)) for a in range(mask.ndim)
    ]
    live = mask[np.ix_(*(~d for d in dead))] if mask.ndim else mask
    axes = [a for a in range(live.ndim) if live.size and _slice_length(live.shape, a) <= _MAX_SLICE]
    costs = {a: _mask_cost(live, a) for a in (None, *axes)}
    axis = min(costs, key=lambda a: costs[a][0])
    bits_cost, by_length = costs[axis]
    info = bits_cost + sum(_flag_bits(int(d.sum()), d.size) for d in dead)
    if info / 8 > limit:
        return None
    coder = _ANS.AnsCoder()
    symbols = 0
    table = b""
    # The stack codes last what is decoded first: the elements, the counts, the flags.
    if axis is None:
        if 0 < kept < live.size:
            flat = live.reshape(-1).astype(np.int32)
            coder.encode_reverse(flat, _BERNOULLI, np.full(flat.size, kept / live.size))
            symbols += flat.size
    else:
        bits, p = _slice_bits(live, axis)
        coder.encode_reverse(bits, _BERNOULLI, p)
        m = _slice_length(live.shape, axis)
        others = tuple(b for b in range(live.ndim) if b != axis)
        counts = np.count_nonzero(live, axis=others).astype(np.int64)
        if by_length:  # each count's bit length (order-0), then its bits below the top one
            lengths = _bit_lengths(counts)
            freq = _count_table(lengths)
            table = _table_bytes(freq)
            low = lengths > 1
            sizes = (1 << (lengths[low] - 1)).astype(np.int32)
            coder.encode_reverse((counts[low] - sizes).astype(np.int32), _UNIFORM, sizes)
            if np.count_nonzero(freq) > 1:
                coder.encode_reverse((lengths - 1).astype(np.int32), _model(freq))
            symbols += counts.size + int(low.sum())
        elif m > 1:
            coder.encode_reverse(
                (counts - 1).astype(np.int32), _UNIFORM, np.full(counts.size, m, np.int32)
            )
            symbols += counts.size
        symbols += bits.size
    for d in reversed(dead):
        if 0 < d.sum() < d.size:
            p = np.full(d.size, int(d.sum()) / d.size)
            coder.encode_reverse(d.astype(np.int32), _BERNOULLI, p)
            symbols += d.size
    words = coder.get_compressed()
    code = 0 if axis is None else 2 * axis + 1 + by_length
    head = _varints([kept, code, *(int(d.sum()) for d in dead)]) + table
    data = struct.pack("<B", _MASK) + head + _varints([words.size]) + words.astype("<u4").tobytes()
    return data, info, axis, symbols


# --------------------------------------------------------------------------- encoding


class StreamReport(NamedTuple):
    """Size of one entropy-coded stream (or of the sum of several, for a leaf's codes).

    Attributes:
      symbols: how many symbols it codes.
      bytes: its bytes in the file: frequency table, word count and coded words.
      table_bytes: the bytes of its frequency table (part of ``bytes``).
      entropy_bytes: the order-0 entropy of its symbols, ``n * H / 8``, computed from the
        empirical symbol frequencies: what an ideal coder with a free table would spend.
    """

    symbols: int
    bytes: int
    table_bytes: int
    entropy_bytes: float


_EMPTY = StreamReport(0, 0, 0, 0.0)


def _add(a: StreamReport, b: StreamReport) -> StreamReport:
    return StreamReport(*(x + y for x, y in zip(a, b, strict=True)))


def _from(stream: _Stream, extra: int = 0) -> StreamReport:
    return StreamReport(
        stream.symbols, len(stream.data) + extra, stream.table_bytes, stream.entropy_bits / 8
    )


class LeafReport(NamedTuple):
    """Sizes of one leaf's record in the file.

    Attributes:
      path: the leaf's key path, e.g. ``['dense']['kernel']``.
      shape: its shape.
      dtype: its dtype name.
      quantized: True for a quantized leaf, False for one stored raw.
      weights: its element count.
      kept: kept (non-pruned) weights; all elements for a raw leaf.
      widths: the bit widths it uses (``()`` when raw).
      bytes: the whole record; the sum of the five fields below.
      header_bytes: path, kind, dtype, shape (and, quantized, book dtype and widths).
      codebook_bytes: the codebook values (0 when raw).
      raw_bytes: the stored elements of a raw leaf (0 when quantized).
      positions: the position record (its mode byte and fields included);
        ``StreamReport(0, 1, 0, 0.0)`` when every weight is kept. With the mask coding,
        ``entropy_bytes`` is the information content of the symbols under its model.
      width_map: the width-map stream (empty with one width).
      codes: the code streams of all its width groups together.
      axis: ``None``, or the axis whose slices have codebooks of their own; their
        entries (and each width's stream of per-slice entry counts) are in
        ``codebook_bytes``.
      position_coding: how the positions are coded: ``"all"`` (every weight kept, or a
        raw leaf), ``"relative"`` (relative indices) or ``"mask"`` (dead slices flagged,
        then the rest of the mask bit by bit); see ``docs/file_format.md``.
      position_axis: with ``"mask"``, the axis along which each slice's kept weights are
        counted, or ``None`` for one probability for the whole mask.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    quantized: bool
    weights: int
    kept: int
    widths: tuple[int, ...]
    bytes: int
    header_bytes: int
    codebook_bytes: int
    raw_bytes: int
    positions: StreamReport
    width_map: StreamReport
    codes: StreamReport
    axis: int | None = None
    position_coding: str = "all"
    position_axis: int | None = None


class CompressionReport(NamedTuple):
    """Sizes of the file :func:`save_compressed` writes, per leaf and in total.

    Attributes:
      leaves: one :class:`LeafReport` per leaf, in flattening order.
      header_bytes: the file header (24).
      padding_bytes: the payload padding (4 bytes of length, plus zeros in the rare file
        that would declare more than 1024 elements per byte).
      total_bytes: the file size: header, padding and every leaf's bytes.
      entropy_bytes: header, codebooks, raw leaves, frequency tables and the order-0
        entropy of every stream: what the file would be with ideal entropy coders.
      weights: elements over all leaves.
      dense_float32_bytes: 4 bytes per element, the uncompressed float32 baseline.
      ratio: ``dense_float32_bytes / total_bytes``.
      bits_per_weight: ``8 * total_bytes / weights``.
    """

    leaves: tuple[LeafReport, ...]
    header_bytes: int
    padding_bytes: int
    total_bytes: int
    entropy_bytes: float
    weights: int
    dense_float32_bytes: int
    ratio: float
    bits_per_weight: float


def _dtype_code(dtype, where: str) -> int:
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return _KEY
    name = str(np.dtype(dtype))
    if name not in _DTYPES:
        raise ValueError(
            f"params at {where} has dtype {name}; the file stores {', '.join(_DTYPES[:-1])} "
            "and PRNG keys. Cast the leaf to one of them before quantize."
        )
    return _DTYPES.index(name)


def _raw_bytes(arr: np.ndarray) -> bytes:
    """The elements of ``arr`` in C order, little-endian (bfloat16 and bool included)."""
    arr = np.ascontiguousarray(arr)
    size = arr.dtype.itemsize
    return arr.reshape(-1).view(f"u{size}").astype(f"<u{size}").tobytes()


def _from_raw(data: bytes, dtype, shape) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    return np.frombuffer(data, f"<u{size}").astype(f"u{size}").view(dtype).reshape(shape)


def _path_bytes(path) -> bytes:
    rec = bytearray(struct.pack("<H", len(path)))
    for kind, key in path:
        if kind in (_DICT, _ATTR):
            raw = key.encode("utf-8")
            if len(raw) > 0xFFFF:
                raise ValueError(f"params has a key longer than 65535 bytes at {_fmt(path)}.")
            rec += struct.pack("<BH", kind, len(raw)) + raw
        elif kind == _INTKEY:
            rec += struct.pack("<Bq", kind, key)
        else:
            rec += struct.pack("<BI", kind, key)
    return bytes(rec)


def _encode_raw(rec: bytearray, leaf, shape) -> int:
    """Append a raw leaf's elements; returns their byte count."""
    start = len(rec)
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(leaf)).encode("utf-8")
        rec += struct.pack("<B", len(impl)) + impl
        rec += _raw_bytes(np.asarray(jax.random.key_data(leaf), np.uint32))
    else:
        rec += _raw_bytes(np.asarray(leaf).reshape(shape))
    return len(rec) - start


def _channels(shape, axis: int) -> np.ndarray:
    """Per element of a C-order leaf of ``shape`` (flattened), its index along ``axis``."""
    inner = math.prod(shape[axis + 1 :])
    return (np.arange(math.prod(shape), dtype=np.int64) // inner) % shape[axis]


def _encode_leaf(q: QuantizedParams, i: int, path, version: int) -> tuple[bytes, LeafReport]:
    where = q.paths[i]
    quantized = q.bits[i] is not None
    leaf = q.raw[i]
    shape = tuple(int(s) for s in np.shape(q.bits[i] if quantized else leaf))
    dtype = q.dtypes[i] if quantized else leaf.dtype
    code = _dtype_code(dtype, where)
    rec = bytearray(_path_bytes(path))
    rec += struct.pack("<BB", _RAW if not quantized else _QUANTIZED, code)
    rec += struct.pack(f"<B{len(shape)}Q", len(shape), *shape)
    n = math.prod(shape)
    if not quantized:
        header = len(rec)
        raw = _encode_raw(rec, leaf, shape)
        report = LeafReport(
            where, shape, _DTYPES[code], False, n, n, (), len(rec), header, 0, raw,
            _EMPTY, _EMPTY, _EMPTY,
        )  # fmt: skip
        return bytes(rec), report
    books = {b: np.asarray(v) for b, v in q.codebooks[i].items()}
    widths = tuple(books)
    book_code = _dtype_code(next(iter(books.values())).dtype if books else np.float32, where)
    if book_code >= _FLOATS:
        raise ValueError(f"the codebooks at {where} have a non-float dtype {_DTYPES[book_code]}.")
    rec += struct.pack(f"<BB{len(widths)}B", book_code, len(widths), *widths)
    axis = q.axes[i]
    if version >= 3:
        rec += struct.pack("<B", 0 if axis is None else axis + 1)
    header = len(rec)
    bits = np.asarray(q.bits[i]).reshape(-1)
    codes = np.asarray(q.codes[i]).reshape(-1)
    if axis is None:
        for b in widths:
            rec += struct.pack("<H", books[b].shape[0] - 1) + _raw_bytes(books[b])
    else:
        channel = _channels(shape, axis)
        for b in widths:
            sel = bits == b
            entries = np.zeros(shape[axis], np.int64)  # L_c: the largest code + 1
            np.maximum.at(entries, channel[sel], codes[sel].astype(np.int64) + 1)
            width = books[b].shape[1]
            rec += struct.pack("<H", width - 1) + _encode_stream(entries, width + 1).data
            rec += _raw_bytes(books[b][np.arange(width)[None, :] < entries[:, None]])
    codebook_bytes = len(rec) - header
    count = int(np.count_nonzero(bits))
    coding, position_axis = "all", None
    if count == n:  # a dense leaf: no positions, and no gather below
        rec += struct.pack("<B", _ALL_KEPT)
        positions = StreamReport(0, 1, 0, 0.0)
        kb, kc = bits, codes
    else:
        kept = np.flatnonzero(bits)
        kb, kc = bits[kept], codes[kept]
        relative, s = _relative_record(kept, n)
        limit = _MASK_GAIN * len(relative)
        coded = _mask_record(bits.reshape(shape) != 0, limit)
        if coded is not None and len(coded[0]) < limit:
            mask, info, mask_axis, symbols = coded
            rec += mask
            coding, position_axis = "mask", mask_axis
            positions = StreamReport(symbols, len(mask), 0, info / 8)
        else:
            rec += relative
            coding = "relative"
            positions = _from(s, extra=len(relative) - len(s.data))
    width_map = _EMPTY
    if len(widths) > 1:
        gi = np.searchsorted(np.asarray(widths), kb)
        extra = 0
        if axis is not None:
            # One width per slice (allocate_bits(granularity="channel")): C symbols, not n.
            ch = channel if count == n else channel[kept]
            per_slice = np.zeros(shape[axis], np.int64)
            per_slice[ch] = gi
            uniform = bool(np.all(per_slice[ch] == gi))
            rec += struct.pack("<B", int(uniform))
            gi, extra = (per_slice if uniform else gi), 1
        s = _encode_stream(gi, len(widths))
        rec += s.data
        width_map = _from(s, extra=extra)
    codes_report = _EMPTY
    for b in widths:
        s = _encode_stream(kc if len(widths) == 1 else kc[kb == b], books[b].shape[-1])
        rec += s.data
        codes_report = _add(codes_report, _from(s))
    report = LeafReport(
        where, shape, q.dtypes[i], True, n, count, widths, len(rec), header,
        codebook_bytes, 0, positions, width_map, codes_report, axis, coding, position_axis,
    )  # fmt: skip
    return bytes(rec), report


def _check_q(q) -> None:
    if not isinstance(q, QuantizedParams):
        raise TypeError(
            f"q must be the QuantizedParams returned by quantize, got {type(q).__name__}."
        )


def _encode(q: QuantizedParams) -> tuple[bytes, CompressionReport]:
    """The file's bytes and its report."""
    _check_q(q)
    paths = _tree_paths(q.treedef)  # structure first: no work on a tree that cannot be saved
    for i in range(len(paths)):
        leaf = q.raw[i]
        if q.bits[i] is None:
            _dtype_code(leaf.dtype, q.paths[i])
    payload = bytearray()
    leaves = []
    version = VERSION
    for i, path in enumerate(paths):
        rec, report = _encode_leaf(q, i, path, version)
        payload += rec
        leaves.append(report)
    weights = sum(leaf.weights for leaf in leaves)
    pad = max(0, -(-weights // _WEIGHTS_PER_BYTE) - len(payload) - 4)
    payload += struct.pack("<I", pad) + bytes(pad)
    header = _HEADER.pack(
        MAGIC, version, 0, len(paths), len(payload), zlib.crc32(payload) & 0xFFFFFFFF
    )
    total = len(header) + len(payload)
    entropy = len(header) + 4 + pad
    for leaf in leaves:
        entropy += leaf.header_bytes + leaf.codebook_bytes + leaf.raw_bytes
        for s in (leaf.positions, leaf.width_map, leaf.codes):
            entropy += s.table_bytes + s.entropy_bytes
    report = CompressionReport(
        leaves=tuple(leaves),
        header_bytes=len(header),
        padding_bytes=4 + pad,
        total_bytes=total,
        entropy_bytes=float(entropy),
        weights=weights,
        dense_float32_bytes=4 * weights,
        ratio=4 * weights / total,
        bits_per_weight=8 * total / max(weights, 1),
    )
    return header + bytes(payload), report


def save_compressed(path: str | os.PathLike, q: QuantizedParams) -> int:
    """Write quantized params to one entropy-coded, checksummed binary file.

    The layout is in this module's docstring: a header with magic, version, leaf count,
    payload size and CRC-32, then per leaf its tree path, dtype and shape, and either its
    raw elements or its codebooks and three entropy-coded streams (positions of the kept
    weights, the width of each, and the codes of each width group). Each stream costs
    its order-0 entropy, its frequency table and a few bytes. The positions are coded by
    relative indices or, where shorter, as the mask: the slices that keep nothing along
    each axis flagged once, then each remaining slice's kept weights given their count.

    Any pytree whose key paths are dict keys (str or int), sequence indices, attributes
    or flattened indices can be saved, so an ``nnx.State`` (``nnx.Sequential``'s int keys
    included) and Linen's dicts of collections work as they are; the loaded tree is made
    of dicts, lists and tuples (see :func:`load_compressed`).

    With ``jax.distributed`` and leaves that span processes, every process calls it: the
    codes are gathered (the file holds them all), process 0 writes the file, and every
    process returns once it is in place.

    Args:
      path: the file to write. An existing file is replaced whole, in one rename at the
        end: a save that fails (disk full, interrupted) leaves it as it was.
      q: from :func:`~fisher_optax.quantize`.

    Returns:
      The number of bytes written; equal to ``compression_report(q).total_bytes``.

    Raises:
      TypeError: if ``q`` is not a :class:`~fisher_optax.QuantizedParams`.
      ValueError: on a dict key that is neither str nor int, or a raw leaf whose dtype
        the format does not store (checked before any encoding work).

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, fisher_optax
      >>> q = fisher_optax.quantize({"w": jnp.arange(64.0).reshape(8, 8) % 4}, 2)
      >>> f = os.path.join(tempfile.mkdtemp(), "model.fq")
      >>> fisher_optax.save_compressed(f, q)
      102
      >>> fisher_optax.dequantize(fisher_optax.load_compressed(f))["w"][0]
      Array([0., 1., 2., 3., 0., 1., 2., 3.], dtype=float32)

    References:
      Han, Mao, Dally. Deep Compression. ICLR 2016. https://arxiv.org/abs/1510.00149

      Duda. Asymmetric numeral systems. 2013. https://arxiv.org/abs/1311.2540

      Bamler. Understanding Entropy Coding With Asymmetric Numeral Systems (ANS): a
      Statistician's Perspective (the ``constriction`` library). 2022.
      https://arxiv.org/abs/2201.01741
    """
    if not _spans_processes(q):
        data, _ = _encode(q)
        _write_atomically(path, data)
        return len(data)
    # Multi-host: the codes are gathered to every process (the file holds them all), process
    # 0 writes, and every process waits until the file is in place before it returns.
    data, _ = _encode(_gathered(q))
    try:
        if jax.process_index() == 0:
            _write_atomically(path, data)
    finally:  # a failed write still reaches the barrier: no process waits forever
        multihost_utils.sync_global_devices("fisher_optax.save_compressed")
    return len(data)


def _spans_processes(q) -> bool:
    """Whether ``q`` holds global arrays with shards on other processes (multi-host)."""
    return isinstance(q, QuantizedParams) and any(
        map(_validate.spans_processes, jax.tree.leaves(q))
    )


def _gathered(q: QuantizedParams) -> QuantizedParams:
    """``q`` with every leaf that spans processes gathered whole onto this one (a
    collective: every process calls it)."""

    def whole(x):
        if _validate.spans_processes(x):
            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree.map(whole, q)


def _write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a failure leaves the previous file as it was.

    The bytes go to a new file next to the target (created with the umask's permissions),
    are flushed to disk, and replace the target in one rename; on any error the new file is
    removed. A symlink is written through, as ``open(path, "wb")`` would.
    """
    target = os.path.realpath(os.fspath(path))
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:  # name the file asked for, not the temporary one
        raise type(e)(e.errno, e.strerror, os.fspath(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class _Reader:
    """Bounds-checked reads from the payload: a short read is an error, never garbage."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.remaining():
            raise ValueError(
                f"load_compressed: the file is corrupted: {what} needs {n} bytes but only "
                f"{self.remaining()} remain."
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size, what))

    def varints(self, count: int, what: str, max_bytes: int = 9) -> np.ndarray:
        """``count`` LEB128 ints, vectorised; each at most ``max_bytes`` bytes long."""
        if count == 0:
            return np.zeros(0, np.int64)
        if count > self.remaining():
            raise ValueError(
                f"load_compressed: the file is corrupted: {what} needs at least {count} bytes "
                f"but only {self.remaining()} remain."
            )
        window = min(self.remaining(), max_bytes * count)
        raw = np.frombuffer(self.data, np.uint8, window, self.pos)
        ends = np.flatnonzero(raw < 128)[:count]
        if ends.size < count:
            raise ValueError(f"load_compressed: the file is corrupted: {what} is cut short.")
        starts = np.concatenate([[0], ends[:-1] + 1])
        if np.any(ends - starts >= max_bytes):
            raise ValueError(f"load_compressed: the file is corrupted: a varint in {what}.")
        seg = raw[: ends[-1] + 1].astype(np.uint64)
        within = np.arange(seg.size) - np.repeat(starts, ends - starts + 1)
        parts = (seg & np.uint64(127)) << (np.uint64(7) * within.astype(np.uint64))
        self.pos += int(ends[-1]) + 1
        return np.add.reduceat(parts, starts).astype(np.int64)

    def table(self, alphabet: int, what: str) -> np.ndarray:
        """A frequency table over ``alphabet`` symbols, dense or sparse (see the writer)."""
        (used,) = self.varints(1, what)
        if used == 0:
            return self.varints(alphabet, what, max_bytes=3)
        if used > alphabet:
            raise ValueError(f"load_compressed: {what} lists {used} symbols: corrupted.")
        pairs = self.varints(2 * int(used), what, max_bytes=3).reshape(-1, 2)
        index = np.cumsum(pairs[:, 0] + 1) - 1
        if index[-1] >= alphabet:
            raise ValueError(f"load_compressed: {what} has a symbol out of range: corrupted.")
        freq = np.zeros(alphabet, np.int64)
        freq[index] = pairs[:, 1]
        return freq

    def stream(self, count: int, alphabet: int, what: str) -> np.ndarray:
        """Decode a stream of ``count`` symbols in ``0..alphabet-1``."""
        freq = self.table(alphabet, f"the table of {what}")
        if count == 0:
            return np.zeros(0, np.int32)
        used = np.flatnonzero(freq)
        if used.size == 0 or freq.sum() > _TABLE_TOTAL:
            raise ValueError(f"load_compressed: the table of {what} is invalid: corrupted.")
        if used.size == 1:
            return np.full(count, used[0], np.int32)
        (words,) = self.varints(1, f"the word count of {what}")
        raw = self.take(4 * int(words), what)
        try:
            coder = _ANS.AnsCoder(np.frombuffer(raw, "<u4").astype(np.uint32))
            out = coder.decode(_model(freq), count)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"load_compressed: {what} does not decode ({e}): corrupted.") from None
        if not coder.is_empty():
            raise ValueError(f"load_compressed: {what} has words left over: corrupted.")
        return np.asarray(out)


def _read_path(rd: _Reader, index: int):
    (depth,) = rd.unpack("H", "path depth")
    if depth > rd.remaining():
        raise ValueError(f"load_compressed: leaf {index} has a path deeper than the file.")
    path = []
    for _ in range(depth):
        (kind,) = rd.unpack("B", "path kind")
        if kind in (_DICT, _ATTR):
            (length,) = rd.unpack("H", "key length")
            try:
                key = rd.take(length, "dict key").decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("load_compressed: a dict key is not UTF-8: corrupted.") from None
            path.append((kind, key))
        elif kind == _INTKEY:
            path.append((kind, rd.unpack("q", "int key")[0]))
        elif kind in (_LIST, _TUPLE, _FLAT):
            path.append((kind, rd.unpack("I", "index")[0]))
        else:
            raise ValueError(f"load_compressed: unknown path kind {kind} in leaf {index}.")
    return tuple(path)


def _decode_positions(rd: _Reader, shape: tuple[int, ...], index: int, version: int):
    """The kept flat indices of a position record, or ``None`` when every weight is kept."""
    n = math.prod(shape)
    (mode,) = rd.unpack("B", "position mode")
    if mode == _ALL_KEPT:
        return None
    if mode == _MASK and version >= 4:
        return _decode_mask(rd, shape, index)
    if mode != _RELATIVE:
        raise ValueError(
            f"load_compressed: unknown position mode {mode} in leaf {index} of a version "
            f"{version} file: corrupted."
        )
    r, entries = rd.unpack("BQ", "index bits")
    if not 1 <= r <= _MAX_INDEX_BITS or entries > n:
        raise ValueError(f"load_compressed: bad position stream in leaf {index}.")
    fill = (1 << r) - 1
    e = rd.stream(entries, fill + 1, f"the positions of leaf {index}")
    step = np.where(e == fill, fill, e + 1)
    cursor = np.cumsum(step, dtype=np.int64) - 1
    end = int(cursor[-1]) if entries else -1
    if not (end <= n - 1 < end + fill):
        raise ValueError(
            f"load_compressed: leaf {index}: the position stream does not match the "
            f"shape {shape}: corrupted."
        )
    return cursor[e != fill]


def _decode_mask(rd: _Reader, shape: tuple[int, ...], index: int) -> np.ndarray:
    """The kept flat indices from a mask position record (mode 2), every field checked."""
    what = f"the position mask of leaf {index}"
    n = math.prod(shape)
    kept, code, *dead = (int(v) for v in rd.varints(2 + len(shape), what))
    if n == 0 or code > 2 * len(shape) or any(d > s for d, s in zip(dead, shape, strict=True)):
        raise ValueError(
            f"load_compressed: leaf {index} of shape {shape}: its position mask declares "
            f"count code {code} (at most {2 * len(shape)}) and dead slices {dead}: corrupted."
        )
    axis = (code - 1) // 2 if code else None
    by_length = code > 0 and code % 2 == 0
    freq = None
    if by_length:
        freq = rd.table(_COUNT_LENGTHS, f"the count table of {what}")
        if not np.any(freq) or freq.sum() > _TABLE_TOTAL:
            raise ValueError(f"load_compressed: the count table of {what} is invalid: corrupted.")
    (words,) = rd.varints(1, f"the word count of {what}")
    raw = rd.take(4 * int(words), what)
    live_shape = tuple(s - d for s, d in zip(shape, dead, strict=True))
    size = math.prod(live_shape)
    m = _slice_length(live_shape, axis) if axis is not None and size else 0
    if m > _MAX_SLICE:
        raise ValueError(
            f"load_compressed: leaf {index}: its position mask counts slices of {m} weights "
            f"along axis {axis}; the format allows at most {_MAX_SLICE}: corrupted."
        )
    if kept > size:
        raise ValueError(
            f"load_compressed: leaf {index}: its position mask declares {kept} kept weights "
            f"in a live block of shape {live_shape}: corrupted."
        )
    coder = _ANS.AnsCoder(np.frombuffer(raw, "<u4").astype(np.uint32))
    try:
        alive = []
        for d, s in zip(dead, shape, strict=True):
            flags = np.zeros(s, bool) if d == 0 else np.ones(s, bool)
            if 0 < d < s:
                flags = coder.decode(_BERNOULLI, np.full(s, d / s)).astype(bool)
            if int(flags.sum()) != d:
                raise ValueError(f"load_compressed: {what} has a wrong dead count: corrupted.")
            alive.append(~flags)
        live = np.zeros(live_shape, bool)
        if axis is None:
            if 0 < kept < size:
                live[...] = coder.decode(_BERNOULLI, np.full(size, kept / size)).reshape(live_shape)
            elif kept:
                live[...] = True
        elif size:
            slices = live_shape[axis]
            left = np.ones(slices, np.int64)
            if freq is not None:
                used = np.flatnonzero(freq)
                lengths = np.full(slices, used[0] + 1, np.int64)
                if used.size > 1:
                    lengths = coder.decode(_model(freq), slices).astype(np.int64) + 1
                left = 1 << (lengths - 1)
                low = lengths > 1
                if np.any(low):
                    sizes = (1 << (lengths[low] - 1)).astype(np.int32)
                    left[low] += coder.decode(_UNIFORM, sizes)
                if np.any(left > m):
                    raise ValueError(
                        f"load_compressed: {what} has a slice count above the slice length "
                        f"{m}: corrupted."
                    )
            elif m > 1:
                left += coder.decode(_UNIFORM, np.full(slices, m, np.int32))
            if int(left.sum()) != kept:
                raise ValueError(f"load_compressed: {what} has wrong slice counts: corrupted.")
            rows = np.zeros((m, slices), bool)
            for t in range(m):
                # Clipped: a corrupted stream may drive a count below zero.
                p = np.clip(left / (m - t), 0.0, 1.0)
                rows[t] = coder.decode(_BERNOULLI, p)
                left -= rows[t]
            if np.any(left != 0):
                raise ValueError(f"load_compressed: {what} has wrong slice counts: corrupted.")
            others = tuple(s for b, s in enumerate(live_shape) if b != axis)
            live = np.moveaxis(rows.T.reshape(slices, *others), 0, axis)
    except (ValueError, RuntimeError) as e:
        if str(e).startswith("load_compressed"):
            raise
        raise ValueError(f"load_compressed: {what} does not decode ({e}): corrupted.") from None
    if not coder.is_empty():
        raise ValueError(f"load_compressed: {what} has words left over: corrupted.")
    for a in range(live.ndim):
        if live.size and not np.all(
            np.any(live, axis=tuple(b for b in range(live.ndim) if b != a))
        ):
            raise ValueError(
                f"load_compressed: {what} has an empty slice not flagged dead along axis {a}: "
                "corrupted."
            )
    mask = np.zeros(shape, bool)
    mask[np.ix_(*alive)] = live
    return np.flatnonzero(mask)


def _decode_raw(rd: _Reader, code: int, shape, index: int):
    n = math.prod(shape)
    if code == _KEY:
        (length,) = rd.unpack("B", "key impl length")
        impl = rd.take(length, "key impl").decode("utf-8", "replace")
        try:
            spec = jax.random.key_impl(jax.random.key(0, impl=impl))
            width = jax.random.key_data(jax.random.key(0, impl=spec)).shape[-1]
        except (ValueError, TypeError, KeyError):
            raise ValueError(
                f"load_compressed: unknown PRNG impl {impl!r} in leaf {index}."
            ) from None
        data = _from_raw(rd.take(4 * n * width, "key data"), np.uint32, (*shape, width))
        return jax.random.wrap_key_data(data, impl=impl)
    dtype = jnp.dtype(_DTYPES[code])
    return _from_raw(rd.take(n * dtype.itemsize, "raw leaf"), dtype, shape)


def _decode_leaf(rd: _Reader, index: int, budget: list[int], version: int):
    path = _read_path(rd, index)
    kind, code = rd.unpack("BB", "kind and dtype")
    if kind not in (_QUANTIZED, _RAW) or code >= len(_DTYPES):
        raise ValueError(f"load_compressed: unknown kind or dtype code in leaf {index}.")
    (ndim,) = rd.unpack("B", "ndim")
    shape = rd.unpack(f"{ndim}Q", "shape")
    n = math.prod(shape)
    budget[0] -= n
    if budget[0] < 0:
        raise ValueError(
            f"load_compressed: leaf {index} declares shape {shape}; the leaves declare more "
            f"than {_WEIGHTS_PER_BYTE} elements per byte of the file: corrupted or hostile."
        )
    if kind == _RAW:
        return path, _DTYPES[code], None, None, {}, _decode_raw(rd, code, shape, index), None
    if code >= _FLOATS:
        raise ValueError(f"load_compressed: leaf {index} is quantized but not float: corrupted.")
    bcode, g = rd.unpack("BB", "book dtype and width count")
    widths = rd.unpack(f"{g}B", "widths")
    if (
        bcode >= _FLOATS
        or any(not 1 <= b <= MAX_BITS for b in widths)
        or list(widths) != sorted(set(widths))
    ):
        raise ValueError(f"load_compressed: bad bit widths {widths} in leaf {index}.")
    axis = None
    if version >= 3:
        (axis_byte,) = rd.unpack("B", "codebook axis")
        if axis_byte > len(shape):
            raise ValueError(
                f"load_compressed: leaf {index} has codebook axis {axis_byte - 1} but shape "
                f"{shape}: corrupted."
            )
        axis = axis_byte - 1 if axis_byte else None
    book_dtype = jnp.dtype(_DTYPES[bcode])
    books, slice_entries = {}, {}
    for b in widths:
        (entries,) = rd.unpack("H", "codebook length")
        if entries + 1 > 2**b:
            raise ValueError(f"load_compressed: a {b}-bit codebook of {entries + 1} entries.")
        if axis is None:
            raw = rd.take((entries + 1) * book_dtype.itemsize, f"a {b}-bit codebook")
            books[b] = _from_raw(raw, book_dtype, (entries + 1,))
            continue
        width, channels = entries + 1, shape[axis]
        lengths = rd.stream(channels, width + 1, f"the {b}-bit codebook sizes of leaf {index}")
        raw = rd.take(int(lengths.sum()) * book_dtype.itemsize, f"the {b}-bit codebooks")
        live = np.arange(width)[None, :] < lengths[:, None]
        book = np.zeros((channels, width), book_dtype)
        book[live] = _from_raw(raw, book_dtype, (int(lengths.sum()),))
        last = book[np.arange(channels), np.maximum(lengths - 1, 0)]
        books[b] = np.where(live, book, np.where(lengths > 0, last, 0)[:, None])
        slice_entries[b] = lengths
    positions = _decode_positions(rd, shape, index, version)
    kept = n if positions is None else positions.size
    if kept and not widths:
        raise ValueError(f"load_compressed: leaf {index} keeps weights but has no widths.")
    code_dtype = np.uint8 if max(widths, default=0) <= 8 else np.uint16
    channel = None
    if axis is not None:
        channel = _channels(shape, axis)
        channel = channel if positions is None else channel[positions]
    if g > 1:
        (per_slice,) = rd.unpack("B", "width map mode") if axis is not None else (0,)
        if per_slice > 1:
            raise ValueError(f"load_compressed: unknown width map mode in leaf {index}.")
        if per_slice:
            gi = rd.stream(shape[axis], g, f"the slice widths of leaf {index}")[channel]
        else:
            gi = rd.stream(kept, g, f"the width map of leaf {index}")
        kb = np.asarray(widths, np.uint8)[gi]
        codes_k = np.zeros(kept, code_dtype)
        for j, b in enumerate(widths):
            sel = gi == j
            what = f"the codes of leaf {index}"
            codes_k[sel] = rd.stream(int(sel.sum()), books[b].shape[-1], what)
    elif g == 1:
        kb = np.full(kept, widths[0], np.uint8)
        what = f"the codes of leaf {index}"
        codes_k = rd.stream(kept, books[widths[0]].shape[-1], what).astype(code_dtype)
    else:  # nothing kept: no streams
        kb, codes_k = np.zeros(0, np.uint8), np.zeros(0, code_dtype)
    if axis is not None and kept:
        for b, lengths in slice_entries.items():
            sel = kb == b
            if np.any(codes_k[sel] >= lengths[channel[sel]]):
                raise ValueError(
                    f"load_compressed: leaf {index} has a {b}-bit code beyond its slice's "
                    "codebook: corrupted."
                )
    if positions is None:
        bits, codes = kb, codes_k
    else:
        bits = np.zeros(n, np.uint8)
        codes = np.zeros(n, code_dtype)
        bits[positions] = kb
        codes[positions] = codes_k
    books = {b: jnp.asarray(v) for b, v in books.items()}
    return path, _DTYPES[code], bits.reshape(shape), codes.reshape(shape), books, None, axis


def load_compressed(path: str | os.PathLike, *, like: Any = None) -> QuantizedParams:
    """Read a file written by :func:`save_compressed` back into :class:`QuantizedParams`.

    ``dequantize(load_compressed(f))`` equals ``dequantize(q)`` exactly, raw leaves
    included (same dtype, same bits). The loaded tree is made of plain containers: dict
    keys (str or int) and attributes come back as dict keys, sequence indices as lists
    or tuples, Flax's ``.value`` hop is dropped. An ``nnx.State`` therefore comes back as
    its ``to_pure_dict()`` form (``{'layers': {0: {'kernel': ...}}}`` for an
    ``nnx.Sequential``), ready for ``nnx.replace_by_pure_dict`` / ``nnx.update``, and a
    Linen ``{'params': ..., 'batch_stats': ...}`` dict as that dict.

    With ``like=tree`` the result has ``tree``'s structure and node types instead (an
    Equinox module, an ``nnx.State``, a Linen dict), each leaf placed by its path, so
    ``dequantize`` gives a tree of ``tree``'s type: never rebuild a model by pouring the
    plain tree's leaves into another treedef, whose order may differ (dict keys sort).
    For an Equinox module pass its arrays, ``eqx.filter(model, eqx.is_array)``, as saved.

    The header's payload size must match the file size and the CRC-32 must match before
    anything is parsed; every count is checked against the bytes left before an array is
    made, and all leaves together may declare at most 1024 elements per payload byte.

    Args:
      path: the file.
      like: optional, a tree with the saved tree's paths, shapes and dtypes (e.g. the
        model's params before compression, or a freshly initialised model's).

    Returns:
      The :class:`~fisher_optax.QuantizedParams`, leaves in the loaded tree's order, or in
      ``like``'s with ``like`` given.

    Raises:
      ValueError: if the file is not a fisher-optax file, has another version, is
        truncated or corrupted (size, checksum or a structure check fails); with ``like``,
        naming the first path the file lacks or ``like`` lacks, or whose shape or dtype
        differs.

    Examples:
      See :func:`save_compressed`.
    """
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise ValueError(
                f"load_compressed: {path} is {len(head)} bytes, shorter than the "
                f"{_HEADER.size}-byte header: truncated or not a fisher-optax file."
            )
        magic, version, flags, num_leaves, size, crc = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(
                f"load_compressed: {path} does not start with {MAGIC!r}: not a file written "
                "by save_compressed."
            )
        if version not in _VERSIONS or flags != 0:
            raise ValueError(
                f"load_compressed: {path} has format version {version} (flags {flags}); this "
                f"reader knows versions {', '.join(map(str, _VERSIONS))}. Re-export with this "
                "fisher-optax version."
            )
        actual = os.fstat(f.fileno()).st_size - _HEADER.size
        if size != actual:
            raise ValueError(
                f"load_compressed: the header of {path} announces {size} payload bytes but "
                f"the file holds {actual}: truncated or corrupted."
            )
        payload = f.read(size)
    if zlib.crc32(payload) & 0xFFFFFFFF != crc:
        raise ValueError(f"load_compressed: checksum mismatch in {path}: the file is corrupted.")
    if num_leaves > len(payload) // 8 + 1:
        raise ValueError(f"load_compressed: {num_leaves} leaves cannot fit: corrupted.")
    rd = _Reader(payload)
    budget = [_WEIGHTS_PER_BYTE * len(payload)]
    recs = [_decode_leaf(rd, i, budget, version) for i in range(num_leaves)]
    (pad,) = rd.unpack("I", "padding length")
    if rd.remaining() != pad or any(rd.take(pad, "padding")):
        raise ValueError("load_compressed: the padding does not end the file: corrupted.")
    paths = [r[0] for r in recs]
    if len(set(paths)) != len(paths):
        raise ValueError("load_compressed: two leaves share a path: corrupted.")
    if like is not None:
        return _placed_like(recs, like, path)
    tree = _build_tree(paths)
    try:
        treedef = jax.tree.structure(tree)
    except TypeError:
        raise ValueError(
            "load_compressed: the recorded tree cannot be rebuilt: corrupted."
        ) from None
    order = jax.tree.leaves(tree)  # record index of each leaf, in flattening order
    recs = [recs[i] for i in order]
    return QuantizedParams(
        [r[2] if r[2] is None else jnp.asarray(r[2]) for r in recs],
        [r[3] if r[3] is None else jnp.asarray(r[3]) for r in recs],
        [r[4] for r in recs],
        [r[5] for r in recs],  # raw leaves stay NumPy: jnp would drop 64-bit dtypes
        treedef=treedef,
        dtypes=[r[1] if r[1] != "key" else str(r[5].dtype) for r in recs],
        axes=[r[6] for r in recs],
    )  # fmt: skip


def _placed_like(recs: list, like: Any, file: Any) -> QuantizedParams:
    """The decoded records placed by path into ``like``'s structure, checked leaf by leaf."""
    treedef = jax.tree.structure(like)
    names = [keystr(p) for p in key_paths(like)]
    by_path = {r[0]: r for r in recs}
    wanted = _tree_paths(treedef)
    for where, p in zip(names, wanted, strict=True):
        if p not in by_path:
            raise ValueError(
                f"load_compressed: like has a leaf at {where} that {file} lacks; pass the "
                "tree that was saved (for an Equinox module, eqx.filter(model, eqx.is_array))."
            )
    extra = set(by_path) - set(wanted)
    if extra:
        first = next(r[0] for r in recs if r[0] in extra)
        shown = "".join(f"[{k!r}]" for _, k in first)
        raise ValueError(
            f"load_compressed: {file} has a leaf at {shown} that like lacks; pass the tree "
            "that was saved as like."
        )
    placed = [by_path[p] for p in wanted]
    for where, r, x in zip(names, placed, jax.tree.leaves(like), strict=True):
        shape = np.shape(r[5]) if r[5] is not None else np.shape(r[2])
        if tuple(shape) != tuple(np.shape(x)):
            raise ValueError(
                f"load_compressed: {file} holds shape {tuple(shape)} at {where} but like has "
                f"{tuple(np.shape(x))} there; build like with the saved model's sizes."
            )
        dtype = r[1] if r[1] != "key" else str(r[5].dtype)
        if dtype != str(jnp.result_type(x)):
            raise ValueError(
                f"load_compressed: {file} holds dtype {dtype} at {where} but like has "
                f"{jnp.result_type(x)} there; build like with the saved model's dtypes."
            )
    return QuantizedParams(
        [r[2] if r[2] is None else jnp.asarray(r[2]) for r in placed],
        [r[3] if r[3] is None else jnp.asarray(r[3]) for r in placed],
        [r[4] for r in placed],
        [r[5] for r in placed],
        treedef=treedef,
        dtypes=[r[1] if r[1] != "key" else str(r[5].dtype) for r in placed],
        axes=[r[6] for r in placed],
    )  # fmt: skip


def compression_report(q: QuantizedParams) -> CompressionReport:
    """Sizes of the compressed file, per leaf and per stream, with each stream's entropy.

    The byte counts come from the same encoder as :func:`save_compressed`, so
    ``total_bytes`` equals the size of the file it writes; ``entropy_bytes`` is what the
    file would be if every stream cost exactly its order-0 entropy (tables included). On
    leaves that span processes (``jax.distributed``) every process calls it: the codes are
    gathered, as :func:`save_compressed` gathers them.

    Args:
      q: from :func:`~fisher_optax.quantize`.

    Returns:
      A :class:`CompressionReport`; per leaf a :class:`LeafReport` whose ``positions``,
      ``width_map`` and ``codes`` are :class:`StreamReport` s.

    Raises:
      TypeError / ValueError: as :func:`save_compressed`.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> w = jnp.zeros((100, 10)).at[::10].set(1.0)  # 90% pruned
      >>> q = fisher_optax.quantize({"w": w}, 1, mask={"w": w != 0}, method="uniform")
      >>> r = fisher_optax.compression_report(q)
      >>> r.total_bytes, r.dense_float32_bytes
      (83, 4000)
      >>> leaf = r.leaves[0]  # 90 dead rows: 100 flags, the 10 live rows are full
      >>> leaf.position_coding, leaf.positions.symbols, leaf.positions.bytes
      ('mask', 100, 18)
    """
    return _encode(_gathered(q) if _spans_processes(q) else q)[1]
