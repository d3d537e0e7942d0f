"""The one way into the loop, and the loop every iterative solver runs through.

`solve` runs any solver: an iterative one through `iterate`, a combinator of whole
solves through its `run`. `iterate` owns the stopping test, the NaN/Inf guard, the
step budget, the statistics, the per-sample freezing of batch mode and the optional
best-iterate tracking, so that every solver (built in or from a plugin) compiles
through the same JAX/XLA path.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._layout import FlatState
from ._numerics import check_tolerances, residual_norms

# Freezing the samples that stopped is the per-sample selection solvers also use.
from ._numerics import where_per_sample as _freeze
from ._problem import Problem
from ._solution import FlatSolution, Result, Stats
from ._solver import AbstractIterativeSolver, AbstractSolveCombinator, AbstractSolver


class _Carry(eqx.Module):
    k: Int[Array, ""]
    z: FlatState
    fz: FlatState
    state: Any
    trace: Any
    abs_err: Float[Array, " batch"]
    rel_err: Float[Array, " batch"]
    steps: Int[Array, " batch"] | None
    done: Bool[Array, " batch"]
    diverged: Bool[Array, " batch"]
    best: Any


def _freeze_all(running: Bool[Array, ""], new: Any, old: Any, scalars_only: bool = False
                ) -> Any:
    """`new` if `running`, else `old`, leaf by leaf: for what has no batch axis (the
    trace, and with `scalars_only` the scalar leaves of a solver state)."""

    def pick(n: Any, o: Any) -> Any:
        if not eqx.is_array(n) or (scalars_only and n.ndim > 0):
            return n
        return jnp.where(running, n, o)

    return jax.tree.map(pick, new, old)


def iterate(
    solver: AbstractIterativeSolver,
    f: Callable[..., tuple[FlatState, Any]],
    z0: FlatState,
    trace: Any = None,
    step_budget: Int[Array, ""] | None = None,
) -> FlatSolution:
    """Run `solver` on `f` from `z0` until every sample meets the tolerance.

    `f(z, trace, tag=None) -> (f(z), trace)` is usually a `TracedFunction`; any callable
    of that form works (adjoints use this for backward solves). The step budget is
    clamped to `[0, solver.max_steps]`.
    """
    check_tolerances(solver, z0.dtype, z0.shape[1])
    fz0, trace = f(z0, trace)
    state = solver.init(z0, fz0)
    abs0, rel0 = residual_norms(z0, fz0)
    bad0 = ~jnp.isfinite(abs0)
    batch = z0.shape[0]
    per_sample = batch > 1
    if step_budget is None:
        budget = jnp.asarray(solver.max_steps)
    else:
        budget = jnp.clip(step_budget, 0, solver.max_steps)

    every = solver.check_every
    # With `check_every > 1` the loop's condition runs once per `every` steps, so the
    # steps past the stopping point (or the budget) are masked: a sample freezes as
    # soon as it stops, and the scalars and the trace freeze once no sample is left.
    gated = every > 1
    # A lone sample that is neither frozen nor masked steps on every iteration, so its
    # step count is the loop counter: one kernel less per step, which shows outside
    # batch mode, where the loop does little besides f.
    count_steps = per_sample or gated

    init = _Carry(
        k=jnp.asarray(0),
        z=z0,
        fz=fz0,
        state=state,
        trace=trace,
        abs_err=abs0,
        rel_err=rel0,
        steps=jnp.zeros(batch, jnp.int32) if count_steps else None,
        done=solver.meets_tolerance(abs0, rel0) | bad0,
        diverged=bad0,
        best=(z0, fz0, abs0, rel0) if solver.keep_best else None,
    )

    def cond(c: _Carry) -> Bool[Array, ""]:
        return (c.k < budget) & ~jnp.all(c.done)

    def advance(c: _Carry) -> _Carry:
        z, fz, state, trace = solver.step(f, c.z, c.fz, c.state, c.trace)
        abs_err, rel_err = residual_norms(z, fz)
        bad = ~jnp.isfinite(abs_err)
        active = ~c.done
        if gated:
            active = active & (c.k < budget)
        # A step whose residual is not finite is not taken: the sample keeps its last
        # finite iterate (and state) whatever the solver's step computed. The mask
        # depends on the residual, which also orders the freezing after every read of
        # the old iterate, so that XLA overwrites the carried buffers in place.
        keep = active & ~bad
        z, fz, state, abs_err, rel_err = _freeze(
            keep, (z, fz, state, abs_err, rel_err),
            (c.z, c.fz, c.state, c.abs_err, c.rel_err),
        )
        # A solver's scalars (a history counter) are shared by all samples: they move
        # on when some sample took its step.
        state = _freeze_all(jnp.any(keep), state, c.state, scalars_only=True)
        if gated:
            # The trace is shared by all samples too.
            trace = _freeze_all(jnp.any(active), trace, c.trace)
        best = c.best
        if solver.keep_best:
            better = active & (abs_err < best[2])
            best = _freeze(better, (z, fz, abs_err, rel_err), best)
        return _Carry(
            k=c.k + 1,
            z=z,
            fz=fz,
            state=state,
            trace=trace,
            abs_err=abs_err,
            rel_err=rel_err,
            steps=None if c.steps is None else c.steps + keep.astype(jnp.int32),
            done=c.done | solver.meets_tolerance(abs_err, rel_err) | bad,
            diverged=c.diverged | (active & bad),
            best=best,
        )

    def body(c: _Carry) -> _Carry:
        for _ in range(every):
            c = advance(c)
        return c

    if solver.loop_kind == "lax":
        final = jax.lax.while_loop(cond, body, init)
    else:
        final = eqxi.while_loop(
            cond, body, init, max_steps=-(-solver.max_steps // every),
            kind=solver.loop_kind,
        )

    z, fz, abs_err, rel_err = final.z, final.fz, final.abs_err, final.rel_err
    if solver.keep_best:
        z, fz, abs_err, rel_err = final.best
    converged = solver.meets_tolerance(abs_err, rel_err) & ~final.diverged
    steps = final.steps
    if steps is None:  # not count_steps
        # The loop stops on the step that diverged, which is not taken.
        taken = final.k - (final.diverged[0] & (final.k > 0)).astype(final.k.dtype)
        steps = jnp.full((batch,), taken, jnp.int32)
    result = jnp.select(
        [final.diverged, converged], [Result.DIVERGED, Result.CONVERGED], Result.MAX_STEPS
    ).astype(jnp.int32)
    return FlatSolution(
        z=z,
        fz=fz,
        state=final.state,
        result=result,
        stats=Stats(steps=steps, abs_err=abs_err, rel_err=rel_err),
        trace=final.trace,
    )


def solve(
    solver: AbstractSolver,
    problem: Problem | Callable[..., tuple[FlatState, Any]],
    z0: FlatState | None = None,
    trace: Any = None,
    step_budget: Int[Array, ""] | None = None,
) -> FlatSolution:
    """Run `solver`: the one way into the loop, for every solver and every adjoint.

    - `solve(solver, problem)` runs an adjoint's `Problem` (its traced `f`, `z0`,
        trace and step budget); differentiable iff the solver's `loop_kind` is.
    - `solve(solver, f, z0, trace=None, step_budget=None)` runs a flat function
        `f(z, trace, tag=None) -> (f(z), trace)`, such as a `TracedFunction` (a
        combinator's inner solves) or a wrapped untraced map (see `solve_flat`).

    An `AbstractIterativeSolver` runs through banax's loop; an
    `AbstractSolveCombinator` through its `run`. The step budget is clamped to
    `[0, solver.max_steps]`.
    """
    if isinstance(problem, Problem):
        if z0 is not None:
            raise TypeError(
                "solve(solver, problem) takes no z0: the problem holds its initial "
                "state; call solve(solver, f, z0) to run a flat function instead."
            )
        f, z0 = problem.f, problem.z0
        trace, step_budget = problem.trace_init, problem.step_budget
    elif callable(problem) and z0 is not None:
        f = problem
    else:
        raise TypeError(
            "solve takes (solver, problem) with a banax.extend.Problem, or (solver, f, "
            f"z0) with a flat function f(z, trace, tag=None) -> (f(z), trace); got "
            f"{type(problem).__name__} and z0={'None' if z0 is None else '...'}."
        )
    if isinstance(solver, AbstractSolveCombinator):
        return solver.run(f, z0, trace, step_budget)
    if not isinstance(solver, AbstractIterativeSolver):
        raise TypeError(
            f"solve needs a banax solver (a banax.solver.Solver or an "
            f"AbstractSolveCombinator), got {type(solver).__name__}."
        )
    return iterate(solver, f, z0, trace, step_budget)


def solve_flat(
    solver: AbstractSolver,
    fn: Callable[[FlatState], FlatState],
    z0: FlatState,
    step_budget: Int[Array, ""] | None = None,
) -> FlatSolution:
    """Find `z = fn(z)` for an untraced flat function (e.g. a backward linear system),
    through `solve`.

    Samples along the first axis are independent, so per-sample stopping applies.
    """
    return solve(solver, lambda z, trace, tag=None: (fn(z), trace), z0, None, step_budget)
