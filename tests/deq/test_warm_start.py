"""Warm starts: the fixed-point cache and the learned initial guess."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax import DEQ, FixedPointCache
from deq.deq_cells import tanh_cell
from helpers import tree_allclose

N, D, EXAMPLES, BATCH = 6, 3, 8, 4
SOLVER = {"name": "anderson", "batch_axis": 0, "rtol": 1e-8, "max_steps": 100}


@pytest.fixture(scope="module")
def data():
    cell = tanh_cell(jax.random.key(0), N, D, radius=0.9)
    x = jax.random.normal(jax.random.key(1), (EXAMPLES, D))
    return DEQ(cell, SOLVER, "jfb", state_shape=(N,)), x


@eqx.filter_jit
def _pass(deq, cache, x, index):
    z0 = cache.read(index, deq.initial_state(x))
    z, sol = deq(x, z0=z0, return_solution=True)
    return cache.write(index, z), sol.stats.steps


def test_second_pass_is_warm(data):
    deq, x = data
    cache = FixedPointCache.empty(EXAMPLES, (N,), x.dtype)
    cold = []
    for start in (0, BATCH):  # one epoch in two batches
        index = jnp.arange(start, start + BATCH)
        cache, steps = _pass(deq, cache, x[index], index)
        cold.append(steps)
    assert bool(jnp.all(cache.filled))
    # The parameters move a little, as over an epoch of training.
    moved = eqx.tree_at(lambda d: d.cell.W, deq, deq.cell.W * 1.01)
    index = jnp.array([5, 0, 6, 1])  # another order: rows follow their example
    _, warm = _pass(moved, cache, x[index], index)
    _, fresh = _pass(moved, FixedPointCache.empty(EXAMPLES, (N,), x.dtype), x[index], index)
    assert bool(jnp.all(warm < fresh))
    assert tree_allclose(cache.read(index, jnp.zeros((BATCH, N))), deq(x[index]),
                         rtol=1e-6, atol=1e-8)


@without_annotation_checks()
def test_cache_errors(data):
    deq, x = data
    cache = FixedPointCache.empty(EXAMPLES, (N,), x.dtype)
    z = jnp.zeros((BATCH, N))
    with pytest.raises(Exception, match=r"an index is out of range \[0, 8\)"):
        cache.read(jnp.array([0, 1, 2, 8]), z)
    with pytest.raises(Exception, match="out of range"):
        eqx.filter_jit(cache.write)(jnp.array([-1, 1, 2, 3]), z)
    with pytest.raises(ValueError, match=r"the state has shape \(4, 5\) .* shape \(6,\)"):
        cache.write(jnp.arange(BATCH), jnp.zeros((BATCH, N - 1)))
    with pytest.raises(ValueError, match="dtype float32"):
        cache.write(jnp.arange(BATCH), z.astype(jnp.float32))
    with pytest.raises(TypeError, match="index must be a 1-D integer array"):
        cache.read(jnp.zeros(BATCH), z)
    with pytest.raises(ValueError, match="n_examples must be an int >= 1"):
        FixedPointCache.empty(0, (N,))


def test_learned_initial_guess_trains_towards_the_fixed_point(data):
    deq, x = data
    guess = eqx.nn.Linear(D, N, key=jax.random.key(2), dtype=x.dtype)
    layer = DEQ(deq.cell, SOLVER, "implicit", init=eqx.filter_vmap(guess))

    def aux(guess):
        model = eqx.tree_at(lambda d: d.init, layer, eqx.filter_vmap(guess))
        z0 = model.initial_state(x)
        return banax.initial_guess_loss(z0, model(x, z0=z0))

    grad = eqx.filter_grad(aux)(guess)
    z_star = layer(x)
    truth = jax.grad(
        lambda w: jnp.mean((x @ w.T + guess.bias[None, :] - z_star) ** 2))(guess.weight)
    assert tree_allclose(grad.weight, truth, rtol=1e-10, atol=1e-12)
    trained = eqx.apply_updates(guess, jax.tree.map(lambda g: -0.5 * g, grad))
    steps = lambda g: eqx.tree_at(lambda d: d.init, layer, eqx.filter_vmap(g))(  # noqa: E731
        x, return_solution=True)[1].stats.steps
    assert aux(trained) < aux(guess)
    assert int(jnp.sum(steps(trained))) <= int(jnp.sum(steps(guess)))
