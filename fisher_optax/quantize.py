"""Fisher-guided bit allocation and weight-sharing quantization of parameter pytrees.

The second half of Tu et al. (2016): the weights that survive pruning are stored with
few bits, and weights with more Fisher information get more bits. :func:`allocate_bits`
clusters the survivors' log-Fisher into groups and hands out bit widths by group;
:func:`quantize` replaces the weights of each ``b``-bit group of a leaf by the ``2^b``
entries of a codebook (k-means weight sharing, Fisher-weighted as in Choi et al. 2017,
or an evenly spaced grid); :func:`dequantize` turns the codes back into float params.

Pruned weights (mask ``False`` or 0 bits) are not part of any group: they hold no code
and no codebook entry and come back as exact zeros.
"""

import itertools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax import _validate
from fisher_optax._tree import check_matching, keystr, leaves_with_paths, strip_value
from fisher_optax._types import Bits, Fisher, Mask, Params
from fisher_optax.kmeans import INITS, Init, kmeans_1d

__all__ = ["QuantizedParams", "allocate_bits", "dequantize", "quantize"]

MAX_BITS = 16
Method = Literal["kmeans", "uniform"]
METHODS: dict[str, str] = {
    "kmeans": "weighted k-means codebook per group (Choi et al. 2017; Deep Compression)",
    "uniform": "evenly spaced grid from the group's min to its max (fixed point)",
}
Quantizable = None | Callable[[tuple, Any], bool] | Any
_SCOPES = ("global", "layer")


@jax.tree_util.register_pytree_with_keys_class
class QuantizedParams:
    """Quantized parameters: per leaf, either a bit map, codes and codebooks, or the raw leaf.

    A pytree node that stores nothing it could derive. Build it with :func:`quantize`; read
    it back with :func:`dequantize`. Leaf ``i`` (in ``jax.tree`` flattening order of the
    original params) is one of two kinds:

    * **quantized**: ``bits[i]`` is a uint8 array shaped like the leaf, the weight's width
      ``b`` in ``1..16``, or 0 for a pruned weight (the one way to say "pruned": a pruned
      weight has no code and no codebook entry and dequantizes to exact 0).
      ``codes[i]`` is shaped like the leaf, in the smallest unsigned dtype that holds
      every code of the leaf (uint8 when its widest width is <= 8 bits, else uint16): the
      index into the codebook of the weight's width; 0 where pruned. ``codebooks[i]`` is
      a dict ``{b: book}`` keyed by width (ascending), one 1-D float ``book`` per width
      present among the kept weights, ascending, with ``min(2^b, m)`` entries for ``m``
      distinct kept values of that width; every code of width ``b`` is ``< len(book)``.
      ``raw[i]`` is ``None``.
    * **raw** (not quantized: by default biases, norm scales and every non-float leaf
      such as step counters): ``raw[i]`` is the leaf exactly as given (any dtype);
      ``bits[i]`` and ``codes[i]`` are ``None`` and ``codebooks[i]`` is ``{}``.

    The dict keys are pytree structure, so :attr:`widths` is static, also under ``jit``.

    Attributes:
      bits: per leaf, the uint8 bit map (quantized) or ``None`` (raw).
      codes: per leaf, the uint8/uint16 codes (quantized) or ``None`` (raw).
      codebooks: per leaf, ``{width: book}`` (quantized) or ``{}`` (raw).
      raw: per leaf, ``None`` (quantized) or the leaf as it was (raw).
      treedef: static, the structure of the original params.
      dtypes: static, per leaf, the original dtype name (what :func:`dequantize` returns).

    Derived (properties, not stored): ``widths`` (per leaf, the ascending keys of its
    codebooks), ``paths`` (per leaf, its key path from ``treedef`` via
    ``fisher_optax._tree.keystr``, e.g. ``['dense']['kernel']``), ``shapes`` (per leaf,
    its shape) and ``quantized`` (per leaf, whether it is of the quantized kind).
    """

    def __init__(self, bits, codes, codebooks, raw, *, treedef, dtypes):
        self.bits = tuple(bits)
        self.codes = tuple(codes)
        self.codebooks = tuple(dict(sorted((int(b), c) for b, c in d.items())) for d in codebooks)
        self.raw = tuple(raw)
        self.treedef = treedef
        self.dtypes = tuple(str(d) for d in dtypes)

    @property
    def widths(self) -> tuple[tuple[int, ...], ...]:
        """Per leaf, the ascending bit widths that have a codebook (``()`` for raw leaves)."""
        return tuple(tuple(books) for books in self.codebooks)

    @property
    def paths(self) -> tuple[str, ...]:
        """Per leaf, its key path as a string, read from ``treedef``."""
        skeleton = jax.tree.unflatten(self.treedef, list(range(self.treedef.num_leaves)))
        return tuple(keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(skeleton)[0])

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per leaf, its shape."""
        return tuple(
            tuple(np.shape(r if b is None else b)) for b, r in zip(self.bits, self.raw, strict=True)
        )

    @property
    def quantized(self) -> tuple[bool, ...]:
        """Per leaf, ``True`` if it holds codes and codebooks, ``False`` if it is raw."""
        return tuple(b is not None for b in self.bits)

    def tree_flatten_with_keys(self):
        gk = jax.tree_util.GetAttrKey
        children = tuple((gk(n), getattr(self, n)) for n in ("bits", "codes", "codebooks", "raw"))
        return children, (self.treedef, self.dtypes)

    @classmethod
    def tree_unflatten(cls, static, children):
        treedef, dtypes = static
        return cls(*children, treedef=treedef, dtypes=dtypes)

    def __repr__(self) -> str:
        leaves = ", ".join(
            f"{p}: {s} " + (f"bits {list(w)}" if q else f"raw {d}")
            for p, s, w, q, d in zip(
                self.paths, self.shapes, self.widths, self.quantized, self.dtypes, strict=True
            )
        )
        return f"QuantizedParams({leaves})"


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _check_width(b, what: str) -> int:
    if not _is_int(b) or not 1 <= b <= MAX_BITS:
        raise ValueError(
            f"{what} must be an int in 1..{MAX_BITS}, got {b!r}. Widths above {MAX_BITS} are "
            "not quantization; prune a weight with a mask (or 0 in an allocate_bits tree), "
            "not with bits=0."
        )
    return int(b)


def _check_bit_widths(bit_widths) -> tuple[int, ...]:
    widths = tuple(bit_widths)
    if not widths:
        raise ValueError("bit_widths must hold at least one width, e.g. (8, 6, 4, 2).")
    for b in widths:
        _check_width(b, "every entry of bit_widths")
    if len(set(widths)) != len(widths):
        raise ValueError(f"bit_widths must be distinct, got {widths}.")
    return tuple(sorted(widths, reverse=True))


def _candidate_allocations(num_groups: int, widths_desc: tuple[int, ...]) -> np.ndarray:
    """All monotone maps group rank -> width: ``[num_candidates, num_groups]``.

    Row ``r`` gives the width of the group with the highest Fisher first; widths never
    increase down a row (a group never gets more bits than a group with more Fisher).
    """
    rows = itertools.combinations_with_replacement(widths_desc, num_groups)
    return np.array([sorted(r, reverse=True) for r in rows], dtype=np.int32)


def _choose_allocation(counts, candidates, budget):
    """Index of the candidate with the most mean bits ``<= budget`` (ties: most bits first).

    ``counts[g]``: surviving weights in the group of Fisher rank ``g`` (0 = highest). Means
    are compared with a relative slack of 1e-6 for float32 rounding.
    """
    counts = counts.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(counts), 1)
    mean = (jnp.asarray(candidates, jnp.float32) @ counts) / total
    slack = 1e-6 * jnp.maximum(jnp.abs(budget), 1)
    feasible = mean <= budget + slack
    best = jnp.max(jnp.where(feasible, mean, -jnp.inf))
    tie = feasible & (mean >= best - slack)
    # Lexicographic rank of each row (w_0, w_1, ...), larger = more bits to high Fisher.
    order = np.lexsort(candidates.T[::-1])
    lex_rank = np.empty(len(candidates), np.int32)
    lex_rank[order] = np.arange(len(candidates))
    return jnp.argmax(jnp.where(tie, jnp.asarray(lex_rank), -1))


def allocate_bits(
    fisher: Fisher,
    *,
    bit_widths: tuple[int, ...] = (8, 6, 4, 2),
    mask: Mask | None = None,
    scope: str = "global",
    average_bits: float | None = None,
) -> Bits:
    r"""Bit widths per weight from the Fisher: more Fisher information, more bits.

    The surviving weights' :math:`\log F` (``F`` clamped below at the smallest positive
    normal float) is clustered with :func:`kmeans_1d` (``init="density"``) into
    ``G = len(bit_widths)`` groups, over all leaves (``scope="global"``) or leaf by leaf
    (``scope="layer"``). Groups are ranked by their centroid; pruned weights get 0 bits.

    Without a budget, the group of rank ``g`` (0 = highest Fisher) gets the ``g``-th
    largest width. With ``average_bits=β``, every monotone map from group rank to width
    (``w_0 >= w_1 >= ... >= w_{G-1}``, widths from ``bit_widths``, repeats allowed) is a
    candidate, and the chosen one maximises the mean over surviving weights

    .. math::
      \bar b = \frac{\sum_g n_g w_g}{\sum_g n_g} \le \beta ,

    ties broken in favour of more bits for the higher-Fisher groups (lexicographic order
    of ``(w_0, w_1, ...)``). With ``scope="layer"`` the map is shared by all leaves (rank
    ``g`` in every leaf gets ``w_g``) and ``n_g`` counts rank-``g`` weights over all leaves.

    Args:
      fisher: pytree of non-negative arrays (a Fisher diagonal) shaped like the params.
      bit_widths: distinct widths in ``1..16``.
      mask: optional bool pytree like ``fisher``; ``False`` = pruned, gets 0 bits.
      scope: ``"global"`` or ``"layer"``.
      average_bits: optional budget ``β`` on the mean bits of surviving weights.

    Returns:
      An int32 pytree shaped like ``fisher``: 0 for pruned weights, else a width from
      ``bit_widths``.

    Raises:
      ValueError: on widths outside ``1..16`` or repeated, an unknown ``scope``, a ``mask``
        that does not match ``fisher``, or a budget below ``min(bit_widths)`` (no
        allocation fits; checked when the budget is a Python number).

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> fisher = {"w": jnp.array([1e-6, 2e-6, 1e-3, 2e-3, 1.0, 2.0])}
      >>> fisher_optax.allocate_bits(fisher, bit_widths=(8, 4, 2))["w"]
      Array([2, 2, 4, 4, 8, 8], dtype=int32)
      >>> fisher_optax.allocate_bits(fisher, bit_widths=(8, 4, 2), average_bits=4)["w"]
      Array([2, 2, 2, 2, 8, 8], dtype=int32)

    References:
      Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using
      Information Theory. ISVLSI 2016. https://arxiv.org/abs/1605.04859
    """
    widths_desc = _check_bit_widths(bit_widths)
    if scope not in _SCOPES:
        raise ValueError(f"allocate_bits: scope must be one of {_SCOPES}, got {scope!r}.")
    leaves = [leaf for _, leaf in leaves_with_paths(fisher)]
    treedef = jax.tree.structure(fisher)
    if mask is None:
        masks = [jnp.ones(jnp.shape(f), bool) for f in leaves]
    else:
        masks = [
            jnp.asarray(m, bool)
            for m in check_matching(fisher, mask, ref_name="fisher", other_name="mask")
        ]
    if average_bits is not None and isinstance(average_bits, int | float):
        if average_bits < min(widths_desc):
            raise ValueError(
                f"allocate_bits: average_bits={average_bits} is below the smallest width "
                f"{min(widths_desc)}; no allocation fits. Raise the budget or add a smaller "
                "width to bit_widths."
            )
    return _allocate(leaves, masks, treedef, widths_desc, scope, average_bits)


def _allocate(leaves, masks, treedef, widths_desc, scope, average_bits):
    g = len(widths_desc)
    tiny = jnp.finfo(jnp.float32).tiny
    logs = [jnp.log(jnp.maximum(jnp.asarray(f, jnp.float32), tiny)).reshape(-1) for f in leaves]
    oks = [m.reshape(-1) for m in masks]
    if scope == "global":
        sizes = [x.shape[0] for x in logs]
        r = kmeans_1d(jnp.concatenate(logs), g, valid=jnp.concatenate(oks), init="density")
        splits = np.cumsum(sizes)[:-1]
        assign = jnp.split(r.assignments, splits)
    else:
        assign = [None] * len(logs)
        fn = lambda x, ok: kmeans_1d(x, g, valid=ok, init="density").assignments
        for idx in _buckets([x.shape[0] for x in logs]):
            size = max(logs[i].shape[0] for i in idx)
            out = jax.vmap(fn)(
                jnp.stack([_pad(logs[i], size, 0) for i in idx]),
                jnp.stack([_pad(oks[i], size, False) for i in idx]),
            )
            for j, i in enumerate(idx):
                assign[i] = out[j, : logs[i].shape[0]]
    # kmeans centroids ascend: cluster j has Fisher rank g - 1 - j (rank 0 = highest).
    ranks = [jnp.where(a >= 0, g - 1 - a, -1) for a in assign]
    if average_bits is None:
        table = jnp.asarray(widths_desc, jnp.int32)
    else:
        counts = sum(jnp.bincount(jnp.where(r >= 0, r, g), length=g + 1)[:g] for r in ranks)
        candidates = _candidate_allocations(g, widths_desc)
        best = _choose_allocation(counts, candidates, average_bits)
        table = jnp.asarray(candidates)[best]
    out = [
        jnp.where(r >= 0, table[jnp.maximum(r, 0)], 0).astype(jnp.int32).reshape(jnp.shape(f))
        for r, f in zip(ranks, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _concrete_bits(leaf, path: str) -> np.ndarray:
    try:
        arr = np.asarray(leaf)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"quantize: bits at {path} is traced; the bit widths fix the codebook sizes and "
            "must be concrete. Call allocate_bits outside jit (or pass its result in as a "
            "concrete array); quantize jits its own work."
        ) from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"quantize: bits at {path} must be an integer array, got dtype {arr.dtype}; "
            "use the tree returned by allocate_bits or cast with .astype(int)."
        )
    bad = (arr != 0) & ((arr < 1) | (arr > MAX_BITS))
    if np.any(bad):
        raise ValueError(
            f"quantize: bits at {path} must be 0 (pruned) or in 1..{MAX_BITS}, got "
            f"{arr[bad].ravel()[0]}. Widths above {MAX_BITS} are not quantization."
        )
    return arr


def quantize(
    params: Params,
    bits: int | Bits,
    *,
    fisher: Fisher | None = None,
    mask: Mask | None = None,
    method: Method = "kmeans",
    init: Init | None = None,
    quantizable: Quantizable = None,
) -> QuantizedParams:
    r"""Share weights: each ``b``-bit group of a leaf takes the ``2^b`` values of a codebook.

    A group is the set of kept weights of one leaf that have the same width ``b``. With
    ``method="kmeans"`` its codebook is the :func:`kmeans_1d` solution with ``2^b``
    clusters (``init="density"``), Fisher-weighted when ``fisher`` is given (Choi et al.
    2017):

    .. math::
      \min_{c} \sum_{i \in \text{group}} F_i \, (w_i - c_{a_i})^2 .

    With ``method="uniform"`` it is the evenly spaced grid of ``2^b`` points from the
    group's minimum to its maximum, each weight rounded to the nearest (affine uniform
    quantization, the fixed-point baseline). Pruned weights (``mask`` False, or 0 in a
    ``bits`` tree) belong to no group: they hold code 0, no codebook entry, and
    dequantize to exact 0. So the dequantized weights of a ``b``-bit group take at most
    ``2^b`` distinct values, and exact zero for pruned weights is stored apart from them.

    The work runs under one ``jit`` over the flattened params. Leaves are flattened and
    bucketed by size (padding a bucket to its largest leaf costs at most twice its real
    size, plus 4096 entries); each bucket is clustered with one ``vmap`` per width, so a
    model compiles one k-means per (bucket, width), not one per leaf or group. The bit
    widths are read outside ``jit`` (they fix the codebook sizes), so ``bits`` must be
    concrete; the jitted step is cached on the shapes and widths.

    Args:
      params: pytree of float arrays.
      bits: one int in ``1..16`` for every kept weight, or an int pytree shaped like
        ``params`` (e.g. from :func:`allocate_bits`) with values in ``{0} ∪ 1..16``, 0
        meaning pruned. It must be concrete (not traced): the widths fix array sizes.
      fisher: optional non-negative pytree shaped like ``params``: k-means weights.
      mask: optional bool pytree shaped like ``params``; ``False`` = pruned.
      method: ``"kmeans"`` or ``"uniform"``.
      init: the :func:`kmeans_1d` init. ``None`` means ``"dp"`` (near-optimal; costs
        O(2^b) DP layers) for widths up to 8 and ``"density"`` above.

    Returns:
      A :class:`QuantizedParams`.

    Raises:
      ValueError: on bits outside ``1..16`` (0 only inside a bits tree), an unknown
        ``method``, or a ``bits``/``fisher``/``mask`` tree that does not match ``params``.
      TypeError: on traced or non-integer bits, or non-float params.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.array([-1.0, -0.8, 0.0, 0.5, 1.0, 1.5])}
      >>> mask = {"w": jnp.array([True, True, False, True, True, True])}
      >>> q = fisher_optax.quantize(params, 1, mask=mask)
      >>> fisher_optax.dequantize(q)["w"]
      Array([-0.9, -0.9,  0. ,  1. ,  1. ,  1. ], dtype=float32)
      >>> q.codebooks[0][0]  # the 2^1 shared values of the 1-bit group of leaf "w"
      Array([-0.9,  1. ], dtype=float32)

    References:
      Han, Mao, Dally. Deep Compression. ICLR 2016. https://arxiv.org/abs/1510.00149

      Choi, El-Khamy, Lee. Towards the Limit of Network Quantization. ICLR 2017.
      https://arxiv.org/abs/1612.01543
    """
    _validate.choice(method, "method", METHODS)
    if init is not None:
        _validate.choice(init, "init", INITS)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    kpaths = [strip_value(p) for p, _ in flat]
    paths = [keystr(p) for p in kpaths]
    leaves = [x for _, x in flat]
    flags = _quantizable_flags(kpaths, leaves, quantizable)
    for p, leaf, f in zip(paths, leaves, flags, strict=True):
        if f and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"quantizable at {p} selects a leaf of dtype {jnp.result_type(leaf)}; only "
                "float leaves can be quantized. Leave it out of quantizable (it is then "
                "stored as it is)."
            )
    if _is_int(bits) or isinstance(bits, bool | float):
        b = _check_width(bits, "bits (one int for every weight)")
        bit_arrays = [np.full(np.shape(leaf), b, np.uint8) for leaf in leaves]
    else:
        bit_leaves = check_matching(params, bits, ref_name="params", other_name="bits")
        bit_arrays = [
            _concrete_bits(b, p).astype(np.uint8) for b, p in zip(bit_leaves, paths, strict=True)
        ]
    if mask is None:
        masks = [np.ones(np.shape(leaf), bool) for leaf in leaves]
    else:
        masks = [np.asarray(m) for m in _validate.bool_leaves(params, mask)]
    kept = [m & (b > 0) & f for m, b, f in zip(masks, bit_arrays, flags, strict=True)]
    # Only the weights that get a code must be finite (and have a usable Fisher): a raw
    # leaf is stored as it is and a pruned weight is stored as exact 0.
    checked = [x if f else np.float32(0) for x, f in zip(leaves, flags, strict=True)]
    _validate.finite(
        jax.tree.unflatten(treedef, checked),
        "params",
        where=[k if f else None for k, f in zip(kept, flags, strict=True)],
    )
    if fisher is None:
        weights = [None] * len(leaves)
    else:
        weights = [np.asarray(f) for f in _validate.fisher(params, fisher, where=kept)]
    idx = [i for i, f in enumerate(flags) if f]
    widths = {i: tuple(int(b) for b in np.unique(bit_arrays[i][kept[i]])) for i in idx}
    sizes = [np.size(leaves[i]) for i in idx]
    plan = tuple(
        (
            max(sizes[j] for j in bucket),
            tuple(sorted({w for j in bucket for w in widths[idx[j]]})),
            bucket,
        )
        for bucket in _buckets(sizes)
    )
    _, codes, books = _quantize_leaves(
        tuple(jnp.asarray(leaves[i]) for i in idx),
        tuple(jnp.asarray(np.where(kept[i], bit_arrays[i], 0).astype(np.uint8)) for i in idx),
        tuple(jnp.asarray(kept[i]) for i in idx),
        tuple(
            jnp.ones(np.shape(leaves[i]), jnp.float32)
            if weights[i] is None
            else jnp.asarray(weights[i])
            for i in idx
        ),
        plan=plan,
        leaf_widths=tuple(widths[i] for i in idx),
        method=method,
        init=init,
    )
    out_bits, out_codes, out_books, out_raw = [], [], [], []
    qi = {i: j for j, i in enumerate(idx)}
    for i, leaf in enumerate(leaves):
        if i not in qi:
            out_bits.append(None)
            out_codes.append(None)
            out_books.append({})
            out_raw.append(leaf)
            continue
        b = np.where(kept[i], bit_arrays[i], 0).astype(np.uint8)
        c, d = _trim(b, np.asarray(codes[qi[i]]), widths[i], [np.asarray(x) for x in books[qi[i]]])
        out_bits.append(b)
        out_codes.append(c)
        out_books.append(d)
        out_raw.append(None)
    return QuantizedParams(
        out_bits,
        out_codes,
        out_books,
        out_raw,
        treedef=treedef,
        dtypes=[jnp.result_type(leaf) for leaf in leaves],
    )


def _trim(bits, codes, widths, books):
    """Keep only the codebook entries some weight uses: ``min(2^b, m)`` per width.

    Codes are renumbered in the order of the kept entries (books stay ascending) and
    stored in the smallest unsigned dtype that holds the leaf's widest width.
    """
    out = np.zeros(bits.shape, np.uint8 if max(widths, default=0) <= 8 else np.uint16)
    kept_books = {}
    for b, book in zip(widths, books, strict=True):
        sel = bits == b
        used, new = np.unique(codes[sel], return_inverse=True)
        out[sel] = new.reshape(-1)
        kept_books[b] = book[used]
    return out, kept_books


def _quantizable_flags(paths, leaves, quantizable) -> list[bool]:
    """Per leaf, whether it is quantized (``True``) or stored as it is (``False``)."""
    if quantizable is None:
        return [
            np.ndim(x) >= 2 and jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves
        ]
    if callable(quantizable):
        _validate.callable_arity(quantizable, "quantizable", "quantizable(path, leaf)", 2)
        flags = [quantizable(p, x) for p, x in zip(paths, leaves, strict=True)]
    else:
        flat = jax.tree_util.tree_flatten_with_path(quantizable)[0]
        if len(flat) != len(leaves) or any(
            strip_value(q) != p for (q, _), p in zip(flat, paths, strict=False)
        ):
            raise ValueError(
                "quantizable does not match the structure of params: give one Python bool "
                "per leaf, e.g. jax.tree.map(lambda x: x.ndim >= 2, params), or a predicate "
                "quantizable(path, leaf) -> bool."
            )
        flags = [f for _, f in flat]
    for p, f in zip(paths, flags, strict=True):
        if not isinstance(f, bool | np.bool_):
            raise TypeError(
                f"quantizable at {keystr(p)} must be a Python bool (True = quantize the whole "
                f"leaf), got {type(f).__name__}."
            )
    return [bool(f) for f in flags]


def _buckets(sizes, slack: int = 4096) -> list[tuple[int, ...]]:
    """Group leaf indices so that padding each group to its largest leaf stays cheap.

    Leaves are taken by size; a group grows while its padded size is at most twice its
    real size plus ``slack`` entries. Each group becomes one ``vmap``: one compiled
    k-means per width instead of one per leaf.
    """
    buckets: list[list[int]] = []
    total = 0
    for i in sorted(range(len(sizes)), key=lambda i: sizes[i]):
        if buckets and sizes[i] * (len(buckets[-1]) + 1) <= 2 * (total + sizes[i]) + slack:
            buckets[-1].append(i)
            total += sizes[i]
        else:
            buckets.append([i])
            total = sizes[i]
    return [tuple(b) for b in buckets]


def _pad(x, size, value):
    x = x.reshape(-1)
    return jnp.concatenate([x, jnp.full((size - x.shape[0],), value, x.dtype)])


def _quantize_group(x, bits, mask, weight, widths, method, init):
    """One flat (padded) leaf: ``(bits, codes, codebooks)``, a ``[2^b]`` book per width."""
    dtype = x.dtype
    kept = mask & (bits > 0)
    codes = jnp.zeros(x.shape, jnp.int32)
    books = []
    for b in widths:
        k = 2**b
        ok = kept & (bits == b)
        if method == "kmeans":
            how = init if init is not None else ("dp" if b <= 8 else "density")
            r = kmeans_1d(x, k, weights=weight, valid=ok, init=how)
            a, book = r.assignments, r.centroids
        else:
            any_ok = jnp.any(ok)
            lo = jnp.where(any_ok, jnp.min(jnp.where(ok, x, jnp.inf)), 0).astype(dtype)
            hi = jnp.where(any_ok, jnp.max(jnp.where(ok, x, -jnp.inf)), 0).astype(dtype)
            step = (hi - lo) / (k - 1)
            safe = jnp.where(step > 0, step, 1)
            a = jnp.clip(jnp.round((x - lo) / safe), 0, k - 1).astype(jnp.int32)
            book = lo + step * jnp.arange(k, dtype=dtype)
        codes = jnp.where(ok, a, codes)
        books.append(book)
    return jnp.where(kept, bits, 0).astype(jnp.uint8), codes, tuple(books)


@jax.jit(static_argnames=("plan", "leaf_widths", "method", "init"))
def _quantize_leaves(leaves, bits, masks, weights, *, plan, leaf_widths, method, init):
    n = len(leaves)
    out_bits, out_codes, out_books = [None] * n, [None] * n, [None] * n
    for size, widths, idx in plan:
        dtype = jnp.result_type(jnp.float32, *[leaves[i].dtype for i in idx])
        xs = jnp.stack([_pad(leaves[i].astype(dtype), size, 0) for i in idx])
        bs = jnp.stack([_pad(bits[i].astype(jnp.uint8), size, 0) for i in idx])
        ms = jnp.stack([_pad(masks[i], size, False) for i in idx])
        ws = jnp.stack([_pad(weights[i].astype(dtype), size, 1) for i in idx])
        fn = lambda x, b, m, w, widths=widths: _quantize_group(x, b, m, w, widths, method, init)
        gb, gc, gbooks = jax.vmap(fn)(xs, bs, ms, ws)
        for j, i in enumerate(idx):
            shape, count = leaves[i].shape, leaves[i].size
            out_bits[i] = gb[j, :count].reshape(shape)
            out_codes[i] = gc[j, :count].reshape(shape)
            out_books[i] = tuple(gbooks[widths.index(b)][j] for b in leaf_widths[i])
    return tuple(out_bits), tuple(out_codes), tuple(out_books)


def dequantize(q: QuantizedParams) -> Params:
    """Float params from :class:`QuantizedParams`: codebook values, exact 0 where pruned.

    Args:
      q: the output of :func:`quantize` (or :func:`~fisher_optax.load_compressed`).

    Returns:
      A pytree of the original structure, shapes and dtypes.

    Raises:
      TypeError: if ``q`` is not a :class:`QuantizedParams`.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> q = fisher_optax.quantize({"w": jnp.array([0.0, 1.0, 2.0, 3.0])}, 2)
      >>> fisher_optax.dequantize(q)["w"]
      Array([0., 1., 2., 3.], dtype=float32)
    """
    if not isinstance(q, QuantizedParams):
        raise TypeError(
            f"dequantize: expected the QuantizedParams returned by quantize, got "
            f"{type(q).__name__}."
        )
    traced = any(
        not _validate.is_concrete(x) for x in jax.tree.leaves((q.bits, q.codes, q.codebooks))
    )
    xp = jnp if traced else np
    leaves = []
    for bits, codes, books, raw, dtype in zip(
        q.bits, q.codes, q.codebooks, q.raw, q.dtypes, strict=True
    ):
        if bits is None:
            leaves.append(raw)
            continue
        bits, codes = xp.asarray(bits), xp.asarray(codes).astype(xp.int32)
        out = xp.zeros(bits.shape, xp.float32)
        for b, book in books.items():
            book = xp.asarray(book)
            if book.shape[0]:
                out = xp.where(bits == b, book[xp.clip(codes, 0, book.shape[0] - 1)], out)
        leaves.append(
            jnp.asarray(out.astype(jnp.dtype(dtype))) if not traced else out.astype(dtype)
        )
    return jax.tree.unflatten(q.treedef, leaves)
