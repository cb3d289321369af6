"""method="layers" (closed forms per layer) against method="vmap" (per-example gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fisher_optax import _fast_fisher, empirical_fisher, monte_carlo_fisher

B = 6


def _close(fast, ref):
    """Equal within 1e-5 relative to each leaf's largest entry."""
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()) + 1e-12)


def _plan(loss_fn, params, batch):
    """The layer plan that method='layers' builds, to check which path each leaf takes."""
    leaves, treedef = jax.tree.flatten(params)
    data, data_def = jax.tree.flatten(batch)

    def ell(pl, el):
        one = jax.tree.unflatten(data_def, [x[None] for x in el])
        return loss_fn(jax.tree.unflatten(treedef, pl), one)

    return _fast_fisher._plan(ell, leaves, [x[0] for x in data])


def _both(loss_fn, params, batch, **kw):
    fast = empirical_fisher(loss_fn, params, batch, method="layers", **kw)
    ref = empirical_fisher(loss_fn, params, batch, method="vmap", **kw)
    _close(fast, ref)
    assert max(float(jnp.max(v)) for v in jax.tree.leaves(ref)) > 0  # not trivially zero
    return fast


def _xent(logits_fn):
    def loss(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, b["x"]), b["y"]).mean()

    return loss


def _mlp_params(key):
    k = jax.random.split(key, 2)
    return {
        "w1": jax.random.normal(k[0], (5, 4)),
        "b1": jnp.full(4, 0.1),
        "w2": jax.random.normal(k[1], (4, 3)),
        "b2": jnp.zeros(3),
    }


def _mlp(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def test_mlp_empirical_and_monte_carlo_match_vmap_and_use_the_closed_form():
    params = _mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (B, 5))
    batch = {"x": x, "y": jnp.arange(B) % 3}
    _both(_xent(_mlp), params, batch)
    key = jax.random.key(2)
    fast = monte_carlo_fisher(_mlp, params, x, key=key, num_samples=3)
    ref = monte_carlo_fisher(_mlp, params, x, key=key, num_samples=3, method="vmap")
    _close(fast, ref)
    plan = _plan(_xent(_mlp), params, batch)
    # Leaves in order b1, b2, w1, w2: both kernels by (x^2)^T (dy^2), nothing left to vmap.
    assert plan.closed == {0: False, 1: False, 2: True, 3: True}
    assert plan.fallback == []


def test_microbatches_and_jit_give_the_same_fast_result():
    params = _mlp_params(jax.random.key(3))
    batch = {"x": jax.random.normal(jax.random.key(4), (7, 5)), "y": jnp.arange(7) % 3}
    whole = empirical_fisher(_xent(_mlp), params, batch)
    chunked = jax.jit(lambda p: empirical_fisher(_xent(_mlp), p, batch, microbatch_size=3))(params)
    _close(chunked, whole)


def _conv(x, w, stride, padding, dn, dilation=(1, 1)):
    return jax.lax.conv_general_dilated(
        x, w, stride, padding, rhs_dilation=dilation, dimension_numbers=dn
    )


def test_cnn_same_stride_2_and_valid_dilated_nchw_match_vmap():
    k = jax.random.split(jax.random.key(5), 4)
    params = {
        "c1": jax.random.normal(k[0], (3, 3, 2, 4)) * 0.5,  # HWIO
        "c1_b": jnp.full(4, 0.1),
        "c2": jax.random.normal(k[1], (3, 4, 2, 2)) * 0.3,  # OIHW
        "d": jax.random.normal(k[2], (3 * 2 * 3, 3)) * 0.3,
    }

    def logits(p, x):  # x: NHWC 9x9x2
        h = jax.nn.relu(_conv(x, p["c1"], (2, 2), "SAME", ("NHWC", "HWIO", "NHWC")) + p["c1_b"])
        h = jnp.transpose(h, (0, 3, 1, 2))  # 5x5 -> NCHW
        h = jnp.tanh(_conv(h, p["c2"], (1, 2), "VALID", ("NCHW", "OIHW", "NCHW"), (2, 1)))
        return h.reshape(h.shape[0], -1) @ p["d"]

    batch = {"x": jax.random.normal(k[3], (B, 9, 9, 2)), "y": jnp.arange(B) % 3}
    _both(_xent(logits), params, batch)
    plan = _plan(_xent(logits), params, batch)
    names = {k: plan.eqns[e].eqn.primitive.name for k, e in plan.layers.items()}
    assert names == {
        0: "conv_general_dilated",
        1: "add",
        2: "conv_general_dilated",
        3: "dot_general",
    }


def test_linen_model_matches_vmap():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(3, (3, 3), strides=2, padding="SAME")(x))
            x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
            return nn.Dense(3)(x)

    net = Net()
    x = jax.random.normal(jax.random.key(6), (B, 6, 6, 2))
    variables = net.init(jax.random.key(7), x)
    batch = {"x": x, "y": jnp.arange(B) % 3}
    _both(_xent(net.apply), variables, batch)


def test_nnx_model_through_split_and_merge_matches_vmap():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (3, 3), padding="VALID", rngs=rngs)
            self.dense = nnx.Linear(3 * 4 * 4, 3, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.conv(x))
            return self.dense(h.reshape(h.shape[0], -1))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)

    def logits(s, x):
        return nnx.merge(graphdef, s)(x)

    batch = {"x": jax.random.normal(jax.random.key(9), (B, 6, 6, 2)), "y": jnp.arange(B) % 3}
    fast = _both(_xent(logits), state, batch)
    assert isinstance(fast, nnx.State)
    assert _plan(_xent(logits), state, batch).fallback == []


def test_unrecognised_tied_embedding_falls_back_exactly():
    """An embedding used for the lookup and as the output projection meets the data twice."""
    k = jax.random.split(jax.random.key(10), 2)
    params = {
        "emb": jax.random.normal(k[0], (7, 4)),  # 7 tokens, width 4
        "scale": jnp.linspace(0.5, 1.5, 4),
    }

    def logits(p, tokens):  # tokens [n, 3] -> logits over the 7 tokens
        h = jnp.mean(p["emb"][tokens], axis=1)
        h = h / jnp.sqrt(jnp.mean(h**2, -1, keepdims=True) + 1e-6) * p["scale"]
        return h @ p["emb"].T

    tokens = jax.random.randint(k[1], (B, 3), 0, 7)
    batch = {"x": tokens, "y": jnp.arange(B) % 7}
    _both(_xent(logits), params, batch)
    plan = _plan(_xent(logits), params, batch)
    assert plan.fallback == [0]  # emb goes to vmap(grad); scale is found at its mul
    assert list(plan.layers) == [1]


def test_errors_are_named():
    params = _mlp_params(jax.random.key(0))
    x = jnp.ones((B, 5))
    batch = {"x": x, "y": jnp.zeros(B, int)}
    with pytest.raises(ValueError, match="method must be one of: 'layers'"):
        empirical_fisher(_xent(_mlp), params, batch, method="fast")
    with pytest.raises(TypeError, match="takes 3 positional arguments"):
        monte_carlo_fisher(_mlp, params, x, jax.random.key(0))  # key is keyword-only
    with pytest.raises(TypeError, match=r"key must be a jax\.random key"):
        monte_carlo_fisher(_mlp, params, x, key=0)
    with pytest.raises(TypeError, match=r"loss_fn must accept 2 positional arguments"):
        empirical_fisher(lambda p: 0.0, params, batch)
    bad = dict(params, w1=params["w1"].at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"params at \['w1'\] holds 1 non-finite"):
        empirical_fisher(_xent(_mlp), bad, batch)
    with pytest.raises(ValueError, match="same leading batch axis"):
        monte_carlo_fisher(_mlp, params, {"a": x, "b": x[:2]}, key=jax.random.key(0))


def _pool(x, window, strides, padding):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding)


def _pool_eqn(x, window, strides, padding):
    (eqn,) = jax.make_jaxpr(lambda v: _pool(v, window, strides, padding))(x).jaxpr.eqns
    return eqn


@pytest.mark.parametrize(
    ("window", "padding"),
    [
        ((1, 2, 2, 1), "VALID"),  # 5x5: the last row and column are in no window
        ((1, 2, 3, 1), ((0, 0), (1, 0), (0, 1), (0, 0))),  # padded on both sides
        ((1, 3, 1, 1), "SAME"),
    ],
)
def test_tiled_max_pool_vjp_matches_jax_rule_with_ties(window, padding):
    """Integer inputs make most windows hold several maxima: the first one gets dy, as in JAX."""
    x = jnp.round(jax.random.uniform(jax.random.key(11), (2, 5, 5, 3)) * 2)
    pool = _fast_fisher._max_pool(_pool_eqn(x, window, window, padding))
    assert pool is not None
    y, vjp = jax.vjp(lambda v: _pool(v, window, window, padding), x)
    dy = jax.random.normal(jax.random.key(12), y.shape)
    y_fast, vjp_fast = jax.vjp(pool, x)
    np.testing.assert_array_equal(y_fast, y)
    np.testing.assert_array_equal(vjp_fast(dy)[0], vjp(dy)[0])


def test_max_pool_with_overlapping_or_dilated_windows_keeps_jax_rule():
    x = jnp.zeros((2, 6, 6, 3))
    assert _fast_fisher._max_pool(_pool_eqn(x, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")) is None
    (eqn,) = jax.make_jaxpr(
        lambda v: jax.lax.reduce_window(
            v, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID", None, (1, 2, 1, 1)
        )
    )(x).jaxpr.eqns
    assert _fast_fisher._max_pool(eqn) is None


def test_cnn_with_tied_pools_grouped_and_dilated_convs_matches_vmap():
    """Conv kernels through the grouped-convolution path, pools through the tiled VJP."""
    k = jax.random.split(jax.random.key(13), 6)
    params = {
        "c1": jax.random.normal(k[0], (3, 3, 2, 4)) * 0.5,  # HWIO, stride 2, asymmetric pad
        "c1_b": jnp.full(4, 0.1),
        "c2": jax.random.normal(k[1], (2, 2, 2, 4)) * 0.5,  # 2 feature groups, dilated
        "c3": jax.random.normal(k[2], (4, 4, 2, 1)) * 0.5,  # OIHW, lhs-dilated (transposed)
        "d": jax.random.normal(k[3], (4 * 2 * 1, 3)) * 0.3,
    }

    def logits(p, x):  # x: NHWC 9x9x2
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.lax.conv_general_dilated(
            x, p["c1"], (2, 2), ((1, 2), (0, 1)), dimension_numbers=dn
        )  # 5x4x4
        # relu makes all-zero windows: ties in the pools below
        h = _pool(jax.nn.relu(h + p["c1_b"]), (1, 2, 2, 1), (1, 2, 2, 1), "SAME")  # 3x2
        h = jax.lax.conv_general_dilated(
            h,
            p["c2"],
            (1, 1),
            "SAME",
            rhs_dilation=(2, 1),
            dimension_numbers=dn,
            feature_group_count=2,
        )  # 3x2x4
        h = jnp.transpose(jax.nn.relu(h), (0, 3, 1, 2))  # NCHW
        h = jax.lax.conv_general_dilated(
            h,
            p["c3"],
            (2, 1),
            ((1, 1), (0, 0)),
            lhs_dilation=(2, 1),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )  # [n, 4, 3, 2]
        h = _pool(h, (1, 1, 2, 2), (1, 1, 2, 2), ((0, 0), (0, 0), (0, 1), (0, 0)))  # [n, 4, 2, 1]
        return h.reshape(h.shape[0], -1) @ p["d"]

    n = 19  # one chunk of 16 and a partial one of 3
    x = jax.random.normal(k[4], (n, 9, 9, 2))
    batch = {"x": x, "y": jnp.arange(n) % 3}
    _both(_xent(logits), params, batch)
    plan = _plan(_xent(logits), params, batch)
    grouped = {
        k: _fast_fisher._grouped_kernel_form(plan.eqns[e].eqn, plan.operand[k], {0: None})
        for k, e in plan.layers.items()
    }  # leaves c1, c1_b, c2, c3, d: the ungrouped kernels c1 and c3 by one grouped conv
    assert grouped == {0: True, 1: False, 2: False, 3: True, 4: False}
    pools = [e.eqn for e in plan.eqns if e.eqn.primitive.name == "reduce_window_max"]
    assert len(pools) == 2 and all(_fast_fisher._max_pool(e) is not None for e in pools)
    key = jax.random.key(14)
    _close(
        monte_carlo_fisher(logits, params, x, key=key),
        monte_carlo_fisher(logits, params, x, key=key, method="vmap"),
    )


def test_linen_lenet_with_pools_and_grouped_conv_matches_vmap():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.max_pool(nn.Conv(4, (3, 3), padding="VALID")(x), (2, 2), (2, 2))  # 3x3
            x = nn.Conv(4, (2, 2), feature_group_count=2, kernel_dilation=(1, 2))(x)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2), padding="SAME")  # 2x2
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    net = Net()
    x = jax.random.normal(jax.random.key(15), (17, 8, 8, 1))
    variables = net.init(jax.random.key(16), x)
    _both(_xent(net.apply), variables, {"x": x, "y": jnp.arange(17) % 3})


def test_nnx_1d_conv_with_stride_and_pool_matches_vmap():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 4, (3,), strides=(2,), padding=((2, 1),), rngs=rngs)
            self.dense = nnx.Linear(4 * 3, 3, rngs=rngs)

        def __call__(self, x):  # x: [n, 11, 2] -> conv [n, 6, 4] -> pool [n, 3, 4]
            h = nnx.max_pool(nnx.tanh(self.conv(x)), (2,), (2,))
            return self.dense(h.reshape(h.shape[0], -1))

    graphdef, state = nnx.split(Net(nnx.Rngs(1)), nnx.Param)

    def logits(s, x):
        return nnx.merge(graphdef, s)(x)

    batch = {"x": jax.random.normal(jax.random.key(17), (18, 11, 2)), "y": jnp.arange(18) % 3}
    _both(_xent(logits), state, batch)
    assert _plan(_xent(logits), state, batch).fallback == []


def test_parameter_inside_scan_falls_back_exactly():
    """A recurrence's weight meets the data in a ``scan`` (several outputs): vmap(grad)."""
    k = jax.random.split(jax.random.key(18), 3)
    params = {
        "w_h": jax.random.normal(k[0], (4, 4)) * 0.5,
        "w_x": jax.random.normal(k[1], (2, 4)) * 0.5,
        "out": jax.random.normal(k[2], (4, 3)),
    }

    def logits(p, xs):  # xs: [n, 5 steps, 2]
        def step(h, x):
            h = jnp.tanh(h @ p["w_h"] + x @ p["w_x"])
            return h, h

        h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[0], 4)), jnp.swapaxes(xs, 0, 1))
        return h @ p["out"]

    batch = {"x": jax.random.normal(jax.random.key(19), (B, 5, 2)), "y": jnp.arange(B) % 3}
    _both(_xent(logits), params, batch)
    plan = _plan(_xent(logits), params, batch)
    assert plan.fallback == [1, 2]  # leaves out, w_h, w_x: the two inside the scan
    assert plan.closed == {0: True}
