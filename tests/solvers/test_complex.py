"""Complex states: Picard, Relaxed, Anderson and Broyden against the closed form
`z* = (I − A)⁻¹ b` of a complex contraction, against their own real `2N` embedding,
and the adjoints' gradients against differentiation of the closed form."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import banax
from banax import Result

N = 6
SOLVERS = {
    "picard": ("picard", {}),
    "relaxed": ("relaxed", {}),
    "anderson": ("anderson", {}),
    "anderson_cholesky": ("anderson", {"use_linalg": False}),
    "broyden": ("broyden", {}),
    "broyden_ls": ("broyden", {"ls_steps": 4}),
}


@functools.cache
def problem(dtype: str = "complex128"):
    """A complex `A` with spectral norm 0.9 (so ρ(A) < 1) and `b`; `z* = (I − A)⁻¹ b`."""
    k = jax.random.split(jax.random.key(7), 4)
    a = jax.lax.complex(jax.random.normal(k[0], (N, N)), jax.random.normal(k[1], (N, N)))
    a = 0.9 * a / jnp.linalg.norm(a, 2).astype(a.dtype)
    b = jax.lax.complex(jax.random.normal(k[2], (N,)), jax.random.normal(k[3], (N,)))
    a, b = a.astype(dtype), b.astype(dtype)
    z_star = jnp.linalg.solve(jnp.eye(N, dtype=dtype) - a, b)
    return a, b, z_star


def affine(z, a, b):
    return a @ z + b


def embedded(v, a, b):
    """The same map on `[Re z, Im z]` in R^{2N}."""
    re, im = jnp.real(a), jnp.imag(a)
    z = v[:N], v[N:]
    return jnp.concatenate([re @ z[0] - im @ z[1] + jnp.real(b),
                            im @ z[0] + re @ z[1] + jnp.imag(b)])


def get(config: str, **options) -> banax.Solver:
    name, extra = SOLVERS[config]
    return banax.get_solver(name, **{"atol": 0.0, "rtol": 1e-11, "max_steps": 400,
                                     **extra, **options})


@eqx.filter_jit
def run(solver, fn, args, x0):
    return banax.adjoint.JFB(solver=solver)((fn, args), x0)


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
@pytest.mark.parametrize("config", SOLVERS)
def test_complex_affine_map_reaches_the_closed_form(config, dtype):
    a, b, z_star = problem(dtype)
    rtol = 1e-5 if dtype == "complex64" else 1e-11
    sol = run(get(config, rtol=rtol), affine, (a, b), jnp.zeros(N, dtype))
    assert sol.result == Result.CONVERGED
    assert sol.value.dtype == jnp.dtype(dtype)
    real = jnp.float32 if dtype == "complex64" else jnp.float64
    assert sol.stats.abs_err.dtype == sol.stats.rel_err.dtype == real
    # The residual is the Hermitian norm |f(z) − z|, recomputed here.
    residual = jnp.sqrt(jnp.sum(jnp.abs(affine(sol.value, a, b) - sol.value) ** 2))
    assert jnp.allclose(sol.stats.abs_err, residual.astype(real), rtol=1e-3)
    error = jnp.max(jnp.abs(sol.value - z_star)) / jnp.max(jnp.abs(z_star))
    assert error <= 100 * rtol


@pytest.mark.parametrize("config", ["anderson", "broyden"])
def test_complex_solve_is_no_slower_than_its_real_embedding(config):
    # On a complex-linear problem the complex secant / least-squares models have half
    # the unknowns of the real 2N form, so they need at most as many steps.
    a, b, z_star = problem()
    complex_sol = run(get(config), affine, (a, b), jnp.zeros(N, a.dtype))
    real_sol = run(get(config), embedded, (a, b), jnp.zeros(2 * N))
    assert complex_sol.result == real_sol.result == Result.CONVERGED
    assert jnp.allclose(jax.lax.complex(real_sol.value[:N], real_sol.value[N:]), z_star, atol=1e-9)
    assert jnp.allclose(complex_sol.value, z_star, atol=1e-9)
    assert int(complex_sol.stats.steps) <= int(real_sol.stats.steps)
    picard = run(get("picard"), affine, (a, b), jnp.zeros(N, a.dtype))
    assert 2 * int(complex_sol.stats.steps) < int(picard.stats.steps)


def test_complex_batch_mode_stops_each_sample_on_its_own():
    a, b, _ = problem()
    scales = jnp.array([0.1, 0.5, 1.0])
    bs = b[None, :] * scales[:, None].astype(b.dtype)

    def f(z, a, bs, scales):
        return (z @ a.T) * scales[:, None].astype(z.dtype) + bs

    sol = run(get("anderson", batch_axis=0), f, (a, bs, scales), jnp.zeros((3, N), a.dtype))
    assert sol.result.shape == (3,) and bool(jnp.all(sol.result == Result.CONVERGED))
    for i, s in enumerate(np.asarray(scales)):
        expected = jnp.linalg.solve(jnp.eye(N, dtype=a.dtype) - float(s) * a, bs[i])
        assert jnp.allclose(sol.value[i], expected, atol=1e-9)
    steps = np.asarray(sol.stats.steps)
    assert steps[0] < steps[2]


# --- gradients --------------------------------------------------------------------------


def loss_of(z):
    """A real loss of a complex state."""
    return jnp.sum(jnp.abs(z - 0.3) ** 2)


def closed_form_grad(a, b):
    return jax.grad(lambda a, b: loss_of(jnp.linalg.solve(jnp.eye(N, dtype=a.dtype) - a, b)),
                    argnums=(0, 1))(a, b)


def adjoints():
    fwd = dict(atol=0.0, rtol=1e-12, max_steps=400)
    picard = banax.get_solver("picard", **fwd)
    broyden = banax.get_solver("broyden", **fwd)
    return {
        "bptt": banax.get_adjoint(
            "bptt", solver=banax.get_solver("anderson", loop_kind="checkpointed", **fwd)),
        "implicit_picard": banax.get_adjoint(
            "implicit", solver=broyden, b_solver=banax.get_solver("picard", **fwd)),
        "implicit_anderson": banax.get_adjoint(
            "implicit", solver=picard, b_solver=banax.get_solver("anderson", **fwd)),
        "implicit_gmres": banax.get_adjoint(
            "implicit", solver=picard, b_solver=lx.GMRES(rtol=1e-12, atol=1e-12)),
    }


@eqx.filter_jit
def grad_through(adjoint, a, b):
    return jax.grad(
        lambda a, b: loss_of(adjoint((affine, (a, b)), jnp.zeros(N, a.dtype)).value),
        argnums=(0, 1),
    )(a, b)


@pytest.mark.parametrize("name", ["bptt", "implicit_picard", "implicit_anderson",
                                  "implicit_gmres"])
def test_complex_gradients_match_the_closed_form(name):
    a, b, _ = problem()
    grad = grad_through(adjoints()[name], a, b)
    truth = closed_form_grad(a, b)
    for g, t in zip(grad, truth):
        assert g.dtype == t.dtype == jnp.complex128
        assert jnp.allclose(g, t, rtol=1e-7, atol=1e-9)


def split_tanh(z, a, b):
    """Not holomorphic: tanh of the real and imaginary parts separately, so its VJP is
    only real-linear."""
    u = a @ z + b
    return jax.lax.complex(jnp.tanh(jnp.real(u)), jnp.tanh(jnp.imag(u)))


@pytest.mark.parametrize("name", ["implicit_picard", "implicit_gmres"])
def test_implicit_gradient_of_a_non_holomorphic_cell(name):
    # The truth: the same cell in real 2N form, differentiated by a dense solve there.
    a, b, _ = problem()
    adjoint = adjoints()[name]

    def loss(a, b):
        z = adjoint((split_tanh, (a, b)), jnp.zeros(N, a.dtype)).value
        return loss_of(z)

    grad = eqx.filter_jit(jax.grad(loss, argnums=(0, 1)))(a, b)
    z_star = run(get("broyden"), split_tanh, (a, b), jnp.zeros(N, a.dtype)).value

    def real_map(v, a, b):
        z = jax.lax.complex(v[:N], v[N:])
        out = split_tanh(z, a, b)
        return jnp.concatenate([jnp.real(out), jnp.imag(out)])

    v_star = jnp.concatenate([jnp.real(z_star), jnp.imag(z_star)])
    jac = jax.jacfwd(real_map)(v_star, a, b)
    g = jax.grad(lambda v: loss_of(jax.lax.complex(v[:N], v[N:])))(v_star)
    lam = jnp.linalg.solve((jnp.eye(2 * N) - jac).T, g)
    _, vjp = jax.vjp(lambda a, b: real_map(v_star, a, b), a, b)
    truth = vjp(lam)
    for got, t in zip(grad, truth):
        assert jnp.allclose(got, t, rtol=1e-7, atol=1e-9)
