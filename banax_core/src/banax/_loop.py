"""The one loop every solver runs through.

It owns the stopping test, the NaN/Inf guard, the step budget, the statistics, the
per-sample freezing of batch mode and the optional best-iterate tracking, so that
every solver (built in or from a plugin) compiles through the same JAX/XLA path.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._layout import FlatState
from ._solution import Result, Stats
from ._solver import Solver


class FlatSolution(eqx.Module):
    """A solve on the flat `(B, N)` state: what adjoints work with.

    `result` and the `stats` fields have shape `(B,)`; `state` is the solver's final
    state (e.g. Broyden's inverse-Jacobian factors).
    """

    z: FlatState
    fz: FlatState
    state: Any
    result: Result
    stats: Stats
    trace: Any


class _Carry(eqx.Module):
    k: Int[Array, ""]
    z: FlatState
    fz: FlatState
    state: Any
    trace: Any
    abs_err: Float[Array, " batch"]
    rel_err: Float[Array, " batch"]
    steps: Int[Array, " batch"]
    done: Bool[Array, " batch"]
    diverged: Bool[Array, " batch"]
    best: Any


def stats_dtype(dtype: Any) -> Any:
    """Residuals are measured in at least float32, whatever the state's precision."""
    return jnp.promote_types(jnp.finfo(dtype).dtype, jnp.float32)


def residual_norms(
    z: FlatState, fz: FlatState
) -> tuple[Float[Array, " batch"], Float[Array, " batch"]]:
    """Per-sample `(‖f(z) − z‖₂, ‖f(z) − z‖₂ / ‖f(z)‖₂)`."""
    dtype = stats_dtype(z.dtype)
    fz = fz.astype(jnp.promote_types(fz.dtype, dtype))
    diff = fz - z.astype(fz.dtype)
    abs_err = jnp.sqrt(jnp.sum(jnp.abs(diff) ** 2, axis=-1)).astype(dtype)
    scale = jnp.sqrt(jnp.sum(jnp.abs(fz) ** 2, axis=-1)).astype(dtype)
    rel_err = abs_err / jnp.where(scale > 0, scale, 1)
    return abs_err, rel_err


def _freeze(active: Bool[Array, " batch"], new: Any, old: Any) -> Any:
    """Keep `old` for the samples that are no longer active (batch axis first)."""

    def pick(n: Any, o: Any) -> Any:
        if not eqx.is_array(n) or n.ndim == 0:
            return n
        return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(pick, new, old)


def _select(pred: Bool[Array, " batch"], a: Result, b: Result) -> Result:
    """Per-sample `Result.where` (which only takes a scalar predicate)."""
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def check_step_budget(step_budget: Any) -> Int[Array, ""] | None:
    """Validate a step budget: `None` or an integer JAX array of shape `()`."""
    if step_budget is None:
        return None
    if not isinstance(step_budget, (jax.Array, np.ndarray)):
        raise TypeError(
            f"step_budget must be a JAX array or None, got {type(step_budget).__name__} "
            f"{step_budget!r}. Pass jnp.array({step_budget!r}) so that changing it does "
            "not recompile."
        )
    if step_budget.shape != () or not jnp.issubdtype(step_budget.dtype, jnp.integer):
        raise TypeError(
            "step_budget must be a scalar integer array, got shape "
            f"{step_budget.shape} and dtype {step_budget.dtype}."
        )
    return jnp.asarray(step_budget)


def iterate(
    solver: Solver,
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

    init = _Carry(
        k=jnp.asarray(0),
        z=z0,
        fz=fz0,
        state=state,
        trace=trace,
        abs_err=abs0,
        rel_err=rel0,
        steps=jnp.zeros(batch, jnp.int32),
        done=solver.meets_tolerance(abs0, rel0) | bad0,
        diverged=bad0,
        best=(z0, fz0, abs0, rel0) if solver.keep_best else None,
    )

    def cond(c: _Carry) -> Bool[Array, ""]:
        return (c.k < budget) & ~jnp.all(c.done)

    def body(c: _Carry) -> _Carry:
        z, fz, state, trace = solver.step(f, c.z, c.fz, c.state, c.trace)
        abs_err, rel_err = residual_norms(z, fz)
        active = ~c.done
        if per_sample:
            z, fz, state, abs_err, rel_err = _freeze(
                active, (z, fz, state, abs_err, rel_err),
                (c.z, c.fz, c.state, c.abs_err, c.rel_err),
            )
        bad = ~jnp.isfinite(abs_err)
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
            steps=c.steps + active.astype(jnp.int32),
            done=c.done | solver.meets_tolerance(abs_err, rel_err) | bad,
            diverged=c.diverged | (active & bad),
            best=best,
        )

    if solver.loop_kind == "lax":
        final = jax.lax.while_loop(cond, body, init)
    else:
        final = eqxi.while_loop(
            cond, body, init, max_steps=solver.max_steps, kind=solver.loop_kind
        )

    z, fz, abs_err, rel_err = final.z, final.fz, final.abs_err, final.rel_err
    if solver.keep_best:
        z, fz, abs_err, rel_err = final.best
    converged = solver.meets_tolerance(abs_err, rel_err) & ~final.diverged
    result = _select(
        final.diverged, Result.DIVERGED, _select(converged, Result.CONVERGED, Result.MAX_STEPS)
    )
    return FlatSolution(
        z=z,
        fz=fz,
        state=final.state,
        result=result,
        stats=Stats(steps=final.steps, abs_err=abs_err, rel_err=rel_err),
        trace=final.trace,
    )


def solve_flat(
    solver: Solver,
    fn: Callable[[FlatState], FlatState],
    z0: FlatState,
    step_budget: Int[Array, ""] | None = None,
) -> FlatSolution:
    """Find `z = fn(z)` for an untraced flat function (e.g. a backward linear system).

    Samples along the first axis are independent, so per-sample stopping applies.
    """
    return iterate(solver, lambda z, trace, tag=None: (fn(z), trace), z0, None, step_budget)
