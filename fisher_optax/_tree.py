"""Pytree helpers shared by every module: paths, and structure checks that name the culprit.

Trees are compared by their leaves' key paths and shapes, not by node types, so a Flax
``nnx.State`` of ``Param`` wrappers lines up with one of ``OptVariable`` wrappers or of bare
arrays, and a dict of params lines up with the Fisher read from an optax state.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def strip_value(path: Sequence[Any]) -> tuple:
    """A key path without Flax's ``.value`` hop, so Variables and bare arrays line up."""
    return tuple(
        k for k in path if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")
    )


NOT_KERNEL_NAMES = frozenset({"bias", "scale", "mean", "var"})
"""Last path keys of leaves that are never kernels: biases, norm scales, batch statistics."""


def is_kernel(path: Sequence[Any], leaf: Any) -> bool:
    """Whether a leaf is a kernel: the weights pruned and quantized by default.

    A kernel has ``ndim >= 2``, and is neither named like a bias or a norm's parameter or
    statistic (its last path key is ``bias``, ``scale``, ``mean`` or ``var``) nor held in
    a Linen ``batch_stats`` collection. The rank alone is not enough: a layer stacked with
    ``nn.scan`` or ``nnx.vmap`` gives its biases, norm scales and statistics a leading
    axis (``(L, C)``), and attention's ``DenseGeneral`` has a bias of shape
    ``(heads, head_dim)``. Compose it to choose otherwise, e.g.
    ``prunable=lambda p, x: is_kernel(p, x) and "embed" not in jax.tree_util.keystr(p)``.

    Args:
      path: the leaf's ``jax.tree_util`` key path (Flax's ``.value`` hop is ignored).
      leaf: the array.

    Examples:
      >>> import jax, jax.numpy as jnp, fisher_optax
      >>> tree = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((2, 4))}}
      >>> [fisher_optax.is_kernel(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
      [False, True]
    """
    if np.ndim(leaf) < 2:
        return False
    names = [getattr(k, "key", getattr(k, "name", None)) for k in strip_value(path)]
    return "batch_stats" not in names and not (names and names[-1] in NOT_KERNEL_NAMES)


def keystr(path: Sequence[Any]) -> str:
    """A readable path such as ``['dense']['kernel']`` (Flax's ``.value`` hop left out)."""
    return jax.tree_util.keystr(strip_value(path)) or "<root>"


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of ``tree`` in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(keystr(path), leaf) for path, leaf in flat]


def check_matching(reference: Any, other: Any, *, ref_name: str, other_name: str) -> list[Any]:
    """Check that ``other`` has the leaves of ``reference``, path by path and shape by shape.

    Args:
      reference: the tree that fixes the structure (usually the params).
      other: a tree that must line up with it (a Fisher, a mask, scores).
      ref_name: what ``reference`` is called in the error message.
      other_name: what ``other`` is called in the error message.

    Returns:
      The leaves of ``other``, in the flattening order of ``reference``.

    Raises:
      ValueError: naming the first path that is missing, extra or of another shape.
    """
    ref = leaves_with_paths(reference)
    oth = leaves_with_paths(other)
    for i, (rp, rl) in enumerate(ref):
        if i >= len(oth):
            raise ValueError(
                f"{other_name} has no leaf at {rp}, which {ref_name} has: {other_name} has "
                f"{len(oth)} leaves, {ref_name} has {len(ref)}. Build {other_name} from the same "
                f"tree as {ref_name} (e.g. with jax.tree.map over {ref_name})."
            )
        op, ol = oth[i]
        if op != rp:
            raise ValueError(
                f"{other_name} does not match the structure of {ref_name}: leaf {i} is at {op} "
                f"in {other_name} but at {rp} in {ref_name}. Build {other_name} from the same "
                f"tree as {ref_name}."
            )
        rs, os_ = getattr(rl, "shape", ()), getattr(ol, "shape", ())
        if tuple(rs) != tuple(os_):
            raise ValueError(
                f"{other_name} at {rp} has shape {tuple(os_)} but {ref_name} has shape "
                f"{tuple(rs)} there; the two trees must hold arrays of the same shapes."
            )
    if len(oth) > len(ref):
        raise ValueError(
            f"{other_name} has a leaf at {oth[len(ref)][0]} that {ref_name} lacks "
            f"({len(oth)} leaves against {len(ref)}). Build {other_name} from the same tree "
            f"as {ref_name}."
        )
    return [leaf for _, leaf in oth]
