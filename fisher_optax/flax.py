"""Flax integration: NNX and Linen models. The only module that imports Flax."""

from typing import Any

import jax
from flax import nnx

__all__ = ["opt_variables_to_params"]


def opt_variables_to_params(tree: Any) -> Any:
    """Rewrap the ``OptVariable`` leaves of an ``nnx.Optimizer`` state tree as ``nnx.Param``.

    The result lines up, node for node, with ``nnx.state(model, nnx.Param)``.

    Args:
      tree: a tree such as ``optimizer.opt_state[0].nu``.

    Returns:
      The same tree with every ``nnx.training.optimizer.OptVariable`` replaced by an
      ``nnx.Param`` holding the same array.
    """

    def rewrap(x):
        return nnx.Param(x.value) if isinstance(x, nnx.training.optimizer.OptVariable) else x

    return jax.tree.map(
        rewrap, tree, is_leaf=lambda x: isinstance(x, nnx.training.optimizer.OptVariable)
    )
