"""Evaluations of f that solver configurations need on the `banax bench` problem and on
an `orth` family (W = ρ Q with Q a random orthogonal matrix: eigenvalues spread round a
circle of radius ρ, some near −ρ, where damping matters), per-sample tolerance 1e-4.

    uv run python benchmarks/evaluations.py

Counts are exact (no timing), so the machine's load does not matter. Used to pick the
configurations recommended in docs/choosing.md.
"""

import itertools

import jax
import jax.numpy as jnp

import banax
from banax.benchmark import SolveOnly, f_spec, problem, solver_options

CONFIGS = {
    "anderson": ("anderson", {}),
    "anderson depth=8": ("anderson", {"depth": 8}),
    "anderson depth=10": ("anderson", {"depth": 10}),
    "anderson damp=1": ("anderson", {"damp": 1.0}),
    "anderson depth=8 damp=1": ("anderson", {"depth": 8, "damp": 1.0}),
    "anderson depth=10 damp=1": ("anderson", {"depth": 10, "damp": 1.0}),
    "broyden": ("broyden", {}),
    "broyden history_size=20": ("broyden", {"history_size": 20}),
    "picard": ("picard", {}),
}


def orth(seed: int, radius: float) -> tuple[dict, jax.Array]:
    params, x = problem(64, 512, seed)
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(seed + 100), (512, 512)))
    return {**params, "W": radius * q}, x


def evaluations(solver: banax.Solver, params: dict, x: jax.Array) -> tuple[int, bool]:
    @jax.jit
    def run(params, x):
        sol = SolveOnly(solver)(f_spec(params, x), jnp.zeros_like(x),
                                 trace=banax.trace_count())
        return sol.trace, jnp.all(sol.result == banax.Result.CONVERGED)

    count, ok = jax.device_get(run(params, x))
    return int(count), bool(ok)


def main() -> None:
    problems = {"bench": problem(64, 512, 0)}
    for seed, radius in itertools.product((0, 1), (0.9, 0.98)):
        problems[f"orth ρ={radius} s{seed}"] = orth(seed, radius)
    print("| configuration | " + " | ".join(problems) + " |")
    print("|---|" + "---|" * len(problems))
    for label, (name, options) in CONFIGS.items():
        solver = banax.get_solver(name, **solver_options(1e-4, 500), **options)
        cells = []
        for params, x in problems.values():
            count, ok = evaluations(solver, params, x)
            cells.append(str(count) if ok else f"{count} (failed)")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
