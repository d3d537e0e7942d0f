"""The reversible adjoint is BPTT through the same `Reversible` iteration, to rounding.

Its forward runs on an integer grid and records what each step drops, so the backward
rewind rebuilds the trajectory bit for bit however long the solve. Measured on this
file's tanh cell (64 features, damp=0.8, atol 1e-6 in float32 and 1e-12 in float64),
relative to BPTT (loop_kind="checkpointed") through the same solver:

| radius | steps (budget 30 / 300), float32 | error (300), float32 | steps, float64 | error (300), float64 |
|--------|----------------------------------|----------------|----------------|----------------|
| 0.7    | 21 / 21                          | 3.2e-7         | 30 / 52        | 8.8e-16        |
| 0.9    | 30 / 62                          | 5.7e-7         | 30 / 162       | 1.5e-15        |
| 0.98   | 30 / 279                         | 1.7e-6         | 30 / 300       | 3.0e-15        |

Rewinding the floating-point iteration instead gave 6e-3 / 3.9e-2 / 5.1e-2 (float32)
and 5e-5 / 2.1e-3 / 4.8e-3 (float64).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import contraction_matrix

import banax
from banax import Result
from banax.adjoint import BPTT, Reversible

N = 64
MAX_STEPS = 300
ATOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}


def _cell(z, w, b):
    return jnp.tanh(z @ w.T + b)


def _solver(dtype, **options):
    return banax.get_solver("reversible", damp=0.8, atol=ATOL[dtype], rtol=0.0,
                            max_steps=MAX_STEPS, **options)


@eqx.filter_jit
def _grads(adjoint, w, b, c, budget):
    def loss(params):
        sol = adjoint((_cell, params), jnp.zeros_like(b), step_budget=budget)
        return jnp.sum(c * sol.value), sol.stats.steps

    return jax.grad(loss, has_aux=True)((w, b))


def _relative_error(ours, theirs):
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
               for a, b in zip(ours, theirs))


def _problem(dtype, radius, batch):
    w = contraction_matrix(jax.random.key(0), N, radius, dtype=dtype)
    # Small, per-sample biases keep the cell near its linear regime: slow solves.
    size = jnp.logspace(-2, 0, batch)[:, None]
    b = (size * jax.random.normal(jax.random.key(1), (batch, N))).astype(dtype)
    c = jax.random.normal(jax.random.key(2), (batch, N)).astype(dtype)
    return w, b, c


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_matches_bptt_through_the_same_iteration_short_and_long(dtype):
    reversible = Reversible(solver=_solver(dtype))
    bptt = BPTT(solver=_solver(dtype, loop_kind="checkpointed"))
    bound = {jnp.float32: 1e-5, jnp.float64: 1e-12}[dtype]
    longest = 0
    for radius in (0.7, 0.9, 0.98):
        w, b, c = _problem(dtype, radius, 1)
        for budget in (30, 300):
            ours, steps = _grads(reversible, w, b, c, jnp.asarray(budget))
            theirs, bptt_steps = _grads(bptt, w, b, c, jnp.asarray(budget))
            assert int(steps) == int(bptt_steps)
            assert _relative_error(ours, theirs) < bound, (radius, budget)
            longest = max(longest, int(steps))
    assert longest > 250  # a long solve was among them


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_batch_mode_rewinds_each_sample_for_its_own_steps(dtype):
    w, b, c = _problem(dtype, 0.9, 4)
    ours, steps = _grads(Reversible(solver=_solver(dtype, batch_axis=0)), w, b, c, None)
    theirs, bptt_steps = _grads(
        BPTT(solver=_solver(dtype, batch_axis=0, loop_kind="checkpointed")), w, b, c, None)
    assert len(set(np.asarray(steps).tolist())) == 4
    assert (steps == bptt_steps).all()
    assert _relative_error(ours, theirs) < {jnp.float32: 1e-5, jnp.float64: 1e-12}[dtype]


def _temp_bytes(max_steps):
    adjoint = Reversible(solver=banax.get_solver("reversible", rtol=1e-5,
                                                 max_steps=max_steps))
    w = jnp.zeros((N, N), jnp.float32)

    def loss(w):
        return jnp.sum(adjoint((lambda z, w: jnp.tanh(w @ z), (w,)),
                               jnp.zeros(N, jnp.float32)).value)

    return jax.jit(jax.grad(loss)).lower(w).compile().memory_analysis().temp_size_in_bytes


def test_memory_grows_only_by_the_recorded_digits():
    # 32 bits per element per step (per sequence a base-5 digit and 13 low bits of
    # the rounded beta*f), nothing else per step: 16 -> 256 -> 4096 steps.
    sizes = [_temp_bytes(n) for n in (16, 256, 4096)]
    per_step = 4 * N
    assert sizes[1] - sizes[0] == pytest.approx(240 * per_step, rel=0.01)
    assert sizes[2] - sizes[0] == pytest.approx(4080 * per_step, rel=0.01)


def _deq_grads(cell, x, shape, adjoint):
    deq = banax.DEQ(cell, adjoint=adjoint, state_shape=shape)
    c = jnp.cos(jnp.arange(x.shape[0] * int(np.prod(shape)))).reshape((x.shape[0], *shape))

    @eqx.filter_jit
    def grads(cell):
        return eqx.filter_grad(lambda cell: jnp.sum(
            c.astype(x.dtype) * eqx.tree_at(lambda d: d.cell, deq, cell)(x)))(cell)

    return jax.tree.leaves(eqx.filter(grads(cell), eqx.is_inexact_array))


class _Tanh(eqx.Module):
    w: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(z @ self.w.T + x)


@pytest.mark.parametrize("cell", ["conv", "tanh"])
def test_float32_cells_whose_backward_evaluates_f_differently(cell):
    # The backward program computes f a grid unit or two away from the forward's
    # (GroupNorm means, 512-term dots): thousands of ulps for f's elements near 0,
    # which the recorded low bits of round(beta*f) in grid units absorb.
    k1, k2 = jax.random.split(jax.random.key(0))
    if cell == "conv":
        module = banax.nn.ConvCell(8, 1, groups=4, key=k1, dtype=jnp.float32)
        x, shape = jax.random.normal(k2, (4, 8, 8, 1), jnp.float32), (8, 8, 8)
    else:
        w = contraction_matrix(k1, 512, 0.9, dtype=jnp.float32)
        module, shape = _Tanh(w), (512,)
        x = jax.random.normal(k2, (2, 512), jnp.float32)
    options = {"damp": 0.8, "rtol": 0.0, "atol": 0.0, "max_steps": 20, "batch_axis": 0}
    ours = _deq_grads(module, x, shape,
                      Reversible(solver=banax.get_solver("reversible", **options)))
    theirs = _deq_grads(module, x, shape, BPTT(solver=banax.get_solver(
        "reversible", loop_kind="checkpointed", **options)))
    assert all(bool(jnp.isfinite(g).all()) for g in ours)
    scale = max(float(jnp.max(jnp.abs(g))) for g in theirs)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ours, theirs)) < 1e-4 * scale


def test_without_x64_float32_runs_on_a_32_bit_grid():
    w, b, c = _problem(jnp.float32, 0.9, 1)
    with jax.enable_x64(False):
        options = {"damp": 0.8, "atol": 1e-5, "rtol": 0.0, "max_steps": 100}
        solver = banax.get_solver("reversible", **options)
        ours, steps = _grads(Reversible(solver=solver), w, b, c, None)
        theirs, _ = _grads(BPTT(solver=banax.get_solver(
            "reversible", loop_kind="checkpointed", **options)), w, b, c, None)
        state = solver.init(b, b)
        assert state.z_int.dtype == jnp.int32
        assert 0 < int(steps) < 100
        assert _relative_error(ours, theirs) < 1e-5


def test_leaving_the_grid_reports_diverged_not_a_wrapped_value():
    # Iterates grow by about 3x per step: past the grid's headroom (2^11 times the
    # initial size in float64) the step turns NaN, long before float64 overflows.
    solver = banax.get_solver("reversible", max_steps=200)
    sol = Reversible(solver=solver)((lambda z: 3.0 * z + 1.0, ()), jnp.ones(4))
    assert sol.result == Result.DIVERGED
    assert int(sol.stats.steps) < 20


def test_damp_must_be_a_small_fraction():
    assert banax.get_solver("reversible", damp=0.95).damp == 0.95
    with pytest.raises(ValueError, match="denominator at most 256.*0.123"):
        banax.get_solver("reversible", damp=0.1234567)


def test_complex_states_are_refused():
    solver = banax.get_solver("reversible")
    with pytest.raises(TypeError, match="complex states"):
        Reversible(solver=solver)((lambda z: 0.5 * z, ()), jnp.ones(3, jnp.complex64))
