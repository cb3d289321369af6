"""The selection kernel: exact, sort-free top-k over score trees (private).

Every pattern of :mod:`fisher_optax.patterns` ends here: :func:`topk_leaves` prunes exactly
``round(s * n)`` of the ``n`` prunable weights in each group of leaves, the ones with the
smallest scores, ties broken by flat index.

Selection never sorts. Scores are mapped to order-preserving ``uint32`` keys
(:func:`float_keys`) and the exact k-th smallest key is found one byte at a time by counting
passes (:func:`radix_select`): each pass compares every key with three candidates at once
(one variadic reduction, two bits per pass, 16 passes) and sums, per group, how many fall
below each. On parameters sharded along explicit mesh axes each device counts its block in
``shard_map``; on other sharded ones (``Auto`` axes) each pass counts one candidate (32
passes), whose sums XLA's partitioner splits across shards: either way only scalar counts
cross devices. Ties at the cut are broken by flat index in the same loop: where a group has
more entries at its threshold than it may prune, the loop goes on over the bytes of the flat
index of the tied entries, so that one compiled loop serves both. Stages that rank in turn,
each under the mask the one before left (the magnitude and then the criterion of a two-stage
update), are the turns of one more loop around it where leaves of one shape are batched
(:func:`_select_kept`): one selection is compiled whatever the number of stages. XLA's CPU
sort of 1e7 floats takes seconds; the counting passes take 0.3-0.5x NumPy's ``np.partition``
from 1e6 to 1e8 scores on two CPU cores; above :data:`STORED_KEYS_MAX` scores they store one
byte per score, recomputing the keys in every phase (see ``benchmarks/bench_select.py``).
Eager calls on concrete arrays held by the CPU (at most :data:`HOST_MAX` weights) select in
NumPy instead, with identical masks, so a first call compiles nothing.
"""

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fisher_optax import _validate

__all__: list[str] = []  # private module; nothing re-exported

_SIGN = np.uint32(0x80000000)
_NEVER = np.uint32(0xFFFFFFFF)  # key of entries that may not be pruned: above every real score
_ALREADY = np.uint32(0)  # key of entries an earlier mask pruned: below every real score
_TINY = np.float32(np.finfo(np.float32).tiny)  # the smallest normal float32
_MAX_COUNT = 2**31 - 1
HOST_MAX = 2**24
"""Selections over at most this many concrete weights held on the CPU run in NumPy.

A first call then compiles nothing (the jitted kernel takes seconds to compile per tree
layout, NumPy's introselect milliseconds to run); the masks are identical either way."""
# Up to this many scores the jitted selection stores their keys (4 bytes each) for its
# phases to read; above it every phase recomputes them from the scores. XLA's CPU backend
# allocates a call's temporaries afresh, and glibc serves a block above 32 MB (its largest
# mmap threshold) with new pages that fault in at every call: 0.5-0.9 s of system time at
# 1e8 scores, measured. Below it the block is reused, and stored keys were faster: stored /
# recomputed 0.85-0.96 up to 2e6 scores, 1.1-1.5 at 4e6-8e6 (bench_select.py --keys).
STORED_KEYS_MAX = 2**21


def float_keys(x: jax.Array) -> jax.Array:
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


def count(pred: jax.Array) -> jax.Array:
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
    if may_be_sharded(pred):
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


def flat_index(shape: tuple[int, ...], offset: jax.Array) -> jax.Array:
    """Row-major flat index of every entry, plus ``offset``, as uint32 (shard-local iotas)."""
    idx = jnp.broadcast_to(offset.astype(jnp.uint32), shape)
    stride = 1
    for dim in range(len(shape) - 1, -1, -1):
        idx = idx + lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
        stride *= shape[dim]
    return idx


def radix_select(
    keys_of: Callable[[Any], list[jax.Array]],
    operands: Any,
    groups: tuple[int | tuple[int, ...], ...],
    n_groups: int,
    targets: jax.Array,
    *,
    offsets: tuple[Any, ...],
    index_bytes: int,
    step_bits: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per group, the ``target``-th smallest entry in the order (key, flat index).

    Returns ``(t, i, below, upto)``: the entry's key ``t`` and flat index ``i``, and the
    number of entries before it and up to it in that order. The index is resolved only when
    some group has more entries at ``t`` than it may prune; otherwise ``i`` is ``2**32 - 1``
    (every entry at ``t`` goes) and the counts are ``#{key < t}`` and ``#{key <= t}``.
    The keys are ``keys_of(operands)``, evaluated in every phase: ``list`` of stored keys,
    or a function recomputing them from the scores (then nothing score-sized is stored; see
    ``STORED_KEYS_MAX``). The flat index of an entry is its row-major index inside its array
    plus the array's offset (``offsets``, an array of one offset per leaf for a batch), and
    lies below ``2**(8 * index_bytes)``.

    ``groups`` holds one entry per key array: an int, the group of the whole array, or a
    tuple, for a batch of leaves stacked along the leading axis, the group of each leaf.
    A batch is counted by one reduction, so the traced program grows with the number of
    arrays, not of leaves.

    It bisects the 32 key bits and then the index bits in phases of eight, one byte per
    phase, in one loop whose body is traced and compiled once: each phase only picks its
    byte, of the key or of the index, by the loop counter. The index phases run only where
    ties need them, so on continuous scores the loop stops after the four key phases. A
    phase first maps each entry to one uint8 digit: its byte when the bytes resolved so far
    equal those of the entry sought, else 255 (entries before it are already counted in
    ``below``; those after never count, and a real digit 255 is never below a candidate
    digit, which is at most 255). Its counting passes then read one byte per weight instead
    of four. Each pass counts the ``2**step_bits - 1`` candidates that split the remaining
    interval evenly and so resolves ``step_bits`` bits: with ``step_bits=2`` three counts
    share one variadic reduction (:func:`count_many`), 4 passes a phase instead of 8. The
    count at the threshold plus one is the smallest count not taken, so no pass is spent
    on it.
    """
    keys = keys_of(operands)
    # A batch whose leaves all share one group is counted as one array of that group.
    groups = tuple(g[0] if isinstance(g, tuple) and len(set(g)) == 1 else g for g in groups)
    sizes = [
        jnp.full(len(g), math.prod(k.shape[1:]), jnp.int32)
        if isinstance(g, tuple)
        else jnp.int32(k.size)
        for k, g in zip(keys, groups, strict=True)
    ]
    m = 2**step_bits - 1
    n_phases = 4 + index_bytes
    full = np.uint32(0xFFFFFFFF)

    def phase(carry):
        p, t_key, t_index, below, hi = carry
        on_key = p < 4
        shift = jnp.where(on_key, 24 - 8 * p, 8 * (n_phases - 1 - p)).astype(jnp.uint32)
        resolved = np.uint32(0xFFFFFF00) << shift  # the bytes above this phase's byte

        def key_digits(ops, offs):
            del offs
            return [
                jnp.where(((k ^ _at(t_key, g, k)) & resolved) == 0, _byte(k, shift), np.uint8(0xFF))
                for k, g in zip(keys_of(ops), groups, strict=True)
            ]

        def index_digits(ops, offs):
            digits = []
            for k, g, o in zip(keys_of(ops), groups, offs, strict=True):
                v = _flat_view(k, o.ndim > 0)
                index = _flat_index(v.shape, o)
                same = (v == _at(t_key, g, v)) & (((index ^ _at(t_index, g, v)) & resolved) == 0)
                digits.append(jnp.where(same, _byte(index, shift), np.uint8(0xFF)).reshape(k.shape))
            return digits

        # Tied to the loop state, so that XLA can neither hoist the keys and flat indices
        # out of the loop (and store them) nor merge the phases' recomputations. The key
        # phases read no index (a branch each: forming the index in every phase cost 20%).
        ops, offs, _ = lax.optimization_barrier(
            (operands, [jnp.asarray(o, jnp.uint32) for o in offsets], t_key)
        )
        digits = lax.cond(on_key, key_digits, index_digits, ops, offs)

        def one_pass(i, carry, below0=below):
            # Candidates t + j * 2**low for j = 1 .. 2**step_bits - 1, counted in one pass.
            t, b, h = carry
            low = jnp.uint32(8 - step_bits) - i.astype(jnp.uint32) * jnp.uint32(step_bits)
            cands = [t + (jnp.uint32(j) << low) for j in range(1, m + 1)]  # <= 255
            sums = []
            for d, g in zip(digits, groups, strict=True):
                preds = [d < _at(c, g, d).astype(jnp.uint8) for c in cands]
                if isinstance(g, tuple):
                    many = (
                        jax.vmap(count_many) if m > 1 else lambda p: jax.vmap(count)(p[0])[:, None]
                    )
                    sums.append(many(preds))
                    continue
                layout = explicit_layout(d) if m > 1 else None
                if layout is not None:
                    sums.append(_count_many_sharded(d, [c[g] for c in cands], *layout))
                else:
                    sums.append(count_many(preds) if m > 1 else count(preds[0])[None])
            counts = below0[:, None] + _group_sum(sums, groups, n_groups)  # (groups, candidates)
            take = counts < targets[:, None]  # true for a prefix of the candidates
            # Counts grow with the candidate: the last one taken is the largest, the first
            # one not taken (or the interval's end, counted before) the smallest. The three
            # are one variadic reduction: XLA:CPU compiles each reduction as its own kernel.
            steps, b, h_new = lax.reduce(
                (
                    take.astype(jnp.int32),
                    jnp.where(take, counts, b[:, None]),
                    jnp.where(take, h[:, None], counts),
                ),
                (np.int32(0), np.int32(np.iinfo(np.int32).min), np.int32(_MAX_COUNT)),
                lambda x, y: (x[0] + y[0], jnp.maximum(x[1], y[1]), jnp.minimum(x[2], y[2])),
                (1,),
            )
            h = jnp.minimum(h, h_new)
            return t + (steps.astype(jnp.uint32) << low), b, h

        digit, below, hi = lax.fori_loop(
            0, 8 // step_bits, one_pass, (jnp.zeros(n_groups, jnp.uint32), below, hi)
        )
        found = digit << shift
        t_key = jnp.where(on_key, t_key | found, t_key)
        t_index = jnp.where(on_key, t_index, t_index | found)
        return p + 1, t_key, t_index, below, hi

    def more(carry):
        # Past the key phases only while some group has more entries at its threshold than
        # it may prune; once started, the index phases all run.
        p, _, _, _, hi = carry
        return (p < 4) | ((p < n_phases) & ((p > 4) | jnp.any(hi > targets)))

    start = (
        jnp.int32(0),
        jnp.zeros(n_groups, jnp.uint32),
        jnp.zeros(n_groups, jnp.uint32),
        jnp.zeros(n_groups, jnp.int32),
        _group_sum(sizes, groups, n_groups),
    )
    p, t_key, t_index, below, hi = lax.while_loop(more, phase, start)
    return t_key, jnp.where(p > 4, t_index, full), below, hi


def _byte(x: jax.Array, shift: jax.Array) -> jax.Array:
    """The byte of ``x`` at bit ``shift``, as uint8."""
    return ((x >> shift) & np.uint32(0xFF)).astype(jnp.uint8)


def count_many(preds: list[jax.Array]) -> jax.Array:
    """``[jnp.sum(p) for p in preds]`` as int32, in one pass: a variadic reduction.

    XLA's CPU backend fuses the comparisons into one reduction over a tuple of operands and
    reads the data once (counted one by one, each is its own pass, and a long single
    reduction is rewritten into a tree whose first level is stored). Partial sums run along
    the last axis in uint16 (a row shorter than 2**16 cannot overflow it), then over the rows
    in int32, all candidates in one reduction. Not for leaves that may be sharded: XLA's
    partitioner gathers the operands of a variadic reduction over a sharded axis (see
    :func:`may_be_sharded`); on explicit mesh axes :func:`_count_many_sharded` runs it on
    each shard.
    """
    if preds[0].ndim == 0:
        return jnp.stack([p.astype(jnp.int32) for p in preds])
    # Every axis but the leading one where their product fits uint16, else the last: the
    # sums over the rows then stay short (XLA:CPU splits a long one into a tree of kernels).
    shape = preds[0].shape
    axes = (
        tuple(range(1, len(shape)))
        if 1 < len(shape) and math.prod(shape[1:]) < 2**16
        else (len(shape) - 1,)
    )
    inner = jnp.uint16 if math.prod(shape[a] for a in axes) < 2**16 else jnp.int32
    partial = lax.reduce(
        tuple(p.astype(inner) for p in preds),
        tuple(np.zeros((), inner) for _ in preds),
        lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)),
        axes,
    )
    # The partial sums of every candidate in one reduction: one kernel, not one each.
    return jnp.sum(jnp.stack(partial).reshape(len(preds), -1), axis=1, dtype=jnp.int32)


def _aval_sharding(x: Any) -> Any:
    """The sharding the abstract value of ``x`` carries, or ``None`` (older jax has none)."""
    typeof = getattr(jax, "typeof", None)
    return getattr(typeof(x), "sharding", None) if typeof else None


def explicit_layout(x: Any) -> tuple[Any, Any] | None:
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
    counts its block in one variadic reduction (:func:`count_many`), then only the int32
    counts are summed across the axes the digits are split along."""
    axes = tuple(
        a
        for entry in spec
        if entry is not None
        for a in (entry if isinstance(entry, tuple) else (entry,))
    )

    def local(block, *c):
        counts = count_many([block < x.astype(jnp.uint8) for x in c])
        return lax.psum(counts, axes) if axes else counts

    replicated = jax.sharding.PartitionSpec()
    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec, *[replicated] * len(cands)), out_specs=replicated
    )(d, *cands)


def may_be_sharded(x: Any) -> bool:
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


def _group_sum(values: list[jax.Array], groups: tuple, n_groups: int) -> jax.Array:
    """Per group, the sum of ``values``: ``(n_groups, ...)``; a batch's values ``(L, ...)``
    are added to its leaves' groups in one scatter."""
    tail = jnp.shape(values[0])[1:] if isinstance(groups[0], tuple) else jnp.shape(values[0])
    sums = jnp.zeros((n_groups, *tail), jnp.int32)
    for v, g in zip(values, groups, strict=True):
        if isinstance(g, tuple) and len(set(g)) == 1:
            sums = sums.at[g[0]].add(jnp.sum(v, axis=0, dtype=jnp.int32))
        else:
            sums = sums.at[np.asarray(g) if isinstance(g, tuple) else g].add(v)
    return sums


def _at(values: jax.Array, group: int | tuple[int, ...], like: jax.Array) -> jax.Array:
    """``values[group]``, for a batch one value per leaf, shaped to broadcast against ``like``."""
    if not isinstance(group, tuple):
        return values[group]
    return values[np.asarray(group)].reshape(len(group), *[1] * (like.ndim - 1))


def _batches(scores: list[list], allowed: list, kept: list) -> list[tuple[int, ...]]:
    """Leaf indices in batches of one shape, dtype and operands, to be stacked and counted
    together (``scores``: the leaves of each stage). A leaf that may be sharded stays alone:
    stacking it would gather it."""
    batches: dict[Any, list[int]] = {}
    alone = []
    for i, (a, k) in enumerate(zip(allowed, kept, strict=True)):
        s = [stage[i] for stage in scores]
        if any(x is not None and may_be_sharded(x) for x in (*s, a, k)):
            alone.append((i,))
        else:
            key = (jnp.shape(s[0]), tuple(jnp.result_type(x) for x in s), a is None, k is None)
            batches.setdefault(key, []).append(i)
    return [tuple(b) for b in batches.values()] + alone


def _each(fn: Callable, x: jax.Array, group: int | tuple[int, ...]) -> Any:
    """``fn`` of one leaf, on every leaf of a batch (vmapped: traced once) or on one leaf."""
    return jax.vmap(fn)(x) if isinstance(group, tuple) else fn(x)


def _flat_view(x: jax.Array, batched: bool) -> jax.Array:
    """``x`` flattened, per leaf for a batch ``(L, n)``, unless it may be sharded (a reshape
    could move its data between devices)."""
    if may_be_sharded(x):
        return x
    return x.reshape(x.shape[0], -1) if batched else x.reshape(-1)


def _flat_index(shape: tuple[int, ...], offset: Any) -> jax.Array:
    """:func:`flat_index` over a view of :func:`_flat_view`: a batch ``(L, n)`` (``offset``
    one per leaf), a flat array, or a sharded one of any rank.

    XLA:CPU takes 0.2-0.3 s to compile a kernel that combines iotas along several axes of
    some shapes (a row index times the row length plus a column index, on 32 columns),
    against 0.03 s for one iota along one axis: local arrays are indexed in their flat view.
    """
    offset = jnp.asarray(offset, jnp.uint32)
    if offset.ndim:
        return lax.broadcasted_iota(jnp.uint32, shape, 1) + offset[:, None]
    if len(shape) <= 1:
        return lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) + offset
    return flat_index(shape, offset)


def _select_kept(
    scores: list[list[jax.Array]],
    allowed: list[jax.Array | None],
    kept: list[jax.Array | None],
    targets: jax.Array,
    *,
    groups: tuple[int, ...],
    n_groups: int,
) -> list[jax.Array]:
    """Keep-masks pruning, per group, the ``targets[g]`` smallest scores (exact, sort-free),
    in stages: ``scores`` holds one list of leaves per stage, ``targets`` one row per stage,
    and each stage ranks its scores under the mask the stage before left.

    Entries where ``allowed`` is False are never pruned; entries where ``kept`` is False are
    pruned whatever their score (and count toward the target, which is raised to their number
    if it is lower). Ties at the threshold go to the lower flat index, where the flat index
    runs over the group's leaves in order, row-major inside each leaf: one selection over
    the order (score, flat index) finds the last entry pruned (:func:`radix_select`).

    Leaves of one shape that are not sharded are stacked into one batch (:func:`_batches`)
    and counted by one reduction per pass: the traced selection grows with the number of
    distinct shapes. Each leaf keeps its own group and its own index offset, so counts,
    ties and scopes are those of the leaves taken one by one. Where there are batches, the
    stages are the turns of one loop over the stacked scores of all stages, so a second
    stage adds no traced code and its mask stays stacked between the turns; where every
    leaf is alone they are unrolled into identical kernels. A batch's masks are one
    element-wise
    comparison of its keys and flat indices with the cut, handed back to its leaves by
    :func:`_unstack`.
    """
    n_stages = len(scores)
    if n_stages > 1:  # stacked together: one dtype (float_keys ranks them as float32 anyway)
        scores = [[jnp.asarray(s, jnp.float32) for s in stage] for stage in scores]
    sizes = [math.prod(jnp.shape(s)) for s in scores[0]]
    offsets, seen = [], [0] * n_groups
    for g, n in zip(groups, sizes, strict=True):
        offsets.append(seen[g])
        seen[g] += n
    batches = _batches(scores, allowed, kept)
    unit_groups = tuple(
        groups[b[0]] if len(b) == 1 else tuple(groups[i] for i in b) for b in batches
    )
    unit_offsets = tuple(
        offsets[b[0]] if len(b) == 1 else np.asarray([offsets[i] for i in b], np.uint32)
        for b in batches
    )

    def stack(xs, lead):
        # Concatenated flat, then viewed as (*lead, ...): XLA:CPU compiles a concatenation
        # of flat arrays in tens of milliseconds, one along the leading axis of leaves of
        # rank 3 or more in up to a second.
        if len(xs) == 1 and not lead:
            return xs[0]
        return jnp.concatenate([jnp.ravel(x) for x in xs]).reshape(*lead, *jnp.shape(xs[0]))

    def lead(b):
        return (len(b),) if len(b) > 1 else ()

    def stack_leaves(xs):
        return [None if xs[b[0]] is None else stack([xs[i] for i in b], lead(b)) for b in batches]

    # Stages are the turns of one loop where some leaves are batched: their scores are
    # concatenated anyway, so those of every stage stack in front at no extra pass, and the
    # mask between the stages stays stacked. A leaf alone keeps one array per stage, picked
    # by the turn in the kernel that reads it. Where every leaf is alone, the stages are
    # unrolled: their kernels are identical (XLA:CPU compiles them once), and each stage's
    # keys come straight from the computation of its scores, which are never stored.
    looped = n_stages > 1 and any(len(b) > 1 for b in batches)
    unit_scores = [
        (
            stack([stage[i] for stage in scores for i in b], (n_stages, *lead(b)))
            if len(b) > 1
            else tuple(stage[b[0]] for stage in scores)
        )
        if looped
        else [stack([stage[i] for i in b], lead(b)) for stage in scores]
        for b in batches
    ]
    unit_allowed, unit_kept = stack_leaves(allowed), stack_leaves(kept)

    def keys_of(scores, allowed, kept):
        keys = []
        for s, a, k in zip(scores, allowed, kept, strict=True):
            key = float_keys(s)
            if k is not None:
                key = jnp.where(k, key, _ALREADY)
            if a is not None:
                key = jnp.where(a, key, _NEVER)
            keys.append(key)
        return keys

    # Three candidates per pass where every leaf is local or sharded along explicit axes
    # (counted per shard, see _count_many_sharded); one otherwise (plain bisection, whose
    # single-operand sums the partitioner splits across shards: it would gather a variadic
    # reduction over a sharded axis).
    fast = all(not may_be_sharded(s) or explicit_layout(s) is not None for st in scores for s in st)
    stored = sum(sizes) <= STORED_KEYS_MAX
    index_bytes = max(1, math.ceil((max(seen) - 1).bit_length() / 8))

    def stage(unit_scores, unit_kept, targets):
        """One stage: the keep-mask of every unit, stacked as the units are."""
        operands = (unit_scores, unit_allowed, unit_kept)
        keys = keys_of(*operands)
        # Where the keys go: stored once and read by every phase, or recomputed from the
        # scores by each (see STORED_KEYS_MAX).
        source, get_keys = (keys, list) if stored else (operands, lambda ops: keys_of(*ops))
        prior = [
            _each(count, ~k if a is None else ~k & a, g)
            if k is not None
            else jnp.zeros(len(g) if isinstance(g, tuple) else (), jnp.int32)
            for a, k, g in zip(unit_allowed, unit_kept, unit_groups, strict=True)
        ]
        targets = jnp.maximum(targets, _group_sum(prior, unit_groups, n_groups))
        t_key, t_index, _, _ = radix_select(
            get_keys,
            source,
            unit_groups,
            n_groups,
            targets,
            offsets=unit_offsets,
            index_bytes=index_bytes,
            step_bits=2 if fast else 1,
        )
        prunes = targets > 0
        cut = jnp.where(prunes, t_key, _ALREADY)
        last = jnp.where(prunes, t_index, np.uint32(0))
        out = []
        for key, g, o, a, k in zip(keys, unit_groups, unit_offsets, *operands[1:], strict=True):
            v = _flat_view(key, np.ndim(o) > 0)
            at = (v == _at(cut, g, v)) & (_flat_index(v.shape, o) <= _at(last, g, v))
            pruned = ((v < _at(cut, g, v)) | at) & _at(prunes, g, v)
            keep = ~pruned.reshape(key.shape)
            out.append(keep & k if a is not None and k is not None else keep)  # see the host path
        return out

    targets = targets.astype(jnp.int32)
    if looped:
        # Every stage but the first ranks under a mask: start from one where there is none.
        unit_kept = [
            jnp.ones(jnp.shape(u[0]), bool) if k is None else k
            for u, k in zip(unit_scores, unit_kept, strict=True)
        ]

        def turn(i, kept):
            picked = [lax.select_n(i, *u) if isinstance(u, tuple) else u[i] for u in unit_scores]
            return stage(picked, kept, targets[i])

        keep = lax.fori_loop(0, n_stages, turn, unit_kept)
    else:
        keep = unit_kept
        for i in range(n_stages):
            keep = stage([u[i] for u in unit_scores], keep, targets[i])
    # A batch's masks come from one element-wise kernel over its stacked keys, split into
    # leaves by _unstack.
    out: list[jax.Array] = [jnp.zeros(())] * len(groups)
    for b, k in zip(batches, keep, strict=True):
        for i, m in zip(b, _unstack(k) if len(b) > 1 else [k], strict=True):
            out[i] = m
    return out


_FANOUT = 16


def _unstack(x: jax.Array) -> list[jax.Array]:
    """``list(x)``: the ``n`` entries of ``x`` along its leading axis, by kernels whose
    number grows as ``log(n)``.

    XLA:CPU compiles every distinct kernel on its own (tens of milliseconds each) and
    identical ones once. ``n`` slices, each at its own offset, would be ``n`` distinct
    kernels. One variadic reduction instead splits an array into at most ``_FANOUT`` parts
    (part ``j`` reduces the blocks with all but block ``j`` masked to zero), and the entries
    are split in a tree of such reductions, whose splits on one level are identical kernels.
    Each level reads the array ``fanout`` times: a few passes over a mask.
    """
    n = x.shape[0]
    if n == 1:
        return [x[0]]
    depth = 1
    while _FANOUT**depth < n:
        depth += 1
    fanout = math.ceil(n ** (1 / depth))  # at most _FANOUT, padding as little as it may
    while fanout**depth < n:  # the root above may round down
        fanout += 1
    rest = x.shape[1:]
    parts = [jnp.pad(x, [(0, fanout**depth - n)] + [(0, 0)] * len(rest))]
    zero = np.zeros((), x.dtype)
    for _ in range(depth):
        split = []
        for y in parts:
            y = y.reshape(fanout, y.shape[0] // fanout, *rest)
            block = lax.broadcasted_iota(jnp.int32, y.shape, 0)
            split.extend(
                lax.reduce(
                    tuple(jnp.where(block == j, y, zero) for j in range(fanout)),
                    (zero,) * fanout,
                    lambda a, b: tuple(p | q for p, q in zip(a, b, strict=True)),
                    (0,),
                )
            )
        parts = split
    return [y.reshape(rest) for y in parts[:n]]


_select_kept_jit = jax.jit(_select_kept, static_argnames=("groups", "n_groups"))


def float_keys_host(x: Any) -> np.ndarray:
    """:func:`float_keys` in NumPy, bit for bit."""
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
        key = float_keys_host(s)
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


def on_host(arrays: list[Any]) -> bool:
    """Whether every array is a concrete value held by the host or by one CPU device of this
    process (NumPy cannot read a device of another process: those take the jitted path)."""
    for x in arrays:
        if x is None or isinstance(x, bool | np.bool_):
            continue
        if isinstance(x, jax.core.Tracer):
            return False
        if isinstance(x, jax.Array):
            devices = x.devices()
            if (
                not x.is_fully_addressable
                or len(devices) != 1
                or next(iter(devices)).platform != "cpu"
            ):
                return False
        elif not isinstance(x, np.ndarray | np.generic):
            return False
        dtype = np.dtype(x.dtype)
        # 64-bit integers convert differently (jax wraps them to 32 bits first).
        if dtype.kind in "iu" and dtype.itemsize > 4:
            return False
    return True


def to_device(mask: np.ndarray, like: Any) -> jax.Array:
    """``mask`` as a jax array, on the device of ``like`` if that array is committed to one."""
    if isinstance(like, jax.Array) and like.committed:
        return jax.device_put(mask, like.sharding)
    return jax.device_put(mask)


def round_product(s: jax.Array, n: jax.Array) -> jax.Array:
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
    first (as :func:`fisher_optax._validate.sparsity` does), then multiplied exactly
    (``Fraction``), as the traced path does.
    """
    if isinstance(sparsity, float) and isinstance(n, int):
        return round(Fraction(float(np.float32(sparsity))) * n)
    return round_product(jnp.asarray(sparsity, jnp.float32), jnp.asarray(n, jnp.int32))


def topk_leaves(
    leaves: list[Any],
    stages: list[tuple[list[Any], Any]],
    *,
    scope: str,
    flags: list,
    kept: list | None,
) -> list[jax.Array]:
    """Keep-mask leaves pruning the smallest scores (lists in flattening order), in stages.

    ``stages`` holds ``(scores, sparsity)`` pairs, ranked in turn: each stage keeps what
    ``kept`` and the stages before it pruned. A ``sparsity`` is a checked scalar, or a list
    of per-leaf fractions (each leaf its own group, whatever ``scope`` says).
    """
    per_leaf = any(isinstance(s, list) for _, s in stages)
    if per_leaf:  # a scalar stage next to per-leaf ones: the same fraction in every leaf
        stages = [(x, s if isinstance(s, list) else [s] * len(leaves)) for x, s in stages]
    chosen = [
        i
        for i, f in enumerate(flags)
        # A leaf with zero targets and no earlier mask keeps everything: skip its passes.
        if f is not False
        and not (
            kept is None
            and per_leaf
            and all(isinstance(s[i], float) and not s[i] for _, s in stages)
        )
    ]
    tracing = not all(
        _validate.is_concrete(x) for x in [*leaves, *(x for scores, _ in stages for x in scores)]
    )
    # Outside a trace, device_put of NumPy ones: jnp.ones would compile once per shape.
    out = [
        jnp.ones(jnp.shape(x), bool) if tracing else to_device(np.ones(np.shape(x), bool), x)
        for x in leaves
    ]
    # What the earlier mask prunes stays pruned, in leaves not ranked here too.
    for i, k in enumerate(kept or []):
        if i not in chosen and k is not None:
            out[i] = k if isinstance(k, jax.Array) else to_device(np.asarray(k, bool), leaves[i])
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
            f"{_MAX_COUNT}); use Unstructured('layer') or prune groups of leaves separately."
        )
    targets = [
        [
            _target(s, c)
            for s, c in zip(
                [sparsity[i] for i in chosen] if per_leaf else [sparsity] * n_groups,
                counts,
                strict=True,
            )
        ]
        for _, sparsity in stages
    ]
    chosen_scores = [[scores[i] for i in chosen] for scores, _ in stages]
    chosen_kept = [None if kept is None else kept[i] for i in chosen]
    concrete = all(isinstance(t, int) for row in targets for t in row)
    if (
        concrete
        and sum(sizes) <= HOST_MAX
        and on_host([*(x for row in chosen_scores for x in row), *allowed, *chosen_kept])
    ):
        new = chosen_kept
        for row, target in zip(chosen_scores, targets, strict=True):
            new = _select_kept_host(row, allowed, new, target, groups=groups, n_groups=n_groups)
        new = [to_device(m, x) for m, x in zip(new, chosen_scores[-1], strict=True)]
    else:
        if concrete:
            stacked = np.asarray(targets, np.int32)  # no eager jnp.stack compile
        else:
            stacked = jnp.stack(
                [jnp.stack([jnp.asarray(t, jnp.int32) for t in row]) for row in targets]
            )
        new = _select_kept_jit(
            chosen_scores, allowed, chosen_kept, stacked, groups=groups, n_groups=n_groups
        )
    for i, m in zip(chosen, new, strict=True):
        out[i] = m
    return out
