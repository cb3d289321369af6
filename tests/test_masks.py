"""Masks against brute-force NumPy references (a stable lexicographic sort), under jit too."""

import contextlib
import logging
import math
from fractions import Fraction

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fisher_optax as fo
from fisher_optax import _select as select_mod
from fisher_optax._tree import per_leaf
from fisher_optax.patterns import _select_stages

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


# ------------------------------------------------------------------------------------------
# Independent reference: sort everything, prune the first k (ties by flat index).


def k_of(sparsity, n):
    """The documented count: the exact product of the float32 sparsity, half to even."""
    return round(Fraction(float(np.float32(sparsity))) * n)


def ref_prune(scores, sparsity, prior=None, allowed=None):
    """Boolean 'pruned' vector over the concatenated leaves, by a full stable sort."""
    flat = np.concatenate([np.asarray(x, np.float32).ravel() for x in scores])
    n_all = flat.size
    allow = (
        np.ones(n_all, bool)
        if allowed is None
        else np.concatenate(
            [np.broadcast_to(a, np.shape(x)).ravel() for a, x in zip(allowed, scores, strict=True)]
        )
    )
    pri = (
        np.zeros(n_all, bool)
        if prior is None
        else ~np.concatenate([np.asarray(p).ravel() for p in prior])
    )
    pri &= allow
    n = int(allow.sum())
    k = max(k_of(sparsity, n), int(pri.sum()))
    idx = np.arange(n_all)
    # Prior-pruned first, then by score, then by flat index; non-prunable never.
    order = np.lexsort((idx, flat, ~pri, ~allow))
    prune = np.zeros(n_all, bool)
    prune[order[:k]] = True
    return prune


def flat_pruned(mask, names):
    return np.concatenate([~np.asarray(mask[name]).ravel() for name in names])


# A few fixed layouts: each new layout compiles the selection kernel again (about a second
# on a busy CPU), while new values and sparsities reuse the compiled kernel.
shapes_st = st.sampled_from([[(1, 1)], [(3, 4), (5, 2), (1, 7)]])


@st.composite
def score_trees(draw, ties=True):
    shapes = draw(shapes_st)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if ties:
        leaves = [rng.integers(-3, 4, size=s).astype(np.float32) for s in shapes]
    else:
        leaves = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    return {f"l{i}": x for i, x in enumerate(leaves)}, rng


def as_jnp(tree):
    return {k: jnp.asarray(v) for k, v in tree.items()}


@contextlib.contextmanager
def selection_path(path):
    """Eager calls on small concrete trees select in NumPy ("host"); "device" forces the
    jitted kernel, as for large or traced inputs."""
    saved = select_mod.HOST_MAX
    select_mod.HOST_MAX = saved if path == "host" else -1
    try:
        yield
    finally:
        select_mod.HOST_MAX = saved


# ------------------------------------------------------------------------------------------
# select (Unstructured)


@pytest.mark.parametrize("path", ["host", "device"])
@SETTINGS
@given(score_trees(), st.floats(0, 1), st.booleans())
def test_topk_global_matches_sort_reference(path, data, sparsity, with_prior):
    tree, rng = data
    names = list(tree)
    prior = {k: rng.uniform(size=v.shape) > 0.3 for k, v in tree.items()} if with_prior else None
    with selection_path(path):
        mask = fo.select(as_jnp(tree), sparsity, mask=None if prior is None else as_jnp(prior))
    want = ref_prune(
        [tree[k] for k in names], sparsity, None if prior is None else [prior[k] for k in names]
    )
    np.testing.assert_array_equal(flat_pruned(mask, names), want)


@pytest.mark.parametrize("path", ["host", "device"])
@SETTINGS
@given(score_trees(), st.floats(0, 1))
def test_topk_layer_matches_sort_reference_per_leaf(path, data, sparsity):
    tree, _ = data
    with selection_path(path):
        mask = fo.select(as_jnp(tree), sparsity, pattern=fo.Unstructured("layer"))
    for name, x in tree.items():
        np.testing.assert_array_equal(~np.asarray(mask[name]).ravel(), ref_prune([x], sparsity))
        assert int((~np.asarray(mask[name])).sum()) == k_of(sparsity, x.size)


@SETTINGS
@given(score_trees(ties=False), st.floats(0, 1), st.sampled_from(["global", "layer"]))
def test_exact_pruned_count(data, sparsity, scope):
    tree, _ = data
    mask = fo.select(as_jnp(tree), sparsity, pattern=fo.Unstructured(scope))
    counts = {k: int((~np.asarray(m)).sum()) for k, m in mask.items()}
    if scope == "global":
        n = sum(v.size for v in tree.values())
        assert sum(counts.values()) == k_of(sparsity, n)
    else:
        assert counts == {k: k_of(sparsity, v.size) for k, v in tree.items()}


@SETTINGS
@given(score_trees(), st.floats(0, 1), st.floats(0, 1), st.sampled_from(["global", "layer"]))
def test_masks_nest(data, s1, s2, scope):
    tree, _ = data
    lo, hi = sorted([s1, s2])
    scores = as_jnp(tree)
    m_lo = fo.select(scores, lo, pattern=fo.Unstructured(scope))
    m_hi = fo.select(scores, hi, pattern=fo.Unstructured(scope), mask=m_lo)
    m_hi_fresh = fo.select(scores, hi, pattern=fo.Unstructured(scope))
    for k in tree:
        # Everything pruned at the lower sparsity stays pruned at the higher one.
        assert not np.any(~np.asarray(m_lo[k]) & np.asarray(m_hi[k]))
        # With a total order (score, flat index) the fresh mask nests as well, and agrees.
        np.testing.assert_array_equal(m_hi[k], m_hi_fresh[k])


def test_prior_mask_above_target_keeps_its_pruning():
    scores = {"w": jnp.arange(12.0).reshape(3, 4)}
    prior = {"w": jnp.arange(12).reshape(3, 4) % 2 == 0}  # prunes 6 (the odd entries kept)
    mask = fo.select(scores, 0.25, mask=prior)
    np.testing.assert_array_equal(mask["w"], prior["w"])


def test_tie_break_lower_flat_index_first_across_leaves():
    scores = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
    mask = fo.select(scores, 5 / 8)
    np.testing.assert_array_equal(mask["a"], np.zeros((2, 2), bool))
    np.testing.assert_array_equal(mask["b"], np.array([[False, True], [True, True]]))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_tie_break_by_flat_index_for_every_leaf_shape(scope):
    """The tie-break over the bytes of each leaf's flat index (plus its offset) equals the
    flat-index order for 0-D, 1-D, 2-D and 3-D leaves, with heavy ties, a prior mask,
    under jit."""
    rng = np.random.default_rng(3)
    shapes = {"s": (), "v600": (600,), "v257": (257,), "m": (7, 30), "t": (3, 5, 40)}
    tree = {k: rng.integers(0, 4, s).astype(np.float32) for k, s in shapes.items()}
    prior = {k: rng.uniform(size=s) > 0.2 for k, s in shapes.items()}
    names = list(tree)  # flattening order of a dict: sorted keys
    names.sort()

    @jax.jit
    def select(scores, prior, sparsity):
        return fo.select(
            scores, sparsity, pattern=fo.Unstructured(scope), prunable=lambda p, x: True, mask=prior
        )

    for sparsity in [0.05, 0.3, 0.31, 0.77, 0.999]:
        got = select(as_jnp(tree), as_jnp(prior), jnp.float32(sparsity))
        if scope == "global":
            want = ref_prune([tree[k] for k in names], sparsity, [prior[k] for k in names])
            np.testing.assert_array_equal(flat_pruned(got, names), want)
        else:
            for k in names:
                want = ref_prune([tree[k]], sparsity, [prior[k]])
                np.testing.assert_array_equal(~np.asarray(got[k]).ravel(), want)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_leaves_of_one_shape_batched_keep_flat_index_ties_and_groups(scope):
    """Leaves of one shape are stacked and counted together: with heavy ties, a prior mask
    and element-wise prunable flags on some of them (another batch), the masks equal the
    flat-index reference over the leaves in flattening order, per leaf in "layer" scope."""
    rng = np.random.default_rng(7)
    shapes = {"a0": (7, 30), "a1": (7, 30), "a2": (7, 30), "b0": (600,), "b1": (600,)}
    shapes |= {"c0": (), "c1": (), "d": (3, 5, 40)}
    tree = {k: rng.integers(0, 3, s).astype(np.float32) for k, s in shapes.items()}
    prior = {k: rng.uniform(size=s) > 0.2 for k, s in shapes.items()}
    allowed = {
        k: rng.uniform(size=s) > 0.3 if k == "a1" else np.ones(s, bool) for k, s in shapes.items()
    }
    names = sorted(tree)

    @jax.jit
    def select(scores, prior, sparsity):
        return fo.select(
            scores,
            sparsity,
            pattern=fo.Unstructured(scope),
            prunable=lambda p, x: jnp.asarray(allowed[p[0].key]) if p[0].key == "a1" else True,
            mask=prior,
        )

    for sparsity in [0.1, 0.45, 0.9]:
        got = select(as_jnp(tree), as_jnp(prior), jnp.float32(sparsity))
        if scope == "global":
            want = ref_prune(
                [tree[k] for k in names],
                sparsity,
                [prior[k] for k in names],
                [allowed[k] for k in names],
            )
            # What the prior mask pruned stays pruned, prunable or not.
            prior_pruned = np.concatenate([~prior[k].ravel() for k in names])
            np.testing.assert_array_equal(flat_pruned(got, names), want | prior_pruned)
        else:
            for k in names:
                want = ref_prune([tree[k]], sparsity, [prior[k]], [allowed[k]])
                want |= ~prior[k].ravel()
                np.testing.assert_array_equal(~np.asarray(got[k]).ravel(), want, err_msg=k)


def _loop_equations(jaxpr) -> int:
    """The number of equations inside loop bodies (the counting passes), at any depth."""
    total = 0
    for eqn in jaxpr.eqns:
        inside = eqn.primitive.name in ("while", "scan")  # fori_loop with static bounds: scan
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n = _loop_equations(sub)
            total += n + (len(sub.eqns) if inside else 0)
    return total


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_traced_selection_does_not_grow_with_the_leaf_count(scope):
    """The counting passes are traced once per shape, not once per leaf: the loop bodies of
    a selection over 16 leaves of one shape are as large as over 2."""

    def loops(n):
        tree = {f"w{i:02d}": jnp.ones((8, 8)) for i in range(n)}
        jaxpr = jax.make_jaxpr(lambda t: fo.select(t, 0.5, pattern=fo.Unstructured(scope)))(tree)
        return _loop_equations(jaxpr.jaxpr)

    assert loops(16) == loops(2) > 0


def _primitives(jaxpr) -> list[str]:
    """The primitive of every equation, at any depth."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names += _primitives(sub)
    return names


@pytest.mark.parametrize("n", [1, 3, 16, 17, 40])
def test_unstack_returns_the_entries_without_a_slice_per_entry(n):
    """A batch of masks goes back to its leaves by a tree of variadic reductions (identical
    kernels on each level), not by one slice per leaf: the entries come back exactly."""
    rng = np.random.default_rng(n)
    masks = jnp.asarray(rng.uniform(size=(n, 3, 5)) > 0.5)
    keys = jnp.asarray(rng.integers(0, 2**32, (n, 2), dtype=np.uint32))
    for x in (masks, keys):
        got = jax.jit(select_mod._unstack)(x)
        assert len(got) == n
        for g, want in zip(got, np.asarray(x), strict=True):
            np.testing.assert_array_equal(np.asarray(g), want)
    prims = _primitives(jax.make_jaxpr(select_mod._unstack)(masks).jaxpr)
    if n > 1:
        assert "slice" not in prims and "reduce" in prims


def test_selection_is_one_loop_with_ties_inside_it():
    """The threshold and the tie-break are one loop of phases (a scan of passes inside it),
    traced once: one branch inside picks the key's or the index's digits; no second
    selection."""
    scores = {"a": jnp.ones((4, 8)), "b": jnp.ones((4, 8)), "c": jnp.ones(5)}
    prims = _primitives(jax.make_jaxpr(lambda s: fo.select(s, 0.5))(scores).jaxpr)
    assert (prims.count("while"), prims.count("scan"), prims.count("cond")) == (1, 1, 1)


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize(
    "shapes",
    [[(3, 4), (3, 4), (1, 7)], [(3, 4), (5, 2)]],
    ids=["batched-turns-of-one-loop", "alone-unrolled"],
)
@SETTINGS
@given(
    st.integers(0, 2**31 - 1),
    st.floats(0, 1),
    st.floats(0, 1),
    st.booleans(),
    st.sampled_from(["global", "layer"]),
)
def test_stages_match_sequential_sort_references(path, shapes, seed, s1, s2, with_prior, scope):
    """Stages ranked in one selection prune what the stages taken one by one prune: each
    stage under the mask the one before left, with ties, a prior mask and an element-wise
    prunable flag."""
    rng = np.random.default_rng(seed)
    first = {f"l{i}": rng.integers(-3, 4, size=s).astype(np.float32) for i, s in enumerate(shapes)}
    names = list(first)
    second = {k: rng.integers(-2, 3, size=v.shape).astype(np.float32) for k, v in first.items()}
    prior = {k: rng.uniform(size=v.shape) > 0.3 for k, v in first.items()} if with_prior else None
    allowed = {k: rng.uniform(size=v.shape) > 0.2 for k, v in first.items()}
    with selection_path(path):
        mask = _select_stages(
            fo.Unstructured(scope),
            [(as_jnp(first), s1), (as_jnp(second), s2)],
            prunable=as_jnp(allowed),
            mask=None if prior is None else as_jnp(prior),
        )
    groups = [names] if scope == "global" else [[k] for k in names]
    for group in groups:
        keep = [np.ones(first[k].shape, bool) if prior is None else prior[k] for k in group]
        for tree, s in ((first, s1), (second, s2)):
            pruned = ref_prune([tree[k] for k in group], s, keep, [allowed[k] for k in group])
            keep = [
                ~p.reshape(kp.shape) & kp
                for p, kp in zip(
                    np.split(pruned, np.cumsum([kp.size for kp in keep])[:-1]), keep, strict=True
                )
            ]
        for k, want in zip(group, keep, strict=True):
            np.testing.assert_array_equal(np.asarray(mask[k]), want, err_msg=k)


def test_stages_are_turns_of_one_selection_loop():
    """Two stages trace one selection loop (a loop over the stages around it), not two."""
    scores = {"a": jnp.ones((4, 8)), "b": jnp.ones((4, 8)), "c": jnp.ones(5)}
    prims = _primitives(
        jax.make_jaxpr(lambda x, y: _select_stages(fo.Unstructured(), [(x, 0.3), (y, 0.6)]))(
            scores, scores
        ).jaxpr
    )
    assert (prims.count("while"), prims.count("scan"), prims.count("cond")) == (1, 2, 1)


def test_negative_zero_ties_with_zero_and_infinities_rank():
    scores = {"w": jnp.array([[0.0, -0.0, jnp.inf, -jnp.inf, 1.0, -1.0]])}
    mask = fo.select(scores, 3 / 6)
    # -inf, -1, then the first of the tied zeros (index 0; -0.0 at index 1 is its equal).
    np.testing.assert_array_equal(mask["w"], [[False, True, True, False, True, False]])


def test_sparsity_zero_and_one():
    scores = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    assert bool(jnp.all(fo.select(scores, 0.0)["w"]))
    full = fo.select(scores, 1.0)
    assert not bool(jnp.any(full["w"]))
    assert bool(jnp.all(full["b"]))  # not prunable: ndim 1


def test_prunable_predicate_gets_key_path_and_leaf():
    seen = []

    def only_kernels(path, leaf):
        seen.append((jax.tree_util.keystr(path), leaf.shape))
        return jax.tree_util.keystr(path).endswith("['kernel']")

    params = {"dense": {"kernel": jnp.arange(4.0).reshape(2, 2), "bias": jnp.arange(2.0)}}
    params["emb"] = jnp.arange(4.0).reshape(2, 2)
    mask = fo.magnitude_mask(params, 0.5, prunable=only_kernels)
    assert ("['dense']['kernel']", (2, 2)) in seen and ("['dense']['bias']", (2,)) in seen
    np.testing.assert_array_equal(mask["dense"]["kernel"], [[False, False], [True, True]])
    assert bool(jnp.all(mask["emb"])) and bool(jnp.all(mask["dense"]["bias"]))


def test_prunable_bool_pytree_per_leaf_and_per_element():
    params = {"a": jnp.arange(1.0, 5.0), "b": jnp.arange(1.0, 5.0).reshape(2, 2)}
    mask = fo.magnitude_mask(params, 0.5, prunable={"a": True, "b": False})
    np.testing.assert_array_equal(mask["a"], [False, False, True, True])
    assert bool(jnp.all(mask["b"]))
    elem = {"a": jnp.array([False, True, True, True]), "b": jnp.zeros((2, 2), bool)}
    mask = fo.magnitude_mask(params, 2 / 3, prunable=elem)
    # 3 prunable entries, 2 pruned: the smallest allowed ones (2.0, 3.0); 1.0 is protected.
    np.testing.assert_array_equal(mask["a"], [True, False, False, True])
    want = ref_prune([np.arange(1.0, 5.0), np.ones((2, 2))], 2 / 3, allowed=[elem["a"], False])
    np.testing.assert_array_equal(flat_pruned(mask, ["a", "b"]), want)


def test_no_prunable_leaf_gives_all_true():
    mask = fo.magnitude_mask({"b": jnp.ones(3)}, 0.5)
    assert bool(jnp.all(mask["b"]))


def test_flax_nnx_state_params():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = fo.magnitude_mask(params, 0.5)
    kernel = np.asarray(params["kernel"][...])
    want = ref_prune([np.abs(kernel)], 0.5)
    np.testing.assert_array_equal(~np.asarray(mask["kernel"][...]).ravel(), want)
    assert bool(jnp.all(mask["bias"][...]))
    pruned = fo.apply_mask(params, mask)
    assert float(jnp.sum(pruned["kernel"][...] == 0)) == 16


# ------------------------------------------------------------------------------------------
# Under jit


def test_topk_under_jit_matches_eager_and_compiles_once():
    rng = np.random.default_rng(1)
    scores = {
        "a": jnp.asarray(rng.integers(0, 5, (7, 9)).astype(np.float32)),
        "b": jnp.asarray(rng.standard_normal((4, 3, 2)).astype(np.float32)),
    }
    traces = []

    @jax.jit
    def f(scores, sparsity):
        traces.append(1)
        return fo.select(scores, sparsity)

    for s in [0.1, 0.37, 0.5, 0.93]:
        got = f(scores, jnp.float32(s))
        want = fo.select(scores, float(jnp.float32(s)))
        for k in scores:
            np.testing.assert_array_equal(got[k], want[k])
    assert len(traces) == 1


def test_traced_sparsity_is_clipped():
    scores = {"w": jnp.arange(4.0).reshape(2, 2)}
    m = jax.jit(fo.select)(scores, jnp.float32(1.5))
    assert not bool(jnp.any(m["w"]))


def test_nan_under_jit_ranks_above_every_number():
    scores = {"w": jnp.array([[jnp.nan, 1.0, jnp.inf, 0.0]])}
    m = jax.jit(lambda s: fo.select(s, 0.75))(scores)
    np.testing.assert_array_equal(m["w"], [[True, False, False, False]])


def test_flat_index_and_keys_are_order_preserving():
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
    keys = np.asarray(select_mod.float_keys(jnp.asarray(x)))
    assert np.all(np.diff(keys.astype(np.int64)) >= 0)
    assert keys[3] == keys[4]
    idx = np.asarray(select_mod.flat_index((2, 3, 4), jnp.uint32(5)))
    np.testing.assert_array_equal(idx, np.arange(24).reshape(2, 3, 4) + 5)


_ROUND = jax.jit(jax.vmap(select_mod.round_product))


@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1))
def test_traced_target_is_exact_round_half_even(seed):
    rng = np.random.default_rng(seed)
    s = np.concatenate(
        [
            rng.uniform(size=200).astype(np.float32),
            (rng.integers(0, 64, 200) / 64).astype(np.float32),  # exact halves happen
            np.float32([0.0, 1.0, 0.7, 1e-30, 1e-45]),
        ]
    )
    n = np.concatenate([rng.integers(0, 2**31 - 1, 200), rng.integers(0, 200, 205)])
    got = np.asarray(_ROUND(jnp.asarray(s), jnp.asarray(n.astype(np.int32))))
    want = [round(Fraction(float(a)) * int(b)) for a, b in zip(s, n, strict=True)]
    np.testing.assert_array_equal(got, want)
    # float32(0.7) * 45 rounds to 31.5 in float32, but the exact product is below 31.5.
    assert int(select_mod.round_product(jnp.float32(0.7), jnp.int32(45))) == 31


_JIT_SELECT = jax.jit(
    lambda sc, sp, m, a, scope: fo.select(
        sc, sp, pattern=fo.Unstructured(scope), mask=m, prunable=a
    ),
    static_argnames="scope",
)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.floats(0, 1), st.sampled_from(["global", "layer"]))
def test_host_selection_equals_the_jitted_kernel(seed, sparsity, scope):
    """Eager calls on concrete CPU arrays select in NumPy; they give the jitted masks exactly:
    ties, -0.0, subnormals (ranked as zero), +-inf, a prior mask, element-wise prunable."""
    rng = np.random.default_rng(seed)
    shapes = {"a": (6, 9), "b": (40,), "c": (2, 3, 5)}
    special = np.float32([0.0, -0.0, 1e-40, -1e-42, np.inf, -np.inf, 1.0, -1.0])
    tree = {k: rng.choice(special, size=s) for k, s in shapes.items()}
    tree["a"] = rng.standard_normal(shapes["a"]).astype(np.float32)
    prior = {k: rng.uniform(size=s) > 0.25 for k, s in shapes.items()}
    allow = {k: rng.uniform(size=s) > 0.1 for k, s in shapes.items()}
    scores, prior_j, allow_j = as_jnp(tree), as_jnp(prior), as_jnp(allow)
    s32 = float(np.float32(sparsity))
    host = fo.select(scores, s32, pattern=fo.Unstructured(scope), mask=prior_j, prunable=allow_j)
    device = _JIT_SELECT(scores, jnp.float32(s32), prior_j, allow_j, scope)
    for k in shapes:
        assert isinstance(host[k], jax.Array) and host[k].dtype == jnp.bool_
        np.testing.assert_array_equal(np.asarray(host[k]), np.asarray(device[k]))
    # Subnormals rank as zero on both paths: their ties go by flat index, as zeros do.
    keys = np.asarray(select_mod.float_keys(jnp.asarray(special)))
    np.testing.assert_array_equal(select_mod.float_keys_host(special), keys)
    assert keys[0] == keys[1] == keys[2] == keys[3]


def test_recomputed_keys_give_the_numpy_masks(monkeypatch):
    """Above STORED_KEYS_MAX every phase recomputes the keys from the scores (and the
    tie-break receives the scores): the same masks as the NumPy path, ties, prior masks,
    element-wise prunable and layer groups included."""
    monkeypatch.setattr(select_mod, "STORED_KEYS_MAX", 0)
    jax.clear_caches()  # the selection's inner jit caches its trace
    try:
        select = jax.jit(
            lambda sc, sp, m, a, scope: fo.select(
                sc, sp, pattern=fo.Unstructured(scope), mask=m, prunable=a
            ),
            static_argnames="scope",
        )
        for seed, scope in [(0, "global"), (1, "layer"), (2, "global")]:
            rng = np.random.default_rng(seed)
            shapes = {"a": (6, 9), "b": (40,), "c": (2, 3, 5)}
            tree = {k: rng.integers(-3, 4, s).astype(np.float32) for k, s in shapes.items()}
            tree["a"] = rng.standard_normal(shapes["a"]).astype(np.float32)
            prior = as_jnp({k: rng.uniform(size=s) > 0.25 for k, s in shapes.items()})
            allow = as_jnp({k: rng.uniform(size=s) > 0.1 for k, s in shapes.items()})
            scores = as_jnp(tree)
            for sparsity in (0.3, 0.8):
                host = fo.select(
                    scores, sparsity, pattern=fo.Unstructured(scope), mask=prior, prunable=allow
                )
                device = select(scores, jnp.float32(sparsity), prior, allow, scope)
                for k in shapes:
                    np.testing.assert_array_equal(np.asarray(host[k]), np.asarray(device[k]))
    finally:
        jax.clear_caches()


def test_jitted_selection_with_an_empty_leaf_and_ties_matches_numpy():
    """Empty leaves take part in the tie-break (their rows are counted too): no rows, or
    rows of no entries (a zero-size count; this failed before 2026-12-03)."""
    tree = {
        "a": np.zeros((0, 5), np.float32),
        "b": np.ones((7, 3), np.float32),
        "c": np.zeros((3, 0, 2), np.float32),
        "d": np.zeros((0,), np.float32),  # a 1-D empty leaf (ZeroDivisionError before)
    }
    every = lambda path, leaf: True
    host = fo.select(tree, 0.3, prunable=every)
    device = jax.jit(lambda t: fo.select(t, 0.3, prunable=every))(as_jnp(tree))
    for k in tree:
        np.testing.assert_array_equal(np.asarray(host[k]), np.asarray(device[k]))
    assert int((~np.asarray(device["b"])).sum()) == 6  # round(0.3 * 21)


def test_eager_small_masks_compile_nothing(caplog):
    """A first eager magnitude_mask on concrete CPU params compiles no XLA computation."""
    params = {"w": jnp.asarray(np.arange(-6.0, 6.0, dtype=np.float32).reshape(3, 4) + 0.5)}
    params["b"] = jnp.zeros(3)
    fisher = {"w": jnp.ones((3, 4)), "b": jnp.ones(3)}
    jax.block_until_ready((params, fisher))
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        mask = fo.magnitude_mask(params, 0.5)
        two = fo.two_stage_mask(params, 0.5, fisher=fisher, magnitude_fraction=1.0)
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == [], compiled
    np.testing.assert_array_equal(np.abs(np.asarray(params["w"])) > 3.0, np.asarray(mask["w"]))
    np.testing.assert_array_equal(np.asarray(two["w"]), np.asarray(mask["w"]))
    assert bool(jnp.all(mask["b"]))


def test_count_matches_numpy_sum():
    rng = np.random.default_rng(0)
    for shape in [(), (7,), (3, 300), (2, 256), (4, 1000), (2, 257 * 3), (2, 70001), (70001,)]:
        pred = rng.uniform(size=shape) < 0.9
        assert int(select_mod.count(jnp.asarray(pred))) == int(pred.sum())


# ------------------------------------------------------------------------------------------
# magnitude, fisher, two-stage, random


@SETTINGS
@given(score_trees(ties=False), st.floats(0, 1), st.sampled_from(["fisher", "saliency"]))
def test_fisher_and_saliency_selection_matches_reference(data, sparsity, criterion):
    params, rng = data
    names = list(params)
    fisher = {k: rng.uniform(size=v.shape).astype(np.float32) for k, v in params.items()}
    mask = fo.select(fo.scores(as_jnp(params), criterion, fisher=as_jnp(fisher)), sparsity)
    if criterion == "fisher":
        score = [fisher[k] for k in names]
    else:
        score = [np.float32(0.5) * fisher[k] * params[k] ** 2 for k in names]
    np.testing.assert_array_equal(flat_pruned(mask, names), ref_prune(score, sparsity))


@pytest.mark.parametrize("path", ["host", "device"])
@SETTINGS
@given(
    score_trees(),
    st.floats(0, 1),
    st.floats(0, 1),
    st.sampled_from(["fisher", "saliency"]),
    st.sampled_from(["global", "layer"]),
)
def test_two_stage_matches_brute_force(path, data, share, s, criterion, scope):
    params, rng = data
    names = list(params)
    fisher = {k: rng.integers(0, 3, size=v.shape).astype(np.float32) for k, v in params.items()}
    with selection_path(path):
        mask = fo.two_stage_mask(
            as_jnp(params),
            s,
            fisher=as_jnp(fisher),
            magnitude_fraction=share,
            criterion=criterion,
            pattern=fo.Unstructured(scope),
        )
    ms = np.float32(share) * np.float32(s)  # the stage-one target, formed in float32
    groups = [names] if scope == "global" else [[k] for k in names]
    for group in groups:
        w = np.concatenate([params[k].ravel() for k in group])
        f = np.concatenate([fisher[k].ravel() for k in group])
        n, idx = w.size, np.arange(w.size)
        # Stage 1: by |w|; stage 2: among survivors by the criterion, to round(s * n) in all.
        k1 = k_of(ms, n)
        order1 = np.lexsort((idx, np.abs(w)))
        pruned = np.zeros(n, bool)
        pruned[order1[:k1]] = True
        score = f if criterion == "fisher" else np.float32(0.5) * f * w * w
        survivors = np.flatnonzero(~pruned)
        order2 = survivors[np.lexsort((survivors, score[survivors]))]
        pruned[order2[: max(k_of(s, n) - k1, 0)]] = True
        got = np.concatenate([~np.asarray(mask[k]).ravel() for k in group])
        np.testing.assert_array_equal(got, pruned)


def test_magnitude_mask_matches_reference_layer_scope():
    rng = np.random.default_rng(3)
    params = {
        "a": rng.standard_normal((5, 5)).astype(np.float32),
        "b": rng.standard_normal((3, 8)).astype(np.float32),
    }
    mask = fo.magnitude_mask(as_jnp(params), 0.4, pattern=fo.Unstructured("layer"))
    for k, v in params.items():
        np.testing.assert_array_equal(~np.asarray(mask[k]).ravel(), ref_prune([np.abs(v)], 0.4))


def test_random_scores_select_an_exact_count_deterministic_and_key_dependent():
    params = {"a": jnp.zeros((20, 10)), "b": jnp.zeros((5, 4)), "bias": jnp.zeros(7)}
    m1 = fo.select(fo.scores(params, "random", key=jax.random.key(0)), 0.33)
    m2 = fo.select(fo.scores(params, "random", key=jax.random.key(0)), 0.33)
    m3 = fo.select(fo.scores(params, "random", key=jax.random.key(1)), 0.33)
    assert int(sum((~m).sum() for k, m in m1.items() if k != "bias")) == round(0.33 * 220)
    assert bool(jnp.all(m1["bias"]))
    assert all(bool(jnp.array_equal(m1[k], m2[k])) for k in params)
    assert not bool(jnp.array_equal(m1["a"], m3["a"]))
    layer = fo.select(
        fo.scores(params, "random", key=jax.random.key(0)), 0.33, pattern=fo.Unstructured("layer")
    )
    assert int((~layer["a"]).sum()) == 66 and int((~layer["b"]).sum()) == 7


def test_apply_mask_and_sparsity_report():
    params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.arange(2.0)}
    mask = {"w": jnp.array([[True, False, True], [False, False, True]]), "b": jnp.array([1, 0]) > 0}
    out = fo.apply_mask(params, mask)
    np.testing.assert_array_equal(out["w"], [[1.0, 0.0, 3.0], [0.0, 0.0, 6.0]])
    np.testing.assert_array_equal(out["b"], [0.0, 0.0])
    rep = fo.sparsity_report(mask)
    assert isinstance(rep, fo.SparsityReport)
    assert rep.pruned == 3 and rep.prunable == 6 and rep.sparsity == 0.5
    assert rep.leaves["['b']"] == fo.LeafSparsity(sparsity=0.5, pruned=1, size=2, prunable=0)
    assert list(rep.leaves) == ["['b']", "['w']"]
    rep_all = fo.sparsity_report(mask, prunable=lambda path, leaf: True)
    assert rep_all.pruned == 4 and rep_all.prunable == 8


# ------------------------------------------------------------------------------------------
# Eager and jitted counts agree (the float32 value of the sparsity, rounded exactly)


@pytest.mark.parametrize(("n", "s"), [(10, 0.65), (10, 0.45), (45, 0.3)])
def test_eager_and_jit_prune_the_same_count_issue_cases(n, s):
    scores = {"w": jnp.arange(float(n)).reshape(1, n)}
    eager = int((~fo.select(scores, s)["w"]).sum())
    jitted = int((~jax.jit(fo.select)(scores, jnp.float32(s))["w"]).sum())
    assert eager == jitted == k_of(s, n)


_JIT_TOPK_PRUNABLE = jax.jit(lambda sc, x, a: fo.select(sc, x, prunable=a))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(1, 64), st.floats(0, 1))
def test_eager_and_jit_prune_the_same_count(n, s):
    # One layout for every n (the first n entries prunable): one compile for all examples.
    scores = {"w": np.zeros((1, 64), np.float32)}
    scores["w"][0, :n] = np.arange(n)
    allowed = {"w": np.arange(64).reshape(1, 64) < n}
    eager = fo.select(scores, s, prunable=allowed)["w"]
    jitted = _JIT_TOPK_PRUNABLE(scores, jnp.float32(s), allowed)["w"]
    np.testing.assert_array_equal(eager, jitted)
    assert int((~eager).sum()) == k_of(s, n)


def test_traced_nan_sparsity_prunes_nothing_and_large_is_clipped():
    scores = {"w": jnp.arange(4.0).reshape(2, 2)}
    assert bool(jnp.all(jax.jit(fo.select)(scores, jnp.float32(jnp.nan))["w"]))
    assert not bool(jnp.any(jax.jit(fo.select)(scores, jnp.float32(1.5))["w"]))


# ------------------------------------------------------------------------------------------
# Per-leaf sparsity


PER_LEAF = {
    "a": np.random.default_rng(5).standard_normal((6, 7)).astype(np.float32),
    "b": np.random.default_rng(6).standard_normal((4, 5)).astype(np.float32),
    "c": np.random.default_rng(7).standard_normal((3, 3)).astype(np.float32),
    "bias": np.ones(3, np.float32),
}


def _check_per_leaf(mask, targets):
    for name, s in targets.items():
        want = ref_prune([np.abs(PER_LEAF[name])], s)
        np.testing.assert_array_equal(~np.asarray(mask[name]).ravel(), want)
    assert bool(jnp.all(mask["bias"]))


def test_per_leaf_pytree_targets_are_met_exactly():
    params = as_jnp(PER_LEAF)
    targets = {"a": 0.3, "b": 0.75, "c": 0.0, "bias": 0.5}  # bias: not prunable (ndim 1)
    mask = fo.magnitude_mask(params, targets)
    _check_per_leaf(mask, {"a": 0.3, "b": 0.75, "c": 0.0})
    # The same under jit with traced per-leaf targets.
    traced = jax.tree.map(jnp.float32, targets)
    jm = jax.jit(fo.magnitude_mask)(params, traced)
    for k in params:
        np.testing.assert_array_equal(jm[k], mask[k])


def test_per_leaf_mapping_by_path_and_predicate():
    params = as_jnp(PER_LEAF)
    mask = fo.magnitude_mask(params, {"['a']": 0.5, lambda p, x: x.shape == (4, 5): 0.2})
    _check_per_leaf(mask, {"a": 0.5, "b": 0.2, "c": 0.0})  # unmatched leaves: 0
    # The mapping composes with two_stage and a prior mask.
    fisher = jax.tree.map(lambda x: jnp.abs(x) + 1.0, params)
    m2 = fo.two_stage_mask(params, {"['a']": 0.5}, fisher=fisher, mask=mask)
    assert int((~m2["a"]).sum()) == k_of(0.5, 42) and int((~m2["b"]).sum()) == 4


def test_per_leaf_errors():
    params = as_jnp(PER_LEAF)
    with pytest.raises(ValueError, match=r"sparsity names the path \"\['z'\]\""):
        fo.magnitude_mask(params, {"['z']": 0.5})
    with pytest.raises(ValueError, match=r"gives the leaf at \['a'\] two targets"):
        fo.magnitude_mask(params, {"['a']": 0.5, lambda p, x: x.ndim == 2: 0.1})
    with pytest.raises(ValueError, match=r"sparsity at \['b'\] must be a finite number in"):
        fo.magnitude_mask(params, {"a": 0.1, "b": 1.5, "bias": 0.0, "c": 0.0})
    with pytest.raises(ValueError, match=r"sparsity does not match the structure of the params"):
        fo.magnitude_mask(params, {"a": 0.1, "b": 0.5})
    with pytest.raises(TypeError, match=r"a sparsity key must accept 2 positional arguments"):
        fo.magnitude_mask(params, {lambda p: True: 0.5})


def ref_erk(shapes, sparsity, power=1.0):
    """ERK by water-filling: densities min(1, eps * raw), eps found by bisection."""
    n = np.array([np.prod(s) for s in shapes], float)
    raw = np.array([sum(s) / np.prod(s) for s in shapes]) ** power
    budget = (1 - sparsity) * n.sum()
    lo, hi = 0.0, 1.0 / raw.min() + 1.0
    for _ in range(200):
        eps = (lo + hi) / 2
        lo, hi = (eps, hi) if (np.minimum(1, eps * raw) * n).sum() < budget else (lo, eps)
    return 1 - np.minimum(1, eps * raw)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_erk_matches_water_filling_reference(sparsity):
    # LeNet-5-like shapes: conv kernels (HWIO) and dense layers; conv1 goes dense at high S.
    shapes = [(5, 5, 1, 20), (5, 5, 20, 50), (800, 500), (500, 10)]
    params = {f"l{i}": jnp.zeros(s) for i, s in enumerate(shapes)} | {"bias": jnp.zeros(10)}
    got = fo.erk_sparsity(params, sparsity)
    assert got["bias"] == 0.0
    np.testing.assert_allclose(
        [got[f"l{i}"] for i in range(4)], ref_erk(shapes, sparsity), atol=1e-9
    )
    n = np.array([np.prod(s) for s in shapes])
    kept = sum((1 - got[f"l{i}"]) * n[i] for i in range(4))
    assert kept == pytest.approx((1 - sparsity) * n.sum(), rel=1e-9, abs=1e-6)
    if sparsity != 0.9:
        return
    # The targets are met exactly, leaf by leaf (one value: each layout compiles anew).
    mask = fo.magnitude_mask(params, got)
    for i, s in enumerate(shapes):
        assert int((~mask[f"l{i}"]).sum()) == k_of(got[f"l{i}"], int(np.prod(s)))


def test_erk_power_scale_zero_is_uniform_and_uniform_sparsity():
    params = {"a": jnp.zeros((10, 10)), "b": jnp.zeros((30, 40)), "bias": jnp.zeros(3)}
    erk0 = fo.erk_sparsity(params, 0.8, power_scale=0.0)
    assert erk0["a"] == pytest.approx(0.8) and erk0["b"] == pytest.approx(0.8)
    assert fo.uniform_sparsity(params, 0.8) == {"a": 0.8, "b": 0.8, "bias": 0.0}
    with pytest.raises(ValueError, match=r"sparsity must be a finite number in \[0.0, 1.0\]"):
        fo.erk_sparsity(params, 1.2)
    uni = fo.magnitude_mask(params, fo.uniform_sparsity(params, 0.37))
    lay = fo.magnitude_mask(params, 0.37, pattern=fo.Unstructured("layer"))
    for k in params:
        np.testing.assert_array_equal(uni[k], lay[k])


# ------------------------------------------------------------------------------------------
# Errors, each by its message


def test_error_sparsity_out_of_range_or_nan():
    with pytest.raises(ValueError, match=r"sparsity must be a finite number in \[0.0, 1.0\]"):
        fo.select({"w": jnp.ones((2, 2))}, 1.5)
    with pytest.raises(ValueError, match=r"sparsity must be a finite number.*got -0.1"):
        fo.magnitude_mask({"w": jnp.ones((2, 2))}, -0.1)
    with pytest.raises(ValueError, match=r"sparsity must be a finite number.*got nan"):
        fo.magnitude_mask({"w": jnp.ones((2, 2))}, float("nan"))
    with pytest.raises(TypeError, match=r"sparsity must be a real number, got True"):
        fo.magnitude_mask({"w": jnp.ones((2, 2))}, True)


def test_error_nan_scores_name_the_leaf():
    with pytest.raises(ValueError, match=r"scores at \['w'\] hold NaN"):
        fo.select({"w": jnp.array([[1.0, jnp.nan]])}, 0.5)
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"fisher at \['w'\] holds 4 non-finite value"):
        fo.select(fo.scores(params, "fisher", fisher={"w": jnp.full((2, 2), jnp.nan)}), 0.5)
    with pytest.raises(ValueError, match=r"params at \['w'\] holds 1 non-finite value"):
        fo.magnitude_mask({"w": jnp.array([[1.0, jnp.inf]])}, 0.5)


def test_error_negative_fisher():
    params = {"w": jnp.ones((2, 2))}
    neg = {"w": jnp.array([[1.0, -0.5], [0.2, 0.3]])}
    with pytest.raises(ValueError, match=r"fisher at \['w'\] holds 1 negative value"):
        fo.select(fo.scores(params, "fisher", fisher=neg), 0.5)
    with pytest.raises(ValueError, match=r"fisher at \['w'\] holds 1 negative value"):
        fo.two_stage_mask(params, 0.5, fisher=neg)


def test_error_unknown_scope_and_criterion():
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"scope must be one of: 'global'.*Got 'model'"):
        fo.select(params, 0.5, pattern=fo.Unstructured("model"))
    with pytest.raises(ValueError, match=r"criterion must be one of: 'fisher'.*Got 'hessian'"):
        fo.two_stage_mask(params, 0.5, fisher=params, criterion="hessian")
    with pytest.raises(ValueError, match=r"criterion must be one of: 'fisher'.*Got 'random'"):
        fo.two_stage_mask(params, 0.5, fisher=params, criterion="random")


def test_callable_criterion_in_two_stage_mask():
    params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    fisher = {"w": jnp.array([[4.0, 3.0], [2.0, 1.0]])}
    neg = lambda p, f: {"w": -p["w"]}
    m = fo.two_stage_mask(params, 0.5, fisher=fisher, magnitude_fraction=0.0, criterion=neg)
    np.testing.assert_array_equal(m["w"], [[True, True], [False, False]])


def test_error_fisher_tree_mismatch_names_first_path():
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((3, 3))}
    with pytest.raises(ValueError, match=r"fisher at \['b'\] has shape \(3, 2\)"):
        fo.select(
            fo.scores(params, "fisher", fisher={"a": jnp.ones((2, 2)), "b": jnp.ones((3, 2))}), 0.5
        )
    with pytest.raises(ValueError, match=r"leaf 1 is at \['c'\] in fisher but at \['b'\]"):
        fo.two_stage_mask(params, 0.5, fisher={"a": jnp.ones((2, 2)), "c": jnp.ones((3, 3))})


def test_error_mask_mismatch_and_dtype():
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"mask at \['w'\] has shape \(4,\)"):
        fo.magnitude_mask(params, 0.5, mask={"w": jnp.ones(4, bool)})
    for bad in (jnp.ones((2, 2)), jnp.array([[0, 2], [1, 1]])):
        with pytest.raises(TypeError, match=r"mask at \['w'\] has dtype .*a mask holds booleans"):
            fo.magnitude_mask(params, 0.5, mask={"w": bad})
        with pytest.raises(TypeError, match=r"mask at \['w'\] has dtype .*a mask holds booleans"):
            fo.apply_mask(params, {"w": bad})
    with pytest.raises(TypeError, match="a mask holds booleans"):
        fo.sparsity_report({"w": jnp.ones((2, 2))})


def test_error_magnitude_fraction_out_of_range():
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"magnitude_fraction must be a finite number in \[0.0"):
        fo.two_stage_mask(params, 0.5, fisher=params, magnitude_fraction=1.5)


def test_prunable_predicate_may_return_arrays_and_mappings_name_leaves():
    """A predicate may answer per weight (a bool array shaped like the leaf) or per leaf (a
    bool or a 0-d bool array); a mapping flags the leaves it names, the others are not
    prunable."""
    params = {"b": jnp.arange(1.0, 5.0), "w": jnp.arange(1.0, 5.0).reshape(2, 2)}
    upper = lambda p, x: jnp.arange(x.size).reshape(x.shape) >= x.size // 2
    m = fo.magnitude_mask(params, 0.5, prunable=upper)  # 2 of 3, 4, 3, 4: the two 3s
    np.testing.assert_array_equal(m["b"], [True, True, False, True])
    np.testing.assert_array_equal(m["w"], [[True, True], [False, True]])
    m = fo.magnitude_mask(params, 0.5, prunable=lambda p, x: jnp.asarray(x.ndim == 1))
    np.testing.assert_array_equal(m["b"], [False, False, True, True])
    assert bool(jnp.all(m["w"]))
    m = fo.magnitude_mask(params, 0.25, prunable={"['b']": True})
    np.testing.assert_array_equal(m["b"], [False, True, True, True])
    assert bool(jnp.all(m["w"]))


def test_error_bad_prunable():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    with pytest.raises(
        TypeError, match=r"prunable\(path, leaf\) at \['b'\] must be a bool or a bool array"
    ):
        fo.magnitude_mask(params, 0.5, prunable=lambda p, x: 1)
    with pytest.raises(TypeError, match=r"prunable\[\"\['w'\]\"\] must be a bool or a bool array"):
        fo.magnitude_mask(params, 0.5, prunable={"['w']": jnp.ones(3, bool)})
    with pytest.raises(
        TypeError, match=r"prunable must accept 2 positional arguments: prunable\(path, leaf\)"
    ):
        fo.magnitude_mask(params, 0.5, prunable=lambda leaf: leaf.ndim > 1)
    with pytest.raises(ValueError, match=r"prunable does not match.*\['b'\]"):
        fo.magnitude_mask(params, 0.5, prunable={"w": True, "x": False})
    with pytest.raises(TypeError, match=r"prunable at \['w'\] must be a bool"):
        fo.magnitude_mask(params, 0.5, prunable={"w": jnp.ones(3, bool), "b": False})


def test_error_complex_scores_and_key():
    with pytest.raises(TypeError, match="scores must be real numbers"):
        fo.select({"w": jnp.ones((2, 2), jnp.complex64)}, 0.5)
    with pytest.raises(TypeError, match=r"key must be a jax\.random key"):
        fo.select(fo.scores({"w": jnp.ones((2, 2))}, "random", key=3), 0.5)


_RADIX = jax.jit(
    select_mod.radix_select,
    static_argnames=("keys_of", "groups", "n_groups", "offsets", "index_bytes", "step_bits"),
)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.booleans())
def test_radix_select_finds_the_target_th_entry_by_key_then_flat_index(seed, ties):
    """Per group, the target-th smallest entry in the order (key, flat index), against a
    NumPy lexicographic sort, whether a pass counts one candidate (the sharded path) or
    three (variadic), for single arrays and a batch of leaves with their own groups and
    offsets. The index is resolved only where a group has more entries at its threshold
    than it may prune; otherwise it is 2**32 - 1 and the counts are those of the keys."""
    rng = np.random.default_rng(seed)
    shapes = [(37, 5), (300,), (), (4, 3, 700), (3, 6, 2)]  # the last one: a batch of 3
    keys = [
        rng.integers(0, 8, s).astype(np.uint32) * np.uint32(2**29)
        if ties
        else rng.integers(0, 2**32, s, dtype=np.uint32)
        for s in shapes
    ]
    groups = (0, 1, 0, 1, (0, 1, 0))
    sizes = [int(np.prod(s)) for s in shapes[:4]] + [12, 12, 12]
    leaf_groups = [0, 1, 0, 1, 0, 1, 0]
    leaf_keys = [np.ravel(k) for k in keys[:4]] + [np.ravel(k) for k in keys[4]]
    offsets, seen = [], [0, 0]
    for g, n in zip(leaf_groups, sizes, strict=True):
        offsets.append(seen[g])
        seen[g] += n
    # One ordered list of (key, flat index) per group.
    flat = [
        sorted(
            (int(k), o + j)
            for k, o, h in zip(leaf_keys, offsets, leaf_groups, strict=True)
            if h == g
            for j, k in enumerate(k)
        )
        for g in (0, 1)
    ]
    targets = np.array([rng.integers(0, len(f) + 1) for f in flat], np.int32)
    unit_offsets = (*offsets[:4], tuple(offsets[4:]))
    for step_bits in (1, 2):
        t_key, t_index, below, upto = _RADIX(
            list,
            [jnp.asarray(k) for k in keys],
            groups=groups,
            n_groups=2,
            targets=jnp.asarray(targets),
            offsets=unit_offsets,
            index_bytes=2,
            step_bits=step_bits,
        )
        resolved = any(
            sum(k == f[t - 1][0] for k, _ in f) > t - sum(k < f[t - 1][0] for k, _ in f)
            for f, t in zip(flat, targets, strict=True)
            if t
        )
        for g in (0, 1):
            t, f = int(targets[g]), flat[g]
            if t == 0:
                assert (int(t_key[g]), int(below[g])) == (0, 0), (step_bits, g)
                continue
            want_key, want_index = f[t - 1]
            assert int(t_key[g]) == want_key, (step_bits, g)
            if resolved:
                assert int(t_index[g]) == want_index, (step_bits, g)
                assert (int(below[g]), int(upto[g])) == (t - 1, t), (step_bits, g)
            else:
                assert int(t_index[g]) == 2**32 - 1, (step_bits, g)
                assert int(below[g]) == sum(k < want_key for k, _ in f), (step_bits, g)
                assert int(upto[g]) == sum(k <= want_key for k, _ in f) == t, (step_bits, g)


def test_count_many_matches_numpy_for_every_rank_and_long_rows():
    rng = np.random.default_rng(3)
    for shape in [(), (7,), (5, 9), (2, 3, 4), (2, 70000)]:
        preds = [jnp.asarray(rng.random(shape) < p) for p in (0.1, 0.5, 0.9)]
        got = np.asarray(jax.jit(select_mod.count_many)(preds))
        np.testing.assert_array_equal(got, [int(np.sum(np.asarray(p))) for p in preds])


@pytest.mark.parametrize("with_mask", [False, True])
def test_compiled_selection_stores_nothing_score_sized_above_the_threshold(with_mask, monkeypatch):
    """Above STORED_KEYS_MAX the jitted selection keeps no per-score temporaries (keys are
    recomputed in each phase, the digits live in the output's buffer): XLA:CPU allocates
    temporaries afresh at every call, and at 1e8 scores faulting in the ~8 bytes per score
    the earlier kernel stored cost more than the counting. Below it the keys are stored
    (faster there: benchmarks/bench_select.py --keys). Shapes only: nothing runs."""
    shapes = {"a": (600, 1000), "b": (300, 1000), "c": (100_000,), "d": (3, 3, 16, 64)}
    scores = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    mask = {k: jax.ShapeDtypeStruct(s, jnp.bool_) for k, s in shapes.items()}
    n = sum(math.prod(s) for s in shapes.values())
    every = lambda path, leaf: True  # the 1-D leaf too

    def temp_bytes(cap):
        monkeypatch.setattr(select_mod, "STORED_KEYS_MAX", cap)
        jax.clear_caches()  # the selection's inner jit caches its trace
        if with_mask:
            fn = jax.jit(lambda s, m: fo.select(s, 0.9, mask=m, prunable=every)).lower(scores, mask)
        else:
            fn = jax.jit(lambda s: fo.select(s, 0.9, prunable=every)).lower(scores)
        analysis = fn.compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    try:
        assert temp_bytes(n - 1) < n / 8
        assert 4 * n <= temp_bytes(n) < 5 * n  # the keys, stored
    finally:
        jax.clear_caches()


def test_what_the_earlier_mask_prunes_stays_pruned_outside_the_prunable_weights():
    """A prior mask's pruning in a leaf not ranked (a bias) or at an entry not prunable stays:
    masks only grow (it was undone before). The target counts prunable weights only."""
    scores = {"b": np.array([1.0, 2.0, 3.0], np.float32), "w": np.arange(1.0, 7.0).reshape(2, 3)}
    prior = {"b": np.array([False, True, True]), "w": np.array([[True] * 3, [False, True, True]])}
    allow = {"b": False, "w": np.array([[True] * 3, [False, True, True]])}
    # None: 6 prunable, (1, 0) pruned before, 3 in all. allow: 5 prunable, 2 (2.5 rounded
    # half to even) and (1, 0), not prunable, still pruned. The same mask either way.
    want_w = np.array([[False, False, True], [False, True, True]])
    for prunable in (None, allow):
        f = lambda s, p, prunable=prunable: fo.select(s, 0.5, mask=p, prunable=prunable)
        for got in (f(scores, prior), jax.jit(f)(as_jnp(scores), as_jnp(prior))):
            np.testing.assert_array_equal(np.asarray(got["b"]), prior["b"])
            np.testing.assert_array_equal(np.asarray(got["w"]), want_w)


def test_per_leaf_resolver_forms_and_messages():
    """The one resolver of per-leaf specs (prunable, sparsity, and quantize's quantizable
    and axis): default, predicate, pytree and mapping, with the messages of each."""
    tree = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
    kw = {"name": "axis", "default": lambda p, x: x.ndim, "missing": None, "plural": "axes"}
    assert per_leaf(None, tree, **kw) == [2, 1]
    assert per_leaf(lambda p, x: p[-1].key, tree, **kw) == ["a", "b"]
    assert per_leaf({"a": 0, "b": -1}, tree, **kw) == [0, -1]
    assert per_leaf({"['b']": -1}, tree, **kw) == [None, -1]
    assert per_leaf({lambda p, x: x.ndim == 2: 1}, tree, **kw) == [1, None]
    seen = []
    check = lambda v, where, path, leaf: seen.append(where) or v
    per_leaf({"['a']": 0, lambda p, x: x.ndim == 1: 1}, tree, check=check, **kw)
    per_leaf({"a": 0, "b": 0}, tree, check=check, **kw)
    assert seen[0] == "axis[\"['a']\"]" and seen[1].startswith("axis['<lambda>']")
    assert seen[2:] == ["axis at ['a']", "axis at ['b']"]
    with pytest.raises(ValueError, match=r"axis names the path \"\['c'\]\", which the params"):
        per_leaf({"['c']": 0}, tree, **kw)
    with pytest.raises(ValueError, match=r"axis gives the leaf at \['a'\] two axes"):
        per_leaf({"['a']": 0, lambda p, x: True: 1}, tree, **kw)
    with pytest.raises(TypeError, match=r"an axis mapping is keyed by path strings"):
        per_leaf({"['a']": 0, 3: 1}, tree, **kw)
    with pytest.raises(TypeError, match=r"an axis key must accept 2 positional arguments"):
        per_leaf({lambda p: True: 1}, tree, **kw)
    with pytest.raises(ValueError, match=r"axis does not match the structure of the params"):
        per_leaf({"a": 0}, tree, **kw)
    with pytest.raises(ValueError, match=r"axis has a leaf at \['c'\] that the params lack"):
        per_leaf({"a": 0, "b": 0, "c": 0}, tree, **kw)
