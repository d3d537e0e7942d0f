"""The trace protocol: a fold over every evaluation of f.

A trace is a pair `(trace_fn, trace_init)`. Each time `f` is evaluated at `x`, the
accumulator becomes `trace_fn(acc, x, fx, f_aux, **tags)`; solvers add tags such as
`tag="line_search"` at inner trial evaluations. The fold is owned here so that no
solver re-implements it: a solver only ever calls the `TracedFunction` it is given.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._fspec import BoundFunction
from ._layout import FlatState, Layout

TraceFn = Callable[..., Any]
"""`trace_fn(acc, x, fx, f_aux, **tags) -> acc`."""


class TracedFunction(eqx.Module):
    """`f` as a solver sees it: flat `(B, N)` states in and out, tracing folded in.

    Call it as `fz, trace = f(z, trace)` (or `f(z, trace, tag="line_search")` for an
    evaluation that is a trial rather than an iterate) and thread `trace` through your
    step. The trace value is opaque to solvers; it is `None` when nothing is traced.
    """

    bound: BoundFunction
    layout: Layout
    has_aux: bool = eqx.field(static=True)
    trace_fn: TraceFn | None = eqx.field(static=True)

    def __call__(
        self, z: FlatState, trace: Any, *, tag: str | None = None
    ) -> tuple[FlatState, Any]:
        x = self.layout.unflatten(z)
        fx, aux = self.split_aux(self.bound(x))
        if self.trace_fn is not None:
            extra = {} if tag is None else {"tag": tag}
            new = self.trace_fn(trace, x, fx, aux, **extra)
            # The accumulator lives in a while-loop carry, whose dtypes are fixed.
            trace = jax.tree.map(
                lambda n, o: jnp.asarray(n).astype(jnp.result_type(o)), new, trace
            )
        return self.layout.flatten(fx), trace

    def evaluate(self, z: FlatState) -> FlatState:
        """`f(z)` without tracing, for adjoints' backward passes."""
        fx, _ = self.split_aux(self.bound(self.layout.unflatten(z)))
        return self.layout.flatten(fx)

    def split_aux(self, out: Any) -> tuple[Any, Any]:
        return out if self.has_aux else (out, None)

    def with_bound(self, bound: BoundFunction) -> "TracedFunction":
        """The same function with other parameters (e.g. a differentiated copy)."""
        return eqx.tree_at(lambda t: t.bound, self, bound)
