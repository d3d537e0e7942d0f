"""Picard iteration: `z ← f(z)`."""

from collections.abc import Callable
from typing import Any

from banax import Solver

from ._common import Flat


class Picard(Solver[None]):
    """Plain fixed-point iteration, `z_{k+1} = f(z_k)`.

    If the Jacobian `J = ∂f/∂z` has spectral radius `ρ < 1` near the fixed point, the
    error shrinks by about `ρ` per step. Each step costs one evaluation of `f` and
    nothing else, so Picard is the baseline every other solver is measured against.

    A poor choice when `ρ` is close to 1 (a slowly contracting DEQ cell needs hundreds of
    steps); use `Anderson` or `Broyden` there. It diverges when `ρ > 1`.

    **Arguments:** only the options shared by every solver (`atol`, `rtol`, `max_steps`,
    `loop_kind`, `batch_axis`, `keep_best`); see `banax.Solver`.
    """

    def init(self, z0: Flat, fz0: Flat) -> None:
        return None

    def step(
        self, f: Callable[..., tuple[Flat, Any]], z: Flat, fz: Flat, state: None, trace: Any
    ) -> tuple[Flat, Flat, None, Any]:
        fz_next, trace = f(fz, trace)
        return fz, fz_next, None, trace
