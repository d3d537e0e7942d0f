"""The backward linear system in at least float32, shared by the adjoints that iterate
on it (Implicit, NeumannPhantom)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def widened(
    vjp: Callable[[jax.Array], jax.Array], g: jax.Array
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """`(vjp, g)` working in at least float32.

    A backward solve accumulates many products; in float16/bfloat16 it would stall far
    from its tolerance. The VJP itself still runs in the state's dtype.
    """
    wide = jnp.promote_types(g.dtype, jnp.float32)
    return (lambda v: vjp(v.astype(g.dtype)).astype(wide)), g.astype(wide)
