"""Structured pruning from the traced computation: coupled channels, group scores, the cut.

The one engine for removing whole units (channels, features, heads) from NNX and Linen
models. The model's forward is traced once with an example input (``jax.make_jaxpr``) and
every parameter's axes are followed through the primitives. Indices that must be removed
together (an output channel of a conv, the BatchNorm entries that normalise it, the input
slice of every consumer, and, through a residual add, the same channel of every layer that
writes into the sum) fall into one *unit*; the units that share parameter axes form a
*group* (Fang et al.'s DepGraph). A flatten maps one channel to a block of features, a
concatenation offsets channels, attention heads couple the query, key, value and output
projections.

The steps, each a function of the graph:

* :func:`dependency_graph` traces the model; :func:`group_scores` sums per-weight scores
  over each unit; :func:`group_mask` selects the units to remove (``keep``, one bool array
  per group) with the count and tie rule of :func:`fisher_optax.select`;
  :func:`select_groups` does the three in one traceable call on a param-shaped score tree
  and returns a param-shaped mask.
* :func:`weight_mask` turns ``keep`` into a param-shaped mask (for
  :func:`fisher_optax.apply_mask` and :func:`fisher_optax.keep_pruned`), :func:`masked`
  into the model with the removed entries zeroed.
* :func:`cut` returns the smaller model (NNX) or the smaller variables (Linen), checked
  against :func:`masked`; :func:`cut_optimizer` slices the optimizer state the same way.

Rules of the trace (each index is an element of a union-find; the unions are exact; one
rule per primitive in a table, calls inlined by one walker):

* elementwise ops, ``broadcast_in_dim``, ``transpose``, ``squeeze`` and identity reshapes
  tie equal axes; ``dot_general`` ties contracted and batch axes; ``conv_general_dilated``
  ties the input feature axis to the kernel's input axis and the kernel's output axis to
  the output feature axis; ``concatenate`` ties each input to its offset in the output;
  a reshape that merges (flatten) or splits axes ties each element to its coordinate on
  the one axis that may be cut; ``gather`` (a token embedding) ties the rows it takes
  whole to the output and keeps the indexed (vocabulary) axis whole; ``dynamic_slice`` and
  ``dynamic_update_slice`` tie the axes they take whole; ``scan`` (``nn.scan``,
  ``nnx.scan``) follows its body once, so a stacked parameter's unit is the same index in
  every layer and the carry is one axis across steps; ``pjit``,
  ``custom_jvp``/``custom_vjp`` and ``jax.checkpoint`` bodies are followed.
* Everything else *freezes* the axes it touches (kept whole), and so do: the model's
  input and output, reductions (a mean or a max over channels changes when channels go;
  ``dependency_graph(..., exact=False)`` cuts through sums, maxima and minima, e.g. the
  LayerNorms over a language model's residual stream, and the cut is then inexact),
  conv windows, pooling windows, slices, pads, grouped or depthwise convs, iota and
  closed-over constants, a reshape that mixes two cuttable axes, the scanned axis, and
  parameter axes that the cut cannot express in the module's attributes (e.g. attention's
  ``head_dim``, whose ``1/sqrt(head_dim)`` scale would change, or the layer axis of a
  stacked module). :attr:`DepGraph.frozen` lists each frozen parameter axis with what
  froze it first: the primitive and where it sits, the constant, the module, or the
  frozen axis it is tied to.

A removed unit loses every entry it touches, the consumers' input slices included, so the
cut model computes exactly what the masked model computes, whatever the activations
(unless the graph was traced with ``exact=False`` and a unit goes through a reduction:
:attr:`DepGraph.exact` says which).

References:
  Fang, Ma, Song, Mi, Wang. DepGraph: Towards Any Structural Pruning. CVPR 2023,
  https://arxiv.org/abs/2301.12900.

  Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using Information
  Theory. ISVLSI 2016, https://arxiv.org/abs/1605.04859.
"""

import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax import _jaxpr, _validate
from fisher_optax._tree import keystr
from fisher_optax.patterns import Unstructured, select

__all__ = [
    "DepGraph",
    "Frozen",
    "Group",
    "Groups",
    "LinenCut",
    "cut",
    "cut_optimizer",
    "dependency_graph",
    "group_mask",
    "group_scores",
    "masked",
    "select_groups",
    "weight_mask",
]

Path = tuple[Hashable, ...]


class Frozen(NamedTuple):
    """A parameter axis kept whole, and why.

    Attributes:
      path: the parameter's path, e.g. ``"['stem']['kernel']"``.
      axis: the axis kept whole.
      reason: the first rule that froze it (e.g. ``"model output"``,
        ``"primitive cumsum is not understood"``).
    """

    path: str
    axis: int
    reason: str


class Group(NamedTuple):
    """Parameter axes whose indices are removed together, one unit at a time.

    Attributes:
      name: the first member, e.g. ``"['conv1']['kernel'][3]"`` (path and axis).
      members: ``(path, axis)`` of every parameter axis the group cuts.
      size: the number of units.
      units: for each unit, ``{(leaf number, axis): indices}`` of the entries it removes.
    """

    name: str
    members: tuple[tuple[str, int], ...]
    size: int
    units: tuple[dict[tuple[int, int], np.ndarray], ...]


class DepGraph(NamedTuple):
    """The coupled channels of a traced model (from :func:`dependency_graph`).

    Attributes:
      groups: the prunable groups.
      frozen: every parameter axis kept whole, with its reason.
      paths: the path (tuple of keys) of each traced leaf, in flattening order.
      shapes: the shape of each traced leaf.
      entries: for each traced leaf number that some unit cuts, ``(flat indices, unit
        numbers)``: every entry a unit removes, with the unit's number counted across the
        groups in order. What scores are summed over and masks expanded from.
      example: the call arguments ``(args, kwargs)``, used again to check the cut.
      kind: ``"nnx"`` or ``"linen"``.
      module: the traced Linen module (``None`` for NNX), applied again to check the cut.
      exact: ``False`` when some group is cut through a reduction (a LayerNorm or RMSNorm
        over the residual stream, from ``dependency_graph(..., exact=False)``): the cut
        model then computes something else than the masked model, and :func:`cut` checks
        only that it runs and has the masked model's output shapes.
    """

    groups: tuple[Group, ...]
    frozen: tuple[Frozen, ...]
    paths: tuple[Path, ...]
    shapes: tuple[tuple[int, ...], ...]
    entries: dict[int, tuple[np.ndarray, np.ndarray]]
    example: tuple[tuple, dict]
    kind: str
    module: Any = None
    exact: bool = True

    def report(self) -> str:
        """A readable summary: each group with its size, then each frozen axis and why.

        Returns:
          The summary, one line per group and per frozen parameter axis.

        Examples:
          >>> import jax.numpy as jnp
          >>> from flax import nnx
          >>> from fisher_optax import depgraph
          >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu,
          ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
          >>> print(depgraph.dependency_graph(model, jnp.ones((1, 3))).report())
          1 prunable groups:
            ['layers'][0]['kernel'][1]: 8 units, 3 parameter axes
          3 parameter axes kept whole:
            ['layers'][0]['kernel'][0]: model input
            ['layers'][2]['bias'][0]: model output
            ['layers'][2]['kernel'][1]: model output
        """
        lines = [f"{len(self.groups)} prunable groups:"]
        for g in self.groups:
            lines.append(f"  {g.name}: {g.size} units, {len(g.members)} parameter axes")
        lines.append(f"{len(self.frozen)} parameter axes kept whole:")
        for f in self.frozen:
            lines.append(f"  {f.path}[{f.axis}]: {f.reason}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Paths


def _path_tuple(path: Sequence[Any]) -> Path:
    out: list[Hashable] = []
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


def _pstr(path: Path) -> str:
    return "".join(f"[{k!r}]" for k in path) or "<root>"


# --------------------------------------------------------------------------------------------
# The trace: a union-find over every index of every axis of every variable


class _Trace:
    def __init__(self, exact: bool = True) -> None:
        self.exact = exact
        self.relaxed: list[int] = []  # slots summed over inexactly (exact=False)
        self.parent: list[int] = []
        self.slots: list[tuple[int, int]] = []  # (first element, size)
        self.frozen: dict[int, str] = {}  # slot -> first reason
        self.composites: list[tuple[int, list[int]]] = []  # (whole slot, factor slots)
        self.param_slots: set[int] = set()
        self.leaf_of: dict[tuple[int, ...], int] = {}  # a parameter's slots -> its number
        self.uses: dict[int, int] = {}  # parameter number -> operations reading it

    # union-find
    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def new_slots(self, shape: Sequence[int]) -> tuple[int, ...]:
        out = []
        for n in shape:
            start = len(self.parent)
            self.parent.extend(range(start, start + int(n)))
            self.slots.append((start, int(n)))
            out.append(len(self.slots) - 1)
        return tuple(out)

    def freeze(self, slot: int, reason: str) -> None:
        self.frozen.setdefault(slot, reason)

    def freeze_all(self, groups: Sequence[Any], reason: str) -> None:
        for s in groups:
            for slot in s or ():
                self.freeze(slot, reason)

    def link(self, a: int, b: int, what: str) -> None:
        (sa, na), (sb, nb) = self.slots[a], self.slots[b]
        if na != nb:
            self.freeze(a, f"{what}: sizes {na} and {nb} do not line up")
            self.freeze(b, f"{what}: sizes {na} and {nb} do not line up")
            return
        if a == b:
            return
        for k in range(na):
            self.union(sa + k, sb + k)


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in v.aval.shape)


def _site(eqn: Any) -> str:
    """Where an equation comes from, for a reason: the Linen module path (JAX's name stack)
    and the innermost function outside JAX, e.g. ``" in Model/ln (_compute_stats at
    nn/normalization.py:102)"``; ``""`` when JAX recorded neither (the body of a ``jit``
    inside JAX, such as ``jnp.cumsum``'s, is recorded only down to that ``jit``)."""
    info = getattr(eqn, "source_info", None)
    scopes = [s for s in str(getattr(info, "name_stack", "") or "").split("/") if s]
    where = "/".join(s for s in scopes if not s.endswith(")"))  # drop "vmap()", "jit(f)"
    frame = ""
    for f in getattr(getattr(info, "traceback", None), "frames", ()):
        parts = f.file_name.replace("\\", "/").split("/")
        if "jax" not in parts and "jaxlib" not in parts:
            function = f.function_name.split(".<locals>")[0]
            frame = f"{function} at {'/'.join(parts[-2:])}:{f.line_num}"
            break
    if where and frame:
        return f" in {where} ({frame})"
    return f" in {where or frame}" if where or frame else ""


# The rules, one per primitive: ``rule(t, eqn, ins, outs)`` ties or freezes the slots of the
# equation's operands (``ins``, ``None`` for a literal) and results (``outs``). ``eqn`` is
# the original equation, for its params and avals. A primitive without a rule freezes every
# axis it touches.
Rule = Callable[[_Trace, Any, list, list], None]


def _elementwise(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    name, out = eqn.primitive.name, outs[0]
    for v, s in zip(eqn.invars, ins, strict=True):
        if s is None or len(s) == 0:
            continue
        src, dst = _shape(v), _shape(eqn.outvars[0])
        if len(src) != len(dst) or any(p not in (1, q) for p, q in zip(src, dst, strict=True)):
            t.freeze_all(ins + outs, f"primitive {name} with operands of different shapes")
            return
        # a size-1 axis is broadcast: it holds no channel of the output
        for a, b, p, q in zip(s, out, src, dst, strict=True):
            if p == q:
                t.link(a, b, name)


def _broadcast_in_dim(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    s, out = ins[0], outs[0]
    if s is None:
        return
    src, dst = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if src[i] == dst[d]:
            t.link(s[i], out[d], "broadcast_in_dim")


def _transpose(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    for i, p in enumerate(eqn.params["permutation"]):
        t.link(ins[0][p], outs[0][i], "transpose")


def _squeeze(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    s = ins[0]
    dims = {d % len(s) for d in eqn.params["dimensions"]}
    for a, b in zip([x for i, x in enumerate(s) if i not in dims], outs[0], strict=True):
        t.link(a, b, "squeeze")


def _reshape_rule(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    if eqn.params.get("dimensions") is not None:
        t.freeze_all(ins + outs, "reshape with a dimension permutation")
        return
    _reshape(t, ins[0], outs[0], _shape(eqn.invars[0]), _shape(eqn.outvars[0]))


def _reduce(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    name, s = eqn.primitive.name, ins[0]
    axes = {a % max(len(s), 1) for a in eqn.params["axes"]}
    kept = [x for i, x in enumerate(s) if i not in axes]
    for a, b in zip(kept, outs[0], strict=True):
        t.link(a, b, name)
    for i in axes:
        if not t.exact and name in _RELAXED:
            t.relaxed.append(s[i])
        else:
            t.freeze(
                s[i],
                f"reduced by {name}{_site(eqn)} (a mean, max or norm over it, e.g. "
                "a LayerNorm or RMSNorm normalising over it, changes with a cut; pass "
                "exact=False to dependency_graph to cut it inexactly)",
            )


def _dot_general(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    ls, rs = ins
    out = outs[0]
    if ls is None or rs is None:
        t.freeze_all(ins + outs, "dot_general with a literal operand")
        return
    for a, b in zip(lc, rc, strict=True):
        t.link(ls[a], rs[b], "dot_general")
    k = 0
    for a, b in zip(lb, rb, strict=True):
        t.link(ls[a], rs[b], "dot_general")
        t.link(ls[a], out[k], "dot_general")
        k += 1
    for i in range(len(ls)):
        if i not in lc and i not in lb:
            t.link(ls[i], out[k], "dot_general")
            k += 1
    for i in range(len(rs)):
        if i not in rc and i not in rb:
            t.link(rs[i], out[k], "dot_general")
            k += 1


def _conv(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    name, prm = "conv_general_dilated", eqn.params
    dn = prm["dimension_numbers"]
    ls, rs = ins
    out = outs[0]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    t.link(ls[lhs_spec[0]], out[out_spec[0]], name)
    if prm["feature_group_count"] * prm["batch_group_count"] == 1:
        t.link(ls[lhs_spec[1]], rs[rhs_spec[1]], name)
        t.link(rs[rhs_spec[0]], out[out_spec[1]], name)
    else:
        why = (
            f"grouped convolution (feature_group_count={prm['feature_group_count']}, "
            f"batch_group_count={prm['batch_group_count']}): grouped and depthwise convs "
            "are kept whole"
        )
        for s, spec in ((ls, lhs_spec), (rs, rhs_spec), (out, out_spec)):
            t.freeze(s[spec[1]], why)
            t.freeze(s[spec[0]] if s is rs else s[spec[1]], why)
    for s, spec in ((ls, lhs_spec), (rs, rhs_spec), (out, out_spec)):
        for d in spec[2:]:
            t.freeze(s[d], "a convolution's window or spatial axis")


def _concatenate(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    out, d = outs[0], eqn.params["dimension"]
    if any(s is None for s in ins):
        t.freeze_all(ins + outs, "concatenate with a literal operand")
        return
    start_out = t.slots[out[d]][0]
    offset = 0
    for s in ins:
        for i, (a, b) in enumerate(zip(s, out, strict=True)):
            if i != d:
                t.link(a, b, "concatenate")
        sa, na = t.slots[s[d]]
        for k in range(na):
            t.union(sa + k, start_out + offset + k)
        offset += na


def _window(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    prm, s, out = eqn.params, ins[0], outs[0]
    for i in range(len(s)):
        plain = (
            prm["window_dimensions"][i] == 1
            and prm["window_strides"][i] == 1
            and tuple(prm["padding"][i]) == (0, 0)
            and prm["base_dilation"][i] == 1
            and prm["window_dilation"][i] == 1
        )
        if plain:
            t.link(s[i], out[i], eqn.primitive.name)
        else:
            t.freeze(s[i], "a pooling window axis")
            t.freeze(out[i], "a pooling window axis")


def _unchanged_axes(eqn: Any) -> list[bool]:
    """Per axis of a slice, pad or rev: whether it maps every index to itself."""
    name, prm, src = eqn.primitive.name, eqn.params, _shape(eqn.invars[0])
    if name == "slice":
        st = prm["strides"]
        return [
            prm["start_indices"][i] == 0
            and prm["limit_indices"][i] == src[i]
            and (st is None or st[i] == 1)
            for i in range(len(src))
        ]
    if name == "pad":
        return [tuple(c) == (0, 0, 0) for c in prm["padding_config"]]
    return [i not in prm["dimensions"] for i in range(len(src))]  # rev


def _reindex(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    name, s, out = eqn.primitive.name, ins[0], outs[0]
    for i, same in enumerate(_unchanged_axes(eqn)):
        if same:
            t.link(s[i], out[i], name)
        else:
            t.freeze(s[i], f"{name} along this axis (fixed indices)")
            t.freeze(out[i], f"{name} along this axis (fixed indices)")
    t.freeze_all(ins[1:], f"{name} padding value")


def _gather(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    """Rows taken by index (a token embedding): the slice axes follow, the indexed ones not."""
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    op, ix, out = ins[0], ins[1], outs[0]
    src = _shape(eqn.invars[0])
    why = "gather indexes into this axis (e.g. the vocabulary of an embedding)"
    if getattr(dn, "operand_batching_dims", ()) or op is None:
        t.freeze_all(ins + outs, "gather with batching dimensions or a literal operand")
        return
    kept = [d for d in range(len(src)) if d not in dn.collapsed_slice_dims]
    for d, o in zip(kept, dn.offset_dims, strict=True):
        if sizes[d] == src[d] and d not in dn.start_index_map:
            t.link(op[d], out[o], "gather")
        else:
            t.freeze(op[d], why)
            t.freeze(out[o], why)
    for d in dn.collapsed_slice_dims:
        t.freeze(op[d], why)
    batch = [o for o in range(len(out)) if o not in dn.offset_dims]
    if ix is not None:
        for a, b in zip(ix[:-1], batch, strict=True):
            t.link(a, out[b], "gather")
        t.freeze(ix[-1], why)


def _dynamic_slice(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    """A window at a computed offset: the axes taken whole follow, the others are kept."""
    name = eqn.primitive.name
    src = _shape(eqn.invars[0])
    if name == "dynamic_slice":
        parts, size = [ins[0], outs[0]], _shape(eqn.outvars[0])
    else:  # dynamic_update_slice: the operand, the update written into it, the result
        parts, size = [ins[0], ins[1], outs[0]], _shape(eqn.invars[1])
    parts = [p for p in parts if p is not None]
    for d in range(len(src)):
        if size[d] == src[d]:
            for p in parts[1:]:
                t.link(parts[0][d], p[d], name)
        else:
            for p in parts:
                t.freeze(p[d], f"{name} along this axis (an offset computed at run time)")
    t.freeze_all(ins[1:] if name == "dynamic_slice" else ins[2:], f"{name} index")


def _scan(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    """``lax.scan`` (``nn.scan``, ``nnx.scan``): the body is followed once for all steps.

    Its ties hold in every step, so a stacked parameter's unit is the same index in every
    layer (the stack stays rectangular); the carry is tied across steps, so the stream a
    stack of blocks reads and writes is one axis. The scanned (layer) axis is kept whole.
    """
    prm = eqn.params
    body = _jaxpr.flatten(prm["jaxpr"], _jaxpr.ALL_CALLS)
    n_consts, n_carry = prm["num_consts"], prm["num_carry"]
    benv: dict[int, tuple[int, ...]] = {}
    why = "the scanned axis (the layer axis of a stacked model, or a sequence)"
    for k, (ref, v) in enumerate(zip(body.ins, prm["jaxpr"].jaxpr.invars, strict=True)):
        outer = ins[k]
        if k < n_consts and outer is not None:
            benv[ref] = outer  # the same array in every step
            continue
        benv[ref] = t.new_slots(_shape(v))
        if outer is None:
            continue
        if k < n_consts + n_carry:
            for a, b in zip(outer, benv[ref], strict=True):
                t.link(a, b, "scan carry")
        else:
            t.freeze(outer[0], why)
            for a, b in zip(outer[1:], benv[ref], strict=True):
                t.link(a, b, "scan")
    _freeze_consts(t, body, benv)
    _run(t, body, benv)
    for k, (ref, out) in enumerate(zip(body.outs, outs, strict=True)):
        if isinstance(ref, _jaxpr.Lit):
            t.freeze_all([out], "a constant written by a scanned body")
            continue
        inner = benv[ref]
        if k < n_carry:
            for a, b, c in zip(inner, out, ins[n_consts + k] or inner, strict=True):
                t.link(a, b, "scan carry")
                t.link(a, c, "scan carry")
        else:
            t.freeze(out[0], why)
            for a, b in zip(inner, out[1:], strict=True):
                t.link(a, b, "scan")


def _iota(t: _Trace, eqn: Any, ins: list, outs: list) -> None:
    t.freeze_all(ins + outs, "iota (values depend on the position along the axis)")


_ELEMENTWISE = (
    "neg exp exp2 log log1p expm1 tanh logistic sin cos tan abs sign sqrt rsqrt cbrt "
    "integer_pow square erf erfc erf_inv floor ceil round is_finite not convert_element_type "
    "reduce_precision stop_gradient copy copy_p real imag conj "
    "add sub mul div max min pow atan2 rem nextafter and or xor eq ne lt le gt ge "
    "select_n clamp add_any"
)
_REDUCE = "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin"
_WINDOW = "reduce_window_sum reduce_window_max reduce_window_min"
_RELAXED = frozenset({"reduce_sum", "reduce_max", "reduce_min"})  # cut through if exact=False

_RULES: dict[str, Rule] = {
    **dict.fromkeys(_ELEMENTWISE.split(), _elementwise),
    **dict.fromkeys(_REDUCE.split(), _reduce),
    **dict.fromkeys(_WINDOW.split(), _window),
    **dict.fromkeys(("slice", "pad", "rev"), _reindex),
    "broadcast_in_dim": _broadcast_in_dim,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "reshape": _reshape_rule,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "concatenate": _concatenate,
    "iota": _iota,
    "gather": _gather,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_slice,
    "scan": _scan,
}


def _run(t: _Trace, flat: _jaxpr.Flat, env: dict[int, tuple[int, ...]]) -> None:
    """Apply the rule of every equation of ``flat`` (calls already inlined)."""

    def get(ref: Any, aval_of: Any) -> tuple[int, ...] | None:
        if isinstance(ref, _jaxpr.Lit):
            return None
        if ref not in env:
            env[ref] = t.new_slots(_shape(aval_of))
        return env[ref]

    for e in flat.eqns:
        ins = [get(r, v) for r, v in zip(e.ins, e.eqn.invars, strict=True)]
        outs = [get(r, v) for r, v in zip(e.outs, e.eqn.outvars, strict=True)]
        for leaf in {t.leaf_of[s] for s in ins if s and s in t.leaf_of}:
            t.uses[leaf] = t.uses.get(leaf, 0) + 1
        name = e.eqn.primitive.name
        rule = _RULES.get(name)
        if rule is None:
            t.freeze_all(ins + outs, f"primitive {name}{_site(e.eqn)} is not understood")
        else:
            rule(t, e.eqn, ins, outs)


def _reshape(t: _Trace, s: Any, out: Any, src: tuple, dst: tuple) -> None:
    if s is None:
        return
    i = j = 0
    while i < len(src) or j < len(dst):
        bi, bj = [i], [j]
        if i >= len(src) or j >= len(dst):
            for slot in list(s[i:]) + list(out[j:]):
                t.freeze(slot, "reshape")
            return
        pi, pj = src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(src):
                    break
                bi.append(i)
                pi *= src[i]
                i += 1
            else:
                if j >= len(dst):
                    break
                bj.append(j)
                pj *= dst[j]
                j += 1
        # trailing size-1 axes belong to no block: leave them to the next round
        a = [s[k] for k in bi if src[k] != 1]
        b = [out[k] for k in bj if dst[k] != 1]
        if len(a) == 1 and len(b) == 1:
            t.link(a[0], b[0], "reshape")
        elif len(a) == 1 and len(b) > 1:
            t.composites.append((a[0], b))
        elif len(a) > 1 and len(b) == 1:
            t.composites.append((b[0], a))
        elif a or b:
            for slot in a + b:
                t.freeze(slot, "reshape that regroups several axes into several others")


def _frozen_roots(t: _Trace) -> dict[int, str]:
    roots: dict[int, str] = {}
    for slot, why in t.frozen.items():
        start, n = t.slots[slot]
        for k in range(n):
            roots.setdefault(t.find(start + k), why)
    return roots


def _slot_frozen(t: _Trace, slot: int, roots: dict[int, str]) -> str | None:
    if slot in t.frozen:
        return t.frozen[slot]
    start, n = t.slots[slot]
    for k in range(n):
        r = roots.get(t.find(start + k))
        if r is not None:
            return r
    return None


def _resolve_composites(t: _Trace) -> None:
    """Tie each element of a flattened (or split) axis to its coordinate on its cuttable factor.

    A factor tied to something frozen (the batch or spatial axes) is not cut; the whole axis
    follows the one factor left. With no factor left the whole axis is frozen; with two it is
    frozen too (removing a channel would then remove a pattern no module attribute expresses).
    """
    changed = True
    while changed:
        changed = False
        roots = _frozen_roots(t)
        for whole, factors in t.composites:
            if _slot_frozen(t, whole, roots) is not None:
                for f in factors:
                    if f not in t.frozen:
                        t.freeze(f, "reshaped into an axis that is kept whole")
                        changed = True
                continue
            live = [f for f in factors if _slot_frozen(t, f, roots) is None]
            if not live:
                t.freeze(whole, "reshaped from axes that are all kept whole")
                changed = True
            elif len(live) > 1:
                for f in [whole, *live]:
                    t.freeze(f, "reshape that merges two axes that could be cut")
                changed = True
    for whole, factors in t.composites:
        if whole in t.frozen:
            continue
        roots = _frozen_roots(t)
        live = [f for f in factors if _slot_frozen(t, f, roots) is None]
        if len(live) != 1:
            continue
        sizes = [t.slots[f][1] for f in factors]
        m = factors.index(live[0])
        stride = int(np.prod(sizes[m + 1 :], dtype=np.int64))
        start_w, n_w = t.slots[whole]
        start_f, n_f = t.slots[live[0]]
        for e in range(n_w):
            t.union(start_w + e, start_f + (e // stride) % n_f)


# --------------------------------------------------------------------------------------------
# Which parameter axes a module's attributes can express


def _nnx_allowed(model: Any, paths: Sequence[Path], shapes: Sequence[tuple]) -> list[Any]:
    """Per leaf: ``(axes the cut may change, the module's name, why the others are kept)``,
    or a reason string (all kept whole)."""
    from flax import nnx

    modules = {tuple(p): m for p, m in nnx.iter_modules(model)}
    out: list[Any] = []
    head_dim = "attention's head_dim (attention scales by 1/sqrt(head_dim))"
    for path, shape in zip(paths, shapes, strict=True):
        mod_path, leaf = path[:-1], path[-1]
        mod = modules.get(mod_path)
        parent = modules.get(mod_path[:-1]) if mod_path else None
        nd = len(shape)
        name = type(mod).__name__
        if isinstance(parent, nnx.MultiHeadAttention) and isinstance(mod, nnx.LinearGeneral):
            role = mod_path[-1]
            if role in ("query", "key", "value"):  # (in, heads, head_dim), (heads, head_dim)
                axes = {nd - 3, nd - 2} if leaf == "kernel" else {nd - 2}
                out.append((axes, name, head_dim))
            elif role == "out":  # (heads, head_dim, out), (out,)
                axes = {nd - 3, nd - 1} if leaf == "kernel" else {nd - 1}
                out.append((axes, name, head_dim))
            else:
                out.append(f"{type(mod).__name__} inside attention at {_pstr(mod_path)}")
            continue
        if isinstance(parent, nnx.MultiHeadAttention) and isinstance(mod, nnx.Module):
            out.append("a norm over attention's head_dim, which is kept whole")
            continue
        # trailing axes: a module stacked by nnx.vmap holds its variables with leading
        # layer axes
        if isinstance(mod, nnx.Linear):
            out.append(({nd - 2, nd - 1} if leaf == "kernel" else {nd - 1}, name, ""))
        elif isinstance(mod, nnx.Conv) and not isinstance(mod, nnx.ConvTranspose):
            if mod.feature_group_count != 1:
                out.append(
                    f"grouped convolution (feature_group_count={mod.feature_group_count}): "
                    "grouped and depthwise convs are kept whole"
                )
            else:
                out.append(({nd - 2, nd - 1} if leaf == "kernel" else {nd - 1}, name, ""))
        elif isinstance(mod, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm) and nd >= 1:
            out.append(({nd - 1}, name, ""))
        elif isinstance(mod, nnx.LinearGeneral):
            out.append((set(range(nd)), name, ""))
        elif isinstance(mod, nnx.Embed):
            out.append(({nd - 1} if leaf == "embedding" else set(), name, ""))
        else:
            kind = type(mod).__name__ if mod is not None else "no module"
            out.append(f"{kind} at {_pstr(mod_path)} is not a module the cut knows how to resize")
    return out


_LINEN_1D = ("bias", "scale", "mean", "var")


_LINEN_QKV = frozenset({"query", "key", "value"})  # MultiHeadDotProductAttention's children


def _linen_allowed(paths: Sequence[Path], shapes: Sequence[tuple]) -> list[Any]:
    """As :func:`_nnx_allowed`, from the variable names (Linen modules are not kept)."""
    out: list[Any] = []
    heads = (
        "attention's heads and head_dim (attention scales by 1/sqrt(head_dim), and Linen's "
        "attention takes its number of heads from num_heads, which the cut does not change)"
    )
    for path, shape in zip(paths, shapes, strict=True):
        leaf, nd = path[-1], len(shape)
        parent = path[-2] if len(path) >= 2 else None
        # trailing axes: nn.scan and nn.vmap stack variables along leading axes
        if leaf == "kernel" and nd >= 3 and parent in _LINEN_QKV:
            # (in, heads, head_dim): head_dim stays whole (attention scales by
            # 1/sqrt(head_dim)), and the heads follow the out projection, which Linen cannot
            # resize along them either.
            out.append(({nd - 3}, "Linen module", heads))
        elif leaf == "bias" and nd >= 2 and parent in _LINEN_QKV:
            out.append((set(), "Linen module", heads))  # (heads, head_dim)
        elif leaf == "kernel" and nd >= 3 and parent == "out":
            # (heads, head_dim, features): only the output features
            out.append(({nd - 1}, "Linen module", heads))
        elif leaf == "kernel" and nd >= 2:
            out.append(({nd - 2, nd - 1}, "Linen module", ""))
        elif leaf in _LINEN_1D and nd >= 1:
            out.append(({nd - 1}, "Linen module", ""))
        elif leaf == "embedding" and nd >= 2:
            # (vocabulary, features): the features
            out.append(({nd - 1}, "Linen module", ""))
        else:
            out.append(f"a Linen variable {leaf!r} of rank {nd} that the cut cannot resize")
    return out


# --------------------------------------------------------------------------------------------
# The graph


def _is_nnx(model: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is an optional extra
        return False
    return isinstance(model, nnx.Module)


def _call_parts(args: tuple, kwargs: dict) -> tuple[list, Callable[[list], tuple]]:
    """The array leaves of ``(args, kwargs)`` (traced) and how to put them back.

    Every other leaf (``train=False``, a ``None`` mask, an int) stays a Python value: the
    model branches on it, which a traced value cannot do.
    """
    leaves, treedef = jax.tree.flatten((args, kwargs))
    is_array = [isinstance(x, jax.Array | np.ndarray) for x in leaves]
    arrays = [x for x, a in zip(leaves, is_array, strict=True) if a]

    def rebuild(values: list) -> tuple:
        it = iter(values)
        return jax.tree.unflatten(
            treedef, [next(it) if a else x for x, a in zip(leaves, is_array, strict=True)]
        )

    return arrays, rebuild


def _forward(graph_or_model: Any, kind: str, example: tuple) -> tuple[Callable, list]:
    """``fn(variables, arrays)`` calling the model on the example, and the example's arrays."""
    arrays, rebuild = _call_parts(*example)
    if kind == "nnx":
        graphdef = graph_or_model

        def fn(state: Any, values: list) -> Any:
            args, kwargs = rebuild(values)
            return _eval_copy(graphdef, state)(*args, **kwargs)

    else:
        module = graph_or_model

        def fn(variables: Any, values: list) -> Any:
            args, kwargs = rebuild(values)
            return module.apply(variables, *args, **kwargs)

    return fn, arrays


def _trace_error(e: Exception) -> ValueError | None:
    """A message for the errors a forward raises when traced outside its training setup."""
    text = str(e)
    if isinstance(e, NameError) and "unbound axis name" in text:
        found = re.search(r"unbound axis name: (\S+?)(?:\.?\s|\.?$)", text)
        name = found.group(1) if found else text
        return ValueError(
            f"the forward computes a collective over the axis name {name!r} (e.g. a "
            f"BatchNorm(axis_name={name!r}) computing batch statistics in training mode), "
            "which exists only under pmap/shard_map. Trace it in evaluation mode: pass the "
            "model's own argument, e.g. dependency_graph(module, x, variables=variables, "
            "train=False)."
        )
    if type(e).__name__ == "ModifyScopeVariableError":
        found = re.search(r'collection "([^"]+)"', text)
        name = found.group(1) if found else "cache"
        return ValueError(
            f"the forward updates a variable collection ({text.splitlines()[0]}), e.g. "
            "BatchNorm statistics in training mode. Trace it in evaluation mode: pass the "
            "model's own argument, e.g. dependency_graph(module, x, variables=variables, "
            "train=False); a collection the forward writes by design (a decoder's cache) "
            f"is passed on as apply takes it: dependency_graph(module, x, "
            f"variables=variables, mutable=[{name!r}])."
        )
    return None


def dependency_graph(
    model: Any, *args: Any, variables: Any = None, exact: bool = True, **kwargs: Any
) -> DepGraph:
    """Trace ``model`` on an example call and group the parameter indices cut together.

    Args:
      model: an ``nnx.Module`` (called as ``model(*args, **kwargs)``), or a Linen module
        (called as ``model.apply(variables, *args, **kwargs)``). An NNX model is traced,
        and its cut checked, in evaluation mode on a copy (``eval()``: Dropout off,
        BatchNorm on its running statistics; the channel structure is the same in both
        modes, and ``model`` keeps its mode). A Linen module is applied as given: pass its
        own argument for evaluation mode (e.g. ``train=False``).
      *args: the example call's positional arguments (a small batch suffices: the values
        are used only to check the cut). Arrays are traced as model inputs (kept whole);
        every other value (``None``, ints, bools) is passed as it is.
      variables: the Linen variables (``{'params': ..., 'batch_stats': ...}``); Linen only.
      exact: keep whole every axis that a reduction reads (a LayerNorm or RMSNorm over the
        residual stream, a softmax over hidden units), so that a cut computes exactly what
        the masked model computes. ``False`` lets ``reduce_sum``, ``reduce_max`` and
        ``reduce_min`` sum over fewer entries: the stream of a language model is cut
        through its norms, whose statistics then change, so the cut is checked only for
        its shapes and that it runs (:attr:`DepGraph.exact` says which), and the model
        needs fine-tuning after it.
      **kwargs: the example call's keyword arguments, as ``*args``.

    Returns:
      A :class:`DepGraph`: the prunable groups, and the frozen parameter axes with reasons.

    Raises:
      TypeError: if ``model`` is neither an NNX module nor a Linen module with ``variables``,
        or is an NNX module given ``variables``.
      ValueError: if the forward cannot be traced (Python control flow on array values, a
        collective or a collection update of training mode).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from fisher_optax import depgraph
      >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> graph = depgraph.dependency_graph(model, jnp.ones((1, 3)))
      >>> [(g.name, g.size) for g in graph.groups]
      [("['layers'][0]['kernel'][1]", 8)]
    """
    example = (args, kwargs)
    if _is_nnx(model):
        from flax import nnx

        if variables is not None:
            raise TypeError(
                "variables= is for a Linen module; an nnx.Module holds its own variables: "
                "call dependency_graph(model, *args, **kwargs) without it."
            )
        graphdef, tree = nnx.split(model)
        fn, arrays = _forward(graphdef, "nnx", example)
        kind = "nnx"
    elif variables is not None and hasattr(model, "apply"):
        tree = variables
        fn, arrays = _forward(model, "linen", example)
        kind = "linen"
    else:
        raise TypeError(
            "model must be an nnx.Module, or a Linen module with variables= (its "
            f"{{'params': ...}} dict); got {type(model).__name__} with variables="
            f"{'None' if variables is None else type(variables).__name__}."
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = tuple(_path_tuple(p) for p, _ in flat)
    leaves = [leaf for _, leaf in flat]
    shapes = tuple(tuple(int(d) for d in jnp.shape(leaf)) for leaf in leaves)

    def forward(leaves: list, values: list) -> Any:
        return fn(jax.tree.unflatten(treedef, leaves), values)

    try:
        closed = jax.make_jaxpr(forward)(leaves, arrays)
    except jax.errors.JAXTypeError as e:
        raise ValueError(
            f"the model's forward cannot be traced with jax.make_jaxpr ({type(e).__name__}): "
            "Python control flow on array values (if/while on a traced value, int(x), "
            "np.asarray(x)) has no graph to follow. Use jax.lax.cond/where or make the "
            "choice static, then trace again."
        ) from e
    except Exception as e:
        err = _trace_error(e)
        if err is None:
            raise
        raise err from e
    flat = _jaxpr.flatten(closed, _jaxpr.ALL_CALLS)

    t = _Trace(exact)
    env: dict[int, tuple[int, ...]] = {}
    leaf_slots = []
    for ref, v in zip(flat.ins, closed.jaxpr.invars, strict=True):
        env[ref] = t.new_slots(_shape(v))
        if len(leaf_slots) < len(leaves):
            leaf_slots.append(env[ref])
            t.param_slots.update(env[ref])
            t.leaf_of[env[ref]] = len(leaf_slots) - 1
        else:
            t.freeze_all([env[ref]], "model input")
    _freeze_consts(t, flat, env)
    _run(t, flat, env)
    t.freeze_all([env.get(r) for r in flat.outs if not isinstance(r, _jaxpr.Lit)], "model output")

    allowed = _nnx_allowed(model, paths, shapes) if kind == "nnx" else _linen_allowed(paths, shapes)
    for i, slots in enumerate(leaf_slots):
        for a, slot in enumerate(slots):
            rule = allowed[i]
            if isinstance(rule, str):
                t.freeze(slot, rule)
            elif a not in rule[0]:
                t.freeze(slot, _fixed_axis_reason(paths[i], a, shapes[i], *rule))
    _resolve_composites(t)
    graph = _collect(t, leaf_slots, paths, shapes, example, kind)
    return graph._replace(module=None if kind == "nnx" else model)


def _fixed_axis_reason(
    path: Path, axis: int, shape: tuple, axes: set, module: str, note: str
) -> str:
    """Why the module at ``path`` keeps ``axis`` of its variable whole."""
    what = f"axis {axis} of {path[-1]!r} {shape}: an axis the {module} at {_pstr(path[:-1])}"
    if axes and axis < min(axes):
        return (
            f"{what} cannot resize, a leading axis (the layer axis of a module stacked by "
            "nnx.vmap, nnx.scan or nn.scan): the cut keeps every layer"
        )
    return f"{what} cannot resize" + (f": {note}" if note else "")


def _freeze_consts(t: _Trace, flat: _jaxpr.Flat, env: dict) -> None:
    """Closed-over arrays are kept whole: the cut cannot slice a value baked into the code."""
    first_use: dict[int, str] = {}
    for e in flat.eqns:
        for r in e.ins:
            if not isinstance(r, _jaxpr.Lit) and r in flat.consts:
                first_use.setdefault(r, f"{e.eqn.primitive.name}{_site(e.eqn)}")
    for ref, value in flat.consts.items():
        if ref in env:
            continue
        env[ref] = t.new_slots(np.shape(value))
        dtype = getattr(value, "dtype", type(value).__name__)
        t.freeze_all(
            [env[ref]],
            f"a constant array of shape {tuple(np.shape(value))} and dtype {dtype} closed over "
            f"by the model (read by {first_use.get(ref, 'no operation')}); pass it as a "
            "variable or an argument to have it followed",
        )


def _collect(
    t: _Trace, leaf_slots: list, paths: tuple, shapes: tuple, example: Any, kind: str
) -> DepGraph:
    roots_frozen = _frozen_roots(t)
    used = set()  # classes holding an element of an intermediate (not a parameter) variable
    for slot, (start, n) in enumerate(t.slots):
        if slot not in t.param_slots:
            for k in range(n):
                used.add(t.find(start + k))
    members: dict[int, dict[tuple[int, int], list[int]]] = {}
    frozen_axes: list[Frozen] = []
    frozen_set: set[tuple[int, int]] = set()
    in_frozen: dict[int, str] = {}  # class -> a parameter axis kept whole holding part of it
    for i, slots in enumerate(leaf_slots):
        for a, slot in enumerate(slots):
            start, n = t.slots[slot]
            why = t.frozen.get(slot)
            roots = [t.find(start + k) for k in range(n)]
            if why is None:
                why = next((roots_frozen[r] for r in roots if r in roots_frozen), None)
            if why is None and not all(r in used for r in roots):
                why = "not used by the traced forward"
            if why is not None:
                if t.uses.get(i, 0) > 1:
                    why += (
                        f" (the parameter is read by {t.uses[i]} operations, e.g. a layer "
                        "applied twice: the couplings of all its uses are merged, so one use "
                        "that keeps an axis whole keeps it whole everywhere)"
                    )
                frozen_axes.append(Frozen(_pstr(paths[i]), a, why))
                frozen_set.add((i, a))
                for r in roots:
                    in_frozen.setdefault(r, f"{_pstr(paths[i])}[{a}], which is kept whole: {why}")
                continue
            for k, r in enumerate(roots):
                members.setdefault(r, {}).setdefault((i, a), []).append(k)
    # a unit that would touch a frozen axis somewhere is not prunable (the class itself was
    # not frozen, only an axis holding part of it: e.g. an axis the module cannot resize, or
    # the input axis of a layer reading a concatenation of which another part is frozen)
    units = {r: m for r, m in members.items() if r not in in_frozen and not (set(m) & frozen_set)}
    kept = {ax for m in units.values() for ax in m}
    for r, m in members.items():
        for i, a in m:
            if r in in_frozen and (i, a) not in kept and (i, a) not in frozen_set:
                why = f"tied to {in_frozen[r]}"
                frozen_axes.append(Frozen(_pstr(paths[i]), a, why))
                frozen_set.add((i, a))
    # groups: units sharing a parameter axis
    axis_group: dict[tuple[int, int], int] = {}
    gparent: list[int] = []

    def gfind(x: int) -> int:
        while gparent[x] != x:
            gparent[x] = gparent[gparent[x]]
            x = gparent[x]
        return x

    for m in units.values():
        ids = []
        for ax in m:
            if ax not in axis_group:
                axis_group[ax] = len(gparent)
                gparent.append(len(gparent))
            ids.append(gfind(axis_group[ax]))
        for x in ids[1:]:
            gparent[gfind(x)] = gfind(ids[0])
    by_group: dict[int, list[dict]] = {}
    for m in units.values():
        g = gfind(axis_group[next(iter(m))])
        by_group.setdefault(g, []).append({ax: np.asarray(ix, np.int64) for ax, ix in m.items()})
    groups = []
    for unit_list in by_group.values():
        axes = sorted({ax for u in unit_list for ax in u})
        # name a group by the first kernel that writes it (its output axis), if any
        writers = [(i, a) for i, a in axes if paths[i][-1] == "kernel" and a == len(shapes[i]) - 1]
        first = (writers or axes)[0]
        unit_list.sort(key=lambda u: int(u[first].min()) if first in u else 1 << 62)
        groups.append(
            Group(
                name=f"{_pstr(paths[first[0]])}[{first[1]}]",
                members=tuple((_pstr(paths[i]), a) for i, a in axes),
                size=len(unit_list),
                units=tuple(unit_list),
            )
        )
    groups.sort(key=lambda g: min(ax for u in g.units for ax in u))
    relaxed = {t.find(t.slots[s][0] + k) for s in t.relaxed for k in range(t.slots[s][1])}
    return DepGraph(
        tuple(groups),
        tuple(frozen_axes),
        paths,
        shapes,
        _unit_entries(groups, shapes),
        example,
        kind,
        exact=not relaxed & set(units),
    )


def _unit_entries(groups: Sequence[Group], shapes: Sequence[tuple]) -> dict[int, tuple]:
    """Per traced leaf: the flat index of every entry some unit removes, and that unit.

    Units are numbered across the groups in order (group 0's units first). An entry in the
    slices of two axes of one leaf that the same unit cuts appears once for that unit; an
    entry that two units remove (a weight between two cut channels) appears once for each.
    """
    grids: dict[int, np.ndarray] = {}
    parts: dict[int, tuple[list, list]] = {}
    first = 0
    for g in groups:
        for u, unit in enumerate(g.units):
            by_leaf: dict[int, list] = {}
            for (i, a), ix in unit.items():
                by_leaf.setdefault(i, []).append((a, ix))
            for i, cuts in by_leaf.items():
                if i not in grids:
                    grids[i] = np.arange(math.prod(shapes[i]), dtype=np.int64).reshape(shapes[i])
                flat = [np.take(grids[i], ix, axis=a).ravel() for a, ix in cuts]
                idx = flat[0] if len(flat) == 1 else np.unique(np.concatenate(flat))
                entries, units = parts.setdefault(i, ([], []))
                entries.append(idx)
                units.append(np.full(len(idx), first + u, np.int64))
        first += g.size
    return {i: (np.concatenate(e), np.concatenate(u)) for i, (e, u) in sorted(parts.items())}


# --------------------------------------------------------------------------------------------
# Scores and the selection of units


def _numbered(graph: DepGraph, tree: Any, name: str) -> list[tuple[int, Any]]:
    """``(traced leaf number, leaf)`` for each leaf of ``tree``, in its flattening order.

    ``tree`` may be the whole traced state or a part of it (``nnx.state(model, nnx.Param)``,
    Linen's ``variables['params']``).
    """
    where = {p: i for i, p in enumerate(graph.paths)}
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        p = _path_tuple(path)
        i = where.get(p, where.get(("params", *p)))
        if i is None:
            raise ValueError(
                f"{name} has a leaf at {keystr(path)} that the traced model lacks; pass a tree "
                "of the model's variables (e.g. nnx.state(model, nnx.Param))."
            )
        if tuple(np.shape(leaf)) != graph.shapes[i]:
            raise ValueError(
                f"{name} at {keystr(path)} has shape {tuple(np.shape(leaf))} but the traced "
                f"model has shape {graph.shapes[i]} there; pass the model the graph was built from."
            )
        out.append((i, leaf))
    return out


def _n_units(graph: DepGraph) -> int:
    return sum(g.size for g in graph.groups)


def _split(graph: DepGraph, units: Any) -> tuple:
    """A vector over all units, as one array per group."""
    offsets = np.cumsum([0] + [g.size for g in graph.groups])
    return tuple(units[offsets[k] : offsets[k + 1]] for k in range(len(graph.groups)))


def group_scores(
    graph: DepGraph,
    params: Any,
    criterion: Any = "saliency",
    *,
    fisher: Any = None,
    key: jax.Array | None = None,
) -> tuple[np.ndarray, ...]:
    r"""The importance of each unit of each group: the scores of every entry it removes, summed.

    .. math::
      S_u = \sum_{(\ell, i) \in u} s_{\ell, i}, \qquad s = \tfrac12 F w^2 \text{ by default,}

    over every parameter entry :math:`(\ell, i)` that removing unit :math:`u` deletes (its
    output slice, the consumers' input slices, BatchNorm entries, ...), each once: also
    an entry in the slices of two axes of one parameter (a layer whose input and output
    channels are tied, applied twice or in ``x + W x``). An entry shared by two units (a
    kernel weight between two cut channels) counts in both.

    Args:
      graph: from :func:`dependency_graph`.
      params: the parameters to score (``nnx.state(model, nnx.Param)``, Linen's
        ``variables['params']``); variables it lacks (BatchNorm statistics) score zero.
      criterion: a name from :data:`fisher_optax.CRITERIA` or a callable
        ``criterion(params, fisher) -> scores``.
      fisher: the Fisher diagonal of ``params`` (needed by ``"fisher"`` and ``"saliency"``).
      key: a PRNG key (``"random"`` only).

    Returns:
      One float64 array per group of :attr:`DepGraph.groups`, of length ``group.size``.

    Raises:
      ValueError: if ``params`` does not line up with the traced model, or as
        :func:`fisher_optax.scores` does (bad Fisher, non-finite weights).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from fisher_optax import depgraph
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
      >>> graph = depgraph.dependency_graph(model, jnp.ones((1, 2)))
      >>> params = nnx.state(model, nnx.Param)
      >>> (scores,) = depgraph.group_scores(graph, params, "magnitude")
      >>> scores.shape  # one score per hidden unit: its column, bias and row summed
      (3,)
    """
    from fisher_optax.scores import scores as per_weight_scores

    per_weight = per_weight_scores(params, criterion, fisher=fisher, key=key)
    total = np.zeros(_n_units(graph))
    for i, leaf in _numbered(graph, per_weight, "params"):
        if i in graph.entries:
            idx, unit = graph.entries[i]
            x = np.asarray(leaf, np.float64).ravel()
            total += np.bincount(unit, weights=x[idx], minlength=len(total))
    return _split(graph, total)


_GROUP_SCOPES: dict[str, str] = {
    "global": "one ranking over the units of every group",
    "group": "each group loses the same fraction of its units",
}


def _keep_units(
    scores: Sequence[Any], sparsity: Any, scope: str, min_units: int, kept: Sequence[Any] | None
) -> tuple:
    """The units kept: :func:`fisher_optax.select` over one score vector per group.

    Each group's ``min_units`` best units still kept (by score, then by index: the lower
    index goes first among ties) are lifted above every score and kept whatever the count.
    """
    if not scores:
        return ()
    concrete = all(_validate.is_concrete(x) for x in (*scores, *(kept or ()), sparsity))
    lifted, protected = [], []
    for k, s in enumerate(scores):
        was = None if kept is None else kept[k]
        if concrete:
            s = np.asarray(s, np.float32)
            rank = s if was is None else np.where(was, s, -np.inf)
            best = np.zeros(s.shape, bool)
            best[np.argsort(rank, kind="stable")[len(s) - min(min_units, len(s)) :]] = True
            best = best if was is None else best & np.asarray(was, bool)
            lifted.append(np.where(best, np.inf, s).astype(np.float32))
        else:
            s = jnp.asarray(s, jnp.float32)
            rank = s if was is None else jnp.where(was, s, -jnp.inf)
            top = jnp.argsort(rank, stable=True)[len(s) - min(min_units, len(s)) :]
            best = jnp.zeros(s.shape, bool).at[top].set(True)
            best = best if was is None else best & was
            lifted.append(jnp.where(best, jnp.inf, s))
        protected.append(best)
    keep = select(
        tuple(lifted),
        sparsity,
        pattern=Unstructured("global" if scope == "global" else "layer"),
        prunable=(True,) * len(lifted),
        mask=None if kept is None else tuple(kept),
    )
    if concrete:
        return tuple(np.asarray(k) | p for k, p in zip(keep, protected, strict=True))
    return tuple(k | p for k, p in zip(keep, protected, strict=True))


def group_mask(
    graph: DepGraph,
    scores: Sequence[np.ndarray],
    sparsity: float,
    *,
    scope: Literal["global", "group"] = "global",
    min_units: int = 1,
) -> tuple[np.ndarray, ...]:
    r"""Which units to keep: the lowest-scoring ``sparsity`` fraction of them is removed.

    The selection is :func:`fisher_optax.select` over the unit scores, with its count
    and tie rule: of :math:`n` units in scope (all units for ``scope="global"``, each
    group's for ``scope="group"``)

    .. math::
      k = \operatorname{round}(s \cdot n)

    go, the exact product of the float32 value of ``sparsity``, rounded half to even
    (``0.05`` of 50 units removes 3: ``float32(0.05) * 50`` is ``2.50000004``), and among
    equal scores the unit with the lower index (groups in order, then units) goes first.
    Each group keeps its ``min_units`` best units whatever the count, so fewer than
    :math:`k` units go when the count would empty a group (a group with no unit left
    would cut the network in two).

    Args:
      graph: from :func:`dependency_graph`.
      scores: from :func:`group_scores` (one array per group); ranked as float32.
      sparsity: the fraction of the units to remove, in ``[0, 1]``.
      scope: ``"global"`` ranks all units together; ``"group"`` removes the fraction from
        each group on its own.
      min_units: each group keeps at least this many units (``>= 1``).

    Returns:
      One boolean NumPy array per group, ``True`` keeping a unit: the ``keep`` of
      :func:`cut`, :func:`masked`, :func:`weight_mask` and :func:`cut_optimizer`.

    Raises:
      ValueError: on a bad ``sparsity``, ``scope`` or ``min_units``, or scores that do not
        line up with the groups or are not finite.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from flax import nnx
      >>> from fisher_optax import depgraph
      >>> model = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(4, 1, rngs=nnx.Rngs(1)))
      >>> graph = depgraph.dependency_graph(model, jnp.ones((1, 2)))
      >>> depgraph.group_mask(graph, [np.array([3.0, 1.0, 1.0, 2.0])], 0.5)
      (array([ True, False, False,  True]),)
    """
    sparsity = _validate.fraction(sparsity, "sparsity", meaning="the fraction of units to remove")
    scope = _validate.choice(scope, "scope", _GROUP_SCOPES)
    min_units = _validate.integer(min_units, "min_units", minimum=1)
    if len(scores) != len(graph.groups):
        raise ValueError(
            f"scores has {len(scores)} arrays but the graph has {len(graph.groups)} groups; "
            "pass group_scores(graph, ...)."
        )
    scores = [np.asarray(s, np.float64) for s in scores]
    for g, s in zip(graph.groups, scores, strict=True):
        if s.shape != (g.size,):
            raise ValueError(
                f"scores for group {g.name} has shape {s.shape}, expected ({g.size},); pass "
                "group_scores(graph, ...)."
            )
        if not np.isfinite(s).all():
            raise ValueError(
                f"scores for group {g.name} holds non-finite values; check the params and "
                "the Fisher for NaN or inf before scoring."
            )
    return _keep_units(scores, sparsity, scope, min_units, None)


def _unit_vector(graph: DepGraph, keep: Sequence[Any]) -> Any:
    """The checked ``keep`` as one bool vector over all units (NumPy unless traced)."""
    if len(keep) != len(graph.groups):
        raise ValueError(
            f"keep has {len(keep)} arrays but the graph has {len(graph.groups)} groups; pass "
            "group_mask(graph, ...)."
        )
    for g, k in zip(graph.groups, keep, strict=True):
        if jnp.result_type(k) != jnp.bool_ or jnp.shape(k) != (g.size,):
            raise ValueError(
                f"keep for group {g.name} must be a bool array of shape ({g.size},), got "
                f"{jnp.result_type(k)} {jnp.shape(k)}; pass group_mask(graph, ...)."
            )
    if not keep:
        return np.ones(0, bool)
    if all(_validate.is_concrete(k) for k in keep):
        return np.concatenate([np.asarray(k, bool) for k in keep])
    return jnp.concatenate([jnp.asarray(k) for k in keep])


def _concrete_units(graph: DepGraph, keep: Sequence[Any]) -> np.ndarray:
    """:func:`_unit_vector` of a ``keep`` that must be known on the host (not traced)."""
    kept_units = _unit_vector(graph, keep)
    if not isinstance(kept_units, np.ndarray):
        raise ValueError(
            "keep is traced (inside jit): weight_mask, masked and cut need concrete arrays "
            "(from group_mask), since the cut changes shapes; under jit select the units "
            "with select_groups, which returns the mask."
        )
    return kept_units


def _expand(graph: DepGraph, numbered: list[tuple[int, Any]], kept_units: Any) -> list[Any]:
    """Per leaf: True where no removed unit touches the entry (NumPy or jnp, as given)."""
    out = []
    for i, _ in numbered:
        shape = graph.shapes[i]
        if i not in graph.entries:
            out.append(np.ones(shape, bool) if isinstance(kept_units, np.ndarray) else None)
            continue
        idx, unit = graph.entries[i]
        if isinstance(kept_units, np.ndarray):
            m = np.ones(math.prod(shape), bool)
            m[idx[~kept_units[unit]]] = False
        else:
            gone = jnp.zeros(math.prod(shape), jnp.int32).at[idx.astype(np.int32)]
            m = gone.add((~kept_units[unit]).astype(jnp.int32)) == 0
        out.append(m.reshape(shape))
    return out


def weight_mask(graph: DepGraph, keep: Sequence[np.ndarray], params: Any) -> Any:
    """The entries a cut keeps, as a bool tree shaped like ``params``.

    ``False`` marks every entry of every removed unit: with :func:`fisher_optax.apply_mask`
    it gives the parameters of :func:`masked`, and with :func:`fisher_optax.keep_pruned`
    training holds the removed units at zero until the cut.

    Args:
      graph: from :func:`dependency_graph`.
      keep: from :func:`group_mask` (one bool array per group).
      params: the traced variables or a part of them (``nnx.state(model, nnx.Param)``,
        Linen's ``variables['params']``).

    Returns:
      A pytree with the structure of ``params`` holding a bool array per leaf.

    Raises:
      ValueError: if ``keep`` does not line up with the groups or is traced (under ``jit``
        use :func:`select_groups`), or ``params`` does not line up with the traced model.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, fisher_optax
      >>> from flax import nnx
      >>> from fisher_optax import depgraph
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
      >>> graph = depgraph.dependency_graph(model, jnp.ones((1, 2)))
      >>> params = nnx.state(model, nnx.Param)
      >>> mask = depgraph.weight_mask(graph, (np.array([True, False, True]),), params)
      >>> mask["layers"][2]["kernel"][...].ravel()  # the row read from unit 1 is pruned
      Array([ True, False,  True], dtype=bool)
      >>> small_params = fisher_optax.apply_mask(params, mask)
    """
    kept_units = _concrete_units(graph, keep)
    numbered = _numbered(graph, params, "params")
    masks = iter([jax.device_put(m) for m in _expand(graph, numbered, kept_units)])
    return jax.tree.map(lambda _: next(masks), params)


def select_groups(
    graph: DepGraph,
    scores: Any,
    sparsity: float | jax.Array,
    *,
    scope: Literal["global", "group"] = "global",
    min_units: int = 1,
    mask: Any = None,
) -> Any:
    """Remove whole units by their summed per-weight scores: a mask shaped like ``scores``.

    :func:`group_scores`, :func:`group_mask` and :func:`weight_mask` in one traceable call
    that works under ``jax.jit`` with a traced ``sparsity`` (one compile for every value):
    the map from units to parameter entries is fixed by the graph, the sums and the
    selection run in ``jnp``. Its result equals that of the three functions on the same
    scores (sums in float32 here, float64 there, so near-ties can rank differently).

    Args:
      graph: from :func:`dependency_graph`.
      scores: per-weight scores shaped like the traced variables or a part of them (e.g.
        ``fisher_optax.scores(nnx.state(model, nnx.Param), "saliency", fisher=...)``).
      sparsity: the fraction of units to remove, in ``[0, 1]``, a float32 scalar under
        ``jit`` (the rule of :func:`fisher_optax.select`).
      scope: as for :func:`group_mask`.
      min_units: as for :func:`group_mask`.
      mask: an earlier mask shaped like ``scores``. A unit whose entries it prunes all is
        counted as removed, and the result prunes everything it prunes (masks only grow).

    Returns:
      A bool tree shaped like ``scores``: ``False`` on every entry of every removed unit
      and wherever ``mask`` is ``False``.

    Raises:
      ValueError: if ``scores`` or ``mask`` does not line up with the traced model, or on
        a bad ``sparsity``, ``scope`` or ``min_units``.
      TypeError: if ``mask`` is not boolean.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from fisher_optax import depgraph
      >>> model = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(4, 1, rngs=nnx.Rngs(1)))
      >>> graph = depgraph.dependency_graph(model, jnp.ones((1, 2)))
      >>> scores = jax.tree.map(jnp.abs, nnx.state(model, nnx.Param))
      >>> select = jax.jit(lambda s, p: depgraph.select_groups(graph, s, p))
      >>> m = select(scores, jnp.float32(0.5))
      >>> int(m["layers"][0]["bias"][...].sum())  # 2 of the 4 hidden units are left
      2
    """

    scope = _validate.choice(scope, "scope", _GROUP_SCOPES)
    min_units = _validate.integer(min_units, "min_units", minimum=1)
    sparsity = _validate.fraction(sparsity, "sparsity", meaning="the fraction of units to remove")
    numbered = _numbered(graph, scores, "scores")
    n = _n_units(graph)
    sums = jnp.zeros(n, jnp.float32)
    for i, leaf in numbered:
        if i in graph.entries:
            idx, unit = graph.entries[i]
            x = jnp.ravel(jnp.asarray(leaf, jnp.float32))[idx.astype(np.int32)]
            sums = sums.at[unit.astype(np.int32)].add(x)
    kept = None
    masks = None
    if mask is not None:
        masks = _validate.bool_leaves(scores, mask, "mask", "scores")
        pruned = jnp.zeros(n, jnp.int32)
        size = np.zeros(n, np.int64)
        for (i, _), m in zip(numbered, masks, strict=True):
            if i in graph.entries:
                idx, unit = graph.entries[i]
                gone = ~jnp.ravel(jnp.asarray(m, bool))[idx.astype(np.int32)]
                pruned = pruned.at[unit.astype(np.int32)].add(gone.astype(jnp.int32))
                size += np.bincount(unit, minlength=n)
        kept = _split(graph, ~((pruned == size) & (size > 0)))
    keep = _keep_units(_split(graph, sums), sparsity, scope, min_units, kept)
    units = jnp.concatenate([jnp.asarray(k) for k in keep]) if keep else jnp.ones(0, bool)
    out = []
    expanded = _expand(graph, numbered, units)
    for k, ((_, leaf), m) in enumerate(zip(numbered, expanded, strict=True)):
        m = jnp.ones(jnp.shape(leaf), bool) if m is None else m
        out.append(m if masks is None else m & jnp.asarray(masks[k], bool))
    return jax.tree.unflatten(jax.tree.structure(scores), out)


class Groups(NamedTuple):
    """A selection pattern of whole units from the traced graph, for :func:`fisher_optax.select`
    and ``fisher_optax.pruned(pattern=...)``.

    ``select(scores, sparsity, pattern=Groups(graph))`` is :func:`select_groups`: every unit
    (a channel, a hidden unit, a head, with every entry coupled to it) is scored by the sum
    of its entries' scores, and the ``sparsity`` fraction of the units with the lowest sums
    is removed, with the count and tie rule of :func:`fisher_optax.select`. The mask it
    gives is the one :func:`cut` turns into a smaller model. Under ``pruned`` the units go
    gradually while training, and what a mask update removed stays removed.

    Attributes:
      graph: from :func:`dependency_graph`.
      scope: ``"global"`` (one ranking over all units) or ``"group"`` (each group loses the
        fraction on its own).
      min_units: each group keeps at least this many units.

    Examples:
      >>> import jax, jax.numpy as jnp, fisher_optax as fo
      >>> from flax import nnx
      >>> from fisher_optax import depgraph
      >>> model = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(4, 1, rngs=nnx.Rngs(1)))
      >>> graph = depgraph.dependency_graph(model, jnp.ones((1, 2)))
      >>> scores = jax.tree.map(jnp.abs, nnx.state(model, nnx.Param))
      >>> m = fo.select(scores, 0.5, pattern=depgraph.Groups(graph))
      >>> m["layers"][2]["kernel"][...].ravel().tolist()  # 2 of the 4 hidden units removed
      [True, False, False, True]
    """

    graph: DepGraph
    scope: Literal["global", "group"] = "global"
    min_units: int = 1

    def select(self, scores: Any, sparsity: Any, *, prunable: Any = None, mask: Any = None) -> Any:
        """The mask of :func:`select_groups` (see the class)."""
        if not isinstance(self.graph, DepGraph):
            raise TypeError(
                "Groups(graph) takes the DepGraph returned by depgraph.dependency_graph(model, "
                f"example), got {type(self.graph).__name__}."
            )
        if prunable is not None:
            raise ValueError(
                "prunable does not apply to Groups: the traced graph decides which entries "
                "a unit removes (its frozen axes are kept whole). Leave prunable=None; to "
                "keep a group whole, select with depgraph.group_mask and set its keep to "
                "all True."
            )
        if not (
            isinstance(sparsity, float | int | np.number | jax.Array | np.ndarray)
            and jnp.ndim(sparsity) == 0
        ):
            raise ValueError(
                "Groups takes one scalar sparsity (the fraction of units to remove), got "
                f"{type(sparsity).__name__}; per-leaf targets do not apply to whole units."
            )
        return select_groups(
            self.graph,
            scores,
            sparsity,
            scope=self.scope,
            min_units=self.min_units,
            mask=mask,
        )


# --------------------------------------------------------------------------------------------
# The cut


def _cut_index(graph: DepGraph, keep: Sequence[np.ndarray]) -> dict[Path, tuple]:
    """The entries kept, per traced leaf path: one index array per axis (``None`` = whole)."""
    kept_units = _concrete_units(graph, keep)
    drop: dict[tuple[int, int], set] = {}
    first = 0
    for g in graph.groups:
        for u in np.flatnonzero(~kept_units[first : first + g.size]):
            for ax, ix in g.units[u].items():
                drop.setdefault(ax, set()).update(int(x) for x in ix)
        first += g.size
    index: dict[Path, tuple] = {}
    for (i, a), gone in drop.items():
        entry = list(index.get(graph.paths[i], (None,) * len(graph.shapes[i])))
        entry[a] = np.setdiff1d(np.arange(graph.shapes[i][a]), np.fromiter(gone, np.int64))
        index[graph.paths[i]] = tuple(entry)
    return index


def _take(x: Any, ix: tuple | None) -> Any:
    if ix is None:
        return x
    dtype = jnp.result_type(x)
    x = np.asarray(x)  # NumPy: one eager XLA op per leaf shape would compile each time
    for a, k in enumerate(ix):
        if k is not None:
            x = np.take(x, k, axis=a)
    return jax.device_put(x.astype(dtype))


def _eval_copy(graphdef: Any, state: Any) -> Any:
    """The NNX model in evaluation mode (Dropout off, BatchNorm on its running statistics).

    The channel structure is the same in both modes, but a training-mode forward draws
    random bits (which the trace cannot follow) and cannot be compared between two models.
    """
    from flax import nnx

    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def _apply(model: Any, example: tuple, shapes_only: bool = False) -> Any:
    """``model(*args, **kwargs)`` in evaluation mode under one ``jit`` (eager NNX dispatch
    compiles every op separately), or only its output shapes; ``model`` is not changed."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn, arrays = _forward(graphdef, "nnx", example)
    if shapes_only:
        return jax.eval_shape(fn, state, arrays)
    return jax.jit(fn)(state, arrays)


def _map_state(graph: DepGraph, tree: Any, index: dict, fn: Callable) -> Any:
    def one(path: Any, leaf: Any) -> Any:
        return fn(leaf, index.get(_path_tuple(path)))

    return jax.tree_util.tree_map_with_path(one, tree)


def _resize_nnx(model: Any) -> None:
    """Set each module's shape attributes from its (already sliced) variables.

    Shapes are read from the trailing axes: a module stacked by ``nnx.vmap`` holds its
    variables with leading layer axes.
    """
    from flax import nnx

    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Linear):
            m.in_features, m.out_features = (int(d) for d in m.kernel.shape[-2:])
        elif isinstance(m, nnx.Conv) and not isinstance(m, nnx.ConvTranspose):
            m.in_features = int(m.kernel.shape[-2]) * m.feature_group_count
            m.out_features = int(m.kernel.shape[-1])
            rank = len(m.kernel_shape)
            m.kernel_shape = tuple(int(d) for d in m.kernel.shape[-rank:])
        elif isinstance(m, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm):
            v = m.scale if getattr(m, "scale", None) is not None else getattr(m, "mean", None)
            if v is not None and v.ndim == 1:
                m.num_features = int(v.shape[0])
        elif isinstance(m, nnx.LinearGeneral):
            n_in, n_out = len(m.in_features), len(m.out_features)
            shape = tuple(int(d) for d in m.kernel.shape[-(n_in + n_out) :])
            m.in_features, m.out_features = shape[:n_in], shape[n_in:]
        elif isinstance(m, nnx.Embed):
            m.num_embeddings, m.features = (int(d) for d in m.embedding.shape[-2:])
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.MultiHeadAttention):
            same_kv = m.num_kv_heads == m.num_heads
            m.num_heads = int(m.query.kernel.shape[-2])  # (in, heads, head_dim)
            if same_kv:
                m.num_kv_heads = m.num_heads
            m.qkv_features = m.num_heads * m.head_dim
            m.in_features = int(m.query.kernel.shape[-3])
            m.in_kv_features = int(m.key.kernel.shape[-3])
            m.out_features = int(m.out.kernel.shape[-1])


def _check_tree(graph: DepGraph, tree: Any, name: str) -> None:
    """``tree`` must have the traced leaves: same paths, same shapes."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = tuple(_path_tuple(p) for p, _ in flat)
    if paths != graph.paths:
        extra = sorted(set(paths) - set(graph.paths), key=str)
        missing = sorted(set(graph.paths) - set(paths), key=str)
        raise ValueError(
            f"{name} does not have the variables the graph was traced with (extra: "
            f"{[_pstr(p) for p in extra[:3]]}, missing: {[_pstr(p) for p in missing[:3]]}); "
            "pass the model (or variables) given to dependency_graph."
        )
    for (path, leaf), shape in zip(flat, graph.shapes, strict=True):
        if tuple(jnp.shape(leaf)) != shape:
            raise ValueError(
                f"{name} at {keystr(path)} has shape {tuple(jnp.shape(leaf))} but the graph was "
                f"traced with shape {shape}; pass the model (or variables) given to "
                "dependency_graph, not one already cut."
            )


def _verify(new_out: Any, ref_out: Any, rtol: float, atol: float, graph: Any, keep: Any) -> None:
    ref = jax.tree_util.tree_flatten_with_path(ref_out)[0]
    new = jax.tree.leaves(new_out)
    for (path, r), n in zip(ref, new, strict=True):
        n = np.asarray(n)
        if tuple(r.shape) != n.shape:
            raise ValueError(
                f"the cut model's output {keystr(path)} has shape {n.shape}, the masked "
                f"model's {tuple(r.shape)}: the cut is wrong (please report the model)."
            )
        if not graph.exact:  # a cut through a norm computes something else by design
            if not np.all(np.isfinite(n)):
                raise ValueError(
                    f"the inexact cut model's output {keystr(path)} is not finite on the "
                    "example input: cut fewer units of the normalised stream."
                )
            continue
        r = np.asarray(r)
        scale = max(1.0, float(np.max(np.abs(r))) if r.size else 1.0)
        err = np.abs(n - r)
        if not np.all(err <= atol * scale + rtol * np.abs(r)):
            raise ValueError(
                f"the cut model's output {keystr(path)} differs from the masked model's on "
                f"the example input (max abs difference {float(err.max()):.3g}, tolerance "
                f"atol={atol} x {scale:.3g} + rtol={rtol}): the trace missed a dependency, "
                "so the cut is refused. Groups cut: "
                f"{', '.join(_cut_groups(graph, keep)) or 'none'}. Keep a group whole with "
                "keep[g] = np.ones(graph.groups[g].size, bool), e.g. one whose width the "
                "forward reads as a number (x / sqrt(q.shape[-1])), and please report the "
                "model."
            )


def _zeroed(graph: DepGraph, tree: Any, keep: Sequence[np.ndarray]) -> Any:
    """``tree`` (the traced variables) with every entry of every removed unit set to zero."""
    numbered = _numbered(graph, tree, "variables")
    masks = _expand(graph, numbered, _concrete_units(graph, keep))
    leaves = [
        x
        if i not in graph.entries
        else jax.device_put(np.where(m, np.asarray(x), 0).astype(jnp.result_type(x)))
        for (i, x), m in zip(numbered, masks, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def _cut_groups(graph: DepGraph, keep: Sequence[np.ndarray]) -> list[str]:
    return [
        f"{k} ({g.name})"
        for k, (g, kp) in enumerate(zip(graph.groups, keep, strict=True))
        if not np.all(kp)
    ]


def _nnx_state(model: Any, graph: DepGraph) -> tuple[Any, Any]:
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(
            "the graph was traced from an NNX model: pass that model (an nnx.Module), got "
            f"{type(model).__name__}."
        )
    graphdef, state = nnx.split(model)
    _check_tree(graph, state, "model")
    return graphdef, state


def _linen_variables(variables: Any, graph: DepGraph) -> Any:
    if not isinstance(variables, Mapping):
        raise TypeError(
            "the graph was traced from a Linen module: pass the variables it was traced with "
            f"(the {{'params': ...}} dict), got {type(variables).__name__}."
        )
    _check_tree(graph, variables, "variables")
    return variables


def masked(model: Any, graph: DepGraph, keep: Sequence[np.ndarray]) -> Any:
    """The traced model with every entry of every removed unit set to zero, shapes unchanged.

    What the cut model must compute (checked by :func:`cut`). ``model`` is not changed.

    Args:
      model: the NNX model the graph was traced from, or for a Linen graph the variables
        it was traced with.
      graph: from :func:`dependency_graph`.
      keep: from :func:`group_mask` (one bool array per group).

    Returns:
      A new NNX model of the same type, or for Linen a new variables dict.

    Raises:
      ValueError: if ``keep`` does not line up with the groups or is traced, or ``model`` is
        not the traced model.
      TypeError: if ``model`` is not of the graph's kind.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from flax import nnx
      >>> from fisher_optax import depgraph
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
      >>> graph = depgraph.dependency_graph(model, jnp.ones((1, 2)))
      >>> zeroed = depgraph.masked(model, graph, (np.array([True, False, True]),))
      >>> zeroed.layers[0].kernel[:, 1]
      Array([0., 0.], dtype=float32)
    """
    if graph.kind == "nnx":
        from flax import nnx

        graphdef, state = _nnx_state(model, graph)
        return nnx.merge(graphdef, _zeroed(graph, state, keep))
    return _zeroed(graph, _linen_variables(model, graph), keep)


def _resize_linen(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    """A ``flax.linen`` method interceptor: each module's widths read from its variables.

    Linen checks every variable against the shape its module would create, and the module
    computes that shape from its attributes (``features``, ``qkv_features``), so before any
    of its methods runs (``setup`` included: ``nn.Embed`` creates its table there) its
    attributes are set from the (sliced) variables it holds. Inside ``nn.scan`` a module
    sees one layer's slice, so the trailing axes are read.
    """
    m = context.module
    if m.scope is not None:
        params = m.scope.variables().get("params", {})
        kernel, embedding = params.get("kernel"), params.get("embedding")
        features = getattr(m, "features", None)
        if kernel is not None and isinstance(features, int):
            object.__setattr__(m, "features", int(jnp.shape(kernel)[-1]))
        elif kernel is not None and isinstance(features, tuple):
            shape = jnp.shape(kernel)[-len(features) :]
            object.__setattr__(m, "features", tuple(int(d) for d in shape))
        elif embedding is not None and features is not None:
            object.__setattr__(m, "features", int(jnp.shape(embedding)[-1]))
        query, out = params.get("query", {}).get("kernel"), params.get("out", {}).get("kernel")
        if query is not None and hasattr(m, "qkv_features"):  # (in, heads, head_dim)
            object.__setattr__(m, "qkv_features", int(np.prod(jnp.shape(query)[-2:])))
        if out is not None and hasattr(m, "out_features"):
            object.__setattr__(m, "out_features", int(jnp.shape(out)[-1]))
    return next_fun(*args, **kwargs)


class LinenCut(NamedTuple):
    """The result of :func:`cut` on a Linen graph: the sliced variables and how to run them.

    Attributes:
      variables: the sliced variables (same collections and structure as given).
      module: the traced Linen module, unchanged.

    :meth:`apply` runs ``module`` on ``variables`` with each module's widths
    (``features``, attention's ``qkv_features`` and ``out_features``) read from the
    variables it holds, so the smaller model runs without a new module definition, whatever
    the module's own configuration (``num_filters``, ``mlp_dim``, a config object) and
    whatever width a global cut left each block.
    """

    variables: Any
    module: Any

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """``module.apply(variables, *args, **kwargs)`` with the cut widths.

        Args:
          *args: the module's call arguments.
          **kwargs: its keyword arguments, and those of ``apply`` (``mutable=``,
            ``rngs=``), as for ``module.apply``.

        Returns:
          What ``module.apply`` returns.

        Examples:
          >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
          >>> from fisher_optax import depgraph
          >>> module = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(2)])
          >>> x = jnp.ones((1, 3))
          >>> variables = module.init(jax.random.key(0), x)
          >>> graph = depgraph.dependency_graph(module, x, variables=variables)
          >>> result = depgraph.cut(variables, graph, (np.arange(6) < 4,))
          >>> jax.jit(result.apply)(x).shape  # the module still says Dense(6)
          (1, 2)
        """
        import flax.linen as nn

        with nn.intercept_methods(_resize_linen):
            return self.module.apply(self.variables, *args, **kwargs)


def cut(
    model: Any,
    graph: DepGraph,
    keep: Sequence[np.ndarray],
    *,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Any:
    """The smaller model without the removed units, checked against :func:`masked`.

    NNX: a new model of the same type. Every variable is sliced (kernels, biases,
    BatchNorm ``mean``/``var``/``scale``/``bias``, LayerNorm scales, embeddings, attention
    projections, stacked layers on their trailing axes) and every module's shape attributes
    are updated (``in_features``, ``out_features``, ``kernel_shape``, ``num_features``,
    ``num_heads``, ``qkv_features``, ...).

    Linen: a :class:`LinenCut`, the sliced variables with an ``apply`` that runs the traced
    module on them with the new widths (no new module definition to write).

    The check runs the new model on the graph's example call next to the masked model
    (every removed entry zeroed) and refuses a cut whose outputs differ. A graph traced with
    ``exact=False`` whose cut goes through a norm (``graph.exact`` is ``False``) computes
    something else by design: its check is only that the new model runs and has the masked
    model's output shapes. ``model`` is not changed.

    Args:
      model: the NNX model the graph was traced from, or for a Linen graph the variables
        it was traced with.
      graph: from :func:`dependency_graph`.
      keep: from :func:`group_mask` (one bool array per group).
      verify: run the check.
      rtol: relative tolerance of the check.
      atol: absolute tolerance of the check, scaled by ``max(1, max |masked output|)``.

    Returns:
      The new NNX model, or for Linen a :class:`LinenCut`.

    Raises:
      ValueError: if the check fails, naming the first output that differs and the groups
        cut; if ``keep`` does not line up with the graph; if ``model`` is not the traced
        model.
      TypeError: if ``model`` is not of the graph's kind.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
      >>> from flax import nnx
      >>> from fisher_optax import depgraph
      >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> graph = depgraph.dependency_graph(model, jnp.ones((1, 3)))
      >>> keep = (np.arange(8) < 5,)
      >>> small = depgraph.cut(model, graph, keep)
      >>> small.layers[0].out_features, small.layers[2].kernel.shape
      (5, (5, 2))

      Linen: the new variables, run with the module as it is written.

      >>> class MLP(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))
      >>> x = jnp.ones((1, 3))
      >>> variables = MLP().init(jax.random.key(0), x)
      >>> graph = depgraph.dependency_graph(MLP(), x, variables=variables)
      >>> result = depgraph.cut(variables, graph, keep)
      >>> result.variables["params"]["Dense_1"]["kernel"].shape
      (3, 5)
      >>> result.apply(x).shape
      (1, 2)
    """
    index = _cut_index(graph, keep)
    if graph.kind == "nnx":
        from flax import nnx

        graphdef, state = _nnx_state(model, graph)
        new = nnx.merge(graphdef, _map_state(graph, state, index, _take))
        _resize_nnx(new)
        if verify:
            if graph.exact:
                ref = _apply(nnx.merge(graphdef, _zeroed(graph, state, keep)), graph.example)
            else:  # computes something else by design: only the output shapes are compared
                ref = _apply(model, graph.example, shapes_only=True)
            _verify(_apply(new, graph.example), ref, rtol, atol, graph, keep)
        return new
    variables = _linen_variables(model, graph)
    result = LinenCut(_map_state(graph, variables, index, _take), graph.module)
    if verify:
        fn, arrays = _forward(graph.module, "linen", graph.example)
        if graph.exact:
            ref = jax.jit(fn)(_zeroed(graph, variables, keep), arrays)
        else:
            ref = jax.eval_shape(fn, variables, arrays)
        args, kwargs = graph.example
        _verify(result.apply(*args, **kwargs), ref, rtol, atol, graph, keep)
    return result


def _is_masked_node(x: Any) -> bool:
    import optax

    return isinstance(x, optax.MaskedNode)


def _slice_state(graph: DepGraph, tree: Any, index: dict[Path, tuple]) -> Any:
    """``tree`` with every subtree that lines up with the traced variables sliced by ``index``.

    A subtree lines up when each of its leaves sits at a traced path (or at a path of
    Linen's ``'params'`` collection) with the traced shape; ``optax.MaskedNode`` counts as
    lining up. Those are per-parameter quantities (Adam's ``mu`` and ``nu``, the mask of
    :func:`fisher_optax.pruned`); everything else (``count``, hyperparameters) is kept.
    """
    where = {p: i for i, p in enumerate(graph.paths)}

    def number(path: Any) -> int | None:
        p = _path_tuple(path)
        return where.get(p, where.get(("params", *p)))

    def matches(node: Any) -> bool:
        if node is None or _is_masked_node(node):
            return False
        flat = jax.tree_util.tree_flatten_with_path(node, is_leaf=_is_masked_node)[0]
        if not flat:
            return False
        for path, x in flat:
            i = number(path)
            if i is None or not (_is_masked_node(x) or tuple(jnp.shape(x)) == graph.shapes[i]):
                return False
        return True

    def take(path: Any, x: Any) -> Any:
        ix = None if _is_masked_node(x) else index.get(graph.paths[number(path)])
        for a, k in enumerate(ix or ()):
            if k is not None:
                x = jnp.take(x, jnp.asarray(k, jnp.int32), axis=a)
        return x

    # one compile per moment tree, not one per leaf (mu and nu share it)
    take_all = jax.jit(
        lambda node: jax.tree_util.tree_map_with_path(take, node, is_leaf=_is_masked_node)
    )
    return jax.tree.map(lambda n: take_all(n) if matches(n) else n, tree, is_leaf=matches)


def cut_optimizer(
    optimizer: Any, graph: DepGraph, keep: Sequence[np.ndarray], *, model: Any = None
) -> Any:
    """The optimizer state of the cut model: every per-parameter quantity sliced like the cut.

    Adam's moments, :func:`fisher_optax.pruned` masks and any state laid out like the
    parameters are sliced with the indices of :func:`cut`, so the kept entries carry their
    exact values; ``count``, hyperparameters and the step carry over, so fine-tuning goes
    on with the same moments and the same bias correction. States that store parameters in
    another layout (``optax.flatten``'s ravelled vector, adafactor's factored moments) are
    not recognised and are left unchanged.

    Args:
      optimizer: an ``nnx.Optimizer`` of the traced NNX model, or an optax state of the
        traced variables (for Linen: of ``variables['params']``).
      graph: from :func:`dependency_graph`.
      keep: from :func:`group_mask` (one bool array per group).
      model: ``nnx.Optimizer`` only: the cut model (from :func:`cut`) that the new
        optimizer updates.

    Returns:
      A new ``nnx.Optimizer`` (same ``tx`` and ``wrt``, the step carried over) for
      ``model``, or the sliced optax state.

    Raises:
      ValueError: if ``keep`` does not line up with the groups, or the sliced state does
        not fit ``model``.
      TypeError: if ``optimizer`` is an ``nnx.Optimizer`` and ``model`` is not an
        ``nnx.Module``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from flax import nnx
      >>> from fisher_optax import depgraph
      >>> model = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(4, 1, rngs=nnx.Rngs(1)))
      >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
      >>> graph = depgraph.dependency_graph(model, jnp.ones((1, 2)))
      >>> keep = (np.array([True, False, True, True]),)
      >>> small = depgraph.cut(model, graph, keep)
      >>> small_opt = depgraph.cut_optimizer(optimizer, graph, keep, model=small)
      >>> small_opt.opt_state[0].mu["layers"][2]["kernel"].shape
      (3, 1)
    """
    index = _cut_index(graph, keep)
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is an optional extra
        nnx = None
    if nnx is None or not isinstance(optimizer, nnx.Optimizer):
        return _slice_state(graph, optimizer, index)
    if not isinstance(model, nnx.Module):
        raise TypeError(
            "cut_optimizer of an nnx.Optimizer needs model=, the cut model it will update "
            f"(from cut(model, graph, keep)); got {type(model).__name__}."
        )
    from fisher_optax._tree import check_matching

    state = _slice_state(graph, optimizer.opt_state, index)
    new_opt = nnx.Optimizer(model, optimizer.tx, wrt=optimizer.wrt)
    check_matching(
        new_opt.opt_state,
        state,
        ref_name="the optimizer state of model",
        other_name="the sliced optimizer state",
    )
    new_opt.opt_state = nnx.data(state)
    new_opt.step.set_value(optimizer.step.get_value())
    return new_opt
