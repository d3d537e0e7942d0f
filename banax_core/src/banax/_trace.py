"""The trace protocol: a fold over every evaluation of f.

A trace is a pair `(trace_fn, trace_init)`. Each time `f` is evaluated at `x`, the
accumulator becomes `trace_fn(acc, x, fx, f_aux, **tags)`; solvers add tags such as
`tag="line_search"` at inner trial evaluations. The fold is owned here so that no
solver re-implements it: a solver only ever calls the `TracedFunction` it is given.

The accumulator lives in a loop carry, so its structure, shapes and dtypes are fixed by
`trace_init`. Leaves of `trace_init` given as Python numbers (weakly typed, like
`jnp.array(0)`) take the dtype `trace_fn` computes for them; a typed leaf keeps its
dtype, and `trace_fn` may return a dtype that casts into it without loss (float32
into float64, int into float). Anything else (a float result into an int accumulator,
float64 into float32) is a `TypeError` at the call rather than a silent cast.
"""

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._fspec import BoundFunction
from ._layout import FlatState, Layout
from ._pytrees import describe

TraceFn = Callable[..., Any]
"""`trace_fn(acc, x, fx, f_aux, **tags) -> acc`."""

_SIGNATURE = "trace_fn(acc, x, fx, f_aux, **tags) -> acc"


def _kind(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of length {len(obj)}"
    return f"a {type(obj).__name__}"


def _check_signature(trace_fn: TraceFn, tag: str | None) -> None:
    """Refuse a trace function that cannot be called as the loop calls it."""
    try:
        signature = inspect.signature(trace_fn)
    except (TypeError, ValueError):  # a builtin or C callable: let the call decide
        return
    try:
        signature.bind(None, None, None, None, **({} if tag is None else {"tag": tag}))
    except TypeError:
        if tag is None:
            raise TypeError(
                f"trace_fn is called as {_SIGNATURE}, with four positional arguments, "
                f"but it has the signature {signature}. Define it as "
                "def trace_fn(acc, x, fx, f_aux, **tags): ...; f_aux is None unless "
                "has_aux=True."
            ) from None
        raise TypeError(
            f"The solver evaluates f at a trial point and calls trace_fn with "
            f"tag={tag!r}, but trace_fn has the signature {signature}, which takes no "
            f"such keyword. Define it as {_SIGNATURE} (accept **tags), or use a solver "
            "without trial evaluations (e.g. Broyden with ls_steps=0)."
        ) from None


def check_accumulator(init: Any, out: Any) -> None:
    """Raise unless `out` (what `trace_fn` returned) fits the accumulator `init`: the
    same structure and shapes, and dtypes that cast into `init`'s without loss."""
    same = jax.tree.structure(out) == jax.tree.structure(init) and all(
        np.shape(o) == np.shape(i) for o, i in zip(jax.tree.leaves(out), jax.tree.leaves(init))
    )
    if not same:
        raise ValueError(
            "trace_fn must return an accumulator with the structure and shapes of "
            f"trace_init: trace_init is {describe(init)} but trace_fn returned "
            f"{describe(out)}."
        )
    lossy = [
        (i.dtype, o.dtype) for i, o in zip(jax.tree.leaves(init), jax.tree.leaves(out))
        if not np.can_cast(o.dtype, i.dtype, casting="safe")
    ]
    if lossy:
        into, got = lossy[0]
        raise TypeError(
            f"trace_fn returns {got} where trace_init holds {into}: the accumulator "
            f"keeps trace_init's dtypes, and {got} does not cast into {into} without "
            f"loss. trace_init is {describe(init)} and trace_fn returned "
            f"{describe(out)}; give trace_init the dtype trace_fn computes in (e.g. "
            f"jnp.zeros(shape, jnp.{got})), or a Python number, which takes that dtype."
        )


def check_trace(trace: Any, x: Any, fx: Any, f_aux: Any) -> tuple[TraceFn, Any]:
    """Validate `trace=(trace_fn, trace_init)` against the abstract `x`, `fx` and
    `f_aux` of the call; return `trace_fn` and `trace_init` as arrays, its Python
    numbers given the dtype `trace_fn` computes for them."""
    if not (isinstance(trace, tuple) and len(trace) == 2 and callable(trace[0])):
        got = (f"a pair whose first element is a {type(trace[0]).__name__}, not callable"
               if isinstance(trace, tuple) and len(trace) == 2 else _kind(trace))
        raise TypeError(
            f"trace must be a pair (trace_fn, trace_init) with {_SIGNATURE}; got {got}. "
            "See banax.trace_count and friends."
        )
    trace_fn, init = trace

    def as_leaf(path: Any, leaf: Any) -> Any:
        if isinstance(leaf, (bool, int, float, complex, np.generic, np.ndarray)) or \
                eqx.is_array(leaf):
            return jnp.asarray(leaf)
        raise TypeError(
            f"trace_init must be a pytree of arrays or numbers, but trace_init"
            f"{jax.tree_util.keystr(path)} is a {type(leaf).__name__}: {leaf!r}."
        )

    init = jax.tree_util.tree_map_with_path(as_leaf, init)
    _check_signature(trace_fn, None)

    def evaluate(acc: Any) -> Any:
        try:
            return jax.eval_shape(trace_fn, acc, x, fx, f_aux)
        except (TypeError, ValueError) as error:
            raise (TypeError if isinstance(error, TypeError) else ValueError)(
                f"trace_fn failed when called as trace_fn(acc, x, fx, f_aux) with acc "
                f"{describe(jax.eval_shape(lambda: acc))}, x {describe(x)}, fx "
                f"{describe(fx)}: {error}"
            ) from error

    init_shape = jax.eval_shape(lambda: init)
    out = evaluate(init)
    if jax.tree.structure(out) == jax.tree.structure(init_shape):
        init = jax.tree.map(
            lambda i, s, o: i.astype(o.dtype)
            if s.weak_type and s.shape == o.shape and s.dtype != o.dtype else i,
            init, init_shape, out,
        )
        out = evaluate(init)
    try:
        check_accumulator(jax.eval_shape(lambda: init), out)
    except ValueError as error:
        if f_aux is None and jax.tree.leaves(init) and not jax.tree.leaves(out):
            raise ValueError(
                f"{error} trace_fn was given f_aux=None: f_aux is None unless "
                "has_aux=True (e.g. for trace_last_aux)."
            ) from None
        raise
    return trace_fn, init


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
            if tag is not None:
                _check_signature(self.trace_fn, tag)
            extra = {} if tag is None else {"tag": tag}
            new = jax.tree.map(jnp.asarray, self.trace_fn(trace, x, fx, aux, **extra))
            check_accumulator(trace, new)
            # The loop carry's dtypes are trace_init's (lossless casts only, see above).
            trace = jax.tree.map(lambda n, o: n.astype(o.dtype), new, trace)
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
