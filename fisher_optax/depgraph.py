"""Structured pruning from the traced computation: coupled channels, group scores, surgery.

The model's forward is traced once with an example input (``jax.make_jaxpr``) and every
parameter's axes are followed through the primitives. Indices that must be removed
together (an output channel of a conv, the BatchNorm entries that normalise it, the input
slice of every consumer, and, through a residual add, the same channel of every layer that
writes into the sum) fall into one *unit*; the units that share parameter axes form a
*group* (Fang et al.'s DepGraph). A flatten maps one channel to a block of features, a
concatenation offsets channels, attention heads couple the query, key, value and output
projections.

Rules of the trace (each index is an element of a union-find; the unions are exact):

* elementwise ops, ``broadcast_in_dim``, ``transpose``, ``squeeze`` and identity reshapes
  tie equal axes; ``dot_general`` ties contracted and batch axes; ``conv_general_dilated``
  ties the input feature axis to the kernel's input axis and the kernel's output axis to
  the output feature axis; ``concatenate`` ties each input to its offset in the output;
  a reshape that merges (flatten) or splits axes ties each element to its coordinate on
  the one axis that may be cut; ``pjit``, ``custom_jvp``/``custom_vjp`` and ``remat``
  bodies are followed.
* Everything else *freezes* the axes it touches (kept whole), and so do: the model's
  input and output, reductions (a mean or a max over channels changes when channels go),
  conv windows, pooling windows, slices, pads, grouped or depthwise convs, iota and
  closed-over constants, a reshape that mixes two cuttable axes, and parameter axes that
  the cut cannot express in the module's attributes (e.g. attention's ``head_dim``, whose
  ``1/sqrt(head_dim)`` scale would change). :attr:`DepGraph.frozen` lists each frozen
  parameter axis with its reason.

The cut is then checked: the smaller model must compute what the *masked* model (every
removed entry set to zero) computes on the example input.

References:
  Fang, Ma, Song, Mi, Wang. DepGraph: Towards Any Structural Pruning. CVPR 2023,
  https://arxiv.org/abs/2301.12900.

  Tu, Berisha, Cao, Seo. Reducing the Model Order of Deep Neural Networks Using Information
  Theory. ISVLSI 2016, https://arxiv.org/abs/1605.04859.
"""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax import _validate
from fisher_optax._tree import keystr

__all__ = [
    "DepGraph",
    "Frozen",
    "Group",
    "LinenCut",
    "cut",
    "cut_index",
    "cut_linen",
    "cut_optimizer",
    "dependency_graph",
    "group_mask",
    "group_scores",
    "masked",
]

Path = tuple[Hashable, ...]

GROUP_SCOPES: dict[str, str] = {
    "global": "one ranking over the units of every group",
    "group": "each group loses the same fraction of its units",
}
"""How :func:`group_mask` ranks units."""


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
      example: the example input, used again to check the cut.
      kind: ``"nnx"`` or ``"linen"``.
      module: the traced Linen module (``None`` for NNX), applied again to check the cut.
    """

    groups: tuple[Group, ...]
    frozen: tuple[Frozen, ...]
    paths: tuple[Path, ...]
    shapes: tuple[tuple[int, ...], ...]
    example: Any
    kind: str
    module: Any = None

    def report(self) -> str:
        """A readable summary: each group with its size, then each frozen axis and why."""
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

_UNARY = frozenset(
    "neg exp exp2 log log1p expm1 tanh logistic sin cos tan abs sign sqrt rsqrt cbrt "
    "integer_pow square erf erfc erf_inv floor ceil round is_finite not convert_element_type "
    "reduce_precision stop_gradient copy copy_p real imag conj".split()
)
_NARY = frozenset(
    "add sub mul div max min pow atan2 rem nextafter and or xor eq ne lt le gt ge "
    "select_n clamp add_any".split()
)
_REDUCE = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split()
)
_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}
_WINDOW = frozenset("reduce_window_sum reduce_window_max reduce_window_min".split())


class _Trace:
    def __init__(self) -> None:
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


def _is_literal(v: Any) -> bool:
    return isinstance(v, jax.extend.core.Literal)


def _run(t: _Trace, jaxpr: Any, env: dict) -> None:
    def get(v: Any) -> tuple[int, ...] | None:
        if _is_literal(v):
            return None
        if v not in env:
            env[v] = t.new_slots(_shape(v))
        return env[v]

    for eqn in jaxpr.eqns:
        _eqn(t, eqn, get, env)


def _sub_jaxpr(p: Any) -> tuple[Any, list]:
    if hasattr(p, "jaxpr") and hasattr(p, "consts"):  # ClosedJaxpr
        return p.jaxpr, list(p.consts)
    return p, []


def _eqn(t: _Trace, eqn: Any, get: Callable, env: dict) -> None:
    name = eqn.primitive.name
    ins = [get(v) for v in eqn.invars]
    outs = [get(v) for v in eqn.outvars]
    prm = eqn.params

    def freeze_all(reason: str) -> None:
        for s in ins + outs:
            for slot in s or ():
                t.freeze(slot, reason)

    if name in _CALLS and _CALLS[name] in prm:
        inner, _ = _sub_jaxpr(prm[_CALLS[name]])
        if len(inner.invars) != len(eqn.invars) or len(inner.outvars) != len(eqn.outvars):
            freeze_all(f"primitive {name}: its body's arguments do not line up")
            return
        sub: dict = {}
        for v in inner.constvars:
            sub[v] = t.new_slots(_shape(v))
            for slot in sub[v]:
                t.freeze(slot, "a constant array closed over by the model")
        for iv, ov, s in zip(inner.invars, eqn.invars, ins, strict=True):
            sub[iv] = s if s is not None else t.new_slots(_shape(ov))
        _run(t, inner, sub)
        for iv, s in zip(inner.outvars, outs, strict=True):
            if _is_literal(iv):
                continue
            inner_slots = sub.get(iv)
            if inner_slots is None:
                continue
            for a, b in zip(inner_slots, s, strict=True):
                t.link(a, b, name)
        return

    for leaf in {t.leaf_of[s] for s in ins if s and s in t.leaf_of}:
        t.uses[leaf] = t.uses.get(leaf, 0) + 1

    if name in _UNARY or name in _NARY:
        out = outs[0]
        for v, s in zip(eqn.invars, ins, strict=True):
            if s is None or len(s) == 0:
                continue
            src, dst = _shape(v), _shape(eqn.outvars[0])
            if len(src) != len(dst) or any(p not in (1, q) for p, q in zip(src, dst, strict=True)):
                freeze_all(f"primitive {name} with operands of different shapes")
                return
            # a size-1 axis is broadcast: it holds no channel of the output
            for a, b, p, q in zip(s, out, src, dst, strict=True):
                if p == q:
                    t.link(a, b, name)
        return

    if name == "broadcast_in_dim":
        (s,), (out,) = ins[:1], outs
        if s is None:
            return
        src = _shape(eqn.invars[0])
        for i, d in enumerate(prm["broadcast_dimensions"]):
            if src[i] == _shape(eqn.outvars[0])[d]:
                t.link(s[i], out[d], name)
        return

    if name == "transpose":
        (s,), (out,) = ins[:1], outs
        for i, p in enumerate(prm["permutation"]):
            t.link(s[p], out[i], name)
        return

    if name == "squeeze":
        (s,), (out,) = ins, outs
        dims = {d % len(s) for d in prm["dimensions"]}
        for a, b in zip([x for i, x in enumerate(s) if i not in dims], out, strict=True):
            t.link(a, b, name)
        return

    if name == "reshape":
        if prm.get("dimensions") is not None:
            freeze_all("reshape with a dimension permutation")
            return
        _reshape(t, ins[0], outs[0], _shape(eqn.invars[0]), _shape(eqn.outvars[0]))
        return

    if name in _REDUCE:
        s, out = ins[0], outs[0]
        axes = {a % max(len(s), 1) for a in prm["axes"]}
        kept = [x for i, x in enumerate(s) if i not in axes]
        for a, b in zip(kept, out, strict=True):
            t.link(a, b, name)
        for i in axes:
            t.freeze(s[i], f"reduced by {name} (a mean, max or norm over it changes with a cut)")
        return

    if name == "dot_general":
        (lc, rc), (lb, rb) = prm["dimension_numbers"]
        ls, rs = ins
        out = outs[0]
        if ls is None or rs is None:
            freeze_all("dot_general with a literal operand")
            return
        for a, b in zip(lc, rc, strict=True):
            t.link(ls[a], rs[b], name)
        k = 0
        for a, b in zip(lb, rb, strict=True):
            t.link(ls[a], rs[b], name)
            t.link(ls[a], out[k], name)
            k += 1
        for i in range(len(ls)):
            if i not in lc and i not in lb:
                t.link(ls[i], out[k], name)
                k += 1
        for i in range(len(rs)):
            if i not in rc and i not in rb:
                t.link(rs[i], out[k], name)
                k += 1
        return

    if name == "conv_general_dilated":
        dn = prm["dimension_numbers"]
        ls, rs = ins
        out = outs[0]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        t.link(ls[lhs_spec[0]], out[out_spec[0]], name)
        groups = prm["feature_group_count"] * prm["batch_group_count"]
        if groups == 1:
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
        return

    if name == "concatenate":
        out = outs[0]
        d = prm["dimension"]
        start_out = t.slots[out[d]][0]
        offset = 0
        for s in ins:
            if s is None:
                freeze_all("concatenate with a literal operand")
                return
            for i, (a, b) in enumerate(zip(s, out, strict=True)):
                if i != d:
                    t.link(a, b, name)
            sa, na = t.slots[s[d]]
            for k in range(na):
                t.union(sa + k, start_out + offset + k)
            offset += na
        return

    if name in _WINDOW:
        s, out = ins[0], outs[0]
        for i in range(len(s)):
            plain = (
                prm["window_dimensions"][i] == 1
                and prm["window_strides"][i] == 1
                and tuple(prm["padding"][i]) == (0, 0)
                and prm["base_dilation"][i] == 1
                and prm["window_dilation"][i] == 1
            )
            if plain:
                t.link(s[i], out[i], name)
            else:
                t.freeze(s[i], "a pooling window axis")
                t.freeze(out[i], "a pooling window axis")
        return

    if name in ("slice", "pad", "rev"):
        s, out = ins[0], outs[0]
        src = _shape(eqn.invars[0])
        for i in range(len(s)):
            if name == "slice":
                st = prm["strides"]
                same = (
                    prm["start_indices"][i] == 0
                    and prm["limit_indices"][i] == src[i]
                    and (st is None or st[i] == 1)
                )
            elif name == "pad":
                same = tuple(prm["padding_config"][i]) == (0, 0, 0)
            else:
                same = i not in prm["dimensions"]
            if same:
                t.link(s[i], out[i], name)
            else:
                t.freeze(s[i], f"{name} along this axis (fixed indices)")
                t.freeze(out[i], f"{name} along this axis (fixed indices)")
        for extra in ins[1:]:
            for slot in extra or ():
                t.freeze(slot, f"{name} padding value")
        return

    if name == "iota":
        freeze_all("iota (values depend on the position along the axis)")
        return

    freeze_all(f"primitive {name} is not understood")


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
    """Per leaf: the set of axes the cut may change, or a reason string (all kept whole)."""
    from flax import nnx

    modules = {tuple(p): m for p, m in nnx.iter_modules(model)}
    out: list[Any] = []
    for path, shape in zip(paths, shapes, strict=True):
        mod_path, leaf = path[:-1], path[-1]
        mod = modules.get(mod_path)
        parent = modules.get(mod_path[:-1]) if mod_path else None
        nd = len(shape)
        if isinstance(parent, nnx.MultiHeadAttention) and isinstance(mod, nnx.LinearGeneral):
            role = mod_path[-1]
            if role in ("query", "key", "value"):
                out.append({0, 1} if leaf == "kernel" else {0})
            elif role == "out":
                out.append({0, nd - 1} if leaf == "kernel" else {0})
            else:
                out.append(f"{type(mod).__name__} inside attention at {_pstr(mod_path)}")
            continue
        if isinstance(parent, nnx.MultiHeadAttention) and isinstance(mod, nnx.Module):
            out.append("a norm over attention's head_dim, which is kept whole")
            continue
        if isinstance(mod, nnx.Linear):
            out.append({0, 1} if leaf == "kernel" else {0})
        elif isinstance(mod, nnx.Conv) and not isinstance(mod, nnx.ConvTranspose):
            if mod.feature_group_count != 1:
                out.append(
                    f"grouped convolution (feature_group_count={mod.feature_group_count}): "
                    "grouped and depthwise convs are kept whole"
                )
            else:
                out.append({nd - 2, nd - 1} if leaf == "kernel" else {0})
        elif isinstance(mod, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm) and nd == 1:
            out.append({0})
        elif isinstance(mod, nnx.LinearGeneral):
            out.append(set(range(nd)))
        elif isinstance(mod, nnx.Embed):
            out.append({1} if leaf == "embedding" else set())
        else:
            kind = type(mod).__name__ if mod is not None else "no module"
            out.append(f"{kind} at {_pstr(mod_path)} is not a module the cut knows how to resize")
    return out


_LINEN_1D = ("bias", "scale", "mean", "var")


_LINEN_QKV = frozenset({"query", "key", "value"})  # MultiHeadDotProductAttention's children


def _linen_allowed(paths: Sequence[Path], shapes: Sequence[tuple]) -> list[Any]:
    out: list[Any] = []
    for path, shape in zip(paths, shapes, strict=True):
        leaf, nd = path[-1], len(shape)
        parent = path[-2] if len(path) >= 2 else None
        if leaf == "kernel" and nd == 3 and parent in _LINEN_QKV:
            # (in, heads, head_dim): head_dim stays whole (attention scales by
            # 1/sqrt(head_dim)), and the heads follow the out projection, which Linen cannot
            # resize along them either.
            out.append({1})
        elif leaf == "kernel" and nd == 3 and parent == "out":
            out.append({2})  # (heads, head_dim, features): only the output features
        elif leaf == "kernel" and nd >= 2:
            out.append({nd - 2, nd - 1})
        elif leaf in _LINEN_1D and nd == 1:
            out.append({0})
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


def dependency_graph(model: Any, example: Any, *, variables: Any = None) -> DepGraph:
    """Trace ``model`` on ``example`` and group the parameter indices that are cut together.

    Args:
      model: an ``nnx.Module`` (called as ``model(example)``), or a Linen module (called as
        ``model.apply(variables, example)``). An NNX model is traced, and its cut checked,
        in evaluation mode on a copy (``eval()``: Dropout off, BatchNorm on its running
        statistics; the channel structure is the same in both modes, and ``model`` keeps
        its mode). A Linen module is applied as given: make it deterministic (e.g. a
        ``train=False`` attribute) before tracing.
      example: one example input batch (a small one suffices: its values are used only to
        check the cut).
      variables: the Linen variables (``{'params': ..., 'batch_stats': ...}``); Linen only.

    Returns:
      A :class:`DepGraph`: the prunable groups, and the frozen parameter axes with reasons.

    Raises:
      TypeError: if ``model`` is neither an NNX module nor a Linen module with ``variables``.
      ValueError: if the forward cannot be traced (Python control flow on array values).

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
    if _is_nnx(model):
        from flax import nnx

        graphdef, state = nnx.split(model)
        flat, treedef = jax.tree_util.tree_flatten_with_path(state)

        def forward(leaves: list, x: Any) -> Any:
            return _eval_copy(graphdef, jax.tree.unflatten(treedef, leaves))(x)

        kind = "nnx"
    elif variables is not None and hasattr(model, "apply"):
        flat, treedef = jax.tree_util.tree_flatten_with_path(variables)

        def forward(leaves: list, x: Any) -> Any:
            return model.apply(jax.tree.unflatten(treedef, leaves), x)

        kind = "linen"
    else:
        raise TypeError(
            "model must be an nnx.Module, or a Linen module with variables= (its "
            f"{{'params': ...}} dict); got {type(model).__name__} with variables="
            f"{'None' if variables is None else type(variables).__name__}."
        )
    paths = tuple(_path_tuple(p) for p, _ in flat)
    leaves = [leaf for _, leaf in flat]
    shapes = tuple(tuple(int(d) for d in jnp.shape(leaf)) for leaf in leaves)
    try:
        closed = jax.make_jaxpr(forward)(leaves, example)
    except jax.errors.JAXTypeError as e:
        raise ValueError(
            f"the model's forward cannot be traced with jax.make_jaxpr ({type(e).__name__}): "
            "Python control flow on array values (if/while on a traced value, int(x), "
            "np.asarray(x)) has no graph to follow. Use jax.lax.cond/where or make the "
            "choice static, then trace again."
        ) from e
    jaxpr = closed.jaxpr

    t = _Trace()
    env: dict = {}
    leaf_slots = []
    for v in jaxpr.invars[: len(leaves)]:
        env[v] = t.new_slots(_shape(v))
        leaf_slots.append(env[v])
        t.param_slots.update(env[v])
        t.leaf_of[env[v]] = len(leaf_slots) - 1
    for v in jaxpr.invars[len(leaves) :]:
        env[v] = t.new_slots(_shape(v))
        for slot in env[v]:
            t.freeze(slot, "model input")
    for v in jaxpr.constvars:
        env[v] = t.new_slots(_shape(v))
        for slot in env[v]:
            t.freeze(slot, "a constant array closed over by the model")
    _run(t, jaxpr, env)
    for v in jaxpr.outvars:
        if not _is_literal(v) and v in env:
            for slot in env[v]:
                t.freeze(slot, "model output")

    allowed = _nnx_allowed(model, paths, shapes) if kind == "nnx" else _linen_allowed(paths, shapes)
    for i, slots in enumerate(leaf_slots):
        for a, slot in enumerate(slots):
            rule = allowed[i]
            if isinstance(rule, str):
                t.freeze(slot, rule)
            elif a not in rule:
                why = "head_dim (attention scales by 1/sqrt(head_dim))"
                t.freeze(slot, why if kind == "nnx" else "an axis the module cannot resize")
    _resolve_composites(t)
    graph = _collect(t, leaf_slots, paths, shapes, example, kind)
    return graph._replace(module=None if kind == "nnx" else model)


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
                    in_frozen.setdefault(r, f"{_pstr(paths[i])}[{a}]")
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
                why = f"tied to {in_frozen[r]}, which is kept whole (see there)"
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
    return DepGraph(tuple(groups), tuple(frozen_axes), paths, shapes, example, kind)


# --------------------------------------------------------------------------------------------
# Scores and masks over units


def _match_leaves(graph: DepGraph, tree: Any, name: str) -> dict[int, np.ndarray]:
    """Leaves of ``tree`` keyed by the number of the traced leaf with the same path.

    ``tree`` may be the whole traced state or a part of it (``nnx.state(model, nnx.Param)``,
    Linen's ``variables['params']``); leaves it lacks simply score zero.
    """
    where = {p: i for i, p in enumerate(graph.paths)}
    out: dict[int, np.ndarray] = {}
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
        out[i] = np.asarray(leaf, np.float64)
    return out


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
      criterion: a name from :data:`fisher_optax.scores.CRITERIA` or a callable
        ``criterion(params, fisher) -> scores``.
      fisher: the Fisher diagonal of ``params`` (needed by ``"fisher"`` and ``"saliency"``).
      key: a PRNG key (``"random"`` only).

    Returns:
      One float64 array per group of :attr:`DepGraph.groups`, of length ``group.size``.

    Raises:
      ValueError: if ``params`` does not line up with the traced model, or as
        :func:`fisher_optax.scores.scores` does (bad Fisher, non-finite weights).
    """
    from fisher_optax.scores import scores as per_weight_scores

    per_weight = per_weight_scores(params, criterion, fisher=fisher, key=key)
    leaves = _match_leaves(graph, per_weight, "params")
    sums: dict[tuple[int, ...], np.ndarray] = {}

    def marginal(i: int, *axes: int) -> np.ndarray:  # leaf i summed over all other axes
        if (i, *axes) not in sums:
            x = leaves[i]
            kept = np.sum(x, axis=tuple(d for d in range(x.ndim) if d not in axes))
            sums[i, *axes] = kept if list(axes) == sorted(axes) else kept.T
        return sums[i, *axes]

    out = []
    for g in graph.groups:
        s = np.zeros(g.size)
        for u, unit in enumerate(g.units):
            by_leaf: dict[int, list] = {}
            for (i, a), ix in unit.items():
                if i in leaves:
                    by_leaf.setdefault(i, []).append((a, ix))
            for i, cuts in by_leaf.items():
                s[u] += sum(marginal(i, a)[ix].sum() for a, ix in cuts)
                if len(cuts) == 2:  # the entries in both slices were counted twice
                    (a, ia), (b, ib) = cuts
                    s[u] -= marginal(i, a, b)[np.ix_(ia, ib)].sum()
                elif len(cuts) > 2:  # rare: count the union of the slices directly
                    gone = np.zeros(leaves[i].shape, bool)
                    for a, ix in cuts:
                        gone[(slice(None),) * a + (ix,)] = True
                    s[u] += leaves[i][gone].sum() - sum(marginal(i, a)[ix].sum() for a, ix in cuts)
        out.append(s)
    return tuple(out)


def group_mask(
    graph: DepGraph,
    scores: Sequence[np.ndarray],
    sparsity: float,
    *,
    scope: Literal["global", "group"] = "global",
    min_units: int = 1,
) -> tuple[np.ndarray, ...]:
    """Which units to keep: the lowest-scoring ``sparsity`` fraction is removed, exactly.

    Args:
      graph: from :func:`dependency_graph`.
      scores: from :func:`group_scores` (one array per group).
      sparsity: the fraction of the prunable units to remove, in ``[0, 1]``;
        ``round(sparsity * n)`` units go (ties broken by position).
      scope: ``"global"`` ranks all units together (``n`` = all units); ``"group"`` removes
        ``round(sparsity * size)`` from each group.
      min_units: each group keeps at least this many units (``>= 1``).

    Returns:
      One boolean array per group, ``True`` keeping a unit.

    Raises:
      ValueError: on a bad ``sparsity``, ``scope`` or ``min_units``, or scores that do not
        line up with the groups.
    """
    sparsity = _validate.fraction(sparsity, "sparsity", meaning="the fraction of units to remove")
    scope = _validate.choice(scope, "scope", GROUP_SCOPES)
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
                f"scores for group {g.name} has shape {s.shape}, expected ({g.size},)."
            )
        if not np.isfinite(s).all():
            raise ValueError(f"scores for group {g.name} holds non-finite values.")
    keep = [np.ones(g.size, bool) for g in graph.groups]
    if scope == "group":
        for k, (g, s) in enumerate(zip(graph.groups, scores, strict=True)):
            n = min(round(sparsity * g.size), max(g.size - min_units, 0))
            keep[k][np.argsort(s, kind="stable")[:n]] = False
        return tuple(keep)
    total = sum(g.size for g in graph.groups)
    n = round(sparsity * total)
    flat = np.concatenate(scores) if scores else np.zeros(0)
    owner = np.concatenate([np.full(g.size, k) for k, g in enumerate(graph.groups)] or [[]])
    offset = np.cumsum([0] + [g.size for g in graph.groups])
    left = [g.size for g in graph.groups]
    removed = 0
    for j in np.argsort(flat, kind="stable"):
        if removed == n:
            break
        k = int(owner[j])
        if left[k] > min_units:
            keep[k][j - offset[k]] = False
            left[k] -= 1
            removed += 1
    return tuple(keep)


# --------------------------------------------------------------------------------------------
# The cut


def cut_index(graph: DepGraph, keep: Sequence[np.ndarray]) -> dict[Path, tuple]:
    """The entries kept, per traced leaf path: one index array per axis (``None`` = whole).

    The format of :func:`fisher_optax.slice_opt_state`'s ``index``.
    """
    if len(keep) != len(graph.groups):
        raise ValueError(
            f"keep has {len(keep)} arrays but the graph has {len(graph.groups)} groups; pass "
            "group_mask(graph, ...)."
        )
    drop: dict[tuple[int, int], set] = {}
    for g, k in zip(graph.groups, keep, strict=True):
        k = np.asarray(k)
        if k.dtype != np.bool_ or k.shape != (g.size,):
            raise ValueError(
                f"keep for group {g.name} must be a bool array of shape ({g.size},), got "
                f"{k.dtype} {k.shape}."
            )
        for u in np.flatnonzero(~k):
            for ax, ix in g.units[u].items():
                drop.setdefault(ax, set()).update(int(x) for x in ix)
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
    return jnp.asarray(x, dtype)


def _eval_copy(graphdef: Any, state: Any) -> Any:
    """The NNX model in evaluation mode (Dropout off, BatchNorm on its running statistics).

    The channel structure is the same in both modes, but a training-mode forward draws
    random bits (which the trace cannot follow) and cannot be compared between two models.
    """
    from flax import nnx

    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def _apply(model: Any, x: Any) -> Any:
    """``model(x)`` in evaluation mode under one ``jit`` (eager NNX dispatch compiles every op
    separately); ``model`` itself is not changed."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: _eval_copy(graphdef, s)(x))(state, x)


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


def _checked_index(graph: DepGraph, tree: Any, keep: Sequence[np.ndarray], name: str) -> dict:
    """:func:`cut_index`, once ``tree`` is checked to hold the traced leaves."""
    _check_tree(graph, tree, name)
    return cut_index(graph, keep)


def _zeroed(graph: DepGraph, tree: Any, index: dict) -> Any:
    """``tree`` with every entry that ``index`` drops set to zero (the masked model)."""
    removed = {p: _removed(graph, p, ix) for p, ix in index.items()}
    return _map_state(graph, tree, removed, _zero_removed)


def masked(model: Any, graph: DepGraph, keep: Sequence[np.ndarray]) -> Any:
    """A copy of the NNX ``model`` with every entry of every removed unit set to zero.

    What the cut model must compute (checked by :func:`cut`). ``model`` is not changed.
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _zeroed(graph, state, _checked_index(graph, state, keep, "model")))


def _removed(graph: DepGraph, path: Path, ix: tuple) -> tuple:
    shape = graph.shapes[graph.paths.index(path)]
    return tuple(
        None if k is None else np.setdiff1d(np.arange(shape[a]), k) for a, k in enumerate(ix)
    )


def _zero_removed(x: Any, removed: tuple | None) -> Any:
    """Zero every entry lying in a removed index of some axis."""
    if removed is None:
        return x
    x = np.array(x)
    for a, k in enumerate(removed):
        if k is not None and len(k):
            sl = [slice(None)] * x.ndim
            sl[a] = k
            x[tuple(sl)] = 0
    return jnp.asarray(x)


def _verify(new_out: Any, ref_out: Any, rtol: float, atol: float, graph: Any, keep: Any) -> None:
    ref = jax.tree_util.tree_flatten_with_path(ref_out)[0]
    new = jax.tree.leaves(new_out)
    for (path, r), n in zip(ref, new, strict=True):
        r, n = np.asarray(r), np.asarray(n)
        if r.shape != n.shape:
            raise ValueError(
                f"the cut model's output {keystr(path)} has shape {n.shape}, the masked "
                f"model's {r.shape}: the cut is wrong (please report the model)."
            )
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


def _cut_groups(graph: DepGraph, keep: Sequence[np.ndarray]) -> list[str]:
    return [
        f"{k} ({g.name})"
        for k, (g, kp) in enumerate(zip(graph.groups, keep, strict=True))
        if not np.all(kp)
    ]


def cut(
    model: Any,
    graph: DepGraph,
    keep: Sequence[np.ndarray],
    *,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Any:
    """A new, smaller NNX model of the same type without the removed units.

    Every variable is sliced (kernels, biases, BatchNorm ``mean``/``var``/``scale``/``bias``,
    LayerNorm scales, attention projections) and every module's shape attributes are
    updated (``in_features``, ``out_features``, ``kernel_shape``, ``num_features``,
    ``num_heads``, ``qkv_features``, ...). ``model`` is not changed.

    Args:
      model: the NNX model the graph was traced from.
      graph: from :func:`dependency_graph`.
      keep: from :func:`group_mask`.
      verify: check that the new model computes what :func:`masked` computes on the
        graph's example input.
      rtol: relative tolerance of the check.
      atol: absolute tolerance of the check, scaled by ``max(1, max |masked output|)``.

    Returns:
      The new model.

    Raises:
      ValueError: if the check fails, naming the first output that differs; if ``keep``
        does not line up with the graph; if ``model`` is not the traced model.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from flax import nnx
      >>> from fisher_optax import depgraph
      >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> graph = depgraph.dependency_graph(model, jnp.ones((1, 3)))
      >>> keep = (np.arange(8) < 5,)
      >>> small = depgraph.cut(model, graph, keep)
      >>> small.layers[0].out_features, small.layers[2].kernel.shape
      (5, (5, 2))
    """
    from flax import nnx

    if graph.kind != "nnx":
        raise ValueError("this graph was traced from a Linen module; use cut_linen.")
    graphdef, state = nnx.split(model)
    index = _checked_index(graph, state, keep, "model")
    new = nnx.merge(graphdef, _map_state(graph, state, index, _take))
    _resize_nnx(new)
    if verify:
        ref = _apply(nnx.merge(graphdef, _zeroed(graph, state, index)), graph.example)
        _verify(_apply(new, graph.example), ref, rtol, atol, graph, keep)
    return new


def cut_optimizer(
    optimizer: Any, model: Any, new_model: Any, graph: DepGraph, keep: Sequence[np.ndarray]
) -> Any:
    """An ``nnx.Optimizer`` for ``new_model`` whose state is ``optimizer``'s, sliced.

    Adam's moments, :func:`fisher_optax.pruned` masks and any per-parameter state are cut
    with the same indices as the model (:func:`fisher_optax.slice_opt_state`); ``count``
    and the step carry over.
    """
    from flax import nnx

    from fisher_optax.structured import slice_opt_state

    params = nnx.state(model, optimizer.wrt)
    wrt = {_path_tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    index = {p: ix for p, ix in cut_index(graph, keep).items() if p in wrt}
    state = slice_opt_state(optimizer.opt_state, params, index)
    new_opt = nnx.Optimizer(new_model, optimizer.tx, wrt=optimizer.wrt)
    new_opt.opt_state = nnx.data(state)
    new_opt.step.set_value(optimizer.step.get_value())
    return new_opt


class LinenCut(NamedTuple):
    """The result of :func:`cut_linen`.

    Attributes:
      variables: the sliced variables (same collections as given).
      features: for each module path with a kernel, its new output width
        (``kernel.shape[-1]``): build the smaller Linen model with these ``features``.
      index: the kept entries per variable path (one index array per axis, ``None`` =
        whole).
      params_index: ``index`` restricted to the ``'params'`` collection, paths relative to it
        (what :func:`fisher_optax.slice_opt_state` takes with ``variables['params']``).
      opt_state: the optax state sliced to the new params (``None`` if none was given).
    """

    variables: Any
    features: dict[Path, int]
    index: dict[Path, tuple]
    params_index: dict[Path, tuple]
    opt_state: Any = None


def cut_linen(
    variables: Any,
    graph: DepGraph,
    keep: Sequence[np.ndarray],
    *,
    module: Any = None,
    opt_state: Any = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> LinenCut:
    """Slice Linen variables (and an optax state), and report the new ``features``.

    Args:
      variables: the variables the graph was traced with.
      graph: from :func:`dependency_graph` on a Linen module.
      keep: from :func:`group_mask`.
      module: the smaller Linen module, built by you from :attr:`LinenCut.features`. When
        given, ``module.apply(new variables, example)`` is checked against the traced
        module applied to the masked variables (removed entries zeroed).
      opt_state: an optax state for ``variables['params']`` (Adam's moments,
        :func:`fisher_optax.pruned` masks, ...), sliced like the params
        (:func:`fisher_optax.slice_opt_state`).
      rtol: relative tolerance of the check.
      atol: absolute tolerance of the check, scaled by ``max(1, max |masked output|)``.

    Returns:
      A :class:`LinenCut`.

    Raises:
      ValueError: if the check fails, naming the first output that differs; if ``keep``
        does not line up with the graph; if ``variables`` are not the traced ones.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
      >>> from fisher_optax import depgraph
      >>> class MLP(nn.Module):
      ...     hidden: int = 8
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(2)(nn.relu(nn.Dense(self.hidden)(x)))
      >>> x = jnp.ones((1, 3))
      >>> variables = MLP().init(jax.random.key(0), x)
      >>> graph = depgraph.dependency_graph(MLP(), x, variables=variables)
      >>> result = depgraph.cut_linen(variables, graph, (np.arange(8) < 5,))
      >>> result.features  # Linen numbers modules as built: the outer Dense(2) is Dense_0
      {('Dense_0',): 2, ('Dense_1',): 5}
      >>> _ = depgraph.cut_linen(variables, graph, (np.arange(8) < 5,), module=MLP(5))
    """
    if graph.kind != "linen":
        raise ValueError("this graph was traced from an NNX module; use cut.")
    index = _checked_index(graph, variables, keep, "variables")
    new = _map_state(graph, variables, index, _take)
    features: dict[Path, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
        p = _path_tuple(path)
        if p and p[-1] == "kernel":
            features[p[1:-1] if p[0] == "params" else p[:-1]] = int(jnp.shape(leaf)[-1])
    if module is not None:
        ref = jax.jit(graph.module.apply)(_zeroed(graph, variables, index), graph.example)
        try:
            out = jax.jit(module.apply)(new, graph.example)
        except Exception as e:  # flax names the layer whose shape does not fit
            raise ValueError(
                f"module cannot be applied to the cut variables ({type(e).__name__}: "
                f"{str(e).splitlines()[0]}); build it with the new widths of "
                f"LinenCut.features: {dict(features)}"
            ) from e
        _verify(out, ref, rtol, atol, graph, keep)
    params_index = {p[1:]: ix for p, ix in index.items() if p and p[0] == "params"}
    if opt_state is not None:
        from fisher_optax.structured import slice_opt_state

        opt_state = slice_opt_state(opt_state, variables["params"], params_index)
    return LinenCut(new, features, index, params_index, opt_state)
