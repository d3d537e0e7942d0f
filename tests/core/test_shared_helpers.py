"""The pieces of logic that solvers, adjoints, regularizers and the layer share, each
written once: the one way into the loop, a combinator of whole solves, per-sample
selection, the PRNG-key rule, the low-rank inverse-Jacobian product, the parsing of a
solver given by instance, name or dict, and the batch-size check."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax import extend
from banax._layout import common_batch_size

W = jnp.array([[0.3, 0.1], [-0.2, 0.4]])
B = jnp.array([1.0, -0.5])
FIXED_POINT = jnp.linalg.solve(jnp.eye(2) - W, B)


def affine(z, w, b):
    return z @ w.T + b


class Restarted(extend.AbstractSolveCombinator):
    """Two whole solves of `inner`, the second from where the first stopped."""

    inner: extend.AbstractSolver

    def __init__(self, inner):
        self.inner = inner
        self.max_steps = 2 * inner.max_steps
        self.rtol, self.atol = inner.rtol, inner.atol

    def run(self, f, z0, trace, step_budget):
        first = extend.solve(self.inner, f, z0, trace, step_budget)
        second = extend.solve(self.inner, f, first.z, first.trace, step_budget)
        stats = eqx.tree_at(lambda s: s.steps, second.stats,
                            first.stats.steps + second.stats.steps)
        return eqx.tree_at(lambda s: s.stats, second, stats)


@without_annotation_checks()
def test_solve_runs_a_problem_and_a_flat_function_alike():
    solver = banax.get_solver("picard", rtol=0.0, atol=1e-10, max_steps=200)
    problem = extend.make_problem((affine, (W, B)), jnp.zeros(2), has_aux=False,
                                  trace=None, step_budget=None, batch_axis=None)
    by_problem = extend.solve(solver, problem)
    by_function = extend.solve(solver, problem.f, problem.z0)
    assert eqx.tree_equal(by_problem, by_function)
    assert jnp.allclose(by_problem.z[0], FIXED_POINT, atol=1e-9)
    with pytest.raises(TypeError, match=r"solve\(solver, problem\) takes no z0"):
        extend.solve(solver, problem, problem.z0)
    with pytest.raises(TypeError, match="solve takes .* got int and z0=None"):
        extend.solve(solver, 3)
    with pytest.raises(TypeError, match="solve needs a banax solver .* got str"):
        extend.solve("picard", problem)


def test_a_combinator_runs_under_any_adjoint_and_refuses_inference_settings():
    inner = banax.get_solver("picard", rtol=0.0, atol=1e-10, max_steps=15)
    combinator = Restarted(inner)
    adjoint = banax.get_adjoint("implicit", solver=combinator,
                                b_solver={"name": "picard", "atol": 1e-12, "rtol": 0.0,
                                          "max_steps": 200})
    sol = adjoint((affine, (W, B)), jnp.zeros(2))
    # Picard contracts by ρ(W) = √0.14 ≈ 0.37 a step: 15 steps leave ~1e-6, not 1e-10.
    alone = banax.get_adjoint("implicit", solver=inner)((affine, (W, B)), jnp.zeros(2))
    assert int(alone.result) == banax.Result.MAX_STEPS and int(alone.stats.steps) == 15
    assert int(sol.result) == banax.Result.CONVERGED and 15 < int(sol.stats.steps) < 30
    assert jnp.allclose(sol.value, FIXED_POINT, atol=1e-9)
    grad = jax.grad(lambda b: jnp.sum(adjoint((affine, (W, b)), jnp.zeros(2)).value))(B)
    truth = jnp.linalg.solve((jnp.eye(2) - W).T, jnp.ones(2))
    assert jnp.allclose(grad, truth, atol=1e-8)
    with pytest.raises(TypeError, match="Restarted runs other solvers"):
        banax.DEQ(lambda z, x: affine(z, W, x), adjoint=adjoint, state_shape=(2,),
                  inference_settings={"max_steps": 3})


def test_where_per_sample():
    mask = jnp.array([True, False, True])
    new = {"rows": jnp.ones((3, 2)), "shared": jnp.array(5), "tag": "new"}
    old = {"rows": jnp.zeros((3, 2)), "shared": jnp.array(7), "tag": "old"}
    out = extend.where_per_sample(mask, new, old)
    assert jnp.array_equal(out["rows"], jnp.array([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))
    assert int(out["shared"]) == 5 and out["tag"] == "new"


@pytest.mark.parametrize("key, shape", [
    (jax.random.key(0), ()),
    (jax.random.PRNGKey(0), ()),
    (jax.random.split(jax.random.key(0), 3), (3,)),
    (jax.random.split(jax.random.PRNGKey(0), 3), (3,)),
    (0, None),
    (jnp.zeros(2, jnp.float32), None),
    (jnp.zeros(3, jnp.uint32), None),
    (np.zeros(2, np.uint32), None),
])
def test_key_shape(key, shape):
    assert extend.key_shape(key) == shape


@without_annotation_checks()
def test_a_single_key_is_the_same_rule_everywhere():
    keys = jax.random.split(jax.random.key(0), 2)
    with pytest.raises(TypeError, match="half_normal_like: key must be a single PRNG key"):
        banax.half_normal_like(keys, jnp.zeros(2))
    with pytest.raises(ValueError, match="single PRNG key, .* shape \\(2,\\)"):
        banax.regularization.jacobian_spectral_norm(jnp.tanh, jnp.ones(2), key=keys)


class Factors(extend.LowRankInverseJacobian):
    def inverse_jacobian_factors(self, state):
        return state


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.complex128])
def test_inverse_jacobian_vjp_against_the_dense_matrix(dtype):
    u, v, g = (jax.random.normal(k, shape, dtype) for k, shape in zip(
        jax.random.split(jax.random.key(1), 3), [(2, 3, 4), (2, 3, 4), (2, 4)]))
    out = Factors().inverse_jacobian_vjp((u, v), g)
    for b in range(2):
        dense = np.eye(4) + np.asarray(u[b]).T @ np.asarray(v[b])  # ≈ (I − J)⁻¹
        assert np.allclose(np.asarray(out[b]), dense.T @ np.asarray(g[b]), rtol=1e-12)


@without_annotation_checks()
def test_a_solver_by_instance_name_or_dict():
    picard = banax.get_solver("picard", rtol=1e-3)
    assert extend.as_solver(picard, owner="Mine") is picard
    assert extend.as_solver("picard", owner="Mine") == banax.get_solver("picard")
    assert extend.as_solver({"name": "picard", "rtol": 1e-3}, owner="Mine") == picard
    for spec in (3, {"rtol": 1e-3}):
        with pytest.raises(TypeError, match=r"Mine: inner must be a banax.Solver instance, a "
                           r"registry name such as 'anderson', or a dict .*needs a 'name' "
                           r"key; got"):
            extend.as_solver(spec, owner="Mine", option="inner")
    with pytest.raises(TypeError, match="DEQ: adjoint must be a banax.Adjoint instance"):
        banax.DEQ(lambda z, x: z, adjoint=3, state_shape=(2,))


def test_common_batch_size():
    assert common_batch_size([(4, 2), (4,)], 0, "x") == 4
    with pytest.raises(ValueError, match=r"^Mine: in batch mode \(batch_axis=1\) every "
                       r"array of x must carry the batch on axis 1, all with the same "
                       r"size along batch_axis; got x of shapes \[\(4, 2\), \(4,\)\] "
                       r"\(batch_axis=1 is out of range for shape \(4,\)\)\.$"):
        common_batch_size([(4, 2), (4,)], 1, "x", "Mine")
    with pytest.raises(ValueError, match=r"shapes \[\(4, 2\), \(3, 2\)\]\.$"):
        common_batch_size([(4, 2), (3, 2)], 0, "x")
    with pytest.raises(ValueError, match=r"^the batch is empty \(x0 has size 0"):
        common_batch_size([(0, 2)], 0, "x0")
