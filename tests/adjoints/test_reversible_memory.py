"""Compiled gradient memory of the reversible adjoint against `max_steps`: the flat
mode keeps none per step, the exact mode a byte per element per step for damp=0.8.

XLA's compiled memory analysis of `jax.grad` (scratch plus outputs) at 50 and 800
steps; nothing is run.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import banax
from banax.adjoint import Reversible

STEPS = (50, 800)


def _tanh_memory(adjoint):
    w = jnp.zeros((16, 16), jnp.float32)

    def loss(w):
        f = (lambda z, w: jnp.tanh(z @ w.T), (w,))
        return jnp.sum(adjoint(f, jnp.zeros((2, 16), jnp.float32)).value)

    return _bytes(jax.grad(loss), w), 2 * 16


def _conv_memory(adjoint):
    cell = banax.nn.ConvCell(4, 1, groups=2, key=jax.random.key(0), dtype=jnp.float32)
    deq = banax.DEQ(cell, adjoint=adjoint)
    x = jnp.zeros((2, 4, 4, 1), jnp.float32)

    params, static = eqx.partition(cell, eqx.is_inexact_array)

    def loss(params):
        cell = eqx.combine(params, static)
        return jnp.sum(eqx.tree_at(lambda d: d.cell, deq, cell)(x))

    return _bytes(jax.grad(loss), params), 2 * 4 * 4 * 4


def _bytes(function, *args):
    memory = jax.jit(function).lower(*args).compile().memory_analysis()
    return memory.temp_size_in_bytes + memory.output_size_in_bytes


def _adjoint(mode, max_steps):
    solver = banax.get_solver("reversible", damp=0.8, rtol=1e-5, max_steps=max_steps,
                              batch_axis=0)
    return Reversible(solver=solver, mode=mode)


@pytest.mark.parametrize("measure", [
    _tanh_memory, pytest.param(_conv_memory, marks=pytest.mark.slow),
], ids=["tanh", "conv"])
@pytest.mark.parametrize("mode", ["exact", "flat"])
def test_gradient_memory_per_step(mode, measure):
    (short, elements), (long, _) = (measure(_adjoint(mode, n)) for n in STEPS)
    if mode == "flat":
        assert abs(long - short) <= 0.05 * short
    else:
        assert 0 < long - short <= (STEPS[1] - STEPS[0]) * elements


@pytest.mark.parametrize(("damp", "dtype"), [
    (0.5, jnp.uint8), (0.75, jnp.uint8), (0.8, jnp.uint8), (0.9, jnp.uint16),
    (0.95, jnp.uint16), (0.99, jnp.uint32),
])
def test_the_record_is_the_smallest_integer_that_holds_a_step(damp, dtype):
    solver = banax.get_solver("reversible", damp=damp, max_steps=7).recording()
    z0 = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    z, state = z0, solver.init(z0, jnp.cos(z0))
    assert state.remainders.dtype == dtype
    assert state.remainders.shape == (2, 7, 3)
    # And it is enough to run every step backwards, bit for bit.
    states = [(z, state)]
    for _ in range(6):
        states.append(solver.forward_map(jnp.cos, *states[-1]))
    z, state = states[-1]
    for expected_z, expected in reversed(states[:-1]):
        z, state = solver.inverse_map(jnp.cos, z, state)
        assert bool((z == expected_z).all())
        assert bool((state.z_int == expected.z_int).all())
        assert bool((state.y_int == expected.y_int).all())
