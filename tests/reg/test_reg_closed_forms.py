"""The regularizers' values and gradients against closed forms on affine maps (see
conftest.py) and against dense Jacobians on a nonlinear map."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from banax_reg import denoising_energy, hutchinson_jacobian_frobenius, jacobian_spectral_norm

REGULARIZERS = [jacobian_spectral_norm, hutchinson_jacobian_frobenius, denoising_energy]
NAMES = [r.__name__ for r in REGULARIZERS]


@pytest.mark.parametrize("reg", REGULARIZERS, ids=NAMES)
def test_value_and_gradients_match_closed_forms(reg_env, linear_problem, reg):
    A, b, x = linear_problem
    value, grads = reg_env.value_and_grads(reg, reg_env.affine_spec, A, b, x)
    reg_env.assert_matches_linear_truth(reg, value, grads, A, b, x)


# -- spectral norm ---------------------------------------------------------------------


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), radius=st.floats(0.1, 10.0))
def test_spectral_norm_converges_from_below(reg_env, seed, radius):
    """Converged: `σ₁` and `u vᵀ` to rounding. Two steps on an unstructured matrix:
    never above `σ₁` (power iteration is a Rayleigh quotient)."""
    key, rng = jax.random.key(seed), np.random.default_rng(seed)
    A = reg_env.spread_matrix(rng, 6, radius)
    b, x, G = rng.normal(size=6), rng.normal(size=6), rng.normal(size=(6, 6))
    spec = reg_env.affine_spec
    value, grads = reg_env.value_and_grads(jacobian_spectral_norm, spec, A, b, x, key=key)
    reg_env.assert_matches_linear_truth(jacobian_spectral_norm, value, grads, A, b, x)

    early, _ = reg_env.value_and_grads(jacobian_spectral_norm, spec, G, b, x, key=key,
                                       n_steps=2)
    assert 0 < early <= np.linalg.svd(np.asarray(G), compute_uv=False)[0] * (1 + 1e-12)


def test_spectral_norm_of_zero_jacobian_is_zero_with_zero_gradient(reg_env):
    A, b, x = jnp.zeros((6, 6)), jnp.ones(6), jnp.ones(6)
    value, grads = reg_env.value_and_grads(jacobian_spectral_norm, reg_env.affine_spec, A, b, x)
    assert value == 0.0
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


# -- denoising energy ------------------------------------------------------------------


def test_denoising_energy_at_a_fixed_point_is_sigma_squared_hutchinson(reg_env,
                                                                      linear_problem):
    A, _, x = linear_problem
    b = x - A @ x  # x is the fixed point: r = 0
    value, grads = reg_env.value_and_grads(denoising_energy, reg_env.affine_spec, A, b, x)
    reg_env.assert_matches_linear_truth(denoising_energy, value, grads, A, b, x)
    np.testing.assert_allclose(value, reg_env.SIGMA**2 * np.sum(np.asarray(A) ** 2) / 6,
                               rtol=0.1)


def test_denoising_energy_without_noise_is_the_residual(reg_env, linear_problem):
    """`σ = 0`: exactly `‖r‖² / d`, gradients `2 r x*ᵀ / d` and `2 r / d`."""
    A, b, x = linear_problem
    value, (gA, gb, gx) = reg_env.value_and_grads(denoising_energy, reg_env.affine_spec,
                                                  A, b, x, sigma=0.0)
    A, b, x = (np.asarray(a) for a in (A, b, x))
    r = A @ x + b - x
    np.testing.assert_allclose(value, np.sum(r**2) / 6, rtol=1e-12)
    np.testing.assert_allclose(gA, 2 * np.outer(r, x) / 6, rtol=1e-12)
    np.testing.assert_allclose(gb, 2 * r / 6, rtol=1e-12)
    np.testing.assert_array_equal(gx, 0.0)


# -- a nonlinear map ---------------------------------------------------------------------


def _tanh_layer(x, A, b):
    return jnp.tanh(A @ x + b)


def test_nonlinear_map_against_its_dense_jacobian(reg_env, linear_problem):
    """`f(x) = tanh(A x + b)` has `J = D A`, `D = diag(1 − t²)`, `t = f(x)`, which
    depends on `b` too. With `(u, σ, v)` the top singular triple of `J`,
    `dσ = uᵀ dJ v`, `dD = diag(−2 t (1 − t²) (dA x + db))`, so `∂σ/∂A = D u vᵀ + w xᵀ`
    and `∂σ/∂b = w` with `w = −2 u (A v) t (1 − t²)`. The Hutchinson estimate matches
    `‖J‖²_F / d` within its Rademacher standard deviation."""
    A, b, x = linear_problem
    A = 2 * A  # out of the linear regime of tanh
    value, grads = reg_env.value_and_grads(
        jacobian_spectral_norm, lambda A, b: (_tanh_layer, (A, b)), A, b, x
    )
    An, bn, xn = (np.asarray(a) for a in (A, b, x))
    t = np.tanh(An @ xn + bn)
    J = (1 - t**2)[:, None] * An
    u, s, vt = np.linalg.svd(J)
    u, v = u[:, 0], vt[0]
    w = -2 * u * (An @ v) * t * (1 - t**2)
    np.testing.assert_allclose(value, s[0], rtol=1e-9)
    np.testing.assert_allclose(grads[0], np.outer((1 - t**2) * u, v) + np.outer(w, xn),
                               rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(grads[1], w, rtol=1e-7, atol=1e-10)
    assert np.linalg.norm(w) > 0.01  # b moves the Jacobian
    np.testing.assert_array_equal(grads[2], 0.0)

    M = J.T @ J
    n = reg_env.N_SAMPLES
    std = np.sqrt(2 * (np.sum(M**2) - np.sum(np.diag(M) ** 2)) / n) / 6
    estimate = hutchinson_jacobian_frobenius((_tanh_layer, (A, b)), x, key=reg_env.KEY,
                                             n_steps=n)
    np.testing.assert_allclose(estimate, np.sum(J**2) / 6, atol=reg_env.Z * std)
    assert reg_env.Z * std < 0.1 * np.sum(J**2) / 6
