"""The criteria vocabulary: each score against NumPy, and every error by its message."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fisher_optax as fo

# The function fisher_optax.scores shadows the module of the same name on the package; reach
# the module through the import system (``from fisher_optax.scores import ...`` also works).
scores_mod = importlib.import_module("fisher_optax.scores")

RNG = np.random.default_rng(0)
W = RNG.normal(size=(3, 4)).astype(np.float32)
B = RNG.normal(size=(4,)).astype(np.float32)
F = RNG.uniform(size=(3, 4)).astype(np.float32)
FB = RNG.uniform(size=(4,)).astype(np.float32)
PARAMS = {"b": jnp.asarray(B), "w": jnp.asarray(W)}
FISHER = {"b": jnp.asarray(FB), "w": jnp.asarray(F)}


def test_criteria_vocabulary():
    assert set(fo.CRITERIA) == {"magnitude", "fisher", "saliency", "random"}
    assert set(scores_mod.CriterionName.__args__) == set(fo.CRITERIA)


@pytest.mark.parametrize(
    ("criterion", "ref"),
    [
        ("magnitude", lambda w, f: np.abs(w)),
        ("fisher", lambda w, f: f),
        ("saliency", lambda w, f: 0.5 * f.astype(np.float64) * w.astype(np.float64) ** 2),
    ],
)
def test_named_scores_match_numpy(criterion, ref):
    out = fo.scores(PARAMS, criterion, fisher=FISHER)
    assert set(out) == {"b", "w"}
    np.testing.assert_allclose(out["w"], ref(W, F), rtol=1e-6)
    np.testing.assert_allclose(out["b"], ref(B, FB), rtol=1e-6)
    assert out["w"].dtype == jnp.float32


def test_saliency_is_the_one_formula():
    s = fo.saliency(PARAMS, FISHER)
    np.testing.assert_allclose(s["w"], 0.5 * F * W**2, rtol=1e-6)
    # bf16 weights are scored in float32 (ties would otherwise swamp the ranking)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    assert fo.saliency(p16, FISHER)["w"].dtype == jnp.float32


def test_random_scores_are_per_leaf_streams():
    key = jax.random.key(3)
    out = fo.scores(PARAMS, "random", key=key)
    leaves = jax.tree.leaves(PARAMS)
    for i, (x, s) in enumerate(zip(leaves, jax.tree.leaves(out), strict=True)):
        ref = jax.random.uniform(jax.random.fold_in(key, i), x.shape)
        np.testing.assert_array_equal(s, ref)
    assert not np.array_equal(out["w"], fo.scores(PARAMS, "random", key=jax.random.key(4))["w"])


def test_callable_criterion_gets_params_and_fisher():
    out = fo.scores(PARAMS, lambda p, f: jax.tree.map(lambda a, b: a * b, p, f), fisher=FISHER)
    np.testing.assert_allclose(out["w"], W * F, rtol=1e-6)


def test_scores_under_jit():
    f = jax.jit(lambda p, fi: fo.scores(p, "saliency", fisher=fi))
    np.testing.assert_allclose(f(PARAMS, FISHER)["w"], 0.5 * F * W**2, rtol=1e-6)


def test_nested_structures_follow_params():
    params = {"layer": [jnp.ones((2, 2)), jnp.ones(3)]}
    fisher = {"layer": [jnp.ones((2, 2)), jnp.ones(3)]}
    out = fo.scores(params, "fisher", fisher=fisher)
    assert jax.tree.structure(out) == jax.tree.structure(params)


def test_errors():
    with pytest.raises(ValueError, match=r"criterion must be one of: 'magnitude' \(\|w\|"):
        fo.scores(PARAMS, "obd")
    with pytest.raises(ValueError, match=r"criterion='saliency' needs fisher="):
        fo.scores(PARAMS, "saliency")
    with pytest.raises(ValueError, match=r"criterion='random' needs key="):
        fo.scores(PARAMS, "random")
    with pytest.raises(ValueError, match=r"key is only used by criterion='random', not 'fisher'"):
        fo.scores(PARAMS, "fisher", fisher=FISHER, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"a callable criterion gets \(params, fisher\)"):
        fo.scores(PARAMS, lambda p, f: p, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"key must be a jax.random key"):
        fo.scores(PARAMS, "random", key=0)
    with pytest.raises(TypeError, match=r"criterion must accept 2 positional arguments"):
        fo.scores(PARAMS, lambda p: p)
    with pytest.raises(ValueError, match=r"criterion's scores has no leaf at \['w'\]"):
        fo.scores(PARAMS, lambda p, f: {"b": p["b"]})
    neg = {"b": FISHER["b"], "w": -FISHER["w"]}
    with pytest.raises(ValueError, match=r"fisher at \['w'\] holds 12 negative value"):
        fo.scores(PARAMS, "fisher", fisher=neg)
    with pytest.raises(ValueError, match=r"fisher at \['w'\] holds 12 negative value"):
        fo.saliency(PARAMS, neg)
    nan_f = {"b": FISHER["b"], "w": FISHER["w"].at[0, 1].set(jnp.nan)}
    with pytest.raises(ValueError, match=r"fisher at \['w'\] holds 1 non-finite value"):
        fo.scores(PARAMS, "saliency", fisher=nan_f)
    inf_w = {"b": PARAMS["b"], "w": PARAMS["w"].at[2, 3].set(jnp.inf)}
    with pytest.raises(ValueError, match=r"params at \['w'\] holds 1 non-finite value"):
        fo.scores(inf_w, "magnitude")
    with pytest.raises(ValueError, match=r"fisher has no leaf at \['w'\]"):
        fo.scores(PARAMS, "fisher", fisher={"b": FISHER["b"]})
