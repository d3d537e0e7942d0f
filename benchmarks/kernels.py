"""Kernels per solver step in the compiled `banax bench` solve.

    uv run python benchmarks/kernels.py                       # the default solvers
    uv run python benchmarks/kernels.py anderson anderson:use_linalg=False --list

On a CPU a solver's cost beyond `f` is mostly the number of separate kernels its step
runs and the bytes they move, not arithmetic. This compiles the forward solve of the
benchmark problem (batch mode, 64 × 512, float32) for each solver item (`NAME` or
`NAME:KEY=VALUE[:KEY=VALUE...]`, as in `banax bench --solvers`) and counts the
top-level instructions of every while body in the optimised HLO: each is one kernel
(a fusion, a matrix product, a library call, a copy, a nested loop) per iteration.
Parameters, tuples, tuple elements, constants and bitcasts are not counted; they run no
code. The solver's main loop is the largest body; smaller ones are loops nested inside
its step (e.g. the pivoting loop of `jnp.linalg.solve`), which run several times per
step. `--list` prints the instructions. Counts are exact and depend only on the
versions of JAX and XLA, not on the machine's load.
"""

import argparse
import re
import sys

import jax
import jax.numpy as jnp

from banax import get_solver
from banax.benchmark import (
    DEFAULT_SOLVERS,
    SolveOnly,
    f_spec,
    parse_solver_item,
    problem,
    solver_options,
)

_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? ([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_BODY = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")


def loop_bodies(hlo: str) -> dict[str, list[str]]:
    """The counted instructions of every while body of an optimised HLO module."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        opening = _COMPUTATION.match(line)
        if opening:
            current = computations.setdefault(opening[1], [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            match = _INSTRUCTION.match(line)
            if match and match[1] not in _FREE:
                current.append(re.sub(r", metadata=.*", "", line.strip()))
    return {name: computations[name] for name in _BODY.findall(hlo) if name in computations}


def compiled_solve(item: str) -> str:
    """The optimised HLO of the benchmark's forward solve by the solver `item`."""
    shared = solver_options(1e-4, 2000)
    name, options = parse_solver_item("kernels.py", item, shared)
    solver = get_solver(name, **shared, **options)
    params, x = problem(64, 512, 0)

    def forward(params, x):
        return SolveOnly(solver)(f_spec(params, x), jnp.zeros_like(x)).value

    return jax.jit(forward).lower(params, x).compile().as_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("solvers", nargs="*", default=DEFAULT_SOLVERS.split(","))
    parser.add_argument("--list", action="store_true", help="print every instruction")
    args = parser.parse_args()
    print(f"JAX {jax.__version__} on {jax.default_backend()}")
    for item in args.solvers:
        bodies = sorted(loop_bodies(compiled_solve(item)).values(), key=len, reverse=True)
        counts = " + ".join(str(len(body)) for body in bodies)
        print(f"{item}: {counts} kernels per iteration (main loop first, then nested loops)")
        if args.list:
            for body in bodies:
                print("\n".join(f"    {instruction[:150]}" for instruction in body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
