"""The core loop, exercised through a minimal solver written against the public
extension points: stopping, NaN guard, budget, batch mode, loop kinds, precision."""

import warnings

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from annotation_checker import without_annotation_checks
from hypothesis import given

import banax
from banax import Result
from helpers import contraction_matrix, dense_implicit_grad, tree_allclose
from minimal import Counter, DenseImplicit, Direct, Iterate


def linear(x, a, b):
    return a @ x + b


@pytest.fixture(scope="module")
def problem():
    a = contraction_matrix(jax.random.key(0), 6, 0.8, symmetric=False)
    b = jax.random.normal(jax.random.key(1), (6,))
    return a, b, jnp.linalg.solve(jnp.eye(6) - a, b)


def test_converges_to_the_dense_solution(problem):
    a, b, expected = problem
    sol = Direct(Iterate(rtol=1e-10, max_steps=500))((linear, (a, b)), jnp.zeros(6))
    assert sol.result == Result.CONVERGED
    assert jnp.allclose(sol.value, expected, atol=1e-8)
    assert sol.stats.rel_err <= 1e-10
    assert jnp.allclose(sol.stats.abs_err, jnp.linalg.norm(linear(sol.value, a, b) - sol.value))
    assert 0 < sol.stats.steps < 500


@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 8),
    radius=st.floats(0.05, 0.9),
)
def test_random_contractions_reach_their_fixed_point(seed, n, radius):
    a = contraction_matrix(jax.random.key(seed), n, radius, symmetric=False)
    b = jax.random.normal(jax.random.key(seed + 1), (n,))
    sol = Direct(Iterate(atol=1e-9, rtol=0.0, max_steps=1000))((linear, (a, b)), jnp.zeros(n))
    expected = np.linalg.solve(np.eye(n) - np.asarray(a), np.asarray(b))
    assert sol.result == Result.CONVERGED
    assert np.allclose(sol.value, expected, atol=1e-7)


def test_atol_and_rtol_semantics():
    # f(x) = x / 2 + 1 has x* = 2; from 0 the residual after k steps is 2⁻ᵏ.
    f = lambda x: x / 2 + 1  # noqa: E731
    x0 = jnp.zeros(())
    by_atol = Direct(Iterate(atol=1e-3, rtol=0.0, max_steps=100))(f, x0)
    assert by_atol.stats.abs_err <= 1e-3 < 2 * by_atol.stats.abs_err
    by_rtol = Direct(Iterate(atol=0.0, rtol=1e-3, max_steps=100))(f, x0)
    assert by_rtol.stats.rel_err <= 1e-3
    # Both disabled: runs to max_steps.
    neither = Direct(Iterate(atol=0.0, rtol=0.0, max_steps=7))(f, x0)
    assert neither.result == Result.MAX_STEPS and neither.stats.steps == 7


def test_nan_guard_reports_divergence_and_stops():
    f = lambda x: jnp.where(x > 10, jnp.nan, 2 * x + 1)  # noqa: E731
    sol = Direct(Iterate(max_steps=50))(f, jnp.ones(3))
    assert sol.result == Result.DIVERGED
    assert sol.stats.steps < 10


def test_exploding_iteration_is_diverged_not_max_steps():
    sol = Direct(Iterate(max_steps=2000))(lambda x: 10 * x + 1, jnp.ones(2, jnp.float32))
    assert sol.result == Result.DIVERGED


class TestStepBudget:
    f = staticmethod(lambda x: x / 2 + 1)

    def test_budget_limits_steps_and_is_clamped_to_max_steps(self):
        adjoint = Direct(Iterate(rtol=0.0, max_steps=20))
        assert adjoint(self.f, jnp.zeros(()), step_budget=jnp.array(5)).stats.steps == 5
        assert adjoint(self.f, jnp.zeros(()), step_budget=jnp.array(500)).stats.steps == 20
        assert adjoint(self.f, jnp.zeros(()), step_budget=jnp.array(0)).stats.steps == 0

    def test_changing_the_budget_under_jit_does_not_recompile(self):
        traces = []
        adjoint = Direct(Iterate(rtol=0.0, max_steps=20))

        @jax.jit
        def run(budget):
            traces.append(None)
            return adjoint(self.f, jnp.zeros(()), step_budget=budget).stats.steps

        assert [int(run(jnp.array(k))) for k in (3, 9, 50)] == [3, 9, 20]
        assert len(traces) == 1

    @pytest.mark.parametrize("bad", [5, 5.0, True, np.int64(5)])
    @without_annotation_checks()
    def test_python_numbers_are_a_type_error(self, bad):
        with pytest.raises(TypeError, match="step_budget must be a JAX array"):
            Direct(Iterate())(self.f, jnp.zeros(()), step_budget=bad)

    @without_annotation_checks()
    def test_non_integer_arrays_are_a_type_error(self):
        with pytest.raises(TypeError, match="scalar integer array"):
            Direct(Iterate())(self.f, jnp.zeros(()), step_budget=jnp.array(5.0))
        with pytest.raises(TypeError, match="scalar integer array"):
            Direct(Iterate())(self.f, jnp.zeros(()), step_budget=jnp.array([5]))


class TestBatchMode:
    # Sample i contracts with rate rates[i], so its steps to tolerance differ.
    rates = jnp.array([0.1, 0.5, 0.9])

    def f(self, z, rates, c):
        return rates[:, None] * z + c

    def test_per_sample_steps_residuals_and_values(self):
        c = jnp.ones((3, 4))
        adjoint = Direct(Counter(atol=1e-8, rtol=0.0, max_steps=500, batch_axis=0))
        sol = adjoint((self.f, (self.rates, c)), jnp.zeros((3, 4)))
        expected = c / (1 - self.rates[:, None])
        assert jnp.allclose(sol.value, expected, atol=1e-7)
        steps = np.asarray(sol.stats.steps)
        assert steps.shape == (3,) and steps[0] < steps[1] < steps[2]
        assert bool(jnp.all(sol.stats.abs_err <= 1e-8))
        assert bool(jnp.all(sol.result == Result.CONVERGED))
        # From 0, the residual after k steps is rate^k·‖c‖: each sample stopped at the
        # first k where that is below atol.
        for i, rate in enumerate(np.asarray(self.rates)):
            r0 = np.linalg.norm(np.asarray(c[i]))
            assert rate ** steps[i] * r0 <= 1e-8 < rate ** (steps[i] - 1) * r0

    def test_frozen_samples_keep_their_solver_state(self):
        # Counter's state counts steps per sample; frozen samples stop counting.
        c = jnp.ones((3, 4))
        adjoint = Direct(Counter(atol=1e-8, rtol=0.0, max_steps=500, batch_axis=0))
        problem = banax._adjoint.make_problem(
            (self.f, (self.rates, c)), jnp.zeros((3, 4)), has_aux=False, trace=None,
            step_budget=None, batch_axis=0,
        )
        flat = adjoint.solve(problem)
        assert np.array_equal(flat.state, flat.stats.steps)

    def test_batch_axis_other_than_zero_and_same_answer_as_vmap(self):
        c = jax.random.normal(jax.random.key(0), (4, 3))  # batch on axis 1
        f = lambda z, rates, c: rates[None, :] * z + c  # noqa: E731
        adjoint = Direct(Iterate(atol=1e-9, rtol=0.0, max_steps=500, batch_axis=1))
        sol = adjoint((f, (self.rates, c)), jnp.zeros((4, 3)))
        single = Direct(Iterate(atol=1e-9, rtol=0.0, max_steps=500))
        vmapped = jax.vmap(
            lambda r, ci: single((lambda z, r, ci: r * z + ci, (r, ci)), jnp.zeros(4)).value,
            out_axes=1,
        )(self.rates, c.T)
        assert jnp.allclose(sol.value, vmapped, atol=1e-8)
        assert sol.stats.steps.shape == (3,)

    def test_keep_best_returns_each_samples_lowest_residual_iterate(self):
        # Sample 0 converges, sample 1 oscillates with growing amplitude after a
        # good start: its best iterate is the initial one.
        def f(z):
            return jnp.stack([0.5 * z[0] + 1, -2.0 * z[1]])

        z0 = jnp.array([[0.0, 0.0], [1e-3, 1e-3]])
        solver = Iterate(atol=1e-6, rtol=0.0, max_steps=8, batch_axis=0, keep_best=True)
        sol = Direct(solver)(f, z0)
        assert jnp.allclose(sol.value[1], z0[1])
        assert jnp.allclose(sol.stats.abs_err[1], jnp.linalg.norm(f(z0)[1] - z0[1]))
        last = Direct(Iterate(atol=1e-6, rtol=0.0, max_steps=8, batch_axis=0))(f, z0)
        assert last.stats.abs_err[1] > 100 * sol.stats.abs_err[1]

    def test_batch_axis_errors(self):
        with pytest.raises(ValueError, match="same size along batch_axis"):
            Direct(Iterate(batch_axis=0))(lambda t: t, (jnp.zeros((3, 2)), jnp.zeros((4, 2))))
        with pytest.raises(ValueError, match="out of range"):
            Direct(Iterate(batch_axis=2))(lambda t: t, jnp.zeros((3, 2)))
        with pytest.raises(ValueError, match="batch_axis must be None or a non-negative"):
            Iterate(batch_axis=-1)


@pytest.mark.parametrize("loop_kind", ["lax", "bounded", "checkpointed"])
def test_loop_kinds_agree(problem, loop_kind):
    a, b, expected = problem
    sol = Direct(Iterate(rtol=1e-10, max_steps=300, loop_kind=loop_kind))(
        (linear, (a, b)), jnp.zeros(6)
    )
    assert jnp.allclose(sol.value, expected, atol=1e-8)


@pytest.mark.parametrize("loop_kind", ["bounded", "checkpointed"])
def test_differentiable_loop_kinds_give_the_implicit_gradient(problem, loop_kind):
    a, b, expected = problem
    adjoint = Direct(Iterate(rtol=1e-12, max_steps=300, loop_kind=loop_kind))
    grad = jax.grad(lambda a, b: jnp.sum(adjoint((linear, (a, b)), jnp.zeros(6)).value ** 2),
                    argnums=(0, 1))(a, b)
    truth = dense_implicit_grad(lambda z, t: linear(z, *t), expected, (a, b), 2 * expected)
    assert tree_allclose(grad, truth, rtol=1e-6, atol=1e-8)


def test_linear_solve_adjoint_base_gives_the_implicit_gradient(problem):
    a, b, expected = problem
    adjoint = DenseImplicit(Iterate(rtol=1e-12, max_steps=300))
    grad = jax.grad(lambda a, b: jnp.sum(jnp.sin(adjoint((linear, (a, b)), jnp.zeros(6)).value)),
                    argnums=(0, 1))(a, b)
    truth = dense_implicit_grad(lambda z, t: linear(z, *t), expected, (a, b), jnp.cos(expected))
    assert tree_allclose(grad, truth, rtol=1e-6, atol=1e-8)


def test_linear_solve_adjoint_gradients_reach_kwargs_and_module_arrays(problem):
    a, b, expected = problem

    class Cell(eqx.Module):
        a: jax.Array

        def __call__(self, x, *, bias):
            return self.a @ x + bias

    adjoint = DenseImplicit(Iterate(rtol=1e-12, max_steps=300))
    grad_cell, grad_b = jax.grad(
        lambda cell, b: jnp.sum(adjoint((cell, (), {"bias": b}), jnp.zeros(6)).value),
        argnums=(0, 1),
    )(Cell(a), b)
    truth = dense_implicit_grad(lambda z, t: linear(z, *t), expected, (a, b), jnp.ones(6))
    assert tree_allclose((grad_cell.a, grad_b), truth, rtol=1e-6, atol=1e-8)


def test_pytree_state(problem):
    a, b, _ = problem
    # Two coupled blocks stored as a dict; the fixed point is the stacked solution.
    def f(state, a, b):
        x = jnp.concatenate([state["u"], state["v"].ravel()])
        y = a @ x + b
        return {"u": y[:2], "v": y[2:].reshape(2, 2)}

    sol = Direct(Iterate(rtol=1e-10, max_steps=500))(
        (f, (a, b)), {"u": jnp.zeros(2), "v": jnp.zeros((2, 2))}
    )
    expected = jnp.linalg.solve(jnp.eye(6) - a, b)
    assert jnp.allclose(sol.value["u"], expected[:2], atol=1e-8)
    assert jnp.allclose(sol.value["v"].ravel(), expected[2:], atol=1e-8)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_dtypes_are_kept_and_stats_are_at_least_float32(dtype):
    f = lambda x: 0.5 * x + 1  # noqa: E731
    sol = Direct(Iterate(rtol=1e-2, max_steps=100))(f, jnp.zeros(4, dtype))
    assert sol.value.dtype == dtype
    assert sol.stats.abs_err.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
    assert sol.result == Result.CONVERGED
    assert jnp.allclose(sol.value.astype(jnp.float32), 2.0, rtol=2e-2)


def test_jit_and_vmap(problem):
    a, b, expected = problem
    adjoint = Direct(Iterate(rtol=1e-10, max_steps=500))
    solve = jax.jit(lambda b: adjoint((linear, (a, b)), jnp.zeros(6)).value)
    assert jnp.allclose(solve(b), expected, atol=1e-8)
    bs = jnp.stack([b, 2 * b, -b])
    assert jnp.allclose(jax.vmap(solve)(bs), jnp.stack([expected, 2 * expected, -expected]),
                        atol=1e-8)


class TestPrecisionWarning:
    """Tolerances finer than the state's dtype resolves are flagged at trace time."""

    @staticmethod
    def solve(dtype, features=16, **options):
        f = lambda x: 0.5 * x + 1  # noqa: E731  (a fresh f: traced anew)
        return Direct(Iterate(max_steps=30, **options))(f, jnp.zeros(features, dtype))

    def test_bfloat16_with_rtol_1e_3_warns_with_the_reachable_tolerance(self):
        with pytest.warns(banax.BanaxPrecisionWarning,
                          match=r"rtol=0\.001 are finer than a bfloat16 state can "
                                r"resolve.*run to max_steps.*Use rtol >= 0\.00781"):
            self.solve(jnp.bfloat16, rtol=1e-3)

    def test_unreachable_atol_names_the_features(self):
        # float16: ε √N = 9.8e-4 · 4 for 16 features.
        with pytest.warns(banax.BanaxPrecisionWarning,
                          match=r"atol=1e-05.*float16.*atol >= 0\.0039\d* for 16 entries"):
            self.solve(jnp.float16, atol=1e-5, rtol=0.0)

    @pytest.mark.parametrize("dtype, options", [
        (jnp.float32, {}),                                 # default rtol=1e-5
        (jnp.bfloat16, {"rtol": 1e-2}),                    # just above ε = 2⁻⁷
        (jnp.bfloat16, {"rtol": 1e-3, "atol": 0.5}),       # one reachable test suffices
        (jnp.float16, {"rtol": 0.0, "atol": 0.0}),         # a fixed number of steps
        (jnp.float64, {"rtol": 1e-14}),
    ])
    def test_reachable_tolerances_do_not_warn(self, dtype, options):
        with warnings.catch_warnings():
            warnings.simplefilter("error", banax.BanaxPrecisionWarning)
            self.solve(dtype, **options)

    def test_the_rule(self):
        assert banax.reachable_tolerances(jnp.bfloat16, 64) == (2.0**-7, 2.0**-7 * 8)
        assert banax.reachable_tolerances(jnp.complex64, 1)[0] == float(
            jnp.finfo(jnp.float32).eps)


@pytest.mark.parametrize("dtype, wide, real", [
    (jnp.float16, jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32, jnp.float32),
    (jnp.float32, jnp.float32, jnp.float32), (jnp.float64, jnp.float64, jnp.float64),
    (jnp.complex64, jnp.complex64, jnp.float32), (jnp.complex128, jnp.complex128, jnp.float64),
])
def test_working_and_stats_dtypes(dtype, wide, real):
    assert banax.extend.working_dtype(dtype) == wide
    assert banax.extend.stats_dtype(dtype) == real


def test_working_dtype_refuses_integers():
    with pytest.raises(TypeError, match="expected a floating or complex dtype, got int32"):
        banax.extend.working_dtype(jnp.int32)
