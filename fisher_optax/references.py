"""Exact Fisher diagonals from per-example gradients: references to check Adam's ``nu`` against.

Two ways to the same numbers (``method``):

- ``"layers"`` (default): one batched forward and backward pass, then each parameter's sum
  of squared per-example gradients from its layer's inputs and output cotangents
  (``(x^2)^T (dy^2)`` for a Dense kernel, per-example kernel gradients from the patches for a
  Conv). About the cost of a batch gradient on MLPs; parameters whose layer is not recognised
  fall back to ``vmap(grad)`` for themselves alone. See :mod:`fisher_optax._fast_fisher`.
- ``"vmap"``: ``vmap`` of ``grad``, one backward pass per example (~100x a batch gradient on
  an MLP); the reference the first is tested against.
"""

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from fisher_optax import _fast_fisher, _validate
from fisher_optax._types import Fisher, Params

__all__ = ["empirical_fisher", "monte_carlo_fisher"]

FISHER_METHODS: dict[str, str] = {
    "layers": "closed forms from each layer's inputs and output gradients, exact; "
    "unrecognised parameters fall back to per-example gradients",
    "vmap": "vmap of grad, one backward pass per example (the slow reference)",
}


def _batch_size(batch: Any, name: str) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError(f"{name} has no arrays; pass a pytree of arrays with a batch axis.")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"every leaf of {name} needs the same leading batch axis; got leading "
            f"sizes {sorted(s for s in sizes if s is not None)}"
            f"{' and a scalar leaf' if None in sizes else ''}. Give every leaf the examples "
            "along axis 0."
        )
    return sizes.pop()


def _check_common(params: Params, microbatch_size: int | None, method: str) -> None:
    if microbatch_size is not None:
        _validate.integer(microbatch_size, "microbatch_size")
    _validate.choice(method, "method", FISHER_METHODS)
    _validate.finite(params, "params")


def _chunked_sum(fn: Callable[[Any], Any], data: Any, n: int, chunk: int | None) -> Any:
    """``sum_i fn(data[i:i+1])`` computed in chunks of ``chunk`` examples (``lax.map``).

    ``fn`` maps a chunk (leading axis) to a pytree of per-chunk sums. The tail that does not
    fill a whole chunk is processed on its own, so no padding alters the result.
    """
    if chunk is None or chunk >= n:
        return fn(data)
    full = (n // chunk) * chunk
    head = jax.tree.map(lambda x: x[:full].reshape((n // chunk, chunk, *x.shape[1:])), data)
    total = jax.tree.map(lambda s: s.sum(0), jax.lax.map(fn, head))
    if full < n:
        tail = fn(jax.tree.map(lambda x: x[full:], data))
        total = jax.tree.map(jnp.add, total, tail)
    return total


def _square_sums(
    example_loss: Callable[[Params, Any], jax.Array], params: Params, examples: Any, method: str
) -> Params:
    """``sum_i (d example_loss(params, examples[i]) / d params)^2``, per leaf of ``params``."""
    leaves, treedef = jax.tree.flatten(params)
    data, data_def = jax.tree.flatten(examples)

    def ell(param_leaves, example_leaves):
        return example_loss(
            jax.tree.unflatten(treedef, param_leaves), jax.tree.unflatten(data_def, example_leaves)
        )

    if method == "layers":
        sums = _fast_fisher.squared_gradient_sums(ell, leaves, data)
    else:
        sums = _fast_fisher.vmap_squared_gradient_sums(ell, leaves, data)
    return jax.tree.unflatten(treedef, sums)


def empirical_fisher(
    loss_fn: Callable[[Params, Any], jax.Array],
    params: Params,
    batch: Any,
    *,
    method: Literal["layers", "vmap"] = "layers",
    microbatch_size: int | None = None,
) -> Fisher:
    r"""The empirical Fisher diagonal: the mean of squared per-example gradients.

    .. math::
      F_{\text{emp}} = \frac{1}{N} \sum_{i=1}^{N} \big(\nabla_\theta \ell(\theta; x_i, y_i)\big)^2

    Exact (no EMA, no mini-batch averaging), at the training labels.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the ordinary mean loss over a batch
        whose leaves have a leading batch axis. It is called on one-example batches.
      params: the parameters.
      batch: a pytree of arrays with a common leading batch axis of size ``N``.
      method: ``"layers"`` (one forward and backward pass and closed forms per layer) or
        ``"vmap"`` (one backward pass per example, the reference); the same numbers up to
        float rounding (see the module docstring).
      microbatch_size: examples per chunk (``lax.map`` over chunks) to bound memory; does
        not change the result beyond float rounding.

    Returns:
      A pytree shaped like ``params``.

    Raises:
      ValueError: if the batch leaves disagree on the batch axis, ``microbatch_size`` is
        not an int >= 1, ``method`` is unknown or ``params`` holds NaN or infinity.
      TypeError: if ``loss_fn`` does not take ``(params, batch)``.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> loss = lambda w, b: jnp.mean((b["x"] * w - b["y"]) ** 2)
      >>> batch = {"x": jnp.array([1.0, 2.0]), "y": jnp.array([0.0, 0.0])}
      >>> fisher_optax.empirical_fisher(loss, jnp.array(1.0), batch)  # mean of (2 x^2 w)^2
      Array(34., dtype=float32)
    """
    _validate.callable_arity(loss_fn, "loss_fn", "loss_fn(params, batch)", 2)
    _batch_size(batch, "batch")
    _check_common(params, microbatch_size, method)

    return _jitted(_empirical, loss_fn, method, microbatch_size)(params, batch)


class _Same:
    """Hashed and compared by identity: a value a function reads, in a cache key."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value


def _reads(fn: Callable) -> tuple:
    """What ``fn`` reads besides its arguments: the values of its closure cells, of the
    globals its code names, and the arguments bound by a ``functools.partial``."""
    out = []
    while isinstance(fn, functools.partial):
        out += [_Same(a) for a in (*fn.args, *fn.keywords.values())]
        fn = fn.func
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            out.append(_Same(cell.cell_contents))
        except ValueError:  # an empty cell
            continue
    code, names = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
    for name in getattr(code, "co_names", ()):
        if name in names:
            out.append(_Same(names[name]))
    return tuple(out)


def _jitted(fn: Callable, model_fn: Callable, *static: Any) -> Callable:
    """``fn(model_fn, *static, params, data)`` under ``jit``, cached per ``model_fn``.

    The traced computation is interpreted equation by equation; run eagerly that is
    thousands of dispatches, so it is always compiled. ``model_fn`` is a static argument,
    cached by identity and by the identity of what it reads (closure cells, the globals
    its code names, partial arguments): a loss over ``nnx.merge(graphdef, params, rest)``
    whose ``rest`` is rebound (new BatchNorm statistics, a new teacher) is traced afresh
    instead of reusing the old ``rest`` baked into the compiled code. Objects changed in
    place, and what the functions it calls read, are baked in at the first call, as with
    any ``jax.jit``. An unhashable ``model_fn`` is compiled afresh at each call.
    """
    try:
        hash(model_fn)
    except TypeError:
        return jax.jit(lambda params, data: fn(model_fn, *static, params, data))
    return functools.partial(_JIT[fn], model_fn, _reads(model_fn), *static)


def _empirical(loss_fn, method, microbatch_size, params, batch):
    n = _batch_size(batch, "batch")

    def example_loss(p, example):  # each example is its own one-example batch
        return loss_fn(p, jax.tree.map(lambda x: x[None], example))

    first = jax.tree.map(lambda x: x[0], batch)
    shape = jax.eval_shape(example_loss, params, first).shape
    if shape != ():
        raise ValueError(
            f"loss_fn must return a scalar, the mean loss over the batch; on a one-example "
            f"batch it returned shape {shape}. Reduce every axis (e.g. .mean() over the "
            "batch and the sequence)."
        )

    total = _chunked_sum(
        lambda chunk: _square_sums(example_loss, params, chunk, method), batch, n, microbatch_size
    )
    return jax.tree.map(lambda t, p: (t / n).astype(jnp.result_type(p)), total, params)


def monte_carlo_fisher(
    logits_fn: Callable[[Params, Any], jax.Array],
    params: Params,
    inputs: Any,
    *,
    key: jax.Array,
    num_samples: int = 1,
    method: Literal["layers", "vmap"] = "layers",
    microbatch_size: int | None = None,
) -> Fisher:
    r"""The true Fisher diagonal of a categorical model, by sampling labels from the model.

    .. math::
      F = \frac{1}{N} \sum_{i=1}^{N} E_{y \sim p_\theta(\cdot \mid x_i)}
      \big(\nabla_\theta \log p_\theta(y \mid x_i)\big)^2,
      \qquad p_\theta = \operatorname{softmax}(\text{logits\_fn}(\theta, x)),

    with the expectation estimated by ``num_samples`` labels per example. Unlike the
    empirical Fisher it does not use the training labels (Kunstner et al. 2019).

    Args:
      logits_fn: ``logits_fn(params, inputs) -> [batch, classes]`` logits.
      params: the parameters.
      inputs: a pytree of arrays with a common leading batch axis.
      key: a PRNG key; example ``i`` uses ``split(key, N)[i]``, so the result does not
        depend on ``microbatch_size``.
      num_samples: labels sampled per example.
      method: ``"layers"`` or ``"vmap"``, as in :func:`empirical_fisher`; both use the same
        sampled labels, so they agree up to float rounding.
      microbatch_size: examples per chunk, to bound memory.

    Returns:
      A pytree shaped like ``params``.

    Raises:
      ValueError: on a bad batch axis, ``num_samples`` or ``microbatch_size`` not an int
        >= 1, an unknown ``method`` or non-finite ``params``.
      TypeError: if ``key`` is not a PRNG key or ``logits_fn`` does not take
        ``(params, inputs)``.

    Examples:
      >>> import jax, jax.numpy as jnp, fisher_optax
      >>> logits = lambda w, x: x[:, None] * w  # one input, two classes
      >>> f = fisher_optax.monte_carlo_fisher(
      ...     logits, jnp.zeros(2), jnp.ones(4), key=jax.random.key(0), num_samples=1000)
      >>> f.shape
      (2,)

    References:
      Kunstner, Balles, Hennig. Limitations of the Empirical Fisher Approximation for
      Natural Gradient Descent. NeurIPS 2019. https://arxiv.org/abs/1905.12558
    """
    _validate.callable_arity(logits_fn, "logits_fn", "logits_fn(params, inputs)", 2)
    _batch_size(inputs, "inputs")
    _check_common(params, microbatch_size, method)
    num_samples = _validate.integer(num_samples, "num_samples")
    key = _validate.key(key)
    return _jitted(_monte_carlo, logits_fn, num_samples, method, microbatch_size)(
        params, (inputs, key)
    )


def _monte_carlo(logits_fn, num_samples, method, microbatch_size, params, data):
    inputs, key = data
    n = _batch_size(inputs, "inputs")
    keys = jax.random.split(key, n)

    def sample(example, example_key):  # labels from the model, without gradient
        x = jax.tree.map(lambda a: a[None], example)
        logits = jax.lax.stop_gradient(logits_fn(params, x))[0]
        return jax.random.categorical(example_key, logits, shape=(num_samples,))

    first = jax.tree.map(lambda a: a[:1], inputs)
    shape = jax.eval_shape(logits_fn, params, first).shape
    if len(shape) != 2 or shape[0] != 1:
        raise ValueError(
            f"logits_fn must return [batch, classes] logits; on a one-example batch it "
            f"returned shape {shape}. For a binary model return two logits per example "
            "(e.g. jnp.stack([0 * z, z], -1)); per-position logits of a sequence model "
            "([batch, length, classes]) are not supported."
        )

    def neg_log_p(p, pair):
        example, label = pair
        x = jax.tree.map(lambda a: a[None], example)
        return -jax.nn.log_softmax(logits_fn(p, x)[0])[label]

    def chunk_sum(chunk):
        examples, chunk_keys = chunk
        labels = jax.vmap(sample)(examples, chunk_keys)  # [chunk, num_samples]
        # One (example, label) pair per sample: the per-pair squared gradients are summed.
        pairs = (
            jax.tree.map(lambda a: jnp.repeat(a, num_samples, axis=0), examples),
            labels.reshape(-1),
        )
        return _square_sums(neg_log_p, params, pairs, method)

    total = _chunked_sum(chunk_sum, (inputs, keys), n, microbatch_size)
    return jax.tree.map(
        lambda t, p: (t / (n * num_samples)).astype(jnp.result_type(p)), total, params
    )


def _without_reads(fn: Callable) -> Callable:
    def call(model_fn, reads, *rest):  # reads: what model_fn reads (a part of the cache key)
        return fn(model_fn, *rest)

    return call


_JIT = {
    fn: jax.jit(_without_reads(fn), static_argnums=tuple(range(nstatic + 1)))
    for fn, nstatic in ((_empirical, 3), (_monte_carlo, 4))
}
