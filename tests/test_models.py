"""Models written by others (tests/zoo.py) end to end, and the rules they exercise: which
leaves are kernels, which axis a pattern takes, how files load back into a model's type."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fisher_optax as fo
from fisher_optax._tree import key_paths, layouts
from tests import zoo


def arrays(model):
    """An Equinox model's float arrays and the rest (activations, flags)."""
    return eqx.partition(model, eqx.is_inexact_array)


def end_to_end(params, loss, tmp_path, steps=3):
    """Prune with ``pruned`` under jit, read the Fisher, mask, quantize, write the file and
    load it back with ``like=``, and fine-tune the codebooks one step. Returns the pruned
    params and the loaded-back dense tree."""
    opt = fo.pruned(optax.adam(1e-2), 0.5, update_every=2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    report = fo.sparsity_report(state.mask)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    fisher = fo.fisher_from_state(state, params=params)
    mask = fo.two_stage_mask(params, 0.5, fisher=fisher)
    params = fo.apply_mask(params, mask)
    q = fo.quantize(params, 3, fisher=fisher, mask=mask)
    file = tmp_path / "model.fo"
    fo.save_compressed(file, q)
    back = fo.dequantize(fo.load_compressed(file, like=params))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, fo.dequantize(q))
    # Codebook fine-tuning: the weights of one entry stay tied, requantize reads them back.
    tune = fo.share_codebooks(optax.adam(1e-3), q)
    dense = fo.dequantize(q)
    updates, _ = tune.update(jax.grad(loss)(dense), tune.init(dense), dense)
    tuned = fo.requantize(optax.apply_updates(dense, updates), q)
    assert np.isfinite(float(loss(fo.dequantize(tuned))))
    return params, back


# ------------------------------------------------------------------------------------------
# The model families end to end


def test_equinox_mlp_end_to_end(tmp_path):
    params, static = arrays(zoo.eqx_mlp())
    x = jax.random.normal(jax.random.key(1), (8, 4))

    def loss(p):
        return jnp.mean(jax.vmap(eqx.combine(p, static))(x) ** 2)

    pruned, back = end_to_end(params, loss, tmp_path)
    model = eqx.combine(back, static)
    assert isinstance(model, eqx.nn.MLP)
    kernels = [x for p, x in zip(key_paths(pruned), jax.tree.leaves(pruned)) if x.ndim == 2]
    assert sum(int((x == 0).sum()) for x in kernels) >= sum(x.size for x in kernels) // 2
    assert jnp.all(jnp.isfinite(jax.vmap(model)(x)))


def test_equinox_cnn_with_batchnorm_state_end_to_end(tmp_path):
    model, bn_state = zoo.eqx_cnn()
    params, static = arrays(model)
    x = jax.random.normal(jax.random.key(1), (4, 1, 6, 6))

    def loss(p):
        out, _ = jax.vmap(
            eqx.combine(p, static), axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, bn_state)
        return jnp.mean(out**2)

    _, back = end_to_end(params, loss, tmp_path)
    assert isinstance(eqx.combine(back, static), zoo.EqxCNN)
    # The Conv weight (O, I, kh, kw) has its layout from its class, not from a name.
    conv = [lay for p, lay in zip(key_paths(params), layouts(params)) if "conv" in str(p)]
    assert conv[0] == (1, 0)


def test_equinox_attention_lm_with_tied_embedding_end_to_end(tmp_path):
    params, static = arrays(zoo.eqx_lm())
    tokens = jnp.arange(zoo.SEQ) % zoo.VOCAB

    def loss(p):
        logits = eqx.combine(p, static)(tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(zoo.SEQ), tokens])

    _, back = end_to_end(params, loss, tmp_path)
    lm = eqx.combine(back, static)
    assert isinstance(lm.attn, eqx.nn.MultiheadAttention)
    assert lm(tokens).shape == (zoo.SEQ, zoo.VOCAB)


def test_linen_lm_with_cache_and_scanned_blocks_end_to_end(tmp_path):
    module, variables = zoo.linen_lm()
    tokens = jnp.zeros((2, zoo.SEQ), jnp.int32)

    def loss(p):
        out, _ = module.apply({**variables, "params": p}, tokens, mutable=["cache"])
        return jnp.mean(out**2)

    end_to_end(variables["params"], loss, tmp_path)


def test_nnx_lm_with_rngs_end_to_end(tmp_path):
    model = zoo.NnxLM()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.arange(zoo.SEQ) % zoo.VOCAB

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2)

    _, back = end_to_end(params, loss, tmp_path)
    assert isinstance(back, nnx.State)
    nnx.update(model, back)
    # The whole state, its PRNG key and counter included: masks keep them, files hold them.
    whole = nnx.state(model)
    mask = fo.magnitude_mask(whole, 0.5)
    assert bool(mask["rngs"]["default"]["key"].value.all())
    q = fo.quantize(fo.apply_mask(whole, mask), 4)
    fo.save_compressed(tmp_path / "whole.fo", q)
    loaded = fo.dequantize(fo.load_compressed(tmp_path / "whole.fo", like=whole))
    assert isinstance(loaded, nnx.State)
    np.testing.assert_array_equal(
        jax.random.key_data(loaded["rngs"]["default"]["key"].value),
        jax.random.key_data(whole["rngs"]["default"]["key"].value),
    )


def test_linen_resnet_taking_train_end_to_end(tmp_path):
    module, variables = zoo.linen_resnet()
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 1))

    def loss(p):
        out, _ = module.apply(
            {**variables, "params": p}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(out**2)

    end_to_end(variables["params"], loss, tmp_path)
