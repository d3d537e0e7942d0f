"""The layer's inference settings and unrolled pre-training, and stateful cells."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from annotation_checker import without_annotation_checks

from banax import DEQ, Result
from deq.deq_cells import TanhCell, tanh_cell
from helpers import tree_allclose

N, D, BATCH = 6, 3, 4
SOLVER = {"name": "picard", "batch_axis": 0, "rtol": 1e-10, "max_steps": 300}


@pytest.fixture(scope="module")
def cell() -> TanhCell:
    return tanh_cell(jax.random.key(0), N, D, radius=0.8)


@pytest.fixture(scope="module")
def x() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (BATCH, D))


def test_inference_settings_change_the_steps_and_nothing_else(cell, x):
    deq = DEQ(cell, SOLVER, "jfb", state_shape=(N,),
              inference_settings={"rtol": 1e-4, "max_steps": 40})
    z_train, sol_train = deq(x, return_solution=True)
    z_eval, sol_eval = eqx.nn.inference_mode(deq)(x, return_solution=True)
    assert bool(jnp.all(sol_eval.stats.steps < sol_train.stats.steps))
    assert bool(jnp.all(sol_eval.stats.rel_err <= 1e-4))
    assert bool(jnp.all(sol_eval.result == Result.CONVERGED))
    assert tree_allclose(z_eval, z_train, rtol=0, atol=1e-3)
    # The same solve as a layer built with those settings for training.
    loose = DEQ(cell, {**SOLVER, "rtol": 1e-4, "max_steps": 40}, "jfb", state_shape=(N,))
    assert tree_allclose(z_eval, loose(x), rtol=0, atol=0)
    assert eqx.tree_equal(eqx.filter(deq, eqx.is_array),
                          eqx.filter(eqx.nn.inference_mode(deq), eqx.is_array))


def test_pretraining_unrolls_the_cell_and_backpropagates(cell, x):
    deq = DEQ(cell, SOLVER, "implicit", state_shape=(N,))
    pre = eqx.tree_at(lambda d: d.pretrain_steps, deq, 4, is_leaf=lambda v: v is None)

    def direct(cell, steps=4):
        z = jnp.zeros((BATCH, N))
        for _ in range(steps):
            z = cell(z, x)
        return z

    z, sol = pre(x, return_solution=True)
    assert tree_allclose(z, direct(cell), rtol=1e-12, atol=1e-14)
    assert bool(jnp.all(sol.stats.steps == 4))
    assert tree_allclose(sol.stats.abs_err, jnp.linalg.norm(z - direct(cell, 3), axis=1))
    def loss(c, layer):
        return jnp.sum(jnp.sin(eqx.tree_at(lambda d: d.cell, layer, c)(x)))

    assert tree_allclose(jax.grad(loss)(cell, pre),
                         jax.grad(lambda c: jnp.sum(jnp.sin(direct(c))))(cell),
                         rtol=1e-10, atol=1e-12)
    back = eqx.tree_at(lambda d: d.pretrain_steps, pre, None)
    assert tree_allclose(back(x), deq(x), rtol=0, atol=0)


def test_mode_errors(cell):
    with pytest.raises(TypeError, match=r"inference_settings must be a dict with keys among "
                       r"\('max_steps', 'rtol', 'atol'\)"):
        DEQ(cell, SOLVER, "jfb", state_shape=(N,), inference_settings={"depth": 3})
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        DEQ(cell, SOLVER, "jfb", state_shape=(N,), inference_settings={"max_steps": 0})
    with pytest.raises(TypeError, match="Fallback runs other solvers"):
        DEQ(cell, {"name": "fallback", "primary": "picard", "secondary": "anderson"},
            "jfb", state_shape=(N,), inference_settings={"max_steps": 5})
    with pytest.raises(ValueError, match="pretrain_steps must be None .* or an int >= 1"):
        DEQ(cell, SOLVER, "jfb", state_shape=(N,), pretrain_steps=0)


class SpectralCell(eqx.Module):
    """`tanh(SN(W) z + U x)` with `eqx.nn.SpectralNorm`, whose power-iteration vectors
    are Equinox state."""

    linear: eqx.nn.SpectralNorm
    U: jax.Array

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear = eqx.nn.SpectralNorm(
            eqx.nn.Linear(N, N, use_bias=False, key=k1), "weight", key=k2)
        self.U = jax.random.normal(k2, (N, D)) / 2

    def __call__(self, z, x, state):
        # The power iteration does not depend on z: one state update per call.
        h, state = jax.vmap(self.linear, in_axes=(0, None), out_axes=(0, None))(z, state)
        return jnp.tanh(0.9 * h + x @ self.U.T), state


def test_stateful_cell_reads_once_per_solve_and_updates_once_per_call(x):
    cell, state = eqx.nn.make_with_state(SpectralCell)(jax.random.key(2))
    copy = lambda: jax.tree.map(lambda a: a, state)  # noqa: E731 (a state is used once)
    deq = DEQ(cell, SOLVER, "implicit", state_shape=(N,))
    (z, new_state), sol = deq(x, copy(), return_solution=True)
    assert int(jnp.max(sol.stats.steps)) > 1
    # z* is the fixed point of the cell under the state it was given ...
    assert jnp.max(jnp.abs(cell(z, x, copy())[0] - z)) < 1e-9
    # ... and the state moved by exactly one power-iteration step.
    assert tree_allclose(new_state, cell(z, x, copy())[1], rtol=1e-12, atol=1e-14)
    assert not tree_allclose(new_state, copy(), rtol=1e-6, atol=1e-8)
    # Gradients reach the spectrally normalised weight.
    grad = eqx.filter_grad(
        lambda c: jnp.sum(eqx.tree_at(lambda d: d.cell, deq, c)(x, copy())[0]))(cell)
    assert float(jnp.max(jnp.abs(grad.linear.layer.weight))) > 0
    _, frozen = eqx.nn.inference_mode(deq)(x, copy())
    assert tree_allclose(frozen, copy(), rtol=0, atol=0)


@without_annotation_checks()
def test_state_errors(cell, x):
    deq = DEQ(cell, SOLVER, "jfb", state_shape=(N,))
    _, state = eqx.nn.make_with_state(SpectralCell)(jax.random.key(2))
    with pytest.raises(TypeError, match="a state was given, but the cell TanhCell takes no state"):
        deq(x, state)
    with pytest.raises(TypeError, match="the state must be an eqx.nn.State"):
        deq(x, {"u": jnp.zeros(3)})
