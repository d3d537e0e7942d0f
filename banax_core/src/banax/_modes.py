"""The layer's two other modes: inference settings and unrolled pre-training.

- *Inference settings* (torchdeq's `eval_factor`): a separate step cap and tolerance
  for the forward solve under `eqx.nn.inference_mode`, where no gradient is needed
  and a looser or longer solve may pay off.
- *Unrolled pre-training* (MDEQ, DEQ.jl): a fixed number of cell applications from
  `z0`, differentiated by backpropagation, as a warm-up before equilibrium training.
  It changes no parameter, so the same model switches in and out of it.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._adjoint import Adjoint
from ._layout import layout_of
from ._numerics import residual_norms
from ._options import check_options
from ._solution import Result, Solution, Stats
from ._solver import AbstractSolveCombinator, AbstractSolver

INFERENCE_OPTIONS = ("max_steps", "rtol", "atol")


def inference_adjoint(adjoint: Adjoint, options: dict[str, Any]) -> Adjoint:
    """`adjoint` with its forward solver's `options` replaced (validated)."""
    if not options:
        return adjoint
    names = sorted(options)
    solver = eqx.tree_at(
        lambda s: [getattr(s, n) for n in names], adjoint.solver,
        [options[n] for n in names],
    )
    return eqx.tree_at(lambda a: a.solver, adjoint, solver)


def check_inference_options(adjoint: Adjoint, options: Any) -> dict[str, Any]:
    """Validate `inference=` options at construction; return them as a dict."""
    if options is None:
        return {}
    if not isinstance(options, dict) or not set(options) <= set(INFERENCE_OPTIONS):
        raise TypeError(
            f"DEQ: inference_settings must be a dict with keys among {INFERENCE_OPTIONS} (the "
            f"forward solve's settings under eqx.nn.inference_mode), got {options!r}."
        )
    solver = adjoint.solver
    if isinstance(solver, AbstractSolveCombinator):
        raise TypeError(
            f"DEQ: inference_settings replace the solver's own max_steps/rtol/atol, but "
            f"{type(solver).__name__} runs other solvers; set the inference settings on "
            "those (e.g. a second DEQ built with the inference solver)."
        )
    # `eqx.tree_at` skips `__check_init__`: run the checks on the edited solver.
    check_options(inference_adjoint(adjoint, options).solver)
    return dict(options)


def check_pretrain_steps(steps: Any) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ValueError(
            f"DEQ: pretrain_steps must be None (solve for the fixed point) or an int >= 1 "
            f"(apply the cell that many times and backpropagate), got {steps!r}."
        )


def unrolled(f: Any, z0: Any, steps: int, solver: AbstractSolver) -> Solution:
    """Apply `f` `steps` times from `z0`, differentiably (a scan), and report the last
    step's residual `‖z_K − z_{K−1}‖` against the solver's tolerance."""
    z_prev = jax.lax.fori_loop(0, steps - 1, lambda _, z: f(z), z0)
    z = f(z_prev)
    layout = layout_of(z, solver.batch_axis)
    abs_err, rel_err = residual_norms(layout.flatten(z_prev), layout.flatten(z))
    ok = solver.meets_tolerance(abs_err, rel_err)
    result = jnp.where(ok, Result.CONVERGED, Result.MAX_STEPS).astype(jnp.int32)
    stats = Stats(steps=jnp.full(abs_err.shape, steps, jnp.int32), abs_err=abs_err,
                  rel_err=rel_err)
    if solver.batch_axis is None:
        result, stats = jax.tree.map(lambda a: a[0], (result, stats))
    return Solution(value=z, result=result, stats=stats, trace=None)
