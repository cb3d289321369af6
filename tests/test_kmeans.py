"""kmeans_1d against independent references: the exact optimum, scikit-learn, NumPy."""

import itertools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import kmeans1d
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import KMeans

from fisher_optax import KMeansResult, kmeans_1d
from fisher_optax.kmeans import _ecsq_rows, _kmeans_1d, kmeans_rows_host

N = 600  # one length for most tests: each new shape or static argument compiles again


def _data(kind: str, seed: int = 0, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(0, 0.05, n).astype(np.float32)
    if kind == "laplace":
        return rng.laplace(0, 0.03, n).astype(np.float32)
    # What magnitude pruning leaves: a normal with a gap around zero.
    x = rng.normal(0, 0.05, 4 * n)
    return x[np.abs(x) > 0.04][:n].astype(np.float32)


def _np_inertia(x, c, w=None):
    """Weighted inertia of nearest-centroid assignment, in float64 NumPy."""
    x = np.asarray(x, np.float64)
    c = np.sort(np.asarray(c, np.float64))
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    d = np.min((x[:, None] - c[None, :]) ** 2, axis=1)
    return float(np.sum(w * d))


def _exact_optimum(x, k):
    _, centroids = kmeans1d.cluster(np.asarray(x, np.float64), k)
    return _np_inertia(x, centroids)


def _weighted_optimum(x, w, k):
    """Exact weighted 1-D k-means by an O(k n^2) dynamic program in float64."""
    order = np.argsort(x)
    x, w = np.asarray(x, np.float64)[order], np.asarray(w, np.float64)[order]
    pw = np.concatenate([[0], np.cumsum(w)])
    ps = np.concatenate([[0], np.cumsum(w * x)])
    pq = np.concatenate([[0], np.cumsum(w * x * x)])
    n = len(x)
    t, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    dw, ds, dq = pw[j] - pw[t], ps[j] - ps[t], pq[j] - pq[t]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(dw > 0, dq - ds**2 / dw, 0.0)
    cost = np.where(t <= j, np.maximum(cost, 0), np.inf)
    best = cost[0]
    for _ in range(k - 1):
        best = np.min(best[:, None] + cost, axis=0)
    return float(best[n])


K = 16  # and one number of clusters


def _pad(x, w=None):
    """Pad to length N with invalid entries, so that the test reuses the compiled N."""
    pad = N - len(x)
    xs = np.concatenate([x, np.zeros(pad, np.float32)])
    valid = np.arange(N) < len(x)
    ws = None if w is None else np.concatenate([w, np.ones(pad, np.float32)])
    return xs, ws, valid


@pytest.mark.parametrize("kind", ["normal", "laplace", "bimodal"])
def test_dp_init_reaches_the_exact_optimum(kind):
    x = _data(kind)
    r = kmeans_1d(x, K, init="dp")
    opt = _exact_optimum(x, K)
    assert float(r.inertia) <= opt * (1 + 1e-4)
    # Inertia is reported faithfully: never below the optimum, equal to NumPy's.
    assert float(r.inertia) >= opt * (1 - 1e-5)
    np.testing.assert_allclose(float(r.inertia), _np_inertia(x, r.centroids), rtol=1e-5)


def test_no_worse_than_sklearn_and_a_fixed_point_of_sklearn_lloyd():
    x = _data("bimodal", seed=3)
    r = kmeans_1d(x, K, init="dp")
    sk = KMeans(K, n_init=1, random_state=0).fit(x.reshape(-1, 1).astype(np.float64))
    assert float(r.inertia) <= sk.inertia_ * (1 + 1e-4)
    # scikit-learn's Lloyd started from our centroids does not improve them.
    init = np.asarray(r.centroids, np.float64).reshape(-1, 1)
    polished = KMeans(K, init=init, n_init=1).fit(x.reshape(-1, 1).astype(np.float64))
    np.testing.assert_allclose(float(r.inertia), polished.inertia_, rtol=1e-4)


def test_linear_init_gets_stuck_on_bimodal_data_and_dp_does_not():
    # Documents why init="dp" exists: Lloyd from Deep Compression's linear init stops
    # in a local minimum on pruned-looking weights.
    x = _data("bimodal", seed=1)
    opt = _exact_optimum(x, K)
    linear = float(kmeans_1d(x, K, init="linear").inertia)
    dp = float(kmeans_1d(x, K).inertia)  # "dp" is the default
    assert dp <= opt * (1 + 1e-4) < linear


@pytest.mark.parametrize("init", ["linear", "quantile", "density", "kmeans++"])
def test_every_init_is_a_sound_clustering(init):
    x = _data("laplace", seed=2)
    r = kmeans_1d(x, K, init=init, key=jax.random.key(0))
    c = np.asarray(r.centroids)
    assert np.all(np.isfinite(c)) and np.all(np.diff(c) >= 0)
    # Assignments are to the nearest centroid, inertia is NumPy's.
    d = np.abs(x[:, None] - c[None, :])
    a = np.asarray(r.assignments)
    assert np.all(d[np.arange(N), a] <= d.min(axis=1) + 1e-7)
    np.testing.assert_allclose(float(r.inertia), _np_inertia(x, c), rtol=1e-5)
    # Local methods: no optimality claim, but better than one cluster by far.
    assert float(r.inertia) <= 0.1 * np.sum((x - x.mean()) ** 2)


def test_weighted_matches_exact_weighted_optimum():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(-1, 0.3, 30), rng.normal(1, 0.2, 30)]).astype(np.float32)
    w = rng.gamma(0.5, size=60).astype(np.float32)  # heavy-tailed like a Fisher diagonal
    xs, ws, valid = _pad(x, w)
    r = kmeans_1d(xs, K, weights=ws, valid=valid, init="dp")
    opt = _weighted_optimum(x, w, K)
    np.testing.assert_allclose(float(r.inertia), opt, rtol=1e-4)
    np.testing.assert_allclose(float(r.inertia), _np_inertia(x, r.centroids, w), rtol=1e-5)
    # Each centroid is the weighted mean of the values it owns (Choi et al.'s update).
    a = np.asarray(r.assignments)[: len(x)]
    for j in np.unique(a):
        sel = a == j
        mean = np.sum(w[sel] * x[sel]) / np.sum(w[sel])
        np.testing.assert_allclose(float(r.centroids[j]), mean, rtol=1e-4, atol=1e-6)


def test_integer_weights_equal_repeated_values():
    rng = np.random.default_rng(5)
    x = rng.normal(size=60).astype(np.float32)
    w = rng.integers(1, 4, size=60)
    rep = np.repeat(x, w)
    xs, ws, valid = _pad(x, w.astype(np.float32))
    a = kmeans_1d(xs, K, weights=ws, valid=valid, init="dp")
    xs, _, valid = _pad(rep)
    b = kmeans_1d(xs, K, valid=valid, init="dp")
    np.testing.assert_allclose(np.asarray(a.centroids), np.asarray(b.centroids), rtol=1e-5)
    np.testing.assert_allclose(float(a.inertia), float(b.inertia), rtol=1e-5)


def test_histogram_mode_is_exact_per_value():
    # n > num_bins: values are histogrammed, but assignment and inertia use the values.
    x = _data("normal", seed=6)
    r = kmeans_1d(x, K, init="dp", num_bins=128)
    c = np.asarray(r.centroids)
    np.testing.assert_array_equal(
        np.asarray(r.assignments), np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    )
    np.testing.assert_allclose(float(r.inertia), _np_inertia(x, c), rtol=1e-5)
    assert float(r.inertia) <= _exact_optimum(x, K) * 1.01


def _small(x, k=4, **kw):
    """Edge cases share one compiled shape: 16 entries (padding invalid), 4 clusters."""
    x = np.asarray(x, np.float32)
    valid = kw.pop("valid", np.ones(len(x), bool))
    xs = np.concatenate([x, np.zeros(16 - len(x), np.float32)])
    vs = np.concatenate([valid, np.zeros(16 - len(x), bool)])
    r = kmeans_1d(xs, k, valid=vs, init="dp", **kw)
    return r._replace(assignments=r.assignments[: len(x)])


def test_duplicates_and_more_clusters_than_distinct_values():
    x = np.repeat(np.array([-2.0, 0.5, 3.0, 4.0], np.float32), [5, 1, 6, 4])
    r = _small(x)
    np.testing.assert_allclose(np.asarray(r.centroids), [-2.0, 0.5, 3.0, 4.0])
    assert float(r.inertia) == 0.0
    r = _small(x[x != 4.0])  # 3 distinct values, 4 clusters
    assert float(r.inertia) == 0.0
    used = np.asarray(r.centroids)[np.asarray(r.assignments)]
    np.testing.assert_array_equal(used, x[x != 4.0])
    assert np.all(np.isfinite(np.asarray(r.centroids)))


def test_constant_input():
    r = _small(np.full(7, 1.5))
    np.testing.assert_array_equal(np.asarray(r.centroids), np.full(4, 1.5))
    np.testing.assert_array_equal(np.asarray(r.assignments), np.zeros(7))
    assert float(r.inertia) == 0.0


def test_valid_mask_excludes_entries_and_marks_them_minus_one():
    x = np.array([0.0, 0.1, 100.0, 5.0, 5.2, -100.0, 9.0, 9.5, 20.0], np.float32)
    valid = np.array([True, True, False, True, True, False, True, True, True])
    r = _small(x, valid=valid)
    ref = kmeans1d.cluster(x[valid].astype(np.float64), 4).centroids
    np.testing.assert_allclose(np.asarray(r.centroids), ref, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.assignments), [0, 0, -1, 1, 1, -1, 2, 2, 3])
    np.testing.assert_allclose(float(r.inertia), 2 * 0.05**2 + 2 * 0.1**2 + 2 * 0.25**2, rtol=1e-4)


def test_all_invalid_input():
    r = _small(np.arange(5.0), valid=np.zeros(5, bool))
    np.testing.assert_array_equal(np.asarray(r.centroids), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(r.assignments), -np.ones(5))
    assert float(r.inertia) == 0.0 and int(r.iterations) == 0


def test_shape_is_kept():
    x = np.arange(16.0, dtype=np.float32).reshape(4, 4)
    r = kmeans_1d(x, 4, init="dp")
    assert isinstance(r, KMeansResult)
    assert r.assignments.shape == (4, 4) and r.assignments.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(r.assignments), np.arange(16).reshape(4, 4) // 4)


def test_under_jit_and_no_recompile():
    f = jax.jit(lambda x, w: kmeans_1d(x, K, weights=w, init="dp"))
    x = _data("normal", seed=7)
    w = np.ones_like(x)
    eager = kmeans_1d(x, K, weights=w, init="dp")
    jitted = f(x, w)
    np.testing.assert_allclose(np.asarray(jitted.centroids), np.asarray(eager.centroids))
    before = _kmeans_1d._cache_size()
    for seed in (8, 9):  # new values, same shapes: no new compilation
        kmeans_1d(_data("normal", seed=seed), K, weights=w, init="dp")
        f(_data("normal", seed=seed), w)
    assert _kmeans_1d._cache_size() == before
    assert f._cache_size() == 1


@settings(max_examples=15, deadline=None)
@given(
    x=hnp.arrays(np.float32, 64, elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False)),
    valid=hnp.arrays(np.bool_, 64),
    k=st.sampled_from([1, K]),
)
def test_property_assignments_are_nearest_and_inertia_is_exact(x, valid, k):
    r = kmeans_1d(x, k, valid=valid, init="density")
    c, a = np.asarray(r.centroids), np.asarray(r.assignments)
    assert np.all(np.isfinite(c)) and np.all(np.diff(c) >= 0)
    np.testing.assert_array_equal(a[~valid], -1)
    assert np.all((a[valid] >= 0) & (a[valid] < k))
    xv = x[valid].astype(np.float64)
    d = np.abs(xv[:, None] - c[None, :].astype(np.float64))
    scale = 1e-6 * max(1.0, float(np.max(np.abs(x))))
    assert np.all(d[np.arange(len(xv)), a[valid]] <= d.min(axis=1, initial=np.inf) + scale)
    ref = _np_inertia(xv, c) if len(xv) else 0.0
    # float32 centroids: each squared residual is known to about (ulp of the values)^2.
    np.testing.assert_allclose(float(r.inertia), ref, rtol=1e-4, atol=len(x) * scale**2)
    # Never worse than leaving every value in one cluster when k >= 1.
    if len(xv):
        assert float(r.inertia) <= np.sum((xv - xv.mean()) ** 2) * (1 + 1e-4) + scale


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_clusters": 0}, ValueError, "^num_clusters must be an int >= 1, got 0"),
        ({"num_clusters": 2.5}, TypeError, r"^num_clusters must be an int >= 1, got 2.5 \(float"),
        ({"num_clusters": True}, TypeError, r"^num_clusters must be an int >= 1, got True \(bool"),
        ({"init": "random"}, ValueError, "^init must be one of: 'dp'"),
        (
            {"init": "kmeans++"},
            ValueError,
            r"^init='kmeans\+\+' samples its centres and needs a PRNG",
        ),
        ({"init": "kmeans++", "key": 0}, TypeError, "^key must be a jax.random key"),
        ({"max_iters": -1}, ValueError, "^max_iters must be an int >= 0"),
        ({"max_iters": 1.0}, TypeError, "^max_iters must be an int >= 0"),
        ({"tol": -1.0}, ValueError, "^tol must be a finite number >= 0.0"),
        ({"tol": "1e-6"}, TypeError, "^tol must be a real number"),
        ({"num_bins": 1}, ValueError, "^num_bins must be an int >= 2"),
        ({"weights": np.ones(3)}, ValueError, r"^weights must have the shape of values \(4,\)"),
        ({"valid": np.ones(4)}, TypeError, "^valid must be a boolean array"),
        ({"values": np.ones(4, complex)}, TypeError, "^values must be a real array"),
    ],
)
def test_errors(kwargs, error, match):
    args = {"values": np.arange(4.0), "num_clusters": 2, **kwargs}
    with pytest.raises(error, match=match):
        kmeans_1d(args.pop("values"), args.pop("num_clusters"), **args)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"values": np.arange(4.0)}, ValueError, r"^values must be 2-D \(rows, n\), got shape"),
        ({"num_clusters": 0}, ValueError, "^num_clusters must be an int >= 1"),
        ({"num_clusters": 2.0}, TypeError, "^num_clusters must be an int >= 1"),
        ({"init": "kmeans++"}, ValueError, "^init must be one of: 'dp'"),
        ({"weights": np.ones((1, 3))}, ValueError, "^weights must have the shape of values"),
        ({"valid": np.ones((1, 4))}, TypeError, "^valid must be a boolean array"),
    ],
)
def test_host_errors(kwargs, error, match):
    args = {"values": np.arange(4.0)[None], "num_clusters": 2, **kwargs}
    with pytest.raises(error, match=match):
        kmeans_rows_host(args.pop("values"), args.pop("num_clusters"), **args)


def test_brute_force_weighted_reference_is_right():
    # The test's own DP agrees with exhaustive search over all splits on a tiny case.
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=7), rng.uniform(0.1, 2, 7)
    xs, ws = x[np.argsort(x)], w[np.argsort(x)]
    best = np.inf
    for cuts in itertools.combinations(range(1, 7), 2):
        parts = np.split(np.arange(7), cuts)
        cost = sum(
            np.sum(ws[p] * (xs[p] - np.sum(ws[p] * xs[p]) / np.sum(ws[p])) ** 2) for p in parts
        )
        best = min(best, cost)
    np.testing.assert_allclose(_weighted_optimum(x, w, 3), best, rtol=1e-9)


def _host(x, k, w=None, init="dp"):
    """One group of values clustered on the host: the one-row case of kmeans_rows_host."""
    c, counts, a = kmeans_rows_host(x[None], k, weights=None if w is None else w[None], init=init)
    return c[0, : counts[0]], a[0]


@pytest.mark.parametrize(
    ("kind", "n", "k", "rtol"),
    [("normal", 600, 16, 1e-6), ("bimodal", 3000, 16, 1e-4), ("laplace", 3000, 64, 1e-3)],
)
def test_host_kmeans_reaches_the_exact_optimum(kind, n, k, rtol):
    # The NumPy path quantize runs: exact DP up to 2 * max(512, 8k) distinct values
    # (n = 600), DP on groups of the sorted values beyond (n = 3000), then Lloyd.
    x = _data(kind, seed=3, n=n)
    c, a = _host(x, k)
    assert np.all(np.diff(c) > 0) and a.shape == x.shape
    np.testing.assert_array_equal(c[a], c[np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)])
    assert _np_inertia(x, c) <= _exact_optimum(x, k) * (1 + rtol)


def test_host_kmeans_weighted_matches_exact_weighted_optimum():
    rng = np.random.default_rng(5)
    x = rng.normal(size=120)
    w = rng.gamma(0.5, size=120)
    c, _ = _host(x, 5, w)
    np.testing.assert_allclose(_np_inertia(x, c, w), _weighted_optimum(x, w, 5), rtol=1e-9)


def test_host_kmeans_zero_weights_fall_back_to_unweighted():
    x = _data("laplace", seed=6, n=200)
    c0, a0 = _host(x, 8)
    c, a = _host(x, 8, np.zeros_like(x))
    np.testing.assert_array_equal(c, c0)
    np.testing.assert_array_equal(a, a0)
    assert len(_host(np.array([1.0, 1.0, 2.0]), 8)[0]) == 2  # min(k, m) centroids


# --------------------------------------------------------------- row-wise host k-means (E)


@pytest.mark.parametrize("init", ["dp", "linear", "quantile", "density"])
def test_rows_equal_host_kmeans_row_by_row(init):
    """Every row of a batch is exactly the one-row call on that row's valid entries."""
    rng = np.random.default_rng(7)
    cases = [  # rows, n, k, values, weighted
        (6, 40, 4, "normal", True),
        (5, 1500, 8, "pruned", True),  # > 2 * 512 distinct values: the coarsened DP
        (4, 30, 64, "rounded", False),  # rows with fewer distinct values than k
        (3, 200, 1, "normal", True),
    ]
    for rows, n, k, kind, weighted in cases:
        x = rng.normal(size=(rows, n))
        if kind == "pruned":
            x = np.where(np.abs(x) < 0.6, 0.0, x)
        if kind == "rounded":
            x = np.round(x * 2) / 2
        w = rng.exponential(size=x.shape) if weighted else None
        valid = rng.random(x.shape) < 0.8
        valid[0] = False  # a row with nothing to cluster
        if weighted:
            w[1] = 0.0  # a row of zero weight: unweighted, as the host path
        c, counts, a = kmeans_rows_host(x, k, weights=w, valid=valid, init=init)
        assert counts[0] == 0 and np.all(c[0] == 0)
        for r in range(rows):
            sel = valid[r]
            cr, ar = _host(x[r][sel], k, None if w is None else w[r][sel], init=init)
            assert cr.size <= k and np.all(np.diff(cr) > 0)
            assert counts[r] == cr.size
            np.testing.assert_array_equal(c[r, : counts[r]], cr)
            np.testing.assert_array_equal(a[r][sel], ar)
            if counts[r]:  # padding repeats the last entry
                np.testing.assert_array_equal(c[r, counts[r] :], cr[-1])


def test_rows_dp_reaches_the_exact_optimum_per_row():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=(3, 400)), rng.laplace(size=(3, 400))])
    for k in (4, 16):
        c, _, a = kmeans_rows_host(x, k)
        for r in range(x.shape[0]):
            got = float(np.sum((x[r] - c[r, a[r]]) ** 2))
            assert got <= _exact_optimum(x[r], k) * (1 + 1e-3)


# ----------------------------------------------------------------- ECSQ (_ecsq_rows)


def _set_partitions(n):
    """Every partition of ``range(n)``, as a label per element (restricted growth)."""

    def grow(labels, k):
        if len(labels) == n:
            yield np.array(labels)
            return
        for j in range(k + 1):
            yield from grow([*labels, j], max(k, j + 1))

    yield from grow([], 0)


def _xlog(n, total):
    return n * np.log2(total / n) if n > 0 else 0.0


def _ecsq_cost(x, w, labels, zero_block, lam, zero, pruned, entry_bits, contiguous_only=False):
    """The ECSQ objective of one partition (``zero_block``: the block at 0, or -1)."""
    total = len(x) + (pruned if zero else 0)
    dist, rate, entries = 0.0, 0.0, 0
    n_zero = pruned if zero else 0
    for b in range(labels.max() + 1):
        s = labels == b
        if b == zero_block:
            dist += np.sum(w[s] * x[s] ** 2)
            n_zero += s.sum()
            continue
        c = (w[s] @ x[s]) / w[s].sum() if w[s].sum() > 0 else x[s].mean()
        dist += np.sum(w[s] * (x[s] - c) ** 2)
        rate += _xlog(s.sum(), total)
        entries += 1
    return dist + lam * (rate + _xlog(n_zero, total) + entry_bits * entries)


def _brute_ecsq(x, w, lam, zero, pruned, entry_bits):
    """``(optimum over all partitions, optimum over partitions into intervals of x)``."""
    order = np.argsort(x, kind="stable")
    best, best_contiguous = np.inf, np.inf
    for labels in _set_partitions(len(x)):
        for zb in range(-1, labels.max() + 1) if zero else [-1]:
            cost = _ecsq_cost(x, w, labels, zb, lam, zero, pruned, entry_bits)
            best = min(best, cost)
            if np.all(np.diff(labels[order]) >= 0):  # blocks are intervals of sorted x
                best_contiguous = min(best_contiguous, cost)
    return best, best_contiguous


def _ecsq_case(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    x = rng.normal(size=n) * rng.choice([0.1, 1.0, 10.0])
    lam = float(10 ** rng.uniform(-3, 1))
    zero, pruned = bool(rng.integers(2)), int(rng.integers(0, 4))
    entry_bits = float(rng.choice([0.0, 3.0, 40.0]))
    return rng, x, lam, zero, pruned, entry_bits


def _run_ecsq(x, w, lam, zero, pruned, entry_bits, max_codes=256):
    return _ecsq_rows(
        x[None], lam, weights=w[None], valid=np.ones((1, x.size), bool), max_codes=max_codes,
        zero=zero, pruned=np.array([pruned]), entry_bits=entry_bits, shared=False,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(24))
def test_ecsq_equal_weights_is_the_brute_force_optimum(seed):
    _, x, lam, zero, pruned, entry_bits = _ecsq_case(seed)
    w = np.ones_like(x)
    cent, counts, a, cost = _run_ecsq(x, w, lam, zero, pruned, entry_bits)
    best, _ = _brute_ecsq(x, w, lam, zero, pruned, entry_bits)
    assert cost == pytest.approx(best, rel=1e-9, abs=1e-12)
    # The cost it reports is the cost of what it returns.
    labels = np.where(a[0] >= 0, a[0], counts[0])
    zb = counts[0] if (a[0] < 0).any() else -1
    assert _ecsq_cost(x, w, labels, zb, lam, zero, pruned, entry_bits) == pytest.approx(cost)
    assert np.all(np.diff(cent[0, : counts[0]]) > 0)


@pytest.mark.parametrize("seed", range(24, 40))
def test_ecsq_fisher_weights_lie_between_optimum_and_best_intervals(seed):
    # With unequal weights the optimum may interleave cells: the DP's intervals then bound
    # it from above, and the Lloyd steps only go down from there.
    rng, x, lam, zero, pruned, entry_bits = _ecsq_case(seed)
    w = rng.exponential(size=x.size) * (rng.random(x.size) > 0.2)
    *_, cost = _run_ecsq(x, w, lam, zero, pruned, entry_bits)
    best, best_contiguous = _brute_ecsq(x, w, lam, zero, pruned, entry_bits)
    assert best * (1 - 1e-9) <= cost <= best_contiguous * (1 + 1e-9)
    assert cost <= best * 1.02


def test_ecsq_keeps_to_max_codes_and_zero_cell():
    x = np.linspace(-1, 1, 40)
    w = np.ones_like(x)
    _, counts, a, _ = _run_ecsq(x, w, 1e-6, False, 0, 0.0, max_codes=4)
    assert counts[0] <= 4 and a.min() >= 0 and a.max() < counts[0]
    # A price of bits that dwarfs the distortion sends every weight to the zero cell.
    _, counts, a, _ = _run_ecsq(x, w, 1e6, True, 3, 48.0)
    assert counts[0] == 0 and np.all(a == -1)
