"""Trajectory supervision: sampled states with phantom gradients, and the loss helper."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax import DEQ
from deq.deq_cells import tanh_cell
from helpers import tree_allclose

N, D, BATCH = 6, 3, 4
SOLVER = {"name": "picard", "batch_axis": 0, "rtol": 1e-10, "max_steps": 200}


@pytest.fixture(scope="module")
def setup():
    cell = tanh_cell(jax.random.key(0), N, D, radius=0.8)
    x = jax.random.normal(jax.random.key(1), (BATCH, D))
    return DEQ(cell, SOLVER, "implicit", state_shape=(N,)), x


def _with(deq, cell):
    return eqx.tree_at(lambda d: d.cell, deq, cell)


def test_no_positions_is_the_plain_layer(setup):
    deq, x = setup
    loss = lambda c: jnp.sum(jnp.sin(banax.trajectory(_with(deq, c), x, ())[-1]))  # noqa: E731
    plain = lambda c: jnp.sum(jnp.sin(_with(deq, c)(x)))  # noqa: E731
    assert tree_allclose(jax.grad(loss)(deq.cell), jax.grad(plain)(deq.cell),
                         rtol=1e-12, atol=1e-14)


def test_sampled_state_and_its_phantom_gradient(setup):
    deq, x = setup
    k, steps, damp = 3, 2, 0.8
    states = banax.trajectory(deq, x, (k,), phantom_steps=steps, damp=damp)
    assert len(states) == 2
    assert tree_allclose(states[-1], deq(x), rtol=1e-12, atol=1e-14)
    # The iterate after k Picard steps, computed directly; then the damped steps.
    z_k = jnp.zeros((BATCH, N))
    for _ in range(k):
        z_k = deq.cell(z_k, x)

    def direct(cell):
        z = z_k
        for _ in range(steps):
            z = (1 - damp) * z + damp * cell(z, x)
        return z

    assert tree_allclose(states[0], direct(deq.cell), rtol=1e-12, atol=1e-14)
    ours = jax.grad(lambda c: jnp.sum(jnp.sin(banax.trajectory(
        _with(deq, c), x, (k,), phantom_steps=steps, damp=damp)[0])))(deq.cell)
    truth = jax.grad(lambda c: jnp.sum(jnp.sin(direct(c))))(deq.cell)
    assert tree_allclose(ours, truth, rtol=1e-10, atol=1e-12)


def test_trajectory_loss_weights():
    losses = [jnp.asarray(1.0), jnp.asarray(2.0), jnp.asarray(4.0)]
    exp = (0.64 * 1 + 0.8 * 2 + 4) / (0.64 + 0.8 + 1)
    assert float(banax.trajectory_loss(losses)) == pytest.approx(exp)
    assert float(banax.trajectory_loss(losses, "linear")) == pytest.approx(17 / 6)
    assert float(banax.trajectory_loss(losses, "constant")) == pytest.approx(7 / 3)
    assert banax.evenly_spaced(3, 30) == (0, 10, 20)


@without_annotation_checks()
def test_trajectory_errors(setup):
    deq, x = setup
    with pytest.raises(ValueError, match=r"positions must be increasing steps in "
                       r"\[0, max_steps=200\).*got \(5, 200\)"):
        banax.trajectory(deq, x, (5, 200))
    with pytest.raises(ValueError, match="positions must be increasing"):
        banax.trajectory(deq, x, (7, 3))
    with pytest.raises(TypeError, match="positions must be a tuple of ints"):
        banax.trajectory(deq, x, (1.5,))
    with pytest.raises(ValueError, match="phantom_steps must be an int >= 1"):
        banax.trajectory(deq, x, (1,), phantom_steps=0)
    with pytest.raises(ValueError, match=r"damp must be in \(0, 1\]"):
        banax.trajectory(deq, x, (1,), damp=1.5)
    with pytest.raises(ValueError, match="weights must be 'exponential'"):
        banax.trajectory_loss([jnp.asarray(1.0)], "cubic")
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\]"):
        banax.trajectory_loss([jnp.asarray(1.0)], gamma=0.0)
