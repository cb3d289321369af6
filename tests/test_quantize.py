"""allocate_bits, quantize and dequantize against NumPy references and brute force."""

import itertools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import kmeans1d
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fisher_optax import QuantizedParams, allocate_bits, dequantize, fisher_from_state, quantize
from fisher_optax.quantize import _budget_widths

SHAPES = {"dense": {"kernel": (12, 8), "bias": (8,)}, "out": [(8, 3)]}
EVERY = lambda path, leaf: True  # quantize every leaf (biases too)


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


def _inertia(x, c, w=None):
    x = np.asarray(x, np.float64).ravel()
    c = np.sort(np.asarray(c, np.float64))
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64).ravel()
    return float(np.sum(w * np.min((x[:, None] - c[None, :]) ** 2, axis=1)))


def _check_invariants(q, params, bits_tree, mask_tree=None, exact_size=True):
    """The documented structure: bits, smallest code dtype, trimmed books, exact zeros."""
    deq = dequantize(q)
    assert jax.tree.structure(deq) == jax.tree.structure(params)
    p_leaves, d_leaves = _leaves(params), jax.tree.leaves(deq)
    b_leaves = _leaves(bits_tree)
    m_leaves = _leaves(mask_tree) if mask_tree is not None else [None] * len(p_leaves)
    for i, (p, d, b, m) in enumerate(zip(p_leaves, d_leaves, b_leaves, m_leaves, strict=True)):
        assert d.dtype == p.dtype and d.shape == p.shape
        d = np.asarray(d)
        if not q.quantized[i]:  # stored as it is
            assert q.bits[i] is None and q.codes[i] is None and q.codebooks[i] == {}
            np.testing.assert_array_equal(d, p)
            continue
        kept = b > 0 if m is None else (b > 0) & m
        np.testing.assert_array_equal(d[~kept], 0)
        assert q.bits[i].dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(q.bits[i]), np.where(kept, b, 0))
        codes = np.asarray(q.codes[i])
        assert codes.dtype == (np.uint8 if max(q.widths[i], default=0) <= 8 else np.uint16)
        assert q.widths[i] == tuple(sorted(np.unique(b[kept]).tolist()))
        for width, book in q.codebooks[i].items():
            sel = kept & (b == width)
            distinct = len(np.unique(p[sel]))
            size = min(2**width, distinct)
            assert book.shape == (size,) if exact_size else 0 < book.shape[0] <= size
            assert np.all(np.diff(np.asarray(book, np.float64)) > 0)  # ascending, each used
            assert np.all(codes[sel] < len(book))
            np.testing.assert_array_equal(d[sel], np.asarray(book).astype(p.dtype)[codes[sel]])


def test_kmeans_codebook_is_the_optimal_one_per_group():
    params = _tree(0)
    q = quantize(params, 2, quantizable=EVERY)
    for p, d in zip(_leaves(params), jax.tree.leaves(dequantize(q)), strict=True):
        _, centroids = kmeans1d.cluster(p.ravel().astype(np.float64), 4)
        opt = _inertia(p, centroids)
        np.testing.assert_allclose(np.sum((p - np.asarray(d)) ** 2), opt, rtol=1e-5)


def test_weighted_kmeans_matches_brute_force_optimum():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    f = rng.gamma(0.5, size=x.shape).astype(np.float32)
    q = quantize({"w": x}, 2, fisher={"w": f})
    d = np.asarray(dequantize(q)["w"])
    # Brute force over every split of the 18 sorted values into 4 contiguous clusters.
    order = np.argsort(x.ravel())
    xs, ws = x.ravel()[order].astype(np.float64), f.ravel()[order].astype(np.float64)
    best = np.inf
    for cuts in itertools.combinations(range(1, 18), 3):
        tot = 0.0
        for a, b in zip((0, *cuts), (*cuts, 18), strict=True):
            c = np.sum(ws[a:b] * xs[a:b]) / np.sum(ws[a:b])
            tot += np.sum(ws[a:b] * (xs[a:b] - c) ** 2)
        best = min(best, tot)
    np.testing.assert_allclose(np.sum(f * (x - d) ** 2), best, rtol=1e-5)


def _uniform_reference(x, b):
    """Affine uniform quantization with 2^b levels from min to max, in NumPy."""
    lo, hi = x.min(), x.max()
    step = (hi - lo) / (2**b - 1)
    return lo + step * np.clip(np.round((x - lo) / step), 0, 2**b - 1)


def test_uniform_matches_numpy_reference():
    params = _tree(1)
    q = quantize(params, 3, method="uniform", quantizable=EVERY)
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


@pytest.mark.parametrize("init", ["linear", "quantile", "density"])
def test_every_init_is_a_sound_codebook(init):
    params = _tree(4)
    q = quantize(params, 3, init=init, quantizable=EVERY)
    bits = jax.tree.map(lambda p: np.full(p.shape, 3), params)
    _check_invariants(q, params, bits, exact_size=False)  # a start may leave a cluster empty
    best = quantize(params, 3, quantizable=EVERY)  # "dp"
    for p, d, b in zip(
        _leaves(params),
        jax.tree.leaves(dequantize(q)),
        jax.tree.leaves(dequantize(best)),
        strict=True,
    ):
        assert np.sum((p - d) ** 2) >= np.sum((p - b) ** 2) * (1 - 1e-6)


def test_bits_tree_from_allocate_bits_with_mask():
    params = _tree(4)
    fisher = jax.tree.map(lambda p: np.exp(3 * p).astype(np.float32), params)
    mask = jax.tree.map(lambda p: np.abs(p) > 0.3, params)
    bits = allocate_bits(params, fisher=fisher, bit_widths=(4, 2, 1), mask=mask)
    assert not np.any(np.asarray(bits["dense"]["bias"]))  # not quantizable: no bits
    q = quantize(params, bits, fisher=fisher, mask=mask)
    _check_invariants(q, params, bits, mask)
    assert {w for ws in q.widths for w in ws} <= {1, 2, 4}


def test_original_dtypes_come_back():
    params = _tree(5, dtype=jnp.bfloat16)
    q = quantize(params, 4, quantizable=EVERY)
    assert all(d.dtype == jnp.bfloat16 for d in jax.tree.leaves(dequantize(q)))
    _check_invariants(q, params, jax.tree.map(lambda p: np.full(p.shape, 4), params))


def test_codebook_has_min_2b_m_entries_and_codes_use_the_smallest_dtype():
    x = np.array([[0.5, 0.5, -1.0, 2.0, 2.0, 0.5]], np.float32)
    q = quantize({"w": x}, 4)
    np.testing.assert_array_equal(q.codebooks[0][4], [-1.0, 0.5, 2.0])  # 3 < 2^4 values
    assert q.codes[0].dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(dequantize(q)["w"]), x)
    wide = quantize({"w": np.linspace(-1, 1, 600, dtype=np.float32).reshape(2, 300)}, 9)
    assert wide.codes[0].dtype == np.uint16 and len(wide.codebooks[0][9]) == 512


def test_whole_model_state_keeps_non_quantized_leaves_exactly():
    rng = np.random.default_rng(6)
    variables = {
        "params": {"conv": rng.normal(size=(3, 3, 2, 4)).astype(np.float32), "bias": np.ones(4)},
        "batch_stats": {"mean": rng.normal(size=4), "var": np.arange(4.0)},
        "step": np.int32(7),
        "flag": np.array([True, False]),
    }
    q = quantize(variables, 2)
    # Flattening order: mean, var, flag, bias, conv, step; only the conv kernel is coded.
    assert q.quantized == (False, False, False, False, True, False)
    out = dequantize(q)
    for path in (("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var")):
        a, b = variables[path[0]][path[1]], out[path[0]][path[1]]
        assert np.asarray(b).dtype == a.dtype
        np.testing.assert_array_equal(np.asarray(b), a)
    assert out["step"] == 7 and out["flag"].dtype == bool
    assert len(np.unique(np.asarray(out["params"]["conv"]))) <= 4


def test_quantizable_predicate_and_bool_tree():
    params = _tree(7)
    only_out = quantize(params, 2, quantizable=lambda path, leaf: path[0].key == "out")
    assert only_out.quantized == (False, False, True)
    tree = {"dense": {"kernel": False, "bias": True}, "out": [False]}
    assert quantize(params, 2, quantizable=tree).quantized == (True, False, False)


def test_zero_fisher_leaf_is_unweighted_kmeans():
    # An optimizer that updates only the kernels: no second moment for the rest, read
    # with missing=0.0. The zero-Fisher leaf must be clustered unweighted, not collapsed.
    params = _tree(8)
    labels = {"dense": {"kernel": "adam", "bias": "adam"}, "out": ["sgd"]}
    opt = optax.multi_transform({"adam": optax.adam(1e-2), "sgd": optax.sgd(1e-2)}, labels)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: np.ones_like(p), params)
    _, state = opt.update(grads, state, params)
    fisher = fisher_from_state(state, missing=0.0, params=params)
    assert not np.any(np.asarray(fisher["out"][0]))
    weighted = dequantize(quantize(params, 2, fisher=fisher))
    plain = dequantize(quantize(params, 2))
    np.testing.assert_array_equal(np.asarray(weighted["out"][0]), np.asarray(plain["out"][0]))
    assert len(np.unique(np.asarray(weighted["out"][0]))) == 4


def test_zero_fisher_cluster_is_centred_on_its_unweighted_mean():
    x = np.array([[-5.0, -4.0, 0.0, 0.1, 3.0, 3.2]], np.float32)
    f = np.array([[0.0, 0.0, 1.0, 1.0, 2.0, 1.0]], np.float32)
    d = np.asarray(dequantize(quantize({"w": x}, 1, fisher={"w": f}))["w"])
    assert np.all(np.isfinite(d))
    assert len(np.unique(d)) == 2  # the zero-weight values do not collapse the codebook


@pytest.mark.parametrize("axis", [None, 0])
def test_zero_fisher_values_take_the_entries_the_others_leave_spare(axis):
    """3 values of positive Fisher and 3 of zero Fisher, 4 entries: the weighted optimum
    (the 3 exactly) leaves one entry spare; it went unused (3 entries, an error of 0.65 on
    a zero-Fisher weight), now it serves the zero-Fisher values (unweighted error 0.30)."""
    w = np.array([[1.062, -0.941, -0.845, 0.408, -0.685, 0.259]], np.float32)
    f = np.array([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]], np.float32)
    q = quantize({"w": w}, 2, fisher={"w": f}, axis=axis)
    d = np.asarray(dequantize(q)["w"])
    assert len(np.unique(d)) == 4
    np.testing.assert_array_equal(d[0, 3:], w[0, 3:])  # the weighted optimum: exact
    assert np.sqrt(np.sum((d - w)[0, :3] ** 2)) < 0.31


def test_quantized_params_is_a_pytree_and_derives_paths():
    q = quantize(_tree(9), 2)
    leaves, treedef = jax.tree.flatten(q)
    q2 = jax.tree.unflatten(treedef, leaves)
    assert isinstance(q2, QuantizedParams) and q2.paths == q.paths
    assert q.paths == ("['dense']['bias']", "['dense']['kernel']", "['out'][0]")
    assert q.shapes == ((8,), (12, 8), (8, 3))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
    assert any(".codebooks" in p for p in paths) and any(".raw" in p for p in paths)


def test_dequantize_under_jit_equals_numpy_and_does_not_recompile():
    q = quantize(_tree(10), 2)
    fn = jax.jit(dequantize)
    for a, b in zip(jax.tree.leaves(dequantize(q)), jax.tree.leaves(fn(q)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fn(jax.tree.map(lambda x: x, q))
    assert fn._cache_size() == 1


_BITS = st.sampled_from([0, 1, 2, 3])


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kernel_bits=hnp.arrays(np.int32, SHAPES["dense"]["kernel"], elements=_BITS),
    mask_kernel=hnp.arrays(np.bool_, SHAPES["dense"]["kernel"]),
)
def test_property_invariants(seed, kernel_bits, mask_kernel):
    params = _tree(seed)
    bits = jax.tree.map(lambda p: np.full(p.shape, 2), params)
    bits["dense"]["kernel"] = kernel_bits
    mask = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    mask["dense"]["kernel"] = mask_kernel
    q = quantize(params, bits, mask=mask, quantizable=EVERY)
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


def _fisher_groups():
    """Four clearly separated log-Fisher groups of sizes 5, 9, 3, 7 (high to low)."""
    rng = np.random.default_rng(11)
    sizes = (5, 9, 3, 7)
    f = np.concatenate(
        [10.0 ** (4 - 3 * g + 0.1 * rng.normal(size=n)) for g, n in enumerate(sizes)]
    )
    perm = rng.permutation(f.size)
    return {"w": f[perm].reshape(4, 6).astype(np.float32)}, np.array(sizes)


def test_allocate_bits_ranks_by_fisher_and_prunes():
    fisher, _ = _fisher_groups()
    params = {"w": np.ones((4, 6), np.float32)}
    mask = {"w": np.asarray(fisher["w"]) > 1e-7}
    bits = np.asarray(allocate_bits(params, fisher=fisher, mask=mask)["w"])
    f = np.asarray(fisher["w"])
    assert np.all(bits[~mask["w"]] == 0)
    order = np.argsort(-f[mask["w"]])
    assert np.all(np.diff(bits[mask["w"]][order]) <= 0)  # more Fisher, never fewer bits
    assert set(np.unique(bits[mask["w"]])) <= {8, 6, 4, 2}


@pytest.mark.parametrize("budget", [2.0, 3.1, 4.0, 5.5, 7.0, 8.0])
def test_allocate_bits_budget_equals_brute_force(budget):
    fisher, sizes = _fisher_groups()
    params = {"w": np.ones((4, 6), np.float32)}
    bits = np.asarray(allocate_bits(params, fisher=fisher, average_bits=budget)["w"])
    f = np.asarray(fisher["w"]).ravel()
    mean, row = _brute_force_allocation(sizes, (8, 6, 4, 2), budget)
    assert np.mean(bits) == pytest.approx(mean)
    rank = np.argsort(np.argsort(-f))  # 0 = highest Fisher
    group = np.searchsorted(np.cumsum(sizes), rank, side="right")
    np.testing.assert_array_equal(bits.ravel(), np.asarray(row)[group])


def test_allocate_bits_layer_scope_groups_each_leaf():
    rng = np.random.default_rng(12)
    fisher = {"a": rng.gamma(1, size=(6, 5)) * 1e3, "b": rng.gamma(1, size=(4, 5)) * 1e-3}
    params = jax.tree.map(np.ones_like, fisher)
    glob = allocate_bits(params, fisher=fisher, bit_widths=(4, 2), scope="global")
    layer = allocate_bits(params, fisher=fisher, bit_widths=(4, 2), scope="layer")
    assert np.all(np.asarray(glob["a"]) == 4) and np.all(np.asarray(glob["b"]) == 2)
    for leaf in ("a", "b"):
        assert set(np.unique(np.asarray(layer[leaf]))) == {2, 4}


def _brute_force_layers(sal, counts, widths, budget):
    best = None
    for row in itertools.product(widths, repeat=len(sal)):
        if np.dot(row, counts) > budget * np.sum(counts) + 1e-9:
            continue
        key = (sum(s * 4.0**-b for s, b in zip(sal, row, strict=True)), np.dot(row, counts))
        if best is None or key < best[0]:
            best = (key, row)
    return best[1]


@pytest.mark.parametrize("seed", range(6))
def test_layer_granularity_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5, 2), (2, 2), (4, 4)]
    params = {f"l{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}
    fisher = {
        k: (rng.gamma(0.5, size=v.shape) * 10.0 ** rng.integers(-3, 3)) for k, v in params.items()
    }
    mask = {k: rng.random(v.shape) < 0.8 for k, v in params.items()}
    budget = float(rng.choice([2.5, 3.0, 4.5, 6.0]))
    bits = allocate_bits(params, fisher=fisher, mask=mask, average_bits=budget, granularity="layer")
    keys = sorted(params)
    sal = [
        float(np.sum(0.5 * fisher[k] * params[k].astype(np.float64) ** 2 * mask[k])) for k in keys
    ]
    counts = [int(mask[k].sum()) for k in keys]
    want = _brute_force_layers(sal, counts, (8, 6, 4, 2), budget)
    for k, b in zip(keys, want, strict=True):
        got = np.asarray(bits[k])
        np.testing.assert_array_equal(got, np.where(mask[k], b, 0))


def _brute_force_layers_with_books(sal, counts, widths, budget, entry_bits):
    best = None
    for row in itertools.product(widths, repeat=len(sal)):
        cost = sum(n * b + entry_bits * min(2**b, n) for n, b in zip(counts, row, strict=True))
        if cost > budget * np.sum(counts) + 1e-9:
            continue
        key = (sum(s * 4.0**-b for s, b in zip(sal, row, strict=True)), cost)
        if best is None or key < best[0]:
            best = (key, row)
    return best[1]


@pytest.mark.parametrize("seed", range(6))
def test_layer_granularity_with_codebook_cost_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    shapes = [(3, 4), (30, 20), (2, 8), (40, 10)]
    params = {f"l{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}
    fisher = {
        k: rng.gamma(0.5, size=v.shape) * 10.0 ** rng.integers(-3, 3) for k, v in params.items()
    }
    mask = {k: rng.random(v.shape) < 0.7 for k, v in params.items()}
    budget = float(rng.choice([3.0, 4.5, 6.0]))
    entry_bits = float(rng.choice([8.0, 40.0]))
    bits = allocate_bits(
        params,
        fisher=fisher,
        mask=mask,
        average_bits=budget,
        granularity="layer",
        entry_bits=entry_bits,
    )
    keys = sorted(params)
    sal = [
        float(np.sum(0.5 * fisher[k] * params[k].astype(np.float64) ** 2 * mask[k])) for k in keys
    ]
    counts = [int(mask[k].sum()) for k in keys]
    want = _brute_force_layers_with_books(sal, counts, (8, 6, 4, 2), budget, entry_bits)
    for k, b in zip(keys, want, strict=True):
        np.testing.assert_array_equal(np.asarray(bits[k]), np.where(mask[k], b, 0))


def test_codebook_cost_takes_bits_from_a_small_salient_leaf():
    params = {"small": np.ones((20, 15), np.float32), "big": np.ones((64, 64), np.float32)}
    fisher = {"small": np.full((20, 15), 1e3), "big": np.full((64, 64), 1.0)}
    free = allocate_bits(params, fisher=fisher, average_bits=3, granularity="layer")
    paid = allocate_bits(params, fisher=fisher, average_bits=3, granularity="layer", entry_bits=40)
    # Without the codebooks in the budget the 300 salient weights get 8 bits (2,400 bits of
    # codes); with them 8 bits also cost 256 entries of 40 bits, more than the budget left.
    assert int(np.asarray(free["small"]).max()) == 8
    assert int(np.asarray(paid["small"]).max()) < 8


def test_codebook_cost_errors_by_message():
    params = {"w": np.ones((4, 4), np.float32)}
    fisher = {"w": np.ones((4, 4))}
    with pytest.raises(ValueError, match="cannot pay for the smallest width"):
        allocate_bits(params, fisher=fisher, average_bits=2, granularity="layer", entry_bits=40)
    with pytest.raises(ValueError, match="entry_bits is read by granularity='layer' or 'channel'"):
        allocate_bits(params, fisher=fisher, average_bits=4, granularity="weight", entry_bits=8)
    with pytest.raises(ValueError, match="entry_bits"):
        allocate_bits(params, fisher=fisher, average_bits=4, granularity="layer", entry_bits=-1)


def test_layer_granularity_gives_more_bits_to_the_salient_layer():
    params = {"hot": np.ones((4, 4), np.float32), "cold": np.ones((4, 4), np.float32)}
    fisher = {"hot": np.full((4, 4), 1e3), "cold": np.full((4, 4), 1e-3)}
    bits = allocate_bits(params, fisher=fisher, average_bits=5, granularity="layer")
    assert np.all(np.asarray(bits["hot"]) == 8) and np.all(np.asarray(bits["cold"]) == 2)


def _bad(p, where, value):
    q = jax.tree.map(np.copy, p)
    leaf = q["dense"]["kernel"]
    leaf.flat[where] = value
    return q


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: quantize(p, 0), ValueError, r"bits \(one int for every weight\) must be"),
        (lambda p: quantize(p, 17), ValueError, r"in 1\.\.16, got 17\. Widths above 16 are not"),
        (lambda p: quantize(p, True), TypeError, r"must be an int in 1\.\.16, got True \(bool"),
        (lambda p: quantize(p, 4.0), TypeError, r"must be an int in 1\.\.16, got 4\.0 \(float"),
        (
            lambda p: allocate_bits(p, fisher=jax.tree.map(np.abs, p), bit_widths=(8, 4.0)),
            TypeError,
            r"every entry of bit_widths must be an int in 1\.\.16, got 4\.0",
        ),
        (
            lambda p: quantize(p, jax.tree.map(lambda x: np.full(x.shape, 17), p)),
            ValueError,
            r"bits at \['dense'\]\['bias'\] must be 0 \(pruned\) or in 1\.\.16, got 17",
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
        (
            lambda p: quantize(p, 2, mask=jax.tree.map(lambda x: np.ones(x.shape), p)),
            TypeError,
            r"mask at \['dense'\]\['bias'\] has dtype float(32|64); a mask holds booleans",
        ),
        (
            lambda p: quantize(p, 2, mask=jax.tree.map(lambda x: np.full(x.shape, 2), p)),
            TypeError,
            "a mask holds booleans",
        ),
        (lambda p: quantize(p, 2, fisher={"x": 1.0}), ValueError, "fisher does not match"),
        (
            lambda p: quantize(p, 2, fisher=jax.tree.map(lambda x: -np.ones_like(x), p)),
            ValueError,
            r"fisher at \['dense'\]\['kernel'\] holds 96 negative",
        ),
        (
            lambda p: quantize(p, 2, fisher=_bad(jax.tree.map(np.ones_like, p), 5, np.inf)),
            ValueError,
            r"fisher at \['dense'\]\['kernel'\] holds 1 non-finite value\(s\) \(first at index "
            r"\(0, 5\)",
        ),
        (
            lambda p: quantize(_bad(p, 3, np.nan), 2),
            ValueError,
            r"params at \['dense'\]\['kernel'\] holds 1 non-finite",
        ),
        (
            lambda p: quantize(_bad(p, 3, np.inf), 2, fisher=jax.tree.map(np.ones_like, p)),
            ValueError,
            r"params at \['dense'\]\['kernel'\] holds 1 non-finite",
        ),
        (lambda p: quantize(p, 2, method="lloyd"), ValueError, "method must be one of"),
        (lambda p: quantize(p, 2, init="kmeans++"), ValueError, "init must be one of"),
        (
            lambda p: quantize({"n": np.arange(6).reshape(2, 3)}, 2, quantizable=EVERY),
            TypeError,
            r"quantizable at \['n'\] selects a leaf of dtype int",
        ),
        (
            lambda p: quantize(p, 2, quantizable=lambda path: True),
            TypeError,
            r"quantizable must accept 2 positional arguments",
        ),
        (
            lambda p: quantize(p, 2, quantizable=lambda path, leaf: leaf.ndim),
            TypeError,
            r"quantizable\(path, leaf\) at \['dense'\]\['bias'\] must be a Python bool",
        ),
        (
            lambda p: quantize(p, 2, quantizable={"dense": True}),
            ValueError,
            "quantizable does not match the structure of the params",
        ),
        (lambda p: allocate_bits(p, fisher=p), ValueError, r"fisher at .* negative"),
        (
            lambda p: allocate_bits(p, fisher=jax.tree.map(np.abs, p), bit_widths=(8, 0)),
            ValueError,
            r"in 1\.\.16",
        ),
        (lambda p: allocate_bits(p, fisher=p, bit_widths=(4, 4)), ValueError, "must be distinct"),
        (lambda p: allocate_bits(p, fisher=p, scope="leaf"), ValueError, "scope must be one of"),
        (
            lambda p: allocate_bits(p, fisher=p, granularity="net"),
            ValueError,
            "granularity must be one of",
        ),
        (
            lambda p: allocate_bits(p, fisher=p, granularity="layer"),
            ValueError,
            "granularity='layer' chooses widths under a budget: pass average_bits",
        ),
        (
            lambda p: allocate_bits(p, fisher=p, average_bits=1.5),
            ValueError,
            "below the smallest width",
        ),
        (
            lambda p: allocate_bits(p, fisher=p, average_bits=True),
            TypeError,
            "average_bits must be a real number",
        ),
        (
            lambda p: allocate_bits(p, fisher=p, mask={"dense": p["dense"]}),
            ValueError,
            "mask has no leaf at",
        ),
        (
            lambda p: allocate_bits(
                _bad(p, 0, np.nan),
                fisher=jax.tree.map(np.abs, p),
                granularity="layer",
                average_bits=4,
            ),
            ValueError,
            r"params at \['dense'\]\['kernel'\] holds 1 non-finite",
        ),
        (lambda p: dequantize(p), TypeError, "expected the QuantizedParams"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(_tree(12))


def test_non_finite_values_outside_the_coded_weights_are_allowed():
    params = _tree(13)
    params["dense"]["bias"][0] = np.nan  # a raw leaf is stored as it is
    params["dense"]["kernel"][0, 0] = np.inf
    mask = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    mask["dense"]["kernel"][0, 0] = False  # ... and a pruned weight becomes exact 0
    fisher = jax.tree.map(lambda p: np.ones(p.shape, np.float32), params)
    fisher["dense"]["kernel"][0, 0] = -1.0
    out = dequantize(quantize(params, 2, mask=mask, fisher=fisher))
    assert np.asarray(out["dense"]["kernel"])[0, 0] == 0
    assert np.isnan(np.asarray(out["dense"]["bias"])[0])


def test_traced_inputs_are_refused():
    params = _tree(14)
    bits = jax.tree.map(lambda p: np.full(p.shape, 2), params)
    with pytest.raises(TypeError, match=r"bits at .* is traced; quantization runs once"):
        jax.jit(lambda b: quantize(params, b).codes)(bits)
    with pytest.raises(TypeError, match=r"params at \['dense'\]\['kernel'\] is traced"):
        jax.jit(lambda p: quantize(p, 2).codes)(params)


# ------------------------------------------------------- per-slice (per-channel) codebooks (E)


def _slice(a, axis, c):
    return np.take(np.asarray(a), c, axis=axis)


def _check_per_slice(q, i, params_leaf, kept, bits, exact_size=True):
    """Row c of each book is slice c's: its values are the slice's dequantized weights."""
    axis = q.axes[i]
    d = np.asarray(jax.tree.leaves(dequantize(q))[i])
    codes = np.asarray(q.codes[i])
    np.testing.assert_array_equal(d[~kept], 0)
    for width, book in q.codebooks[i].items():
        book = np.asarray(book)
        assert book.ndim == 2 and book.shape[0] == params_leaf.shape[axis]
        assert book.shape[1] <= 2**width
        for c in range(book.shape[0]):
            sel = _slice(kept & (bits == width), axis, c)
            if not sel.any():
                continue
            cs = _slice(codes, axis, c)[sel]
            size = cs.max() + 1
            assert np.all(np.diff(book[c, :size].astype(np.float64)) > 0)
            distinct = len(np.unique(_slice(params_leaf, axis, c)[sel]))
            assert size == min(2**width, distinct) if exact_size else size <= distinct
            np.testing.assert_array_equal(book[c, size:], book[c, size - 1])
            np.testing.assert_array_equal(_slice(d, axis, c)[sel], book[c, cs])


@pytest.mark.parametrize("method", ["kmeans", "uniform"])
@pytest.mark.parametrize(("shape", "axis"), [((30, 6), -1), ((30, 6), 0), ((3, 3, 4, 5), -1)])
def test_per_slice_equals_the_per_leaf_path_on_each_slice(method, shape, axis):
    rng = np.random.default_rng(sum(shape))
    w = rng.normal(size=shape).astype(np.float32)
    f = rng.exponential(size=shape).astype(np.float32)
    mask = rng.random(shape) < 0.7
    bits = np.where(rng.random(shape) < 0.5, 2, 3)
    params = {"w": w, "b": np.ones(3, np.float32)}
    q = quantize(
        params,
        {"w": bits, "b": np.zeros(3, int)},
        fisher={"w": f, "b": np.ones(3, np.float32)},
        mask={"w": mask, "b": np.ones(3, bool)},
        method=method,
        axis=axis,
    )
    assert q.axes == (None, axis % len(shape)) and q.quantized == (False, True)
    _check_per_slice(q, 1, w, mask, bits, exact_size=method == "kmeans")
    d = np.asarray(dequantize(q)["w"])
    for c in range(shape[axis]):
        one = {"w": _slice(w, axis, c)[None]}
        qc = quantize(
            one,
            {"w": _slice(bits, axis, c)[None]},
            fisher={"w": _slice(f, axis, c)[None]},
            mask={"w": _slice(mask, axis, c)[None]},
            method=method,
        )
        np.testing.assert_array_equal(np.asarray(dequantize(qc)["w"])[0], _slice(d, axis, c))


@pytest.mark.parametrize("kind", ["normal", "laplace", "pruned"])
def test_per_channel_inertia_is_within_half_a_percent_of_the_exact_optimum(kind):
    rng = np.random.default_rng(5)
    w = getattr(rng, "laplace" if kind == "laplace" else "normal")(size=(300, 16))
    mask = np.abs(w) > 0.5 if kind == "pruned" else np.ones(w.shape, bool)
    q = quantize({"w": w.astype(np.float32)}, 3, mask={"w": mask}, axis=-1)
    d = np.asarray(dequantize(q)["w"], np.float64)
    x = w.astype(np.float32).astype(np.float64)
    for c in range(w.shape[1]):
        sel = mask[:, c]
        _, centroids = kmeans1d.cluster(x[sel, c], 8)
        opt = _inertia(x[sel, c], centroids)
        assert np.sum((x[sel, c] - d[sel, c]) ** 2) <= opt * 1.005 + 1e-12


def test_per_channel_fisher_weighted_inertia_is_the_exact_weighted_optimum():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(40, 5)).astype(np.float32)
    f = rng.gamma(0.5, size=w.shape).astype(np.float32)
    q = quantize({"w": w}, 2, fisher={"w": f}, axis=-1)
    d = np.asarray(dequantize(q)["w"], np.float64)
    for c in range(5):
        x, fw = w[:, c].astype(np.float64), f[:, c].astype(np.float64)
        order = np.argsort(x)
        xs, ws = x[order], fw[order]
        pw, ps, pq = (np.concatenate([[0], np.cumsum(v)]) for v in (ws, ws * xs, ws * xs * xs))
        t, j = np.meshgrid(np.arange(41), np.arange(41), indexing="ij")
        with np.errstate(divide="ignore", invalid="ignore"):
            cost = np.where(
                pw[j] > pw[t], pq[j] - pq[t] - (ps[j] - ps[t]) ** 2 / (pw[j] - pw[t]), 0
            )
        cost = np.where(t <= j, np.maximum(cost, 0), np.inf)
        best = cost[0]
        for _ in range(3):
            best = np.min(best[:, None] + cost, axis=0)
        np.testing.assert_allclose(np.sum(fw * (x - d[:, c]) ** 2), best[40], rtol=1e-5)


def test_per_channel_dequantize_under_jit_equals_numpy_and_does_not_recompile():
    q = quantize(_tree(11), 3, axis=-1)
    fn = jax.jit(lambda q: dequantize(q))  # a cache of its own
    for a, b in zip(jax.tree.leaves(dequantize(q)), jax.tree.leaves(fn(q)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fn(jax.tree.map(lambda x: x, q))
    assert fn._cache_size() == 1
    assert "per slice of axis 1" in repr(q)


def test_axis_mapping_by_path_and_predicate():
    params = _tree(12)
    q = quantize(params, 2, axis={"['dense']['kernel']": -1})
    assert q.axes == (None, 1, None)
    q = quantize(params, 2, axis={lambda path, leaf: leaf.shape == (8, 3): 0})
    assert q.axes == (None, None, 0)
    q = quantize(params, 2, axis=0)  # an int applies to every quantized leaf only
    assert q.axes == (None, 0, 0)
    per_leaf = quantize(params, 2)
    assert per_leaf.axes == (None, None, None)


@pytest.mark.parametrize(
    ("axis", "error", "match"),
    [
        (2, ValueError, r"axis=2 is out of range for the leaf at \['dense'\]\['kernel'\]"),
        (-3, ValueError, r"axis=-3 is out of range"),
        ("out", TypeError, "axis must be None, an int or a mapping"),
        (1.0, TypeError, "axis must be None, an int or a mapping"),
        ({"['dense']['kernel']": True}, TypeError, r"axis for \['dense'\]\['kernel'\] must be"),
        ({"['nope']": -1}, ValueError, r"axis names the path .*nope.*, which the params do not"),
        ({"['dense']['bias']": 0}, ValueError, "which quantize stores raw"),
        ({3: 0}, TypeError, "keyed by path strings or predicates"),
        (
            {"['out'][0]": 0, (lambda p, x: x.ndim == 2): -1},
            ValueError,
            r"gives the leaf at \['out'\]\[0\] two axes",
        ),
    ],
)
def test_axis_errors(axis, error, match):
    params = _tree(13)
    before = jax.tree.map(np.copy, params)
    with pytest.raises(error, match=match):
        quantize(params, 2, axis=axis)
    for a, b in zip(_leaves(params), _leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def _brute_force_units(sal, counts, widths, budget, entry_bits=0.0):
    cap = budget * sum(counts) * (1 + 1e-12)
    best = None
    for combo in itertools.product(widths, repeat=len(sal)):
        bits = sum(n * b + entry_bits * min(2**b, n) for n, b in zip(counts, combo, strict=True))
        if bits <= cap:
            est = sum(s * 4.0**-b for s, b in zip(sal, combo, strict=True))
            if best is None or est < best:
                best = est
    return best


@pytest.mark.parametrize("seed", range(8))
def test_channel_granularity_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(5, 4)) * rng.lognormal(0, 1.5, size=4)  # channels of unequal scale
    v = rng.normal(size=(3, 2))
    f = {"w": rng.exponential(size=w.shape), "v": rng.exponential(size=v.shape)}
    mask = {"w": rng.random(w.shape) < 0.8, "v": np.ones(v.shape, bool)}
    mask["w"][:, 0] = False  # an empty channel: no kept weight, no width
    params = {"w": w.astype(np.float32), "v": v.astype(np.float32)}
    widths = tuple(sorted(rng.choice([1, 2, 3, 4, 6, 8], size=3, replace=False), reverse=True))
    budget = float(rng.uniform(min(widths), max(widths)))
    # w per output channel (axis -1), v as one unit (its axis None).
    axis = {"['w']": -1, "['v']": None}
    bits = allocate_bits(
        params,
        fisher=f,
        mask=mask,
        granularity="channel",
        axis=axis,
        bit_widths=widths,
        average_bits=budget,
    )
    bw, bv = np.asarray(bits["w"]), np.asarray(bits["v"])
    np.testing.assert_array_equal(bw == 0, ~mask["w"])
    assert len(np.unique(bv)) == 1
    # Independent reference: saliency per unit by a NumPy loop, brute force over widths.
    units, counts, chosen = [], [], []
    x32 = {k: np.asarray(p, np.float64) for k, p in params.items()}
    for c in range(1, 4):
        sel = mask["w"][:, c]
        units.append(float(np.sum(0.5 * f["w"][sel, c] * x32["w"][sel, c] ** 2)))
        counts.append(int(sel.sum()))
        assert len(np.unique(bw[sel, c])) == 1
        chosen.append(int(bw[sel, c][0]))
    units.append(float(np.sum(0.5 * f["v"] * x32["v"] ** 2)))
    counts.append(v.size)
    chosen.append(int(bv.ravel()[0]))
    assert np.dot(counts, chosen) <= budget * sum(counts) * (1 + 1e-9)
    est = sum(s * 4.0**-b for s, b in zip(units, chosen, strict=True))
    np.testing.assert_allclose(est, _brute_force_units(units, counts, widths, budget), rtol=1e-9)


@pytest.mark.parametrize("entry_bits", [0.0, 8.0, 40.0])
def test_budget_solver_equals_brute_force_on_random_units(entry_bits):
    # One solver for layer and channel widths; with entry_bits a unit's cost n b + e min(2^b, n)
    # is not linear in b, and the solver must stay exact.
    rng = np.random.default_rng(0)
    for _ in range(150):
        c = int(rng.integers(1, 7))
        widths = tuple(
            sorted(rng.choice([1, 2, 3, 4, 6, 8], size=int(rng.integers(1, 4)), replace=False))
        )[::-1]
        n = rng.integers(1, 300, c)
        s = rng.exponential(size=c) ** 3
        base = float(np.sum(n * min(widths) + entry_bits * np.minimum(2 ** min(widths), n)))
        budget = float(rng.uniform(base / n.sum(), max(widths) + entry_bits))
        b = _budget_widths(s, n, widths, budget, entry_bits)
        cost = n * b + entry_bits * np.minimum(2.0**b, n)
        assert cost.sum() <= budget * n.sum() * (1 + 1e-12)
        est = float(np.sum(s * 4.0**-b))
        want = _brute_force_units(s, n, widths, budget, entry_bits)
        np.testing.assert_allclose(est, want, rtol=1e-12)


def test_channel_granularity_pays_for_per_channel_codebooks():
    # 8 channels of 64 weights. At 4 bits a channel costs 256 bits of codes and, with
    # entry_bits=40, 16 entries of 40 bits; at 1 bit 64 + 2 * 40. A budget of 5 bits per
    # weight (2,560 bits) pays for 4 bits everywhere without the codebooks, and with them
    # for the 1-bit base (1,152 bits) and one upgrade (752 bits): the most salient channel.
    rng = np.random.default_rng(4)
    params = {"k": (rng.normal(size=(64, 8)) * np.arange(1, 9)).astype(np.float32)}
    fisher = {"k": np.ones((64, 8), np.float32)}
    kw = dict(granularity="channel", axis=-1, bit_widths=(4, 1), average_bits=5)
    free = np.asarray(allocate_bits(params, fisher=fisher, **kw)["k"])
    paid = np.asarray(allocate_bits(params, fisher=fisher, entry_bits=40, **kw)["k"])
    assert np.all(free == 4)
    assert np.all(paid == paid[:1])
    saliency = np.sum(params["k"].astype(np.float64) ** 2, 0)
    np.testing.assert_array_equal(paid[0], np.where(np.arange(8) == np.argmax(saliency), 4, 1))


def test_channel_granularity_feeds_per_channel_quantize():
    rng = np.random.default_rng(2)
    params = {"k": (rng.normal(size=(64, 12)) * rng.lognormal(0, 1, 12)).astype(np.float32)}
    fisher = {"k": np.ones((64, 12), np.float32)}
    bits = allocate_bits(
        params, fisher=fisher, granularity="channel", axis=-1, bit_widths=(4, 3, 2), average_bits=3
    )
    b = np.asarray(bits["k"])
    assert np.all(b == b[:1]) and b.mean() <= 3 and len(np.unique(b)) > 1
    # The channels of largest scale (saliency) get the most bits.
    scale = np.sum(params["k"].astype(np.float64) ** 2, 0)
    assert b[0, np.argmax(scale)] == 4 and b[0, np.argmin(scale)] == 2
    q = quantize(params, bits, fisher=fisher, axis=-1)
    for width, book in q.codebooks[0].items():
        assert np.asarray(book).shape == (12, 2**width)
    _check_per_slice(q, 0, params["k"], np.ones((64, 12), bool), b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"granularity": "channel", "average_bits": 3}, "granularity='channel' gives one width"),
        ({"granularity": "channel", "axis": -1}, "granularity='channel' chooses widths under"),
        ({"axis": -1}, "axis is read by granularity='channel' only"),
        ({"granularity": "channel", "axis": 2, "average_bits": 3}, "axis=2 is out of range"),
    ],
)
def test_channel_granularity_errors(kwargs, match):
    params = _tree(14)
    fisher = jax.tree.map(np.ones_like, params)
    with pytest.raises(ValueError, match=match):
        allocate_bits(params, fisher=fisher, **kwargs)


def test_raw_numpy_leaves_are_copies_not_the_callers_arrays():
    params = {"kernel": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    q = quantize(params, 1)
    d = dequantize(q)
    d["bias"] += 1.0  # editing the result in place
    params["bias"] -= 1.0  # or the caller's array
    np.testing.assert_array_equal(np.asarray(dequantize(q)["bias"]), np.zeros(2, np.float32))


@pytest.mark.parametrize(
    "kw",
    [{}, {"average_bits": 4}, {"average_bits": 4, "granularity": "layer"},
     {"average_bits": 4, "granularity": "channel", "axis": -1}],
)  # fmt: skip
def test_allocate_bits_with_nothing_to_code_gives_zero_bits(kw):
    params = {"b": jnp.ones(3), "w": jnp.ones((2, 2))}
    bits = allocate_bits(params, fisher=params, quantizable=lambda path, leaf: False, **kw)
    assert all(not np.any(np.asarray(b)) for b in jax.tree.leaves(bits))  # a zip error before


def test_allocate_bits_argument_errors_say_what_to_pass():
    params = {"w": jnp.ones((2, 3))}
    with pytest.raises(TypeError, match="ranks the weights by their Fisher: pass fisher="):
        allocate_bits(params, fisher=None, average_bits=4)
    with pytest.raises(TypeError, match=r"bit_widths must be a sequence .* pass \(4,\)"):
        allocate_bits(params, fisher=params, bit_widths=4)


# ----------------------------------------------------------------- method="ecsq"


def _ecsq_tree(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.laplace(size=(40, 12)) * 0.1
    return {"a": {"kernel": w.astype(np.float32)}, "b": {"kernel": w.astype(np.float32)}}


def _order0_bits(symbols):
    _, counts = np.unique(symbols, return_counts=True)
    return float(np.sum(counts * np.log2(symbols.size / counts)))


def test_ecsq_codes_cost_what_the_file_spends_on_them():
    from fisher_optax import compression_report

    w = {"k": _ecsq_tree()["a"]["kernel"]}
    q = quantize(w, 8, method="ecsq", lam=1e-3)
    codes = np.asarray(q.codes[0]).ravel()
    book = q.codebooks[0][8]
    assert 1 < book.size < 256 and np.all(np.diff(book) > 0)
    np.testing.assert_array_equal(np.asarray(dequantize(q)["k"]).ravel(), book[codes])
    # The code length ECSQ prices is the order-0 length the file's coder spends.
    report = compression_report(q).leaves[0].codes
    assert report.entropy_bytes == pytest.approx(_order0_bits(codes) / 8)
    # A higher price of bits: fewer entries, fewer code bits, more distortion.
    q2 = quantize(w, 8, method="ecsq", lam=1e-1)
    assert q2.codebooks[0][8].size < book.size
    assert compression_report(q2).leaves[0].codes.entropy_bytes < report.entropy_bytes
    err = lambda q: float(np.sum((np.asarray(dequantize(q)["k"]) - w["k"]) ** 2))
    assert err(q2) > err(q)


def test_ecsq_more_fisher_more_bits():
    # Two leaves with the same weights; one lam for both: the leaf with 100x the Fisher
    # gets more entries and a smaller error (the rate-distortion allocation).
    params = _ecsq_tree()
    fisher = {"a": {"kernel": np.ones((40, 12))}, "b": {"kernel": np.full((40, 12), 100.0)}}
    q = quantize(params, 8, fisher=fisher, method="ecsq", lam=1e-3)
    books = [q.codebooks[i][8].size for i in range(2)]
    out = dequantize(q)
    err = [float(np.sum((out[k]["kernel"] - params[k]["kernel"]) ** 2)) for k in "ab"]
    assert books[1] > books[0] and err[1] < err[0]


def test_ecsq_prune_zero_prunes_and_roundtrips(tmp_path):
    from fisher_optax import load_compressed, save_compressed

    params = _ecsq_tree()
    mask = jax.tree.map(lambda x: np.abs(x) > 0.02, params)
    for axis in (None, -1):
        q = quantize(params, 6, mask=mask, method="ecsq", lam=3e-3, prune_zero=True, axis=axis)
        out = dequantize(q)
        for i, k in enumerate("ab"):
            bits, m = np.asarray(q.bits[i]), mask[k]["kernel"]
            assert not bits[~m].any()  # pruned stays pruned
            zeroed = m & (bits == 0)
            assert zeroed.any() and not np.asarray(out[k]["kernel"])[zeroed].any()
            assert np.all(np.asarray(out[k]["kernel"])[bits > 0] != 0)
        path = tmp_path / f"q{axis}.foqz"
        save_compressed(path, q)
        back = dequantize(load_compressed(path))
        for k in "ab":
            np.testing.assert_array_equal(back[k]["kernel"], out[k]["kernel"])
    # Without prune_zero every kept weight keeps a code.
    q = quantize(params, 6, mask=mask, method="ecsq", lam=3e-3)
    assert np.array_equal(np.asarray(q.bits[0]) > 0, mask["a"]["kernel"])


def test_ecsq_per_slice_codebooks():
    params = {"k": _ecsq_tree()["a"]["kernel"]}
    q = quantize(params, 4, method="ecsq", lam=1e-3, axis=-1)
    book = q.codebooks[0][4]
    assert book.shape[0] == 12 and book.shape[1] <= 16
    codes = np.asarray(q.codes[0])
    np.testing.assert_array_equal(dequantize(q)["k"], book[np.arange(12)[None, :], codes])


def test_quantize_to_target_size_and_distortion():
    from fisher_optax import compression_report, quantize_to_target

    params = jax.tree.map(lambda x: x[:16], _ecsq_tree())
    fisher = jax.tree.map(lambda x: np.abs(x) + 0.1, params)
    q, lam = quantize_to_target(params, size_bytes=400, fisher=fisher, prune_zero=True)
    size = compression_report(q).total_bytes
    assert 360 < size <= 400  # the size moves in steps of an entry and its table
    again = quantize(params, 8, fisher=fisher, method="ecsq", lam=lam, prune_zero=True)
    assert compression_report(again).total_bytes == size
    q, lam = quantize_to_target(params, distortion=0.05, fisher=fisher)
    out = dequantize(q)
    d = sum(
        float(np.sum(fisher[k]["kernel"] * (out[k]["kernel"] - params[k]["kernel"]) ** 2))
        for k in "ab"
    )
    assert 0.045 < d <= 0.05
    assert compression_report(q).total_bytes < compression_report(again).total_bytes


def test_ecsq_errors(monkeypatch):
    from fisher_optax import quantize_to_target

    params = {"k": np.ones((4, 4), np.float32)}
    with pytest.raises(ValueError, match="pass lam > 0"):
        quantize(params, 8, method="ecsq")
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        quantize(params, 8, method="ecsq", lam=0.0)
    with pytest.raises(ValueError, match="read by method='ecsq' and 'fisher_step' only"):
        quantize(params, 8, lam=1.0)
    with pytest.raises(ValueError, match="read by method='ecsq' and 'fisher_step' only"):
        quantize(params, 8, method="uniform", prune_zero=True)
    with pytest.raises(ValueError, match="bits must be one int"):
        quantize(params, {"k": np.full((4, 4), 4)}, method="ecsq", lam=1.0)
    with pytest.raises(ValueError, match="exactly one target"):
        quantize_to_target(params)
    with pytest.raises(ValueError, match="exactly one target"):
        quantize_to_target(params, size_bytes=100, distortion=1.0)
    with pytest.raises(ValueError, match="no lam gives size_bytes <= 10"):
        quantize_to_target(params, size_bytes=10)
    monkeypatch.setattr("fisher_optax._validate.spans_processes", lambda x: True)
    with pytest.raises(
        ValueError, match=r"quantize\(method='ecsq'\) on arrays that span processes"
    ):
        quantize(params, 8, method="ecsq", lam=1.0)


def test_ecsq_fully_pruned_leaf_and_zero_fisher(recwarn):
    params = {"a": np.ones((6, 5), np.float32), "b": np.arange(9.0, dtype=np.float32).reshape(3, 3)}
    mask = {"a": np.zeros((6, 5), bool), "b": np.ones((3, 3), bool)}
    zero = jax.tree.map(np.zeros_like, params)
    for axis in (None, -1):
        q = quantize(params, 3, mask=mask, fisher=zero, method="ecsq", lam=0.1, axis=axis)
        assert q.widths[0] == () and not np.asarray(q.bits[0]).any()
        # Zero Fisher: no distortion to pay, so all of a slice shares its cheapest entry.
        out = np.asarray(dequantize(q)["b"])
        assert np.asarray(q.bits[1]).all() and len(np.unique(out)) <= (1 if axis is None else 3)
        q = quantize(params, 3, mask=mask, fisher=zero, method="ecsq", lam=0.1, prune_zero=True)
        assert not np.asarray(q.bits[1]).any()  # pruned: free, and no entry to pay
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
