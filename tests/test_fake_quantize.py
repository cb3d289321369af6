"""fake_quantize and reassign: nearest entries against a NumPy brute force (mixed widths,
per-slice codebooks, pruned and raw leaves), the straight-through gradient, jit, the round
trip through reassign and the file, and the errors by their messages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fisher_optax import (
    dequantize,
    fake_quantize,
    load_compressed,
    quantize,
    quantize_to_target,
    reassign,
    save_compressed,
)
from tests import zoo


def _setup(seed=0, axis=None):
    """Two kernels (one with widths 2, 3 and 5 and pruned weights), a raw bias, and float
    params that moved away from the codebooks."""
    rng = np.random.default_rng(seed)
    params = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)},
        "b": {
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
            "kernel": jnp.asarray(rng.laplace(size=(5, 4)), jnp.float32),
        },
    }
    bits = {
        "a": {"kernel": rng.choice([0, 2, 3, 5], size=(12, 10))},
        "b": {"bias": np.zeros(4, int), "kernel": np.where(rng.random((5, 4)) < 0.3, 0, 2)},
    }
    q = quantize(params, bits, axis=axis)
    moved = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape) * 0.7, x.dtype), params)
    return q, moved


def _brute_force(x, bits, books, axis):
    """Per weight, the entry of its width's codebook (its slice's row) at the least distance,
    the first such entry; 0 where pruned."""
    x, bits = np.asarray(x, np.float64), np.asarray(bits)
    out = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
        b = int(bits[idx])
        if b == 0:
            continue
        book = np.asarray(books[b], np.float64)
        if axis is not None:
            book = book[idx[axis]]
        out[idx] = book[np.argmin(np.abs(book - x[idx]))]
    return out


@pytest.mark.parametrize("axis", [None, -1, 0])
def test_fake_quantize_takes_the_nearest_entry_of_each_weights_codebook(axis):
    q, moved = _setup(axis=axis)
    got = jax.jit(fake_quantize)(moved, q)
    leaves = jax.tree.leaves(moved)
    for i, (x, g) in enumerate(zip(leaves, jax.tree.leaves(got), strict=True)):
        if q.bits[i] is None:  # raw: passed through
            np.testing.assert_array_equal(g, x)
            continue
        ax = None if q.axes[i] is None else q.axes[i]
        want = _brute_force(x, q.bits[i], q.codebooks[i], ax)
        # A midpoint in float32 may differ from the exact one by an ulp: compare distances.
        dist_got = np.abs(np.asarray(g, np.float64) - np.asarray(x, np.float64))
        dist_want = np.abs(want - np.asarray(x, np.float64))
        np.testing.assert_allclose(dist_got, dist_want, rtol=0, atol=1e-6)
        assert np.all(np.asarray(g)[np.asarray(q.bits[i]) == 0] == 0)
    eager = fake_quantize(moved, q)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("axis", [None, -1])
def test_fake_quantize_searches_books_of_64_entries(axis):
    # 6 bits everywhere, 128 weights per slice: books above 32 entries are searched by a
    # binary search, not by comparing with every midpoint.
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(128, 3)), jnp.float32)
    q = quantize({"w": w}, 6, axis=axis)
    book = q.codebooks[0][6]
    assert book.shape[-1] == 64
    moved = {"w": w + jnp.asarray(rng.normal(size=w.shape), jnp.float32)}
    got = np.asarray(jax.jit(fake_quantize)(moved, q)["w"], np.float64)
    want = _brute_force(moved["w"], q.bits[0], q.codebooks[0], None if axis is None else 1)
    x = np.asarray(moved["w"], np.float64)
    np.testing.assert_allclose(np.abs(got - x), np.abs(want - x), rtol=0, atol=1e-6)


def test_fake_quantize_of_the_dequantized_params_is_the_identity():
    q, _ = _setup()
    dense = dequantize(q)
    for a, b in zip(jax.tree.leaves(fake_quantize(dense, q)), jax.tree.leaves(dense), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_gradient_passes_straight_through_kept_weights_and_not_pruned_ones():
    q, moved = _setup()
    rng = np.random.default_rng(1)
    cot = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), moved)

    def loss(p):
        pairs = zip(jax.tree.leaves(fake_quantize(p, q)), jax.tree.leaves(cot), strict=True)
        return sum(jnp.vdot(a, b) for a, b in pairs)

    grads = jax.jit(jax.grad(loss))(moved)
    for i, (g, c) in enumerate(zip(jax.tree.leaves(grads), jax.tree.leaves(cot), strict=True)):
        kept = np.ones(np.shape(c), bool) if q.bits[i] is None else np.asarray(q.bits[i]) > 0
        np.testing.assert_array_equal(g, np.where(kept, c, 0))


@pytest.mark.parametrize("axis", [None, -1])
def test_reassign_codes_what_fake_quantize_computes_and_the_file_keeps_it(tmp_path, axis):
    q, moved = _setup(axis=axis)
    r = reassign(moved, q)
    assert r.bits is q.bits and r.codebooks == q.codebooks and r.lam is None
    for a, b in zip(
        jax.tree.leaves(dequantize(r)), jax.tree.leaves(fake_quantize(moved, q)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert any(
        np.any(np.asarray(a) != np.asarray(b))
        for a, b in zip(r.codes, q.codes, strict=True)
        if a is not None
    )
    save_compressed(tmp_path / "m.fo", r)
    loaded = dequantize(load_compressed(tmp_path / "m.fo"))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(dequantize(r)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_reassign_of_the_dequantized_params_gives_back_q():
    params = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(40, 30)), jnp.float32)}
    q, _ = quantize_to_target(params, size_bytes=400, mask={"w": jnp.ones((40, 30), bool)})
    r = reassign(dequantize(q), q)
    np.testing.assert_array_equal(r.codes[0], q.codes[0])
    assert r.codes[0].dtype == q.codes[0].dtype


def test_errors_name_what_was_expected():
    q, moved = _setup()
    with pytest.raises(TypeError, match="q must be the QuantizedParams returned by quantize"):
        fake_quantize(moved, dequantize(q))
    with pytest.raises(TypeError, match="must be the QuantizedParams returned by quantize"):
        reassign(moved, dequantize(q))
    wrong = {"a": moved["a"], "b": {"bias": moved["b"]["bias"], "kernel": jnp.zeros((4, 5))}}
    with pytest.raises(ValueError, match=r"\['b'\]\['kernel'\]"):
        fake_quantize(wrong, q)
    with pytest.raises(ValueError, match=r"\['b'\]\['kernel'\]"):
        reassign(wrong, q)


def _train_through_fake_quantize(params, q, loss_fn, steps=30):
    """``steps`` jitted Adam steps on ``loss_fn(fake_quantize(params, q))``; the losses of
    the quantized model before and after, and the trained float params."""
    opt = optax.adam(3e-2)
    state = opt.init(params)
    loss = lambda p: loss_fn(fake_quantize(p, q))

    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    before = float(loss(params))  # eagerly
    for _ in range(steps):
        params, state = step(params, state)
    return before, float(loss(params)), params


def _nnx_lm():
    """zoo.NnxLM (an nnx.Rngs in the model, a residual, a tied embedding): its Params and a
    loss that merges them with the rest of its state."""
    nnx = pytest.importorskip("flax.nnx")
    graphdef, params, rest = nnx.split(zoo.NnxLM(), nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(1), (8, zoo.SEQ), 0, zoo.VOCAB)
    labels = jax.random.randint(jax.random.key(2), (8, zoo.SEQ), 0, zoo.VOCAB)
    logits = lambda p: nnx.merge(graphdef, p, rest)(tokens)
    return params, lambda p: _cross_entropy(logits(p), labels)


def _linen_resnet():
    """zoo.linen_resnet (BatchNorm, its batch_stats collection held, residuals)."""
    module, variables = zoo.linen_resnet()
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 1))
    labels = jnp.array([0, 2])
    stats = variables["batch_stats"]
    logits = lambda p: module.apply({"params": p, "batch_stats": stats}, x, train=False)
    return variables["params"], lambda p: _cross_entropy(logits(p), labels)


def _eqx_mlp():
    """zoo.eqx_mlp ((out, in) kernels, a callable leaf), partitioned into arrays and the rest."""
    eqx = pytest.importorskip("equinox")
    params, static = eqx.partition(zoo.eqx_mlp(), eqx.is_inexact_array)
    x = jax.random.normal(jax.random.key(1), (32, 4))
    labels = jax.random.randint(jax.random.key(2), (32,), 0, 3)
    return params, lambda p: _cross_entropy(jax.vmap(eqx.combine(p, static))(x), labels)


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize("build", [_nnx_lm, _linen_resnet, _eqx_mlp])
def test_quantization_aware_training_of_models_users_write(build):
    """Trained through fake_quantize, the quantized model's loss falls; reassign codes
    exactly the model that was trained (same loss), and every coded weight is an entry of
    its codebook (or 0)."""
    params, loss_fn = build()
    q = quantize(params, 2)  # kernels (and embeddings) on 2 bits, the rest raw
    assert any(q.quantized)
    before, after, trained = _train_through_fake_quantize(params, q, loss_fn)
    assert after < before - 0.05
    coded = dequantize(reassign(trained, q))
    np.testing.assert_allclose(float(loss_fn(coded)), after, rtol=1e-5, atol=1e-6)
    for i, leaf in enumerate(jax.tree.leaves(coded)):
        if q.quantized[i]:
            entries = {0.0, *np.asarray(q.codebooks[i][2]).tolist()}
            assert set(np.unique(np.asarray(leaf)).tolist()) <= entries
