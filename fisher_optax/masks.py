"""Pruning masks: the paper's entry points, per-layer targets, applying and reporting masks.

A mask is a boolean pytree shaped like the parameters; ``True`` keeps a weight. Every mask
here is :func:`fisher_optax.select` over scores from :func:`fisher_optax.scores`, in the
units of a pattern (:class:`fisher_optax.Unstructured` by default, :class:`fisher_optax.NM`,
:class:`fisher_optax.Blocks`): it prunes *exactly* ``round(s * n)`` of the ``n`` prunable
units in scope, the ones with the smallest scores, and breaks ties by a fixed rule. The
sparsity ``s`` is one scalar, or one target per leaf: a pytree of scalars, or a mapping from
paths or predicates to targets (e.g. from :func:`erk_sparsity`).
"""

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax import _select, _validate
from fisher_optax._tree import key_paths, keystr
from fisher_optax._types import Fisher, Mask, Params, Prunable, Scores, Sparsity
from fisher_optax.patterns import Pattern, Unstructured, _select_stages, select
from fisher_optax.scores import CRITERIA
from fisher_optax.scores import scores as _scores

__all__ = [
    "LeafSparsity",
    "SparsityReport",
    "apply_mask",
    "erk_sparsity",
    "magnitude_mask",
    "sparsity_report",
    "two_stage_mask",
    "uniform_sparsity",
]

_FISHER_CRITERIA: dict[str, str] = {k: CRITERIA[k] for k in ("fisher", "saliency")}
"""The named criteria that rank by the Fisher (stage two of :func:`two_stage_mask`)."""


def _magnitude_scores(params: Params) -> Scores:
    """``scores(params, "magnitude")``; computed in NumPy when the selection will be too.

    ``|w|`` is exact in float32 either way; on the host no per-leaf ``abs`` is compiled.
    """
    _validate.arrays_only(params, "params")
    leaves = [x for x in jax.tree.leaves(params) if not _validate.is_prng_key(x)]
    if sum(math.prod(np.shape(x)) for x in leaves) > _select.HOST_MAX or not _select.on_host(
        leaves
    ):
        return _scores(params, "magnitude")
    _validate.finite(params, "params")  # the checks and messages of scores()
    return jax.tree.map(
        lambda w: (
            np.zeros(w.shape, np.float32)
            if _validate.is_prng_key(w)
            else np.abs(np.asarray(w).astype(np.float32))
        ),
        params,
    )


def _scale(sparsity: Any, factor: Any) -> Any:
    """``factor * sparsity`` per leaf, in float32 in both the eager and the jitted path."""
    if isinstance(sparsity, list):
        return [_scale(s, factor) for s in sparsity]
    if isinstance(sparsity, float) and isinstance(factor, float):
        return float(np.float32(factor) * np.float32(sparsity))
    return jnp.float32(factor) * jnp.float32(sparsity)


def magnitude_mask(
    params: Params,
    sparsity: Sparsity,
    *,
    pattern: Pattern = Unstructured(),  # noqa: B008 (a frozen, immutable value)
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""Prune the weights of smallest magnitude :math:`|w|`.

    :func:`fisher_optax.select` over ``fisher_optax.scores(params, "magnitude")``; see it
    for the exact count, the tie-break and the forms of ``sparsity``.

    Args:
      params: a pytree of parameter arrays (finite).
      sparsity: the target (a scalar, per leaf, or a mapping; see
        :func:`fisher_optax.select`), a fraction of the pattern's units.
      pattern: the selection pattern: :class:`fisher_optax.Unstructured` (default, global),
        :class:`fisher_optax.NM` or :class:`fisher_optax.Blocks`.
      prunable: which weights may be pruned, as in :func:`fisher_optax.select`.
      mask: an existing bool mask; what it prunes stays pruned (prunable or not) and,
        where prunable, counts toward the target.

    Returns:
      A boolean pytree shaped like ``params``; ``True`` keeps a weight.

    Raises:
      ValueError: if concrete ``params`` hold NaN or inf, and as :func:`fisher_optax.select`.
      TypeError: as :func:`fisher_optax.select`.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax as fo
      >>> params = {"w": jnp.array([[0.1, -2.0], [-0.3, 0.5]])}
      >>> fo.magnitude_mask(params, 0.5)["w"]
      Array([[False,  True],
             [False,  True]], dtype=bool)
      >>> fo.magnitude_mask(params, 0.5, pattern=fo.Unstructured("layer"))["w"]
      Array([[False,  True],
             [False,  True]], dtype=bool)

    References:
      Han, Pool, Tran, Dally. Learning both Weights and Connections for Efficient Neural
      Networks. NeurIPS 2015. https://arxiv.org/abs/1506.02626
    """
    return select(
        _magnitude_scores(params), sparsity, pattern=pattern, prunable=prunable, mask=mask
    )


def _fisher_criterion(criterion: Any) -> Any:
    if callable(criterion):
        return criterion
    return _validate.choice(criterion, "criterion", _FISHER_CRITERIA)


def two_stage_mask(
    params: Params,
    sparsity: Sparsity,
    *,
    fisher: Fisher,
    magnitude_fraction: float | jax.Array = 0.5,
    criterion: Literal["fisher", "saliency"] | Callable = "fisher",
    pattern: Pattern = Unstructured(),  # noqa: B008 (a frozen, immutable value)
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> Mask:
    r"""The paper's two-stage pruning: first by magnitude, then by Fisher information.

    With target :math:`s` and share :math:`a` = ``magnitude_fraction``, stage one prunes
    ``round(a * s * n)`` of the ``n`` prunable weights in scope by :math:`|w|`
    (:func:`magnitude_mask`; ``a * s`` is formed in float32); weights of tiny magnitude have
    a Fisher that is hard to estimate. Stage two prunes among the survivors, by the Fisher
    criterion, until ``round(s * n)`` are pruned in all (:func:`fisher_optax.select` over
    ``fisher_optax.scores(params, criterion, fisher=fisher)`` with the stage-one mask). Both
    stages count what ``mask`` pruned before toward their targets, and both select in the
    units of ``pattern``. A per-leaf ``sparsity`` applies the share leaf by leaf.
    ``magnitude_fraction=0`` is pure Fisher (or saliency) pruning.

    .. math::
      \text{score}_2 = \begin{cases} F & \text{criterion="fisher"} \\
      \tfrac12 F w^2 & \text{criterion="saliency"} \\
      \text{criterion}(w, F) & \text{a callable} \end{cases}

    The saliency is optimal brain damage's estimate of the loss increase when a weight is
    set to zero, with the Fisher diagonal in place of the Hessian diagonal
    (:func:`fisher_optax.saliency`).

    Args:
      params: a pytree of parameter arrays (finite).
      sparsity: the final target (a scalar, per leaf, or a mapping; see
        :func:`fisher_optax.select`), a fraction of the pattern's units.
      fisher: a Fisher diagonal shaped like ``params``, finite and non-negative.
      magnitude_fraction: the share of ``sparsity`` removed by magnitude in stage one, in
        ``[0, 1]``: ``0`` is pure Fisher pruning, ``1`` pure magnitude pruning.
      criterion: ``"fisher"`` (rank by F), ``"saliency"`` (0.5 F w^2) or a callable
        ``(params, fisher) -> scores`` for stage two.
      pattern: the selection pattern of both stages, as in :func:`magnitude_mask`.
      prunable: which weights may be pruned, as in :func:`fisher_optax.select`.
      mask: an existing bool mask; what it prunes stays pruned (prunable or not) and,
        where prunable, counts toward the target.

    Returns:
      A boolean pytree shaped like ``params``; ``True`` keeps a weight.

    Raises:
      ValueError: if ``magnitude_fraction`` is outside ``[0, 1]`` (concrete), ``criterion``
        is unknown, ``fisher`` differs from ``params`` in structure or shapes (naming the
        first mismatching path) or holds a negative or non-finite value, and as
        :func:`fisher_optax.select`.
      TypeError: as :func:`fisher_optax.select`.

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

      LeCun, Denker, Solla. Optimal Brain Damage. NeurIPS 1989.
    """
    criterion = _fisher_criterion(criterion)
    share = _validate.fraction(
        magnitude_fraction,
        "magnitude_fraction",
        meaning="the share of the target sparsity removed by magnitude in stage one",
    )
    targets = _validate.sparsity(sparsity, params)
    score = _scores(params, criterion, fisher=fisher)
    stage1 = _scale(targets, share)
    if isinstance(stage1, list):
        stage1 = jax.tree.unflatten(jax.tree.structure(params), stage1)
    stages = [(_magnitude_scores(params), stage1), (score, sparsity)]
    if type(pattern) is Unstructured:  # both stages in one selection (one compiled loop)
        return _select_stages(pattern, stages, prunable=prunable, mask=mask)
    for stage_scores, stage_sparsity in stages:
        mask = select(stage_scores, stage_sparsity, pattern=pattern, prunable=prunable, mask=mask)
    return mask


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
    leaves, treedef = jax.tree.flatten(params)
    out = [
        jnp.where(m, x, jnp.zeros((), jnp.result_type(x)))
        for x, m in zip(leaves, masks, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# Per-layer sparsity distributions


def uniform_sparsity(params: Params, sparsity: float, *, prunable: Prunable = None) -> Any:
    """The same target for every prunable leaf, 0 for the others (one scalar per leaf).

    Passing the result as ``sparsity`` equals passing the scalar with
    ``pattern=Unstructured("layer")``.

    Args:
      params: a pytree of parameter arrays (only their shapes are used).
      sparsity: the fraction to remove from each prunable leaf, in ``[0, 1]``.
      prunable: as in :func:`fisher_optax.select`; a leaf counts as prunable unless its flag is
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
    sparsity = _validate.real(
        sparsity, "sparsity", low=0.0, high=1.0, meaning=_validate.SPARSITY_MEANING
    )
    flags = _validate.prunable(prunable, params)
    return jax.tree.unflatten(
        jax.tree.structure(params), [0.0 if f is False else sparsity for f in flags]
    )


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
      prunable: as in :func:`fisher_optax.select`; a leaf counts as prunable unless its flag is
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
    sparsity = _validate.real(
        sparsity, "sparsity", low=0.0, high=1.0, meaning=_validate.SPARSITY_MEANING
    )
    power_scale = _validate.real(power_scale, "power_scale", low=0.0)
    leaves, treedef = jax.tree.flatten(params)
    flags = _validate.prunable(prunable, params)
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


@jax.jit
def _global_counts(mask: jax.Array, allowed: jax.Array) -> jax.Array:
    allowed = jnp.broadcast_to(allowed, mask.shape)
    return jnp.stack([jnp.sum(~mask), jnp.sum(allowed), jnp.sum(~mask & allowed)])


def _mask_counts(leaf: Any, flag: Any) -> tuple[int, int, int]:
    """``(pruned, prunable, pruned among prunable)`` of one mask leaf: counted in NumPy,
    or by a jax reduction where the leaf spans processes (NumPy cannot read their shards)."""
    if _validate.spans_processes(leaf):
        counts = _global_counts(leaf, jnp.asarray(flag, bool))
        return tuple(int(c) for c in np.asarray(counts))
    leaf = np.asarray(leaf)
    allowed = np.broadcast_to(np.asarray(flag, bool), leaf.shape)
    return int((~leaf).sum()), int(allowed.sum()), int((~leaf & allowed).sum())


def sparsity_report(mask: Mask, *, prunable: Prunable = None) -> SparsityReport:
    """How much a mask prunes, overall and leaf by leaf (host-side, not for ``jit``).

    Args:
      mask: a boolean pytree; ``True`` keeps a weight.
      prunable: which weights count toward the overall figure: ``None`` (the kernels,
        :func:`fisher_optax.is_kernel`), a predicate on ``(path, leaf)``, or a bool pytree (see
        :func:`fisher_optax.select`).

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
    paths, leaves = key_paths(mask), jax.tree.leaves(mask)
    flags = _validate.prunable(prunable, mask)
    total_pruned, total = 0, 0
    per_leaf = {}
    for path, leaf, flag in zip(paths, leaves, flags, strict=True):
        pruned, n_prunable, pruned_prunable = _mask_counts(leaf, flag)
        total_pruned += pruned_prunable
        total += n_prunable
        per_leaf[keystr(path)] = LeafSparsity(
            sparsity=pruned / math.prod(leaf.shape) if math.prod(leaf.shape) else 0.0,
            pruned=pruned,
            size=math.prod(leaf.shape),
            prunable=n_prunable,
        )
    return SparsityReport(
        sparsity=total_pruned / total if total else 0.0,
        pruned=total_pruned,
        prunable=total,
        leaves=per_leaf,
    )
