"""The implicit graph DEQ's training step against its explicit baselines, on chains.

For each chain length `L`, the models of `banax demo --task chains` (width 16, a batch
of 32 chains, the demo's settings: Picard, `K = 2L + 20` steps, the implicit adjoint
with the forward solver's settings backwards):

- `deq`: `GraphCell` solved for `K` steps, gradient by the implicit adjoint (a
  backward solve of `K` steps);
- `unrolled`: the same cell applied `K` times, backpropagated (the weight-tied
  baseline with the same parameters and the same number of forward cell applications);
- `gcn`: the two-layer graph convolutional network of the same width.

Reports the compile time of the training step (its first call, minus one step) and the
median time of a compiled step (AdamW update included) over `--repeats` steps.

    uv run python benchmarks/zoo_graph.py --lengths 20,50,100
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from banax import get_adjoint
from banax.cli import _chains, _training


def measure(model, x, y, repeats):
    optimizer = _training.optimizer(1000, 1e-2)
    step = _training.make_train_step(optimizer)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    start = time.perf_counter()
    model, opt_state, metrics = step(model, opt_state, x, y)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model, opt_state, metrics = step(model, opt_state, x, y)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return first - median, median, {k: float(v) for k, v in metrics.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="20,50,100")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    print(f"{jax.devices()[0].platform}, batch {args.batch}, width {args.width}")
    print("| L | model | compile s | step ms | step / unrolled | fwd steps | bwd steps |")
    print("|---|---|---|---|---|---|---|")
    with jax.numpy_dtype_promotion("standard"):
        for length in (int(n) for n in args.lengths.split(",")):
            data = _chains.chains(length, chains_per_class=args.batch // 2)
            x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
            k = _chains.solve_steps(length)
            solver = {"name": "picard", "batch_axis": 0, "max_steps": k, "rtol": 0.0,
                      "atol": 0.0}
            adjoint = get_adjoint("implicit", solver=solver, b_solver=solver,
                                  on_failure="ignore")
            rows = {}
            for name in ("unrolled", "deq", "gcn"):
                model = _chains.build(name, length, adjoint, args.width, jax.random.key(0))
                rows[name] = measure(model, x, y, args.repeats)
            for name, (compile_s, step_s, metrics) in rows.items():
                ratio = step_s / rows["unrolled"][1]
                print(f"| {length} | {name} | {compile_s:.2f} | {1000 * step_s:.1f} | "
                      f"{ratio:.2f} | {metrics['f_steps']:.0f} | {metrics['b_steps']:.0f} |")


if __name__ == "__main__":
    main()
