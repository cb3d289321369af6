"""Flax integration: NNX and Linen models. The only module that imports Flax.

Masks, Fisher diagonals and quantized weights are pytrees shaped like
``nnx.state(model, nnx.Param)`` (NNX) or like the ``{'params': ...}`` dict (Linen); the
functions here write them back into a model and cut pruned units out of it physically
(*surgery*), so that a pruned model is smaller and faster at inference, not just sparse.

One surgery entry point per framework, model first and optimizer second:
:func:`shrink` (NNX: model, ``nnx.Optimizer``) and :func:`shrink_linen` (Linen: module,
variables, optax state). Both read the model into the framework-free records of
:mod:`fisher_optax.surgery`, cut, write the result back, and then *check* it: the shrunk
model is called on a probe input next to the masked original (the dropped units' incoming
weights zeroed), layer by layer, and an error names the first layer whose output differs,
so surgery never returns a wrong model. What is exact and what is kept is described in
:mod:`fisher_optax.surgery`.

The Fisher of an ``nnx.Optimizer``: ``fisher_optax.fisher_from_state(optimizer,
params=nnx.state(model, nnx.Param))`` (the optimizer is a pytree whose arrays the core reads
through ``__jax_array__``; ``params=`` puts the result in the model's tree structure).
"""

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fisher_optax import _validate
from fisher_optax._tree import check_matching, keystr, strip_value
from fisher_optax._types import Mask, Params
from fisher_optax.structured import Index, kernel_units, slice_opt_state
from fisher_optax.surgery import Cut, Edge, Layer, cut_units

__all__ = [
    "Shrunk",
    "ShrunkLinen",
    "apply_mask_to_model",
    "opt_variables_to_params",
    "param_count_and_flops",
    "prunable_units",
    "shrink",
    "shrink_linen",
    "shrink_optimizer",
    "update_model",
]

Pair = tuple[str, str] | tuple[str, str, Callable[[jax.Array], jax.Array]]


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
                "architecture the tree was saved from (after surgery: the shrunk widths)."
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
        from :func:`fisher_optax.two_stage_mask` or :func:`fisher_optax.expand_unit_mask`.

    Raises:
      ValueError: if the mask does not line up with the model's parameters.
      TypeError: if the mask is not boolean.
    """
    from fisher_optax.masks import apply_mask

    state = nnx.state(model, nnx.Param)
    _validate.bool_leaves(state, mask, "mask", "nnx.state(model, nnx.Param)")
    update_model(model, jax.jit(apply_mask)(state, mask))  # one compile, not one per leaf


# --------------------------------------------------------------------------------------------
# The layer graph of an nnx model


def _to_device(x: Any, dtype: Any = None) -> jax.Array:
    """``x`` as a device array. Host data goes through ``jax.device_put``: ``jnp.asarray`` of a
    NumPy array compiles a kernel per shape, which dominated the cost of surgery."""
    if isinstance(x, jax.Array):
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    return jax.device_put(np.asarray(x, dtype=dtype))


def _key(path: tuple) -> str:
    """A module's attribute path written as :func:`fisher_optax._tree.keystr` writes the
    paths of ``nnx.state(model)``: ``('layers', 0)`` is ``"['layers'][0]"``."""
    return keystr(tuple(jax.tree_util.DictKey(k) for k in path))


def _modules(model: nnx.Module) -> dict[str, tuple[tuple, Any]]:
    """Every Linear/Conv of ``model`` by its dot name (``'conv1'``, ``'block.fc'``,
    ``'layers.0'``), in the model's own order."""
    out = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear | nnx.Conv):
            out[".".join(str(k) for k in path)] = (tuple(path), module)
    return out


def _value(v: Any) -> Any:
    return v.get_value() if isinstance(v, nnx.Variable) else v


def _conv_constant_exact(conv: nnx.Conv) -> bool:
    """Whether ``conv`` maps a per-channel constant input to a constant output."""
    rank = conv.kernel.shape[0:-2]
    dil = conv.input_dilation
    if dil is not None and any(d != 1 for d in np.broadcast_to(np.asarray(dil), (len(rank),))):
        return False
    pad = conv.padding
    if isinstance(pad, str):
        if pad in ("VALID", "CIRCULAR", "REFLECT"):
            return True
        kdil = np.broadcast_to(np.asarray(conv.kernel_dilation or 1), (len(rank),))
        return all((k - 1) * d == 0 for k, d in zip(rank, kdil, strict=True))
    if isinstance(pad, int):
        return pad == 0
    return all(np.all(np.asarray(p) == 0) for p in pad)


def _layer(name: str, path: tuple, module: Any) -> Layer:
    if isinstance(module, nnx.Conv):
        if module.feature_group_count != 1:
            raise ValueError(
                f"surgery does not support grouped convolutions (nnx.Conv with "
                f"feature_group_count={module.feature_group_count}) at {name!r}."
            )
        if getattr(module, "mask", None) is not None:
            raise ValueError(f"surgery does not support nnx.Conv with a kernel mask at {name!r}.")
        exact = _conv_constant_exact(module)
    elif isinstance(module, nnx.Linear):
        exact = True
    else:
        raise ValueError(
            f"surgery does not support layer type {type(module).__name__} at {name!r}: it "
            "cuts nnx.Linear and nnx.Conv layers joined by elementwise functions "
            "(activations, flatten); a normalisation between two layers is not supported."
        )
    bias = _value(getattr(module, "bias", None))
    return Layer(
        name=name,
        path=_key(path),
        kernel=np.asarray(_value(module.kernel)),
        bias=None if bias is None else np.asarray(bias),
        constant_exact=exact,
    )


def _check_elementwise(g: Callable, x: np.ndarray, what: str) -> None:
    """Elementwise, position-independent functions commute with any permutation of entries."""
    rng = np.random.default_rng(0)
    perm = rng.permutation(x.size)
    a = np.asarray(g(_to_device(x.reshape(-1)[perm].reshape(x.shape)))).reshape(-1)
    b = np.asarray(g(_to_device(x))).reshape(-1)[perm]
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=1e-6):
        raise ValueError(
            f"{what} is not elementwise (or flatten): surgery supports elementwise "
            "activations and an NHWC flatten between layers; pooling, normalisation over "
            "features or transposes are not supported."
        )


def _chain_error(p: Layer, q: Layer, got: int) -> ValueError:
    return ValueError(
        f"the pair ({p.name!r}, {q.name!r}) does not chain: {p.name!r} gives "
        f"{p.kernel.shape[-1]} features per position (kernel {p.kernel.shape}) and "
        f"{q.name!r} takes {q.kernel.shape[-2]} (kernel {q.kernel.shape}); the inputs it "
        f"would see have {got} features."
    )


def _probe_shape(p: Layer, q: Layer) -> tuple[int, ...]:
    c, q_in = p.kernel.shape[-1], q.kernel.shape[-2]
    if q.kernel.ndim > 2:
        return (1, *(3,) * (q.kernel.ndim - 2), c)
    if p.kernel.ndim > 2:
        if q_in % c:
            raise _chain_error(p, q, q_in)
        return (1, q_in // c, *(1,) * (p.kernel.ndim - 3), c)
    return (2, c)


def _fn_name(i: int, f: Callable) -> str:
    return f"layers[{i}] ({getattr(f, '__name__', type(f).__name__)})"


def _check_sizes(p: Layer, q: Layer, fns: Sequence[tuple[int, Callable]]) -> None:
    """Name the first function between two layers that changes the number of values (a
    pooling, a strided slice): its output cannot be cut unit by unit."""
    shape = (1, *(4,) * (p.kernel.ndim - 2), p.kernel.shape[-1])
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    for i, f in fns:
        try:
            y = jax.eval_shape(f, x)
        except Exception:  # the user's function; the full check below reports it
            return
        if int(np.prod(y.shape)) != int(np.prod(x.shape)):
            raise ValueError(
                f"{_fn_name(i, f)} between {p.name!r} and {q.name!r} maps {tuple(x.shape)} to "
                f"{tuple(y.shape)}, changing the number of values (a pooling?): surgery "
                "supports elementwise functions and flatten between layers. Write the model "
                "as a custom module and cut the layers before the pooling with pairs=."
            )
        x = y


def _bucket(c: int) -> int:
    """Probe width: a power of two (at least 8) above ``c``. Probes run eagerly, and eager ops
    compile once per shape, so layers of similar widths share the compiled kernels; and a
    width other than ``c`` shows whether a function works at any width, as it must in the
    shrunk model."""
    return max(8, 1 << c.bit_length())


def _constants(g_same: Callable, lead: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """``b -> g(b broadcast over positions)`` at one position: a dropped unit's constant."""

    def constant(b):  # b may be shorter in later passes; g does not care
        b = np.asarray(b, np.float32)
        n = b.shape[0]
        padded = np.zeros(_bucket(n), np.float32)
        padded[:n] = b
        xb = _to_device(np.broadcast_to(padded, (*lead, padded.shape[0])))
        return np.asarray(g_same(xb)).reshape(-1, padded.shape[0])[0, :n]

    return constant


def _sequential_edge(p: Layer, q: Layer, fns: Sequence[tuple[int, Callable]]) -> Edge:
    """The edge between consecutive layers of an ``nnx.Sequential``, found by probing."""
    _check_sizes(p, q, fns)

    def g(x):
        for _, f in fns:
            x = f(x)
        return x

    shape = _probe_shape(p, q)
    c, q_in = p.kernel.shape[-1], q.kernel.shape[-2]
    what = f"the function between {p.name!r} and {q.name!r}"
    try:
        y = jax.eval_shape(g, jax.ShapeDtypeStruct(shape, jnp.float32))
    except Exception as err:  # the user's function, any failure
        raise ValueError(f"{what} fails on a {shape} input: {err}") from err
    if y.shape[-1] != q_in:
        raise _chain_error(p, q, y.shape[-1])
    if int(np.prod(y.shape)) != int(np.prod(shape)):
        raise ValueError(
            f"{what} maps {shape} to {y.shape}, changing the number of values "
            "(pooling?); surgery supports elementwise activations and flatten."
        )
    blocks = q_in // c if q.kernel.ndim == 2 and p.kernel.ndim > 2 else 1
    if blocks > 1 and len(y.shape) != 2:
        raise _chain_error(p, q, y.shape[-1])

    def g_same(x):
        return jnp.reshape(g(x), x.shape)

    lead = shape[:-1]
    x = (2.0 * np.random.default_rng(1).standard_normal((*lead, _bucket(c)))).astype(np.float32)
    # The shrunk model calls the same function on fewer features: it must work, and keep
    # each position's features together, at any width.
    want = (*y.shape[:-1], y.shape[-1] * x.shape[-1] // c)
    try:
        got = jax.eval_shape(g, jax.ShapeDtypeStruct(x.shape, jnp.float32)).shape
        problem = None if tuple(got) == want else f"gives {tuple(got)}, not {want}"
    except Exception as err:  # the user's function, any failure
        problem = str(err)
    if problem is not None:
        raise ValueError(
            f"{what} works for {c} features but not for {x.shape[-1]} ({problem}); "
            "the shrunk model, with fewer features, could not call it. Write it for any "
            "width, e.g. flatten as x.reshape(x.shape[0], -1)."
        )
    _check_elementwise(g_same, x, what)
    return Edge(p.name, q.name, blocks, _constants(g_same, lead), "nnx.Sequential")


def _pair_edge(p: Layer, q: Layer, act: Callable | None) -> Edge:
    """The edge for a pair the user named: the mapping follows from the shapes."""
    c, q_in = p.kernel.shape[-1], q.kernel.shape[-2]
    if q.kernel.ndim == 2 and p.kernel.ndim > 2:
        if q_in % c:
            raise _chain_error(p, q, q_in)
        blocks = q_in // c
    elif q_in != c:
        raise _chain_error(p, q, q_in)
    else:
        blocks = 1
    constant = None
    if act is not None:
        x = (2.0 * np.random.default_rng(1).standard_normal(_bucket(c))).astype(np.float32)
        _check_elementwise(act, x, f"the activation of pair ({p.name!r}, {q.name!r})")
        constant = _constants(act, ())
    return Edge(p.name, q.name, blocks, constant, "pairs")


def _check_pairs(pairs: Any) -> list[tuple]:
    if isinstance(pairs, str) or not isinstance(pairs, Sequence):
        raise TypeError(
            f"pairs must be a list of (producer, consumer) or (producer, consumer, activation) "
            f"tuples, got {type(pairs).__name__}."
        )
    out = []
    for pair in pairs:
        if (
            not isinstance(pair, tuple | list)
            or len(pair) not in (2, 3)
            or not all(isinstance(n, str) for n in pair[:2])
        ):
            raise ValueError(
                f"each pair must be (producer, consumer) or (producer, consumer, "
                f"activation) with layer names as strings, got {pair!r}."
            )
        if len(pair) == 3:
            _validate.callable_arity(pair[2], f"the activation of pair {pair[:2]!r}", "act(x)", 1)
        out.append(tuple(pair))
    return out


def _suggest_pairs(names: Sequence[str]) -> str:
    chain = ", ".join(f"({a!r}, {b!r})" for a, b in itertools.pairwise(names))
    return f"pairs=[{chain}]" if chain else "pairs=[(producer, consumer), ...]"


def _graph(
    model: nnx.Module, pairs: Sequence[Pair] | None, activation: Callable | None
) -> tuple[dict[str, Layer], list[Edge]]:
    layers: dict[str, Layer] = {}
    edges: list[Edge] = []
    modules = _modules(model)
    if activation is not None:
        _validate.callable_arity(activation, "activation", "activation(x)", 1)
    if pairs is None:
        if not isinstance(model, nnx.Sequential):
            names = list(modules)
            raise ValueError(
                f"a {type(model).__name__} is not an nnx.Sequential, so its layer pairs cannot "
                f"be read off. Its Linear/Conv layers are {names}; name the pairs whose "
                f"producer feeds only its consumer, e.g. {_suggest_pairs(names)}, "
                "activation=jax.nn.relu."
            )
        prev, fns = None, []
        for i, item in enumerate(model.layers):
            path = ("layers", i)
            if isinstance(item, nnx.Dropout):
                continue  # the identity at inference, where surgery is exact
            if isinstance(item, nnx.Module):
                layer = _layer(f"layers.{i}", path, item)
                layers[layer.name] = layer
                if prev is not None:
                    edges.append(_sequential_edge(prev, layer, fns))
                prev, fns = layer, []
            elif callable(item):
                fns.append((i, item))
            else:
                raise ValueError(f"layers[{i}] of the nnx.Sequential is not callable.")
        return layers, edges
    for pair in _check_pairs(pairs):
        for name in pair[:2]:
            if name not in layers:
                if name not in modules:
                    raise ValueError(
                        f"the model has no Linear or Conv layer {name!r} (named in pairs); "
                        f"its layers are {list(modules)}."
                    )
                path, module = modules[name]
                layers[name] = _layer(name, path, module)
        act = pair[2] if len(pair) == 3 else activation
        edges.append(_pair_edge(layers[pair[0]], layers[pair[1]], act))
    return layers, edges


def _drop_from_unit_mask(
    model: nnx.Module, layers: dict[str, Layer], unit_mask: Mask | None
) -> dict[str, np.ndarray]:
    if unit_mask is None:
        return {}
    units = kernel_units(nnx.state(model, nnx.Param), unit_mask)
    by_kernel = {layer.path + "['kernel']": name for name, layer in layers.items()}
    modules = {
        _key(path) + "['kernel']": (name, path, m) for name, (path, m) in _modules(model).items()
    }
    drop = {}
    for kpath, keep in units.items():
        if kpath not in by_kernel:
            if kpath not in modules:
                raise ValueError(
                    f"the unit mask has units at {kpath}, which is not the kernel of a Linear "
                    f"or Conv layer of the model; its layers are {list(_modules(model))}."
                )
            name, path, module = modules[kpath]
            layers[name] = _layer(name, path, module)
            by_kernel[kpath] = name
        drop[by_kernel[kpath]] = ~np.asarray(keep, bool)
    return drop


# --------------------------------------------------------------------------------------------
# Checking a surgery against the masked model


def _tolerance(a: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.max(np.abs(a))) if a.size else 1.0)


def _first_difference(
    order: Sequence[str],
    before: Mapping[str, list],
    after: Mapping[str, list],
    keep_out: Mapping[str, np.ndarray | None],
    failure: Exception | None,
) -> str | None:
    """A message for the first layer (in the order the masked model ran them) whose output
    after surgery differs from the masked model's at the kept units, or ``None``. When the
    shrunk model failed, ``after`` only counts the calls each layer got before the failure.
    """
    for name in order:
        if failure is not None:
            if len(after.get(name, [])) < len(before[name]):
                return (
                    f"the shrunk model does not reach layer {name!r} (calling it fails: "
                    f"{failure}). Something before {name!r} depends on a cut width: a "
                    "normalisation (BatchNorm, LayerNorm), a residual branch or a "
                    "concatenation."
                )
            continue
        for a, b in zip(before[name], after[name], strict=True):
            a = np.asarray(a, np.float64)
            if keep_out.get(name) is not None:
                a = np.take(a, keep_out[name], axis=-1)
            b = np.asarray(b, np.float64)
            if a.shape != b.shape:
                return (
                    f"the output of layer {name!r} has shape {b.shape} after surgery, "
                    f"{a.shape} expected."
                )
            err = float(np.max(np.abs(a - b))) if a.size else 0.0
            if err > _tolerance(a):
                return (
                    f"the output of layer {name!r} differs from the masked model's by up to "
                    f"{err:.3g} on the probe input: its input is not only the output of the "
                    "layer paired with it (a residual branch, a concatenation or a "
                    "normalisation in between), so cutting that layer changed what it sees."
                )
    if failure is not None:
        return f"calling the shrunk model fails after its last cut layer: {failure}"
    return None


def _logged(fn: Callable, *args: Any) -> tuple[Any, dict[str, list], list[str], Exception | None]:
    """Run ``fn(log, *args)`` under ``jit`` (one compile, not one per eager op) and return
    ``(output, {layer: outputs}, call order, failure)``. On a failure, the log holds only
    how many calls each layer got before it."""
    log: dict[str, list] = {}
    order: list[str] = []

    def run(*a):
        log.clear()
        y = fn(log, *a)
        order[:] = log.pop("", [])
        return y, dict(log)

    try:
        # A probe, not a hot loop: XLA's cheapest optimisation level compiles fastest.
        compiled = jax.jit(run).lower(*args).compile({"xla_backend_optimization_level": 0})
        y, outs = compiled(*args)
    except Exception as err:  # the model's own failure, reported by layer
        counts = {k: [None] * len(v) for k, v in log.items() if k}
        return None, counts, list(log.get("", [])), err
    return y, outs, order, None


def _compare(masked: tuple, new: tuple, layers: Mapping[str, Layer], cut: Cut) -> None:
    y_masked, before, order, failure = masked
    if failure is not None:
        raise ValueError(f"example_input: the model fails on it ({failure}).") from failure
    y_new, after, _, failure = new
    keep_out = {n: cut.index.get(lay.path + "['kernel']", (None,))[-1] for n, lay in layers.items()}
    problem = _first_difference(list(dict.fromkeys(order)), before, after, keep_out, failure)
    if problem is None:
        a, b = np.asarray(y_masked, np.float64), np.asarray(y_new, np.float64)
        if a.shape != b.shape or np.max(np.abs(a - b)) > _tolerance(a):
            err = "shapes differ" if a.shape != b.shape else f"by {np.max(np.abs(a - b)):.3g}"
            problem = (
                f"every cut layer matches, but the model's output differs ({err}): something "
                "after the last cut layer reads a cut width (a residual branch?)."
            )
    if problem is not None:
        raise _surgery_error(problem)


def _surgery_error(problem: str) -> ValueError:
    return ValueError(
        f"surgery would return a wrong model: {problem} Nothing was returned. Leave that "
        "layer's producer out of pairs= and of the unit mask (prunable=), or cut the model "
        "by hand."
    )


def _square_inputs(c_in: int, ndim: int) -> list[tuple[int, ...]]:
    if ndim == 2:
        return [(2, c_in)]
    return [(2, *(s,) * (ndim - 2), c_in) for s in range(1, 65)]


def _probe_nnx(model: nnx.Module, layers: Mapping[str, Layer]) -> jax.Array:
    """An input the model accepts, from the first Linear/Conv's kernel shape: ``(2, in)``
    for a Linear, else the smallest square image up to 64 that the model runs on."""
    graphdef, state = nnx.split(model)

    def run(s, x):
        return nnx.merge(graphdef, s)(x)

    for _, (_, module) in _modules(model).items():
        k = np.shape(_value(module.kernel))
        for shape in _square_inputs(k[-2], len(k)):
            try:
                jax.eval_shape(run, state, jax.ShapeDtypeStruct(shape, jnp.float32))
            except Exception:  # not this shape: try the next one
                continue
            rng = np.random.default_rng(0)
            return jax.device_put(rng.standard_normal(shape).astype(np.float32))
        break  # only the model's first layer tells its input shape
    raise ValueError(
        "surgery checks the shrunk model on a probe input, and could not build one from the "
        "first layer's shape; pass example_input= (one batch the model accepts)."
    )


def _recording(model: nnx.Module, layers: Mapping[str, Layer]) -> tuple[Callable, Any]:
    """``(run, state)``: ``run(log, state, x)`` calls a clone of ``model`` in eval mode on
    ``x``; its cut layers append their outputs to ``log[name]``, their names to ``log['']``."""
    rec = nnx.clone(model)
    rec.eval()
    modules = _modules(rec)
    current: list[dict] = [{}]

    class _Log(nnx.Module):
        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def __call__(self, *args, **kwargs):
            y = self.inner(*args, **kwargs)
            current[0].setdefault(self.name, []).append(y)
            current[0].setdefault("", []).append(self.name)
            return y

    for name in layers:
        path, module = modules[name]
        parent = rec
        for k in path[:-1]:
            parent = parent[k] if isinstance(k, int) else getattr(parent, k)
        if isinstance(path[-1], int):
            parent[path[-1]] = _Log(module, name)
        else:
            setattr(parent, path[-1], _Log(module, name))
    graphdef, state = nnx.split(rec)

    def run(log, s, x):
        current[0] = log
        return nnx.merge(graphdef, s)(x)

    return run, state


def _verify_nnx(model, new, layers, cut, drop, example_input) -> None:
    masked = nnx.clone(model)
    for name, d in drop.items():
        module = _modules(masked)[name][1]
        k = np.array(_value(module.kernel), copy=True)
        k[..., np.asarray(d, bool)] = 0
        module.kernel.set_value(_to_device(k, _value(module.kernel).dtype))
    x = _probe_nnx(masked, layers) if example_input is None else example_input
    results = []
    for m in (masked, new):
        run, state = _recording(m, layers)
        results.append(_logged(run, state, x))
    _compare(results[0], results[1], layers, cut)


# --------------------------------------------------------------------------------------------
# NNX surgery


class Shrunk(NamedTuple):
    """Result of :func:`shrink`.

    Attributes:
      model: the new, smaller model (the original is left as it is).
      optimizer: an ``nnx.Optimizer`` for ``model`` continuing the given one's state, or
        ``None`` when no optimizer was given.
      index: the kept entries per parameter path (paths as :func:`fisher_optax._tree.keystr`
        writes them, e.g. ``"['layers'][0]['kernel']"``; ``None`` keeps an axis whole), for
        :func:`fisher_optax.slice_opt_state` and :func:`shrink_optimizer`.
      dropped: the dropped unit indices (of the original layer) per layer name.
    """

    model: nnx.Module
    optimizer: nnx.Optimizer | None
    index: Index
    dropped: dict[str, np.ndarray]


def shrink(
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    unit_mask: Mask | None = None,
    pairs: Sequence[Pair] | None = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
    example_input: jax.Array | None = None,
) -> Shrunk:
    """Surgery on an NNX model: a new, smaller model without the dropped units, checked.

    The producing layer loses the dropped output features (kernel columns and bias), the
    consuming layer the matching input rows; for a Conv followed by an NHWC flatten
    (``x.reshape(n, -1)``) and a Dense layer, the block of rows ``s * C + c`` of each dropped
    channel ``c``. Units whose incoming weights are all zero are dropped too. The result
    computes what ``model`` computes with the dropped units' incoming weights zeroed, with
    their constant outputs folded into the next layer's bias (see
    :mod:`fisher_optax.surgery` for where that fold is exact and what happens where not).

    Before returning, the shrunk model and the masked original (both in eval mode) are
    called on a probe input, and the output of every cut layer is compared at the kept
    units: a residual branch or a normalisation that ``pairs`` hides, or anything else that
    makes the result differ, is an error naming the first layer whose output differs.

    Args:
      model: an ``nnx.Sequential`` of ``nnx.Linear``/``nnx.Conv`` layers, elementwise
        functions and flatten (``nnx.Dropout`` is taken as the identity of inference), or
        any ``nnx`` module when ``pairs`` is given.
      optimizer: the ``nnx.Optimizer`` of ``model``, or ``None``; when given, the result
        holds one for the new model with the moments sliced (:func:`shrink_optimizer`).
      unit_mask: a unit mask over ``nnx.state(model, nnx.Param)`` (True keeps a unit), from
        :func:`fisher_optax.unit_mask`; ``None`` drops only units with all-zero weights.
      pairs: ``(producer, consumer)`` or ``(producer, consumer, activation)`` names of
        Linear/Conv layers (attribute paths such as ``'conv1'`` or ``'block.fc'``) where the
        producer's output, after an elementwise ``activation`` (and a flatten when a Conv
        feeds a Dense), is the consumer's whole input and goes nowhere else.
      activation: the activation between every pair that does not name its own. Needed to
        fold dropped units' constants; ``lambda x: x`` for none.
      example_input: one batch the model accepts, for the check. By default an input is
        built from the first Linear/Conv's kernel: ``(2, in_features)`` for a Linear; for a
        Conv the smallest square ``(2, s, s, in_features)``, ``s <= 64``, the model runs on.

    Returns:
      A :class:`Shrunk`: ``(model, optimizer, index, dropped)``.

    Raises:
      ValueError: if a pair's shapes do not chain, a layer type is not supported (named),
        a name in ``pairs`` is not a layer (the model's layers are listed), the unit mask
        does not match the model, a function between layers is not elementwise (a pooling
        is named), the mask drops units of the output layer, or the check finds a layer
        whose output differs.
      TypeError: if ``model`` is not an ``nnx.Module`` or ``optimizer`` not an
        ``nnx.Optimizer``, or an activation takes the wrong arguments.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import fisher_optax.flax
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
      >>> keep = {"layers": {0: {"kernel": jnp.array([True, False, True, False])}}}
      >>> out = fisher_optax.flax.shrink(model, unit_mask=keep)
      >>> out.model.layers[0].kernel.shape, out.model.layers[2].kernel.shape
      ((3, 2), (2, 2))
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"model must be an nnx.Module, got {type(model).__name__}; for Linen use "
            "fisher_optax.flax.shrink_linen."
        )
    if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(
            f"optimizer must be an nnx.Optimizer or None, got {type(optimizer).__name__}; "
            "pass the unit mask as unit_mask=."
        )
    layers, edges = _graph(model, pairs, activation)
    drop = _drop_from_unit_mask(model, layers, unit_mask)
    cut = cut_units(layers, edges, drop)
    new = _apply_cut(model, cut, layers)
    _verify_nnx(model, new, layers, cut, drop, example_input)
    new_opt = None if optimizer is None else shrink_optimizer(model, optimizer, new, cut.index)
    return Shrunk(new, new_opt, cut.index, cut.dropped)


def _apply_cut(model: nnx.Module, cut: Cut, layers: dict[str, Layer]) -> nnx.Module:
    new = nnx.clone(model)
    modules = _modules(new)
    for name in layers:
        module = modules[name][1]
        kernel = cut.kernels[name]
        module.kernel.set_value(_to_device(kernel, _value(module.kernel).dtype))
        if cut.biases[name] is not None:
            module.bias.set_value(_to_device(cut.biases[name], _value(module.bias).dtype))
        module.in_features = kernel.shape[-2]
        module.out_features = kernel.shape[-1]
        if isinstance(module, nnx.Conv):
            module.kernel_shape = tuple(kernel.shape)
    return new


def shrink_optimizer(
    model: nnx.Module, optimizer: nnx.Optimizer, new_model: nnx.Module, index: Index
) -> nnx.Optimizer:
    """An ``nnx.Optimizer`` for ``new_model`` that continues ``optimizer``'s state.

    :func:`shrink` calls it when given an optimizer; call it yourself to slice the state of
    an optimizer for a model shrunk earlier. The moments (``mu``, ``nu``, masks of
    :func:`fisher_optax.pruned`, ...) are sliced with ``index``; the step and ``count`` carry
    over, so Adam goes on with its bias correction where it was. A
    :func:`fisher_optax.pruned` state keeps its mask (sliced) and its schedule, whose target
    sparsity then applies to the smaller model.

    Args:
      model: the model before surgery.
      optimizer: the optimizer of ``model``.
      new_model: the model after surgery (``shrink(...).model``).
      index: ``shrink(...).index``.

    Returns:
      A new ``nnx.Optimizer`` (same ``tx`` and ``wrt``) for ``new_model``.

    Raises:
      ValueError: if ``index`` names a path ``model`` lacks, or the sliced state does not
        fit ``new_model``.
      TypeError: if an argument has the wrong type.
    """
    for value, name, cls in (
        (model, "model", nnx.Module),
        (new_model, "new_model", nnx.Module),
        (optimizer, "optimizer", nnx.Optimizer),
    ):
        if not isinstance(value, cls):
            raise TypeError(
                f"{name} must be a flax.nnx.{cls.__name__}, got {type(value).__name__} "
                "(the order is model, optimizer, new_model, index)."
            )
    params = nnx.state(model, optimizer.wrt)
    state = slice_opt_state(optimizer.opt_state, params, index)
    new_opt = nnx.Optimizer(new_model, optimizer.tx, wrt=optimizer.wrt)
    check_matching(
        jax.tree.map(jnp.shape, new_opt.opt_state),
        jax.tree.map(jnp.shape, state),
        ref_name="the new optimizer state",
        other_name="the sliced optimizer state",
    )
    new_opt.opt_state = nnx.data(state)
    new_opt.step.set_value(optimizer.step.get_value())
    return new_opt


def prunable_units(model: nnx.Module, *, pairs: Sequence[Pair] | None = None) -> Any:
    """Which layers may lose units: those whose outputs feed another layer.

    Pass it as ``prunable=`` to :func:`fisher_optax.unit_mask` so that the output layer
    keeps its units.

    Args:
      model: as for :func:`shrink`.
      pairs: as for :func:`shrink`.

    Returns:
      A pytree over ``nnx.state(model, nnx.Param)``: True at the kernels of producing
      layers, False at other kernels, ``None`` elsewhere (it lines up with
      :func:`fisher_optax.unit_scores`).
    """
    layers, edges = _graph(model, pairs, None)
    producers = {layers[e.producer].path + "['kernel']" for e in edges}
    kernels = {layer.path + "['kernel']" for layer in layers.values()}

    def flag(path, leaf):
        p = keystr(path)
        if p.endswith("['kernel']") and (p in kernels or jnp.ndim(leaf) >= 2):
            return p in producers
        return None

    return jax.tree_util.tree_map_with_path(flag, nnx.state(model, nnx.Param))


# --------------------------------------------------------------------------------------------
# Linen


class ShrunkLinen(NamedTuple):
    """Result of :func:`shrink_linen`.

    Attributes:
      variables: the new variables, same tree structure, smaller arrays.
      opt_state: the optax state sliced to them, or ``None`` when none was given.
      features: the new number of output features of each named layer (``features=`` of
        ``nn.Dense``/``nn.Conv`` in the module definition).
      index: kept indices per parameter path (``keystr`` paths), for
        :func:`fisher_optax.slice_opt_state`.
    """

    variables: Params
    opt_state: Any
    features: dict[str, int]
    index: Index


def _linen_exact(kernel: np.ndarray, padding: str) -> bool:
    if kernel.ndim == 2:
        return True
    if padding in ("VALID", "CIRCULAR", "REFLECT"):
        return True
    return all(k == 1 for k in kernel.shape[:-2])


def _linen_probe(apply: Callable, variables: Params, first: Layer) -> jax.Array:
    for shape in _square_inputs(first.kernel.shape[-2], first.kernel.ndim):
        try:
            jax.eval_shape(apply, variables, jax.ShapeDtypeStruct(shape, jnp.float32))
        except Exception:  # not this shape: try the next one
            continue
        return jax.device_put(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    raise ValueError(
        "surgery checks the shrunk model on a probe input, and could not build one from the "
        f"shape of {first.name!r}; pass example_input= (one batch the model accepts)."
    )


def _verify_linen(apply, variables, new_vars, layers, cut, drop, prefix, example_input):
    def node(tree, name):
        for k in (*prefix, *name.split(".")):
            tree = tree[k]
        return tree

    masked = jax.tree.map(lambda x: x, variables)  # new containers, same arrays
    for name, d in drop.items():
        sub = node(masked, name)
        k = np.array(sub["kernel"], copy=True)
        k[..., np.asarray(d, bool)] = 0
        sub["kernel"] = _to_device(k, jnp.result_type(sub["kernel"]))

    def run(log, tree, x, shrunk):
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.Conv):
                return next_fun(*args, **kwargs)
            name = ".".join(str(k) for k in module.scope.path)
            if name not in layers:
                return next_fun(*args, **kwargs)
            if shrunk:  # the original definition, at the new width
                sub = node(tree, name)
                small = module.clone(parent=None, features=int(sub["kernel"].shape[-1]))
                y = small.apply({"params": sub}, *args, **kwargs)
            else:
                y = next_fun(*args, **kwargs)
            log.setdefault(name, []).append(y)
            log.setdefault("", []).append(name)
            return y

        with nn.intercept_methods(interceptor):
            return apply(tree, x)

    first = layers[next(iter(layers))]
    x = _linen_probe(apply, variables, first) if example_input is None else example_input
    before = _logged(lambda log, t, x: run(log, t, x, False), masked, x)
    after = _logged(lambda log, t, x: run(log, t, x, True), new_vars, x)
    _compare(before, after, layers, cut)


def shrink_linen(
    model: nn.Module | Callable[[Params, jax.Array], jax.Array],
    variables: Params,
    opt_state: Any = None,
    *,
    unit_mask: Mask | None = None,
    pairs: Sequence[Pair],
    activation: Callable[[jax.Array], jax.Array] | None = None,
    conv_padding: str | Mapping[str, str] = "SAME",
    example_input: jax.Array | None = None,
) -> ShrunkLinen:
    """Surgery on a Linen model: :func:`shrink` for a module and its variables, checked.

    The new variables go with the same module definition built with the new ``features``
    of each cut layer. Before returning, the model is run on a probe input twice: with the
    masked variables, and with the new ones, each cut ``nn.Dense``/``nn.Conv`` called at its
    new width (``nn.intercept_methods``); an error names the first cut layer whose output
    differs at the kept units (a residual branch, a BatchNorm between a pair, ...).

    Args:
      model: the ``nn.Module``, or a function ``apply(variables, x)`` (for example
        ``lambda v, x: module.apply(v, x, train=False)`` for a module with a train flag).
      variables: Linen variables (``{'params': {...}, 'batch_stats': ...}``) or the inner
        ``params`` dict.
      opt_state: the optax state of ``variables['params']`` (or of ``variables`` when it has
        no ``'params'``), or ``None``; returned sliced to the new shapes.
      unit_mask: a unit mask over ``variables`` (True keeps a unit), or ``None``.
      pairs: ``(producer, consumer)`` or ``(producer, consumer, activation)`` layer names,
        dot paths inside ``variables['params']`` (``'Dense_0'``, ``'block.Conv_1'``), with the
        meaning they have for :func:`shrink`.
      activation: the activation between pairs that do not name their own.
      conv_padding: the padding of the Conv layers (a string, or per layer name): with
        ``'SAME'`` (Linen's default) or explicit zero padding a Conv consumer cannot absorb a
        dropped unit's non-zero constant exactly, and such units are kept.
      example_input: one batch the model accepts, for the check; by default built from the
        first pair's producer as for :func:`shrink`.

    Returns:
      A :class:`ShrunkLinen`: new variables, the sliced optimizer state, new ``features``
      per layer for the module definition, and the kept indices.

    Raises:
      ValueError: if a pair's shapes do not chain, a named entry is not a Dense/Conv
        parameter dict, the unit mask does not match ``variables``, or the check finds a
        layer whose output differs.
      TypeError: if ``variables`` is not a dict or ``model`` not callable.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import fisher_optax.flax
      >>> mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> variables = mlp.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> keep = {"params": {"layers_0": {"kernel": jnp.array([True, False, True, False])}}}
      >>> out = fisher_optax.flax.shrink_linen(
      ...     mlp, variables, unit_mask=keep, pairs=[("layers_0", "layers_2")],
      ...     activation=nn.relu)
      >>> out.features, out.variables["params"]["layers_2"]["kernel"].shape
      ({'layers_0': 2, 'layers_2': 2}, (2, 2))
    """
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"variables must be a Linen variables dict, got {type(variables).__name__}; for "
            "nnx models use fisher_optax.flax.shrink."
        )
    apply = model.apply if isinstance(model, nn.Module) else model
    if not callable(apply):
        raise TypeError(f"model must be an nn.Module or apply(variables, x), got {model!r}.")
    prefix = ("params",) if "params" in variables else ()
    root = variables["params"] if prefix else variables

    def layer(name: str) -> Layer:
        node = root
        for k in name.split("."):
            if not isinstance(node, Mapping) or k not in node:
                found = [p[: -len(".kernel")] for p in _linen_kernels(root)]
                raise ValueError(f"the params have no layer {name!r}; their layers are {found}.")
            node = node[k]
        if not isinstance(node, Mapping) or "kernel" not in node:
            raise ValueError(
                f"{name!r} is not a Dense or Conv layer (no 'kernel' in its parameters); "
                "surgery supports nn.Dense and nn.Conv."
            )
        kernel = np.asarray(node["kernel"])
        pad = conv_padding if isinstance(conv_padding, str) else conv_padding.get(name, "SAME")
        bias = node.get("bias")
        return Layer(
            name=name,
            path=_key((*prefix, *name.split("."))),
            kernel=kernel,
            bias=None if bias is None else np.asarray(bias),
            constant_exact=_linen_exact(kernel, pad),
        )

    if activation is not None:
        _validate.callable_arity(activation, "activation", "activation(x)", 1)
    layers: dict[str, Layer] = {}
    edges = []
    for pair in _check_pairs(pairs):
        for name in pair[:2]:
            layers.setdefault(name, layer(name))
        act = pair[2] if len(pair) == 3 else activation
        edges.append(_pair_edge(layers[pair[0]], layers[pair[1]], act))
    drop = {}
    if unit_mask is not None:
        by_kernel = {lay.path + "['kernel']": n for n, lay in layers.items()}
        names = {
            _key((*prefix, *n.split("."))) + "['kernel']": n
            for n in (p[: -len(".kernel")] for p in _linen_kernels(root))
        }
        for kpath, keep in kernel_units(variables, unit_mask).items():
            if kpath not in by_kernel:
                if kpath not in names:
                    raise ValueError(f"the unit mask has units at {kpath}, not a layer kernel.")
                layers[names[kpath]] = layer(names[kpath])
                by_kernel[kpath] = names[kpath]
            drop[by_kernel[kpath]] = ~np.asarray(keep, bool)
    cut = cut_units(layers, edges, drop)
    new_leaves = {}
    for name, lay in layers.items():
        new_leaves[lay.path + "['kernel']"] = cut.kernels[name]
        if cut.biases[name] is not None:
            new_leaves[lay.path + "['bias']"] = cut.biases[name]

    def replace(path, leaf):
        p = keystr(path)
        return _to_device(new_leaves[p], jnp.result_type(leaf)) if p in new_leaves else leaf

    new_vars = jax.tree_util.tree_map_with_path(replace, variables)
    _verify_linen(apply, variables, new_vars, layers, cut, drop, prefix, example_input)
    new_state = None
    if opt_state is not None:
        strip = len(_key(prefix)) if prefix else 0
        index = {p[strip:]: i for p, i in cut.index.items()}
        new_state = slice_opt_state(opt_state, root, index)
    features = {name: int(cut.kernels[name].shape[-1]) for name in layers}
    return ShrunkLinen(new_vars, new_state, features, cut.index)


def _linen_kernels(root: Mapping) -> list[str]:
    """Dot paths of the kernels in a Linen params dict (``'block.Conv_1.kernel'``)."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(root)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys and keys[-1] == "kernel":
            out.append(".".join(keys))
    return out


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
      count: only surgery removes them.
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
