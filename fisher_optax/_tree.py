"""Pytree helpers shared by every module: paths, and structure checks that name the culprit.

Trees are compared by their leaves' key paths and shapes, not by node types, so a Flax
``nnx.State`` of ``Param`` wrappers lines up with one of ``OptVariable`` wrappers or of bare
arrays, and a dict of params lines up with the Fisher read from an optax state.
"""

import functools
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_value_hop(k: Any) -> bool:
    return isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"


def strip_value(path: Sequence[Any]) -> tuple:
    """A key path without a Flax Variable's ``.value`` hop, so Variables and bare arrays
    line up.

    A Variable wraps one array, so its hop is the last key; a ``.value`` anywhere else is
    a field of the user's own (penzai's ``Parameter.value.data_array``) and is kept. Where
    the tree is at hand, :func:`key_paths` tells a Variable from a user's leaf field named
    ``value`` by the node's type.
    """
    path = tuple(path)
    return path[:-1] if path and _is_value_hop(path[-1]) else path


def is_array(leaf: Any) -> bool:
    """Whether a leaf is an array: a JAX or NumPy array or scalar, a tracer of one, or a
    Python number (stored as a 0-d array), as opposed to the other leaves a model may hold:
    functions, strings, axis names, arbitrary objects."""
    return isinstance(leaf, jax.Array | np.ndarray | np.generic | bool | int | float | complex)


def is_flax_variable(node: Any) -> bool:
    """Whether ``node`` is a Flax ``nnx.Variable`` (or ``VariableState``), told by its type
    without importing Flax."""
    return any(
        c.__name__ in ("Variable", "VariableState") and c.__module__.startswith("flax.")
        for c in type(node).__mro__
    )


def key_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple]:
    """Per leaf of ``tree`` (flattening order), its key path without Flax's Variable hop.

    Only the ``.value`` hop into a Flax Variable is dropped: a field named ``value`` of a
    user's own node (an Equinox module with ``value`` and ``scale`` fields) stays, so two
    leaves never share a path.
    """

    def stop(x: Any) -> bool:
        return is_flax_variable(x) or (is_leaf is not None and is_leaf(x))

    out: list[tuple] = []
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)[0]:
        if not is_flax_variable(node) or (is_leaf is not None and is_leaf(node)):
            out.append(tuple(path))
            continue
        for inner, _ in jax.tree_util.tree_flatten_with_path(node, is_leaf=is_leaf)[0]:
            hop = 1 if inner and _is_value_hop(inner[0]) else 0
            out.append(tuple(path) + tuple(inner[hop:]))
    return out


NOT_KERNEL_NAMES = frozenset({"bias", "scale", "mean", "var"})
"""Path keys of leaves that are never kernels: biases, norm scales, batch statistics."""

WEIGHT_NAMES = frozenset({"kernel", "weight"})
"""Last path keys of weights: Flax's ``kernel`` and Equinox's and PyTorch-style ``weight``."""

NOT_PARAM_COLLECTIONS = frozenset({"batch_stats", "cache", "intermediates"})
"""Linen collections that hold state, not weights: batch statistics, a decoder's KV cache
and sown intermediates. Their leaves are never pruned or quantized by default."""


def is_kernel(path: Sequence[Any], leaf: Any) -> bool:
    """Whether a leaf is a kernel: the weights pruned and quantized by default.

    A kernel is an array (not a PRNG key) with ``ndim >= 2``, is not named like a bias or a
    norm's parameter or statistic (no key of its path is ``bias``, ``scale``, ``mean`` or
    ``var``, unless its last key is ``kernel`` or ``weight``: penzai's stacked
    ``scale.value.data_array`` keeps its label above the array, a VAE's ``mean`` head holds
    a ``kernel``) and is not held in a Linen ``batch_stats``, ``cache`` or
    ``intermediates`` collection (a KV cache is state, not a weight). The rank alone is not
    enough: a layer stacked with ``nn.scan`` or ``nnx.vmap`` gives its biases, norm scales
    and statistics a leading axis (``(L, C)``), and attention's ``DenseGeneral`` has a bias
    of shape ``(heads, head_dim)``. Compose it to choose otherwise, e.g.
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
    if not is_array(leaf) or np.ndim(leaf) < 2:
        return False
    if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
        return False
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in strip_value(path)]
    names = set(keys)
    if names & NOT_PARAM_COLLECTIONS:
        return False
    # A leaf named like a weight is one, whatever its module is called (a VAE's `mean` head:
    # `mean/kernel`); otherwise a label anywhere on the path rules it out.
    return bool(keys and keys[-1] in WEIGHT_NAMES) or not names & NOT_KERNEL_NAMES


def _is_equinox_layer(node: Any) -> str | None:
    """``"linear"`` or ``"conv"`` for an Equinox ``Linear`` or ``Conv*`` module (told by its
    type, without importing Equinox), else ``None``."""
    for c in type(node).__mro__:
        if c.__module__.startswith("equinox"):
            if c.__name__ == "Linear":
                return "linear"
            if c.__name__ == "Conv":
                return "conv"
    return None


def layouts(tree: Any) -> list[tuple[int, int] | None]:
    """Per leaf of ``tree``, ``(input axis, output axis)`` (non-negative) where the layout
    is known, else ``None``.

    Known layouts: a Flax Dense kernel ``(in, out)`` (a 2-D leaf whose last key is
    ``kernel``) and Conv kernel ``(*window, in, out)`` (a ``kernel`` whose module's key
    holds ``conv``, as Linen's ``Conv_0``; ranks 3 and up are taken for a conv only then,
    since an ``nn.scan``-stacked Dense kernel ``(L, in, out)`` and a ``DenseGeneral``
    attention kernel ``(D, heads, head_dim)`` have them too), and the ``weight`` of an
    Equinox ``Linear`` ``(out, in)`` or ``Conv`` ``(out, in, *window)``, told by the
    module's class. Any other leaf (an embedding, a
    penzai or hand-written layer) has no default axis.
    """
    eqx_kind: dict[tuple, str] = {}

    def stop(node: Any) -> bool:
        return _is_equinox_layer(node) is not None

    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)[0]:
        kind = _is_equinox_layer(node)
        if kind is not None:
            eqx_kind[(*path, jax.tree_util.GetAttrKey("weight"))] = kind
    out: list[tuple[int, int] | None] = []
    for path, (raw, leaf) in zip(
        key_paths(tree), jax.tree_util.tree_flatten_with_path(tree)[0], strict=True
    ):
        ndim = np.ndim(leaf) if is_array(leaf) else 0
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        if tuple(raw) in eqx_kind and ndim >= 2:
            out.append((1, 0))
        elif names and names[-1] == "kernel" and ndim >= 2 and not eqx_kind:
            # A kernel of rank 3 or more is a Conv's only when its module says so: a stacked
            # Dense (L, in, out) or a DenseGeneral (D, heads, head_dim) has that rank too.
            conv = len(names) >= 2 and "conv" in names[-2].lower()
            out.append((ndim - 2, ndim - 1) if ndim == 2 or conv else None)
        else:
            out.append(None)
    return out


def keystr(path: Sequence[Any]) -> str:
    """A readable path such as ``['dense']['kernel']`` (Flax's ``.value`` hop left out)."""
    return jax.tree_util.keystr(strip_value(path)) or "<root>"


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of ``tree`` in flattening order."""
    leaves = jax.tree.leaves(tree)
    return [
        (jax.tree_util.keystr(p) or "<root>", x)
        for p, x in zip(key_paths(tree), leaves, strict=True)
    ]


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


def is_predicate(spec: Any) -> bool:
    """Whether a per-leaf ``spec`` is a predicate ``(path, leaf)`` rather than a tree.

    Only a plain function is a predicate: a ``def`` or ``lambda``, a bound method, a
    builtin or a ``functools.partial``. Any other object is a tree, even a callable one:
    an Equinox module is callable and is a pytree of per-leaf values.
    """
    return isinstance(
        spec,
        types.FunctionType | types.BuiltinFunctionType | types.MethodType | functools.partial,
    )


def is_path_map(spec: Any) -> bool:
    """Whether ``spec`` is a mapping keyed by path strings (``"['dense']['kernel']"``) or
    predicates, rather than a pytree of per-leaf values (a dict like ``{"w": 0.5}``)."""
    return isinstance(spec, Mapping) and any(
        is_predicate(k) or (isinstance(k, str) and k[:1] in "[.") for k in spec
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
    * a plain function ``spec(path, leaf)`` (:func:`is_predicate`): its value for every
      leaf;
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

    leaves = jax.tree.leaves(tree)
    paths = key_paths(tree)
    names = [jax.tree_util.keystr(p) or "<root>" for p in paths]
    check = check or (lambda value, where, path, leaf: value)
    article = "an" if name[:1] in "aeiou" else "a"
    if spec is None:
        return [default(p, x) for p, x in zip(paths, leaves, strict=True)]
    if is_path_map(spec):
        out: list[Any] = [None] * len(paths)
        matched = [False] * len(paths)
        for k, v in spec.items():
            if is_predicate(k):
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
    if is_predicate(spec):
        callable_arity(spec, name, f"{name}(path, leaf)", 2)
        return [
            check(spec(p, x), f"{name}(path, leaf) at {n}", p, x)
            for p, x, n in zip(paths, leaves, names, strict=True)
        ]
    other = list(zip(key_paths(spec), jax.tree.leaves(spec), strict=True))
    for i, path in enumerate(paths):
        if i >= len(other) or other[i][0] != path:
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
