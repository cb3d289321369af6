"""Argument checks shared by every public function: one helper per kind, one message each.

Every helper raises ``ValueError`` (a bad value) or ``TypeError`` (a bad type) whose message
names the argument (and, for trees, the leaf path), says what was expected and what was
given, and how to fix it. Messages do not name the calling function: the traceback does.
Bools are rejected wherever a number is expected (``True`` is an ``int`` to Python, never
a batch size or a bit width to us).

Checks on *values* run only when the value is concrete; under ``jit`` a traced value passes
through and the caller documents its rule (e.g. a traced sparsity is clipped to [0, 1]).
"""

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax._tree import check_matching, is_array, is_kernel, key_paths, keystr, per_leaf

__all__: list[str] = []  # private module; nothing re-exported


def is_concrete(x: Any) -> bool:
    """Whether ``x`` is a value (not a tracer under ``jit``/``vmap``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def spans_processes(x: Any) -> bool:
    """Whether ``x`` is a global array with shards on other processes (multi-host).

    NumPy cannot read such an array: checks on it run as jax reductions, whose scalar
    results every process holds.
    """
    return is_concrete(x) and isinstance(x, jax.Array) and not x.is_fully_addressable


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool | np.bool_)


def integer(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """A Python ``int`` in ``[minimum, maximum]``; bools, floats and arrays are refused.

    Integral NumPy scalars and 0-d integer arrays are accepted and converted.
    """
    ok_type = isinstance(value, int | np.integer) or (
        isinstance(value, np.ndarray | jax.Array)
        and value.ndim == 0
        and jnp.issubdtype(value.dtype, jnp.integer)
        and is_concrete(value)
    )
    span = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    if _is_bool(value) or not ok_type:
        raise TypeError(f"{name} must be an int {span}, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an int {span}, got {value}.")
    return value


def real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    meaning: str = "",
) -> float:
    """A finite Python ``float`` in the interval given (closed unless ``*_open``).

    ``meaning`` is appended to the message in parentheses, e.g. "the fraction of prunable
    weights to remove". NaN and infinities are refused; bools are refused.
    """
    if _is_bool(value) or not (
        isinstance(value, int | float | np.integer | np.floating)
        or (isinstance(value, np.ndarray | jax.Array) and np.ndim(value) == 0)
    ):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    if isinstance(value, np.ndarray | jax.Array) and not (
        jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
    ):
        raise TypeError(f"{name} must be a real number, got an array of dtype {value.dtype}.")
    value = float(value)
    lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
    hi = "" if high is None else f"{high}" + (")" if high_open else "]")
    span = f"in {lo}, {hi}" if low is not None and high is not None else ""
    if low is not None and high is None:
        span = f"{'>' if low_open else '>='} {low}"
    if high is not None and low is None:
        span = f"{'<' if high_open else '<='} {high}"
    bad = not np.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        why = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be a finite number {span}{why}, got {value}.")
    return value


def fraction(value: Any, name: str = "sparsity", *, meaning: str = "") -> Any:
    """A fraction in ``[0, 1]``: a Python float when concrete, else the tracer clipped.

    The rule under ``jit`` (one for the whole library): a traced fraction is clipped to
    ``[0, 1]`` and NaN becomes 0 (prune nothing). Concrete values outside ``[0, 1]``, NaN
    and arrays that are not scalars are errors.
    """
    if isinstance(value, jax.core.Tracer):
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar in [0, 1], got shape {jnp.shape(value)}.")
        v = jnp.asarray(value, jnp.float32)
        return jnp.clip(jnp.where(jnp.isnan(v), 0.0, v), 0.0, 1.0)
    if np.ndim(value) != 0:
        raise ValueError(
            f"{name} must be a scalar in [0, 1], got an array of shape {np.shape(value)}."
        )
    return real(value, name, low=0.0, high=1.0, meaning=meaning)


def choice(value: Any, name: str, options: Mapping[str, str]) -> str:
    """One of ``options`` (a mapping from each allowed string to what it means)."""
    if not isinstance(value, str) or value not in options:
        listed = "; ".join(f"{k!r} ({v})" if v else repr(k) for k, v in options.items())
        raise ValueError(f"{name} must be one of: {listed}. Got {value!r}.")
    return value


SCOPES: dict[str, str] = {
    "global": "one ranking over all prunable weights",
    "layer": "each leaf ranked on its own",
}


def scope(value: Any) -> str:
    """``"global"`` or ``"layer"``, with the one message for a bad scope."""
    return choice(value, "scope", SCOPES)


SPARSITY_MEANING = "the fraction of prunable weights to remove"


def _target(value: Any, where: str) -> Any:
    """A checked fraction, rounded to float32 when concrete: eager and jitted counts agree."""
    value = fraction(value, where, meaning=SPARSITY_MEANING)
    return float(np.float32(value)) if isinstance(value, float) else value


def sparsity(value: Any, tree: Any) -> Any:
    """A checked target: one fraction, or a list with one fraction per leaf of ``tree``.

    A scalar (Python number, NumPy or jax scalar, tracer) is one target; a pytree shaped
    like ``tree`` or a mapping ``{path or predicate: fraction}`` gives one per leaf (leaves
    no key matches get 0). Concrete fractions come back as Python floats rounded to float32.
    """
    if not isinstance(value, list | tuple | dict | Mapping) and jnp.ndim(value) == 0:
        return _target(value, "sparsity")
    return per_leaf(
        value,
        tree,
        name="sparsity",
        default=lambda path, leaf: 0.0,
        missing=0.0,
        check=lambda v, where, path, leaf: _target(v, where),
        plural="targets",
        what="one fraction per leaf, e.g. from erk_sparsity",
    )


def _prunable_flag(flag: Any, where: str, path: Any, leaf: Any) -> Any:
    if isinstance(flag, bool | np.bool_):
        return bool(flag)
    if jnp.result_type(flag) == jnp.bool_ and jnp.ndim(flag) == 0:
        return bool(flag) if is_concrete(flag) else flag
    if jnp.result_type(flag) == jnp.bool_ and jnp.shape(flag) == jnp.shape(leaf):
        return jnp.asarray(flag)
    raise TypeError(
        f"{where} must be a bool or a bool array of shape {jnp.shape(leaf)}, got "
        f"{jnp.result_type(flag)} of shape {jnp.shape(flag)}. Return e.g. leaf.ndim >= 2, or "
        "a bool array to choose weight by weight."
    )


def prunable(value: Any, tree: Any) -> list[Any]:
    """Per leaf of ``tree``: ``False``, ``True`` or a boolean array (weight by weight).

    ``value`` is ``None`` (the kernels, :func:`fisher_optax.is_kernel`), a predicate
    ``(path, leaf)`` returning a bool or a bool array shaped like the leaf, a pytree like
    ``tree`` of those, or a mapping ``{path or predicate: flag}`` (unmatched leaves: ``False``).
    A ``tree`` with a non-array leaf is refused (:func:`arrays_only`).
    """
    arrays_only(tree)
    return per_leaf(
        value,
        tree,
        name="prunable",
        default=is_kernel,
        missing=False,
        check=_prunable_flag,
        plural="flags",
        what="a bool per leaf, or a bool array shaped like it",
    )


def key(value: Any, name: str = "key") -> jax.Array:
    """A ``jax.random`` key (new-style typed key or legacy uint32[2])."""
    if isinstance(value, jax.Array) and (
        jnp.issubdtype(value.dtype, jax.dtypes.prng_key)
        or (value.dtype == jnp.uint32 and value.shape == (2,))
    ):
        return value
    dtype = f" of dtype {value.dtype}" if hasattr(value, "dtype") else ""
    raise TypeError(
        f"{name} must be a jax.random key, e.g. jax.random.key(0); got "
        f"{type(value).__name__}{dtype}."
    )


def callable_arity(fn: Any, name: str, signature: str, nargs: int) -> Callable:
    """``fn`` if it is callable and accepts ``nargs`` positional arguments.

    ``signature`` is how the message spells the expected call, e.g. ``"prunable(path, leaf)"``.
    """
    if not callable(fn):
        raise TypeError(f"{name} must be a callable {signature}, got {type(fn).__name__}.")
    try:
        inspect.signature(fn).bind(*([None] * nargs))
    except TypeError:
        raise TypeError(
            f"{name} must accept {nargs} positional argument{'s' * (nargs != 1)}: "
            f"{signature}; got {getattr(fn, '__name__', fn)!r} with signature "
            f"{inspect.signature(fn)}."
        ) from None
    except ValueError:  # builtins without a signature: trust them
        pass
    return fn


def bool_leaves(reference: Any, tree: Any, name: str = "mask", ref_name: str = "params") -> list:
    """The leaves of a boolean ``tree`` matching ``reference`` path by path and shape by shape.

    Only ``bool`` arrays are accepted: a float or 0/1 int mask is a ``TypeError`` (the same
    message everywhere), since ``0.5`` or ``2`` has no meaning as keep/prune.
    """
    arrays_only(reference, ref_name)
    arrays_only(tree, name)
    leaves = check_matching(reference, tree, ref_name=ref_name, other_name=name)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(reference)[0]]
    for path, leaf in zip(paths, leaves, strict=True):
        dtype = jnp.result_type(leaf)
        if dtype != jnp.bool_:
            raise TypeError(
                f"{name} at {keystr(path)} has dtype {dtype}; a mask holds booleans (True "
                f"keeps a weight). Convert it with {name}.astype(bool) if it holds 0/1."
            )
    return leaves


def is_prng_key(leaf: Any) -> bool:
    """Whether ``leaf`` is an array of typed PRNG keys (an ``nnx.Rngs`` stream's key)."""
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def arrays_only(tree: Any, name: str = "params") -> None:
    """Refuse a tree with a non-array leaf (a function, a string, an axis name).

    A whole Equinox module holds its activation functions and flags as leaves; the arrays
    are what a Fisher, a mask or a codebook is about, so the message shows how to take them.
    """
    for path, leaf in zip(key_paths(tree), jax.tree.leaves(tree), strict=True):
        if not is_array(leaf):
            raise TypeError(
                f"{name} at {keystr(path)} is {type(leaf).__name__} {str(leaf)[:40]!r}, not an "
                "array; pass the model's arrays only, e.g. eqx.filter(model, "
                "eqx.is_inexact_array), and eqx.combine the result with the model."
            )


def real_leaves(tree: Any, name: str) -> list[tuple[str, Any]]:
    """``(path, leaf)`` of a tree of real arrays; a non-real dtype is a ``TypeError``.

    PRNG keys (an ``nnx.Rngs`` kept in a model) pass: they are never pruned or coded.
    """
    arrays_only(tree, name)
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if is_prng_key(leaf):
            out.append((keystr(path), leaf))
            continue
        dtype = jnp.result_type(leaf)
        if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"{name} at {keystr(path)} has dtype {dtype}; expected real numbers "
                "(floating point or integer)."
            )
        out.append((keystr(path), leaf))
    return out


def finite(tree: Any, name: str = "params", *, where: Any = None) -> None:
    """Concrete leaves of ``tree`` hold no NaN or infinity (traced leaves are not checked).

    ``where``: an optional list (one entry per leaf, ``None`` = whole leaf) of boolean arrays
    restricting the check, e.g. to the weights a mask keeps.
    """
    items = real_leaves(tree, name)
    for i, (path, leaf) in enumerate(items):
        if not is_concrete(leaf):
            continue
        if is_prng_key(leaf):
            continue
        w = None if where is None else where[i]
        if spans_processes(leaf) or spans_processes(w):
            bad = ~jnp.isfinite(leaf) if w is None else ~jnp.isfinite(leaf) & w
        else:
            bad = ~np.isfinite(np.asarray(leaf, np.float64))
            if w is not None:
                bad &= np.asarray(w, bool)
        if bad.any():
            flat = int(bad.reshape(-1).argmax())
            value = (leaf if spans_processes(leaf) else np.asarray(leaf)).reshape(-1)[flat]
            index = tuple(int(j) for j in np.unravel_index(flat, bad.shape))
            raise ValueError(
                f"{name} at {path} holds {int(bad.sum())} non-finite value(s) (first at index "
                f"{index}: {value}). A diverged or corrupted value cannot be ranked or "
                "quantized; fix it, or mask it out, before calling this."
            )


def fisher(reference: Any, tree: Any, name: str = "fisher", *, where: Any = None) -> list:
    """The leaves of a Fisher diagonal matching ``reference``: real, finite and >= 0.

    A negative Fisher silently inverts a ranking and collapses a weighted codebook; a NaN or
    inf cannot be ranked. Both are errors (concrete leaves only; under ``jit`` the caller's
    rule applies). ``where`` restricts the check as in :func:`finite`.
    """
    leaves = check_matching(reference, tree, ref_name="params", other_name=name)
    paths = [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(reference)[0]]
    finite(tree, name, where=where)
    for i, (path, leaf) in enumerate(zip(paths, leaves, strict=True)):
        if not is_concrete(leaf):
            continue
        w = None if where is None else where[i]
        if spans_processes(leaf) or spans_processes(w):
            neg = leaf < 0 if w is None else (leaf < 0) & w
        else:
            neg = np.asarray(leaf) < 0
            if w is not None:
                neg &= np.asarray(w, bool)
        if neg.any():
            low = float((leaf if spans_processes(leaf) else np.asarray(leaf)).min())
            raise ValueError(
                f"{name} at {path} holds {int(neg.sum())} negative value(s) (min "
                f"{low}); a Fisher diagonal is a mean of squares, "
                "never negative. Pass the Fisher (e.g. fisher_from_state(opt_state)), not a "
                "gradient or a difference."
            )
    return leaves


def pattern(value: Any) -> Any:
    """A selection pattern: a value with ``select(scores, sparsity, *, prunable, mask)``."""
    if isinstance(value, type) or not callable(getattr(value, "select", None)):
        given = f"the class {value.__name__}" if isinstance(value, type) else repr(value)
        raise TypeError(
            "pattern must be a selection pattern such as fisher_optax.Unstructured(), "
            "fisher_optax.NM(2, 4) or fisher_optax.Blocks((4, 4)): a value with a method "
            f"select(scores, sparsity, *, prunable, mask). Got {given}."
        )
    return value
