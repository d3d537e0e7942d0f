"""The two-sequence reversible fixed-point scheme, whose step can be run backwards."""

from collections.abc import Callable
from typing import Any

import equinox as eqx

from banax import InvertibleStep, Solver, TracedFunction

from ._common import Flat, check_damp, damped


class ReversibleState(eqx.Module):
    """The second sequence `y` of the scheme, `(B, N)` in the state's dtype."""

    y: Flat


class Reversible(Solver[ReversibleState], InvertibleStep):
    """Two coupled relaxed sequences whose step is exactly invertible.

    With `β = damp` and `y_0 = z_0`, each step computes

    `y_{k+1} = (1 − β) y_k + β f(z_k)`,
    `z_{k+1} = (1 − β) z_k + β f(y_{k+1})`,

    and it can be undone from `(z_{k+1}, y_{k+1})` alone:

    `z_k = (z_{k+1} − β f(y_{k+1})) / (1 − β)`,
    `y_k = (y_{k+1} − β f(z_k)) / (1 − β)`.

    The reversible adjoint uses this to rebuild the forward trajectory during the
    backward pass instead of storing it, giving exact unrolled gradients in memory
    independent of the number of steps. Both sequences converge to the fixed point of
    `f` when `f` is a contraction. Each step evaluates `f` twice (at `y_{k+1}` and at
    `z_{k+1}`); both evaluations are traced as ordinary evaluations.

    A poor choice when you do not need the reversible adjoint: it costs two evaluations
    of `f` per step and converges like `Relaxed`. Running the step backwards amplifies
    rounding errors by about `ρ / (1 − β)²` per step, where `ρ` is the contraction rate:
    the reversible adjoint's gradients degrade on long solves of slowly contracting
    cells, more so for `β` close to 1 or in low precision.

    **Arguments:**

    - `damp`: the relaxation weight `β`, in (0, 1). Default 0.8.
    - the options shared by every solver; see `banax.Solver`.
    """

    damp: float = eqx.field(default=0.8, kw_only=True)

    def __check_init__(self) -> None:
        check_damp(
            self, allow_one=False,
            why="; running the reversible step backwards divides by 1 - damp",
        )

    def init(self, z0: Flat, fz0: Flat) -> ReversibleState:
        return ReversibleState(y=z0)

    def step(
        self, f: TracedFunction, z: Flat, fz: Flat, state: ReversibleState, trace: Any
    ) -> tuple[Flat, Flat, ReversibleState, Any]:
        y_next = damped(state.y, fz, self.damp)
        fy_next, trace = f(y_next, trace)
        z_next = damped(z, fy_next, self.damp)
        fz_next, trace = f(z_next, trace)
        return z_next, fz_next, ReversibleState(y=y_next), trace

    def forward_map(
        self, f: Callable[[Flat], Flat], z: Flat, state: ReversibleState
    ) -> tuple[Flat, ReversibleState]:
        """`(z_k, y_k) -> (z_{k+1}, y_{k+1})`, computed exactly as `step` does."""
        y_next = damped(state.y, f(z), self.damp)
        z_next = damped(z, f(y_next), self.damp)
        return z_next, ReversibleState(y=y_next)

    def inverse_map(
        self, f: Callable[[Flat], Flat], z: Flat, state: ReversibleState
    ) -> tuple[Flat, ReversibleState]:
        """`(z_{k+1}, y_{k+1}) -> (z_k, y_k)`: the step run backwards."""
        beta = self.damp
        z_prev = (z - beta * f(state.y)) / (1 - beta)
        y_prev = (state.y - beta * f(z_prev)) / (1 - beta)
        return z_prev, ReversibleState(y=y_prev)
