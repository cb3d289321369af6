"""Structured pruning without a framework: unit scores, unit masks, optimizer-state slicing.

A *unit* is one output feature of a layer: a column of a Dense kernel ``(in, out)`` or an
output channel of a Conv kernel ``(*window, in, out)``; its incoming weights are
``kernel[..., j]``. Dropping unit ``j`` means zeroing its incoming weights. Its output is then
the constant ``act(bias[j])``, which the next layer can absorb into its own bias, so the unit
can be removed physically with no change to what the network computes: that is surgery,
:mod:`fisher_optax.surgery` on arrays and :mod:`fisher_optax.flax` on Flax models.

This module works on any pytree of parameters (a Linen ``{'params': ...}`` dict, a Flax
``nnx.State``, a plain dict). Unit scores and unit masks are pytrees shaped like the
parameters in which every kernel leaf holds one value per unit (shape ``(out,)``) and every
other leaf is ``None``. Paths are written as :func:`fisher_optax._tree.keystr` writes them
(``"['dense']['kernel']"``), in messages and in the kept-index maps of surgery.
"""

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fisher_optax import _validate
from fisher_optax._tree import check_matching, is_kernel, keystr, strip_value
from fisher_optax._types import Fisher, Mask, Params, Scores
from fisher_optax.scores import Criterion
from fisher_optax.scores import scores as weight_scores

__all__ = [
    "expand_unit_mask",
    "slice_opt_state",
    "unit_mask",
    "unit_scores",
]

Index = dict[str, tuple[np.ndarray | None, ...]]
"""Kept indices of a surgery: for each parameter path (as :func:`fisher_optax._tree.keystr`
writes it), one index array per axis (``None`` keeps the whole axis)."""


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _flat(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
    return [(keystr(p), leaf) for p, leaf in flat]


def _resolve_prunable(
    params: Any, prunable: Any, default: Callable[[Any, Any], bool]
) -> list[bool]:
    """One flag per leaf of ``params``: ``None`` (default rule), a predicate on
    ``(path, leaf)`` with ``path`` the jax key path (``.value`` hop left out, as
    :func:`fisher_optax.topk_mask` passes it), or a pytree of bools."""
    if prunable is None:
        flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)
        return [bool(default(path, leaf)) for path, leaf in flat]
    if callable(prunable):
        _validate.callable_arity(prunable, "prunable", "prunable(path, leaf) -> bool", 2)
        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        return [bool(prunable(strip_value(p), leaf)) for p, leaf in flat]
    flags = check_matching(
        jax.tree.map(lambda _: True, params), prunable, ref_name="params", other_name="prunable"
    )
    return [bool(f) for f in flags]


# --------------------------------------------------------------------------------------------
# Scores and masks


def unit_scores(
    params: Params,
    criterion: Criterion = "saliency",
    *,
    fisher: Fisher | None = None,
    key: jax.Array | None = None,
    prunable: Any = None,
) -> Scores:
    r"""Importance of each output unit: its per-weight scores summed over its incoming weights.

    For a kernel :math:`W` with units along the last axis (Dense ``(in, out)``, Conv
    ``(*window, in, out)``) and the per-weight scores :math:`s_{ij}` of
    :func:`fisher_optax.scores` under ``criterion``, unit :math:`j` scores

    .. math::
      S_j = \sum_{i} s_{ij}, \qquad s_{ij} = \begin{cases}
        \tfrac12 F_{ij} W_{ij}^2 & \text{criterion="saliency"} \\
        F_{ij} & \text{criterion="fisher"} \\
        |W_{ij}| & \text{criterion="magnitude"} \\
        u_{ij} \sim U[0, 1) & \text{criterion="random"} \\
        \text{criterion}(W, F)_{ij} & \text{a callable}
      \end{cases}

    where :math:`i` runs over every other axis. ``"saliency"`` is the optimal-brain-damage
    estimate of the loss increase when the unit's incoming weights are zeroed, with the
    Fisher in place of the Hessian diagonal (LeCun et al. 1989; Theis et al. 2018), summed
    over the unit: it ignores the off-diagonal terms between the unit's weights, so it is an
    approximation. The unit's bias is not scored: dropping a unit keeps its constant output
    ``act(bias)``, which surgery folds into the next layer. ``"magnitude"`` is the L1 norm of
    the filter (Li et al. 2017). With a Fisher read from Adam (:func:`fisher_from_state`),
    absolute saliencies depend on the batch size (see there); rankings do not.

    Args:
      params: a pytree of parameters (Linen dict, ``nnx.State``, ...). Score weights that
        an unstructured mask already pruned as zeros: pass ``apply_mask(params, mask)``.
      criterion: a key of :data:`fisher_optax.CRITERIA` or a callable
        ``criterion(params, fisher) -> scores`` (see :func:`fisher_optax.scores`).
      fisher: the Fisher diagonal, shaped like ``params``; needed by ``"saliency"`` and
        ``"fisher"``. Negative or non-finite values are errors.
      key: a ``jax.random`` key, for ``"random"`` only.
      prunable: which leaves are unit-bearing kernels: ``None`` for the kernels
        (:func:`fisher_optax.is_kernel`), a predicate ``prunable(path, leaf) -> bool`` (``path`` a
        jax key path tuple, as :func:`fisher_optax.topk_mask` passes it;
        ``jax.tree_util.keystr(path)`` reads ``"['dense']['kernel']"``) or a pytree with a bool per
        leaf of ``params``.

    Returns:
      A pytree with the structure of ``params``: each kernel leaf holds a float32 ``(out,)``
      vector of unit scores, every other leaf is ``None``.

    Raises:
      ValueError: for an unknown criterion, a missing Fisher or key, a Fisher that does not
        match ``params`` (naming the first mismatching path) or holds negative or
        non-finite values, non-finite weights, or a selected leaf with ``ndim < 2``.
      TypeError: if ``prunable`` or a callable ``criterion`` takes the wrong arguments.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"dense": {"kernel": jnp.array([[1.0, 2.0], [3.0, 0.0]]),
      ...                     "bias": jnp.zeros(2)}}
      >>> fisher = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> scores = fisher_optax.unit_scores(params, fisher=fisher)
      >>> scores["dense"]["kernel"], scores["dense"]["bias"]
      (Array([5., 2.], dtype=float32), None)

    References:
      LeCun, Denker, Solla. Optimal Brain Damage. NeurIPS 1989.

      Theis, Korshunova, Tejani, Huszár. Faster gaze prediction with dense networks and
      Fisher pruning. 2018. https://arxiv.org/abs/1801.05787

      Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient ConvNets. ICLR 2017.
      https://arxiv.org/abs/1608.08710
    """
    flags = _resolve_prunable(params, prunable, is_kernel)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    for (path, w), flag in zip(flat, flags, strict=True):
        if flag and jnp.ndim(w) < 2:
            raise ValueError(
                f"prunable selects the leaf at {keystr(path)} of shape {jnp.shape(w)}; units "
                "are the last axis of a kernel with ndim >= 2. Leave it out with prunable=."
            )
    per_weight = jax.tree.leaves(weight_scores(params, criterion, fisher=fisher, key=key))
    out = [
        jnp.sum(jnp.asarray(s, jnp.float32), axis=tuple(range(jnp.ndim(s) - 1))) if flag else None
        for s, flag in zip(per_weight, flags, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


_UNIT_SCOPES: dict[str, str] = {
    "layer": "each layer loses that share of its units",
    "global": "one ranking across layers",
}


def unit_mask(
    scores: Scores,
    sparsity: float | jax.Array,
    *,
    scope: Literal["layer", "global"] = "layer",
    prunable: Any = None,
    mask: Mask | None = None,
    min_units: int = 1,
) -> Mask:
    """Choose the units to drop: the ``sparsity`` fraction of units with the lowest scores.

    The selection is :func:`fisher_optax.topk_mask` applied to the unit scores, with its
    semantics: exactly ``round(sparsity * n)`` units are dropped among the ``n`` prunable
    units in scope (per layer with ``scope="layer"``), ties break as ``topk_mask`` breaks
    them, and units that ``mask`` already dropped stay dropped and count toward the target.
    On top of that every prunable layer keeps its ``min_units`` best units, so that global
    selection cannot empty a layer (which would cut the network in two).

    Leave the model's output layer out (its units are the model's outputs): with
    :func:`fisher_optax.flax.prunable_units` for an ``nnx`` model, or ``prunable=``.

    Args:
      scores: unit scores, from :func:`unit_scores` (``(out,)`` vectors, ``None``
        elsewhere).
      sparsity: the fraction of prunable units to drop, in ``[0, 1]`` (under ``jit``, the
        rule of :func:`fisher_optax.topk_mask`).
      scope: ``"layer"`` (each layer loses ``sparsity`` of its units) or ``"global"`` (one
        ranking across layers; compare scores across layers only where they share a scale,
        as OBD saliencies do).
      prunable: which layers may lose units: ``None`` for every scored layer, a predicate
        ``prunable(path, scores_leaf) -> bool`` (a jax key path, as for :func:`unit_scores`),
        or a pytree with a bool per leaf of ``scores``.
      mask: an earlier unit mask (True keeps); what it dropped stays dropped.
      min_units: units each prunable layer keeps at least.

    Returns:
      A unit mask: the structure of ``scores``, a boolean ``(out,)`` vector (True keeps the
      unit) at each scored leaf, ``None`` elsewhere.

    Raises:
      ValueError: if a score leaf is not a vector, ``sparsity`` is outside ``[0, 1]``, or
        ``min_units`` makes the target unreachable.
      TypeError: if ``min_units`` is not an int or ``prunable`` takes the wrong arguments.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> scores = {"a": {"kernel": jnp.array([3.0, 1.0, 2.0, 0.5])}, "b": {"bias": None}}
      >>> fisher_optax.unit_mask(scores, 0.5)["a"]["kernel"]
      Array([ True, False,  True, False], dtype=bool)
    """
    from fisher_optax.masks import topk_mask

    _validate.choice(scope, "scope", _UNIT_SCOPES)
    sparsity = _validate.fraction(sparsity, "sparsity", meaning="the fraction of units to drop")
    concrete = _validate.is_concrete(sparsity)
    min_units = _validate.integer(min_units, "min_units", minimum=0)
    flat, treedef = jax.tree_util.tree_flatten_with_path(scores)
    for path, s in flat:
        if jnp.ndim(s) != 1:
            raise ValueError(
                f"scores at {keystr(path)} have shape {jnp.shape(s)}; "
                "expected one score per unit, a vector, as unit_scores returns."
            )
    flags = _resolve_prunable(scores, prunable, lambda _p, _x: True)
    earlier = (
        [None] * len(flat)
        if mask is None
        else check_matching(scores, mask, ref_name="scores", other_name="mask")
    )
    # Protect each layer's best ``min_units`` units (among those still kept) by lifting
    # their scores to the top, so that no selection can take them.
    top = jnp.finfo(jnp.float32).max
    protected, n_total, n_protected = [], 0, 0
    for (path, s), flag, kept in zip(flat, flags, earlier, strict=True):
        s = jnp.asarray(s, jnp.float32)
        if flag and min_units > 0:
            k = min(int(min_units), s.shape[0])
            rank = s if kept is None else jnp.where(kept, s, -jnp.inf)
            best = jnp.argsort(-rank, stable=True)[:k]  # a vector per layer: cheap to sort
            s = s.at[best].set(top)
            n = s.shape[0]
            n_total, n_protected = n_total + n, n_protected + k
            if concrete and scope == "layer" and round(float(sparsity) * n) > n - k:
                raise ValueError(
                    f"sparsity={sparsity}: dropping that share of the {n} units at "
                    f"{keystr(path)} leaves fewer than min_units={min_units}; "
                    "lower sparsity or min_units."
                )
        protected.append(s)
    if concrete and scope == "global" and round(float(sparsity) * n_total) > n_total - n_protected:
        raise ValueError(
            f"sparsity={sparsity}: dropping that share of {n_total} units globally leaves a "
            f"layer with fewer than min_units={min_units}; lower sparsity or min_units."
        )
    protected_tree = jax.tree.unflatten(treedef, protected)
    prunable_tree = jax.tree.unflatten(treedef, flags)
    return topk_mask(protected_tree, sparsity, scope=scope, prunable=prunable_tree, mask=mask)


def expand_unit_mask(params: Params, unit_mask: Mask, *, bias: bool = False) -> Mask:
    """A weight mask, shaped like ``params``, that zeroes the incoming weights of dropped units.

    Use it with :func:`fisher_optax.apply_mask` to get the *masked* model that surgery
    reproduces exactly, or with :func:`fisher_optax.keep_pruned` to fine-tune with whole
    units held at zero.

    Args:
      params: the parameters.
      unit_mask: a unit mask from :func:`unit_mask` (``(out,)`` booleans at kernel leaves,
        ``None`` elsewhere).
      bias: also zero the dropped units' biases (the sibling leaf named ``bias``). Then a
        dropped unit outputs ``act(0)``, which is 0 for relu, gelu, silu, tanh and the
        identity, so surgery has nothing to fold into the next layer; this is what lets a
        Conv feeding a zero-padded Conv lose channels exactly.

    Returns:
      A boolean pytree shaped like ``params`` (True keeps a weight).

    Raises:
      ValueError: if ``unit_mask`` does not line up with ``params``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    units = kernel_units(params, unit_mask)
    bias_of = {}
    if bias:
        for kpath, keep in units.items():
            bias_of[_sibling(kpath, "bias")] = keep
    # Concrete masks are built in NumPy: eager jnp would compile a kernel per leaf shape.
    xp = jnp if any(isinstance(k, jax.core.Tracer) for k in units.values()) else np
    out = []
    for path, leaf in flat:
        p = keystr(path)
        shape = jnp.shape(leaf)
        if p in units:
            m = xp.broadcast_to(xp.asarray(units[p], bool), shape)
        elif p in bias_of and shape == jnp.shape(bias_of[p]):
            m = xp.asarray(bias_of[p], bool)
        else:
            m = xp.ones(shape, bool)
        out.append(m if xp is jnp else jax.device_put(m))  # jnp.asarray compiles per shape
    return jax.tree.unflatten(treedef, out)


def _sibling(kernel_path: str, name: str) -> str:
    """The path of the leaf ``name`` next to a kernel: ``"['fc']['kernel']"`` gives
    ``"['fc']['bias']"``."""
    return kernel_path[: -len("['kernel']")] + f"[{name!r}]"


def kernel_units(params: Params, unit_mask: Mask) -> dict[str, Any]:
    """``{kernel path: (out,) bool}`` from a unit mask, checked against ``params``.

    Paths are written as :func:`fisher_optax._tree.keystr` writes them. Used by surgery to
    read a unit mask; raises ``ValueError`` naming the first leaf that does not line up.
    """
    shapes = {p: jnp.shape(leaf) for p, leaf in _flat(params)}
    units = {}
    for p, keep in _flat(unit_mask):
        if p not in shapes:
            raise ValueError(
                f"the unit mask has a leaf at {p}, which the parameters lack; build the unit "
                "mask from these parameters (unit_scores, unit_mask)."
            )
        shape = shapes[p]
        if len(shape) < 2 or jnp.shape(keep) != shape[-1:]:
            raise ValueError(
                f"the unit mask at {p} has shape {jnp.shape(keep)}, but the parameter there "
                f"has shape {shape}: a unit mask holds one boolean per output unit of a "
                f"kernel, shape {shape[-1:] if len(shape) >= 2 else '(out,)'}. Pass a unit "
                "mask from unit_mask(...), not a weight mask."
            )
        if jnp.result_type(keep) != jnp.bool_:
            raise TypeError(
                f"the unit mask at {p} has dtype {jnp.result_type(keep)}; a mask holds "
                "booleans (True keeps a unit). Convert it with .astype(bool) if it holds 0/1."
            )
        units[p] = keep
    return units


# --------------------------------------------------------------------------------------------
# Optimizer state after surgery


def take_index(x: Any, index: tuple[np.ndarray | None, ...] | None) -> Any:
    """``x`` with, on each axis, only the entries ``index`` keeps."""
    if index is None or _is_masked(x):
        return x
    for axis, ind in enumerate(index):
        if ind is not None:
            x = jnp.take(x, jnp.asarray(ind, jnp.int32), axis=axis)
    return x


def _index_key(path: str | tuple) -> str:
    """An index key as ``keystr`` writes it; a tuple of plain keys (``('fc', 'kernel')``,
    as :mod:`fisher_optax.depgraph` writes them) is accepted and converted."""
    if isinstance(path, str):
        return path
    return keystr(tuple(jax.tree_util.DictKey(k) for k in path))


def slice_opt_state(opt_state: Any, params: Params, index: Index) -> Any:
    """Cut an optax state down to the shapes of the parameters after surgery.

    Every subtree of ``opt_state`` that lines up with ``params`` (the same leaf paths and
    shapes; ``optax.MaskedNode`` counts as a match) is a per-parameter quantity, such as
    Adam's ``mu`` and ``nu``, ``amsgrad``'s ``nu_max``, or the mask of
    :func:`fisher_optax.pruned`; its leaves are sliced with ``index``. Everything else
    (``count``, hyperparameters, empty states) is kept as it is, so fine-tuning continues
    with the same moments and the same bias-correction step. The moments of kept entries
    are exact copies; nothing is re-initialised.

    States that store parameters in another layout (``optax.flatten``'s ravelled vector,
    adafactor's factored moments) are not recognised and are left unchanged; the optimizer
    will then fail on the first update with a shape error.

    Args:
      opt_state: an optax state (for an ``nnx.Optimizer`` use
        :func:`fisher_optax.flax.shrink`, which slices its state).
      params: the parameters *before* surgery, which ``opt_state`` was built for.
      index: the kept indices ``{path: per-axis indices}``, paths as
        :func:`fisher_optax._tree.keystr` writes them (a tuple of plain keys such as
        ``('layers', 0, 'kernel')`` is accepted too), from the ``index`` field of the result
        of :func:`fisher_optax.flax.shrink` or :func:`fisher_optax.flax.shrink_linen`.

    Returns:
      The optax state for the parameters after surgery.

    Raises:
      ValueError: if ``index`` names a path that ``params`` lacks.
    """
    ref = [(p, jnp.shape(leaf)) for p, leaf in _flat(params)]
    ref_paths = {p for p, _ in ref}
    index = {_index_key(p): i for p, i in index.items()}
    for p in index:
        if p not in ref_paths:
            raise ValueError(
                f"the index has an entry for {p}, which params "
                "lacks; pass the params from before the surgery that produced the index."
            )

    def matches(node: Any) -> bool:
        if node is None:
            return False
        flat = _flat(node)
        if len(flat) != len(ref):
            return False
        return all(
            p == rp and (_is_masked(x) or jnp.shape(x) == rs)
            for (p, x), (rp, rs) in zip(flat, ref, strict=True)
        )

    @jax.jit  # one compile per moment tree, not one per leaf (mu and nu share it)
    def take_all(node: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda p, x: take_index(x, index.get(keystr(p))), node, is_leaf=_is_masked
        )

    def slice_subtree(node: Any) -> Any:
        return take_all(node) if matches(node) else node

    return jax.tree.map(slice_subtree, opt_state, is_leaf=matches)
