"""Where the batch axis goes inside a cell: a trace-time reading of its jaxpr.

Each value of the jaxpr gets the position of its batch axis (`None` for values that do
not depend on the samples, such as weights), following the few primitives whose effect
on an axis is plain: elementwise ops, broadcasts, transposes, reshapes that keep the
axis, reductions, matrix products and convolutions. A reduction, a contraction or a
convolution that runs over the batch axis makes samples influence each other: that is
reported, with the primitive that did it. Any other primitive ends the reading without
a verdict, so a cell is never accused on a guess.
"""

import math
from typing import Any

from jax.extend import core

# Elementwise primitives: the batch axis keeps its position.
_ELEMENTWISE = frozenset("""
abs acos acosh add asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type cos
cosh div erf erf_inv erfc exp exp2 expm1 floor imag integer_pow is_finite log log1p
logistic max min mul ne eq ge gt le lt and or not xor neg nextafter pow real rem round
rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh copy copy_p
reduce_precision
""".split())
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin"
    .split())


class Mixing(Exception):
    """A primitive that makes samples influence each other."""


class _NoVerdict(Exception):
    """A primitive this reading does not follow."""


def mixing_primitive(closed: Any, axis: int) -> str | None:
    """The description of the first primitive in `closed` (a `ClosedJaxpr` whose
    inputs all carry the batch on `axis`) that mixes samples into an output, or
    `None` when none does or the reading cannot tell."""
    try:
        _flow(closed.jaxpr, [axis] * len(closed.jaxpr.invars))
    except Mixing as mixing:
        return str(mixing)
    except Exception:  # noqa: BLE001 - _NoVerdict, or parameters of an unknown form
        return None
    return None


def _flow(jaxpr: Any, in_axes: list[int | None]) -> list[int | None]:
    axes: dict[Any, int | None] = {}
    for var, a in zip(jaxpr.invars, in_axes):
        axes[var] = a

    def read(v: Any) -> int | None:
        return None if isinstance(v, core.Literal) else axes.get(v)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if all(a is None for a in ins):
            outs = [None] * len(eqn.outvars)
        else:
            outs = _rule(eqn, ins)
        for var, a in zip(eqn.outvars, outs):
            axes[var] = a
    return [read(v) for v in jaxpr.outvars]


_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "remat", "checkpoint")


def _rule(eqn: Any, ins: list[int | None]) -> list[int | None]:
    name = eqn.primitive.name
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    positions = {a for a in ins if a is not None}
    if name in _ELEMENTWISE:
        if len(positions) > 1:
            raise Mixing(f"{name} combines different samples")
        return [positions.pop()] * len(eqn.outvars)
    if name in _CALLS:
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        inner = getattr(inner, "jaxpr", inner)
        if inner is None or len(inner.invars) != len(ins):
            raise _NoVerdict
        return _flow(inner, ins)
    if name == "dot_general":
        return [_dot(eqn, ins, shapes)]
    batched = [(a, s) for a, s in zip(ins, shapes) if a is not None]
    if len(batched) != 1:
        raise _NoVerdict
    ((a, shape),) = batched
    if name == "broadcast_in_dim":
        return [eqn.params["broadcast_dimensions"][a]]
    if name == "transpose":
        return [list(eqn.params["permutation"]).index(a)]
    if name == "squeeze":
        dims = eqn.params["dimensions"]
        if a in dims:
            raise _NoVerdict
        return [a - sum(d < a for d in dims)]
    if name == "reshape":
        new = eqn.params["new_sizes"]
        before = math.prod(shape[:a])
        for q in range(len(new)):
            if math.prod(new[:q]) == before and new[q] == shape[a]:
                return [q]
        raise _NoVerdict
    if name in _REDUCTIONS:
        reduced = eqn.params["axes"]
        if a in reduced:
            raise Mixing(f"{name} reduces over the batch axis")
        return [a - sum(d < a for d in reduced)] * len(eqn.outvars)
    if name == "conv_general_dilated" and ins[0] is not None:
        spec = eqn.params["dimension_numbers"]
        if a != spec.lhs_spec[0]:
            role = "feature" if a == spec.lhs_spec[1] else "spatial"
            raise Mixing(f"a convolution reads the batch axis as a {role} axis")
        return [spec.out_spec[0]]
    raise _NoVerdict


def _dot(eqn: Any, ins: list[int | None], shapes: list[tuple[int, ...]]) -> int:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    la, ra = ins
    if la is not None and ra is not None:
        if la in lb and ra in rb and lb.index(la) == rb.index(ra):
            return lb.index(la)
        raise Mixing("a matrix product combines different samples")
    side, contract, batch = (0, lc, lb) if la is not None else (1, rc, rb)
    a = la if la is not None else ra
    assert a is not None  # called for an equation with a batched operand
    if a in contract:
        raise Mixing("a matrix product contracts the batch axis")
    if a in batch:
        return batch.index(a)
    free = [d for d in range(len(shapes[side])) if d not in contract and d not in batch]
    offset = len(lb)
    if side == 1:
        offset += len(shapes[0]) - len(lc) - len(lb)
    return offset + free.index(a)
