"""Pytree states (the multiscale cell's tuple of maps) through banax's tools: the
solvers, the Jacobian regularizers, `spectral_radius`, trajectory supervision and the
fixed-point cache, each against dense truths or a hand-run iteration."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax import FixedPointCache, nn
from helpers import dense_jacobian, tree_allclose

BATCH = 2


def _solver(name="anderson", **kw):
    return banax.get_solver(name, rtol=1e-11, atol=1e-11, max_steps=300, batch_axis=0, **kw)


@pytest.fixture(scope="module")
def problem():
    cell = nn.MultiscaleCell((2, 4), 3, groups=2, key=jax.random.key(0), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (BATCH, 4, 4, 3), jnp.float64)
    deq = banax.DEQ(cell, solver=_solver())  # no state_shape: the cell says its state
    z = deq(x)
    jacobians = [np.asarray(dense_jacobian(cell, tuple(a[i] for a in z), x[i]))
                 for i in range(BATCH)]
    return cell, x, deq, z, jacobians


def test_the_state_is_the_cells_tuple(problem):
    cell, x, deq, z, _ = problem
    assert isinstance(z, tuple)
    assert [a.shape for a in z] == [(BATCH, 4, 4, 2), (BATCH, 2, 2, 4)]


@pytest.mark.parametrize("name", ["picard", "broyden"])
def test_solvers_reach_the_same_fixed_point(problem, name):
    cell, x, deq, z, _ = problem
    other = banax.DEQ(cell, solver=_solver(name))(x)
    assert tree_allclose(other, z, rtol=1e-8, atol=1e-9)
    assert tree_allclose(cell(other, x), other, rtol=1e-8, atol=1e-9)


def test_regularizer_and_spectral_radius_against_dense_jacobians(problem):
    cell, x, deq, z, jacobians = problem
    sigma = banax.regularization.jacobian_spectral_norm(
        deq.f_spec(x), z, key=jax.random.key(2), n_steps=60, batch_axis=0)
    np.testing.assert_allclose(sigma, [np.linalg.norm(J, 2) for J in jacobians], rtol=1e-4)
    rho = banax.spectral_radius(deq.f_spec(x), z, key=jax.random.key(3), batch_axis=0,
                                n_steps=400)
    truth = [np.max(np.abs(np.linalg.eigvals(J))) for J in jacobians]
    np.testing.assert_allclose(rho, truth, rtol=3e-2)


def test_trajectory_on_tuple_states(problem):
    """The sampled state after k Picard steps, then damped phantom steps, with its
    gradient (under jit, as in a training step), against the same iteration run by
    hand."""
    cell, x, _, _, _ = problem
    deq = banax.DEQ(cell, solver=_solver("picard"))
    k, damp = 3, 0.8
    states = banax.trajectory(deq, x, (k,), phantom_steps=1, damp=damp)
    assert tree_allclose(states[-1], deq(x), rtol=1e-10, atol=1e-12)
    z_k = cell.zero_state(x)
    for _ in range(k):
        z_k = cell(z_k, x)

    def direct(cell):
        return jax.tree.map(lambda a, fa: (1 - damp) * a + damp * fa, z_k, cell(z_k, x))

    assert tree_allclose(states[0], direct(cell), rtol=1e-10, atol=1e-12)
    c = jax.random.normal(jax.random.key(4), z_k[1].shape, jnp.float64)
    ours = jax.jit(jax.grad(lambda inj: jnp.sum(c * banax.trajectory(
        banax.DEQ(_with_inject(cell, inj), solver=_solver("picard")),
        x, (k,), phantom_steps=1, damp=damp)[0][1])))(cell.inject.weight)
    truth = jax.jit(jax.grad(lambda inj: jnp.sum(c * direct(_with_inject(cell, inj))[1])))(
        cell.inject.weight)
    np.testing.assert_allclose(ours, truth, rtol=1e-9, atol=1e-12)


def _with_inject(cell, weight):
    return eqx.tree_at(lambda c: c.inject.weight, cell, weight)


def test_fixed_point_cache_on_tuple_states(problem):
    cell, x, deq, z, _ = problem
    default = deq.initial_state(x)
    cache = FixedPointCache.like(5, default)
    index = jnp.array([3, 1])
    assert tree_allclose(cache.read(index, default), default)
    cache = cache.write(index, z)
    assert tree_allclose(cache.read(index, default), z, rtol=0, atol=0)
    assert tree_allclose(cache.read(jnp.array([1, 0]), default),
                         (jnp.stack([z[0][1], default[0][0]]),
                          jnp.stack([z[1][1], default[1][0]])), rtol=0, atol=0)
    _, cold = deq(x, return_solution=True)
    _, warm = deq(x, z0=cache.read(index, default), return_solution=True)
    assert bool(jnp.all(warm.stats.steps < cold.stats.steps))
    with pytest.raises(ValueError, match=r"FixedPointCache: the state has shapes .*"
                       r"FixedPointCache.like"):
        cache.write(index, z[:1])
    with pytest.raises(ValueError, match="FixedPointCache.like: a leaf of state has shape"):
        FixedPointCache.like(5, (jnp.zeros(()),))
