"""Sums of squared per-example gradients from each layer's inputs and output cotangents.

``vmap(grad)`` runs one backward pass per example and materializes a gradient per example
for every parameter. This module gets the same sum, exactly, at about the cost of one batch
gradient: it traces the per-example loss to a jaxpr, finds for each parameter the single
operation where it meets the data (a ``dot_general`` for Dense, a ``conv_general_dilated``
for Conv, an ``add`` for a bias, a ``mul`` for a LayerNorm scale, ...), and then

1. runs one batched forward and backward pass with a zero *probe* added to each such
   operation's output: the gradient with respect to the probe of example ``b`` is that
   example's output cotangent ``dy_b`` (the summed loss couples no two examples, since each
   example is its own one-example batch, as in ``vmap(grad)``);
2. forms the per-example parameter gradient from the operation's inputs ``x_b`` and
   ``dy_b`` by the operation's own VJP. For a ``dot_general`` whose data operand has one
   position per example (a Dense layer on a vector) ``g_b = x_b dy_b^T`` is an outer
   product, so ``sum_b g_b^2 = (x^2)^T (dy^2)``: one matmul of squares, no per-example
   gradient materialized. A Conv kernel's per-example gradients (sums over output
   positions) are one convolution per chunk of 16 examples, the examples as feature groups
   (the input correlated with its output gradient), squared and summed over the chunk
   while in cache. Otherwise (a bias, a scale, a grouped Conv) the per-example gradient of
   that one parameter is formed (``[B, *shape]``, by the vmapped VJP of that one
   operation) and squared.

The batched backward pass itself avoids ``select_and_scatter_add``: a max-pool over
windows that tile the input (strides equal to the window, as in LeNet and most CNNs) is
given a VJP that routes each window's cotangent to its first maximum, the same numbers as
JAX's own rule, ties included, at a fraction of the cost on CPU.

Whatever the parameter-only computation between the leaf and that operation is (a reshape,
a broadcast, a product with a constant mask), its VJP maps the per-example gradient back to
the leaf. A parameter used by more than one data-dependent operation (tied weights, an
embedding also used as the output projection), reaching the loss without meeting the data,
or consumed by an operation with several outputs is not recognised: it falls back to
``vmap(grad)`` for that parameter alone, so the result is exact in every case.

References:
  Goodfellow. Efficient Per-Example Gradient Computations. 2015.
  https://arxiv.org/abs/1510.01799 (the outer-product form for Dense layers).
  Martens et al. kfac-jax (layers found in the traced computation).
  https://github.com/google-deepmind/kfac-jax
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fisher_optax import _jaxpr
from fisher_optax._jaxpr import Eqn, Lit

__all__: list[str] = []  # private module; used by fisher_optax.references

# Operations that only re-index a tensor one to one: a squared gradient passes through them.
_REINDEX = frozenset(
    {"reshape", "convert_element_type", "transpose", "squeeze", "expand_dims", "copy"}
)


class _Plan(NamedTuple):
    eqns: list[Eqn]
    consts: dict[int, Any]
    param_ids: list[int]
    example_ids: list[int]
    out: Any  # id or Lit of the scalar loss
    layers: dict[int, int]  # param index -> eqn index of its consumer
    operand: dict[int, int]  # param index -> operand position in that eqn
    closed: dict[int, bool]  # param index -> outer-product closed form applies
    one_to_one: dict[int, bool]  # param index -> its operand only re-indexes the leaf
    fallback: list[int]  # param indices left to vmap(grad)
    unused: list[int]  # param indices the loss does not depend on
    data: frozenset  # ids that depend on the example


def _bind(eqn: Any, args: Sequence[Any]) -> list:
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: Sequence[Any] = ()
    if isinstance(params, tuple):  # jax < 0.9 returned (subfuns, params)
        subfuns, params = params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _is_float(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _outer_product_form(eqn: Any, operand: int) -> bool:
    """Whether ``eqn`` is a ``dot_general`` whose data operand has one position per example.

    Then every entry of the parameter's gradient is one product ``x * dy`` (no sum over
    positions), so the square of the gradient is the product of the squares.
    """
    if eqn.primitive.name != "dot_general" or len(eqn.invars) != 2:
        return False
    (contract, batch) = eqn.params["dimension_numbers"]
    other = 1 - operand
    used = set(contract[other]) | set(batch[other])
    shape = eqn.invars[other].aval.shape
    return math.prod(d for i, d in enumerate(shape) if i not in used) == 1


def _plan(
    ell: Callable[[list, list], jax.Array], param_leaves: list, example_leaves: list
) -> _Plan:
    """Trace the per-example loss and find each parameter's consumer."""
    spec = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    closed = jax.make_jaxpr(ell)([spec(p) for p in param_leaves], [spec(x) for x in example_leaves])
    eqns, consts, ins, outs = _jaxpr.flatten(closed)
    n_params = len(param_leaves)
    param_ids, example_ids = ins[:n_params], ins[n_params:]

    data = set(example_ids)  # ids that depend on the example
    deps: dict[int, frozenset] = {i: frozenset({k}) for k, i in enumerate(param_ids)}
    reindex: dict[int, int] = {i: k for k, i in enumerate(param_ids)}  # id -> param it re-indexes
    uses: dict[int, list[tuple[int, int]]] = {k: [] for k in range(n_params)}
    bad: set[int] = set()
    for e, (eqn, eins, eouts) in enumerate(eqns):
        refs = [r for r in eins if not isinstance(r, Lit)]
        if any(r in data for r in refs):
            data.update(eouts)
            for j, r in enumerate(eins):
                if not isinstance(r, Lit) and r not in data:
                    for k in deps.get(r, ()):
                        uses[k].append((e, j))
            continue
        joined = frozenset().union(*(deps.get(r, frozenset()) for r in refs))
        for o in eouts:
            if joined:
                deps[o] = joined
        if (
            (
                eqn.primitive.name in _REINDEX
                or (
                    eqn.primitive.name == "broadcast_in_dim"
                    and math.prod(eqn.outvars[0].aval.shape) == math.prod(eqn.invars[0].aval.shape)
                )
            )
            and len(refs) == 1
            and refs[0] in reindex
        ):
            reindex[eouts[0]] = reindex[refs[0]]
    for r in outs:
        if not isinstance(r, Lit) and r not in data:
            bad.update(deps.get(r, ()))

    layers, operand, closed_form, one_to_one, fallback, unused = {}, {}, {}, {}, [], []
    for k in range(n_params):
        if not uses[k] and k not in bad:
            unused.append(k)
            continue
        ok = k not in bad and len(uses[k]) == 1 and _is_float(closed.jaxpr.invars[k].aval)
        if ok:
            e, j = uses[k][0]
            eqn = eqns[e].eqn
            # A layer computing in bfloat16 or float16 goes to vmap(grad) too: the closed
            # forms square its inputs and cotangents in that precision (relative errors of
            # 1e-3 in bfloat16; small float16 cotangents underflow when squared), while the
            # reference squares each example's gradient in the parameter's float32.
            ok = (
                len(eqn.outvars) == 1
                and _is_float(eqn.outvars[0].aval)
                and all(
                    jnp.dtype(v.aval.dtype).itemsize >= 4
                    for v in (*eqn.invars, *eqn.outvars)
                    if hasattr(v, "aval") and _is_float(v.aval)
                )
            )
        if not ok:
            fallback.append(k)
            continue
        layers[k], operand[k] = e, j
        one_to_one[k] = reindex.get(eqns[e].ins[j]) == k
        closed_form[k] = one_to_one[k] and _outer_product_form(eqn, j)
    return _Plan(
        eqns,
        consts,
        param_ids,
        example_ids,
        outs[0],
        layers,
        operand,
        closed_form,
        one_to_one,
        fallback,
        unused,
        frozenset(data),
    )


def _evaluate(plan: _Plan, param_leaves: Sequence, example_leaves: Sequence | None, probes: dict):
    """Run the flattened jaxpr; ``example_leaves=None`` evaluates only what needs no data.

    Returns the environment (id -> value) and, for each probed equation, its
    data-dependent inputs by operand position.
    """
    env: dict[int, Any] = dict(plan.consts)
    env.update(zip(plan.param_ids, param_leaves, strict=True))
    if example_leaves is not None:
        env.update(zip(plan.example_ids, example_leaves, strict=True))
    read = lambda r: r.value if isinstance(r, Lit) else env[r]
    recorded = {}
    for e, (eqn, eins, eouts) in enumerate(plan.eqns):
        if example_leaves is None and any(r in plan.data for r in eins if not isinstance(r, Lit)):
            continue
        args = [read(r) for r in eins]
        pool = _max_pool(eqn) if example_leaves is not None else None
        out = [pool(args[0])] if pool is not None else _bind(eqn, args)
        if e in probes:
            recorded[e] = {j: a for j, a in enumerate(args) if eins[j] in plan.data}
            out[0] = out[0] + probes[e]
        env.update(zip(eouts, out, strict=True))
    return env, recorded


def squared_gradient_sums(
    ell: Callable[[list, list], jax.Array], param_leaves: list, example_leaves: list
) -> list[jax.Array]:
    r"""``sum_b (d ell(params, example_b) / d params)^2`` per parameter leaf, exactly.

    Args:
      ell: ``ell(param_leaves, example_leaves) -> scalar``, the loss of ONE example (leaves
        without the batch axis).
      param_leaves: the parameter leaves.
      example_leaves: the example leaves, each with a leading batch axis.

    Returns:
      One array per parameter leaf, shaped like it: the sum over the batch of the squared
      per-example gradients (what ``vmap(grad)`` followed by a sum of squares gives).
    """
    plan = _plan(ell, param_leaves, [x[0] for x in example_leaves])
    return _sums(plan, ell, list(param_leaves), list(example_leaves))


def _sums(plan: _Plan, ell: Callable, param_leaves: list, example_leaves: list) -> list:
    size = jnp.shape(example_leaves[0])[0]
    probed = sorted(set(plan.layers.values()))
    zeros = {
        e: jnp.zeros(
            (size, *plan.eqns[e].eqn.outvars[0].aval.shape), plan.eqns[e].eqn.outvars[0].aval.dtype
        )
        for e in probed
    }

    def total(probes):
        def one(example_probes, example):
            env, recorded = _evaluate(plan, param_leaves, example, example_probes)
            out = plan.out.value if isinstance(plan.out, Lit) else env[plan.out]
            return out, recorded

        losses, recorded = jax.vmap(one)(probes, example_leaves)
        return jnp.sum(losses), recorded

    # One batched forward and backward pass: the cotangent of each probe, per example.
    cotangents, inputs = jax.grad(total, has_aux=True)(zeros)
    static, _ = _evaluate(plan, param_leaves, None, {})
    out: list[Any] = [None] * len(param_leaves)
    for k, e in plan.layers.items():
        out[k] = _layer_sum(plan, k, e, param_leaves, static, inputs[e], cotangents[e])
    if plan.fallback:
        out_fb = _vmap_sums(ell, param_leaves, example_leaves, plan.fallback)
        for k, s in zip(plan.fallback, out_fb, strict=True):
            out[k] = s
    for k in plan.unused:
        out[k] = jnp.zeros(jnp.shape(param_leaves[k]), jnp.result_type(param_leaves[k]))
    return out


def _layer_sum(plan, k, e, param_leaves, static, data_inputs, cotangent):
    """The squared-gradient sum of parameter ``k`` from its consumer ``e``'s inputs and dy."""
    eqn, eins, _ = plan.eqns[e]
    j = plan.operand[k]

    def apply(v, data):  # the consumer as a function of its parameter operand, one example
        args = [
            data[i] if i in data else v if i == j else r.value if isinstance(r, Lit) else static[r]
            for i, r in enumerate(eins)
        ]
        return _bind(eqn, args)[0]

    def phi(w):  # the parameter-only computation from leaf k to the operand (often identity)
        leaves = list(param_leaves)
        leaves[k] = w
        return _evaluate(plan, leaves, None, {})[0][eins[j]]

    v0 = static[eins[j]]
    _, phi_vjp = jax.vjp(phi, param_leaves[k])
    if plan.closed[k]:
        # g_b = x_b dy_b^T entrywise, so sum_b g_b^2 = VJP at (x^2, dy^2): one matmul.
        squares = {i: jnp.square(a) for i, a in data_inputs.items()}
        batched = lambda v: jax.vmap(lambda d: apply(v, d))(squares)
        (sum_v,) = jax.vjp(batched, v0)[1](jnp.square(cotangent))
        return phi_vjp(sum_v)[0]

    grouped = plan.one_to_one[k] and _grouped_kernel_form(eqn, j, data_inputs)

    def square_sum(chunk):  # sum over a chunk of examples of the squared gradients of k
        data, dy = chunk
        if grouped:
            return _conv_kernel_square_sum(eqn, data[0], dy)
        grads = jax.vmap(lambda d, c: jax.vjp(lambda v: apply(v, d), v0)[1](c)[0])(data, dy)
        if not plan.one_to_one[k]:
            return jnp.sum(jnp.square(jax.vmap(lambda g: phi_vjp(g)[0])(grads)), axis=0)
        return jnp.sum(jnp.square(grads), axis=0)  # squares commute with a re-indexing

    total = _chunk_scan(square_sum, (data_inputs, cotangent), _chunk_size(eqn, j))
    return phi_vjp(total)[0] if plan.one_to_one[k] else total


def _grouped_kernel_form(eqn: Any, operand: int, data_inputs: dict) -> bool:
    """Whether ``eqn`` convolves the data (lhs) with the parameter (rhs), ungrouped."""
    p = eqn.params
    return (
        eqn.primitive.name == "conv_general_dilated"
        and operand == 1
        and set(data_inputs) == {0}
        and p["feature_group_count"] == 1
        and p["batch_group_count"] == 1
    )


def _conv_kernel_square_sum(eqn: Any, lhs: jax.Array, dy: jax.Array) -> jax.Array:
    r"""``sum_b g_b^2`` of a convolution's per-example kernel gradients ``g_b``, kernel-shaped.

    Example ``b``'s gradient sums over its images ``n`` and output positions ``s``:
    ``g_b[w, c, o] = sum_{n, s} x_b[n, stride * s + dilation * w - pad, c] dy_b[n, s, o]``,
    a correlation of the input (channels as the batch) with the output gradient (as the
    kernel). All examples of a chunk go in one convolution with the examples as feature
    groups, which XLA's CPU backend runs as one library call; the squares are summed over
    the groups in the convolution's own layout.
    """
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    kernel = eqn.invars[1].aval.shape
    window = [kernel[d] for d in rhs_spec[2:]]
    size = lhs.shape[0]
    n_sp = len(window)
    # x: [C, *spatial, B, N] (channels as the batch), dy: [*out spatial, N, B, O].
    x = jnp.transpose(lhs, (1 + lhs_spec[1], *(1 + d for d in lhs_spec[2:]), 0, 1 + lhs_spec[0]))
    dy = jnp.transpose(dy, (*(1 + d for d in out_spec[2:]), 1 + out_spec[0], 0, 1 + out_spec[1]))
    dy = dy.astype(x.dtype)
    channels, n_img, n_out = x.shape[0], x.shape[-1], dy.shape[-1]
    out_sp = dy.shape[:n_sp]
    # Pad (or crop) the input so that the correlation has exactly the kernel's window.
    config = [(0, 0, 0)]
    for d in range(n_sp):
        dilated = (x.shape[1 + d] - 1) * p["lhs_dilation"][d] + 1
        lo = p["padding"][d][0]
        need = (window[d] - 1) * p["rhs_dilation"][d] + (out_sp[d] - 1) * p["window_strides"][d] + 1
        config.append((lo, need - dilated - lo, p["lhs_dilation"][d] - 1))
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), [*config, (0, 0, 0), (0, 0, 0)])
    x = x.reshape(*x.shape[: 1 + n_sp], size * n_img)
    sp = "".join(chr(ord("P") + i) for i in range(n_sp))  # spatial labels, none of N C I O
    g = jax.lax.conv_general_dilated(
        x,
        dy.reshape(*out_sp, n_img, size * n_out),  # group b: example b's dy as its kernel
        window_strides=tuple(p["rhs_dilation"]),
        padding=[(0, 0)] * n_sp,
        rhs_dilation=tuple(p["window_strides"]),
        dimension_numbers=(f"N{sp}C", f"{sp}IO", f"N{sp}C"),
        feature_group_count=size,
        precision=p["precision"],
    )  # [C, *window, B * O]
    g = jnp.sum(jnp.square(g.reshape(channels, *window, size, n_out)), axis=1 + n_sp)
    source = [rhs_spec[1], *rhs_spec[2:], rhs_spec[0]]  # the kernel axis each axis of g is
    return jnp.transpose(g, [source.index(d) for d in range(len(kernel))])


def _chunk_size(eqn: Any, operand: int) -> int | None:
    """Examples per chunk when forming a layer's per-example gradients, ``None``: all at once.

    A convolution's per-example kernel gradients are one convolution with the examples as
    feature groups; XLA's CPU convolution is several times faster on 16 groups at a time than
    on hundreds (LeNet-5 at B = 256: 16 per chunk gave 1.8x the speed of one chunk of 256,
    and beat 8 and 32), and a chunk's gradients stay in cache while they are squared and
    summed.
    """
    if eqn.primitive.name != "conv_general_dilated" or operand != 1:
        return None
    return _CONV_CHUNK


_CONV_CHUNK = 16


def _chunk_scan(fn: Callable[[Any], Any], data: Any, chunk: int | None) -> Any:
    """``fn(data)`` for an ``fn`` that sums over the leading axis, ``chunk`` rows at a time."""
    n = jax.tree.leaves(data)[0].shape[0]
    if chunk is None or chunk >= n:
        return fn(data)
    total = None
    for start in range(0, n, chunk):
        part = fn(jax.tree.map(lambda x, s=start: x[s : s + chunk], data))
        total = part if total is None else total + part
    return total


def _max_pool(eqn: Any) -> Callable[[jax.Array], jax.Array] | None:
    """A max-pool over non-overlapping windows with an exact, cheaper VJP; else ``None``.

    ``reduce_window_max`` differentiates through ``select_and_scatter_add``, which on CPU
    costs about as much as a convolution. With windows that tile the input (strides equal to
    the window, no dilation) the gradient goes to the first maximum of each window in
    row-major window order, as ``select_and_scatter_add`` with ``ge`` picks it; here it is an
    ``argmax`` over the window folded into one axis, the same numbers with ties included.
    """
    p = eqn.params
    if (
        eqn.primitive.name != "reduce_window_max"
        or tuple(p["window_dimensions"]) != tuple(p["window_strides"])
        or any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"]))
        or any(lo < 0 or hi < 0 for lo, hi in p["padding"])
        or not _is_float(eqn.invars[0].aval)
    ):
        return None
    dims, padding = tuple(p["window_dimensions"]), tuple(p["padding"])
    nd = len(dims)

    @jax.custom_vjp
    def pool(x):
        return _bind(eqn, [x])[0]

    def fwd(x):
        return pool(x), x

    def bwd(x, dy):
        lowest = jnp.array(-jnp.inf, x.dtype)
        xp = jax.lax.pad(x, lowest, [(lo, hi, 0) for lo, hi in padding])
        covered = [n * k for n, k in zip(dy.shape, dims, strict=True)]
        xw = jax.lax.slice(xp, [0] * nd, covered)
        xw = xw.reshape([v for n, k in zip(dy.shape, dims, strict=True) for v in (n, k)])
        perm = [*range(0, 2 * nd, 2), *range(1, 2 * nd, 2)]  # window axes last
        xw = jnp.transpose(xw, perm).reshape(*dy.shape, math.prod(dims))
        first = jnp.argmax(xw, axis=-1)[..., None] == jnp.arange(math.prod(dims))
        g = jnp.where(first, dy[..., None].astype(x.dtype), jnp.zeros((), x.dtype))
        g = jnp.transpose(g.reshape(*dy.shape, *dims), [perm.index(i) for i in range(2 * nd)])
        g = jax.lax.pad(
            g.reshape(covered),
            jnp.zeros((), x.dtype),
            [(0, m - c, 0) for m, c in zip(xp.shape, covered, strict=True)],
        )
        return (
            jax.lax.slice(
                g,
                [lo for lo, _ in padding],
                [lo + n for (lo, _), n in zip(padding, x.shape, strict=True)],
            ),
        )

    pool.defvjp(fwd, bwd)
    return pool


def vmap_squared_gradient_sums(
    ell: Callable[[list, list], jax.Array], param_leaves: list, example_leaves: list
) -> list[jax.Array]:
    """The same sums as :func:`squared_gradient_sums` by ``vmap(grad)``: the reference."""
    return _vmap_sums(ell, list(param_leaves), list(example_leaves), range(len(param_leaves)))


def _vmap_sums(ell, param_leaves, example_leaves, which):
    """The reference path, ``vmap(grad)``, for the parameters ``which`` only."""

    def ell_sub(sub, example):
        leaves = list(param_leaves)
        for k, w in zip(which, sub, strict=True):
            leaves[k] = w
        return ell(leaves, example)

    # An integer leaf (a step counter, an RNG count) has no gradient: its sum is 0.
    which = list(which)
    real = [k for k in which if jnp.issubdtype(jnp.result_type(param_leaves[k]), jnp.inexact)]
    sub = [param_leaves[k] for k in real]

    def ell_real(sub_real, example):
        full = [param_leaves[k] for k in which]
        for k, w in zip(real, sub_real, strict=True):
            full[which.index(k)] = w
        return ell_sub(full, example)

    grads = jax.vmap(jax.grad(ell_real), in_axes=(None, 0))(sub, example_leaves)
    sums = dict(zip(real, (jnp.sum(jnp.square(g), axis=0) for g in grads), strict=True))
    return [
        sums[k] if k in sums else jnp.zeros(jnp.shape(param_leaves[k]), jnp.float32) for k in which
    ]
