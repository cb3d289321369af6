"""Fisher-guided bit allocation and weight-sharing quantization of parameter pytrees.

The second half of Tu et al. (2016): the weights that survive pruning are stored with
few bits, and weights with more Fisher information get more bits. :func:`allocate_bits`
clusters the survivors' log-Fisher into groups and hands out bit widths by group;
:func:`quantize` replaces the weights of each ``b``-bit group of a leaf by the ``2^b``
entries of a codebook (k-means weight sharing, Fisher-weighted as in Choi et al. 2017,
an evenly spaced grid, entropy-constrained: least distortion for the bits the file's
coder spends, or a grid through 0 whose step falls as one over the root of the layer's
Fisher; :func:`quantize_to_target` at a file size); :func:`dequantize` turns the codes
back into float params.

Pruned weights (mask ``False`` or 0 bits) are not part of any group: they hold no code
and no codebook entry and come back as exact zeros.

With ``axis=`` (``quantize``) every slice along that axis, e.g. each output channel of a
kernel, gets codebooks of its own (SqueezeLLM's per-channel codebooks), and
``allocate_bits(granularity="channel")`` gives each slice one width.
"""

import itertools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fisher_optax import _validate
from fisher_optax._tree import check_matching, is_kernel, is_path_map, keystr, per_leaf
from fisher_optax._types import Bits, Fisher, Mask, Params
from fisher_optax.kmeans import (
    HOST_INITS,
    Init,
    _ecsq_rows,
    _row_summaries,
    _searchsorted_rows,
    _solve_row_summaries,
    kmeans_rows_host,
)

__all__ = ["QuantizedParams", "allocate_bits", "dequantize", "quantize", "quantize_to_target"]

MAX_BITS = 16
CodebookMethod = Literal["kmeans", "uniform", "ecsq", "fisher_step"]
CODEBOOK_METHODS: dict[str, str] = {
    "kmeans": "weighted k-means codebook per group (Choi et al. 2017; Deep Compression)",
    "uniform": "evenly spaced grid from the group's min to its max (fixed point)",
    "ecsq": "entropy-constrained: least distortion + lam * code length (Chou et al. 1989)",
    "fisher_step": "grid k * step through 0, step = sqrt(6 lam / (ln 2 * mean Fisher))",
}
# The methods that a price of a bit, lam, sets: quantize_to_target searches lam for them.
LAM_METHODS: dict[str, str] = {k: CODEBOOK_METHODS[k] for k in ("ecsq", "fisher_step")}
Quantizable = None | Callable[[tuple, Any], bool] | Any
_SCOPES = ("global", "layer")
Axis = None | int | Mapping[str | Callable[[tuple, Any], bool], int | None]
"""``None``, one int for every quantized leaf, or ``{path string or predicate: int | None}``."""


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
      distinct kept values of that width (at most that many with ``method="ecsq"`` or
      ``"fisher_step"``, which choose how many); every code of width ``b`` is ``< len(book)``.
      ``raw[i]`` is ``None``.
    * **raw** (not quantized: by default biases, norm scales and every non-float leaf
      such as step counters): ``raw[i]`` is the leaf exactly as given (any dtype);
      ``bits[i]`` and ``codes[i]`` are ``None`` and ``codebooks[i]`` is ``{}``.

    * **quantized per slice** (``axes[i] = a``, from ``quantize(..., axis=a)``): as
      quantized, but every slice ``c`` of the leaf along axis ``a`` (output channel ``c``
      of a Dense kernel ``(in, out)`` or a Conv kernel ``(h, w, in, out)`` for ``a = -1``,
      stored as ``a = ndim - 1``) has codebooks of its own: ``codebooks[i][b]`` is a 2-D
      array ``(C, K)``, ``C = shape[a]``, whose row ``c`` holds the ``L_c <= K <= 2^b``
      ascending entries of slice ``c`` first and repeats its last entry after them (0 for a
      slice without ``b``-bit weights); a code of width ``b`` in slice ``c`` is ``< L_c``.
      ``L_c`` is not stored: it is one more than the largest ``b``-bit code of slice ``c``
      (every entry is some weight's).

    ``lam`` is the price of a bit that chose the codes, recorded by ``quantize(...,
    method="ecsq")`` or ``method="fisher_step"`` and :func:`quantize_to_target` (``None``
    for the other methods and for a loaded file): :func:`~fisher_optax.rate_penalty`
    prices the codes with it.

    The dict keys are pytree structure, so :attr:`widths` is static, also under ``jit``.

    Attributes:
      bits: per leaf, the uint8 bit map (quantized) or ``None`` (raw).
      codes: per leaf, the uint8/uint16 codes (quantized) or ``None`` (raw).
      codebooks: per leaf, ``{width: book}`` (quantized) or ``{}`` (raw).
      raw: per leaf, ``None`` (quantized) or the leaf as it was (raw).
      treedef: static, the structure of the original params.
      dtypes: static, per leaf, the original dtype name (what :func:`dequantize` returns).
      axes: static, per leaf, ``None`` (one codebook per width) or the non-negative axis
        whose slices have codebooks of their own.
      lam: static, the price of a bit (distortion per bit) that produced the codes,
        or ``None`` when no such price chose them.

    Derived (properties, not stored): ``widths`` (per leaf, the ascending keys of its
    codebooks), ``paths`` (per leaf, its key path from ``treedef`` via
    ``fisher_optax._tree.keystr``, e.g. ``['dense']['kernel']``), ``shapes`` (per leaf,
    its shape) and ``quantized`` (per leaf, whether it is of the quantized kind).
    """

    def __init__(self, bits, codes, codebooks, raw, *, treedef, dtypes, axes=None, lam=None):
        self.bits = tuple(bits)
        self.codes = tuple(codes)
        self.codebooks = tuple(dict(sorted((int(b), c) for b, c in d.items())) for d in codebooks)
        self.raw = tuple(raw)
        self.treedef = treedef
        self.dtypes = tuple(str(d) for d in dtypes)
        self.axes = (None,) * len(self.bits) if axes is None else tuple(axes)
        self.axes = tuple(None if a is None else int(a) for a in self.axes)
        self.lam = None if lam is None else float(lam)

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
        return children, (self.treedef, self.dtypes, self.axes, self.lam)

    @classmethod
    def tree_unflatten(cls, static, children):
        treedef, dtypes, axes, lam = static
        return cls(*children, treedef=treedef, dtypes=dtypes, axes=axes, lam=lam)

    def __repr__(self) -> str:
        leaves = ", ".join(
            f"{p}: {s} "
            + (f"bits {list(w)}" if q else f"raw {d}")
            + ("" if a is None else f" per slice of axis {a}")
            for p, s, w, q, d, a in zip(
                self.paths,
                self.shapes,
                self.widths,
                self.quantized,
                self.dtypes,
                self.axes,
                strict=True,
            )
        )
        return f"QuantizedParams({leaves})"


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _check_width(b, what: str) -> int:
    try:
        return _validate.integer(b, what, minimum=1, maximum=MAX_BITS)
    except ValueError as e:
        raise ValueError(
            f"{e} Widths above {MAX_BITS} are not quantization; prune a weight with a mask "
            "(or 0 in an allocate_bits tree), not with bits=0."
        ) from None


def _check_bit_widths(bit_widths) -> tuple[int, ...]:
    try:
        widths = tuple(bit_widths)
    except TypeError:
        raise TypeError(
            f"bit_widths must be a sequence of widths, e.g. (8, 6, 4, 2), got {bit_widths!r}; "
            f"for one width pass ({bit_widths!r},)."
        ) from None
    if not widths:
        raise ValueError("bit_widths must hold at least one width, e.g. (8, 6, 4, 2).")
    for b in widths:
        _check_width(b, "every entry of bit_widths")
    if len(set(widths)) != len(widths):
        raise ValueError(f"bit_widths must be distinct, got {widths}.")
    return tuple(sorted(widths, reverse=True))


def _concrete(leaf, name: str, path: str) -> np.ndarray:
    """``leaf`` as a NumPy array; a traced leaf is a ``TypeError`` (the work runs on the host)."""
    if not _validate.is_concrete(leaf):
        raise TypeError(
            f"{name} at {path} is traced; quantization runs once, on the host, on concrete "
            "values (the widths fix the codebook sizes). Call it outside jit; dequantize "
            "can run under jit."
        )
    return np.asarray(leaf)


def _leaves_and_flags(params, quantizable):
    _validate.arrays_only(params, "params")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [keystr(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    flags = _quantizable_flags(params, quantizable)
    for p, leaf, f in zip(paths, leaves, flags, strict=True):
        if f and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"quantizable at {p} selects a leaf of dtype {jnp.result_type(leaf)}; only "
                "float leaves can be quantized. Leave it out of quantizable (it is then "
                "stored as it is)."
            )
    return treedef, paths, leaves, flags


def _kept_masks(params, mask, leaves, flags):
    """Per leaf, the bool array of weights that take part (mask and quantizable)."""
    if mask is None:
        masks = [np.ones(np.shape(x), bool) for x in leaves]
    else:
        masks = [np.asarray(m) for m in _validate.bool_leaves(params, mask)]
    return [m & f for m, f in zip(masks, flags, strict=True)]


def _check_values(params, fisher, treedef, leaves, flags, kept):
    """Finite kept weights; a real, finite, non-negative Fisher on them (NumPy, or None)."""
    checked = [x if f else np.float32(0) for x, f in zip(leaves, flags, strict=True)]
    where = [k if f else None for k, f in zip(kept, flags, strict=True)]
    _validate.finite(jax.tree.unflatten(treedef, checked), "params", where=where)
    if fisher is None:
        return [None] * len(leaves)
    return [
        np.asarray(f) if q else None
        for f, q in zip(_validate.fisher(params, fisher, where=kept), flags, strict=True)
    ]


Granularity = Literal["weight", "layer", "channel"]
GRANULARITIES: dict[str, str] = {
    "weight": "each weight's width from its own Fisher (groups of log-Fisher)",
    "layer": "one width per leaf from its summed saliency, under the average_bits budget",
    "channel": "one width per slice along axis (e.g. output channel), as layer, per slice",
}


def allocate_bits(
    params: Params,
    *,
    fisher: Fisher,
    mask: Mask | None = None,
    average_bits: float | None = None,
    bit_widths: tuple[int, ...] = (8, 6, 4, 2),
    scope: Literal["global", "layer"] = "global",
    granularity: Granularity = "weight",
    quantizable: Quantizable = None,
    axis: Axis = None,
    entry_bits: float = 0.0,
) -> Bits:
    r"""Bit widths per weight from the Fisher: more Fisher information, more bits.

    Only the weights :func:`quantize` codes take part: those of quantizable leaves (by default
    floating kernels, :func:`fisher_optax.is_kernel`) that ``mask`` keeps. Every other weight gets 0
    (pruned, or a leaf that :func:`quantize` stores as it is).

    ``granularity="weight"`` (Tu et al. 2016): the kept weights' :math:`\log F` (``F``
    clamped below at the smallest positive normal float32) is clustered with 1-D k-means
    (the exact dynamic program of :func:`kmeans_1d`'s ``init="dp"``) into
    ``G = len(bit_widths)`` groups, over all leaves (``scope="global"``) or leaf by leaf
    (``scope="layer"``), and groups are ranked by centroid. Without a budget, the group
    of rank ``g`` (0 = highest Fisher) gets the ``g``-th largest width. With
    ``average_bits=β``, every monotone map from rank to width (``w_0 >= w_1 >= ...``,
    repeats allowed) is a candidate and the chosen one maximises the mean

    .. math::
      \bar b = \frac{\sum_g n_g w_g}{\sum_g n_g} \le \beta ,

    ties broken in favour of more bits for higher-Fisher groups (lexicographic order of
    ``(w_0, w_1, ...)``). With ``scope="layer"`` the map is shared by all leaves and
    ``n_g`` counts rank-``g`` weights over all leaves.

    ``granularity="layer"``: each leaf ``l`` gets one width ``b_l`` for all its kept
    weights, chosen from its summed saliency :math:`S_l = \sum_i \tfrac12 F_i w_i^2`
    (:func:`~fisher_optax.saliency`, the second-order loss increase of zeroing the leaf).
    The loss increase of quantizing it at ``b`` bits is estimated as
    :math:`S_l\,4^{-b}` (the error of a ``b``-bit quantizer relative to the weights'
    second moment falls as :math:`4^{-b}` in the high-resolution limit; an estimate, not
    a measurement), and the widths minimise the total under the budget, exactly:

    .. math::
      \min_{b_l \in \text{bit\_widths}} \sum_l S_l\, 4^{-b_l}
      \quad \text{s.t.} \quad \sum_l n_l b_l \le \beta \sum_l n_l ,

    solved by a dynamic program over leaves on the Pareto front of (total bits, total
    estimate), with branch and bound; ties go to fewer total bits. ``average_bits`` is
    required here. With ``entry_bits=e > 0`` the budget also pays for the codebooks, as
    the file does: a leaf at ``b`` bits costs :math:`n_l b_l + e \min(2^{b_l}, n_l)`. A
    small leaf then no longer gets 8 bits for free: at 364 kept weights, 8 bits cost 2,912
    bits of codes but 256 entries of about 40 bits each in a
    :func:`~fisher_optax.save_compressed` file (a float32 entry and its share of the
    entropy coder's table, as :func:`~fisher_optax.compression_report` shows).

    ``granularity="channel"`` (with ``axis``, as in :func:`quantize`): the same objective
    and budget, with one width per slice along ``axis`` (``axis=-1``: per output channel;
    a leaf that ``axis`` maps to ``None`` is one unit, as in ``"layer"``), so ``l`` runs
    over all slices of all leaves, and ``entry_bits`` charges each slice's codebook. Solved
    exactly by the same dynamic program, slice by slice, that drops a partial allocation
    when even a relaxation of the slices left (fractional widths) cannot bring it below
    the best complete allocation found greedily. Use the same ``axis`` in :func:`quantize`
    to give each slice its own codebook.

    Args:
      params: the parameter pytree (the weights, for saliency and the default
        quantizable leaves).
      fisher: keyword-only; non-negative, finite pytree shaped like ``params`` (e.g.
        ``fisher_from_state(opt_state)``).
      mask: optional bool pytree like ``params``; ``False`` = pruned, gets 0 bits.
      average_bits: optional budget ``β`` on the mean bits of the coded weights
        (required for ``granularity="layer"`` and ``"channel"``).
      bit_widths: distinct widths in ``1..16``.
      scope: ``"global"`` or ``"layer"`` (``granularity="weight"`` only).
      granularity: ``"weight"``, ``"layer"`` or ``"channel"``.
      quantizable: which leaves are coded, as in :func:`quantize`.
      axis: for ``granularity="channel"`` (required there, refused otherwise): the axis
        whose slices get one width each; an int or a mapping, as in :func:`quantize`.
      entry_bits: for ``granularity="layer"`` or ``"channel"``: the bits each codebook
        entry costs the budget (default 0: the budget counts the codes only; about 40
        matches the file).

    On global arrays that span processes (``jax.distributed``), every process calls it
    with ``granularity="weight"``: the log-Fisher histograms of the shards (values and
    counts) are exchanged, never the Fisher, and the widths equal the single-process ones
    and come back with each leaf's sharding.

    Returns:
      An int32 pytree shaped like ``params``: 0 for pruned or uncoded weights, else a
      width from ``bit_widths``.

    Raises:
      ValueError: on widths outside ``1..16`` or repeated, an unknown option, a ``mask``
        or ``fisher`` that does not match ``params``, a negative or non-finite Fisher or a
        non-finite weight where it is used, a budget below ``min(bit_widths)``,
        ``granularity="layer"`` or ``"channel"`` without a budget, ``"channel"`` without
        ``axis`` (or ``axis`` with another granularity), an ``axis`` out of range,
        ``entry_bits`` with ``granularity="weight"``, a budget that cannot pay for the
        smallest width and its codebook everywhere, or ``granularity="layer"`` or
        ``"channel"`` on arrays that span processes.
      TypeError: on a mask that is not boolean, a width that is not an int (a bool or a
        float), or traced inputs (this runs on the host).

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.ones((1, 6))}
      >>> fisher = {"w": jnp.array([[1e-6, 2e-6, 1e-3, 2e-3, 1.0, 2.0]])}
      >>> fisher_optax.allocate_bits(params, fisher=fisher, bit_widths=(8, 4, 2))["w"]
      Array([[2, 2, 4, 4, 8, 8]], dtype=int32)
      >>> fisher_optax.allocate_bits(
      ...     params, fisher=fisher, bit_widths=(8, 4, 2), average_bits=4)["w"]
      Array([[2, 2, 2, 2, 8, 8]], dtype=int32)

    References:
      Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using
      Information Theory. ISVLSI 2016. https://arxiv.org/abs/1605.04859

      LeCun, Denker, Solla. Optimal Brain Damage. NeurIPS 1989.
    """
    widths_desc, average_bits, entry_bits = _check_allocation(
        fisher, bit_widths, average_bits, scope, granularity, axis, entry_bits
    )
    treedef, paths, leaves, flags = _leaves_and_flags(params, quantizable)
    if any(map(_validate.spans_processes, jax.tree.leaves((params, fisher, mask)))):
        return _allocate_across_processes(
            params,
            fisher,
            mask,
            widths_desc,
            scope,
            average_bits,
            granularity,
            treedef,
            leaves,
            flags,
        )
    kept = _kept_masks(params, mask, leaves, flags)
    fish = _check_values(params, fisher, treedef, leaves, flags, kept)
    idx = [i for i, f in enumerate(flags) if f]
    out = [np.zeros(np.shape(x), np.int32) for x in leaves]
    if idx and granularity == "weight":
        _allocate_weights(out, idx, kept, fish, widths_desc, scope, average_bits)
    elif idx:  # "layer" is "channel" with every leaf one unit
        if granularity == "layer":
            axes = [None] * len(leaves)
        else:
            axes = _leaf_axes(axis, params, paths, leaves, flags)
        weights = {i: _concrete(leaves[i], "params", paths[i]) for i in idx}
        _allocate_units(out, weights, kept, fish, axes, widths_desc, average_bits, entry_bits)
    return jax.tree.unflatten(treedef, [jax.device_put(x) for x in out])


def _check_allocation(fisher, bit_widths, average_bits, scope, granularity, axis, entry_bits):
    """The arguments of :func:`allocate_bits` that do not depend on the trees, checked.

    Returns ``(widths descending, average_bits or None, entry_bits)``.
    """
    if fisher is None:
        raise TypeError(
            "allocate_bits ranks the weights by their Fisher: pass fisher= (e.g. "
            "fisher_optax.fisher_from_state(opt_state, params=params)); for one width "
            "everywhere, quantize(params, bits) takes an int."
        )
    widths_desc = _check_bit_widths(bit_widths)
    _validate.scope(scope)
    _validate.choice(granularity, "granularity", GRANULARITIES)
    if average_bits is not None:
        average_bits = _validate.real(
            average_bits, "average_bits", low=0.0, meaning="mean bits per coded weight"
        )
        if average_bits < min(widths_desc):
            raise ValueError(
                f"average_bits={average_bits} is below the smallest width "
                f"{min(widths_desc)}; no allocation fits. Raise the budget or add a smaller "
                "width to bit_widths."
            )
    elif granularity in ("layer", "channel"):
        raise ValueError(
            f"granularity={granularity!r} chooses widths under a budget: pass average_bits "
            "(e.g. 4)."
        )
    entry_bits = _validate.real(
        entry_bits, "entry_bits", low=0.0, meaning="bits per codebook entry"
    )
    if entry_bits and granularity == "weight":
        raise ValueError(
            "entry_bits is read by granularity='layer' or 'channel' only, got "
            "granularity='weight'; drop entry_bits or pass granularity='layer'."
        )
    if granularity == "channel" and axis is None:
        raise ValueError(
            "granularity='channel' gives one width per slice along an axis: pass axis "
            "(e.g. axis=-1 for the output channels of Dense and Conv kernels)."
        )
    if granularity != "channel" and axis is not None:
        raise ValueError(
            f"axis is read by granularity='channel' only, got granularity={granularity!r}; "
            "drop axis or pass granularity='channel'."
        )
    return widths_desc, average_bits, entry_bits


def _allocate_weights(out, idx, kept, fish, widths_desc, scope, average_bits):
    """``granularity="weight"``: widths by rank of the k-means groups of log-Fisher."""
    g = len(widths_desc)
    tiny = np.finfo(np.float32).tiny
    logs = {i: np.log(np.maximum(fish[i][kept[i]].astype(np.float64), tiny)) for i in idx}
    if scope == "global":
        ranks = _ranks(np.concatenate([logs[i] for i in idx]), g)
        parts = np.split(ranks, np.cumsum([logs[i].size for i in idx])[:-1])
        ranks = dict(zip(idx, parts, strict=True))
    else:
        ranks = {i: _ranks(logs[i], g) for i in idx}
    if average_bits is None:
        table = np.asarray(widths_desc)
    else:
        counts = sum((np.bincount(ranks[i], minlength=g) for i in idx), np.zeros(g, np.int64))
        table = _choose_allocation(counts, widths_desc, average_bits)
    for i in idx:
        leaf = np.zeros(kept[i].shape, np.int32)
        leaf[kept[i]] = table[ranks[i]]
        out[i] = leaf


def _ranks(values, num_groups) -> np.ndarray:
    """Per value, the rank of its 1-D k-means group by centroid (0 = the highest)."""
    _, counts, assignments = kmeans_rows_host(values[None], num_groups)
    return counts[0] - 1 - assignments[0]


def _choose_allocation(counts, widths_desc, budget) -> np.ndarray:
    """The monotone map rank -> width with the most mean bits ``<= budget``.

    ``counts[g]``: coded weights of Fisher rank ``g`` (0 = highest). Ties (means equal up
    to a relative 1e-9) go to the lexicographically largest ``(w_0, w_1, ...)``.
    """
    g = len(counts)
    total = max(int(np.sum(counts)), 1)
    slack = 1e-9 * max(abs(budget), 1)
    best = None
    for row in itertools.combinations_with_replacement(widths_desc, g):
        row = tuple(sorted(row, reverse=True))
        mean = float(np.dot(row, counts)) / total
        if mean <= budget + slack:
            key = (round(mean / slack) if slack else mean, row)
            best = key if best is None or key > best else best
    return np.asarray(best[1] if best else (min(widths_desc),) * g)


def _as_rows(a: np.ndarray, axis: int | None) -> np.ndarray:
    """``a`` as rows: the whole array as one row (``axis=None``), else one row per slice."""
    if axis is None:
        return a.reshape(1, -1)
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def _from_rows(rows: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """The inverse of :func:`_as_rows`."""
    if axis is None:
        return rows.reshape(shape)
    moved = [shape[axis], *shape[:axis], *shape[axis + 1 :]]
    return np.moveaxis(rows.reshape(moved), 0, axis)


def _allocate_units(out, weights, kept, fish, axes, widths_desc, budget, entry_bits):
    """``granularity="layer"``/``"channel"``: one width per unit (a leaf, or a slice of it
    along its axis), from the units' saliencies under the budget (:func:`_budget_widths`).

    ``weights``: the quantizable leaves by index, as NumPy arrays.
    """
    sal, counts = [], []
    for i, x in weights.items():
        s_w = np.where(kept[i], 0.5 * fish[i] * np.square(x.astype(np.float64)), 0.0)
        sal.append(_as_rows(s_w, axes[i]).sum(1))
        counts.append(_as_rows(kept[i], axes[i]).sum(1))
    n_all = np.concatenate(counts)
    live = n_all > 0  # a unit with no kept weight has no width to choose
    widths = np.zeros(n_all.size, np.int64)
    widths[live] = _budget_widths(
        np.concatenate(sal)[live], n_all[live], widths_desc, budget, entry_bits
    )
    parts = np.split(widths, np.cumsum([s.size for s in sal])[:-1])
    for i, part in zip(weights, parts, strict=True):
        if axes[i] is None:
            per = part[0]
        else:  # one width per slice, broadcast along the other axes
            shape = [1] * kept[i].ndim
            shape[axes[i]] = part.size
            per = part.reshape(shape)
        out[i] = np.where(kept[i], per, 0).astype(np.int32)


def _budget_widths(saliency, counts, widths_desc, budget, entry_bits=0.0) -> np.ndarray:
    """Exact ``argmin sum_u S_u 4^-b_u`` s.t. ``sum_u c_u(b_u) <= budget * sum_u n_u``, with
    ``c_u(b) = n_u b + entry_bits * min(2^b, n_u)`` (codes and codebook entries).

    ``counts`` must be positive. A dynamic program over units on the Pareto front of
    (total bits, estimate), with branch and bound: a partial allocation is dropped when
    its estimate plus a lower bound for the units left exceeds the best complete
    allocation, found greedily. The bound is the fractional knapsack over every unit's
    upgrades ``b_j -> b_j+1`` taken as independent items, greedy by gain per bit: it
    relaxes the problem, so it is a lower bound whatever the costs (and it is exact for
    the linear relaxation when ``entry_bits = 0``: ``S 4^-b`` is convex in ``b``). Ties go
    to fewer total bits, then to the wider width of the unit placed last.

    Raises:
      ValueError: if even the smallest width for every unit exceeds the budget (only
        possible with ``entry_bits > 0``).
    """
    s = np.asarray(saliency, np.float64)
    n = np.asarray(counts, np.int64)
    w = np.sort(np.asarray(widths_desc, np.int64))  # ascending
    nw = w.size
    cap = budget * n.sum() * (1 + 1e-12)
    bits = n[:, None] * w[None, :] + entry_bits * np.minimum(2.0 ** w[None, :], n[:, None])
    if bits[:, 0].sum() > cap:
        raise ValueError(
            f"average_bits={budget} cannot pay for the smallest width of every unit and its "
            f"codebook (entry_bits={entry_bits}): that needs "
            f"{bits[:, 0].sum() / n.sum():.3g} bits per coded weight. Raise average_bits or "
            "lower entry_bits."
        )
    est = s[:, None] * 4.0 ** -w[None, :].astype(np.float64)
    # Upgrades w_j -> w_j+1 of every unit, by gain per bit, for the lower bound on the
    # units not yet placed.
    dbits = (bits[:, 1:] - bits[:, :-1]).ravel()
    dgain = (est[:, :-1] - est[:, 1:]).ravel()
    owner = np.repeat(np.arange(n.size), nw - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(dbits > 0, dgain / np.where(dbits > 0, dbits, 1), np.inf)
    order = np.lexsort((owner, -slope))
    dbits, dgain, owner, slope = dbits[order], dgain[order], owner[order], slope[order]
    # Incumbent: the bound's greedy, taking each unit's upgrades in order while they fit.
    level = np.zeros(n.size, np.int64)
    used = float(bits[:, 0].sum())
    for u in range(owner.size):
        c = owner[u]
        if level[c] == (order[u] % (nw - 1)) and used + dbits[u] <= cap:
            level[c] += 1
            used += dbits[u]
    best = float(est[np.arange(n.size), level].sum())
    slack = 1e-9 * max(best, 1e-300)
    base_bits_suffix = np.concatenate([np.cumsum(bits[::-1, 0])[::-1], [0]])
    base_est_suffix = np.concatenate([np.cumsum(est[::-1, 0])[::-1], [0.0]])

    def lower_bound(i, room):
        """The bound for units i.. with ``room`` bits: at most their least estimate."""
        sel = owner >= i
        db, dg = dbits[sel], dgain[sel]
        cb = np.concatenate([[0], np.cumsum(db)])
        cg = np.concatenate([[0.0], np.cumsum(dg)])
        r = room - base_bits_suffix[i]
        k = np.clip(np.searchsorted(cb, r, side="right") - 1, 0, db.size)
        db1, dg1 = np.append(db, 1), np.append(dg, 0.0)
        gain = cg[k] + np.clip((r - cb[k]) / db1[k], 0, 1) * dg1[k]
        return np.where(r >= 0, base_est_suffix[i] - gain, np.inf)

    fb, fe = np.zeros(1), np.zeros(1)  # the front: total bits, estimate
    back = []
    for i in range(n.size):
        cb = (fb[:, None] + bits[i][None, ::-1]).ravel()  # widths descending: ties -> wider
        ce = (fe[:, None] + est[i][None, ::-1]).ravel()
        ok = (cb <= cap) & (ce + lower_bound(i + 1, cap - cb) <= best + slack)
        idx = np.flatnonzero(ok)
        srt = idx[np.lexsort((ce[idx], cb[idx]))]
        e = ce[srt]
        keep = np.concatenate([[True], e[1:] < np.minimum.accumulate(e)[:-1]])
        srt = srt[keep]
        back.append(srt)
        fb, fe = cb[srt], ce[srt]
    j = int(np.argmin(fe))
    choice = np.zeros(n.size, np.int64)
    for i in range(n.size - 1, -1, -1):
        flat = back[i][j]
        choice[i] = w[::-1][flat % nw]
        j = flat // nw
    return choice


def _concrete_bits(leaf, path: str):
    """A bits leaf, checked: NumPy, or a global array as it is when it spans processes."""
    arr = leaf if _validate.spans_processes(leaf) else _concrete(leaf, "bits", path)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(
            f"bits at {path} must be an integer array, got dtype {arr.dtype}; use the tree "
            "returned by allocate_bits or cast with .astype(int)."
        )
    bad = (arr != 0) & ((arr < 1) | (arr > MAX_BITS))
    if bad.any():  # a jax reduction on a global array: NumPy cannot read other processes
        first = arr.reshape(-1)[int(bad.reshape(-1).argmax())]
        raise ValueError(
            f"bits at {path} must be 0 (pruned) or in 1..{MAX_BITS}, got "
            f"{first}. Widths above {MAX_BITS} are not quantization."
        )
    return arr


def quantize(
    params: Params,
    bits: int | Bits,
    *,
    fisher: Fisher | None = None,
    mask: Mask | None = None,
    method: CodebookMethod = "kmeans",
    init: Init = "dp",
    quantizable: Quantizable = None,
    axis: Axis = None,
    lam: float | None = None,
    prune_zero: bool = False,
) -> QuantizedParams:
    r"""Share weights: each ``b``-bit group of a leaf takes at most ``2^b`` codebook values.

    A group is the set of kept weights of one quantizable leaf that have the same width
    ``b``. With ``method="kmeans"`` its codebook is the weighted 1-D k-means solution with
    ``2^b`` clusters, Fisher-weighted when ``fisher`` is given (Choi et al. 2017):

    .. math::
      \min_{c} \sum_{i \in \text{group}} F_i \, (w_i - c_{a_i})^2 .

    ``init="dp"`` (default) solves it exactly by dynamic programming when the group has
    at most ``2 * max(512, 8 * 2^b)`` distinct values, else on that many groups of its
    sorted values, then polishes with Lloyd on the values (see :func:`kmeans_1d`);
    ``"linear"`` is Deep Compression's start. A group whose Fisher sums to zero (e.g. a
    leaf the optimizer never updated, read with ``fisher_from_state(..., missing=0.0)``)
    is clustered unweighted, and a cluster of zero Fisher is centred on the unweighted
    mean of its values: zero Fisher never collapses a codebook. In a group with some
    positive Fisher, a value of zero Fisher counts with 1e-9 of the smallest positive
    one: it takes the entries the others leave spare. A group with ``m``
    distinct values gets ``min(2^b, m)`` entries (each value its own entry when ``m <=
    2^b``); a start other than ``"dp"`` may leave a cluster empty, and the codebook then
    keeps only the entries some weight uses.

    With ``method="uniform"`` the grid is ``2^b`` evenly spaced points from the group's
    minimum to its maximum, each weight rounded to the nearest (affine fixed point); the
    codebook keeps the points some weight uses.

    With ``method="ecsq"`` (entropy-constrained scalar quantization, Chou, Lookabaugh and
    Gray 1989) the number of entries is not fixed: the codebook and the assignment
    minimise distortion plus ``lam`` times the bits the codes cost once entropy coded,

    .. math::
      \sum_i F_i (w_i - c_{a_i})^2
      + \lambda \Big( \sum_k n_k \log_2 \frac{N}{n_k} + e\,K \Big),

    where ``n_k`` weights hold entry ``k`` of ``K``, ``N`` is the number of coded weights,
    and ``e`` is what an entry costs in a :func:`~fisher_optax.save_compressed` file (its
    float, ``8 * itemsize`` bits, and its frequency in the coder's table, taken as 16 bits).
    ``n_k log2(N / n_k)`` is the order-0 code length the file's coder spends on the
    codes. ``bits`` must be one int: the cap ``2^b`` on the entries. The one ``lam``
    is shared by all leaves, which is the rate-distortion optimal allocation of bits
    between them: a leaf (or a slice) with more Fisher gets more, finer entries. Solved
    by an exact dynamic program over the sorted values of a leaf (or slice) into
    contiguous cells (on at most 512 contiguous groups of its distinct values when it has
    more), then ECSQ Lloyd iterations per weight, which never increase the objective.
    With equal Fisher (or none) the optimum is contiguous and, on at most 512 distinct
    values, the result is the exact optimum; with unequal Fisher the optimum may
    interleave cells, and the result lies between it and the best contiguous partition
    (within 2% of it on small random inputs, which ``tests/test_kmeans.py`` checks
    against a brute-force search over every assignment). With ``axis``, the slices' codes
    share one stream in the file, so the Lloyd iterations price an entry's rank in its
    slice by its count over all slices. With ``prune_zero=True`` one cell may sit at
    exactly 0 with no entry: its weights are pruned (bits 0), and they and the weights
    already pruned cost the code of the zero symbol, ``n_0 \log_2 (N / n_0)`` with ``N``
    counting every weight of the leaf (the file codes which weights are zero in its
    position stream): pruning and quantization become one rate-distortion choice.
    :func:`quantize_to_target` finds ``lam`` for a file size or a distortion.

    With ``method="fisher_step"`` every leaf (or slice, with ``axis``) gets a grid
    :math:`\{k \Delta : k \in \mathbb{Z}\}` through 0, each kept weight rounded to the
    nearest point, with the step set by the mean Fisher :math:`\bar F` of its kept weights
    (:math:`\bar F = 1` without ``fisher``) and one ``lam`` for all leaves:

    .. math::
      \Delta = \sqrt{\frac{6 \lambda}{\bar F \ln 2}} .

    Adam's ``nu`` approximates the diagonal Fisher, and after ``N`` examples a weight's
    posterior standard deviation is about :math:`1 / \sqrt{N F}`: the step is a fixed
    fraction of it. The step is also the high-rate optimum of :math:`\sum F (w - q)^2 +
    \lambda \cdot \text{bits}` for entropy-coded uniform quantizers: a step :math:`\Delta`
    costs :math:`\bar F \Delta^2 / 12` of distortion and :math:`h - \log_2 \Delta` bits per
    weight (``h`` the weights' differential entropy), and the derivative of the sum is zero
    at :math:`\Delta^2 = 6 \lambda / (\bar F \ln 2)`. More Fisher, a finer step and more
    bits, with no clustering; ``lam`` is in the units of ``"ecsq"``'s (distortion per bit of
    file). ``bits`` must be one int, ``2..16``, the cap ``2^b`` on the entries: the step is
    never below :math:`(\max w - \min w) / (2^b - 2.5)` over the kept weights, which puts
    them on at most ``2^b`` points. The codebook keeps the points some weight uses. With
    ``prune_zero=True`` the weights that round to 0 are pruned (bits 0, no entry), as with
    ``"ecsq"``; without it 0 is an entry like any other. A leaf whose kept weights all have
    zero Fisher has an infinite step: all of them round to 0.

    Pruned weights (``mask`` False, or 0 in a ``bits`` tree) belong to no group: bits 0,
    code 0, no codebook entry, dequantized to exact 0. Leaves that are not quantizable
    (by default all but floating kernels, :func:`fisher_optax.is_kernel`: biases, norm
    scales and batch statistics however stacked, every leaf with ``ndim < 2``, every non-float
    leaf, e.g. step counters or PRNG keys in a whole ``nnx.state(model)``) are stored
    exactly as they are.

    ``axis=a`` gives every slice of a leaf along axis ``a`` codebooks of its own (one per
    width present in the slice): a group is then the kept weights of one slice with the
    same width, clustered exactly as above. ``axis=-1`` is one codebook per output channel
    of a Flax Dense kernel ``(in, out)`` or Conv kernel ``(h, w, in, out)``, as in
    SqueezeLLM (Kim et al. 2023); ``axis=0`` is the output channel of an Equinox ``Linear``
    or ``Conv`` weight ``(out, in, ...)``. There is no default axis: the layout is the
    caller's to state. All slices are clustered together, vectorised (no loop over
    slices), and each slice's result equals what the per-leaf path gives on that slice
    alone. Each slice's codebook costs its entries in the file
    (:func:`~fisher_optax.save_compressed`): ``C * 2^b`` values for ``C`` slices.

    This runs once, on the host, in NumPy: there is nothing to compile (the first call
    costs what later calls cost) and ``params`` and ``bits`` must be concrete.

    On global arrays that span processes (``jax.distributed``), every process calls it:
    each summarises its own shards per group, as a weighted histogram for ``"kmeans"``
    (distinct values, summed Fisher, counts) or as the range and the grid points used for
    ``"uniform"``; the summaries are exchanged (never the weights) and every process
    solves the same problem. A value found in the shards of several processes has its few
    entries exchanged, so that its Fisher is summed in the order one process sums it: the
    result equals the single-process one bit for bit. Codes and widths are global arrays
    with each leaf's sharding.

    Args:
      params: a pytree of arrays (a dict, an ``nnx.State``, Linen's variables with
        ``batch_stats``...).
      bits: one int in ``1..16`` for every kept weight, or an int pytree shaped like
        ``params`` (e.g. from :func:`allocate_bits`) with values in ``{0} ∪ 1..16``, 0
        meaning pruned.
      fisher: optional non-negative, finite pytree shaped like ``params``: k-means
        weights, or with ``method="fisher_step"`` the Fisher whose mean per leaf (or
        slice) sets its step (checked on the coded weights only).
      mask: optional bool pytree shaped like ``params``; ``False`` = pruned.
      method: ``"kmeans"``, ``"uniform"``, ``"ecsq"`` or ``"fisher_step"``.
      init: the k-means start: ``"dp"``, ``"linear"``, ``"quantile"`` or ``"density"``
        (as in :func:`kmeans_1d`).
      quantizable: which leaves are quantized. ``None``: the floating kernels
        (:func:`~fisher_optax.is_kernel`; never a Linen ``cache`` or a norm scale). A
        predicate ``quantizable(path, leaf) -> bool`` (``path`` a key-path tuple)
        or a pytree of Python bools like ``params``. Leaves not selected are stored raw.
      axis: ``None`` (default): one codebook per width and leaf. An int: one codebook per
        width and slice along that axis, for every quantized leaf (negative counts from
        the end). A mapping ``{path string or predicate(path, leaf): int or None}``: per
        leaf; quantized leaves that no key matches get ``None``.
      lam: ``method="ecsq"`` or ``"fisher_step"`` only, and required there: ``lam > 0``,
        the distortion (in units of ``F w^2``) one bit of file is worth.
      prune_zero: ``method="ecsq"`` or ``"fisher_step"`` only: whether a weight may be
        quantized to exactly 0, that is pruned.

    Returns:
      A :class:`QuantizedParams`.

    Raises:
      ValueError: on bits outside ``1..16`` (0 only inside a bits tree), an unknown
        ``method`` or ``init``, a tree that does not match ``params``, a non-finite kept
        weight, a negative or non-finite Fisher on a kept weight, or an ``axis`` out of
        range for a leaf (or naming a path that is missing or stored raw); with
        ``method="ecsq"`` or ``"fisher_step"``: ``lam`` missing or not positive, a bits
        tree, or arrays that span processes; ``bits=1`` with ``"fisher_step"``; ``lam`` or
        ``prune_zero`` with another method.
      TypeError: on traced or non-integer bits (a bool or a float), traced params, a
        non-bool mask, a non-float leaf selected by ``quantizable``, or a ``lam`` that is
        not a real number.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.array([[-1.0, -0.8, 0.0, 0.5, 1.0, 1.5]]), "b": jnp.ones(2)}
      >>> mask = {"w": jnp.array([[True, True, False, True, True, True]]),
      ...         "b": jnp.ones(2, bool)}
      >>> q = fisher_optax.quantize(params, 1, mask=mask)
      >>> fisher_optax.dequantize(q)["w"]
      Array([[-0.9, -0.9,  0. ,  1. ,  1. ,  1. ]], dtype=float32)
      >>> q.codebooks[1]  # leaf ['w']: {width: its 2^1 shared values}
      {1: array([-0.9,  1. ], dtype=float32)}
      >>> q.raw[0]  # leaf ['b'] (a bias) is stored as it is
      Array([1., 1.], dtype=float32)

      Entropy-constrained, with zero as a code: the two weights near 0 are pruned, and
      the price of a bit decides how many entries the others share.

      >>> w = jnp.array([[-1.0, -0.9, 0.01, -0.02, 1.0, 1.1, 1.0, 0.9]])
      >>> q = fisher_optax.quantize({"w": w}, 4, method="ecsq", lam=0.01, prune_zero=True)
      >>> fisher_optax.dequantize(q)["w"]
      Array([[-0.95, -0.95,  0.  ,  0.  ,  1.  ,  1.  ,  1.  ,  1.  ]], dtype=float32)

      A step per leaf from its mean Fisher: 100 times the Fisher, a step 10 times finer.

      >>> w = jnp.array([[0.34, -0.52, 1.0, 0.07]])
      >>> f = {"a": jnp.full((1, 4), 1.0), "b": jnp.full((1, 4), 100.0)}
      >>> q = fisher_optax.quantize(
      ...     {"a": w, "b": w}, 8, fisher=f, method="fisher_step", lam=0.0289)
      >>> out = fisher_optax.dequantize(q)  # steps 0.5 and 0.05
      >>> out["a"].round(2)
      Array([[ 0.5, -0.5,  1. ,  0. ]], dtype=float32)
      >>> out["b"].round(2)
      Array([[ 0.35, -0.5 ,  1.  ,  0.05]], dtype=float32)

    References:
      Han, Mao, Dally. Deep Compression. ICLR 2016. https://arxiv.org/abs/1510.00149

      Choi, El-Khamy, Lee. Towards the Limit of Network Quantization. ICLR 2017.
      https://arxiv.org/abs/1612.01543

      Kim, Hooper, Gholami, et al. SqueezeLLM: Dense-and-Sparse Quantization. 2023.
      https://arxiv.org/abs/2306.07629

      Chou, Lookabaugh, Gray. Entropy-Constrained Vector Quantization. IEEE Trans.
      Acoustics, Speech and Signal Processing 37(1), 1989.

      Gish, Pierce. Asymptotically Efficient Quantizing. IEEE Trans. Information Theory
      14(5), 1968.

      Louizos, Ullrich, Welling. Bayesian Compression for Deep Learning. NeurIPS 2017.
      https://arxiv.org/abs/1705.08665
    """
    _validate.choice(method, "method", CODEBOOK_METHODS)
    _validate.choice(init, "init", HOST_INITS)
    lam = _check_lam(method, bits, lam, prune_zero)
    treedef, paths, leaves, flags = _leaves_and_flags(params, quantizable)
    axes = _leaf_axes(axis, params, paths, leaves, flags)
    if any(map(_validate.spans_processes, jax.tree.leaves((params, bits, fisher, mask)))):
        if method in LAM_METHODS:
            needs = {
                "ecsq": "its code lengths count every weight of a leaf",
                "fisher_step": "its step needs a leaf's mean Fisher, a sum whose rounding "
                "depends on the order of its terms",
            }[method]
            raise ValueError(
                f"quantize(method={method!r}) on arrays that span processes (jax.distributed) "
                f"is not supported: {needs}, which the processes would have to share. Gather "
                "params, fisher and mask first with "
                "jax.experimental.multihost_utils.process_allgather(tree, tiled=True), or "
                "use method='kmeans' or 'uniform'."
            )
        return _quantize_across_processes(
            params, bits, fisher, mask, method, init, treedef, paths, leaves, flags, axes
        )
    if isinstance(bits, int | float | np.integer | np.floating):  # bool is an int
        b = _check_width(bits, "bits (one int for every weight)")
        bit_arrays = [np.full(np.shape(leaf), b, np.uint8) for leaf in leaves]
    else:
        bit_leaves = check_matching(params, bits, ref_name="params", other_name="bits")
        bit_arrays = [_concrete_bits(b, p) for b, p in zip(bit_leaves, paths, strict=True)]
    kept = [
        k & (b > 0)
        for k, b in zip(_kept_masks(params, mask, leaves, flags), bit_arrays, strict=True)
    ]
    weights = _check_values(params, fisher, treedef, leaves, flags, kept)

    def code_leaf(i):
        x = _concrete(leaves[i], "params", paths[i])
        bmap = np.where(kept[i], bit_arrays[i], 0).astype(np.uint8)
        if method == "ecsq":
            return _ecsq_leaf(x, kept[i], weights[i], axes[i], int(bits), lam, prune_zero)
        if method == "fisher_step":
            return _step_leaf(x, kept[i], weights[i], axes[i], int(bits), lam, prune_zero)
        return bmap, *_quantize_leaf(x, bmap, weights[i], axes[i], method, init)

    return _collect(leaves, flags, treedef, axes, code_leaf, lam=lam)


_LAM_OCTAVES = 1e-3  # quantize_to_target stops when lam is known to within 0.07%


def quantize_to_target(
    params: Params,
    bits: int = 8,
    *,
    size_bytes: float | None = None,
    distortion: float | None = None,
    fisher: Fisher | None = None,
    mask: Mask | None = None,
    quantizable: Quantizable = None,
    axis: Axis = None,
    prune_zero: bool = False,
    method: Literal["ecsq", "fisher_step"] = "ecsq",
    rtol: float = 0.005,
) -> tuple[QuantizedParams, float]:
    r"""Entropy-constrained quantization (``quantize(method="ecsq")``, or the Fisher steps of
    ``method="fisher_step"``) at a target file size or distortion: finds the price of a bit
    ``lam`` shared by all leaves.

    With ``size_bytes=S``: the largest :func:`~fisher_optax.save_compressed` file of at
    most ``S`` bytes that the search meets (measured with
    :func:`~fisher_optax.compression_report`, the file's exact size). With
    ``distortion=D``: the smallest file whose distortion
    :math:`\sum_i F_i (w_i - \hat w_i)^2` over the quantizable weights that ``mask``
    keeps (``F = 1`` without ``fisher``) is at most ``D``. ``lam`` is searched on a log
    scale over 48 octaves around the mean :math:`F w^2` of the coded weights, and the
    search stops once the size is within ``rtol`` below the target (or the distortion
    within ``rtol`` below it), or when ``lam`` is known to 0.001 octave: bisection,
    then regula falsi on ``log2(lam)``, one quantization per step. Size and distortion
    move with ``lam`` in opposite directions in steps (an entry more or less): the
    target is met, not always hit.

    Args:
      params: a pytree of arrays, as in :func:`quantize`.
      bits: the cap ``2^bits`` on a codebook's entries (``1..16``).
      size_bytes: the target file size in bytes; give it or ``distortion``.
      distortion: the target Fisher-weighted squared error; give it or ``size_bytes``.
      fisher: optional Fisher pytree (the weights of the distortion).
      mask: optional bool pytree; ``False`` = pruned.
      quantizable: which leaves are quantized, as in :func:`quantize`.
      axis: per-slice codebooks, as in :func:`quantize`.
      prune_zero: whether a weight may be quantized to exactly 0 (pruned).
      method: ``"ecsq"`` or ``"fisher_step"``, the :func:`quantize` method that ``lam``
        drives.
      rtol: how close below the target the search may stop, ``0 < rtol < 1``.

    Returns:
      ``(q, lam)``: the :class:`QuantizedParams` and the ``lam`` that gave it.

    Raises:
      ValueError: unless exactly one of ``size_bytes`` and ``distortion`` is given and
        positive; on another ``method``; if no ``lam`` meets the target (e.g. a size
        below what the raw leaves and the positions cost); on what :func:`quantize`
        refuses.
      TypeError: on what :func:`quantize` refuses.

    Examples:
      >>> import jax, fisher_optax
      >>> w = jax.random.normal(jax.random.key(0), (64, 64))
      >>> q, lam = fisher_optax.quantize_to_target({"w": w}, size_bytes=1500)
      >>> size = fisher_optax.compression_report(q).total_bytes
      >>> bool(1400 < size <= 1500)
      True

    References:
      Chou, Lookabaugh, Gray. Entropy-Constrained Vector Quantization. IEEE Trans.
      Acoustics, Speech and Signal Processing 37(1), 1989.

      Choi, El-Khamy, Lee. Towards the Limit of Network Quantization. ICLR 2017.
      https://arxiv.org/abs/1612.01543
    """
    # export reads QuantizedParams from this module: import it when called.
    from fisher_optax.export import compression_report

    if (size_bytes is None) == (distortion is None):
        raise ValueError(
            "quantize_to_target needs exactly one target: size_bytes= (the file size) or "
            f"distortion= (the Fisher-weighted squared error), got size_bytes={size_bytes!r} "
            f"and distortion={distortion!r}."
        )
    name = "size_bytes" if distortion is None else "distortion"
    target = _validate.real(
        size_bytes if distortion is None else distortion, name, low=0.0, low_open=True
    )
    rtol = _validate.real(rtol, "rtol", low=0.0, high=1.0, low_open=True, high_open=True)

    def run(lam):
        return quantize(
            params, bits, fisher=fisher, mask=mask, method=method, quantizable=quantizable,
            axis=axis, lam=lam, prune_zero=prune_zero,
        )  # fmt: skip

    _validate.choice(method, "quantize_to_target's method", LAM_METHODS)
    _check_lam(method, bits, 1.0, prune_zero)
    treedef, _, leaves, flags = _leaves_and_flags(params, quantizable)
    kept = _kept_masks(params, mask, leaves, flags)
    fish = _check_values(params, fisher, treedef, leaves, flags, kept)
    coded = [i for i, fl in enumerate(flags) if fl]
    x = [np.asarray(leaves[i], np.float64)[kept[i]] for i in coded]
    f = [
        np.ones(xi.shape) if fish[i] is None else np.asarray(fish[i], np.float64)[kept[i]]
        for i, xi in zip(coded, x, strict=True)
    ]
    x, f = np.concatenate([np.zeros(0), *x]), np.concatenate([np.zeros(0), *f])
    scale = float(np.mean(f * x * x)) if x.size else 1.0
    scale = scale if scale > 0 else 1.0

    def measure(q):
        if distortion is None:
            return float(compression_report(q).total_bytes)
        out = jax.tree.leaves(dequantize(q))
        xs = [np.asarray(o, np.float64)[kept[i]] for i, o in enumerate(out) if flags[i]]
        return float(np.sum(f * np.square(x - np.concatenate([np.zeros(0), *xs]))))

    # Size falls and distortion rises with lam. In mu = log2(lam), g(mu) = log(value /
    # target) for a size and its negative for a distortion falls through 0 at the target:
    # bisection down to a bracket of 4 octaves (g is flat far from the target), then regula
    # falsi with the Illinois rule, every fourth step a bisection (size and distortion
    # move in steps, and a plateau must not stall the bracket).
    sign = 1.0 if distortion is None else -1.0
    best = None

    def evaluate(mu):
        nonlocal best
        lam = float(2.0**mu)
        q = run(lam)
        value = measure(q)
        if value <= target:  # met: keep the largest file (size) or the largest lam
            key = value if distortion is None else lam
            if best is None or key > best[0]:
                best = (key, q, lam, value)
        return lam, value, sign * float(np.log(max(value, 1e-300) / target))

    def done():
        return best is not None and best[3] >= (1 - rtol) * target

    lo, hi = np.log2(scale) - 40.0, np.log2(scale) + 8.0
    lam, value, g_lo = evaluate(lo)
    if g_lo > 0 and not done():
        lam, value, g_hi = evaluate(hi)
        side, step = 0, 0
        while g_hi < 0 and hi - lo > _LAM_OCTAVES and not done():
            step += 1
            secant = hi - lo < 4 and step % 4 != 0
            mu = hi - g_hi * (hi - lo) / (g_hi - g_lo) if secant else (lo + hi) / 2
            lam, value, g = evaluate(mu)
            if g > 0:
                lo, g_lo = mu, g
                g_hi, side = (g_hi / 2 if side > 0 else g_hi), 1
            elif g < 0:
                hi, g_hi = mu, g
                g_lo, side = (g_lo / 2 if side < 0 else g_lo), -1
            else:
                break
    if best is None:
        raise ValueError(
            f"no lam gives {name} <= {target:g}: at lam={lam:g} it is {value:g}. "
            + (
                "The file also holds the raw leaves, the positions and the headers; raise "
                "size_bytes, or prune more (mask=, prune_zero=True)."
                if distortion is None
                else "Raise distortion, or raise bits."
            )
        )
    return best[1], best[2]


def _check_lam(method, bits, lam, prune_zero) -> float | None:
    """``lam`` checked against ``method`` (a float for :data:`LAM_METHODS`, else ``None``)."""
    if not isinstance(prune_zero, bool | np.bool_):
        raise TypeError(f"prune_zero must be a bool, got {type(prune_zero).__name__}.")
    if method not in LAM_METHODS:
        if lam is not None or prune_zero:
            raise ValueError(
                "lam and prune_zero are read by method='ecsq' and 'fisher_step' only, got "
                f"method={method!r}; drop them or pass one of those methods."
            )
        return None
    if lam is None:
        does = {
            "ecsq": "trades distortion against code length",
            "fisher_step": "sets each leaf's step from the price of a bit",
        }[method]
        raise ValueError(
            f"method={method!r} {does}: pass lam > 0 (the distortion one bit is worth), or "
            f"call quantize_to_target(method={method!r}) for a file size."
        )
    lam = _validate.real(lam, "lam", low=0.0, low_open=True, meaning="distortion per bit")
    if not isinstance(bits, int | np.integer) or isinstance(bits, bool):
        raise ValueError(
            f"method={method!r} chooses each weight's code length itself: bits must be one int "
            f"(the cap 2^bits on a codebook's entries, e.g. 8), got {type(bits).__name__}. "
            "Prune with mask= (or prune_zero=True), not with a bits tree."
        )
    if method == "fisher_step" and bits == 1:
        raise ValueError(
            "method='fisher_step' needs bits >= 2, got bits=1: a grid through 0 over weights "
            "of both signs takes at least 3 points, and the cap 2^bits must leave room for "
            "them. Pass bits=2 or more (e.g. 8)."
        )
    return lam


def _ecsq_leaf(x, kept, weights, axis, width, lam, prune_zero):
    """Widths, codes and ``{width: book}`` of one leaf by :func:`_ecsq_rows`: a weight whose
    cell is the zero cell gets width 0 (pruned)."""
    book_dtype = np.float64 if x.dtype == np.float64 else np.float32
    valid = _as_rows(kept, axis)
    c, counts, a, _ = _ecsq_rows(
        _as_rows(x.astype(np.float64), axis),
        lam,
        weights=None if weights is None else _as_rows(weights.astype(np.float64), axis),
        valid=valid,
        max_codes=2**width,
        zero=prune_zero,
        pruned=(~valid).sum(1),
        entry_bits=8 * np.dtype(book_dtype).itemsize + 16,
        shared=axis is not None,
    )
    coded = valid & (a >= 0)
    bmap = _from_rows(np.where(coded, width, 0), x.shape, axis).astype(np.uint8)
    dtype = np.uint8 if width <= 8 else np.uint16
    codes = _from_rows(np.where(coded, a, 0), x.shape, axis).astype(dtype)
    if not coded.any():
        return bmap, codes, {}
    return bmap, codes, {width: (c[0, : counts[0]] if axis is None else c).astype(book_dtype)}


def _step_leaf(x, kept, weights, axis, width, lam, prune_zero):
    """Widths, codes and ``{width: book}`` of one leaf on the grid ``k * step`` of each row
    (:func:`_fisher_steps`): a weight at ``k = 0`` gets width 0 (pruned) with
    ``prune_zero``."""
    book_dtype = np.float64 if x.dtype == np.float64 else np.float32
    valid = _as_rows(kept, axis)
    xr = _as_rows(x.astype(np.float64), axis)
    w = None if weights is None else _as_rows(weights.astype(np.float64), axis)
    step = _fisher_steps(xr, valid, w, lam, 2**width)
    k = np.where(valid, np.round(xr / step[:, None]), 0.0).astype(np.int64)
    coded = valid & (k != 0) if prune_zero else valid
    first = np.where(coded, k, np.iinfo(np.int64).max).min(1, initial=np.iinfo(np.int64).max)
    first = np.where(coded.any(1), first, 0)
    j = np.where(coded, k - first[:, None], 0)
    used = np.zeros((xr.shape[0], int(j.max(initial=0)) + 1), bool)
    used[np.broadcast_to(np.arange(xr.shape[0])[:, None], j.shape)[coded], j[coded]] = True
    # An infinite step (zero Fisher) holds only k = 0: its level is 0, not 0 * inf.
    levels, counts, index = _uniform_levels(
        np.zeros(xr.shape[0]), np.where(np.isfinite(step), step, 0.0), used, first
    )
    bmap = _from_rows(np.where(coded, width, 0), x.shape, axis).astype(np.uint8)
    dtype = np.uint8 if width <= 8 else np.uint16
    a = np.where(coded, np.take_along_axis(index, j, 1), 0)
    codes = _from_rows(a, x.shape, axis).astype(dtype)
    if not coded.any():
        return bmap, codes, {}
    book = levels[0, : counts[0]] if axis is None else levels
    return bmap, codes, {width: book.astype(book_dtype)}


def _fisher_steps(x, valid, weights, lam, k):
    """Per row of ``x`` (:func:`_as_rows`) the step ``sqrt(6 lam / (ln 2 * mean F))`` over
    its ``valid`` entries (``F = 1`` without ``weights``; ``inf`` at zero mean Fisher), at
    least the one that puts the row's range on ``k`` grid points."""
    n = valid.sum(1)
    if weights is None:
        fbar = np.ones(x.shape[0])
    else:
        fbar = np.where(valid, weights, 0.0).sum(1) / np.maximum(n, 1)
    with np.errstate(divide="ignore"):
        step = np.sqrt(6.0 * lam / (np.log(2.0) * fbar))
    lo = np.where(valid, x, np.inf).min(1, initial=np.inf)
    hi = np.where(valid, x, -np.inf).max(1, initial=-np.inf)
    span = np.where(n > 0, hi - lo, 0.0)
    # round(hi / s) - round(lo / s) + 1 <= span / s + 2, below k for s >= span / (k - 2.5);
    # the half point left over absorbs the rounding of the divisions.
    return np.maximum(step, span / (k - 2.5))


def _collect(leaves, flags, treedef, axes, code_leaf, lam=None) -> QuantizedParams:
    """The :class:`QuantizedParams` of ``code_leaf(i) -> (bits, codes, codebooks)`` for
    each quantizable leaf; the other leaves are stored raw."""
    dtypes = [jnp.result_type(leaf) for leaf in leaves]
    bits, codes, books, raw = [], [], [], []
    for i, leaf in enumerate(leaves):
        row = (*code_leaf(i), None) if flags[i] else (None, None, {}, _raw_copy(leaf, dtypes[i]))
        for out, value in zip((bits, codes, books, raw), row, strict=True):
            out.append(value)
    return QuantizedParams(
        bits, codes, books, raw, treedef=treedef, dtypes=dtypes, axes=axes, lam=lam
    )


def _quantize_across_processes(
    params, bits, fisher, mask, method, init, treedef, paths, leaves, flags, axes
):
    """:func:`quantize` of global arrays spread over processes (``jax.distributed``).

    Every process summarises the blocks it holds, per row and width (distinct values,
    summed weights and counts; for ``"uniform"`` the range and the grid points used); the
    small summaries are exchanged and merged, and every process solves the same problem
    on them. Codes and widths of a leaf that spans processes come back as global arrays
    with its sharding.
    """
    if isinstance(bits, int | float | np.integer | np.floating):  # bool is an int
        bit_leaves = [_check_width(bits, "bits (one int for every weight)")] * len(leaves)
    else:
        bit_leaves = check_matching(params, bits, ref_name="params", other_name="bits")
        bit_leaves = [_concrete_bits(b, p) for b, p in zip(bit_leaves, paths, strict=True)]
    masks = [None] * len(leaves) if mask is None else _validate.bool_leaves(params, mask)
    kept = []
    for m, b, f in zip(masks, bit_leaves, flags, strict=True):
        if f and not _is_int(b):  # a bits tree: 0 is pruned
            m = b > 0 if m is None else m & (b > 0)
        kept.append(m if f else np.False_)
    weights = _check_values_across(params, fisher, treedef, leaves, flags, kept)

    def code_leaf(i):
        return _quantize_leaf_across(
            leaves[i], kept[i], weights[i], bit_leaves[i], axes[i], method, init
        )

    return _collect(leaves, flags, treedef, axes, code_leaf)


def _check_values_across(params, fisher, treedef, leaves, flags, kept):
    """:func:`_check_values` on arrays that may span processes (jax reductions there).

    ``kept``: per leaf a bool array, ``None`` (all kept) or ``False`` (not quantized).
    Returns the Fisher leaves as given (``None`` where not quantized or without Fisher).
    """
    checked = [x if f else np.float32(0) for x, f in zip(leaves, flags, strict=True)]
    _validate.finite(jax.tree.unflatten(treedef, checked), "params", where=kept)
    if fisher is None:
        return [None] * len(leaves)
    found = _validate.fisher(params, fisher, where=kept)
    return [w if f else None for w, f in zip(found, flags, strict=True)]


def _quantize_leaf_across(x, kept, weights, bits, axis, method, init):
    """Widths, codes (laid out like ``x``) and ``{width: book}`` of one leaf held in
    blocks across processes: what :func:`_quantize_leaf` gives on the whole leaf."""
    pieces = _pieces(x)
    num_rows = 1 if axis is None else x.shape[axis]
    rows, values, widths, wts = [], [], [], []
    for (index, data, _), k, b, w in zip(
        pieces,
        _blocks_like(kept, x),
        _blocks_like(bits, x),
        _blocks_like(weights, x),
        strict=True,
    ):
        ok = np.ones(data.shape, bool) if k is None else k
        rows.append(_global_rows(index, x.shape, axis))
        values.append(_as_rows(data.astype(np.float64), axis))
        widths.append(_as_rows(np.where(ok, b, 0).astype(np.uint8), axis))
        wts.append(None if w is None else _as_rows(w.astype(np.float64), axis))
    own = [o for _, _, o in pieces]
    present = np.zeros(MAX_BITS + 1, np.int32)
    for wd, o in zip(widths, own, strict=True):
        if o:
            present[np.unique(wd)] = 1
    present = _allgather_bits(present).max(0)
    used_widths = [int(b) for b in np.flatnonzero(present[1:]) + 1]
    code_dtype = np.uint8 if max(used_widths, default=0) <= 8 else np.uint16
    book_dtype = np.float64 if x.dtype == np.float64 else np.float32
    codes = [np.zeros(v.shape, code_dtype) for v in values]
    books = {}
    for width in used_widths:
        sel = [wd == width for wd in widths]
        if method == "kmeans":
            c, counts, assign = _kmeans_across(
                rows,
                values,
                sel,
                wts,
                own,
                num_rows,
                2**width,
                init,
                lambda j: _as_rows(_positions(pieces[j][0], x.shape, axis), axis),
            )
        else:
            c, counts, assign = _uniform_across(rows, values, sel, own, num_rows, 2**width)
        for code, s, a in zip(codes, sel, assign, strict=True):
            code[s] = a[s]
        books[width] = (c[0, : counts[0]] if axis is None else c).astype(book_dtype)
    shapes = [data.shape for _, data, _ in pieces]
    bmap = _assemble([_from_rows(b, s, axis) for b, s in zip(widths, shapes, strict=True)], x)
    codes = _assemble([_from_rows(c, s, axis) for c, s in zip(codes, shapes, strict=True)], x)
    return bmap, codes, books


def _pieces(x):
    """``(index, block, own)`` per block of ``x`` that this process holds, as NumPy.

    A global array that spans processes: its addressable shards, ``own`` for the first
    replica of each block, so that every element is owned once over all processes. Any
    other array every process holds whole: one block, owned by process 0.
    """
    if _validate.spans_processes(x):
        return [(s.index, np.asarray(s.data), s.replica_id == 0) for s in x.addressable_shards]
    whole = tuple(slice(None) for _ in np.shape(x))
    return [(whole, np.asarray(x), jax.process_index() == 0)]


def _blocks_like(t, like):
    """Per block of ``like`` (:func:`_pieces`), the block of ``t`` at the same place, as
    NumPy (``None`` and ints as they are)."""
    if not _validate.spans_processes(like):
        return [t if t is None or _is_int(t) else np.asarray(_whole(t))]
    if t is None or _is_int(t):
        return [t] * len(like.addressable_shards)
    if not _validate.spans_processes(t):  # every process holds it whole
        whole = np.asarray(t)
        return [whole[s.index] for s in like.addressable_shards]
    if t.sharding != like.sharding:
        t = jax.device_put(t, like.sharding)
    blocks = {s.device: np.asarray(s.data) for s in t.addressable_shards}
    return [blocks[s.device] for s in like.addressable_shards]


def _whole(t):
    """``t`` as NumPy on this process, gathered from every process if it spans them."""
    if _validate.spans_processes(t):
        return multihost_utils.process_allgather(t, tiled=True)
    return t


def _assemble(blocks, like):
    """NumPy blocks (one per block of :func:`_pieces`) as one array laid out like ``like``:
    a global array with its sharding, or the one block."""
    if not _validate.spans_processes(like):
        return blocks[0]
    arrays = [
        jax.device_put(b, s.device) for b, s in zip(blocks, like.addressable_shards, strict=True)
    ]
    return jax.make_array_from_single_device_arrays(like.shape, like.sharding, arrays)


def _global_rows(index, shape, axis):
    """The rows (as :func:`_as_rows` numbers them) that a block at ``index`` holds."""
    if axis is None:
        return np.zeros(1, np.int64)
    return np.arange(shape[axis])[index[axis]]


def _positions(index, shape, axis):
    """Each entry's position in its row of the whole array (:func:`_as_rows`), shaped like
    the block at ``index``."""
    ranges = [np.arange(n)[i] for n, i in zip(shape, index, strict=True)]
    block_shape = tuple(r.size for r in ranges)
    if axis is not None:
        ranges = ranges[:axis] + ranges[axis + 1 :]
        shape = shape[:axis] + shape[axis + 1 :]
    if not ranges:
        return np.zeros(block_shape, np.int64)
    coords = np.meshgrid(*ranges, indexing="ij")
    flat = np.ravel_multi_index(coords, shape)
    if axis is not None:  # the axis's own coordinate does not move the position
        flat = np.broadcast_to(np.expand_dims(flat, axis), block_shape)
    return flat


def _kmeans_across(rows, values, sel, weights, own, num_rows, k, init, positions):
    """:func:`~fisher_optax.kmeans_rows_host` of rows held in blocks across processes.

    Per block: its global row numbers, its values and ``sel`` entries as rows
    (:func:`_as_rows`), its weights (``None``: unweighted) and whether this process owns it
    (:func:`_pieces`); ``positions(j)``: block ``j``'s entries' positions in their rows.
    Each process summarises the blocks it owns as weighted histograms
    (:func:`~fisher_optax.kmeans._row_summaries`) and the summaries are gathered and
    merged: the same distinct values and counts one process finds. A value's weight is
    summed where its entries lie in one block (a block keeps the rows' order); a value
    found in several blocks has its entries exchanged and summed in the rows' order, as
    one process sums them. Unweighted, the sums are counts, exact in any order.

    Returns ``(centroids, counts, assignments per block)``, laid out as
    :func:`~fisher_optax.kmeans_rows_host` returns them.
    """
    weighted = any(w is not None for w in weights)
    if weighted:
        weights = _lift_zero_weights_across(rows, sel, weights, own, num_rows)
    else:
        weights = [np.ones(v.shape) for v in values]
    parts = [[], [], [], []]  # per block and distinct value: row, value, weight sum, count
    for r, v, s, w, o in zip(rows, values, sel, weights, own, strict=True):
        if o:
            u, wu, nu, m, _ = _row_summaries(v, w, s)
            real = np.arange(u.shape[1]) < m[:, None]
            for j, a in enumerate((np.broadcast_to(r[:, None], u.shape), u, wu, nu)):
                parts[j].append(a[real])
    row, value, wsum, count = _allgather_parts(parts, (np.int64, float, float, float))
    order = np.lexsort((value, row))  # stable: entries of one value keep the blocks' order
    row, value, wsum, count = row[order], value[order], wsum[order], count[order]
    new = np.ones(row.size, bool)
    new[1:] = (row[1:] != row[:-1]) | (value[1:] != value[:-1])
    gid = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    m = np.bincount(row[first], minlength=num_rows)
    widest = max(int(m.max(initial=0)), 1)
    offsets = np.concatenate([[0], np.cumsum(m)[:-1]]).astype(np.int64)
    cols = np.arange(first.size) - offsets[row[first]]
    u = np.full((num_rows, widest), np.inf)
    u[row[first], cols] = value[first]
    counts_u = np.bincount(gid, count, minlength=first.size)
    sums = wsum[first] if weighted else counts_u
    split = np.bincount(gid, minlength=first.size) > 1
    if weighted and split.any():  # the same decision on every process: all hold the same
        found = [
            np.minimum(_searchsorted_rows(u[r], np.where(s, v, -np.inf), "left"), widest - 1)
            for r, v, s in zip(rows, values, sel, strict=True)
        ]
        parts = [[], [], []]  # per entry of a split value: its value's number, position, weight
        for j, (r, s, w, o, col) in enumerate(zip(rows, sel, weights, own, found, strict=True)):
            if o:
                group = offsets[r][:, None] + col
                take = s & split[np.where(s, group, 0)]
                for p, a in zip(parts, (group, positions(j), w), strict=True):
                    p.append(a[take])
        group, pos, w = _allgather_parts(parts, (np.int64, np.int64, float))
        order = np.lexsort((pos, group))
        # bincount adds in input order, from 0: the order one process's bincount uses.
        sums = np.where(split, np.bincount(group[order], w[order], minlength=split.size), sums)
    wu = np.zeros((num_rows, widest))
    nu = np.zeros((num_rows, widest))
    wu[row[first], cols] = sums
    nu[row[first], cols] = counts_u
    c, counts, a_u = _solve_row_summaries(u, wu, nu, m, k, init)
    assign = []
    for r, v, s in zip(rows, values, sel, strict=True):
        col = np.minimum(_searchsorted_rows(u[r], np.where(s, v, -np.inf), "left"), widest - 1)
        assign.append(np.where(s, np.take_along_axis(a_u[r], col, 1), 0))
    return c, counts, assign


def _uniform_across(rows, values, sel, own, num_rows, k):
    """:func:`_uniform_rows` of rows held in blocks across processes (as
    :func:`_kmeans_across` takes them): the rows' ranges and the grid points used are
    gathered, both exact (a minimum, a maximum, a union)."""
    lo = np.full(num_rows, np.inf)
    hi = np.full(num_rows, -np.inf)
    for r, v, s, o in zip(rows, values, sel, own, strict=True):
        if o:
            np.minimum.at(lo, r, np.where(s, v, np.inf).min(1, initial=np.inf))
            np.maximum.at(hi, r, np.where(s, v, -np.inf).max(1, initial=-np.inf))
    lo, hi = _allgather_bits(lo).min(0), _allgather_bits(hi).max(0)
    any_valid = np.isfinite(lo)
    lo, hi = np.where(any_valid, lo, 0.0), np.where(any_valid, hi, 0.0)
    step = _uniform_step(lo, hi, k)
    steps = [
        _uniform_steps(v, s, lo[r], step[r], k) for r, v, s in zip(rows, values, sel, strict=True)
    ]
    used = np.zeros((num_rows, k), np.int32)
    for r, s, a, o in zip(rows, sel, steps, own, strict=True):
        if o:
            used[np.broadcast_to(r[:, None], a.shape)[s], a[s]] = 1
    used = _allgather_bits(used).max(0) > 0
    levels, counts, index = _uniform_levels(lo, step, used)
    assign = [
        np.where(s, np.take_along_axis(index[r], a, 1), 0)
        for r, s, a in zip(rows, sel, steps, strict=True)
    ]
    return levels, counts, assign


def _allgather_parts(parts, dtypes):
    """Per list of 1-D arrays in ``parts``: their concatenation over blocks and processes."""
    local = [
        np.concatenate(p).astype(t) if p else np.zeros(0, t)
        for p, t in zip(parts, dtypes, strict=True)
    ]
    sizes = multihost_utils.process_allgather(np.int64(local[0].size))
    n = int(sizes.max())
    padded = [np.concatenate([a, np.zeros(n - a.size, a.dtype)]) for a in local]
    gathered = [_allgather_bits(a) for a in padded]
    return [np.concatenate([g[j, : sizes[j]] for j in range(len(sizes))]) for g in gathered]


def _allgather_bits(a):
    """Every process's NumPy array ``a`` (same shape and dtype), stacked, bit for bit.

    ``process_allgather`` moves values through jax arrays, which narrow 64-bit values to
    32 bits unless x64 is on; the bits travel as ``uint32`` words instead.
    """
    words = np.ascontiguousarray(a).reshape(-1).view(np.uint32)
    out = np.asarray(multihost_utils.process_allgather(words))
    return out.view(a.dtype).reshape(out.shape[0], *a.shape)


def _lift_zero_weights_across(rows, sel, weights, own, num_rows):
    """:func:`_lift_zero_weights` on rows held in blocks across processes."""
    low = np.full(num_rows, np.inf)
    for r, s, w, o in zip(rows, sel, weights, own, strict=True):
        if o:
            np.minimum.at(low, r, np.where(s & (w > 0), w, np.inf).min(1, initial=np.inf))
    low = _allgather_bits(low).min(0)[:, None]
    return [
        np.where(s & ~(w > 0) & np.isfinite(low[r]), low[r] * 1e-9, w)
        for r, s, w in zip(rows, sel, weights, strict=True)
    ]


def _allocate_across_processes(
    params, fisher, mask, widths_desc, scope, average_bits, granularity, treedef, leaves, flags
):
    """:func:`allocate_bits` with ``granularity="weight"`` on global arrays spread over
    processes: the log-Fisher histograms of the blocks (values and counts, exact in any
    order) are merged as in :func:`_kmeans_across`, and each block's widths are read off
    the shared groups."""
    if granularity != "weight":
        raise ValueError(
            f"allocate_bits with granularity={granularity!r} on arrays that span processes "
            "(jax.distributed) is not supported: a leaf's or a slice's saliency is a sum "
            "whose rounding depends on the order of its terms, which processes cannot share "
            "without the weights. Use granularity='weight' (the default), or gather params, "
            "fisher and mask first with "
            "jax.experimental.multihost_utils.process_allgather(tree, tiled=True)."
        )
    masks = [None] * len(leaves) if mask is None else _validate.bool_leaves(params, mask)
    kept = [m if f else np.False_ for m, f in zip(masks, flags, strict=True)]
    fish = _check_values_across(params, fisher, treedef, leaves, flags, kept)
    idx = [i for i, f in enumerate(flags) if f]
    tiny = np.finfo(np.float32).tiny
    rows, values, sel, own, where = [], [], [], [], []  # per block of every coded leaf
    for j, i in enumerate(idx):
        for (_, data, o), k, f in zip(
            _pieces(leaves[i]),
            _blocks_like(kept[i], leaves[i]),
            _blocks_like(fish[i], leaves[i]),
            strict=True,
        ):
            rows.append(np.array([0 if scope == "global" else j]))
            values.append(np.log(np.maximum(f.astype(np.float64), tiny)).reshape(1, -1))
            sel.append((np.ones(data.shape, bool) if k is None else k).reshape(1, -1))
            own.append(o)
            where.append(i)
    num_groups = len(widths_desc)
    num_rows = 1 if scope == "global" else len(idx)
    _, counts, assign = _kmeans_across(
        rows, values, sel, [None] * len(rows), own, num_rows, num_groups, "dp", None
    )
    ranks = [counts[r][:, None] - 1 - a for r, a in zip(rows, assign, strict=True)]
    if average_bits is None:
        table = np.asarray(widths_desc)
    else:
        n = np.zeros(num_groups, np.int64)
        for rank, s, o in zip(ranks, sel, own, strict=True):
            if o:
                n += np.bincount(rank[s], minlength=num_groups)
        table = _choose_allocation(_allgather_bits(n).sum(0), widths_desc, average_bits)
    blocks = {i: [] for i in idx}
    for i, rank, s in zip(where, ranks, sel, strict=True):
        blocks[i].append(np.where(s, table[rank], 0).astype(np.int32))
    out = []
    for i, leaf in enumerate(leaves):
        shapes = _block_shapes(leaf)
        if i in blocks:
            parts = [b.reshape(s) for b, s in zip(blocks[i], shapes, strict=True)]
        else:
            parts = [np.zeros(s, np.int32) for s in shapes]
        x = _assemble(parts, leaf)
        out.append(jax.device_put(x) if isinstance(x, np.ndarray) else x)
    return jax.tree.unflatten(treedef, out)


def _block_shapes(x):
    """The shapes of the blocks of ``x`` that :func:`_pieces` gives."""
    if _validate.spans_processes(x):
        return [s.data.shape for s in x.addressable_shards]
    return [np.shape(x)]


def _raw_copy(leaf, dtype):
    """A leaf that :func:`quantize` stores as it is, detached from the caller's array."""
    if isinstance(leaf, np.ndarray | np.generic):
        return np.array(leaf)  # a copy: q does not change with the caller's
    # A Python scalar (a hyperparameter in the tree) becomes a 0-d array of its dtype, so
    # that the file can store it.
    return leaf if hasattr(leaf, "dtype") else np.asarray(leaf, dtype)


def _quantize_leaf(x, bmap, weights, axis, method, init):
    """Codes and codebooks ``{width: book}`` of one leaf, width by width.

    The weights of one width are clustered as rows (:func:`_as_rows`): the whole leaf as
    one row (a 1-D book), or one row per slice along ``axis`` (a ``(C, K)`` book).
    """
    book_dtype = np.float64 if x.dtype == np.float64 else np.float32
    x = x.astype(np.float64)
    widths = [int(w) for w in np.unique(bmap[bmap > 0])]
    codes = np.zeros(x.shape, np.uint8 if max(widths, default=0) <= 8 else np.uint16)
    books = {}
    for width in widths:
        sel = bmap == width
        c, counts, a = _quantize_rows(x, sel, weights, 2**width, axis, method, init)
        codes[sel] = a[sel]
        books[width] = (c[0, : counts[0]] if axis is None else c).astype(book_dtype)
    return codes, books


def _check_axis(a, leaf, path: str) -> int | None:
    if a is None:
        return None
    ndim = np.ndim(leaf)
    if not _is_int(a):
        raise TypeError(
            f"axis for {path} must be an int (the axis whose slices get their own codebooks, "
            f"e.g. -1 for output channels) or None, got {a!r} ({type(a).__name__})."
        )
    if not -ndim <= a < ndim:
        raise ValueError(
            f"axis={a} is out of range for the leaf at {path} of shape {np.shape(leaf)} "
            f"(ndim {ndim}); use an axis in {-ndim}..{ndim - 1}, e.g. -1 for output channels."
        )
    return int(a) % ndim


def _leaf_axes(axis, params, paths, leaves, flags) -> list[int | None]:
    """Per leaf, the normalised slice axis of a quantized leaf, or None (see :data:`Axis`)."""
    if axis is None:
        return [None] * len(leaves)
    if not isinstance(axis, Mapping):
        if not _is_int(axis):
            raise TypeError(
                f"axis must be None, an int or a mapping {{path or predicate: int or None}}, "
                f"got {axis!r} ({type(axis).__name__})."
            )
        return [
            _check_axis(axis, x, p) if f else None
            for x, p, f in zip(leaves, paths, flags, strict=True)
        ]
    if not is_path_map(axis):
        bad = next(iter(axis), None)
        raise TypeError(
            "an axis mapping is keyed by path strings or predicates(path, leaf), got the key "
            f"{bad!r}; path strings are written as jax.tree_util.keystr writes them, e.g. "
            "\"['dense']['kernel']\"."
        )
    given = {}

    def record(a, where, path, leaf):
        given[keystr(path)] = where
        return a

    axes = per_leaf(
        axis, params, name="axis", default=lambda p, x: None, check=record, plural="axes"
    )
    out: list[int | None] = []
    for a, leaf, path, f in zip(axes, leaves, paths, flags, strict=True):
        if not f:
            if path in given and given[path] == f"axis[{path!r}]" and a is not None:
                raise ValueError(
                    f"axis names {path}, which quantize stores raw (not quantizable); "
                    "select it with quantizable= or drop it from axis."
                )
            out.append(None)
        else:
            out.append(_check_axis(a, leaf, path))
    return out


def _lift_zero_weights(w, valid):
    """Zero weights raised to 1e-9 times the smallest positive weight of their row among
    its ``valid`` entries (a row with none stays as it is).

    The weighted objective ignores values of zero Fisher, so k-means would leave entries
    unused that could serve them; at this weight they take the entries the others leave
    spare, and shift the others' entries by about 1e-9 of a value (below float32's
    resolution).
    """
    w = np.asarray(w, np.float64)
    pos = (w > 0) & valid
    low = np.where(pos, w, np.inf).min(axis=1, keepdims=True)
    return np.where(valid & ~pos & np.isfinite(low), low * 1e-9, w)


def _quantize_rows(x, sel, w, k, axis, method, init):
    """Codebooks ``(R, K)``, their lengths ``(R,)`` and codes shaped like ``x`` of the ``sel``
    weights, per row of ``x`` as :func:`_as_rows` lays it out (one row per slice along
    ``axis``, or one)."""
    valid = _as_rows(sel, axis)
    wr = None if w is None else _as_rows(w, axis)
    if method == "kmeans":
        wr = None if wr is None else _lift_zero_weights(wr, valid)
        c, counts, a = kmeans_rows_host(_as_rows(x, axis), k, weights=wr, valid=valid, init=init)
    else:
        c, counts, a = _uniform_rows(_as_rows(x, axis), valid, k)
    return c, counts, _from_rows(a, x.shape, axis)


def _uniform_rows(x, valid, k):
    """``k`` evenly spaced levels from min to max of every row's valid entries, each
    entry rounded to the nearest: ``(levels, counts, codes)``, laid out as
    :func:`~fisher_optax.kmeans.kmeans_rows_host` returns them (unused levels dropped)."""
    rows = x.shape[0]
    any_valid = valid.any(1)
    lo = np.where(any_valid, np.min(np.where(valid, x, np.inf), 1), 0.0)
    hi = np.where(any_valid, np.max(np.where(valid, x, -np.inf), 1), 0.0)
    step = _uniform_step(lo, hi, k)
    a = _uniform_steps(x, valid, lo, step, k)
    used = np.zeros((rows, k), bool)
    used[np.broadcast_to(np.arange(rows)[:, None], a.shape)[valid], a[valid]] = True
    levels, counts, index = _uniform_levels(lo, step, used)
    return levels, counts, np.where(valid, np.take_along_axis(index, a, 1), 0)


def _uniform_step(lo, hi, k):
    """Per row the spacing of ``k`` points from ``lo`` to ``hi``."""
    return (hi - lo) / (k - 1) if k > 1 else np.zeros(lo.shape)


def _uniform_steps(x, valid, lo, step, k):
    """Per entry the number of its nearest grid point (0 where not valid, or where the
    row's points coincide)."""
    safe = np.where(step > 0, step, 1.0)
    a = np.clip(np.round((x - lo[:, None]) / safe[:, None]), 0, k - 1).astype(np.int64)
    return np.where(valid & (step > 0)[:, None], a, 0)


def _uniform_levels(lo, step, used, first=None):
    """The grid points some entry uses, per row: ``(levels, counts, index)``; ``index``
    maps a point's number to its place among them. Point ``j`` of row ``r`` is
    ``lo[r] + step[r] * (first[r] + j)`` (``first`` 0 by default)."""
    rows = lo.shape[0]
    index = np.cumsum(used, 1) - 1
    counts = used.sum(1)
    width = max(int(counts.max(initial=0)), 1)
    levels = np.zeros((rows, width))
    r, j = np.nonzero(used)
    levels[r, index[r, j]] = lo[r] + step[r] * (j if first is None else first[r] + j)
    last = levels[np.arange(rows), np.maximum(counts - 1, 0)]
    levels = np.where(np.arange(width) < counts[:, None], levels, last[:, None])
    return levels, counts, index


def _quantizable_flags(params, quantizable) -> list[bool]:
    """Per leaf, whether it is quantized (``True``) or stored as it is (``False``)."""

    def python_bool(f, where, path, leaf):
        if not isinstance(f, bool | np.bool_):
            raise TypeError(
                f"{where} must be a Python bool (True = quantize the whole leaf), got "
                f"{type(f).__name__}."
            )
        return bool(f)

    return per_leaf(
        quantizable,
        params,
        name="quantizable",
        default=lambda p, x: is_kernel(p, x) and jnp.issubdtype(jnp.result_type(x), jnp.floating),
        missing=False,
        check=python_bool,
        plural="flags",
        what="one Python bool per leaf, e.g. jax.tree.map(lambda x: x.ndim >= 2, params), or "
        "a predicate quantizable(path, leaf) -> bool",
    )


def dequantize(q: QuantizedParams) -> Params:
    """Params from :class:`QuantizedParams`: codebook values, exact 0 where pruned, raw leaves.

    On concrete input (e.g. a loaded file) this is NumPy: no compile. Under ``jit`` it is
    traced like any function of arrays. On global arrays that span processes
    (``jax.distributed``) it runs as jax operations on the shards, and each leaf keeps the
    sharding of its codes (that of the quantized leaf).

    Args:
      q: the output of :func:`quantize` (or :func:`~fisher_optax.load_compressed`).

    Returns:
      A pytree of the original structure, shapes and dtypes (jax arrays; raw leaves as
      they were stored).

    Raises:
      TypeError: if ``q`` is not a :class:`QuantizedParams`.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> q = fisher_optax.quantize({"w": jnp.array([[0.0, 1.0, 2.0, 3.0]])}, 2)
      >>> fisher_optax.dequantize(q)["w"]
      Array([[0., 1., 2., 3.]], dtype=float32)
    """
    if not isinstance(q, QuantizedParams):
        raise TypeError(
            f"expected the QuantizedParams returned by quantize, got {type(q).__name__}."
        )
    traced = any(
        not _validate.is_concrete(x) for x in jax.tree.leaves((q.bits, q.codes, q.codebooks))
    )
    spread = any(map(_validate.spans_processes, jax.tree.leaves((q.bits, q.codes))))
    xp = jnp if traced or spread else np
    leaves = []
    for bits, codes, books, raw, dtype, axis in zip(
        q.bits, q.codes, q.codebooks, q.raw, q.dtypes, q.axes, strict=True
    ):
        if bits is None:  # a NumPy leaf is copied: editing the result leaves q as it was
            leaves.append(raw.copy() if isinstance(raw, np.ndarray) else raw)
            continue
        codes_sharding = getattr(codes, "sharding", None)
        bits, codes = xp.asarray(bits), xp.asarray(codes).astype(xp.int32)
        out = xp.zeros(bits.shape, xp.float64 if dtype == "float64" else xp.float32)
        if axis is not None:  # row c of a book belongs to slice c along the axis
            shape = [1] * bits.ndim
            shape[axis] = bits.shape[axis]
            channel = xp.arange(bits.shape[axis]).reshape(shape)
        for b, book in books.items():
            book = xp.asarray(book)
            if book.shape[-1] == 0:
                continue
            index = xp.clip(codes, 0, book.shape[-1] - 1)
            value = book[index] if axis is None else book[channel, index]
            out = xp.where(bits == b, value, out)
        out = out.astype(jnp.dtype(dtype))
        if spread:  # back onto the layout the codes have (that of the quantized leaf)
            out = jax.device_put(out, codes_sharding)
        leaves.append(out if traced or spread else jax.device_put(out))
    return jax.tree.unflatten(q.treedef, leaves)
