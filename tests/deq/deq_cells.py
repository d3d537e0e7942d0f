"""Small DEQ problems shared by the `banax.DEQ` tests and the multi-device script."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from helpers import contraction_matrix


class TanhCell(eqx.Module):
    """`cell(z, x) = tanh(z Wᵀ + x Uᵀ + b)`: a contraction in `z` when `‖W‖₂ < 1`.

    Works on one sample (`z: (n,)`) or a batch (`z: (B, n)`).
    """

    W: Float[Array, "n n"]
    U: Float[Array, "n d"]
    b: Float[Array, " n"]

    def __call__(self, z: Array, x: Array) -> Array:
        pre = z @ self.W.T + x @ self.U.T
        return jnp.tanh(pre + jnp.broadcast_to(self.b, pre.shape))


def tanh_cell(key: jax.Array, n: int, d: int, *, radius: float = 0.8,
              dtype=jnp.float64) -> TanhCell:
    """A `TanhCell` with `‖W‖₂ = radius` (non-symmetric W)."""
    kw, ku, kb = jax.random.split(key, 3)
    return TanhCell(
        W=contraction_matrix(kw, n, radius, symmetric=False, dtype=dtype),
        U=(jax.random.normal(ku, (n, d)) / jnp.sqrt(d)).astype(dtype),
        b=(0.1 * jax.random.normal(kb, (n,))).astype(dtype),
    )


class Regressor(eqx.Module):
    """A DEQ followed by a linear read-out: the smallest trainable DEQ model."""

    deq: eqx.Module
    head: Float[Array, " n"]

    def __call__(self, x: Array) -> tuple[Array, Array]:
        z = self.deq(x)
        return z @ self.head, z


def mse(model: Regressor, x: Array, y: Array) -> tuple[Array, Array]:
    """Mean squared error of `model` on `(x, y)`, with the equilibrium as aux."""
    pred, z = model(x)
    return jnp.mean((pred - y) ** 2), z
