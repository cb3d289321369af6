"""Exact Fisher diagonals from per-example gradients: references to check Adam's ``nu`` against.

Both functions cost one backward pass per example (``vmap`` of ``grad``), about 100x a
batch gradient; they are for checking and for small models, not for the training loop.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fisher_optax._types import Fisher, Params

__all__ = ["empirical_fisher", "monte_carlo_fisher"]


def _batch_size(batch: Any, name: str) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError(f"{name}: the batch has no arrays.")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"{name}: every leaf of the batch needs the same leading batch axis; got leading "
            f"sizes {sorted(s for s in sizes if s is not None)} "
            f"{'and a scalar leaf' if None in sizes else ''}."
        )
    return sizes.pop()


def _check_microbatch(microbatch_size: int | None, name: str) -> None:
    if microbatch_size is not None and (
        int(microbatch_size) != microbatch_size or microbatch_size < 1
    ):
        raise ValueError(f"{name}: microbatch_size must be a positive int, got {microbatch_size}.")


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


def empirical_fisher(
    loss_fn: Callable[[Params, Any], jax.Array],
    params: Params,
    batch: Any,
    *,
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
      microbatch_size: examples per chunk (``lax.map`` over chunks) to bound memory; does
        not change the result beyond float rounding.

    Returns:
      A pytree shaped like ``params``.

    Raises:
      ValueError: if the batch leaves disagree on the batch axis or ``microbatch_size`` is
        not a positive int.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> loss = lambda w, b: jnp.mean((b["x"] * w - b["y"]) ** 2)
      >>> batch = {"x": jnp.array([1.0, 2.0]), "y": jnp.array([0.0, 0.0])}
      >>> fisher_optax.empirical_fisher(loss, jnp.array(1.0), batch)  # mean of (2 x^2 w)^2
      Array(34., dtype=float32)
    """
    n = _batch_size(batch, "empirical_fisher")
    _check_microbatch(microbatch_size, "empirical_fisher")

    def one(example):
        one_batch = jax.tree.map(lambda x: x[None], example)
        return jax.grad(loss_fn)(params, one_batch)

    def chunk_sum(chunk):
        grads = jax.vmap(one)(chunk)
        return jax.tree.map(lambda g: jnp.sum(jnp.square(g), axis=0), grads)

    total = _chunked_sum(chunk_sum, batch, n, microbatch_size)
    return jax.tree.map(lambda t, p: (t / n).astype(jnp.result_type(p)), total, params)


def monte_carlo_fisher(
    logits_fn: Callable[[Params, Any], jax.Array],
    params: Params,
    inputs: Any,
    key: jax.Array,
    *,
    num_samples: int = 1,
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
      microbatch_size: examples per chunk, to bound memory.

    Returns:
      A pytree shaped like ``params``.

    Raises:
      ValueError: on a bad batch axis, ``num_samples < 1`` or a bad ``microbatch_size``.

    Examples:
      >>> import jax, jax.numpy as jnp, fisher_optax
      >>> logits = lambda w, x: x[:, None] * w  # one input, two classes
      >>> f = fisher_optax.monte_carlo_fisher(
      ...     logits, jnp.zeros(2), jnp.ones(4), jax.random.key(0), num_samples=1000)
      >>> f.shape
      (2,)

    References:
      Kunstner, Balles, Hennig. Limitations of the Empirical Fisher Approximation for
      Natural Gradient Descent. NeurIPS 2019. https://arxiv.org/abs/1905.12558
    """
    n = _batch_size(inputs, "monte_carlo_fisher")
    _check_microbatch(microbatch_size, "monte_carlo_fisher")
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(
            f"monte_carlo_fisher: num_samples must be a positive int, got {num_samples}."
        )
    keys = jax.random.split(key, n)

    def one(example, example_key):
        x = jax.tree.map(lambda a: a[None], example)
        logits = jax.lax.stop_gradient(logits_fn(params, x))[0]
        labels = jax.random.categorical(example_key, logits, shape=(num_samples,))

        def log_p(p, y):
            return jax.nn.log_softmax(logits_fn(p, x)[0])[y]

        grads = jax.vmap(jax.grad(log_p), in_axes=(None, 0))(params, labels)
        return jax.tree.map(lambda g: jnp.mean(jnp.square(g), axis=0), grads)

    def chunk_sum(chunk):
        examples, chunk_keys = chunk
        sq = jax.vmap(one)(examples, chunk_keys)
        return jax.tree.map(lambda g: jnp.sum(g, axis=0), sq)

    total = _chunked_sum(chunk_sum, (inputs, keys), n, microbatch_size)
    return jax.tree.map(lambda t, p: (t / n).astype(jnp.result_type(p)), total, params)
