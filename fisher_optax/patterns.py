"""Selection patterns: which weights may go together, as values taken by one selection call.

A pattern is a small immutable value: :class:`Unstructured` (any weight, ranked globally
or per layer), :class:`NM` (``n`` of every ``m`` consecutive weights kept) and
:class:`Blocks` (whole ``(r, c)`` blocks). :func:`select` prunes the weights of smallest
score in the pattern's units, and so do :func:`fisher_optax.magnitude_mask`,
:func:`fisher_optax.two_stage_mask` and :func:`fisher_optax.pruned` given ``pattern=``,
as jaxpruner's ``sparsity_types`` are given to its one updater.

Every pattern shares one protocol, :class:`Pattern`: a method
``pattern.select(scores, sparsity, *, prunable, mask) -> Mask`` that takes a score tree
shaped like the params, the target (a fraction, traced or not, per leaf or not), which
weights may be pruned and the mask so far, and returns a bool mask. A new pattern is one
more class with that method. Shared rules: what ``mask`` pruned stays pruned and counts as
pruned; non-prunable weights are ``True`` unless ``mask`` pruned them; ties go to the lower
flat index; counts are exact (``round(s * n)``, half to even, of the float32 target), eager
and under ``jit`` alike. Nothing sorts: the top-k is the counting selection of
:mod:`fisher_optax._select`, an N:M group is ranked by ``m`` elementwise comparisons, and
blocks are ranked by the top-k over one score per block, so on sharded parameters whose
groups or blocks do not straddle shards nothing is gathered.
"""

import dataclasses
import functools
from typing import Any, Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fisher_optax import _select, _validate
from fisher_optax._tree import key_paths, keystr, layouts
from fisher_optax._types import Mask, Prunable, Scores, Sparsity

__all__ = ["BLOCK_REDUCTIONS", "NM", "Blocks", "Pattern", "Unstructured", "select"]

BLOCK_REDUCTIONS: dict[str, str] = {
    "sum": "the sum of the block's scores",
    "mean": "their mean",
    "max": "their maximum",
}
"""How :class:`Blocks` scores a block from the scores of the weights ``mask`` keeps in it."""

_F32_MAX = np.float32(np.finfo(np.float32).max)


@runtime_checkable
class Pattern(Protocol):
    """What :func:`select` and :func:`fisher_optax.pruned` take as ``pattern``.

    Any value with this method is a pattern. It must honour the shared rules of this module
    (what ``mask`` pruned stays pruned; non-prunable weights stay unless ``mask`` pruned
    them) and be traceable: :func:`fisher_optax.pruned` calls it inside ``jit`` and
    ``lax.cond`` with a traced float32 ``sparsity`` (a scalar, or a pytree of per-leaf
    scalars). Patterns are hashable, immutable values (frozen dataclasses).
    """

    def select(
        self,
        scores: Scores,
        sparsity: Sparsity,
        *,
        prunable: Prunable = None,
        mask: Mask | None = None,
    ) -> Mask:
        """The keep-mask of ``scores`` at ``sparsity`` (see :func:`select`)."""
        ...


# ---------------------------------------------------------------------------------------------
# Shared checks


def _has_nan(leaf) -> bool:
    if _validate.spans_processes(leaf):  # a jax reduction: NumPy cannot read other processes
        return bool(jnp.isnan(leaf).any())
    return bool(np.isnan(np.asarray(leaf, np.float32)).any())


def _score_leaves(scores: Scores, prunable: Prunable, mask: Mask | None):
    """Paths, leaves, treedef, per-leaf prunable flags and prior-mask leaves, checked."""
    _validate.arrays_only(scores, "scores")
    leaves, treedef = jax.tree.flatten(scores)
    paths = key_paths(scores)
    flags = _validate.prunable(prunable, scores)
    prior = None if mask is None else _validate.bool_leaves(scores, mask, ref_name="scores")
    for path, leaf, flag in zip(paths, leaves, flags, strict=True):
        if flag is False:
            continue
        dtype = jnp.result_type(leaf)
        if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"scores at {keystr(path)} have dtype {dtype}; scores must be real numbers "
                "(floating point or integer)."
            )
        # NumPy, not jnp: inside a trace (lax.cond of pruned, called eagerly) a jnp op on a
        # concrete array returns a tracer, which has no bool.
        if _validate.is_concrete(leaf) and _has_nan(leaf):
            raise ValueError(
                f"scores at {keystr(path)} hold NaN, which cannot be ranked. Check the params "
                "and the Fisher for NaN (diverged training?) before pruning."
            )
    return paths, leaves, treedef, flags, prior


def _split_flags(flags: list) -> tuple[tuple[str, ...], list]:
    """Static kinds per leaf (``"skip"``, ``"all"``, ``"dyn"``) and the dynamic flags."""
    kinds = tuple("skip" if f is False else "all" if f is True else "dyn" for f in flags)
    dyn = [jnp.asarray(f) if k == "dyn" else None for f, k in zip(flags, kinds, strict=True)]
    return kinds, dyn


def _f32_targets(targets: Any) -> Any:
    """Checked targets (a fraction or a list of them) as float32 scalars, for a jitted core.

    A concrete fraction gives the count a traced one gives (the top-k rounds both exactly),
    so one compiled core serves every target.
    """
    if isinstance(targets, list):
        return [jnp.asarray(s, jnp.float32) for s in targets]
    return jnp.asarray(targets, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Unstructured


@dataclasses.dataclass(frozen=True)
class Unstructured:
    """Any weight may go: the smallest scores in scope, exactly ``round(s * n)`` of ``n``.

    ``sparsity`` is the fraction of the prunable weights in scope to remove. The count, the
    tie-break and the algorithm are those described in :func:`select`.

    Attributes:
      scope: ``"global"`` (default) ranks all prunable weights together, so their scores
        must share a scale; ``"layer"`` ranks and prunes each leaf on its own. A per-leaf
        ``sparsity`` always ranks each leaf on its own.

    Raises:
      ValueError: at construction, if ``scope`` is unknown.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax as fo
      >>> scores = {"a": jnp.array([[1.0, 2.0]]), "b": jnp.array([[10.0, 20.0]])}
      >>> fo.select(scores, 0.5, pattern=fo.Unstructured("layer"))["b"]
      Array([[False,  True]], dtype=bool)
    """

    scope: Literal["global", "layer"] = "global"

    def __post_init__(self) -> None:
        _validate.scope(self.scope)

    def select(
        self,
        scores: Scores,
        sparsity: Sparsity,
        *,
        prunable: Prunable = None,
        mask: Mask | None = None,
    ) -> Mask:
        """The keep-mask of ``scores`` at ``sparsity``; see :func:`select`."""
        return _select_stages(self, [(scores, sparsity)], prunable=prunable, mask=mask)


def _select_stages(
    pattern: Unstructured,
    stages: list[tuple[Scores, Sparsity]],
    *,
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    """``pattern.select`` of each ``(scores, sparsity)`` of ``stages`` in turn, each stage
    under the mask the one before it returned (the first under ``mask``), as one selection.

    Where leaves of one shape are batched, the stages are the turns of one selection loop,
    traced and compiled once, and the mask between them stays in the selection's stacked
    layout; otherwise they are unrolled into identical kernels, which XLA compiles once.
    Where a ``prunable`` predicate gives the stages different flags (it reads the score
    values), or their trees differ, the stages run one by one.
    """
    checked = []
    for scores, sparsity in stages:
        targets = _validate.sparsity(sparsity, scores)
        _, leaves, treedef, flags, prior = _score_leaves(scores, prunable, mask)
        checked.append((leaves, treedef, flags, prior, targets))
    leaves, treedef, flags, prior, _ = checked[0]
    if any(
        t != treedef or any(f is not g for f, g in zip(fl, flags, strict=True))
        for _, t, fl, _, _ in checked[1:]
    ):
        for scores, sparsity in stages:
            mask = _select_stages(pattern, [(scores, sparsity)], prunable=prunable, mask=mask)
        return mask
    out = _select.topk_leaves(
        leaves,
        [(x, targets) for x, _, _, _, targets in checked],
        scope=pattern.scope,
        flags=flags,
        kept=prior,
    )
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# N:M


@dataclasses.dataclass(frozen=True)
class NM:
    r"""N:M sparsity: in every group of ``m`` consecutive weights along ``axis``, keep ``n``.

    A group keeps the ``n`` weights of largest score: its winners, as ranked with ``mask``
    (weights ``mask`` pruned lose to every other; ties: the lower flat index loses, inside a
    group the one nearer the start of ``axis``). The full pattern prunes exactly ``m - n``
    per group (a group in which ``mask`` kept ``q`` weights keeps ``min(n, q)``): every group
    then holds at most ``n`` nonzero weights, the layout sparse tensor cores accelerate for
    2:4.

    ``sparsity`` is the fraction of the prunable weights in scope to remove, capped at the
    pattern's own :math:`c = (m - n) / m` (in float32). At a target :math:`s \ge c` the
    result is the full pattern, so ``select(scores, 1.0, pattern=NM(2, 4))`` is the 2:4
    mask. Below it,

    .. math::
      k = \max\bigl(\operatorname{round}(s N),\ p\bigr)

    of the :math:`N` prunable weights in scope are pruned (``p`` of them by ``mask``
    before), the smallest scores among those that are *not* their group's winners. So no
    group ever loses more than ``m - n`` weights beyond what ``mask`` pruned, a group loses
    its worst weights first, and a schedule ending at ``c`` (0.5 for 2:4) goes from dense to
    N:M: jaxpruner's iterative N:M, with exact counts and no sort. A per-leaf ``sparsity``
    caps each leaf's target at ``c`` and meets it leaf by leaf.

    ``m`` must divide the length of ``axis`` in every prunable leaf (a partial group has no
    hardware meaning); leave other leaves out with ``prunable``. An element-wise
    ``prunable`` applies group by group: a group holding a weight that may not be pruned is
    left as it is. The cost of the full pattern is ``m`` elementwise passes (no sort), all
    inside each group, so a leaf sharded along ``axis`` in pieces of a multiple of ``m`` (or
    along any other axis) is never gathered; below ``c`` a top-k over what the winners leave
    follows.

    Attributes:
      n: the weights kept per group, an int in ``1..m``.
      m: the group size, an int ``>= 1``.
      axis: the axis along which groups run (negative counts from the end), or ``None``
        (default): each leaf's input axis, the reduction axis of ``x @ W`` along which
        hardware N:M groups run, where the layout is known (``-2`` of a Flax Dense kernel
        ``(in, out)`` or Conv kernel ``(*window, in, out)``, ``1`` of an Equinox
        ``Linear`` or ``Conv`` weight ``(out, in, ...)``; see
        :func:`fisher_optax._tree.layouts`). A prunable leaf of unknown layout (an
        embedding, a ``DenseGeneral`` attention kernel, an ``nn.scan``-stacked kernel, a
        hand-written layer) is an error
        asking for ``axis=``: a guessed axis would group heads or outputs silently.
      scope: how the weights below the cap are ranked: ``"layer"`` (default; every leaf
        moves toward N:M at the pace of the target, as jaxpruner's per-layer N:M) or
        ``"global"`` (one ranking across leaves, whose scores must then share a scale).

    Raises:
      ValueError: at construction, if ``n`` is not in ``1..m`` or ``scope`` is unknown; when
        selecting, if ``axis`` is out of range for a prunable leaf, ``m`` does not divide
        its length there, or ``axis=None`` meets a leaf of unknown layout (naming the leaf).
      TypeError: at construction, if ``n`` or ``m`` is not an int, or ``axis`` is neither
        an int nor ``None``.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax as fo
      >>> scores = {"kernel": jnp.array([[4.0, 1.0], [3.0, 2.0], [1.0, 1.0], [2.0, 1.0]])}
      >>> fo.select(scores, 1.0, pattern=fo.NM(2, 4))["kernel"]  # (in, out): 2 of 4 per column
      Array([[ True, False],
             [ True,  True],
             [False, False],
             [False,  True]], dtype=bool)
      >>> scores = {"w": jnp.array([[4.0], [3.0], [1.0], [2.0], [0.1], [0.2], [0.3], [9.0]])}
      >>> fo.select(scores, 0.375, pattern=fo.NM(2, 4, axis=0))["w"].ravel()  # 0.3 is a winner
      Array([ True,  True, False,  True, False, False,  True,  True], dtype=bool)

    References:
      Mishra et al. Accelerating Sparse Deep Neural Networks. 2021.
      https://arxiv.org/abs/2104.08378

      Lasby, Golubeva, Evci, Nica, Ioannou. JaxPruner: A concise library for sparsity
      research. 2023. https://arxiv.org/abs/2304.14082

      Zhou et al. Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch.
      ICLR 2021. https://arxiv.org/abs/2102.04010
    """

    n: int
    m: int
    axis: int | None = None
    scope: Literal["global", "layer"] = "layer"

    def __post_init__(self) -> None:
        m = _validate.integer(self.m, "m", minimum=1)
        n = _validate.integer(
            self.n, f"n (the weights kept in each group of m={m})", minimum=1, maximum=m
        )
        if self.axis is not None and (
            isinstance(self.axis, bool) or not isinstance(self.axis, int | np.integer)
        ):
            raise TypeError(
                "axis must be an int (e.g. -2, a Flax kernel's input axis) or None (each "
                f"leaf's input axis where its layout is known), got {self.axis!r}."
            )
        _validate.scope(self.scope)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        object.__setattr__(self, "axis", None if self.axis is None else int(self.axis))

    @property
    def cap(self) -> float:
        """:math:`(m - n) / m` in float32: the sparsity of the full pattern."""
        return float(np.float32((self.m - self.n) / self.m))

    def select(
        self,
        scores: Scores,
        sparsity: Sparsity,
        *,
        prunable: Prunable = None,
        mask: Mask | None = None,
    ) -> Mask:
        """The keep-mask of ``scores`` at ``sparsity``; see the class and :func:`select`."""
        n, m, cap = self.n, self.m, self.cap
        targets = _validate.sparsity(sparsity, scores)
        arrays, dyn, prior, static = _prep_nm(scores, n, m, self.axis, prunable, mask)
        concrete = targets if isinstance(targets, list) else [targets]
        if all(isinstance(s, float) and s >= cap for s in concrete):
            targets = None  # the full pattern: no top-k to run
        else:
            targets = _f32_targets(targets)
        out = _nm_core(arrays, dyn, targets, prior, n=n, m=m, scope=self.scope, cap=cap, **static)
        return jax.tree.unflatten(static["treedef"], out)


def _nm_axis(path: tuple, leaf: Any, axis: int | None, layout: Any, m: int) -> int:
    """``axis`` of this leaf, made non-negative, after checking that ``m`` divides it;
    ``axis=None``: the input axis of its known ``layout``."""
    if axis is None:
        if layout is None:
            raise ValueError(
                f"NM has no default axis for the leaf at {keystr(path)} of shape "
                f"{tuple(jnp.shape(leaf))}: its layout is not known (known: a 2-D Flax "
                "'kernel', a Flax Conv 'kernel' under a module named for a conv, an Equinox "
                "Linear or Conv 'weight'). Pass NM(n, m, axis=...) "
                "with the layer's input (reduction) axis, or leave the leaf out with prunable=."
            )
        axis = layout[0]
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
    larger (the lower index goes first, as :class:`Unstructured` breaks them); entries
    ``prior`` pruned lose to every other. An entry is kept iff fewer than ``n`` entries of
    its group beat it: ``m`` elementwise passes, no sort, all inside each group.
    """
    key = _select.float_keys(score)
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
        None if f is False else _nm_axis(p, x, axis, lay, m)
        for p, x, f, lay in zip(paths, leaves, flags, layouts(scores), strict=True)
    )
    kinds, dyn = _split_flags(flags)
    shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
    arrays = [None if k == "skip" else x for x, k in zip(leaves, kinds, strict=True)]
    static = {"treedef": treedef, "kinds": kinds, "shapes": shapes, "axes": axes}
    return arrays, dyn, prior, static


def _final_nm(shape, gflag, prior_leaf, keep) -> jax.Array:
    """The N:M keep-mask of one leaf: its best ``n`` per group, and nothing ``mask`` pruned."""
    if gflag is False:  # not prunable: kept, unless mask pruned it
        return jnp.ones(shape, bool) if prior_leaf is None else prior_leaf
    if not isinstance(gflag, bool):
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
        Unstructured(scope).select(
            jax.tree.unflatten(treedef, ranked),
            jax.tree.unflatten(treedef, capped) if per_leaf else capped,
            prunable=jax.tree.unflatten(treedef, gflags),
            mask=None if prior is None else jax.tree.unflatten(treedef, prior),
        )
    )
    out = []
    for i, g in enumerate(gflags):
        if g is False:
            out.append(gradual[i])
            continue
        # Groups left alone keep what mask pruned (the top-k would free them). Once the
        # target reaches c the result is the pattern itself: min(s, c) * N may round one
        # short of the (m - n) / m * N weights outside the winners when c is no float32.
        grown = gradual[i] if prior is None else gradual[i] & prior[i]
        s = targets[i] if per_leaf else targets
        out.append(jnp.where(s >= cap, finals[i], grown))
    return out


# ---------------------------------------------------------------------------------------------
# Blocks


@dataclasses.dataclass(frozen=True)
class Blocks:
    r"""Whole ``(r, c)`` blocks: exactly ``round(sparsity * n)`` of the ``n`` blocks in scope.

    Each prunable leaf is cut into blocks of ``r`` entries along its row axis and ``c``
    along its column axis (one grid per index of the other axes, e.g. per tap of a Conv
    kernel). By default the rows are the layer's input axis and the columns its output axis,
    so ``(r, c)`` means the same tile on a Flax Dense kernel ``(in, out)`` and on an Equinox
    Linear weight ``(out, in)``. A block scores

    .. math::
      S_b = \operatorname{reduction}\{\, s_i : i \in b,\ \text{mask}_i \,\}

    over the scores of the weights ``mask`` keeps in it, with ``reduction`` a key of
    :data:`BLOCK_REDUCTIONS`. ``sparsity`` is the fraction of prunable *blocks* to remove;
    the blocks are ranked by the unstructured top-k (its exact count, half to even, and its
    tie-break: among equal block scores the block of lower flat index goes first, blocks
    numbered row-major in each leaf's grid and leaves in flattening order), globally or per
    layer. A block in which ``mask`` kept nothing counts as already pruned; the weights
    ``mask`` pruned stay pruned. Inside :func:`fisher_optax.pruned` the pruned blocks only
    grow along the schedule. With an element-wise ``prunable``, a block may go only if every
    weight in it may.

    Leaves that blocks do not tile: when ``H`` or ``W`` is not a multiple of ``r`` or ``c``,
    the last row or column of blocks is smaller (it holds what is left). Each such block
    still counts as one block, and ``"sum"`` adds fewer scores in it, so it tends to go
    first; ``"mean"`` and ``"max"`` do not favour it. With partial blocks the weight
    sparsity may differ from the block sparsity.

    Attributes:
      shape: ``(r, c)``, the block's rows and columns (ints ``>= 1``).
      reduction: ``"sum"`` (default; for OBD saliencies, the estimated loss increase of
        removing the block), ``"mean"`` or ``"max"``.
      scope: ``"global"`` (default; one ranking of all blocks, whose scores must share a
        scale) or ``"layer"`` (each leaf on its own).
      axes: ``(row axis, column axis)`` of every prunable leaf (negative counts from the
        end), or ``None`` (default): each leaf's ``(input, output)`` axes where its layout
        is known (``(-2, -1)`` of a Flax Dense or Conv kernel, ``(1, 0)`` of an Equinox
        Linear or Conv weight; see :func:`fisher_optax._tree.layouts`). A prunable leaf of
        unknown layout is an error asking for ``axes=``.

    Raises:
      ValueError: at construction, if ``shape`` holds a size below 1, ``axes`` names one
        axis twice, or ``reduction`` or ``scope`` is unknown; when selecting, if a prunable
        leaf has ``ndim < 2``, ``axes`` is out of range for it, or ``axes=None`` meets a
        leaf of unknown layout (naming the leaf).
      TypeError: at construction, if ``shape`` or ``axes`` is not a pair of ints.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax as fo
      >>> scores = {"kernel": jnp.array([[1.0, 1.0, 5.0, 5.0],
      ...                                [1.0, 9.0, 5.0, 5.0]])}
      >>> fo.select(scores, 0.5, pattern=fo.Blocks((2, 2)))["kernel"]  # sums 12 < 20
      Array([[False, False,  True,  True],
             [False, False,  True,  True]], dtype=bool)
      >>> blocks = fo.Blocks((2, 2), reduction="max", axes=(0, 1))  # "w": layout not known
      >>> fo.select({"w": scores["kernel"]}, 0.5, pattern=blocks)["w"]  # 9 > 5
      Array([[ True,  True, False, False],
             [ True,  True, False, False]], dtype=bool)

    References:
      Gray, Radford, Kingma. GPU Kernels for Block-Sparse Weights. 2017.
      https://openai.com/research/block-sparse-gpu-kernels

      Narang, Undersander, Diamos. Block-Sparse Recurrent Neural Networks. 2017.
      https://arxiv.org/abs/1711.02782
    """

    shape: tuple[int, int]
    reduction: Literal["sum", "mean", "max"] = "sum"
    scope: Literal["global", "layer"] = "global"
    axes: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        axes = self.axes
        if axes is not None:
            if (
                not isinstance(axes, tuple | list)
                or len(axes) != 2
                or any(isinstance(a, bool) or not isinstance(a, int | np.integer) for a in axes)
            ):
                raise TypeError(
                    "axes must be a pair of ints (row axis, column axis), e.g. (-2, -1) for "
                    f"a kernel (in, out), or None (each leaf's known layout), got {axes!r}."
                )
            if axes[0] == axes[1]:
                raise ValueError(
                    f"axes must name two different axes (rows, columns), got {tuple(axes)}."
                )
            object.__setattr__(self, "axes", (int(axes[0]), int(axes[1])))
        shape = self.shape
        if (
            not isinstance(shape, tuple | list)
            or len(shape) != 2
            or any(isinstance(b, bool) or not isinstance(b, int | np.integer) for b in shape)
        ):
            raise TypeError(
                f"shape must be a pair of ints (rows, columns), e.g. (4, 4), got {shape!r}."
            )
        r, c = (int(b) for b in shape)
        if r < 1 or c < 1:
            raise ValueError(f"block sizes must be >= 1, got shape={(r, c)}.")
        _validate.choice(self.reduction, "reduction", BLOCK_REDUCTIONS)
        _validate.scope(self.scope)
        object.__setattr__(self, "shape", (r, c))

    def select(
        self,
        scores: Scores,
        sparsity: Sparsity,
        *,
        prunable: Prunable = None,
        mask: Mask | None = None,
    ) -> Mask:
        """The keep-mask of ``scores`` at ``sparsity``; see the class and :func:`select`."""
        targets = _validate.sparsity(sparsity, scores)
        paths, leaves, treedef, flags, prior = _score_leaves(scores, prunable, mask)
        axes = []
        for path, leaf, flag, lay in zip(paths, leaves, flags, layouts(scores), strict=True):
            if flag is False:
                axes.append(None)
                continue
            if jnp.ndim(leaf) < 2:
                raise ValueError(
                    f"blocks tile two axes of a leaf, but the leaf at {keystr(path)} has "
                    f"shape {jnp.shape(leaf)}. Leave it out with prunable= (the default "
                    "prunes only kernels)."
                )
            axes.append(_block_axes(path, leaf, self.axes, lay))
        kinds, dyn = _split_flags(flags)
        out = _block_core(
            [None if k == "skip" else x for x, k in zip(leaves, kinds, strict=True)],
            dyn,
            _f32_targets(targets),
            prior,
            treedef=treedef,
            kinds=kinds,
            shapes=tuple(tuple(jnp.shape(x)) for x in leaves),
            r=self.shape[0],
            c=self.shape[1],
            reduction=self.reduction,
            scope=self.scope,
            axes=tuple(axes),
        )
        return jax.tree.unflatten(treedef, out)


def _block_axes(path: tuple, leaf: Any, axes: Any, layout: Any) -> tuple[int, int]:
    """``(row, column)`` axes of this leaf, non-negative: ``axes``, or its layout's
    ``(input, output)`` with ``axes=None``."""
    shape = tuple(jnp.shape(leaf))
    if axes is None:
        if layout is None:
            raise ValueError(
                f"Blocks has no default axes for the leaf at {keystr(path)} of shape {shape}: "
                "its layout is not known (known: a 2-D Flax 'kernel', a Flax Conv 'kernel' "
                "under a module named for a conv, an Equinox Linear or Conv 'weight'). Pass "
                "Blocks(shape, axes=(row axis, column axis)), e.g. the layer's (input, output) "
                "axes, or leave the leaf out with prunable=."
            )
        return layout
    if not all(-len(shape) <= a < len(shape) for a in axes):
        raise ValueError(
            f"axes={axes} is out of range for the leaf at {keystr(path)} of shape {shape}; "
            f"use axes in {-len(shape)}..{len(shape) - 1}, or leave the leaf out with prunable=."
        )
    return (axes[0] % len(shape), axes[1] % len(shape))


def _blocked(x: jax.Array, r: int, c: int, fill: Any) -> jax.Array:
    """``x`` of shape ``(..., H, W)`` as ``(..., R, r, C, c)``, padded with ``fill`` at the
    bottom and right edges to ``R = ceil(H / r)`` and ``C = ceil(W / c)`` blocks."""
    *lead, h, w = x.shape
    rows, cols = -(-h // r), -(-w // c)
    if (rows * r, cols * c) != (h, w):
        pad = [(0, 0)] * len(lead) + [(0, rows * r - h), (0, cols * c - w)]
        x = jnp.pad(x, pad, constant_values=fill)
    return x.reshape(*lead, rows, r, cols, c)


def _block_scores(score, kept, r, c, reduction):
    """One score per block from the entries ``kept`` keeps, and whether it keeps any."""
    s = jnp.asarray(score)
    s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
    valid = jnp.ones(s.shape, bool) if kept is None else kept
    valid = _blocked(valid, r, c, False)
    alive = jnp.any(valid, axis=(-3, -1))
    if reduction == "max":
        out = jnp.max(jnp.where(valid, _blocked(s, r, c, 0), -jnp.inf), axis=(-3, -1))
        return jnp.where(alive, out, 0), alive
    total = jnp.sum(jnp.where(valid, _blocked(s, r, c, 0), 0), axis=(-3, -1))
    if reduction == "sum":
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
    jax.jit,
    static_argnames=("treedef", "kinds", "shapes", "r", "c", "reduction", "scope", "axes"),
)
def _block_core(
    leaves, dyn, targets, prior, *, treedef, kinds, shapes, r, c, reduction, scope, axes
):
    # Each prunable leaf is worked on with its (row, column) axes moved last, and its
    # keep-mask moved back at the end.
    leaves, dyn, shapes = list(leaves), list(dyn), list(shapes)
    prior = None if prior is None else list(prior)
    for i, kind in enumerate(kinds):
        if kind == "skip":
            continue
        row, col = axes[i]
        leaves[i] = jnp.moveaxis(leaves[i], (row, col), (-2, -1))
        if prior is not None:
            prior[i] = jnp.moveaxis(prior[i], (row, col), (-2, -1))
        if kind == "dyn" and jnp.ndim(dyn[i]) > 0:
            dyn[i] = jnp.moveaxis(jnp.broadcast_to(dyn[i], shapes[i]), (row, col), (-2, -1))
        rest = [n for a, n in enumerate(shapes[i]) if a not in (row, col)]
        shapes[i] = (*rest, shapes[i][row], shapes[i][col])
    bscores, alive, bflags = [], [], []
    for i, (leaf, kind) in enumerate(zip(leaves, kinds, strict=True)):
        if kind == "skip":
            bscores.append(jnp.zeros(shapes[i], jnp.float32))
            alive.append(jnp.ones(shapes[i], bool))
            bflags.append(False)
            continue
        s, a = _block_scores(leaf, None if prior is None else prior[i], r, c, reduction)
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
        Unstructured(scope).select(
            jax.tree.unflatten(treedef, bscores),
            jax.tree.unflatten(treedef, targets) if per_leaf else targets,
            prunable=jax.tree.unflatten(treedef, bflags),
            mask=jax.tree.unflatten(treedef, alive),
        )
    )
    out = []
    for i, kind in enumerate(kinds):
        if kind == "skip":  # not prunable: kept, unless mask pruned it
            out.append(keep_blocks[i] if prior is None else keep_blocks[i] & prior[i])
            continue
        keep = _expand(keep_blocks[i], shapes[i], r, c)
        keep = keep if prior is None else keep & prior[i]
        out.append(jnp.moveaxis(keep, (-2, -1), axes[i]))
    return out


# ---------------------------------------------------------------------------------------------
# The one selection call


def select(
    scores: Scores,
    sparsity: Sparsity,
    *,
    pattern: Pattern = Unstructured(),
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""Keep the largest scores: prune the smallest, in the units of ``pattern``.

    ``pattern.select(scores, sparsity, prunable=prunable, mask=mask)``; see
    :class:`Unstructured` (the default), :class:`NM` and :class:`Blocks` for what
    ``sparsity`` counts in each. Unstructured, with ``n`` prunable weights in scope of which
    ``m`` were pruned by ``mask``, prunes

    .. math::
      k = \max\bigl(\operatorname{round}(s \cdot n),\ m\bigr)

    weights: the ``m`` pruned before, then the smallest scores among the rest.
    :math:`s \cdot n` is the exact product of the float32 value of ``sparsity`` (a Python
    float is rounded to float32 first), rounded half to even, so an eager call and a jitted
    one with a traced sparsity prune the same count. Ties break deterministically: among
    equal scores the weight with the lower flat index is pruned first, where the flat index
    runs over the prunable leaves in scope in ``jax.tree`` flattening order, row-major
    inside each leaf. Scores are ranked as float32, where ``-0.0`` and subnormals equal
    ``0.0``.

    The exact threshold is found without sorting, one byte of order-preserving integer keys
    at a time: 16 counting passes that each read one byte per weight and count three
    candidates (32 passes of one candidate on scores that may be sharded), then, only when
    ties straddle the threshold, the same loop over the bytes of the tied entries' flat
    index. Under ``jit``
    on sharded scores only counts cross devices (all-reduces, no all-gather). Called eagerly
    on concrete arrays held by the CPU (NumPy, or one CPU device), with at most ``2**24``
    weights in scope, the same selection runs in NumPy (``np.partition``), with identical
    masks and nothing to compile.

    Args:
      scores: a pytree of real arrays shaped like the params; larger means more important
        (e.g. from :func:`fisher_optax.scores`, any criterion, ``"random"`` included).
      sparsity: the target, in ``[0, 1]``: one scalar; a pytree like ``scores`` with one
        scalar per leaf (each leaf is then ranked on its own, whatever the pattern's scope);
        or a mapping from path strings (``jax.tree_util.keystr`` form, e.g.
        ``"['dense']['kernel']"``) or predicates ``(path, leaf) -> bool`` to fractions, where
        leaves no key matches get 0 (as jaxpruner's ``custom_sparsity_map``). Concrete values
        outside ``[0, 1]`` or NaN are errors; under ``jit`` a traced value is clipped to
        ``[0, 1]`` and NaN becomes 0. What it is a fraction of depends on the pattern.
      pattern: a :class:`Pattern`: :class:`Unstructured` (default: one global ranking),
        :class:`NM` or :class:`Blocks`.
      prunable: which weights may be pruned. ``None``: the kernels
        (:func:`fisher_optax.is_kernel`: ``ndim >= 2``, not biases, norm scales or batch
        statistics, stacked or not). A predicate ``prunable(path, leaf)`` returning a bool
        or a bool array shaped like the leaf, where ``path`` is the leaf's ``jax.tree_util``
        key path tuple (Flax's ``.value`` hop left out). A pytree like the params holding a
        bool or a bool array per leaf. Or a mapping ``{path or predicate: flag}`` (leaves no
        key matches are not prunable).
      mask: an existing bool mask; what it prunes stays pruned (prunable or not) and,
        where prunable, counts toward the target.

    Returns:
      A boolean pytree shaped like ``scores``; ``True`` keeps a weight. Non-prunable
      weights are ``True`` unless ``mask`` prunes them.

    Raises:
      ValueError: if ``sparsity`` is outside ``[0, 1]``, NaN, or does not match the leaves,
        concrete scores hold NaN (under ``jit`` they cannot be checked: NaN then ranks above
        every number and is pruned last), ``mask``/``prunable`` do not match ``scores``, and
        as the pattern says.
      TypeError: if ``pattern`` is not a pattern, scores are not real numbers, ``mask`` is
        not boolean, or a ``prunable`` predicate does not take ``(path, leaf)``.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax as fo
      >>> scores = {"w": jnp.array([[3.0, 1.0], [2.0, 1.0]]), "b": jnp.array([0.0, 0.0])}
      >>> fo.select(scores, 0.5)["w"]  # the two 1.0s are pruned; the bias is not prunable
      Array([[ True, False],
             [ True, False]], dtype=bool)
      >>> fo.select(scores, 0.25)["w"]  # tie: the lower flat index goes first
      Array([[ True, False],
             [ True,  True]], dtype=bool)
      >>> fo.select(scores, 1.0, pattern=fo.NM(1, 2, axis=0))["w"]  # best 1 of 2 down a column
      Array([[ True, False],
             [False,  True]], dtype=bool)
    """
    return _validate.pattern(pattern).select(scores, sparsity, prunable=prunable, mask=mask)
