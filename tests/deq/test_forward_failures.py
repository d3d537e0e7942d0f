"""A forward solve that diverges: every solver returns its last finite iterate (checked
against a hand-run iteration), and `on_failure` reports it from inside `jit`."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax import Result

N = 8
# Growth per step a / 2 that overflows float32 (about 1e38) or float64 (1e308) within
# about 14 steps from entries of order one.
GROWTH = {jnp.float32: 1198.0, jnp.float64: 1e26, jnp.bfloat16: 1198.0}
W = 0.5 * jax.random.orthogonal(jax.random.key(0), N)
C = jax.random.normal(jax.random.key(1), (N,))
# Sample 0 overflows; sample 1 has c = 0 and sits at its fixed point 0; sample 2 starts
# 1e-3 smaller and overflows a step later than sample 0.
SCALES = jnp.array([1.0, 0.0, 1e-3])

SOLVERS = {
    "picard": {},
    "relaxed": {"damp": 0.5},
    "anderson": {},
    "broyden": {},
    "broyden_ls": {"ls_steps": 3},
    "reversible": {},
    "halpern": {},  # a third-party plugin (banax-example-plugin)
}

# Solvers whose iterates on this exploding map amplify rounding: the compiled loop and
# the hand-run steps agree on steps and results, and on the iterate to within a factor
# far smaller than one step's growth (their least-squares problems are ill-conditioned
# there, so the last bits of a fused kernel change the iterate by up to 20 %).
CHAOTIC = ("anderson", "broyden")


def _solver(name: str) -> banax.Solver:
    options = dict(SOLVERS[name], rtol=1e-5, max_steps=60)
    return banax.get_solver(name.removesuffix("_ls"), **options)


def _map(dtype):
    a = jnp.asarray(GROWTH[dtype], dtype)
    w = W.astype(dtype)

    def f(z, c):
        return a * (z @ w.T) + jnp.tanh(c)

    return f


def _hand_run(solver, f, z0, cs):
    """The iteration written out, per sample: solver steps until the sample meets the
    tolerance, the budget runs out, or its step's residual is not finite (that step
    is then not taken). Returns the accepted iterates, the steps taken and the
    results."""
    step = jax.jit(lambda z, fz, s, cs: solver.step(
        lambda z, t, tag=None: (f(z, cs), t), z, fz, s, None)[:3])
    batch = z0.shape[0]
    z, fz = z0, f(z0, cs)
    state = solver.init(z, fz)
    abs_err, rel_err = banax.extend.residual_norms(z, fz)
    results = [Result.DIVERGED if not np.isfinite(e) else None for e in abs_err]
    steps = np.zeros(batch, int)
    for _ in range(solver.max_steps):
        met = np.asarray(solver.meets_tolerance(abs_err, rel_err))
        results = [Result.CONVERGED if r is None and m else r for r, m in zip(results, met)]
        if all(r is not None for r in results):
            break
        z1, fz1, state1 = step(z, fz, state, cs)
        abs1, rel1 = banax.extend.residual_norms(z1, fz1)
        take = np.array([r is None and np.isfinite(e) for r, e in zip(results, abs1)])
        results = [Result.DIVERGED if r is None and not t else r
                   for r, t in zip(results, take)]
        steps += take

        def pick(new, old):
            if new.ndim == 0:  # shared by the samples: moves on if any took its step
                return new if take.any() else old
            return jnp.where(take.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        z, fz, abs_err, rel_err, state = jax.tree.map(
            pick, (z1, fz1, abs1, rel1, state1), (z, fz, abs_err, rel_err, state))
    results = [Result.MAX_STEPS if r is None else r for r in results]
    return z, fz, steps, results


def _check_agrees(sol, fn):
    """The returned iterate is finite, and its residuals are the ones reported."""
    assert jnp.isfinite(sol.z).all()
    abs_err, rel_err = banax.extend.residual_norms(sol.z, fn(sol.z))
    np.testing.assert_allclose(sol.stats.abs_err, abs_err, rtol=1e-3)
    np.testing.assert_allclose(sol.stats.rel_err, rel_err, rtol=1e-3)


@pytest.mark.parametrize("name, dtype", [(name, jnp.float32) for name in SOLVERS] + [
    (name, jnp.float64) for name in ("picard", "anderson")])
def test_diverged_is_the_last_finite_iterate(name, dtype):
    solver, f = _solver(name), _map(dtype)
    all_cs = (SCALES[:, None] * C[None, :]).astype(dtype)
    solve = jax.jit(lambda cs: banax.extend.solve_flat(
        solver, lambda z: f(z, cs), jnp.zeros(cs.shape, dtype)))
    # In batch mode (one sample converges, two diverge at different steps), and alone
    # (outside batch mode the loop takes another path).
    for cs in (all_cs, all_cs[:1]):
        sol = solve(cs)
        _check_agrees(sol, lambda z: f(z, cs))
        z, fz, steps, results = _hand_run(solver, f, jnp.zeros(cs.shape, dtype), cs)
        assert sol.result.tolist() == results and sol.stats.steps.tolist() == steps.tolist()
        if name in CHAOTIC:
            # Each step grows the iterate about 600-fold, so the one before or after
            # the last finite iterate is far outside a factor of 2.
            np.testing.assert_allclose(jnp.linalg.norm(sol.z, axis=1),
                                       jnp.linalg.norm(z, axis=1), rtol=0.5)
        else:
            np.testing.assert_allclose(sol.z, z, rtol=1e-5)
            np.testing.assert_allclose(sol.fz, fz, rtol=1e-5)
    assert results == [Result.DIVERGED]


@pytest.mark.parametrize("keep_best", [False, True])
def test_fallback_and_keep_best_return_finite_iterates(keep_best):
    f = _map(jnp.float32)
    cs = (SCALES[:, None] * C[None, :]).astype(jnp.float32)
    solver = banax.get_solver(
        "fallback", primary={"name": "picard", "max_steps": 30},
        secondary={"name": "anderson", "max_steps": 60, "keep_best": keep_best})
    sol = banax.extend.solve_flat(solver, lambda z: f(z, cs), jnp.zeros((3, N), jnp.float32))
    assert list(sol.result) == [Result.DIVERGED, Result.CONVERGED, Result.DIVERGED]
    _check_agrees(sol, lambda z: f(z, cs))


def test_bfloat16_diverged_is_finite():
    f = _map(jnp.bfloat16)
    cs = C[None, :].astype(jnp.bfloat16)
    solver = banax.get_solver("anderson", rtol=1e-2, max_steps=60)  # bfloat16's reach
    sol = banax.extend.solve_flat(solver, lambda z: f(z, cs),
                           jnp.zeros((1, N), jnp.bfloat16))
    assert sol.result[0] == Result.DIVERGED
    _check_agrees(sol, lambda z: f(z, cs))


def test_the_reported_anderson_case():
    # float32, Anderson(rtol=1e-5, max_steps=60): DIVERGED after about 35 steps gave
    # NaN values; per row in batch mode too.
    f = lambda z, w, c: 1198.0 * (z @ w.T) + jnp.tanh(c)  # noqa: E731
    w = W.astype(jnp.float32)
    adjoint = banax.get_adjoint("implicit", solver=banax.get_solver(
        "anderson", rtol=1e-5, max_steps=60), on_failure="ignore")
    sol = adjoint((f, (w, C.astype(jnp.float32))), jnp.zeros(N, jnp.float32))
    assert sol.result == Result.DIVERGED
    assert jnp.isfinite(sol.value).all() and jnp.isfinite(sol.stats.abs_err)
    batched = banax.get_adjoint("implicit", solver=banax.get_solver(
        "anderson", rtol=1e-5, max_steps=60, batch_axis=0), on_failure="ignore")
    cs = jnp.stack([C, 0 * C]).astype(jnp.float32)
    sol = batched((f, (w, cs)), jnp.zeros((2, N), jnp.float32))
    assert list(sol.result) == [Result.DIVERGED, Result.CONVERGED]
    assert jnp.isfinite(sol.value).all()


# on_failure for the forward solve, inside jax.jit and eqx.filter_jit.

def _overflowing(on_failure, max_steps=60):
    adjoint = banax.get_adjoint(
        "implicit", solver=banax.get_solver("picard", max_steps=max_steps, batch_axis=0),
        on_failure=on_failure)
    f = _map(jnp.float32)

    def value(c):
        sol = adjoint((f, (c,)), jnp.zeros(c.shape, jnp.float32))
        return sol.value, sol.result

    return value


CS = (SCALES[:, None] * C[None, :]).astype(jnp.float32)


@pytest.mark.parametrize("jit", [jax.jit, eqx.filter_jit])
def test_on_failure_warn_from_inside_jit_once_per_call_site(jit):
    run = jit(_overflowing("warn"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            value, result = run(CS)
            jax.effects_barrier()
    assert [w.category for w in caught] == [banax.ForwardSolveWarning]
    assert caught[0].filename == __file__  # the line that traced the call
    message = str(caught[0].message)
    assert message.startswith("Implicit: the forward solve diverged")
    assert "last finite iterate" in message and "on_failure='raise'" in message
    assert jnp.isfinite(value).all() and list(result) == [2, 0, 2]


@pytest.mark.parametrize("jit", [jax.jit, eqx.filter_jit])
def test_on_failure_raise_and_ignore(jit):
    # (eqx.EquinoxRuntimeError under eqx.filter_jit, JAX's runtime error under jax.jit.)
    with pytest.raises(Exception, match="Implicit: the forward solve diverged"):
        jax.block_until_ready(jit(_overflowing("raise"))(CS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, result = jit(_overflowing("ignore"))(CS)
        jax.effects_barrier()
    assert list(result) == [2, 0, 2]
    # A converging call raises nothing under "raise".
    value, result = jit(_overflowing("raise"))(CS[1:2])
    assert list(result) == [Result.CONVERGED]


def test_max_steps_is_quiet_and_counted_by_the_summary():
    run = jax.jit(_overflowing("raise", max_steps=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with banax.solve_summary() as summary:
            for _ in range(2):
                # Sample 1 converges at once; samples 0 and 2 stop at the cap of 3
                # steps before they overflow.
                _, result = run(CS)
    assert list(result) == [1, 0, 1]
    assert list(summary.total("forward")) == [2, 4, 0]
    assert summary.share(Result.MAX_STEPS) == pytest.approx(4 / 6)
    assert "forward: 6 samples: CONVERGED 33.3%, MAX_STEPS 66.7%" in str(summary)
    assert __file__ in str(summary)


def test_on_failure_is_checked_for_every_adjoint():
    with pytest.raises(ValueError, match="on_failure"):
        banax.get_adjoint("bptt", solver={"name": "picard", "loop_kind": "checkpointed"},
                          on_failure="loud")
    assert banax.get_adjoint("jfb", solver="picard").on_failure == "warn"


def test_step_failed_and_skip_if():
    stats = banax.Stats(steps=jnp.ones(2, jnp.int32), abs_err=jnp.zeros(2),
                        rel_err=jnp.zeros(2))
    sol = banax.Solution(value=jnp.zeros(2), result=jnp.array([0, 1], jnp.int32),
                         stats=stats, trace=None)
    assert not banax.step_failed(sol, jnp.ones(2), {"g": jnp.zeros(3)})
    assert banax.step_failed(sol, jnp.array([1.0, jnp.nan]))
    assert banax.step_failed(sol, {"g": jnp.array(jnp.inf)})
    diverged = banax.Solution(value=jnp.zeros(2), result=jnp.array([0, 2], jnp.int32),
                              stats=stats, trace=None)
    assert banax.step_failed(diverged)
    new, old = (jnp.ones(2), "static", 3.0), (jnp.zeros(2), "static", 4.0)
    assert banax.skip_if(jnp.array(True), new, old)[0].tolist() == [0.0, 0.0]
    kept = banax.skip_if(jnp.array(False), new, old)
    assert kept[0].tolist() == [1.0, 1.0] and kept[1:] == ("static", 3.0)
