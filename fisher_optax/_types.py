"""Type aliases shared across fisher_optax.

Trees are ``Any`` to the type checker: a pytree may be a dict, a list, a Flax ``nnx.State``
or any registered node. The aliases say what a tree holds.
"""

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import jax

__all__ = ["Fisher", "Mask", "Params", "Prunable", "Scores", "Sparsity", "SparsitySchedule"]

Array: TypeAlias = jax.Array

Params: TypeAlias = Any
"""A pytree of parameter arrays (a dict, a Flax ``nnx.State``, ...)."""

Mask: TypeAlias = Any
"""A pytree of boolean arrays shaped like the parameters; ``True`` keeps a weight."""

Fisher: TypeAlias = Any
"""A pytree of non-negative arrays shaped like the parameters (a Fisher diagonal)."""

Scores: TypeAlias = Any
"""A pytree of importance scores shaped like the parameters; larger is more important."""

Bits: TypeAlias = Any
"""A pytree of integer bit widths shaped like the parameters; 0 marks a pruned weight."""

KeyPath: TypeAlias = tuple[Any, ...]
"""A leaf's ``jax.tree_util`` key path, without Flax's ``.value`` hop."""

LeafPredicate: TypeAlias = Callable[[KeyPath, jax.Array], bool]
"""``predicate(path, leaf) -> bool``: selects leaves by their path and value."""

Prunable: TypeAlias = Callable[[KeyPath, jax.Array], bool | jax.Array] | Mapping | Any | None
"""Which weights may be pruned: ``None`` (the kernels, :func:`fisher_optax.is_kernel`), a
predicate ``(path, leaf)`` returning a bool or a bool array shaped like the leaf, a pytree
like the params of those, or a mapping ``{path string or LeafPredicate: flag}``."""

Sparsity: TypeAlias = float | jax.Array | Mapping[str | LeafPredicate, float] | Any
"""One fraction in ``[0, 1]``, a pytree of per-leaf fractions shaped like the params (one
scalar per leaf), or a mapping ``{path string or LeafPredicate: fraction}``."""

SparsitySchedule: TypeAlias = Callable[[jax.typing.ArrayLike], jax.Array]
"""A function from the step count to the target sparsity in ``[0, 1]`` (a float32 scalar)."""
