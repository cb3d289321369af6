"""Flax integration: NNX and Linen models. The only module that imports Flax.

Masks, Fisher diagonals and quantized weights are pytrees shaped like
``nnx.state(model, nnx.Param)`` (NNX) or like the ``{'params': ...}`` dict (Linen); the
functions here write them back into a model and cut pruned units out of it physically
(*surgery*), so that a pruned model is smaller and faster at inference, not just sparse.

Surgery semantics. A unit (a Dense column, a Conv output channel) is *dropped* when the unit
mask says so or when all its incoming weights are zero. The shrunk model computes exactly
what the original computes with the dropped units' incoming weights zeroed (the *masked*
model): a dropped unit then outputs the constant ``act(bias)``, which is added to the next
layer's bias through the rows that read it (``act(b) * W_next[row]``, summed over a Conv's
window or over the flatten blocks). That fold is exact for any elementwise activation when
the next layer is Dense, or a Conv that keeps a constant input constant (VALID, CIRCULAR or
REFLECT padding). A zero-padded Conv does not (its border outputs see the padding), so there
a unit whose constant is non-zero is kept, with its incoming weights zeroed, and a warning
says how many; zero the dropped units' biases (``expand_unit_mask(..., bias=True)``) to
remove them with relu-like activations, where ``act(0) = 0``.
"""

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fisher_optax._tree import check_matching
from fisher_optax._types import Mask, Params
from fisher_optax.structured import (
    Cut,
    Edge,
    Index,
    Layer,
    _unit_mask_by_kernel,
    cut_units,
    path_tuple,
    slice_opt_state,
)

__all__ = [
    "ShrunkParams",
    "apply_mask_to_model",
    "opt_variables_to_params",
    "param_count_and_flops",
    "prunable_units",
    "shrink",
    "shrink_index",
    "shrink_optimizer",
    "shrink_params",
    "shrink_with_optimizer",
    "update_model",
]

Pair = tuple[str, str] | tuple[str, str, Callable[[jax.Array], jax.Array]]


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
        return nnx.Param(x.get_value()) if isinstance(x, nnx.training.optimizer.OptVariable) else x

    return jax.tree.map(
        rewrap, tree, is_leaf=lambda x: isinstance(x, nnx.training.optimizer.OptVariable)
    )


# --------------------------------------------------------------------------------------------
# Writing weights back


def update_model(model: nnx.Module, params: Params) -> None:
    """Write ``params`` into ``model``'s ``nnx.Param`` variables, in place (``nnx.update``).

    Args:
      model: an ``nnx`` module.
      params: a pytree that lines up with ``nnx.state(model, nnx.Param)`` by path and shape:
        an ``nnx.State``, or the output of :func:`fisher_optax.apply_mask` or
        ``fisher_optax.dequantize`` on it. Values are cast to each variable's dtype.

    Raises:
      ValueError: naming the first path where ``params`` does not match the model.

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
    state = nnx.state(model, nnx.Param)
    leaves = check_matching(
        state, params, ref_name="nnx.state(model, nnx.Param)", other_name="params"
    )
    flat, treedef = jax.tree.flatten(state)
    new = [_to_device(v, old.dtype) for old, v in zip(flat, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def apply_mask_to_model(model: nnx.Module, mask: Mask) -> None:
    """Zero the weights that ``mask`` prunes, in the model itself (in place).

    Args:
      model: an ``nnx`` module.
      mask: a boolean pytree shaped like ``nnx.state(model, nnx.Param)`` (True keeps), e.g.
        from :func:`fisher_optax.two_stage_mask` or :func:`fisher_optax.expand_unit_mask`.

    Raises:
      ValueError: if the mask does not line up with the model's parameters.
    """
    from fisher_optax.masks import apply_mask

    state = nnx.state(model, nnx.Param)
    check_matching(state, mask, ref_name="nnx.state(model, nnx.Param)", other_name="mask")
    update_model(model, jax.jit(apply_mask)(state, mask))  # one compile, not one per leaf


# --------------------------------------------------------------------------------------------
# The layer graph of an nnx model


def _to_device(x: Any, dtype: Any = None) -> jax.Array:
    """``x`` as a device array. Host data goes through ``jax.device_put``: ``jnp.asarray`` of a
    NumPy array compiles a kernel per shape, which dominated the cost of surgery."""
    if isinstance(x, jax.Array):
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    return jax.device_put(np.asarray(x, dtype=dtype))


def _name(path: tuple[Hashable, ...]) -> str:
    return ".".join(str(k) for k in path)


def _parse(name: str) -> tuple[Hashable, ...]:
    return tuple(int(k) if k.isdigit() else k for k in name.split("."))


def _resolve(model: Any, path: tuple[Hashable, ...], *, what: str) -> Any:
    node = model
    for k in path:
        try:
            node = node[k] if isinstance(k, int) else getattr(node, k)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise ValueError(
                f"shrink: the model has no layer {_name(path)!r} ({what}); name layers by "
                "their attribute path, e.g. 'conv1' or 'block.fc' or 'layers.0'."
            ) from None
    return node


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


def _layer(name: str, path: tuple[Hashable, ...], module: Any) -> Layer:
    if isinstance(module, nnx.Conv):
        if module.feature_group_count != 1:
            raise ValueError(
                f"shrink does not support grouped convolutions (nnx.Conv with "
                f"feature_group_count={module.feature_group_count}) at {name!r}."
            )
        if getattr(module, "mask", None) is not None:
            raise ValueError(f"shrink does not support nnx.Conv with a kernel mask at {name!r}.")
        exact = _conv_constant_exact(module)
    elif isinstance(module, nnx.Linear):
        exact = True
    else:
        raise ValueError(
            f"shrink does not support layer type {type(module).__name__} at {name!r}: it cuts "
            "nnx.Linear and nnx.Conv layers joined by elementwise functions (activations, "
            "flatten)."
        )
    bias = _value(getattr(module, "bias", None))
    return Layer(
        name=name,
        path=path,
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
            f"shrink: {what} is not elementwise (or flatten): shrink supports elementwise "
            "activations and an NHWC flatten between layers; pooling, normalisation over "
            "features or transposes are not supported."
        )


def _chain_error(p: Layer, q: Layer, got: int) -> ValueError:
    return ValueError(
        f"shrink: the pair ({p.name!r}, {q.name!r}) does not chain: {p.name!r} gives "
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


def _sequential_edge(p: Layer, q: Layer, fns: Sequence[Callable]) -> Edge:
    """The edge between consecutive layers of an ``nnx.Sequential``, found by probing."""

    def g(x):
        for f in fns:
            x = f(x)
        return x

    shape = _probe_shape(p, q)
    c, q_in = p.kernel.shape[-1], q.kernel.shape[-2]
    what = f"the function between {p.name!r} and {q.name!r}"
    try:
        y = jax.eval_shape(g, jax.ShapeDtypeStruct(shape, jnp.float32))
    except Exception as err:  # the user's function, any failure
        raise ValueError(f"shrink: {what} fails on a {shape} input: {err}") from err
    if y.shape[-1] != q_in:
        raise _chain_error(p, q, y.shape[-1])
    if int(np.prod(y.shape)) != int(np.prod(shape)):
        raise ValueError(
            f"shrink: {what} maps {shape} to {y.shape}, changing the number of values "
            "(pooling?); shrink supports elementwise activations and flatten."
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
            f"shrink: {what} works for {c} features but not for {x.shape[-1]} ({problem}); "
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
    out = []
    for pair in pairs:
        if (
            not isinstance(pair, tuple | list)
            or len(pair) not in (2, 3)
            or not all(isinstance(n, str) for n in pair[:2])
        ):
            raise ValueError(
                f"shrink: each pair must be (producer, consumer) or (producer, consumer, "
                f"activation) with layer names as strings, got {pair!r}."
            )
        out.append(tuple(pair))
    return out


def _graph(
    model: nnx.Module, pairs: Sequence[Pair] | None, activation: Callable | None
) -> tuple[dict[str, Layer], list[Edge]]:
    layers: dict[str, Layer] = {}
    edges: list[Edge] = []
    if pairs is None:
        if not isinstance(model, nnx.Sequential):
            raise ValueError(
                f"shrink: a {type(model).__name__} is not an nnx.Sequential, so its layer "
                "pairs cannot be read off; name them: pairs=[('conv1', 'conv2'), "
                "('conv2', 'fc1')], activation=jax.nn.relu."
            )
        prev, fns = None, []
        for i, item in enumerate(model.layers):
            path = ("layers", i)
            if isinstance(item, nnx.Linear | nnx.Conv) or (
                isinstance(item, nnx.Module) and not isinstance(item, nnx.Dropout)
            ):
                layer = _layer(_name(path), path, item)
                layers[layer.name] = layer
                if prev is not None:
                    edges.append(_sequential_edge(prev, layer, fns))
                prev, fns = layer, []
            elif isinstance(item, nnx.Dropout):
                continue  # the identity at inference, where surgery is exact
            elif callable(item):
                fns.append(item)
            else:
                raise ValueError(f"shrink: layers[{i}] of the nnx.Sequential is not callable.")
        return layers, edges
    for pair in _check_pairs(pairs):
        for name in pair[:2]:
            if name not in layers:
                path = _parse(name)
                layers[name] = _layer(name, path, _resolve(model, path, what="named in pairs"))
        act = pair[2] if len(pair) == 3 else activation
        edges.append(_pair_edge(layers[pair[0]], layers[pair[1]], act))
    return layers, edges


def _drop_from_unit_mask(
    model: nnx.Module, layers: dict[str, Layer], unit_mask: Mask | None
) -> dict[str, np.ndarray]:
    if unit_mask is None:
        return {}
    units = _unit_mask_by_kernel(nnx.state(model, nnx.Param), unit_mask, where="shrink")
    by_path = {layer.path: name for name, layer in layers.items()}
    drop = {}
    for kpath, keep in units.items():
        lpath = kpath[:-1]
        if kpath[-1] != "kernel" or lpath not in by_path:
            module = _resolve(model, lpath, what="in the unit mask")
            layer = _layer(_name(lpath), lpath, module)  # raises for unsupported types
            layers[layer.name] = layer
            by_path[lpath] = layer.name
        drop[by_path[lpath]] = ~np.asarray(keep, bool)
    return drop


def _cut_model(model, unit_mask, pairs, activation, warn=True) -> tuple[Cut, dict[str, Layer]]:
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"shrink: expected an nnx.Module, got {type(model).__name__}; for Linen params "
            "use fisher_optax.flax.shrink_params."
        )
    layers, edges = _graph(model, pairs, activation)
    drop = _drop_from_unit_mask(model, layers, unit_mask)
    return cut_units(layers, edges, drop, warn=warn), layers


def shrink(
    model: nnx.Module,
    unit_mask: Mask | None = None,
    *,
    pairs: Sequence[Pair] | None = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
) -> nnx.Module:
    """A new, smaller model without the dropped units; the original is left as it is.

    The producing layer loses the dropped output features (kernel columns and bias), the
    consuming layer the matching input rows; for a Conv followed by an NHWC flatten
    (``x.reshape(n, -1)``) and a Dense layer, the block of rows ``s * C + c`` of each dropped
    channel ``c``. Units whose incoming weights are all zero are dropped too. The result
    computes what ``model`` computes with the dropped units' incoming weights zeroed, with
    their constant outputs folded into the next layer's bias; see the module docstring for
    where that fold is exact and what happens where it is not.

    Args:
      model: an ``nnx.Sequential`` of ``nnx.Linear``/``nnx.Conv`` layers, elementwise
        functions and flatten (``nnx.Dropout`` is taken as the identity of inference), or
        any ``nnx`` module when ``pairs`` is given.
      unit_mask: a unit mask over ``nnx.state(model, nnx.Param)`` (True keeps a unit), from
        :func:`fisher_optax.unit_mask`; ``None`` drops only units with all-zero weights.
      pairs: ``(producer, consumer)`` or ``(producer, consumer, activation)`` names of
        layers (attribute paths such as ``'conv1'`` or ``'block.fc'``) where the producer's
        output, after an elementwise ``activation`` (and a flatten when a Conv feeds a Dense),
        is the consumer's whole input, and goes nowhere else (no residual branch, no
        concatenation: surgery cannot see the model's ``__call__``).
      activation: the activation between every pair that does not name its own. Needed to
        fold dropped units' constants; ``lambda x: x`` for none.

    Returns:
      A new module of the same type with smaller ``Linear``/``Conv`` layers (``in_features``,
      ``out_features``, kernels and biases updated).

    Raises:
      ValueError: if a pair's shapes do not chain, a layer type is not supported (named),
        the unit mask does not match the model, a function between layers is not
        elementwise, or the mask drops units of the output layer.
      TypeError: if ``model`` is not an ``nnx.Module``.
    """
    cut, layers = _cut_model(model, unit_mask, pairs, activation)
    return _apply_cut(model, cut, layers)


def _apply_cut(model: nnx.Module, cut: Cut, layers: dict[str, Layer]) -> nnx.Module:
    new = nnx.clone(model)
    for name, layer in layers.items():
        module = _resolve(new, layer.path, what="")
        kernel = cut.kernels[name]
        module.kernel.set_value(_to_device(kernel, _value(module.kernel).dtype))
        if cut.biases[name] is not None:
            module.bias.set_value(_to_device(cut.biases[name], _value(module.bias).dtype))
        module.in_features = kernel.shape[-2]
        module.out_features = kernel.shape[-1]
        if isinstance(module, nnx.Conv):
            module.kernel_shape = tuple(kernel.shape)
    return new


def shrink_index(
    model: nnx.Module,
    unit_mask: Mask | None = None,
    *,
    pairs: Sequence[Pair] | None = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
) -> Index:
    """The entries :func:`shrink` keeps, for :func:`fisher_optax.slice_opt_state`.

    Same arguments and decisions as :func:`shrink`.

    Returns:
      ``{path: per-axis kept indices}`` with paths as in ``nnx.state(model, nnx.Param)``
      (e.g. ``('layers', 0, 'kernel')``); ``None`` on an axis keeps it whole.
    """
    cut, _ = _cut_model(model, unit_mask, pairs, activation, warn=False)
    return cut.index


def shrink_optimizer(
    optimizer: nnx.Optimizer, model: nnx.Module, new_model: nnx.Module, index: Index
) -> nnx.Optimizer:
    """An ``nnx.Optimizer`` for ``new_model`` that continues ``optimizer``'s state.

    The moments (``mu``, ``nu``, masks of :func:`fisher_optax.pruned`, ...) are sliced with
    ``index``; the step and ``count`` carry over, so Adam goes on with its bias correction
    where it was. A :func:`fisher_optax.pruned` state keeps its mask (sliced) and its
    schedule, whose target sparsity then applies to the smaller model.

    Args:
      optimizer: the optimizer of ``model``.
      model: the model before surgery.
      new_model: the model after surgery (from :func:`shrink`).
      index: from :func:`shrink_index` with the arguments given to :func:`shrink`.

    Returns:
      A new ``nnx.Optimizer`` (same ``tx`` and ``wrt``) for ``new_model``.
    """
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


def shrink_with_optimizer(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    unit_mask: Mask | None = None,
    *,
    pairs: Sequence[Pair] | None = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[nnx.Module, nnx.Optimizer]:
    """:func:`shrink` and :func:`shrink_optimizer` in one call.

    Returns:
      ``(new_model, new_optimizer)``; fine-tuning continues with
      ``new_optimizer.update(new_model, grads)``.
    """
    cut, layers = _cut_model(model, unit_mask, pairs, activation)
    new = _apply_cut(model, cut, layers)
    return new, shrink_optimizer(optimizer, model, new, cut.index)


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
    producers = {layers[e.producer].path for e in edges}
    kernels = {layer.path for layer in layers.values()}

    def flag(path, leaf):
        p = path_tuple(path)
        if p[-1:] == ("kernel",) and (p[:-1] in kernels or jnp.ndim(leaf) >= 2):
            return p[:-1] in producers
        return None

    return jax.tree_util.tree_map_with_path(flag, nnx.state(model, nnx.Param))


# --------------------------------------------------------------------------------------------
# Linen


class ShrunkParams(NamedTuple):
    """Result of :func:`shrink_params`.

    Attributes:
      params: the new parameters, same tree structure, smaller arrays.
      features: the new number of output features of each named layer (``features=`` of
        ``nn.Dense``/``nn.Conv`` in the module definition).
      index: kept indices per parameter path, for :func:`fisher_optax.slice_opt_state`.
    """

    params: Params
    features: dict[str, int]
    index: Index


def _linen_exact(kernel: np.ndarray, padding: str) -> bool:
    if kernel.ndim == 2:
        return True
    if padding in ("VALID", "CIRCULAR", "REFLECT"):
        return True
    return all(k == 1 for k in kernel.shape[:-2])


def shrink_params(
    params: Params,
    unit_mask: Mask | None = None,
    *,
    pairs: Sequence[Pair],
    activation: Callable[[jax.Array], jax.Array] | None = None,
    conv_padding: str | Mapping[str, str] = "SAME",
) -> ShrunkParams:
    """Surgery on Linen parameters: :func:`shrink` for a ``{'params': ...}`` dict.

    Args:
      params: Linen variables (``{'params': {...}}``) or the inner ``params`` dict.
      unit_mask: a unit mask over ``params`` (True keeps a unit), or ``None``.
      pairs: ``(producer, consumer)`` or ``(producer, consumer, activation)`` layer names,
        dot paths inside ``params['params']`` (``'Dense_0'``, ``'block.Conv_1'``), with the
        meaning they have for :func:`shrink`.
      activation: the activation between pairs that do not name their own.
      conv_padding: the padding of the Conv layers (a string, or per layer name): with
        ``'SAME'`` (Linen's default) or explicit zero padding a Conv consumer cannot absorb a
        dropped unit's non-zero constant exactly, and such units are kept (see
        :func:`shrink`).

    Returns:
      A :class:`ShrunkParams`: new params, new ``features`` per layer for the module
      definition, and the kept indices for :func:`fisher_optax.slice_opt_state`.

    Raises:
      ValueError: if a pair's shapes do not chain, a named entry is not a Dense/Conv
        parameter dict, or the unit mask does not match ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import fisher_optax.flax
      >>> mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> params = mlp.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> keep = {"params": {"layers_0": {"kernel": jnp.array([True, False, True, False])}}}
      >>> out = fisher_optax.flax.shrink_params(
      ...     params, keep, pairs=[("layers_0", "layers_2")], activation=nn.relu)
      >>> out.features, out.params["params"]["layers_2"]["kernel"].shape
      ({'layers_0': 2, 'layers_2': 2}, (2, 2))
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"shrink_params: expected a Linen params dict, got {type(params).__name__}; for "
            "nnx models use fisher_optax.flax.shrink."
        )
    prefix = ("params",) if "params" in params else ()
    root = params["params"] if prefix else params

    def layer(name: str) -> Layer:
        node = root
        for k in name.split("."):
            if not isinstance(node, Mapping) or k not in node:
                raise ValueError(f"shrink_params: params have no layer {name!r}.")
            node = node[k]
        if not isinstance(node, Mapping) or "kernel" not in node:
            raise ValueError(
                f"shrink_params: {name!r} is not a Dense or Conv layer (no 'kernel' in its "
                "parameters); surgery supports nn.Dense and nn.Conv."
            )
        kernel = np.asarray(node["kernel"])
        pad = conv_padding if isinstance(conv_padding, str) else conv_padding.get(name, "SAME")
        bias = node.get("bias")
        return Layer(
            name=name,
            path=(*prefix, *name.split(".")),
            kernel=kernel,
            bias=None if bias is None else np.asarray(bias),
            constant_exact=_linen_exact(kernel, pad),
        )

    layers: dict[str, Layer] = {}
    edges = []
    for pair in _check_pairs(pairs):
        for name in pair[:2]:
            layers.setdefault(name, layer(name))
        act = pair[2] if len(pair) == 3 else activation
        edges.append(_pair_edge(layers[pair[0]], layers[pair[1]], act))
    drop = {}
    if unit_mask is not None:
        by_path = {lay.path: n for n, lay in layers.items()}
        for kpath, keep in _unit_mask_by_kernel(params, unit_mask, where="shrink_params").items():
            name = ".".join(str(k) for k in kpath[len(prefix) : -1])
            if kpath[:-1] not in by_path:
                layers[name] = layer(name)
                by_path[kpath[:-1]] = name
            drop[by_path[kpath[:-1]]] = ~np.asarray(keep, bool)
    cut = cut_units(layers, edges, drop)
    new_leaves = {}
    for name, lay in layers.items():
        new_leaves[(*lay.path, "kernel")] = cut.kernels[name]
        if cut.biases[name] is not None:
            new_leaves[(*lay.path, "bias")] = cut.biases[name]

    def replace(path, leaf):
        p = path_tuple(path)
        return _to_device(new_leaves[p], jnp.result_type(leaf)) if p in new_leaves else leaf

    new_params = jax.tree_util.tree_map_with_path(replace, params)
    features = {name: int(cut.kernels[name].shape[-1]) for name in layers}
    return ShrunkParams(new_params, features, cut.index)


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
