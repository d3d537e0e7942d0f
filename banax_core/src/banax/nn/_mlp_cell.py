"""`MLPCell`: a two-layer perceptron cell with input injection."""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._cell import AbstractCell
from ._conv_cell import check_int

INITIAL_LIPSCHITZ = 0.9
"""The bound `‖W₂‖₂ ‖W₁‖₂` on the cell's Lipschitz constant in `z` at initialisation."""


def _linear(key: PRNGKeyArray, fan_in: int, fan_out: int, dtype) -> Array:
    # eqx.nn.Linear's initialisation: uniform in ±1/√fan_in.
    bound = 1 / math.sqrt(fan_in)
    return jax.random.uniform(key, (fan_out, fan_in), dtype, -bound, bound)


class MLPCell(AbstractCell):
    """A dense DEQ cell: `z' = cell(z, x)` on feature vectors.

        h  = relu(W₁ z + U x + b₁)
        z' = tanh(W₂ h + b₂)

    Its Lipschitz constant in `z` is at most `‖W₂‖₂ ‖W₁‖₂`; `W₂` is scaled at
    initialisation so that this bound is 0.9 and the cell starts as a contraction
    (training may leave that regime; a Jacobian regularizer keeps it near).

    `z` is `(features,)` and `x` `(inject_features,)` for one sample, or `(N, ·)` for a
    batch (batch mode, `batch_axis=0`); `jax.vmap` works as well.

    **Arguments:**

    - `features`: size of the state `z`.
    - `inject_features`: size of the input `x`.
    - `hidden_features`: width of the hidden layer (default `features`).
    - `key`: PRNG key for the initial weights (`eqx.nn.Linear`'s uniform
        initialisation, `W₂` then rescaled as above).
    - `dtype`: the parameters' dtype (default: JAX's default float).
    """

    W1: Float[Array, "hidden features"]
    U: Float[Array, "hidden inject"]
    b1: Float[Array, " hidden"]
    W2: Float[Array, "features hidden"]
    b2: Float[Array, " features"]

    def __init__(
        self,
        features: int,
        inject_features: int,
        *,
        hidden_features: int | None = None,
        key: PRNGKeyArray,
        dtype=None,
    ):
        features = check_int("MLPCell", "features", features)
        inject = check_int("MLPCell", "inject_features", inject_features)
        hidden = check_int("MLPCell", "hidden_features",
                            features if hidden_features is None else hidden_features)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        self.W1 = _linear(k1, features + inject, hidden, dtype)[:, :features]
        self.U = _linear(k2, features + inject, hidden, dtype)[:, features:]
        self.b1 = _linear(k3, features + inject, hidden, dtype)[:, 0]
        W2 = _linear(k4, hidden, features, dtype)
        bound = jnp.linalg.norm(W2, 2) * jnp.linalg.norm(self.W1, 2)
        self.W2 = (W2 * (INITIAL_LIPSCHITZ / bound)).astype(dtype)
        self.b2 = _linear(k5, hidden, features, dtype)[:, 0]

    def __call__(
        self, z: Float[Array, "*batch features"], x: Float[Array, "*batch inject"]
    ) -> Float[Array, "*batch features"]:
        features, inject = self.W1.shape[1], self.U.shape[1]
        if z.ndim not in (1, 2) or z.shape[-1] != features or x.ndim != z.ndim \
                or x.shape[-1] != inject or x.shape[:-1] != z.shape[:-1]:
            raise ValueError(
                f"MLPCell: z must be ({features},) or (N, {features}) and x "
                f"({inject},) or (N, {inject}) with the same batch; got z of shape "
                f"{z.shape} and x of shape {x.shape}."
            )
        x = x.astype(z.dtype)
        pre = z @ self.W1.T + x @ self.U.T
        h = jax.nn.relu(pre + jnp.broadcast_to(self.b1, pre.shape))
        return jnp.tanh(h @ self.W2.T + jnp.broadcast_to(self.b2, z.shape))

    @property
    def input_layout(self) -> tuple[str, ...]:
        return (f"F={self.U.shape[1]}",)

    def zero_state(self, x: Float[Array, "*batch inject"]) -> Float[Array, "*batch features"]:
        """Zeros of shape `(features,)`, or `(N, features)` for a batch `x`."""
        return jnp.zeros((*jnp.shape(x)[:-1], self.W1.shape[1]), self.W1.dtype)
