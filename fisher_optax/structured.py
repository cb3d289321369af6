"""Structured pruning: score whole output units, choose which to drop, and cut them out.

A *unit* is one output feature of a layer: a column of a Dense kernel ``(in, out)`` or an
output channel of a Conv kernel ``(*window, in, out)``; its incoming weights are
``kernel[..., j]``. Dropping unit ``j`` means zeroing its incoming weights. Its output is then
the constant ``act(bias[j])``, which the next layer can absorb into its own bias, so the unit
can be removed physically with no change to what the network computes (see
:func:`fisher_optax.flax.shrink`).

This module is framework-free: it works on any pytree of parameters (a Linen
``{'params': ...}`` dict, a Flax ``nnx.State``, a plain dict). Unit scores and unit masks are
pytrees shaped like the parameters in which every kernel leaf holds one value per unit
(shape ``(out,)``) and every other leaf is ``None``.
"""

import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fisher_optax._tree import check_matching, strip_value
from fisher_optax._types import Fisher, Mask, Params, Scores

__all__ = [
    "expand_unit_mask",
    "slice_opt_state",
    "unit_mask",
    "unit_scores",
]

UNIT_CRITERIA = ("saliency", "fisher", "magnitude")

Path = tuple[Hashable, ...]
Index = dict[Path, tuple[np.ndarray | None, ...]]
"""Kept indices of a surgery: for each parameter path, one index array per axis (``None``
keeps the whole axis)."""


# --------------------------------------------------------------------------------------------
# Paths


def path_tuple(path: Sequence[Any]) -> Path:
    """A jax key path as a tuple of plain keys, with Flax's ``.value`` hop left out."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                out.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            out.append(k.key)
        else:
            out.append(str(k))
    return tuple(out)


def path_str(path: Path) -> str:
    """``('layers', 0, 'kernel')`` as ``['layers'][0]['kernel']``."""
    return "".join(f"[{k!r}]" for k in path) or "<root>"


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _flat(tree: Any) -> list[tuple[Path, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
    return [(path_tuple(p), leaf) for p, leaf in flat]


def _resolve_prunable(params: Any, prunable: Any, default: Callable[[Any], bool]) -> list[bool]:
    """One flag per leaf of ``params``: ``None`` (default rule), a predicate on
    ``(path, leaf)`` with ``path`` the jax key path (``.value`` hop left out, as
    :func:`fisher_optax.topk_mask` passes it), or a pytree of bools."""
    if prunable is None:
        return [bool(default(leaf)) for _, leaf in _flat(params)]
    if callable(prunable):
        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        return [bool(prunable(strip_value(p), leaf)) for p, leaf in flat]
    flags = check_matching(
        jax.tree.map(lambda _: True, params), prunable, ref_name="params", other_name="prunable"
    )
    return [bool(f) for f in flags]


# --------------------------------------------------------------------------------------------
# Scores and masks


def unit_scores(
    params: Params,
    fisher: Fisher | None = None,
    *,
    criterion: str = "saliency",
    prunable: Any = None,
) -> Scores:
    r"""Importance of each output unit: its per-weight scores summed over its incoming weights.

    For a kernel :math:`W` with units along the last axis (Dense ``(in, out)``, Conv
    ``(*window, in, out)``) and its Fisher diagonal :math:`F`, unit :math:`j` scores

    .. math::
      s_j = \sum_{i} \begin{cases}
        \tfrac12 F_{ij} W_{ij}^2 & \text{criterion="saliency"} \\
        F_{ij} & \text{criterion="fisher"} \\
        |W_{ij}| & \text{criterion="magnitude"}
      \end{cases}

    where :math:`i` runs over every other axis. ``"saliency"`` is the optimal-brain-damage
    estimate of the loss increase when the unit's incoming weights are zeroed, with the
    Fisher in place of the Hessian diagonal (LeCun et al. 1989; Theis et al. 2018), summed
    over the unit: it ignores the off-diagonal terms between the unit's weights, so it is an
    approximation. The unit's bias is not scored: dropping a unit keeps its constant output
    ``act(bias)``, which surgery folds into the next layer. ``"magnitude"`` is the L1 norm of
    the filter (Li et al. 2017). With a Fisher read from Adam (:func:`fisher_from_state`),
    absolute saliencies depend on the batch size (see there); rankings do not.

    Args:
      params: a pytree of parameters (Linen dict, ``nnx.State``, ...). Score weights that
        an unstructured mask already pruned as zeros: pass ``apply_mask(params, mask)``.
      fisher: the Fisher diagonal, shaped like ``params``; not needed for ``"magnitude"``.
      criterion: ``"saliency"`` (default), ``"fisher"`` or ``"magnitude"``.
      prunable: which leaves are unit-bearing kernels: ``None`` for every leaf with
        ``ndim >= 2``, a predicate on ``(path, leaf)`` (``path`` a jax key path tuple, as
        :func:`fisher_optax.topk_mask` passes it; ``jax.tree_util.keystr(path)`` reads
        ``"['dense']['kernel']"``) or a pytree with a bool per leaf of ``params``.

    Returns:
      A pytree with the structure of ``params``: each kernel leaf holds a float32 ``(out,)``
      vector of unit scores, every other leaf is ``None``.

    Raises:
      ValueError: for an unknown criterion, a missing Fisher, a Fisher that does not match
        ``params`` (naming the first mismatching path), or a selected leaf with ``ndim < 2``.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> params = {"dense": {"kernel": jnp.array([[1.0, 2.0], [3.0, 0.0]]),
      ...                     "bias": jnp.zeros(2)}}
      >>> fisher = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> scores = fisher_optax.unit_scores(params, fisher)
      >>> scores["dense"]["kernel"], scores["dense"]["bias"]
      (Array([5., 2.], dtype=float32), None)

    References:
      LeCun, Denker, Solla. Optimal Brain Damage. NeurIPS 1989.

      Theis, Korshunova, Tejani, Huszár. Faster gaze prediction with dense networks and
      Fisher pruning. 2018. https://arxiv.org/abs/1801.05787

      Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient ConvNets. ICLR 2017.
      https://arxiv.org/abs/1608.08710
    """
    if criterion not in UNIT_CRITERIA:
        raise ValueError(
            f"unit_scores: criterion must be one of {UNIT_CRITERIA}, got {criterion!r}."
        )
    if fisher is None and criterion != "magnitude":
        raise ValueError(
            f"unit_scores: criterion={criterion!r} needs the Fisher; pass fisher= (e.g. "
            "fisher_optax.fisher_from_state(opt_state)) or use criterion='magnitude'."
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if fisher is not None:
        fisher_leaves = check_matching(params, fisher, ref_name="params", other_name="fisher")
    else:
        fisher_leaves = [None] * len(flat)
    flags = _resolve_prunable(params, prunable, lambda x: jnp.ndim(x) >= 2)
    out = []
    for (path, w), f, flag in zip(flat, fisher_leaves, flags, strict=True):
        if not flag:
            out.append(None)
            continue
        if jnp.ndim(w) < 2:
            raise ValueError(
                f"unit_scores: the leaf at {path_str(path_tuple(path))} has shape "
                f"{jnp.shape(w)}; units are the last axis of a kernel with ndim >= 2. Leave "
                "it out with prunable=."
            )
        w = jnp.asarray(w, jnp.float32)
        if criterion == "saliency":
            per_weight = 0.5 * jnp.asarray(f, jnp.float32) * w * w
        elif criterion == "fisher":
            per_weight = jnp.asarray(f, jnp.float32)
        else:
            per_weight = jnp.abs(w)
        out.append(jnp.sum(per_weight, axis=tuple(range(w.ndim - 1))))
    return jax.tree.unflatten(treedef, out)


def unit_mask(
    scores: Scores,
    fraction: float,
    *,
    scope: str = "layer",
    prunable: Any = None,
    mask: Mask | None = None,
    min_units: int = 1,
) -> Mask:
    """Choose the units to drop: the ``fraction`` of units with the lowest scores.

    The selection is :func:`fisher_optax.topk_mask` applied to the unit scores, with its
    semantics: exactly ``round(fraction * n)`` units are dropped among the ``n`` prunable
    units in scope (per layer with ``scope="layer"``), ties break as ``topk_mask`` breaks
    them, and units that ``mask`` already dropped stay dropped and count toward the target.
    On top of that every prunable layer keeps its ``min_units`` best units, so that global
    selection cannot empty a layer (which would cut the network in two).

    Leave the model's output layer out (its units are the model's outputs): with
    :func:`fisher_optax.flax.prunable_units` for an ``nnx`` model, or ``prunable=``.

    Args:
      scores: unit scores, from :func:`unit_scores` (``(out,)`` vectors, ``None``
        elsewhere).
      fraction: the fraction of prunable units to drop, in ``[0, 1]``.
      scope: ``"layer"`` (each layer loses ``fraction`` of its units) or ``"global"`` (one
        ranking across layers; compare scores across layers only where they share a scale,
        as OBD saliencies do).
      prunable: which layers may lose units: ``None`` for every scored layer, a predicate on
        ``(path, scores_leaf)`` (a jax key path, as for :func:`unit_scores`), or a pytree
        with a bool per leaf of ``scores``.
      mask: an earlier unit mask (True keeps); what it dropped stays dropped.
      min_units: units each prunable layer keeps at least.

    Returns:
      A unit mask: the structure of ``scores``, a boolean ``(out,)`` vector (True keeps the
      unit) at each scored leaf, ``None`` elsewhere.

    Raises:
      ValueError: if a score leaf is not a vector, ``fraction`` is outside ``[0, 1]``, or
        ``min_units`` makes the target unreachable.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> scores = {"a": {"kernel": jnp.array([3.0, 1.0, 2.0, 0.5])}, "b": {"bias": None}}
      >>> fisher_optax.unit_mask(scores, 0.5)["a"]["kernel"]
      Array([ True, False,  True, False], dtype=bool)
    """
    from fisher_optax.masks import topk_mask

    if scope not in ("layer", "global"):
        raise ValueError(f"unit_mask: scope must be 'layer' or 'global', got {scope!r}.")
    concrete = not isinstance(fraction, jax.core.Tracer)
    if concrete and not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"unit_mask: fraction must lie in [0, 1], got {fraction}.")
    if int(min_units) != min_units or min_units < 0:
        raise ValueError(f"unit_mask: min_units must be a non-negative int, got {min_units}.")
    flat, treedef = jax.tree_util.tree_flatten_with_path(scores)
    for path, s in flat:
        if jnp.ndim(s) != 1:
            raise ValueError(
                f"unit_mask: scores at {path_str(path_tuple(path))} have shape {jnp.shape(s)}; "
                "expected one score per unit, a vector, as unit_scores returns."
            )
    flags = _resolve_prunable(scores, prunable, lambda _: True)
    earlier = (
        [None] * len(flat)
        if mask is None
        else check_matching(scores, mask, ref_name="scores", other_name="mask")
    )
    # Protect each layer's best ``min_units`` units (among those still kept) by lifting
    # their scores to the top, so that no selection can take them.
    top = jnp.finfo(jnp.float32).max
    protected, n_total, n_protected = [], 0, 0
    for (path, s), flag, kept in zip(flat, flags, earlier, strict=True):
        s = jnp.asarray(s, jnp.float32)
        if flag and min_units > 0:
            k = min(int(min_units), s.shape[0])
            rank = s if kept is None else jnp.where(kept, s, -jnp.inf)
            best = jnp.argsort(-rank, stable=True)[:k]  # a vector per layer: cheap to sort
            s = s.at[best].set(top)
            n = s.shape[0]
            n_total, n_protected = n_total + n, n_protected + k
            if concrete and scope == "layer" and round(float(fraction) * n) > n - k:
                raise ValueError(
                    f"unit_mask: dropping {fraction} of the {n} units at "
                    f"{path_str(path_tuple(path))} leaves fewer than min_units={min_units}; "
                    "lower fraction or min_units."
                )
        protected.append(s)
    if concrete and scope == "global" and round(float(fraction) * n_total) > n_total - n_protected:
        raise ValueError(
            f"unit_mask: dropping {fraction} of {n_total} units globally leaves a layer with "
            f"fewer than min_units={min_units}; lower fraction or min_units."
        )
    protected_tree = jax.tree.unflatten(treedef, protected)
    prunable_tree = jax.tree.unflatten(treedef, flags)
    return topk_mask(protected_tree, fraction, scope=scope, prunable=prunable_tree, mask=mask)


def expand_unit_mask(params: Params, unit_mask: Mask, *, bias: bool = False) -> Mask:
    """A weight mask, shaped like ``params``, that zeroes the incoming weights of dropped units.

    Use it with :func:`fisher_optax.apply_mask` to get the *masked* model that surgery
    reproduces exactly, or with :func:`fisher_optax.keep_pruned` to fine-tune with whole
    units held at zero.

    Args:
      params: the parameters.
      unit_mask: a unit mask from :func:`unit_mask` (``(out,)`` booleans at kernel leaves,
        ``None`` elsewhere).
      bias: also zero the dropped units' biases (the sibling leaf named ``bias``). Then a
        dropped unit outputs ``act(0)``, which is 0 for relu, gelu, silu, tanh and the
        identity, so surgery has nothing to fold into the next layer; this is what lets a
        Conv feeding a zero-padded Conv lose channels exactly.

    Returns:
      A boolean pytree shaped like ``params`` (True keeps a weight).

    Raises:
      ValueError: if ``unit_mask`` does not line up with ``params``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    units = _unit_mask_by_kernel(params, unit_mask, where="expand_unit_mask")
    bias_of = {}
    if bias:
        for kpath, keep in units.items():
            bias_of[(*kpath[:-1], "bias")] = keep
    # Concrete masks are built in NumPy: eager jnp would compile a kernel per leaf shape.
    xp = jnp if any(isinstance(k, jax.core.Tracer) for k in units.values()) else np
    out = []
    for path, leaf in flat:
        p = path_tuple(path)
        shape = jnp.shape(leaf)
        if p in units:
            m = xp.broadcast_to(xp.asarray(units[p], bool), shape)
        elif p in bias_of and shape == jnp.shape(bias_of[p]):
            m = xp.asarray(bias_of[p], bool)
        else:
            m = xp.ones(shape, bool)
        out.append(m if xp is jnp else jax.device_put(m))  # jnp.asarray compiles per shape
    return jax.tree.unflatten(treedef, out)


def _unit_mask_by_kernel(params: Params, unit_mask: Mask, *, where: str) -> dict[Path, Any]:
    """``{kernel path: (out,) bool}`` from a unit mask, checked against ``params``."""
    shapes = {p: jnp.shape(leaf) for p, leaf in _flat(params)}
    units = {}
    for p, keep in _flat(unit_mask):
        if p not in shapes:
            raise ValueError(
                f"{where}: the unit mask has a leaf at {path_str(p)}, which the parameters "
                "lack; build the unit mask from these parameters (unit_scores, unit_mask)."
            )
        shape = shapes[p]
        if len(shape) < 2 or jnp.shape(keep) != shape[-1:]:
            raise ValueError(
                f"{where}: the unit mask at {path_str(p)} has shape {jnp.shape(keep)}, but "
                f"the parameter there has shape {shape}: a unit mask holds one boolean per "
                f"output unit of a kernel, shape {shape[-1:] if len(shape) >= 2 else '(out,)'}. "
                "Pass a unit mask from unit_mask(...), not a weight mask."
            )
        units[p] = keep
    return units


# --------------------------------------------------------------------------------------------
# Optimizer state after surgery


def take_index(x: Any, index: tuple[np.ndarray | None, ...] | None) -> Any:
    """``x`` with, on each axis, only the entries ``index`` keeps."""
    if index is None or _is_masked(x):
        return x
    for axis, ind in enumerate(index):
        if ind is not None:
            x = jnp.take(x, jnp.asarray(ind, jnp.int32), axis=axis)
    return x


def slice_opt_state(opt_state: Any, params: Params, index: Index) -> Any:
    """Cut an optax state down to the shapes of the parameters after surgery.

    Every subtree of ``opt_state`` that lines up with ``params`` (the same leaf paths and
    shapes; ``optax.MaskedNode`` counts as a match) is a per-parameter quantity, such as
    Adam's ``mu`` and ``nu``, ``amsgrad``'s ``nu_max``, or the mask of
    :func:`fisher_optax.pruned`; its leaves are sliced with ``index``. Everything else
    (``count``, hyperparameters, empty states) is kept as it is, so fine-tuning continues
    with the same moments and the same bias-correction step. The moments of kept entries
    are exact copies; nothing is re-initialised.

    States that store parameters in another layout (``optax.flatten``'s ravelled vector,
    adafactor's factored moments) are not recognised and are left unchanged; the optimizer
    will then fail on the first update with a shape error.

    Args:
      opt_state: an optax state (for an ``nnx.Optimizer`` use
        :func:`fisher_optax.flax.shrink_optimizer`).
      params: the parameters *before* surgery, which ``opt_state`` was built for.
      index: the kept indices, from :func:`fisher_optax.flax.shrink_params` or
        :func:`fisher_optax.flax.shrink_index`.

    Returns:
      The optax state for the parameters after surgery.

    Raises:
      ValueError: if ``index`` names a path that ``params`` lacks.
    """
    ref = [(p, jnp.shape(leaf)) for p, leaf in _flat(params)]
    ref_paths = {p for p, _ in ref}
    for p in index:
        if p not in ref_paths:
            raise ValueError(
                f"slice_opt_state: the index has an entry for {path_str(p)}, which params "
                "lacks; pass the params from before the surgery that produced the index."
            )

    def matches(node: Any) -> bool:
        if node is None:
            return False
        flat = _flat(node)
        if len(flat) != len(ref):
            return False
        return all(
            p == rp and (_is_masked(x) or jnp.shape(x) == rs)
            for (p, x), (rp, rs) in zip(flat, ref, strict=True)
        )

    @jax.jit  # one compile per moment tree, not one per leaf (mu and nu share it)
    def take_all(node: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda p, x: take_index(x, index.get(path_tuple(p))), node, is_leaf=_is_masked
        )

    def slice_subtree(node: Any) -> Any:
        return take_all(node) if matches(node) else node

    return jax.tree.map(slice_subtree, opt_state, is_leaf=matches)


# --------------------------------------------------------------------------------------------
# The surgery itself, on arrays (the Flax module builds the layer graph)


class Layer(NamedTuple):
    """One Dense or Conv layer, as surgery sees it.

    Attributes:
      name: the layer's name in messages.
      path: where its leaves sit: the kernel at ``path + ('kernel',)``.
      kernel: ``(in, out)`` or ``(*window, in, out)``.
      bias: ``(out,)`` or ``None``.
      constant_exact: a per-channel constant input gives a constant output (a Dense layer;
        a Conv without zero padding or input dilation). Only then can the constant output of
        a dropped unit be folded into this layer's bias.
    """

    name: str
    path: Path
    kernel: np.ndarray
    bias: np.ndarray | None
    constant_exact: bool


class Edge(NamedTuple):
    """Producer ``producer`` feeds consumer ``consumer``.

    Attributes:
      producer: name of the producing layer.
      consumer: name of the consuming layer.
      blocks: 1 when the consumer's inputs are the producer's units; ``S > 1`` when the
        producer's ``(*spatial, C)`` output is flattened (NHWC order) into ``S * C`` inputs,
        input ``s * C + c`` coming from unit ``c``.
      constant: maps the producer's biases (a vector) to the constants a dropped unit
        feeds the consumer (``act(bias)``); ``None`` when unknown.
      what: how the pair was found, for messages.
    """

    producer: str
    consumer: str
    blocks: int
    constant: Callable[[np.ndarray], np.ndarray] | None
    what: str = ""


class Cut(NamedTuple):
    """Result of :func:`cut_units`.

    Attributes:
      kernels: new kernel per layer name.
      biases: new bias (or ``None``) per layer name.
      index: kept indices per parameter path (kernel and bias of each changed layer).
      dropped: the dropped unit indices (of the original layer) per layer name.
      kept_inexact: units the mask dropped but surgery kept, with zeroed incoming weights,
        because their constant output could not be folded exactly (per layer name).
    """

    kernels: dict[str, np.ndarray]
    biases: dict[str, np.ndarray | None]
    index: Index
    dropped: dict[str, np.ndarray]
    kept_inexact: dict[str, np.ndarray]


def _dead_units(kernel: np.ndarray) -> np.ndarray:
    return np.all(kernel == 0, axis=tuple(range(kernel.ndim - 1)))


def _one_pass(
    layers: Mapping[str, Layer],
    edges: Sequence[Edge],
    drop: Mapping[str, np.ndarray],
) -> tuple[dict[str, Layer], dict[str, tuple], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Drop ``drop[name]`` (bool ``(out,)``, True drops) plus dead units, once."""
    consumers: dict[str, list[Edge]] = {}
    for e in edges:
        consumers.setdefault(e.producer, []).append(e)
    producer_of = {e.consumer: e for e in edges}

    # Zero the incoming weights of every unit the mask drops: surgery reproduces that model.
    kernels = {}
    for name, layer in layers.items():
        k = np.array(layer.kernel, copy=True)
        if name in drop:
            k[..., np.asarray(drop[name], bool)] = 0
        kernels[name] = k
    biases = {
        n: None if lay.bias is None else np.array(lay.bias, copy=True) for n, lay in layers.items()
    }

    final_drop, kept_inexact = {}, {}
    for name, layer in layers.items():
        n_out = layer.kernel.shape[-1]
        wanted = _dead_units(kernels[name])
        if name not in consumers:
            continue  # output units stay, even dead ones (the model's outputs)
        bias = biases[name] if biases[name] is not None else np.zeros(n_out, kernels[name].dtype)
        blocked = np.zeros(n_out, bool)
        for e in consumers[name]:
            consumer = layers[e.consumer]
            if e.constant is None:
                if not wanted.any():
                    continue
                raise ValueError(
                    f"shrink: the pair ({e.producer!r}, {e.consumer!r}) drops units of "
                    f"{e.producer!r}; each outputs the constant act(bias), which must be "
                    f"folded into {e.consumer!r}, and that needs the activation between the "
                    "two layers. Give it as the pair's third element, e.g. "
                    f"({e.producer!r}, {e.consumer!r}, jax.nn.relu), or as activation=."
                )
            const = np.asarray(e.constant(bias), np.float64)
            nonzero = wanted & (const != 0)
            if consumer.bias is None or not consumer.constant_exact:
                blocked |= nonzero
        kept = wanted & blocked
        if kept.any():
            kept_inexact[name] = np.flatnonzero(kept)
        final_drop[name] = wanted & ~blocked
    for name in drop:
        if name not in consumers and np.asarray(drop[name], bool).any():
            raise ValueError(
                f"shrink: the unit mask drops units of {name!r}, but no layer consumes its "
                "outputs (it is the model's output layer, or a pair is missing). Leave it out "
                "of unit_mask (prunable=fisher_optax.flax.prunable_units(model)) or name its "
                "consumer in pairs=."
            )

    # Fold each dropped unit's constant into its consumers' biases, from the original rows.
    for name, dropped in final_drop.items():
        if not dropped.any():
            continue
        n_out = layers[name].kernel.shape[-1]
        bias = biases[name] if biases[name] is not None else np.zeros(n_out)
        for e in consumers[name]:
            const = np.where(dropped, np.asarray(e.constant(bias), np.float64), 0.0)
            if not const.any():
                continue
            k = kernels[e.consumer]
            rows = k.reshape(-1, k.shape[-2], k.shape[-1]).sum(axis=0, dtype=np.float64)
            rows = rows.reshape(e.blocks, n_out, k.shape[-1]).sum(axis=0)
            b = biases[e.consumer]
            biases[e.consumer] = (b.astype(np.float64) + const @ rows).astype(b.dtype)

    # Slice: producers lose columns, consumers the matching input rows.
    new_layers, index, dropped_out = {}, {}, {}
    for name, layer in layers.items():
        k, b = kernels[name], biases[name]
        out_keep = None
        if name in final_drop and final_drop[name].any():
            out_keep = np.flatnonzero(~final_drop[name])
            dropped_out[name] = np.flatnonzero(final_drop[name])
        in_keep = None
        e = producer_of.get(name)
        if e is not None and final_drop.get(e.producer) is not None:
            if final_drop[e.producer].any():
                c = layers[e.producer].kernel.shape[-1]
                kept_units = np.flatnonzero(~final_drop[e.producer])
                in_keep = (np.arange(e.blocks)[:, None] * c + kept_units[None, :]).reshape(-1)
        kernel_index = (None,) * (k.ndim - 2) + (in_keep, out_keep)
        k = take_np(k, kernel_index)
        if b is not None:
            b = take_np(b, (out_keep,))
        new_layers[name] = layer._replace(kernel=k, bias=b)
        index[name] = (kernel_index, (out_keep,))
    return new_layers, index, dropped_out, kept_inexact


def take_np(x: np.ndarray, index: tuple[np.ndarray | None, ...]) -> np.ndarray:
    for axis, ind in enumerate(index):
        if ind is not None:
            x = np.take(x, ind, axis=axis)
    return x


def _compose(first: tuple, second: tuple) -> tuple:
    return tuple(
        b if a is None else (a if b is None else np.asarray(a)[np.asarray(b)])
        for a, b in zip(first, second, strict=True)
    )


def cut_units(
    layers: Mapping[str, Layer],
    edges: Sequence[Edge],
    drop: Mapping[str, np.ndarray],
    *,
    warn: bool = True,
) -> Cut:
    """Remove dropped and dead units from a layer graph, folding their constants exactly.

    A unit is removed when ``drop`` says so or when all its incoming weights are zero, and
    its constant output ``act(bias)`` can be folded exactly into every consumer's bias: the
    constant is 0, or the consumer has a bias and turns a constant input into a constant
    output (Dense; Conv with VALID/CIRCULAR/REFLECT padding). Otherwise the unit is kept with
    its incoming weights zeroed, and a warning says so. Passes repeat while removing rows
    leaves further units dead.

    Args:
      layers: the layers by name.
      edges: who feeds whom; each consumer has at most one producer.
      drop: per layer name, a boolean ``(out,)`` vector, True for units to drop.
      warn: warn about units that could not be removed exactly.

    Returns:
      A :class:`Cut`.

    Raises:
      ValueError: if a consumer has several producers, the mask drops units of a layer that
        feeds no other, or an activation needed for a fold is unknown.
    """
    seen: dict[str, str] = {}
    for e in edges:
        if e.consumer in seen:
            raise ValueError(
                f"shrink: {e.consumer!r} is fed by both {seen[e.consumer]!r} and "
                f"{e.producer!r}; a layer with several producers (concatenation) is not "
                "supported."
            )
        seen[e.consumer] = e.producer
    original = dict(layers)
    current = dict(layers)
    total = {n: ((None,) * lay.kernel.ndim, (None,)) for n, lay in layers.items()}
    kept_inexact: dict[str, np.ndarray] = {}
    pending = {n: np.asarray(d, bool) for n, d in drop.items()}
    for _ in range(len(layers) + 1):
        before = dict(total)
        current, index, dropped, kept = _one_pass(current, edges, pending)
        for name, k in kept.items():  # back to the original unit numbers
            out_keep = before[name][1][0]
            kept_inexact[name] = k if out_keep is None else np.asarray(out_keep)[k]
        for name, idx in index.items():
            total[name] = (_compose(total[name][0], idx[0]), _compose(total[name][1], idx[1]))
        pending = {}
        if not dropped:
            break
    dropped_final = {}
    index: Index = {}
    for name, layer in original.items():
        kidx, bidx = total[name]
        if bidx[0] is not None:
            dropped_final[name] = np.setdiff1d(np.arange(layer.kernel.shape[-1]), bidx[0])
        if any(i is not None for i in kidx):
            index[(*layer.path, "kernel")] = kidx
        if layer.bias is not None and bidx[0] is not None:
            index[(*layer.path, "bias")] = bidx
    if warn and kept_inexact:
        detail = ", ".join(f"{n}: {len(k)}" for n, k in kept_inexact.items())
        warnings.warn(
            f"shrink kept units whose constant output act(bias) cannot be folded exactly into "
            f"the next layer (a zero-padded Conv, or a layer without bias): {detail}. Their "
            "incoming weights are zero, so the model is still exact. To remove them, zero their "
            "biases too (expand_unit_mask(..., bias=True) with an activation where act(0) = 0) "
            "or use VALID padding.",
            stacklevel=3,
        )
    return Cut(
        kernels={n: lay.kernel for n, lay in current.items()},
        biases={n: lay.bias for n, lay in current.items()},
        index=index,
        dropped=dropped_final,
        kept_inexact=kept_inexact,
    )
