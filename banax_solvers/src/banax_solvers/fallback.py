"""A solver that hands the samples one solver fails on to another."""

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from banax import Result, Stats
from banax.extend import (
    AbstractSolveCombinator,
    AbstractSolver,
    FlatSolution,
    as_solver,
    solve,
    where_per_sample,
)

from ._common import Flat


class FallbackState(eqx.Module):
    """The final states of both phases, and which samples the secondary solved.

    `secondary` is all zeros when no sample needed the secondary (it did not run).
    """

    primary: Any
    secondary: Any
    fallback: Bool[Array, " batch"]


class Fallback(AbstractSolveCombinator):
    """Run `primary`; solve the samples it failed on again with `secondary`.

    A combinator of two whole solves (a `banax.extend.AbstractSolveCombinator`), not
    a solver with a step of its own.

    A sample fails when the primary leaves it `DIVERGED` or at `MAX_STEPS`. The
    secondary restarts each failed sample from the primary's lowest-residual finite
    iterate (the primary runs with `keep_best=True` for this), while the samples that
    converged keep the primary's answer and are frozen during the second phase (the map
    the secondary sees is the identity on them, so they stop at its first test). The
    second phase sits under `lax.cond`: when every sample converged it costs only the
    predicate. (Under `jax.vmap` a `cond` becomes a `select` and both phases always
    run: prefer batch mode to `vmap` here.)

    A typical pairing is a cheap, robust primary and a stronger secondary:
    `Fallback(primary="picard", secondary={"name": "anderson", "max_steps": 100})`, or
    a fast but fragile primary (Broyden) with a forgiving secondary (Relaxed).

    **Statistics and results.** `stats.steps` counts the steps of both phases; the
    residuals and the result of a failed sample are the secondary's. The state is a
    `FallbackState` (both final states and the per-sample `fallback` mask).

    **Options.** The shared options are read off the two solvers, not set here:
    `batch_axis` (both must agree), `atol`/`rtol`/`keep_best` (the secondary's: it has
    the last word), `max_steps` (the sum), and `loop_kind` (`"lax"` unless both are
    reverse-differentiable). A `step_budget` caps the two phases together: the secondary
    gets what the primary left of it.

    **Pairings.** A fallback is a pair of whole solves, so it has no single step: it
    does not invert its step (the `Reversible` adjoint refuses it) and exposes no
    low-rank inverse-Jacobian factors (`GDEQ` refuses it); `BPTT` needs both solvers
    with a reverse-differentiable `loop_kind`. `Implicit`, `JFB` and the phantom
    gradients only use the fixed point and work with any pair.

    A poor choice when most samples fail the primary: then both phases run every time,
    and the secondary alone is cheaper.

    **Arguments:**

    - `primary`, `secondary`: each a `banax.Solver` instance, a registry name
        (`"picard"`), or `{"name": "anderson", **options}`. They must differ.
    """

    primary: AbstractSolver
    secondary: AbstractSolver

    def __init__(
        self,
        primary: AbstractSolver | str | Mapping[str, Any] | None = None,
        secondary: AbstractSolver | str | Mapping[str, Any] | None = None,
        **shared: Any,
    ):
        if shared:
            raise TypeError(
                f"Fallback: {', '.join(sorted(shared))} cannot be set on the fallback; "
                "its shared options are read off the two solvers, so set them there, "
                "e.g. secondary={'name': 'anderson', 'rtol': 1e-6}."
            )
        solvers: list[AbstractSolver] = []
        for option, spec in (("primary", primary), ("secondary", secondary)):
            if spec is None:
                raise TypeError(
                    f"Fallback: {option}= is missing; give both solvers, e.g. "
                    "Fallback(primary='picard', secondary='anderson')."
                )
            solvers.append(as_solver(spec, owner="Fallback", option=option))
        primary, secondary = solvers
        if primary == secondary:
            raise ValueError(
                f"Fallback: primary and secondary are the same solver ({primary!r}); the "
                "secondary would repeat the primary's failure. Choose a different "
                "secondary, e.g. secondary='anderson' after a Picard primary."
            )
        if primary.batch_axis != secondary.batch_axis:
            raise ValueError(
                f"Fallback: primary has batch_axis={primary.batch_axis} but secondary has "
                f"batch_axis={secondary.batch_axis}; give both the same batch_axis."
            )
        self.primary = primary
        self.secondary = secondary
        self.atol = secondary.atol
        self.rtol = secondary.rtol
        self.max_steps = primary.max_steps + secondary.max_steps
        differentiable = "lax" not in (primary.loop_kind, secondary.loop_kind)
        self.loop_kind = primary.loop_kind if differentiable else "lax"
        self.batch_axis = primary.batch_axis
        self.keep_best = secondary.keep_best

    @property
    def differentiable_step(self) -> bool:
        return self.primary.differentiable_step and self.secondary.differentiable_step

    def run(
        self, f: Callable[..., tuple[Flat, Any]], z0: Flat, trace: Any,
        step_budget: Int[Array, ""] | None,
    ) -> FlatSolution:
        if step_budget is not None:
            step_budget = jnp.clip(step_budget, 0, self.max_steps)
        primary = eqx.tree_at(lambda s: s.keep_best, self.primary, True)
        first = solve(primary, f, z0, trace, step_budget)
        redo = first.result != Result.CONVERGED
        budget = None
        if step_budget is not None:
            used = jnp.max(jnp.where(redo, first.stats.steps, 0))
            budget = jnp.maximum(step_budget - used, 0).astype(step_budget.dtype)

        def only_failed(z: Flat, trace: Any, **tags: Any) -> tuple[Flat, Any]:
            # The identity on converged samples: their residual is exactly 0, so the
            # secondary's loop stops them before its first step.
            fz, trace = f(z, trace, **tags)
            return where_per_sample(redo, fz, z), trace

        def second_phase() -> FlatSolution:
            return solve(self.secondary, only_failed, first.z, first.trace, budget)

        def skip() -> FlatSolution:
            shape = jax.eval_shape(second_phase)
            return FlatSolution(
                z=first.z, fz=first.fz,
                state=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape.state),
                result=first.result,
                stats=Stats(steps=jnp.zeros_like(first.stats.steps),
                            abs_err=first.stats.abs_err, rel_err=first.stats.rel_err),
                trace=first.trace,
            )

        second = jax.lax.cond(jnp.any(redo), second_phase, skip)
        z, fz, result, abs_err, rel_err = where_per_sample(
            redo,
            (second.z, second.fz, second.result, second.stats.abs_err, second.stats.rel_err),
            (first.z, first.fz, first.result, first.stats.abs_err, first.stats.rel_err),
        )
        return FlatSolution(
            z=z,
            fz=fz,
            state=FallbackState(primary=first.state, secondary=second.state, fallback=redo),
            result=result,
            stats=Stats(steps=first.stats.steps + second.stats.steps,
                        abs_err=abs_err, rel_err=rel_err),
            trace=second.trace,
        )
