"""One poisoned batch (a NaN input, an infinite one, or a huge finite one that makes the
cell overflow) in an optax training step, for every adjoint: never silent, and with
the recipe (`banax.step_failed` + `banax.skip_if`) the parameters stay as they were."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import banax
from deq.deq_cells import tanh_cell

N, D, BATCH = 4, 3, 3
PICARD = {"name": "picard", "batch_axis": 0, "max_steps": 30, "rtol": 1e-6}
ADJOINTS = {
    "implicit": {"solver": PICARD},
    "jfb": {"solver": PICARD},
    "gdeq": {"solver": dict(PICARD, name="broyden")},
    "bptt": {"solver": dict(PICARD, loop_kind="checkpointed")},
    "unroll_phantom": {"solver": PICARD},
    "neumann_phantom": {"solver": PICARD},
    "reversible": {"solver": dict(PICARD, name="reversible")},
}
# 1e200 is finite, but its square in the residual norm is not.
POISONS = {"nan": jnp.nan, "inf": jnp.inf, "overflow": 1e200}


class Injected(eqx.Module):
    """`cell(z, x) = tanh(z Wᵀ) + x Uᵀ`: the input enters unbounded, so a huge input
    gives a huge state (a contraction in `z` when `‖W‖₂ < 1`)."""

    W: jax.Array
    U: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(z @ self.W.T) + x @ self.U.T


def _cell():
    cell = tanh_cell(jax.random.key(0), N, D, radius=0.5)
    return Injected(cell.W, cell.U)


def _step(optimizer):
    @eqx.filter_jit
    def step(deq, opt_state, x, y):
        def loss(deq):
            z, sol = deq(x, return_solution=True)
            return jnp.mean((z - y) ** 2), sol

        (value, sol), grads = eqx.filter_value_and_grad(loss, has_aux=True)(deq)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts in
            updates, new_state = optimizer.update(grads, opt_state)
        new_deq = eqx.apply_updates(deq, updates)
        failed = banax.step_failed(sol, value, grads)
        deq, opt_state = banax.skip_if(failed, (new_deq, new_state), (deq, opt_state))
        return deq, opt_state, failed

    return step


@pytest.mark.parametrize("name", list(ADJOINTS))
def test_a_poisoned_batch_is_reported_and_skipped(name):
    deq = banax.DEQ(_cell(), adjoint=dict(ADJOINTS[name], name=name), state_shape=(N,))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(deq, eqx.is_inexact_array))
    step = _step(optimizer)
    x = jax.random.normal(jax.random.key(1), (BATCH, D))
    y = jax.random.normal(jax.random.key(2), (BATCH, N))
    params = eqx.filter(deq, eqx.is_inexact_array)
    for poison, value in POISONS.items():
        bad = x.at[1, 0].set(value)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            new, new_state, failed = step(deq, opt_state, bad, y)
            jax.effects_barrier()
        categories = {w.category for w in caught}
        assert banax.ForwardSolveWarning in categories, (poison, categories)
        assert bool(failed), poison
        assert eqx.tree_equal(eqx.filter(new, eqx.is_inexact_array), params), poison
        assert eqx.tree_equal(new_state, opt_state), poison
    # A clean batch trains.
    new, _, failed = step(deq, opt_state, x, y)
    assert not failed
    assert not eqx.tree_equal(eqx.filter(new, eqx.is_inexact_array), params)
    assert all(jnp.isfinite(a).all() for a in jax.tree.leaves(eqx.filter(new, eqx.is_array)))


def test_on_failure_raise_stops_a_poisoned_step():
    deq = banax.DEQ(_cell(), adjoint={"name": "jfb", "solver": PICARD, "on_failure": "raise"},
                    state_shape=(N,))
    x = jax.random.normal(jax.random.key(1), (BATCH, D)).at[1, 0].set(jnp.nan)
    grad = eqx.filter_jit(eqx.filter_grad(lambda deq: jnp.sum(deq(x))))
    with pytest.raises(Exception, match="JFB: the forward solve diverged"):
        jax.block_until_ready(grad(deq))


class Classifier(eqx.Module):
    """The model interface of the demo's training step: `(logits, solution)`."""

    deq: banax.DEQ
    readout: jax.Array

    def __call__(self, x, backward_probe=None):
        z, sol = self.deq(x, backward_probe=backward_probe, return_solution=True)
        return z @ self.readout.T, sol


def test_the_demo_step_skips_a_poisoned_update():
    from banax.cli._training import make_train_step

    deq = banax.DEQ(_cell(), adjoint={"name": "implicit", "solver": PICARD},
                    state_shape=(N,))
    model = Classifier(deq, jax.random.normal(jax.random.key(3), (2, N)))
    optimizer = optax.sgd(1e-1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(optimizer)
    x = jax.random.normal(jax.random.key(1), (BATCH, D))
    y = jnp.array([0, 1, 0], jnp.int32)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        new, _, metrics = step(model, opt_state, x.at[0, 0].set(jnp.nan), y)
        jax.effects_barrier()
    assert metrics["skipped"] == 1.0 and eqx.tree_equal(new, model)
    new, _, metrics = step(model, opt_state, x, y)
    assert metrics["skipped"] == 0.0 and not eqx.tree_equal(new, model)
