"""Read the diagonal Fisher information out of an optax optimizer state.

Adam-family optimizers keep ``nu``, an exponential moving average of squared gradients.
Bias-corrected, it estimates :math:`E[g^2]`, which for a cross-entropy loss near a
stationary point approximates the diagonal of the (empirical) Fisher information. This
module finds every such average in a nested optax state, whatever wraps it, corrects it and
returns it as a pytree shaped like the parameters.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu

from fisher_optax import _validate
from fisher_optax._tree import key_paths, keystr
from fisher_optax._types import Fisher, Params

__all__ = ["FisherTrackerState", "fisher_from_state", "fisher_tracker"]

DEFAULT_B2 = 0.999
"""optax's default ``b2`` for adam, adamw, nadam, radam, lamb and amsgrad."""

# NamedTuple class names whose ``nu`` is an EMA of squared gradients.
_SECOND_MOMENT_STATES = (
    "ScaleByAdamState",  # adam, adamw, nadam, radam, lamb (and, sadly, adamax, yogi)
    "ScaleByAmsgradState",  # amsgrad: ``nu`` is the EMA, ``nu_max`` its running max
    "ScaleByRmsWithCountState",  # schedule_free_adamw, scale_by_rms(bias_correction=True)
    "FisherTrackerState",  # this library's fisher_tracker
)
# States that look like optimizer memory but hold no squared-gradient EMA.
_NOT_FISHER_STATES = {
    "ScaleByBeliefState": "adabelief (an EMA of (g - mu)^2, not of g^2)",
    "ScaleByNovogradState": "novograd (one scalar per leaf)",
    "FactoredState": "adafactor (a factored second moment)",
    "ScaleByLionState": "lion (no second moment)",
    "TraceState": "sgd with momentum (no second moment)",
    "ScaleByRmsState": "rmsprop (an EMA of g^2 without a step count, so it cannot be "
    "bias-corrected)",
    "ScaleByRStdDevState": "scale_by_stddev (a centred second moment)",
}
_INJECT_STATES = ("InjectStatefulHyperparamsState", "InjectHyperparamsState")


class FisherTrackerState(NamedTuple):
    """State of :func:`fisher_tracker`.

    Attributes:
      count: int32 scalar, the number of gradients seen.
      nu: EMA of squared gradients, shaped like the parameters (not bias-corrected).
      decay: float32 scalar, the EMA decay used at the last update; kept in the state so
        :func:`fisher_from_state` corrects with the right value.
    """

    count: jax.Array
    nu: Any
    decay: jax.Array


def fisher_tracker(decay: float = DEFAULT_B2) -> optax.GradientTransformation:
    r"""Keep an EMA of squared gradients and pass the updates through unchanged.

    Chain it in front of an optimizer that keeps no second moment (sgd, lion, adafactor)
    so that :func:`fisher_from_state` can read a Fisher diagonal from its state:

    .. math::
      \nu_t = \text{decay} \cdot \nu_{t-1} + (1 - \text{decay}) \cdot g_t^2

    Args:
      decay: the EMA decay, in ``[0, 1)``.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`FisherTrackerState`.

    Raises:
      ValueError: if ``decay`` is outside ``[0, 1)``.

    Examples:
      >>> import jax.numpy as jnp, optax, fisher_optax
      >>> opt = optax.chain(fisher_optax.fisher_tracker(decay=0.9), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = opt.init(params)
      >>> _, state = opt.update({"w": jnp.array([1.0, -2.0])}, state, params)
      >>> fisher_optax.fisher_from_state(state)["w"]
      Array([1., 4.], dtype=float32)
    """
    if _validate.is_concrete(decay):
        decay = _validate.real(
            decay, "decay", low=0.0, high=1.0, high_open=True, meaning="the EMA decay"
        )

    def init_fn(params: Params) -> FisherTrackerState:
        return FisherTrackerState(
            count=jnp.zeros([], jnp.int32),
            nu=otu.tree_zeros_like(params),
            decay=jnp.asarray(decay, jnp.float32),
        )

    def update_fn(updates, state, params=None):
        del params
        nu = otu.tree_update_moment_per_elem_norm(updates, state.nu, decay, 2)
        count = optax.safe_increment(state.count)
        return updates, FisherTrackerState(count, nu, jnp.asarray(decay, jnp.float32))

    return optax.GradientTransformation(init_fn, update_fn)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _unwrap(x: Any) -> jax.Array:
    """A scalar of the state as an array. Frameworks that wrap optimizer state in their own
    objects (the protocol documented in :func:`fisher_from_state`) expose the array through
    ``__jax_array__``, which ``jnp.asarray`` reads; plain arrays pass through."""
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _injected_b2(state: Any, path: tuple) -> Any | None:
    """``b2`` from the innermost ``inject_hyperparams`` state that encloses ``path``."""
    best, best_len = None, -1
    for name in _INJECT_STATES:
        for ipath, istate in otu.tree_get_all_with_path(state, name):
            n = len(ipath)
            if tuple(path[:n]) == tuple(ipath) and n > best_len and "b2" in istate.hyperparams:
                best, best_len = _unwrap(istate.hyperparams["b2"]), n
    return best


def _found_names(state: Any) -> list[str]:
    return [
        f"{name} from {what}"
        for name, what in _NOT_FISHER_STATES.items()
        if otu.tree_get_all_with_path(state, name)
    ]


def _check_count(count: jax.Array, where: str) -> None:
    """A concrete ``count == 0`` is an error, at trace time; a traced count is not checked
    here (its Fisher is NaN, see :func:`_corrected_nu`)."""
    if _validate.is_concrete(count) and int(count) == 0:
        raise ValueError(
            f"the second-moment state at {where} has count == 0: no gradient "
            "has been seen yet, so nu / (1 - b2**count) is 0/0. Call the optimizer's update "
            "at least once before reading the Fisher."
        )


def _corrected_nu(
    state: Any,
    path: tuple,
    moment: Any,
    *,
    b2: float | None,
    bias_correction: bool,
    batch_size: int | None,
    check_count: bool,
) -> Any:
    """The (optionally bias-corrected and rescaled) ``nu`` of one moment state."""
    where = keystr(path)
    count = _unwrap(moment.count)
    scale = jnp.asarray(1.0 if batch_size is None else batch_size, jnp.float32)
    if check_count:
        _check_count(count, where)
        # A traced count cannot raise without a host callback and a sync: a state that has
        # seen no gradient reads as NaN, with or without bias correction.
        scale = jnp.where(count > 0, scale, jnp.nan)
    if bias_correction:
        if type(moment).__name__ == "FisherTrackerState":
            decay = _unwrap(moment.decay)
        else:
            injected = _injected_b2(state, path)
            decay = injected if injected is not None else (DEFAULT_B2 if b2 is None else b2)
        decay = jnp.asarray(decay, jnp.float32)
        scale = scale / (1.0 - decay ** count.astype(jnp.float32))

    def correct(x):
        return x if _is_masked(x) else (x * scale).astype(x.dtype)

    return jax.tree.map(correct, moment.nu, is_leaf=_is_masked)


def _children(node: Any) -> tuple[list[Any], Any]:
    """The immediate children of a pytree node and the treedef that rebuilds it."""
    return jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)


def _merge_two(a: Any, b: Any, path: tuple, where: tuple[str, str]) -> Any:
    """Merge two ``nu`` trees in which ``MaskedNode`` marks what the other one covers.

    ``partition``/``masked`` put a ``MaskedNode`` in place of a whole uncovered subtree, so
    the two trees can differ in structure exactly where one of them is masked.
    """
    if _is_masked(a):
        return b
    if _is_masked(b):
        return a
    ca, ta = _children(a)
    cb, tb = _children(b)
    if ta.num_nodes == 1 and tb.num_nodes == 1:  # two arrays for one parameter
        raise ValueError(
            f"the parameter at {keystr(path)} is covered by several "
            f"second-moment states ({where[0]} and {where[1]}); it is ambiguous which to "
            "read. Pass the sub-state of the one you want, e.g. fisher_from_state(opt_state[i])."
        )
    if ta != tb:
        raise ValueError(
            f"the second-moment states at {where[0]} and {where[1]} cover "
            f"parameter trees of different structures at {keystr(path)}; pass the sub-state "
            "of one optimizer instead of the whole state."
        )
    keys = [
        p[-1] for p, _ in jax.tree_util.tree_flatten_with_path(a, is_leaf=lambda x: x is not a)[0]
    ]
    return ta.unflatten(
        [_merge_two(x, y, (*path, k), where) for x, y, k in zip(ca, cb, keys, strict=True)]
    )


def _merge(pieces: Sequence[tuple[str, Any]]) -> tuple[Any, list[str]]:
    """Merge ``nu`` trees of several states (``partition``, ``masked``) into one tree.

    Returns the merged tree (``MaskedNode`` where nothing covers a leaf or subtree) and the
    paths of those uncovered places.
    """
    where, merged = pieces[0]
    for other_where, tree in pieces[1:]:
        merged = _merge_two(merged, tree, (), (where, other_where))
        where = f"{where}, {other_where}"
    flat, _ = jax.tree_util.tree_flatten_with_path(merged, is_leaf=_is_masked)
    missing = [keystr(path) for path, leaf in flat if _is_masked(leaf)]
    return merged, missing


def fisher_from_state(
    opt_state: Any,
    *,
    b2: float | None = None,
    bias_correction: bool = True,
    batch_size: int | None = None,
    params: Params | None = None,
    missing: float | None = None,
) -> Fisher:
    r"""The diagonal Fisher estimate held in an optax optimizer state.

    Finds every EMA of squared gradients in ``opt_state`` (by NamedTuple class name, through
    ``chain``, ``named_chain``, ``inject_hyperparams``, ``MultiSteps``, ``masked``,
    ``partition``/``multi_transform``, ``apply_if_finite`` and ``contrib.schedule_free``) and
    returns it bias-corrected, as one pytree shaped like the parameters:

    .. math::
      \hat F = s \cdot \frac{\nu}{1 - b_2^{t}},
      \qquad s = \begin{cases} B & \text{if batch\_size } B \text{ is given} \\
      1 & \text{otherwise.} \end{cases}

    This is an approximation. ``nu`` averages squared *mini-batch mean* gradients
    :math:`g_B`, not per-example ones; for a mean-reduced loss over batches of size
    :math:`B`,

    .. math::
      B \, E[g_B^2] = F_{\text{emp}} + (B - 1)\, \bar g^2,

    so ``batch_size=B`` gives the per-example empirical Fisher :math:`F_{\text{emp}}` only
    near a stationary point, where the mean gradient :math:`\bar g` is small. Rankings do
    not depend on ``B``; absolute values (OBD saliency) do. And the empirical Fisher, taken
    at the training labels, is not the true Fisher (Kunstner et al. 2019); see
    :func:`fisher_optax.empirical_fisher` and :func:`fisher_optax.monte_carlo_fisher` for
    exact references.

    Supported: ``ScaleByAdamState`` (adam, adamw, nadam, radam, lamb), ``ScaleByAmsgradState``
    (amsgrad; its EMA ``nu``, not ``nu_max``), ``ScaleByRmsWithCountState``
    (schedule_free_adamw) and :class:`FisherTrackerState`. Beware: adamax and yogi reuse
    ``ScaleByAdamState`` with a ``nu`` that is not an average of squared gradients (an
    infinity norm, a sign-driven accumulator); the state cannot tell, so do not read a
    Fisher from them. ``optax.contrib.adopt`` reuses it with a ``nu`` that starts at
    ``g_0**2`` (no zero-start bias): read it with ``bias_correction=False``.

    A state that has seen no gradient (``count == 0``) has no Fisher: a concrete count of
    0 is a ``ValueError``, raised at trace time. Under ``jit`` the count of a state passed
    as an argument is traced and cannot raise; the Fisher of such a state is then NaN
    everywhere (the 0/0 it is), so check ``count`` before, or read the Fisher outside
    ``jit``.

    Args:
      opt_state: an optax state, or any pytree that holds one. The protocol for a framework
        that wraps optax state in its own objects: the wrapper is a registered pytree (so the
        optax ``NamedTuple`` states inside it are found by class name), and each wrapped
        array exposes ``__jax_array__``. ``flax.nnx.Optimizer`` is such an object and is
        passed as it is; see :mod:`fisher_optax.flax` for lining the result up with the model.
      b2: the second-moment decay, in ``[0, 1)``. Read from ``inject_hyperparams`` when the
        state holds it (that value wins); else this argument; else optax's default 0.999.
        :func:`fisher_tracker` stores its own decay and ignores this.
      bias_correction: divide by :math:`1 - b_2^t`. Without it ``nu`` is returned as
        stored (times ``batch_size`` if given).
      batch_size: a positive int: rescale by the batch size to the per-example
        empirical-Fisher scale.
      params: optional parameters; when given, the result is checked against them and
        returned in their tree structure (for example an ``nnx.State`` of ``nnx.Param``
        when ``opt_state`` wraps its arrays in other objects).
      missing: a finite value ``>= 0`` for parameters that no second-moment state covers
        (e.g. the ``sgd`` group of a ``partition``) and for leaves of ``params`` that the
        optimizer never held (e.g. the batch statistics in a whole ``nnx.state(model)``
        when it trains ``wrt=nnx.Param``). Needs ``params`` for their shapes. By default
        such parameters are an error.

    Returns:
      A pytree of Fisher estimates, shaped like the parameters, each leaf with the dtype
      of its ``nu``: in the tree structure of ``params`` when given, else in that of the
      ``nu`` found (wrappers included).

    Raises:
      ValueError: if no second-moment state is found (naming what was found instead),
        if a concrete ``count == 0`` (no gradient seen yet), if some parameters are
        covered by no state or by several, or if ``missing`` is given without ``params``;
        if ``b2`` is outside ``[0, 1)``, ``batch_size`` is not a positive int or
        ``missing`` is negative or not finite.
      TypeError: for a bool or non-integer ``batch_size``, a non-bool ``bias_correction``
        or a non-numeric ``b2``/``missing``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fisher_optax
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> opt = optax.adam(1e-2, b2=0.9)
      >>> state = opt.init(params)
      >>> _, state = opt.update({"w": jnp.array([3.0, 0.5])}, state, params)
      >>> fisher_optax.fisher_from_state(state, b2=0.9)["w"]
      Array([9.  , 0.25], dtype=float32)

    References:
      Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using
      Information Theory. ISVLSI 2016. https://arxiv.org/abs/1605.04859

      Kunstner, Balles, Hennig. Limitations of the Empirical Fisher Approximation for
      Natural Gradient Descent. NeurIPS 2019. https://arxiv.org/abs/1905.12558
    """
    if missing is not None and params is None:
        raise ValueError(
            "missing= fills parameters that no second-moment state covers, and needs "
            "params= to know their shapes; pass params=your_params."
        )
    if b2 is not None and _validate.is_concrete(b2):
        b2 = _validate.real(
            b2, "b2", low=0.0, high=1.0, high_open=True, meaning="the second-moment decay"
        )
    if not isinstance(bias_correction, bool | np.bool_):
        raise TypeError(
            f"bias_correction must be True or False, got {bias_correction!r} "
            f"({type(bias_correction).__name__})."
        )
    if batch_size is not None:
        batch_size = _validate.integer(batch_size, "batch_size", minimum=1)
    if missing is not None:
        missing = _validate.real(
            missing, "missing", low=0.0, meaning="the Fisher value of uncovered parameters"
        )
    return _read_fisher(opt_state, b2, bias_correction, batch_size, params, missing, True)


def _fisher_from_state(
    opt_state: Any, *, params: Params | None = None, check_count: bool = True
) -> Fisher:
    """:func:`fisher_from_state` with its defaults, and the ``count == 0`` check optional.

    Transforms that guard the read themselves (:func:`_has_seen_a_gradient`) skip the
    check: no error for a concrete count of 0, no NaN for a traced one.
    """
    if not isinstance(check_count, bool):
        raise TypeError(f"check_count must be a bool, got {check_count!r}.")
    return _read_fisher(opt_state, None, True, None, params, None, check_count)


def _read_fisher(
    opt_state: Any,
    b2: float | None,
    bias_correction: bool,
    batch_size: int | None,
    params: Params | None,
    missing: float | None,
    check_count: bool,
) -> Fisher:
    """:func:`fisher_from_state` on checked arguments."""
    found = []
    for name in _SECOND_MOMENT_STATES:
        found.extend(otu.tree_get_all_with_path(opt_state, name))
    if not found:
        others = _found_names(opt_state)
        held = f"it holds {', '.join(others)}" if others else "it holds no optimizer memory"
        raise ValueError(
            "opt_state: found no EMA of squared gradients in the optimizer state "
            f"({held}). Supported: adam, adamw, nadam, radam, lamb, amsgrad, "
            "schedule_free_adamw. For sgd, lion, adafactor and the like, chain "
            "fisher_optax.fisher_tracker() in front: optax.chain(fisher_optax.fisher_tracker(), "
            "optax.sgd(...))."
        )
    pieces = [
        (
            keystr(path) if path else "<root>",
            _corrected_nu(
                opt_state,
                path,
                moment,
                b2=b2,
                bias_correction=bias_correction,
                batch_size=batch_size,
                check_count=check_count,
            ),
        )
        for path, moment in found
    ]
    merged, uncovered = _merge(pieces)
    if uncovered and missing is None:
        raise ValueError(
            f"no second-moment state covers the parameters at "
            f"{', '.join(uncovered)} (their optimizer keeps no EMA of squared gradients). "
            "Give them an Adam-family optimizer or a fisher_tracker, or pass "
            "missing=0.0, params=params to fill them."
        )
    if params is not None:
        return _align_to_params(merged, params, missing)
    return merged


def _has_seen_a_gradient(opt_state: Any) -> jax.Array:
    """Whether every second-moment state in ``opt_state`` has ``count > 0`` (a bool scalar,
    traced under ``jit``): before that its Fisher is 0/0. Under ``optax.MultiSteps`` the
    inner count stays 0 until the first accumulated step."""
    ready = jnp.asarray(True)
    for name in _SECOND_MOMENT_STATES:
        for _, moment in otu.tree_get_all_with_path(opt_state, name):
            ready = ready & (_unwrap(moment.count) > 0)
    return ready


def _filled(p: Any, missing: float) -> jax.Array:
    """``missing`` shaped like ``p``: in ``p``'s dtype if floating, else float32 (a counter
    or a PRNG key of a whole ``nnx.state`` has a Fisher of 0, not an integer or a key)."""
    dtype = jnp.result_type(p)
    dtype = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32
    return jnp.full(jnp.shape(p), missing, dtype=dtype)


def _align_to_params(merged: Any, params: Params, missing: float | None) -> Fisher:
    """Put the merged Fisher leaves into the tree structure of ``params``.

    A ``MaskedNode`` in ``merged`` stands for a whole uncovered subtree of ``params``; its
    leaves are filled with ``missing``.
    """
    _validate.arrays_only(params, "params")
    entries = dict(
        zip(
            key_paths(merged, is_leaf=_is_masked),
            jax.tree.leaves(merged, is_leaf=_is_masked),
            strict=True,
        )
    )
    pleaves, ptreedef = jax.tree.flatten(params)
    ppaths = key_paths(params)

    def entry(ppath: tuple) -> tuple | None:
        """The entry at this path, or a MaskedNode standing for a whole subtree above it."""
        return next((ppath[:k] for k in range(len(ppath), -1, -1) if ppath[:k] in entries), None)

    if isinstance(params, Mapping) and "params" in params and all(entry(p) is None for p in ppaths):
        # Linen variables {"params": ..., "batch_stats": ...}: the optimizer holds the
        # params collection, the other collections are what missing= fills.
        hop = (jax.tree_util.DictKey("params"),)
        entries = {hop + k: v for k, v in entries.items()}
    leaves, used = [], set()
    for ppath, p in zip(ppaths, pleaves, strict=True):
        key = entry(ppath)
        if key is None or (key != ppath and not _is_masked(entries[key])):
            if missing is not None:  # a leaf the optimizer never held, e.g. batch statistics
                leaves.append(_filled(p, missing))
                continue
            raise ValueError(
                f"the optimizer state has no entry for the parameter at "
                f"{keystr(ppath)}; pass the params this optimizer was initialised with, or "
                "missing=0.0 to fill the leaves it does not hold (e.g. the batch statistics "
                "of a whole nnx.state(model))."
            )
        used.add(key)
        f = entries[key]
        if _is_masked(f):
            leaves.append(_filled(p, missing))
            continue
        if jnp.shape(f) != jnp.shape(p):
            raise ValueError(
                f"nu at {keystr(ppath)} has shape {jnp.shape(f)} but the "
                f"parameter has shape {jnp.shape(p)}."
            )
        leaves.append(f)
    if entries and not used:
        raise ValueError(
            "params shares no path with the optimizer state: pass the params this optimizer "
            "was initialised with (or a tree holding them, such as nnx.state(model))."
        )
    extra = [k for k in entries if k not in used]
    if extra:
        raise ValueError(
            f"the optimizer state has a leaf at {keystr(extra[0])} that "
            "params lacks; pass the params this optimizer was initialised with."
        )
    return jax.tree.unflatten(ptreedef, leaves)
