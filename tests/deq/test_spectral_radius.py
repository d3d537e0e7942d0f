"""`banax.spectral_radius` against the eigenvalues of dense Jacobians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax import DEQ
from deq.deq_cells import tanh_cell

N, D, BATCH = 6, 3, 4


def _dense_radius(fn, z):
    return float(np.max(np.abs(np.linalg.eigvals(np.asarray(jax.jacfwd(fn)(z))))))


def test_linear_map():
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (N, N)))
    a = (q * jnp.linspace(-0.9, 0.6, N)[None, :]) @ q.T  # ρ = 0.9, from a negative eigenvalue
    rho = banax.spectral_radius((lambda z, a: a @ z, (a,)), jnp.zeros(N),
                                key=jax.random.key(1))
    assert rho == pytest.approx(0.9, rel=1e-6)


def test_tanh_cell_per_sample():
    cell = tanh_cell(jax.random.key(2), N, D, radius=0.9)
    x = 2 * jax.random.normal(jax.random.key(3), (BATCH, D))
    deq = DEQ(cell, {"name": "anderson", "batch_axis": 0, "rtol": 1e-10}, "jfb",
              state_shape=(N,))
    z = deq(x)
    rho = banax.spectral_radius(deq.f_spec(x), z, batch_axis=0, key=jax.random.key(4),
                                n_steps=400)
    truth = [_dense_radius(lambda zi: cell(zi, x[i]), z[i]) for i in range(BATCH)]
    assert rho.shape == (BATCH,)
    np.testing.assert_allclose(rho, truth, rtol=2e-2)
    assert len(set(np.round(truth, 3))) == BATCH  # per sample, not one shared value


def test_bad_steps():
    with pytest.raises(ValueError, match="n_steps must be an int >= 2, got 1"):
        banax.spectral_radius(lambda z: z, jnp.zeros(2), key=jax.random.key(0), n_steps=1)
