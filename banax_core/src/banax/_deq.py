"""`DEQ`: a deep equilibrium layer as an Equinox module."""

import dataclasses
import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from ._adjoint import Adjoint
from ._batch_checks import batch_size, check_batch_follows, check_independence, shapes_of
from ._failures import context, report_forward
from ._fspec import FSpec, bind
from ._keys import key_shape
from ._layout import as_state
from ._modes import check_inference_options, check_pretrain_steps, inference_adjoint, unrolled
from ._options import IntOption
from ._pytrees import describe, same_shapes, same_structure
from ._registry import as_adjoint
from ._solution import BackwardStats, Solution
from ._solver import AbstractSolver
from ._stateful import FrozenState, check_stateful
from .nn._cell import AbstractCell

ComponentSpec = str | Mapping[str, Any]
"""A registry name such as `"anderson"`, or `{"name": "anderson", **options}`."""

INIT_RULES = ("zeros",)


def _resolve_adjoint(
    solver: AbstractSolver | ComponentSpec | None, adjoint: Adjoint | ComponentSpec
) -> Adjoint:
    if isinstance(adjoint, Adjoint):
        if solver is not None:
            raise TypeError(
                "DEQ: adjoint is an instance, which already holds its solver; drop "
                "solver=, or give the adjoint by name (adjoint='implicit') so that "
                "solver= is passed to it."
            )
        return adjoint
    spec = {"name": adjoint} if isinstance(adjoint, str) else adjoint
    if solver is not None and isinstance(spec, Mapping):
        if "solver" in spec:
            raise TypeError(
                "DEQ: the solver is given twice, as solver= and inside the adjoint's "
                "options; keep one."
            )
        spec = {**spec, "solver": solver}
    return as_adjoint(spec, owner="DEQ")


def _shape_tuple(state_shape: Any) -> tuple[int, ...]:
    if isinstance(state_shape, numbers.Integral) and not isinstance(state_shape, bool):
        state_shape = (state_shape,)
    if not (
        isinstance(state_shape, (tuple, list))
        and all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_))
                and int(s) > 0 for s in state_shape)
    ):
        raise TypeError(
            "DEQ: state_shape must be a tuple of positive ints (the shape of one "
            f"sample's state, without the batch axis), got {state_shape!r}."
        )
    return tuple(int(s) for s in state_shape)


class DEQ(eqx.Module):
    """A deep equilibrium layer: maps an input `x` to the fixed point `z*` of a cell.

    The layer solves `z* = cell(z*, x)` with its adjoint's solver and returns `z*`,
    which carries gradients to the cell's arrays and to `x` by the adjoint's rule (the
    implicit function theorem for `"implicit"`: `θ̄ = (∂f/∂θ)ᵀ (I − ∂f/∂z)⁻ᵀ ḡ`). Use it
    like any Equinox layer: inside `eqx.filter_jit`, `eqx.filter_value_and_grad` and an
    optax update.

    **Arguments:**

    - `cell`: a callable `cell(z, x) -> z'`, usually an `eqx.Module` (its arrays are
        the trainable parameters). It must return a state with the structure, shape
        and dtype of `z`, and should be a contraction in `z` for the solve to converge.
        A cell with random layers (`eqx.nn.Dropout`) takes a keyword `key` and is
        called as `cell(z, x, key=key)` when the layer is given `key=`.
    - `solver`: a `Solver` instance, a registry name (`"anderson"`) or
        `{"name": "anderson", **options}`. Leave it `None` when `adjoint` is an
        instance (which already holds its solver).
    - `adjoint`: an `Adjoint` instance, a registry name (`"implicit"`) or
        `{"name": "implicit", **options}` (e.g. `{"name": "implicit", "b_solver":
        "picard"}`); names are resolved by `banax.get_adjoint`.
    - `init`: the initial state rule. `"zeros"` starts from zeros of `state_shape`
        (in the dtype of the cell's and the input's arrays), or from
        `cell.zero_state(x)` for a `banax.nn.AbstractCell` given no `state_shape`; a
        callable `x -> z0` builds `z0` from the input. Gradients do not flow through
        `z0`.
    - `state_shape`: the shape of one sample's state, without the batch axis; needed
        by `init="zeros"` unless the cell is a `banax.nn.AbstractCell` (banax's own
        cells are), which says its zero state itself, whatever its structure.
    - `check_independence`: in batch mode, check at every call that the cell keeps
        samples apart (one JVP at `z0` with a tangent on sample 0 only, or one VJP
        for a cell with a `jax.custom_vjp`; about two extra cell evaluations per
        call; a cell that mixes samples raises at run time). A debugging aid: leave
        it off in training.
    - `inference_settings`: the forward solve's `max_steps`, `rtol` and/or `atol`
        under `eqx.nn.inference_mode(deq)` (torchdeq's `eval_factor`), e.g.
        `{"max_steps": 100, "rtol": 1e-6}`; the other settings are the solver's.
    - `inference`: whether the layer is in inference mode (set by
        `eqx.nn.inference_mode`, which also turns the cell's dropout off). A leaf, as
        is an int `pretrain_steps`: `eqx.tree_serialise_leaves` writes both, and
        loading restores them from the file (docs/compatibility.md).
    - `pretrain_steps`: `None` to solve for the fixed point; an int `K` to apply the
        cell `K` times from `z0` instead, differentiated by backpropagation (unrolled
        pre-training, as in MDEQ). Switch it on a built model with
        `eqx.tree_at(lambda d: d.pretrain_steps, deq, K)` (and back with `None`):
        the parameters are untouched.

    **Batch mode.** When the solver has `batch_axis=b` (e.g.
    `solver={"name": "anderson", "batch_axis": 0}`), `x` must carry the batch on axis
    `b` too; the zero state then gets the batch inserted at axis `b`, and each sample
    has its own residual, stopping and statistics while the cell is called once on the
    whole batch. Without a batch axis the state is exactly `state_shape`; map the layer
    with `jax.vmap` for per-sample solves with per-example cost.

    Batch mode is sound only if axis `b` of `x` indexes samples and the cell treats
    them independently. The first is checked at trace time, for free: the cell is
    traced once more with one more sample, which an `x` without its batch axis (its
    feature axis taken as the batch) fails. The same trace is read for a reduction, a
    matrix product or a convolution over the batch axis (a mean over the batch;
    sequences `(N, L, C)` given to a cell of images), which is refused at the call.
    Other couplings cannot be seen at trace time and make per-sample residuals and
    stopping wrong, silently; `check_independence=True` detects them.
    An empty batch is an error.

    A DEQ is a poor choice when the cell is far from contractive: the solve then needs
    many steps or fails (check `Solution.result`), and a few unrolled layers train
    faster.
    """

    cell: Callable[..., Any]
    # Configuration, not parameters: static, so that a checkpoint of the layer holds only
    # the cell's (and the init rule's) arrays and loads under any other solver or adjoint.
    adjoint: Adjoint = eqx.field(static=True)
    init: str | Callable[[Any], Any]
    state_shape: tuple[int, ...] | None = eqx.field(static=True)
    check_independence: bool = eqx.field(static=True)
    inference_settings: tuple[tuple[str, Any], ...] = eqx.field(static=True)
    # Plain fields, so that eqx.nn.inference_mode and eqx.tree_at switch them on a
    # trained model without touching its parameters; a checkpoint holds them too.
    inference: bool
    pretrain_steps: int | None

    def __init__(
        self,
        cell: Callable[..., Any],
        solver: AbstractSolver | ComponentSpec | None = None,
        adjoint: Adjoint | ComponentSpec = "implicit",
        *,
        init: str | Callable[[Any], Any] = "zeros",
        state_shape: IntOption | tuple[IntOption, ...] | None = None,
        check_independence: bool = False,
        inference_settings: Mapping[str, Any] | tuple[tuple[str, Any], ...] | None = None,
        inference: bool = False,
        pretrain_steps: int | None = None,
    ):
        if not callable(cell):
            raise TypeError(
                f"DEQ: cell must be callable as cell(z, x) -> z', got {type(cell).__name__}."
            )
        if isinstance(init, str):
            if init not in INIT_RULES:
                raise ValueError(
                    f"DEQ: init must be one of {INIT_RULES} or a callable x -> z0, got "
                    f"{init!r}."
                )
            if state_shape is None and not isinstance(cell, AbstractCell):
                raise TypeError(
                    "DEQ: init='zeros' needs state_shape, the shape of one sample's "
                    "state (e.g. state_shape=(64,)), unless the cell is a "
                    "banax.nn.AbstractCell, which knows its zero state; or pass "
                    "init=lambda x: z0."
                )
        elif not callable(init):
            raise TypeError(
                f"DEQ: init must be one of {INIT_RULES} or a callable x -> z0, got "
                f"{type(init).__name__}."
            )
        self.cell = cell
        self.adjoint = _resolve_adjoint(solver, adjoint)
        self.init = init
        self.state_shape = None if state_shape is None else _shape_tuple(state_shape)
        if not isinstance(check_independence, bool):
            raise TypeError(
                f"DEQ: check_independence must be True or False, got {check_independence!r}."
            )
        self.check_independence = check_independence
        if isinstance(inference_settings, tuple):
            # The stored form, as `dataclasses.replace` passes it back.
            inference_settings = dict(inference_settings)
        self.inference_settings = tuple(sorted(
            check_inference_options(self.adjoint, inference_settings).items()))
        if not isinstance(inference, bool):
            raise TypeError(f"DEQ: inference must be True or False, got {inference!r}.")
        self.inference = inference
        check_pretrain_steps(pretrain_steps)
        self.pretrain_steps = pretrain_steps

    @property
    def solver(self) -> AbstractSolver:
        """The forward solver (held by the adjoint)."""
        return self.adjoint.solver

    def reconfigure(self, where: Callable[[Adjoint], Any], replace: Any) -> "DEQ":
        """A copy of the layer whose adjoint has `where(adjoint)` replaced by `replace`,
        as `eqx.tree_at` would do; the cell and its parameters are shared.

        The adjoint is configuration held in a static field (so that checkpoints hold
        only parameters), which `eqx.tree_at` cannot reach through the layer; use this
        instead, e.g. `deq.reconfigure(lambda a: a.solver.rtol, 1e-6)` or
        `deq.reconfigure(lambda a: a.b_solver, banax.get_solver("anderson"))`.
        `dataclasses.replace(deq, adjoint=...)` swaps the whole adjoint.
        """
        return dataclasses.replace(self, adjoint=eqx.tree_at(where, self.adjoint, replace))

    def f_spec(self, x: PyTree, key: PRNGKeyArray | None = None,
               state: eqx.nn.State | None = None) -> FSpec:
        """The `FSpec` of the fixed-point map `z ↦ cell(z, x)`: `(cell, (x,))`, with
        `{"key": key}` when a key is given, and for a stateful cell the map
        `z ↦ cell(z, x, state)[0]` with the state held fixed.

        Pass it to a regularizer to penalise the cell's Jacobian at the fixed point,
        e.g. `banax.regularization.jacobian_spectral_norm(deq.f_spec(x), z, key=key)`.
        """
        kwargs = {} if key is None else {"key": key}
        if state is None:
            return self.cell, (x,), kwargs
        return FrozenState(self.cell), (x, state), kwargs

    def initial_state(self, x: PyTree) -> PyTree:
        """The state the solve starts from, by the `init` rule."""
        if callable(self.init):
            return self.init(x)
        dtype = _state_dtype(self.cell, x)
        if self.state_shape is None:
            return jax.tree.map(lambda a: a.astype(dtype), self.cell.zero_state(x))
        shape = self.state_shape
        axis = self.solver.batch_axis
        if axis is not None:
            if axis > len(shape):
                raise ValueError(
                    f"DEQ: the solver's batch_axis={axis} is out of range for a state "
                    f"of per-sample shape {shape}."
                )
            shape = shape[:axis] + (batch_size(x, axis),) + shape[axis:]
        return jnp.zeros(shape, dtype)

    @overload
    def __call__(
        self, x: PyTree, state: eqx.nn.State | None = None, *,
        key: PRNGKeyArray | None = None, z0: PyTree | None = None,
        step_budget: Int[Array, ""] | None = None,
        trace: tuple[Callable[..., Any], Any] | None = None,
        backward_probe: BackwardStats | None = None,
        backward_budget: Int[Array, ""] | None = None,
        return_solution: Literal[False] = False,
    ) -> PyTree | tuple[PyTree, eqx.nn.State]: ...

    @overload
    def __call__(
        self, x: PyTree, state: eqx.nn.State | None = None, *,
        key: PRNGKeyArray | None = None, z0: PyTree | None = None,
        step_budget: Int[Array, ""] | None = None,
        trace: tuple[Callable[..., Any], Any] | None = None,
        backward_probe: BackwardStats | None = None,
        backward_budget: Int[Array, ""] | None = None,
        return_solution: Literal[True],
    ) -> tuple[Any, Solution]: ...

    def __call__(
        self,
        x: PyTree,
        state: eqx.nn.State | None = None,
        *,
        key: PRNGKeyArray | None = None,
        z0: PyTree | None = None,
        step_budget: Int[Array, ""] | None = None,
        trace: tuple[Callable[..., Any], Any] | None = None,
        backward_probe: BackwardStats | None = None,
        backward_budget: Int[Array, ""] | None = None,
        return_solution: bool = False,
    ) -> Any:
        """Solve `z* = cell(z*, x)`.

        **Arguments:**

        - `x`: the input (a pytree of arrays), with the batch on the solver's
            `batch_axis` in batch mode.
        - `state`: for a cell holding Equinox state, `cell(z, x, state) -> (z',
            state')`, its `eqx.nn.State`. It is read once per solve (every iteration
            sees the same state) and updated once per call, by one more evaluation
            of the cell at `z*`; the call then returns `(z*, state')`.
        - `key`: a PRNG key for a cell that takes one (`cell(z, x, key=key)`), e.g.
            to drive an `eqx.nn.Dropout`. The same key is passed to every evaluation of
            the cell in this solve (and its backward pass), so dropout draws one mask
            per call: variational dropout, and `z*` is the fixed point of the cell
            under that mask. `eqx.nn.inference_mode(deq)` turns the dropout off.
        - `z0`: a starting state overriding the `init` rule (e.g. the previous fixed
            point, to warm-start).
        - `step_budget`, `trace`, `backward_probe`, `backward_budget`: passed to the
            adjoint call (see `banax.Adjoint`); a probe reports the backward solve's
            steps, residuals and result as its gradient.
        - `return_solution`: also return the `Solution`, whose `stats` hold the steps
            and residuals (per sample in batch mode) and `result` the outcome.

        **Returns:** `z*` (`(z*, state')` with a state), and the `Solution` beside it
        when `return_solution=True`: `(z*, solution)` or `((z*, state'), solution)`.
        In pre-training mode the solution reports `pretrain_steps` steps and the
        residual of the last cell application.
        """
        x = jax.tree.map(lambda a: a if eqx.is_array(a) else jnp.asarray(a), x)
        _check_key(self.cell, key)
        if isinstance(self.cell, AbstractCell):
            self.cell.check_input(x, batched=self.solver.batch_axis is not None)
        if state is not None:
            check_stateful(self.cell, state)
        if z0 is None:
            z0 = self.initial_state(x)
        else:
            z0 = as_state(z0, "z0")
        f_spec = self.f_spec(x, key, state)
        _check_cell(f_spec, z0, x)
        axis = self.solver.batch_axis
        if axis is not None:
            check_batch_follows(lambda x: bind(self.f_spec(x, key, state)), z0, x, axis)
            if self.check_independence:
                z0 = check_independence(bind(f_spec), z0, axis, "DEQ")
        if self.pretrain_steps is not None:
            solution = unrolled(bind(f_spec), jax.lax.stop_gradient(z0),
                                self.pretrain_steps, self.solver)
            solution = report_forward(self.adjoint, solution, context())
        else:
            adjoint = self.adjoint
            if self.inference:
                adjoint = inference_adjoint(adjoint, dict(self.inference_settings))
            solution = adjoint(
                f_spec, z0, trace=trace, step_budget=step_budget,
                backward_probe=backward_probe, backward_budget=backward_budget,
            )
        out = solution.value
        if state is not None:
            kwargs = {} if key is None else {"key": key}
            # A stateful cell takes its state as a third argument, which a banax cell's
            # signature does not show.
            stateful = cast(Callable[..., Any], self.cell)
            _, new_state = stateful(jax.lax.stop_gradient(out), x, state, **kwargs)
            out = (out, new_state)
        return (out, solution) if return_solution else out


def _state_dtype(cell: Any, x: PyTree) -> Any:
    """The dtype the cell computes in: that of its and the input's float arrays."""
    dtypes = [a.dtype for a in jax.tree.leaves((cell, x)) if eqx.is_inexact_array(a)]
    return jnp.result_type(*dtypes) if dtypes else jnp.result_type(float)


def _key_parameter(cell: Any) -> inspect.Parameter | None | bool:
    """The cell's `key` parameter; `True` when it takes `**kwargs`; `None` when it
    takes no key; `False` when its signature cannot be read."""
    try:
        parameters = inspect.signature(cell).parameters
    except (TypeError, ValueError):
        return False
    key = parameters.get("key")
    if key is not None and key.kind in (key.POSITIONAL_OR_KEYWORD, key.KEYWORD_ONLY):
        return key
    return True if any(p.kind == p.VAR_KEYWORD for p in parameters.values()) else None


def _check_key(cell: Any, key: Any) -> None:
    parameter = _key_parameter(cell)
    if key is None:
        if isinstance(parameter, inspect.Parameter) and parameter.default is parameter.empty:
            raise TypeError(
                f"DEQ: the cell {type(cell).__name__} requires a key (its `key` parameter "
                "has no default); call deq(x, key=key)."
            )
        return
    if parameter is None:
        raise TypeError(
            f"DEQ: key= was given but the cell {type(cell).__name__} takes no key "
            "(it is called as cell(z, x)). Drop key=, or give the cell a keyword "
            "`key=None` and pass it to its random layers, e.g. "
            "`def __call__(self, z, x, *, key=None)` with eqx.nn.Dropout."
        )
    if key_shape(key) != ():
        raise TypeError(
            f"DEQ: key must be a JAX PRNG key such as jax.random.key(0), got {key!r}."
        )


def _check_cell(f_spec: FSpec, z0: PyTree, x: PyTree) -> None:
    """Evaluate the cell abstractly so that a bad input fails here, in one line,
    rather than deep inside the solver's loop."""
    cell = bind(f_spec)
    try:
        out = eqx.filter_eval_shape(cell, z0)
    except (TypeError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        hint = (
            " The cell needs a key: call deq(x, key=key), or turn its dropout off with "
            "eqx.nn.inference_mode(deq)."
            if "key" in reason and "key" not in cell.kwargs
            else " Check the input's shape against the cell's (and state_shape)."
        )
        raise ValueError(
            f"DEQ: the cell failed on x {describe(shapes_of(x))} with state "
            f"{describe(shapes_of(z0))}: {type(error).__name__}: {reason}{hint}"
        ) from None
    state = jax.eval_shape(lambda z: z, z0)
    if same_shapes(out, state) and not same_structure(out, state):
        raise ValueError(
            f"DEQ: the cell changes the state's dtype: the state is "
            f"{describe(shapes_of(z0))} but cell(z, x) returned "
            f"{describe(shapes_of(out))}. Pass z0 in the dtype the cell computes in "
            f"(z0.astype(jnp.{jax.tree.leaves(out)[0].dtype})), or leave z0 out so that "
            "the init rule picks it."
        )
    if not same_structure(out, state):
        raise ValueError(
            f"DEQ: the cell must return a state like the one it is given; the state is "
            f"{describe(shapes_of(z0))} but cell(z, x) returned "
            f"{describe(shapes_of(out))}. "
            "Make state_shape (or the init rule) match the cell's output."
        )

