"""One walker over jaxprs, shared by the interpreters of the package.

:func:`flatten` turns a closed jaxpr into one flat list of equations in which the bodies of
call-like primitives are inlined and every variable is renamed to an int, so that an
interpreter is a loop over :class:`Eqn` with a table of rules per primitive name and never
recurses into sub-jaxprs itself. Which calls are inlined is the caller's choice:

* :data:`PLAIN_CALLS` (``jit``/``pjit``, ``closed_call``, ``core_call``) compute exactly their
  body, values and derivatives alike, so inlining them changes nothing.
* :data:`ALL_CALLS` adds ``custom_jvp_call``, ``custom_vjp_call`` and ``jax.checkpoint``'s
  ``remat2``, whose bodies compute the same values but carry their own differentiation or
  memory rule.
  An interpreter that only follows which index flows where (the dependency graph) inlines
  them; one that differentiates the equations it evaluates must not.
"""

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

from jax.extend import core as jcore

__all__: list[str] = []  # private module; used by fisher_optax.depgraph and ._fast_fisher

# The parameter holding each call-like primitive's body.
_BODY = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}
PLAIN_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
ALL_CALLS = frozenset(_BODY)


class Lit(NamedTuple):
    """A literal operand (a Python scalar or a small constant written into the jaxpr)."""

    value: Any


class Eqn(NamedTuple):
    """One equation of a flattened jaxpr.

    Attributes:
      eqn: the original ``JaxprEqn`` (primitive, params, the avals of its variables).
      ins: the operands, each an int id or a :class:`Lit`.
      outs: the results, int ids.
    """

    eqn: Any
    ins: tuple
    outs: tuple


class Flat(NamedTuple):
    """A closed jaxpr with its calls inlined (from :func:`flatten`).

    Attributes:
      eqns: the equations, in an order that evaluates every operand before its use.
      consts: the values of the closed-over constants, by id (the outer ones and those of
        inlined bodies).
      ins: the ids of the jaxpr's inputs.
      outs: the jaxpr's outputs, each an id or a :class:`Lit`.
    """

    eqns: list[Eqn]
    consts: dict[int, Any]
    ins: list[int]
    outs: list[Any]


def _body(eqn: Any, inline: frozenset) -> tuple[Any, list] | None:
    """The body ``(jaxpr, consts)`` of a call to inline, or ``None`` to keep the equation."""
    name = eqn.primitive.name
    if name not in inline or _BODY.get(name) not in eqn.params:
        return None
    body = eqn.params[_BODY[name]]
    if isinstance(body, jcore.ClosedJaxpr):
        jaxpr, consts = body.jaxpr, list(body.consts)
    elif isinstance(body, jcore.Jaxpr):
        jaxpr, consts = body, []
    else:
        return None
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return None  # a body with extra arguments (a custom rule's residuals): keep the call
    return jaxpr, consts


def flatten(closed: Any, inline: frozenset = PLAIN_CALLS) -> Flat:
    """The equations of a ``ClosedJaxpr`` with the calls named in ``inline`` inlined.

    Args:
      closed: from ``jax.make_jaxpr``.
      inline: the names of the call primitives whose bodies replace them.

    Returns:
      A :class:`Flat`; variables are ints, numbered in order of first definition.
    """
    counter = itertools.count()
    eqns: list[Eqn] = []
    consts: dict[int, Any] = {}

    def walk(jaxpr: Any, const_values: Sequence[Any], in_refs: Sequence[Any]) -> list:
        env: dict[Any, Any] = {}
        for var, value in zip(jaxpr.constvars, const_values, strict=True):
            env[var] = next(counter)
            consts[env[var]] = value
        for var, ref in zip(jaxpr.invars, in_refs, strict=True):
            env[var] = ref

        def ref(atom: Any) -> Any:
            return Lit(atom.val) if isinstance(atom, jcore.Literal) else env[atom]

        for eqn in jaxpr.eqns:
            ins = [ref(a) for a in eqn.invars]
            body = _body(eqn, inline)
            if body is not None:
                outs = walk(*body, ins)
            else:
                outs = [next(counter) for _ in eqn.outvars]
                eqns.append(Eqn(eqn, tuple(ins), tuple(outs)))
            for var, out in zip(eqn.outvars, outs, strict=True):
                env[var] = out
        return [ref(a) for a in jaxpr.outvars]

    ins = [next(counter) for _ in closed.jaxpr.invars]
    outs = walk(closed.jaxpr, closed.consts, ins)
    return Flat(eqns, consts, ins, outs)
