"""Relaxed (damped) fixed-point iteration: `z ← (1 − β) z + β f(z)`."""

from collections.abc import Callable
from typing import Any

import equinox as eqx

from banax import Solver
from banax.extend import RealOption

from ._common import Flat, check_damp, damped


class Relaxed(Solver[None]):
    """Damped fixed-point iteration, `z_{k+1} = (1 − β) z_k + β f(z_k)`.

    The step is Picard's on the map `(1 − β) I + β f`, whose Jacobian has eigenvalues
    `1 − β + β λ` for the eigenvalues `λ` of `∂f/∂z`. Damping therefore pulls
    eigenvalues with negative real part (oscillating iterations) into the unit disc and
    widens the basin of convergence, at the price of slowing down the modes with
    `λ` close to 1. One evaluation of `f` per step.

    A poor choice for well-behaved contractions with eigenvalues close to 1, where it
    is slower than Picard; use `Anderson` there.

    **Arguments:**

    - `damp`: the weight `β` of `f(z)`, in (0, 1]. `damp=1` is Picard. Default 0.8.
    - the options shared by every solver; see `banax.Solver`.
    """

    damp: RealOption = eqx.field(default=0.8, kw_only=True)

    def __check_init__(self) -> None:
        check_damp(self, allow_one=True)

    def init(self, z0: Flat, fz0: Flat) -> None:
        return None

    def step(
        self, f: Callable[..., tuple[Flat, Any]], z: Flat, fz: Flat, state: None, trace: Any
    ) -> tuple[Flat, Flat, None, Any]:
        z_next = damped(z, fz, self.damp)
        fz_next, trace = f(z_next, trace)
        return z_next, fz_next, None, trace
