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
   gradient materialized. Otherwise (a Conv, whose per-example gradient sums over output
   positions, a bias, a scale) the per-example gradient of that one parameter is formed
   (``[B, *shape]``, by the vmapped VJP of that one operation) and squared.

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

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

__all__: list[str] = []  # private module; used by fisher_optax.references

# Call-like primitives whose body is a plain jaxpr: inlined so that a parameter passed into a
# jitted sub-function is still seen meeting the data inside it.
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})
# Operations that only re-index a tensor one to one: a squared gradient passes through them.
_REINDEX = frozenset(
    {"reshape", "convert_element_type", "transpose", "squeeze", "expand_dims", "copy"}
)


class _Lit(NamedTuple):
    value: Any


class _Eqn(NamedTuple):
    eqn: Any  # the original JaxprEqn (primitive, params, avals)
    ins: tuple  # int ids or _Lit
    outs: tuple  # int ids


class _Plan(NamedTuple):
    eqns: list[_Eqn]
    consts: dict[int, Any]
    param_ids: list[int]
    example_ids: list[int]
    out: Any  # id or _Lit of the scalar loss
    layers: dict[int, int]  # param index -> eqn index of its consumer
    operand: dict[int, int]  # param index -> operand position in that eqn
    closed: dict[int, bool]  # param index -> outer-product closed form applies
    fallback: list[int]  # param indices left to vmap(grad)
    unused: list[int]  # param indices the loss does not depend on
    data: frozenset  # ids that depend on the example


def _flatten(closed: Any) -> tuple[list[_Eqn], dict[int, Any], list, list]:
    """The equations of ``closed`` with jit-like calls inlined, variables renamed to ints."""
    counter = itertools.count()
    eqns: list[_Eqn] = []
    consts: dict[int, Any] = {}

    def walk(jaxpr: Any, const_values: Sequence[Any], in_refs: Sequence[Any]) -> list:
        env: dict[Any, Any] = {}
        for var, value in zip(jaxpr.constvars, const_values, strict=True):
            env[var] = next(counter)
            consts[env[var]] = value
        for var, ref in zip(jaxpr.invars, in_refs, strict=True):
            env[var] = ref

        def ref(atom: Any) -> Any:
            return _Lit(atom.val) if isinstance(atom, jcore.Literal) else env[atom]

        for eqn in jaxpr.eqns:
            ins = [ref(a) for a in eqn.invars]
            sub = eqn.params.get("jaxpr")
            if eqn.primitive.name in _INLINE and isinstance(sub, jcore.ClosedJaxpr):
                outs = walk(sub.jaxpr, sub.consts, ins)
            else:
                outs = [next(counter) for _ in eqn.outvars]
                eqns.append(_Eqn(eqn, tuple(ins), tuple(outs)))
            for var, out in zip(eqn.outvars, outs, strict=True):
                env[var] = out
        return [ref(a) for a in jaxpr.outvars]

    ins = [next(counter) for _ in closed.jaxpr.invars]
    outs = walk(closed.jaxpr, closed.consts, ins)
    return eqns, consts, ins, outs


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
    eqns, consts, ins, outs = _flatten(closed)
    n_params = len(param_leaves)
    param_ids, example_ids = ins[:n_params], ins[n_params:]

    data = set(example_ids)  # ids that depend on the example
    deps: dict[int, frozenset] = {i: frozenset({k}) for k, i in enumerate(param_ids)}
    reindex: dict[int, int] = {i: k for k, i in enumerate(param_ids)}  # id -> param it re-indexes
    uses: dict[int, list[tuple[int, int]]] = {k: [] for k in range(n_params)}
    bad: set[int] = set()
    for e, (eqn, eins, eouts) in enumerate(eqns):
        refs = [r for r in eins if not isinstance(r, _Lit)]
        if any(r in data for r in refs):
            data.update(eouts)
            for j, r in enumerate(eins):
                if not isinstance(r, _Lit) and r not in data:
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
        if not isinstance(r, _Lit) and r not in data:
            bad.update(deps.get(r, ()))

    layers, operand, closed_form, fallback, unused = {}, {}, {}, [], []
    for k in range(n_params):
        if not uses[k] and k not in bad:
            unused.append(k)
            continue
        ok = k not in bad and len(uses[k]) == 1 and _is_float(closed.jaxpr.invars[k].aval)
        if ok:
            e, j = uses[k][0]
            eqn = eqns[e].eqn
            ok = len(eqn.outvars) == 1 and _is_float(eqn.outvars[0].aval)
        if not ok:
            fallback.append(k)
            continue
        layers[k], operand[k] = e, j
        closed_form[k] = reindex.get(eqns[e].ins[j]) == k and _outer_product_form(eqn, j)
    return _Plan(
        eqns,
        consts,
        param_ids,
        example_ids,
        outs[0],
        layers,
        operand,
        closed_form,
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
    read = lambda r: r.value if isinstance(r, _Lit) else env[r]
    recorded = {}
    for e, (eqn, eins, eouts) in enumerate(plan.eqns):
        if example_leaves is None and any(r in plan.data for r in eins if not isinstance(r, _Lit)):
            continue
        args = [read(r) for r in eins]
        out = _bind(eqn, args)
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
            out = plan.out.value if isinstance(plan.out, _Lit) else env[plan.out]
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
            data[i] if i in data else v if i == j else r.value if isinstance(r, _Lit) else static[r]
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

    if _patches_form(eqn, j, data_inputs):
        grads_v = _conv_kernel_grads(eqn, data_inputs[0], cotangent)
    else:
        grads_v = jax.vmap(lambda data, dy: jax.vjp(lambda v: apply(v, data), v0)[1](dy)[0])(
            data_inputs, cotangent
        )
    grads = jax.vmap(lambda g: phi_vjp(g)[0])(grads_v)
    return jnp.sum(jnp.square(grads), axis=0)


def _patches_form(eqn: Any, operand: int, data_inputs: dict) -> bool:
    """Whether ``eqn`` is a plain convolution of the data (lhs) with the parameter (rhs)."""
    p = eqn.params
    return (
        eqn.primitive.name == "conv_general_dilated"
        and operand == 1
        and set(data_inputs) == {0}
        and p["feature_group_count"] == 1
        and p["batch_group_count"] == 1
    )


def _conv_kernel_grads(eqn: Any, lhs: jax.Array, dy: jax.Array) -> jax.Array:
    """Per-example kernel gradients ``[B, *rhs.shape]`` of a convolution, from its patches.

    The gradient of example ``b`` sums over its output positions ``s``:
    ``g_b[c, w, o] = sum_s x_b[c, stride * s + dilation * w] dy_b[o, s]``. The patches are
    strided slices of the padded input, one per window offset ``w`` (cheaper than
    ``conv_general_dilated_patches``, a convolution with a one-hot kernel), and the sum is one
    batched contraction.
    """
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    rhs_shape = eqn.invars[1].aval.shape
    window = tuple(rhs_shape[d] for d in rhs_spec[2:])
    n_sp = len(window)
    # Canonical layouts, batch axis first: x [B, N, C, *spatial], dy [B, N, O, *out spatial].
    x = jnp.transpose(lhs, (0, *(1 + d for d in lhs_spec)))
    dy = jnp.transpose(dy, (0, *(1 + d for d in out_spec))).astype(x.dtype)
    out_sp = dy.shape[3:]
    zero = jnp.zeros((), x.dtype)
    config = [(0, 0, 0)] * 3 + [
        (lo, hi, ld - 1) for (lo, hi), ld in zip(p["padding"], p["lhs_dilation"], strict=True)
    ]
    x = jax.lax.pad(x, zero, config)
    slices = []
    for offset in itertools.product(*(range(k) for k in window)):
        start = [0, 0, 0] + [o * rd for o, rd in zip(offset, p["rhs_dilation"], strict=True)]
        stop = [*x.shape[:3]] + [
            st + stride * (n - 1) + 1
            for st, stride, n in zip(start[3:], p["window_strides"], out_sp, strict=True)
        ]
        slices.append(jax.lax.slice(x, start, stop, (1, 1, 1, *p["window_strides"])))
    patches = jnp.stack(slices, axis=3)  # [B, N, C, W, *out spatial]
    sp = "".join(chr(ord("s") + i) for i in range(n_sp))
    g = jnp.einsum(f"bncw{sp},bno{sp}->bcwo", patches, dy)
    g = g.reshape(g.shape[0], g.shape[1], *window, g.shape[-1])  # axes: in, window..., out
    source = [rhs_spec[1], *rhs_spec[2:], rhs_spec[0]]  # the rhs axis each axis of g is
    return jnp.transpose(g, (0, *(1 + source.index(d) for d in range(len(rhs_shape)))))


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

    sub = [param_leaves[k] for k in which]
    grads = jax.vmap(jax.grad(ell_sub), in_axes=(None, 0))(sub, example_leaves)
    return [jnp.sum(jnp.square(g), axis=0) for g in grads]
