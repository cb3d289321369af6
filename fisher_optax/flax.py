"""Flax integration: NNX and Linen models. The only module that imports Flax eagerly.

Masks, Fisher diagonals and quantized weights are pytrees shaped like
``nnx.state(model, nnx.Param)`` (NNX) or like the ``{'params': ...}`` dict (Linen); the
functions here write them back into a model (:func:`update_model`,
:func:`apply_mask_to_model`) and count a model's parameters and FLOPs
(:func:`param_count_and_flops`). Cutting pruned units out of a model physically is
:mod:`fisher_optax.depgraph`.

The Fisher of an ``nnx.Optimizer``: ``fisher_optax.fisher_from_state(optimizer,
params=nnx.state(model, nnx.Param))`` (the optimizer is a pytree whose arrays the core reads
through ``__jax_array__``; ``params=`` puts the result in the model's tree structure).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fisher_optax import _validate
from fisher_optax._tree import keystr, strip_value
from fisher_optax._types import Mask, Params

__all__ = [
    "apply_mask_to_model",
    "opt_variables_to_params",
    "param_count_and_flops",
    "update_model",
]


def opt_variables_to_params(tree: Any) -> Any:
    """Rewrap the ``OptVariable`` leaves of an ``nnx.Optimizer`` state tree as ``nnx.Param``.

    The result lines up, node for node, with ``nnx.state(model, nnx.Param)``; passing
    ``params=`` to :func:`fisher_optax.fisher_from_state` does the same for a Fisher.

    Args:
      tree: a tree such as ``optimizer.opt_state[0].nu``.

    Returns:
      The same tree with every ``nnx.training.optimizer.OptVariable`` replaced by an
      ``nnx.Param`` holding the same array.
    """

    def rewrap(x):
        return nnx.Param(x.get_value()) if isinstance(x, nnx.training.optimizer.OptVariable) else x

    return jax.tree.map(
        rewrap, tree, is_leaf=lambda x: isinstance(x, nnx.training.optimizer.OptVariable)
    )


# --------------------------------------------------------------------------------------------
# Writing weights back


def _plain(path: Sequence[Any]) -> tuple[str, ...]:
    """A key path compared across containers: an ``nnx.State`` (int keys of a Sequential),
    the plain dicts of :func:`fisher_optax.load_compressed` and attribute paths all give the
    same tuple of strings."""
    out = []
    for k in strip_value(path):
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def update_model(model: nnx.Module, tree: Params) -> None:
    """Write ``tree`` into ``model``'s variables, in place; on any error nothing is written.

    ``tree`` is matched to ``nnx.state(model)`` by path and shape. Accepted: an
    ``nnx.State`` (of ``nnx.Param`` or of every variable), the output of
    :func:`fisher_optax.apply_mask` or ``fisher_optax.dequantize`` on it, or the plain nested
    dict that :func:`fisher_optax.load_compressed` gives back (``nnx.Sequential``'s int keys
    as int or str). It must hold every ``nnx.Param`` of the model; other variables (the
    ``BatchStat`` mean and var of a BatchNorm, ...) are written when present and kept when
    absent, so a file that carries them restores a BatchNorm model exactly. Values are cast
    to each variable's dtype. Every leaf is checked before the first write.

    Args:
      model: an ``nnx`` module.
      tree: the values, as above.

    Raises:
      ValueError: naming the first path of ``tree`` the model lacks, the first parameter
        ``tree`` lacks, or the first leaf of another shape.
      TypeError: if ``model`` is not an ``nnx.Module``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import fisher_optax.flax
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
      >>> fisher_optax.flax.update_model(model, zeros)
      >>> model(jnp.ones((1, 2)))
      Array([[0.]], dtype=float32)
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}.")
    full = nnx.state(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(full)
    where = {_plain(p): i for i, (p, _) in enumerate(flat)}
    given = {}
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = _plain(path)
        if key not in where:
            raise ValueError(
                f"tree has a leaf at {keystr(path)}, which the model lacks (its variables: "
                f"{', '.join(keystr(p) for p, _ in flat[:6])}{', ...' if len(flat) > 6 else ''}"
                "). Pass a tree built from nnx.state(model) of this model."
            )
        old = flat[where[key]][1]
        if tuple(jnp.shape(value)) != tuple(jnp.shape(old)):
            raise ValueError(
                f"tree at {keystr(path)} has shape {tuple(jnp.shape(value))} but the model's "
                f"variable there has shape {tuple(jnp.shape(old))}; build the model with the "
                "architecture the tree was saved from (after a cut: the smaller widths)."
            )
        given[where[key]] = value
    params = {
        _plain(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    }
    for p, _ in flat:
        if _plain(p) in params and where[_plain(p)] not in given:
            raise ValueError(
                f"tree has no value for the parameter at {keystr(p)}; pass every nnx.Param "
                "of the model (e.g. a tree built from nnx.state(model, nnx.Param))."
            )
    new = [
        _to_device(given[i], jnp.result_type(old)) if i in given else old
        for i, (_, old) in enumerate(flat)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def apply_mask_to_model(model: nnx.Module, mask: Mask) -> None:
    """Zero the weights that ``mask`` prunes, in the model itself (in place).

    Args:
      model: an ``nnx`` module.
      mask: a boolean pytree shaped like ``nnx.state(model, nnx.Param)`` (True keeps), e.g.
        from :func:`fisher_optax.two_stage_mask` or :func:`fisher_optax.depgraph.weight_mask`.

    Raises:
      ValueError: if the mask does not line up with the model's parameters.
      TypeError: if the mask is not boolean.
    """
    from fisher_optax.masks import apply_mask

    state = nnx.state(model, nnx.Param)
    _validate.bool_leaves(state, mask, "mask", "nnx.state(model, nnx.Param)")
    update_model(model, jax.jit(apply_mask)(state, mask))  # one compile, not one per leaf


def _to_device(x: Any, dtype: Any = None) -> jax.Array:
    """``x`` as a device array. Host data goes through ``jax.device_put``: ``jnp.asarray`` of a
    NumPy array compiles a kernel per shape."""
    if isinstance(x, jax.Array):
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    return jax.device_put(np.asarray(x, dtype=dtype))


# --------------------------------------------------------------------------------------------
# Reports


def param_count_and_flops(
    model: nnx.Module | Callable, example_input: jax.Array, *, params: Params | None = None
) -> tuple[int, float]:
    """Parameter count and FLOPs of one forward pass, as counted by XLA's cost analysis.

    Args:
      model: an ``nnx`` module, or with ``params`` a function ``apply(params, x)`` (Linen's
        ``module.apply``).
      example_input: the input of one call (its batch size sets the FLOPs).
      params: the parameters for ``apply``; ``None`` for an ``nnx`` module.

    Returns:
      ``(number of parameter entries, FLOPs)``. Dense and Conv layers count 2 FLOPs per
      multiply-add; elementwise operations are included. Zeros in a masked kernel still
      count: only a cut (:func:`fisher_optax.depgraph.cut`) removes them.
    """
    if params is None:
        if not isinstance(model, nnx.Module):
            raise TypeError(
                "param_count_and_flops: pass params= with an apply function, or an nnx.Module."
            )
        graphdef, state = nnx.split(model)
        count = sum(
            int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
        )

        def fn(s, x):
            return nnx.merge(graphdef, s)(x)

        args = (state, example_input)
    else:
        count = sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(params))
        fn, args = model, (params, example_input)
    cost = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return count, float(cost.get("flops", float("nan")))
