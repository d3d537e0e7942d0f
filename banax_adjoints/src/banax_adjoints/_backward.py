"""The backward linear system in at least float32, shared by the adjoints that iterate
on it (Implicit, NeumannPhantom)."""

from collections.abc import Callable

import jax

import banax


def widened(
    vjp: Callable[[jax.Array], jax.Array], g: jax.Array
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """`(vjp, g)` working in `banax.working_dtype(g.dtype)` (at least float32).

    A backward solve accumulates many products; in float16/bfloat16 it would stall far
    from its tolerance. The VJP itself still runs in the state's dtype.
    """
    wide = banax.working_dtype(g.dtype)
    return (lambda v: vjp(v.astype(g.dtype)).astype(wide)), g.astype(wide)
