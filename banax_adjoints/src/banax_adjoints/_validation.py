"""Construction-time checks shared by the adjoints: bad pairings fail early, saying
what to use instead."""

from typing import Any

import banax
from banax.extend import AbstractSolver


def check_solver(adjoint: str, option: str, solver: Any, *,
                 stepwise: bool = False) -> None:
    """`solver` must be a banax solver instance; with `stepwise`, one with a step of its
    own (a `banax.Solver`, not a combinator of whole solves such as `Fallback`)."""
    if not isinstance(solver, banax.Solver if stepwise else AbstractSolver):
        raise TypeError(
            f"{adjoint}: {option} must be a banax.Solver instance such as "
            f"banax.get_solver('picard'), got {solver!r}."
        )


def check_differentiable_step(adjoint: str, solver: AbstractSolver) -> None:
    """Adjoints that differentiate the solver's step refuse a step that is not
    differentiable (e.g. one with a line search)."""
    if not solver.differentiable_step:
        raise banax.PairingError(
            f"{adjoint}: the step of {type(solver).__name__} cannot be differentiated "
            "here (its differentiable_step is False, e.g. because of a line search: for "
            "Broyden set ls_steps=0). Use a solver without a line search, or an adjoint "
            "that does not differentiate the step (Implicit, JFB, GDEQ)."
        )
