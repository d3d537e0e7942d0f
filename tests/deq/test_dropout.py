"""Keyed cells: one key per solve gives one dropout mask (variational dropout), and
`eqx.nn.inference_mode` turns it off."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from annotation_checker import without_annotation_checks

from banax import DEQ
from deq.deq_cells import TanhCell, tanh_cell
from helpers import tree_allclose

N, D, BATCH = 6, 3, 4
SOLVER = {"name": "anderson", "batch_axis": 0, "rtol": 1e-12, "max_steps": 200}
ADJOINT = {"name": "implicit", "b_solver": {"name": "anderson", "rtol": 1e-12}}


class DropoutCell(eqx.Module):
    """`tanh(dropout(z) Wᵀ + x Uᵀ + b)`: dropout on the hidden state, as in torchdeq."""

    inner: TanhCell
    dropout: eqx.nn.Dropout

    def __call__(self, z, x, *, key=None):
        return self.inner(self.dropout(z, key=key), x)


@pytest.fixture(scope="module")
def setup():
    inner = tanh_cell(jax.random.key(0), N, D, radius=0.7)
    cell = DropoutCell(inner, eqx.nn.Dropout(0.3))
    x = jax.random.normal(jax.random.key(1), (BATCH, D))
    return inner, DEQ(cell, SOLVER, ADJOINT, state_shape=(N,)), x


def test_one_mask_per_solve(setup):
    _, deq, x = setup
    k1, k2 = jax.random.key(2), jax.random.key(3)
    z1, z2 = deq(x, key=k1), deq(x, key=k2)
    # z* is the fixed point of the cell evaluated with that one key (mask).
    assert jnp.max(jnp.abs(deq.cell(z1, x, key=k1) - z1)) < 1e-10
    assert jnp.max(jnp.abs(deq.cell(z2, x, key=k2) - z2)) < 1e-10
    assert jnp.max(jnp.abs(deq.cell(z1, x, key=k2) - z1)) > 1e-3
    assert jnp.max(jnp.abs(z1 - z2)) > 1e-3
    assert tree_allclose(eqx.filter_jit(deq)(x, key=k1), z1, rtol=1e-10, atol=1e-12)


def test_inference_mode_gives_the_deterministic_fixed_point(setup):
    inner, deq, x = setup
    plain = DEQ(inner, SOLVER, ADJOINT, state_shape=(N,))(x)
    off = eqx.nn.inference_mode(deq)
    assert tree_allclose(off(x), plain, rtol=1e-10, atol=1e-12)
    assert tree_allclose(off(x, key=jax.random.key(2)), plain, rtol=1e-10, atol=1e-12)
    assert eqx.nn.inference_mode(off, False).cell.dropout.inference is False


def test_training_with_dropout_lowers_the_loss(setup):
    _, deq, x = setup
    y = jnp.sin(2 * x[:, 0])
    model = (deq, 0.1 * jnp.ones(N))
    optimizer = optax.adam(2e-2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    def loss(model, key):
        deq, head = model
        return jnp.mean((deq(x, key=key) @ head - y) ** 2)

    @eqx.filter_jit
    def step(model, opt_state, key):
        value, grads = eqx.filter_value_and_grad(loss)(model, key)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts in
            updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, value

    first = loss(eqx.nn.inference_mode(model), None)
    for i in range(30):
        model, opt_state, _ = step(model, opt_state, jax.random.key(10 + i))
    assert loss(eqx.nn.inference_mode(model), None) < 0.5 * first


@without_annotation_checks()
def test_key_errors(setup):
    inner, deq, x = setup
    plain = DEQ(inner, SOLVER, ADJOINT, state_shape=(N,))
    with pytest.raises(TypeError, match="key= was given but the cell TanhCell takes no key"):
        plain(x, key=jax.random.key(0))
    with pytest.raises(TypeError, match="key must be a JAX PRNG key such as jax.random.key"):
        deq(x, key=3)
    with pytest.raises(ValueError, match="The cell needs a key: call deq.x, key=key."):
        deq(x)

    class NeedsKey(eqx.Module):
        def __call__(self, z, x, key):
            return 0.5 * z

    with pytest.raises(TypeError, match="NeedsKey requires a key .* call deq.x, key=key"):
        DEQ(NeedsKey(), SOLVER, ADJOINT, state_shape=(N,))(x)
