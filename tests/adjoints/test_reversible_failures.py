"""How the reversible adjoint says that it could not walk a solve back: a replay that
ends away from the forward's `z*` (flat mode) and a sample whose solve left the
integer grid are backward statuses that `on_failure` acts on; a rewind that misses
`z0` (exact mode) raises; bad options are refused at construction."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax import BackwardStats, Result
from banax.adjoint import Reversible


def _drifting():
    """`f(z) = tanh(w z) + 1 + ε`, with an `ε` (0 to 0.06) that changes at every
    evaluation: the backward pass never sees the forward's `f`."""
    calls = [0]

    def noise(z):
        calls[0] += 1
        return np.full(z.shape, 1e-2 * (calls[0] % 7), z.dtype)

    def f(z, w):
        shape = jax.ShapeDtypeStruct(z.shape, z.dtype)
        return jnp.tanh(w * z) + 1.0 + jax.pure_callback(noise, shape,
                                                         jax.lax.stop_gradient(z))

    return f


def _grad(adjoint, f, w, x0, probe):
    """The gradients with respect to `w` and `x0`, the backward report, the result."""

    @eqx.filter_jit
    def grads(w, x0, probe):
        def loss(w, x0, probe):
            sol = adjoint((f, (w,)), x0, backward_probe=probe)
            value = jnp.where(jnp.isfinite(sol.value), sol.value, 0.0)
            return jnp.sum(value), sol.result

        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(w, x0, probe)

    (grad, x0_grad, stats), result = grads(w, x0, probe)
    jax.effects_barrier()
    return (grad, x0_grad), stats, result


def _flat(on_failure, **options):
    solver = banax.get_solver("reversible", rtol=1e-5, max_steps=50, **options)
    return Reversible(solver=solver, mode="flat", on_failure=on_failure)


def test_a_replay_that_ends_away_from_z_star_reports_diverged():
    _, stats, _ = _grad(_flat("ignore"), _drifting(), jnp.asarray(0.5), jnp.zeros(3),
                        BackwardStats.probe())
    assert stats.result_codes() == Result.DIVERGED
    # The replay ends about the noise's size away: far above sqrt(eps).
    assert 1e-3 < float(stats.rel_err) < 1.0
    assert float(stats.abs_err) > 0 and float(stats.steps) > 0


def test_a_faithful_replay_reports_its_distance_and_converged():
    f = lambda z, w: jnp.tanh(w * z) + 1.0  # noqa: E731
    _, stats, _ = _grad(_flat("raise"), f, jnp.asarray(0.5), jnp.zeros(3),
                        BackwardStats.probe())
    assert stats.result_codes() == Result.CONVERGED
    assert float(stats.rel_err) <= float(jnp.sqrt(jnp.finfo(jnp.float64).eps))
    assert float(stats.steps) > 0


def test_on_failure_warns_or_raises_about_a_drifting_replay():
    with pytest.warns(
        banax.BackwardSolveWarning,
        match=r"Reversible: the backward pass could not rebuild the forward steps.*mode='exact'",
    ):
        _grad(_flat("warn"), _drifting(), jnp.asarray(0.5), jnp.zeros(3), None)
    with pytest.raises(
        Exception, match="Reversible: the backward pass could not rebuild.*replay of mode='flat'"
    ):
        _grad(_flat("raise"), _drifting(), jnp.asarray(0.5), jnp.zeros(3), None)


def test_an_exact_rewind_that_misses_z0_raises():
    solver = banax.get_solver("reversible", rtol=1e-5, max_steps=50)
    adjoint = Reversible(solver=solver, on_failure="ignore")
    with pytest.raises(Exception, match="rewind did not return to z0.*mode='flat'"):
        _grad(adjoint, _drifting(), jnp.asarray(0.5), jnp.zeros(3), None)


@pytest.mark.parametrize("mode", ["exact", "flat"])
def test_a_sample_that_left_the_grid_gets_diverged_and_no_gradient(mode):
    # Sample 0 grows 3x per step and leaves the grid; sample 1 converges to
    # z* = 1 / (1 - a) = 2, whose sum over 4 features has gradient 4 / (1 - a)^2 = 16.
    solver = banax.get_solver("reversible", rtol=1e-8, max_steps=200, batch_axis=0)
    adjoint = Reversible(solver=solver, mode=mode, on_failure="ignore")
    a = jnp.asarray([[3.0], [0.5]])
    (grad, x0_grad), stats, result = _grad(adjoint, lambda z, a: a * z + 1.0, a,
                                           jnp.ones((2, 4)), BackwardStats.probe(2))
    assert result.tolist() == [Result.DIVERGED, Result.CONVERGED]
    assert stats.result_codes().tolist() == [Result.DIVERGED, Result.CONVERGED]
    assert float(grad[0, 0]) == 0.0
    assert float(grad[1, 0]) == pytest.approx(16.0, rel=1e-6)
    # z* does not depend on x0: the converged sample's x0 gradient is a^K, tiny.
    assert bool((x0_grad[0] == 0).all()) and float(jnp.max(jnp.abs(x0_grad[1]))) < 1e-6


def test_options_are_checked_at_construction():
    solver = banax.get_solver("reversible")
    assert Reversible(solver=solver).mode == "exact"
    assert Reversible(solver=solver).checkpoints == 16
    with pytest.raises(ValueError, match=r"mode must be one of \('exact', 'flat'\).*'fast'"):
        Reversible(solver=solver, mode="fast")
    with pytest.raises(ValueError, match="checkpoints must be an int >= 1.*mode='flat'"):
        Reversible(solver=solver, mode="flat", checkpoints=0)
    with pytest.raises(TypeError, match="checkpoints"):
        Reversible(solver=solver, checkpoints=2.0)
