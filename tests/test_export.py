"""save_compressed / load_compressed / compression_report: exact roundtrip, entropy-coded
sizes against the order-0 entropy, raw leaves of every dtype, NNX and Linen trees, and
refusal of truncated, corrupted or hostile files with bounded memory."""

import collections
import math
import os
import struct
import tracemalloc
import warnings
import zlib

import constriction
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fisher_optax import (
    CompressionReport,
    compression_report,
    dequantize,
    load_compressed,
    quantize,
    save_compressed,
)
from fisher_optax.export import (
    _HEADER,
    _MAX_SLICE,
    VERSION,
    _decode_positions,
    _encode_stream,
    _mask_record,
    _positions_bits,
    _Reader,
    _relative_entries,
    _relative_record,
    _table,
    _table_bytes,
    _varints,
)


def _params(seed):
    rng = np.random.default_rng(seed)
    return {
        "a": {
            "k": rng.normal(size=(30, 20)).astype(np.float32),
            "b": rng.normal(size=6).astype(jnp.bfloat16),
        },
        "l": [
            rng.laplace(size=(7, 2)).astype(np.float32),
            (rng.normal(size=(3, 3)).astype(np.float16),),
        ],
    }


def _assert_same(d1, d2):
    assert jax.tree.structure(d1) == jax.tree.structure(d2)
    for a, b in zip(jax.tree.leaves(d1), jax.tree.leaves(d2), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _assert_same_q(q, q2):
    _assert_same(dequantize(q), dequantize(q2))
    for a, b in zip(q.bits + q.codes, q2.bits + q2.codes, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(q.codebooks, q2.codebooks, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


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
    q = quantize(params, bits, mask=mask, method="uniform", quantizable=lambda p, x: True)
    f = tmp_path / "q.fq"
    written = save_compressed(f, q)
    report = compression_report(q)
    assert written == f.stat().st_size == report.total_bytes
    assert report.total_bytes == (
        report.header_bytes + report.padding_bytes + sum(leaf.bytes for leaf in report.leaves)
    )
    _assert_same_q(q, load_compressed(f))


def test_kmeans_roundtrip_and_report_fields(tmp_path):
    params = _params(0)
    mask = jax.tree.map(lambda p: np.abs(np.asarray(p, np.float32)) > 0.5, params)
    q = quantize(params, 4, mask=mask, init="density")
    save_compressed(tmp_path / "m.fq", q)
    _assert_same_q(q, load_compressed(tmp_path / "m.fq"))
    r = compression_report(q)
    assert isinstance(r, CompressionReport)
    for leaf in r.leaves:
        parts = (leaf.header_bytes, leaf.codebook_bytes, leaf.raw_bytes)
        streams = (leaf.positions, leaf.width_map, leaf.codes)
        assert leaf.bytes == sum(parts) + sum(s.bytes for s in streams)
        if leaf.quantized:
            m = np.asarray(jax.tree.leaves(mask)[r.leaves.index(leaf)])
            assert leaf.kept == leaf.codes.symbols == int(m.sum())
            assert leaf.codebook_bytes <= 2 + 16 * 4  # one 4-bit book of float32
        else:  # 1-D leaves are stored raw by default, with their dtype
            assert leaf.raw_bytes == leaf.weights * np.dtype(leaf.dtype).itemsize
    n = sum(np.size(p) for p in jax.tree.leaves(params))
    assert r.weights == n and r.dense_float32_bytes == 4 * n
    assert r.ratio == pytest.approx(4 * n / r.total_bytes)
    assert r.entropy_bytes <= r.total_bytes


def test_tuples_lists_and_a_bare_array_come_back(tmp_path):
    q = quantize(np.arange(8, dtype=np.float32).reshape(2, 4), 3, method="uniform")
    save_compressed(tmp_path / "r.fq", q)
    out = dequantize(load_compressed(tmp_path / "r.fq"))
    np.testing.assert_array_equal(np.asarray(out), np.arange(8).reshape(2, 4))
    tree = {"t": (np.ones((2, 2), np.float32),), "l": [np.ones(3, np.float32)]}
    q = quantize(tree, 1, method="uniform")
    save_compressed(tmp_path / "t.fq", q)
    out = dequantize(load_compressed(tmp_path / "t.fq"))
    assert isinstance(out["t"], tuple) and isinstance(out["l"], list)


# --------------------------------------------------------------------------- entropy coding


def _order0_entropy_bytes(symbols):
    """Independent reference: n * H of the empirical distribution, in bytes."""
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum()) / 8


@pytest.mark.parametrize(("alphabet", "n"), [(2, 20_000), (16, 50_000), (4096, 100_000)])
def test_stream_costs_its_order0_entropy(alphabet, n):
    rng = np.random.default_rng(alphabet)
    p = rng.dirichlet(np.full(alphabet, 0.2))  # skewed
    symbols = rng.choice(alphabet, size=n, p=p)
    s = _encode_stream(symbols, alphabet)
    h = _order0_entropy_bytes(symbols)
    assert s.entropy_bits / 8 == pytest.approx(h)
    assert len(s.data) - s.table_bytes <= 1.01 * h + 16
    rd = _Reader(s.data)
    np.testing.assert_array_equal(rd.stream(n, alphabet, "test"), symbols)
    assert rd.remaining() == 0


def test_skewed_leaf_file_is_near_its_entropy(tmp_path):
    """A 1-bit leaf where 95% of the codes are 0, 90% pruned: far below 1 bit per code."""
    rng = np.random.default_rng(0)
    w = np.where(rng.random((400, 250)) < 0.95, -1.0, 1.0).astype(np.float32)
    mask = rng.random(w.shape) < 0.1
    q = quantize({"w": w}, 1, mask={"w": mask}, method="uniform")
    r = compression_report(q)
    leaf = r.leaves[0]
    codes = np.asarray(q.codes[0])[mask]
    assert leaf.codes.entropy_bytes == pytest.approx(_order0_entropy_bytes(codes))
    assert leaf.codes.bytes < 0.4 * mask.sum() / 8  # a bit map would cost 1 bit each
    for s in (leaf.positions, leaf.codes):
        assert s.bytes <= 1.03 * (s.entropy_bytes + s.table_bytes) + 16
    assert r.total_bytes <= 1.02 * r.entropy_bytes + 32
    assert save_compressed(tmp_path / "s.fq", q) == r.total_bytes


def test_one_symbol_stream_costs_only_its_table():
    s = _encode_stream(np.full(10_000, 3), 8)
    assert len(s.data) == s.table_bytes == 4  # sparse table: 1 used, skip 3, frequency 10000
    assert _Reader(s.data).stream(10_000, 8, "t").tolist() == [3] * 10_000


def test_varints_roundtrip():
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**35, 2**63 - 1])
    data = _varints(values)
    rd = _Reader(data)
    np.testing.assert_array_equal(rd.varints(values.size, "v"), values)
    assert rd.remaining() == 0
    assert len(_varints([127])) == 1 and len(_varints([128])) == 2


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


@pytest.mark.parametrize("r", [1, 3, 5, 8, 12])
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


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.01])
def test_index_width_is_the_best_by_brute_force(keep):
    rng = np.random.default_rng(0)
    n = 50_000
    positions = np.flatnonzero(rng.random(n) < keep)
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    tail = n - 1 - int(positions[-1])
    sizes = {
        r: len(_encode_stream(_relative_entries(positions, n, r), 1 << r).data)
        for r in range(1, 17)
    }
    chosen = sizes[_positions_bits(gaps, tail)]
    assert chosen <= 1.01 * min(sizes.values()) + 8


def test_sparse_leaf_is_small_and_all_pruned_leaf_roundtrips(tmp_path):
    w = np.zeros((1000, 100), np.float32)
    w.flat[::1000] = 1.0
    q = quantize({"w": w}, 1, mask={"w": w != 0}, method="uniform")
    r = compression_report(q)
    # 100 weights exactly 1000 apart: one symbol repeated, the table is all that is stored.
    assert r.leaves[0].positions.bytes < 40 and r.ratio > 2000
    q = quantize({"w": w}, 1, mask={"w": np.zeros(w.shape, bool)}, method="uniform")
    assert save_compressed(tmp_path / "z.fq", q) == compression_report(q).total_bytes
    _assert_same_q(q, load_compressed(tmp_path / "z.fq"))
    # 1e5 weights in a tiny record: the payload is padded to 1 byte per 1024 elements.
    r = compression_report(q)
    assert r.padding_bytes > 4 and r.total_bytes - r.header_bytes == -(-100_000 // 1024)


# --------------------------------------------------------------------------- raw leaves, trees


@pytest.mark.parametrize("shape", [(30, 20), (100, 100)])
def test_all_pruned_small_leaf_costs_bytes_not_a_dense_table(tmp_path, shape):
    # Fewer weights than the widest filler: the widest index width would leave the position
    # stream empty, and an empty stream's table is dense (2^16 + 1 entries, 65 kB).
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    q = quantize({"w": w}, 3, mask={"w": np.zeros(shape, bool)})
    r = compression_report(q)
    assert r.leaves[0].positions.bytes < 20 and r.total_bytes < 100
    assert save_compressed(tmp_path / "p.fq", q) == r.total_bytes
    _assert_same_q(q, load_compressed(tmp_path / "p.fq"))


def test_many_rare_codes_still_give_a_table_the_reader_accepts(tmp_path):
    # One dominant code and 255 codes used once: scaled to 2^16 with every used code kept at
    # frequency >= 1, the table used to sum past 2^16, and the file it wrote failed to load.
    w = np.zeros((700, 100), np.float32)
    w.flat[:255] = np.arange(1, 256, dtype=np.float32)
    q = quantize({"w": w}, 8)
    assert save_compressed(tmp_path / "r.fq", q) == compression_report(q).total_bytes
    _assert_same_q(q, load_compressed(tmp_path / "r.fq"))
    rng = np.random.default_rng(1)
    for _ in range(20):
        counts = np.where(rng.random(4096) < 0.5, rng.integers(1, 3, 4096), 0)
        counts[rng.integers(4096)] = rng.integers(10**5, 10**7)
        freq = _table(counts)
        assert freq.sum() <= 2**16 and np.array_equal(freq > 0, counts > 0)


def test_raw_leaves_of_every_dtype_are_exact(tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "kernel": rng.normal(size=(8, 4)).astype(np.float32),
        "f16": rng.normal(size=3).astype(np.float16),
        "bf16": jnp.asarray(rng.normal(size=4), jnp.bfloat16),
        "f64": rng.normal(size=()).astype(np.float64),
        "nan": np.array([np.nan, np.inf, -0.0], np.float32),
        "step": np.array(7, np.int32),
        "i8": np.array([-128, 127], np.int8),
        "u64": np.array([2**64 - 1], np.uint64),
        "flag": np.array([True, False]),
        "key": jax.random.key(3),
        "keys": jax.random.split(jax.random.key(4, impl="rbg"), 2),
    }
    q = quantize(tree, 2)
    assert [leaf for leaf, quant in zip(q.paths, q.quantized, strict=True) if quant] == [
        "['kernel']"
    ]
    save_compressed(tmp_path / "raw.fq", q)
    out = dequantize(load_compressed(tmp_path / "raw.fq"))
    for name in tree:
        a, b = tree[name], out[name]
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            assert b.dtype == a.dtype and b.shape == a.shape
            np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
        elif name != "kernel":
            assert np.asarray(b).dtype == np.asarray(a).dtype and np.shape(b) == np.shape(a)
            assert np.asarray(b).tobytes() == np.asarray(a).tobytes()


def test_linen_collections_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    variables = {
        "params": {"Conv_0": {"kernel": rng.normal(size=(3, 3, 1, 4)).astype(np.float32),
                              "bias": np.zeros(4, np.float32)}},
        "batch_stats": {"BatchNorm_0": {"mean": rng.normal(size=4).astype(np.float32),
                                        "var": rng.random(4).astype(np.float32)}},
    }  # fmt: skip
    q = quantize(variables, 4)
    save_compressed(tmp_path / "l.fq", q)
    out = dequantize(load_compressed(tmp_path / "l.fq"))
    _assert_same(out, dequantize(q))
    np.testing.assert_array_equal(
        out["batch_stats"]["BatchNorm_0"]["var"], variables["batch_stats"]["BatchNorm_0"]["var"]
    )


def test_an_nnx_state_is_written_without_reading_deprecated_attributes(tmp_path):
    # The writer records each leaf's path by walking the pytree registry; reading a
    # Variable's `.value` attribute instead warns on every leaf with Flax >= 0.12.
    nnx = pytest.importorskip("flax.nnx")
    state = nnx.state(nnx.Linear(6, 4, rngs=nnx.Rngs(0)))
    q = quantize(state, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        save_compressed(tmp_path / "m.foqz", q)
    loaded = load_compressed(tmp_path / "m.foqz")
    assert loaded.paths == q.paths == ("['bias']", "['kernel']")
    for a, b in zip(
        jax.tree.leaves(dequantize(loaded)), jax.tree.leaves(dequantize(q)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nnx_batchnorm_model_predicts_the_same_after_the_file(tmp_path):
    """An nnx.State with int keys is saved whole, BatchNorm statistics
    and the Dropout RNG state included, and a new instance predicts what the in-memory
    dequantized model predicts."""
    nnx = pytest.importorskip("flax.nnx")

    def build(seed):
        rngs = nnx.Rngs(seed)
        return nnx.Sequential(
            nnx.Linear(4, 8, rngs=rngs),
            nnx.BatchNorm(8, rngs=rngs),
            nnx.relu,
            nnx.Dropout(0.1, rngs=rngs),
            nnx.Linear(8, 3, rngs=rngs),
        )

    # The slowest test of this file (~20 s on a cold worker, nearly all Flax's eager init
    # and one nnx.jit compile): the whole Flax round trip, run once.
    model = build(0)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype(np.float32), rng.integers(0, 3, 32)

    @nnx.jit
    def step(model, opt):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        opt.update(model, nnx.grad(loss)(model))

    for _ in range(3):
        step(model, opt)
    model.eval()
    state = nnx.state(model)
    assert np.any(np.asarray(state["layers"][1]["mean"][...]) != 0)  # statistics moved
    q = quantize(state, 4)
    save_compressed(tmp_path / "bn.fq", q)
    loaded = dequantize(load_compressed(tmp_path / "bn.fq"))
    # Issue 10 item 8: the State's structure, nnx.Sequential's int keys included.
    assert jax.tree.structure(loaded) == jax.tree.structure(nnx.to_pure_dict(state))
    assert set(loaded["layers"]) == {0, 1, 3, 4}
    assert q.quantized.count(True) == 2  # the two kernels; everything else is raw
    expected = nnx.merge(nnx.graphdef(model), dequantize(q))
    fresh = build(1)
    fresh.eval()
    target = nnx.state(fresh)
    nnx.replace_by_pure_dict(target, loaded)
    nnx.update(fresh, target)
    np.testing.assert_array_equal(fresh(x), expected(x))
    np.testing.assert_array_equal(
        fresh.layers[1].var[...], np.asarray(state["layers"][1]["var"][...])
    )


def test_unsupported_keys_are_refused_before_work(tmp_path):
    q = quantize({(1, 2): np.ones((2, 2), np.float32)}, 1, method="uniform")
    with pytest.raises(
        ValueError, match=r"key \(1, 2\) of type tuple at <root>; the file records str and int"
    ):
        compression_report(q)
    with pytest.raises(TypeError, match="q must be the QuantizedParams"):
        save_compressed(tmp_path / "x.fq", {"w": np.ones(2)})
    q = quantize({"c": np.ones(2, np.complex64), "w": np.ones((2, 2), np.float32)}, 1)
    with pytest.raises(ValueError, match=r"params at \['c'\] has dtype complex64"):
        save_compressed(tmp_path / "x.fq", q)


# --------------------------------------------------------------------------- hostile files


@pytest.fixture
def saved(tmp_path):
    q = quantize(_params(1), 2, method="uniform")
    f = tmp_path / "ok.fq"
    save_compressed(f, q)
    return f, f.read_bytes()


def test_failed_save_leaves_the_previous_file_and_no_debris(saved, monkeypatch):
    f, good = saved
    q = quantize({"w": np.random.default_rng(0).normal(size=(50, 40)).astype(np.float32)}, 4)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fisher_optax.export.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_compressed(f, q)
    assert f.read_bytes() == good and sorted(p.name for p in f.parent.iterdir()) == ["ok.fq"]
    monkeypatch.undo()
    # A save that succeeds replaces the file whole, with the umask's permissions, and
    # writes through a symlink as open(path, "wb") does.
    link = f.parent / "link.fq"
    link.symlink_to(f)
    n = save_compressed(link, q)
    assert link.is_symlink() and f.stat().st_size == n
    _assert_same_q(q, load_compressed(f))
    umask = os.umask(0)
    os.umask(umask)
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask


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
    f.write_bytes(data[:4] + struct.pack("<H", 1) + data[6:])
    with pytest.raises(ValueError, match=r"format version 1 .* knows versions 2, 3, 4"):
        load_compressed(f)


def _file_with_payload(payload: bytes, num_leaves=1, version=2) -> bytes:
    # The hand-made records below are laid out as version 2 (no codebook-axis byte).
    crc = zlib.crc32(payload) & 0xFFFFFFFF
    return _HEADER.pack(b"FOQZ", version, 0, num_leaves, len(payload), crc) + payload


def _leaf_head(shape, book=2, axis_byte=b""):
    # path ['w'], quantized float32 leaf, shape, float32 books, one 1-bit width, (from
    # version 3: the codebook axis byte), its book
    return (
        struct.pack("<HBH", 1, 0, 1)
        + b"w"
        + struct.pack("<BB", 0, 0)
        + struct.pack(f"<B{len(shape)}Q", len(shape), *shape)
        + struct.pack("<BBB", 0, 1, 1)
        + axis_byte
        + struct.pack("<H", book - 1)
        + np.zeros(book, np.float32).tobytes()
    )


_END = struct.pack("<I", 0)  # no padding


@pytest.mark.parametrize(
    ("payload", "num_leaves", "match"),
    [
        # every weight kept, 2^40 of them, in a few bytes
        (_leaf_head((2**40,)) + b"\1" + b"\0" * 8 + _END, 1, "more than 1024 elements"),
        # 3e4 weights, under the budget, but an empty table of codes follows
        (_leaf_head((30, 1000)) + b"\1" + _END, 1, "table of the codes of leaf 0 is invalid"),
        # a position stream claiming more entries than the leaf has weights
        (_leaf_head((4,)) + struct.pack("<BBQ", 0, 1, 2**50) + _END, 1, "bad position stream"),
        # an index width above 16
        (_leaf_head((4,)) + struct.pack("<BBQ", 0, 40, 2) + _END, 1, "bad position stream"),
        # a frequency table that sums past 2^16 (corrupted table)
        (
            _leaf_head((4,)) + struct.pack("<BBQ", 0, 1, 4) + _varints([0, 2**20, 1]) + _END,
            1,
            "table of the positions of leaf 0 is invalid",
        ),
        # an all-zero frequency table
        (
            _leaf_head((4,)) + struct.pack("<BBQ", 0, 1, 4) + _varints([0, 0, 0]) + _END,
            1,
            "is invalid",
        ),
        # a table entry that is a 4-byte varint (no legal table has one)
        (
            _leaf_head((4,)) + struct.pack("<BBQ", 0, 1, 4) + b"\0\xff\xff\xff\x01\x01" + _END,
            1,
            "a varint in the table",
        ),
        # a word count far beyond the file
        (
            _leaf_head((4,)) + struct.pack("<BBQ", 0, 1, 4) + _varints([0, 1, 1, 2**40]) + _END,
            1,
            "needs 4398046511104 bytes",
        ),
        # a codebook longer than 2^b
        (_leaf_head((4,), book=3) + b"\1" + _END, 1, "1-bit codebook of 3 entries"),
        # codebook of a width larger than 16
        (struct.pack("<HBBB", 0, 0, 0, 0) + struct.pack("<BBB", 0, 1, 40), 1, "bad bit widths"),
        # billions of leaves announced in a tiny payload
        (b"\0" * 16, 2**31, "leaves cannot fit"),
    ],
)
def test_hostile_files_fail_before_allocating(tmp_path, payload, num_leaves, match):
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


def test_hostile_stream_words_decode_to_bounded_garbage_or_an_error(tmp_path):
    """Random ANS words with a valid table and CRC: symbols stay in range or it is refused."""
    head = _leaf_head((64,)) + struct.pack("<BBQ", 0, 3, 64) + _varints([0] + [1] * 8)
    for seed in range(5):
        words = np.random.default_rng(seed).integers(1, 2**32, 3, dtype=np.uint64)
        body = _varints([3]) + words.astype("<u4").tobytes()
        f = tmp_path / "w.fq"
        f.write_bytes(_file_with_payload(head + body + _END))
        with pytest.raises(ValueError, match="corrupted"):
            load_compressed(f)


def test_header_announcing_more_than_the_file(saved):
    f, data = saved
    magic, version, flags, n, _, crc = _HEADER.unpack(data[: _HEADER.size])
    f.write_bytes(_HEADER.pack(magic, version, flags, n, 2**60, crc) + data[_HEADER.size :])
    with pytest.raises(ValueError, match="announces 1152921504606846976 payload bytes"):
        load_compressed(f)


# ------------------------------------------------ per-slice codebooks, format version 3 (E)

# A version-2 file, written by the version-2 writer (fisher-optax before per-slice
# codebooks) for quantize({"w": W, "b": [1, -1]}, 2, mask={"w": W != 0, ...}) with
# W = [[0, 1, -2, 3], [0.5, 0, 2.5, -1]].
_V2_FILE = bytes.fromhex(
    "464f515a02000000020000006900000000000000b566334a01000001006201000102000000000000"
    "000000803f000080bf010000010077000002020000000000000004000000000000000001020300000000"
    "c0000080bf0000403f00003040000506000000000000000200040002010cabaa06000101020201240080"
    "8a00000000"
)
_V2_W = np.array([[0.0, 1.0, -2.0, 3.0], [0.5, 0.0, 2.5, -1.0]], np.float32)


def _header_version(data: bytes) -> int:
    return _HEADER.unpack(data[: _HEADER.size])[1]


def test_version_2_files_still_load_and_the_writer_writes_version_4(tmp_path):
    f = tmp_path / "v2.fq"
    f.write_bytes(_V2_FILE)
    q = load_compressed(f)
    assert q.axes == (None, None)
    d = dequantize(q)
    np.testing.assert_array_equal(np.asarray(d["b"]), [1.0, -1.0])
    want = dequantize(quantize({"w": _V2_W}, 2, mask={"w": _V2_W != 0}))["w"]
    np.testing.assert_array_equal(np.asarray(d["w"]), np.asarray(want))
    q2 = quantize(
        {"w": jnp.asarray(_V2_W), "b": jnp.array([1.0, -1.0], jnp.float32)},
        2,
        mask={"w": _V2_W != 0, "b": np.ones(2, bool)},
    )
    save_compressed(tmp_path / "again.fq", q2)
    again = (tmp_path / "again.fq").read_bytes()
    assert _header_version(again) == VERSION == 4
    _assert_same_q(q2, load_compressed(tmp_path / "again.fq"))


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**16), keep=st.floats(0.0, 1.0), axis=st.sampled_from([0, -1]))
def test_property_per_slice_roundtrip_is_exact(tmp_path, seed, keep, axis):
    rng = np.random.default_rng(seed)
    params = _params(seed)
    mask = jax.tree.map(lambda x: rng.random(np.shape(x)) < keep, params)
    bits = jax.tree.map(lambda x: rng.integers(1, 4, np.shape(x)), params)
    q = quantize(params, bits, mask=mask, axis=axis)
    f = tmp_path / "slices.fq"
    n = save_compressed(f, q)
    data = f.read_bytes()
    assert n == len(data) == compression_report(q).total_bytes
    assert _header_version(data) == VERSION == 4
    q2 = load_compressed(f)
    _assert_same_q(q, q2)
    assert q2.axes == q.axes


def test_per_slice_report_counts_every_slice_codebook(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 6)).astype(np.float32)
    mask = rng.random(w.shape) < 0.6
    mask[:, 5] = False  # a channel with nothing kept: no entries
    bits = np.where(rng.random(w.shape) < 0.5, 2, 3)
    q = quantize({"w": w}, {"w": bits}, mask={"w": mask}, axis=-1)
    leaf = compression_report(q).leaves[0]
    assert leaf.axis == 1 and leaf.widths == (2, 3)
    kept = mask & (bits > 0)
    expect = 0
    for b in (2, 3):
        # Entries per channel, counted with a NumPy loop: the distinct values it codes.
        sizes = [min(2**b, len(np.unique(w[kept[:, c] & (bits[:, c] == b), c]))) for c in range(6)]
        assert sizes[5] == 0
        width = np.asarray(q.codebooks[0][b]).shape[1]
        assert width == max(sizes)
        expect += 2 + len(_encode_stream(np.array(sizes), width + 1).data) + 4 * sum(sizes)
    assert leaf.codebook_bytes == expect
    per_leaf = compression_report(quantize({"w": w}, {"w": bits}, mask={"w": mask})).leaves[0]
    assert per_leaf.axis is None and per_leaf.codebook_bytes == 2 * 2 + 4 * (4 + 8)
    n = save_compressed(tmp_path / "r.fq", q)
    assert n == compression_report(q).total_bytes


def test_per_slice_code_beyond_its_slice_codebook_is_refused(tmp_path):
    # Leaf ['w'] of shape (1, 2), one 1-bit width, a codebook per slice along axis 1:
    # slice 0 has 1 entry, slice 1 has 2; the code of slice 0 is 1: out of its book.
    lengths = _encode_stream(np.array([1, 2]), 3).data
    codes = _encode_stream(np.array([1, 0]), 2).data
    rec = (
        struct.pack("<HBH", 1, 0, 1)
        + b"w"
        + struct.pack("<BB", 0, 0)
        + struct.pack("<B2Q", 2, 1, 2)
        + struct.pack("<BBBB", 0, 1, 1, 2)  # book dtype, one width: 1, axis byte 1 + 1
        + struct.pack("<H", 1)
        + lengths
        + np.array([0.5, -1.0, 1.0], np.float32).tobytes()
        + struct.pack("<B", 1)  # every weight kept
        + codes
    )
    payload = rec + struct.pack("<I", 0)
    crc = zlib.crc32(payload) & 0xFFFFFFFF
    f = tmp_path / "bad.fq"
    f.write_bytes(_HEADER.pack(b"FOQZ", 3, 0, 1, len(payload), crc) + payload)
    with pytest.raises(ValueError, match="code beyond its slice's codebook: corrupted"):
        load_compressed(f)
    # The same record with a valid code loads, with the slice's book padded by its entry.
    good = rec[: -len(codes)] + _encode_stream(np.array([0, 1]), 2).data + struct.pack("<I", 0)
    crc = zlib.crc32(good) & 0xFFFFFFFF
    f.write_bytes(_HEADER.pack(b"FOQZ", 3, 0, 1, len(good), crc) + good)
    q = load_compressed(f)
    np.testing.assert_array_equal(np.asarray(q.codebooks[0][1]), [[0.5, 0.5], [-1.0, 1.0]])
    np.testing.assert_array_equal(np.asarray(dequantize(q)["w"]), [[0.5, 1.0]])


def test_one_width_per_slice_is_stored_per_slice(tmp_path):
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(50, 8)) * rng.lognormal(0, 1, 8)).astype(np.float32)
    mask = rng.random(w.shape) < 0.7
    mask[0, 1] = True  # the weight whose width changes below
    per_channel = np.where(np.arange(8) % 3 == 0, 3, 1)
    bits = np.broadcast_to(per_channel, w.shape)
    q = quantize({"w": w}, {"w": bits}, mask={"w": mask}, axis=-1)
    leaf = compression_report(q).leaves[0]
    # One symbol per slice (plus the mode byte), not one per kept weight.
    assert leaf.width_map.symbols == 8
    f = tmp_path / "slices.fq"
    assert save_compressed(f, q) == compression_report(q).total_bytes
    _assert_same_q(q, load_compressed(f))
    # Widths that vary inside a slice fall back to one symbol per kept weight.
    mixed = bits.copy()
    mixed[0, 1] = 3
    q = quantize({"w": w}, {"w": mixed}, mask={"w": mask}, axis=-1)
    assert compression_report(q).leaves[0].width_map.symbols == int(mask.sum())
    save_compressed(f, q)
    _assert_same_q(q, load_compressed(f))


def test_save_into_a_missing_folder_names_the_path_asked_for(tmp_path):
    q = quantize({"w": np.ones((4, 4), np.float32)}, 2)
    with pytest.raises(FileNotFoundError, match=r"No such file or directory: '.*nowhere/m\.fq'"):
        save_compressed(tmp_path / "nowhere" / "m.fq", q)


def test_python_scalar_leaves_are_stored_as_0d_arrays(tmp_path):
    params = {"kernel": np.ones((3, 3), np.float32), "temperature": 0.5, "steps": 3}
    q = quantize(params, 2)
    assert save_compressed(tmp_path / "s.fq", q) == compression_report(q).total_bytes
    out = dequantize(load_compressed(tmp_path / "s.fq"))
    assert out["temperature"].dtype == np.float32 and float(out["temperature"]) == 0.5
    assert out["steps"].dtype == np.int32 and int(out["steps"]) == 3


# ------------------------------------------- positions: the mask coding, format version 4


def _structured_mask(rng, shape, density, dead):
    """A mask with dead slices along every axis and a kept density varying along the last."""
    alive = [rng.random(s) >= dead for s in shape]
    keep = rng.random(shape) < density * np.linspace(0.0, 2.0, shape[-1]) ** 2 if shape else True
    live = np.ones(shape, bool)
    for a, flags in enumerate(alive):
        live &= flags.reshape([-1 if b == a else 1 for b in range(len(shape))])
    return np.asarray(keep & live, bool)


def _decoded(record: bytes, shape, version=4):
    rd = _Reader(record)
    positions = _decode_positions(rd, shape, 0, version)
    assert rd.remaining() == 0
    return positions


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
    density=st.floats(0.0, 0.6),
    dead=st.sampled_from([0.0, 0.2, 0.5]),
    seed=st.integers(0, 2**16),
    structured=st.booleans(),
)
def test_property_mask_coding_decodes_to_the_relative_decoders_positions(
    shape, density, dead, seed, structured
):
    rng = np.random.default_rng(seed)
    if structured:
        mask = _structured_mask(rng, shape, density, dead)
    else:
        mask = rng.random(shape) < density
    kept = np.flatnonzero(mask)
    n = mask.size
    relative, _ = _relative_record(kept, n)
    record, info, axis, _ = _mask_record(mask)
    from_relative = _decoded(relative, shape)
    np.testing.assert_array_equal(from_relative, kept)
    np.testing.assert_array_equal(_decoded(record, shape), from_relative)
    assert axis is None or 0 <= axis < len(shape)
    assert len(record) <= info / 8 + 4 * (len(shape) + 6)


def _reference_mask_bits(mask: np.ndarray, axis) -> float:
    """The information content of the mask coding, from exact binomials in Python ints."""

    def flags(d, length):  # length flags, d of them set, each coded with p = d / length
        if d in (0, length):
            return 0.0
        return -d * math.log2(d / length) - (length - d) * math.log2(1 - d / length)

    total = 0.0
    alive = []
    for a in range(mask.ndim):
        others = tuple(b for b in range(mask.ndim) if b != a)
        dead = ~mask.any(axis=others)
        total += flags(int(dead.sum()), dead.size)
        alive.append(np.flatnonzero(~dead))
    live = mask[np.ix_(*alive)]
    if axis is None:
        return total + flags(int(live.sum()), live.size)
    slices = np.moveaxis(live, axis, 0).reshape(live.shape[axis], -1)
    m = slices.shape[1]
    counts = [int(row.sum()) for row in slices]
    total += sum(math.log2(math.comb(m, k)) for k in counts)
    # The counts: uniform in 1..m, or by bit length (the file's table of bit lengths,
    # their order-0 entropy, then the bits below each leading one): the cheaper.
    lengths = collections.Counter(k.bit_length() for k in counts)
    table = np.zeros(15, np.int64)
    for b, c in lengths.items():
        table[b - 1] = c
    by_length = 8 * len(_table_bytes(table)) + sum((b - 1) * c for b, c in lengths.items())
    by_length -= sum(c * math.log2(c / len(counts)) for c in lengths.values())
    return total + min(len(counts) * math.log2(m), by_length)


@pytest.mark.parametrize(
    ("shape", "density", "code"),
    [((120, 80), 0.08, 3), ((400, 200), 0.03, 4)],
    ids=["uniform-counts", "counts-by-bit-length"],
)
def test_mask_coding_costs_its_exact_binomials_and_flags(shape, density, code):
    rng = np.random.default_rng(3)
    mask = _structured_mask(rng, shape, density, 0.3)  # dead rows and columns
    record, info, axis, _ = _mask_record(mask)
    # The density varies along the last axis: counts along it pay; code 2a+1 counts
    # uniformly, 2a+2 by bit length.
    assert axis == 1 and _Reader(record[1:]).varints(2, "head")[1] == code
    assert info == pytest.approx(_reference_mask_bits(mask, axis), rel=1e-9)
    # Every other count axis and the single probability cost at least as much.
    for other in (None, 0, 1):
        assert info <= _reference_mask_bits(mask, other) + 1e-6
    assert len(record) <= info / 8 + 24
    relative, _ = _relative_record(np.flatnonzero(mask), mask.size)
    assert len(record) < 0.9 * len(relative)
    np.testing.assert_array_equal(_decoded(record, mask.shape), np.flatnonzero(mask))


@pytest.mark.parametrize(
    "shape", [(400,), (6, 5, 8, 30), (300, 100)], ids=["1-D", "4-D", "dead-units"]
)
def test_the_file_picks_the_shorter_position_record_and_roundtrips(tmp_path, shape):
    rng = np.random.default_rng(len(shape))
    mask = _structured_mask(rng, shape, 0.1, 0.3 if len(shape) > 1 else 0.0)
    w = np.where(mask, rng.normal(size=shape) + 2.0, 0.0).astype(np.float32)
    q = quantize({"w": w}, 2, mask={"w": mask}, method="uniform", quantizable=lambda p, x: True)
    leaf = compression_report(q).leaves[0]
    relative, _ = _relative_record(np.flatnonzero(mask), mask.size)
    record, _, axis, _ = _mask_record(mask)
    # The mask coding where it is at least 1% shorter (its decoder is the slower one).
    use_mask = len(record) < 0.99 * len(relative)
    assert leaf.positions.bytes == (len(record) if use_mask else len(relative))
    assert leaf.position_coding == ("mask" if use_mask else "relative")
    if len(shape) > 1:  # dead units and a density that varies by unit: the mask coding wins
        assert leaf.position_coding == "mask" and leaf.position_axis == axis
    f = tmp_path / "m.fq"
    assert save_compressed(f, q) == compression_report(q).total_bytes
    _assert_same_q(q, load_compressed(f))


@pytest.mark.parametrize("keep", [False, True])
def test_all_pruned_and_none_pruned_leaves(tmp_path, keep):
    w = np.random.default_rng(0).normal(size=(5, 5, 3, 8)).astype(np.float32)
    mask = np.full(w.shape, keep)
    q = quantize({"w": w}, 3, mask={"w": mask})
    leaf = compression_report(q).leaves[0]
    if keep:
        assert (leaf.position_coding, leaf.positions.bytes) == ("all", 1)
    else:  # every slice along every axis dead: the counts and nothing else
        assert leaf.position_coding == "mask" and leaf.positions.bytes == 1 + 7
    f = tmp_path / "e.fq"
    assert save_compressed(f, q) == compression_report(q).total_bytes
    _assert_same_q(q, load_compressed(f))


def _mask_file(tmp_path, shape, fields, words=(), version=4, pad=0, word_count=None, table=b""):
    """A one-leaf file whose position record is mode 2 with these varint fields, count
    table and words."""
    count = len(words) if word_count is None else word_count
    record = b"\2" + _varints(fields) + table + _varints([count])
    record += np.asarray(words, "<u4").tobytes()
    head = _leaf_head(shape, axis_byte=b"\0" if version >= 3 else b"")
    payload = head + record + struct.pack("<I", pad) + bytes(pad)
    f = tmp_path / "mask.fq"
    f.write_bytes(_file_with_payload(payload, version=version))
    return f


def _words(*parts):
    """ANS words of (symbols, model, parameters) parts, decoded in the order given."""
    coder = constriction.stream.stack.AnsCoder()
    for symbols, model, params in reversed(parts):
        coder.encode_reverse(np.asarray(symbols, np.int32), model, np.asarray(params))
    return coder.get_compressed()


def test_corrupted_mask_records_are_refused_by_name(tmp_path):
    bern = constriction.stream.model.Bernoulli(perfect=False)
    uni = constriction.stream.model.Uniform()
    cases = [
        # fields: kept, count axis + 1, dead slices per axis
        ((4, 3), [1, 5, 0, 0], (), r"declares count code 5 \(at most 4\) and dead slices \[0, 0\]"),
        ((4, 3), [1, 0, 9, 0], (), r"dead slices \[9, 0\]"),
        ((4, 3), [20, 0, 0, 0], (), r"20 kept weights in a live block of shape \(4, 3\)"),
        # two of four rows flagged dead, but the flags decode to one
        ((4, 3), [3, 0, 2, 0], _words(([1, 0, 0, 0], bern, [0.5] * 4)), "wrong dead count"),
        # count per row (axis 0, slices of 3): the counts sum to 2, the record says 3
        (
            (2, 3),
            [3, 1, 0, 0],
            _words(([0, 0], uni, np.array([3, 3], np.int32))),
            "wrong slice counts",
        ),
        # row 1 keeps nothing but is not flagged dead
        (
            (2, 3),
            [3, 0, 0, 0],
            _words(([1, 1, 1, 0, 0, 0], bern, [0.5] * 6)),
            "empty slice not flagged dead along axis 0",
        ),
        ((2, 3), [0, 0, 2, 3], [12345], "words left over"),
    ]
    for shape, fields, words, match in cases:
        with pytest.raises(ValueError, match=match):
            load_compressed(_mask_file(tmp_path, shape, fields, words))
    # Counts by bit length (code 2: along axis 0): an empty table; a count of 4 or more
    # (bit length 3) in slices of 3.
    empty = _table_bytes(np.zeros(15, np.int64))
    with pytest.raises(ValueError, match="count table of the position mask of leaf 0 is inval"):
        load_compressed(_mask_file(tmp_path, (2, 3), [4, 2, 0, 0], table=empty))
    lengths_3 = _table_bytes(np.eye(15, dtype=np.int64)[2] * 2)
    words = _words(([0, 0], uni, np.array([4, 4], np.int32)))
    f = _mask_file(tmp_path, (2, 3), [4, 2, 0, 0], words, table=lengths_3)
    with pytest.raises(ValueError, match="slice count above the slice length 3"):
        load_compressed(f)
    # Slices longer than the format allows: the decoder would loop over each position.
    long = _mask_file(tmp_path, (2, _MAX_SLICE + 1), [2, 1, 0, 0], pad=64)
    with pytest.raises(ValueError, match=f"slices of {_MAX_SLICE + 1} weights along axis 0"):
        load_compressed(long)
    cut_short = _mask_file(tmp_path, (4, 3), [1, 0, 0, 0], word_count=10)
    with pytest.raises(ValueError, match="needs 40 bytes but only 4 remain"):
        load_compressed(cut_short)
    # Mode 2 does not exist before version 4.
    with pytest.raises(ValueError, match="unknown position mode 2 in leaf 0 of a version 3"):
        load_compressed(_mask_file(tmp_path, (4, 3), [1, 0, 0, 0], version=3))


def test_random_mask_words_decode_to_an_error_not_a_crash(tmp_path):
    lengths = _table_bytes(np.array([3, 3, 1] + [0] * 12))
    for seed in range(8):
        words = np.random.default_rng(seed).integers(1, 2**32, 3, dtype=np.uint64)
        # counts along axis 1, uniform (code 3) and by bit length (code 4)
        for code, table in ((3, b""), (4, lengths)):
            f = _mask_file(tmp_path, (8, 8), [10, code, 1, 0], words.astype(np.uint32), table=table)
            with pytest.raises(ValueError, match="corrupted"):
                load_compressed(f)
