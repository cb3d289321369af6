"""save_compressed / load_compressed / compression_report: exact roundtrip, honest sizes,
relative index coding, and refusal of truncated, corrupted or hostile files."""

import struct
import tracemalloc
import zlib
from typing import NamedTuple

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fisher_optax import (
    compression_report,
    dequantize,
    load_compressed,
    quantize,
    save_compressed,
)
from fisher_optax.export import _HEADER, _relative_entries, _unpack

SHAPES = {"a": {"k": (30, 20), "b": (6,)}, "l": [(7,), ((3, 3),)]}


def _params(seed):
    rng = np.random.default_rng(seed)
    return {
        "a": {
            "k": rng.normal(size=(30, 20)).astype(np.float32),
            "b": rng.normal(size=6).astype(jnp.bfloat16),
        },
        "l": [
            rng.laplace(size=7).astype(np.float32),
            (rng.normal(size=(3, 3)).astype(np.float16),),
        ],
    }


def _assert_same(d1, d2):
    assert jax.tree.structure(d1) == jax.tree.structure(d2)
    for a, b in zip(jax.tree.leaves(d1), jax.tree.leaves(d2), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**16),
    kbits=hnp.arrays(np.int32, (30, 20), elements=st.sampled_from([0, 1, 3, 5])),
    keep=st.floats(0.0, 1.0),
)
def test_property_roundtrip_is_exact_and_report_equals_file_size(tmp_path, seed, kbits, keep):
    params = _params(seed)
    rng = np.random.default_rng(seed)
    widths = np.array([1, 3, 5])
    kbits.flat[:3] = widths  # every leaf has every width: one compiled plan
    bits = jax.tree.map(lambda p: np.resize(widths, p.shape), params)
    bits["a"]["k"] = kbits
    mask = jax.tree.map(lambda p: rng.random(p.shape) < keep, params)
    q = quantize(params, bits, mask=mask, method="uniform")
    f = tmp_path / "q.fq"
    written = save_compressed(f, q)
    assert written == f.stat().st_size == compression_report(q)["total_bytes"]
    q2 = load_compressed(f)
    _assert_same(dequantize(q), dequantize(q2))
    for a, b in zip(q.codes + q.bits, q2.codes + q2.bits, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kmeans_roundtrip_and_report_contents(tmp_path):
    params = _params(0)
    mask = jax.tree.map(lambda p: np.abs(np.asarray(p, np.float32)) > 0.5, params)
    q = quantize(params, 4, mask=mask, init="density")
    save_compressed(tmp_path / "m.fq", q)
    _assert_same(dequantize(q), dequantize(load_compressed(tmp_path / "m.fq")))
    r = compression_report(q)
    assert r["total_bytes"] == r["header_bytes"] + sum(leaf["bytes"] for leaf in r["leaves"])
    for leaf in r["leaves"]:
        parts = ("header", "codebooks", "positions", "width_map", "codes")
        assert leaf["bytes"] == sum(leaf[f"{p}_bytes"] for p in parts)
        assert leaf["codebooks_bytes"] == 16 * 4  # one 4-bit book of float32
        assert leaf["codes_bytes"] == (4 * leaf["kept"] + 7) // 8
    n = sum(np.size(p) for p in jax.tree.leaves(params))
    assert r["dense_float32_bytes"] == 4 * n
    assert r["ratio"] == pytest.approx(4 * n / r["total_bytes"])


def test_tuples_lists_and_a_bare_array_come_back(tmp_path):
    q = quantize(np.arange(8, dtype=np.float32), 3, method="uniform")
    save_compressed(tmp_path / "r.fq", q)
    out = dequantize(load_compressed(tmp_path / "r.fq"))
    np.testing.assert_array_equal(np.asarray(out), np.arange(8))
    tree = {"t": (np.ones(2, np.float32),), "l": [np.ones(3, np.float32)]}
    q = quantize(tree, 1, method="uniform")
    save_compressed(tmp_path / "t.fq", q)
    out = dequantize(load_compressed(tmp_path / "t.fq"))
    assert isinstance(out["t"], tuple) and isinstance(out["l"], list)


def _reference_positions(entries, r):
    """Decode relative index coding with a plain Python loop."""
    fill, cursor, out = (1 << r) - 1, -1, []
    for e in entries:
        if e == fill:
            cursor += fill
        else:
            cursor += e + 1
            out.append(cursor)
    return out, cursor


@pytest.mark.parametrize("r", [1, 3, 5, 8])
def test_relative_index_coding_with_fillers(r):
    positions = np.array([0, 1, 40, 41, 1000, 4095])
    entries = _relative_entries(positions, 5000, r)
    assert np.all((entries >= 0) & (entries < 2**r))
    decoded, end = _reference_positions(entries.tolist(), r)
    assert decoded == positions.tolist()
    assert end <= 4999 < end + (2**r - 1)  # fillers reach the end of the leaf
    fill = 2**r - 1
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    assert len(entries) == len(positions) + np.sum(gaps // fill) + (4999 - 4095) // fill


def test_sparse_leaf_is_small():
    w = np.zeros(100_000, np.float32)
    w[::1000] = 1.0
    q = quantize({"w": w}, 1, mask={"w": w != 0}, method="uniform")
    r = compression_report(q)
    # 100 weights 1000 apart: with 8-bit gaps each costs 3 fillers and one entry.
    assert r["leaves"][0]["positions_bytes"] == 8 + 1 + 1 + 8 + 4 * 100
    assert r["ratio"] > 500


def test_unsupported_trees_are_refused(tmp_path):
    class Pair(NamedTuple):
        a: jax.Array
        b: jax.Array

    q = quantize(Pair(np.ones(2, np.float32), np.ones(2, np.float32)), 1, method="uniform")
    with pytest.raises(ValueError, match="has a Pair node at <root>; supported trees"):
        save_compressed(tmp_path / "x.fq", q)
    q = quantize({1: np.ones(2, np.float32)}, 1, method="uniform")
    with pytest.raises(ValueError, match="dict key 1 at <root> is not a str"):
        compression_report(q)
    with pytest.raises(TypeError, match="expected the QuantizedParams"):
        save_compressed(tmp_path / "x.fq", {"w": np.ones(2)})


@pytest.fixture
def saved(tmp_path):
    q = quantize(_params(1), 2, method="uniform")
    f = tmp_path / "ok.fq"
    save_compressed(f, q)
    return f, f.read_bytes()


def test_truncated_file(saved):
    f, data = saved
    for cut in (0, 10, len(data) - 1):
        f.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            load_compressed(f)


def test_corrupted_bytes(saved):
    f, data = saved
    for i in (_HEADER.size, len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[i] ^= 0x40
        f.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="checksum mismatch"):
            load_compressed(f)


def test_wrong_magic_and_version(saved):
    f, data = saved
    f.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match="not a file written by save_compressed"):
        load_compressed(f)
    f.write_bytes(data[:4] + struct.pack("<H", 99) + data[6:])
    with pytest.raises(ValueError, match="format version 99"):
        load_compressed(f)


def _file_with_payload(payload: bytes, num_leaves=1) -> bytes:
    crc = zlib.crc32(payload) & 0xFFFFFFFF
    return _HEADER.pack(b"FOQZ", 1, 0, num_leaves, len(payload), crc) + payload


def _leaf_head(shape):
    # path ['w'], float32 leaf and books, shape, one 1-bit width, its 2-entry codebook
    return (
        struct.pack("<HBH", 1, 0, 1)
        + b"w"
        + struct.pack("<BB", 0, 0)
        + struct.pack(f"<B{len(shape)}Q", len(shape), *shape)
        + struct.pack("<BB", 1, 1)
        + np.zeros(2, np.float32).tobytes()
    )


@pytest.mark.parametrize(
    ("payload", "num_leaves", "match"),
    [
        # every weight kept, 2^40 of them, but only a few bytes of codes
        (_leaf_head((2**40,)) + struct.pack("<QB", 2**40, 1) + b"\0" * 8, 1, "claims"),
        # a sparse leaf of 2^62 weights whose position stream reaches 8 of them
        (
            _leaf_head((2**62,)) + struct.pack("<QBBQ", 1, 0, 8, 1) + b"\0" + b"\0",
            1,
            "position stream does not match",
        ),
        # a position stream longer than the file
        (_leaf_head((4,)) + struct.pack("<QBBQ", 1, 0, 1, 2**50), 1, "bad position stream"),
        # codebook of a width larger than 16
        (struct.pack("<HBBB", 0, 0, 0, 0) + struct.pack("<BB", 1, 40), 1, "bad bit widths"),
        # billions of leaves announced in a tiny payload
        (b"\0" * 16, 2**31, "leaves cannot fit"),
    ],
)
def test_hostile_headers_fail_before_allocating(tmp_path, payload, num_leaves, match):
    f = tmp_path / "evil.fq"
    f.write_bytes(_file_with_payload(payload, num_leaves))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match):
            load_compressed(f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20


def test_header_announcing_more_than_the_file(saved):
    f, data = saved
    magic, version, flags, n, _, crc = _HEADER.unpack(data[: _HEADER.size])
    f.write_bytes(_HEADER.pack(magic, version, flags, n, 2**60, crc) + data[_HEADER.size :])
    with pytest.raises(ValueError, match="announces 1152921504606846976 payload bytes"):
        load_compressed(f)


def test_unpack_is_the_inverse_of_pack():
    from fisher_optax.export import _pack

    rng = np.random.default_rng(0)
    widths = rng.integers(1, 17, size=200)
    values = rng.integers(0, 2**widths)
    np.testing.assert_array_equal(_unpack(_pack(values, widths), widths), values)
