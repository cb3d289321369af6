"""Structured sparsity patterns over any score: N:M groups and whole (r, c) blocks.

Both are selections over a score tree, like :func:`fisher_optax.topk_mask`: the scores come
from :func:`fisher_optax.scores` (magnitude, Fisher, saliency, random) or any callable, and
the smallest go first. Each pattern comes twice:

* a mask function, :func:`nm_mask` and :func:`block_mask`, for a one-shot mask (then
  :func:`fisher_optax.keep_pruned` keeps it through training), and
* a ``mask_fn`` factory, :func:`nm_selection` and :func:`block_selection`, for
  :func:`fisher_optax.pruned`: ``pruned(adam, schedule, mask_fn=nm_selection(2, 4))`` grows
  a mask from dense to 2:4 while training, inside ``jit``.

Both nest with earlier masks (``mask=``): what a mask pruned stays pruned and counts as
pruned. Neither sorts: an N:M group is ranked by ``m`` elementwise comparisons, and blocks
are ranked by :func:`fisher_optax.topk_mask` over one score per block, so on sharded
parameters whose groups or blocks do not straddle shards, nothing is gathered.
"""

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fisher_optax import _validate
from fisher_optax import masks as _masks
from fisher_optax._tree import keystr
from fisher_optax._types import Mask, Scores

__all__ = [
    "BLOCK_REDUCTIONS",
    "block_mask",
    "block_selection",
    "nm_mask",
    "nm_selection",
]

BLOCK_REDUCTIONS: dict[str, str] = {
    "sum": "the sum of the block's scores",
    "mean": "their mean",
    "max": "their maximum",
}
"""How :func:`block_mask` scores a block from the scores of the weights ``mask`` keeps in it."""

_F32_MAX = np.float32(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------------------
# Shared checks


def _score_leaves(scores: Scores, prunable: Any, mask: Mask | None):
    """Paths, leaves, treedef, per-leaf prunable flags and prior-mask leaves, checked."""
    paths, leaves, treedef = _masks._flat(scores)
    flags = _masks._prunable_flags(paths, leaves, prunable)
    for path, leaf, flag in zip(paths, leaves, flags, strict=True):
        if flag is False:
            continue
        dtype = jnp.result_type(leaf)
        if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"scores at {keystr(path)} have dtype {dtype}; scores must be real numbers "
                "(floating point or integer)."
            )
        if _validate.is_concrete(leaf) and np.isnan(np.asarray(leaf, np.float32)).any():
            raise ValueError(
                f"scores at {keystr(path)} hold NaN, which cannot be ranked. Check the params "
                "and the Fisher for NaN (diverged training?) before pruning."
            )
    prior = None if mask is None else _validate.bool_leaves(scores, mask, ref_name="scores")
    return paths, leaves, treedef, flags, prior


def _is_static(flag: Any) -> bool:
    return isinstance(flag, bool)


def _split_flags(flags: list) -> tuple[tuple[str, ...], list]:
    """Static kinds per leaf (``"skip"``, ``"all"``, ``"dyn"``) and the dynamic flags."""
    kinds = tuple("skip" if f is False else "all" if f is True else "dyn" for f in flags)
    dyn = [jnp.asarray(f) if k == "dyn" else None for f, k in zip(flags, kinds, strict=True)]
    return kinds, dyn


def _f32_targets(targets: Any) -> Any:
    """Checked targets (a fraction or a list of them) as float32 scalars, for the jitted core.

    A concrete fraction gives the count a traced one gives (:func:`fisher_optax.topk_mask`
    rounds both exactly), so one compiled core serves every target.
    """
    if isinstance(targets, list):
        return [jnp.asarray(s, jnp.float32) for s in targets]
    return jnp.asarray(targets, jnp.float32)


# ---------------------------------------------------------------------------------------------
# N:M


def _check_nm(n: Any, m: Any, axis: Any) -> tuple[int, int, int]:
    m = _validate.integer(m, "m", minimum=1)
    n = _validate.integer(n, f"n (the weights kept in each group of m={m})", minimum=1, maximum=m)
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis must be an int (e.g. -2, a kernel's input axis), got {axis!r}.")
    return n, m, int(axis)


def _nm_axis(path: tuple, leaf: Any, axis: int, m: int) -> int:
    """``axis`` of this leaf, made non-negative, after checking that ``m`` divides it."""
    shape = jnp.shape(leaf)
    if not -len(shape) <= axis < len(shape):
        raise ValueError(
            f"axis={axis} is out of range for the leaf at {keystr(path)} of shape {shape}. "
            "Pick an axis every prunable leaf has, or leave the leaf out with prunable=."
        )
    a = axis % len(shape)
    if shape[a] % m:
        raise ValueError(
            f"groups of m={m} do not tile axis {axis} of the leaf at {keystr(path)}: it has "
            f"length {shape[a]}, not a multiple of {m}. Pick another axis or m (a divisor of "
            f"{shape[a]}), pad the layer, or leave the leaf out with prunable=."
        )
    return a


def _grouped(x: jax.Array, a: int, m: int) -> jax.Array:
    """``x`` with axis ``a`` split into ``(length // m, m)``: groups of m consecutive entries."""
    s = x.shape
    return x.reshape((*s[:a], s[a] // m, m, *s[a + 1 :]))


def _nm_keep(score: jax.Array, prior: Any, a: int, n: int, m: int) -> jax.Array:
    """In every group of ``m`` along axis ``a``, True at the ``n`` best entries.

    Entry ``i`` beats entry ``j`` if its score is larger or, on a tie, if its flat index is
    larger (the lower index goes first, as in :func:`fisher_optax.topk_mask`); entries
    ``prior`` pruned lose to every other. An entry is kept iff fewer than ``n`` entries of
    its group beat it: ``m`` elementwise passes, no sort, all inside each group.
    """
    key = _masks._float_keys(score)
    if prior is not None:
        key = jnp.where(prior, key, np.uint32(0))  # real scores have keys above 0
    key = _grouped(key, a, m)
    pos = lax.broadcasted_iota(jnp.int32, key.shape, a + 1)
    beaten = jnp.zeros(key.shape, jnp.uint8 if m <= 255 else jnp.int32)
    for j in range(m):
        kj = lax.slice_in_dim(key, j, j + 1, axis=a + 1)
        beats = (kj > key) | ((kj == key) & (pos < j))
        beaten = beaten + beats.astype(beaten.dtype)
    return (beaten < n).reshape(score.shape)


def _group_flag(flag: Any, shape: tuple, a: int, m: int) -> Any:
    """A leaf's prunable flag at group level: an element-wise flag holds for a group iff it
    holds for every entry of it (a group with a protected weight is left alone)."""
    if jnp.ndim(flag) == 0:
        return flag
    whole = jnp.all(_grouped(jnp.broadcast_to(flag, shape), a, m), axis=a + 1, keepdims=True)
    return jnp.broadcast_to(whole, _grouped(jnp.zeros(shape, bool), a, m).shape).reshape(shape)


def _prep_nm(scores, n, m, axis, prunable, mask):
    """Checked leaves, flags and prior mask, and each prunable leaf's axis (host side)."""
    paths, leaves, treedef, flags, prior = _score_leaves(scores, prunable, mask)
    axes = tuple(
        None if f is False else _nm_axis(p, x, axis, m)
        for p, x, f in zip(paths, leaves, flags, strict=True)
    )
    kinds, dyn = _split_flags(flags)
    shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
    arrays = [None if k == "skip" else x for x, k in zip(leaves, kinds, strict=True)]
    static = {"treedef": treedef, "kinds": kinds, "shapes": shapes, "axes": axes}
    return paths, leaves, arrays, dyn, prior, static


def _final_nm(shape, gflag, prior_leaf, keep) -> jax.Array:
    """The N:M keep-mask of one leaf: its best ``n`` per group, and nothing ``mask`` pruned."""
    if gflag is False:
        return jnp.ones(shape, bool)
    if not _is_static(gflag):
        keep = jnp.where(gflag, keep, True)
    return keep if prior_leaf is None else keep & prior_leaf


@functools.partial(
    jax.jit,
    static_argnames=("treedef", "kinds", "shapes", "axes", "n", "m", "scope", "cap"),
)
def _nm_core(leaves, dyn, targets, prior, *, treedef, kinds, shapes, axes, n, m, scope, cap):
    """The N:M mask (``targets is None``) or the gradual one at ``targets`` (float32)."""
    protected, gflags = [], []
    for i, (leaf, kind, a) in enumerate(zip(leaves, kinds, axes, strict=True)):
        if kind == "skip":
            protected.append(None)
            gflags.append(False)
            continue
        p = None if prior is None else prior[i]
        protected.append(_nm_keep(leaf, p, a, n, m))
        gflags.append(True if kind == "all" else _group_flag(dyn[i], shapes[i], a, m))
    finals = [
        _final_nm(shapes[i], g, None if prior is None else prior[i], protected[i])
        for i, g in enumerate(gflags)
    ]
    if targets is None:
        return finals
    per_leaf = isinstance(targets, list)
    capped = [jnp.minimum(s, cap) for s in targets] if per_leaf else jnp.minimum(targets, cap)
    # The group winners rank above every other score; the others are clipped to the
    # largest finite float32 (a NaN too), so a top-k over what is left never reaches a
    # winner: below c it prunes at most round(s * N) <= (m - n) / m * N of them.
    ranked = []
    for i, (leaf, g) in enumerate(zip(leaves, gflags, strict=True)):
        if g is False:
            ranked.append(jnp.zeros(shapes[i], jnp.float32))
            continue
        s = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
        s = jnp.where(jnp.isnan(s) | (s > _F32_MAX), _F32_MAX, s)
        ranked.append(jnp.where(protected[i], jnp.inf, s))
    gradual = jax.tree.leaves(
        _masks.topk_mask(
            jax.tree.unflatten(treedef, ranked),
            jax.tree.unflatten(treedef, capped) if per_leaf else capped,
            scope=scope,
            prunable=jax.tree.unflatten(treedef, gflags),
            mask=None if prior is None else jax.tree.unflatten(treedef, prior),
        )
    )
    out = []
    for i, g in enumerate(gflags):
        if g is False:
            out.append(gradual[i])
            continue
        # Groups left alone keep what mask pruned (topk_mask would free them). Once the
        # target reaches c the result is the pattern itself: min(s, c) * N may round one
        # short of the (m - n) / m * N weights outside the winners when c is no float32.
        grown = gradual[i] if prior is None else gradual[i] & prior[i]
        s = targets[i] if per_leaf else targets
        out.append(jnp.where(s >= cap, finals[i], grown))
    return out


def nm_mask(
    scores: Scores,
    n: int,
    m: int,
    *,
    axis: int = -2,
    prunable: _masks.Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""N:M sparsity: in every group of ``m`` consecutive weights along ``axis``, keep ``n``.

    Each group keeps the ``n`` weights of largest score, i.e. prunes exactly ``m - n``.
    Ties go as in :func:`fisher_optax.topk_mask`: among equal scores, the weight with the
    lower flat index is pruned first (inside a group, the one nearer the start of
    ``axis``). With ``mask``, the weights it pruned stay pruned and count among the group's
    pruned: a group in which ``mask`` kept ``q`` weights keeps ``min(n, q)``. Every group
    then holds at most ``n`` nonzero weights, the layout sparse tensor cores accelerate
    for 2:4.

    The default ``axis=-2`` is the input axis of a Dense kernel ``(in, out)`` and of a Conv
    kernel ``(*window, in, out)``: the reduction axis of ``x @ W``, along which
    hardware N:M groups run. ``m`` must divide that axis' length in every prunable leaf
    (there is no remainder rule: a partial group has no hardware meaning); leave other
    leaves out with ``prunable``. The cost is ``m`` elementwise passes over each leaf (no
    sort); the work stays inside each group, so a leaf sharded along ``axis`` in pieces of
    a multiple of ``m`` (or along any other axis) is never gathered.

    Args:
      scores: a pytree of real arrays; larger is more important (e.g. from
        :func:`fisher_optax.scores`). Cast to float32 to be ranked.
      n: the weights kept per group, an int in ``1..m``.
      m: the group size, an int ``>= 1``.
      axis: the axis along which groups of ``m`` consecutive weights run (an int, negative
        counts from the end).
      prunable: which leaves get the pattern, as in :func:`fisher_optax.topk_mask` (default: the
        kernels, :func:`fisher_optax.is_kernel`). An element-wise bool array applies group by group:
        a group with a weight that may not be pruned is left as it is.
      mask: an earlier bool mask; what it prunes stays pruned.

    Returns:
      A boolean pytree shaped like ``scores``; ``True`` keeps a weight. Leaves that are not
      prunable are all ``True`` (as in :func:`fisher_optax.topk_mask`).

    Raises:
      ValueError: if ``n`` is not in ``1..m``, ``axis`` is out of range for a prunable leaf
        or ``m`` does not divide its length there (naming the leaf), concrete scores hold
        NaN, or ``mask``/``prunable`` do not match ``scores``.
      TypeError: if ``n``, ``m`` or ``axis`` is not an int, scores are not real, ``mask`` is
        not boolean, or a ``prunable`` predicate does not take ``(path, leaf)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fisher_optax.patterns import nm_mask
      >>> scores = {"w": jnp.array([[4.0, 1.0], [3.0, 2.0], [1.0, 1.0], [2.0, 1.0]])}
      >>> nm_mask(scores, 2, 4)["w"]  # 2 of every 4 down each column
      Array([[ True, False],
             [ True,  True],
             [False, False],
             [False,  True]], dtype=bool)

    References:
      Mishra et al. Accelerating Sparse Deep Neural Networks. 2021.
      https://arxiv.org/abs/2104.08378
    """
    n, m, axis = _check_nm(n, m, axis)
    _, _, arrays, dyn, prior, static = _prep_nm(scores, n, m, axis, prunable, mask)
    out = _nm_core(arrays, dyn, None, prior, n=n, m=m, scope="layer", cap=0.0, **static)
    return jax.tree.unflatten(static["treedef"], out)


def nm_selection(
    n: int,
    m: int,
    *,
    axis: int = -2,
    scope: Literal["global", "layer"] = "layer",
    prunable: _masks.Prunable = None,
) -> Callable[..., Mask]:
    r"""A ``mask_fn`` for :func:`fisher_optax.pruned`: gradual N:M, from dense to ``n:m``.

    The returned ``mask_fn(scores, sparsity, *, mask=None)``, at a target :math:`s` below
    :math:`c`, prunes exactly

    .. math::
      k = \max\bigl(\operatorname{round}(s N),\ p\bigr), \qquad c = \frac{m - n}{m}
      \ \text{(in float32)},

    of the :math:`N` prunable weights in scope, ``p`` of them pruned by ``mask`` before (the
    count rule of :func:`fisher_optax.topk_mask`): the smallest scores among the weights
    that are *not* among the ``n`` best of their group of ``m`` (as :func:`nm_mask` ranks
    them, with ``mask``). At :math:`s \ge c` the result is exactly
    ``nm_mask(scores, n, m, mask=mask)``; targets above ``c`` prune no more. So no group
    ever loses more than ``m - n`` weights beyond what ``mask`` pruned, a group loses its
    worst weights first, and a schedule ending at ``c`` (0.5 for 2:4, e.g.
    :func:`fisher_optax.polynomial_sparsity`) goes from dense to N:M. This is jaxpruner's
    iterative N:M (the group winners are kept, the rest pruned by a top-k at the scheduled
    sparsity), with exact counts and no sort.

    With ``sparsity=`` in :func:`fisher_optax.pruned` the target is a pytree of per-leaf
    scalars, each capped at ``c`` and met leaf by leaf. With ``method="two_stage"`` both
    stages run through it (first on :math:`|w|`).

    Args:
      n: the weights kept per group at the end, an int in ``1..m``.
      m: the group size, an int ``>= 1``.
      axis: the axis the groups run along, as in :func:`nm_mask`.
      scope: ``"layer"`` (default; every leaf moves toward N:M at the pace of the
        schedule, as jaxpruner's per-layer N:M) or ``"global"`` (one ranking of the
        weights allowed to go across leaves, whose scores must then share a scale).
      prunable: which leaves get the pattern, as in :func:`nm_mask`.

    Returns:
      ``mask_fn(scores, sparsity, *, mask=None) -> Mask``, traceable (runs under ``jit``
      and ``lax.cond``). ``sparsity`` is a scalar, a per-leaf pytree or a mapping, as
      :func:`fisher_optax.topk_mask` takes it.

    Raises:
      ValueError: if ``n`` is not in ``1..m`` or ``scope`` is unknown; when called, as
        :func:`nm_mask` and :func:`fisher_optax.topk_mask`.
      TypeError: if ``n``, ``m`` or ``axis`` is not an int.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fisher_optax.patterns import nm_selection
      >>> select = nm_selection(2, 4)
      >>> scores = {"w": jnp.array([[4.0], [3.0], [1.0], [2.0], [0.1], [0.2], [0.3], [9.0]])}
      >>> select(scores, 0.375)["w"].ravel()  # 3 of 8 go; 0.3 is among its group's best 2
      Array([ True,  True, False,  True, False, False,  True,  True], dtype=bool)
      >>> select(scores, 0.5)["w"].ravel()  # the full 2:4 pattern
      Array([ True,  True, False, False, False, False,  True,  True], dtype=bool)

    References:
      Lasby, Golubeva, Evci, Nica, Ioannou. JaxPruner: A concise library for sparsity
      research. 2023. https://arxiv.org/abs/2304.14082

      Zhou et al. Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch.
      ICLR 2021. https://arxiv.org/abs/2102.04010
    """
    n, m, axis = _check_nm(n, m, axis)
    scope = _validate.scope(scope)
    cap = float(np.float32((m - n) / m))

    def mask_fn(scores: Scores, sparsity: Any, *, mask: Mask | None = None) -> Mask:
        paths, leaves, arrays, dyn, prior, static = _prep_nm(scores, n, m, axis, prunable, mask)
        targets = _f32_targets(_masks._per_leaf(sparsity, paths, leaves))
        out = _nm_core(arrays, dyn, targets, prior, n=n, m=m, scope=scope, cap=cap, **static)
        return jax.tree.unflatten(static["treedef"], out)

    mask_fn.__name__ = f"nm_selection({n}, {m})"
    return mask_fn


# ---------------------------------------------------------------------------------------------
# Blocks


def _check_block(block: Any) -> tuple[int, int]:
    if (
        not isinstance(block, tuple | list)
        or len(block) != 2
        or any(isinstance(b, bool) or not isinstance(b, int | np.integer) for b in block)
    ):
        raise TypeError(
            f"block must be a pair of ints (rows, columns), e.g. (4, 4), got {block!r}."
        )
    r, c = (int(b) for b in block)
    if r < 1 or c < 1:
        raise ValueError(f"block sizes must be >= 1, got block={(r, c)}.")
    return r, c


def _blocked(x: jax.Array, r: int, c: int, fill: Any) -> jax.Array:
    """``x`` of shape ``(..., H, W)`` as ``(..., R, r, C, c)``, padded with ``fill`` at the
    bottom and right edges to ``R = ceil(H / r)`` and ``C = ceil(W / c)`` blocks."""
    *lead, h, w = x.shape
    rows, cols = -(-h // r), -(-w // c)
    if (rows * r, cols * c) != (h, w):
        pad = [(0, 0)] * len(lead) + [(0, rows * r - h), (0, cols * c - w)]
        x = jnp.pad(x, pad, constant_values=fill)
    return x.reshape(*lead, rows, r, cols, c)


def _block_scores(score, kept, r, c, reduce):
    """One score per block from the entries ``kept`` keeps, and whether it keeps any."""
    s = jnp.asarray(score)
    s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
    valid = jnp.ones(s.shape, bool) if kept is None else kept
    valid = _blocked(valid, r, c, False)
    alive = jnp.any(valid, axis=(-3, -1))
    if reduce == "max":
        out = jnp.max(jnp.where(valid, _blocked(s, r, c, 0), -jnp.inf), axis=(-3, -1))
        return jnp.where(alive, out, 0), alive
    total = jnp.sum(jnp.where(valid, _blocked(s, r, c, 0), 0), axis=(-3, -1))
    if reduce == "sum":
        return total, alive
    count = jnp.sum(valid, axis=(-3, -1), dtype=jnp.int32)
    return total / jnp.maximum(count, 1).astype(total.dtype), alive


def _expand(block_keep: jax.Array, shape: tuple, r: int, c: int) -> jax.Array:
    """A per-block mask ``(..., R, C)`` back to the leaf's shape ``(..., H, W)``."""
    *lead, rows, cols = block_keep.shape
    full = jnp.broadcast_to(block_keep[..., :, None, :, None], (*lead, rows, r, cols, c))
    full = full.reshape(*lead, rows * r, cols * c)
    if full.shape[-2:] != tuple(shape[-2:]):
        full = full[..., : shape[-2], : shape[-1]]
    return full


@functools.partial(
    jax.jit, static_argnames=("treedef", "kinds", "shapes", "r", "c", "reduce", "scope")
)
def _block_core(leaves, dyn, targets, prior, *, treedef, kinds, shapes, r, c, reduce, scope):
    bscores, alive, bflags = [], [], []
    for i, (leaf, kind) in enumerate(zip(leaves, kinds, strict=True)):
        if kind == "skip":
            bscores.append(jnp.zeros(shapes[i], jnp.float32))
            alive.append(jnp.ones(shapes[i], bool))
            bflags.append(False)
            continue
        s, a = _block_scores(leaf, None if prior is None else prior[i], r, c, reduce)
        bscores.append(s)
        alive.append(a)
        if kind == "all":
            bflags.append(True)
        elif jnp.ndim(dyn[i]) == 0:
            bflags.append(dyn[i])
        else:  # a block may go only if every weight in it may
            f = _blocked(jnp.broadcast_to(dyn[i], shapes[i]), r, c, True)
            bflags.append(jnp.all(f, axis=(-3, -1)))
    per_leaf = isinstance(targets, list)
    keep_blocks = jax.tree.leaves(
        _masks.topk_mask(
            jax.tree.unflatten(treedef, bscores),
            jax.tree.unflatten(treedef, targets) if per_leaf else targets,
            scope=scope,
            prunable=jax.tree.unflatten(treedef, bflags),
            mask=jax.tree.unflatten(treedef, alive),
        )
    )
    out = []
    for i, kind in enumerate(kinds):
        if kind == "skip":
            out.append(keep_blocks[i])
            continue
        keep = _expand(keep_blocks[i], shapes[i], r, c)
        out.append(keep if prior is None else keep & prior[i])
    return out


def _block_call(scores, sparsity, r, c, reduce, scope, prunable, mask):
    paths, leaves, treedef, flags, prior = _score_leaves(scores, prunable, mask)
    for path, leaf, flag in zip(paths, leaves, flags, strict=True):
        if flag is not False and jnp.ndim(leaf) < 2:
            raise ValueError(
                f"block masks tile the last two axes of a leaf, but the leaf at {keystr(path)} "
                f"has shape {jnp.shape(leaf)}. Leave it out with prunable= (the default "
                "prunes only kernels, leaves with ndim >= 2)."
            )
    targets = _f32_targets(_masks._per_leaf(sparsity, paths, leaves))
    kinds, dyn = _split_flags(flags)
    shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
    arrays = [None if k == "skip" else x for x, k in zip(leaves, kinds, strict=True)]
    out = _block_core(
        arrays,
        dyn,
        targets,
        prior,
        treedef=treedef,
        kinds=kinds,
        shapes=shapes,
        r=r,
        c=c,
        reduce=reduce,
        scope=scope,
    )
    return jax.tree.unflatten(treedef, out)


def block_mask(
    scores: Scores,
    sparsity: _masks.Sparsity,
    *,
    block: tuple[int, int],
    reduce: Literal["sum", "mean", "max"] = "sum",
    scope: Literal["global", "layer"] = "global",
    prunable: _masks.Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""Prune whole ``(r, c)`` blocks: exactly ``round(sparsity * n)`` of the ``n`` blocks.

    Each prunable leaf of shape ``(..., H, W)`` is cut into blocks of ``r`` rows and ``c``
    columns of its last two axes (one grid per index of the leading axes, e.g. per tap of
    a Conv kernel ``(*window, in, out)``). A block scores

    .. math::
      S_b = \operatorname{reduce}\{\, s_i : i \in b,\ \text{mask}_i \,\}

    over the scores of the weights ``mask`` keeps in it, with ``reduce`` one of
    :data:`BLOCK_REDUCTIONS`: ``"sum"`` (default; for OBD saliencies, the estimated loss
    increase of removing the block), ``"mean"`` or ``"max"``. The blocks are then ranked by
    :func:`fisher_optax.topk_mask` (its exact count, half to even, and its tie-break: among
    equal block scores the block of lower flat index goes first, blocks numbered row-major
    in each leaf's grid and leaves in flattening order), globally or per layer. A block
    in which ``mask`` kept nothing counts as already pruned; the weights ``mask`` pruned
    stay pruned.

    Leaves that blocks do not tile: when ``H`` or ``W`` is not a multiple of ``r`` or ``c``,
    the last row or column of blocks is smaller (it holds what is left). Each such block
    still counts as one block, and ``"sum"`` adds fewer scores in it, so it tends to go
    first; ``"mean"`` and ``"max"`` do not favour it. ``sparsity`` is a fraction of blocks,
    not of weights, so with partial blocks the weight sparsity may differ from it.

    Args:
      scores: a pytree of real arrays; larger is more important (e.g. from
        :func:`fisher_optax.scores`).
      sparsity: the fraction of prunable blocks to remove, in ``[0, 1]``: a scalar, a
        per-leaf pytree or a mapping, as in :func:`fisher_optax.topk_mask`.
      block: ``(r, c)``, the block's rows and columns (ints ``>= 1``).
      reduce: a key of :data:`BLOCK_REDUCTIONS`.
      scope: ``"global"`` (one ranking of all blocks; their scores must share a scale) or
        ``"layer"`` (each leaf on its own).
      prunable: which leaves are cut into blocks, as in :func:`fisher_optax.topk_mask` (default: the
        kernels, :func:`fisher_optax.is_kernel`); with an element-wise bool array, a block may go
        only if every weight in it may.
      mask: an earlier bool mask; what it prunes stays pruned and counts as pruned.

    Returns:
      A boolean pytree shaped like ``scores``; ``True`` keeps a weight.

    Raises:
      ValueError: if ``block`` holds a size below 1, ``reduce`` or ``scope`` is unknown, a
        prunable leaf has ``ndim < 2``, and as :func:`fisher_optax.topk_mask`.
      TypeError: if ``block`` is not a pair of ints, and as :func:`fisher_optax.topk_mask`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fisher_optax.patterns import block_mask
      >>> scores = {"w": jnp.array([[1.0, 1.0, 5.0, 5.0],
      ...                           [1.0, 9.0, 5.0, 5.0]])}
      >>> block_mask(scores, 0.5, block=(2, 2))["w"]  # sums 12 < 20
      Array([[False, False,  True,  True],
             [False, False,  True,  True]], dtype=bool)
      >>> block_mask(scores, 0.5, block=(2, 2), reduce="max")["w"]  # 9 > 5
      Array([[ True,  True, False, False],
             [ True,  True, False, False]], dtype=bool)

    References:
      Gray, Radford, Kingma. GPU Kernels for Block-Sparse Weights. 2017.
      https://openai.com/research/block-sparse-gpu-kernels

      Narang, Undersander, Diamos. Block-Sparse Recurrent Neural Networks. 2017.
      https://arxiv.org/abs/1711.02782
    """
    r, c = _check_block(block)
    reduce = _validate.choice(reduce, "reduce", BLOCK_REDUCTIONS)
    scope = _validate.scope(scope)
    return _block_call(scores, sparsity, r, c, reduce, scope, prunable, mask)


def block_selection(
    block: tuple[int, int],
    *,
    reduce: Literal["sum", "mean", "max"] = "sum",
    scope: Literal["global", "layer"] = "global",
    prunable: _masks.Prunable = None,
) -> Callable[..., Mask]:
    """A ``mask_fn`` for :func:`fisher_optax.pruned`: prune whole blocks on its schedule.

    ``pruned(adam, schedule, mask_fn=block_selection((4, 4)))`` recomputes, at each mask
    update, :func:`block_mask` at the scheduled target (the fraction of blocks) with the
    current mask as ``mask=``, so the pruned blocks only grow. Scores come from
    ``pruned``'s ``criterion``; with ``method="two_stage"`` both stages prune blocks.

    Args:
      block: ``(r, c)``, as in :func:`block_mask`.
      reduce: a key of :data:`BLOCK_REDUCTIONS`.
      scope: ``"global"`` or ``"layer"``, as in :func:`block_mask`.
      prunable: which leaves are cut into blocks, as in :func:`block_mask`.

    Returns:
      ``mask_fn(scores, sparsity, *, mask=None) -> Mask``, traceable.

    Raises:
      ValueError: if ``block`` holds a size below 1, or ``reduce`` or ``scope`` is unknown.
      TypeError: if ``block`` is not a pair of ints.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fisher_optax.patterns import block_selection
      >>> select = block_selection((1, 2))
      >>> select({"w": jnp.array([[1.0, 2.0, 0.5, 0.5]])}, 0.5)["w"]
      Array([[ True,  True, False, False]], dtype=bool)
    """
    r, c = _check_block(block)
    reduce = _validate.choice(reduce, "reduce", BLOCK_REDUCTIONS)
    scope = _validate.scope(scope)

    def mask_fn(scores: Scores, sparsity: Any, *, mask: Mask | None = None) -> Mask:
        return _block_call(scores, sparsity, r, c, reduce, scope, prunable, mask)

    mask_fn.__name__ = f"block_selection({(r, c)})"
    return mask_fn
