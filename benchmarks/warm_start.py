"""The implicit adjoint's backward solve, started from `ḡ` or warm-started from the
forward solver's inverse-Jacobian estimate (SHINE), on the `banax bench` problem.

    uv run python benchmarks/warm_start.py

Prints, per forward/backward solver and start: the backward solve's steps (largest and
mean over the samples) and the gradient's relative error against the dense
implicit-function-theorem gradient (float64, `banax.cli.bench.reference_gradient`).
Counts and errors are exact, so the machine's load does not matter.
"""

import jax
import jax.numpy as jnp
import numpy as np

import banax
from banax.cli.bench import _f_spec, _target, problem, reference_gradient


def run(name: str, warm_start: bool, params: dict, x: jax.Array) -> tuple:
    solver = banax.get_solver(name, atol=1e-4, rtol=0.0, max_steps=2000, batch_axis=0)
    adjoint = banax.get_adjoint("implicit", solver=solver, b_solver=solver,
                                warm_start=warm_start)
    target = _target(x)

    @jax.jit
    def grads(params, probe):
        def loss(params, probe):
            sol = adjoint(_f_spec(params, x), jnp.zeros_like(x), backward_probe=probe)
            return 0.5 * jnp.sum((sol.value - target) ** 2)

        return jax.grad(loss, argnums=(0, 1))(params, probe)

    g, stats = jax.device_get(grads(params, banax.BackwardStats.probe(batch_size=x.shape[0])))
    return g, np.asarray(stats.steps)


def main() -> None:
    params, x = problem(64, 512, 0)
    reference = reference_gradient(params, x)
    scale = np.sqrt(sum(np.sum(r**2) for r in reference.values()))
    print("| forward and backward solver | backward start | backward steps (max / mean) "
          "| gradient rel. error |")
    print("|---|---|---|---|")
    for name in ("broyden", "anderson"):
        for warm in (False, True):
            g, steps = run(name, warm, params, x)
            error = np.sqrt(sum(np.sum((np.asarray(g[k], np.float64) - reference[k]) ** 2)
                                for k in reference)) / scale
            start = "warm (SHINE)" if warm else "ḡ"
            if warm and name == "anderson":
                start += ", no estimate: ḡ"
            print(f"| {name} | {start} | {int(steps.max())} / {steps.mean():.1f} "
                  f"| {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
