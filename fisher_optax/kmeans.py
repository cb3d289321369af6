"""Weighted one-dimensional k-means under ``jit``: the weight-sharing step of quantization.

In one dimension a cluster is an interval, so k-means never needs the ``n x k`` distance
matrix. The values are first summarised in sorted order, as single values (small inputs,
one sort) or as a fine weighted histogram (large inputs, one O(n) pass and no sort, which
is slow on CPU). A Lloyd step on the summary then places the cluster boundaries at the
midpoints between neighbouring centroids, finds them by binary search
(``jnp.searchsorted``) and reads each cluster's weight and weighted sum as differences of
prefix sums: O(k log B) work per iteration for ``B`` summary points. The last step is
exact per value: every value goes to its nearest centroid, the centroids are re-centred
on the values they own and the values are assigned once more, and the inertia is summed
over the values themselves. Lloyd is local; ``init="dp"`` starts it from the exact optimum
of a coarsened summary (a dynamic program, divide and conquer per layer), which is what
reaches the optimum on pruned, bimodal weights.

:func:`kmeans_rows_host`, at the end, is the same clustering on the host (NumPy, no
compile), on every row of a 2-D array at once: what ``quantize`` runs, one row per group
of weights or per output channel. After it, the entropy-constrained variant that
``quantize(method="ecsq")`` runs: the number of clusters is free and each one's code
length is priced (a dynamic program over the sorted values, then ECSQ Lloyd steps).
"""

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fisher_optax import _validate

__all__ = ["KMeansResult", "kmeans_1d", "kmeans_rows_host"]

Init = Literal["dp", "linear", "quantile", "kmeans++", "density"]
INITS: dict[str, str] = {
    "dp": "exact optimum of a coarsened summary (dynamic program), then Lloyd",
    "linear": "evenly spaced from min to max, Deep Compression's choice",
    "quantile": "weighted quantiles at (j + 1/2)/k",
    "kmeans++": "D^2 sampling, needs key",
    "density": "weighted quantiles of p(x)^(1/3) (Panter & Dite)",
}


class KMeansResult(NamedTuple):
    """What :func:`kmeans_1d` returns.

    Attributes:
      centroids: ``[num_clusters]`` cluster centres in ascending order. A cluster that
        owns no weight keeps its last centre (finite, never NaN). All zeros when no value
        is valid.
      assignments: int32 array shaped like ``values``: the index of the nearest centroid
        (ties go to the lower index), or ``-1`` for an entry that is not valid. ``-1`` is
        the reserved exact zero of the quantizer: pruned weights take no part in the
        clustering and are stored as 0.
      inertia: the weighted objective ``sum_i w_i (x_i - c_{a_i})^2`` over valid entries,
        computed from the values themselves (not from the summary).
      iterations: int32, Lloyd iterations run on the summary.
    """

    centroids: jax.Array
    assignments: jax.Array
    inertia: jax.Array
    iterations: jax.Array


def _two_sum(a, b):
    """``a + b`` as a float and its exact rounding error (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return s, err


def _cumsum2(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inclusive prefix sums as an unevaluated pair ``hi + lo`` (compensated summation).

    Differences of long float32 prefix sums lose small clusters in the tails to rounding.
    ``hi`` is the ordinary cumsum; the rounding error of each step,
    ``(hi[i-1] + x[i]) - hi[i]``, is recovered exactly with TwoSum and accumulated in
    ``lo``, so a difference of two prefixes is accurate to about one ulp of the
    difference itself. Elementwise work and two cumsums: cheap to compile.
    """
    hi = jnp.cumsum(x)
    prev = jnp.concatenate([jnp.zeros((1,), x.dtype), hi[:-1]])
    s, e = _two_sum(prev, x)
    # s and hi[i] are within an ulp of each other, so s - hi is exact (Sterbenz).
    return hi, jnp.cumsum((s - hi) + e)


def _range_sums(prefix, starts, stops):
    """``sum(x[starts:stops])`` for many ranges, from a compensated prefix (leading 0)."""
    hi, lo = prefix
    return (hi[stops] - hi[starts]) + (lo[stops] - lo[starts])


def _summarize(x, w, valid, num_bins, lo, hi):
    """Sorted summary points: ``(positions, weights, weighted sums)`` of length ``B``.

    Small inputs (``n <= num_bins``): the values themselves, sorted (exact). Large inputs:
    ``num_bins`` equal-width bins over ``[lo, hi]``; a bin's position is the weighted mean
    of its values, clipped into the bin so that positions stay sorted. Entries that are
    not valid carry weight 0. Sums are taken relative to ``lo`` for accuracy.
    """
    n = x.shape[0]
    wv = jnp.where(valid, w, 0)
    if n <= num_bins:
        # Entries that are not valid sort to the end and sit at ``hi`` with weight 0.
        key, ws = lax.sort((jnp.where(valid, x, jnp.inf), wv), num_keys=1)
        pos = jnp.where(jnp.isfinite(key), key, hi)
        return pos, ws, ws * (pos - lo)
    width = (hi - lo) / num_bins
    safe = jnp.where(width > 0, width, 1)
    idx = jnp.clip(jnp.floor((x - lo) / safe), 0, num_bins - 1).astype(jnp.int32)
    idx = jnp.where(valid, idx, 0)
    sums = jax.ops.segment_sum(
        jnp.stack([wv, wv * jnp.where(valid, x - lo, 0)], axis=1), idx, num_segments=num_bins
    )
    bw, bs = sums[:, 0], sums[:, 1]
    edges = jnp.arange(num_bins, dtype=x.dtype) * width
    mean = jnp.clip(bs / jnp.where(bw > 0, bw, 1), edges, edges + width)
    pos = lo + jnp.where(bw > 0, mean, edges + width / 2)
    return pos, bw, bs


def _init_centroids(init, k, pos, bw, lo, hi, key):
    """``k`` ascending initial centroids from the summary."""
    dtype = pos.dtype
    total = jnp.sum(bw)
    q = (jnp.arange(k, dtype=dtype) + 0.5) / k
    if init == "linear":
        return jnp.linspace(lo, hi, k, dtype=dtype) if k > 1 else jnp.full((1,), (lo + hi) / 2)
    if init == "quantile":
        cum = jnp.cumsum(bw)
        j = jnp.searchsorted(cum, q * total, side="left")
        return pos[jnp.clip(j, 0, pos.shape[0] - 1)]
    if init == "density":
        # High-resolution quantization theory (Panter & Dite 1951): the optimal centroid
        # density is proportional to p(x)^(1/3). p is read from a coarse regrouping of the
        # summary (about 16 points per cluster) so that sparse tails do not look dense.
        b = pos.shape[0]
        groups = max(1, min(b, 16 * k))
        gid = (jnp.arange(b) * groups) // b
        gw = jax.ops.segment_sum(bw, gid, num_segments=groups)
        gpos_hi = jax.ops.segment_max(pos, gid, num_segments=groups)
        gpos_lo = jax.ops.segment_min(pos, gid, num_segments=groups)
        mass = jnp.cbrt(gw / total) * (gw > 0)
        cdf = jnp.concatenate([jnp.zeros((1,), dtype), jnp.cumsum(mass)])
        cdf = cdf / jnp.maximum(cdf[-1], jnp.finfo(dtype).tiny)
        # Piecewise linear inside each group, between its lowest and highest point.
        g = jnp.clip(jnp.searchsorted(cdf, q, side="right") - 1, 0, groups - 1)
        frac = (q - cdf[g]) / jnp.maximum(cdf[g + 1] - cdf[g], jnp.finfo(dtype).tiny)
        c = gpos_lo[g] + jnp.clip(frac, 0, 1) * (gpos_hi[g] - gpos_lo[g])
        return jnp.sort(c)
    if init == "dp":
        return _dp_centroids(pos, bw, k, max(512, 8 * k))
    # k-means++ (Arthur & Vassilvitskii 2007) on the summary: D^2 sampling weighted by bw.
    keys = jax.random.split(key, k)
    first = jax.random.categorical(keys[0], jnp.log(bw))
    d2 = jnp.square(pos - pos[first])

    def step(d2, key):
        j = jax.random.categorical(key, jnp.log(bw * d2))
        # When every weighted point already is a centre (fewer points than clusters), the
        # logits are all -inf: repeat the first centre rather than read garbage.
        j = jnp.where(jnp.any(bw * d2 > 0), j, first)
        return jnp.minimum(d2, jnp.square(pos - pos[j])), pos[j]

    _, rest = lax.scan(step, d2, keys[1:])
    return jnp.sort(jnp.concatenate([pos[first][None], rest]))


def _coarsen(pos, bw, num_groups):
    """Merge the sorted summary into at most ``2 * num_groups`` contiguous groups.

    A group ends where the cumulative weight crosses a multiple of ``total / num_groups``
    or the position crosses a multiple of ``(max - min) / num_groups``: fine where the
    weight is dense (equal-weight groups) and in the sparse tails (equal-width groups),
    which is where the optimum puts centroids on few values.

    Returns ``(group id per summary point, number of groups)`` with ids ascending.
    """
    total = jnp.maximum(jnp.sum(bw), jnp.finfo(bw.dtype).tiny)
    before = jnp.cumsum(bw) - bw
    by_weight = jnp.floor(before / total * num_groups).astype(jnp.int32)
    span = jnp.maximum(pos[-1] - pos[0], jnp.finfo(pos.dtype).tiny)
    by_width = jnp.clip(jnp.floor((pos - pos[0]) / span * num_groups), 0, num_groups - 1)
    key = by_weight * (num_groups + 1) + by_width.astype(jnp.int32)
    new = jnp.concatenate([jnp.zeros((1,), bool), key[1:] != key[:-1]])
    gid = jnp.cumsum(new.astype(jnp.int32))
    return gid, gid[-1] + 1


def _dp_centroids(pos, bw, k, num_groups):
    """Exact k-means of the coarsened summary by dynamic programming (Wang & Song 2011).

    ``D_i(j) = min_t D_{i-1}(t) + cost(t, j)`` over prefixes of the ``M`` groups, where
    ``cost(t, j)`` is the weighted sum of squares of groups ``t..j-1`` about their mean.
    The optimal split ``t*(j)`` does not decrease with ``j`` (the cost is Monge), so each
    layer is solved by divide and conquer, level by level: at a level the candidates of
    all queries are laid out in one flat array and reduced with ``segment_min``. Work is
    O(k M log M). Float32 prefix sums are compensated and taken about the middle of the
    range; this is exact on the groups up to rounding (the coarsening is the
    approximation), which is all the caller needs: Lloyd polishes the result.

    Returns ``k`` ascending centroids (a cluster with no weight repeats its neighbour).
    """
    dtype = pos.dtype
    b = pos.shape[0]
    m = min(b, 2 * num_groups)
    gid, _ = _coarsen(pos, bw, num_groups)
    gid = jnp.minimum(gid, m - 1)
    centre = (pos[0] + pos[-1]) / 2
    d = pos - centre
    gw = jax.ops.segment_sum(bw, gid, num_segments=m, indices_are_sorted=True)
    gs = jax.ops.segment_sum(bw * d, gid, num_segments=m, indices_are_sorted=True)
    gq = jax.ops.segment_sum(bw * d * d, gid, num_segments=m, indices_are_sorted=True)
    zero = jnp.zeros((1,), dtype)
    pw, ps, pq = (tuple(jnp.concatenate([zero, p]) for p in _cumsum2(v)) for v in (gw, gs, gq))

    def cost(t, j):
        dw = _range_sums(pw, t, j)
        ds = _range_sums(ps, t, j)
        dq = _range_sums(pq, t, j)
        c = dq - ds * ds / jnp.where(dw > 0, dw, 1)
        return jnp.where(dw > 0, jnp.maximum(c, 0), 0)

    big = jnp.int32(m + 1)
    num_levels = m.bit_length()
    mh = (m + 1) // 2  # queries at the finest level: the odd j <= m
    slots = 2 * m + mh + 1
    i_q = jnp.arange(mh, dtype=jnp.int32)
    i_s = jnp.arange(slots, dtype=jnp.int32)

    def level(lev, carry, dprev):
        # Queries of this level: odd multiples of `step`; their neighbours j -/+ step were
        # solved at coarser levels and bound the optimal split (monotonicity).
        opt, dcur = carry
        step = jnp.left_shift(jnp.int32(1), num_levels - 1 - lev)
        js = step * (2 * i_q + 1)
        live = js <= m
        jc = jnp.minimum(js, m)
        lo_q = opt[jc - jnp.minimum(step, jc)]
        hi_q = jnp.where(js + step <= m, opt[jnp.minimum(js + step, m)], jc)
        hi_q = jnp.minimum(hi_q, jc)
        length = jnp.where(live, hi_q - lo_q + 1, 0)
        off = jnp.cumsum(length) - length
        starts = jnp.zeros((slots,), jnp.int32).at[jnp.where(live, off, slots)].add(1, mode="drop")
        q = jnp.cumsum(starts) - 1  # the query that owns each slot
        t = lo_q[q] + i_s - off[q]
        ok = t <= hi_q[q]
        t = jnp.clip(t, 0, m)
        val = jnp.where(ok, dprev[t] + cost(t, jc[q]), jnp.inf)
        best = jax.ops.segment_min(val, q, num_segments=mh, indices_are_sorted=True)
        arg = jnp.where(ok & (val <= best[q]), t, big)
        arg = jax.ops.segment_min(arg, q, num_segments=mh, indices_are_sorted=True)
        dst = jnp.where(live, js, m + 1)
        return opt.at[dst].set(arg, mode="drop"), dcur.at[dst].set(best, mode="drop")

    def layer(dprev, _):
        init = (jnp.zeros((m + 1,), jnp.int32), jnp.zeros((m + 1,), dtype))
        opt, dcur = lax.fori_loop(0, num_levels, lambda lev, c: level(lev, c, dprev), init)
        return dcur, opt

    j_all = jnp.arange(m + 1, dtype=jnp.int32)
    d1 = cost(jnp.zeros_like(j_all), j_all)
    _, opts = lax.scan(layer, d1, None, length=k - 1)

    def back(j, opt):
        return opt[j], opt[j]

    # Walk back from the whole range: the start of the last cluster, then of the one
    # before it, ...; cluster i spans groups starts[i] .. stops[i] - 1.
    _, ys = lax.scan(back, jnp.int32(m), opts, reverse=True)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ys])
    stops = jnp.concatenate([ys, jnp.full((1,), m, jnp.int32)])
    cw = _range_sums(pw, starts, stops)
    cs = _range_sums(ps, starts, stops)
    c = centre + cs / jnp.where(cw > 0, cw, 1)
    # An empty cluster (fewer groups than k) repeats the next non-empty centre.
    c = lax.cummin(jnp.where(cw > 0, c, jnp.inf), reverse=True)
    c = jnp.where(jnp.isfinite(c), c, jnp.max(jnp.where(jnp.isfinite(c), c, -jnp.inf)))
    return jnp.sort(c)


def _lloyd(c, pos, prefix_w, prefix_s, lo, scale, max_iters, tol):
    """Lloyd iterations on the sorted summary; returns ``(centroids, iterations)``."""
    b = pos.shape[0]

    def update(c):
        mid = (c[1:] + c[:-1]) / 2
        cut = jnp.searchsorted(pos, mid, side="right")
        starts = jnp.concatenate([jnp.zeros((1,), cut.dtype), cut])
        stops = jnp.concatenate([cut, jnp.full((1,), b, cut.dtype)])
        cw = _range_sums(prefix_w, starts, stops)
        cs = _range_sums(prefix_s, starts, stops)
        # An empty cluster keeps its centre; its neighbours stay on either side of it.
        return jnp.where(cw > 0, lo + cs / jnp.where(cw > 0, cw, 1), c)

    def cond(state):
        _, it, delta = state
        return (it < max_iters) & (delta > tol * scale)

    def body(state):
        c, it, _ = state
        new = update(c)
        return new, it + 1, jnp.max(jnp.abs(new - c))

    c, it, _ = lax.while_loop(cond, body, (c, jnp.int32(0), jnp.array(jnp.inf, c.dtype)))
    return c, it


def _assign(c, x):
    """Index of the nearest of the ascending centroids ``c`` (ties to the lower index)."""
    if c.shape[0] == 1:
        return jnp.zeros(x.shape, jnp.int32)
    mid = (c[1:] + c[:-1]) / 2
    method = "compare_all" if c.shape[0] <= 32 else "scan"
    return jnp.searchsorted(mid, x, side="left", method=method).astype(jnp.int32)


def _check_shapes(values, weights, valid) -> None:
    """``values`` real; ``weights`` and ``valid`` (when given) shaped like it, ``valid`` bool."""
    dtype = jnp.result_type(values)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"values must be a real array, got dtype {dtype}.")
    shape = jnp.shape(values)
    for name, arr in (("weights", weights), ("valid", valid)):
        if arr is not None and jnp.shape(arr) != shape:
            raise ValueError(
                f"{name} must have the shape of values {shape}, got {jnp.shape(arr)}; build "
                f"it from the same array as values."
            )
    if valid is not None and jnp.result_type(valid) != jnp.bool_:
        raise TypeError(
            f"valid must be a boolean array (True = take part), got dtype "
            f"{jnp.result_type(valid)}; pass e.g. mask.astype(bool)."
        )


def kmeans_1d(
    values: jax.typing.ArrayLike,
    num_clusters: int,
    *,
    weights: jax.typing.ArrayLike | None = None,
    valid: jax.typing.ArrayLike | None = None,
    init: Init = "dp",
    max_iters: int = 100,
    tol: float = 1e-6,
    key: jax.Array | None = None,
    num_bins: int = 16384,
) -> KMeansResult:
    r"""Weighted k-means of scalar values, exploiting one dimension; works under ``jit``.

    Minimises the weighted within-cluster sum of squares

    .. math::
      \min_{c_1 \le \dots \le c_k} \sum_{i\,:\,\text{valid}_i} w_i
      \min_j (x_i - c_j)^2, \qquad
      c_j = \frac{\sum_{i \in j} w_i x_i}{\sum_{i \in j} w_i},

    the Hessian-weighted k-means of Choi et al. (2017) when ``w`` is a Fisher diagonal.

    How it runs: inputs with at most ``num_bins`` entries are sorted once and clustered
    exactly as given. Larger inputs are summarised by a weighted histogram of ``num_bins``
    equal-width bins over ``[min, max]`` (one O(n) pass; no sort); Lloyd's iterations then
    move whole bins, so the boundaries it finds are accurate to one bin width. Each
    iteration costs O(k log B) (binary search of the midpoints, prefix-sum differences).
    The final step is exact per value: assign every value to its nearest centroid,
    re-centre each centroid on the values it owns, assign again, and sum the inertia over
    the values. Lloyd is a local method: from ``"linear"``, ``"quantile"``,
    ``"density"`` or ``"kmeans++"`` it can stop far from the optimum. ``init="dp"``
    (the default) solves the problem exactly on a coarsened summary of about
    ``2 * max(512, 8k)`` groups (equal-weight groups where values are dense, equal-width
    groups in the tails) by dynamic programming, O(k M log M), and Lloyd then polishes.
    When every group holds a single value (e.g. up to ``max(512, 8k)`` values of similar
    weight) the DP is exact up to float32 rounding. Measured excess inertia over the
    exact optimum (``python benchmarks/bench_kmeans.py --n N``; normal / Laplace /
    bimodal "pruned" data)::

      init       k    n = 2e4 (normal/Laplace/bimodal)   n = 2e5
      dp         16   +0.002% / +0.002% / +0.009%         +0.003% / +0.003% / +0.002%
      dp         256  +0.07%  / +0.17%  / +0.21%          +0.09%  / +0.09%  / +0.14%
      density    16   +0.28%  / +0.35%  / +0.36%          +0.07%  / +0.11%  / +0.01%
      density    256  +114%   / +446%   / +291%           +15%    / +95%    / +17%
      linear     16   +0.53%  / +11%    / +30%            +0.26%  / +1.7%   / +29%
      linear     256  +134%   / +453%   / +379%           +182%   / +530%   / +319%

    ``"linear"`` (Deep Compression's choice) stays available by name.

    Args:
      values: real array of any shape; it is flattened. Computation is in float32 (or
        float64 for float64 inputs when x64 is on).
      num_clusters: ``k >= 1``, static under ``jit``.
      weights: non-negative array shaped like ``values`` (e.g. the Fisher); ``None`` means
        all ones. Entries with weight 0 take no part in the centroids but are assigned.
      valid: boolean array shaped like ``values``; ``False`` entries (pruned weights) take
        no part and get assignment ``-1``, the reserved exact zero.
      init: ``"linear"`` (``k`` evenly spaced points from min to max, Deep Compression's
        choice), ``"quantile"`` (weighted quantiles at ``(j + 1/2)/k``), ``"kmeans++"``
        (D^2 sampling, needs ``key``), ``"density"`` (weighted quantiles of
        :math:`p(x)^{1/3}`, the asymptotically optimal centroid density of Panter & Dite)
        or ``"dp"`` (exact dynamic program on the coarsened summary; Wang & Song 2011).
      max_iters: most Lloyd iterations on the summary (0 keeps the initial centroids up
        to the final exact re-centring).
      tol: stop when no centroid moves more than ``tol * (max - min)``.
      key: PRNG key for ``init="kmeans++"``.
      num_bins: summary size ``B`` (static): inputs larger than this are histogrammed into
        ``B`` bins.

    Returns:
      A :class:`KMeansResult` ``(centroids, assignments, inertia, iterations)``. With no
      valid entry: zero centroids, all assignments ``-1``, inertia 0, 0 iterations.

    Raises:
      ValueError: if ``num_clusters < 1``, ``init`` is unknown, ``kmeans++`` lacks a key,
        ``max_iters``, ``tol`` or ``num_bins`` is out of range, or ``weights``/``valid`` do
        not have the shape of ``values``.
      TypeError: if ``values`` is not real, ``valid`` is not boolean, ``key`` is not a PRNG
        key, or ``num_clusters``, ``max_iters``, ``num_bins`` or ``tol`` is not a number of
        the right kind (a bool or a float where an int is expected).

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> x = jnp.array([0.0, 0.1, 0.2, 5.0, 5.1, 9.0])
      >>> r = fisher_optax.kmeans_1d(x, 3)
      >>> r.centroids
      Array([0.1 , 5.05, 9.  ], dtype=float32)
      >>> r.assignments
      Array([0, 0, 0, 1, 1, 2], dtype=int32)
      >>> fisher_optax.kmeans_1d(x, 2, valid=x < 9).assignments  # 9.0 is pruned
      Array([ 0,  0,  0,  1,  1, -1], dtype=int32)

    References:
      Choi, El-Khamy, Lee. Towards the Limit of Network Quantization. ICLR 2017.
      https://arxiv.org/abs/1612.01543

      Han, Mao, Dally. Deep Compression. ICLR 2016. https://arxiv.org/abs/1510.00149

      Wang, Song. Ckmeans.1d.dp: Optimal k-means Clustering in One Dimension by Dynamic
      Programming. The R Journal 3(2), 2011.

      Panter, Dite. Quantization Distortion in Pulse-Count Modulation with Nonuniform
      Spacing of Levels. Proc. IRE 39(1), 1951.
    """
    num_clusters = _validate.integer(num_clusters, "num_clusters", minimum=1)
    init = _validate.choice(init, "init", INITS)
    if init == "kmeans++" and key is None:
        raise ValueError(
            "init='kmeans++' samples its centres and needs a PRNG key; pass "
            "key=jax.random.key(0), or use init='density', 'quantile' or 'linear'."
        )
    if key is not None:
        _validate.key(key)
    max_iters = _validate.integer(max_iters, "max_iters", minimum=0)
    tol = _validate.real(tol, "tol", low=0.0, meaning="relative centroid movement to stop at")
    num_bins = _validate.integer(num_bins, "num_bins", minimum=2)
    _check_shapes(values, weights, valid)
    # Flatten and fill in the optional inputs here, so that every call with the same
    # length, dtype and static arguments reuses one compiled function.
    values = jnp.asarray(values)
    shape = values.shape
    dtype = jnp.promote_types(values.dtype, jnp.float32)
    x = values.reshape(-1).astype(dtype)
    w = jnp.ones_like(x) if weights is None else jnp.asarray(weights).reshape(-1).astype(dtype)
    ok = jnp.ones(x.shape, bool) if valid is None else jnp.asarray(valid).reshape(-1)
    result = _kmeans_1d(
        x,
        w,
        ok,
        jax.random.key(0) if key is None else key,
        num_clusters=num_clusters,
        init=init,
        max_iters=max_iters,
        tol=tol,
        num_bins=num_bins,
    )
    return result._replace(assignments=result.assignments.reshape(shape))


@jax.jit(static_argnames=("num_clusters", "init", "max_iters", "tol", "num_bins"))
def _kmeans_1d(x, w, ok, key, *, num_clusters, init, max_iters, tol, num_bins):
    dtype = x.dtype
    w = jnp.maximum(w, 0)
    k = num_clusters
    if x.shape[0] == 0:
        return KMeansResult(
            jnp.zeros((k,), dtype), jnp.zeros((0,), jnp.int32), jnp.zeros((), dtype), jnp.int32(0)
        )
    any_valid = jnp.any(ok)
    lo = jnp.where(any_valid, jnp.min(jnp.where(ok, x, jnp.inf)), 0).astype(dtype)
    hi = jnp.where(any_valid, jnp.max(jnp.where(ok, x, -jnp.inf)), 0).astype(dtype)

    pos, bw, bs = _summarize(x, w, ok, num_bins, lo, hi)
    zero = jnp.zeros((1,), dtype)
    prefix_w = tuple(jnp.concatenate([zero, p]) for p in _cumsum2(bw))
    prefix_s = tuple(jnp.concatenate([zero, p]) for p in _cumsum2(bs))

    c0 = _init_centroids(init, k, pos, bw, lo, hi, key)
    # With at most k distinct occupied summary points (e.g. k larger than the number of
    # distinct values) the optimum puts one centroid on each: zero inertia in exact mode.
    # An occupied point is new when it differs from the last occupied point before it.
    last = lax.cummax(jnp.where(bw > 0, jnp.arange(pos.shape[0]), -1))
    prev = jnp.concatenate([jnp.full((1,), -1, last.dtype), last[:-1]])
    occupied = (bw > 0) & ((prev < 0) | (pos != pos[jnp.maximum(prev, 0)]))
    slot = jnp.cumsum(occupied) - 1
    few = (slot[-1] + 1 <= k) & any_valid
    distinct = jnp.full((k,), hi, dtype).at[jnp.where(occupied, slot, k)].set(pos, mode="drop")
    c0 = jnp.where(few, distinct, c0)
    c0 = jnp.where(any_valid & jnp.isfinite(c0), c0, lo)  # no weight at all: no NaN
    c, iters = _lloyd(c0, pos, prefix_w, prefix_s, lo, hi - lo, max_iters, tol)

    # Exact per value: assign, re-centre on the values owned, assign again.
    wv = jnp.where(ok, w, 0)
    a = _assign(c, x)
    sums = jax.ops.segment_sum(jnp.stack([wv, wv * (x - lo)], axis=1), a, num_segments=k)
    c = jnp.where(sums[:, 0] > 0, lo + sums[:, 1] / jnp.where(sums[:, 0] > 0, sums[:, 0], 1), c)
    c = jnp.sort(c)  # re-centring keeps the order in exact arithmetic; make it certain
    a = _assign(c, x)
    inertia = jnp.sum(wv * jnp.square(x - c[a]))

    c = jnp.where(any_valid, c, 0)
    a = jnp.where(ok, a, -1)
    return KMeansResult(c, a, inertia, jnp.where(any_valid, iters, 0))


# ---------------------------------------------------------------------------------------
# Host-side (NumPy) k-means: what quantize and allocate_bits run, once per model, on
# concrete values. Compiling a jitted k-means per shape costs seconds; this costs
# milliseconds at the sizes of a layer's surviving weights. Every row of a 2-D array is
# clustered on its own, vectorised over the rows (no Python loop over rows); one group of
# values is the one-row case.

HOST_INITS: dict[str, str] = {k: v for k, v in INITS.items() if k != "kmeans++"}
"""The starts :func:`kmeans_rows_host` takes: those of :data:`INITS` but ``"kmeans++"``."""


def _searchsorted_rows(a, q, side):
    """``np.searchsorted(a[r], q[r], side)`` for every row ``r`` by one vectorised bisection.

    ``a``: ``(R, L)``, each row ascending (``+inf`` padding allowed); ``q``: ``(R, Q)``.
    """
    rows, length = a.shape
    if rows == 1:  # NumPy's own search, several times faster than the bisection below
        return np.searchsorted(a[0], q[0], side=side)[None].astype(np.int64)
    lo = np.zeros(q.shape, np.int64)
    hi = np.full(q.shape, length, np.int64)
    if length == 0:
        return lo
    r = np.arange(rows)[:, None]
    while True:
        live = lo < hi
        if not live.any():
            return lo
        mid = (lo + hi) // 2
        v = a[r, np.minimum(mid, length - 1)]
        go = (v <= q) if side == "right" else (v < q)
        lo = np.where(live & go, mid + 1, lo)
        hi = np.where(live & ~go, mid, hi)


def _dp_rows(gw, gs, gq, mg, k):
    """Exact weighted k-means of sorted groups by DP, per row; returns cluster starts.

    ``gw, gs, gq``: ``(R, M)``, per group its weight, weighted sum and weighted sum of
    squares (about a common centre); row ``r`` has ``mg[r]`` groups (zero padding after).
    ``D_i(j) = min_t D_{i-1}(t) + cost(t, j)``; the optimal split is monotone in ``j``
    (the cost is Monge), so each layer is a divide and conquer, run level by level with
    every segment of a level, of every row, vectorised: a segment carries its row. Ties go
    to the earliest split. Returns ``(R, k)`` cluster start indices.
    """
    rows, m = gw.shape
    zero = np.zeros((rows, 1))
    pw = np.concatenate([zero, np.cumsum(gw, 1)], 1)
    ps = np.concatenate([zero, np.cumsum(gs, 1)], 1)
    pq = np.concatenate([zero, np.cumsum(gq, 1)], 1)

    # Flat (row-major) prefix sums: a 1-D gather is several times faster than a 2-D one.
    pw, ps, pq = pw.ravel(), ps.ravel(), pq.ravel()

    def cost(ft, fj):  # flat indices ``row * (m + 1) + t`` and ``row * (m + 1) + j``
        dw = pw[fj] - pw[ft]
        ds = ps[fj] - ps[ft]
        c = (pq[fj] - pq[ft]) - ds * ds / np.where(dw > 0, dw, 1)
        return np.where(dw > 0, np.maximum(c, 0), 0)

    stride = m + 1
    base_all = np.repeat(np.arange(rows) * stride, stride)
    dprev = cost(base_all, base_all + np.tile(np.arange(stride), rows))
    mg = np.asarray(mg, np.int64)
    opts = []
    for _ in range(k - 1):
        dcur = np.zeros(rows * stride)
        opt = np.zeros(rows * stride, np.int64)
        sb = np.arange(rows) * stride  # each segment's row offset
        jl, jr = np.zeros(rows, np.int64), mg.copy()
        tl, tr = np.zeros(rows, np.int64), mg.copy()
        while jl.size:
            mid = (jl + jr) // 2
            hi = np.minimum(tr, mid)
            length = hi - tl + 1
            starts = np.cumsum(length) - length
            seg = np.repeat(np.arange(mid.size), length)
            t = tl[seg] + (np.arange(seg.size) - starts[seg])
            ft = sb[seg] + t
            val = dprev[ft] + cost(ft, (sb + mid)[seg])
            best = np.minimum.reduceat(val, starts)
            hit = np.flatnonzero(val <= best[seg])
            first = hit[np.searchsorted(seg[hit], np.arange(mid.size))]
            arg = t[first]
            dcur[sb + mid], opt[sb + mid] = best, arg
            left, right = mid - 1 >= jl, mid + 1 <= jr
            sb, jl, jr, tl, tr = (
                np.concatenate([sb[left], sb[right]]),
                np.concatenate([jl[left], mid[right] + 1]),
                np.concatenate([mid[left] - 1, jr[right]]),
                np.concatenate([tl[left], arg[right]]),
                np.concatenate([arg[left], tr[right]]),
            )
        opts.append(opt)
        dprev = dcur
    starts = np.zeros((rows, k), np.int64)
    j = mg.copy()
    for i in range(k - 1, 0, -1):
        j = opts[i - 1][np.arange(rows) * stride + j]
        starts[:, i] = j
    return starts


def _lloyd_rows(c, u, wu, nu, max_iters=100):
    """Lloyd per row on sorted distinct values ``u`` (weights ``wu``, counts ``nu``).

    ``c`` and ``u`` are ``+inf``-padded on the right. Exact per value. A cluster whose
    weights sum to zero (e.g. a Fisher of 0 everywhere on it) is centred on the unweighted
    mean of its values: unweighted k-means there, not a collapsed centre. A row stops when
    its centroids stop changing; rows that have converged are not updated again.
    """
    rows = u.shape[0]
    real = np.isfinite(u)
    su = np.where(real, u, 0.0)
    zero = np.zeros((rows, 1))
    pw = np.concatenate([zero, np.cumsum(wu, 1)], 1)
    ps = np.concatenate([zero, np.cumsum(wu * su, 1)], 1)
    pn = np.concatenate([zero, np.cumsum(nu, 1)], 1)
    pu = np.concatenate([zero, np.cumsum(nu * su, 1)], 1)
    size = np.full((rows, 1), u.shape[1], np.int64)
    active = np.arange(rows)
    c = c.copy()
    for _ in range(max_iters):
        if not active.size:
            break
        ca = c[active]
        cut = _searchsorted_rows(u[active], (ca[:, 1:] + ca[:, :-1]) / 2, "right")
        lo = np.concatenate([np.zeros((active.size, 1), np.int64), cut], 1)
        hi = np.concatenate([cut, size[active]], 1)
        r = active[:, None]
        cw, cs = pw[r, hi] - pw[r, lo], ps[r, hi] - ps[r, lo]
        cn, cu = pn[r, hi] - pn[r, lo], pu[r, hi] - pu[r, lo]
        with np.errstate(invalid="ignore"):
            new = np.where(
                cw > 0, cs / np.where(cw > 0, cw, 1), np.where(cn > 0, cu / np.maximum(cn, 1), ca)
            )
        new = np.sort(new, 1)
        moved = ~np.all(new == ca, 1)
        c[active[moved]] = new[moved]
        active = active[moved]
    return c


_ROW_BLOCK = 1 << 15  # values per block of rows in kmeans_rows_host


def kmeans_rows_host(
    values: jax.typing.ArrayLike,
    num_clusters: int,
    *,
    weights: jax.typing.ArrayLike | None = None,
    valid: jax.typing.ArrayLike | None = None,
    init: Init = "dp",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted 1-D k-means of every row of a 2-D array, on the host in NumPy (no compile).

    The objective of :func:`kmeans_1d`, solved per row on the row's ``valid`` entries; row
    ``r``'s result depends on row ``r`` alone. What :func:`~fisher_optax.quantize` and
    :func:`~fisher_optax.allocate_bits` run: one row per group of weights, or one row per
    output channel for per-channel codebooks. Computation is in float64.

    Per row: centroids ascend and every one owns a value (at most ``min(k, m)`` for ``m``
    distinct values; a row with ``m <= k`` gets each value as its own centroid). A zero
    total weight falls back to unweighted k-means (all weights 1); a cluster of zero
    weight is centred on its unweighted mean. ``init="dp"``: the exact dynamic program on
    at most ``2 * max(512, 8k)`` groups of the sorted distinct values (exact when there
    are no more distinct values than that), then Lloyd on the values; the other starts
    (``"linear"`` as in Deep Compression, ``"quantile"``, ``"density"``) start Lloyd from
    their points and may leave clusters empty, which are dropped.

    Args:
      values: real array ``(R, n)``; for one group of values pass ``x[None]``.
      num_clusters: ``k >= 1``, the most centroids per row.
      weights: optional non-negative array shaped like ``values``; ``None``: all ones.
      valid: optional bool array shaped like ``values``; only ``True`` entries take part.
      init: a key of :data:`HOST_INITS`.

    Returns:
      ``(centroids, counts, assignments)``: ``centroids`` ``(R, K)`` float64 with row
      ``r``'s ``counts[r]`` ascending centroids first and its last centroid repeated after
      them (0 for a row with no valid entry), ``K`` the smaller of ``num_clusters`` and the
      most distinct valid values in a row (at least 1); ``counts``
      ``(R,)`` int; ``assignments`` ``(R, n)`` int64 indices into the row's centroids, 0
      where not valid.

    Raises:
      ValueError: if ``values`` is not 2-D, ``num_clusters < 1``, ``init`` is unknown, or
        ``weights``/``valid`` do not have the shape of ``values``.
      TypeError: if ``values`` is not real, ``valid`` is not boolean or ``num_clusters``
        is not an int.

    Examples:
      >>> import numpy as np, fisher_optax
      >>> x = np.array([[0.0, 0.1, 0.2, 5.0, 5.1, 9.0], [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]])
      >>> centroids, counts, assignments = fisher_optax.kmeans_rows_host(x, 3)
      >>> centroids
      array([[0.1 , 5.05, 9.  ],
             [1.  , 2.  , 3.  ]])
      >>> assignments
      array([[0, 0, 0, 1, 1, 2],
             [0, 0, 1, 1, 2, 2]])
    """
    k = _validate.integer(num_clusters, "num_clusters", minimum=1)
    init = _validate.choice(init, "init", HOST_INITS)
    _check_shapes(values, weights, valid)
    if np.ndim(values) != 2:
        raise ValueError(
            f"values must be 2-D (rows, n), got shape {np.shape(values)}; for one group of "
            "values pass x[None] (one row), for a leaf's channels move them to the rows."
        )
    x = np.asarray(values, np.float64)
    valid = np.ones(x.shape, bool) if valid is None else np.asarray(valid, bool)
    w = np.ones_like(x) if weights is None else np.asarray(weights, np.float64)
    u, wu, nu, m, inv = _row_summaries(x, w, valid)
    cent, counts, a_u = _solve_row_summaries(u, wu, nu, m, k, init)
    assign = np.where(valid, np.take_along_axis(a_u, inv, 1), 0)
    return cent, counts, assign


def _row_summaries(x, w, valid):
    """Per row, the weighted histogram of its ``valid`` values: ``(u, wu, nu, m, inv)``.

    ``u`` ``(R, L)``: the distinct values ascending, ``+inf`` after the first ``m[r]``;
    ``wu``, ``nu``: their summed weights and counts (0 in the padding); ``inv`` ``(R, n)``:
    each entry's index into its row of ``u`` (0 where not valid). This summary is all
    the k-means reads (:func:`_solve_row_summaries`).
    """
    rows, n = x.shape
    w = np.where(valid, w, 0.0)
    ri = np.arange(rows)[:, None]
    # Distinct sorted values per row (np.unique row by row): invalid entries sort last.
    key = np.where(valid, x, np.inf)
    order = np.argsort(key, axis=1)
    xs = np.take_along_axis(key, order, 1)
    vs = np.take_along_axis(valid, order, 1)
    new = vs & np.concatenate([np.ones((rows, 1), bool), xs[:, 1:] != xs[:, :-1]], 1)
    uid = np.cumsum(new, 1) - 1
    m = new.sum(1)
    width = max(int(m.max(initial=0)), 1)
    u = np.full((rows, width), np.inf)
    u[np.broadcast_to(ri, xs.shape)[vs], uid[vs]] = xs[vs]
    inv = np.zeros((rows, n), np.int64)
    np.put_along_axis(inv, order, np.where(vs, uid, 0), 1)
    # Per distinct value its weight and count, summed in the original order (as bincount
    # over np.unique's inverse does).
    flat = (ri * width + inv)[valid]
    wu = np.bincount(flat, w[valid], minlength=rows * width).reshape(rows, width)
    nu = np.bincount(flat, minlength=rows * width).reshape(rows, width).astype(np.float64)
    return u, wu, nu, m, inv


def _solve_row_summaries(u, wu, nu, m, k, init):
    """Weighted 1-D k-means of every row's histogram (see :func:`_row_summaries`).

    Returns ``(centroids, counts, assignment per distinct value)``, laid out as
    :func:`kmeans_rows_host` returns them. A row of zero total weight is clustered
    unweighted (its weights become its counts, as all-ones weights would sum to). The
    summaries of disjoint parts of a row add up (values merged, weights and counts summed),
    which is how :func:`~fisher_optax.quantize` clusters a row spread over processes.
    """
    rows, width = u.shape
    dead = ~(wu.sum(1) > 0)  # no weight: unweighted
    wu = np.where(dead[:, None], nu, wu)
    k_out = min(k, width)
    cent = u[:, :k_out].copy()  # a row with m <= k distinct values: each its own centroid
    a_u = np.broadcast_to(np.arange(width), (rows, width)).copy()
    big = np.flatnonzero(m > k)
    # Blocks of rows small enough to stay in cache (the DP gathers from prefix sums).
    step = max(1, _ROW_BLOCK // width)
    for s in range(0, big.size, step):
        blk = big[s : s + step]
        c, a = _kmeans_rows_big(u[blk], wu[blk], nu[blk], m[blk], k, init)
        cent[blk] = np.inf
        cent[blk, : c.shape[1]] = c
        a_u[blk] = a
    counts = np.isfinite(cent).sum(1)
    last = np.where(counts > 0, cent[np.arange(rows), np.maximum(counts - 1, 0)], 0.0)
    cent = np.where(np.arange(k_out) < counts[:, None], cent, last[:, None])
    return cent, counts, a_u


def _kmeans_rows_big(u, wu, nu, m, k, init):
    """The rows with more than ``k`` distinct values: ``(centroids, assignment per value)``.

    ``u``: ``(R, L)`` distinct values ascending, ``+inf`` after the first ``m[r]``; ``wu``,
    ``nu``: their weights and counts (0 in the padding). Centroids come back compacted
    (used ones first, ``+inf`` after), assignments index them.
    """
    rows, width = u.shape
    ri = np.arange(rows)[:, None]
    real = np.arange(width)[None, :] < m[:, None]
    if init == "dp":
        c0 = _unique_rows(_dp_init_rows(u, wu, nu, m, k))
    elif init == "linear":
        c0 = np.sort(np.linspace(u[:, 0], u[np.arange(rows), m - 1], k, axis=1), 1)
    else:
        mass = wu if init == "quantile" else np.cbrt(wu)
        mass_sum = np.array([mass[r, : m[r]].sum() for r in range(rows)])
        cdf = np.cumsum(mass, 1) / mass_sum[:, None]
        cdf = np.where(real, cdf, np.inf)
        q = np.broadcast_to((np.arange(k) + 0.5) / k, (rows, k))
        j = np.minimum(_searchsorted_rows(cdf, q, "left"), (m - 1)[:, None])
        c0 = _unique_rows(u[ri, j])
    c = _lloyd_rows(c0, u, wu, nu)
    mids = (c[:, 1:] + c[:, :-1]) / 2
    a = _searchsorted_rows(mids, np.where(real, u, -np.inf), "left")
    used = np.zeros((rows, k), bool)
    used[np.broadcast_to(ri, a.shape)[real], a[real]] = True
    new_index = np.cumsum(used, 1) - 1
    out = np.full((rows, k), np.inf)
    out[np.broadcast_to(ri, used.shape)[used], new_index[used]] = c[used]
    return out, np.take_along_axis(new_index, a, 1)


def _dp_init_rows(u, wu, nu, m, k):
    """``init="dp"``: per row, the exact k-means centroids of at most ``2 * max(512, 8k)``
    contiguous groups of its distinct values (each value its own group when there are no
    more; :func:`_coarse_groups`, weighted by ``wu``), ``+inf`` where a row has fewer groups
    than ``k``. The groups are fine where the weight is dense and in the sparse tails, which
    is where the optimum puts centroids on few values.
    """
    rows, width = u.shape
    ri = np.arange(rows)[:, None]
    col = np.arange(width)[None, :]
    real = col < m[:, None]
    lo_u = u[:, 0]
    hi_u = u[np.arange(rows), m - 1]
    gid, mg = _coarse_groups(u, wu, m, max(512, 8 * k))
    # A row of zero weight would leave the DP indifferent: it splits by the counts there.
    ww = np.where(wu > 0, wu, 0.0)
    ww = np.where((~(ww.sum(1) > 0))[:, None], nu, ww)
    centre = (lo_u + hi_u) / 2
    d = np.where(real, u - centre[:, None], 0.0)
    gmax = int(mg.max())
    slot = np.where(real, ri * (gmax + 1) + gid, ri * (gmax + 1) + gmax)  # padding: dump
    size = rows * (gmax + 1)
    gw, gs, gq = (
        np.bincount(slot.ravel(), v.ravel(), minlength=size).reshape(rows, gmax + 1)[:, :gmax]
        for v in (ww, ww * d, ww * d * d)
    )
    c0 = np.full((rows, k), np.inf)
    kk = np.minimum(k, mg)
    for kval in np.unique(kk):  # a handful of distinct cluster counts at most
        sel = np.flatnonzero(kk == kval)
        starts = _dp_rows(gw[sel], gs[sel], gq[sel], mg[sel], int(kval))
        stops = np.concatenate([starts[:, 1:], mg[sel, None]], 1)
        zero = np.zeros((sel.size, 1))
        pw = np.concatenate([zero, np.cumsum(gw[sel], 1)], 1)
        ps = np.concatenate([zero, np.cumsum(gs[sel], 1)], 1)
        r = np.arange(sel.size)[:, None]
        cw = pw[r, stops] - pw[r, starts]
        c = centre[sel, None] + (ps[r, stops] - ps[r, starts]) / np.where(cw > 0, cw, 1)
        c0[sel, : int(kval)] = np.where(stops > starts, c, np.inf)
    return c0


def _unique_rows(c):
    """Per row, ``np.unique`` of the finite entries, ascending, ``+inf``-padded."""
    c = np.sort(c, 1)
    dup = np.concatenate([np.zeros((c.shape[0], 1), bool), c[:, 1:] == c[:, :-1]], 1)
    return np.sort(np.where(dup, np.inf, c), 1)


# --------------------------------------------------------------------------- ECSQ

_ECSQ_GROUPS = 256  # a row with more distinct values is coarsened to at most 2x this many


def _ecsq_rows(x, lam, *, weights, valid, max_codes, zero, pruned, entry_bits, shared):
    r"""Entropy-constrained scalar quantization of every row of ``x`` (Chou, Lookabaugh and
    Gray 1989), weighted; what ``quantize(method="ecsq")`` runs.

    Minimises, over the cells of the ``valid`` entries,

    .. math::
      J = \sum_i F_i (x_i - c_{a_i})^2
        + \lambda \Big( \sum_k n_k \log_2 \tfrac{N}{n_k} + e\,|\{k : c_k \ne 0\}| \Big),

    the order-0 code length of the cells' symbols (what an entropy coder with a table of
    the symbols' counts spends) plus ``e = entry_bits`` per codebook entry. ``N`` counts
    the row's valid entries; with ``zero``, one cell may have its value fixed at exactly 0
    (no entry to pay): its entries join the ``pruned[r]`` entries that are already zero,
    ``N`` counts those too, and the zero cell's symbol count is ``n_0 + pruned[r]`` (the
    position stream in a file is the code of which weights are zero).

    First, per row, a dynamic program over the sorted distinct values (at most
    ``2 * _ECSQ_GROUPS`` contiguous groups of them for larger rows) finds the best
    partition into contiguous cells, exactly: ``D(j) = min_t D(t) + cost(t, j)``, O(M^2)
    for ``M`` groups. Cells are contiguous in value, which is where the optimum lies when
    every ``F_i`` is equal; with unequal weights a cell of the optimum can interleave with
    another (a high-Fisher weight pays for a precise entry, a zero-Fisher one takes the
    cheapest code), so the dynamic program bounds the optimum from above. Then ECSQ
    Lloyd iterations, per entry: each takes the cell of least
    ``F_i (x_i - c_k)^2 + \lambda \ell_k`` with ``\ell_k = \log_2 (N / n_k)`` from the
    previous counts, cells are re-centred on their weighted means, and counts refreshed;
    ``J`` never increases; they stop when one gains less than ``_ECSQ_RTOL`` of ``J``.
    With ``shared``, the code lengths of the Lloyd steps are those of one symbol stream
    for all rows (a symbol is a cell's rank in its row, as the per-slice codebooks of a
    file share one code stream per leaf); the dynamic program still uses each row's own
    counts.

    A row never gets more than ``max_codes`` nonzero cells: when the program gives more,
    the rows concerned are solved again with a larger price per cell.

    Args:
      x: float64 ``(R, n)``.
      lam: ``\lambda > 0``, the distortion one bit is worth.
      weights: ``(R, n)`` non-negative, or ``None`` (all ones).
      valid: bool ``(R, n)``, the entries to quantize.
      max_codes: the most nonzero cells per row.
      zero: whether a cell at exactly 0 may be used.
      pruned: ``(R,)`` entries of each row that are zero already (read with ``zero``).
      entry_bits: ``e``, the bits one codebook entry costs.
      shared: one code-length table for all rows in the Lloyd steps.

    Returns:
      ``(centroids, counts, assignments, objective)``: ``centroids`` ``(R, K)`` with row
      ``r``'s ``counts[r]`` ascending nonzero-cell values first and its last one repeated
      (0 for a row without), ``assignments`` ``(R, n)``: the entry's cell, ``-1`` for the
      zero cell and for entries that are not valid; ``objective``: ``J`` summed over rows
      (with the shared table when ``shared``).
    """
    rows = x.shape[0]
    w = np.ones_like(x) if weights is None else np.asarray(weights, np.float64)
    w = np.where(valid, w, 0.0)
    pruned = np.zeros(rows) if not zero or pruned is None else np.asarray(pruned, np.float64)
    n_valid = valid.sum(1).astype(np.float64)
    total = n_valid + pruned
    u, wu, nu, m, inv = _row_summaries(x, w, valid)
    cent, a_u = _ecsq_dp_rows(u, wu, nu, m, lam, total, pruned, zero, entry_bits, max_codes)
    a = np.where(valid, np.take_along_axis(a_u, inv, 1), -1)  # each entry: its value's cell
    model = (lam, total, pruned, zero, entry_bits, shared)
    cent, a, objective = _ecsq_lloyd(x, w, valid, cent, a, model)
    counts = np.isfinite(cent).sum(1)
    last = np.where(counts > 0, cent[np.arange(rows), np.maximum(counts - 1, 0)], 0.0)
    width = max(int(counts.max(initial=0)), 1)
    cent = np.where(np.arange(width) < counts[:, None], cent[:, :width], last[:, None])
    return cent, counts, a, objective


def _coarse_groups(u, mass, m, groups):
    """Per row, the id of each distinct value's contiguous group and the number of groups.

    Rows with at most ``2 * groups`` distinct values keep each value as its own group. A
    group of a larger row ends where the cumulative ``mass`` crosses a multiple of
    ``total / groups`` or the value crosses a multiple of ``(max - min) / groups``: fine
    where the mass is dense and in the sparse tails.
    """
    rows, width = u.shape
    col = np.arange(width)[None, :]
    real = col < m[:, None]
    lo_u = np.where(m > 0, u[:, 0], 0.0)  # a row with no value: 0, not inf - inf
    hi_u = np.where(m > 0, u[np.arange(rows), np.maximum(m - 1, 0)], 0.0)
    # Row sums as NumPy sums each row alone (pairwise summation depends on length).
    total = np.array([mass[r, : m[r]].sum() for r in range(rows)])
    total = np.maximum(total, np.finfo(np.float64).tiny)[:, None]
    before = np.cumsum(mass, 1) - mass
    by_weight = np.floor(before / total * groups).astype(np.int64)
    span = np.maximum(hi_u - lo_u, np.finfo(np.float64).tiny)[:, None]
    su = np.where(real, u, lo_u[:, None])
    by_width = np.clip(np.floor((su - lo_u[:, None]) / span * groups), 0, groups - 1)
    key = by_weight * (groups + 1) + by_width.astype(np.int64)
    step = np.concatenate([np.zeros((rows, 1), bool), key[:, 1:] != key[:, :-1]], 1)
    coarse = np.cumsum(step & real, 1)
    gid = np.where((m <= 2 * groups)[:, None], col, coarse)
    mg = np.where(m > 0, gid[np.arange(rows), np.maximum(m - 1, 0)] + 1, 0)
    return gid, mg


def _xlogn(n, total):
    """``n log2(total / n)``, 0 where ``n`` is 0."""
    n = np.asarray(n, np.float64)
    tiny = np.finfo(np.float64).tiny  # n = 0 gives 0 * finite, with no warning to silence
    return n * (np.log2(np.maximum(total, tiny)) - np.log2(np.maximum(n, tiny)))


def _ecsq_dp_rows(u, wu, nu, m, lam, total, pruned, zero, entry_bits, max_codes):
    """The exact best partition of each row's (coarsened) distinct values into contiguous
    cells, as :func:`_ecsq_rows` defines the cost; a row with more than ``max_codes``
    nonzero cells is solved again with a larger price per cell.

    Returns ``(centroids (R, K) +inf-padded, cell per distinct value)`` where the cell is
    ``-1`` for the zero cell.
    """
    rows, width = u.shape
    gid, mg = _coarse_groups(u, nu, m, _ECSQ_GROUPS)
    M = max(int(mg.max(initial=0)), 1)
    real = np.arange(width)[None, :] < m[:, None]
    slot = np.where(real, np.arange(rows)[:, None] * (M + 1) + gid, rows * (M + 1))
    size = rows * (M + 1) + 1
    su = np.where(real, u, 0.0)
    lo_u = su[:, 0]
    hi_u = su[np.arange(rows), np.maximum(m - 1, 0)]
    centre = (lo_u + hi_u) / 2
    d = np.where(real, su - centre[:, None], 0.0)

    def group_sums(v):
        return np.bincount(slot.ravel(), v.ravel(), minlength=size)[:-1].reshape(rows, M + 1)

    def prefix(v):
        return np.concatenate([np.zeros((rows, 1)), np.cumsum(group_sums(v)[:, :M], 1)], 1)

    pn, pw, ps, pq = (prefix(v) for v in (nu, wu, wu * d, wu * d * d))
    pz = prefix(wu * su * su)  # distortion about 0, for the zero cell
    pm, pmd = prefix(nu), prefix(nu * d)  # a cell of zero Fisher: its unweighted mean
    price = np.full(rows, float(entry_bits) * lam)
    todo = np.arange(rows)
    cent = np.full((rows, min(max_codes, M)), np.inf)
    a_u = np.full((rows, width), -1, np.int64)
    scale = np.maximum(pq[:, -1] + 1e-300, lam)
    while todo.size:
        starts, kinds = _ecsq_dp(
            pn[todo], pw[todo], ps[todo], pq[todo], pz[todo], total[todo], pruned[todo],
            zero, lam, price[todo], mg[todo],
        )  # fmt: skip
        too_many = []
        for j, r in enumerate(todo):
            s = [int(t) for t in starts[j] if t >= 0][::-1]
            k = [bool(z) for z in kinds[j][: len(s)]][::-1]
            stops = [*s[1:], int(mg[r])] if s else []
            nonzero = [(t, e) for t, e, z in zip(s, stops, k, strict=True) if not z]
            if len(nonzero) > max_codes:
                too_many.append(j)
                continue
            g = gid[r, : m[r]]
            cell = np.full(M, -1, np.int64)
            for c, (t, e) in enumerate(nonzero):
                cell[t:e] = c
                dw = pw[r, e] - pw[r, t]
                if dw > 0:
                    cent[r, c] = centre[r] + (ps[r, e] - ps[r, t]) / dw
                else:
                    dm = pm[r, e] - pm[r, t]
                    cent[r, c] = centre[r] + (pmd[r, e] - pmd[r, t]) / max(dm, 1e-300)
            a_u[r, : m[r]] = cell[g]
        todo = todo[too_many]
        price[todo] = 4 * np.maximum(price[todo], 1e-9 * scale[todo])
    return cent, a_u


def _ecsq_dp(pn, pw, ps, pq, pz, total, pruned, zero, lam, price, mg):
    """The dynamic program of :func:`_ecsq_dp_rows` on prefix sums ``(R, M + 1)``.

    State ``(j, z)``: the first ``j`` groups are cut into cells, ``z`` whether one is the
    zero cell. Returns, per row, the start of each cell walking back from the end
    (``-1`` after the first) and whether it is the zero cell.
    """
    rows, width = pn.shape
    M = width - 1
    inf = np.inf
    d0 = np.full((rows, M + 1), inf)
    d1 = np.full((rows, M + 1), inf)
    d0[:, 0] = 0.0
    arg0 = np.zeros((rows, M + 1), np.int64)
    arg1 = np.zeros((rows, M + 1), np.int64)
    from0 = np.zeros((rows, M + 1), bool)  # state 1 reached from state 0 by the zero cell
    tot = total[:, None]
    base = pruned[:, None]
    for j in range(1, M + 1):
        n = pn[:, j : j + 1] - pn[:, :j]
        dw = pw[:, j : j + 1] - pw[:, :j]
        ds = ps[:, j : j + 1] - ps[:, :j]
        dq = pq[:, j : j + 1] - pq[:, :j]
        sse = np.where(dw > 0, np.maximum(dq - ds * ds / np.where(dw > 0, dw, 1), 0), 0)
        cell = sse + lam * _xlogn(n, tot) + np.where(n > 0, price[:, None], 0.0)
        c0 = d0[:, :j] + cell
        arg0[:, j] = np.argmin(c0, 1)
        d0[:, j] = np.take_along_axis(c0, arg0[:, j : j + 1], 1)[:, 0]
        if zero:
            zc = (pz[:, j : j + 1] - pz[:, :j]) + lam * _xlogn(n + base, tot)
            c1 = d1[:, :j] + cell
            cz = d0[:, :j] + zc
            a1, az = np.argmin(c1, 1), np.argmin(cz, 1)
            v1 = np.take_along_axis(c1, a1[:, None], 1)[:, 0]
            vz = np.take_along_axis(cz, az[:, None], 1)[:, 0]
            from0[:, j] = vz < v1
            arg1[:, j] = np.where(from0[:, j], az, a1)
            d1[:, j] = np.minimum(v1, vz)
    # The end of each row is its own number of groups (padding after it is free).
    ends = np.asarray(mg, np.int64)
    r = np.arange(rows)
    end0 = d0[r, ends] + lam * _xlogn(pruned, total)
    state = np.zeros(rows, bool)
    if zero:
        state = d1[r, ends] < end0
    starts = np.full((rows, M + 1), -1, np.int64)
    kinds = np.zeros((rows, M + 1), bool)
    j = ends.copy()
    for step in range(M + 1):
        live = j > 0
        if not live.any():
            break
        t = np.where(state, arg1[r, j], arg0[r, j])
        via_zero = state & from0[r, j]
        starts[live, step] = t[live]
        kinds[live, step] = via_zero[live]
        state = np.where(via_zero, False, state)
        j = np.where(live, t, 0)
    return starts, kinds


def _ecsq_cost(xv, wv, rv, cent, a, model):
    """``J`` of :func:`_ecsq_rows` for the valid entries ``xv`` (weights ``wv``, rows
    ``rv``) assigned to cells ``a`` (``-1``: the zero cell) of ``cent`` ``(R, K)``."""
    lam, total, pruned, _, entry_bits, shared = model
    rows, k = cent.shape
    val = np.where(a >= 0, cent[rv, np.maximum(a, 0)], 0.0)
    dist = float(np.sum(wv * np.square(xv - val)))
    counts = np.bincount(rv * k + np.maximum(a, 0), weights=a >= 0, minlength=rows * k)
    counts = counts.reshape(rows, k)
    nz = np.bincount(rv, weights=a < 0, minlength=rows) + pruned
    if shared:
        rate = _xlogn(counts.sum(0), total.sum()).sum() + _xlogn(nz.sum(), total.sum())
    else:
        rate = _xlogn(counts, total[:, None]).sum() + _xlogn(nz, total).sum()
    return dist + lam * (float(rate) + entry_bits * int(np.count_nonzero(counts)))


def _ecsq_lloyd(x, w, valid, cent, a, model, max_iters=50):
    """ECSQ Lloyd iterations from the cells ``cent`` and assignment ``a`` of
    :func:`_ecsq_rows`; returns the best ``(centroids, assignment, J)`` seen.

    Centroids come back compacted per row (used cells ascending, ``+inf`` after), and the
    assignment indexes them.
    """
    lam, total, pruned, zero, _, shared = model
    rows = x.shape[0]
    ri, ci = np.nonzero(valid)
    xv, wv, rv = x[ri, ci], w[ri, ci], ri
    av = a[ri, ci]
    cent, av = _compact(cent, av, rv)
    best = (cent, av, _ecsq_cost(xv, wv, rv, cent, av, model))
    for _ in range(max_iters):
        cent, av, cost = best
        k = cent.shape[1]
        counts = np.bincount(rv * k + np.maximum(av, 0), weights=av >= 0, minlength=rows * k)
        counts = counts.reshape(rows, k)
        nz = np.bincount(rv, weights=av < 0, minlength=rows) + pruned
        with np.errstate(divide="ignore", invalid="ignore"):  # unused cells: inf or nan
            if shared:
                length = np.broadcast_to(np.log2(total.sum() / counts.sum(0)), (rows, k))
                length_z = np.full(rows, np.log2(total.sum() / max(nz.sum(), 0.0)))
            else:
                length = np.log2(total[:, None] / counts)
                length_z = np.log2(total / nz)
        # A cell that no entry holds (or the zero cell when unused) costs an infinite
        # code length: iterations only ever drop cells.
        length = np.where(counts > 0, length, np.inf)
        new = _ecsq_assign(xv, wv, rv, cent, lam * length, lam * length_z if zero else None)
        sw = np.bincount(rv * k + np.maximum(new, 0), weights=wv * (new >= 0), minlength=rows * k)
        sx = np.bincount(
            rv * k + np.maximum(new, 0), weights=wv * xv * (new >= 0), minlength=rows * k
        )
        sn = np.bincount(rv * k + np.maximum(new, 0), weights=new >= 0, minlength=rows * k)
        su = np.bincount(rv * k + np.maximum(new, 0), weights=xv * (new >= 0), minlength=rows * k)
        sw, sx, sn, su = (v.reshape(rows, k) for v in (sw, sx, sn, su))
        with np.errstate(invalid="ignore", divide="ignore"):
            moved = np.where(sw > 0, sx / sw, np.where(sn > 0, su / sn, np.inf))
        moved, new = _compact(moved, new, rv)
        cost_new = _ecsq_cost(xv, wv, rv, moved, new, model)
        if not cost_new < cost:
            break
        best = (moved, new, cost_new)
        if cost - cost_new <= _ECSQ_RTOL * cost:
            break
            break
    cent, av, cost = best
    out = np.full(x.shape, -1, np.int64)
    out[ri, ci] = av
    return cent, out, cost


# Lloyd stops when an iteration gains less than this fraction of J: after the DP, the
# iterations gain about 0.2% in all on a 784x300 kernel, most of it in the first few.
_ECSQ_RTOL = 1e-4
_ASSIGN_BLOCK = 1 << 22  # entries x cells per block of the assignment


def _ecsq_assign(xv, wv, rv, cent, price, price_zero):
    """Per entry the cell of least ``w (x - c_k)^2 + price[row, k]``, or ``-1`` for the zero
    cell (``w x^2 + price_zero[row]``; ``None``: no zero cell). Ties go to the lower cell;
    cells at ``+inf`` or of infinite price are never chosen."""
    k = cent.shape[1]
    finite = np.isfinite(cent) & np.isfinite(price)
    c = np.where(finite, cent, 0.0)
    p = np.where(finite, price, np.inf)
    out = np.empty(xv.shape, np.int64)
    step = max(1, _ASSIGN_BLOCK // k)
    for s in range(0, xv.size, step):
        x, w, r = xv[s : s + step, None], wv[s : s + step, None], rv[s : s + step]
        score = w * np.square(x - c[r]) + p[r]
        best = np.argmin(score, 1)
        if price_zero is not None:
            zero = w[:, 0] * np.square(x[:, 0]) + price_zero[r]
            best = np.where(zero < np.take_along_axis(score, best[:, None], 1)[:, 0], -1, best)
        out[s : s + step] = best
    return out


def _compact(cent, av, rv):
    """Per row, the finite centroids ascending and first (``+inf`` after), and ``av``
    (cells of the entries of rows ``rv``, ``-1`` kept) renumbered to match."""
    order = np.argsort(cent, 1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(cent.shape[1])[None, :], 1)
    sorted_cent = np.take_along_axis(cent, order, 1)
    used = max(int(np.isfinite(sorted_cent).sum(1).max(initial=0)), 1)
    new = np.where(av >= 0, rank[rv, np.maximum(av, 0)], -1)
    return sorted_cent[:, :used], new
