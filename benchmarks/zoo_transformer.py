"""Training-step time and compile time of the charlm DEQ-Transformer against the
weight-tied unrolled network with the same cell applications (and the explicit one).

    uv run python benchmarks/zoo_transformer.py [--rounds 20] [--batch 16] [--width 64]
        [--demo "--adjoint jfb"]

The models are `banax demo --task charlm`'s (`banax.cli._charlm.build`), with its
default solver settings (Anderson, `rtol=1e-2`, `max_steps=8`; the implicit adjoint's
backward solve Picard with the same budget), or those of the `banax demo` options given
in `--demo`. Each model's training step (`banax.cli._training`'s, the one the demo
runs) is compiled by its first call, timed as "first step"; then the steps are
timed interleaved, one call of each model per round on the same batch, and the table
shows the median and range over the rounds and the ratio to the unrolled model's
median. Timings on a shared machine vary with its load: report the load beside them.
"""

import argparse
import os
import shlex
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from banax.cli import _charlm, _training, demo
from banax.cli._common import build_adjoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--models", default="deq,unrolled,explicit")
    parser.add_argument("--demo", default="", help="banax demo options for the solver "
                        "and adjoint, e.g. \"--adjoint-option b_solver=picard\"")
    options = parser.parse_args()

    demo_parser = argparse.ArgumentParser()
    demo.add_arguments(demo_parser)
    args = _charlm.resolve_defaults(demo_parser.parse_args(["--task", "charlm",
                                                            *shlex.split(options.demo)]))
    adjoint = build_adjoint(args)
    corpus = _charlm.load_corpus()
    rng = np.random.default_rng(0)
    tokens, targets = (jnp.asarray(a) for a in _charlm.windows(
        corpus.train, rng.integers(0, len(corpus.train) - _charlm.LENGTH - 1, options.batch)))

    names = options.models.split(",")
    steps, states, first = {}, {}, {}
    for name in names:
        model = _charlm.build(name, adjoint, len(corpus.alphabet), options.width,
                              key=jax.random.key(0))
        optimizer = _training.optimizer(1000)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        step = _training.make_train_step(optimizer)
        start = time.perf_counter()
        jax.block_until_ready(step(model, opt_state, tokens, targets))
        first[name] = time.perf_counter() - start
        steps[name], states[name] = step, (model, opt_state)

    times = {name: [] for name in names}
    for _ in range(options.rounds):
        for name in names:
            model, opt_state = states[name]
            start = time.perf_counter()
            jax.block_until_ready(steps[name](model, opt_state, tokens, targets))
            times[name].append(time.perf_counter() - start)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"solver {adjoint.solver!r}\nadjoint {type(adjoint).__name__} {options.demo}")
    print(f"batch {options.batch} x {_charlm.LENGTH} characters, width {options.width}, "
          f"{options.rounds} rounds; {os.cpu_count()} CPUs, load average {load:.1f}")
    base = np.median(times["unrolled"]) if "unrolled" in times else float("nan")
    base_first = first.get("unrolled", float("nan"))
    print(f"{'model':10s} {'ms/step median':>14s} {'range':>15s} {'vs unrolled':>11s} "
          f"{'first step s':>12s} {'vs unrolled':>11s}")
    for name in names:
        ms = 1000 * np.asarray(times[name])
        print(f"{name:10s} {np.median(ms):14.0f} {ms.min():7.0f}-{ms.max():<7.0f} "
              f"{np.median(times[name]) / base:10.2f}x {first[name]:12.1f} "
              f"{first[name] / base_first:10.2f}x")


if __name__ == "__main__":
    main()
