"""Jacobian-free backpropagation."""

from collections.abc import Callable

import jax

from banax.extend import AbstractLinearSolveAdjoint, AbstractSolver, FlatSolution

from ._validation import check_solver


class JFB(AbstractLinearSolveAdjoint):
    """Jacobian-free backpropagation: the implicit gradient with `(I − J)⁻¹` replaced
    by the identity.

        θ̄ ≈ (∂f/∂θ)ᵀ ḡ

    i.e. backpropagation through one application of `f` at the fixed point. It costs one
    VJP and no linear solve, with memory independent of `max_steps`.

    The gradient is biased: it drops the terms `Jᵀḡ + (Jᵀ)²ḡ + …`, so its error grows
    as the spectral radius of `J` approaches 1. It is still a descent direction when `f`
    is a strong enough contraction (Fung et al., 2022). A poor choice when `f` is barely
    contractive or when accurate gradients matter; use `GDEQ`, a phantom gradient or
    `Implicit` then.

    **Arguments:**

    - `solver`: the forward solver (any `loop_kind`).
    """

    solver: AbstractSolver

    def __check_init__(self) -> None:
        check_solver("JFB", "solver", self.solver)

    def adjoint_solve(
        self,
        vjp: Callable[[jax.Array], jax.Array],
        g: jax.Array,
        forward: FlatSolution,
        budget: None,
    ) -> jax.Array:
        return g
