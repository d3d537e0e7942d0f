"""The training loop shared by `banax demo` and `banax bench --task mnist`.

A model here is an `eqx.Module` with a `deq` (a `banax.DEQ` in batch mode on axis 0),
an `inject(images)` giving the DEQ's input, and `__call__(images, backward_probe)`
returning `(logits, solution)`. Each step reports the forward solve's statistics from
its `Solution` and the backward solve's from a `banax.BackwardStats` probe, all inside
the one compiled step, and skips its update when the batch poisoned it (a diverged
forward solve or a non-finite loss or gradient: `banax.step_failed`, `banax.skip_if`).

A model may also carry a Jacobian penalty: a positive float `jacobian_weight` (a static
field) and `logits(z)`, the head on the equilibrium state. Its loss is then

    cross-entropy + jacobian_weight · mean over the batch of ‖∂f/∂z‖²_F / d

at `z*` (`banax.regularization.hutchinson_jacobian_frobenius`, one Rademacher probe per
step), which keeps the cell contractive as it trains, so both solves stay short.
"""

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._failures import skip_if, step_failed
from .._solution import BackwardStats, Result
from ..utils import trace_history


@dataclasses.dataclass(frozen=True)
class Data:
    """Training and test inputs (batch first, float32) and int32 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def optimizer(steps: int, peak_lr: float = 3e-3) -> Any:
    """AdamW (weight decay 1e-4) on a one-cycle learning-rate schedule over `steps`."""
    import optax

    return optax.adamw(optax.cosine_onecycle_schedule(steps, peak_lr), weight_decay=1e-4)


def cross_entropy(logits: Float[Array, "*n classes"], labels: Int[Array, "*n"]) -> Array:
    """The mean over every label (one per sample, or one per node or position)."""
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[..., None], axis=-1))


def jacobian_weight(model: Any) -> float:
    """The model's Jacobian penalty weight (0 for a model without one)."""
    return getattr(model, "jacobian_weight", 0.0)


def loss_and_solution(model: Any, probe: BackwardStats | None, x: Array, y: Array,
                      key: PRNGKeyArray | None = None) -> Any:
    """The loss and the forward solve's `Solution`; differentiate with respect to
    `probe` too to receive the backward solve's `BackwardStats`. `key` draws the
    Jacobian penalty's probe; required when the model has a penalty."""
    weight = jacobian_weight(model)
    if not weight:
        logits, solution = model(x, backward_probe=probe)
        return cross_entropy(logits, y), solution
    if key is None:
        raise ValueError(f"the model's jacobian_weight is {weight}, so the loss needs a "
                         "key for the penalty's probe; pass key=jax.random.key(...)")
    from ..regularization import hutchinson_jacobian_frobenius

    inject = model.inject(x)
    z, solution = model.deq(inject, backward_probe=probe, return_solution=True)
    penalty = hutchinson_jacobian_frobenius(model.deq.f_spec(inject), z, key=key,
                                            batch_axis=0)
    return cross_entropy(model.logits(z), y) + weight * jnp.mean(penalty), solution


def make_train_step(optimizer: Any) -> Callable[..., Any]:
    """`step(model, opt_state, x, y, key=None) -> (model, opt_state, metrics)`, compiled;
    `key` (the Jacobian penalty's probe) only for a model with a penalty.

    `metrics`: the batch loss; the batch means of the forward solve's steps and
    residual `‖f(z) − z‖` and of the backward solve's; and the fraction of samples
    whose backward solve did not converge; and whether the update was skipped
    (1.0) because the step failed.
    """

    @eqx.filter_jit
    def step(model, opt_state, x, y, key=None):
        probe = BackwardStats.probe(batch_size=x.shape[0])
        grad_fn = eqx.filter_value_and_grad(
            lambda mp: loss_and_solution(mp[0], mp[1], x, y, key), has_aux=True
        )
        (loss, solution), (grads, backward) = grad_fn((model, probe))
        stats = solution.stats
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        # A poisoned batch must not reach the parameters (nor Adam's moments).
        failed = step_failed(solution, loss, grads)
        model, opt_state = skip_if(
            failed, (eqx.apply_updates(model, updates), new_opt_state), (model, opt_state)
        )
        metrics = {
            "loss": loss.astype(jnp.float32),
            "f_steps": jnp.mean(stats.steps.astype(jnp.float32)),
            "f_residual": jnp.mean(stats.abs_err.astype(jnp.float32)),
            "b_steps": jnp.mean(backward.steps),
            "b_residual": jnp.mean(backward.abs_err),
            "b_failed": jnp.mean(
                (backward.result_codes() != Result.CONVERGED).astype(jnp.float32)
            ),
            "skipped": failed.astype(jnp.float32),
        }
        return model, opt_state, metrics

    return step


@eqx.filter_jit
def _predict(model: Any, x: Array) -> Array:
    logits, _ = model(x)
    return jnp.argmax(logits, axis=-1)


def accuracy(model: Any, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    """The fraction of the labels `y` predicted (one per sample, or several: `y`'s
    shape is the logits' without the classes), `batch` samples at a time."""
    correct = 0
    for i in range(0, len(y), batch):
        classes = _predict(model, jnp.asarray(x[i:i + batch]))
        correct += int(np.sum(np.asarray(classes) == y[i:i + batch]))
    return correct / y.size


@dataclasses.dataclass(frozen=True)
class Epoch:
    """One epoch's means over its steps, the test accuracy after it, the seconds
    spent training so far, wall clock and process CPU (evaluation excluded), and the
    share of steps whose update was skipped because the step failed."""

    epoch: int
    loss: float
    f_steps: float
    f_residual: float
    b_steps: float
    b_residual: float
    b_failed: float
    test_accuracy: float
    wall_s: float
    cpu_s: float
    skipped: float = 0.0


def _batches(data: Data, batch: int, rng: np.random.Generator,
             augment: Callable[[np.ndarray, np.random.Generator], np.ndarray],
             ) -> Iterator[tuple[Array, Array]]:
    """One epoch of shuffled full batches (a ragged last batch would recompile)."""
    order = rng.permutation(len(data.y_train))
    for i in range(len(order) // batch):
        idx = order[i * batch:(i + 1) * batch]
        yield jnp.asarray(augment(data.x_train[idx], rng)), jnp.asarray(data.y_train[idx])


def train(
    model: Any, data: Data, optimizer: Any, *, epochs: int, batch: int, seed: int = 0,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] = lambda x, rng: x,
    on_step: Callable[[], object] = lambda: None,
    on_epoch: Callable[[Epoch], None] = lambda record: None,
) -> tuple[Any, list[Epoch]]:
    """Train `model` on `data` for `epochs`; returns it and the per-epoch records.

    `on_step` runs after every step (a progress bar), `on_epoch` after every epoch.
    """
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(optimizer)
    rng = np.random.default_rng(seed)
    # The penalty's probes, one key per step (only drawn for a model with a penalty).
    key = jax.random.key(seed + 1) if jacobian_weight(model) else None
    steps_per_epoch = len(data.y_train) // batch
    history: list[Epoch] = []
    wall = cpu = 0.0
    for epoch in range(1, epochs + 1):
        totals: dict[str, float] = {}
        start, start_cpu = time.perf_counter(), time.process_time()
        for x, y in _batches(data, batch, rng, augment):
            step_key = None
            if key is not None:
                key, step_key = jax.random.split(key)
            model, opt_state, metrics = step(model, opt_state, x, y, step_key)
            for name, value in jax.device_get(metrics).items():
                totals[name] = totals.get(name, 0.0) + float(value)
            on_step()
        wall += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        means = {name: total / steps_per_epoch for name, total in totals.items()}
        record = Epoch(epoch, **means, test_accuracy=accuracy(model, data.x_test, data.y_test),
                       wall_s=wall, cpu_s=cpu)
        history.append(record)
        on_epoch(record)
    return model, history


def residual_histories(model: Any, images: Array) -> np.ndarray:
    """Each image's residual `‖f(z) − z‖` at every evaluation of the cell, `(n, evals)`.

    The batch is solved as in training; a sample that has converged is frozen, so its
    residual stays at its final value for the rest of the solve.
    """
    def per_sample(z: Any, fz: Any, aux: Any) -> Array:
        # Any pytree state (a multiscale cell's tuple of maps): the norm over its leaves.
        diffs = [(b - a).reshape(a.shape[0], -1)
                 for a, b in zip(jax.tree.leaves(z), jax.tree.leaves(fz))]
        return jnp.linalg.norm(jnp.concatenate(diffs, axis=1), axis=1)

    # Line-search solvers evaluate the cell more than once per step.
    trace = trace_history(per_sample, n_evals=2 * model.deq.solver.max_steps + 1,
                          init_value=jnp.zeros(images.shape[0], jnp.float32))

    @eqx.filter_jit
    def traces(model, images):
        # The weights come in as arguments: closed over, XLA would constant-fold them.
        _, solution = model.deq(model.inject(images), trace=trace, return_solution=True)
        return solution.trace

    count, history = jax.device_get(traces(model, images))
    return np.asarray(history[: min(int(count), history.shape[0])]).T
