"""Test maps for the regularizers, with their truths.

On an affine map `f(x) = A x + b` the Jacobian is `A` everywhere, so each regularizer
has a closed-form value and a closed-form gradient with respect to `A`, `b` and `x*`:

- `jacobian_spectral_norm`: `σ₁(A)`, gradient `u vᵀ` (top singular pair), zero for
  `b` and `x*` (held constant);
- `hutchinson_jacobian_frobenius`: `‖A‖²_F / d` in expectation, gradient `2 A / d`;
- `denoising_energy`: with `r = A x* + b − x*`, `(σ² ‖A‖²_F + ‖r‖²) / d` in
  expectation, gradient `2 (σ² A + r x*ᵀ) / d` for `A` and `2 r / d` for `b`.

The random estimates are checked within `Z` standard deviations of their exact
variance for `N_SAMPLES` draws (derived below), so a failure means a wrong mean, not
bad luck (`P(|N(0, 1)| > 5) ≈ 6e-7` per entry).

Every test calls a regularizer through `value_and_grads` with the options in
`OPTIONS`, so calls of the same shapes share one compilation across the directory.
"""

from types import SimpleNamespace

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from banax_reg import hutchinson_jacobian_frobenius, jacobian_spectral_norm

N = 6
N_SAMPLES = 20_000  # probes / noise draws of the statistical tests
Z = 5.0  # standard deviations allowed to a statistical estimate
SIGMA = 0.3  # the denoising noise level of the tests
# RBG keys compile faster than the default threefry; hypothesis tests use the default.
KEY = jax.random.key(0, impl="rbg")

# Enough power-iteration steps to converge to machine precision on the test matrices
# (σ₂/σ₁ <= 0.85, and the error shrinks like (σ₂/σ₁)^{2n}); enough samples for the
# statistical tolerances to resolve the closed forms.
OPTIONS = {
    "jacobian_spectral_norm": {"n_steps": 100},
    "hutchinson_jacobian_frobenius": {"n_steps": N_SAMPLES},
    "denoising_energy": {"n_steps": N_SAMPLES, "sigma": SIGMA},
}


def affine(x, A, b):
    return A @ x + b


def affine_spec(A, b):
    """The FSpec `(affine, (A, b))`, shared by both test files so that their calls of
    the same shapes share compilations."""
    return (affine, (A, b))


class Affine(eqx.Module):
    A: jax.Array
    b: jax.Array

    def __call__(self, x):
        return self.A @ x + self.b


def spread_matrix(rng, n, radius):
    """`Q₁ diag(s) Q₂ᵀ` with singular values `s` evenly spread over `[radius/4,
    radius]` (so `σ₂/σ₁ = 0.85` for `n = 6`), from a NumPy generator."""
    q1, _ = np.linalg.qr(rng.normal(size=(n, n)))
    q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q1 * np.linspace(radius / 4, radius, n)) @ q2.T


def scaled_orthogonal(rng, n, scale, batch=()):
    """`scale · Q` with `Q` orthogonal (`rng` a NumPy generator): every singular value
    is `scale`, and `AᵀA` is diagonal, so every Rademacher probe gives
    `‖A ε‖² = scale² n` exactly."""
    q, _ = np.linalg.qr(rng.normal(size=batch + (n, n)))
    return np.asarray(scale)[..., None, None] * q


def value_and_grads(reg, f_spec_of, A, b, x, key=KEY, **options):
    """`reg(f_spec_of(A, b), x)` and its gradients with respect to `A`, `b` and `x`."""
    options = OPTIONS[reg.__name__] | options

    def value(A, b, x):
        return reg(f_spec_of(A, b), x, key=key, **options)

    return jax.value_and_grad(value, argnums=(0, 1, 2))(A, b, x)


def linear_truth(reg, A, b, x, sigma=SIGMA, n=N_SAMPLES):
    """`(value, (gA, gb, gx), value_std, (gA_std, gb_std))` of `reg` on `A x + b`
    at `x`, in NumPy float64: the exact means of the estimate and of its gradient,
    and the standard deviations of `n`-sample estimates (zero for the spectral
    norm)."""
    A, b, x = (np.asarray(a, np.float64) for a in (A, b, x))
    d = A.shape[0]
    zero = np.zeros_like(x)
    if reg is jacobian_spectral_norm:
        u, s, vt = np.linalg.svd(A)
        return s[0], (np.outer(u[:, 0], vt[0]), np.zeros_like(b), zero), 0.0, (0.0, 0.0)
    M = A.T @ A
    if reg is hutchinson_jacobian_frobenius:
        # Rademacher ε: Var ‖A ε‖² = 2 (‖M‖²_F − Σᵢ Mᵢᵢ²), M = AᵀA. The gradient is
        # 2 A S / d with S the mean of ε εᵀ: diag(S) = 1 exactly and its off-diagonal
        # entries are uncorrelated with variance 1/n, so
        # Var (2 A S / d)ᵢⱼ = (2/d)² Σ_{k≠j} Aᵢₖ² / n.
        value_var = 2 * (np.sum(M**2) - np.sum(np.diag(M) ** 2))
        row = np.sum(A**2, axis=1, keepdims=True)
        gA_std = 2 / d * np.sqrt((row - A**2) / n)
        return (np.sum(A**2) / d, (2 * A / d, np.zeros_like(b), zero),
                np.sqrt(value_var / n) / d, (gA_std, 0.0))
    # Denoising: e = σ A z + r with z ~ N(0, I). Var ‖e‖² = 2σ⁴‖M‖²_F + 4σ²‖Aᵀr‖².
    # The gradient for A averages 2 e (x + σ z)ᵀ / d: entry (i, j) is 2 U V / d with
    # U = eᵢ, V = xⱼ + σ zⱼ jointly Gaussian, c = Cov(U, V) = σ² Aᵢⱼ, and
    # Var(U V) = μ_U² σ_V² + μ_V² σ_U² + 2 μ_U μ_V c + σ_U² σ_V² + c².
    r = A @ x + b - x
    value_var = 2 * sigma**4 * np.sum(M**2) + 4 * sigma**2 * np.sum((A.T @ r) ** 2)
    var_u = sigma**2 * np.sum(A**2, axis=1, keepdims=True)
    var_v, c = sigma**2, sigma**2 * A
    mu_u, mu_v = r[:, None], x[None, :]
    var_uv = (mu_u**2 * var_v + mu_v**2 * var_u + 2 * mu_u * mu_v * c + var_u * var_v
              + c**2)
    value = (sigma**2 * np.sum(A**2) + np.sum(r**2)) / d
    grads = (2 * (sigma**2 * A + np.outer(r, x)) / d, 2 * r / d, zero)
    stds = (2 / d * np.sqrt(var_uv / n), 2 / d * np.sqrt(var_u[:, 0] / n))
    return value, grads, np.sqrt(value_var / n) / d, stds


def assert_matches_linear_truth(reg, value, grads, A, b, x):
    """Exact to rounding for the spectral norm, within `Z` standard deviations for the
    random estimates; `x*` never gets a gradient."""
    truth, truth_grads, value_std, grad_stds = linear_truth(reg, A, b, x)
    np.testing.assert_allclose(value, truth, rtol=1e-9, atol=Z * value_std)
    for g, t, std in zip(grads[:2], truth_grads[:2], grad_stds):
        np.testing.assert_allclose(g, t, rtol=1e-9, atol=1e-12 + Z * np.max(std))
    np.testing.assert_array_equal(grads[2], 0.0)
    # The tolerances resolve the closed forms: a value off by 10% fails, and so does
    # a gradient off by half its largest entry (a wrong factor, sign or missing term).
    assert Z * value_std < 0.1 * truth
    assert Z * np.max(grad_stds[0]) < 0.5 * np.max(np.abs(truth_grads[0]))


@pytest.fixture(scope="session")
def linear_problem():
    """A general (non-symmetric) `A` with singular values spread over `[0.225, 0.9]`
    and a state `x` that is close to, but not at, the fixed point (a small residual
    keeps the denoising energy's σ² term visible)."""
    rng = np.random.default_rng(11)
    A = spread_matrix(rng, N, 0.9)
    x = rng.normal(size=N)
    b = x - A @ x + 0.1 * rng.normal(size=N)
    return tuple(jnp.asarray(a) for a in (A, b, x))


@pytest.fixture(scope="session")
def reg_env():
    """The module-level maps and helpers above (session-scoped so that hypothesis tests
    may use it; the functions keep their identity, so compilations are shared)."""
    return SimpleNamespace(
        N=N, N_SAMPLES=N_SAMPLES, Z=Z, SIGMA=SIGMA, KEY=KEY, OPTIONS=OPTIONS,
        affine=affine, affine_spec=affine_spec, Affine=Affine, spread_matrix=spread_matrix,
        scaled_orthogonal=scaled_orthogonal, value_and_grads=value_and_grads,
        linear_truth=linear_truth, assert_matches_linear_truth=assert_matches_linear_truth,
    )
