r"""Optimal Brain Surgeon with a block-diagonal empirical Fisher: prune and update the rest.

Optimal Brain Damage (:func:`fisher_optax.saliency`) ranks weights by the Fisher diagonal
and leaves the survivors as they are. Optimal Brain Surgeon also moves the surviving weights
to compensate for the removed ones, with the inverse of the Fisher. Here the Fisher is the
empirical one of ``m`` gradients :math:`g_i`, restricted to blocks of ``B`` consecutive
weights of a leaf (in flat, row-major order) and damped:

.. math::
  F = \lambda I + \frac1m \sum_{i=1}^m g_i g_i^\top \quad (B \times B \text{ per block}).

Removing the set :math:`Q` of a block's weights costs, to second order,

.. math::
  \rho_Q = \tfrac12\, w_Q^\top \big((F^{-1})_{QQ}\big)^{-1} w_Q,
  \qquad \delta w = -F^{-1}_{:,Q} \big((F^{-1})_{QQ}\big)^{-1} w_Q,

and :math:`\delta w` is the update of the whole block that minimises that cost with
:math:`w_Q + \delta w_Q = 0`. For one weight, :math:`\rho_q = w_q^2 / (2 [F^{-1}]_{qq})`.
With ``B = 1`` this is OBD with the damped Fisher diagonal, :math:`\tfrac12 (F + \lambda)
w^2`, and no other weight moves.

One shot, three steps: :func:`per_example_grads` (or any ``m`` mini-batch gradients stacked
on a leading axis), :func:`block_fisher_inverse`, then :func:`obs_prune` (which ranks by
:func:`obs_scores`). While training, :class:`BlockOBS` as the ``criterion`` of
:func:`fisher_optax.pruned` keeps the last ``m`` mini-batch gradients and applies the same
selection and update at every mask update; :func:`gradient_buffer` is that collector on its
own, for a chain. The Fisher is exact for the gradients given; it is the empirical Fisher
(training labels), an approximation of the Hessian near a minimum.

References:
  Singh, Alistarh. WoodFisher: Efficient Second-Order Approximation for Neural Network
  Compression. NeurIPS 2020. https://arxiv.org/abs/2004.14340

  Kurtic, Campos, Nguyen, Frantar, Kurtz, Fineran, Goin, Alistarh. The Optimal BERT
  Surgeon: Scalable and Accurate Second-Order Pruning for Large Language Models. EMNLP 2022.
  https://arxiv.org/abs/2203.07259
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fisher_optax import _validate, patterns
from fisher_optax._tree import keystr
from fisher_optax._types import Mask, Params, Prunable, Scores, Sparsity

__all__ = [
    "BlockOBS",
    "GradientBufferState",
    "block_fisher_inverse",
    "buffer_fisher_inverse",
    "gradient_buffer",
    "obs_prune",
    "obs_scores",
    "per_example_grads",
]


def per_example_grads(
    loss_fn: Callable[[Params, Any], jax.Array],
    params: Params,
    batch: Any,
    *,
    chunk: int | None = None,
) -> Params:
    """The gradient of ``loss_fn`` at each example of ``batch``, stacked on a leading axis.

    ``vmap`` of ``grad`` over one-example batches; with ``chunk``, ``lax.map`` over chunks
    of that many examples bounds the memory of the backward passes (``N`` must then be a
    multiple of ``chunk``). The result holds ``N`` times the parameters.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over a batch whose leaves
        have a leading batch axis; called on one-example batches.
      params: the parameters.
      batch: a pytree of arrays with a common leading axis of size ``N``.
      chunk: examples per ``vmap``; ``None`` takes all at once.

    Returns:
      A pytree like ``params`` whose leaves have a leading axis of size ``N``.

    Raises:
      ValueError: if the batch leaves disagree on the leading axis, or ``chunk`` does not
        divide ``N``.
      TypeError: if ``chunk`` is not an int >= 1.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax as fo
      >>> loss = lambda w, b: jnp.mean((b * w) ** 2)
      >>> fo.obs.per_example_grads(loss, jnp.ones(()), jnp.array([1.0, 2.0]))  # 2 x^2 w
      Array([2., 8.], dtype=float32)
    """
    _validate.callable_arity(loss_fn, "loss_fn", "loss_fn(params, batch)", 2)
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        scalar = " and a scalar leaf" if None in sizes else ""
        raise ValueError(
            f"every leaf of batch needs the same leading batch axis; got leading sizes "
            f"{sorted(s for s in sizes if s is not None)}{scalar}. Give every leaf the "
            "examples along axis 0."
        )
    (n,) = sizes
    one = jax.grad(lambda p, ex: loss_fn(p, jax.tree.map(lambda x: x[None], ex)))
    many = jax.vmap(one, in_axes=(None, 0))
    if chunk is None:
        return many(params, batch)
    chunk = _validate.integer(chunk, "chunk")
    if n % chunk:
        raise ValueError(
            f"chunk={chunk} does not divide the batch of {n} examples; pick a divisor of {n} "
            "or chunk=None."
        )
    split = jax.tree.map(lambda x: x.reshape(n // chunk, chunk, *x.shape[1:]), batch)
    out = jax.lax.map(lambda b: many(params, b), split)
    return jax.tree.map(lambda g: g.reshape(n, *g.shape[2:]), out)


def _spd_inverse(a: jax.Array) -> jax.Array:
    """Inverses of a batch ``(..., k, k)`` of symmetric positive definite matrices.

    Gauss-Jordan elimination along the diagonal (no pivoting is needed for SPD matrices),
    ``k`` rank-one sweeps of the whole batch in plain ``jnp``. Not LAPACK: on CPU, jaxlib's
    batched LAPACK factorizations share one thread pool, and several of them running at once
    (one per leaf in one program, or programs dispatched asynchronously) can deadlock.
    """
    k = a.shape[-1]
    eye = jnp.eye(k, dtype=a.dtype)

    def sweep(j, a):
        col, row = a[..., :, j], a[..., j, :]
        p = a[..., j, j][..., None]
        out = a - col[..., :, None] * row[..., None, :] / p[..., None]
        out = jnp.where(eye[j][:, None] > 0, (row / p)[..., None, :], out)
        out = jnp.where(eye[j][None, :] > 0, (col / p)[..., :, None], out)
        return jnp.where(eye[j][:, None] * eye[j][None, :] > 0, -1 / p[..., None], out)

    return 0.0 - jax.lax.fori_loop(0, k, sweep, a)  # not -x: no -0.0 off the diagonal


@functools.partial(jax.jit, static_argnames=("block_size", "dtype"))
def _inverse_leaf(g: jax.Array, damping: jax.Array, *, block_size: int, dtype: Any) -> jax.Array:
    m = g.shape[0]
    n = math.prod(g.shape[1:])
    nb = -(-n // block_size)
    flat = g.reshape(m, n).astype(dtype)
    # Zero gradients in the padding: padded coordinates get F = damping * I, decoupled from
    # the real weights, so they change neither the inverse of the real block nor its updates.
    flat = jnp.pad(flat, ((0, 0), (0, nb * block_size - n)))
    gb = flat.reshape(m, nb, block_size).transpose(1, 0, 2)  # (nb, m, B)
    damping = damping.astype(dtype)
    eye_b = jnp.eye(block_size, dtype=dtype)
    if m < block_size:
        # Woodbury in the m x m capacitance form, m^3 per block instead of B^3:
        # F^-1 = (I - G^T (m l I + G G^T)^-1 G) / l.
        cap = damping * m * jnp.eye(m, dtype=dtype) + gb @ gb.transpose(0, 2, 1)
        solved = _spd_inverse(cap) @ gb  # C^-1 G
        return (eye_b - gb.transpose(0, 2, 1) @ solved) / damping
    fisher = damping * eye_b + gb.transpose(0, 2, 1) @ gb / m
    return _spd_inverse(fisher)


def _check_damping(damping: Any) -> None:
    if not (
        isinstance(damping, int | float | np.floating | np.integer)
        and not isinstance(damping, bool)
        and math.isfinite(damping)
        and damping > 0
    ):
        raise ValueError(
            f"damping must be a finite number > 0 (a Python or NumPy scalar), got {damping!r}; "
            "try 1e-4 to 1e-2 of the mean squared gradient."
        )


def block_fisher_inverse(
    grads: Params, *, block_size: int, damping: float, dtype: Any = jnp.float32
) -> Params:
    r"""The inverse of the damped empirical Fisher in blocks of ``block_size`` weights.

    .. math::
      F_b = \lambda I + \frac1m \sum_{i=1}^m g_{i,b}\, g_{i,b}^\top, \qquad
      \text{returned: } F_b^{-1} \text{ for every block } b,

    where :math:`g_{i,b}` is the ``b``-th run of ``block_size`` consecutive weights of a leaf
    of the ``i``-th gradient, in flat row-major order. A leaf whose size ``n`` is not a
    multiple of ``B`` gets a last block padded with zero gradients: the padded coordinates
    are decoupled from the real ones (:math:`F = \lambda` there), so the real block's inverse
    and updates are exact. When ``m < B`` the inverse is computed by the Woodbury identity
    in its ``m x m`` capacitance form (:math:`O(m^3 + m B^2)` per block), otherwise by
    inverting the ``B x B`` block (:math:`O(B^3)`).

    Memory: the result holds :math:`\lceil n/B \rceil B^2 \approx n B` floats per leaf
    (``B`` times the parameters; 4 MB for 31,360 weights at ``B = 32`` in float32), plus the
    ``m`` gradients given (:math:`m n` floats). No sharding is imposed on the result: its
    blocks follow a leaf's flat row-major order, which a leaf sharded along a later axis does
    not, so a block may span shards; XLA places it as it propagates the gradients' sharding.

    Args:
      grads: a pytree like the params whose leaves carry a leading axis of ``m`` gradients
        (per-example gradients from :func:`per_example_grads`, or mini-batch gradients).
      block_size: ``B``, the weights per block; ``1`` gives the damped Fisher diagonal.
      damping: :math:`\lambda > 0`, added to the Fisher's diagonal so that the inverse
        exists when ``m < B`` and the updates stay bounded. Tune it on held-out data.
      dtype: the floating dtype of the computation and the result.

    Returns:
      A pytree like ``grads`` whose leaves have shape ``(ceil(n / B), B, B)``.

    Raises:
      ValueError: if a leaf has no leading axis, the leaves disagree on ``m``, or
        ``damping`` is not a finite number > 0.
      TypeError: if ``block_size`` is not an int >= 1.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax as fo
      >>> grads = {"w": jnp.array([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]])}  # m = 2 gradients
      >>> finv = fo.obs.block_fisher_inverse(grads, block_size=2, damping=4.0)
      >>> finv["w"].shape  # 3 weights: two blocks, the second padded
      (2, 2, 2)
      >>> finv["w"][1]  # 1 / (4 + (4 + 4) / 2), then the padding's 1 / damping
      Array([[0.125, 0.   ],
             [0.   , 0.25 ]], dtype=float32)
    """
    block_size = _validate.integer(block_size, "block_size")
    _check_damping(damping)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    ms = {}
    for path, g in flat:
        if jnp.ndim(g) < 1:
            raise ValueError(
                f"grads at {keystr(path)} is a scalar; every leaf needs a leading axis of m "
                "gradients (stack them, e.g. with per_example_grads)."
            )
        ms.setdefault(jnp.shape(g)[0], keystr(path))
    if len(ms) > 1:
        raise ValueError(
            f"the leaves of grads disagree on the number of gradients m (leading axis): "
            f"{ {k: v for v, k in ms.items()} }; stack the same m gradients for every leaf."
        )
    lam = jnp.asarray(damping, dtype)
    return jax.tree.map(
        lambda g: _inverse_leaf(jnp.asarray(g), lam, block_size=block_size, dtype=dtype), grads
    )


def _finv_leaves(params: Params, finv: Params) -> list[tuple[Any, jax.Array, jax.Array]]:
    """``(path, param, finv)`` per leaf, with ``finv`` checked against the param's size."""
    pflat, pdef = jax.tree_util.tree_flatten_with_path(params)
    fflat, fdef = jax.tree_util.tree_flatten_with_path(finv)
    if pdef != fdef:
        raise ValueError(
            f"finv must have the structure of params; got {fdef} for params {pdef}. Compute it "
            "with block_fisher_inverse on gradients shaped like params."
        )
    out = []
    for (path, w), (_, f) in zip(pflat, fflat, strict=True):
        n = math.prod(jnp.shape(w))
        fs = jnp.shape(f)
        if len(fs) != 3 or fs[1] != fs[2] or fs[0] != -(-n // max(fs[1], 1)):
            raise ValueError(
                f"finv at {keystr(path)} has shape {fs}; for a leaf of {n} weights it must be "
                f"(ceil({n} / B), B, B) for the block size B. Compute it from gradients of these "
                "params with block_fisher_inverse."
            )
        out.append((path, w, f))
    return out


def _padded_blocks(w: jax.Array, nb: int, b: int) -> jax.Array:
    flat = jnp.ravel(w).astype(jnp.float32)
    return jnp.pad(flat, (0, nb * b - flat.size)).reshape(nb, b)


def _unblock(x: jax.Array, like: jax.Array) -> jax.Array:
    return x.reshape(-1)[: math.prod(jnp.shape(like))].reshape(jnp.shape(like))


def _leaf_scores(w: jax.Array, f: jax.Array) -> jax.Array:
    wb = _padded_blocks(w, f.shape[0], f.shape[1])
    diag = jnp.diagonal(f, axis1=1, axis2=2).astype(jnp.float32)
    return _unblock(0.5 * wb**2 / diag, w)


def obs_scores(params: Params, finv: Params) -> Scores:
    r"""Optimal Brain Surgeon's saliency of removing each weight alone, with its block's Fisher.

    .. math::
      \rho_q = \frac{w_q^2}{2\, [F^{-1}]_{qq}}

    the loss increase (to second order, after the optimal update of the rest of the block)
    when weight ``q`` alone is set to zero. Larger is more important, as for every score tree.
    With ``B = 1`` it is :math:`\tfrac12 (F + \lambda) w^2`.

    Args:
      params: a pytree of parameter arrays.
      finv: :func:`block_fisher_inverse` of gradients shaped like ``params``.

    Returns:
      A float32 pytree shaped like ``params``.

    Raises:
      ValueError: if ``finv`` does not match ``params``.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax as fo
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> finv = {"w": jnp.array([[[0.5, 0.0], [0.0, 2.0]]])}  # one block of two
      >>> fo.obs.obs_scores(params, finv)["w"]
      Array([1., 1.], dtype=float32)
    """
    leaves = [_leaf_scores(w, f) for _, w, f in _finv_leaves(params, finv)]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


@jax.jit  # eager calls compile once per shape instead of dispatching the loop op by op
def _surgery_shift(w: jax.Array, f: jax.Array, keep: jax.Array) -> jax.Array:
    """The float32 block OBS update of ``w`` that removes what ``keep`` drops: ``-w`` on the
    removed weights, :math:`-F^{-1}_{:,Q} ((F^{-1})_{QQ})^{-1} w_Q` on the others."""
    nb, b = f.shape[0], f.shape[1]
    wb = _padded_blocks(w, nb, b)
    q = ~_padded_blocks(keep, nb, b).astype(bool)
    q = q & (jnp.arange(nb * b).reshape(nb, b) < math.prod(jnp.shape(w)))
    f = f.astype(jnp.float32)
    # (F^-1)_QQ padded to B x B with identity rows and columns outside Q: a static shape, and
    # its solve gives z_Q = ((F^-1)_QQ)^-1 w_Q with z = 0 outside Q.
    both = q[:, :, None] & q[:, None, :]
    eye = jnp.eye(b, dtype=bool)
    a = jnp.where(both, f, jnp.where(eye, 1.0, 0.0))
    z = jnp.einsum("kij,kj->ki", _spd_inverse(a), jnp.where(q, wb, 0.0))
    shift = jnp.where(q, -wb, -jnp.einsum("kij,kj->ki", f, z))
    return _unblock(shift, w)


def _surgery(w: jax.Array, f: jax.Array, keep: jax.Array) -> jax.Array:
    """``w`` after removing the weights ``keep`` drops, with the block OBS update of the rest."""
    new = jnp.asarray(w, jnp.float32) + _surgery_shift(w, f, keep)
    return jnp.where(keep, new, 0.0).astype(jnp.result_type(w))  # exact zeros, no residues


def obs_prune(
    params: Params,
    finv: Params,
    sparsity: Sparsity,
    *,
    prunable: Prunable = None,
    mask: Mask | None = None,
) -> tuple[Params, Mask]:
    r"""One-shot Optimal Brain Surgeon: remove the weights of least saliency, update the rest.

    The weights to remove are chosen by :func:`fisher_optax.select` on :func:`obs_scores`
    (so with its exact count ``round(s * n)``, its tie rule and its ``prunable``/``mask``
    semantics, and global ranking across leaves). Then, in every block, the set :math:`Q` of
    its removed weights (those ``mask`` pruned included, so they stay at zero) is removed at
    once with the exact multi-weight update

    .. math::
      w \leftarrow w - F^{-1}_{:,Q} \big((F^{-1})_{QQ}\big)^{-1} w_Q,

    after which the weights of :math:`Q` are set to exactly zero. Blocks with nothing removed
    are unchanged. Traceable: works eagerly and under ``jit`` (``sparsity`` may be traced).

    Args:
      params: a pytree of parameter arrays.
      finv: :func:`block_fisher_inverse` of gradients shaped like ``params``.
      sparsity: the fraction of the prunable weights to remove, as in
        :func:`fisher_optax.select`.
      prunable: which weights may be pruned, as in :func:`fisher_optax.select` (default: the
        kernels).
      mask: a prior keep-mask; what it pruned stays pruned and counts toward the target.

    Returns:
      ``(new_params, mask)``: the pruned and updated parameters (dtypes kept) and the
      boolean keep-mask.

    Raises:
      ValueError: if ``finv`` does not match ``params``, and as :func:`fisher_optax.select`.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax as fo
      >>> params = {"w": jnp.array([[1.0, 0.1]])}
      >>> grads = {"w": jnp.array([[[1.0, 1.0]], [[-1.0, -1.0]], [[1.0, 1.0]]])}  # coupled
      >>> finv = fo.obs.block_fisher_inverse(grads, block_size=2, damping=0.01)
      >>> new, keep = fo.obs.obs_prune(params, finv, 0.5)
      >>> keep["w"]
      Array([[ True, False]], dtype=bool)
      >>> new["w"]  # the survivor takes over the removed weight's share
      Array([[1.0990099, 0.       ]], dtype=float32)
    """
    checked = _finv_leaves(params, finv)
    scores = obs_scores(params, finv)
    keep = patterns.select(scores, sparsity, prunable=prunable, mask=mask)
    new = [_surgery(w, f, k) for (_, w, f), k in zip(checked, jax.tree.leaves(keep), strict=True)]
    return jax.tree.unflatten(jax.tree.structure(params), new), keep


def _check_count(value: Any, name: str, meaning: str) -> int:
    try:
        return _validate.integer(value, name)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} It is {meaning}.") from None


@dataclasses.dataclass(frozen=True)
class BlockOBS:
    r"""Block Optimal Brain Surgeon as the ``criterion`` of :func:`fisher_optax.pruned`.

    With ``criterion=BlockOBS(...)``, :func:`fisher_optax.pruned` keeps the last
    ``num_grads`` gradients it is given (the mini-batch gradients of the last ``m`` steps, a
    ring buffer in :class:`fisher_optax.PrunedState`), and at each mask update it

    1. inverts their damped block empirical Fisher (:func:`buffer_fisher_inverse`);
    2. selects the weights to remove by :func:`obs_scores`, with the wrapper's ``pattern``,
       ``method``, targets and ``prunable``, through :func:`fisher_optax.select` (its exact
       counts and ties);
    3. adds to that step's update the multi-weight update of :func:`obs_prune` for every
       block that loses weights, so that after ``optax.apply_updates`` the surviving weights
       are those of :func:`obs_prune` (plus the inner optimizer's own step) and the removed
       ones are exactly zero.

    This is oBERT's gradual setting (Kurtic et al. 2022) with mini-batch gradients for the
    Fisher: :math:`\tfrac1m \sum_i g_i g_i^\top` of mini-batch gradients is the per-example
    empirical Fisher divided by the batch size, plus the outer product of the mean gradient,
    so tune ``damping`` to its scale. Until ``num_grads`` steps are done, the gradients held so
    far are used.

    Memory: the buffer holds ``num_grads`` times the parameters (every leaf, in its dtype);
    at a mask update the inverse adds about ``block_size`` times the parameters. Between
    mask updates a step costs one extra write of its gradients into the buffer. The buffer
    is allocated whole, not sharded like the params.

    Attributes:
      block_size: ``B``, consecutive weights per block (in flat row-major order of a leaf);
        ``1`` is OBD with the damped Fisher diagonal of the buffer, and no weight moves.
      num_grads: ``m``, the gradients kept.
      damping: :math:`\lambda > 0` added to the Fisher's diagonal.

    Raises:
      TypeError: if ``block_size`` or ``num_grads`` is not an int.
      ValueError: if ``block_size`` or ``num_grads`` is below 1, or ``damping`` is not a
        finite number > 0.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fisher_optax as fo
      >>> params = {"kernel": jnp.array([[1.0, 0.1, 0.2, 2.0]])}
      >>> opt = fo.pruned(
      ...     optax.sgd(0.0),
      ...     lambda t: jnp.where(t >= 2, 0.5, 0.0),
      ...     criterion=fo.obs.BlockOBS(block_size=4, num_grads=2, damping=0.01),
      ...     method="one_stage",
      ...     update_every=2,
      ... )
      >>> state = opt.init(params)
      >>> grads = [jnp.array([[1.0, 1.0, 0.0, 0.0]]), jnp.array([[-1.0, -1.0, 0.0, 0.0]])]
      >>> for g in grads * 2:
      ...     updates, state = opt.update({"kernel": g}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params["kernel"]  # 0.1 and 0.2 removed; the weight coupled to 0.1 takes its share
      Array([[1.0990108, 0.       , 0.       , 2.       ]], dtype=float32)

    References:
      Kurtic, Campos, Nguyen, Frantar, Kurtz, Fineran, Goin, Alistarh. The Optimal BERT
      Surgeon: Scalable and Accurate Second-Order Pruning for Large Language Models. EMNLP
      2022. https://arxiv.org/abs/2203.07259
    """

    block_size: int
    num_grads: int
    damping: float

    def __post_init__(self) -> None:
        _check_count(self.block_size, "block_size", "the weights per block, B")
        _check_count(self.num_grads, "num_grads", "the number of gradients kept, m")
        _check_damping(self.damping)


class GradientBufferState(NamedTuple):
    """State of :func:`gradient_buffer`.

    Attributes:
      count: int32 scalar, the gradients written so far (the next goes to slot
        ``count % m``).
      grads: a pytree like the params whose leaves have a leading axis of ``m`` slots; slots
        not yet written are zero.
    """

    count: jax.Array
    grads: Params


def _buffer_init(params: Params, num_grads: int) -> GradientBufferState:
    grads = jax.tree.map(
        lambda p: jnp.zeros((num_grads, *jnp.shape(p)), jnp.result_type(p)), params
    )
    return GradientBufferState(count=jnp.zeros([], jnp.int32), grads=grads)


def _buffer_write(state: GradientBufferState, grads: Params) -> GradientBufferState:
    slot = state.count % jax.tree.leaves(state.grads)[0].shape[0]
    new = jax.tree.map(
        lambda buf, g: jax.lax.dynamic_update_index_in_dim(buf, g.astype(buf.dtype), slot, 0),
        state.grads,
        grads,
    )
    return GradientBufferState(count=optax.safe_increment(state.count), grads=new)


def gradient_buffer(num_grads: int) -> optax.GradientTransformation:
    """Keep the last ``num_grads`` gradients in the state; pass them on unchanged.

    A ring buffer for :func:`buffer_fisher_inverse`: put it first in a chain,
    ``optax.chain(gradient_buffer(m), optax.adam(...))``, and the state holds the mini-batch
    gradients of the last ``m`` steps. :class:`BlockOBS` in :func:`fisher_optax.pruned` keeps
    one of its own. Memory: ``num_grads`` times the parameters.

    Args:
      num_grads: ``m``, the gradients kept.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`GradientBufferState`.

    Raises:
      TypeError: if ``num_grads`` is not an int.
      ValueError: if ``num_grads`` is below 1.

    Examples:
      >>> import jax.numpy as jnp, optax, fisher_optax as fo
      >>> opt = optax.chain(fo.obs.gradient_buffer(2), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = opt.init(params)
      >>> for g in (1.0, 2.0, 3.0):
      ...     _, state = opt.update({"w": jnp.full(2, g)}, state, params)
      >>> state[0].grads["w"]  # slot 0 was overwritten by the third gradient
      Array([[3., 3.],
             [2., 2.]], dtype=float32)
    """
    num_grads = _check_count(num_grads, "num_grads", "the number of gradients kept, m")

    def init_fn(params: Params) -> GradientBufferState:
        return _buffer_init(params, num_grads)

    def update_fn(updates, state, params=None):
        del params
        return updates, _buffer_write(state, updates)

    return optax.GradientTransformation(init_fn, update_fn)


def buffer_fisher_inverse(state: GradientBufferState, *, block_size: int, damping: float) -> Params:
    r""":func:`block_fisher_inverse` of the gradients a :func:`gradient_buffer` holds.

    While fewer than ``m`` gradients have been written, the Fisher is the mean over those
    written (:math:`k = \min(\text{count}, m)`), not over the ``m`` slots: the held
    gradients are scaled by :math:`\sqrt{m / k}`, and the empty slots add nothing. With
    nothing written the Fisher is :math:`\lambda I`. Traceable (``count`` may be traced).

    Args:
      state: a :class:`GradientBufferState`.
      block_size: ``B``, as in :func:`block_fisher_inverse`.
      damping: :math:`\lambda > 0`, as in :func:`block_fisher_inverse`.

    Returns:
      The block inverses, a pytree like the params with leaves ``(ceil(n / B), B, B)``.

    Raises:
      TypeError: if ``state`` is not a :class:`GradientBufferState`, and as
        :func:`block_fisher_inverse`.
      ValueError: as :func:`block_fisher_inverse`.

    Examples:
      >>> import jax.numpy as jnp, optax, fisher_optax as fo
      >>> buf = fo.obs.gradient_buffer(4)
      >>> params = {"w": jnp.zeros(2)}
      >>> _, state = buf.update({"w": jnp.array([2.0, 0.0])}, buf.init(params))
      >>> fo.obs.buffer_fisher_inverse(state, block_size=2, damping=1.0)["w"]  # 1 / (1 + 4)
      Array([[[0.2, 0. ],
              [0. , 1. ]]], dtype=float32)
    """
    if not isinstance(state, GradientBufferState):
        raise TypeError(
            f"state must be the GradientBufferState of fisher_optax.obs.gradient_buffer, got "
            f"{type(state).__name__}; in a chain it is e.g. opt_state[0]."
        )
    m = jax.tree.leaves(state.grads)[0].shape[0]
    held = jnp.clip(state.count, 1, m).astype(jnp.float32)
    scale = jnp.sqrt(m / held)
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), state.grads)
    return block_fisher_inverse(grads, block_size=block_size, damping=damping)


def _surgeon_shift(params: Params, finv: Params, keep: Mask) -> list[jax.Array]:
    """Per leaf of ``params``, the float32 OBS update that removes what ``keep`` drops."""
    return [
        _surgery_shift(w, f, k)
        for (_, w, f), k in zip(_finv_leaves(params, finv), jax.tree.leaves(keep), strict=True)
    ]
