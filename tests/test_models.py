"""Models written by others (tests/zoo.py) end to end, and the rules they exercise: which
leaves are kernels, which axis a pattern takes, how files load back into a model's type."""

import equinox as eqx
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

    @jax.jit
    def tune_step(dense):
        updates, _ = tune.update(jax.grad(loss)(dense), tune.init(dense), dense)
        return optax.apply_updates(dense, updates)

    tuned = fo.requantize(tune_step(dense), q)  # raises if a weight left its entry
    pairs = zip(tuned.codebooks, q.codebooks, strict=True)
    assert any(np.any(new[w] != old[w]) for new, old in pairs for w in old)
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
    kernels = [x for x in jax.tree.leaves(pruned) if x.ndim == 2]
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
    conv = [
        lay for p, lay in zip(key_paths(params), layouts(params), strict=True) if "conv" in str(p)
    ]
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
    assert bool(mask["rngs"]["default"]["key"].get_value().all())
    q = fo.quantize(fo.apply_mask(whole, mask), 4)
    fo.save_compressed(tmp_path / "whole.fo", q)
    loaded = fo.dequantize(fo.load_compressed(tmp_path / "whole.fo", like=whole))
    assert isinstance(loaded, nnx.State)
    np.testing.assert_array_equal(
        jax.random.key_data(loaded["rngs"]["default"]["key"].get_value()),
        jax.random.key_data(whole["rngs"]["default"]["key"].get_value()),
    )


def test_linen_resnet_taking_train_end_to_end(tmp_path):
    module, variables = zoo.linen_resnet()
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 1))

    def loss(p):
        out, _ = module.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(out**2)

    end_to_end(variables["params"], loss, tmp_path)


# ------------------------------------------------------------------------------------------
# Which leaves are kernels


def test_linen_cache_is_never_pruned_or_quantized():
    _, variables = zoo.linen_lm()
    variables = jax.tree.map(lambda x: x + 1.0, variables)  # a cache that holds something
    mask = fo.magnitude_mask(variables, 0.5)
    assert bool(mask["cache"]["cached_key"].all())
    assert fo.sparsity_report(mask).sparsity == pytest.approx(0.5, abs=0.01)
    q = fo.quantize(variables, 2)
    coded = dict(zip(q.paths, q.quantized, strict=True))
    assert not coded["['cache']['cached_key']"]
    assert not fo.is_kernel((jax.tree_util.DictKey("intermediates"),), jnp.ones((2, 2)))


def test_stacked_norm_scales_are_not_kernels():
    """penzai keeps a layer's label above the array: ``scale.value.data_array``."""
    stack = {
        "scale": {"value": {"data_array": jnp.arange(1.0, 17.0).reshape(2, 8)}},
        "proj": {"value": {"data_array": jnp.arange(1.0, 17.0).reshape(2, 8)}},
    }
    mask = fo.select(stack, 0.5)
    assert bool(mask["scale"]["value"]["data_array"].all())
    assert int((~mask["proj"]["value"]["data_array"]).sum()) == 8
    q = fo.quantize(stack, 2)
    assert dict(zip(q.paths, q.quantized, strict=True)) == {
        "['proj']['value']['data_array']": True,
        "['scale']['value']['data_array']": False,
    }


def test_a_module_named_like_a_statistic_keeps_its_kernel():
    """A VAE's ``mean`` and ``var`` heads are layers: their ``kernel`` is a weight."""
    heads = {
        "mean": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
        "var": {"w": jnp.ones((4, 2))},
    }
    flat = jax.tree_util.tree_flatten_with_path(heads)[0]
    kernels = {jax.tree_util.keystr(p) for p, x in flat if fo.is_kernel(p, x)}
    assert kernels == {"['mean']['kernel']"}


# ------------------------------------------------------------------------------------------
# Axes from known layouts only


def test_patterns_take_the_input_axis_of_equinox_and_flax_layouts():
    w = jax.random.normal(jax.random.key(0), (8, 12))  # a Flax kernel (in=8, out=12)
    flax_tree = {"dense": {"kernel": w}}
    eqx_tree = eqx.nn.Linear(8, 12, key=jax.random.key(0))  # its weight is (out, in)
    eqx_tree = eqx.tree_at(lambda m: m.weight, eqx_tree, w.T)
    on_flax = {}
    for pattern, sparsity in [(fo.NM(2, 4), 1.0), (fo.Blocks((4, 2)), 0.5)]:
        on_flax[pattern] = fo.select(flax_tree, sparsity, pattern=pattern)["dense"]["kernel"]
        on_eqx = fo.select(eqx_tree, sparsity, pattern=pattern).weight
        np.testing.assert_array_equal(on_eqx, on_flax[pattern].T)
    # Groups of 4 along the input axis: every column of the (in, out) kernel keeps 2 of 4.
    assert (np.asarray(on_flax[fo.NM(2, 4)]).reshape(2, 4, 12).sum(1) == 2).all()
    # An Equinox Conv2d weight (O, I, kh, kw): groups run along I, blocks tile (I, O).
    conv = eqx.nn.Conv2d(4, 8, 3, key=jax.random.key(1))
    mask = fo.select(conv, 1.0, pattern=fo.NM(2, 4)).weight
    assert (np.asarray(mask).sum(1) == 2).all()
    tiles = np.asarray(fo.select(conv, 0.5, pattern=fo.Blocks((4, 4))).weight)
    assert (
        tiles.reshape(2, 4, 1, 4, 3, 3).all((1, 3)) | ~tiles.reshape(2, 4, 1, 4, 3, 3).any((1, 3))
    ).all()


def test_unknown_layouts_ask_for_the_axis_by_message():
    # Linen DenseGeneral's attention kernel (D, heads, head_dim): groups of heads otherwise.
    attn = {"query": {"kernel": jnp.ones((8, 4, 2))}}
    with pytest.raises(
        ValueError, match=r"no default axis for the leaf at \['query'\]\['kernel'\] .*axis="
    ):
        fo.select(attn, 1.0, pattern=fo.NM(2, 4))
    # nn.scan stacks a Dense kernel to (L, in, out): no default there either.
    params = zoo.linen_lm()[1]["params"]
    with pytest.raises(
        ValueError, match=r"leaf at \['Embed_0'\]\['embedding'\] of shape \(16, 8\)"
    ):
        fo.select(params, 1.0, pattern=fo.NM(2, 4))
    stacked = lambda path, x: x.ndim == 3
    with pytest.raises(ValueError, match=r"\['kernel'\] of shape \(2, 8, 16\): its layout"):
        fo.select(params, 1.0, pattern=fo.NM(2, 4), prunable=stacked)
    # A Linen Conv kernel (kh, kw, in, out) is known by its module's name.
    resnet = zoo.linen_resnet()[1]["params"]
    named = dict(zip(map(jax.tree_util.keystr, key_paths(resnet)), layouts(resnet), strict=True))
    assert named["['Conv_1']['kernel']"] == (2, 3) and named["['Dense_0']['kernel']"] == (0, 1)
    embed = {"embedding": jnp.ones((8, 8))}
    with pytest.raises(ValueError, match=r"no default axes for the leaf at \['embedding'\].*axes="):
        fo.select(embed, 0.5, pattern=fo.Blocks((2, 2)))
    assert fo.select(attn, 1.0, pattern=fo.NM(2, 4, axis=0))["query"]["kernel"].sum() == 32
    with pytest.raises(
        ValueError, match=r"axes=\(0, 5\) is out of range for the leaf at \['embedding'\]"
    ):
        fo.select(embed, 0.5, pattern=fo.Blocks((2, 2), axes=(0, 5)))
    with pytest.raises(TypeError, match="axes must be a pair of ints"):
        fo.Blocks((2, 2), axes=-1)
    with pytest.raises(ValueError, match=r"axes must name two different axes .*\(1, 1\)"):
        fo.Blocks((2, 2), axes=(1, 1))


# ------------------------------------------------------------------------------------------
# Trees, predicates and leaves that are not arrays


def test_an_equinox_module_is_a_tree_not_a_predicate():
    params, _ = arrays(zoo.eqx_mlp())
    as_tree = jax.tree.map(lambda x: x.ndim == 2, params)  # an MLP: callable, still a tree
    as_function = lambda path, x: x.ndim == 2
    by_tree = fo.magnitude_mask(params, 0.5, prunable=as_tree)
    jax.tree.map(
        np.testing.assert_array_equal, by_tree, fo.magnitude_mask(params, 0.5, prunable=as_function)
    )
    assert bool(by_tree.layers[0].bias.all())


def test_pruned_with_nm_on_an_equinox_tree_groups_along_each_input_axis():
    """pruned builds trees shaped like the params internally: a module, never a predicate."""
    params, _ = arrays(zoo.eqx_mlp())
    opt = fo.pruned(optax.sgd(0.0), 1.0, pattern=fo.NM(2, 4), criterion="magnitude")
    state = opt.init(params)
    _, state = jax.jit(opt.update)(params, state, params)
    hidden = np.asarray(state.mask.layers[1].weight)  # (out, in)
    assert (hidden.reshape(zoo.WIDTH, -1, 4).sum(-1) == 2).all()


def test_non_array_leaves_are_refused_by_path_with_the_filter_idiom(tmp_path):
    model = zoo.eqx_mlp()
    params, _ = arrays(model)
    q = fo.quantize(params, 2)
    ones = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
    adam = optax.adam(1e-3)
    _, adam_state = adam.update(params, adam.init(params), params)
    calls = {
        "magnitude_mask": lambda: fo.magnitude_mask(model, 0.5),
        "two_stage_mask": lambda: fo.two_stage_mask(model, 0.5, fisher=params),
        "select": lambda: fo.select(model, 0.5),
        "uniform_sparsity": lambda: fo.uniform_sparsity(model, 0.5),
        "erk_sparsity": lambda: fo.erk_sparsity(model, 0.5),
        "scores": lambda: fo.scores(model, "magnitude"),
        "apply_mask": lambda: fo.apply_mask(model, ones),
        "sparsity_report": lambda: fo.sparsity_report(eqx.combine(ones, model)),
        "quantize": lambda: fo.quantize(model, 2),
        "requantize": lambda: fo.requantize(model, q),
        "share_codebooks": lambda: fo.share_codebooks(optax.sgd(1.0), q).init(model),
        "fisher_from_state": lambda: fo.fisher_from_state(adam_state, params=model, missing=0.0),
        "pruned": lambda: fo.pruned(optax.adam(1e-3), 0.5).init(model),
    }
    for call in calls.values():
        with pytest.raises(
            TypeError, match=r"at .*activation is .*eqx.filter\(model, eqx.is_inexact_array\)"
        ):
            call()


def test_prng_keys_in_the_tree_never_crash_a_mask():
    state = nnx.state(zoo.NnxLM())
    no_keys = lambda path, x: fo.is_kernel(path, x)
    for prunable in (None, no_keys):
        mask = fo.magnitude_mask(state, 0.5, prunable=prunable)
        assert bool(mask["rngs"]["default"]["key"].all())
        back = fo.apply_mask(state, mask)
        assert back["rngs"]["default"]["key"].dtype == state["rngs"]["default"]["key"].dtype


# ------------------------------------------------------------------------------------------
# Files: a user's field named value, load_compressed(like=)


class Scaled(eqx.Module):
    value: jax.Array
    scale: jax.Array


def test_a_field_named_value_is_a_path_of_its_own(tmp_path):
    tree = {"layer": Scaled(jnp.arange(8.0).reshape(2, 4), jnp.ones((2, 4)))}
    assert [jax.tree_util.keystr(p) for p in key_paths(tree)] == [
        "['layer'].value",
        "['layer'].scale",
    ]
    q = fo.quantize(tree, 2, quantizable=lambda p, x: False)
    fo.save_compressed(tmp_path / "s.fo", q)
    back = fo.dequantize(fo.load_compressed(tmp_path / "s.fo", like=tree))
    assert isinstance(back["layer"], Scaled)
    np.testing.assert_array_equal(back["layer"].value, tree["layer"].value)


def test_load_compressed_like_places_leaves_by_path_and_names_mismatches(tmp_path):
    attn = eqx.nn.MultiheadAttention(2, 8, key=jax.random.key(0))
    params, static = arrays(attn)
    file = tmp_path / "attn.fo"
    fo.save_compressed(file, fo.quantize(params, 4))
    back = fo.dequantize(fo.load_compressed(file, like=params))
    model = eqx.combine(back, static)
    x = jax.random.normal(jax.random.key(1), (3, 8))
    np.testing.assert_allclose(
        model(x, x, x), eqx.combine(fo.dequantize(fo.quantize(params, 4)), static)(x, x, x)
    )
    # The plain tree has sorted keys: pouring its leaves into the module's treedef misplaces
    # them, which like= never does.
    plain = fo.dequantize(fo.load_compressed(file))
    assert not all(
        a.shape == b.shape and bool((a == b).all())
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(back), strict=True)
    )
    smaller = arrays(eqx.nn.MultiheadAttention(2, 8, use_output_bias=True, key=jax.random.key(0)))[
        0
    ]
    with pytest.raises(ValueError, match=r"like has a leaf at .*output_proj.*bias that .* lacks"):
        fo.load_compressed(file, like=smaller)
    with pytest.raises(
        ValueError, match=r"has a leaf at \['query_proj'\]\['weight'\] that like lacks"
    ):
        fo.load_compressed(file, like=eqx.tree_at(lambda m: m.query_proj, params, None))
    wider = arrays(eqx.nn.MultiheadAttention(2, 8, qk_size=8, key=jax.random.key(0)))[0]
    with pytest.raises(
        ValueError, match=r"holds shape \(8, 8\) at .*query_proj.*but like has \(16, 8\)"
    ):
        fo.load_compressed(file, like=wider)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    with pytest.raises(ValueError, match=r"holds dtype float32 at .* but like has bfloat16"):
        fo.load_compressed(file, like=half)


# ------------------------------------------------------------------------------------------
# The Fisher of Linen variables


def test_fisher_from_state_lines_up_linen_variables_with_the_params_collection():
    _, variables = zoo.linen_resnet()
    opt = optax.adam(1e-3)
    state = opt.init(variables["params"])
    grads = jax.tree.map(jnp.ones_like, variables["params"])
    _, state = opt.update(grads, state, variables["params"])
    fisher = fo.fisher_from_state(state, params=variables, missing=0.0)
    assert jax.tree.structure(fisher) == jax.tree.structure(variables)
    assert all(bool((x == 0).all()) for x in jax.tree.leaves(fisher["batch_stats"]))
    np.testing.assert_allclose(
        fisher["params"]["Dense_0"]["kernel"],
        jnp.ones_like(variables["params"]["Dense_0"]["kernel"]),
        rtol=1e-4,
    )
