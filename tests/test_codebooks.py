"""share_codebooks and requantize: entry gradients vs a NumPy loop, Adam on the codebooks vs
autodiff through the codebook lookup, ties and zeros after training, composition (chain,
jit, nnx.Optimizer), save/load, and every error by its message."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fisher_optax import (
    ShareCodebooksState,
    dequantize,
    load_compressed,
    quantize,
    requantize,
    save_compressed,
    share_codebooks,
)


def _setup(seed=0, dtype=jnp.float32):
    """Two kernels (one with mixed widths 2/3 and pruned weights) and a raw bias."""
    rng = np.random.default_rng(seed)
    params = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), dtype)},
        "b": {
            "bias": jnp.asarray(rng.normal(size=(4,)), dtype),
            "kernel": jnp.asarray(rng.laplace(size=(5, 4)), dtype),
        },
    }
    bits = {
        "a": {"kernel": rng.choice([0, 2, 3], size=(6, 5))},
        "b": {"bias": np.full((4,), 8), "kernel": np.where(rng.random((5, 4)) < 0.3, 0, 2)},
    }
    q = quantize(params, bits, method="uniform")
    return q, dequantize(q), rng


def _kernels(tree):
    return {"a": tree["a"]["kernel"], "b": tree["b"]["kernel"]}


def test_q_stores_the_bias_raw_and_kernels_quantized():
    q, _, _ = _setup()
    assert q.quantized == (True, False, True)  # a/kernel, b/bias, b/kernel


def test_entry_gradient_is_the_sum_of_its_weights_gradients():
    q, dense, rng = _setup()
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), dense)
    # An inner transformation that keeps the entry gradients it is given as its state.
    keep = optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p), lambda u, s, p=None: (u, u)
    )
    tx = share_codebooks(keep, q)
    updates, state = jax.jit(tx.update)(grads, tx.init(dense))
    entries = state.inner_state
    for i, path in ((0, "['a']['kernel']"), (2, "['b']['kernel']")):
        bits, codes = np.asarray(q.bits[i]), np.asarray(q.codes[i])
        g = np.asarray(jax.tree.leaves(grads)[i], np.float64)
        u = np.asarray(jax.tree.leaves(updates)[i])
        for j, (b, book) in enumerate(q.codebooks[i].items()):
            want = np.zeros(len(book))
            for idx in np.ndindex(g.shape):  # the reference: a plain loop over weights
                if bits[idx] == b:
                    want[codes[idx]] += g[idx]
            np.testing.assert_allclose(entries[path][j], want, rtol=1e-5, atol=1e-6)
            for idx in np.ndindex(g.shape):
                if bits[idx] == b:
                    np.testing.assert_allclose(u[idx], want[codes[idx]], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(u[bits == 0], 0)
    # The raw bias is trained like an ordinary param (raw="train"): its gradient passes.
    np.testing.assert_array_equal(entries["['b']['bias']"], grads["b"]["bias"])


def _loss(params, target):
    leaves = jax.tree.leaves(params)
    return sum(jnp.sum(jnp.tanh(p) * t + p**2) for p, t in zip(leaves, target, strict=True))


def test_adam_on_dense_params_equals_adam_on_the_codebooks_and_compiles_once():
    q, dense, rng = _setup(1)
    target = [jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in jax.tree.leaves(dense)]
    tx = share_codebooks(optax.adam(0.05), q)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        grads = jax.grad(_loss)(params, target)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(dense)
    assert isinstance(state, ShareCodebooksState)
    params = dense
    for _ in range(25):
        params, state = step(params, state)
    assert len(traces) == 1
    assert int(optax.tree_utils.tree_get(state.inner_state, "count")) == 25

    # Reference: Adam directly on the codebooks (and the bias), the dense params built by a
    # lookup, the entry gradient by autodiff through that lookup.
    kernels = (0, 2)

    def build(books, bias):
        leaves = []
        for i in range(3):
            if i == 1:
                leaves.append(bias)
                continue
            bits, codes = q.bits[i], q.codes[i].astype(jnp.int32)
            out = jnp.zeros(bits.shape, jnp.float32)
            for b, book in zip(q.widths[i], books[i], strict=True):
                out = jnp.where(bits == b, book[jnp.minimum(codes, len(book) - 1)], out)
            leaves.append(out)
        return jax.tree.unflatten(jax.tree.structure(dense), leaves)

    ref = ({i: list(q.codebooks[i].values()) for i in kernels}, dense["b"]["bias"])
    ref_tx = optax.adam(0.05)
    ref_state = ref_tx.init(ref)

    @jax.jit
    def ref_step(ref, ref_state):
        g = jax.grad(lambda r: _loss(build(*r), target))(ref)
        u, ref_state = ref_tx.update(g, ref_state, ref)
        return optax.apply_updates(ref, u), ref_state

    for _ in range(25):
        ref, ref_state = ref_step(ref, ref_state)

    trained = requantize(params, q)
    for i in kernels:
        for j, book in enumerate(trained.codebooks[i].values()):
            np.testing.assert_allclose(book, ref[0][i][j], rtol=1e-5, atol=1e-6)
            assert not np.allclose(book, list(q.codebooks[i].values())[j])  # they moved
    np.testing.assert_allclose(params["b"]["bias"], ref[1], rtol=1e-5, atol=1e-6)
    # Ties and zeros are exact: the trained q dequantizes to the dense params bit for bit.
    back = jax.tree.leaves(dequantize(trained))
    for got, want in zip(back, jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)
    for i in kernels:
        np.testing.assert_array_equal(np.asarray(jax.tree.leaves(params)[i])[q.bits[i] == 0], 0)
        np.testing.assert_array_equal(trained.codes[i], q.codes[i])


def test_raw_freeze_gives_raw_leaves_zero_updates_and_leaves_them_out_of_inner():
    q, dense, _ = _setup()
    grads = jax.tree.map(lambda x: jnp.ones_like(x), dense)
    tx = share_codebooks(optax.adam(0.1), q, raw="freeze")
    state = tx.init(dense)
    assert "['b']['bias']" not in state.inner_state[0].mu
    updates, _ = jax.jit(tx.update)(grads, state)
    np.testing.assert_array_equal(updates["b"]["bias"], 0)
    assert np.all(np.asarray(updates["a"]["kernel"])[np.asarray(q.bits[0]) > 0] != 0)


def test_in_a_chain_after_clip_by_global_norm():
    q, dense, rng = _setup()
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), dense)
    tx = optax.chain(optax.clip_by_global_norm(0.5), share_codebooks(optax.sgd(1.0), q))
    updates, _ = tx.update(grads, tx.init(dense), dense)
    clipped, _ = optax.clip_by_global_norm(0.5).update(grads, optax.EmptyState())
    plain = share_codebooks(optax.sgd(1.0), q)
    want, _ = plain.update(clipped, plain.init(dense), dense)
    for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(u, w, rtol=1e-6, atol=1e-7)
    requantize(optax.apply_updates(dense, updates), q)  # still tied


def test_under_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(8, 16, rngs=rngs)
            self.out = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    model = MLP(nnx.Rngs(0))
    q = quantize(nnx.state(model, nnx.Param), 2, method="uniform")
    nnx.update(model, dequantize(q))
    optimizer = nnx.Optimizer(model, share_codebooks(optax.adam(3e-2), q), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 3)

    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(10)]
    assert losses[-1] < losses[0] - 0.05
    trained = requantize(nnx.state(model, nnx.Param), q)
    for i, ok in enumerate(q.quantized):
        if ok:
            np.testing.assert_array_equal(trained.codes[i], q.codes[i])
            assert len(np.unique(np.asarray(jax.tree.leaves(nnx.state(model, nnx.Param))[i]))) <= 4


def test_requantize_save_load_roundtrip_keeps_codes(tmp_path):
    q, dense, rng = _setup()
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), dense)
    tx = share_codebooks(optax.adam(0.1), q)
    updates, _ = jax.jit(tx.update)(grads, tx.init(dense), dense)
    trained = requantize(optax.apply_updates(dense, updates), q)
    save_compressed(tmp_path / "m.fq", trained)
    back = load_compressed(tmp_path / "m.fq")
    for i, ok in enumerate(q.quantized):
        if ok:
            np.testing.assert_array_equal(back.codes[i], q.codes[i])
            for b in q.widths[i]:
                np.testing.assert_array_equal(back.codebooks[i][b], trained.codebooks[i][b])
    leaves = jax.tree.leaves(dequantize(trained))
    for got, want in zip(jax.tree.leaves(dequantize(back)), leaves, strict=True):
        np.testing.assert_array_equal(got, want)


def test_inner_sees_the_entries_as_params_and_init_traces_under_jit():
    q, dense, _ = _setup()
    # Weight decay alone: with zero gradients each weight's update is 0.1 * its entry's value,
    # i.e. 0.1 * the weight itself (pruned: 0), which checks the entries read from params.
    tx = share_codebooks(optax.add_decayed_weights(0.1), q)
    zeros = jax.tree.map(jnp.zeros_like, dense)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(dense), dense)
    for i in (0, 2):
        u, w = jax.tree.leaves(updates)[i], jax.tree.leaves(dense)[i]
        np.testing.assert_allclose(u, 0.1 * np.asarray(w), rtol=1e-6)
    # init under jit reads the entries by gather (no host check) and agrees with the host.
    tx = share_codebooks(optax.adam(1e-3, nesterov=True), q)
    host, traced = tx.init(dense), jax.jit(tx.init)(dense)
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(traced), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_fully_pruned_leaf_gets_zero_updates():
    q, dense, rng = _setup()
    mask = jax.tree.map(lambda x: jnp.ones(x.shape, bool), dense)
    mask["b"]["kernel"] = jnp.zeros((5, 4), bool)
    q = quantize(dense, 2, mask=mask, method="uniform")
    assert q.widths[2] == ()
    dense = dequantize(q)
    tx = share_codebooks(optax.adam(0.1), q)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), dense)
    updates, _ = jax.jit(tx.update)(grads, tx.init(dense), dense)
    np.testing.assert_array_equal(updates["b"]["kernel"], 0)
    requantize(optax.apply_updates(dense, updates), q)


def test_bfloat16_params_stay_tied():
    q, params, rng = _setup(dtype=jnp.bfloat16)
    tx = share_codebooks(optax.adam(0.05), q)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for _ in range(3):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
        updates, state = step(params, state, grads)
        params = optax.apply_updates(params, updates)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    trained = requantize(params, q)
    back = jax.tree.leaves(dequantize(trained))
    for got, want in zip(back, jax.tree.leaves(params), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(trained.codebooks[0][2], q.codebooks[0][2])


# Errors, each by its message.


def test_errors_on_arguments():
    q, dense, _ = _setup()
    with pytest.raises(TypeError, match="q must be the QuantizedParams"):
        share_codebooks(optax.adam(1e-3), dense)
    with pytest.raises(TypeError, match=r"inner must be an optax\.GradientTransformation"):
        share_codebooks(q, optax.adam(1e-3))
    with pytest.raises(ValueError, match="raw must be one of: 'train'"):
        share_codebooks(optax.adam(1e-3), q, raw="thaw")
    with pytest.raises(TypeError, match="q must be the QuantizedParams"):
        requantize(dense, dense)


def test_errors_on_params_that_do_not_match_q():
    q, dense, _ = _setup()
    tx = share_codebooks(optax.adam(1e-3), q)
    match = r"params does not match the structure of q: leaf 0 is at \['a0'\]"
    with pytest.raises(ValueError, match=match):
        tx.init({"a0": dense["a"]["kernel"], "b": dense["b"]})
    with pytest.raises(ValueError, match=r"params has no leaf at \['b'\]\['kernel'\]"):
        tx.init({"a": dense["a"], "b": {"bias": dense["b"]["bias"]}})
    bad = {"a": {"kernel": dense["a"]["kernel"][:, :4]}, "b": dense["b"]}
    with pytest.raises(ValueError, match=r"params at \['a'\]\['kernel'\] has shape \(6, 4\)"):
        requantize(bad, q)
    state = tx.init(dense)
    extra = {**dense, "c": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"updates has a leaf at \['c'\] that q lacks"):
        tx.update(extra, state)


def test_errors_on_weights_that_left_their_entry():
    q, dense, _ = _setup()
    kernel = np.asarray(dense["a"]["kernel"]).copy()
    kept = np.argwhere(np.asarray(q.bits[0]) > 0)[0]
    kernel[tuple(kept)] += 0.125
    moved = {"a": {"kernel": jnp.asarray(kernel)}, "b": dense["b"]}
    match = r"params at \['a'\]\['kernel'\] holds 1 weight\(s\) that left their codebook entry"
    with pytest.raises(ValueError, match=match):
        requantize(moved, q)
    with pytest.raises(ValueError, match=match):
        share_codebooks(optax.adam(1e-3), q).init(moved)
    # Training params that are not tied (e.g. the unquantized ones) is caught at init.
    untied = jax.tree.map(lambda x: x + jnp.linspace(0, 1e-3, x.size).reshape(x.shape), dense)
    with pytest.raises(ValueError, match="left their codebook entry"):
        share_codebooks(optax.adam(1e-3), q).init(untied)


def test_errors_on_a_pruned_weight_that_is_not_zero():
    q, dense, _ = _setup()
    kernel = np.asarray(dense["b"]["kernel"]).copy()
    pruned = tuple(np.argwhere(np.asarray(q.bits[2]) == 0)[0])
    kernel[pruned] = 0.5
    moved = {"a": dense["a"], "b": {"bias": dense["b"]["bias"], "kernel": jnp.asarray(kernel)}}
    with pytest.raises(ValueError, match=r"params at \['b'\]\['kernel'\] holds 1 nonzero pruned"):
        requantize(moved, q)


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_codebooks_train_slice_by_slice(tmp_path, axis):
    """quantize(axis=): an entry of slice c gets the summed gradient of slice c's members."""
    rng = np.random.default_rng(3)
    params = {"k": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
    bits = {"k": rng.choice([0, 2, 3], size=(6, 5))}
    q = quantize(params, bits, fisher={"k": jnp.ones((6, 5))}, axis=axis)
    dense = dequantize(q)
    grads = {"k": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
    tx = share_codebooks(optax.sgd(1.0), q)
    updates, _ = jax.jit(tx.update)(grads, tx.init(dense))
    b_, c_, g, u = np.asarray(q.bits[0]), np.asarray(q.codes[0]), grads["k"], updates["k"]
    for idx in np.ndindex(6, 5):  # the reference: the sum over the weights of its entry
        same = (b_ == b_[idx]) & (c_ == c_[idx]) & (np.indices((6, 5))[axis] == idx[axis])
        want = 0.0 if b_[idx] == 0 else -float(np.sum(np.where(same, g, 0.0)))
        np.testing.assert_allclose(u[idx], want, rtol=1e-5, atol=1e-6)
    trained = requantize(optax.apply_updates(dense, updates), q)
    assert all(trained.codebooks[0][b].shape == q.codebooks[0][b].shape for b in q.widths[0])
    np.testing.assert_array_equal(
        dequantize(trained)["k"], optax.apply_updates(dense, updates)["k"]
    )
    save_compressed(tmp_path / "c.fq", trained)
    np.testing.assert_array_equal(
        dequantize(load_compressed(tmp_path / "c.fq"))["k"], dequantize(trained)["k"]
    )


def test_key_and_64_bit_raw_leaves_pass_through_share_codebooks_and_requantize():
    # A whole nnx.state holds a PRNG key (Dropout) and counters; NumPy raw leaves keep their
    # 64-bit dtypes (jnp would narrow them to 32 bits with x64 off).
    params = {
        "kernel": np.arange(16, dtype=np.float32).reshape(4, 4),
        "rng": jax.random.key(0),
        "step": np.array(2**40 + 5, np.int64),
        "scale": np.array([1e-300, 0.1], np.float64),
    }
    q = quantize(params, 2)
    dense = dequantize(q)
    share_codebooks(optax.adam(1e-2), q).init(dense)
    q2 = requantize(dense, q)
    out = dequantize(q2)
    assert out["step"].dtype == np.int64 and int(out["step"]) == 2**40 + 5
    assert out["scale"].dtype == np.float64 and out["scale"][0] == 1e-300
    assert jax.random.key_data(out["rng"]).tolist() == jax.random.key_data(params["rng"]).tolist()


def test_requantized_per_slice_books_equal_the_ones_read_back_from_the_file(tmp_path):
    """A slice with fewer entries than its book's width is padded with its last entry; the
    trained padding kept its old value in memory, while the file repeats the new one."""
    w = jnp.array([[0.0, 1.0], [1.0, 2.0], [2.0, 2.0]])  # column 1: two values, column 0: three
    q = quantize({"w": w}, 2, axis=-1)
    tuned = requantize({"w": jnp.where(w == 2.0, 5.0, w)}, q)
    save_compressed(tmp_path / "p.fq", tuned)
    back = load_compressed(tmp_path / "p.fq")
    np.testing.assert_array_equal(np.asarray(tuned.codebooks[0][2]), back.codebooks[0][2])
    np.testing.assert_array_equal(np.asarray(tuned.codebooks[0][2])[1], [1.0, 5.0, 5.0])
