"""Training with masks: optax transforms that keep pruned weights at zero and prune gradually.

:func:`keep_pruned` enforces a fixed mask at the end of any optax chain. :func:`pruned` wraps
an Adam-family optimizer and grows its own mask during training, from the weights and the
Fisher information read from its own second moment, entirely inside ``jit``.
"""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from fisher_optax import masks as _masks
from fisher_optax._tree import check_matching
from fisher_optax._types import Mask, Params
from fisher_optax.fisher import _fisher_from_state
from fisher_optax.schedules import constant_sparsity

__all__ = ["KeepPrunedState", "PrunedState", "keep_pruned", "pruned"]

_METHODS = ("magnitude", "fisher", "two_stage", "random")


class KeepPrunedState(NamedTuple):
    """State of :func:`keep_pruned`.

    Attributes:
      mask: the boolean mask, shaped like the parameters; ``True`` keeps a weight. Kept in
        the state (not the closure) so that ``jit`` takes it as an argument, and so that a
        new mask can be swapped in with ``state._replace(mask=new_mask)`` without
        recompiling.
    """

    mask: Mask


class PrunedState(NamedTuple):
    """State of :func:`pruned`.

    Attributes:
      count: int32 scalar, the number of updates done; the schedule is evaluated at it.
      mask: the current boolean mask, shaped like the parameters; ``True`` keeps a weight.
        It only grows: a weight once pruned stays pruned.
      inner_state: the state of the wrapped optimizer. Its moments are zero wherever the
        mask prunes.
    """

    count: jax.Array
    mask: Mask
    inner_state: optax.OptState


def _need_params(params: Any, fn: str) -> None:
    if params is None:
        raise ValueError(
            f"{fn}: update needs the current params to zero the pruned weights; call "
            f"opt.update(grads, state, params)."
        )


def _masked_updates(updates: Any, params: Any, mask_leaves: list) -> Any:
    """``where(mask, updates, -params)``: after ``apply_updates`` pruned weights are exactly 0."""
    u_leaves, treedef = jax.tree.flatten(updates)
    p_leaves = jax.tree.leaves(params)
    out = [
        jnp.where(m, u, -p.astype(u.dtype))
        for u, p, m in zip(u_leaves, p_leaves, mask_leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def keep_pruned(mask: Mask) -> optax.GradientTransformation:
    r"""Keep pruned weights at exactly zero: put this at the end of an optax chain.

    Whatever the transforms before it produced (weight decay, momentum carried from before
    pruning, learning-rate schedules), the update of a pruned weight becomes minus the
    weight, so that after ``optax.apply_updates``

    .. math::
      w \leftarrow w + u = \begin{cases} w + u & \text{mask} \\ w - w = 0 & \text{pruned}
      \end{cases}

    exactly (in IEEE arithmetic :math:`w + (-w) = 0`). Pruned weights that are already 0
    get a zero update; nonzero ones are zeroed at the first step.

    Args:
      mask: a boolean pytree shaped like the parameters; ``True`` keeps a weight. Stored in
        :class:`KeepPrunedState`.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

    Raises:
      ValueError: at ``init`` if ``mask`` differs from the params in structure or shapes
        (naming the first mismatching path); at ``update`` if ``params`` is not given.
      TypeError: at ``init`` if ``mask`` is not boolean.

    Examples:
      >>> import jax.numpy as jnp, optax, fisher_optax
      >>> params = {"w": jnp.array([1.0, 2.0, 3.0])}
      >>> mask = {"w": jnp.array([True, False, True])}
      >>> opt = optax.chain(optax.adamw(0.1, weight_decay=0.1), fisher_optax.keep_pruned(mask))
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
      >>> optax.apply_updates(params, updates)["w"][1]
      Array(0., dtype=float32)
    """

    def init_fn(params: Params) -> KeepPrunedState:
        leaves = _masks._mask_leaves(params, mask, "keep_pruned")
        return KeepPrunedState(mask=jax.tree.unflatten(jax.tree.structure(params), leaves))

    def update_fn(updates, state, params=None):
        _need_params(params, "keep_pruned")
        mask_leaves = jax.tree.leaves(state.mask)
        return _masked_updates(updates, params, mask_leaves), state

    return optax.GradientTransformation(init_fn, update_fn)


def pruned(
    inner: optax.GradientTransformation,
    *,
    schedule: Callable[[jax.Array], jax.Array] | float,
    method: Literal["magnitude", "fisher", "two_stage", "random"] = "two_stage",
    magnitude_fraction: float = 0.5,
    criterion: Literal["fisher", "saliency"] = "fisher",
    scope: Literal["global", "layer"] = "global",
    prunable: _masks.Prunable = None,
    update_every: int = 100,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Wrap an optimizer so it prunes while it trains, with masks grown inside ``jit``.

    At every step, with :math:`t` the number of updates done before it:

    1. if :math:`t` is a multiple of ``update_every``, the mask is recomputed at the target
       sparsity ``schedule(t)`` from the current weights (the ``params`` passed to
       ``update``) and, for the Fisher methods, the Fisher diagonal read from the inner
       state (Adam's bias-corrected ``nu`` over the :math:`t` gradients seen so far; so the
       Fisher methods skip :math:`t = 0`, when there is none). The current mask is passed
       as ``mask=``, so masks only grow. This runs under ``lax.cond``: no host round trip,
       no recompilation, no selection cost on the other steps;
    2. the gradients and the inner moments (every parameter-shaped leaf of the inner state:
       ``mu``, ``nu``, ...) are zeroed where the mask prunes, and the inner optimizer
       updates. Moments of pruned weights therefore stay exactly zero, and the Fisher read
       later is zero there;
    3. the updates of pruned weights become minus the weight, so pruned weights are exactly
       zero after ``optax.apply_updates`` (as :func:`keep_pruned`).

    ``method`` picks the ranking: ``"magnitude"`` (:func:`fisher_optax.magnitude_mask`),
    ``"fisher"`` (:func:`fisher_optax.fisher_mask` with ``criterion``), ``"two_stage"``
    (:func:`fisher_optax.two_stage_mask`) or ``"random"``
    (:func:`fisher_optax.random_mask`). For ``"two_stage"``, ``magnitude_fraction`` is the
    share of the current target done by magnitude: at target :math:`s_t` stage one prunes
    ``magnitude_fraction`` :math:`\cdot s_t` of the prunable weights by :math:`|w|`, stage two
    takes the total to :math:`s_t` by the Fisher criterion.

    Args:
      inner: the optimizer to wrap. The Fisher methods need an EMA of squared gradients in
        its state (adam, adamw, nadam, radam, lamb, amsgrad, schedule_free_adamw, or a
        chain with :func:`fisher_optax.fisher_tracker`).
      schedule: a callable from the step count to the target sparsity (e.g.
        :func:`fisher_optax.polynomial_sparsity`), or a float for a constant target from
        step 0.
      method: ``"magnitude"``, ``"fisher"``, ``"two_stage"`` or ``"random"``.
      magnitude_fraction: for ``"two_stage"``, the fraction of the target pruned by
        magnitude, in ``[0, 1]``. ``0`` is pure Fisher pruning, ``1`` pure magnitude.
      criterion: ``"fisher"`` (rank by F) or ``"saliency"`` (0.5 F w^2).
      scope: ``"global"`` or ``"layer"``.
      prunable: ``None`` (leaves with ``ndim >= 2``), a predicate on ``(path, leaf)``, or a
        bool pytree (see :func:`fisher_optax.topk_mask`).
      update_every: recompute the mask every this many steps (at steps 0, ``update_every``,
        ``2 * update_every``, ...; the Fisher methods skip step 0).
      key: a ``jax.random`` key, required by ``method="random"`` (folded with the step
        count at each mask update) and refused by the others.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`PrunedState`
      and whose ``update`` needs ``params``; extra keyword arguments go to ``inner``.

    Raises:
      ValueError: if ``method``, ``criterion`` or ``scope`` is unknown,
        ``magnitude_fraction`` is outside ``[0, 1]``, ``update_every`` is not a positive
        int, ``key`` is missing for ``"random"`` or given for another method; at ``init``
        if a Fisher method wraps an optimizer without a second moment; at ``update`` if
        ``params`` is not given.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fisher_optax
      >>> params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
      >>> opt = fisher_optax.pruned(
      ...     optax.adam(1e-2),
      ...     schedule=fisher_optax.polynomial_sparsity(0.5, begin_step=0, end_step=4),
      ...     update_every=2,
      ... )
      >>> state = opt.init(params)
      >>> step = jax.jit(lambda p, s: opt.update(jax.tree.map(jnp.ones_like, p), s, p))
      >>> for _ in range(6):
      ...     updates, state = step(params, state)
      ...     params = optax.apply_updates(params, updates)
      >>> int((params["w"] == 0).sum()), int((~state.mask["w"]).sum())
      (4, 4)

    References:
      Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using
      Information Theory. ISVLSI 2016. https://arxiv.org/abs/1605.04859

      Zhu, Gupta. To prune, or not to prune: exploring the efficacy of pruning for model
      compression. 2017. https://arxiv.org/abs/1710.01878
    """
    fn = "pruned"
    if method not in _METHODS:
        raise ValueError(
            f"{fn}: method must be one of {', '.join(map(repr, _METHODS))}, got {method!r}."
        )
    _masks._check_criterion(criterion, fn)
    _masks._check_scope(scope, fn)
    magnitude_fraction = _masks._check_sparsity(magnitude_fraction, "magnitude_fraction", fn)
    if isinstance(update_every, bool) or int(update_every) != update_every or update_every < 1:
        raise ValueError(f"{fn}: update_every must be a positive int, got {update_every!r}.")
    update_every = int(update_every)
    if method == "random" and key is None:
        raise ValueError(f"{fn}: method='random' needs key=jax.random.key(seed).")
    if method != "random" and key is not None:
        raise ValueError(
            f"{fn}: key is only used by method='random', not {method!r}; drop key= or pick "
            "method='random'."
        )
    if not callable(schedule):
        schedule = constant_sparsity(schedule)
    uses_fisher = method in ("fisher", "two_stage")
    inner = optax.with_extra_args_support(inner)

    def read_fisher(inner_state, params):
        try:
            return _fisher_from_state(inner_state, params=params, check_count=False)
        except ValueError as err:
            raise ValueError(
                f"{fn}: method={method!r} ranks by the Fisher read from the inner optimizer's "
                f"state, which failed: {err}"
            ) from None

    def init_fn(params: Params) -> PrunedState:
        inner_state = inner.init(params)
        if uses_fisher:
            read_fisher(inner_state, params)  # fail at init, not deep inside a jitted step
        return PrunedState(
            count=jnp.zeros([], jnp.int32),
            mask=jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params),
            inner_state=inner_state,
        )

    def new_mask(params, inner_state, old_mask, count):
        sparsity = schedule(count)
        common = dict(scope=scope, prunable=prunable, mask=old_mask)
        if method == "magnitude":
            return _masks.magnitude_mask(params, sparsity, **common)
        if method == "random":
            return _masks.random_mask(jax.random.fold_in(key, count), params, sparsity, **common)
        fisher = read_fisher(inner_state, params)
        if method == "fisher":
            return _masks.fisher_mask(params, fisher, sparsity, criterion=criterion, **common)
        return _masks.two_stage_mask(
            params,
            fisher,
            sparsity,
            magnitude_sparsity=magnitude_fraction * sparsity,
            criterion=criterion,
            **common,
        )

    def update_fn(updates, state, params=None, **extra_args):
        _need_params(params, fn)
        mask_treedef = jax.tree.structure(state.mask)
        old_leaves = jax.tree.leaves(state.mask)
        u_leaves, treedef = jax.tree.flatten(updates)
        if len(old_leaves) != len(u_leaves):
            check_matching(updates, state.mask, ref_name="updates", other_name="state.mask")
        count = state.count
        due = count % update_every == 0
        if uses_fisher:  # no gradient seen yet at count 0: nothing to read the Fisher from
            due = due & (count > 0)

        def recompute(_):
            old = jax.tree.unflatten(treedef, old_leaves)
            return jax.tree.leaves(new_mask(params, state.inner_state, old, count))

        # The selection runs only on update steps. It reads only params and the stored state,
        # so the masking below fuses into the inner update: between updates the overhead is
        # one boolean read per weight, not extra passes over the moments.
        mask_leaves = jax.lax.cond(due, recompute, lambda _: list(old_leaves), None)
        mask = jax.tree.unflatten(treedef, mask_leaves)
        zero_pruned = lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype))
        grads = jax.tree.map(zero_pruned, updates, mask)
        inner_state = otu.tree_map_params(inner, zero_pruned, state.inner_state, mask)
        inner_updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
        return _masked_updates(inner_updates, params, mask_leaves), PrunedState(
            count=optax.safe_increment(count),
            mask=jax.tree.unflatten(mask_treedef, mask_leaves),
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
