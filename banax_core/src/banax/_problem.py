"""`Problem`: a validated fixed-point call, as solvers and adjoints see it.

`make_problem` is where every call is checked; its errors are raised at trace time with a
message that says what to change.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from ._fspec import FSpec, bind
from ._layout import FlatState, layout_of
from ._loop import FlatSolution, check_step_budget
from ._solution import Solution
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
