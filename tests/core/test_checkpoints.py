"""Checkpoints hold parameters, not configuration: a DEQ saved with
`eqx.tree_serialise_leaves` under one solver/adjoint loads into the same model built
with any other, and options are plain fields that `eqx.tree_at` edits."""

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import pytest

import banax
from banax.adjoint import BPTT, JFB, Implicit
from helpers import dense_implicit_grad

N, D = 4, 3
X = jnp.linspace(-1.0, 1.0, 2 * D).reshape(2, D)
TARGET = jnp.full((2, N), 0.3)


class Cell(eqx.Module):
    mlp: eqx.nn.MLP

    def __init__(self, key):
        self.mlp = eqx.nn.MLP(N + D, N, 8, 1, key=key)

    def __call__(self, z, x):
        return 0.5 * jnp.tanh(self.mlp(jnp.concatenate([z, x])))


def picard(**options):
    return banax.get_solver("picard", **options)


SAVED = Implicit(solver=banax.get_solver("anderson", rtol=1e-10, max_steps=100),
                 b_solver=lx.BiCGStab(rtol=1e-10, atol=1e-10))
OTHERS = {
    "implicit-picard-b-solver": Implicit(solver=picard(rtol=1e-12, max_steps=300),
                                         b_solver=picard(rtol=1e-10, max_steps=300)),
    "jfb-broyden": JFB(solver=banax.get_solver("broyden", rtol=1e-12, max_steps=100)),
    "bptt-checkpointed": BPTT(solver=picard(rtol=1e-12, max_steps=300,
                                            loop_kind="checkpointed")),
    "implicit-gmres-other-tolerances": Implicit(
        solver=banax.get_solver("anderson", rtol=1e-11, max_steps=80, depth=3),
        b_solver=lx.GMRES(rtol=1e-8, atol=1e-8)),
}


def loss(deq, x, target):
    return jnp.sum((jax.vmap(deq)(x) - target) ** 2)


@eqx.filter_jit
def solve_all(deq, x):
    return jax.vmap(deq)(x)


@pytest.fixture(scope="module")
def trained():
    """A DEQ after a few SGD steps under `SAVED`, and its checkpoint."""
    deq = banax.DEQ(Cell(jax.random.key(0)), adjoint=SAVED, state_shape=N)
    step = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    for _ in range(2):
        _, grads = step(deq, X, TARGET)
        deq = eqx.apply_updates(deq, jax.tree.map(lambda g: -0.5 * g, grads))
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, deq)
    return deq, buffer.getvalue()


@pytest.mark.parametrize("name", list(OTHERS))
def test_a_checkpoint_loads_under_another_configuration(trained, name):
    deq, saved = trained
    fresh = banax.DEQ(Cell(jax.random.key(1)), adjoint=OTHERS[name], state_shape=N)
    loaded = eqx.tree_deserialise_leaves(io.BytesIO(saved), fresh)
    # The parameters are the trained ones ...
    for a, b in zip(jax.tree.leaves(eqx.filter(loaded, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(deq, eqx.is_array)), strict=True):
        assert jnp.array_equal(a, b)
    # ... the configuration is the loaded model's own ...
    assert loaded.adjoint is OTHERS[name]
    # ... and it runs: every configuration finds the trained model's fixed point.
    assert jnp.allclose(solve_all(loaded, X), solve_all(deq, X), atol=1e-8)


def test_a_checkpoint_holds_no_configuration(trained):
    """The same parameters under any configuration serialise to the same bytes."""
    deq, saved = trained
    default = banax.DEQ(Cell(jax.random.key(2)), solver={"name": "anderson", "rtol": 1e-10,
                                                           "max_steps": 100},
                        state_shape=N)
    loaded = eqx.tree_deserialise_leaves(io.BytesIO(saved), default)
    jfb = eqx.tree_deserialise_leaves(io.BytesIO(saved), banax.DEQ(
        Cell(jax.random.key(4)), adjoint=OTHERS["jfb-broyden"], state_shape=N))
    for other in (loaded, jfb):
        buffer = io.BytesIO()
        eqx.tree_serialise_leaves(buffer, other)
        assert buffer.getvalue() == saved
    assert jnp.allclose(solve_all(loaded, X), solve_all(deq, X), atol=1e-8)


def test_a_loaded_model_trains_under_its_own_configuration(trained):
    """The gradient of the reloaded model by the implicit rule with a Picard backward
    solve equals the dense IFT gradient at its fixed point."""
    deq, saved = trained
    other = OTHERS["implicit-picard-b-solver"]
    loaded = eqx.tree_deserialise_leaves(
        io.BytesIO(saved), banax.DEQ(Cell(jax.random.key(3)), adjoint=other, state_shape=N))
    x = X[0]
    grads = eqx.filter_jit(eqx.filter_grad(lambda d: jnp.sum(d(x) ** 2)))(loaded)
    z = eqx.filter_jit(loaded)(x)
    params, static = eqx.partition(loaded.cell, eqx.is_array)
    exact = dense_implicit_grad(lambda z, p: eqx.combine(p, static)(z, x), z, params, 2 * z)
    for a, b in zip(jax.tree.leaves(grads.cell), jax.tree.leaves(exact), strict=True):
        assert jnp.allclose(a, b, atol=1e-7)


def test_equal_configurations_compare_and_hash_equal():
    """The static adjoint is part of the jit cache key: equal options (a lineax solver
    included) must give equal, hashable configurations so that jit reuses its
    compilation."""
    def build():
        return Implicit(solver=banax.get_solver("anderson", rtol=1e-6),
                        b_solver=lx.BiCGStab(rtol=1e-6, atol=1e-6))

    assert build() == build() and hash(build()) == hash(build())
    assert build() != eqx.tree_at(lambda a: a.solver.rtol, build(), 1e-7)
    deq = banax.DEQ(Cell(jax.random.key(0)), adjoint=build(), state_shape=N)
    assert hash(jax.tree.structure(deq)) == hash(jax.tree.structure(
        banax.DEQ(Cell(jax.random.key(0)), adjoint=build(), state_shape=N)))


# --- eqx.tree_at on solver and adjoint options -----------------------------------------

W = jnp.array([[0.5, 0.2], [0.1, 0.6]])
B = jnp.array([1.0, -1.0])


def affine(z, w, b):
    return w @ z + b


def steps(adjoint):
    return int(adjoint((affine, (W, B)), jnp.zeros(2)).stats.steps)


@pytest.mark.parametrize(
    "where, value",
    [(lambda a: a.solver.rtol, 1e-3), (lambda a: a.solver.max_steps, 4),
     (lambda a: a.solver.damp, 0.5)],
    ids=["rtol", "max_steps", "damp"],
)
def test_tree_at_edits_solver_options_and_changes_the_solve(where, value):
    adjoint = JFB(solver=banax.get_solver("relaxed", damp=1.0, rtol=1e-10, max_steps=200))
    edited = eqx.tree_at(where, adjoint, value)
    assert where(edited) == value and where(adjoint) != value
    before, after = steps(adjoint), steps(edited)
    assert after != before
    if value == 4:
        sol = edited((affine, (W, B)), jnp.zeros(2))
        assert after == 4 and sol.result == banax.Result.MAX_STEPS


def test_tree_at_swaps_the_backward_solver_and_its_options():
    adjoint = Implicit(solver=picard(rtol=1e-12, max_steps=300),
                       b_solver=lx.BiCGStab(rtol=1e-12, atol=1e-12))
    z = jnp.linalg.solve(jnp.eye(2) - W, B)
    g = 2 * z
    exact = jnp.linalg.solve((jnp.eye(2) - W).T, g)  # dL/db at the fixed point

    @eqx.filter_jit
    def grad_b(a):
        return jax.grad(lambda b: jnp.sum(a((affine, (W, b)), jnp.zeros(2)).value ** 2))(B)

    assert jnp.allclose(grad_b(adjoint), exact, atol=1e-9)
    picard_b = eqx.tree_at(lambda a: a.b_solver, adjoint, picard(rtol=1e-12, max_steps=300))
    assert isinstance(picard_b.b_solver, banax.Solver)
    assert jnp.allclose(grad_b(picard_b), exact, atol=1e-9)
    # One backward step is a truncated series: a different (inexact) gradient.
    # It is also reported: the backward solve stopped at its step cap.
    short = eqx.tree_at(lambda a: a.b_solver.max_steps, picard_b, 1)
    with pytest.warns(banax.BackwardSolveWarning, match="did not converge"):
        inexact = jax.block_until_ready(grad_b(short))
    assert not jnp.allclose(inexact, exact, atol=1e-3)
