"""An example third-party banax plugin: the Halpern fixed-point iteration.

Written only against banax's documented extension points (`banax.extend`: the base
`AbstractIterativeSolver` and `hookimpl`), as a template for plugin authors; see
docs/plugins.md.
"""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Int

from banax.extend import AbstractIterativeSolver, hookimpl


class HalpernState(eqx.Module):
    anchor: Any  # (B, N): the initial iterate every step is pulled towards
    k: Int[Array, ""]  # shared step counter, so a scalar


class Halpern(AbstractIterativeSolver[HalpernState]):
    """Halpern's anchored iteration.

    $z_{k+1} = α_k z_0 + (1 − α_k) f(z_k)$ with $α_k = s / (k + 2)$.

    Unlike Picard iteration it converges for every *nonexpansive* `f` (Lipschitz
    constant 1), at rate O(1/k) on the residual. For contractions it is slower than
    Picard early on; prefer `anderson` when speed matters.

    **Arguments:** the shared solver options, and `anchor_scale` (`s`, in (0, 1]): the
    weight of the anchor at the first step.
    """

    anchor_scale: float = eqx.field(default=1.0)

    def __check_init__(self) -> None:
        if not 0 < self.anchor_scale <= 1:
            raise ValueError(
                f"Halpern: anchor_scale must be in (0, 1], got {self.anchor_scale!r}."
            )

    def init(self, z0: Any, fz0: Any) -> HalpernState:
        return HalpernState(anchor=z0, k=jnp.asarray(0))

    def step(self, f, z, fz, state, trace):
        alpha = (self.anchor_scale / (state.k + 2)).astype(z.dtype)
        z_next = alpha * state.anchor + (1 - alpha) * fz
        fz_next, trace = f(z_next, trace)
        return z_next, fz_next, HalpernState(state.anchor, state.k + 1), trace


@hookimpl
def banax_solvers() -> dict[str, type]:
    return {"halpern": Halpern}
