"""Conformance with the reference README (shared/seed): every example, option, default and
documented behaviour, exercised as a user who learned banax from that page would."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import banax
from banax import (
    FSpec,
    Result,
    Solution,
    Stats,
    half_normal_like,
    trace_count,
    trace_history,
    trace_last,
    trace_last_aux,
    zeros_like,
)
from banax.adjoint import (
    BPTT,
    GDEQ,
    JFB,
    Adjoint,
    Implicit,
    NeumannPhantom,
    Reversible,
    UnrollPhantom,
)
from banax.regularization import (
    denoising_energy,
    hutchinson_jacobian_frobenius,
    jacobian_spectral_norm,
)
from banax.solver import Anderson, Broyden, Picard, Relaxed, Solver
from banax.solver import Reversible as ReversibleSolver
from helpers import contraction_matrix, dense_implicit_grad

N = 64


def f(x, W, b):
    return jnp.tanh(W @ x + b)


@pytest.fixture(scope="module")
def Wb():
    W = contraction_matrix(jax.random.key(0), N, 0.8, symmetric=False)
    b = 0.5 * jax.random.normal(jax.random.key(1), (N,), jnp.float64)
    return W, b


@pytest.fixture(scope="module")
def x0():
    return jnp.zeros(N)


def test_basic_usage(Wb, x0):
    W, b = Wb
    solver = Picard(rtol=1e-5, max_steps=50, loop_kind="checkpointed")
    adjoint = BPTT(solver=solver)
    sol = adjoint((f, (W, b)), x0)
    assert isinstance(sol, Solution) and isinstance(sol.stats, Stats)
    x_star = sol.value
    assert x_star.shape == x0.shape
    assert 0 < int(sol.stats.steps) <= 50
    assert int(sol.result) == Result.CONVERGED and sol.result == 0
    assert jnp.allclose(f(x_star, W, b), x_star, atol=1e-4)
    # The fixed point carries gradients: use it in a loss and call jax.grad normally.
    grad = jax.grad(lambda W: jnp.sum(adjoint((f, (W, b)), x0).value))(W)
    assert grad.shape == W.shape and jnp.all(jnp.isfinite(grad))


def test_fspec_forms_agree(Wb, x0):
    W, b = Wb
    adjoint = JFB(solver=Picard(atol=1e-8, max_steps=200))
    reference = adjoint((f, (W, b)), x0).value

    def f_bare(x):
        return f(x, W, b)

    def f_one(x, Qd):
        return f(x, Qd[0], Qd[1])

    def f_kw(x, W, bias):
        return f(x, W, bias)

    forms: list[FSpec] = [
        f_bare, (f_one, ((W, b),)), (f, (W, b)), (f_kw, (W,), {"bias": b}),
    ]
    # `(f, Qd)` is shorthand for `(f, (Qd,))` when the second element is not a tuple.
    forms.append((lambda x, Qd: f(x, Qd, b), W))
    for spec in forms:
        assert jnp.allclose(adjoint(spec, x0).value, reference, atol=1e-10)


def test_solver_defaults_table():
    for cls in (Picard, Relaxed, ReversibleSolver, Broyden, Anderson):
        solver = cls()
        assert isinstance(solver, Solver)
        assert (solver.atol, solver.rtol, solver.max_steps, solver.loop_kind) == (
            0.0, 1e-5, 50, "lax")
    for cls in (Relaxed, ReversibleSolver, Anderson):
        assert cls().damp == 0.8
    assert Broyden().history_size == 10 and Broyden().ls_steps == 0
    assert Anderson().depth == 5 and Anderson().ridge == 1e-6
    assert Anderson().use_linalg is True


def test_solver_examples_converge_to_one_fixed_point(Wb, x0):
    W, b = Wb
    solvers = [
        Picard(atol=1e-5, max_steps=50),
        Relaxed(damp=0.8, atol=1e-5, rtol=0.0, max_steps=50),
        ReversibleSolver(damp=0.8, atol=1e-5, max_steps=20),
        Broyden(history_size=10, atol=1e-5, max_steps=50),
        Broyden(history_size=10, ls_steps=5, atol=1e-5, max_steps=50),
        Anderson(depth=5, damp=1.0, ridge=1e-6, atol=1e-5, max_steps=50),
    ]
    exact = JFB(solver=Picard(atol=1e-12, max_steps=500))((f, (W, b)), x0).value
    for solver in solvers:
        sol = JFB(solver=solver)((f, (W, b)), x0)
        if sol.result == Result.CONVERGED:
            residual = jnp.linalg.norm(f(sol.value, W, b) - sol.value)
            # Either enabled test stops the loop: atol, or rtol relative to ‖f(z)‖.
            scale = jnp.linalg.norm(f(sol.value, W, b))
            assert (residual <= solver.atol * 1.0001) | (
                residual <= solver.rtol * scale * 1.0001)
            assert jnp.allclose(sol.value, exact, atol=1e-3)
        else:
            # Only the 20-step reversible example may run out of steps on this cell.
            assert isinstance(solver, ReversibleSolver)
            assert sol.result == Result.MAX_STEPS


def test_anderson_and_broyden_beat_picard_near_radius_one(x0):
    W = contraction_matrix(jax.random.key(2), N, 0.97)
    b = 0.3 * jax.random.normal(jax.random.key(3), (N,), jnp.float64)
    steps = {
        type(s).__name__: int(JFB(solver=s)((f, (W, b)), x0).stats.steps)
        for s in (Picard(atol=1e-6, max_steps=1000), Broyden(atol=1e-6, max_steps=1000),
                  Anderson(atol=1e-6, max_steps=1000))
    }
    assert steps["Anderson"] < steps["Picard"] and steps["Broyden"] < steps["Picard"]


def test_loop_kinds_and_bptt():
    for kind in ("bounded", "checkpointed"):
        BPTT(solver=Picard(loop_kind=kind))
    with pytest.raises(TypeError, match="lax"):
        BPTT(solver=Picard(loop_kind="lax"))


def test_line_search_is_refused_by_unrolling_adjoints():
    with pytest.raises(TypeError, match="line search"):
        BPTT(solver=Broyden(ls_steps=5, loop_kind="checkpointed"))


def test_adjoint_examples_and_exact_gradients(Wb, x0):
    W, b = Wb
    solver = Picard(atol=1e-5, max_steps=50, loop_kind="checkpointed")
    b_solver = Picard(rtol=1e-8, max_steps=50, loop_kind="checkpointed")
    adjoints = {
        "bptt": BPTT(solver=solver),
        "implicit": Implicit(solver=solver, b_solver=b_solver),
        "jfb": JFB(solver=Picard(atol=1e-6, max_steps=100)),
        "gdeq": GDEQ(solver=Broyden(atol=1e-6, max_steps=100)),
    }
    exact = None
    for name, adjoint in adjoints.items():
        assert isinstance(adjoint, Adjoint)
        sol = adjoint((f, (W, b)), x0)
        x_star = sol.value
        assert sol.result == Result.CONVERGED
        grad = jax.grad(lambda b: jnp.sum(adjoint((f, (W, b)), x0).value ** 2))(b)
        if exact is None:
            exact = dense_implicit_grad(lambda z, b: f(z, W, b), x_star, b, 2 * x_star)
        error = jnp.linalg.norm(grad - exact) / jnp.linalg.norm(exact)
        if name in ("bptt", "implicit"):
            assert error < 1e-3, (name, error)
        else:
            assert error < 1.0, (name, error)  # biased, but a descent-like direction


def test_gdeq_requires_inverse_jacobian_factors():
    with pytest.raises(TypeError, match="inverse-Jacobian"):
        GDEQ(solver=Picard())


def test_phantoms_and_reversible_pairings(Wb, x0):
    W, b = Wb
    for adjoint in (
        UnrollPhantom(solver=Picard(atol=1e-6),
                      b_solver=Relaxed(damp=0.5, max_steps=10, loop_kind="checkpointed")),
        NeumannPhantom(solver=Picard(atol=1e-6), b_solver=Picard(max_steps=10)),
        Reversible(solver=ReversibleSolver(damp=0.8, atol=1e-6, max_steps=200)),
    ):
        grad = jax.grad(lambda b: jnp.sum(adjoint((f, (W, b)), x0).value))(b)
        assert jnp.all(jnp.isfinite(grad))
    with pytest.raises(TypeError):
        Reversible(solver=Picard())


def test_step_budget(Wb, x0):
    W, b = Wb
    solver = Picard(atol=1e-6, max_steps=100)
    adjoint = JFB(solver=solver)
    assert int(adjoint((f, (W, b)), x0, step_budget=jnp.array(10)).stats.steps) == 10
    assert int(adjoint((f, (W, b)), x0, step_budget=jnp.array(5000)).stats.steps) == int(
        adjoint((f, (W, b)), x0).stats.steps)  # clamped to max_steps
    with pytest.raises(TypeError):
        adjoint((f, (W, b)), x0, step_budget=10)

    compiles = []

    @eqx.filter_jit
    def train_step(W, x0, budget):
        compiles.append(None)
        sol = adjoint((f, (W, b)), x0, step_budget=budget)
        return jnp.sum(sol.value ** 2), sol.stats.steps

    _, s10 = train_step(W, x0, jnp.array(10))
    _, s50 = train_step(W, x0, jnp.array(50))
    assert (int(s10), int(s50)) == (10, min(50, int(adjoint((f, (W, b)), x0).stats.steps)))
    assert len(compiles) == 1


def test_has_aux_and_trace(Wb, x0):
    W, b = Wb
    adjoint = JFB(solver=Picard(atol=1e-6, max_steps=100))

    def f_aux(x, W, b):
        pre = W @ x + b
        return jnp.tanh(pre), {"pre_activations": pre}

    sol = adjoint((f_aux, (W, b)), x0, has_aux=True)
    assert jnp.allclose(sol.value, adjoint((f, (W, b)), x0).value)

    def count_evals(acc, x, fx, f_aux):
        return acc + 1

    sol = adjoint((f, (W, b)), x0, trace=(count_evals, jnp.array(0)))
    assert int(sol.trace) == int(sol.stats.steps) + 1

    sol = adjoint((f, (W, b)), x0, trace=trace_last(lambda x, fx, f_aux: fx, jnp.zeros(N)))
    assert jnp.allclose(sol.trace, f(sol.value, W, b), atol=1e-5)

    sol = adjoint((f_aux, (W, b)), x0, has_aux=True,
                  trace=trace_last_aux({"pre_activations": jnp.zeros(N)}))
    assert jnp.allclose(sol.trace["pre_activations"], W @ sol.value + b, atol=1e-5)

    solver = adjoint.solver
    sol = adjoint((f, (W, b)), x0, trace=trace_history(
        lambda x, fx, f_aux: jnp.linalg.norm(fx - x), n_evals=solver.max_steps + 1,
        init_value=0.0))
    count, residuals = sol.trace
    assert residuals.shape == (solver.max_steps + 1,)
    assert int(count) == int(sol.stats.steps) + 1
    assert jnp.all(residuals[int(count):] == 0) and jnp.all(residuals[: int(count)] > 0)
    assert jnp.isclose(residuals[int(count) - 1], sol.stats.abs_err, rtol=1e-4)

    sol = adjoint((f, (W, b)), x0, trace=trace_count())
    assert int(sol.trace) == int(sol.stats.steps) + 1


def test_line_search_trace_tags(Wb, x0):
    W, b = Wb
    tags = []

    def count(acc, x, fx, f_aux, **kwargs):
        tagged = kwargs.get("tag") == "line_search"
        return acc + jnp.array([1, int(tagged)])

    sol = JFB(solver=Broyden(ls_steps=5, atol=1e-6, max_steps=50))(
        (f, (W, b)), x0, trace=(count, jnp.array([0, 0])))
    total, line_search = (int(v) for v in sol.trace)
    del tags
    # Every step's evaluations are line-search trials (its first full step included);
    # only the initial evaluation carries no tag.
    assert total == line_search + 1 and line_search >= int(sol.stats.steps)
    sol = JFB(solver=Broyden(atol=1e-6, max_steps=50))(
        (f, (W, b)), x0, trace=(count, jnp.array([0, 0])))
    assert int(sol.trace[1]) == 0


def test_pytree_utilities():
    model_state = {"a": jnp.ones((3, 2)), "b": (jnp.ones(4, jnp.float32),)}
    zeros = zeros_like(model_state)
    assert jax.tree.structure(zeros) == jax.tree.structure(model_state)
    assert all(jnp.all(z == 0) and z.dtype == m.dtype for z, m in
               zip(jax.tree.leaves(zeros), jax.tree.leaves(model_state)))
    big = {"a": jnp.ones((200, 50))}
    noise = half_normal_like(jax.random.key(0), big)["a"]
    assert noise.shape == (200, 50)
    assert 0.45 < float(jnp.mean(noise == 0)) < 0.55
    assert 0.9 < float(jnp.std(noise[noise != 0])) < 1.1


def test_regularization_examples(Wb, x0):
    W, b = Wb
    x_star = JFB(solver=Picard(atol=1e-8, max_steps=200))((f, (W, b)), x0).value
    key = jax.random.key(0)
    jac = jax.jacfwd(lambda z: f(z, W, b))(x_star)
    sigma = jacobian_spectral_norm((f, (W, b)), x_star, key=key, n_steps=5)
    assert 0.5 * jnp.linalg.norm(jac, 2) < sigma <= 1.0001 * jnp.linalg.norm(jac, 2)
    energy = denoising_energy((f, (W, b)), x_star, sigma=0.1, key=key)
    assert jnp.isfinite(energy) and energy >= 0
    frob = hutchinson_jacobian_frobenius((f, (W, b)), x_star, n_steps=10, key=key)
    assert jnp.isfinite(frob) and frob > 0
    # Usable as a penalty term: differentiable in the parameters.
    grad = jax.grad(lambda W: hutchinson_jacobian_frobenius(
        (f, (W, b)), x_star, n_steps=10, key=key))(W)
    assert jnp.all(jnp.isfinite(grad))


def test_solver_options_are_dataclass_fields():
    names = {f.name for f in dataclasses.fields(Anderson)}
    assert {"atol", "rtol", "max_steps", "loop_kind", "damp", "depth", "ridge",
            "use_linalg"} <= names
    assert {"history_size", "ls_steps"} <= {f.name for f in dataclasses.fields(Broyden)}
    assert banax.get_solver("anderson", depth=3).depth == 3
