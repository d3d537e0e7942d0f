"""The five solvers against independent truth: closed-form and densely solved fixed
points, step counts, per-sample batch semantics, precision, tracing and the
capabilities (Broyden's inverse-Jacobian factors, Reversible's inverse step).

Every solve goes through one jitted function per (solver, problem shape), always with
the same tracing and a traced step budget, so that tests share compilations.
"""

import functools

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import banax
from banax import Result
from helpers import contraction_matrix, tree_allclose
from minimal import Direct

TOL = {"atol": 1e-10, "rtol": 0.0, "max_steps": 600}
CONFIGS = {
    "picard": ("picard", {}),
    "relaxed": ("relaxed", {}),
    "reversible": ("reversible", {}),
    "broyden": ("broyden", {}),
    "broyden_ls": ("broyden", {"ls_steps": 4}),
    "anderson": ("anderson", {}),
    "anderson_cholesky": ("anderson", {"use_linalg": False}),
}
# f evaluations per step, the initial one aside (line-search trials counted apart).
EVALS_PER_STEP = {"reversible": 2}


@functools.cache
def solver(config: str, **options) -> banax.Solver:
    name, extra = CONFIGS[config]
    return banax.get_solver(name, **{**TOL, **extra, **options})


def _count(acc, x, fx, f_aux, **tags):
    """(all evaluations, line-search trials)."""
    total, trials = acc
    return total + 1, trials + (1 if tags.get("tag") == "line_search" else 0)


@eqx.filter_jit
def run(solver: banax.Solver, fn, args, x0, budget):
    trace = (_count, (jnp.array(0), jnp.array(0)))
    return Direct(solver)((fn, args), x0, trace=trace, step_budget=budget)


def solve(config: str, fn, args, x0, budget=None, **options) -> banax.Solution:
    s = solver(config, **options)
    return run(s, fn, args, x0, jnp.asarray(s.max_steps if budget is None else budget))


# --- problems with known fixed points -------------------------------------------------


def affine(z, a, c):
    return a * z + c


def shifted(z, w, z_star):
    """`z* + tanh(W (z − z*))` on a pytree: nonlinear, with fixed point exactly `z*`."""
    flat = jnp.concatenate([z["u"], z["v"].ravel()])
    flat_star = jnp.concatenate([z_star["u"], z_star["v"].ravel()])
    out = flat_star + jnp.tanh(w @ (flat - flat_star))
    return {"u": out[:3], "v": out[3:].reshape(2, 2)}


def per_sample(z, w, b, shift, rate, kappa):
    """A batch of independent maps `b + ρ_b φ((z − s) Wᵀ)`, sample `b` contracting at
    rate `ρ_b`, with `φ = (1 − κ) tanh + κ id`: nonlinear with fixed point `s = b` for
    `κ = 0`, linear for `κ = 1`. One compiled solve serves both."""
    u = (z - shift) @ w.T
    return b + rate[:, None] * ((1 - kappa) * jnp.tanh(u) + kappa * u)


@functools.cache
def pytree_problem():
    w = contraction_matrix(jax.random.key(2), 7, 0.8, symmetric=False)
    z_star = {"u": jnp.array([0.5, -1.0, 2.0]), "v": jnp.array([[0.1, 0.2], [-0.3, 3.0]])}
    return w, z_star


@functools.cache
def batch_problem(dtype=jnp.float64, linear=False):
    """Arguments of `per_sample` for 4 samples of 5 features, and the fixed point (by a
    dense solve per sample in the linear case)."""
    w = contraction_matrix(jax.random.key(3), 5, 1.0, symmetric=True)
    b = jax.random.normal(jax.random.key(4), (4, 5))
    rate = jnp.array([0.05, 0.3, 0.6, 0.95])
    if linear:
        shift = jnp.zeros_like(b)
        z_star = jnp.stack([jnp.linalg.solve(jnp.eye(5) - r * w, bb) for r, bb in zip(rate, b)])
    else:
        shift = z_star = b
    args = tuple(a.astype(dtype) for a in (w, b, shift, rate, jnp.asarray(float(linear))))
    return args, z_star.astype(dtype)


# --- closed forms -----------------------------------------------------------------------


@pytest.mark.parametrize("config", ["picard", "relaxed", "reversible", "broyden", "anderson"])
@given(a=st.floats(-0.9, 0.9), c=st.floats(-10, 10))
def test_scalar_affine_map(config, a, c):
    sol = solve(config, affine, (jnp.asarray(a), jnp.asarray(c)), jnp.zeros(()))
    assert sol.result == Result.CONVERGED
    assert jnp.allclose(sol.value, c / (1 - a), rtol=1e-9, atol=1e-9)
    assert sol.stats.abs_err <= TOL["atol"]
    assert sol.value.dtype == sol.stats.abs_err.dtype == jnp.float64


@pytest.mark.parametrize("config", ["broyden", "anderson"])
def test_pytree_state(config):
    w, z_star = pytree_problem()
    x0 = jax.tree.map(jnp.zeros_like, z_star)
    sol = solve(config, shifted, (w, z_star), x0)
    assert sol.result == Result.CONVERGED
    assert tree_allclose(sol.value, z_star, atol=1e-9)


def batch_solve(config, linear=False, **kwargs):
    args, z_star = batch_problem(linear=linear)
    return solve(config, per_sample, args, jnp.zeros_like(z_star), batch_axis=0, **kwargs)


@pytest.mark.parametrize("linear", [False, True], ids=["closed_form", "dense"])
@pytest.mark.parametrize("config", CONFIGS)
def test_batch_mode_stops_each_sample_on_its_own(config, linear):
    args, z_star = batch_problem(linear=linear)
    sol = batch_solve(config, linear)
    converged = sol.result == Result.CONVERGED
    assert converged.shape == sol.stats.steps.shape == sol.stats.abs_err.shape == (4,)
    assert jnp.all(sol.result == Result.CONVERGED)
    assert jnp.allclose(sol.value, z_star, atol=1e-8)
    # Each sample's own residual, recomputed here, and its own step count: slower
    # contractions need more steps, and the loop ran as long as the slowest.
    residual = jnp.linalg.norm(per_sample(sol.value, *args) - sol.value, axis=1)
    assert jnp.allclose(sol.stats.abs_err, residual, rtol=1e-6, atol=1e-15)
    assert jnp.all(sol.stats.abs_err <= TOL["atol"])
    steps = np.asarray(sol.stats.steps)
    assert steps[0] < steps[-1] and np.all(np.diff(steps) >= 0), steps
    # Trace counts: the initial evaluation (untagged), then each step's; with a line
    # search every evaluation of a step is one of its trials, tagged.
    total, trials = (int(t) for t in sol.trace)
    if config == "broyden_ls":
        assert total - trials == 1 and trials >= steps.max()
    else:
        assert trials == 0
        assert total == 1 + EVALS_PER_STEP.get(config, 1) * int(steps.max())


def test_accelerated_solvers_beat_picard_on_a_slow_problem():
    for linear in (False, True):
        steps = {c: int(batch_solve(c, linear).stats.steps[-1]) for c in CONFIGS}
        assert steps["picard"] > 200, steps
        for fast in ("anderson", "anderson_cholesky", "broyden", "broyden_ls"):
            assert 2 * steps[fast] < steps["picard"], steps


def test_the_two_anderson_solves_agree_iterate_by_iterate():
    for k in (1, 3, 7, 12):
        by_lu = batch_solve("anderson", budget=k)
        by_cholesky = batch_solve("anderson_cholesky", budget=k)
        assert np.array_equal(by_lu.stats.steps, by_cholesky.stats.steps)
        assert jnp.allclose(by_lu.value, by_cholesky.value, rtol=1e-8, atol=1e-12)


def test_line_search_backtracks_and_finds_the_same_point():
    # A steep contraction (‖1.2 W‖ = 0.96) started far away: some full quasi-Newton
    # steps overshoot, the Armijo test rejects them, and the trials are traced with
    # tag="line_search".
    w, z_star = pytree_problem()
    x0 = jax.tree.map(lambda v: v + 5.0, z_star)
    plain = solve("broyden", shifted, (1.2 * w, z_star), x0)
    searched = solve("broyden_ls", shifted, (1.2 * w, z_star), x0)
    assert searched.result == plain.result == Result.CONVERGED
    assert tree_allclose(searched.value, z_star, atol=1e-8)
    assert tree_allclose(plain.value, searched.value, atol=1e-8)
    # Every evaluation of the search is tagged (the first full-step trials too), and
    # some steps needed more than one trial.
    total, trials = (int(t) for t in searched.trace)
    assert total == 1 + trials
    assert trials > int(searched.stats.steps)


# --- batch mode against vmap, keep_best ------------------------------------------------


@pytest.mark.parametrize("config", ["anderson"])
def test_batch_mode_matches_vmap_over_single_solves(config):
    args, _ = batch_problem()
    w, b, shift, rate, kappa = args
    batched = batch_solve(config)
    single = solver(config)

    def one(b_s, shift_s, rate_s):
        fn = lambda z: per_sample(z[None], w, b_s[None], shift_s[None], rate_s[None], kappa)[0]  # noqa: E731,E501
        return Direct(single)(fn, jnp.zeros_like(b_s))

    mapped = jax.jit(jax.vmap(one))(b, shift, rate)
    assert np.array_equal(batched.stats.steps, mapped.stats.steps)
    assert jnp.allclose(batched.value, mapped.value, atol=1e-12)
    assert jnp.allclose(batched.stats.abs_err, mapped.stats.abs_err, rtol=1e-6, atol=1e-15)


def test_keep_best_returns_each_samples_lowest_residual_iterate():
    # Linear maps: sample 0 (ρ = −1.5) oscillates away from its fixed point, the others
    # converge. Start every sample next to its fixed point.
    (w, b, shift, rate, kappa), _ = batch_problem(linear=True)
    rate = rate.at[0].set(-1.5)
    z_star = jnp.stack([jnp.linalg.solve(jnp.eye(5) - r * w, bb) for r, bb in zip(rate, b)])
    x0 = z_star + 1e-3
    args = (w, b, shift, rate, kappa)
    best = solve("picard", per_sample, args, x0, budget=20, batch_axis=0, keep_best=True)
    last = solve("picard", per_sample, args, x0, budget=20, batch_axis=0)
    start = jnp.linalg.norm(per_sample(x0, *args) - x0, axis=1)
    assert jnp.array_equal(best.value[0], x0[0])
    assert jnp.allclose(best.stats.abs_err[0], start[0])
    assert last.stats.abs_err[0] > 10 * best.stats.abs_err[0]
    assert (best.result == Result.MAX_STEPS)[0]
    assert jnp.allclose(best.value[1:], last.value[1:], atol=1e-12)


# --- precision, budget, NaN guard, transformations --------------------------------------

# Each solver under one low precision, each precision under one or two solvers (a
# compile each, so not the full product; float64 is every other test).
LOW = [("anderson", "float16"), ("relaxed", "float16"), ("broyden", "bfloat16"),
       ("reversible", "bfloat16"), ("picard", "float32")]


@pytest.mark.parametrize("config, dtype", LOW, ids=[f"{c}-{d}" for c, d in LOW])
def test_low_precision_keeps_its_dtype(config, dtype):
    dtype = jnp.dtype(dtype)
    args, z_star = batch_problem(dtype)
    eps = float(jnp.finfo(dtype).eps)
    sol = solve(config, per_sample, args, jnp.zeros_like(z_star), batch_axis=0,
                atol=0.0, rtol=4 * eps, max_steps=300)
    assert sol.value.dtype == dtype
    assert sol.stats.abs_err.dtype == sol.stats.rel_err.dtype == jnp.float32
    assert not jnp.any(sol.result == Result.DIVERGED)
    error = jnp.abs(sol.value.astype(jnp.float32) - z_star.astype(jnp.float32))
    assert jnp.max(error) <= 100 * eps * jnp.max(jnp.abs(z_star.astype(jnp.float32)))


@pytest.mark.parametrize("config", CONFIGS)
def test_step_budget_and_nan_guard(config):
    for k in (0, 2, 5):
        sol = batch_solve(config, budget=k)
        assert np.all(sol.stats.steps == k)
        assert jnp.all(sol.result == Result.MAX_STEPS)
    # A NaN in one sample's input: that sample diverges, the others still converge.
    args, z_star = batch_problem()
    poisoned = (args[0], args[1].at[1, 0].set(jnp.nan)) + args[2:]
    sol = solve(config, per_sample, poisoned, jnp.zeros_like(z_star), batch_axis=0)
    assert (sol.result == Result.DIVERGED)[1]
    others = np.array([0, 2, 3])
    assert jnp.all((sol.result == Result.CONVERGED)[others])
    assert jnp.allclose(sol.value[others], z_star[others], atol=1e-8)


# --- capabilities -----------------------------------------------------------------------


UNCLIPPED = banax.get_solver("broyden", atol=0.0, rtol=0.0, max_steps=5, spectral_clip=None)


@jax.jit
def _broyden_after(a, steps):
    """Broyden's flat solution after `steps` steps on `z ↦ a z + 1`."""
    fn = lambda z, trace, tag=None: (z @ a.T + 1.0, trace)  # noqa: E731
    return banax.internal.iterate(UNCLIPPED, fn, jnp.zeros((1, a.shape[0])), None, steps)


def test_broyden_factors_invert_i_minus_j_in_one_dimension():
    # In 1D one secant pair determines the Jacobian, so the factors are exact.
    a = jnp.array([[0.6]])
    flat = _broyden_after(a, jnp.asarray(1))
    u, v = UNCLIPPED.inverse_jacobian_factors(flat.state)
    assert u.shape == v.shape == (1, 10, 1)
    approx = jnp.eye(1) + u[0].T @ v[0]
    assert jnp.allclose(approx, jnp.linalg.inv(jnp.eye(1) - a), rtol=1e-12)


def test_broyden_factors_satisfy_the_secant_condition():
    # After each update, the estimate of (I − J)⁻¹ maps (I − J) s back to the last step
    # s, as the dense inverse does; the opposite sign convention would give −s.
    a = contraction_matrix(jax.random.key(5), 4, 0.7, symmetric=False)
    before = _broyden_after(a, jnp.asarray(2))
    after = _broyden_after(a, jnp.asarray(3))
    u, v = UNCLIPPED.inverse_jacobian_factors(after.state)
    approx = jnp.eye(4) + u[0].T @ v[0]
    step = after.z[0] - before.z[0]
    image = (jnp.eye(4) - a) @ step
    assert jnp.allclose(approx @ image, step, rtol=1e-9, atol=1e-12)
    assert jnp.allclose(jnp.linalg.solve(jnp.eye(4) - a, image), step, rtol=1e-9)


def test_reversible_step_runs_backwards():
    s = banax.get_solver("reversible", damp=0.6).recording()
    (w, *_), _ = batch_problem(linear=True)
    fn = lambda z: z @ (0.9 * w).T + 1.0  # noqa: E731
    z0 = jax.random.normal(jax.random.key(6), (2, 5))
    states = [(z0, s.init(z0, fn(z0)))]
    for _ in range(3):
        states.append(s.forward_map(fn, *states[-1]))
    # forward_map is exactly the loop's step.
    flat = banax.internal.iterate(s, lambda v, t, tag=None: (fn(v), t), z0, None,
                                  jnp.asarray(3))
    assert eqx.tree_equal((flat.z, flat.state), states[-1])
    # Each step runs backwards bit for bit, the first one back to the off-grid z0 (the
    # digit buffer stays as the forward filled it).
    z, state = states[-1]
    for expected_z, expected in reversed(states[:-1]):
        z, state = s.inverse_map(fn, z, state)
        expected = eqx.tree_at(lambda t: t.remainders, expected, state.remainders)
        assert eqx.tree_equal((z, state), (expected_z, expected))


def test_reversible_rewind_with_another_f_raises_not_a_wrong_start():
    s = banax.get_solver("reversible").recording()
    z0 = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    z, state = z0, s.init(z0, jnp.cos(z0))
    for _ in range(4):
        z, state = s.forward_map(jnp.cos, z, state)
    # An f 1e-3 off is far outside what the recorded low bits of round(beta*f) absorb.
    with pytest.raises(eqx.EquinoxRuntimeError, match="rewind did not return to z0.*BPTT"):
        for _ in range(4):
            z, state = s.inverse_map(lambda v: jnp.cos(v) + 1e-3, z, state)


def test_reversible_inverse_needs_the_recorded_digits():
    s = banax.get_solver("reversible")
    z0 = jnp.zeros((1, 3))
    z, state = s.forward_map(jnp.cos, z0, s.init(z0, jnp.cos(z0)))
    with pytest.raises(ValueError, match="inverse_map needs the digits.*recording()"):
        s.inverse_map(jnp.cos, z, state)
