"""Flax integration: write-back into nnx models, surgery on NNX and Linen, optimizer slicing."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

flax = pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import fisher_optax  # noqa: E402
import fisher_optax.flax as ff  # noqa: E402
from fisher_optax._tree import check_matching, keystr  # noqa: E402
from fisher_optax.surgery import take_np  # noqa: E402


@nnx.jit
def _call(model, x):
    return model(x)


def _flatten(x):
    return x.reshape(x.shape[0], -1)


def _init(seed):
    """NumPy initialisers: building the test models compiles nothing (XLA compiles of the
    default initialisers dominated the run time), and biases are non-zero, so that folding
    the dropped units' constants is exercised."""
    rng = np.random.default_rng(seed)

    def kernel(key, shape, dtype=jnp.float32):
        del key
        fan_in = int(np.prod(shape[:-1]))
        return jax.device_put(np.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), dtype))

    def bias(key, shape, dtype=jnp.float32):
        del key
        return jax.device_put(np.asarray(0.5 * rng.standard_normal(shape), dtype))

    return {"kernel_init": kernel, "bias_init": bias, "rngs": nnx.Rngs(seed)}


def _mlp(act=jax.nn.sigmoid):
    i = _init(0)
    return nnx.Sequential(
        nnx.Linear(6, 12, **i), act, nnx.Linear(12, 9, **i), act, nnx.Linear(9, 3, **i)
    )


def _cnn(padding="VALID"):
    i = _init(1)
    return nnx.Sequential(
        nnx.Conv(2, 6, (3, 3), padding=padding, **i), nnx.relu,
        nnx.Conv(6, 5, (3, 3), padding="VALID", **i), jnp.tanh, _flatten,
        nnx.Linear(5 * 16, 7, **i), nnx.gelu,
        nnx.Linear(7, 4, **i),
    )  # fmt: skip


def _unit_mask(model, seed=0, fraction=0.4):
    """A random unit mask over every kernel but the last layer's."""
    rng = np.random.default_rng(seed)
    prunable = ff.prunable_units(model)

    def pick(flag, leaf):
        if flag is None:
            return None
        n = leaf.shape[-1]
        return jax.device_put(rng.random(n) >= fraction if flag else np.ones(n, bool))

    return jax.tree.map(
        pick, prunable, nnx.state(model, nnx.Param), is_leaf=lambda x: x is None or x is True
    )


@jax.jit
def _where(params, mask):
    return jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, mask)


def _masked(model, um):
    """The original model with the dropped units' incoming weights zeroed."""
    out = nnx.clone(model)
    state = nnx.state(out, nnx.Param)
    ff.update_model(out, _where(state, fisher_optax.expand_unit_mask(state, um)))
    return out


def _count(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _kept(um, path):
    node = um
    for k in path:
        node = node[k]
    return int(np.asarray(node[...] if hasattr(node, "get_value") else node).sum())


# --------------------------------------------------------------------------------------------
# Surgery on nnx.Sequential


@pytest.mark.parametrize("act", [jax.nn.sigmoid, nnx.relu])
def test_shrink_mlp_equals_masked_and_counts_drop_exactly(act):
    model = _mlp(act)
    um = _unit_mask(model)
    small = ff.shrink(model, unit_mask=um).model
    x = jax.random.normal(jax.random.key(0), (16, 6))
    np.testing.assert_allclose(_call(small, x), _call(_masked(model, um), x), rtol=1e-5, atol=1e-5)
    k0, k1 = _kept(um, ("layers", 0, "kernel")), _kept(um, ("layers", 2, "kernel"))
    want = (6 * k0 + k0) + (k0 * k1 + k1) + (k1 * 3 + 3)
    assert _count(small) == want < _count(model)
    assert small.layers[0].out_features == k0 and small.layers[2].in_features == k0
    assert model.layers[0].kernel.shape == (6, 12)  # the original is untouched


def test_shrink_cnn_with_flatten_equals_masked_and_counts_drop_exactly():
    model = _cnn()
    um = _unit_mask(model, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # VALID padding: every fold is exact, no warning
        small = ff.shrink(model, unit_mask=um).model
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 2))
    np.testing.assert_allclose(_call(small, x), _call(_masked(model, um), x), rtol=1e-5, atol=1e-5)
    c0, c1 = _kept(um, ("layers", 0, "kernel")), _kept(um, ("layers", 2, "kernel"))
    d = _kept(um, ("layers", 5, "kernel"))
    want = (9 * 2 * c0 + c0) + (9 * c0 * c1 + c1) + (16 * c1 * d + d) + (d * 4 + 4)
    assert _count(small) == want
    count, flops = ff.param_count_and_flops(small, x[:1])
    dense_count, dense_flops = ff.param_count_and_flops(model, x[:1])
    assert count == want and dense_count == _count(model)
    assert flops < dense_flops


def test_shrink_flatten_drops_the_nhwc_block_of_rows():
    model = _cnn()
    um = _unit_mask(model, fraction=0.0)
    um["layers"][2]["kernel"] = nnx.Param(
        jax.device_put(np.array([True, False, True, True, False]))
    )
    index = ff.shrink(model, unit_mask=um).index
    rows = index["['layers'][5]['kernel']"][0]
    want = [s * 5 + c for s in range(16) for c in (0, 2, 3)]
    np.testing.assert_array_equal(rows, want)


def test_units_zeroed_by_unstructured_mask_are_dropped_with_bias_folded():
    model = _mlp(jax.nn.sigmoid)  # sigmoid(b) != 0: the fold matters
    state = nnx.state(model, nnx.Param)
    kernel = np.array(state["layers"][2]["kernel"][...])
    kernel[:, [1, 4]] = 0
    state["layers"][2]["kernel"] = nnx.Param(jax.device_put(kernel))
    ff.update_model(model, state)
    small = ff.shrink(model).model  # no unit mask: only the dead units go
    assert small.layers[2].out_features == 7
    x = jax.random.normal(jax.random.key(2), (16, 6))
    np.testing.assert_allclose(_call(small, x), _call(model, x), rtol=1e-5, atol=1e-5)


def test_zero_padded_conv_keeps_units_it_cannot_fold_and_says_so():
    i = _init(3)
    model = nnx.Sequential(
        nnx.Conv(2, 6, (3, 3), padding="SAME", **i), nnx.relu,
        nnx.Conv(6, 5, (3, 3), padding="SAME", **i), jnp.tanh, _flatten,
        nnx.Linear(5 * 64, 4, **i),
    )  # fmt: skip
    um = _unit_mask(model, fraction=0.0)
    drop = np.array([False, True, False, True, False, False])
    um["layers"][0]["kernel"] = nnx.Param(jax.device_put(~drop))
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 2))
    bias = np.asarray(model.layers[0].bias[...])
    with pytest.warns(UserWarning, match="cannot be folded exactly"):
        small = ff.shrink(model, unit_mask=um).model
    # Units with relu(bias) > 0 stay (zero-padded conv next); those with relu(bias) = 0 go.
    assert small.layers[0].out_features == 6 - int((drop & (bias <= 0)).sum())
    np.testing.assert_allclose(_call(small, x), _call(_masked(model, um), x), rtol=1e-5, atol=1e-5)
    # Zeroing the dropped units' biases too makes relu's constant 0: all of them go.
    state = nnx.state(model, nnx.Param)
    wm = fisher_optax.expand_unit_mask(state, um, bias=True)
    ff.update_model(model, _where(state, wm))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = ff.shrink(model, unit_mask=um).model
    assert small.layers[0].out_features == 4
    np.testing.assert_allclose(_call(small, x), _call(model, x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Explicitly named pairs


class _Net(nnx.Module):
    def __init__(self, seed=0):
        i = _init(seed)
        self.conv1 = nnx.Conv(1, 4, (3, 3), padding="VALID", **i)
        self.conv2 = nnx.Conv(4, 6, (3, 3), padding="VALID", **i)
        self.fc1 = nnx.Linear(6 * 4, 5, **i)
        self.fc2 = nnx.Linear(5, 3, **i)

    def __call__(self, x):
        x = jax.nn.elu(self.conv1(x))
        x = jax.nn.elu(self.conv2(x))
        x = jax.nn.elu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


PAIRS = [("conv1", "conv2"), ("conv2", "fc1"), ("fc1", "fc2")]


def test_shrink_with_named_pairs():
    model = _Net(5)
    um = jax.tree_util.tree_map_with_path(
        lambda p, x: (jnp.arange(x.shape[-1]) % 2 == 0) if x.ndim >= 2 else None,
        nnx.state(model, nnx.Param),
    )
    um["fc2"]["kernel"] = nnx.Param(jnp.ones(3, bool))
    small = ff.shrink(model, unit_mask=um, pairs=PAIRS, activation=jax.nn.elu).model
    x = jax.random.normal(jax.random.key(5), (6, 6, 6, 1))
    np.testing.assert_allclose(_call(small, x), _call(_masked(model, um), x), rtol=1e-5, atol=1e-5)
    assert (small.conv1.out_features, small.conv2.out_features, small.fc1.out_features) == (
        2,
        3,
        3,
    )
    flags = ff.prunable_units(model, pairs=PAIRS)
    assert flags["fc1"]["kernel"].get_value() is True
    assert flags["fc2"]["kernel"].get_value() is False


# --------------------------------------------------------------------------------------------
# Errors


def test_error_pair_shapes_do_not_chain():
    model = _Net()
    with pytest.raises(ValueError, match=r"pair \('conv1', 'fc2'\) does not chain"):
        ff.shrink(model, pairs=[("conv1", "fc2")], activation=jax.nn.elu)
    bad = nnx.Sequential(nnx.Linear(3, 4, **_init(0)), nnx.Linear(5, 2, **_init(0)))
    with pytest.raises(ValueError, match=r"\('layers.0', 'layers.1'\) does not chain"):
        ff.shrink(bad)


def test_error_unsupported_layer_type_is_named():
    i = _init(0)
    model = nnx.Sequential(
        nnx.Linear(3, 4, **i), nnx.BatchNorm(4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, **i)
    )
    with pytest.raises(
        ValueError, match=r"surgery does not support layer type BatchNorm at 'layers\.1'"
    ):
        ff.shrink(model)
    i = _init(0)
    softmax_net = nnx.Sequential(nnx.Linear(3, 4, **i), jax.nn.softmax, nnx.Linear(4, 2, **i))
    with pytest.raises(ValueError, match="is not elementwise"):
        ff.shrink(softmax_net)
    fixed = nnx.Sequential(nnx.Linear(3, 4, **i), lambda x: x.reshape(-1, 4), nnx.Linear(4, 2, **i))
    with pytest.raises(ValueError, match="works for 4 features but not for 8"):
        ff.shrink(fixed)
    with pytest.raises(ValueError, match=r"is not an nnx\.Sequential"):
        ff.shrink(_Net())


def test_error_mask_does_not_match_model():
    model = _mlp()
    with pytest.raises(ValueError, match="Pass a unit mask from unit_mask"):
        ff.shrink(
            model, unit_mask=jax.tree.map(lambda x: jnp.ones(x.shape, bool), nnx.state(model))
        )
    with pytest.raises(ValueError, match=r"unit mask has a leaf at \['layers'\]\[7\]"):
        ff.shrink(model, unit_mask={"layers": {7: {"kernel": jnp.ones(3, bool)}}})
    um = _unit_mask(model, fraction=0.0)
    um["layers"][4]["kernel"] = nnx.Param(jax.device_put(np.array([True, False, True])))
    with pytest.raises(ValueError, match="no layer consumes its outputs"):
        ff.shrink(model, unit_mask=um)
    um = jax.tree.map(
        lambda x: jnp.arange(x.shape[-1]) > 0 if x.ndim >= 2 else None, nnx.state(_Net(), nnx.Param)
    )
    with pytest.raises(ValueError, match="needs the activation between the two layers"):
        ff.shrink(_Net(), unit_mask=um, pairs=PAIRS)


# --------------------------------------------------------------------------------------------
# Optimizer state across surgery, fine-tuning under nnx.jit


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_shrink_with_an_optimizer_slices_state_and_fine_tunes_under_jit():
    model = _mlp(nnx.relu)  # CNN surgery is checked above; the state slicing is the same
    tx = fisher_optax.pruned(
        optax.adam(1e-2), schedule=0.3, method="one_stage", criterion="magnitude", update_every=2
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(6), (16, 6))
    y = jnp.arange(16) % 3
    traces = []

    @nnx.jit
    def step(model, opt, x, y):
        traces.append(1)
        loss, grads = nnx.value_and_grad(_loss)(model, x, y)
        opt.update(model, grads)
        return loss

    for _ in range(3):
        step(model, opt, x, y)
    um = _unit_mask(model, seed=6)
    small, small_opt, index, _ = ff.shrink(model, opt, unit_mask=um)
    old_adam = optax.tree_utils.tree_get(opt.opt_state, "ScaleByAdamState")
    new_adam = optax.tree_utils.tree_get(small_opt.opt_state, "ScaleByAdamState")
    old_pruned = optax.tree_utils.tree_get(opt.opt_state, "PrunedState")
    new_pruned = optax.tree_utils.tree_get(small_opt.opt_state, "PrunedState")
    pairs = [(old_adam.mu, new_adam.mu), (old_adam.nu, new_adam.nu)]
    for old_tree, new_tree in [*pairs, (old_pruned.mask, new_pruned.mask)]:
        for (path, leaf), (_, new_leaf) in zip(
            jax.tree_util.tree_flatten_with_path(old_tree)[0],
            jax.tree_util.tree_flatten_with_path(new_tree)[0],
            strict=True,
        ):
            want = take_np(np.asarray(leaf), index.get(keystr(path), (None,) * leaf.ndim))
            np.testing.assert_array_equal(np.asarray(new_leaf), want)
    assert int(new_adam.count[...]) == int(old_adam.count[...]) == 3
    assert int(small_opt.step[...]) == 3
    losses = [float(step(small, small_opt, x, y)) for _ in range(4)]
    assert len(traces) == 2  # once for the dense model, once for the shrunk one
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # The carried-over pruning mask still holds on the shrunk model.
    mask = optax.tree_utils.tree_get(small_opt.opt_state, "PrunedState").mask
    for p, m in zip(
        jax.tree.leaves(nnx.state(small, nnx.Param)), jax.tree.leaves(mask), strict=True
    ):
        assert not np.any(np.asarray(p)[~np.asarray(m)])


def test_update_model_writes_dequantized_weights():
    model = nnx.Linear(5, 4, **_init(0))
    q = fisher_optax.quantize(nnx.state(model, nnx.Param), 2)
    ff.update_model(model, fisher_optax.dequantize(q))
    assert np.unique(np.asarray(model.kernel[...])).size <= 4


def test_fisher_from_nnx_optimizer_lines_up_with_params_and_masks_work():
    model = _mlp(nnx.relu)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(7), (32, 6))
    y = jnp.arange(32) % 3
    nnx.jit(lambda m, o: o.update(m, nnx.grad(_loss)(m, x, y)))(model, opt)
    params = nnx.state(model, nnx.Param)
    fisher = fisher_optax.fisher_from_state(opt, params=params)
    check_matching(params, fisher, ref_name="params", other_name="fisher")
    assert jax.tree.structure(fisher) == jax.tree.structure(params)
    mask = jax.jit(fisher_optax.topk_mask)(fisher, 0.5)  # drop the lowest-Fisher half
    ff.apply_mask_to_model(model, mask)
    kernel = np.asarray(model.layers[0].kernel[...])
    assert (kernel == 0).sum() > 0
    flags = ff.prunable_units(model)
    um = jax.jit(
        lambda p, f: fisher_optax.unit_mask(
            fisher_optax.unit_scores(p, fisher=f), 0.5, prunable=flags
        )
    )(params, fisher)
    assert _kept(um, ("layers", 0, "kernel")) == 6 and _kept(um, ("layers", 4, "kernel")) == 3
    small = ff.shrink(model, unit_mask=um).model
    np.testing.assert_allclose(_call(small, x), _call(_masked(model, um), x), rtol=1e-5, atol=1e-5)


def test_update_model_checks_paths():
    model = _mlp()
    with pytest.raises(ValueError, match=r"tree at \['layers'\]\[0\]\['kernel'\] has shape"):
        state = nnx.state(model, nnx.Param)
        state["layers"][0]["kernel"] = nnx.Param(jnp.ones((2, 2)))
        ff.update_model(model, state)


# --------------------------------------------------------------------------------------------
# Linen


class _LinenCNN(nn.Module):
    features: tuple = (6, 5, 7)

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.features[0], (3, 3), padding="VALID", name="c1")(x))
        x = nn.relu(nn.Conv(self.features[1], (3, 3), padding="VALID", name="c2")(x))
        x = nn.relu(nn.Dense(self.features[2], name="d1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(4, name="d2")(x)


def test_shrink_linen_cnn_equals_masked():
    module = _LinenCNN()
    x = jax.random.normal(jax.random.key(8), (4, 8, 8, 2))
    params = jax.jit(module.init)(jax.random.key(0), x)
    params = jax.jit(lambda t: jax.tree.map(lambda p: p + 0.5 if p.ndim == 1 else p, t))(params)
    rng = np.random.default_rng(8)
    um = {
        "params": {
            name: {"kernel": jax.device_put(rng.random(n) > 0.4)}
            for name, n in (("c1", 6), ("c2", 5), ("d1", 7))
        }
    }
    pairs = [("c1", "c2"), ("c2", "d1"), ("d1", "d2")]
    out = ff.shrink_linen(
        module, params, unit_mask=um, pairs=pairs, activation=nn.relu, conv_padding="VALID"
    )
    small = _LinenCNN(features=tuple(out.features[n] for n in ("c1", "c2", "d1")))
    wm = fisher_optax.expand_unit_mask(params, um)
    masked = _where(params, wm)
    np.testing.assert_allclose(
        jax.jit(small.apply)(out.variables, x), jax.jit(module.apply)(masked, x), atol=1e-5
    )
    n_small, _ = ff.param_count_and_flops(small.apply, x[:1], params=out.variables)
    assert n_small == sum(p.size for p in jax.tree.leaves(out.variables))


def test_shrink_linen_mlp_slices_opt_state_and_errors():
    mlp = nn.Sequential([nn.Dense(8), jax.nn.sigmoid, nn.Dense(5), jax.nn.sigmoid, nn.Dense(2)])
    x = jax.random.normal(jax.random.key(9), (5, 3))
    params = jax.jit(mlp.init)(jax.random.key(1), x)
    keep = {
        "params": {
            "layers_0": {"kernel": jnp.arange(8) % 3 != 0},
            "layers_2": {"kernel": jnp.arange(5) != 2},
        }
    }
    pairs = [("layers_0", "layers_2"), ("layers_2", "layers_4")]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params["params"])
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params["params"]), opt_state)
    out = ff.shrink_linen(
        mlp, params, opt_state, unit_mask=keep, pairs=pairs, activation=jax.nn.sigmoid
    )
    assert out.features == {"layers_0": 5, "layers_2": 4, "layers_4": 2}
    # The optax state follows the params: Adam's moments sliced, count kept.
    new_adam = optax.tree_utils.tree_get(out.opt_state, "ScaleByAdamState")
    assert new_adam.mu["layers_2"]["kernel"].shape == (5, 4) and int(new_adam.count) == 1
    tx.update(jax.tree.map(jnp.ones_like, out.variables["params"]), out.opt_state)
    small = nn.Sequential([nn.Dense(5), jax.nn.sigmoid, nn.Dense(4), jax.nn.sigmoid, nn.Dense(2)])
    masked = _where(params, fisher_optax.expand_unit_mask(params, keep))
    np.testing.assert_allclose(
        jax.jit(small.apply)(out.variables, x), jax.jit(mlp.apply)(masked, x), atol=1e-5
    )
    with pytest.raises(ValueError, match=r"pair \('layers_0', 'layers_4'\) does not chain"):
        ff.shrink_linen(mlp, params, pairs=[("layers_0", "layers_4")], activation=jax.nn.sigmoid)
    with pytest.raises(ValueError, match=r"params have no layer 'layers_9'; their layers are"):
        ff.shrink_linen(mlp, params, pairs=[("layers_0", "layers_9")])


# --------------------------------------------------------------------------------------------
# Surgery never returns a wrong model: the check against the masked model


class _Residual(nnx.Module):
    """fc2's output is added to the input: cutting fc2's units cannot work."""

    def __init__(self):
        i = _init(11)
        self.fc1 = nnx.Linear(6, 8, **i)
        self.fc2 = nnx.Linear(8, 6, **i)
        self.out = nnx.Linear(6, 3, **i)

    def __call__(self, x):
        return self.out(x + self.fc2(jax.nn.relu(self.fc1(x))))


class _Shared(nnx.Module):
    """fc2 reads fc1's units and their mean: a cut fc1 changes what fc2 sees, silently."""

    def __init__(self):
        i = _init(12)
        self.fc1 = nnx.Linear(6, 8, **i)
        self.fc2 = nnx.Linear(8, 3, **i)

    def __call__(self, x):
        h = jax.nn.relu(self.fc1(x))
        return self.fc2(h + h.mean(-1, keepdims=True))


class _NormBetween(nnx.Module):
    def __init__(self):
        i = _init(13)
        self.fc1 = nnx.Linear(6, 8, **i)
        self.bn = nnx.BatchNorm(8, rngs=nnx.Rngs(0))
        self.fc2 = nnx.Linear(8, 3, **i)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.bn(self.fc1(x))))


def _drop_half(model, name):
    um = jax.tree.map(lambda _: None, nnx.state(model, nnx.Param))
    n = getattr(model, name).kernel.shape[-1]
    um[name]["kernel"] = nnx.Param(jnp.arange(n) % 2 == 0)
    return um


def test_residual_pair_is_refused_naming_the_layer_the_shrunk_model_cannot_reach():
    model = _Residual()
    with pytest.raises(
        ValueError, match=r"wrong model: the shrunk model does not reach layer 'out'"
    ):
        ff.shrink(
            model,
            unit_mask=_drop_half(model, "fc2"),
            pairs=[("fc1", "fc2"), ("fc2", "out")],
            activation=jax.nn.relu,
        )


def test_hidden_second_reader_is_refused_naming_the_layer_whose_output_differs():
    model = _Shared()
    with pytest.raises(ValueError, match=r"the output of layer 'fc2' differs .* by up to"):
        ff.shrink(model, unit_mask=_drop_half(model, "fc1"), pairs=[("fc1", "fc2", jax.nn.relu)])
    # The same pairs with nothing hidden between them pass the check.
    x = jax.random.normal(jax.random.key(12), (4, 6))
    small = ff.shrink(model, pairs=[("fc1", "fc2", jax.nn.relu)], example_input=x).model
    np.testing.assert_allclose(_call(small, x), _call(model, x), rtol=1e-5, atol=1e-5)


def test_batchnorm_between_a_pair_is_refused_nnx():
    model = _NormBetween()
    with pytest.raises(ValueError, match=r"does not reach layer 'fc2'.*normalisation"):
        ff.shrink(model, unit_mask=_drop_half(model, "fc1"), pairs=[("fc1", "fc2", jax.nn.relu)])


class _LinenNormBetween(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="d1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x))
        return nn.Dense(3, name="d2")(x)


def test_batchnorm_between_a_pair_is_refused_linen():
    module = _LinenNormBetween()
    x = jax.random.normal(jax.random.key(13), (4, 6))
    variables = jax.jit(module.init)(jax.random.key(0), x)
    keep = {"params": {"d1": {"kernel": jnp.arange(8) % 2 == 0}}}
    with pytest.raises(ValueError, match=r"does not reach layer 'd2'"):
        ff.shrink_linen(module, variables, unit_mask=keep, pairs=[("d1", "d2")], activation=nn.relu)


def test_errors_name_the_models_own_layers_and_the_pooling():
    with pytest.raises(
        ValueError,
        match=r"layers are \['conv1', 'conv2', 'fc1', 'fc2'\].*pairs=\[\('conv1', 'conv2'\)",
    ):
        ff.shrink(_Net())
    with pytest.raises(ValueError, match=r"no Linear or Conv layer 'fc3'.*\['conv1', 'conv2'"):
        ff.shrink(_Net(), pairs=[("fc2", "fc3")], activation=jax.nn.elu)
    i = _init(14)
    pooled = nnx.Sequential(
        nnx.Conv(1, 4, (3, 3), padding="SAME", **i), nnx.relu,
        lambda x: nnx.avg_pool(x, (2, 2), strides=(2, 2)), _flatten,
        nnx.Linear(4 * 16, 3, **i),
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"layers\[2\] \(<lambda>\) between 'layers.0' and 'layers.4'.*pooling"
    ):
        ff.shrink(pooled)
    with pytest.raises(TypeError, match=r"activation must accept 1 positional argument"):
        ff.shrink(_Net(), pairs=PAIRS, activation=lambda a, b: a)
    with pytest.raises(TypeError, match=r"optimizer must be an nnx.Optimizer or None"):
        ff.shrink(_mlp(), _unit_mask(_mlp()))


# --------------------------------------------------------------------------------------------
# update_model: loaded trees, non-parameter state, validation before any write


def _bn_mlp(seed):
    i = _init(seed)
    return nnx.Sequential(
        nnx.Linear(3, 4, **i), nnx.BatchNorm(4, rngs=nnx.Rngs(seed)), nnx.relu,
        nnx.Linear(4, 2, **i),
    )  # fmt: skip


def _arrays(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def test_update_model_restores_batchnorm_from_a_plain_dict_with_int_or_str_keys():
    trained = _bn_mlp(4)
    stats = nnx.state(trained, nnx.BatchStat)
    nnx.update(trained, jax.tree.map(lambda v: v + 0.5, stats))  # running stats as if trained
    pure = nnx.state(trained).to_pure_dict()  # what load_compressed gives back
    assert 1 in pure["layers"] and "mean" in pure["layers"][1]
    x = jax.random.normal(jax.random.key(4), (5, 3))
    trained.eval()
    for tree in (pure, {"layers": {str(k): v for k, v in pure["layers"].items()}}):
        fresh = _bn_mlp(5)
        ff.update_model(fresh, tree)
        for a, b in zip(_arrays(fresh), _arrays(trained), strict=True):
            np.testing.assert_array_equal(a, b)
        fresh.eval()
        np.testing.assert_array_equal(fresh(x), trained(x))
    # A tree of parameters only (nnx.Param) keeps the model's own running statistics.
    fresh = _bn_mlp(5)
    before = np.asarray(fresh.layers[1].mean[...])
    ff.update_model(fresh, nnx.state(trained, nnx.Param))
    np.testing.assert_array_equal(fresh.layers[1].mean[...], before)


def test_update_model_failed_call_leaves_the_model_untouched():
    model = _bn_mlp(6)
    pure = jax.tree.map(lambda v: v + 1.0, nnx.state(model).to_pure_dict())
    before = _arrays(model)
    wrong_shape = jax.tree.map(lambda v: v, pure)
    wrong_shape["layers"][3]["kernel"] = jnp.ones((2, 2))
    missing = jax.tree.map(lambda v: v, pure)
    del missing["layers"][3]["bias"]
    extra = jax.tree.map(lambda v: v, pure)
    extra["layers"][9] = {"kernel": jnp.ones((2, 2))}
    cases = [
        (wrong_shape, r"tree at \['layers'\]\[3\]\['kernel'\] has shape \(2, 2\)"),
        (missing, r"tree has no value for the parameter at \['layers'\]\[3\]\['bias'\]"),
        (extra, r"tree has a leaf at \['layers'\]\[9\]\['kernel'\], which the model lacks"),
    ]
    for tree, message in cases:
        with pytest.raises(ValueError, match=message):
            ff.update_model(model, tree)
        for a, b in zip(_arrays(model), before, strict=True):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# shrink_optimizer on its own


def test_shrink_optimizer_on_its_own_slices_adam_and_keeps_the_step():
    model = _mlp(nnx.relu)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(8), (16, 6))
    y = jnp.arange(16) % 3
    opt.update(model, nnx.grad(_loss)(model, x, y))
    um = _unit_mask(model, seed=8)
    out = ff.shrink(model, unit_mask=um)
    assert out.optimizer is None
    new_opt = ff.shrink_optimizer(model, opt, out.model, out.index)
    old = optax.tree_utils.tree_get(opt.opt_state, "ScaleByAdamState")
    new = optax.tree_utils.tree_get(new_opt.opt_state, "ScaleByAdamState")
    for (path, leaf), new_leaf in zip(
        jax.tree_util.tree_flatten_with_path(old.nu)[0], jax.tree.leaves(new.nu), strict=True
    ):
        want = take_np(np.asarray(leaf), out.index.get(keystr(path), (None,) * leaf.ndim))
        np.testing.assert_array_equal(np.asarray(new_leaf), want)
    assert int(new_opt.step[...]) == 1 and int(new.count[...]) == 1
    with pytest.raises(TypeError, match=r"optimizer must be a flax.nnx.Optimizer"):
        ff.shrink_optimizer(model, model, out.model, out.index)
    with pytest.raises(ValueError, match=r"index has an entry for \['zz'\]\['kernel'\]"):
        ff.shrink_optimizer(model, opt, out.model, {"['zz']['kernel']": (None, None)})


def test_batchnorm_model_saved_and_loaded_predicts_what_the_dequantized_model_predicts(tmp_path):
    trained = _bn_mlp(7)
    nnx.update(trained, jax.tree.map(lambda v: v + 0.5, nnx.state(trained, nnx.BatchStat)))
    q = fisher_optax.quantize(nnx.state(trained), 4)  # every variable: BatchStat included
    fisher_optax.save_compressed(tmp_path / "model.fq", q)
    fresh = _bn_mlp(8)  # a new instance, other weights and fresh statistics
    ff.update_model(
        fresh, fisher_optax.dequantize(fisher_optax.load_compressed(tmp_path / "model.fq"))
    )
    in_memory = nnx.clone(trained)
    ff.update_model(in_memory, fisher_optax.dequantize(q))
    fresh.eval()
    in_memory.eval()
    x = jax.random.normal(jax.random.key(7), (6, 3))
    np.testing.assert_array_equal(fresh(x), in_memory(x))
    np.testing.assert_array_equal(fresh.layers[1].mean[...], trained.layers[1].mean[...])


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        y = nn.BatchNorm(use_running_average=True)(nn.Dense(x.shape[-1])(x))
        return x + nn.relu(y), None


class _ScanNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16)(x)
        stack = nn.scan(
            _ScanBlock,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=3,
        )
        x, _ = stack()(x, None)
        x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x[:, None], x[:, None])
        return nn.Dense(3)(x[:, 0])


def test_stacked_and_attention_biases_and_norms_are_not_kernels():
    """nn.scan gives biases, BatchNorm scales and statistics shape (L, C), attention's
    DenseGeneral a bias (heads, head_dim): the default rule judged them kernels by rank
    (quantized and pruned: eval outputs moved by ~7 at 2 bits). By name they stay whole."""
    x = jax.random.normal(jax.random.key(0), (4, 5))
    v = _ScanNet().init(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + jax.random.uniform(jax.random.key(2), a.shape), v)
    flat = jax.tree_util.tree_flatten_with_path(v)[0]
    kernels = {keystr(p) for p, a in flat if fisher_optax.is_kernel(p, a)}
    assert kernels and all(k.endswith("['kernel']") for k in kernels)
    not_kernels = [keystr(p) for p, a in flat if a.ndim >= 2 and keystr(p) not in kernels]
    assert any("['mean']" in k for k in not_kernels)  # stacked statistics, (3, 16)
    assert any("query" in k and "['bias']" in k for k in not_kernels)  # (heads, head_dim)
    d = fisher_optax.dequantize(fisher_optax.quantize(v, 2))
    m = fisher_optax.magnitude_mask(v["params"], 0.5, scope="layer")
    for (p, a), b in zip(flat, jax.tree.leaves(d), strict=True):
        if keystr(p) not in kernels:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=keystr(p))
    for p, keep in jax.tree_util.tree_flatten_with_path(m)[0]:
        assert bool(np.all(keep)) == ("['kernel']" not in keystr(p)), keystr(p)


def test_fisher_for_a_whole_nnx_state_fills_what_the_optimizer_never_held():
    """allocate_bits and quantize(fisher=) over nnx.state(model) need a Fisher shaped like
    the whole state: missing= fills the batch statistics (refused before, naming the path)."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)  # a PRNG key and a counter in the state

        def __call__(self, x):
            return self.drop(self.bn(self.lin(x)))

    model = Net(nnx.Rngs(0, dropout=1))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    opt.update(model, nnx.grad(lambda m: (m(jnp.ones((2, 3))) ** 2).mean())(model))
    with pytest.raises(ValueError, match=r"no entry for the parameter at \['bn'\]\['mean'\]; .*"
                       r"missing=0.0 to fill"):  # fmt: skip
        fisher_optax.fisher_from_state(opt, params=nnx.state(model))
    full = fisher_optax.fisher_from_state(opt, params=nnx.state(model), missing=0.0)
    only = fisher_optax.fisher_from_state(opt, params=nnx.state(model, nnx.Param))
    assert float(jnp.sum(full["bn"]["mean"][...])) == 0.0
    key = full["drop"]["rngs"]["key"][...]  # filled as float32 0, not as a key array
    assert key.dtype == jnp.float32 and not np.any(np.asarray(key))
    np.testing.assert_array_equal(full["lin"]["kernel"][...], only["lin"]["kernel"][...])
    q = fisher_optax.quantize(nnx.state(model), 3, fisher=full)
    assert q.widths[q.paths.index("['lin']['kernel']")] == (3,)
    with pytest.raises(ValueError, match="params shares no path with the optimizer state"):
        fisher_optax.fisher_from_state(opt, params={"x": jnp.ones(3)}, missing=0.0)
