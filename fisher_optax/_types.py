"""Type aliases shared across fisher_optax."""

from typing import Any, TypeAlias

import jax

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

Array: TypeAlias = jax.Array
