"""The backward linear system in at least float32 (and, for lineax solvers, in real
form), shared by the adjoints that solve it (Implicit, NeumannPhantom)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from banax.extend import working_dtype


def widened(
    vjp: Callable[[jax.Array], jax.Array], g: jax.Array
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """`(vjp, g)` working in `banax.extend.working_dtype(g.dtype)` (at least float32).

    A backward solve accumulates many products; in float16/bfloat16 it would stall far
    from its tolerance. The VJP itself still runs in the state's dtype.
    """
    wide = working_dtype(g.dtype)
    return (lambda v: vjp(v.astype(g.dtype)).astype(wide)), g.astype(wide)


def real_form(
    vjp: Callable[[jax.Array], jax.Array], g: jax.Array
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array, Callable[[jax.Array], jax.Array]]:
    """`(vjp, g, back)` on real arrays: a complex `(B, N)` system as the real `(B, 2N)`
    one of `[Re, Im]`, and `back` to return to complex; the identity for real `g`.

    JAX's VJP of an `f` that is not holomorphic (one using `conj`, `abs`, or separate
    activations of real and imaginary parts) is only real-linear, so a linear solver
    that assumes a complex-linear operator (lineax's) would solve the wrong system. In
    the real form the backward system is exact for every `f`.
    """
    if not jnp.issubdtype(g.dtype, jnp.complexfloating):
        return vjp, g, lambda v: v
    n = g.shape[-1]

    def to_complex(v: jax.Array) -> jax.Array:
        return jax.lax.complex(v[..., :n], v[..., n:])

    def to_real(v: jax.Array) -> jax.Array:
        return jnp.concatenate([jnp.real(v), jnp.imag(v)], axis=-1)

    return (lambda v: to_real(vjp(to_complex(v)))), to_real(g), to_complex
