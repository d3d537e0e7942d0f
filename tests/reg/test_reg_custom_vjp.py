"""The regularizers on maps with a `jax.custom_vjp`, which forbids forward mode: they
fall back to reverse mode and give the same estimates and gradients as forward mode
(closed forms on an affine map, the plain map's values on a nonlinear one, and a dense
Jacobian's top singular value on a `banax.nn.ConvCell`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from banax import nn
from banax_reg import denoising_energy, hutchinson_jacobian_frobenius, jacobian_spectral_norm
from helpers import dense_jacobian

REGULARIZERS = [jacobian_spectral_norm, hutchinson_jacobian_frobenius, denoising_energy]
NAMES = [r.__name__ for r in REGULARIZERS]


@jax.custom_vjp
def custom_affine(x, A, b):
    return A @ x + b


def _affine_fwd(x, A, b):
    return A @ x + b, (x, A)


def _affine_bwd(residuals, g):
    x, A = residuals
    return A.T @ g, jnp.outer(g, x), g


custom_affine.defvjp(_affine_fwd, _affine_bwd)


@jax.custom_vjp
def custom_tanh_layer(x, A, b):
    return jnp.tanh(A @ x + b)


def _tanh_fwd(x, A, b):
    y = jnp.tanh(A @ x + b)
    return y, (x, A, y)


def _tanh_bwd(residuals, g):
    x, A, y = residuals
    pre = g * (1 - y * y)
    return A.T @ pre, jnp.outer(pre, x), pre


custom_tanh_layer.defvjp(_tanh_fwd, _tanh_bwd)


def _tanh_layer(x, A, b):
    return jnp.tanh(A @ x + b)


def test_custom_vjp_really_forbids_forward_mode(linear_problem):
    A, b, x = linear_problem
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: custom_affine(x, A, b), (x,), (x,))


@pytest.mark.parametrize("reg", REGULARIZERS, ids=NAMES)
def test_custom_vjp_affine_map_matches_closed_forms_and_forward_mode(reg_env, linear_problem,
                                                                     reg):
    """Closed forms as for the plain affine map, and the very values and gradients of
    the forward-mode path (same probes, same products up to rounding)."""
    A, b, x = linear_problem
    value, grads = reg_env.value_and_grads(reg, lambda A, b: (custom_affine, (A, b)), A, b, x)
    reg_env.assert_matches_linear_truth(reg, value, grads, A, b, x)
    forward = reg_env.value_and_grads(reg, reg_env.affine_spec, A, b, x)
    for got, want in zip(jax.tree.leaves((value, grads)), jax.tree.leaves(forward)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reg", REGULARIZERS, ids=NAMES)
def test_custom_vjp_nonlinear_map_matches_forward_mode(reg_env, linear_problem, reg):
    """`tanh(A x + b)` with a hand-written VJP against the plain function: the
    regularizers' values and their gradients with respect to `A` and `b` (which move
    the Jacobian, so these differentiate the reverse-mode products themselves)."""
    A, b, x = linear_problem
    A = 2 * A
    options = {"n_steps": 64} if reg is not jacobian_spectral_norm else {}
    custom = reg_env.value_and_grads(reg, lambda A, b: (custom_tanh_layer, (A, b)), A, b, x,
                                     **options)
    plain = reg_env.value_and_grads(reg, lambda A, b: (_tanh_layer, (A, b)), A, b, x,
                                    **options)
    for got, want in zip(jax.tree.leaves(custom), jax.tree.leaves(plain)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    assert np.max(np.abs(custom[1][1])) > 1e-3  # b moves the Jacobian


def test_spectral_norm_of_a_conv_cell_is_its_dense_top_singular_value():
    cell = nn.ConvCell(2, 1, groups=1, key=jax.random.key(0), dtype=jnp.float64)
    z = jax.random.normal(jax.random.key(1), (1, 4, 4, 2), jnp.float64)
    x = jax.random.normal(jax.random.key(2), (1, 4, 4, 1), jnp.float64)
    value = jacobian_spectral_norm((cell, (x,)), z, key=jax.random.key(3), n_steps=3000)
    J = dense_jacobian(cell, z, x)
    s = np.linalg.svd(np.asarray(J), compute_uv=False)
    assert value <= s[0] * (1 + 1e-12)
    np.testing.assert_allclose(value, s[0], rtol=1e-8)
