"""Importance scores: the one vocabulary of pruning criteria, used by every mask and transform.

A score tree is shaped like the parameters; larger means more important, and the smallest
scores are pruned first. Masks (:func:`fisher_optax.select`), unit scores
(:func:`fisher_optax.depgraph.group_scores`), :func:`fisher_optax.pruned` and the examples all name
their criterion with a key of :data:`CRITERIA` or pass a callable
``criterion(params, fisher) -> scores``.
"""

import functools
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import jax
import jax.numpy as jnp

from fisher_optax import _validate
from fisher_optax._tree import check_matching
from fisher_optax._types import Fisher, Params, Scores

__all__ = ["CRITERIA", "Criterion", "CriterionName", "saliency", "scores"]

CRITERIA: dict[str, str] = {
    "magnitude": "|w|, the weight's magnitude",
    "fisher": "F, the Fisher diagonal",
    "saliency": "0.5 * F * w**2, optimal brain damage with the Fisher for the Hessian",
    "random": "i.i.d. uniform draws, needs key",
}
"""Each named criterion and what it scores."""

CriterionName: TypeAlias = Literal["magnitude", "fisher", "saliency", "random"]
"""The named criteria (the keys of :data:`CRITERIA`)."""

Criterion: TypeAlias = CriterionName | Callable[[Params, Fisher | None], Scores]
"""A named criterion, or a callable ``criterion(params, fisher) -> scores`` shaped like params."""

_NEEDS_FISHER = ("fisher", "saliency")


@functools.partial(jax.jit, static_argnums=1)
def _uniform_leaves(key: jax.Array, shapes: tuple) -> list[jax.Array]:
    """One uniform stream per leaf, ``fold_in(key, i)``; jitted so eager calls compile once."""
    return [jax.random.uniform(jax.random.fold_in(key, i), s) for i, s in enumerate(shapes)]


def _unflatten_like(params: Params, leaves: list[Any]) -> Scores:
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def _float(x: Any) -> jax.Array:
    """``x`` as an array of at least float32 precision (bf16/f16/int scores lose ties); a
    PRNG key scores 0 (it is never pruned)."""
    if _validate.is_prng_key(x):
        return jnp.zeros(x.shape, jnp.float32)
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def saliency(params: Params, fisher: Fisher) -> Scores:
    r"""Optimal brain damage's saliency with the Fisher diagonal for the Hessian diagonal.

    .. math::
      s = \tfrac12 F w^2

    the second-order estimate of the loss increase when the weight :math:`w` is set to zero
    (the gradient term vanishes at a minimum). Computed in at least float32.

    Args:
      params: a pytree of parameter arrays.
      fisher: a Fisher diagonal with the leaves of ``params`` (paths and shapes), e.g. from
        :func:`fisher_optax.fisher_from_state`.

    Returns:
      A pytree in the structure of ``params``.

    Raises:
      ValueError: if ``fisher`` does not match ``params``, holds a negative or non-finite
        value, or ``params`` holds a non-finite value (concrete values only).
      TypeError: if a leaf is not real.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
      >>> fisher_optax.saliency(params, {"w": jnp.array([2.0, 1.0, 0.0])})["w"]
      Array([1., 2., 0.], dtype=float32)

    References:
      LeCun, Denker, Solla. Optimal Brain Damage. NeurIPS 1989.

      Theis, Korshunova, Tejani, Huszár. Faster gaze prediction with dense networks and
      Fisher pruning. 2018. https://arxiv.org/abs/1801.05787
    """
    _validate.finite(params, "params")
    fleaves = _validate.fisher(params, fisher)
    out = [
        0.5 * _float(f) * jnp.square(_float(w))
        for f, w in zip(fleaves, jax.tree.leaves(params), strict=True)
    ]
    return _unflatten_like(params, out)


def scores(
    params: Params,
    criterion: Criterion,
    *,
    fisher: Fisher | None = None,
    key: jax.Array | None = None,
) -> Scores:
    r"""Importance scores of every weight under ``criterion``; the smallest are pruned first.

    .. math::
      \text{score} = \begin{cases}
        |w| & \text{"magnitude"} \\
        F & \text{"fisher"} \\
        \tfrac12 F w^2 & \text{"saliency"} \\
        u \sim U[0, 1) & \text{"random"} \\
        \text{criterion}(w, F) & \text{a callable}
      \end{cases}

    ``"random"`` draws one stream per leaf, ``jax.random.fold_in(key, i)`` for the ``i``-th
    leaf in flattening order, so the same key gives the same scores for the same shapes.

    Args:
      params: a pytree of parameter arrays.
      criterion: a key of :data:`CRITERIA` or a callable ``criterion(params, fisher)``
        returning a pytree with the leaves of ``params`` (paths and shapes).
      fisher: the Fisher diagonal shaped like ``params``; required by ``"fisher"`` and
        ``"saliency"``, passed to a callable as it is (possibly ``None``), unused otherwise.
      key: a ``jax.random`` key; required by ``"random"`` and refused by the others.

    Returns:
      A pytree in the structure of ``params`` (at least float32, except a callable's own).

    Raises:
      ValueError: if ``criterion`` is unknown, ``fisher`` or ``key`` is missing where
        needed, ``key`` is given where unused, ``fisher`` does not match ``params`` or holds
        a negative or non-finite value, ``params`` hold a non-finite value, or a callable's
        scores do not match ``params``.
      TypeError: if a callable criterion does not take two arguments, or ``key`` is not a
        ``jax.random`` key.

    Examples:
      >>> import jax, jax.numpy as jnp, fisher_optax
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> fisher_optax.scores(params, "magnitude")["w"]
      Array([1., 2.], dtype=float32)
      >>> fisher = {"w": jnp.array([4.0, 0.5])}
      >>> fisher_optax.scores(params, "saliency", fisher=fisher)["w"]
      Array([2., 1.], dtype=float32)
      >>> s = fisher_optax.scores(params, lambda p, f: jax.tree.map(jnp.abs, p))
      >>> s["w"]
      Array([1., 2.], dtype=float32)

    References:
      Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using
      Information Theory. ISVLSI 2016. https://arxiv.org/abs/1605.04859
    """
    if callable(criterion):
        _validate.callable_arity(criterion, "criterion", "criterion(params, fisher)", 2)
        if key is not None:
            raise ValueError(
                "key is only used by criterion='random'; a callable criterion gets "
                "(params, fisher). Drop key=, or close over the key in the callable."
            )
        out = criterion(params, fisher)
        leaves = check_matching(params, out, ref_name="params", other_name="criterion's scores")
        _validate.real_leaves(out, "criterion's scores")
        return _unflatten_like(params, leaves)
    criterion = _validate.choice(criterion, "criterion", CRITERIA)
    if criterion == "random":
        if key is None:
            raise ValueError("criterion='random' needs key=jax.random.key(seed).")
        key = _validate.key(key)
        shapes = tuple(tuple(jnp.shape(x)) for x in jax.tree.leaves(params))
        return _unflatten_like(params, _uniform_leaves(key, shapes))
    if key is not None:
        raise ValueError(
            f"key is only used by criterion='random', not {criterion!r}; drop key= or pick "
            "criterion='random'."
        )
    if criterion in _NEEDS_FISHER and fisher is None:
        raise ValueError(
            f"criterion={criterion!r} needs fisher=, a Fisher diagonal shaped like params "
            "(e.g. fisher_optax.fisher_from_state(opt_state, params=params))."
        )
    if criterion == "saliency":
        return saliency(params, fisher)
    _validate.finite(params, "params")
    if criterion == "magnitude":
        return jax.tree.map(lambda w: jnp.abs(_float(w)), params)
    return _unflatten_like(params, [_float(f) for f in _validate.fisher(params, fisher)])
