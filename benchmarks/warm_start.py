"""The implicit adjoint's backward solve, started from `ḡ` or warm-started from the
forward solver's inverse-Jacobian estimate (SHINE), on the `banax bench` problem.

    uv run python benchmarks/warm_start.py

Prints, per forward/backward solver and start: the backward solve's steps (largest and
mean over the samples) and the gradient's relative error against the dense
implicit-function-theorem gradient (float64, `banax.benchmark.reference_gradient`).
Counts and errors are exact, so the machine's load does not matter.
"""

import jax
import jax.numpy as jnp
import numpy as np

import banax
from banax.benchmark import (
    f_spec,
    gradient_error,
    problem,
    reference_gradient,
    solver_options,
    target,
)


def run(name: str, warm_start: bool, params: dict, x: jax.Array) -> tuple:
    solver = banax.get_solver(name, **solver_options(1e-4, 2000))
    adjoint = banax.get_adjoint("implicit", solver=solver, b_solver=solver,
                                warm_start=warm_start)
    goal = target(x)

    @jax.jit
    def grads(params, probe):
        def loss(params, probe):
            sol = adjoint(f_spec(params, x), jnp.zeros_like(x), backward_probe=probe)
            return 0.5 * jnp.sum((sol.value - goal) ** 2)

        return jax.grad(loss, argnums=(0, 1))(params, probe)

    g, stats = jax.device_get(grads(params, banax.BackwardStats.probe(batch_size=x.shape[0])))
    return g, np.asarray(stats.steps)


def main() -> None:
    params, x = problem(64, 512, 0)
    reference = reference_gradient(params, x)
    print("| forward and backward solver | backward start | backward steps (max / mean) "
          "| gradient rel. error |")
    print("|---|---|---|---|")
    for name in ("broyden", "anderson"):
        for warm in (False, True):
            g, steps = run(name, warm, params, x)
            error = gradient_error(g, reference)
            start = "warm (SHINE)" if warm else "ḡ"
            if warm and name == "anderson":
                start += ", no estimate: ḡ"
            print(f"| {name} | {start} | {int(steps.max())} / {steps.mean():.1f} "
                  f"| {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
