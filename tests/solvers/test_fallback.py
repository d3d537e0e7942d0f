"""`Fallback`: the secondary solves, from the primary's best iterate, exactly the samples
the primary failed on; it costs nothing when all converged; the pairing rules hold."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax import Result, extend
from helpers import dense_implicit_grad, tree_allclose

N, BATCH = 5, 3
PICARD3 = {"name": "picard", "max_steps": 3, "batch_axis": 0, "rtol": 1e-10}
ANDERSON = {"name": "anderson", "max_steps": 100, "batch_axis": 0, "rtol": 1e-10}


@pytest.fixture(scope="module")
def problem():
    """`f(z) = z Aᵀ + b` per sample, ρ(A) = 0.95: z* = b (I − Aᵀ)⁻¹. The last sample has
    b = 0, so z0 = 0 is already its fixed point."""
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (N, N)))
    a = (q * jnp.linspace(0.5, 0.95, N)[None, :]) @ q.T
    b = jax.random.normal(jax.random.key(1), (BATCH, N)).at[-1].set(0.0)
    z_star = jnp.linalg.solve((jnp.eye(N) - a).T, b.T).T
    return a, b, z_star


def linear(z, a, b):
    return z @ a.T + b


def _solve(solver, problem, **call):
    a, b, _ = problem
    adjoint = banax.get_adjoint("jfb", solver=solver)
    return adjoint((linear, (a, b)), jnp.zeros((BATCH, N)), **call)


def test_secondary_converges_where_the_primary_stops(problem):
    fallback = banax.get_solver("fallback", primary=PICARD3, secondary=ANDERSON)
    alone = _solve(banax.get_solver(**PICARD3), problem)
    sol = _solve(fallback, problem)
    assert bool(jnp.all(alone.result[:-1] == Result.MAX_STEPS))
    assert bool(jnp.all(sol.result == Result.CONVERGED))
    assert tree_allclose(sol.value, problem[2], rtol=1e-8, atol=1e-9)
    # The sample the primary solved at z0 keeps its 0 steps; the others took 3 Picard
    # steps, then as many Anderson steps as Anderson needs from Picard's best iterate.
    best = banax.get_solver(**{**PICARD3, "keep_best": True})
    z3 = _solve(best, problem).value
    a, b, _ = problem
    from_z3 = banax.get_adjoint("jfb", solver=banax.get_solver(**ANDERSON))(
        (linear, (a, b)), z3)
    assert int(sol.stats.steps[-1]) == 0
    assert jnp.array_equal(sol.stats.steps[:-1], 3 + from_z3.stats.steps[:-1])


def test_no_secondary_evaluation_when_all_converge(problem):
    roomy = {**PICARD3, "max_steps": 2000}
    fallback = banax.solver.Fallback(primary=roomy, secondary=ANDERSON)
    sol = _solve(fallback, problem, trace=banax.trace_count())
    alone = _solve(banax.get_solver(**roomy), problem, trace=banax.trace_count())
    assert bool(jnp.all(sol.result == Result.CONVERGED))
    assert int(sol.trace) == int(alone.trace) == 1 + int(jnp.max(alone.stats.steps))
    assert jnp.array_equal(sol.stats.steps, alone.stats.steps)


def expansive(z):
    """`2z + 1` (fixed point −1, repelling), NaN once `|z| > 1000`."""
    return jnp.where(jnp.abs(z) > 1e3, jnp.nan, 2 * z + 1)


def test_diverged_samples_restart_from_the_best_finite_iterate():
    """Picard on an expansive map runs into NaN; Anderson (GMRES-like on a linear map)
    finds z* = −1 from the lowest-residual finite iterate."""
    fallback = banax.get_solver(
        "fallback", primary={"name": "picard", "max_steps": 50},
        secondary={"name": "anderson", "max_steps": 30, "rtol": 1e-10},
    )
    alone = banax.get_adjoint("jfb", solver=fallback.primary)(expansive, jnp.zeros(2))
    sol = banax.get_adjoint("jfb", solver=fallback)(expansive, jnp.zeros(2))
    assert alone.result == Result.DIVERGED
    assert sol.result == Result.CONVERGED
    assert tree_allclose(sol.value, -jnp.ones(2), rtol=1e-8)
    assert int(sol.stats.steps) > int(alone.stats.steps)


def test_step_budget_caps_both_phases(problem):
    fallback = banax.get_solver("fallback", primary=PICARD3, secondary=ANDERSON)
    sol = _solve(fallback, problem, step_budget=jnp.asarray(5))
    assert int(jnp.max(sol.stats.steps)) == 5
    assert bool(jnp.all(sol.result[:-1] == Result.MAX_STEPS))


def test_implicit_gradient_through_a_fallback(problem):
    a, b, z_star = problem
    fallback = banax.get_solver("fallback", primary=PICARD3, secondary=ANDERSON)
    adj = banax.get_adjoint("implicit", solver=fallback,
                            b_solver={"name": "anderson", "rtol": 1e-12})

    def loss(a, b):
        z = adj((linear, (a, b)), jnp.zeros((BATCH, N))).value
        return jnp.sum(jnp.sin(z))

    grads = jax.grad(loss, argnums=(0, 1))(a, b)
    g = jnp.cos(z_star)
    truth = dense_implicit_grad(lambda z, t: linear(z, *t), z_star, (a, b), g)
    assert tree_allclose(grads, truth, rtol=1e-6, atol=1e-8)


def test_pairing_rules():
    fallback = banax.get_solver("fallback", primary="picard", secondary="anderson")
    assert not isinstance(fallback, (extend.InvertibleStep, extend.LowRankInverseJacobian))
    with pytest.raises(ValueError, match="Reversible: .*Fallback"):
        banax.get_adjoint("reversible", solver=fallback)
    with pytest.raises(ValueError, match="GDEQ: Fallback does not expose low-rank"):
        banax.get_adjoint("gdeq", solver=fallback)
    with pytest.raises(ValueError, match="BPTT: Fallback has loop_kind='lax'"):
        banax.get_adjoint("bptt", solver=fallback)
    line_search = banax.solver.Fallback(primary={"name": "broyden", "ls_steps": 2},
                                        secondary="anderson")
    assert fallback.differentiable_step and not line_search.differentiable_step
    assert fallback.max_steps == 100 and fallback.loop_kind == "lax"


def test_bad_input():
    with pytest.raises(ValueError, match="primary and secondary are the same solver"):
        banax.get_solver("fallback", primary="anderson", secondary={"name": "anderson"})
    with pytest.raises(TypeError, match=r"Fallback: secondary= is missing; give both"):
        banax.get_solver("fallback", primary="picard")
    with pytest.raises(TypeError, match=r"Fallback: primary= is missing"):
        banax.solver.Fallback(secondary="picard")
    with without_annotation_checks(), pytest.raises(
            TypeError, match="primary must be a banax.Solver instance, a registry"):
        banax.solver.Fallback(primary=3, secondary="picard")
    with pytest.raises(TypeError, match=r"secondary must be .* got \{'rtol': 0.1\}"):
        banax.solver.Fallback(primary="picard", secondary={"rtol": 0.1})
    with pytest.raises(banax.UnknownNameError, match="Registered solvers: .*anderson"):
        banax.solver.Fallback(primary="picard", secondary="andersen")
    with pytest.raises(ValueError, match="batch_axis=0 but secondary has batch_axis=None"):
        banax.solver.Fallback(primary={"name": "picard", "batch_axis": 0}, secondary="anderson")
    with pytest.raises(TypeError, match="rtol cannot be set on the fallback; .* set them there"):
        banax.get_solver("fallback", primary="picard", secondary="anderson", rtol=1e-3)
    fallback = banax.solver.Fallback(primary="picard", secondary="anderson")
    # A combinator of whole solves, with no step of its own to call.
    assert isinstance(fallback, extend.AbstractSolveCombinator)
    assert not isinstance(fallback, banax.Solver) and not hasattr(fallback, "step")
    assert eqx.tree_equal(fallback, banax.get_solver("fallback", primary="picard",
                                                     secondary="anderson"))
