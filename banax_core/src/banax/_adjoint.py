"""The `Adjoint` base class: the user's entry point and owner of the gradient rule."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from ._fspec import FSpec, bind
from ._layout import FlatState, layout_of
from ._loop import FlatSolution, check_step_budget, iterate
from ._solution import Solution, Stats
from ._solver import Solver
from ._trace import TracedFunction


class Problem(eqx.Module):
    """A validated fixed-point problem, as an adjoint sees it.

    - `f`: the `TracedFunction` (its `bound` field holds the parameters that gradients
        flow to; `f.evaluate(z)` is the untraced flat map; `f.layout` maps pytrees to
        the flat `(B, N)` state and back).
    - `z0`: the flat initial state.
    - `trace_init`: the initial trace accumulator (`None` when not tracing).
    - `step_budget`: an integer array or `None`.
    """

    f: TracedFunction
    z0: FlatState
    trace_init: Any
    step_budget: Int[Array, ""] | None

    @property
    def batched(self) -> bool:
        return self.f.layout.batched

    def parameters(self) -> tuple[Any, Callable[[Any], Callable[[FlatState], FlatState]]]:
        """Split `f`'s parameters from the rest of it.

        Returns `(params, f_with)`: `params` are the floating-point arrays in `f`'s
        positional and keyword arguments and inside `f` itself when it is an
        `eqx.Module` (`None` elsewhere), and `f_with(p)` is the untraced flat map
        `(B, N) -> (B, N)` with parameters `p`. Differentiate through `f_with` to get
        the cotangent of `params`.
        """
        params, static = eqx.partition(self.f.bound, eqx.is_inexact_array)

        def f_with(p: Any) -> Callable[[FlatState], FlatState]:
            return self.f.with_bound(eqx.combine(p, static)).evaluate

        return params, f_with


def solve(solver: Solver, problem: Problem) -> FlatSolution:
    """Run `solver` on `problem` through the shared loop (differentiable iff the loop
    kind is)."""
    return iterate(solver, problem.f, problem.z0, problem.trace_init, problem.step_budget)


def _same_structure(a: Any, b: Any) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        x.shape == y.shape and x.dtype == y.dtype
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _describe(tree: Any) -> str:
    return str(jax.tree.map(lambda x: f"{x.dtype}{list(x.shape)}", tree))


def make_problem(
    f_spec: FSpec,
    x0: Any,
    *,
    has_aux: bool,
    trace: tuple[Callable[..., Any], Any] | None,
    step_budget: Any,
    batch_axis: int | None,
) -> Problem:
    """Validate a call and build its `Problem`; every error here is raised at trace
    time with a message that says what to change."""
    bound = bind(f_spec)
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be True or False, got {has_aux!r}.")
    budget = check_step_budget(step_budget)
    x0 = jax.tree.map(lambda x: x if eqx.is_array(x) else jnp.asarray(x), x0)
    layout = layout_of(x0, batch_axis)
    x_shape = jax.eval_shape(lambda x: x, x0)
    out = eqx.filter_eval_shape(bound, x0)
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(
                "has_aux=True, so f must return a pair (fx, f_aux); it returned "
                f"{_describe(out)}."
            )
        fx, aux = out
    else:
        fx, aux = out, None
    if not _same_structure(fx, x_shape):
        hint = (
            " If f returns (fx, f_aux), pass has_aux=True."
            if not has_aux and isinstance(out, tuple) and len(out) == 2 else ""
        )
        raise ValueError(
            "f must return a state with the same pytree structure, shapes and dtypes as "
            f"x0. x0 is {_describe(x_shape)} but f(x0) is {_describe(fx)}.{hint}"
        )
    trace_fn, trace_init = None, None
    if trace is not None:
        if not (isinstance(trace, tuple) and len(trace) == 2 and callable(trace[0])):
            raise TypeError(
                "trace must be a pair (trace_fn, trace_init) with "
                "trace_fn(acc, x, fx, f_aux) -> acc; see banax.trace_count and friends."
            )
        trace_fn = trace[0]
        trace_init = jax.tree.map(jnp.asarray, trace[1])
        acc_out = jax.eval_shape(trace_fn, trace_init, x_shape, fx, aux)
        init_shape = jax.eval_shape(lambda t: t, trace_init)
        same = jax.tree.structure(acc_out) == jax.tree.structure(init_shape) and all(
            a.shape == b.shape for a, b in
            zip(jax.tree.leaves(acc_out), jax.tree.leaves(init_shape))
        )
        if not same:
            raise ValueError(
                "trace_fn must return an accumulator with the structure and shapes of "
                f"trace_init: trace_init is {_describe(init_shape)} but trace_fn returned "
                f"{_describe(acc_out)}."
            )
    f = TracedFunction(bound, layout, has_aux, trace_fn)
    return Problem(f=f, z0=layout.flatten(x0), trace_init=trace_init, step_budget=budget)


def to_solution(problem: Problem, flat: FlatSolution) -> Solution:
    """Unflatten a `FlatSolution`; outside batch mode, results and stats are scalars."""
    result, stats = flat.result, flat.stats
    if not problem.batched:
        result, stats = jax.tree.map(lambda a: a[0], (result, stats))
    return Solution(
        value=problem.f.layout.unflatten(flat.z),
        result=result,
        stats=stats,
        trace=flat.trace,
    )


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
