"""The `Adjoint` base class: the user's entry point and owner of the gradient rule."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, Int

from ._fspec import FSpec
from ._layout import FlatState
from ._loop import FlatSolution
from ._problem import Problem, make_problem, to_solution
from ._solution import Solution
from ._solver import Solver


def solve(solver: Solver, problem: Problem) -> FlatSolution:
    """Run `solver` on `problem` through the shared loop (differentiable iff the loop
    kind is)."""
    return solver.run(problem.f, problem.z0, problem.trace_init, problem.step_budget)


class Adjoint(eqx.Module):
    """Base class of every adjoint: finds the fixed point and owns its gradient rule.

    Call it as `adjoint(f_spec, x0, has_aux=False, trace=None, step_budget=None)` to get
    a `Solution` whose `value` carries gradients to the arrays in `f_spec`.

    **Writing an adjoint.** Subclass, declare `solver: Solver` (and any options) as
    fields, and implement `solve(problem) -> FlatSolution`. Use `banax.solve(solver,
    problem)` for the forward pass; wrap it in your gradient rule (a custom VJP, a
    stop-gradient plus a surrogate, ...). To write only the backward pass of an
    untouched forward solve, subclass `BackwardRuleAdjoint` and implement `backward`;
    for rules of the form `θ̄ = (∂f/∂θ)ᵀ λ, λ ≈ (I − Jᵀ)⁻¹ ḡ`, subclass
    `LinearSolveAdjoint` and write only `adjoint_solve`. Reject invalid solver pairings
    in `__check_init__`.
    """

    solver: eqx.AbstractVar[Solver]

    def __call__(
        self,
        f_spec: FSpec,
        x0: Any,
        has_aux: bool = False,
        trace: tuple[Callable[..., Any], Any] | None = None,
        step_budget: Int[Array, ""] | None = None,
    ) -> Solution:
        problem = make_problem(
            f_spec, x0, has_aux=has_aux, trace=trace, step_budget=step_budget,
            batch_axis=self.solver.batch_axis,
        )
        return _solve_and_unflatten(self, problem)

    @abc.abstractmethod
    def solve(self, problem: Problem) -> FlatSolution:
        """Solve `problem` and attach this adjoint's gradient rule to `FlatSolution.z`."""


@eqx.filter_jit
def _solve_and_unflatten(adjoint: Adjoint, problem: Problem) -> Solution:
    return to_solution(problem, adjoint.solve(problem))


class BackwardRuleAdjoint(Adjoint):
    """Base class of adjoints that supply the backward pass of an untouched forward solve.

    The forward pass is `banax.solve(self.solver, problem)` under a custom VJP, so
    nothing of the iteration is stored and any `loop_kind` works. On the backward pass
    `backward(problem, forward, g)` receives the forward solve (gradients stopped) and
    `ḡ = ∂L/∂z` and returns the cotangents of the parameters and of the initial state.
    """

    @abc.abstractmethod
    def backward(
        self, problem: Problem, forward: FlatSolution, g: FlatState
    ) -> tuple[Any, FlatState | None]:
        """Return `(θ̄, z̄₀)`.

        `θ̄` has the structure of `problem.parameters()[0]`; `z̄₀` is the flat cotangent
        of the initial state, or `None` when the rule gives it no gradient.
        """

    def solve(self, problem: Problem) -> FlatSolution:
        return _solve_with_rule(problem, self)


@eqx.filter_custom_vjp
def _solve_with_rule(problem: Problem, adjoint: BackwardRuleAdjoint) -> FlatSolution:
    return solve(adjoint.solver, problem)


@_solve_with_rule.def_fwd
def _solve_with_rule_fwd(perturbed, problem, adjoint):
    del perturbed
    forward = solve(adjoint.solver, problem)
    return forward, forward


@_solve_with_rule.def_bwd
def _solve_with_rule_bwd(forward, grad_obj, perturbed, problem, adjoint):
    cotangent = eqx.filter(problem, lambda _: False)
    g = grad_obj.z
    if g is None:
        return cotangent
    p_bar, z0_bar = adjoint.backward(problem, jax.lax.stop_gradient(forward), g)
    is_none = lambda x: x is None  # noqa: E731
    # Only arrays that were perturbed get a cotangent.
    p_bar = jax.tree.map(
        lambda wanted, grad: grad if wanted else None,
        perturbed.f.bound, p_bar, is_leaf=is_none,
    )
    if not perturbed.z0:
        z0_bar = None
    cotangent = eqx.tree_at(lambda p: p.f.bound, cotangent, p_bar, is_leaf=is_none)
    return eqx.tree_at(lambda p: p.z0, cotangent, z0_bar, is_leaf=is_none)


class LinearSolveAdjoint(BackwardRuleAdjoint):
    """Adjoints of the implicit-function-theorem family.

    At a fixed point `z* = f(z*, θ)` the exact gradient of a loss `L(z*)` is
    `θ̄ = (∂f/∂θ)ᵀ λ` with `λ = (I − J)⁻ᵀ ḡ`, `J = ∂f/∂z` at `z*` and `ḡ = ∂L/∂z*`.
    Subclasses decide how to (approximately) compute `λ` in `adjoint_solve`; the
    forward solve, the custom VJP and the parameter VJP are done here once. The
    forward pass runs without storing its iterations, so memory does not depend on
    `max_steps`. `x0` gets no gradient: the fixed point does not depend on it.
    """

    @abc.abstractmethod
    def adjoint_solve(
        self,
        vjp: Callable[[FlatState], FlatState],
        g: FlatState,
        forward: FlatSolution,
    ) -> FlatState:
        """Return `λ ≈ (I − Jᵀ)⁻¹ g`, where `vjp(v) = Jᵀ v` at the fixed point.

        Arrays are flat `(B, N)`; rows are independent samples. `forward` is the
        forward solve (its `state` holds e.g. inverse-Jacobian factors).
        """

    def backward(
        self, problem: Problem, forward: FlatSolution, g: FlatState
    ) -> tuple[Any, None]:
        params, f_with = problem.parameters()
        # One linearisation at z* serves the backward solve and the parameter VJP: f is
        # evaluated at z* once, and XLA drops the unused parameter cotangent inside the
        # solve's loop.
        _, vjp = jax.vjp(lambda z, p: f_with(p)(z), forward.z, params)
        lam = self.adjoint_solve(lambda v: vjp(v)[0], g, forward)
        _, p_bar = vjp(lam.astype(forward.z.dtype))
        return p_bar, None
