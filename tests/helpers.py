"""Independent truth shared by the test suite: dense linear algebra and finite
differences, never the code under test."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def tree_allclose(a: Any, b: Any, *, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    return all(
        np.shape(x) == np.shape(y)
        and np.allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)
        for x, y in zip(la, lb)
    )


def contraction_matrix(key: jax.Array, n: int, radius: float, *, symmetric: bool = True,
                       dtype: Any = jnp.float64) -> jax.Array:
    """An `n × n` matrix whose eigenvalues lie in `[0, radius]` (symmetric) or whose
    spectral norm is `radius` (general)."""
    k1, k2 = jax.random.split(key)
    q, _ = jnp.linalg.qr(jax.random.normal(k1, (n, n), dtype=jnp.float64))
    if symmetric:
        eig = jnp.linspace(0.0, radius, n)
        return ((q * eig[None, :]) @ q.T).astype(dtype)
    q2, _ = jnp.linalg.qr(jax.random.normal(k2, (n, n), dtype=jnp.float64))
    sv = jnp.linspace(radius / 4, radius, n)
    return ((q * sv[None, :]) @ q2.T).astype(dtype)


@eqx.filter_jit
def dense_jacobian(f: Callable[[Any, Any], Any], z: Any, x: Any) -> jax.Array:
    """`∂f(z, x)/∂z` as a dense matrix over the flattened pytree `z`. Jitted: run eagerly,
    its batched products dispatch one small program per operation, several times slower
    than one compiled program for a state of a few hundred entries. `f` (a cell) is a
    pytree argument, so one compilation serves every call of the same shapes."""
    flat, unravel = ravel_pytree(z)
    return jax.jacrev(lambda v: ravel_pytree(f(unravel(v), x))[0])(flat)


@eqx.filter_jit
def dense_implicit_grad(
    f: Callable[[Any, Any], Any], z_star: Any, theta: Any, g: Any
) -> Any:
    """Exact IFT gradient `(∂f/∂θ)ᵀ (I − ∂f/∂z)⁻ᵀ g` at `z* = f(z*, θ)`, by a dense solve.

    `z_star`, `theta` and `g` may be pytrees; `g` has the structure of `z_star`. Jitted
    as one program, like `dense_jacobian`.
    """
    z_flat, unravel_z = ravel_pytree(z_star)
    g_flat, _ = ravel_pytree(g)

    def f_flat(zf: jax.Array) -> jax.Array:
        return ravel_pytree(f(unravel_z(zf), theta))[0]

    jac = jax.jacfwd(f_flat)(z_flat)
    lam = jnp.linalg.solve((jnp.eye(z_flat.size, dtype=jac.dtype) - jac).T, g_flat)
    _, vjp_theta = jax.vjp(lambda th: ravel_pytree(f(z_star, th))[0], theta)
    return vjp_theta(lam.astype(z_flat.dtype))[0]


def finite_difference_grad(fn: Callable[[jax.Array], jax.Array], x: jax.Array,
                           eps: float = 1e-6) -> jax.Array:
    """Central differences of a scalar function of a float64 array."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        grad[i] = (float(fn(jnp.asarray(x + e))) - float(fn(jnp.asarray(x - e)))) / (2 * eps)
    return jnp.asarray(grad)
