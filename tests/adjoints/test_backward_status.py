"""How a backward solve ended, delivered through a probe's cotangent; the on_failure
policies; the run-time backward budget. Backward solves are made to fail on purpose:
too few steps on a contraction, and an expansive f whose forward converges from a lucky
start while fixed-point iteration on `λ = ḡ + Jᵀλ` cannot."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax import BackwardStats, Result
from banax.adjoint import BPTT, GDEQ, JFB, Implicit, NeumannPhantom
from helpers import contraction_matrix

N = 4
W = contraction_matrix(jax.random.key(0), N, 0.9, symmetric=False)
#: Sample 0 sits at its fixed point z* = 0 with ḡ = 0 (nothing to solve); the others
#: are driven harder and harder.
X = jnp.array([[0.0], [0.1], [0.5], [2.0]]) * jnp.ones((1, N))
C = jnp.array([[0.0], [1.0], [1.0], [1.0]]) * jnp.ones((1, N))


def _cell(z, w, x):
    return jnp.tanh(z @ w.T + x)


def _solver(**options):
    return banax.get_solver("picard", atol=1e-12, rtol=0.0, max_steps=300, **options)


def _grads_of(adjoint, w, x, x0, probe, budget=None):
    """`(∂L/∂w, BackwardStats)` for `L = Σ c · z*`, inside jit."""

    def loss(w, probe):
        sol = adjoint((_cell, (w, x)), x0, backward_probe=probe, backward_budget=budget)
        return jnp.sum(C[: x0.shape[0]].reshape(x0.shape) * sol.value)

    return jax.grad(loss, argnums=(0, 1))(w, probe)


_grads = eqx.filter_jit(_grads_of)


def _batched(b_solver, **options):
    return Implicit(solver=_solver(batch_axis=0), b_solver=b_solver, **options)


def _dense_residuals(w, x, k):
    """Per sample, `‖(Jᵀ)^(k+1) ḡ‖`: the residual of Picard on `λ = ḡ + Jᵀλ` after `k`
    steps from `λ₀ = ḡ` (independent of banax: a dense Jacobian at the fixed point)."""
    z = jnp.zeros_like(x)
    for _ in range(400):
        z = _cell(z, w, x)
    # J = diag(1 − z*²) W for each sample, since f(z*) = z*.
    return jnp.stack([
        jnp.linalg.norm(jnp.linalg.matrix_power(((1 - zb**2)[:, None] * w).T, k + 1) @ gb)
        for zb, gb in zip(z, C)
    ])


def test_too_few_backward_steps_are_reported_per_sample():
    adjoint = _batched(banax.get_solver("picard", atol=1e-10, rtol=0.0, max_steps=3),
                       on_failure="ignore")
    _, stats = _grads(adjoint, W, X, jnp.zeros((4, N)), BackwardStats.probe(4))
    assert stats.steps.dtype == jnp.float32 and stats.steps.shape == (4,)
    assert stats.steps.tolist() == [0, 3, 3, 3]
    codes = stats.result_codes()
    assert codes.dtype == jnp.int32
    assert codes.tolist() == [Result.CONVERGED, Result.MAX_STEPS, Result.MAX_STEPS,
                              Result.MAX_STEPS]
    assert banax.result_summary(codes) == "CONVERGED: 1, MAX_STEPS: 3"
    truth = _dense_residuals(W, X, 3)
    assert jnp.allclose(stats.abs_err, truth.astype(jnp.float32), rtol=1e-4, atol=1e-7)
    assert jnp.all(stats.rel_err[1:] > 0)


def test_a_converged_backward_solve_reports_its_steps_and_residual():
    adjoint = _batched(banax.get_solver("picard", atol=1e-10, rtol=0.0, max_steps=400))
    _, stats = _grads(adjoint, W, X, jnp.zeros((4, N)), BackwardStats.probe(4))
    assert (stats.result_codes() == Result.CONVERGED).all()
    assert stats.steps[0] == 0 and (stats.steps[1:] > 3).all()
    assert (stats.abs_err <= 1e-10).all()


# The expansive problem: z* = -c/(a - 1) with a = 2, reached at once from x0 = z*; the
# exact gradient of z* in c is 1/(1 - a) = -1, but Picard on λ = ḡ + aλ doubles λ.
def _expansive(z, a, c):
    return a * z + c


def _expansive_grad(adjoint, probe=None):
    @eqx.filter_jit
    def run(c, probe):
        def loss(c, probe):
            x0 = jnp.array([-1.0])
            sol = adjoint((_expansive, (jnp.array(2.0), c)), x0, backward_probe=probe)
            return jnp.sum(sol.value), sol.result

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(c, probe)

    (grad_c, stats), forward = run(jnp.array(1.0), BackwardStats.probe())
    jax.effects_barrier()
    return grad_c, stats, forward


def _picard_adjoint(on_failure):
    return Implicit(solver=_solver(), b_solver=banax.get_solver("picard", max_steps=40),
                    on_failure=on_failure)


def test_an_expansive_backward_system_is_flagged_not_silently_wrong():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad_c, stats, forward = _expansive_grad(_picard_adjoint("ignore"))
    assert forward == Result.CONVERGED
    assert abs(float(grad_c) + 1) > 1e6  # the wrong answer, now flagged
    assert stats.result_codes() != Result.CONVERGED and stats.steps == 40
    assert stats.abs_err > 1e6
    # A Krylov backward solve gets the exact -1, and says so.
    gmres = Implicit(solver=_solver(), b_solver=lx.GMRES(rtol=1e-10, atol=1e-10))
    grad_c, stats, _ = _expansive_grad(gmres)
    assert float(grad_c) == pytest.approx(-1.0, rel=1e-8)
    assert stats.result_codes() == Result.CONVERGED and stats.abs_err < 1e-9


def test_on_failure_warn_warns_from_inside_jit():
    # The text is fixed (so Python's filter shows it once per call site); the counts go
    # to the summary, and the advice agrees with docs/choosing.md (BiCGStab first).
    with pytest.warns(banax.BackwardSolveWarning, match=r"did not converge.*BiCGStab") as caught, \
            banax.solve_summary() as summary:
        _expansive_grad(_picard_adjoint("warn"))
    assert len(caught) == 1 and caught[0].filename == __file__
    assert "MAX_STEPS: 1" not in str(caught[0].message)
    assert list(summary.total("backward")) == [0, 1, 0]


def test_warn_is_the_default_and_is_silent_on_success():
    assert Implicit(solver=_solver()).on_failure == "warn"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _grads(_batched(None), W, X, jnp.zeros((4, N)), BackwardStats.probe(4))
        jax.effects_barrier()


def test_on_failure_raise_stops_with_a_message_saying_what_to_do():
    with pytest.raises(Exception, match="backward solve did not converge") as error:
        _expansive_grad(_picard_adjoint("raise"))
    assert "lineax.BiCGStab" in str(error.value)


@pytest.mark.parametrize("kind", ["jfb", "gdeq", "bptt"])
def test_adjoints_without_a_backward_solve_report_zero_steps_converged(kind):
    adjoint = {
        "jfb": lambda: JFB(solver=_solver(batch_axis=0)),
        "gdeq": lambda: GDEQ(solver=banax.get_solver(
            "broyden", atol=1e-10, rtol=0.0, max_steps=100, batch_axis=0)),
        "bptt": lambda: BPTT(solver=banax.get_solver(
            "picard", atol=1e-8, rtol=0.0, max_steps=200, batch_axis=0,
            loop_kind="checkpointed")),
    }[kind]()
    _, stats = _grads(adjoint, W, X, jnp.zeros((4, N)), BackwardStats.probe(4))
    assert all((leaf == 0).all() for leaf in jax.tree.leaves(stats))


def test_neumann_phantom_reports_its_terms_and_the_residual_of_its_lambda():
    k = 4
    adjoint = NeumannPhantom(solver=_solver(batch_axis=0),
                             b_solver=banax.get_solver("picard", max_steps=k))
    _, stats = _grads(adjoint, W, X, jnp.zeros((4, N)), BackwardStats.probe(4))
    assert stats.steps.tolist() == [k] * 4
    # λ = Σ_{i<K} (Jᵀ)^i ḡ leaves the residual (Jᵀ)^K ḡ, as K − 1 Picard steps do.
    truth = _dense_residuals(W, X, k - 1)
    assert jnp.allclose(stats.abs_err, truth.astype(jnp.float32), rtol=1e-4, atol=1e-7)
    assert (stats.result_codes() == Result.CONVERGED).all()


def test_the_backward_budget_caps_steps_without_recompiling():
    adjoint = _batched(banax.get_solver("picard", atol=1e-10, rtol=0.0, max_steps=400),
                       on_failure="ignore")
    x0, probe = jnp.zeros((4, N)), BackwardStats.probe(4)
    full_grad, full = _grads(adjoint, W, X, x0, probe, jnp.array(400))
    compiled = _grads._cached._cache_size()
    short_grad, short = _grads(adjoint, W, X, x0, probe, jnp.array(2))
    huge_grad, huge = _grads(adjoint, W, X, x0, probe, jnp.array(10_000))
    assert _grads._cached._cache_size() == compiled
    assert short.steps.tolist() == [0, 2, 2, 2]
    assert (short.result_codes()[1:] == Result.MAX_STEPS).all()
    # Clamped to max_steps: the same as the full solve.
    assert huge.steps.tolist() == full.steps.tolist()
    assert jnp.array_equal(huge_grad, full_grad)
    assert not jnp.allclose(short_grad, full_grad)


def test_the_backward_budget_lowers_the_phantom_terms():
    neumann = NeumannPhantom(solver=_solver(batch_axis=0),
                             b_solver=banax.get_solver("picard", max_steps=6))
    _, stats = _grads(neumann, W, X, jnp.zeros((4, N)), BackwardStats.probe(4),
                      jnp.array(2))
    assert stats.steps.tolist() == [2] * 4


@pytest.mark.parametrize(
    "adjoint, budget, error, match",
    [
        (Implicit(solver=_solver()), 5, TypeError, "backward_budget must be a JAX array"),
        (JFB(solver=_solver()), jnp.array(5), TypeError,
         "JFB does not take a backward_budget"),
        (Implicit(solver=_solver(), b_solver=lx.GMRES(rtol=1e-6, atol=1e-6)),
         jnp.array(5), TypeError, "lineax b_solver fixes its max_steps"),
    ],
    ids=["python-int", "jfb", "lineax"],
)
@without_annotation_checks()
def test_bad_backward_budgets_fail_at_the_call(adjoint, budget, error, match):
    with pytest.raises(error, match=match):
        adjoint((_cell, (W, X[1])), jnp.zeros(N), backward_budget=budget)


@without_annotation_checks()
def test_a_probe_of_the_wrong_shape_or_type_fails_at_the_call():
    adjoint = Implicit(solver=_solver(batch_axis=0))
    with pytest.raises(ValueError, match=r"BackwardStats.probe\(batch_size=4\)"):
        adjoint((_cell, (W, X)), jnp.zeros((4, N)), backward_probe=BackwardStats.probe())
    with pytest.raises(TypeError, match="backward_probe must be None or a banax"):
        adjoint((_cell, (W, X)), jnp.zeros((4, N)), backward_probe=jnp.zeros(4))
    with pytest.raises(ValueError, match="batch_size must be None or an int >= 1"):
        BackwardStats.probe(0)


def test_warn_under_vmap_names_only_the_failed_solves():
    """Under `vmap` the policy's `lax.cond` runs both branches; the warning still fires
    for, and only for, the instances whose backward solve failed."""
    adjoint = _picard_adjoint("warn")

    def grad_c(a):
        def loss(c):
            x0 = -c[None] / (1 - a)  # the fixed point: the forward takes no step
            return jnp.sum(adjoint((_expansive, (a, c)), x0).value)

        return jax.grad(loss)(jnp.array(1.0))

    run = jax.jit(jax.vmap(grad_c))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = run(jnp.array([0.5, 0.25]))
        jax.effects_barrier()
    assert jnp.allclose(grads, 1 / (1 - jnp.array([0.5, 0.25])), rtol=1e-4)
    with pytest.warns(banax.BackwardSolveWarning, match="did not converge") as caught, \
            banax.solve_summary() as summary:
        run(jnp.array([0.5, 2.0]))
        jax.effects_barrier()
        assert summary.counts == {}  # traced before the summary: not recorded
        jax.jit(jax.vmap(grad_c))(jnp.array([0.5, 2.0]))  # traced inside: recorded
    assert len(caught) == 2 and caught[0].filename == caught[1].filename == __file__
    # One call site, two vmapped samples: one converged, one at MAX_STEPS.
    assert list(summary.total("backward")) == [1, 1, 0]
    assert summary.share(Result.MAX_STEPS, "backward") == 0.5
