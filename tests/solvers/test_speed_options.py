"""Options that change how fast a solve runs but not what it computes.

`check_every=k` tests for convergence once per `k` steps and masks the steps past a
sample's stop (or the step budget): values, results, statistics, the trace and the
solver's final state must be those of `check_every=1`, in batch mode and outside it.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax import Result
from helpers import contraction_matrix, dense_implicit_grad
from minimal import Direct

N = 6
# Samples contract at different rates, so they stop at different steps; the last one
# diverges and must be reported DIVERGED by the NaN/Inf guard, at the same step.
RATES = jnp.array([0.3, 0.6, 0.9, 0.97, 3.0])
CONFIGS = [
    ("picard", {}),
    ("anderson", {}),
    ("broyden", {}),
    ("broyden", {"ls_steps": 2}),
    ("reversible", {}),
]
# Each k is a compile: every solver with k=3, Anderson with k that divides neither the
# stopping steps nor the budget too.
EVERY = {"anderson": (2, 3, 5)}


def cell(z, w, b, rate):
    # Samples with rate > 1 have no fixed point (f(z) − z = 1) and turn NaN at |z| ≥ 1.
    blow_up = z + 1 + 0 * jnp.log(1 - jnp.abs(z))
    return jnp.where(rate[:, None] > 1, blow_up, jnp.tanh(rate[:, None] * (z @ w.T) + b))


@pytest.fixture(scope="module")
def problem():
    w = contraction_matrix(jax.random.key(0), N, 1.0, symmetric=False)
    b = jax.random.normal(jax.random.key(1), (RATES.shape[0], N))
    return w, b, RATES


def _count(acc, x, fx, f_aux, **tags):
    total, trials = acc
    return total + 1, trials + (1 if tags.get("tag") == "line_search" else 0)


@eqx.filter_jit
def run(solver, args, x0, budget):
    trace = (_count, (jnp.array(0), jnp.array(0)))
    sol = Direct(solver)((cell, args), x0, trace=trace, step_budget=budget)
    flat = banax.extend.solve_flat(solver, lambda z: cell(z, *args), x0, budget)
    return sol, flat.state


def _solve(name, options, args, budget, **extra):
    solver = banax.get_solver(
        name, atol=1e-9, rtol=0.0, max_steps=60, batch_axis=0, **options, **extra
    )
    return run(solver, args, jnp.zeros_like(args[1]), jnp.asarray(budget))


def _assert_identical(a, b):
    (sol_a, state_a), (sol_b, state_b) = a, b
    assert np.array_equal(sol_a.result, sol_b.result)
    assert np.array_equal(sol_a.stats.steps, sol_b.stats.steps)
    assert jax.tree.all(jax.tree.map(np.array_equal, sol_a.trace, sol_b.trace))
    for x, y in [(sol_a.value, sol_b.value), (sol_a.stats.abs_err, sol_b.stats.abs_err),
                 (sol_a.stats.rel_err, sol_b.stats.rel_err)] + list(
                     zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, options", CONFIGS,
                         ids=[n + ("_ls" if o else "") for n, o in CONFIGS])
def test_check_every_gives_the_same_solve_in_batch_mode(problem, name, options):
    reference = _solve(name, options, problem, 60)
    sol = reference[0]
    assert (sol.result[:-1] == Result.CONVERGED).all() and sol.result[-1] == Result.DIVERGED
    assert len(set(np.asarray(sol.stats.steps).tolist())) > 2  # samples stop apart
    for every in EVERY.get(name, (3,)):
        _assert_identical(_solve(name, options, problem, 60, check_every=every), reference)


@pytest.mark.parametrize("every", [3, 4])
def test_check_every_respects_a_step_budget_that_it_does_not_divide(problem, every):
    reference = _solve("anderson", {}, problem, 7)
    assert (reference[0].stats.steps <= 7).all()
    assert (reference[0].result == Result.MAX_STEPS).any()
    _assert_identical(_solve("anderson", {}, problem, 7, check_every=every), reference)


def test_check_every_keeps_the_best_iterates(problem):
    reference = _solve("picard", {}, problem, 60, keep_best=True)
    _assert_identical(_solve("picard", {}, problem, 60, keep_best=True, check_every=4),
                      reference)


@pytest.mark.parametrize("every", [4])
def test_check_every_outside_batch_mode(problem, every):
    # One sample: no per-sample freezing with check_every=1, masking with k > 1.
    w, b, _ = problem

    def solve(**extra):
        solver = banax.get_solver("anderson", atol=1e-9, rtol=0.0, max_steps=60, **extra)
        trace = banax.trace_count()
        return jax.jit(lambda w, b: Direct(solver)(
            lambda z: jnp.tanh(0.9 * w @ z + b), jnp.zeros(N), trace=trace))(w, b[0])

    ref, sol = solve(), solve(check_every=every)
    assert ref.result == Result.CONVERGED and sol.result == ref.result
    assert sol.stats.steps == ref.stats.steps and sol.trace == ref.trace
    np.testing.assert_allclose(sol.value, ref.value, rtol=1e-12, atol=1e-14)


def test_check_every_gives_the_same_gradient_through_a_bounded_loop(problem):
    w, b, _ = problem
    rates = jnp.array([0.3, 0.9])

    def loss(w, every):
        solver = banax.get_solver("picard", atol=1e-9, rtol=0.0, max_steps=40,
                                  batch_axis=0, loop_kind="bounded", check_every=every)
        sol = Direct(solver)((cell, (w, b[:2], rates)), jnp.zeros((2, N)))
        return jnp.sum(sol.value**2)

    grads = [jax.jit(jax.grad(loss), static_argnums=1)(w, k) for k in (1, 3)]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("value, error, words", [
    (0, ValueError, "check_every must be an int >= 1, got 0"),
    (2.0, TypeError, "check_every must be an int >= 1, got 2.0"),
    (True, TypeError, "(a bool)"),
])
@without_annotation_checks()
def test_check_every_must_be_a_positive_int(value, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        banax.get_solver("picard", check_every=value)


# --- the implicit adjoint's warm start (SHINE) -----------------------------------------


def _implicit_gradient(warm_start, budget=None):
    w = contraction_matrix(jax.random.key(2), N, 0.95, symmetric=False)
    b = jax.random.normal(jax.random.key(3), (N,))
    c = jax.random.normal(jax.random.key(4), (N,))
    solver = banax.get_solver("broyden", atol=1e-11, rtol=0.0, max_steps=200,
                              history_size=2 * N)
    adjoint = banax.get_adjoint("implicit", solver=solver, warm_start=warm_start,
                                on_failure="ignore")
    fn = lambda z, w: jnp.tanh(w @ z + b)  # noqa: E731

    @jax.jit
    def grads(w, probe):
        def loss(w, probe):
            sol = adjoint((fn, w), jnp.zeros(N), backward_probe=probe,
                          backward_budget=budget)
            return jnp.dot(c, sol.value), sol.value

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(w, probe)

    (g_w, stats), z_star = grads(w, banax.BackwardStats.probe())
    # The start λ₀ from Broyden's final factors, (I − Jᵀ)⁻¹ ≈ I + Vᵀ U.
    forward = banax.extend.solve_flat(solver, lambda z: jax.vmap(fn, (0, None))(z, w),
                               jnp.zeros((1, N)))
    u, v = solver.inverse_jacobian_factors(forward.state)
    shine = c + v[0].T @ (u[0] @ c)
    _, vjp = jax.vjp(lambda th: fn(z_star, th), w)
    return g_w, stats, dense_implicit_grad(fn, z_star, w, c), vjp(shine)[0]


def test_warm_start_keeps_the_implicit_gradient_exact():
    for warm in (False, True):
        g, stats, exact, _ = _implicit_gradient(warm)
        assert stats.result == Result.CONVERGED
        np.testing.assert_allclose(g, exact, rtol=1e-8, atol=1e-10)


def test_warm_start_starts_the_backward_solve_from_the_low_rank_estimate():
    # With no backward step allowed, λ is the starting point: Broyden's estimate.
    g, stats, exact, from_shine = _implicit_gradient(True, budget=jnp.array(0))
    assert stats.steps == 0
    np.testing.assert_allclose(g, from_shine, rtol=1e-10, atol=1e-12)
    assert not np.allclose(g, exact, rtol=1e-3)


@without_annotation_checks()
def test_warm_start_must_be_a_flag():
    solver = banax.get_solver("broyden")
    with pytest.raises(TypeError, match="warm_start must be True or False"):
        banax.get_adjoint("implicit", solver=solver, warm_start=1)
