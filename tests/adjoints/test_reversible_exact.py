"""The reversible adjoint, in both modes, is BPTT through the same `Reversible`
iteration, to rounding.

The exact mode rewinds the integer steps bit for bit from what the forward recorded;
the flat mode replays them forwards from `x0` under a few checkpoints. Measured on
this file's tanh cell (16 features, damp=0.8, atol 1e-6 in float32 and 1e-12 in
float64, three samples with biases 0.01, 0.1 and 1), relative to BPTT
(loop_kind="checkpointed") through the same solver, both modes alike: 1.5e-7 (radius
0.7) and 4.4e-7 (0.98) in float32, 6.7e-16 and 1.6e-15 in float64, for solves of 16 to
300 steps. Rewinding the floating-point iteration instead gave 6e-3 / 3.9e-2 / 5.1e-2
(float32) and 5e-5 / 2.1e-3 / 4.8e-3 (float64) at radius 0.7 / 0.9 / 0.98.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax import Result
from banax.adjoint import BPTT, Reversible
from helpers import contraction_matrix

N = 16
BATCH = 3
MAX_STEPS = 300
ATOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}
BOUND = {jnp.float32: 1e-5, jnp.float64: 1e-12}


def _cell(z, w, b):
    return jnp.tanh(z @ w.T + b)


def _solver(dtype, **options):
    return banax.get_solver("reversible", damp=0.8, atol=ATOL[dtype], rtol=0.0,
                            max_steps=MAX_STEPS, batch_axis=0, **options)


@eqx.filter_jit
def _grads(adjoint, w, b, c, budget):
    def loss(params):
        sol = adjoint((_cell, params), jnp.zeros_like(b), step_budget=budget)
        return jnp.sum(c * sol.value), sol.stats.steps

    return jax.grad(loss, has_aux=True)((w, b))


def _relative_error(ours, theirs):
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
               for a, b in zip(ours, theirs))


def _problem(dtype, radius):
    w = contraction_matrix(jax.random.key(0), N, radius, dtype=dtype)
    # Small, per-sample biases keep the cell near its linear regime: slow solves, of
    # a different length for each sample.
    size = jnp.logspace(-2, 0, BATCH)[:, None]
    b = (size * jax.random.normal(jax.random.key(1), (BATCH, N))).astype(dtype)
    c = jax.random.normal(jax.random.key(2), (BATCH, N)).astype(dtype)
    return w, b, c


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_both_modes_match_bptt_through_the_same_iteration(dtype):
    # One compilation per adjoint serves every radius and budget. In batch mode each
    # sample is walked back over its own steps. The flat mode with 2 checkpoints
    # replays with its stack full (quadratic in the steps, so on the short solves
    # only); it must give the same gradient, only slower.
    adjoints = [Reversible(solver=_solver(dtype)),
                Reversible(solver=_solver(dtype), mode="flat")]
    full_stack = Reversible(solver=_solver(dtype), mode="flat", checkpoints=2)
    bptt = BPTT(solver=_solver(dtype, loop_kind="checkpointed"))
    longest = 0
    for radius in (0.7, 0.9, 0.98):
        w, b, c = _problem(dtype, radius)
        for budget in (30, MAX_STEPS):
            theirs, steps = _grads(bptt, w, b, c, jnp.asarray(budget))
            assert budget < MAX_STEPS or len(set(np.asarray(steps).tolist())) > 1
            longest = max(longest, int(jnp.max(steps)))
            for adjoint in adjoints + [full_stack] * (budget < MAX_STEPS):
                ours, our_steps = _grads(adjoint, w, b, c, jnp.asarray(budget))
                assert (our_steps == steps).all()
                error = _relative_error(ours, theirs)
                assert error < BOUND[dtype], (adjoint.mode, radius, budget, error)
    assert longest > 200  # a long solve was among them


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


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["conv", "tanh"])
@pytest.mark.parametrize("mode", ["exact", "flat"])
def test_float32_cells_whose_backward_evaluates_f_differently(cell, mode):
    # The backward program computes f a grid unit or two away from the forward's
    # (GroupNorm means in another fusion, 512-term dots): thousands of ulps for f's
    # elements near 0. The exact mode's residues absorb it; the flat mode's replay
    # stays within rounding of the forward's trajectory.
    k1, k2 = jax.random.split(jax.random.key(0))
    if cell == "conv":
        module = banax.nn.ConvCell(8, 1, groups=4, key=k1, dtype=jnp.float32)
        x, shape = jax.random.normal(k2, (4, 8, 8, 1), jnp.float32), (8, 8, 8)
    else:
        module, shape = _Tanh(contraction_matrix(k1, 512, 0.9, dtype=jnp.float32)), (512,)
        x = jax.random.normal(k2, (2, 512), jnp.float32)
    options = {"damp": 0.8, "rtol": 0.0, "atol": 0.0, "max_steps": 20, "batch_axis": 0}
    ours = _deq_grads(module, x, shape, Reversible(
        solver=banax.get_solver("reversible", **options), mode=mode, on_failure="raise"))
    theirs = _deq_grads(module, x, shape, BPTT(solver=banax.get_solver(
        "reversible", loop_kind="checkpointed", **options)))
    assert all(bool(jnp.isfinite(g).all()) for g in ours)
    scale = max(float(jnp.max(jnp.abs(g))) for g in theirs)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ours, theirs)) < 1e-4 * scale


def test_without_x64_float32_runs_on_a_32_bit_grid():
    w, b, c = _problem(jnp.float32, 0.9)
    with jax.enable_x64(False):
        options = {"damp": 0.8, "atol": 1e-5, "rtol": 0.0, "max_steps": 100}
        solver = banax.get_solver("reversible", **options)
        ours, steps = _grads(Reversible(solver=solver), w, b[:1], c[:1], None)
        theirs, _ = _grads(BPTT(solver=banax.get_solver(
            "reversible", loop_kind="checkpointed", **options)), w, b[:1], c[:1], None)
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
