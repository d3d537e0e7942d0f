"""The multiscale DEQ's training step against the weight-tied unrolled baseline.

The model is `banax demo --data mnist --model multiscale`'s (`banax.cli._mnist.MnistMDEQ`,
about 50,000 parameters): a stem to 14×14, `banax.nn.MultiscaleCell` at 14×14 and 7×7,
`banax.nn.MultiscaleHead`. On one batch of 64 MNIST images it measures, for

- `deq`: the demo's layer (Anderson, rtol 1e-3, at most 20 steps; implicit adjoint with
  the same settings backward), and
- `unrolled`: the same cell applied `K` times from the zero state with backpropagation
  through the unroll, `K` the DEQ's forward step count on that batch (the same number of
  cell applications forward),

the first call of the jitted training step (compilation included) and the median of
the following ones. Run it with `uv run python benchmarks/zoo_multiscale.py [--repeats N]`;
it prints one line per model and the ratios.
"""

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from banax.cli import _mnist, _training, demo
from banax.cli._common import build_adjoint


def _unrolled_logits(model: _mnist.MnistMDEQ, images: jax.Array, steps: int) -> jax.Array:
    x = model.inject(images)
    cell = model.deq.cell
    z = jax.lax.fori_loop(0, steps, lambda _, z: cell(z, x), cell.zero_state(x))
    return model.head(z)


def _step(loss_fn, optimizer):
    @eqx.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = optimizer.update(grads, opt_state,
                                              eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return step


def _time(step, model, optimizer, x, y, repeats: int) -> tuple[float, float]:
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    start = time.perf_counter()
    model, opt_state, loss = step(model, opt_state, x, y)
    jax.block_until_ready(loss)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model, opt_state, loss = step(model, opt_state, x, y)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    options = parser.parse_args()
    demo_parser = argparse.ArgumentParser()
    demo.add_arguments(demo_parser)
    args = demo.resolve_defaults(demo_parser.parse_args(["--data", "mnist"]))
    model = _mnist.MnistMDEQ(build_adjoint(args), key=jax.random.key(0))
    data = _mnist.load()
    x = jnp.asarray(data.x_train[:options.batch])
    y = jnp.asarray(data.y_train[:options.batch])
    _, solution = eqx.filter_jit(lambda m, x: m(x))(model, x)
    steps = int(jnp.max(solution.stats.steps))
    optimizer = optax.adam(1e-3)

    def deq_loss(m, x, y):
        return _training.cross_entropy(m(x)[0], y)

    def unrolled_loss(m, x, y):
        return _training.cross_entropy(_unrolled_logits(m, x, steps), y)

    results = {}
    for name, loss in (("deq", deq_loss), ("unrolled", unrolled_loss)):
        first, median = _time(_step(loss, optimizer), model, optimizer, x, y,
                              options.repeats)
        results[name] = (first, median)
        print(f"{name:9s} first step (compile + run) {first:6.2f} s   step {1e3 * median:7.1f} ms"
              + (f"   (K = {steps} cell applications)" if name == "unrolled" else ""))
    print(f"deq / unrolled: step {results['deq'][1] / results['unrolled'][1]:.2f}x, "
          f"first step {results['deq'][0] / results['unrolled'][0]:.2f}x")


if __name__ == "__main__":
    main()
