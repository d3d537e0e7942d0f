"""The one loop every solver runs through.

It owns the stopping test, the NaN/Inf guard, the step budget, the statistics, the
per-sample freezing of batch mode and the optional best-iterate tracking, so that
every solver (built in or from a plugin) compiles through the same JAX/XLA path.
"""

import math
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Inexact, Int

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
    result: Int[Array, " batch"]
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
    steps: Int[Array, " batch"] | None
    done: Bool[Array, " batch"]
    diverged: Bool[Array, " batch"]
    best: Any


def working_dtype(dtype: Any) -> Any:
    """The dtype that statistics, solver histories and backward solves run in: the
    state's own, widened to at least single precision.

    float16, bfloat16 and float32 give float32; float64 stays float64; complex64 and
    complex128 stay themselves (their real parts are already single or double
    precision). Written without `jnp.promote_types`, which JAX's strict promotion
    refuses for float16/bfloat16 against float32.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"expected a floating or complex dtype, got {dtype}.")
    if jnp.issubdtype(dtype, jnp.complexfloating) or jnp.finfo(dtype).bits >= 32:
        return dtype
    return jnp.dtype(jnp.float32)


def stats_dtype(dtype: Any) -> Any:
    """The real dtype of residual norms: the real counterpart of `working_dtype`
    (float32 for float16/bfloat16/float32/complex64, float64 for float64/complex128)."""
    return jnp.finfo(working_dtype(dtype)).dtype


def squared_norms(x: Inexact[Array, "batch features"]) -> Float[Array, " batch"]:
    """Per-sample `‖x_b‖₂² = Σ |x_bn|²`, real also for complex `x`."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.sum(jnp.real(x) ** 2 + jnp.imag(x) ** 2, axis=-1)
    return jnp.sum(x**2, axis=-1)


def residual_norms(
    z: FlatState, fz: FlatState
) -> tuple[Float[Array, " batch"], Float[Array, " batch"]]:
    """Per-sample `(‖f(z) − z‖₂, ‖f(z) − z‖₂ / ‖f(z)‖₂)`, in `stats_dtype`.

    The norms are plain sums of squares in the working dtype. When `‖f(z)‖²` overflows
    (entries beyond about `1.8e19 / √N` in float32) the relative error is reported as
    `inf` rather than the `0` the division would give, so that such a sample is never
    taken to meet `rtol`; an overflowing `‖f(z) − z‖²` makes `abs_err` infinite, which
    the loop reports as DIVERGED.
    """
    wide = working_dtype(z.dtype)
    fz = fz.astype(wide)
    abs_err = jnp.sqrt(squared_norms(fz - z.astype(wide)))
    scale = jnp.sqrt(squared_norms(fz))
    rel_err = abs_err / jnp.where(scale > 0, scale, 1)
    rel_err = jnp.where(jnp.isinf(scale), jnp.inf, rel_err)
    return abs_err, rel_err


class BanaxPrecisionWarning(UserWarning):
    """A solver's tolerances are finer than the state's dtype can resolve, so the solve
    will most likely run to `max_steps` (see `check_tolerances`)."""


def reachable_tolerances(dtype: Any, features: int) -> tuple[float, float]:
    """`(rtol, atol)` below which a state of `dtype` with `features` entries per sample
    cannot be trusted to stop: `ε` and `ε √N`, with `ε` the dtype's machine epsilon.

    Rounding an iterate and its image `f(z)` to the state's dtype leaves a relative
    residual `‖f(z) − z‖ / ‖f(z)‖` of a fraction of `ε` (measured: 0.2–0.45 ε for
    bfloat16 and float32 tanh cells of 16 to 256 features, Picard, Anderson and
    Broyden alike), which no solver can go below. The absolute residual is then about
    `ε ‖z‖`, i.e. `ε √N` for entries of order one.
    """
    eps = float(jnp.finfo(dtype).eps)
    return eps, eps * math.sqrt(features)


def check_tolerances(solver: Solver, dtype: Any, features: int) -> None:
    """Warn (at trace time) when every enabled stopping test of `solver` is finer than
    `reachable_tolerances(dtype, features)`; one reachable test is enough for the loop
    to stop. Nothing is said when both tests are disabled (a fixed number of steps)."""
    rtol_floor, atol_floor = reachable_tolerances(dtype, features)
    enabled = [t for t in ((solver.rtol, rtol_floor), (solver.atol, atol_floor)) if t[0] > 0]
    if enabled and all(tol < floor for tol, floor in enabled):
        name = jnp.dtype(dtype).name
        warnings.warn(
            f"{type(solver).__name__}: atol={solver.atol!r}, rtol={solver.rtol!r} are "
            f"finer than a {name} state can resolve; the residual of an iterate rounded "
            f"to {name} stalls near its machine epsilon, so this solve will likely run "
            f"to max_steps. Use rtol >= {rtol_floor:.3g} (or atol >= {atol_floor:.3g} "
            f"for {features} entries of order one per sample), or a wider dtype.",
            BanaxPrecisionWarning,
            stacklevel=2,
        )


def _freeze(active: Bool[Array, " batch"], new: Any, old: Any) -> Any:
    """Keep `old` for the samples that are no longer active (batch axis first)."""

    def pick(n: Any, o: Any) -> Any:
        if not eqx.is_array(n) or n.ndim == 0:
            return n
        return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(pick, new, old)


def _freeze_all(running: Bool[Array, ""], new: Any, old: Any, scalars_only: bool = False
                ) -> Any:
    """`new` if `running`, else `old`, leaf by leaf: for what has no batch axis (the
    trace, and with `scalars_only` the scalar leaves of a solver state)."""

    def pick(n: Any, o: Any) -> Any:
        if not eqx.is_array(n) or (scalars_only and n.ndim > 0):
            return n
        return jnp.where(running, n, o)

    return jax.tree.map(pick, new, old)


def check_step_budget(
    step_budget: Any, name: str = "step_budget"
) -> Int[Array, ""] | None:
    """Validate a step budget (`name` is the argument's name in the messages): `None`
    or an integer JAX array of shape `()`."""
    if step_budget is None:
        return None
    if not isinstance(step_budget, (jax.Array, np.ndarray)):
        raise TypeError(
            f"{name} must be a JAX array or None, got {type(step_budget).__name__} "
            f"{step_budget!r}. Pass jnp.array({step_budget!r}) so that changing it does "
            "not recompile."
        )
    if step_budget.shape != () or not jnp.issubdtype(step_budget.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be a scalar integer array, got shape "
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
            steps=c.steps + keep.astype(jnp.int32) if count_steps else None,
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
    if not count_steps:
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


def solve_flat(
    solver: Solver,
    fn: Callable[[FlatState], FlatState],
    z0: FlatState,
    step_budget: Int[Array, ""] | None = None,
) -> FlatSolution:
    """Find `z = fn(z)` for an untraced flat function (e.g. a backward linear system).

    Samples along the first axis are independent, so per-sample stopping applies.
    """
    return solver.run(lambda z, trace, tag=None: (fn(z), trace), z0, None, step_budget)
