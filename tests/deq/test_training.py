"""Training a `banax.DEQ` with optax: the loss falls, and a Jacobian regularizer added
to the loss does what it says."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import banax
from banax import DEQ
from deq.deq_cells import Regressor, mse, tanh_cell

N, D, BATCH, STEPS = 8, 4, 32, 40


def _dense_jacobian_frobenius(model: Regressor, x: jax.Array) -> jax.Array:
    """Mean over samples of ‖∂cell/∂z‖_F² at the equilibrium, from dense Jacobians."""
    z = model.deq(x)
    jac = jax.vmap(jax.jacfwd(model.deq.cell))(z, x)
    return jnp.mean(jnp.sum(jac**2, axis=(1, 2)))


def test_training_lowers_the_loss_and_the_regularizer_acts():
    kc, kh, kx = jax.random.split(jax.random.key(0), 3)
    deq = DEQ(
        tanh_cell(kc, N, D, radius=0.9),
        {"name": "anderson", "batch_axis": 0, "rtol": 1e-8, "max_steps": 100},
        {"name": "implicit", "b_solver": {"name": "anderson", "rtol": 1e-8}},
        state_shape=(N,),
    )
    model = Regressor(deq, 0.1 * jax.random.normal(kh, (N,)))
    x = jax.random.normal(kx, (BATCH, D))
    y = jnp.sin(2 * x[:, 0]) * x[:, 1]
    # A rate at which the loss falls smoothly: at 2e-2 it spiked in the last steps, and
    # whether the final step landed on a spike depended on the last bits of the compiled
    # arithmetic (XLA's optimisation level).
    optimizer = optax.adam(1.5e-2)
    regularizer = banax.regularization.hutchinson_jacobian_frobenius

    @eqx.filter_jit
    def train_step(model, opt_state, weight, key):
        def objective(model):
            loss, z = mse(model, x, y)
            penalty = regularizer(model.deq.f_spec(x), z, key=key, n_steps=2, batch_axis=0)
            return loss + weight * jnp.mean(penalty), loss

        (_, loss), grads = eqx.filter_value_and_grad(objective, has_aux=True)(model)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts in
            updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, loss

    def train(weight: float) -> tuple[Regressor, list[float]]:
        trained = model
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        losses = []
        for step in range(STEPS):
            key = jax.random.fold_in(jax.random.key(1), step)
            trained, opt_state, loss = train_step(trained, opt_state, jnp.asarray(weight), key)
            losses.append(float(loss))
        return trained, losses

    plain, plain_losses = train(0.0)
    regularized, reg_losses = train(1.0)
    assert plain_losses[-1] < 0.5 * plain_losses[0]
    assert reg_losses[-1] < 0.5 * reg_losses[0]
    # The penalty's gradient reaches the cell: its Jacobian ends up smaller.
    assert _dense_jacobian_frobenius(regularized, x) < 0.8 * _dense_jacobian_frobenius(plain, x)


def test_the_default_layer_trains():
    """`DEQ(cell, solver="anderson", state_shape=...)`, default adjoint "implicit" (whose
    backward solver defaults to the forward one), trains a model with optax."""
    kc, kh, kx = jax.random.split(jax.random.key(3), 3)
    model = Regressor(DEQ(tanh_cell(kc, N, D, radius=0.8), solver="anderson",
                          state_shape=(N,)), 0.1 * jax.random.normal(kh, (N,)))
    x = jax.random.normal(kx, (BATCH, D))
    y = jnp.sin(2 * x[:, 0]) * x[:, 1]
    optimizer = optax.adam(2e-2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    def loss(model):
        return jnp.mean((jax.vmap(model)(x)[0] - y) ** 2)

    @eqx.filter_jit
    def step(model, opt_state):
        value, grads = eqx.filter_value_and_grad(loss)(model)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts in
            updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, value

    first = loss(model)
    # Adam at this rate oscillates for the first ~40 steps (0.26 at step 30, 0.20 at 40 on one
    # machine, 0.29 at 40 on another); by step 80 the loss is an order of magnitude down.
    for _ in range(2 * STEPS):
        model, opt_state, _ = step(model, opt_state)
    assert loss(model) < 0.5 * first


def test_backward_probe_and_budget_reach_the_adjoint():
    deq = DEQ(tanh_cell(jax.random.key(4), N, D, radius=0.9),
              {"name": "anderson", "batch_axis": 0, "rtol": 1e-8},
              {"name": "implicit", "b_solver": {"name": "picard", "rtol": 1e-8,
                                                "max_steps": 300}},
              state_shape=(N,))
    x = jax.random.normal(jax.random.key(5), (BATCH, D))

    def backward_stats(budget):
        def loss(probe):
            return jnp.sum(deq(x, backward_probe=probe, backward_budget=budget))
        return jax.grad(loss)(banax.BackwardStats.probe(batch_size=BATCH))

    full = backward_stats(None)
    with pytest.warns(banax.BackwardSolveWarning, match="did not converge"):
        capped = backward_stats(jnp.asarray(3))
    assert bool(jnp.all(full.result_codes() == banax.Result.CONVERGED))
    assert bool(jnp.all(full.steps > 3))
    assert bool(jnp.all(capped.steps == 3))
    assert bool(jnp.all(capped.result_codes() == banax.Result.MAX_STEPS))
