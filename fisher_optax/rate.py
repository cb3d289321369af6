"""Rate-aware fine-tuning: a differentiable price on the bits the quantized codes cost.

:func:`rate_penalty` reads the codebooks and code lengths of an entropy-constrained
quantization (:func:`~fisher_optax.quantize` with ``method="ecsq"``, or
:func:`~fisher_optax.quantize_to_target`) and prices every weight at the code that is
cheapest for it in distortion plus rate. Added to a training loss, its gradient moves
each weight toward that code, so a later quantization at the same file size loses less.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax import _validate
from fisher_optax._tree import check_matching
from fisher_optax._types import Fisher, Params
from fisher_optax.quantize import QuantizedParams

__all__ = ["rate_penalty"]


def rate_penalty(params: Params, q: QuantizedParams, *, fisher: Fisher | None = None) -> jax.Array:
    r"""The entropy-constrained quantization cost of ``params`` at ``q``'s codebooks and rates.

    For every leaf that ``q`` quantizes, over the weights ``q`` codes (its own positions:
    the weights it pruned, by mask or as zero cells, take no part):

    .. math::
      R(w) = \sum_i \min_k \Big[ F_i (w_i - c_k)^2 + \lambda\, \ell_k \Big],
      \qquad \ell_k = \log_2 \frac{N}{n_k},

    where ``c_k`` runs over the leaf's codebook of the weight's width (per slice with
    ``q.axes``: the entries of the weight's slice), ``n_k`` of the ``N`` coded weights of
    that width in the leaf hold code ``k`` in ``q`` (over all slices: the slices share one
    code stream in the file), so :math:`\ell_k` is the order-0 code length the file pays
    for the code, and :math:`\lambda` is ``q.lam``, the price of a bit that chose ``q``.
    ``F = 1`` without ``fisher``. Each term is the per-weight cost that ``quantize(...,
    method="ecsq")`` assigns by, so at the weights ``q`` was made from, ``R`` is its
    distortion plus the bits of its codes times :math:`\lambda`.

    The codebooks and code lengths are constants (no gradient reaches ``q``). The gradient
    in ``w_i`` is :math:`2 F_i (w_i - c_{k^*})` for its cheapest code :math:`k^*`: added to a
    loss, ``mu * rate_penalty(params, q0)`` pulls each weight toward the code that is
    cheapest in distortion plus rate, not only the nearest one. Weights that ``q`` does not
    code get no gradient from it; keep them pruned with a mask.

    Runs under ``jit``, with ``q`` closed over or passed as an argument; its cost is one
    ``(n, K)`` comparison per leaf of ``n`` weights and ``K`` entries.

    Args:
      params: a pytree of the structure and shapes that ``q`` was made from (the weights
        being fine-tuned); its quantized leaves must be floating.
      q: a :class:`~fisher_optax.QuantizedParams` that records its price of a bit
        (``q.lam``): from ``quantize(..., method="ecsq")`` or ``method="fisher_step"``,
        or :func:`~fisher_optax.quantize_to_target`, or those fine-tuned by
        :func:`~fisher_optax.share_codebooks` and :func:`~fisher_optax.requantize`.
      fisher: optional pytree like ``params``: the weights ``F`` of the distortion (the
        Fisher that ``q`` was quantized with, for the same objective).

    Returns:
      A scalar ``jax.Array`` (float32 unless the params are float64).

    Raises:
      TypeError: if ``q`` is not a :class:`~fisher_optax.QuantizedParams`, or a quantized
        leaf of ``params`` is not floating.
      ValueError: if ``q`` records no ``lam``, if ``params`` or ``fisher`` do not match
        ``q``'s structure and shapes, or if a concrete ``fisher`` is negative or not finite
        on a weight that ``q`` codes.

    Examples:
      >>> import jax, jax.numpy as jnp, fisher_optax
      >>> w = {"w": jnp.array([[-1.1, -0.9, 0.9, 1.1]])}
      >>> q = fisher_optax.quantize(w, 8, method="ecsq", lam=0.05)
      >>> q.codebooks[0][8]  # two entries, each held by half the weights: one bit a code
      array([-1.,  1.], dtype=float32)
      >>> round(float(fisher_optax.rate_penalty(w, q)), 6)  # 4 * 0.1^2 + 0.05 * 4 bits
      0.24
      >>> jax.grad(fisher_optax.rate_penalty)(w, q)["w"].round(3)  # 2 (w - c)
      Array([[-0.2,  0.2, -0.2,  0.2]], dtype=float32)

      The recipe: price the codes of a first quantization at the target size, fine-tune
      with the penalty, then quantize again at that size.

      >>> w = {"w": jax.random.normal(jax.random.key(0), (32, 32))}
      >>> q0, _ = fisher_optax.quantize_to_target(w, size_bytes=400)
      >>> loss = lambda p: fisher_optax.rate_penalty(p, q0)  # + the task's loss
      >>> step = jax.jit(lambda p: jax.tree.map(lambda x, g: x - 0.1 * g, p, jax.grad(loss)(p)))
      >>> w_ft = step(step(w))
      >>> bool(loss(w_ft) < loss(w))
      True
    """
    if not isinstance(q, QuantizedParams):
        raise TypeError(
            f"q must be the QuantizedParams returned by quantize or quantize_to_target, got "
            f"{type(q).__name__}."
        )
    if q.lam is None:
        raise ValueError(
            "rate_penalty prices codes with the lam (price of a bit) that chose them, and q "
            "records none: it was quantized with method='kmeans' or 'uniform', or loaded "
            "from a file. Quantize with method='ecsq' or 'fisher_step', or quantize_to_target."
        )
    reference = jax.tree.unflatten(
        q.treedef, [jax.ShapeDtypeStruct(s, jnp.float32) for s in q.shapes]
    )
    _validate.arrays_only(params, "params")
    leaves = check_matching(reference, params, ref_name="q", other_name="params")
    if fisher is None:
        weights = [None] * len(leaves)
    else:
        _validate.arrays_only(fisher, "fisher")
        weights = check_matching(reference, fisher, ref_name="q", other_name="fisher")
        if all(_validate.is_concrete(b) for b in q.bits if b is not None):
            coded = [
                np.zeros(s, bool) if b is None else np.asarray(b) > 0
                for b, s in zip(q.bits, q.shapes, strict=True)
            ]
            _validate.fisher(params, fisher, where=coded)  # values, where concrete
    total = []
    for i, (x, f) in enumerate(zip(leaves, weights, strict=True)):
        if not q.quantized[i]:
            continue
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(
                f"params at {q.paths[i]} has dtype {jnp.result_type(x)}, but q quantizes that "
                "leaf: pass the float weights that q was made from."
            )
        total.append(_leaf_penalty(x, f, q, i))
    if not total:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.result_type(*total)
    return sum((t.astype(dtype) for t in total), start=jnp.zeros((), dtype))


def _leaf_penalty(x: Any, f: Any, q: QuantizedParams, i: int) -> jax.Array:
    """:func:`rate_penalty`'s sum over the coded weights of leaf ``i``."""
    x = jnp.asarray(x)
    dtype = jnp.result_type(x)
    bits = jnp.asarray(q.bits[i])
    f = jnp.ones((), dtype) if f is None else jnp.asarray(f).astype(dtype)
    axis = q.axes[i]
    out = jnp.zeros((), dtype)
    for b, book in q.codebooks[i].items():
        book = jax.lax.stop_gradient(jnp.asarray(book).astype(dtype))
        k = book.shape[-1]
        if k == 0:
            continue
        sel = bits == b
        counts, own = _counts(q.bits[i], q.codes[i], b, k, axis)
        counts = jnp.asarray(counts).astype(dtype)
        # An entry no weight holds has no code length (and, per slice, marks the padding
        # after a slice's own entries): it is never a weight's cheapest code.
        length = jnp.log2(jnp.sum(counts)) - jnp.log2(jnp.maximum(counts, 1))
        unused = jnp.where(counts > 0, 0.0, jnp.inf).astype(dtype)
        if axis is None:
            entries = book
            blocked = unused
        else:
            shape = [1] * x.ndim
            shape[axis] = x.shape[axis]
            channel = jnp.broadcast_to(jnp.arange(x.shape[axis]).reshape(shape), x.shape)
            entries = book[channel]
            blocked = unused + jnp.where(
                jnp.arange(k) < jnp.asarray(own)[channel][..., None], 0.0, jnp.inf
            )
        cost = f[..., None] * jnp.square(x[..., None] - entries) + q.lam * length + blocked
        best = jnp.argmin(jax.lax.stop_gradient(cost), axis=-1)
        c = jnp.take_along_axis(jnp.broadcast_to(entries, cost.shape), best[..., None], -1)[..., 0]
        term = f * jnp.square(x - c) + q.lam * length[best]
        out = out + jnp.sum(jnp.where(sel, term, 0.0))
    return out


def _counts(bits: Any, codes: Any, width: int, k: int, axis: int | None) -> tuple[Any, Any]:
    """How many weights of ``width`` hold each of the ``k`` codes, and per slice along
    ``axis`` its own number of entries ``L_c`` (one more than its largest code; ``None``
    without ``axis``).

    On a concrete ``q`` (closed over by a jitted loss) this is NumPy, so that XLA does not
    fold the scatter into a constant at every compile; under a traced ``q``, jax.
    """
    concrete = _validate.is_concrete(bits) and _validate.is_concrete(codes)
    xp = np if concrete else jnp
    sel = xp.asarray(bits) == width
    codes = xp.asarray(codes).astype(xp.int32)
    if concrete:
        counts = np.bincount(codes[sel], minlength=k)[:k]
    else:
        counts = jnp.zeros(k, jnp.int32).at[codes].add(sel.astype(jnp.int32))
    if axis is None:
        return counts, None
    slices = xp.moveaxis(xp.where(sel, codes + 1, 0), axis, 0).reshape(sel.shape[axis], -1)
    return counts, slices.max(axis=1, initial=0)
