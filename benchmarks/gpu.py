"""`banax bench` on an accelerator, with the loop's `check_every` option.

    uv run python benchmarks/gpu.py            # needs a JAX with a GPU backend

Prints the `banax bench` solver table (its standard problem, 64 × 512 in batch mode,
each solver with its defaults) and the same measurement for Picard and Anderson
testing convergence every 4 and 8 steps (`check_every`), which saves the host round
trip of the loop's condition on the other steps, and for Anderson's fused small solve
(`use_linalg=False`), which replaces a batched LU call per step. Refuses to run
(status 2) when JAX sees no accelerator, so that a CPU table is never taken for a GPU
one. Takes about a minute on a GPU. Measures with `banax.benchmark`, as `banax bench`
does.
"""

import sys

import jax
import jax.numpy as jnp

import banax
from banax.benchmark import (
    compile_timed,
    describe_machine,
    f_loop,
    measure_solver,
    problem,
    solver_options,
    solver_table,
)

REPEATS = 7
OPTIONS = solver_options(1e-4, 2000)
CONFIGS = {
    **{name: (name, {}) for name in ("picard", "relaxed", "reversible", "broyden", "anderson")},
    "anderson depth=10 damp=1": ("anderson", {"depth": 10, "damp": 1.0}),
    "anderson use_linalg=False": ("anderson", {"use_linalg": False}),
    "anderson use_linalg=False check_every=4": ("anderson", {"use_linalg": False,
                                                             "check_every": 4}),
    **{f"{name} check_every={k}": (name, {"check_every": k})
       for name in ("picard", "anderson") for k in (4, 8)},
}


def main() -> int:
    if jax.default_backend() == "cpu":
        print("benchmarks/gpu.py: JAX sees no accelerator (backend 'cpu'); install a "
              "GPU build of jax, or run `uv run banax bench` for the CPU table.")
        return 2
    print(f"machine: {describe_machine()}")
    params, x = problem(64, 512, 0)
    loop, _ = compile_timed(f_loop, params, x, jnp.asarray(1))
    rows = []
    for label, (name, options) in CONFIGS.items():
        solver = banax.get_solver(name, **OPTIONS, **options)
        rows.append(measure_solver(label, solver, params, x, loop, REPEATS, True))
        print(f"  measured {label}", flush=True)
    print()
    print(solver_table(rows, True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
