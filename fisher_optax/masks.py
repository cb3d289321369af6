"""Pruning masks: which weights to remove, ranked by magnitude, Fisher, or any score.

A mask is a boolean pytree shaped like the parameters; ``True`` keeps a weight. Every mask
function here is :func:`topk_mask` over scores from :func:`fisher_optax.scores`: it prunes
*exactly* ``round(s * n)`` of the ``n`` prunable weights in scope, the ones with the smallest
scores, and breaks ties by a fixed rule. The sparsity ``s`` is one scalar (a global ranking,
or every leaf at the same target), or one target per leaf: a pytree of scalars, or a
mapping from paths or predicates to targets (e.g. from :func:`erk_sparsity`).

Selection never sorts. Scores are mapped to order-preserving ``uint32`` keys and the exact
k-th smallest key is found one byte at a time by counting passes: each pass compares every
key with three candidates at once (one variadic reduction, two bits per pass, 16 passes) and
sums, per leaf, how many fall below each. On parameters sharded along explicit mesh axes
each device counts its block in ``shard_map``; on other sharded ones (``Auto`` axes) each
pass counts one candidate (32 passes), whose sums XLA's partitioner splits across shards:
either way only scalar counts cross devices. Ties at the cut are broken by flat index with
two small selections (tied entries counted per row, then inside the one row that holds the
cut). XLA's CPU sort of 1e7 floats takes seconds; the counting passes take 0.3-0.5x
NumPy's ``np.partition`` from 1e6 to 1e8 scores on two CPU cores; above ``2**21`` scores
they store one byte per score, recomputing the keys in every phase (see
``benchmarks/bench_select.py``). Eager calls on concrete arrays held by the CPU (at most
``2**24`` weights) select in NumPy instead, with identical masks, so a first call compiles
nothing.
"""

import math
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any, Literal, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fisher_optax import _validate
from fisher_optax._tree import is_kernel, keystr, strip_value
from fisher_optax._types import Fisher, Mask, Params, Scores
from fisher_optax.scores import CRITERIA
from fisher_optax.scores import scores as _scores

__all__ = [
    "LeafSparsity",
    "SparsityReport",
    "apply_mask",
    "erk_sparsity",
    "fisher_mask",
    "is_kernel",
    "magnitude_mask",
    "random_mask",
    "sparsity_report",
    "topk_mask",
    "two_stage_mask",
    "uniform_sparsity",
]

Prunable: TypeAlias = Callable[[tuple, jax.Array], bool] | Any | None
"""``None`` (the kernels, :func:`is_kernel`), a predicate on ``(path, leaf)``, or a bool pytree."""

Sparsity: TypeAlias = float | jax.Array | Mapping[str | Callable, float] | Any
"""One fraction in ``[0, 1]``, a pytree of per-leaf fractions shaped like the params (one
scalar per leaf), or a mapping ``{path string or predicate(path, leaf): fraction}``."""

FISHER_CRITERIA: dict[str, str] = {k: CRITERIA[k] for k in ("fisher", "saliency")}
"""The named criteria that rank by the Fisher (``fisher_mask``, ``two_stage_mask``)."""

_SIGN = np.uint32(0x80000000)
_NEVER = np.uint32(0xFFFFFFFF)  # key of entries that may not be pruned: above every real score
_ALREADY = np.uint32(0)  # key of entries an earlier mask pruned: below every real score
_TINY = np.float32(np.finfo(np.float32).tiny)  # the smallest normal float32
_MAX_COUNT = 2**31 - 1
_HOST_MAX = 2**24
"""Selections over at most this many concrete weights held on the CPU run in NumPy.

A first call then compiles nothing (the jitted kernel takes seconds to compile per tree
layout, NumPy's introselect milliseconds to run); the masks are identical either way."""
# Up to this many scores the jitted selection stores their keys (4 bytes each) for its
# phases to read; above it every phase recomputes them from the scores. XLA's CPU backend
# allocates a call's temporaries afresh, and glibc serves a block above 32 MB (its largest
# mmap threshold) with new pages that fault in at every call: 0.5-0.9 s of system time at
# 1e8 scores, measured. Below it the block is reused, and stored keys were faster: stored /
# recomputed 0.85-0.96 up to 2e6 scores, 1.1-1.5 at 4e6-8e6 (bench_select.py --keys).
_STORED_KEYS_MAX = 2**21

_SPARSITY_MEANING = "the fraction of prunable weights to remove"


# ---------------------------------------------------------------------------------------------
# Arguments: prunable flags, per-leaf sparsities


def _flat(tree: Any) -> tuple[list[tuple], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [strip_value(p) for p, _ in flat], [x for _, x in flat], treedef


def _prunable_flags(paths: list[tuple], leaves: list[Any], prunable: Prunable) -> list:
    """Per leaf: ``False``, ``True`` or a boolean array (element by element)."""
    if prunable is None:
        return [is_kernel(p, x) for p, x in zip(paths, leaves, strict=True)]
    if callable(prunable):
        _validate.callable_arity(prunable, "prunable", "prunable(path, leaf) -> bool", 2)
        flags = []
        for path, leaf in zip(paths, leaves, strict=True):
            flag = prunable(path, leaf)
            if not isinstance(flag, bool | np.bool_):
                raise TypeError(
                    f"the prunable predicate must return a Python bool for each leaf; at "
                    f"{keystr(path)} it returned {type(flag).__name__}. Return e.g. "
                    "leaf.ndim >= 2, or pass a bool pytree for element-wise control."
                )
            flags.append(bool(flag))
        return flags
    ppaths, pleaves, _ = _flat(prunable)
    _check_paths(paths, ppaths, "prunable", "a bool per leaf, or a bool array shaped like it")
    flags = []
    for path, leaf, flag in zip(paths, leaves, pleaves, strict=True):
        if isinstance(flag, bool | np.bool_) or (
            jnp.ndim(flag) == 0 and jnp.result_type(flag) == jnp.bool_
        ):
            flags.append(bool(flag) if _validate.is_concrete(flag) else flag)
        elif jnp.result_type(flag) == jnp.bool_ and jnp.shape(flag) == jnp.shape(leaf):
            flags.append(jnp.asarray(flag))
        else:
            raise TypeError(
                f"prunable at {keystr(path)} must be a bool or a bool array of shape "
                f"{jnp.shape(leaf)}, got {jnp.result_type(flag)} of shape {jnp.shape(flag)}."
            )
    return flags


def _check_paths(paths: list[tuple], other: list[tuple], name: str, what: str) -> None:
    """``other`` (a tree's key paths) lists exactly ``paths``; shapes are not compared."""
    for i, path in enumerate(paths):
        if i >= len(other) or other[i] != path:
            where = keystr(other[i]) if i < len(other) else "nothing"
            raise ValueError(
                f"{name} does not match the structure of the params: the params have a leaf "
                f"at {keystr(path)} where {name} has {where}. Build it with jax.tree.map over "
                f"the params ({what})."
            )
    if len(other) != len(paths):
        raise ValueError(f"{name} has a leaf at {keystr(other[len(paths)])} that the params lack.")


def _is_path_map(sparsity: Any) -> bool:
    """A mapping keyed by path strings (``"['dense']['kernel']"``) or predicates."""
    return isinstance(sparsity, Mapping) and any(
        callable(k) or (isinstance(k, str) and k[:1] in "[.") for k in sparsity
    )


def _fraction(value: Any, name: str) -> Any:
    """A checked fraction, rounded to float32 when concrete: eager and jitted counts agree."""
    value = _validate.fraction(value, name, meaning=_SPARSITY_MEANING)
    return float(np.float32(value)) if isinstance(value, float) else value


def _per_leaf(sparsity: Sparsity, paths: list[tuple], leaves: list[Any]) -> Any:
    """A scalar fraction, or a list with one fraction per leaf (the rule of :data:`Sparsity`)."""
    if _is_path_map(sparsity):
        out: list[Any] = [None] * len(paths)
        names = [keystr(p) for p in paths]
        for k, v in sparsity.items():
            if callable(k):
                _validate.callable_arity(k, "a sparsity key", "predicate(path, leaf) -> bool", 2)
                hits = [i for i, (p, x) in enumerate(zip(paths, leaves, strict=True)) if k(p, x)]
                label = getattr(k, "__name__", repr(k))
            elif isinstance(k, str):
                hits = [i for i, n in enumerate(names) if n == k]
                label = k
                if not hits:
                    raise ValueError(
                        f"sparsity names the path {k!r}, which the params do not have. Paths "
                        f"are written as jax.tree_util.keystr writes them: {names[:4]}..."
                    )
            else:
                raise TypeError(
                    f"a sparsity mapping is keyed by path strings or predicates(path, leaf), "
                    f"got the key {k!r} ({type(k).__name__})."
                )
            for i in hits:
                if out[i] is not None:
                    raise ValueError(
                        f"sparsity gives the leaf at {names[i]} two targets (again by {label}); "
                        "each leaf may match one key of the mapping."
                    )
                out[i] = _fraction(v, f"sparsity[{label!r}]")
        return [0.0 if v is None else v for v in out]
    if not isinstance(sparsity, list | tuple | dict | Mapping) and jnp.ndim(sparsity) == 0:
        return _fraction(sparsity, "sparsity")
    spaths, sleaves, _ = _flat(sparsity)
    _check_paths(paths, spaths, "sparsity", "one fraction per leaf, e.g. from erk_sparsity")
    return [_fraction(v, f"sparsity at {keystr(p)}") for p, v in zip(paths, sleaves, strict=True)]


def _scale(sparsity: Any, factor: Any) -> Any:
    """``factor * sparsity`` per leaf, in float32 in both the eager and the jitted path."""
    if isinstance(sparsity, list):
        return [_scale(s, factor) for s in sparsity]
    if isinstance(sparsity, float) and isinstance(factor, float):
        return float(np.float32(factor) * np.float32(sparsity))
    return jnp.float32(factor) * jnp.float32(sparsity)


def _mask_leaves(reference: Any, mask: Mask | None) -> list[Any] | None:
    return None if mask is None else _validate.bool_leaves(reference, mask)


# ---------------------------------------------------------------------------------------------
# The selection kernel


def _float_keys(x: jax.Array) -> jax.Array:
    """Order-preserving map from float32 to uint32: ``a < b`` iff ``key(a) < key(b)``.

    ``-0.0`` and subnormals are folded onto ``+0.0`` (XLA's CPU compares already treat
    subnormals as zero; saying so makes every backend and the NumPy path agree), and every
    NaN onto the positive quiet NaN, whose key lies above ``+inf``: under ``jit`` a NaN score
    ranks above every number and is pruned last.
    """
    x = x.astype(jnp.float32)
    x = jnp.where(jnp.abs(x) < _TINY, jnp.float32(0.0), x)
    x = jnp.where(jnp.isnan(x), jnp.float32(jnp.nan), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >= _SIGN, ~bits, bits | _SIGN)


def _chunk(d: int) -> int | None:
    """The largest divisor of ``d`` that is at most 255 (and at least 16), or ``None``."""
    if d == 0:  # an empty axis: nothing to split
        return None
    if d <= 255:
        return d
    return next((c for c in range(255, 15, -1) if d % c == 0), None)


def _count(pred: jax.Array) -> jax.Array:
    """``jnp.sum(pred)`` as int32, summed in two levels.

    XLA's CPU backend vectorises a short reduction into uint8 across contiguous rows much
    better than one long int32 reduction: the leading axis is split into chunks of at most
    255, each chunk is summed along that axis in uint8 (which cannot overflow) as whole rows
    added element by element, and the chunk sums in int32 (measured 2-3x faster than summing
    chunks of the last axis, 10x faster than one int32 sum, for 1e7 entries). A 1-D leaf is
    viewed as ``(chunk, rest)``. Splitting the leaf's own leading axis keeps the sums local
    to each shard of a sharded leaf.
    """
    if pred.ndim == 0:
        return pred.astype(jnp.int32)
    if pred.size == 0:
        return jnp.int32(0)
    if _may_be_sharded(pred):
        # Chunks could split a sharded axis unevenly: data would move between devices
        # (Auto axes) or jax would refuse the reshape (explicit axes).
        return jnp.sum(pred, dtype=jnp.int32)
    d = pred.shape[0]
    c = _chunk(d)
    if c is None:
        inner = jnp.uint16 if d <= 65535 else jnp.int32
        return jnp.sum(jnp.sum(pred, axis=0, dtype=inner), dtype=jnp.int32)
    if pred.ndim == 1:
        pred = pred.reshape(c, d // c)
        return jnp.sum(jnp.sum(pred, axis=0, dtype=jnp.uint8), dtype=jnp.int32)
    pred = pred.reshape(d // c, c, *pred.shape[1:])
    return jnp.sum(jnp.sum(pred, axis=1, dtype=jnp.uint8), dtype=jnp.int32)


def _flat_index(shape: tuple[int, ...], offset: jax.Array) -> jax.Array:
    """Row-major flat index of every entry, plus ``offset``, as uint32 (shard-local iotas)."""
    idx = jnp.broadcast_to(offset.astype(jnp.uint32), shape)
    stride = 1
    for dim in range(len(shape) - 1, -1, -1):
        idx = idx + lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
        stride *= shape[dim]
    return idx


def _radix_select(
    keys_of: Callable[[Any], list[jax.Array]],
    operands: Any,
    groups: tuple[int, ...],
    n_groups: int,
    targets: jax.Array,
    bits: int = 32,
    *,
    weights: list[jax.Array] | None = None,
    step_bits: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per group, the largest ``t < 2**bits`` with ``#{key < t} < target``, and that count.

    Returns ``(t, #{key < t}, #{key <= t})``. The one selection routine: the score threshold
    (``bits=32``) and the cut among ties (over row and in-row indices) are all found by it.
    The keys are ``keys_of(operands)``, evaluated in every phase: ``list`` of stored keys,
    or a function recomputing them from the scores (then nothing score-sized is stored; see
    ``_STORED_KEYS_MAX``). Keys must lie below ``2**bits``, and ``bits`` be a multiple of 8.
    With ``weights`` (int32 arrays shaped like the keys) a key counts with its weight
    instead of 1: the tie-break counts tied entries per row that way.

    It bisects ``bits`` bits in phases of eight, one byte of the key per phase (a loop, so
    that one digit buffer serves every phase). A phase first maps each key to one uint8
    digit: its byte when its higher bytes equal those of the threshold found so far, else 255
    (keys below the threshold's prefix are already counted in ``below``; those above never
    count, and a real digit 255 is never below a candidate digit, which is at most 255). Its
    counting passes then read one byte per weight instead of four. Each pass counts the
    ``2**step_bits - 1`` candidates that split the remaining interval evenly and so resolves
    ``step_bits`` bits: with ``step_bits=2`` three counts share one variadic reduction
    (:func:`_count_many`), 16 passes instead of 32. The count at the threshold plus one is
    the smallest count not taken, so no pass is spent on it.
    """
    keys = keys_of(operands)
    sizes = [jnp.int32(0)] * n_groups
    for i, (k, g) in enumerate(zip(keys, groups, strict=True)):
        size = jnp.sum(weights[i], dtype=jnp.int32) if weights else jnp.int32(k.size)
        sizes[g] = sizes[g] + size
    low_bits = np.uint32(2**bits - 1) if bits < 32 else np.uint32(0xFFFFFFFF)
    m = 2**step_bits - 1

    def phase(p, carry):
        thresh, below, hi = carry
        shift = jnp.uint32(bits - 8) - p.astype(jnp.uint32) * jnp.uint32(8)
        prefix = (np.uint32(0xFFFFFF00) << shift) & low_bits  # the bytes already resolved
        digits = []
        # Tied to the loop state, so that XLA can neither hoist the keys out of the loop
        # (and store them) nor merge the phases' recomputations.
        ops, _ = lax.optimization_barrier((operands, thresh))
        for k, g in zip(keys_of(ops), groups, strict=True):
            d = ((k >> shift) & np.uint32(0xFF)).astype(jnp.uint8)
            digits.append(jnp.where(((k ^ thresh[g]) & prefix) == 0, d, np.uint8(0xFF)))

        def count(i, carry, below0=below):
            # Candidates t + j * 2**low for j = 1 .. 2**step_bits - 1, counted in one pass.
            t, b, h = carry
            low = jnp.uint32(8 - step_bits) - i.astype(jnp.uint32) * jnp.uint32(step_bits)
            cands = [t + (jnp.uint32(j) << low) for j in range(1, m + 1)]  # <= 255
            sums = []
            for d, g, w in zip(digits, groups, weights or [None] * len(digits), strict=True):
                preds = [d < c[g].astype(jnp.uint8) for c in cands]
                if w is not None:
                    sums.append(
                        jnp.stack([jnp.sum(jnp.where(q, w, 0), dtype=jnp.int32) for q in preds])
                    )
                else:
                    layout = _explicit_layout(d) if m > 1 else None
                    if layout is not None:
                        sums.append(_count_many_sharded(d, [c[g] for c in cands], *layout))
                    else:
                        sums.append(_count_many(preds) if m > 1 else _count(preds[0])[None])
            counts = below0[:, None] + _group_sum(sums, groups, n_groups)  # (groups, candidates)
            take = counts < targets[:, None]  # true for a prefix of the candidates
            steps = jnp.sum(take, axis=1, dtype=jnp.uint32)
            # Counts grow with the candidate: the last one taken is the largest, the first
            # one not taken (or the interval's end, counted before) the smallest.
            b = jnp.max(jnp.where(take, counts, b[:, None]), axis=1)
            h = jnp.minimum(h, jnp.min(jnp.where(take, h[:, None], counts), axis=1))
            return t + (steps << low), b, h

        digit, below, hi = lax.fori_loop(
            0, 8 // step_bits, count, (jnp.zeros(n_groups, jnp.uint32), below, hi)
        )
        return thresh | (digit << shift), below, hi

    start = (jnp.zeros(n_groups, jnp.uint32), jnp.zeros(n_groups, jnp.int32), jnp.stack(sizes))
    return lax.fori_loop(0, bits // 8, phase, start)


def _count_many(preds: list[jax.Array]) -> jax.Array:
    """``[jnp.sum(p) for p in preds]`` as int32, in one pass: a variadic reduction.

    XLA's CPU backend fuses the comparisons into one reduction over a tuple of operands and
    reads the data once (counted one by one, each is its own pass, and a long single
    reduction is rewritten into a tree whose first level is stored). Partial sums run along
    the last axis in uint16 (a row shorter than 2**16 cannot overflow it), then over the rows
    in int32. Not for leaves that may be sharded: XLA's partitioner gathers the operands of
    a variadic reduction over a sharded axis (see :func:`_may_be_sharded`); on explicit
    mesh axes :func:`_count_many_sharded` runs it on each shard.
    """
    if preds[0].ndim == 0:
        return jnp.stack([p.astype(jnp.int32) for p in preds])
    inner = jnp.uint16 if preds[0].shape[-1] < 2**16 else jnp.int32
    partial = lax.reduce(
        tuple(p.astype(inner) for p in preds),
        tuple(np.zeros((), inner) for _ in preds),
        lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)),
        (preds[0].ndim - 1,),
    )
    return jnp.stack([jnp.sum(x, dtype=jnp.int32) for x in partial])


def _row_counts(pred: jax.Array) -> jax.Array:
    """``jnp.sum(pred, axis=(1, ..))`` as int32, without storing ``pred`` as integers.

    XLA's CPU backend rewrites a reduction over more than 32 entries into a tree whose first
    level is a stored integer copy of its operand (faulted in afresh at every call: 4 bytes
    an entry for 1e8 entries). Each row is therefore padded to a multiple of 32 and summed in
    two levels, 32 entries at a time first (fused with the comparison), then the partial sums.
    """
    if pred.size == 0:
        return jnp.zeros(pred.shape[0], jnp.int32)
    if _may_be_sharded(pred):
        # Blocks of 32 could split a sharded axis unevenly: data would move between devices
        # (Auto axes) or jax would refuse the reshape (explicit axes).
        return jnp.sum(pred, axis=tuple(range(1, pred.ndim)), dtype=jnp.int32)
    pred = pred.reshape(pred.shape[0], math.prod(pred.shape[1:]))
    pad = -pred.shape[1] % 32
    if pad:
        pred = jnp.pad(pred, ((0, 0), (0, pad)))
    part = jnp.sum(pred.reshape(pred.shape[0], -1, 32), axis=2, dtype=jnp.uint8)
    return jnp.sum(part, axis=1, dtype=jnp.int32)


def _aval_sharding(x: Any) -> Any:
    """The sharding the abstract value of ``x`` carries, or ``None`` (older jax has none)."""
    typeof = getattr(jax, "typeof", None)
    return getattr(typeof(x), "sharding", None) if typeof else None


def _explicit_layout(x: Any) -> tuple[Any, Any] | None:
    """``(mesh, spec)`` of ``x`` if it is laid out over several devices along explicit mesh
    axes (``jax.make_mesh``'s default), whose spec the abstract value carries; else ``None``
    (local, or sharded along ``Auto`` axes, whose layout is not known while tracing)."""
    if jax.device_count() == 1 or not hasattr(jax, "shard_map"):
        return None
    sharding = _aval_sharding(x)
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    if mesh is None or spec is None or explicit is None or getattr(mesh, "empty", True):
        return None
    if mesh.size <= 1 or any(t != explicit for t in getattr(mesh, "axis_types", ())):
        return None
    return mesh, spec


def _count_many_sharded(d: jax.Array, cands: list[jax.Array], mesh: Any, spec: Any) -> jax.Array:
    """``[#{d < c} for c in cands]`` for digits sharded along explicit axes: each device
    counts its block in one variadic reduction (:func:`_count_many`), then only the int32
    counts are summed across the axes the digits are split along."""
    axes = tuple(
        a
        for entry in spec
        if entry is not None
        for a in (entry if isinstance(entry, tuple) else (entry,))
    )

    def local(block, *c):
        counts = _count_many([block < x.astype(jnp.uint8) for x in c])
        return lax.psum(counts, axes) if axes else counts

    replicated = jax.sharding.PartitionSpec()
    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec, *[replicated] * len(cands)), out_specs=replicated
    )(d, *cands)


def _may_be_sharded(x: Any) -> bool:
    """Whether ``x`` (an array or a tracer) may be laid out over several devices.

    Under ``jit`` an array placed with a ``NamedSharding`` (and every value computed from
    it) carries its mesh in its abstract value; an unsharded one carries an empty mesh.
    (Inputs sharded only through ``jit(..., in_shardings=)`` carry none: their selection
    still gives the same masks, but may gather.)
    """
    if jax.device_count() == 1:
        return False
    mesh = getattr(_aval_sharding(x), "mesh", None)
    if mesh is None or not hasattr(mesh, "empty"):
        return True  # cannot tell: take the path that never gathers
    return not mesh.empty and mesh.size > 1


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
) -> list[jax.Array]:
    """Keep-masks pruning, per group, the ``targets[g]`` smallest scores (exact, sort-free).

    Entries where ``allowed`` is False are never pruned; entries where ``kept`` is False are
    pruned whatever their score (and count toward the target, which is raised to their number
    if it is lower). Ties at the threshold go to the lower flat index, where the flat index
    runs over the group's leaves in order, row-major inside each leaf.
    """

    def keys_of(scores, allowed, kept):
        keys = []
        for s, a, k in zip(scores, allowed, kept, strict=True):
            key = _float_keys(s)
            if k is not None:
                key = jnp.where(k, key, _ALREADY)
            if a is not None:
                key = jnp.where(a, key, _NEVER)
            keys.append(key)
        return keys

    keys = keys_of(scores, allowed, kept)
    # Where the keys go: stored once and read by every phase, or recomputed from the scores
    # by each (see _STORED_KEYS_MAX).
    if sum(k.size for k in keys) <= _STORED_KEYS_MAX:
        source, get_keys = keys, list
    else:
        source, get_keys = (scores, allowed, kept), lambda ops: keys_of(*ops)
    prior = [
        _count(~k if a is None else ~k & a) if k is not None else jnp.int32(0)
        for a, k in zip(allowed, kept, strict=True)
    ]
    targets = jnp.maximum(targets.astype(jnp.int32), _group_sum(prior, groups, n_groups))

    # Three candidates per pass where every leaf is local or sharded along explicit axes
    # (counted per shard, see _count_many_sharded); one otherwise (plain bisection, whose
    # single-operand sums the partitioner splits across shards: it would gather a variadic
    # reduction over a sharded axis).
    fast = all(not _may_be_sharded(k) or _explicit_layout(k) is not None for k in keys)
    step_bits = 2 if fast else 1
    thresh, below, upto = _radix_select(
        get_keys,
        source,
        groups,
        n_groups,
        targets,
        step_bits=step_bits,
    )
    at = upto - below  # entries at the threshold
    ties = targets - below  # how many entries at the threshold to prune (>= 1 if target > 0)

    # The tie-break orders tied entries by flat index, as (row, index inside the row): the
    # rows of a group run over its leaves in order (1-D leaves are viewed as rows too), so a
    # row-major flat index is the pair (global row, in-row index) compared lexicographically.
    views = [_rows_view(k) for k in keys]
    row_offsets, rows_in = [], [0] * n_groups
    for v, g in zip(views, groups, strict=True):
        row_offsets.append(rows_in[g])
        rows_in[g] += v.shape[0]
    row_bits = _index_bits(max(rows_in))
    col_bits = _index_bits(max(math.prod(v.shape[1:]) for v in views))

    def tie_cut(operands):
        # Two small selections instead of one over every entry's flat index: first the row
        # holding the ties[g]-th tied entry (tied entries counted per row, one pass), then
        # its position inside that row (one pass to extract the row's tied entries).
        views = [_rows_view(k) for k in get_keys(operands)]
        tied = [v == thresh[g] for v, g in zip(views, groups, strict=True)]
        per_row = [_row_counts(t) for t in tied]
        row_keys = [
            lax.iota(jnp.uint32, r.shape[0]) + np.uint32(o)
            for r, o in zip(per_row, row_offsets, strict=True)
        ]
        cut_row, before, _ = _radix_select(
            list, row_keys, groups, n_groups, ties, bits=row_bits, weights=per_row
        )
        in_row = [
            jnp.any(t & (_row_index(t.shape, o) == cut_row[g]), axis=0)
            for t, g, o in zip(tied, groups, row_offsets, strict=True)
        ]
        sentinel = np.uint32(2**col_bits - 1)  # above every in-row index
        col_keys = [jnp.where(r, _flat_index(r.shape, jnp.uint32(0)), sentinel) for r in in_row]
        cut_col, _, _ = _radix_select(
            list, col_keys, groups, n_groups, ties - before, bits=col_bits
        )
        cut_in_row = [
            r & (_flat_index(r.shape, jnp.uint32(0)) <= cut_col[g])
            for r, g in zip(in_row, groups, strict=True)
        ]
        return cut_row, cut_in_row

    def all_tied(operands):
        return jnp.full(n_groups, _NEVER), [jnp.zeros(v.shape[1:], bool) for v in views]

    # Only when some group has more entries at the threshold than it may prune does the
    # tie-break run (continuous scores rarely need it); otherwise every tied entry goes.
    cut_row, cut_in_row = lax.cond(jnp.any(at > ties), tie_cut, all_tied, source)
    out = []
    for k, v, g, o, c, a, p in zip(
        keys, views, groups, row_offsets, cut_in_row, allowed, kept, strict=True
    ):
        row = _row_index(v.shape, o)
        tied_pruned = (v == thresh[g]) & ((row < cut_row[g]) | ((row == cut_row[g]) & c))
        prune = ((v < thresh[g]) | tied_pruned) & (targets[g] > 0)
        keep = (~prune).reshape(k.shape)
        out.append(keep & p if a is not None and p is not None else keep)  # see the host path
    return out


def _rows_view(x: jax.Array) -> jax.Array:
    """``x`` as rows ``(rows, ...)`` in row-major order: a 1-D leaf as ``(chunk, d // chunk)``."""
    if x.ndim >= 2:
        return x
    if x.ndim == 0:
        return x.reshape(1, 1)
    c = None if _may_be_sharded(x) else _chunk(x.shape[0])  # (d, 1) splits no sharded axis
    return x.reshape(c, x.shape[0] // c) if c is not None else x.reshape(x.shape[0], 1)


def _row_index(shape: tuple[int, ...], offset: int) -> jax.Array:
    """The row (leading-axis) index of every entry, plus ``offset``, as uint32."""
    return lax.broadcasted_iota(jnp.uint32, shape, 0) + np.uint32(offset)


def _index_bits(n: int) -> int:
    """Bits (a multiple of 8, at most 32) for indices below ``n`` plus a sentinel above them."""
    return min(32, 8 * math.ceil((int(n).bit_length() + 1) / 8))


_select_kept_jit = jax.jit(_select_kept, static_argnames=("groups", "n_groups"))


def _float_keys_host(x: Any) -> np.ndarray:
    """:func:`_float_keys` in NumPy, bit for bit."""
    x = np.asarray(x).astype(np.float32)
    x[np.abs(x) < _TINY] = 0.0
    x[np.isnan(x)] = np.nan
    bits = x.view(np.uint32)
    return np.where(bits >= _SIGN, ~bits, bits | _SIGN)


def _select_kept_host(
    scores: list[Any],
    allowed: list[Any],
    kept: list[Any],
    targets: list[int],
    *,
    groups: tuple[int, ...],
    n_groups: int,
) -> list[np.ndarray]:
    """:func:`_select_kept` in NumPy for concrete inputs: the same masks, nothing compiled.

    Per group the target-th smallest key comes from ``np.partition``; the entries below it
    are pruned, then the tied entries in flat-index order until the target is met.
    """
    keys, prior = [], [0] * n_groups
    for s, a, k, g in zip(scores, allowed, kept, groups, strict=True):
        key = _float_keys_host(s)
        if k is not None:
            k = np.asarray(k, bool)
            key = np.where(k, key, _ALREADY)
            prior[g] += int(np.count_nonzero(~k if a is None else ~k & np.asarray(a, bool)))
        if a is not None:
            key = np.where(np.asarray(a, bool), key, _NEVER)
        keys.append(key.reshape(-1))
    out: list[np.ndarray] = [np.empty(0, bool)] * len(keys)
    for g in range(n_groups):
        members = [i for i, h in enumerate(groups) if h == g]
        flat = np.concatenate([keys[i] for i in members])
        target = max(int(targets[g]), prior[g])
        prune = np.zeros(flat.size, bool)
        if target > 0:
            thresh = np.partition(flat, target - 1)[target - 1]
            prune = flat < thresh
            tied = np.flatnonzero(flat == thresh)
            prune[tied[: target - int(np.count_nonzero(prune))]] = True
        start = 0
        for i in members:
            out[i] = ~prune[start : start + keys[i].size].reshape(np.shape(scores[i]))
            if kept[i] is not None and allowed[i] is not None:  # never ranked, still pruned
                out[i] &= np.asarray(kept[i], bool)
            start += keys[i].size
    return out


def _on_host(arrays: list[Any]) -> bool:
    """Whether every array is a concrete value held by the host or by one CPU device."""
    for x in arrays:
        if x is None or isinstance(x, bool | np.bool_):
            continue
        if isinstance(x, jax.core.Tracer):
            return False
        if isinstance(x, jax.Array):
            devices = x.devices()
            if len(devices) != 1 or next(iter(devices)).platform != "cpu":
                return False
        elif not isinstance(x, np.ndarray | np.generic):
            return False
        dtype = np.dtype(x.dtype)
        # 64-bit integers convert differently (jax wraps them to 32 bits first).
        if dtype.kind in "iu" and dtype.itemsize > 4:
            return False
    return True


def _magnitude_scores(params: Params) -> Scores:
    """``scores(params, "magnitude")``; computed in NumPy when the selection will be too.

    ``|w|`` is exact in float32 either way; on the host no per-leaf ``abs`` is compiled.
    """
    leaves = jax.tree.leaves(params)
    if sum(math.prod(np.shape(x)) for x in leaves) > _HOST_MAX or not _on_host(leaves):
        return _scores(params, "magnitude")
    _validate.finite(params, "params")  # the checks and messages of scores()
    return jax.tree.map(lambda w: np.abs(np.asarray(w).astype(np.float32)), params)


def _to_device(mask: np.ndarray, like: Any) -> jax.Array:
    """``mask`` as a jax array, on the device of ``like`` if that array is committed to one."""
    if isinstance(like, jax.Array) and like.committed:
        return jax.device_put(mask, like.sharding)
    return jax.device_put(mask)


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
    """``round(sparsity * n)``, exactly and half to even, of the float32 value of ``sparsity``.

    Concrete and traced sparsities give the same count: a Python float is rounded to float32
    first (:func:`_fraction`), then multiplied exactly (``Fraction``), as the traced path does.
    """
    if isinstance(sparsity, float) and isinstance(n, int):
        return round(Fraction(float(np.float32(sparsity))) * n)
    return _round_product(jnp.asarray(sparsity, jnp.float32), jnp.asarray(n, jnp.int32))


def _topk_leaves(
    leaves: list[Any],
    scores: list[Any],
    sparsity: Any,
    *,
    scope: str,
    flags: list,
    kept: list | None,
) -> list[jax.Array]:
    """Keep-mask leaves pruning the smallest ``scores`` (lists in flattening order).

    ``sparsity`` is a checked scalar, or a list of per-leaf fractions (each leaf its own
    group, whatever ``scope`` says).
    """
    per_leaf = isinstance(sparsity, list)
    chosen = [
        i
        for i, f in enumerate(flags)
        # A leaf with a zero target and no earlier mask keeps everything: skip its passes.
        if f is not False
        and not (kept is None and per_leaf and isinstance(sparsity[i], float) and not sparsity[i])
    ]
    tracing = not all(_validate.is_concrete(x) for x in [*leaves, *scores])
    # Outside a trace, device_put of NumPy ones: jnp.ones would compile once per shape.
    out = [
        jnp.ones(jnp.shape(x), bool) if tracing else _to_device(np.ones(np.shape(x), bool), x)
        for x in leaves
    ]
    # What the earlier mask prunes stays pruned, in leaves not ranked here too.
    for i, k in enumerate(kept or []):
        if i not in chosen and k is not None:
            out[i] = k if isinstance(k, jax.Array) else _to_device(np.asarray(k, bool), leaves[i])
    if not chosen:
        return out
    layer = per_leaf or scope == "layer"
    groups = tuple(j if layer else 0 for j in range(len(chosen)))
    n_groups = len(chosen) if layer else 1
    allowed, counts, sizes = [], [0] * n_groups, [0] * n_groups
    for i, g in zip(chosen, groups, strict=True):
        shape = tuple(np.shape(leaves[i]))
        size = math.prod(shape)
        sizes[g] += size
        if flags[i] is True:
            allowed.append(None)
            n_i = size
        elif _validate.is_concrete(flags[i]):
            f = np.broadcast_to(np.asarray(flags[i], bool), shape)
            allowed.append(f)
            n_i = int(np.count_nonzero(f))
        else:
            allowed.append(jnp.broadcast_to(flags[i], shape))
            n_i = jnp.sum(allowed[-1], dtype=jnp.int32)
        counts[g] = counts[g] + n_i
    if max(sizes) > _MAX_COUNT:
        raise ValueError(
            f"a selection over {max(sizes)} weights exceeds the int32 counters (at most "
            f"{_MAX_COUNT}); use scope='layer' or prune groups of leaves separately."
        )
    group_sparsity = [sparsity[i] for i in chosen] if per_leaf else [sparsity] * n_groups
    targets = [_target(s, c) for s, c in zip(group_sparsity, counts, strict=True)]
    chosen_scores = [scores[i] for i in chosen]
    chosen_kept = [None if kept is None else kept[i] for i in chosen]
    if (
        all(isinstance(t, int) for t in targets)
        and sum(sizes) <= _HOST_MAX
        and _on_host([*chosen_scores, *allowed, *chosen_kept])
    ):
        new = _select_kept_host(
            chosen_scores, allowed, chosen_kept, targets, groups=groups, n_groups=n_groups
        )
        new = [_to_device(m, x) for m, x in zip(new, chosen_scores, strict=True)]
    else:
        if all(isinstance(t, int) for t in targets):
            stacked = np.asarray(targets, np.int32)  # no eager jnp.stack compile
        else:
            stacked = jnp.stack([jnp.asarray(t, jnp.int32) for t in targets])
        new = _select_kept_jit(
            chosen_scores, allowed, chosen_kept, stacked, groups=groups, n_groups=n_groups
        )
    for i, m in zip(chosen, new, strict=True):
        out[i] = m
    return out


# ---------------------------------------------------------------------------------------------
# Public mask functions


class _Call(NamedTuple):
    """A mask function's checked arguments, in the flattening order of the params."""

    leaves: list[Any]
    treedef: Any
    sparsity: Any  # a fraction, or a list with one per leaf
    scope: str
    flags: list
    kept: list | None


def _prepare(tree: Any, sparsity: Sparsity, scope: str, prunable: Prunable, mask: Any) -> _Call:
    scope = _validate.scope(scope)
    paths, leaves, treedef = _flat(tree)
    flags = _prunable_flags(paths, leaves, prunable)
    return _Call(
        leaves, treedef, _per_leaf(sparsity, paths, leaves), scope, flags, _mask_leaves(tree, mask)
    )


def _select(call: _Call, scores: Scores, sparsity: Any, kept: list | None) -> Mask:
    """The mask pruning the smallest ``scores`` (a tree with the leaves of the params)."""
    score_leaves = jax.tree.leaves(scores)
    for (path, leaf), flag in zip(_tree_items(scores), call.flags, strict=True):
        if flag is False:
            continue
        dtype = jnp.result_type(leaf)
        if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"scores at {path} have dtype {dtype}; scores must be real numbers (floating "
                "point or integer)."
            )
        # NumPy, not jnp: inside a trace (lax.cond of pruned, called eagerly) a jnp op on a
        # concrete array returns a tracer, which has no bool.
        if _validate.is_concrete(leaf) and np.isnan(np.asarray(leaf, np.float32)).any():
            raise ValueError(
                f"scores at {path} hold NaN, which cannot be ranked. Check the params and the "
                "Fisher for NaN (diverged training?) before pruning."
            )
    out = _topk_leaves(
        call.leaves, score_leaves, sparsity, scope=call.scope, flags=call.flags, kept=kept
    )
    return jax.tree.unflatten(call.treedef, out)


def _tree_items(tree: Any) -> list[tuple[str, Any]]:
    return [(keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def topk_mask(
    scores: Scores,
    sparsity: Sparsity,
    *,
    scope: Literal["global", "layer"] = "global",
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""Keep the largest scores: prune exactly ``round(sparsity * n)`` of the smallest.

    With ``n`` prunable weights in scope (all prunable leaves for ``scope="global"``, each
    prunable leaf on its own for ``scope="layer"`` or a per-leaf ``sparsity``) and ``m`` of
    them already pruned by ``mask``, the result prunes

    .. math::
      k = \max\bigl(\operatorname{round}(s \cdot n),\ m\bigr)

    weights: the ``m`` pruned before, then the smallest scores among the rest.
    :math:`s \cdot n` is the exact product of the float32 value of ``sparsity`` (a Python
    float is rounded to float32 first), rounded half to even, so an eager call and a jitted
    one with a traced sparsity prune the same count. Ties break deterministically: among
    equal scores the weight with the lower flat index is pruned first, where the flat index
    runs over the prunable leaves in scope in ``jax.tree`` flattening order, row-major
    inside each leaf.

    The exact threshold is found without sorting, one byte of order-preserving integer
    keys at a time: 16 counting passes that each read one byte per weight and count three
    candidates (32 passes of one candidate on scores that may be sharded), plus, only when
    ties straddle the threshold, two small selections for the flat-index cut (the row that
    holds it, then its place in that row). Under ``jit`` on sharded scores only counts cross
    devices (all-reduces, no all-gather). Called eagerly on concrete arrays held by the CPU
    (NumPy, or one CPU device), with at most ``2**24`` weights in scope, the same selection
    runs in NumPy (``np.partition``), with identical masks and nothing to compile. Scores
    are ranked as float32, where ``-0.0`` and subnormals equal ``0.0``.

    Args:
      scores: a pytree of real arrays; larger means more important. Cast to float32.
      sparsity: the fraction of prunable weights to remove, in ``[0, 1]``: one scalar; a
        pytree like ``scores`` with one scalar per leaf; or a mapping from path strings
        (``jax.tree_util.keystr`` form, e.g. ``"['dense']['kernel']"``) or predicates
        ``(path, leaf) -> bool`` to fractions, where leaves no key matches get 0 (as
        jaxpruner's ``custom_sparsity_map``). Concrete values outside ``[0, 1]`` or NaN are
        errors; under ``jit`` a traced value is clipped to ``[0, 1]`` and NaN becomes 0.
      scope: ``"global"`` ranks all prunable weights together; ``"layer"`` ranks and
        prunes each leaf on its own. A per-leaf ``sparsity`` always ranks each leaf on its
        own.
      prunable: which weights may be pruned. ``None``: the kernels (:func:`is_kernel`: ``ndim >=
        2``, not biases, norm scales or batch statistics, stacked or not). A predicate
        ``prunable(path, leaf) -> bool`` where ``path`` is the leaf's ``jax.tree_util`` key path
        tuple (Flax's ``.value`` hop left out). Or a pytree like the params holding a bool per leaf
        or a bool array per leaf.
      mask: an existing bool mask; what it prunes stays pruned (prunable or not) and,
        where prunable, counts toward the target.

    Returns:
      A boolean pytree shaped like ``scores``; ``True`` keeps a weight. Non-prunable
      weights are ``True`` unless ``mask`` prunes them.

    Raises:
      ValueError: if ``sparsity`` is outside ``[0, 1]``, NaN, or does not match the leaves,
        ``scope`` is unknown, concrete scores hold NaN (under ``jit`` they cannot be
        checked: NaN then ranks above every number and is pruned last), or
        ``mask``/``prunable`` do not match ``scores``.
      TypeError: if scores are not real numbers, ``mask`` is not boolean, or a
        ``prunable`` predicate does not take ``(path, leaf)``.

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
    call = _prepare(scores, sparsity, scope, prunable, mask)
    return _select(call, scores, call.sparsity, call.kept)


def magnitude_mask(
    params: Params,
    sparsity: Sparsity,
    *,
    scope: Literal["global", "layer"] = "global",
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""Prune the weights of smallest magnitude :math:`|w|`.

    :func:`topk_mask` over ``fisher_optax.scores(params, "magnitude")``; see it for the
    exact count, the tie-break and the forms of ``sparsity``.

    Args:
      params: a pytree of parameter arrays (finite).
      sparsity: the fraction of prunable weights to remove (a scalar, per leaf, or a
        mapping; see :func:`topk_mask`).
      scope: ``"global"`` or ``"layer"``, as in :func:`topk_mask`.
      prunable: which weights may be pruned, as in :func:`topk_mask`.
      mask: an existing bool mask; what it prunes stays pruned (prunable or not) and,
        where prunable, counts toward the target.

    Returns:
      A boolean pytree shaped like ``params``; ``True`` keeps a weight.

    Raises:
      ValueError: if concrete ``params`` hold NaN or inf, and as :func:`topk_mask`.
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
    call = _prepare(params, sparsity, scope, prunable, mask)
    return _select(call, _magnitude_scores(params), call.sparsity, call.kept)


def _fisher_criterion(criterion: Any) -> Any:
    if callable(criterion):
        return criterion
    return _validate.choice(criterion, "criterion", FISHER_CRITERIA)


def fisher_mask(
    params: Params,
    sparsity: Sparsity,
    *,
    fisher: Fisher,
    criterion: Literal["fisher", "saliency"] | Callable = "fisher",
    scope: Literal["global", "layer"] = "global",
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""Prune the weights of least Fisher information, or of least OBD saliency.

    .. math::
      \text{score} = \begin{cases} F & \text{criterion="fisher"} \\
      \tfrac12 F w^2 & \text{criterion="saliency"} \\
      \text{criterion}(w, F) & \text{a callable} \end{cases}

    The saliency is optimal brain damage's estimate of the loss increase when a weight is
    set to zero, with the Fisher diagonal in place of the Hessian diagonal
    (:func:`fisher_optax.saliency`). :func:`topk_mask` over
    ``fisher_optax.scores(params, criterion, fisher=fisher)``.

    Args:
      params: a pytree of parameter arrays (finite).
      sparsity: the fraction of prunable weights to remove (a scalar, per leaf, or a
        mapping; see :func:`topk_mask`).
      fisher: a Fisher diagonal shaped like ``params``, finite and non-negative (e.g. from
        :func:`fisher_optax.fisher_from_state`).
      criterion: ``"fisher"``, ``"saliency"``, or a callable ``(params, fisher) -> scores``.
      scope: ``"global"`` or ``"layer"``, as in :func:`topk_mask`.
      prunable: which weights may be pruned, as in :func:`topk_mask`.
      mask: an existing bool mask; what it prunes stays pruned (prunable or not) and,
        where prunable, counts toward the target.

    Returns:
      A boolean pytree shaped like ``params``; ``True`` keeps a weight.

    Raises:
      ValueError: if ``fisher`` differs from ``params`` in structure or shapes (naming the
        first mismatching path), holds a negative or non-finite value, ``criterion`` is
        unknown, and as :func:`topk_mask`.
      TypeError: as :func:`topk_mask`.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.array([[0.1, 2.0], [3.0, 4.0]])}
      >>> fisher = {"w": jnp.array([[0.5, 0.1], [0.2, 0.05]])}
      >>> fisher_optax.fisher_mask(params, 0.5, fisher=fisher)["w"]
      Array([[ True, False],
             [ True, False]], dtype=bool)
      >>> fisher_optax.fisher_mask(params, 0.5, fisher=fisher, criterion="saliency")["w"]
      Array([[False, False],
             [ True,  True]], dtype=bool)

    References:
      LeCun, Denker, Solla. Optimal Brain Damage. NeurIPS 1989.

      Theis, Korshunova, Tejani, Huszár. Faster gaze prediction with dense networks and
      Fisher pruning. 2018. https://arxiv.org/abs/1801.05787

      Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using
      Information Theory. ISVLSI 2016. https://arxiv.org/abs/1605.04859
    """
    criterion = _fisher_criterion(criterion)
    call = _prepare(params, sparsity, scope, prunable, mask)
    score = _scores(params, criterion, fisher=fisher)
    return _select(call, score, call.sparsity, call.kept)


def two_stage_mask(
    params: Params,
    sparsity: Sparsity,
    *,
    fisher: Fisher,
    magnitude_fraction: float | jax.Array = 0.5,
    criterion: Literal["fisher", "saliency"] | Callable = "fisher",
    scope: Literal["global", "layer"] = "global",
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""The paper's two-stage pruning: first by magnitude, then by Fisher information.

    With target :math:`s` and share :math:`a` = ``magnitude_fraction``, stage one prunes
    ``round(a * s * n)`` of the ``n`` prunable weights in scope by :math:`|w|`
    (:func:`magnitude_mask`; ``a * s`` is formed in float32); weights of tiny magnitude have
    a Fisher that is hard to estimate. Stage two prunes among the survivors, by the Fisher
    criterion, until ``round(s * n)`` are pruned in all (:func:`fisher_mask` with the
    stage-one mask). Both stages count what ``mask`` pruned before toward their targets.
    A per-leaf ``sparsity`` applies the share leaf by leaf.

    Args:
      params: a pytree of parameter arrays (finite).
      sparsity: the final fraction of prunable weights removed (a scalar, per leaf, or a
        mapping; see :func:`topk_mask`).
      fisher: a Fisher diagonal shaped like ``params``, finite and non-negative.
      magnitude_fraction: the share of ``sparsity`` removed by magnitude in stage one, in
        ``[0, 1]``: ``0`` is pure Fisher pruning, ``1`` pure magnitude pruning.
      criterion: ``"fisher"`` (rank by F), ``"saliency"`` (0.5 F w^2) or a callable
        ``(params, fisher) -> scores`` for stage two.
      scope: ``"global"`` or ``"layer"``, as in :func:`topk_mask`.
      prunable: which weights may be pruned, as in :func:`topk_mask`.
      mask: an existing bool mask; what it prunes stays pruned (prunable or not) and,
        where prunable, counts toward the target.

    Returns:
      A boolean pytree shaped like ``params``; ``True`` keeps a weight.

    Raises:
      ValueError: if ``magnitude_fraction`` is outside ``[0, 1]`` (concrete), and as
        :func:`fisher_mask`.
      TypeError: as :func:`topk_mask`.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.array([[0.01, 2.0], [3.0, 4.0]])}
      >>> fisher = {"w": jnp.array([[9.0, 0.1], [0.2, 5.0]])}
      >>> m = fisher_optax.two_stage_mask(params, 0.5, fisher=fisher, magnitude_fraction=0.5)
      >>> m["w"]  # 0.01 goes by magnitude, then 2.0 (F = 0.1) by Fisher
      Array([[False, False],
             [ True,  True]], dtype=bool)

    References:
      Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using
      Information Theory. ISVLSI 2016. https://arxiv.org/abs/1605.04859
    """
    criterion = _fisher_criterion(criterion)
    share = _validate.fraction(
        magnitude_fraction,
        "magnitude_fraction",
        meaning="the share of the target sparsity removed by magnitude in stage one",
    )
    call = _prepare(params, sparsity, scope, prunable, mask)
    score = _scores(params, criterion, fisher=fisher)
    stage1 = _select(call, _magnitude_scores(params), _scale(call.sparsity, share), call.kept)
    return _select(call, score, call.sparsity, jax.tree.leaves(stage1))


def random_mask(
    params: Params,
    sparsity: Sparsity,
    *,
    key: jax.Array,
    scope: Literal["global", "layer"] = "global",
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    """Prune exactly ``round(sparsity * n)`` prunable weights chosen uniformly at random.

    The baseline every criterion must beat: :func:`topk_mask` over
    ``fisher_optax.scores(params, "random", key=key)``, i.i.d. uniform draws with one
    ``jax.random.fold_in(key, i)`` stream per leaf ``i``.

    Args:
      params: a pytree of parameter arrays (only their shapes are used).
      sparsity: the fraction of prunable weights to remove (a scalar, per leaf, or a
        mapping; see :func:`topk_mask`).
      key: a ``jax.random`` key.
      scope: ``"global"`` or ``"layer"``, as in :func:`topk_mask`.
      prunable: which weights may be pruned, as in :func:`topk_mask`.
      mask: an existing bool mask; what it prunes stays pruned (prunable or not) and,
        where prunable, counts toward the target.

    Returns:
      A boolean pytree shaped like ``params``; ``True`` keeps a weight.

    Raises:
      ValueError: as :func:`topk_mask`.
      TypeError: if ``key`` is not a ``jax.random`` key, and as :func:`topk_mask`.

    Examples:
      >>> import jax, jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.ones((10, 10))}
      >>> m = fisher_optax.random_mask(params, 0.3, key=jax.random.key(0))
      >>> int((~m["w"]).sum())
      30
    """
    call = _prepare(params, sparsity, scope, prunable, mask)
    return _select(call, _scores(params, "random", key=key), call.sparsity, call.kept)


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
    masks = _validate.bool_leaves(params, mask)
    _, leaves, treedef = _flat(params)
    out = [
        jnp.where(m, x, jnp.zeros((), jnp.result_type(x)))
        for x, m in zip(leaves, masks, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# Per-layer sparsity distributions


def uniform_sparsity(params: Params, sparsity: float, *, prunable: Prunable = None) -> Any:
    """The same target for every prunable leaf, 0 for the others (one scalar per leaf).

    Passing the result as ``sparsity`` equals passing the scalar with ``scope="layer"``.

    Args:
      params: a pytree of parameter arrays (only their shapes are used).
      sparsity: the fraction to remove from each prunable leaf, in ``[0, 1]``.
      prunable: as in :func:`topk_mask`; a leaf counts as prunable unless its flag is
        ``False``.

    Returns:
      A pytree in the structure of ``params`` holding a Python float per leaf.

    Raises:
      ValueError: if ``sparsity`` is outside ``[0, 1]`` or NaN.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"b": jnp.ones(3), "w": jnp.ones((3, 4))}
      >>> fisher_optax.uniform_sparsity(params, 0.8)
      {'b': 0.0, 'w': 0.8}
    """
    sparsity = _validate.real(sparsity, "sparsity", low=0.0, high=1.0, meaning=_SPARSITY_MEANING)
    paths, leaves, treedef = _flat(params)
    flags = _prunable_flags(paths, leaves, prunable)
    return jax.tree.unflatten(treedef, [0.0 if f is False else sparsity for f in flags])


def erk_sparsity(
    params: Params, sparsity: float, *, prunable: Prunable = None, power_scale: float = 1.0
) -> Any:
    r"""Erdős–Rényi-Kernel per-leaf targets for an overall ``sparsity`` (Evci et al. 2020).

    Each prunable leaf :math:`l` of shape :math:`(d_1, \dots, d_r)` (kernel dimensions
    included) keeps a density proportional to its ERK scale,

    .. math::
      \rho_l = \min\Bigl(1,\ \epsilon \Bigl(\frac{\sum_i d_i}{\prod_i d_i}\Bigr)^{p}\Bigr),
      \qquad \sum_l \rho_l n_l = (1 - S) \sum_l n_l,

    with :math:`p` = ``power_scale`` and :math:`n_l` the leaf's size: small layers stay
    denser than large ones. A leaf whose density would exceed 1 is kept dense and
    :math:`\epsilon` is solved again over the rest (the redistribution of RigL's
    ``get_sparsities_erdos_renyi``). The overall target holds up to the rounding of each
    leaf's count.

    Args:
      params: a pytree of parameter arrays (only their shapes are used).
      sparsity: :math:`S`, the fraction of all prunable weights to remove, in ``[0, 1]``.
      prunable: as in :func:`topk_mask`; a leaf counts as prunable unless its flag is
        ``False`` (its whole size counts).
      power_scale: :math:`p > 0`; 1 is ERK, 0 gives uniform targets.

    Returns:
      A pytree in the structure of ``params`` holding a Python float per leaf (0 for the
      leaves that are not prunable), to pass as ``sparsity`` to any mask function or to
      :func:`fisher_optax.pruned`.

    Raises:
      ValueError: if ``sparsity`` is outside ``[0, 1]`` or ``power_scale`` is negative.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"small": jnp.ones((10, 10)), "big": jnp.ones((100, 100))}
      >>> {k: round(v, 4) for k, v in fisher_optax.erk_sparsity(params, 0.9).items()}
      {'big': 0.9082, 'small': 0.0818}

    References:
      Evci, Gale, Menick, Castro, Elsen. Rigging the Lottery: Making All Tickets Winners.
      ICML 2020. https://arxiv.org/abs/1911.11134
    """
    sparsity = _validate.real(sparsity, "sparsity", low=0.0, high=1.0, meaning=_SPARSITY_MEANING)
    power_scale = _validate.real(power_scale, "power_scale", low=0.0)
    paths, leaves, treedef = _flat(params)
    flags = _prunable_flags(paths, leaves, prunable)
    chosen = [i for i, f in enumerate(flags) if f is not False and math.prod(jnp.shape(leaves[i]))]
    size = {i: math.prod(jnp.shape(leaves[i])) for i in chosen}
    raw = {i: (sum(jnp.shape(leaves[i])) / size[i]) ** power_scale for i in chosen}
    dense: set[int] = set()
    while True:
        # Weights kept in all, minus the dense leaves', spread over the others by raw scale.
        rhs = (1.0 - sparsity) * sum(size.values()) - sum(size[i] for i in dense)
        rest = [i for i in chosen if i not in dense]
        if not rest:
            break
        eps = rhs / sum(raw[i] * size[i] for i in rest)
        top = max(raw[i] for i in rest)
        if eps * top <= 1.0:
            break
        dense |= {i for i in rest if raw[i] == top}
    out = [0.0] * len(leaves)
    for i in chosen:
        out[i] = 0.0 if i in dense else min(1.0, max(0.0, 1.0 - eps * raw[i]))
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# Reports


class LeafSparsity(NamedTuple):
    """How much a mask prunes in one leaf.

    Attributes:
      sparsity: pruned fraction of the leaf's entries (``0.0`` for an empty leaf).
      pruned: the number of pruned entries.
      size: the number of entries.
      prunable: how many of them count as prunable.
    """

    sparsity: float
    pruned: int
    size: int
    prunable: int


class SparsityReport(NamedTuple):
    """How much a mask prunes, overall and leaf by leaf.

    Attributes:
      sparsity: pruned fraction of the prunable weights (``0.0`` if there are none).
      pruned: the number of pruned prunable weights.
      prunable: the number of prunable weights.
      leaves: from each leaf's path string (``jax.tree_util.keystr`` form, Flax's ``.value``
        hop left out) to its :class:`LeafSparsity`, in flattening order.
    """

    sparsity: float
    pruned: int
    prunable: int
    leaves: dict[str, LeafSparsity]


def sparsity_report(mask: Mask, *, prunable: Prunable = None) -> SparsityReport:
    """How much a mask prunes, overall and leaf by leaf (host-side, not for ``jit``).

    Args:
      mask: a boolean pytree; ``True`` keeps a weight.
      prunable: which weights count toward the overall figure: ``None`` (the kernels,
        :func:`is_kernel`), a predicate on ``(path, leaf)``, or a bool pytree (see
        :func:`topk_mask`).

    Returns:
      A :class:`SparsityReport`.

    Raises:
      TypeError: if a mask leaf is not boolean.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> mask = {"w": jnp.array([[True, False], [False, False]]), "b": jnp.array([True])}
      >>> report = fisher_optax.sparsity_report(mask)
      >>> report.sparsity, report.pruned, report.prunable
      (0.75, 3, 4)
      >>> report.leaves["['w']"].sparsity
      0.75
    """
    _validate.bool_leaves(mask, mask)
    paths, leaves, _ = _flat(mask)
    flags = _prunable_flags(paths, leaves, prunable)
    total_pruned, total = 0, 0
    per_leaf = {}
    for path, leaf, flag in zip(paths, leaves, flags, strict=True):
        leaf = np.asarray(leaf)
        allowed = np.broadcast_to(np.asarray(flag, bool), leaf.shape)
        pruned = int((~leaf).sum())
        n_prunable = int(allowed.sum())
        total_pruned += int((~leaf & allowed).sum())
        total += n_prunable
        per_leaf[keystr(path)] = LeafSparsity(
            sparsity=pruned / leaf.size if leaf.size else 0.0,
            pruned=pruned,
            size=int(leaf.size),
            prunable=n_prunable,
        )
    return SparsityReport(
        sparsity=total_pruned / total if total else 0.0,
        pruned=total_pruned,
        prunable=total,
        leaves=per_leaf,
    )
