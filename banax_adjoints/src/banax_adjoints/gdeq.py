"""JFB preconditioned by the forward solver's inverse-Jacobian estimate."""

from collections.abc import Callable

import jax

import banax
from banax.extend import (
    AbstractLinearSolveAdjoint,
    AbstractSolver,
    FlatSolution,
    LowRankInverseJacobian,
    working_dtype,
)

from ._validation import check_solver


class GDEQ(AbstractLinearSolveAdjoint):
    """Jacobian-free backpropagation preconditioned by a low-rank `(I − J)⁻¹`.

    Quasi-Newton forward solvers (Broyden) build, for each sample, a low-rank estimate
    `(I − J)⁻¹ ≈ I + Uᵀ V` as they iterate. GDEQ reuses it in place of the exact inverse
    in the implicit gradient:

        λ = (I + Uᵀ V)ᵀ ḡ = ḡ + Vᵀ (U ḡ),   θ̄ = (∂f/∂θ)ᵀ λ.

    The backward pass costs one VJP plus two products with `m × N` factors (`m` the
    solver's history size), with memory independent of `max_steps`. The gradient is
    biased, but less than `JFB`'s when the estimate captures the dominant directions of
    `J`; it is no better than JFB when the solver took fewer steps than the estimate
    needs (e.g. the solve converged in a step or two).

    The solver must advertise the `banax.extend.LowRankInverseJacobian` capability (any
    plugin's solver may); otherwise construction fails.

    **Arguments:**

    - `solver`: the forward solver, exposing `inverse_jacobian_factors(state)`.
    """

    solver: AbstractSolver

    def __check_init__(self) -> None:
        check_solver("GDEQ", "solver", self.solver)
        if not isinstance(self.solver, LowRankInverseJacobian):
            raise banax.PairingError(
                f"GDEQ: {type(self.solver).__name__} does not expose low-rank "
                "inverse-Jacobian factors (the banax.extend.LowRankInverseJacobian "
                "capability). "
                "Use a solver that does, such as GDEQ(solver=Broyden(...)), or JFB for "
                "the unpreconditioned gradient."
            )

    def adjoint_solve(
        self,
        vjp: Callable[[jax.Array], jax.Array],
        g: jax.Array,
        forward: FlatSolution,
        budget: None,
    ) -> jax.Array:
        # In the factors' dtype, at least float32.
        solver = self.solver
        assert isinstance(solver, LowRankInverseJacobian)  # checked at construction
        return solver.inverse_jacobian_vjp(
            forward.state, g.astype(working_dtype(g.dtype))
        )
