"""Backpropagation through the solver's iterations."""

import banax
from banax.extend import AbstractAdjoint, AbstractSolver, FlatSolution, Problem, solve

from ._validation import check_differentiable_step, check_solver


class BPTT(AbstractAdjoint):
    """Backpropagation through time: reverse-mode autodiff of the unrolled solve.

    The gradient is exact for the computation that ran: the derivative of the returned
    iterate `z_K = Φ^K(z₀; θ)` after the `K` steps taken, including its dependence on
    `x0`. It tends to the implicit gradient as the solve converges.

    Cost: the backward pass replays every step's VJP, about as long as the forward,
    plus recomputation. Memory grows with `max_steps` and depends on the solver's
    `loop_kind` (both are Equinox loops): `"bounded"` nests scans of 16 steps and stores
    every step of the innermost one, checkpointing the outer levels (large, growing
    with `log₁₆ max_steps`); `"checkpointed"` keeps about `√(2 · max_steps)`
    checkpoints and recomputes the rest (several times smaller up to a few hundred
    steps, comparable beyond a few thousand; see docs/adjoints.md). `"lax"` loops
    cannot be reverse-differentiated and are refused, as are solvers whose step is
    not differentiable (Broyden's line search).

    A poor choice for deep solves of large states; prefer `Implicit` (memory independent
    of `max_steps`) or, for the reversible solver, the `Reversible` adjoint.

    **Arguments:**

    - `solver`: the forward solver, with `loop_kind="bounded"` or `"checkpointed"`.
    """

    solver: AbstractSolver

    def __check_init__(self) -> None:
        check_solver("BPTT", "solver", self.solver)
        if self.solver.loop_kind == "lax":
            raise banax.PairingError(
                f"BPTT: {type(self.solver).__name__} has loop_kind='lax', which cannot "
                "be differentiated in reverse mode. Use loop_kind='checkpointed' (memory "
                "grows slowly with max_steps) or 'bounded', or keep 'lax' with an "
                "adjoint that does not unroll the loop (Implicit, JFB)."
            )
        check_differentiable_step("BPTT", self.solver)

    def solve(self, problem: Problem) -> FlatSolution:
        return solve(self.solver, problem)
