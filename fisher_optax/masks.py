"""Pruning masks: which weights to remove, ranked by magnitude, Fisher, or any score.

A mask is a boolean pytree shaped like the parameters; ``True`` keeps a weight. Every mask
function here prunes *exactly* ``round(sparsity * n)`` of the ``n`` prunable weights in
scope, the ones with the smallest scores, and breaks ties by a fixed rule.

Global selection never sorts. Scores are mapped to order-preserving ``uint32`` keys and the
exact k-th smallest key is found by bisecting its 32 bits with counting passes: each pass
compares every key with one candidate and sums, per leaf, how many fall below it, so on
sharded parameters only scalar counts cross devices. XLA's CPU sort of 1e7 floats takes
seconds; 32 counting passes take a fraction of that (see ``benchmarks/bench_select.py``).
"""

from collections.abc import Callable
from fractions import Fraction
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fisher_optax._tree import check_matching, keystr, strip_value
from fisher_optax._types import Fisher, Mask, Params, Scores

__all__ = [
    "apply_mask",
    "fisher_mask",
    "magnitude_mask",
    "random_mask",
    "sparsity_report",
    "topk_mask",
    "two_stage_mask",
]

Prunable = None | Callable[[tuple, jax.Array], bool] | Any
"""``None`` (leaves with ``ndim >= 2``), a predicate on ``(path, leaf)``, or a bool pytree."""

_SCOPES = ("global", "layer")
_CRITERIA = ("fisher", "saliency")
_SIGN = np.uint32(0x80000000)
_NEVER = np.uint32(0xFFFFFFFF)  # key of entries that may not be pruned: above every real score
_ALREADY = np.uint32(0)  # key of entries an earlier mask pruned: below every real score
_MAX_COUNT = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Validation helpers


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_sparsity(sparsity: Any, name: str, fn: str) -> Any:
    """A Python float when ``sparsity`` is concrete (checked to lie in [0, 1]), else a tracer."""
    if isinstance(sparsity, jax.core.Tracer):
        return jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
    if jnp.ndim(sparsity) != 0:
        raise ValueError(
            f"{fn}: {name} must be a scalar in [0, 1], got an array of shape {jnp.shape(sparsity)}."
        )
    value = float(sparsity)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"{fn}: {name} must lie in [0, 1] (the fraction of prunable weights to remove), "
            f"got {value}."
        )
    return value


def _check_scope(scope: str, fn: str) -> None:
    if scope not in _SCOPES:
        raise ValueError(
            f"{fn}: scope must be 'global' (one ranking over all prunable weights) or 'layer' "
            f"(each leaf ranked on its own), got {scope!r}."
        )


def _check_criterion(criterion: str, fn: str) -> None:
    if criterion not in _CRITERIA:
        raise ValueError(
            f"{fn}: criterion must be 'fisher' (rank by F) or 'saliency' (rank by "
            f"0.5 * F * w**2), got {criterion!r}."
        )


def _flat(tree: Any) -> tuple[list[tuple], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [strip_value(p) for p, _ in flat], [x for _, x in flat], treedef


def _prunable_flags(paths: list[tuple], leaves: list[Any], prunable: Prunable, fn: str) -> list:
    """Per leaf: ``False``, ``True`` or a boolean array (element by element)."""
    if prunable is None:
        return [jnp.ndim(x) >= 2 for x in leaves]
    if callable(prunable):
        flags = []
        for path, leaf in zip(paths, leaves, strict=True):
            flag = prunable(path, leaf)
            if not isinstance(flag, bool | np.bool_):
                raise TypeError(
                    f"{fn}: the prunable predicate must return a Python bool for each leaf; "
                    f"at {keystr(path)} it returned {type(flag).__name__}. Return e.g. "
                    "leaf.ndim >= 2, or pass a bool pytree for element-wise control."
                )
            flags.append(bool(flag))
        return flags
    ppaths, pleaves, _ = _flat(prunable)
    for i, path in enumerate(paths):
        if i >= len(ppaths) or ppaths[i] != path:
            where = keystr(ppaths[i]) if i < len(ppaths) else "nothing"
            raise ValueError(
                f"{fn}: prunable does not match the structure of the params: the params have "
                f"a leaf at {keystr(path)} where prunable has {where}. Build it with "
                "jax.tree.map over the params (a bool per leaf, or a bool array shaped like "
                "the leaf)."
            )
    if len(ppaths) != len(paths):
        raise ValueError(
            f"{fn}: prunable has a leaf at {keystr(ppaths[len(paths)])} that the params lack."
        )
    flags = []
    for path, leaf, flag in zip(paths, leaves, pleaves, strict=True):
        if isinstance(flag, bool | np.bool_) or (
            jnp.ndim(flag) == 0 and jnp.result_type(flag) == jnp.bool_
        ):
            flags.append(bool(flag) if _is_concrete(flag) else flag)
        elif jnp.result_type(flag) == jnp.bool_ and jnp.shape(flag) == jnp.shape(leaf):
            flags.append(jnp.asarray(flag))
        else:
            raise TypeError(
                f"{fn}: prunable at {keystr(path)} must be a bool or a bool array of shape "
                f"{jnp.shape(leaf)}, got {jnp.result_type(flag)} of shape {jnp.shape(flag)}."
            )
    return flags


def _mask_leaves(reference: Any, mask: Mask | None, fn: str) -> list[Any] | None:
    if mask is None:
        return None
    try:
        leaves = check_matching(reference, mask, ref_name="params", other_name="mask")
    except ValueError as err:
        raise ValueError(f"{fn}: {err}") from None
    for (path, _), leaf in zip(
        jax.tree_util.tree_flatten_with_path(reference)[0], leaves, strict=True
    ):
        if jnp.result_type(leaf) != jnp.bool_:
            raise TypeError(
                f"{fn}: mask at {keystr(path)} has dtype {jnp.result_type(leaf)}; a mask holds "
                "booleans (True keeps a weight). Convert it with mask.astype(bool)."
            )
    return leaves


def _check_scores(paths: list[tuple], leaves: list[Any], flags: list, what: str, fn: str):
    for path, leaf, flag in zip(paths, leaves, flags, strict=True):
        if flag is False:
            continue
        dtype = jnp.result_type(leaf)
        if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"{fn}: {what} at {keystr(path)} has dtype {dtype}; scores must be real numbers "
                "(floating point or integer)."
            )
        if _is_concrete(leaf) and bool(jnp.any(jnp.isnan(leaf))):
            raise ValueError(
                f"{fn}: {what} at {keystr(path)} holds NaN, which cannot be ranked. Check the "
                "params and the Fisher for NaN (diverged training?) before pruning."
            )


# ---------------------------------------------------------------------------------------------
# The selection kernel


def _float_keys(x: jax.Array) -> jax.Array:
    """Order-preserving map from float32 to uint32: ``a < b`` iff ``key(a) < key(b)``.

    ``-0.0`` is folded onto ``+0.0`` and every NaN onto the positive quiet NaN, whose key lies
    above ``+inf``: under ``jit`` a NaN score ranks above every number and is pruned last.
    """
    x = x.astype(jnp.float32)
    x = jnp.where(x == 0, jnp.float32(0.0), x)
    x = jnp.where(jnp.isnan(x), jnp.float32(jnp.nan), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >= _SIGN, ~bits, bits | _SIGN)


def _chunk(d: int) -> int | None:
    """The largest divisor of ``d`` that is at most 255 (and at least 16), or ``None``."""
    if d <= 255:
        return d
    return next((c for c in range(255, 15, -1) if d % c == 0), None)


def _count(pred: jax.Array) -> jax.Array:
    """``jnp.sum(pred)`` as int32, summed in two levels.

    XLA's CPU backend vectorises a short reduction into uint8 much better than one long
    int32 reduction (measured 4x faster for 1e7 entries): the last axis is split into chunks
    of at most 255, summed in uint8 (which cannot overflow), and the chunk sums in int32.
    Reducing along the leaf's own last axis keeps the sums local to each shard of a sharded
    leaf.
    """
    if pred.ndim == 0:
        return pred.astype(jnp.int32)
    d = pred.shape[-1]
    c = _chunk(d)
    if c is None:
        inner = jnp.uint16 if d <= 65535 else jnp.int32
        return jnp.sum(jnp.sum(pred, axis=-1, dtype=inner), dtype=jnp.int32)
    pred = pred.reshape(*pred.shape[:-1], d // c, c)
    return jnp.sum(jnp.sum(pred, axis=-1, dtype=jnp.uint8), dtype=jnp.int32)


def _flat_index(shape: tuple[int, ...], offset: jax.Array) -> jax.Array:
    """Row-major flat index of every entry, plus ``offset``, as uint32 (shard-local iotas)."""
    idx = jnp.broadcast_to(offset.astype(jnp.uint32), shape)
    stride = 1
    for dim in range(len(shape) - 1, -1, -1):
        idx = idx + lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
        stride *= shape[dim]
    return idx


def _bisect(count_below: Callable[[jax.Array], jax.Array], targets: jax.Array, bits: int):
    """Per group ``g``, the largest ``t < 2**bits`` with ``count_below(t)[g] < targets[g]``.

    ``count_below`` maps a (G,) uint32 vector of candidates to the (G,) int32 counts of
    entries strictly below them; it must be non-decreasing. Also returns
    ``count_below(t)``, tracked for free. One counting pass per bit.
    """
    n_groups = targets.shape[0]

    def body(i, carry):
        t, below = carry
        step = jnp.uint32(1) << (jnp.uint32(bits - 1) - i.astype(jnp.uint32))
        cand = t + step
        counts = count_below(cand)
        take = counts < targets
        return jnp.where(take, cand, t), jnp.where(take, counts, below)

    init = (jnp.zeros(n_groups, jnp.uint32), jnp.zeros(n_groups, jnp.int32))
    return lax.fori_loop(0, bits, body, init)


def _bisect_keys(
    keys: list[jax.Array], groups: tuple[int, ...], n_groups: int, targets: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per group, the largest uint32 ``t`` with ``#{key < t} < target``, and that count.

    The 32 bisection passes run in four phases of eight, one byte of the key per phase. A
    phase first maps each key to one uint8 digit: its byte when its higher bytes equal those
    of the threshold found so far, else 255 (keys below the threshold's prefix are already
    counted in ``below``; those above never count, and a real digit 255 is never below a
    candidate digit, which is at most 255). Its eight counting passes then read one byte
    per weight instead of four, a quarter of the memory traffic of plain bisection.
    """
    thresh = jnp.zeros(n_groups, jnp.uint32)
    below = jnp.zeros(n_groups, jnp.int32)
    for phase in range(4):
        shift = 24 - 8 * phase
        digits = []
        for k, g in zip(keys, groups, strict=True):
            d = ((k >> shift) & np.uint32(0xFF)).astype(jnp.uint8)
            if phase:
                same = (k >> (shift + 8)) == (thresh[g] >> (shift + 8))
                d = jnp.where(same, d, np.uint8(0xFF))
            digits.append(d)

        def body(i, carry, digits=digits, below0=below):
            t, b = carry
            cand = t + (jnp.uint32(1) << (jnp.uint32(7) - i.astype(jnp.uint32)))
            counts = below0 + _group_sum(
                [
                    _count(d < cand[g].astype(jnp.uint8))
                    for d, g in zip(digits, groups, strict=True)
                ],
                groups,
                n_groups,
            )
            take = counts < targets
            return jnp.where(take, cand, t), jnp.where(take, counts, b)

        digit, below = lax.fori_loop(0, 8, body, (jnp.zeros(n_groups, jnp.uint32), below))
        thresh = thresh | (digit << shift)
    return thresh, below


def _group_sum(values: list[jax.Array], groups: tuple[int, ...], n_groups: int) -> jax.Array:
    sums = [jnp.int32(0)] * n_groups
    for v, g in zip(values, groups, strict=True):
        sums[g] = sums[g] + v
    return jnp.stack(sums)


def _select_kept(
    scores: list[jax.Array],
    allowed: list[jax.Array | None],
    kept: list[jax.Array | None],
    targets: jax.Array,
    *,
    groups: tuple[int, ...],
    n_groups: int,
    index_bits: int,
) -> list[jax.Array]:
    """Keep-masks pruning, per group, the ``targets[g]`` smallest scores (exact, sort-free).

    Entries where ``allowed`` is False are never pruned; entries where ``kept`` is False are
    pruned whatever their score (and count toward the target, which is raised to their number
    if it is lower). Ties at the threshold go to the lower flat index, where the flat index
    runs over the group's leaves in order, row-major inside each leaf.
    """
    keys = []
    for s, a, k in zip(scores, allowed, kept, strict=True):
        key = _float_keys(s)
        if k is not None:
            key = jnp.where(k, key, _ALREADY)
        if a is not None:
            key = jnp.where(a, key, _NEVER)
        keys.append(key)
    prior = [
        _count(~k if a is None else ~k & a) if k is not None else jnp.int32(0)
        for a, k in zip(allowed, kept, strict=True)
    ]
    targets = jnp.maximum(targets.astype(jnp.int32), _group_sum(prior, groups, n_groups))

    thresh, below = _bisect_keys(keys, groups, n_groups, targets)
    at = _group_sum(
        [_count(k == thresh[g]) for k, g in zip(keys, groups, strict=True)], groups, n_groups
    )
    ties = targets - below  # how many entries at the threshold to prune (>= 1 if target > 0)

    # Leaf offsets inside each group, for the global flat index of the tie-break.
    offsets, running = [], [0] * n_groups
    for k, g in zip(keys, groups, strict=True):
        offsets.append(running[g])
        running[g] += k.size

    def tie_cut(_):
        def count_tied_below(cand):
            return _group_sum(
                [
                    _count((k == thresh[g]) & (_flat_index(k.shape, jnp.uint32(o)) < cand[g]))
                    for k, g, o in zip(keys, groups, offsets, strict=True)
                ],
                groups,
                n_groups,
            )

        cut, _ = _bisect(count_tied_below, ties, index_bits)
        return jnp.where(at > ties, cut, _NEVER)

    # Only when some group has more entries at the threshold than it may prune does the
    # flat-index bisection run (continuous scores almost never need it).
    cut = lax.cond(jnp.any(at > ties), tie_cut, lambda _: jnp.full(n_groups, _NEVER), None)
    out = []
    for k, g, o in zip(keys, groups, offsets, strict=True):
        tied = k == thresh[g]
        tied_pruned = tied & (_flat_index(k.shape, jnp.uint32(o)) <= cut[g])
        prune = ((k < thresh[g]) | tied_pruned) & (targets[g] > 0)
        out.append(~prune)
    return out


_select_kept_jit = jax.jit(_select_kept, static_argnames=("groups", "n_groups", "index_bits"))


def _round_product(s: jax.Array, n: jax.Array) -> jax.Array:
    """Exact ``round(s * n)`` (half to even) of a float32 ``s`` in [0, 1] and an int32 ``n``.

    A float32 product rounds: ``float32(0.7) * 45`` gives 31.5 although the exact product is
    31.4999995. Instead ``s = m * 2**-q`` (integer ``m < 2**24``) and ``m * n`` is formed
    exactly in two uint32 words from 16-bit limbs, then shifted right by ``q`` with the
    remainder compared to one half. Traceable; no 64-bit types needed.
    """
    s = jnp.clip(s.astype(jnp.float32), 0.0, 1.0)
    n = n.astype(jnp.uint32)
    bits = lax.bitcast_convert_type(s, jnp.uint32)
    exp = (bits >> 23).astype(jnp.int32)
    mant = bits & np.uint32(0x7FFFFF)
    m = jnp.where(exp > 0, mant | np.uint32(0x800000), mant)
    q = jnp.where(exp > 0, 150 - exp, 149)  # s = m * 2**-q, q >= 23 (q == 23 only for s == 1)
    m0, m1 = m & np.uint32(0xFFFF), m >> 16
    n0, n1 = n & np.uint32(0xFFFF), n >> 16
    lo, mid, hi = m0 * n0, m1 * n0 + m0 * n1, m1 * n1
    p_lo = lo + (mid << 16)
    p_hi = hi + (mid >> 16) + (p_lo < lo).astype(jnp.uint32)

    def shl(x, k):  # x << k, 0 when k >= 32 (XLA leaves wide shifts undefined)
        return jnp.where(k >= 32, np.uint32(0), x << jnp.clip(k, 0, 31).astype(jnp.uint32))

    def shr(x, k):
        return jnp.where(k >= 32, np.uint32(0), x >> jnp.clip(k, 0, 31).astype(jnp.uint32))

    def low_bits(x, k):  # x mod 2**k
        return jnp.where(k >= 32, x, x & (shl(np.uint32(1), k) - np.uint32(1)))

    # floor(P / 2**q) and the remainder R = P mod 2**q, as (hi, lo) words.
    k = jnp.where(q >= 32, shr(p_hi, q - 32), shl(p_hi, 32 - q) | shr(p_lo, q))
    r_hi = jnp.where(q >= 32, low_bits(p_hi, q - 32), np.uint32(0))
    r_lo = jnp.where(q >= 32, p_lo, low_bits(p_lo, q))
    h_hi = jnp.where(q >= 33, shl(np.uint32(1), q - 33), np.uint32(0))
    h_lo = jnp.where(q >= 33, np.uint32(0), shl(np.uint32(1), q - 1))
    above = (r_hi > h_hi) | ((r_hi == h_hi) & (r_lo > h_lo))
    half = (r_hi == h_hi) & (r_lo == h_lo)
    k = k + (above | (half & ((k & np.uint32(1)) == 1))).astype(jnp.uint32)
    return jnp.where(q >= 56, np.uint32(0), k).astype(jnp.int32)


def _target(sparsity: Any, n: Any) -> Any:
    """``round(sparsity * n)``, exactly and half to even, concrete or traced."""
    if isinstance(sparsity, float) and isinstance(n, int):
        return round(Fraction(sparsity) * n)
    return _round_product(jnp.asarray(sparsity, jnp.float32), jnp.asarray(n, jnp.int32))


def _mask_from_scores(
    params: Any,
    scores: list[jax.Array],
    sparsity: Any,
    *,
    scope: str,
    flags: list,
    kept: list | None,
    fn: str,
) -> Mask:
    """Mask (tree of ``params``) pruning the smallest ``scores`` (a list in flattening order)."""
    _, leaves, treedef = _flat(params)
    chosen = [i for i, f in enumerate(flags) if f is not False]
    if not chosen:
        return jax.tree.unflatten(treedef, [jnp.ones(jnp.shape(x), bool) for x in leaves])
    groups = tuple(0 if scope == "global" else j for j in range(len(chosen)))
    n_groups = 1 if scope == "global" else len(chosen)
    allowed, counts = [], [0] * n_groups
    for i, g in zip(chosen, groups, strict=True):
        f = flags[i]
        if isinstance(f, bool):
            allowed.append(None)
            n_i = int(np.prod(jnp.shape(leaves[i]), dtype=np.int64))
        else:
            f = jnp.broadcast_to(f, jnp.shape(leaves[i]))
            allowed.append(f)
            n_i = jnp.sum(f, dtype=jnp.int32)
            n_i = int(n_i) if _is_concrete(n_i) else n_i
        counts[g] = counts[g] + n_i
    sizes = [0] * n_groups
    for i, g in zip(chosen, groups, strict=True):
        sizes[g] += int(np.prod(jnp.shape(leaves[i]), dtype=np.int64))
    if max(sizes) > _MAX_COUNT:
        raise ValueError(
            f"{fn}: a selection over {max(sizes)} weights exceeds the int32 counters "
            f"(at most {_MAX_COUNT}); use scope='layer' or prune groups of leaves separately."
        )
    targets = jnp.stack([jnp.asarray(_target(sparsity, c), jnp.int32) for c in counts])
    index_bits = max(1, int(max(sizes) - 1).bit_length())
    kept_leaves = [None if kept is None else kept[i] for i in chosen]
    new = _select_kept_jit(
        [scores[i] for i in chosen],
        allowed,
        kept_leaves,
        targets,
        groups=groups,
        n_groups=n_groups,
        index_bits=index_bits,
    )
    out = [jnp.ones(jnp.shape(x), bool) for x in leaves]
    for i, m in zip(chosen, new, strict=True):
        out[i] = m
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# Public mask functions


def topk_mask(
    scores: Scores,
    sparsity: float | jax.Array,
    *,
    scope: Literal["global", "layer"] = "global",
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""Keep the largest scores: prune exactly ``round(sparsity * n)`` of the smallest.

    With ``n`` prunable weights in scope (all prunable leaves for ``scope="global"``, each
    prunable leaf on its own for ``scope="layer"``) and ``m`` of them already pruned by
    ``mask``, the result prunes

    .. math::
      k = \max\bigl(\operatorname{round}(s \cdot n),\ m\bigr)

    weights: the ``m`` pruned before, then the smallest scores among the rest. Ties break
    deterministically: among equal scores the weight with the lower flat index is pruned
    first, where the flat index runs over the prunable leaves in ``jax.tree`` flattening
    order, row-major inside each leaf (``-0.0`` equals ``0.0``).

    The exact threshold is found without sorting, by bisecting the 32 bits of
    order-preserving integer keys: 32 counting passes, in four phases of eight that each
    read one byte per weight, plus up to :math:`\lceil \log_2 n \rceil` passes over the
    flat index, run only when ties straddle the threshold. Under ``jit`` on sharded scores
    only scalar counts cross devices (no all-gather).

    Args:
      scores: a pytree of real arrays; larger means more important. Cast to float32.
      sparsity: the fraction of prunable weights to remove, in ``[0, 1]``. Under ``jit``
        a traced value is clipped to ``[0, 1]``. ``round(sparsity * n)`` is exact and rounds
        half to even, on the exact product (``Fraction(sparsity) * n``) for a Python float
        and on the exact product of the float32 value for a traced one.
      scope: ``"global"`` ranks all prunable weights together; ``"layer"`` ranks and
        prunes each leaf on its own.
      prunable: which weights may be pruned. ``None``: leaves with ``ndim >= 2`` (kernels,
        not biases or norm scales). A predicate ``prunable(path, leaf) -> bool`` where
        ``path`` is the leaf's ``jax.tree_util`` key path tuple (as from
        ``jax.tree_util.tree_flatten_with_path``, with Flax's ``.value`` hop left out;
        ``jax.tree_util.keystr(path)`` gives e.g. ``"['dense']['kernel']"``). Or a pytree
        like ``scores`` holding a bool per leaf or a bool array per leaf.
      mask: an existing mask; what it prunes stays pruned and counts toward the target.

    Returns:
      A boolean pytree shaped like ``scores``; ``True`` keeps a weight. Non-prunable
      weights are always ``True``.

    Raises:
      ValueError: if ``sparsity`` lies outside ``[0, 1]``, ``scope`` is unknown, concrete
        scores hold NaN (under ``jit`` they cannot be checked: NaN then ranks above every
        number and is pruned last), or ``mask``/``prunable`` do not match ``scores``.
      TypeError: if scores are not real numbers, or ``mask`` is not boolean.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> scores = {"w": jnp.array([[3.0, 1.0], [2.0, 1.0]]), "b": jnp.array([0.0, 0.0])}
      >>> m = fisher_optax.topk_mask(scores, 0.5)
      >>> m["w"]  # the two 1.0s are pruned; the bias (ndim 1) is not prunable
      Array([[ True, False],
             [ True, False]], dtype=bool)
      >>> fisher_optax.topk_mask(scores, 0.25)["w"]  # tie: the lower flat index goes first
      Array([[ True, False],
             [ True,  True]], dtype=bool)
    """
    fn = "topk_mask"
    _check_scope(scope, fn)
    sparsity = _check_sparsity(sparsity, "sparsity", fn)
    paths, leaves, _ = _flat(scores)
    flags = _prunable_flags(paths, leaves, prunable, fn)
    _check_scores(paths, leaves, flags, "scores", fn)
    kept = _mask_leaves(scores, mask, fn)
    return _mask_from_scores(scores, leaves, sparsity, scope=scope, flags=flags, kept=kept, fn=fn)


def magnitude_mask(
    params: Params,
    sparsity: float | jax.Array,
    *,
    scope: Literal["global", "layer"] = "global",
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""Prune the weights of smallest magnitude :math:`|w|`.

    :func:`topk_mask` with scores :math:`|w|`; see it for the exact count, the tie-break and
    the meaning of ``scope``, ``prunable`` and ``mask``.

    Args:
      params: a pytree of parameter arrays.
      sparsity: the fraction of prunable weights to remove, in ``[0, 1]``.
      scope: ``"global"`` or ``"layer"``.
      prunable: ``None`` (leaves with ``ndim >= 2``), a predicate on ``(path, leaf)``, or a
        bool pytree.
      mask: an existing mask whose pruned weights stay pruned and count toward the target.

    Returns:
      A boolean pytree shaped like ``params``; ``True`` keeps a weight.

    Raises:
      ValueError: as :func:`topk_mask`.
      TypeError: as :func:`topk_mask`.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.array([[0.1, -2.0], [-0.3, 0.5]])}
      >>> fisher_optax.magnitude_mask(params, 0.5)["w"]
      Array([[False,  True],
             [False,  True]], dtype=bool)

    References:
      Han, Pool, Tran, Dally. Learning both Weights and Connections for Efficient Neural
      Networks. NeurIPS 2015. https://arxiv.org/abs/1506.02626
    """
    fn = "magnitude_mask"
    _check_scope(scope, fn)
    sparsity = _check_sparsity(sparsity, "sparsity", fn)
    paths, leaves, _ = _flat(params)
    flags = _prunable_flags(paths, leaves, prunable, fn)
    _check_scores(paths, leaves, flags, "params", fn)
    kept = _mask_leaves(params, mask, fn)
    scores = [jnp.abs(x) for x in leaves]
    return _mask_from_scores(params, scores, sparsity, scope=scope, flags=flags, kept=kept, fn=fn)


def _fisher_scores(params: Params, fisher: Fisher, criterion: str, fn: str) -> list[jax.Array]:
    try:
        fleaves = check_matching(params, fisher, ref_name="params", other_name="fisher")
    except ValueError as err:
        raise ValueError(f"{fn}: {err}") from None
    _, pleaves, _ = _flat(params)
    if criterion == "fisher":
        return [jnp.asarray(f) for f in fleaves]
    return [
        0.5 * jnp.asarray(f, jnp.float32) * jnp.square(jnp.asarray(w, jnp.float32))
        for f, w in zip(fleaves, pleaves, strict=True)
    ]


def fisher_mask(
    params: Params,
    fisher: Fisher,
    sparsity: float | jax.Array,
    *,
    criterion: Literal["fisher", "saliency"] = "fisher",
    scope: Literal["global", "layer"] = "global",
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""Prune the weights of least Fisher information, or of least OBD saliency.

    .. math::
      \text{score} = \begin{cases} F & \text{criterion="fisher"} \\
      \tfrac12 F w^2 & \text{criterion="saliency"} \end{cases}

    The saliency is optimal brain damage's estimate of the loss increase when a weight is
    set to zero, with the Fisher diagonal in place of the Hessian diagonal. See
    :func:`topk_mask` for the exact count and the tie-break.

    Args:
      params: a pytree of parameter arrays.
      fisher: a Fisher diagonal shaped like ``params`` (e.g. from
        :func:`fisher_optax.fisher_from_state`).
      sparsity: the fraction of prunable weights to remove, in ``[0, 1]``.
      criterion: ``"fisher"`` or ``"saliency"``.
      scope: ``"global"`` or ``"layer"``.
      prunable: ``None`` (leaves with ``ndim >= 2``), a predicate on ``(path, leaf)``, or a
        bool pytree.
      mask: an existing mask whose pruned weights stay pruned and count toward the target.

    Returns:
      A boolean pytree shaped like ``params``; ``True`` keeps a weight.

    Raises:
      ValueError: if ``fisher`` differs from ``params`` in structure or shapes (naming the
        first mismatching path), if ``criterion`` is unknown, and as :func:`topk_mask`.
      TypeError: as :func:`topk_mask`.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.array([[0.1, 2.0], [3.0, 4.0]])}
      >>> fisher = {"w": jnp.array([[0.5, 0.1], [0.2, 0.05]])}
      >>> fisher_optax.fisher_mask(params, fisher, 0.5)["w"]
      Array([[ True, False],
             [ True, False]], dtype=bool)
      >>> fisher_optax.fisher_mask(params, fisher, 0.5, criterion="saliency")["w"]
      Array([[False, False],
             [ True,  True]], dtype=bool)

    References:
      LeCun, Denker, Solla. Optimal Brain Damage. NeurIPS 1989.

      Theis, Korshunova, Tejani, Huszár. Faster gaze prediction with dense networks and
      Fisher pruning. 2018. https://arxiv.org/abs/1801.05787

      Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using
      Information Theory. ISVLSI 2016. https://arxiv.org/abs/1605.04859
    """
    fn = "fisher_mask"
    _check_scope(scope, fn)
    _check_criterion(criterion, fn)
    sparsity = _check_sparsity(sparsity, "sparsity", fn)
    paths, leaves, _ = _flat(params)
    flags = _prunable_flags(paths, leaves, prunable, fn)
    scores = _fisher_scores(params, fisher, criterion, fn)
    _check_scores(paths, scores, flags, "the Fisher scores", fn)
    kept = _mask_leaves(params, mask, fn)
    return _mask_from_scores(params, scores, sparsity, scope=scope, flags=flags, kept=kept, fn=fn)


def two_stage_mask(
    params: Params,
    fisher: Fisher,
    sparsity: float | jax.Array,
    *,
    magnitude_sparsity: float | jax.Array,
    criterion: Literal["fisher", "saliency"] = "fisher",
    scope: Literal["global", "layer"] = "global",
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""The paper's two-stage pruning: first by magnitude, then by Fisher information.

    Stage one prunes ``round(magnitude_sparsity * n)`` of the ``n`` prunable weights in
    scope by :math:`|w|` (:func:`magnitude_mask`); weights of tiny magnitude have a Fisher
    that is hard to estimate. Stage two prunes among the survivors, by the Fisher criterion,
    until ``round(sparsity * n)`` are pruned in all (:func:`fisher_mask` with the stage-one
    mask). Both stages count what ``mask`` pruned before toward their targets.

    Args:
      params: a pytree of parameter arrays.
      fisher: a Fisher diagonal shaped like ``params``.
      sparsity: the final fraction of prunable weights removed, in ``[0, 1]``.
      magnitude_sparsity: the fraction removed by magnitude in stage one, in
        ``[0, sparsity]``.
      criterion: ``"fisher"`` (rank by F) or ``"saliency"`` (rank by 0.5 F w^2).
      scope: ``"global"`` or ``"layer"`` (both stages).
      prunable: ``None`` (leaves with ``ndim >= 2``), a predicate on ``(path, leaf)``, or a
        bool pytree.
      mask: an existing mask whose pruned weights stay pruned and count toward the targets.

    Returns:
      A boolean pytree shaped like ``params``; ``True`` keeps a weight.

    Raises:
      ValueError: if ``magnitude_sparsity > sparsity`` (when both are concrete), and as
        :func:`fisher_mask`.
      TypeError: as :func:`topk_mask`.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.array([[0.01, 2.0], [3.0, 4.0]])}
      >>> fisher = {"w": jnp.array([[9.0, 0.1], [0.2, 5.0]])}
      >>> m = fisher_optax.two_stage_mask(params, fisher, 0.5, magnitude_sparsity=0.25)
      >>> m["w"]  # 0.01 goes by magnitude, then 2.0 (F = 0.1) by Fisher
      Array([[False, False],
             [ True,  True]], dtype=bool)

    References:
      Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using
      Information Theory. ISVLSI 2016. https://arxiv.org/abs/1605.04859
    """
    fn = "two_stage_mask"
    _check_scope(scope, fn)
    _check_criterion(criterion, fn)
    sparsity = _check_sparsity(sparsity, "sparsity", fn)
    magnitude_sparsity = _check_sparsity(magnitude_sparsity, "magnitude_sparsity", fn)
    if isinstance(sparsity, float) and isinstance(magnitude_sparsity, float):
        if magnitude_sparsity > sparsity:
            raise ValueError(
                f"{fn}: magnitude_sparsity ({magnitude_sparsity}) exceeds sparsity "
                f"({sparsity}); stage one may prune at most the final target. Lower "
                "magnitude_sparsity or raise sparsity."
            )
    else:
        magnitude_sparsity = jnp.minimum(magnitude_sparsity, sparsity)
    paths, leaves, _ = _flat(params)
    flags = _prunable_flags(paths, leaves, prunable, fn)
    scores = _fisher_scores(params, fisher, criterion, fn)
    _check_scores(paths, leaves, flags, "params", fn)
    _check_scores(paths, scores, flags, "the Fisher scores", fn)
    kept = _mask_leaves(params, mask, fn)
    stage1 = _mask_from_scores(
        params,
        [jnp.abs(x) for x in leaves],
        magnitude_sparsity,
        scope=scope,
        flags=flags,
        kept=kept,
        fn=fn,
    )
    return _mask_from_scores(
        params, scores, sparsity, scope=scope, flags=flags, kept=jax.tree.leaves(stage1), fn=fn
    )


def random_mask(
    key: jax.Array,
    params: Params,
    sparsity: float | jax.Array,
    *,
    scope: Literal["global", "layer"] = "global",
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    """Prune exactly ``round(sparsity * n)`` prunable weights chosen uniformly at random.

    The baseline every criterion must beat. Scores are i.i.d. uniform draws (one
    ``jax.random.fold_in(key, i)`` stream per leaf ``i``), ranked like :func:`topk_mask`.

    Args:
      key: a ``jax.random`` key.
      params: a pytree of parameter arrays (only their shapes are used).
      sparsity: the fraction of prunable weights to remove, in ``[0, 1]``.
      scope: ``"global"`` or ``"layer"``.
      prunable: ``None`` (leaves with ``ndim >= 2``), a predicate on ``(path, leaf)``, or a
        bool pytree.
      mask: an existing mask whose pruned weights stay pruned and count toward the target.

    Returns:
      A boolean pytree shaped like ``params``; ``True`` keeps a weight.

    Raises:
      ValueError: as :func:`topk_mask`.

    Examples:
      >>> import jax, jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.ones((10, 10))}
      >>> m = fisher_optax.random_mask(jax.random.key(0), params, 0.3)
      >>> int((~m["w"]).sum())
      30
    """
    fn = "random_mask"
    _check_scope(scope, fn)
    sparsity = _check_sparsity(sparsity, "sparsity", fn)
    paths, leaves, _ = _flat(params)
    flags = _prunable_flags(paths, leaves, prunable, fn)
    kept = _mask_leaves(params, mask, fn)
    scores = [
        jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(x)) if flag is not False else None
        for i, (x, flag) in enumerate(zip(leaves, flags, strict=True))
    ]
    return _mask_from_scores(params, scores, sparsity, scope=scope, flags=flags, kept=kept, fn=fn)


def apply_mask(params: Params, mask: Mask) -> Params:
    """Set the pruned weights to zero: ``where(mask, params, 0)``.

    Args:
      params: a pytree of parameter arrays.
      mask: a boolean pytree shaped like ``params``; ``True`` keeps a weight.

    Returns:
      ``params`` with every pruned entry exactly zero, in the tree structure of ``params``.

    Raises:
      ValueError: if ``mask`` differs from ``params`` in structure or shapes.
      TypeError: if ``mask`` is not boolean.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> fisher_optax.apply_mask(params, {"w": jnp.array([True, False])})["w"]
      Array([1., 0.], dtype=float32)
    """
    masks = _mask_leaves(params, mask, "apply_mask")
    _, leaves, treedef = _flat(params)
    out = [
        jnp.where(m, x, jnp.zeros((), jnp.result_type(x)))
        for x, m in zip(leaves, masks, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def sparsity_report(mask: Mask, prunable: Prunable = None) -> dict[str, Any]:
    """How much a mask prunes, overall and leaf by leaf (host-side, not for ``jit``).

    Args:
      mask: a boolean pytree; ``True`` keeps a weight.
      prunable: which weights count toward the overall figure: ``None`` (leaves with
        ``ndim >= 2``), a predicate on ``(path, leaf)``, or a bool pytree (see
        :func:`topk_mask`).

    Returns:
      A dict with ``"sparsity"`` (pruned fraction of the prunable weights, ``0.0`` if there
      are none), ``"pruned"`` and ``"prunable"`` (counts), and ``"leaves"``: a dict from
      each leaf's path string (``jax.tree_util.keystr`` form) to a dict with its own
      ``"sparsity"``, ``"pruned"``, ``"size"`` and ``"prunable"`` (its prunable count).

    Raises:
      TypeError: if a mask leaf is not boolean.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> mask = {"w": jnp.array([[True, False], [False, False]]), "b": jnp.array([True])}
      >>> report = fisher_optax.sparsity_report(mask)
      >>> report["sparsity"], report["pruned"], report["prunable"]
      (0.75, 3, 4)
      >>> report["leaves"]["['w']"]["sparsity"]
      0.75
    """
    paths, leaves, _ = _flat(mask)
    for path, leaf in zip(paths, leaves, strict=True):
        if jnp.result_type(leaf) != jnp.bool_:
            raise TypeError(
                f"sparsity_report: mask at {keystr(path)} has dtype {jnp.result_type(leaf)}; "
                "a mask holds booleans."
            )
    flags = _prunable_flags(paths, leaves, prunable, "sparsity_report")
    total_pruned, total = 0, 0
    per_leaf = {}
    for path, leaf, flag in zip(paths, leaves, flags, strict=True):
        leaf = np.asarray(leaf)
        allowed = np.ones(leaf.shape, bool) if flag is True else np.zeros(leaf.shape, bool)
        if not isinstance(flag, bool):
            allowed = np.broadcast_to(np.asarray(flag), leaf.shape)
        pruned = int((~leaf).sum())
        n_prunable = int(allowed.sum())
        pruned_prunable = int((~leaf & allowed).sum())
        total_pruned += pruned_prunable
        total += n_prunable
        per_leaf[keystr(path)] = {
            "sparsity": pruned / leaf.size if leaf.size else 0.0,
            "pruned": pruned,
            "size": int(leaf.size),
            "prunable": n_prunable,
        }
    return {
        "sparsity": total_pruned / total if total else 0.0,
        "pruned": total_pruned,
        "prunable": total,
        "leaves": per_leaf,
    }
