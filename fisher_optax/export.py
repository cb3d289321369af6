"""Compressed export of :class:`~fisher_optax.QuantizedParams`: one self-checking binary file.

File layout (all integers little-endian)::

    header (24 bytes): magic b"FOQZ" | version u16 | flags u16 (0) | num_leaves u32
                       | payload_size u64 | crc32(payload) u32
    payload: num_leaves leaf records, back to back

    leaf record:
      path       u16 depth, then per level: u8 kind (0 dict key, 1 list index, 2 tuple
                 index) and either u16 length + UTF-8 key, or u32 index
      dtype      u8 (0 float32, 1 float16, 2 bfloat16, 3 float64): the leaf's dtype
      book dtype u8 (same table): the codebooks' dtype
      shape      u8 ndim, ndim x u64
      widths     u8 count G, G x u8 (ascending, each in 1..16)
      codebooks  G books of 2^b entries each, raw
      kept       u64 number of kept (non-pruned) weights K
      positions  u8 mode: 1 = every weight kept (nothing follows); 0 = relative index
                 coding: u8 index bits r (1..8), u64 entries E, then E r-bit gaps packed
      width map  ceil(log2 G) bits per kept weight (the index of its width), packed
      codes      b_i bits per kept weight i (its width), packed, in position order

Relative index coding (Han et al. 2016): walking the flattened leaf from position -1,
an entry ``e < 2^r - 1`` advances ``e + 1`` positions and puts the next kept weight
there; the filler ``e = 2^r - 1`` advances ``2^r - 1`` positions and puts nothing, so
long runs of pruned weights cost one filler per ``2^r - 1`` positions. The writer adds
fillers until the walk ends within ``2^r - 1`` of the leaf's end, so the element count
of a leaf is bounded by what its position stream can reach: a hostile header cannot
ask the reader for more than about ``255 x`` the file size in elements. Every packed
section is padded to whole bytes. Nothing in the file is executed or unpickled.
"""

import math
import os
import struct
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax._tree import leaves_with_paths
from fisher_optax.quantize import MAX_BITS, QuantizedParams

__all__ = ["compression_report", "load_compressed", "save_compressed"]

MAGIC = b"FOQZ"
VERSION = 1
_HEADER = struct.Struct("<4sHHIQI")
_DTYPES = ("float32", "float16", "bfloat16", "float64")
_MAX_INDEX_BITS = 8
_DICT, _LIST, _TUPLE = 0, 1, 2


# --------------------------------------------------------------------------- tree paths


def _tree_paths(treedef) -> list[tuple[tuple[int, Any], ...]]:
    """Per leaf, its path as ``((kind, key), ...)``; only dict/list/tuple nodes allowed."""
    n = treedef.num_leaves
    skeleton = jax.tree.unflatten(treedef, list(range(n)))
    out: list[Any] = [None] * n

    def walk(node, path):
        if type(node) is dict:
            for k in node:
                if not isinstance(k, str):
                    raise ValueError(
                        f"save_compressed: dict key {k!r} at {_fmt(path)} is not a str; "
                        "supported trees are nested dicts with str keys, lists and tuples."
                    )
                walk(node[k], (*path, (_DICT, k)))
        elif type(node) in (list, tuple):
            kind = _LIST if type(node) is list else _TUPLE
            for i, child in enumerate(node):
                walk(child, (*path, (kind, i)))
        elif type(node) is int:
            out[node] = path
        else:
            raise ValueError(
                f"save_compressed: the params tree has a {type(node).__name__} node at "
                f"{_fmt(path)}; supported trees are nested dicts with str keys, lists and "
                "plain tuples (convert e.g. a Flax nnx.State with .to_pure_dict())."
            )

    walk(skeleton, ())
    if any(p is None for p in out):
        raise ValueError("save_compressed: could not place every leaf of the params tree.")
    return out


def _fmt(path) -> str:
    return "".join(f"[{k!r}]" for _, k in path) or "<root>"


def _build_tree(paths):
    """The nested dict/list/tuple with leaf ``i`` at ``paths[i]``; checks the indices."""
    if len(paths) == 1 and not paths[0]:
        return 0
    if any(not p for p in paths):
        raise ValueError("load_compressed: a root leaf next to other leaves: corrupted file.")

    def build(items):
        kinds = {p[0][0] for p, _ in items}
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

        if kind == _DICT:
            return {k: child(g) for k, g in children.items()}
        keys = sorted(children)
        if keys != list(range(len(keys))):
            raise ValueError("load_compressed: list/tuple indices are not 0..n-1: corrupted.")
        seq = [child(children[k]) for k in keys]
        return seq if kind == _LIST else tuple(seq)

    return build([(p, i) for i, p in enumerate(paths)])


# --------------------------------------------------------------------------- bit packing


def _pack(values: np.ndarray, widths: np.ndarray | int) -> bytes:
    """Concatenate ``values[i]`` in ``widths[i]`` bits each (MSB first), pad to bytes."""
    values = np.asarray(values, np.uint32)
    widths = np.broadcast_to(np.asarray(widths, np.int64), values.shape)
    if values.size == 0:
        return b""
    j = np.arange(MAX_BITS)
    shift = widths[:, None] - 1 - j[None, :]
    bits = (values[:, None] >> np.maximum(shift, 0).astype(np.uint32)) & 1
    return np.packbits(bits[shift >= 0].astype(np.uint8)).tobytes()


def _unpack(data: bytes, widths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack`: ``len(widths)`` values of ``widths[i]`` bits each."""
    widths = np.asarray(widths, np.int64)
    if widths.size == 0:
        return np.zeros(0, np.int64)
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    start = np.cumsum(widths) - widths
    out = np.zeros(widths.shape, np.int64)
    for j in range(int(widths.max())):
        live = j < widths
        idx = np.where(live, start + j, 0)
        out = np.where(live, (out << 1) | bits[idx], out)
    return out


def _packed_len(total_bits: int) -> int:
    return (total_bits + 7) // 8


# --------------------------------------------------------------------------- encoding


def _relative_entries(positions: np.ndarray, n: int, r: int) -> np.ndarray:
    """Gap entries (with fillers) for kept ``positions`` of a leaf of ``n`` weights."""
    fill = (1 << r) - 1
    prev = np.concatenate([[-1], positions[:-1]])
    gaps = positions - prev - 1
    tail = (n - 1) - (positions[-1] if positions.size else -1)
    nfill = gaps // fill
    parts = []
    for g, k in zip(gaps.tolist(), nfill.tolist(), strict=True):
        parts.append([fill] * k + [g - k * fill])
    entries = [e for p in parts for e in p]
    entries += [fill] * (tail // fill)
    return np.asarray(entries, np.int64)


def _entry_count(positions: np.ndarray, n: int, r: int) -> int:
    fill = (1 << r) - 1
    prev = np.concatenate([[-1], positions[:-1]])
    tail = (n - 1) - (positions[-1] if positions.size else -1)
    return int(positions.size + np.sum((positions - prev - 1) // fill) + tail // fill)


def _encode(q: QuantizedParams) -> tuple[bytes, list[dict[str, Any]]]:
    """The file's bytes and, per leaf, the byte size of each section."""
    if not isinstance(q, QuantizedParams):
        raise TypeError(
            f"expected the QuantizedParams returned by quantize, got {type(q).__name__}."
        )
    paths = _tree_paths(q.treedef)
    payload = bytearray()
    report = []
    for i, path in enumerate(paths):
        bits = np.asarray(q.bits[i]).reshape(-1).astype(np.int64)
        codes = np.asarray(q.codes[i]).reshape(-1).astype(np.int64)
        shape = q.shapes[i]
        widths = q.widths[i]
        books = [np.asarray(b) for b in q.codebooks[i]]
        n = bits.size
        rec = bytearray(struct.pack("<H", len(path)))
        for kind, key in path:
            if kind == _DICT:
                raw = key.encode("utf-8")
                if len(raw) > 0xFFFF:
                    raise ValueError(f"save_compressed: dict key too long at {_fmt(path)}.")
                rec += struct.pack("<BH", kind, len(raw)) + raw
            else:
                rec += struct.pack("<BI", kind, key)
        book_dtype = str(books[0].dtype) if books else "float32"
        if q.dtypes[i] not in _DTYPES or book_dtype not in _DTYPES:
            raise ValueError(
                f"save_compressed: leaf {q.paths[i]} has dtype {q.dtypes[i]} (codebooks "
                f"{book_dtype}); supported dtypes are {_DTYPES}."
            )
        rec += struct.pack("<BB", _DTYPES.index(q.dtypes[i]), _DTYPES.index(book_dtype))
        rec += struct.pack(f"<B{len(shape)}Q", len(shape), *shape)
        rec += struct.pack(f"<B{len(widths)}B", len(widths), *widths)
        sizes = {"header": len(rec)}
        start = len(rec)
        for b, book in zip(widths, books, strict=True):
            rec += np.ascontiguousarray(book, book.dtype.newbyteorder("<")).tobytes()
            del b
        sizes["codebooks"] = len(rec) - start
        kept = np.flatnonzero(bits > 0)
        start = len(rec)
        rec += struct.pack("<Q", kept.size)
        if kept.size == n:
            rec += struct.pack("<B", 1)
        else:
            r = min(
                range(1, _MAX_INDEX_BITS + 1),
                key=lambda r: (_packed_len(r * _entry_count(kept, n, r)), -r),
            )
            entries = _relative_entries(kept, n, r)
            rec += struct.pack("<BBQ", 0, r, entries.size)
            rec += _pack(entries, r)
        sizes["positions"] = len(rec) - start
        kb = bits[kept]
        start = len(rec)
        gbits = math.ceil(math.log2(len(widths))) if len(widths) > 1 else 0
        if gbits:
            rec += _pack(np.searchsorted(np.asarray(widths), kb), gbits)
        sizes["width_map"] = len(rec) - start
        start = len(rec)
        rec += _pack(codes[kept], kb)
        sizes["codes"] = len(rec) - start
        payload += rec
        report.append(
            {
                "path": q.paths[i],
                "shape": tuple(shape),
                "weights": n,
                "kept": int(kept.size),
                "widths": tuple(widths),
                "bytes": len(rec),
                **{f"{k}_bytes": v for k, v in sizes.items()},
            }
        )
    header = _HEADER.pack(
        MAGIC, VERSION, 0, len(paths), len(payload), zlib.crc32(payload) & 0xFFFFFFFF
    )
    return header + bytes(payload), report


def save_compressed(path: str | os.PathLike, q: QuantizedParams) -> int:
    """Write quantized params to one compressed, checksummed binary file.

    The layout is in this module's docstring: a header with magic, version, leaf count,
    payload size and CRC-32, then per leaf its tree path, dtype, shape, codebooks, the
    positions of kept weights by relative index coding, a bit map of widths and the
    bit-packed codes. Supported trees: nested dicts with str keys, lists and tuples.

    Args:
      path: the file to write (overwritten).
      q: from :func:`~fisher_optax.quantize`.

    Returns:
      The number of bytes written; equal to ``compression_report(q)["total_bytes"]``.

    Raises:
      TypeError: if ``q`` is not a :class:`~fisher_optax.QuantizedParams`.
      ValueError: on a tree node other than dict/list/tuple, a non-str dict key, or a
        dtype outside float32/float16/bfloat16/float64.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, fisher_optax
      >>> q = fisher_optax.quantize({"w": jnp.array([0.0, 1.0, 2.0, 3.0])}, 2)
      >>> f = os.path.join(tempfile.mkdtemp(), "model.fq")
      >>> fisher_optax.save_compressed(f, q)
      69
      >>> fisher_optax.dequantize(fisher_optax.load_compressed(f))["w"]
      Array([0., 1., 2., 3.], dtype=float32)

    References:
      Han, Mao, Dally. Deep Compression. ICLR 2016. https://arxiv.org/abs/1510.00149
    """
    data, _ = _encode(q)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


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


def _decode_leaf(rd: _Reader, index: int):
    (depth,) = rd.unpack("H", "path depth")
    path = []
    for _ in range(depth):
        (kind,) = rd.unpack("B", "path kind")
        if kind == _DICT:
            (length,) = rd.unpack("H", "key length")
            try:
                key = rd.take(length, "dict key").decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("load_compressed: a dict key is not UTF-8: corrupted.") from None
            path.append((kind, key))
        elif kind in (_LIST, _TUPLE):
            path.append((kind, rd.unpack("I", "index")[0]))
        else:
            raise ValueError(f"load_compressed: unknown path kind {kind} in leaf {index}.")
    dcode, bcode = rd.unpack("BB", "dtypes")
    if dcode >= len(_DTYPES) or bcode >= len(_DTYPES):
        raise ValueError(f"load_compressed: unknown dtype code in leaf {index}: corrupted.")
    (ndim,) = rd.unpack("B", "ndim")
    shape = rd.unpack(f"{ndim}Q", "shape")
    (g,) = rd.unpack("B", "width count")
    widths = rd.unpack(f"{g}B", "widths")
    if any(not 1 <= b <= MAX_BITS for b in widths) or list(widths) != sorted(set(widths)):
        raise ValueError(f"load_compressed: bad bit widths {widths} in leaf {index}.")
    book_dtype = jnp.dtype(_DTYPES[bcode])
    books = []
    for b in widths:
        raw = rd.take((2**b) * book_dtype.itemsize, f"a {b}-bit codebook")
        books.append(np.frombuffer(raw, book_dtype.newbyteorder("<")).astype(book_dtype))
    (kept,) = rd.unpack("Q", "kept count")
    (mode,) = rd.unpack("B", "position mode")
    if mode == 1:
        n = kept
        # Every kept weight has at least one code bit: bound n by the bytes left.
        if n > 8 * rd.remaining():
            raise ValueError(f"load_compressed: leaf {index} claims {n} weights: corrupted.")
        positions = np.arange(n, dtype=np.int64)
    elif mode == 0:
        r, entries = rd.unpack("BQ", "index bits")
        if not 1 <= r <= _MAX_INDEX_BITS or entries > 8 * rd.remaining() // r:
            raise ValueError(f"load_compressed: bad position stream in leaf {index}.")
        e = _unpack(rd.take(_packed_len(r * entries), "positions"), np.full(entries, r))
        fill = (1 << r) - 1
        step = np.where(e == fill, fill, e + 1)
        cursor = np.cumsum(step) - 1
        positions = cursor[e != fill]
        end = int(cursor[-1]) if entries else -1
        n = math.prod(shape)
        if positions.size != kept or not (end <= n - 1 < end + fill):
            raise ValueError(
                f"load_compressed: leaf {index}: the position stream does not match the "
                f"shape {shape} and kept count {kept}: corrupted."
            )
    else:
        raise ValueError(f"load_compressed: unknown position mode {mode} in leaf {index}.")
    if math.prod(shape) != n or (kept and not widths):
        raise ValueError(f"load_compressed: leaf {index}: shape {shape} does not fit: corrupted.")
    gbits = math.ceil(math.log2(g)) if g > 1 else 0
    if gbits:
        gi = _unpack(rd.take(_packed_len(gbits * kept), "width map"), np.full(kept, gbits))
        if np.any(gi >= g):
            raise ValueError(f"load_compressed: leaf {index}: width index out of range.")
    else:
        gi = np.zeros(kept, np.int64)
    kb = np.asarray(widths, np.int64)[gi] if kept else np.zeros(0, np.int64)
    codes_k = _unpack(rd.take(_packed_len(int(kb.sum())), "codes"), kb)
    bits = np.zeros(n, np.uint8)
    codes = np.zeros(n, np.int32)
    bits[positions] = kb
    codes[positions] = codes_k
    return (
        tuple(path),
        _DTYPES[dcode],
        bits.reshape(shape),
        codes.reshape(shape),
        tuple(jnp.asarray(b) for b in books),
        tuple(widths),
    )


def load_compressed(path: str | os.PathLike) -> QuantizedParams:
    """Read a file written by :func:`save_compressed` back into :class:`QuantizedParams`.

    ``dequantize(load_compressed(f))`` equals ``dequantize(q)`` exactly. The header's
    payload size must match the file size and the CRC-32 must match before anything
    is parsed; every count is checked against the bytes left before an array is made.

    Args:
      path: the file.

    Returns:
      The :class:`~fisher_optax.QuantizedParams`, with dicts, lists and tuples as saved.

    Raises:
      ValueError: if the file is not a fisher-optax file, has another version, is
        truncated or corrupted (size, checksum or a structure check fails).

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
        if version != VERSION or flags != 0:
            raise ValueError(
                f"load_compressed: {path} has format version {version} (flags {flags}); this "
                f"reader knows version {VERSION}. Re-export with this fisher-optax version."
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
    recs = [_decode_leaf(rd, i) for i in range(num_leaves)]
    if rd.remaining():
        raise ValueError(f"load_compressed: {rd.remaining()} stray bytes at the end: corrupted.")
    paths = [r[0] for r in recs]
    if len(set(paths)) != len(paths):
        raise ValueError("load_compressed: two leaves share a path: corrupted.")
    tree = _build_tree(paths)
    treedef = jax.tree.structure(tree)
    order = jax.tree.leaves(tree)  # record index of each leaf, in flattening order
    recs = [recs[i] for i in order]
    return QuantizedParams(
        [jnp.asarray(r[2]) for r in recs],
        [jnp.asarray(r[3]) for r in recs],
        [r[4] for r in recs],
        widths=[r[5] for r in recs],
        treedef=treedef,
        paths=[p for p, _ in leaves_with_paths(tree)],
        dtypes=[r[1] for r in recs],
    )


def compression_report(q: QuantizedParams) -> dict[str, Any]:
    """Sizes of the compressed file, per leaf and in total, against float32 dense.

    The byte counts come from the same encoder as :func:`save_compressed`, so
    ``total_bytes`` equals the size of the file it writes.

    Args:
      q: from :func:`~fisher_optax.quantize`.

    Returns:
      A dict with ``leaves`` (per leaf: ``path``, ``shape``, ``weights``, ``kept``,
      ``widths``, ``bytes`` and the bytes of its ``header``, ``codebooks``, ``positions``,
      ``width_map`` and ``codes`` sections), ``header_bytes`` (the file header),
      ``total_bytes``, ``total_bits``, ``dense_float32_bytes`` (4 bytes per weight),
      ``ratio`` (dense float32 bytes over total bytes) and ``bits_per_weight``.

    Raises:
      TypeError / ValueError: as :func:`save_compressed`.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> w = jnp.zeros(1000).at[::10].set(1.0)  # 90% pruned
      >>> q = fisher_optax.quantize({"w": w}, 1, mask={"w": w != 0}, method="uniform")
      >>> r = fisher_optax.compression_report(q)
      >>> r["total_bytes"], r["dense_float32_bytes"]
      (132, 4000)
    """
    data, leaves = _encode(q)
    dense = 4 * sum(leaf["weights"] for leaf in leaves)
    weights = max(1, sum(leaf["weights"] for leaf in leaves))
    return {
        "leaves": leaves,
        "header_bytes": _HEADER.size,
        "total_bytes": len(data),
        "total_bits": 8 * len(data),
        "dense_float32_bytes": dense,
        "ratio": dense / len(data),
        "bits_per_weight": 8 * len(data) / weights,
    }
