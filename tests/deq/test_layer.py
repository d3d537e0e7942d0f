"""`banax.DEQ`: the equilibrium, its gradients against the dense IFT, batch mode, the
initial-state rule and the errors a user can make."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax import DEQ
from deq.deq_cells import TanhCell, tanh_cell
from helpers import dense_implicit_grad, tree_allclose

N, D, BATCH = 6, 3, 4
TIGHT = {"rtol": 1e-12, "max_steps": 300}


@pytest.fixture(scope="module")
def cell() -> TanhCell:
    return tanh_cell(jax.random.key(0), N, D, radius=0.8)


@pytest.fixture(scope="module")
def x() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (BATCH, D))


def _loss(z: jax.Array) -> jax.Array:
    # Not symmetric in z, so that a wrong sign or transpose in a gradient shows.
    return jnp.sum(jnp.sin(z) * jnp.arange(1, z.size + 1, dtype=z.dtype).reshape(z.shape))


def _dense_truth(cell: TanhCell, x: jax.Array, z_star: jax.Array):
    g = jax.grad(_loss)(z_star)
    return dense_implicit_grad(lambda z, theta: theta[0](z, theta[1]), z_star, (cell, x), g)


# (solver, adjoint) pairs whose gradient is the exact IFT gradient at a tight solve.
# Each adjoint's own accuracy is tested in tests/adjoints; here the layer must route the
# gradient to the cell's arrays and to x, with and without a batch axis.
CASES = {
    "anderson+implicit-batch": (
        {"name": "anderson", "batch_axis": 0, **TIGHT},
        {"name": "implicit", "b_solver": {"name": "picard", **TIGHT}},
    ),
    "picard+implicit-single": (
        {"name": "picard", **TIGHT}, {"name": "implicit", "b_solver": {"name": "picard", **TIGHT}}
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_gradient_matches_dense_ift(cell, x, case):
    solver, adjoint = CASES[case]
    if solver.get("batch_axis") is None:
        x = x[0]
    deq = DEQ(cell, solver, adjoint, state_shape=(N,))

    @eqx.filter_jit
    @eqx.filter_value_and_grad(has_aux=True)
    def loss_and_grad(params, deq):
        cell, x = params
        z = eqx.tree_at(lambda d: d.cell, deq, cell)(x)
        return _loss(z), z

    (_, z_star), grads = loss_and_grad((cell, x), deq)
    assert z_star.shape == x.shape[:-1] + (N,)
    assert jnp.max(jnp.abs(cell(z_star, x) - z_star)) < 1e-10
    assert tree_allclose(grads, _dense_truth(cell, x, z_star), rtol=1e-7, atol=1e-9)


def test_batch_mode_is_per_sample(cell, x):
    """One call on the batch gives what per-sample solves give, steps included."""
    solver = {"name": "anderson", "rtol": 1e-10}
    batched = DEQ(cell, {**solver, "batch_axis": 0}, "jfb", state_shape=(N,))
    single = DEQ(cell, solver, "jfb", state_shape=(N,))
    z, sol = batched(x, return_solution=True)
    z_each, sol_each = jax.vmap(lambda xi: single(xi, return_solution=True))(x)
    assert sol.stats.steps.shape == (BATCH,)
    assert tree_allclose(z, z_each, rtol=1e-9, atol=1e-12)
    assert jnp.array_equal(sol.stats.steps, sol_each.stats.steps)
    assert bool(jnp.all(sol.result == banax.Result.CONVERGED))


def test_initial_state_rules(cell, x):
    solver = {"name": "picard", "batch_axis": 0, "rtol": 1e-10, "max_steps": 200}
    zeros = DEQ(cell, solver, "jfb", state_shape=(N,))
    z_star, sol = zeros(x, return_solution=True)
    assert zeros.initial_state(x).shape == (BATCH, N)
    assert bool(jnp.all(sol.stats.steps > 0))
    # A callable rule, and a warm start at the equilibrium: nothing left to do.
    from_input = DEQ(cell, solver, "jfb", init=lambda x: jnp.tanh(x @ cell.U.T))
    assert tree_allclose(from_input(x), z_star, rtol=1e-8, atol=1e-10)
    _, warm = zeros(x, z0=z_star, return_solution=True)
    assert bool(jnp.all(warm.stats.steps == 0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_follows_the_cell_dtype(dtype):
    cell = tanh_cell(jax.random.key(2), N, D, dtype=dtype)
    # A tolerance a bfloat16 state can reach (its epsilon is 2⁻⁷).
    deq = DEQ(cell, {"name": "picard", "batch_axis": 0, "rtol": 1e-2}, "jfb", state_shape=(N,))
    z, sol = deq(jnp.ones((BATCH, D), dtype), return_solution=True)
    assert z.dtype == dtype
    assert sol.stats.abs_err.dtype == jnp.float32


def test_components_by_instance_and_by_name(cell, x):
    solver = banax.get_solver("anderson", batch_axis=0, rtol=1e-10)
    by_instance = DEQ(cell, adjoint=banax.get_adjoint("jfb", solver=solver), state_shape=N)
    by_name = DEQ(cell, {"name": "anderson", "batch_axis": 0, "rtol": 1e-10}, "jfb",
                  state_shape=(N,))
    assert by_instance.solver == by_name.solver == solver
    assert tree_allclose(by_instance(x), by_name(x))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_wrong_input_shape_is_one_clear_error(cell, x):
    deq = DEQ(cell, {"name": "picard", "batch_axis": 0}, "jfb", state_shape=(N,))
    with pytest.raises(ValueError) as error:
        deq(jnp.ones((BATCH, D + 1)))
    message = _one_line(error)
    assert "DEQ: the cell failed on x float64[4, 4]" in message and "state float64[4, 6]" in message
    # Under jit too, and for a batch axis that the input lacks.
    with pytest.raises(ValueError, match="DEQ: the cell failed"):
        eqx.filter_jit(deq)(jnp.ones((BATCH, D + 1)))
    with pytest.raises(ValueError, match="carry the batch on axis 0") as error:
        deq((x, jnp.ones(3)))
    _one_line(error)


def test_cell_output_must_match_the_state(x):
    class Widening(eqx.Module):
        def __call__(self, z, x):
            return jnp.concatenate([z, z[..., :1]], axis=-1)

    deq = DEQ(Widening(), {"name": "picard", "batch_axis": 0}, "jfb", state_shape=(N,))
    with pytest.raises(ValueError) as error:
        deq(x)
    message = _one_line(error)
    assert "float64[4, 6]" in message and "float64[4, 7]" in message


def test_construction_errors(cell):
    with pytest.raises(TypeError, match="init='zeros' needs state_shape"):
        DEQ(cell, "picard", "jfb")
    with pytest.raises(TypeError, match="state_shape must be a tuple of positive ints"):
        DEQ(cell, "picard", "jfb", state_shape=(N, 0))
    with pytest.raises(ValueError, match="init must be one of"):
        DEQ(cell, "picard", "jfb", init="ones", state_shape=(N,))
    with pytest.raises(TypeError, match="drop solver="):
        DEQ(cell, "picard", banax.get_adjoint("jfb", solver="picard"), state_shape=(N,))
    with pytest.raises(TypeError, match="given twice"):
        DEQ(cell, "picard", {"name": "jfb", "solver": "picard"}, state_shape=(N,))
    with pytest.raises(banax.UnknownNameError, match="Registered solvers: .*anderson"):
        DEQ(cell, "andersen", "jfb", state_shape=(N,))
    with pytest.raises(banax.UnknownNameError, match="Registered adjoints: .*implicit"):
        DEQ(cell, "anderson", "implict", state_shape=(N,))


def test_reconfigure_changes_the_solve_and_keeps_the_parameters():
    """The adjoint is static configuration; `reconfigure` edits it like `eqx.tree_at`, and
    `dataclasses.replace` swaps it, with the cell's parameters shared."""
    import dataclasses

    deq = banax.DEQ(
        lambda z, x: 0.5 * jnp.tanh(z + x),
        solver={"name": "picard", "rtol": 1e-3},
        adjoint={"name": "implicit"},
        state_shape=(4,),
        inference_settings={"max_steps": 7},
    )
    x = jnp.linspace(-1.0, 1.0, 4)
    _, coarse = deq(x, return_solution=True)
    tight = deq.reconfigure(lambda a: a.solver.rtol, 1e-10)
    _, fine = tight(x, return_solution=True)
    assert tight.solver.rtol == 1e-10 and deq.solver.rtol == 1e-3
    assert int(fine.stats.steps) > int(coarse.stats.steps)
    assert float(fine.stats.rel_err) <= 1e-10
    swapped = dataclasses.replace(deq, adjoint=banax.get_adjoint(
        "jfb", solver=banax.get_solver("anderson", rtol=1e-8)))
    assert type(swapped.adjoint).__name__ == "JFB"
    assert swapped.inference_settings == deq.inference_settings
    assert jnp.allclose(swapped(x), tight(x), atol=1e-7)
    with pytest.raises(ValueError, match="rtol"):
        deq.reconfigure(lambda a: a.solver.rtol, -1.0)(x)


def test_zoo_cells_give_their_zero_state():
    """A banax.nn cell needs no state_shape: the layer starts from cell.zero_state(x),
    batched or not, and solves to the same fixed point as with state_shape."""
    cell = banax.nn.MLPCell(5, 3, key=jax.random.key(0), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    solver = {"name": "picard", "batch_axis": 0, "rtol": 1e-10, "max_steps": 200}
    own = DEQ(cell, solver, "implicit")
    explicit = DEQ(cell, solver, "implicit", state_shape=(5,))
    np.testing.assert_array_equal(own.initial_state(x), np.zeros((4, 5)))
    np.testing.assert_allclose(own(x), explicit(x), rtol=0, atol=1e-12)
    single = DEQ(cell, "picard", "implicit")
    assert single.initial_state(x[0]).shape == (5,)
    conv = banax.nn.ConvCell(4, 2, groups=2, key=jax.random.key(2), dtype=jnp.float32)
    z0 = DEQ(conv, "picard", "jfb").initial_state(jnp.ones((3, 6, 6, 2), jnp.float32))
    assert z0.shape == (3, 6, 6, 4) and z0.dtype == jnp.float32
