"""`J v` of a map whatever autodiff modes it allows.

`jax.linearize` needs forward mode, which a function calling a `jax.custom_vjp` (the
`banax.nn` convolutions) does not have; JAX refuses it only when the derivative is
lowered, so whether forward mode applies is read off the function's jaxpr. Without it,
`v ↦ J v` is the transpose of the pullback `u ↦ Jᵀ u`: the same linear map, from
reverse mode.
"""

from collections.abc import Callable
from typing import Any

import jax
from jaxtyping import Array


def calls_custom_vjp(jaxpr: Any) -> bool:
    """Whether `jaxpr` calls a `jax.custom_vjp`, at its top level or in any jaxpr
    nested in it (under `jax.jit`, `jax.lax.scan`, `jax.lax.cond`, ...).

    A function that calls a `jax.custom_vjp` (the `banax.nn` convolutions do) has no
    forward mode: `jax.jvp` and `jax.linearize` of it fail, but only when the derivative
    is lowered, too late to choose another route. Read its jaxpr first and take
    `v ↦ J v` as the transpose of the pullback `u ↦ Jᵀ u` (`jax.linear_transpose` of
    `jax.vjp`) when this is `True`:

        calls_custom_vjp(jax.make_jaxpr(f)(z).jaxpr)

    **Arguments:** `jaxpr`, a `jax.extend.core.Jaxpr` or a `ClosedJaxpr`.

    **Returns:** `True` if any equation is a custom-VJP call, else `False`.
    """
    for eqn in jaxpr.eqns:
        if "custom_vjp" in eqn.primitive.name:
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and calls_custom_vjp(inner):
                    return True
    return False


def jvp_at(f: Callable[[Array], Array], z: Array) -> Callable[[Array], Array]:
    """`v ↦ ∂f(z) v`: forward mode where `f` allows it, else a transposed VJP."""
    if not calls_custom_vjp(jax.make_jaxpr(f)(z).jaxpr):
        return jax.linearize(f, z)[1]

    def vjp(u: Array) -> Array:
        # Made inside the transposition, the pullback is transposed through the
        # custom_vjp rule; one made outside would be asked for a derivative of the rule.
        return jax.vjp(f, z)[1](u)[0]

    transposed = jax.linear_transpose(vjp, z)
    return lambda v: transposed(v)[0]
