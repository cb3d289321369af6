"""allocate_bits, quantize and dequantize against NumPy references and brute force."""

import itertools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import kmeans1d
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fisher_optax import QuantizedParams, allocate_bits, dequantize, quantize
from fisher_optax.quantize import _quantize_leaves

SHAPES = {"dense": {"kernel": (12, 8), "bias": (8,)}, "out": [(8, 3)]}


def _tree(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": rng.normal(size=SHAPES["dense"]["kernel"]).astype(dtype),
            "bias": rng.normal(size=SHAPES["dense"]["bias"]).astype(dtype),
        },
        "out": [rng.laplace(size=SHAPES["out"][0]).astype(dtype)],
    }


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _check_invariants(q, params, bits_tree, mask_tree=None):
    """Codes index codebooks, <= 2^b values per group, pruned exactly 0, same tree."""
    deq = dequantize(q)
    assert jax.tree.structure(deq) == jax.tree.structure(params)
    p_leaves, d_leaves = _leaves(params), jax.tree.leaves(deq)
    b_leaves = _leaves(bits_tree)
    m_leaves = _leaves(mask_tree) if mask_tree is not None else [None] * len(p_leaves)
    for i, (p, d, b, m) in enumerate(zip(p_leaves, d_leaves, b_leaves, m_leaves, strict=True)):
        assert d.dtype == p.dtype and d.shape == p.shape
        d = np.asarray(d)
        kept = b > 0 if m is None else (b > 0) & m
        np.testing.assert_array_equal(d[~kept], 0)
        np.testing.assert_array_equal(np.asarray(q.bits[i]), np.where(kept, b, 0))
        codes = np.asarray(q.codes[i])
        for width, book in zip(q.widths[i], q.codebooks[i], strict=True):
            sel = kept & (b == width)
            assert book.shape == (2**width,)
            assert np.all((codes[sel] >= 0) & (codes[sel] < 2**width))
            np.testing.assert_array_equal(d[sel], np.asarray(book).astype(p.dtype)[codes[sel]])
            assert len(np.unique(d[sel])) <= 2**width


def test_kmeans_codebook_is_the_optimal_one_per_group():
    params = _tree(0)
    q = quantize(params, 2)
    for p, d in zip(_leaves(params), jax.tree.leaves(dequantize(q)), strict=True):
        _, centroids = kmeans1d.cluster(p.ravel().astype(np.float64), 4)
        c = np.sort(centroids)
        opt = np.sum(np.min((p.ravel()[:, None] - c[None, :]) ** 2, axis=1))
        np.testing.assert_allclose(np.sum((p - np.asarray(d)) ** 2), opt, rtol=1e-4)


def _uniform_reference(x, b):
    """Affine uniform quantization with 2^b levels from min to max, in NumPy."""
    lo, hi = x.min(), x.max()
    step = (hi - lo) / (2**b - 1)
    return lo + step * np.clip(np.round((x - lo) / step), 0, 2**b - 1)


def test_uniform_matches_numpy_reference():
    params = _tree(1)
    q = quantize(params, 3, method="uniform")
    for p, d in zip(_leaves(params), jax.tree.leaves(dequantize(q)), strict=True):
        np.testing.assert_allclose(np.asarray(d), _uniform_reference(p, 3), rtol=1e-5, atol=1e-6)


def test_kmeans_beats_uniform_and_fisher_weighting_pays_in_the_fisher_metric():
    params = _tree(2)
    rng = np.random.default_rng(3)
    fisher = jax.tree.map(lambda p: rng.gamma(0.3, size=p.shape).astype(np.float32), params)

    def err(q, weighted):
        tot = 0.0
        deq = jax.tree.leaves(dequantize(q))
        for p, d, f in zip(_leaves(params), deq, _leaves(fisher), strict=True):
            tot += np.sum((f if weighted else 1.0) * (p - np.asarray(d)) ** 2)
        return tot

    plain, uniform = quantize(params, 2), quantize(params, 2, method="uniform")
    weighted = quantize(params, 2, fisher=fisher)
    assert err(plain, False) < err(uniform, False)
    assert err(weighted, True) < err(plain, True)


def test_bits_tree_from_allocate_bits_with_mask():
    params = _tree(4)
    fisher = jax.tree.map(lambda p: np.exp(3 * p).astype(np.float32), params)
    mask = jax.tree.map(lambda p: np.abs(p) > 0.3, params)
    bits = allocate_bits(fisher, bit_widths=(4, 2, 1), mask=mask)
    q = quantize(params, bits, fisher=fisher, mask=mask, init="density")
    _check_invariants(q, params, bits, mask)
    assert {w for ws in q.widths for w in ws} <= {1, 2, 4}


def test_original_dtypes_come_back():
    params = _tree(5, dtype=jnp.bfloat16)
    q = quantize(params, 4, init="density")
    assert all(d.dtype == jnp.bfloat16 for d in jax.tree.leaves(dequantize(q)))
    _check_invariants(q, params, jax.tree.map(lambda p: np.full(p.shape, 4), params))


def test_quantized_params_is_a_pytree():
    q = quantize(_tree(6), 2, init="density")
    leaves, treedef = jax.tree.flatten(q)
    q2 = jax.tree.unflatten(treedef, leaves)
    assert isinstance(q2, QuantizedParams) and q2.paths == q.paths
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
    assert any(".codebooks" in p for p in paths)


def test_jit_and_no_recompile():
    q = quantize(_tree(7), 2, init="density")
    eager = dequantize(q)
    jitted = jax.jit(dequantize)(q)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    before = _quantize_leaves._cache_size()
    quantize(_tree(8), 2, init="density")  # new values, same shapes and widths
    assert _quantize_leaves._cache_size() == before


_BITS = st.sampled_from([0, 1, 2, 3])


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kernel_bits=hnp.arrays(np.int32, SHAPES["dense"]["kernel"], elements=_BITS),
    mask_kernel=hnp.arrays(np.bool_, SHAPES["dense"]["kernel"]),
)
def test_property_invariants(seed, kernel_bits, mask_kernel):
    # Widths 1..3 in every leaf (so the compiled plan is shared), values and masks random.
    params = _tree(seed)
    widths = np.array([1, 2, 3])
    bits = {
        "dense": {"kernel": kernel_bits, "bias": np.tile(widths, 3)[:8]},
        "out": [np.resize(widths, SHAPES["out"][0])],
    }
    bits["dense"]["kernel"].flat[:3] = widths  # every width present in the kernel too
    mask = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    mask["dense"]["kernel"] = mask_kernel
    q = quantize(params, bits, mask=mask, init="density")
    _check_invariants(q, params, bits, mask)


def _brute_force_allocation(counts, widths, budget):
    """Best monotone map rank -> width by exhaustive search (ties: lexicographic max)."""
    best = None
    for row in itertools.product(sorted(widths, reverse=True), repeat=len(counts)):
        if any(row[i] < row[i + 1] for i in range(len(row) - 1)):
            continue
        mean = np.dot(row, counts) / np.sum(counts)
        if mean <= budget + 1e-9 and (best is None or (mean, row) > best):
            best = (mean, row)
    return best


def test_allocate_bits_ranks_by_fisher_and_prunes():
    rng = np.random.default_rng(9)
    fisher = jax.tree.map(lambda p: rng.lognormal(0, 3, p.shape).astype(np.float32), _tree(9))
    mask = jax.tree.map(lambda f: rng.random(f.shape) > 0.3, fisher)
    bits = allocate_bits(fisher, mask=mask)
    f = np.concatenate([x.ravel() for x in _leaves(fisher)])
    b = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(bits)])
    m = np.concatenate([x.ravel() for x in _leaves(mask)])
    np.testing.assert_array_equal(b[~m], 0)
    kept_order = np.argsort(f[m])
    assert np.all(np.diff(b[m][kept_order]) >= 0)  # more Fisher, never fewer bits
    assert set(np.unique(b[m])) == {2, 4, 6, 8}
    assert jax.tree.structure(bits) == jax.tree.structure(fisher)


@pytest.mark.parametrize("budget", [2.0, 3.1, 4.0, 5.5, 8.0])
def test_allocate_bits_budget_equals_brute_force(budget):
    rng = np.random.default_rng(10)
    fisher = jax.tree.map(lambda p: rng.lognormal(0, 3, p.shape).astype(np.float32), _tree(10))
    widths = (8, 6, 4, 2)
    free = allocate_bits(fisher, bit_widths=widths)
    b = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(free)])
    counts = np.array([np.sum(b == w) for w in sorted(widths, reverse=True)])
    mean, row = _brute_force_allocation(counts, widths, budget)
    got = allocate_bits(fisher, bit_widths=widths, average_bits=budget)
    g = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(got)])
    np.testing.assert_allclose(g.mean(), mean, rtol=1e-6)
    assert g.mean() <= budget + 1e-6
    # Same groups, widths given by the brute-force row.
    np.testing.assert_array_equal(g, np.select([b == w for w in (8, 6, 4, 2)], row))


def test_allocate_bits_layer_scope_groups_each_leaf():
    fisher = {"a": np.geomspace(1e-8, 1e-6, 40), "b": np.geomspace(1.0, 1e2, 40)}
    glob = allocate_bits(fisher, bit_widths=(4, 2))
    layer = allocate_bits(fisher, bit_widths=(4, 2), scope="layer")
    assert set(np.unique(glob["a"])) == {2} and set(np.unique(glob["b"])) == {4}
    assert set(np.unique(layer["a"])) == {2, 4} and set(np.unique(layer["b"])) == {2, 4}


def test_allocate_bits_under_jit():
    fisher = jax.tree.map(lambda p: np.exp(p).astype(np.float32), _tree(11))
    eager = allocate_bits(fisher, bit_widths=(4, 2))
    jitted = jax.jit(lambda f: allocate_bits(f, bit_widths=(4, 2), average_bits=3.0))(fisher)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert np.all(np.asarray(b) <= np.asarray(a))  # the budget only takes bits away


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: quantize(p, 0), ValueError, r"bits .* must be an int in 1\.\.16"),
        (lambda p: quantize(p, 17), ValueError, r"must be an int in 1\.\.16"),
        (lambda p: quantize(p, True), ValueError, r"must be an int in 1\.\.16"),
        (
            lambda p: quantize(p, jax.tree.map(lambda x: np.full(x.shape, 17), p)),
            ValueError,
            r"must be 0 \(pruned\) or in 1\.\.16, got 17",
        ),
        (
            lambda p: quantize(p, jax.tree.map(lambda x: np.full(x.shape, 2.0), p)),
            TypeError,
            "must be an integer array",
        ),
        (lambda p: quantize(p, {"dense": p["dense"]}), ValueError, r"bits has no leaf at"),
        (
            lambda p: quantize(p, 2, mask={**p, "out": [np.ones((3, 8), bool)]}),
            ValueError,
            r"mask at \['out'\]\[0\] has shape \(3, 8\)",
        ),
        (lambda p: quantize(p, 2, fisher={"x": 1.0}), ValueError, "fisher does not match"),
        (lambda p: quantize(p, 2, method="lloyd"), ValueError, "method must be one of"),
        (
            lambda p: quantize({"n": np.arange(3)}, 2),
            TypeError,
            "only float leaves can be quantized",
        ),
        (lambda p: allocate_bits(p, bit_widths=(8, 0)), ValueError, r"in 1\.\.16"),
        (lambda p: allocate_bits(p, bit_widths=(4, 4)), ValueError, "must be distinct"),
        (lambda p: allocate_bits(p, scope="leaf"), ValueError, "scope must be one of"),
        (lambda p: allocate_bits(p, average_bits=1.5), ValueError, "below the smallest width"),
        (
            lambda p: allocate_bits(p, mask={"dense": p["dense"]}),
            ValueError,
            "mask has no leaf at",
        ),
        (lambda p: dequantize(p), TypeError, "expected the QuantizedParams"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(_tree(12))


def test_traced_bits_are_refused():
    params = _tree(13)
    bits = jax.tree.map(lambda p: np.full(p.shape, 2), params)
    with pytest.raises(TypeError, match=r"bits at .* is traced"):
        jax.jit(lambda b: quantize(params, b).codes)(bits)
