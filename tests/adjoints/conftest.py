"""Shared test problems for the adjoints: small contractive cells of every state shape
the adjoints must handle, their dense implicit-gradient truth, and one compiled
value-and-grad function that every test goes through.

Tests get these through the `adj` fixture (a namespace), so that each cell, truth and
solver configuration is built once per session.
"""

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import pytest

import banax
from banax.adjoint import BPTT, Implicit, Reversible
from helpers import contraction_matrix, dense_implicit_grad, finite_difference_grad

CELL_NAMES = ("scalar", "vector", "pytree", "batched", "module")


class ModuleCell(eqx.Module):
    """A cell whose weights live inside `f`: gradients must reach them, the positional
    input `x` and the keyword `scale`."""

    weight: jax.Array
    bias: jax.Array

    def __call__(self, z: jax.Array, x: jax.Array, *, scale: jax.Array) -> jax.Array:
        return jnp.tanh(self.weight @ z + self.bias + scale * x)


def _scalar(z, a, b):
    return a * jnp.sin(z) + b


def _vector(z, w, b):
    return jnp.tanh(w @ z + b)


def _pytree(z, w, b):
    flat = jnp.concatenate([z["u"], z["v"].ravel()])
    out = jnp.tanh(w @ flat + b)
    return {"u": out[:3], "v": out[3:].reshape(2, 2)}


def _batched(z, w, x):
    # Samples are independent and one call covers the whole batch.
    return jnp.tanh(z @ w.T + x)


@dataclasses.dataclass(frozen=True)
class Cell:
    """A fixed-point problem `z = fn(z, *args, **kwargs)` with a linear loss `Σ c·z*`.

    `leaf` picks the parameter checked by finite differences."""

    name: str
    spec: tuple
    x0: Any
    c: Any
    batch_axis: int | None
    leaf: Callable[[tuple], jax.Array]


@functools.cache
def make_cell(name: str, dtype: Any = jnp.float64) -> Cell:
    keys = jax.random.split(jax.random.key(CELL_NAMES.index(name)), 4)

    def cast(tree: Any) -> Any:
        def leaf(a: Any) -> Any:
            return jnp.asarray(a, dtype) if isinstance(a, (float, jax.Array)) else a

        return jax.tree.map(leaf, tree)

    if name == "scalar":
        spec = (_scalar, (0.6, 0.3), {})
        x0, c, batch_axis = 0.0, 1.5, None
    elif name == "vector":
        w = contraction_matrix(keys[0], 5, 0.8, symmetric=False)
        spec = (_vector, (w, jax.random.normal(keys[1], (5,))), {})
        x0, c, batch_axis = jnp.zeros(5), jax.random.normal(keys[2], (5,)), None
    elif name == "pytree":
        w = contraction_matrix(keys[0], 7, 0.8, symmetric=False)
        spec = (_pytree, (w, jax.random.normal(keys[1], (7,))), {})
        x0 = {"u": jnp.zeros(3), "v": jnp.zeros((2, 2))}
        c = {"u": jax.random.normal(keys[2], (3,)), "v": jax.random.normal(keys[3], (2, 2))}
        batch_axis = None
    elif name == "batched":
        w = contraction_matrix(keys[0], 4, 0.8, symmetric=False)
        # Samples of very different sizes converge after different numbers of steps.
        x = jax.random.normal(keys[1], (3, 4)) * jnp.array([[0.01], [0.5], [2.0]])
        spec = (_batched, (w, x), {})
        x0, c, batch_axis = jnp.zeros((3, 4)), jax.random.normal(keys[2], (3, 4)), 0
    elif name == "module":
        cell = ModuleCell(
            contraction_matrix(keys[0], 4, 0.8, symmetric=False),
            jax.random.normal(keys[1], (4,)),
        )
        spec = (cell, (jax.random.normal(keys[2], (4,)),), {"scale": 0.7})
        x0, c, batch_axis = jnp.zeros(4), jax.random.normal(keys[3], (4,)), None
    else:
        raise ValueError(name)
    leaf = {
        "scalar": lambda s: s[1][0],
        "vector": lambda s: s[1][1],
        "pytree": lambda s: s[1][1],
        "batched": lambda s: s[1][1],
        "module": lambda s: s[0].bias,
    }[name]
    return Cell(name, cast(spec), cast(x0), cast(c), batch_axis, leaf)


def call(spec: tuple, z: Any) -> Any:
    fn, args, kwargs = spec
    return fn(z, *args, **kwargs)


def linear_loss(c: Any, z: Any) -> jax.Array:
    return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(z)))


def _loss(spec: tuple, adjoint: banax.Adjoint, x0: Any, c: Any, kwargs: dict) -> tuple:
    sol = adjoint(spec, x0, **kwargs)
    return linear_loss(c, sol.value), sol


#: `value_and_grad(spec, adjoint, x0, c, call_kwargs) -> ((loss, solution), spec_grad)`:
#: the gradient is a pytree like `spec` with `None` at non-arrays.
value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss, has_aux=True))


def grad(adjoint: banax.Adjoint, cell: Cell, **call_kwargs: Any) -> tuple[Any, Any]:
    """`(solution, gradient)` of the cell's loss through `adjoint`."""
    (_, sol), g = value_and_grad(cell.spec, adjoint, cell.x0, cell.c, call_kwargs)
    return sol, g


def tolerances(dtype: Any) -> dict:
    """Solver tolerances each precision can reach."""
    # Bounded loops round max_steps up to a power of 16: stay at 256.
    if dtype == jnp.float64:
        return {"atol": 1e-11, "rtol": 0.0, "max_steps": 250}
    return {"atol": 0.0, "rtol": 1e-6, "max_steps": 250}


def exact_adjoint(kind: str, dtype: Any, batch_axis: int | None = None) -> banax.Adjoint:
    """The exact adjoints under test, converged tightly in `dtype`."""
    tol = tolerances(dtype)
    picard = functools.partial(banax.get_solver, "picard", batch_axis=batch_axis, **tol)
    if kind == "bptt_checkpointed":
        return BPTT(solver=picard(loop_kind="checkpointed"))
    if kind == "bptt_bounded":
        return BPTT(solver=picard(loop_kind="bounded"))
    if kind == "reversible":
        return Reversible(solver=banax.get_solver(
            "reversible", damp=0.5, batch_axis=batch_axis, **tol))
    backward = {
        "implicit_picard": lambda: picard(),
        "implicit_anderson": lambda: banax.get_solver("anderson", **tol),
        "implicit_gmres": lambda: lx.GMRES(rtol=tol["rtol"] or 1e-12, atol=tol["atol"]),
        "implicit_bicgstab": lambda: lx.BiCGStab(
            rtol=tol["rtol"] or 1e-12, atol=tol["atol"]),
    }[kind]()
    return Implicit(solver=picard(), b_solver=backward)


EXACT = ("bptt_checkpointed", "bptt_bounded", "implicit_picard", "implicit_anderson",
         "implicit_gmres", "implicit_bicgstab", "reversible")
#: Slow compilers (bounded loops, Krylov solves) each run on one cell, not the vector.
_ONCE = {"bptt_bounded": "pytree", "implicit_bicgstab": "module",
         "implicit_gmres": "batched"}


@functools.cache
def truth(name: str) -> types.SimpleNamespace:
    """Float64 truth for a cell: its fixed point, the dense IFT gradient of its loss and
    central differences of the loss along `cell.leaf`."""
    cell = make_cell(name)
    params, static = eqx.partition(cell.spec, eqx.is_inexact_array)
    forward = banax.get_adjoint(
        "jfb", solver=banax.get_solver("picard", rtol=0.0, atol=1e-14, max_steps=2000)
    )
    solve = jax.jit(lambda p: forward(eqx.combine(p, static), cell.x0).value)
    z_star = solve(params)
    gradient = dense_implicit_grad(
        lambda z, p: call(eqx.combine(p, static), z), z_star, params, cell.c
    )

    def loss_at(leaf: jax.Array) -> jax.Array:
        # Only `solve` is compiled (once per cell): the rest is cheap eager work.
        spec = eqx.tree_at(cell.leaf, cell.spec, leaf)
        return linear_loss(cell.c, solve(eqx.partition(spec, eqx.is_inexact_array)[0]))

    fd = finite_difference_grad(loss_at, cell.leaf(cell.spec))
    return types.SimpleNamespace(z_star=z_star, grad=gradient, fd=fd)


#: Every exact adjoint in float64 (the slow compilers on the other cells, so that every
#: cell is covered), and a float32 sample: compiling the whole product costs minutes.
EXACT_CASES = (
    [(kind, _ONCE.get(kind, "vector"), "f64") for kind in EXACT]
    + [("reversible", "scalar", "f64")]
    + [(kind, "vector", "f32") for kind in ("bptt_checkpointed", "implicit_picard",
                                            "reversible")]
)


@pytest.fixture(params=EXACT_CASES, ids=["-".join(case) for case in EXACT_CASES])
def exact_case(request) -> tuple[str, str, Any]:
    kind, cell, dtype = request.param
    return kind, cell, {"f32": jnp.float32, "f64": jnp.float64}[dtype]


@pytest.fixture(scope="session")
def adj() -> types.SimpleNamespace:
    """Everything above, as one namespace."""
    return types.SimpleNamespace(
        make_cell=make_cell, truth=truth, grad=grad, call=call, tolerances=tolerances,
        exact_adjoint=exact_adjoint, linear_loss=linear_loss,
    )
