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

from fisher_optax import _validate, obs
from fisher_optax._tree import check_matching
from fisher_optax._types import Fisher, Mask, Params, Prunable, Sparsity, SparsitySchedule
from fisher_optax.fisher import _fisher_from_state, _has_seen_a_gradient
from fisher_optax.patterns import Pattern, Unstructured, _select_stages
from fisher_optax.schedules import constant_sparsity
from fisher_optax.scores import CRITERIA, Criterion
from fisher_optax.scores import scores as _scores

__all__ = ["PRUNING_METHODS", "KeepPrunedState", "PrunedState", "keep_pruned", "pruned"]

PRUNING_METHODS: dict[str, str] = {
    "one_stage": "one ranking of the prunable weights by the criterion",
    "two_stage": "magnitude first (magnitude_fraction of the target), then the criterion",
}
"""The values of :func:`pruned`'s ``method``: how it combines its criterion with magnitude."""


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
      gradients: with ``criterion=``:class:`fisher_optax.obs.BlockOBS`, the
        :class:`fisher_optax.obs.GradientBufferState` of the last ``num_grads`` gradients;
        else ``None``.
    """

    count: jax.Array
    mask: Mask
    inner_state: optax.OptState
    gradients: obs.GradientBufferState | None = None


def _need_params(params: Any) -> None:
    if params is None:
        raise ValueError(
            "update needs the current params to zero the pruned weights; call "
            "opt.update(grads, state, params)."
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
      TypeError: at construction if ``mask`` is ``None`` or not a pytree of bool arrays; at
        ``init`` if a leaf is not boolean.
      ValueError: at ``init`` if ``mask`` differs from the params in structure or shapes
        (naming the first mismatching path); at ``update`` if ``params`` is not given.

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

    if mask is None or not jax.tree.leaves(mask):
        raise TypeError(
            f"mask must be a pytree of bool arrays shaped like the params (True keeps a "
            f"weight), got {mask!r}. Build one with e.g. fisher_optax.magnitude_mask(params, "
            "0.9); to grow a mask while training use fisher_optax.pruned."
        )

    def init_fn(params: Params) -> KeepPrunedState:
        leaves = _validate.bool_leaves(params, mask)
        return KeepPrunedState(mask=jax.tree.unflatten(jax.tree.structure(params), leaves))

    def update_fn(updates, state, params=None):
        _need_params(params)
        mask_leaves = jax.tree.leaves(state.mask)
        return _masked_updates(updates, params, mask_leaves), state

    return optax.GradientTransformation(init_fn, update_fn)


def _check_schedule(schedule: Callable, steps: list[int]) -> None:
    """Evaluate ``schedule`` eagerly at ``steps``: a bad target fails here, not inside jit."""
    for t in steps:
        value = schedule(jnp.asarray(t, jnp.int32))
        if jnp.ndim(value) != 0:
            raise ValueError(
                f"schedule({t}) must be a scalar sparsity in [0, 1], got shape "
                f"{jnp.shape(value)}. Pass per-leaf targets as sparsity= and let the schedule "
                "give the progress."
            )
        _validate.fraction(value, f"schedule({t})", meaning="the target sparsity at that step")


def _read_fisher(inner_state: Any, params: Params, criterion: Any) -> Fisher:
    """The Fisher read from the inner state, with a message naming the criterion."""
    try:
        return _fisher_from_state(inner_state, params=params, check_count=False)
    except ValueError as err:
        raise ValueError(
            f"criterion={criterion!r} ranks by the Fisher read from the inner optimizer's "
            f"state, which failed: {err}"
        ) from None


def _has_fisher(inner_state: Any, params: Params, criterion: Any) -> bool:
    """Whether the scores read a Fisher: always for the Fisher criteria (which fail here,
    at trace time, without one), when the state holds one for a callable criterion."""
    if criterion in ("fisher", "saliency"):
        _read_fisher(inner_state, params, criterion)
        return True
    if not callable(criterion):
        return False
    try:
        _fisher_from_state(inner_state, params=params, check_count=False)
    except ValueError:
        return False
    return True


def _targets(progress: jax.Array, per_leaf: Any, share: Any, params: Params) -> tuple:
    """``(target, stage-one target)``: scalars, or with per-leaf targets ``per_leaf`` (a list
    from :func:`fisher_optax._validate.sparsity`) pytrees like ``params`` scaled by
    ``progress``; both formed in float32."""
    if per_leaf is None:
        return progress, share * progress
    treedef = jax.tree.structure(params)
    target = jax.tree.unflatten(treedef, [jnp.float32(s) * progress for s in per_leaf])
    return target, jax.tree.map(lambda s: jnp.float32(share) * s, target)


def _grown(pattern: Pattern, stages: list, old: Mask, prunable: Prunable) -> Mask:
    """The pattern's mask after each ``(scores, target)`` of ``stages`` in turn, each stage
    checked and ANDed with the mask before it: masks only grow."""
    if type(pattern) is Unstructured:  # not a subclass, whose select may differ
        # Keeps what old prunes by construction; its stages are the turns of one loop.
        return _select_stages(pattern, stages, prunable=prunable, mask=old)
    for scores, target in stages:
        new = pattern.select(scores, target, prunable=prunable, mask=old)
        ok = jax.tree.structure(new) == jax.tree.structure(old) and all(
            jnp.result_type(n) == jnp.bool_ and jnp.shape(n) == jnp.shape(o)
            for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True)
        )
        if not ok:
            got = jax.tree.map(lambda x: (jnp.result_type(x), jnp.shape(x)), new)
            raise TypeError(
                f"pattern {pattern!r} must return a bool mask shaped like the params (the tree "
                f"of mask=) from its select, got {got}."
            )
        # Built-in patterns keep what old prunes; the AND holds any other pattern to the rule.
        old = jax.tree.map(jnp.logical_and, new, old)
    return old


def _zero_pruned(inner: Any, grads: Any, inner_state: Any, mask: Mask) -> tuple[Any, Any]:
    """Gradients and every parameter-shaped leaf of the inner state zeroed where ``mask``
    prunes. Masked-out subtrees (optax.masked, partition, multi_transform) hold MaskedNode
    where the mask holds arrays: they stay as they are."""
    zero = lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype))
    skip = lambda x: isinstance(x, optax.MaskedNode)
    inner_state = otu.tree_map_params(
        inner, lambda x, m: x if skip(x) else zero(x, m), inner_state, mask, is_leaf=skip
    )
    return jax.tree.map(zero, grads, mask), inner_state


def pruned(
    inner: optax.GradientTransformation,
    schedule: SparsitySchedule | float,
    *,
    criterion: Criterion | obs.BlockOBS = "fisher",
    method: Literal["one_stage", "two_stage"] = "two_stage",
    magnitude_fraction: float = 0.5,
    pattern: Pattern = Unstructured(),  # noqa: B008 (a frozen, immutable value)
    sparsity: Sparsity | None = None,
    prunable: Prunable = None,
    update_every: int = 100,
    end_step: int | None = None,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Wrap an optimizer so it prunes while it trains, with masks grown inside ``jit``.

    At every step, with :math:`t` the number of updates done before it:

    1. if :math:`t` is a multiple of ``update_every``, the mask is recomputed at the target
       ``schedule(t)`` from the current weights (the ``params`` passed to ``update``) and,
       for the criteria that read it, the Fisher diagonal read from the inner state (Adam's
       bias-corrected ``nu`` over the gradients seen so far; so those criteria skip the
       updates due before the inner optimizer has seen a gradient, when there is none:
       :math:`t = 0`, and under ``optax.MultiSteps`` the steps before the first
       accumulated one). The mask is ``pattern``'s selection
       (:func:`fisher_optax.select`) over :func:`fisher_optax.scores` of ``criterion``;
       ``method="two_stage"`` first prunes ``magnitude_fraction`` of the target by
       :math:`|w|`, as :func:`fisher_optax.two_stage_mask`. The current mask is passed as
       ``mask=``, so masks only grow. This runs under ``lax.cond``: no host round trip, no
       recompilation, no selection cost on the other steps;
    2. the gradients and the inner moments (every parameter-shaped leaf of the inner state:
       ``mu``, ``nu``, ...) are zeroed where the mask prunes, and the inner optimizer
       updates. Moments of pruned weights therefore stay exactly zero, and the Fisher read
       later is zero there;
    3. the updates of pruned weights become minus the weight, so pruned weights are exactly
       zero after ``optax.apply_updates`` (as :func:`keep_pruned`). So ``pruned`` goes last
       in a chain: a transform after it (a learning rate, weight decay) would rescale the
       ``-w``; put such transforms inside it, ``pruned(optax.chain(...), ...)``.

    The Fisher is read with ``b2 = 0.999`` (optax's default) unless the inner optimizer
    injects its ``b2`` (``optax.inject_hyperparams(optax.adam)(..., b2=0.95)``): with
    another ``b2`` given plainly, the ranking within one Adam is unchanged but the values
    (and the ranking across groups of a ``partition`` with different ``b2``) are not.

    Per-leaf targets: with ``sparsity`` given (a pytree of per-leaf fractions, a mapping,
    e.g. from :func:`fisher_optax.erk_sparsity`), the schedule gives the *progress*: leaf
    :math:`l` is pruned to ``sparsity[l] * schedule(t)`` (formed in float32), so one
    schedule ending at 1 drives all targets together, and each leaf is ranked on its own.
    Without it, ``schedule(t)`` is the target itself, in the units of ``pattern``: a
    schedule from 0 to 0.5 with ``pattern=NM(2, 4)`` goes from dense to 2:4.

    The schedule is a plain callable, checked at ``init`` at the steps :func:`pruned` knows:
    0, ``update_every`` and ``end_step`` when given, so a target outside ``[0, 1]`` or NaN
    at those steps raises there; under ``jit`` the library's rule holds for any other step
    (clipped to ``[0, 1]``, NaN prunes nothing). Pass the schedule's last step as
    ``end_step`` to have its final target checked, for a library schedule and an
    ``optax`` one alike.

    Args:
      inner: the optimizer to wrap. The criteria ``"fisher"`` and ``"saliency"`` need an
        EMA of squared gradients in its state (adam, adamw, nadam, radam, lamb, amsgrad,
        schedule_free_adamw, or a chain with :func:`fisher_optax.fisher_tracker`).
      schedule: a callable from the step count to the target sparsity (e.g.
        :func:`fisher_optax.polynomial_sparsity`, or an ``optax`` schedule), or a float for
        a constant target from step 0.
      criterion: a key of :data:`fisher_optax.CRITERIA` or a callable
        ``(params, fisher) -> scores`` (it gets the Fisher read from ``inner`` when there is
        one, else ``None``; when there is one it skips the updates the Fisher criteria
        skip), or a :class:`fisher_optax.obs.BlockOBS`: block Optimal Brain Surgeon from
        the last gradients, which also moves the surviving weights at each mask update
        (needs no Fisher in ``inner``; its buffer is :attr:`PrunedState.gradients`).
      method: a key of :data:`PRUNING_METHODS`: ``"one_stage"`` or ``"two_stage"``.
      magnitude_fraction: for ``"two_stage"``, the share of the target removed by
        magnitude first, in ``[0, 1]``. ``0`` is pure criterion pruning, ``1`` pure
        magnitude.
      pattern: the selection pattern (:class:`fisher_optax.Unstructured`, default global;
        :class:`fisher_optax.NM`; :class:`fisher_optax.Blocks`; or any
        :class:`fisher_optax.Pattern`). It runs for both stages of ``"two_stage"`` (first on
        :math:`|w|`), inside ``jit`` and ``lax.cond``, with a traced float32 target; its
        result is ANDed with the current mask, and one that is not a bool tree shaped like
        the params is a ``TypeError``.
      sparsity: optional per-leaf final targets (a pytree of scalars shaped like the
        params, or a mapping ``{path or predicate: fraction}``; see
        :func:`fisher_optax.select`), checked at ``init``.
      prunable: which weights may be pruned, as in :func:`fisher_optax.select`.
      update_every: recompute the mask every this many steps (at steps 0, ``update_every``,
        ``2 * update_every``, ...; the Fisher criteria skip those before the inner
        optimizer's first gradient).
      end_step: optional step (an int ``>= 0``) at which the schedule reaches its final
        target, e.g. the ``end_step`` given to :func:`fisher_optax.polynomial_sparsity`;
        the schedule is checked there at ``init``.
      key: a ``jax.random`` key, required by ``criterion="random"`` (folded with the step
        count at each mask update) and refused otherwise.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`PrunedState`
      and whose ``update`` needs ``params``; extra keyword arguments go to ``inner``.
      Works under ``jit``, eagerly, and under ``flax.nnx.Optimizer``.

    Raises:
      ValueError: if ``method`` or ``criterion`` is unknown, ``magnitude_fraction`` is
        outside ``[0, 1]``, ``end_step`` is negative, ``key`` is missing for ``"random"``
        or given for another criterion; at ``init`` if the schedule gives a target outside
        ``[0, 1]`` or NaN at a step it is checked at, ``sparsity`` does not match the
        params, or a Fisher criterion wraps an optimizer without a second moment; at
        ``update`` if ``params`` is not given.
      TypeError: if ``update_every`` or ``end_step`` is not an int, ``pattern`` is not a
        pattern, or ``criterion`` or ``prunable`` is a callable of the wrong arity; at
        ``update`` if the pattern returns something other than a bool mask like the params.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fisher_optax as fo
      >>> params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
      >>> opt = fo.pruned(
      ...     optax.adam(1e-2),
      ...     fo.polynomial_sparsity(0.5, begin_step=0, end_step=4),
      ...     update_every=2,
      ...     end_step=4,
      ... )
      >>> state = opt.init(params)
      >>> step = jax.jit(lambda p, s: opt.update(jax.tree.map(jnp.ones_like, p), s, p))
      >>> for _ in range(6):
      ...     updates, state = step(params, state)
      ...     params = optax.apply_updates(params, updates)
      >>> int((params["w"] == 0).sum()), int((~state.mask["w"]).sum())
      (4, 4)
      >>> nm = fo.pruned(optax.adam(1e-2), 0.5, criterion="magnitude", pattern=fo.NM(2, 4))

    References:
      Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using
      Information Theory. ISVLSI 2016. https://arxiv.org/abs/1605.04859

      Zhu, Gupta. To prune, or not to prune: exploring the efficacy of pruning for model
      compression. 2017. https://arxiv.org/abs/1710.01878
    """
    method = _validate.choice(method, "method", PRUNING_METHODS)
    surgeon = criterion if isinstance(criterion, obs.BlockOBS) else None
    if callable(criterion):
        _validate.callable_arity(criterion, "criterion", "criterion(params, fisher)", 2)
    elif surgeon is None:
        criterion = _validate.choice(criterion, "criterion", CRITERIA)
    pattern = _validate.pattern(pattern)
    share = _validate.fraction(
        magnitude_fraction,
        "magnitude_fraction",
        meaning="the share of the target sparsity removed by magnitude in stage one",
    )
    update_every = _validate.integer(update_every, "update_every", minimum=1)
    checked_steps = {0, update_every}
    if end_step is not None:
        checked_steps.add(_validate.integer(end_step, "end_step", minimum=0))
    if criterion == "random":
        if key is None:
            raise ValueError("criterion='random' needs key=jax.random.key(seed).")
        key = _validate.key(key)
    elif key is not None:
        raise ValueError(
            f"key is only used by criterion='random', not {criterion!r}; drop key= or pick "
            "criterion='random'."
        )
    if callable(prunable):
        _validate.callable_arity(prunable, "prunable", "prunable(path, leaf)", 2)
    if not callable(schedule):
        schedule = constant_sparsity(schedule)
    inner = optax.with_extra_args_support(inner)

    def per_leaf_targets(params):
        return None if sparsity is None else _validate.sparsity(sparsity, params)

    def init_fn(params: Params) -> PrunedState:
        _validate.arrays_only(params)  # before the inner init meets a non-array leaf
        inner_state = inner.init(params)
        _has_fisher(inner_state, params, criterion)
        _check_schedule(schedule, sorted(checked_steps))
        per_leaf_targets(params)
        return PrunedState(
            count=jnp.zeros([], jnp.int32),
            mask=jax.tree.map(lambda p: jnp.ones_like(p, dtype=bool), params),  # p's layout
            inner_state=inner_state,
            gradients=None if surgeon is None else obs._buffer_init(params, surgeon.num_grads),
        )

    def new_mask(params, inner_state, old, count, with_fisher, finv=None):
        progress = jnp.asarray(schedule(count), jnp.float32)
        target, stage1 = _targets(progress, per_leaf_targets(params), share, params)
        fisher = _read_fisher(inner_state, params, criterion) if with_fisher else None
        sub = jax.random.fold_in(key, count) if criterion == "random" else None
        if finv is None:
            score_tree = _scores(params, criterion, fisher=fisher, key=sub)
        else:
            score_tree = obs.obs_scores(params, finv)
        stages = [(score_tree, target)]
        if method == "two_stage":
            stages.insert(0, (_scores(params, "magnitude"), stage1))
        return _grown(pattern, stages, old, prunable)

    def update_fn(updates, state, params=None, **extra_args):
        _need_params(params)
        mask_treedef = jax.tree.structure(state.mask)
        old_leaves = jax.tree.leaves(state.mask)
        u_leaves, treedef = jax.tree.flatten(updates)
        if len(old_leaves) != len(u_leaves):
            check_matching(updates, state.mask, ref_name="updates", other_name="state.mask")
        count = state.count
        due = count % update_every == 0
        # Decided from the state's structure, at trace time: no hidden state in the closure.
        with_fisher = _has_fisher(state.inner_state, params, criterion)
        if with_fisher:  # no Fisher before the inner optimizer has seen a gradient
            due = due & (count > 0) & _has_seen_a_gradient(state.inner_state)

        # BlockOBS: this step's gradients join the buffer; at a mask update the selection
        # ranks by the OBS saliency and the block update of the survivors joins the updates.
        gradients = state.gradients
        if surgeon is not None:
            gradients = obs._buffer_write(gradients, updates)

        def recompute(_):
            old = jax.tree.unflatten(treedef, old_leaves)
            if surgeon is None:
                mask = new_mask(params, state.inner_state, old, count, with_fisher)
                return jax.tree.leaves(mask), None
            finv = obs.buffer_fisher_inverse(
                gradients, block_size=surgeon.block_size, damping=surgeon.damping
            )
            mask = new_mask(params, state.inner_state, old, count, with_fisher, finv)
            return jax.tree.leaves(mask), obs._surgeon_shift(params, finv, mask)

        def hold(_):
            still = None if surgeon is None else [jnp.zeros(jnp.shape(p)) for p in p_leaves]
            return list(old_leaves), still

        # The selection runs only on update steps. It reads only params and the stored state,
        # so the masking below fuses into the inner update: between updates the overhead is
        # one boolean read per weight, not extra passes over the moments. Called eagerly
        # (concrete count), a Python branch replaces lax.cond, whose branches would be traced
        # and compiled anew at every step; the masks are the same (float32 targets both ways).
        p_leaves = jax.tree.leaves(params)
        if _validate.is_concrete(due):
            mask_leaves, shift = recompute(None) if bool(due) else hold(None)
        else:
            mask_leaves, shift = jax.lax.cond(due, recompute, hold, None)
        mask = jax.tree.unflatten(treedef, mask_leaves)
        grads, inner_state = _zero_pruned(inner, updates, state.inner_state, mask)
        inner_updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
        if shift is not None:
            inner_updates = jax.tree.unflatten(
                treedef,
                [
                    u + d.astype(u.dtype)
                    for u, d in zip(jax.tree.leaves(inner_updates), shift, strict=True)
                ],
            )
        return _masked_updates(inner_updates, params, mask_leaves), PrunedState(
            count=optax.safe_increment(count),
            mask=jax.tree.unflatten(mask_treedef, mask_leaves),
            inner_state=inner_state,
            gradients=gradients,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
