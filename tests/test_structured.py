"""Structured pruning without Flax: unit scores, unit masks, the array surgery, state slicing."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fisher_optax
from fisher_optax.surgery import Edge, Layer, cut_units

RNG = np.random.default_rng(0)


def _params():
    return {
        "conv": {
            "kernel": jnp.asarray(RNG.standard_normal((3, 3, 2, 5)), jnp.float32),
            "bias": jnp.asarray(RNG.standard_normal(5), jnp.float32),
        },
        "dense": {
            "kernel": jnp.asarray(RNG.standard_normal((7, 4)), jnp.float32),
            "bias": jnp.asarray(RNG.standard_normal(4), jnp.float32),
        },
    }


def _fisher(params):
    return jax.tree.map(lambda x: jnp.asarray(RNG.random(x.shape), jnp.float32), params)


# --------------------------------------------------------------------------------------------
# unit_scores


@pytest.mark.parametrize("criterion", ["saliency", "fisher", "magnitude"])
def test_unit_scores_match_numpy_loop(criterion):
    params = _params()
    fisher = _fisher(params)
    scores = fisher_optax.unit_scores(params, criterion, fisher=fisher)
    for layer in ("conv", "dense"):
        w = np.asarray(params[layer]["kernel"], np.float64)
        f = np.asarray(fisher[layer]["kernel"], np.float64)
        want = []
        for j in range(w.shape[-1]):
            total = 0.0
            for i in np.ndindex(w.shape[:-1]):
                if criterion == "saliency":
                    total += 0.5 * f[(*i, j)] * w[(*i, j)] ** 2
                elif criterion == "fisher":
                    total += f[(*i, j)]
                else:
                    total += abs(w[(*i, j)])
            want.append(total)
        np.testing.assert_allclose(scores[layer]["kernel"], want, rtol=1e-5)
        assert scores[layer]["bias"] is None


def test_unit_scores_under_jit_compiles_once():
    params = _params()
    traces = []

    @jax.jit
    def f(p, fi):
        traces.append(1)
        return fisher_optax.unit_scores(p, fisher=fi)

    fisher = _fisher(params)
    eager = fisher_optax.unit_scores(params, fisher=fisher)
    for _ in range(3):
        out = f(params, fisher)
    assert len(traces) == 1
    np.testing.assert_allclose(out["conv"]["kernel"], eager["conv"]["kernel"], rtol=1e-6)


def test_unit_scores_prunable_predicate():
    params = _params()
    scores = fisher_optax.unit_scores(
        params,
        "magnitude",
        prunable=lambda path, leaf: jax.tree_util.keystr(path) == "['dense']['kernel']",
    )
    assert scores["conv"]["kernel"] is None
    assert scores["dense"]["kernel"].shape == (4,)


def test_unit_scores_errors():
    params = _params()
    with pytest.raises(ValueError, match="criterion must be one of"):
        fisher_optax.unit_scores(params, "l2", fisher=_fisher(params))
    with pytest.raises(ValueError, match="needs fisher="):
        fisher_optax.unit_scores(params)
    bad = _fisher(params)
    bad["dense"]["kernel"] = jnp.ones((4, 7))
    with pytest.raises(ValueError, match=r"fisher at \['dense'\]\['kernel'\] has shape \(4, 7\)"):
        fisher_optax.unit_scores(params, fisher=bad)
    negative = jax.tree.map(lambda f: -f, _fisher(params))
    with pytest.raises(ValueError, match=r"fisher at \['conv'\]\['bias'\] holds 5 negative"):
        fisher_optax.unit_scores(params, fisher=negative)
    nan = _fisher(params)
    nan["dense"]["kernel"] = nan["dense"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"fisher at \['dense'\]\['kernel'\] holds 1 non-finite"):
        fisher_optax.unit_scores(params, fisher=nan)
    with pytest.raises(ValueError, match=r"units are the last axis of a kernel with ndim >= 2"):
        fisher_optax.unit_scores(params, "magnitude", prunable=lambda p, x: True)
    with pytest.raises(TypeError, match=r"prunable must accept 2 positional arguments"):
        fisher_optax.unit_scores(params, "magnitude", prunable=lambda path: True)


def test_unit_scores_callable_and_random_criteria():
    params = _params()
    doubled = fisher_optax.unit_scores(params, lambda p, f: jax.tree.map(lambda w: 2 * w, p))
    np.testing.assert_allclose(
        doubled["dense"]["kernel"], 2 * np.asarray(params["dense"]["kernel"]).sum(0), rtol=1e-6
    )
    with pytest.raises(TypeError, match=r"criterion must accept 2 positional arguments"):
        fisher_optax.unit_scores(params, lambda p: p)
    a = fisher_optax.unit_scores(params, "random", key=jax.random.key(0))
    b = fisher_optax.unit_scores(params, "random", key=jax.random.key(0))
    np.testing.assert_array_equal(a["conv"]["kernel"], b["conv"]["kernel"])
    assert a["conv"]["kernel"].shape == (5,)


# --------------------------------------------------------------------------------------------
# unit_mask (selection by fisher_optax.topk_mask)


def _needs_masks():
    pytest.importorskip("fisher_optax.masks", reason="masks.py (issue 3) not written yet")


def _scores():
    return {
        "a": {"kernel": jnp.asarray(RNG.permutation(10).astype(np.float32)), "bias": None},
        "b": {"kernel": jnp.asarray(100 + RNG.permutation(6).astype(np.float32)), "bias": None},
    }


def test_unit_mask_per_layer_drops_lowest_exactly():
    _needs_masks()
    scores = _scores()
    mask = fisher_optax.unit_mask(scores, 0.5, scope="layer")
    for name in ("a", "b"):
        s = np.asarray(scores[name]["kernel"])
        want = np.ones(s.shape, bool)
        want[np.argsort(s)[: round(0.5 * s.size)]] = False
        np.testing.assert_array_equal(mask[name]["kernel"], want)


def test_unit_mask_global_and_min_units():
    _needs_masks()
    scores = _scores()
    # Globally, 8 of 16 units go: all 10 of 'a' rank lower, but min_units keeps its best one.
    mask = fisher_optax.unit_mask(scores, 0.5, scope="global", min_units=1)
    a, b = np.asarray(mask["a"]["kernel"]), np.asarray(mask["b"]["kernel"])
    assert (~a).sum() + (~b).sum() == 8
    assert a[np.argmax(scores["a"]["kernel"])]
    assert b.all()
    with pytest.raises(ValueError, match="leaves fewer than min_units=1"):
        fisher_optax.unit_mask(scores, 1.0, scope="layer")


def test_unit_mask_under_jit_matches_eager_and_compiles_once():
    _needs_masks()
    scores = _scores()
    traces = []

    @jax.jit
    def f(sc, fraction):
        traces.append(1)
        return fisher_optax.unit_mask(sc, fraction, scope="global")

    for fraction in (0.25, 0.5):
        got = f(scores, fraction)
        want = fisher_optax.unit_mask(scores, fraction, scope="global")
        for name in ("a", "b"):
            np.testing.assert_array_equal(got[name]["kernel"], want[name]["kernel"])
    assert len(traces) == 1


def test_unit_mask_respects_prunable_and_earlier_mask():
    _needs_masks()
    scores = _scores()
    only_a = {"a": {"kernel": True}, "b": {"kernel": False}}
    first = fisher_optax.unit_mask(scores, 0.2, prunable=only_a)
    assert np.asarray(first["b"]["kernel"]).all()
    second = fisher_optax.unit_mask(scores, 0.5, prunable=only_a, mask=first)
    a1, a2 = np.asarray(first["a"]["kernel"]), np.asarray(second["a"]["kernel"])
    assert (~a2).sum() == 5
    assert not np.any(a2 & ~a1)  # what was dropped stays dropped


def test_unit_mask_errors():
    with pytest.raises(ValueError, match="expected one score per unit"):
        fisher_optax.unit_mask({"k": jnp.ones((2, 2))}, 0.5)
    with pytest.raises(ValueError, match=r"sparsity must be a finite number in \[0.0, 1.0\]"):
        fisher_optax.unit_mask({"k": jnp.ones(2)}, 1.5)
    with pytest.raises(TypeError, match="sparsity must be a real number"):
        fisher_optax.unit_mask({"k": jnp.ones(2)}, True)
    with pytest.raises(ValueError, match=r"scope must be one of: 'layer'"):
        fisher_optax.unit_mask({"k": jnp.ones(2)}, 0.5, scope="model")
    with pytest.raises(TypeError, match="min_units must be an int"):
        fisher_optax.unit_mask({"k": jnp.ones(2)}, 0.5, min_units=1.5)
    with pytest.raises(TypeError, match=r"prunable must accept 2 positional arguments"):
        fisher_optax.unit_mask({"k": jnp.ones(2)}, 0.5, prunable=lambda: True)


# --------------------------------------------------------------------------------------------
# expand_unit_mask


def test_expand_unit_mask_zeroes_columns_and_optionally_biases():
    params = _params()
    units = {
        "conv": {"kernel": jnp.array([True, False, True, True, False]), "bias": None},
        "dense": {"kernel": jnp.array([True, True, False, True]), "bias": None},
    }
    wm = fisher_optax.expand_unit_mask(params, units)
    np.testing.assert_array_equal(wm["conv"]["kernel"][1, 2, 0], units["conv"]["kernel"])
    assert wm["conv"]["kernel"].shape == (3, 3, 2, 5)
    assert np.asarray(wm["conv"]["bias"]).all()
    wb = fisher_optax.expand_unit_mask(params, units, bias=True)
    np.testing.assert_array_equal(wb["dense"]["bias"], units["dense"]["kernel"])


def test_expand_unit_mask_rejects_weight_masks():
    params = _params()
    weight_mask = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
    with pytest.raises(ValueError, match="Pass a unit mask from unit_mask"):
        fisher_optax.expand_unit_mask(params, weight_mask)
    with pytest.raises(ValueError, match="which the parameters lack"):
        fisher_optax.expand_unit_mask(params, {"other": {"kernel": jnp.ones(4, bool)}})
    floats = {"dense": {"kernel": jnp.ones(4)}}
    with pytest.raises(TypeError, match=r"unit mask at \['dense'\]\['kernel'\] has dtype float32"):
        fisher_optax.expand_unit_mask(params, floats)


# --------------------------------------------------------------------------------------------
# The surgery on arrays, against a NumPy forward pass


def _mlp(sizes, act_name):
    layers = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers[f"l{i}"] = Layer(
            name=f"l{i}",
            path=f"['l{i}']",
            kernel=RNG.standard_normal((n_in, n_out)).astype(np.float32),
            bias=RNG.standard_normal(n_out).astype(np.float32),
            constant_exact=True,
        )
    acts = {"sigmoid": lambda x: 1 / (1 + np.exp(-x)), "relu": lambda x: np.maximum(x, 0)}
    edges = [Edge(f"l{i}", f"l{i + 1}", 1, acts[act_name]) for i in range(len(sizes) - 2)]
    return layers, edges, acts[act_name]


def _forward(kernels, biases, x, act):
    n = len(kernels)
    for i in range(n):
        x = x @ kernels[f"l{i}"] + biases[f"l{i}"]
        if i < n - 1:
            x = act(x)
    return x


@pytest.mark.parametrize("act_name", ["sigmoid", "relu"])
def test_cut_units_matches_numpy_masked_forward(act_name):
    layers, edges, act = _mlp([6, 9, 7, 3], act_name)
    drop = {"l0": RNG.random(9) < 0.4, "l1": RNG.random(7) < 0.4}
    # A unit pruned by an unstructured mask (all incoming weights zero) is dropped too.
    layers["l1"].kernel[:, 0] = 0
    drop["l1"][0] = False
    cut = cut_units(layers, edges, drop)
    masked_k = {n: lay.kernel.copy() for n, lay in layers.items()}
    for n, d in drop.items():
        masked_k[n][:, d] = 0
    x = RNG.standard_normal((5, 6)).astype(np.float32)
    want = _forward(masked_k, {n: lay.bias for n, lay in layers.items()}, x, act)
    got = _forward(cut.kernels, cut.biases, x, act)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert 0 in cut.dropped["l1"]
    np.testing.assert_array_equal(cut.dropped["l0"], np.flatnonzero(drop["l0"]))
    assert cut.kernels["l0"].shape == (6, 9 - drop["l0"].sum())


def test_cut_units_cascades_to_units_fed_only_by_dropped_units():
    layers, edges, act = _mlp([4, 3, 3, 2], "sigmoid")
    # l1's unit 2 reads only l0's unit 0, which the mask drops: once folded, it is constant.
    layers["l1"].kernel[:, 2] = 0
    layers["l1"].kernel[0, 2] = 1.5
    cut = cut_units(layers, edges, {"l0": np.array([True, False, False])})
    assert 2 in cut.dropped["l1"]
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    masked = {n: lay.kernel.copy() for n, lay in layers.items()}
    masked["l0"][:, 0] = 0
    want = _forward(masked, {n: lay.bias for n, lay in layers.items()}, x, act)
    np.testing.assert_allclose(_forward(cut.kernels, cut.biases, x, act), want, atol=1e-5)


def test_cut_units_errors():
    layers, edges, _ = _mlp([4, 3, 2], "relu")
    with pytest.raises(ValueError, match="no layer consumes its outputs"):
        cut_units(layers, edges, {"l1": np.array([True, False])})
    with pytest.raises(ValueError, match="needs the activation between the two layers"):
        cut_units(layers, [edges[0]._replace(constant=None)], {"l0": np.array([1, 0, 0], bool)})
    extra = layers | {"l9": layers["l0"]._replace(name="l9", path=("l9",))}
    with pytest.raises(ValueError, match="is fed by both 'l0' and 'l9'"):
        cut_units(extra, [*edges, Edge("l9", "l1", 1, np.tanh)], {})


# --------------------------------------------------------------------------------------------
# slice_opt_state


def test_slice_opt_state_keeps_exact_entries_through_wrappers():
    params = {"a": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}, "b": jnp.ones(5)}
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.partition(
            {"adam": optax.adam(1e-2), "sgd": optax.sgd(1e-2, momentum=0.9)},
            {"a": {"kernel": "adam", "bias": "adam"}, "b": "sgd"},
        ),
    )
    state = opt.init(params)
    for _ in range(3):
        grads = jax.tree.map(lambda x: jnp.asarray(RNG.standard_normal(x.shape), x.dtype), params)
        _, state = opt.update(grads, state, params)
    index = {
        "['a']['kernel']": (np.array([0, 2, 3]), np.array([1, 2])),
        "['a']['bias']": (np.array([1, 2]),),
    }
    new = fisher_optax.slice_opt_state(state, params, index)
    old_adam = optax.tree_utils.tree_get(state, "ScaleByAdamState")
    new_adam = optax.tree_utils.tree_get(new, "ScaleByAdamState")
    np.testing.assert_array_equal(
        new_adam.nu["a"]["kernel"], np.asarray(old_adam.nu["a"]["kernel"])[[0, 2, 3]][:, [1, 2]]
    )
    np.testing.assert_array_equal(new_adam.mu["a"]["bias"], old_adam.mu["a"]["bias"][1:])
    assert int(new_adam.count) == int(old_adam.count) == 3
    old_sgd = optax.tree_utils.tree_get(state, "TraceState")
    new_sgd = optax.tree_utils.tree_get(new, "TraceState")
    np.testing.assert_array_equal(new_sgd.trace["b"], old_sgd.trace["b"])
    # The sliced state drives the optimizer on the new params.
    new_params = {"a": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, "b": jnp.ones(5)}
    updates, _ = jax.jit(opt.update)(jax.tree.map(jnp.ones_like, new_params), new, new_params)
    assert updates["a"]["kernel"].shape == (3, 2)


def test_slice_opt_state_rejects_foreign_index():
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"index has an entry for \['v'\]"):
        fisher_optax.slice_opt_state(optax.adam(1.0).init(params), params, {"['v']": (None,)})
