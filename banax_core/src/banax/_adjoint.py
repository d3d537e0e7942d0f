"""The adjoint bases: `AbstractAdjoint` (the seed's `Adjoint`), the user's entry point
and owner of the gradient rule; `AbstractBackwardRuleAdjoint` and
`AbstractLinearSolveAdjoint` for rules applied after an untouched forward solve; and the
custom-VJP mechanism that reports how a backward solve ended."""

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from ._batch_checks import check_independence as checked_independent
from ._failures import (
    ON_FAILURE,
    Context,
    context,
    current,
    report,
    report_forward,
    tracing,
)
from ._fspec import FSpec
from ._layout import FlatState
from ._loop import solve
from ._numerics import check_step_budget
from ._options import FlagOption, check_choice, check_options, normalise_options
from ._problem import Problem, make_problem, to_solution
from ._solution import BackwardStats, FlatSolution, Solution
from ._solver import AbstractSolver


class PairingError(TypeError, ValueError):
    """An adjoint was given a solver it cannot work with (BPTT with a `"lax"` loop, GDEQ
    without inverse-Jacobian factors, the reversible adjoint with a step it cannot
    invert, an adjoint that unrolls a step that is not differentiable).

    Raised at construction. A `TypeError` (as banax 0.1.5 raises it) and a
    `ValueError`, so either `except` catches it.
    """


class AbstractAdjoint(eqx.Module):
    """Base class of every adjoint: finds the fixed point and owns its gradient rule.

    Call it as `adjoint(f_spec, x0, has_aux=False, trace=None, step_budget=None)` to get
    a `Solution` whose `value` carries gradients to the arrays in `f_spec`.
    `step_budget` is a scalar integer JAX array clamped to `[0, solver.max_steps]` (a
    negative budget runs no step); the call is checked at trace time (see
    `banax.extend.make_problem`), options edited by `eqx.tree_at` included. Two keyword
    arguments concern the backward pass:

    - `backward_probe`: a `banax.BackwardStats.probe()`; differentiate with respect to
        it to receive the backward solve's `BackwardStats` (see there).
    - `backward_budget`: an integer JAX array capping the backward solve's steps at run
        time (clamped to `[0, b_solver.max_steps]`, no recompile), like `step_budget`
        for the forward. Only adjoints with `takes_backward_budget` accept one.

    The seed's name for this class is `banax.adjoint.Adjoint` (also `banax.Adjoint`).

    In batch mode, `check_independence=True` checks at the call that `f` keeps samples
    apart, as `banax.DEQ(..., check_independence=True)` does (a debugging aid: about
    two extra evaluations of `f`; a run-time error if `f` mixes samples).

    `on_failure` (keyword, every adjoint) says what a failed solve does, forward or
    backward alike. A forward solve fails when a sample DIVERGED (a NaN or infinite
    residual; its value is then the last finite iterate); MAX_STEPS is a budgeted
    outcome, flagged in `Solution.result` and never reported. A backward solve fails
    when a sample did not converge. Then:

    - `"warn"` (the default): a `banax.ForwardSolveWarning` or
        `banax.BackwardSolveWarning` from inside `jit` (a host callback, only when a
        solve failed), once per call site under Python's default filter; the outputs
        are used as they are;
    - `"raise"`: an error from inside `jit` (`eqx.error_if`, as Optimistix's
        `throw=True`); nothing is returned;
    - `"ignore"`: nothing; read `Solution.result` and the probe yourself.

    `banax.solve_summary()` counts the outcomes over a run.

    **Writing an adjoint.** Subclass, declare `solver: Solver` (and any options) as
    fields, and implement `solve(problem) -> FlatSolution`. Use
    `banax.extend.solve(solver, problem)` for the forward pass; wrap it in your
    gradient rule (a custom VJP, a stop-gradient plus a surrogate, ...). To write only
    the backward pass of an untouched forward solve, subclass
    `AbstractBackwardRuleAdjoint` and implement `backward`; for rules of the form
    `θ̄ = (∂f/∂θ)ᵀ λ, λ ≈ (I − Jᵀ)⁻¹ ḡ`, subclass `AbstractLinearSolveAdjoint` and
    write only `adjoint_solve`. Reject invalid solver pairings in `__check_init__` with
    `banax.PairingError`.
    """

    solver: eqx.AbstractVar[AbstractSolver]
    on_failure: str = eqx.field(default="warn", kw_only=True)

    def __check_init__(self) -> None:
        check_choice(self, "on_failure", self.on_failure, ON_FAILURE)
        # After the subclasses' checks: NumPy-scalar options become Python scalars,
        # static under jit (see `banax.extend.normalise_options`).
        normalise_options(self)

    @property
    def takes_backward_budget(self) -> bool:
        """Whether the backward pass runs an iteration that `backward_budget` can cap
        at run time. False here; adjoints whose backward solve reads
        `problem.backward_budget` override it."""
        return False

    def __call__(
        self,
        f_spec: FSpec,
        x0: Any,
        has_aux: FlagOption = False,
        trace: tuple[Callable[..., Any], Any] | None = None,
        step_budget: Int[Array, ""] | None = None,
        *,
        backward_probe: BackwardStats | None = None,
        backward_budget: Int[Array, ""] | None = None,
        check_independence: bool = False,
    ) -> Solution:
        check_options(self)  # options edited by eqx.tree_at were never checked
        problem = make_problem(
            f_spec, x0, has_aux=has_aux, trace=trace, step_budget=step_budget,
            batch_axis=self.solver.batch_axis,
        )
        if check_independence is not False:
            problem = _independence_checked(self, problem, check_independence)
        budget = check_step_budget(backward_budget, "backward_budget")
        if budget is not None and not self.takes_backward_budget:
            raise TypeError(
                f"{type(self).__name__} does not take a backward_budget: its backward "
                "pass runs no iteration whose length can change at run time (JFB, GDEQ "
                "and BPTT solve nothing backwards; a lineax b_solver fixes its max_steps "
                "at compile time, so set max_steps on the lineax solver). Drop "
                "backward_budget, or use Implicit with a banax b_solver."
            )
        _check_probe(backward_probe, problem)
        problem = dataclasses.replace(
            problem, backward_budget=budget, backward_probe=backward_probe
        )
        ctx = context()
        return report_forward(self, _solve_and_unflatten(self, problem, ctx), ctx)

    @abc.abstractmethod
    def solve(self, problem: Problem) -> FlatSolution:
        """Solve `problem` and attach this adjoint's gradient rule to `FlatSolution.z`."""


def _independence_checked(adjoint: AbstractAdjoint, problem: Problem, flag: Any) -> Problem:
    """The problem with its start checked for sample mixing (`check_independence`)."""
    name = type(adjoint).__name__
    if flag is not True:
        raise TypeError(f"{name}: check_independence must be True or False, got {flag!r}.")
    if not problem.batched:
        raise ValueError(
            f"{name}: check_independence=True checks the samples of a batch, but the "
            "solver has no batch_axis; set batch_axis on the solver, or drop "
            "check_independence."
        )
    # The flat state holds one sample per row, whatever the batch axis of x0.
    z0 = checked_independent(problem.f.evaluate, problem.z0, 0, name)
    return dataclasses.replace(problem, z0=z0)


def _check_probe(probe: Any, problem: Problem) -> None:
    if probe is None:
        return
    if not isinstance(probe, BackwardStats):
        raise TypeError(
            "backward_probe must be None or a banax.BackwardStats from "
            f"banax.BackwardStats.probe(...), got {type(probe).__name__} {probe!r}."
        )
    batch = problem.z0.shape[0]
    want = (batch,) if problem.batched else ()
    shapes = {jnp.shape(leaf) for leaf in jax.tree.leaves(probe)}
    if shapes != {want}:
        fix = f"batch_size={batch}" if problem.batched else "no batch_size"
        raise ValueError(
            f"backward_probe has fields of shape {sorted(shapes)[0]}, but this call "
            f"reports per {'sample of its batch' if problem.batched else 'call'}, "
            f"shape {want}: build it with banax.BackwardStats.probe({fix})."
        )


@eqx.filter_jit
def _solve_and_unflatten(adjoint: AbstractAdjoint, problem: Problem, ctx: Context) -> Solution:
    with tracing(ctx):
        return to_solution(problem, adjoint.solve(problem))


class AbstractBackwardRuleAdjoint(AbstractAdjoint):
    """Base class of adjoints that supply the backward pass of an untouched forward solve.

    The forward pass is `banax.extend.solve(self.solver, problem)` under a custom VJP,
    so nothing of the iteration is stored and any `loop_kind` works. On the backward pass
    `backward(problem, forward, g)` receives the forward solve (gradients stopped) and
    `ḡ = ∂L/∂z` and returns the cotangents of the parameters and of the initial state,
    and optionally a report of its backward solve.

    The report is what the call's `backward_probe` receives, and what `on_failure`
    (see `banax.Adjoint`) acts on when a sample's backward solve did not converge.
    A subclass whose backward pass fails for reasons of its own (not a linear solve
    short of steps) says what to do about it in `backward_failure_advice`, which then
    replaces the generic advice of the warning or error.
    """

    backward_failure_advice: ClassVar[str | None] = None

    @abc.abstractmethod
    def backward(
        self, problem: Problem, forward: FlatSolution, g: FlatState
    ) -> tuple[Any, FlatState | None] | tuple[Any, FlatState | None, BackwardStats]:
        """Return `(θ̄, z̄₀)` or `(θ̄, z̄₀, report)`.

        `θ̄` has the structure of `problem.parameters()[0]`; `z̄₀` is the flat cotangent
        of the initial state, or `None` when the rule gives it no gradient. `report` is
        a `BackwardStats` of shape `(B,)` (one entry per row of the flat state), e.g.
        `BackwardStats.from_flat(sol.result, sol.stats)` of a `banax.extend.solve_flat`; leave
        it out when nothing is solved backwards (it then reads 0 steps, CONVERGED). A
        rule that iterates should cap its steps at `problem.backward_budget` (an
        integer array or `None`) and set `takes_backward_budget`.
        """

    def solve(self, problem: Problem) -> FlatSolution:
        return _solve_with_rule(problem, self, current())


def _enforce(
    adjoint: AbstractBackwardRuleAdjoint, stats: BackwardStats, outputs: Any, ctx: Context
) -> Any:
    """Apply `adjoint.on_failure` to a backward solve's `stats`."""
    return report("backward", type(adjoint).__name__, adjoint.on_failure,
                  stats.result_codes(), outputs, ctx, adjoint.backward_failure_advice)


@eqx.filter_custom_vjp
def _solve_with_rule(
    problem: Problem, adjoint: AbstractBackwardRuleAdjoint, ctx: Context
) -> FlatSolution:
    return solve(adjoint.solver, problem)


@_solve_with_rule.def_fwd
def _solve_with_rule_fwd(perturbed, problem, adjoint, ctx):
    del perturbed, ctx
    forward = solve(adjoint.solver, problem)
    return forward, forward


@_solve_with_rule.def_bwd
def _solve_with_rule_bwd(forward, grad_obj, perturbed, problem, adjoint, ctx):
    cotangent = eqx.filter(problem, lambda _: False)
    g = grad_obj.z
    if g is None:
        return cotangent
    p_bar, z0_bar, *report = adjoint.backward(problem, jax.lax.stop_gradient(forward), g)
    is_none = lambda x: x is None  # noqa: E731
    # Only arrays that were perturbed get a cotangent.
    p_bar = jax.tree.map(
        lambda wanted, grad: grad if wanted else None,
        perturbed.f.bound, p_bar, is_leaf=is_none,
    )
    if not perturbed.z0:
        z0_bar = None
    stats = None
    if report:
        (stats,) = report
        p_bar, z0_bar, stats = _enforce(adjoint, stats, (p_bar, z0_bar, stats), ctx)
    probe = problem.backward_probe
    if probe is not None and any(jax.tree.leaves(perturbed.backward_probe)):
        if stats is None:
            stats = BackwardStats.probe(problem.z0.shape[0])
        if not problem.batched:
            stats = jax.tree.map(lambda a: a[0], stats)
        stats = jax.tree.map(
            lambda wanted, value, like: value.astype(like.dtype) if wanted else None,
            perturbed.backward_probe, stats, probe,
        )
        cotangent = eqx.tree_at(
            lambda p: p.backward_probe, cotangent, stats, is_leaf=is_none
        )
    cotangent = eqx.tree_at(lambda p: p.f.bound, cotangent, p_bar, is_leaf=is_none)
    return eqx.tree_at(lambda p: p.z0, cotangent, z0_bar, is_leaf=is_none)


class AbstractLinearSolveAdjoint(AbstractBackwardRuleAdjoint):
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
        budget: Int[Array, ""] | None,
    ) -> FlatState | tuple[FlatState, BackwardStats]:
        """Return `λ ≈ (I − Jᵀ)⁻¹ g`, where `vjp(v) = Jᵀ v` at the fixed point, or
        `(λ, report)` with a `BackwardStats` report of the solve (see `backward`).

        Arrays are flat `(B, N)`; rows are independent samples. `forward` is the
        forward solve (its `state` holds e.g. inverse-Jacobian factors). `budget` is
        the call's `backward_budget` (`None` unless `takes_backward_budget`): pass it
        on as the `step_budget` of `banax.extend.solve_flat`.
        """

    def backward(
        self, problem: Problem, forward: FlatSolution, g: FlatState
    ) -> tuple[Any, None] | tuple[Any, None, BackwardStats]:
        params, f_with = problem.parameters()
        # One linearisation at z* serves the backward solve and the parameter VJP: f is
        # evaluated at z* once, and XLA drops the unused parameter cotangent inside the
        # solve's loop.
        _, vjp = jax.vjp(lambda z, p: f_with(p)(z), forward.z, params)
        out = self.adjoint_solve(lambda v: vjp(v)[0], g, forward, problem.backward_budget)
        lam, report = out if isinstance(out, tuple) else (out, None)
        _, p_bar = vjp(lam.astype(forward.z.dtype))
        return (p_bar, None) if report is None else (p_bar, None, report)


# The seed's names of the bases.
Adjoint = AbstractAdjoint
BackwardRuleAdjoint = AbstractBackwardRuleAdjoint
LinearSolveAdjoint = AbstractLinearSolveAdjoint
