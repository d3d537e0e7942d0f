"""The implicit-function-theorem adjoint."""

from collections.abc import Callable

import jax
import lineax as lx

import banax
from banax import FlatSolution

from ._backward import widened
from ._validation import check_solver


class Implicit(banax.LinearSolveAdjoint):
    """Exact gradient at the fixed point by the implicit function theorem.

    At `z* = f(z*, θ)` the gradient of a loss `L(z*)` is `θ̄ = (∂f/∂θ)ᵀ λ` where `λ`
    solves the backward linear system

        (I − Jᵀ) λ = ḡ,   J = ∂f/∂z at z*,   ḡ = ∂L/∂z*.

    The system is solved matrix-free (only `v ↦ Jᵀv`, one VJP of `f` each) by
    `b_solver`, then one VJP gives `θ̄`. The forward iterations are never
    differentiated, so memory does not depend on `max_steps` and the forward solver may
    use any `loop_kind` (`"lax"` is cheapest). `x0` gets no gradient: the fixed point
    does not depend on it.

    `b_solver` is required (the backward system deserves its own tolerance) and is
    either:

    - a banax solver, run on the fixed-point form `λ = ḡ + Jᵀλ` starting from `ḡ`
      (e.g. `Picard(rtol=1e-8)`; `Anderson` for faster convergence). Each step costs
      one VJP, and fixed-point iteration needs many steps when the spectral radius of
      `J` is close to 1; or
    - a lineax linear solver applied to the operator `v ↦ v − Jᵀv`, such as
      `lineax.GMRES(rtol=1e-6, atol=1e-6)` or `lineax.BiCGStab(...)`. Krylov methods
      need far fewer VJPs than fixed-point iteration on ill-conditioned systems.
      (`lineax.CG` needs a symmetric positive-definite operator, which `I − Jᵀ`
      generally is not.) The solve runs with `throw=False`: an unconverged backward
      solve gives an approximate gradient rather than an error.

    The gradient is only as good as the forward fixed point: if the forward solve
    stopped far from `z*`, prefer `BPTT`, which differentiates what actually ran.
    In batch mode the system is block-diagonal (one block per sample); a banax
    `b_solver` stops per sample, a lineax one solves the whole batch at once. Either
    way the VJPs run once over the whole batch.

    **Arguments:**

    - `solver`: the forward solver.
    - `b_solver`: the backward solver (see above).
    """

    solver: banax.Solver
    b_solver: banax.Solver | lx.AbstractLinearSolver

    def __check_init__(self) -> None:
        check_solver("Implicit", "solver", self.solver)
        if not isinstance(self.b_solver, (banax.Solver, lx.AbstractLinearSolver)):
            raise TypeError(
                "Implicit: b_solver must be a banax.Solver (e.g. "
                "banax.get_solver('picard', rtol=1e-8)) or a lineax linear solver (e.g. "
                f"lineax.GMRES(rtol=1e-6, atol=1e-6)), got {self.b_solver!r}."
            )

    def adjoint_solve(
        self,
        vjp: Callable[[jax.Array], jax.Array],
        g: jax.Array,
        forward: FlatSolution,
    ) -> jax.Array:
        vjp, g = widened(vjp, g)
        if isinstance(self.b_solver, banax.Solver):
            return banax.solve_flat(self.b_solver, lambda lam: g + vjp(lam), g).z
        operator = lx.FunctionLinearOperator(
            lambda v: v - vjp(v), jax.eval_shape(lambda: g)
        )
        return lx.linear_solve(operator, g, self.b_solver, throw=False).value
