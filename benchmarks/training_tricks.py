"""The DEQ training toolkit on the digits demo: each trick against the plain layer.

    python benchmarks/training_tricks.py [--epochs 6] [--repeats 2]

The model is the demo's (`banax demo`): a linear embedding of the 8×8 digits, the
contractive cell `tanh(W̃ z + u)` of width 64 in a `banax.DEQ` (Anderson in batch mode,
rtol 1e-4, the implicit adjoint), a linear head, AdamW on a one-cycle schedule, batches
of 64. Each row trains the same initial model with one trick switched on and reports
the mean forward steps per sample over the last epoch (and over all epochs), the test
accuracy, and the wall time per training step (compiled, median over the steps of the
last epoch, range over `--repeats` runs). A second table times a weight-normed cell
against the same cell with precomputed weights inside the solve, and says whether
XLA hoisted the normalisation out of the while loop.

Needs the demo extra (optax, scikit-learn).
"""

import argparse
import re
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import banax
from banax.cli.demo import Cell, digits_data

WIDTH, BATCH, RTOL = 64, 64, 1e-4
SOLVER = {"name": "anderson", "batch_axis": 0, "rtol": RTOL, "max_steps": 60}


class DropoutCell(eqx.Module):
    """The demo cell with variational dropout on the state."""

    cell: Cell
    dropout: eqx.nn.Dropout

    def __call__(self, z, u, *, key=None):
        return self.cell(self.dropout(z, key=key), u)


class Model(eqx.Module):
    embed: eqx.nn.Linear
    deq: banax.DEQ
    head: eqx.nn.Linear
    learned_init: bool = eqx.field(static=True)

    def __call__(self, images, *, key=None, z0=None):
        u = jax.vmap(self.embed)(images)
        if self.learned_init:  # the guess network is the layer's init rule
            z0 = self.deq.initial_state(u)
        z, sol = self.deq(u, key=key, z0=z0, return_solution=True)
        aux = banax.initial_guess_loss(z0, z) if self.learned_init else 0.0
        return jax.vmap(self.head)(z), z, sol, aux


def build(trick: str, key: jax.Array) -> Model:
    k_embed, k_cell, k_head, k_guess = jax.random.split(key, 4)
    weight = jax.random.normal(k_cell, (WIDTH, WIDTH), jnp.float32) * 0.5 / WIDTH**0.5
    cell: Any = Cell(weight)
    solver: Any = SOLVER
    options: dict[str, Any] = {"state_shape": (WIDTH,)}
    if trick == "dropout":
        cell = DropoutCell(cell, eqx.nn.Dropout(0.1))
    elif trick == "fallback":
        solver = {"name": "fallback",
                  "primary": {"name": "picard", "batch_axis": 0, "rtol": RTOL,
                              "max_steps": 15},
                  "secondary": SOLVER}
    elif trick == "learned init":
        guess = eqx.nn.Linear(WIDTH, WIDTH, key=k_guess, dtype=jnp.float32)
        options = {"init": eqx.filter_vmap(guess)}  # z0 = guess(u), per sample
    elif trick == "inference settings":
        options["inference_settings"] = {"rtol": 1e-2}
    return Model(eqx.nn.Linear(64, WIDTH, key=k_embed, dtype=jnp.float32),
                 banax.DEQ(cell, solver, **options),
                 eqx.nn.Linear(WIDTH, 10, key=k_head, dtype=jnp.float32),
                 trick == "learned init")


def train(trick: str, epochs: int, seed: int) -> dict[str, Any]:
    data = digits_data(seed)
    n = len(data.x_train)
    per_epoch = n // BATCH
    optimizer = optax.adamw(optax.cosine_onecycle_schedule(epochs * per_epoch, 3e-3),
                            weight_decay=1e-4)
    model = build(trick, jax.random.key(seed))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    cache = banax.FixedPointCache.empty(n, (WIDTH,), jnp.float32)

    @eqx.filter_jit
    def step(model, opt_state, cache, x, y, index, key):
        def loss(model):
            keyed = key if trick == "dropout" else None
            z0 = cache.read(index, model.deq.initial_state(jnp.zeros((x.shape[0], WIDTH),
                                                                      jnp.float32))) \
                if trick == "cache" else None
            logits, z, sol, aux = model(x, key=keyed, z0=z0)
            log_p = jax.nn.log_softmax(logits)
            ce = -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))
            return ce + aux, (z, sol.stats.steps)

        (_, (z, steps)), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        updates, opt_state = optimizer.update(grads, opt_state,
                                              eqx.filter(model, eqx.is_inexact_array))
        if trick == "cache":
            cache = cache.write(index, z)
        return eqx.apply_updates(model, updates), opt_state, cache, jnp.mean(steps)

    rng = np.random.default_rng(seed)
    steps_per_epoch, times = [], []
    for epoch in range(epochs):
        if trick == "pretrain":  # the first epoch unrolled, then equilibrium training
            model = eqx.tree_at(lambda m: m.deq.pretrain_steps, model,
                                8 if epoch == 0 else None, is_leaf=lambda v: v is None)
        order = rng.permutation(n)
        epoch_steps, epoch_times = [], []
        for b in range(per_epoch):
            index = jnp.asarray(order[b * BATCH:(b + 1) * BATCH])
            x, y = jnp.asarray(data.x_train)[index], jnp.asarray(data.y_train)[index]
            start = time.perf_counter()
            model, opt_state, cache, mean_steps = step(
                model, opt_state, cache, x, y, index,
                jax.random.key(epoch * per_epoch + b))
            mean_steps.block_until_ready()
            epoch_times.append(time.perf_counter() - start)
            epoch_steps.append(float(mean_steps))
        steps_per_epoch.append(float(np.mean(epoch_steps)))
        times.append(float(np.median(epoch_times)))
    infer = eqx.nn.inference_mode(model)
    logits, _, sol, _ = eqx.filter_jit(lambda m, x: m(x))(infer, jnp.asarray(data.x_test))
    accuracy = float(jnp.mean(jnp.argmax(logits, 1) == jnp.asarray(data.y_test)))
    return {"last": steps_per_epoch[-1], "mean": float(np.mean(steps_per_epoch)),
            "accuracy": accuracy, "ms": 1e3 * times[-1],
            "test_steps": float(jnp.mean(sol.stats.steps))}


def weight_norm_table(repeats: int) -> None:
    """A WeightNorm cell in the solve against the same cell with its weight computed
    once, outside the solve."""
    key = jax.random.key(0)
    linear = eqx.nn.Linear(WIDTH, WIDTH, use_bias=False, key=key, dtype=jnp.float32)
    linear = eqx.tree_at(lambda lin: lin.weight, linear, linear.weight * 0.5)
    normed = eqx.nn.WeightNorm(linear)

    class Normed(eqx.Module):
        layer: eqx.Module  # an eqx.nn.WeightNorm, or the Linear with its weight

        def __call__(self, z, u):
            return jnp.tanh(jax.vmap(self.layer)(z) + u)

    solver = {"name": "picard", "batch_axis": 0, "rtol": 1e-6, "max_steps": 200}
    u = jax.random.normal(jax.random.key(1), (1024, WIDTH), jnp.float32)

    @eqx.filter_jit
    def solve(cell, u):
        return banax.DEQ(cell, solver, "jfb", state_shape=(WIDTH,))(u)

    # Row i of vmap(normed)(I) is W e_i, column i of the normalised W.
    weight = jax.vmap(normed)(jnp.eye(WIDTH, dtype=jnp.float32)).T
    precomputed = Normed(eqx.tree_at(lambda lin: lin.weight, linear, weight))
    rows = []
    for name, cell in (("WeightNorm inside the solve", Normed(normed)),
                       ("precomputed weight", precomputed)):
        solve(cell, u).block_until_ready()
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(10):
                solve(cell, u).block_until_ready()
            runs.append((time.perf_counter() - start) / 10 * 1e3)
        rows.append((name, min(runs), max(runs)))
    def sqrt_in_loop(cell: eqx.Module) -> int:
        params, static = eqx.partition(cell, eqx.is_array)
        lowered = jax.jit(lambda p, u: solve(eqx.combine(p, static), u)).lower(params, u)
        return _sqrt_in_loop(lowered.compile().as_text())

    # The loop's residual norms take square roots too: compare with the plain cell.
    extra = sqrt_in_loop(Normed(normed)) - sqrt_in_loop(precomputed)
    steps = [int(jnp.max(banax.DEQ(c, solver, "jfb", state_shape=(WIDTH,))(
        u, return_solution=True)[1].stats.steps)) for c in (Normed(normed), precomputed)]
    print("| cell | forward solve, ms (range) |")
    print("|---|---|")
    for name, lo, hi in rows:
        print(f"| {name} | {lo:.2f}–{hi:.2f} |")
    print(f"\nsolver steps: {steps}; square roots inside the compiled loop beyond the "
          f"plain cell's: {extra} (0: the normalisation is hoisted out of the loop)")


def _sqrt_in_loop(hlo: str) -> int:
    """The number of square roots computed inside the while loops of a compiled HLO
    module (the loop bodies and every computation they call)."""
    blocks: dict[str, str] = {}
    for block in hlo.split("\n\n"):
        head = block.strip().split("\n")[0].split()
        if head:
            name = head[1] if head[0] == "ENTRY" else head[0]
            blocks[name.lstrip("%")] = block
    todo = re.findall(r"body=%?([\w.\-]+)", hlo)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in blocks:
            continue
        seen.add(name)
        todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", blocks[name])
    return sum(len(re.findall(r"\b(?:r?sqrt)\(", blocks[n])) for n in seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tricks", default="plain,dropout,cache,learned init,fallback,"
                        "pretrain,inference settings")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}, epochs {args.epochs}, repeats {args.repeats}\n")
    print("| trick | fwd steps, last epoch | fwd steps, all epochs | test steps | "
          "test accuracy | ms / train step |")
    print("|---|---|---|---|---|---|")
    for trick in args.tricks.split(","):
        runs = [train(trick, args.epochs, seed) for seed in range(args.repeats)]

        def span(k: str, fmt: str) -> str:
            values = [r[k] for r in runs]
            return f"{min(values):{fmt}}–{max(values):{fmt}}"

        print(f"| {trick} | {span('last', '.1f')} | {span('mean', '.1f')} | "
              f"{span('test_steps', '.1f')} | {span('accuracy', '.3f')} | "
              f"{span('ms', '.1f')} |", flush=True)
    print()
    weight_norm_table(args.repeats)


if __name__ == "__main__":
    main()
