"""Pytree helpers shared by every module: paths, and structure checks that name the culprit.

Trees are compared by their leaves' key paths and shapes, not by node types, so a Flax
``nnx.State`` of ``Param`` wrappers lines up with one of ``OptVariable`` wrappers or of bare
arrays, and a dict of params lines up with the Fisher read from an optax state.
"""

from collections.abc import Callable, Mapping, Sequence
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


def is_path_map(spec: Any) -> bool:
    """Whether ``spec`` is a mapping keyed by path strings (``"['dense']['kernel']"``) or
    predicates, rather than a pytree of per-leaf values (a dict like ``{"w": 0.5}``)."""
    return isinstance(spec, Mapping) and any(
        callable(k) or (isinstance(k, str) and k[:1] in "[.") for k in spec
    )


def per_leaf(
    spec: Any,
    tree: Any,
    *,
    name: str,
    default: Callable[[tuple, Any], Any],
    missing: Any = None,
    check: Callable[[Any, str, tuple, Any], Any] | None = None,
    plural: str = "values",
    what: str = "one value per leaf",
) -> list[Any]:
    """Per leaf of ``tree``, the value a per-leaf ``spec`` gives it: the one resolver of
    ``prunable``, per-leaf ``sparsity``, ``axis`` and ``quantizable`` arguments.

    ``spec`` takes one of four forms:

    * ``None``: ``default(path, leaf)`` for every leaf;
    * a mapping keyed by path strings (``jax.tree_util.keystr`` form) or predicates
      ``(path, leaf) -> bool``: the value of the one key matching a leaf, ``missing`` for
      leaves no key matches (a leaf matched twice, or a path string matching no leaf, is an
      error);
    * a callable ``spec(path, leaf)``: its value for every leaf;
    * a pytree with the leaves of ``tree`` (matched by path; shapes are not compared): its
      leaves.

    Paths given to predicates are ``jax.tree_util`` key-path tuples without Flax's
    ``.value`` hop.

    Args:
      spec: the argument, in one of the forms above.
      tree: the tree whose leaves the values are for (usually the params).
      name: the argument's name in error messages.
      default: the value for each leaf when ``spec`` is ``None``.
      missing: the value of leaves a mapping does not match.
      check: ``check(value, where, path, leaf) -> value``, applied to every value given by
        ``spec`` (not to ``default`` or ``missing``); ``where`` names its origin for
        messages, e.g. ``"sparsity['w']"`` or ``"prunable(path, leaf) at ['w']"``.
      plural: what the values are called in the message on a leaf matched twice.
      what: what a pytree ``spec`` should hold, for the message on a structure mismatch.

    Returns:
      One value per leaf of ``tree``, in flattening order.

    Raises:
      ValueError: if a pytree ``spec`` does not have the paths of ``tree``, a mapping names
        a path ``tree`` lacks or matches a leaf twice.
      TypeError: if a mapping key is neither a path string nor a predicate, or a predicate
        does not take ``(path, leaf)``.
    """
    # _validate imports this module: importing it at the top would be a cycle.
    from fisher_optax._validate import callable_arity

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [strip_value(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    names = [keystr(p) for p in paths]
    check = check or (lambda value, where, path, leaf: value)
    article = "an" if name[:1] in "aeiou" else "a"
    if spec is None:
        return [default(p, x) for p, x in zip(paths, leaves, strict=True)]
    if is_path_map(spec):
        out: list[Any] = [None] * len(paths)
        matched = [False] * len(paths)
        for k, v in spec.items():
            if callable(k):
                callable_arity(k, f"{article} {name} key", "predicate(path, leaf) -> bool", 2)
                hits = [i for i, (p, x) in enumerate(zip(paths, leaves, strict=True)) if k(p, x)]
                label = getattr(k, "__name__", repr(k))
            elif isinstance(k, str):
                hits = [i for i, n in enumerate(names) if n == k]
                label = k
                if not hits:
                    raise ValueError(
                        f"{name} names the path {k!r}, which the params do not have. Paths "
                        f"are written as jax.tree_util.keystr writes them: {names[:4]}..."
                    )
            else:
                raise TypeError(
                    f"{article} {name} mapping is keyed by path strings or predicates(path, leaf), "
                    f"got the key {k!r} ({type(k).__name__})."
                )
            for i in hits:
                if matched[i]:
                    raise ValueError(
                        f"{name} gives the leaf at {names[i]} two {plural} (again by {label}); "
                        "each leaf may match one key of the mapping."
                    )
                matched[i] = True
                out[i] = check(v, f"{name}[{label!r}]", paths[i], leaves[i])
        return [v if hit else missing for v, hit in zip(out, matched, strict=True)]
    if callable(spec):
        callable_arity(spec, name, f"{name}(path, leaf)", 2)
        return [
            check(spec(p, x), f"{name}(path, leaf) at {n}", p, x)
            for p, x, n in zip(paths, leaves, names, strict=True)
        ]
    other = jax.tree_util.tree_flatten_with_path(spec)[0]
    for i, path in enumerate(paths):
        if i >= len(other) or strip_value(other[i][0]) != path:
            where = keystr(other[i][0]) if i < len(other) else "nothing"
            raise ValueError(
                f"{name} does not match the structure of the params: the params have a leaf "
                f"at {names[i]} where {name} has {where}. Build it with jax.tree.map over "
                f"the params ({what})."
            )
    if len(other) != len(paths):
        raise ValueError(
            f"{name} has a leaf at {keystr(other[len(paths)][0])} that the params lack."
        )
    return [
        check(v, f"{name} at {n}", p, x)
        for (_, v), p, x, n in zip(other, paths, leaves, names, strict=True)
    ]
