"""`Problem`: a validated fixed-point call, as solvers and adjoints see it.

`make_problem` is where every call is checked; its errors are raised at trace time with a
message that says what to change.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Int

from ._fspec import BoundFunction, FSpec, bind
from ._layout import FlatState, as_state, layout_of
from ._numerics import check_step_budget
from ._options import FlagOption
from ._pytrees import describe, same_shapes, same_structure
from ._solution import FlatSolution, Solution
from ._trace import TracedFunction, check_trace


class Problem(eqx.Module):
    """A validated fixed-point problem, as an adjoint sees it.

    - `f`: the `TracedFunction` (its `bound` field holds the parameters that gradients
        flow to; `f.evaluate(z)` is the untraced flat map; `f.layout` maps pytrees to
        the flat `(B, N)` state and back).
    - `z0`: the flat initial state.
    - `trace_init`: the initial trace accumulator (`None` when not tracing).
    - `step_budget`: an integer array or `None`. It is clamped to
        `[0, solver.max_steps]`: a negative budget runs no step (the result is then
        `MAX_STEPS` unless `x0` already meets the tolerance).
    - `backward_budget`, `backward_probe`: the call's cap on the backward solve's
        steps (an integer array or `None`) and its `banax.BackwardStats` probe (or
        `None`); set by `Adjoint.__call__`, read by the backward rules.
    """

    f: TracedFunction
    z0: FlatState
    trace_init: Any
    step_budget: Int[Array, ""] | None
    backward_budget: Int[Array, ""] | None = None
    backward_probe: Any = None

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


def _evaluate(bound: BoundFunction, x0: Any) -> Any:
    """`f(x0)` abstractly; an error of f's own is re-raised saying how f was called."""
    try:
        return eqx.filter_eval_shape(bound, x0)
    except (TypeError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        hint = ""
        if len(bound.args) == 1 and isinstance(bound.args[0], list):
            hint = (
                " The second element of f_spec is a list, which f receives as ONE "
                "argument; pass a tuple, (f, (a, b)), to give f several."
            )
        keywords = f" and keywords {sorted(bound.kwargs)}" if bound.kwargs else ""
        raise (TypeError if isinstance(error, TypeError) else ValueError)(
            f"f failed when called as f(x0, *args, **kwargs) with x0 "
            f"{describe(jax.eval_shape(lambda: x0))}, {len(bound.args)} extra "
            f"positional argument(s){keywords}: {type(error).__name__}: {reason}{hint} "
            "Check that x0 has the structure and shapes f expects and that f_spec passes "
            "f's extra arguments: f, (f, arg), (f, (arg1, arg2)) or (f, args, kwargs)."
        ) from error


def make_problem(
    f_spec: FSpec,
    x0: Any,
    *,
    has_aux: FlagOption,
    trace: tuple[Callable[..., Any], Any] | None,
    step_budget: Any,
    batch_axis: int | None,
) -> Problem:
    """Validate a call and build its `Problem`; every error here is raised at trace
    time with a message that says what to change."""
    bound = bind(f_spec)
    if isinstance(has_aux, np.bool_):
        has_aux = bool(has_aux)
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be True or False, got {has_aux!r}.")
    budget = check_step_budget(step_budget)
    x0 = as_state(x0)
    layout = layout_of(x0, batch_axis)
    x_shape = jax.eval_shape(lambda x: x, x0)
    out = _evaluate(bound, x0)
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(
                "has_aux=True, so f must return a pair (fx, f_aux); it returned "
                f"{describe(out)}."
            )
        fx, aux = out
        if not same_structure(fx, x_shape) and same_structure(out, x_shape):
            raise ValueError(
                "has_aux=True, so f's output was taken apart as (fx, f_aux), but the "
                f"whole output is the state: x0 is {describe(x_shape)} and f(x0) is "
                f"{describe(out)}. Pass has_aux=False, or return the auxiliary output "
                "beside the state: return (fx1, fx2), f_aux."
            )
    else:
        fx, aux = out, None
    if same_shapes(fx, x_shape) and not same_structure(fx, x_shape):
        dtype = jax.tree.leaves(fx)[0].dtype
        raise ValueError(
            f"f changes the state's dtype: x0 is {describe(x_shape)} but f(x0) is "
            f"{describe(fx)}. The solver iterates in x0's dtype: pass x0 in the dtype f "
            f"computes in (e.g. x0.astype(jnp.{dtype})), or make f return its output in "
            "the state's dtype (fx.astype(x.dtype))."
        )
    if not same_structure(fx, x_shape):
        hint = (
            " If f returns (fx, f_aux), pass has_aux=True."
            if not has_aux and isinstance(out, tuple) and len(out) == 2 else ""
        )
        raise ValueError(
            "f must return a state with the same structure (pytree, shapes and dtypes) as "
            f"x0. x0 is {describe(x_shape)} but f(x0) is {describe(fx)}.{hint}"
        )
    trace_fn, trace_init = None, None
    if trace is not None:
        trace_fn, trace_init = check_trace(trace, x_shape, fx, aux)
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
